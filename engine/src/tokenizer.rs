//! Qwen2.5 byte-level BPE tokenizer (`tokenizer.json`) through the `tokenizers` crate.

use std::path::Path;

use crate::error::{Error, Result};
use crate::{EOS_ID, MASK_ID};

pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    /// Vocabulary size with the added tokens, read once: `tokenizers` computes it by
    /// cloning the whole vocabulary map (~150k strings), which took longer than the tiny
    /// model's whole generation when done per answer.
    vocab_size: u32,
}

impl Tokenizer {
    pub fn from_file(path: &Path) -> Result<Self> {
        let bytes = std::fs::read(path).map_err(|e| Error::Io {
            path: path.display().to_string(),
            detail: e.to_string(),
        })?;
        Self::from_bytes(&bytes).map_err(|e| Error::Tokenizer(format!("{}: {e}", path.display())))
    }

    pub fn from_bytes(bytes: &[u8]) -> Result<Self> {
        let inner = tokenizers::Tokenizer::from_bytes(bytes)
            .map_err(|e| Error::Tokenizer(e.to_string()))?;
        let vocab_size = inner.get_vocab_size(true) as u32;
        Ok(Tokenizer { inner, vocab_size })
    }

    /// Ids of one prompt chunk, no special tokens added (spec §2.3). Special-token text such
    /// as `<|im_start|>` inside the chunk still maps to its id.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self
            .inner
            .encode(text, false)
            .map_err(|e| Error::Tokenizer(e.to_string()))?;
        Ok(enc.get_ids().to_vec())
    }

    /// Text of generated ids: cut at the first EOS, MASK and out-of-vocabulary padding ids
    /// dropped, special tokens skipped (spec §2.5).
    pub fn decode_answer(&self, ids: &[u32]) -> Result<String> {
        let n = self.vocab_size;
        let kept: Vec<u32> = ids
            .iter()
            .copied()
            .take_while(|&t| t != EOS_ID)
            .filter(|&t| t != MASK_ID && t < n)
            .collect();
        self.inner
            .decode(&kept, true)
            .map_err(|e| Error::Tokenizer(e.to_string()))
    }

    /// Text of a single token (for streaming one committed position), specials skipped.
    pub fn token_text(&self, id: u32) -> String {
        if id == MASK_ID || id == EOS_ID {
            return String::new();
        }
        self.inner.decode(&[id], true).unwrap_or_default()
    }
}
