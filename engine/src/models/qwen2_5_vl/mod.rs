//! DiffusionVL-Qwen2.5VL (3B / 7B): Qwen2.5-VL vision tower + merger, Qwen2.5-VL text
//! decoder turned block-diffusion decoder. [`Model`] also carries the SigLIP variant
//! (DiffusionVL-Qwen2.5-7B, [`crate::models::siglip_qwen`]): same text decoder, another
//! vision side ([`Vision`]).

pub mod text;
pub mod vision;

use alloc::format;
use alloc::vec::Vec;

use crate::backend::Backend;
use crate::config::Config;
use crate::decoder::DecodeModel;
use crate::error::{Error, Result};
use crate::models::siglip_qwen::SiglipQwenVision;
pub use crate::models::Vision;
use crate::weights::WeightStore;
use text::TextModel;
use vision::{Grid, VisionModel};

/// Prompt id standing for "this image's feature rows go here" (spec §2.1, `IMAGE_TOKEN_INDEX`).
pub const IMAGE_PLACEHOLDER: i64 = -200;

/// A loaded checkpoint: config, weights viewed in place, validated layer structure.
pub struct Model<'a> {
    pub config: Config,
    pub store: WeightStore<'a>,
    pub text: TextModel,
    pub vision: Vision,
}

impl<'a> Model<'a> {
    /// Validate every tensor the config implies (name, shape; dtype at parse) and build the
    /// model. Errors name the offending tensor.
    pub fn new(config: Config, store: WeightStore<'a>) -> Result<Self> {
        let text = TextModel::load(&store, &config.text)?;
        let vision = match &config.siglip {
            Some(sc) => {
                Vision::Siglip(SiglipQwenVision::load(&store, sc, config.text.hidden_size)?)
            }
            None => Vision::Qwen(VisionModel::load(
                &store,
                &config.vision,
                config.text.hidden_size,
            )?),
        };
        Ok(Model {
            config,
            store,
            text,
            vision,
        })
    }

    /// Repack the text decoder's bf16 matrices into panels for the AVX2 kernels
    /// ([`TextModel::pack_weights`]); `pack` repacks one matrix.
    pub fn pack_weights(&mut self, pack: text::PackFn<'_>) {
        self.text.pack_weights(&self.store, pack);
    }

    /// Drop the panels of [`Model::pack_weights`].
    pub fn unpack_weights(&mut self) {
        self.text.unpack_weights();
    }

    /// Bytes held in panels by [`Model::pack_weights`].
    pub fn packed_bytes(&self) -> usize {
        self.text.packed_bytes()
    }

    /// The panels of [`Model::pack_weights`], in the order it makes them.
    pub fn packed_matrices(&self) -> Vec<&dvl_kernels::packed::PackedBf16> {
        self.text.packed_matrices()
    }

    /// Whether [`Model::pack_weights`] has run (and found bf16 weights).
    pub fn is_packed(&self) -> bool {
        self.text.lm_head_packed.is_some()
    }

    pub fn decode_model(&self) -> DecodeModel<'_, 'a> {
        DecodeModel {
            text: &self.text,
            store: &self.store,
            block_size: self.config.block_size,
            // The SigLIP variant's sampler reports the untempered probability (spec §8.6).
            untempered_confidence: self.config.siglip.is_some(),
        }
    }

    /// LLM rows one image produces (spec §4.1 / §5.2).
    pub fn tokens_for(&self, g: &Grid) -> usize {
        self.vision.tokens_for(g)
    }

    /// Bytes of the language model's weights (what one denoising step streams).
    pub fn lm_weight_bytes(&self) -> u64 {
        let lm: Vec<&str> = self
            .store
            .names()
            .filter(|n| n.starts_with("model.layers.") || *n == "model.norm.weight")
            .collect();
        // Embedding rows are gathered, not streamed; lm_head (tied or not) is streamed.
        self.store.bytes_of(lm.into_iter())
            + self
                .store
                .bytes_of(core::iter::once(self.text.lm_head.name.as_str()))
    }

    /// Encode images from preprocessed pixels + grids; one feature matrix `[tokens, H]` per
    /// image. Qwen2.5-VL: `pixel_values` and `image_grid_thw` (spec §5.1). SigLIP: tiles
    /// `[Σ t, 3, S, S]` and per image (tiles, height, width) (spec §5.2).
    pub fn encode_images(
        &self,
        be: &dyn Backend,
        pixels: &[f32],
        grids: &[Grid],
    ) -> Result<Vec<Vec<f32>>> {
        let vision = match &self.vision {
            Vision::Qwen(v) => v,
            Vision::Siglip(s) => return Ok(s.encode(be, &self.store, pixels, grids)?.images),
        };
        let feats = vision.forward(be, &self.store, pixels, grids)?;
        let h = self.config.text.hidden_size;
        let mut out = Vec::with_capacity(grids.len());
        let mut off = 0;
        for g in grids {
            let n = vision.tokens_for(g) * h;
            out.push(feats[off..off + n].to_vec());
            off += n;
        }
        Ok(out)
    }

    /// Assemble the prompt embeddings (spec §6): text ids embedded, the k-th placeholder
    /// replaced by the k-th image's rows; truncated to `max_prompt_rows`.
    pub fn assemble(&self, prompt_ids: &[i64], images: &[Vec<f32>]) -> Result<Vec<f32>> {
        let h = self.config.text.hidden_size;
        let n_ph = prompt_ids
            .iter()
            .filter(|&&t| t == IMAGE_PLACEHOLDER)
            .count();
        if n_ph != images.len() {
            return Err(Error::InvalidArgument(format!(
                "prompt has {n_ph} image placeholders but {} images were given",
                images.len()
            )));
        }
        let mut out = Vec::new();
        let mut k = 0;
        for &t in prompt_ids {
            if t == IMAGE_PLACEHOLDER {
                if !images[k].len().is_multiple_of(h) {
                    return Err(Error::InvalidArgument(format!(
                        "image {k} features are not rows of {h}"
                    )));
                }
                out.extend_from_slice(&images[k]);
                k += 1;
            } else if t < 0 || t > u32::MAX as i64 {
                return Err(Error::InvalidArgument(format!(
                    "prompt id {t} is neither a token nor the image placeholder"
                )));
            } else {
                self.text.embed_into(&self.store, &[t as u32], &mut out)?;
            }
        }
        out.truncate(self.config.max_prompt_rows * h);
        Ok(out)
    }
}
