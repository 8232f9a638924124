//! DiffusionVL-Qwen2.5-7B: SigLIP (so400m-patch14-384) tower, `mlp2x_gelu` projector and the
//! LLaVA-OneVision `anyres_max_4` / `spatial_unpad` merge in front of a Qwen2 text decoder
//! (spec §1.3.3, §4.2, §5.2). The text decoder and the block-diffusion loop are shared with
//! the Qwen2.5-VL variants; only the confidence under sampling differs (spec §8.6).
//!
//! One file per concern: [`config`] (config.json fields), [`preprocess`] (tiling, PIL-exact
//! resizing, normalisation), [`vision`] (the encoder), [`projector`], [`merge`] (unpad,
//! downscale, newlines, token counts).
//!
//! A [`Grid`] describes one image's tiles here: `t` = number of 384² tiles (1 + crops for
//! anyres, 1 in pad mode), `h × w` = the original image size in pixels, which the merge needs.

pub mod config;
pub mod merge;
pub mod preprocess;
pub mod projector;
pub mod vision;

use alloc::format;
use alloc::vec::Vec;

pub use config::{AspectMode, SiglipQwenConfig, SiglipVisionConfig};

use crate::backend::Backend;
use crate::error::{Error, Result};
use crate::models::qwen2_5_vl::vision::Grid;
use crate::weights::WeightStore;
use preprocess::TileLayout;
use projector::Projector;
use vision::SiglipTower;

/// Intermediate results of encoding a request's images (the golden tests compare them).
pub struct Encoded {
    /// SigLIP features `[Σ tiles · N, C]`.
    pub siglip: Vec<f32>,
    /// Projector output `[Σ tiles · N, H]`.
    pub projected: Vec<f32>,
    /// Merged LLM rows per image, `[tokens, H]` each.
    pub images: Vec<Vec<f32>>,
}

/// Tower, projector and `image_newline` of the SigLIP variant.
pub struct SiglipQwenVision {
    pub cfg: SiglipQwenConfig,
    pub tower: SiglipTower,
    pub projector: Projector,
    /// `model.image_newline` `[H]`.
    pub newline: Vec<f32>,
}

impl SiglipQwenVision {
    pub fn load(
        store: &WeightStore<'_>,
        cfg: &SiglipQwenConfig,
        text_hidden: usize,
    ) -> Result<Self> {
        Ok(SiglipQwenVision {
            cfg: cfg.clone(),
            tower: SiglipTower::load(store, &cfg.vision)?,
            projector: Projector::load(store, cfg.vision.hidden_size, text_hidden)?,
            newline: store.f32_vec("model.image_newline", &[text_hidden])?,
        })
    }

    /// LLM rows of one image (spec §5.2).
    pub fn tokens_for(&self, g: &Grid) -> usize {
        merge::image_tokens(g.w, g.h, g.t, &self.cfg)
    }

    /// Check tiles against grids (tile count consistent with the image size); returns the
    /// total number of tiles.
    pub fn check_inputs(&self, pixels: &[f32], grids: &[Grid]) -> Result<usize> {
        let mut tiles = 0usize;
        for (i, g) in grids.iter().enumerate() {
            if g.t == 0 || g.h == 0 || g.w == 0 {
                return Err(Error::InvalidArgument(format!(
                    "image {i}: {} tiles of a {}x{} image: all must be positive",
                    g.t, g.w, g.h
                )));
            }
            if g.t != 1 {
                let expect = preprocess::plan(g.w, g.h, &self.cfg, false);
                if matches!(expect, TileLayout::Pad) || expect.n_tiles() != g.t {
                    return Err(Error::InvalidArgument(format!(
                        "image {i}: a {}x{} image has {} tiles here, {} were given",
                        g.w,
                        g.h,
                        expect.n_tiles(),
                        g.t
                    )));
                }
            }
            tiles = tiles
                .checked_add(g.t)
                .filter(|&t| t <= 4096)
                .ok_or_else(|| Error::InvalidArgument(format!("image {i}: too many tiles")))?;
        }
        let want = tiles * self.cfg.vision.tile_len();
        if pixels.len() != want {
            let s = self.cfg.vision.image_size;
            return Err(Error::InvalidArgument(format!(
                "pixel values: {} values, but {tiles} tiles of 3x{s}x{s} need {want}",
                pixels.len()
            )));
        }
        Ok(tiles)
    }

    /// Encode, project and merge every image (tiles `[Σ t, 3, S, S]` in image order).
    pub fn encode(
        &self,
        be: &dyn Backend,
        store: &WeightStore<'_>,
        pixels: &[f32],
        grids: &[Grid],
    ) -> Result<Encoded> {
        let tiles = self.check_inputs(pixels, grids)?;
        let siglip = self.tower.forward(be, store, pixels, tiles)?;
        let n = self.cfg.vision.patches_per_tile();
        let projected = self.projector.forward(be, store, &siglip, tiles * n);
        let h = self.projector.out_dim();
        let mut images = Vec::with_capacity(grids.len());
        let mut t0 = 0;
        for g in grids {
            let f = &projected[t0 * n * h..(t0 + g.t) * n * h];
            images.push(merge::merge_image(
                f,
                g.t,
                g.w,
                g.h,
                &self.cfg,
                &self.newline,
            )?);
            t0 += g.t;
        }
        Ok(Encoded {
            siglip,
            projected,
            images,
        })
    }
}
