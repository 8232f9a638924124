//! dvl: an embeddable inference engine for DiffusionVL block-diffusion vision-language
//! models (spec: `shared/spec/DIFFUSIONVL.md`).
//!
//! The core (config, weights from byte slices, vision tower, text model, decoder, image
//! preprocessing of RGB8 buffers) is `no_std` + `alloc`. The `std` feature adds checkpoint
//! directories (memory-mapped), the tokenizer, image file decoding, threads and the CLI.
#![cfg_attr(not(feature = "std"), no_std)]
// A library embedded in other programs never prints: its notices (shard mapping progress,
// the panel copy, memory refusals) go to the `log` facade, target `dvl::…`, where the CLI
// shows them on stderr and libdvl hands them to the C log callback.
#![cfg_attr(not(test), warn(clippy::print_stdout, clippy::print_stderr))]

extern crate alloc;

pub mod backend;
pub mod config;
pub mod decoder;
pub mod error;
pub mod images;
pub mod models;
pub mod prompt;
pub mod weights;

#[cfg(feature = "std")]
pub mod bench;
#[cfg(feature = "cuda")]
pub mod cuda;
#[cfg(feature = "std")]
pub mod engine;
#[cfg(feature = "std")]
pub mod panel_cache;
#[cfg(feature = "std")]
pub mod synth;
#[cfg(feature = "std")]
pub mod tokenizer;

pub use backend::{Backend, CpuBackend};
pub use config::Config;
pub use decoder::{GenerateParams, Observer, Output, Strategy};
pub use error::{Error, Result};
pub use models::qwen2_5_vl::vision::Grid;
pub use models::qwen2_5_vl::{Model, IMAGE_PLACEHOLDER};
pub use weights::{ShardBytes, WeightStore};

#[cfg(feature = "std")]
pub use engine::{Engine, ImageInput, LoadOptions, PanelCost, Request, WeightLayout};

/// The MASK token id: an embedding row, not a tokenizer token (spec §0 fact 4).
pub const MASK_ID: u32 = 151_671;
/// `<|im_end|>`, the decoder's EOS (spec §0 fact 4).
pub const EOS_ID: u32 = 151_645;
/// Tokens the Qwen2.5 tokenizer defines (ids 0..151664); rows above are padding.
pub const TOKENIZER_VOCAB: usize = 151_665;

/// Load a model from in-memory bytes: `config.json` and one or more safetensors shards
/// (the no_std path, and "load from memory" for embedders). Nothing is copied unless a
/// tensor is misaligned; the shards must outlive the model.
pub fn load_from_bytes<'a>(config_json: &[u8], shards: &[&'a [u8]]) -> Result<Model<'a>> {
    let config = Config::from_json(config_json)?;
    let named = shards
        .iter()
        .enumerate()
        .map(|(i, s)| {
            (
                alloc::format!("shard {i}"),
                alloc::boxed::Box::new(*s) as ShardBytes<'a>,
            )
        })
        .collect();
    Model::new(config, WeightStore::new(named)?)
}
