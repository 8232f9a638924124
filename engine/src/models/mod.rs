//! Model families, one folder each (config, weights, vision, text).

pub mod qwen2_5_vl;
pub mod siglip_qwen;

use crate::error::Result;
use qwen2_5_vl::vision::{Grid, VisionModel};
use siglip_qwen::SiglipQwenVision;

/// The vision side of a checkpoint; the text decoder is the same for every variant.
pub enum Vision {
    /// Qwen2.5-VL ViT + PatchMerger (DiffusionVL-Qwen2.5VL-3B / 7B, spec §5.1).
    Qwen(VisionModel),
    /// SigLIP + `mlp2x_gelu` + anyres merge (DiffusionVL-Qwen2.5-7B, spec §5.2).
    Siglip(SiglipQwenVision),
}

impl Vision {
    /// LLM rows one image produces.
    pub fn tokens_for(&self, g: &Grid) -> usize {
        match self {
            Vision::Qwen(v) => v.tokens_for(g),
            Vision::Siglip(v) => v.tokens_for(g),
        }
    }

    /// Check preprocessed pixels against the grids (Qwen: `pixel_values` rows and
    /// `image_grid_thw`; SigLIP: tiles and (tiles, height, width)).
    pub fn check_inputs(&self, pixels: &[f32], grids: &[Grid]) -> Result<usize> {
        match self {
            Vision::Qwen(v) => v.check_inputs(pixels, grids),
            Vision::Siglip(v) => v.check_inputs(pixels, grids),
        }
    }
}
