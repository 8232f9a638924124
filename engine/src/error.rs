//! One error type for the whole engine. Every variant names what was wrong (file, tensor,
//! field, argument) so a user can act on the message without a debugger.

use alloc::string::String;
use alloc::vec::Vec;
use core::fmt;

#[derive(Debug, Clone, PartialEq)]
pub enum Error {
    /// `config.json` could not be parsed or lacks / mislabels a field.
    Config(String),
    /// A model type this engine does not run.
    UnsupportedModel {
        model_type: String,
        supported: &'static [&'static str],
    },
    /// A safetensors file ends before the data its (self-consistent) header describes.
    Truncated {
        file: String,
        needed: u64,
        actual: u64,
    },
    /// A safetensors header is malformed (bad length prefix, bad JSON, bad dtype name...).
    BadHeader { file: String, detail: String },
    /// A tensor's data offsets disagree with its dtype × shape, overlap another tensor or
    /// point outside the file.
    BadOffsets {
        file: String,
        tensor: String,
        detail: String,
    },
    /// A tensor the config implies is not in the checkpoint.
    MissingTensor { tensor: String },
    /// A tensor has the wrong shape for this config.
    WrongShape {
        tensor: String,
        expected: Vec<usize>,
        found: Vec<usize>,
    },
    /// A tensor is stored in a dtype the engine does not read (bf16, f16, f32 supported).
    WrongDtype { tensor: String, found: String },
    /// An index file or shard list is inconsistent.
    Index(String),
    /// Reading a file failed.
    Io { path: String, detail: String },
    /// The tokenizer could not be loaded or failed.
    Tokenizer(String),
    /// An image could not be decoded or is unusable.
    Image(String),
    /// A caller-supplied argument is out of range (lengths, steps, thresholds...).
    InvalidArgument(String),
    /// Generation was cancelled by the caller.
    Cancelled,
}

pub type Result<T, E = Error> = core::result::Result<T, E>;

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Config(m) => write!(f, "config: {m}"),
            Error::UnsupportedModel { model_type, supported } => write!(
                f,
                "unsupported model_type {model_type:?}; supported: {}",
                supported.join(", ")
            ),
            Error::Truncated { file, needed, actual } => write!(
                f,
                "{file}: file is truncated: its header describes {needed} bytes but the file has {actual}"
            ),
            Error::BadHeader { file, detail } => write!(f, "{file}: bad safetensors header: {detail}"),
            Error::BadOffsets { file, tensor, detail } => {
                write!(f, "{file}: tensor {tensor}: bad data offsets: {detail}")
            }
            Error::MissingTensor { tensor } => write!(f, "missing tensor {tensor}"),
            Error::WrongShape { tensor, expected, found } => write!(
                f,
                "tensor {tensor} has shape {found:?}, expected {expected:?} for this config"
            ),
            Error::WrongDtype { tensor, found } => write!(
                f,
                "tensor {tensor} has dtype {found}; supported dtypes are BF16, F16 and F32"
            ),
            Error::Index(m) => write!(f, "checkpoint index: {m}"),
            Error::Io { path, detail } => write!(f, "{path}: {detail}"),
            Error::Tokenizer(m) => write!(f, "tokenizer: {m}"),
            Error::Image(m) => write!(f, "image: {m}"),
            Error::InvalidArgument(m) => write!(f, "invalid argument: {m}"),
            Error::Cancelled => write!(f, "generation cancelled"),
        }
    }
}

#[cfg(feature = "std")]
impl std::error::Error for Error {}
