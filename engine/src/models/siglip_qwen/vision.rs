//! SigLIP vision encoder (spec §5.2), per 384² tile:
//!
//! ```text
//! x = Conv2d(3→C, k=p, s=p, bias)(tile) → [N, C]  (N = (S/p)², row-major patch grid)
//! x = x + pos_emb
//! for k in 0..layers−1:                 # the checkpoint's last layer is never run
//!     x = x + out_proj(MHA(LayerNorm1(x)))   # all projections biased, no mask
//!     x = x + fc2(gelu_tanh(fc1(LayerNorm2(x))))
//! features = x                          # no post_layernorm
//! ```
//!
//! Tiles are independent; they are encoded in groups so that one matmul covers several tiles
//! while the activations of a 37-tile image stay bounded.

use alloc::format;
use alloc::vec;
use alloc::vec::Vec;

use dvl_kernels::attention::AttnShape;

use super::config::SiglipVisionConfig;
use crate::backend::Backend;
use crate::error::{Error, Result};
use crate::models::qwen2_5_vl::text::Linear;
use crate::weights::WeightStore;

/// Weight-name prefix of the tower (spec §1.3.3).
pub const PREFIX: &str = "model.vision_tower.vision_tower.vision_model";

/// Tiles encoded per group (bounds activation memory: 8 × 729 rows).
const TILES_PER_GROUP: usize = 8;

struct Layer {
    ln1_w: Vec<f32>,
    ln1_b: Vec<f32>,
    q: Linear,
    k: Linear,
    v: Linear,
    o: Linear,
    ln2_w: Vec<f32>,
    ln2_b: Vec<f32>,
    fc1: Linear,
    fc2: Linear,
}

pub struct SiglipTower {
    pub cfg: SiglipVisionConfig,
    /// Conv2d weight `[C, 3, p, p]` viewed as a Linear `3·p² → C` (its flatten order is the
    /// patch row order `[c][ky][kx]`).
    patch: Linear,
    /// `[N, C]`.
    pos: Vec<f32>,
    layers: Vec<Layer>,
}

impl SiglipTower {
    /// Load and shape-check the tower. Layer `num_hidden_layers − 1` and `post_layernorm` may
    /// be present in the checkpoint; they are not read.
    pub fn load(store: &WeightStore<'_>, cfg: &SiglipVisionConfig) -> Result<Self> {
        let c = cfg.hidden_size;
        let ci = cfg.intermediate_size;
        let p = cfg.patch_size;
        let w = store
            .expect(
                &format!("{PREFIX}.embeddings.patch_embedding.weight"),
                &[c, 3, p, p],
            )?
            .clone();
        let patch = Linear {
            w,
            b: Some(store.f32_vec(&format!("{PREFIX}.embeddings.patch_embedding.bias"), &[c])?),
            n_out: c,
            n_in: cfg.patch_dim(),
            packed: None,
        };
        let pos = store.f32_vec(
            &format!("{PREFIX}.embeddings.position_embedding.weight"),
            &[cfg.patches_per_tile(), c],
        )?;
        let mut layers = Vec::with_capacity(cfg.layers_used());
        for k in 0..cfg.layers_used() {
            let l = format!("{PREFIX}.encoder.layers.{k}");
            layers.push(Layer {
                ln1_w: store.f32_vec(&format!("{l}.layer_norm1.weight"), &[c])?,
                ln1_b: store.f32_vec(&format!("{l}.layer_norm1.bias"), &[c])?,
                q: Linear::load(store, &format!("{l}.self_attn.q_proj"), c, c, true)?,
                k: Linear::load(store, &format!("{l}.self_attn.k_proj"), c, c, true)?,
                v: Linear::load(store, &format!("{l}.self_attn.v_proj"), c, c, true)?,
                o: Linear::load(store, &format!("{l}.self_attn.out_proj"), c, c, true)?,
                ln2_w: store.f32_vec(&format!("{l}.layer_norm2.weight"), &[c])?,
                ln2_b: store.f32_vec(&format!("{l}.layer_norm2.bias"), &[c])?,
                fc1: Linear::load(store, &format!("{l}.mlp.fc1"), ci, c, true)?,
                fc2: Linear::load(store, &format!("{l}.mlp.fc2"), c, ci, true)?,
            });
        }
        Ok(SiglipTower {
            cfg: cfg.clone(),
            patch,
            pos,
            layers,
        })
    }

    /// Patch rows `[n_tiles · N, 3·p²]` of tiles `[n_tiles, 3, S, S]`.
    fn patchify(&self, tiles: &[f32], n_tiles: usize) -> Vec<f32> {
        let cfg = &self.cfg;
        let (s, p, g) = (cfg.image_size, cfg.patch_size, cfg.patches_per_side());
        let dim = cfg.patch_dim();
        let mut rows = vec![0f32; n_tiles * g * g * dim];
        for t in 0..n_tiles {
            let tile = &tiles[t * 3 * s * s..(t + 1) * 3 * s * s];
            for py in 0..g {
                for px in 0..g {
                    let r = &mut rows[((t * g + py) * g + px) * dim..][..dim];
                    for c in 0..3 {
                        for ky in 0..p {
                            let src = c * s * s + (py * p + ky) * s + px * p;
                            r[(c * p + ky) * p..(c * p + ky + 1) * p]
                                .copy_from_slice(&tile[src..src + p]);
                        }
                    }
                }
            }
        }
        rows
    }

    /// Encode `n_tiles` preprocessed tiles; returns `[n_tiles · N, C]` (tile order, each
    /// tile's patches row-major).
    pub fn forward(
        &self,
        be: &dyn Backend,
        store: &WeightStore<'_>,
        tiles: &[f32],
        n_tiles: usize,
    ) -> Result<Vec<f32>> {
        let cfg = &self.cfg;
        if tiles.len() != n_tiles * cfg.tile_len() {
            return Err(Error::InvalidArgument(format!(
                "SigLIP input has {} values; {n_tiles} tiles of 3×{s}×{s} need {}",
                tiles.len(),
                n_tiles * cfg.tile_len(),
                s = cfg.image_size
            )));
        }
        let n = cfg.patches_per_tile();
        let c = cfg.hidden_size;
        let mut out = vec![0f32; n_tiles * n * c];
        let mut t0 = 0;
        while t0 < n_tiles {
            let nt = TILES_PER_GROUP.min(n_tiles - t0);
            let x = self.forward_group(
                be,
                store,
                &tiles[t0 * cfg.tile_len()..(t0 + nt) * cfg.tile_len()],
                nt,
            );
            out[t0 * n * c..(t0 + nt) * n * c].copy_from_slice(&x);
            t0 += nt;
        }
        Ok(out)
    }

    fn forward_group(
        &self,
        be: &dyn Backend,
        store: &WeightStore<'_>,
        tiles: &[f32],
        nt: usize,
    ) -> Vec<f32> {
        let cfg = &self.cfg;
        let n = cfg.patches_per_tile();
        let c = cfg.hidden_size;
        let ci = cfg.intermediate_size;
        let rows = nt * n;
        let eps = cfg.layer_norm_eps;

        let patches = self.patchify(tiles, nt);
        let mut x = vec![0f32; rows * c];
        self.patch.forward(be, store, &patches, rows, &mut x);
        drop(patches);
        for t in 0..nt {
            be.add_inplace(&mut x[t * n * c..(t + 1) * n * c], &self.pos);
        }

        let mut a = vec![0f32; rows * c];
        let mut q = vec![0f32; rows * c];
        let mut k = vec![0f32; rows * c];
        let mut v = vec![0f32; rows * c];
        let mut att = vec![0f32; rows * c];
        let mut proj = vec![0f32; rows * c];
        let mut hid = vec![0f32; rows * ci];
        let shape = AttnShape {
            n_heads: cfg.num_heads,
            n_kv_heads: cfg.num_heads,
            head_dim: cfg.head_dim(),
            q_stride: c,
            kv_stride: c,
        };
        let scale = 1.0 / libm::sqrtf(cfg.head_dim() as f32);
        // Each patch attends to every patch of its own tile.
        let keys = |i: usize| {
            let t = i / n;
            (t * n, (t + 1) * n)
        };
        for layer in &self.layers {
            be.layer_norm(&x, &layer.ln1_w, &layer.ln1_b, eps, &mut a);
            be.matmul_many(
                &a,
                rows,
                c,
                &mut [
                    layer.q.projection(store, &mut q),
                    layer.k.projection(store, &mut k),
                    layer.v.projection(store, &mut v),
                ],
            );
            be.attention(&q, rows, &k, &v, &mut att, shape, scale, &keys);
            layer.o.forward(be, store, &att, rows, &mut proj);
            be.add_inplace(&mut x, &proj);
            be.layer_norm(&x, &layer.ln2_w, &layer.ln2_b, eps, &mut a);
            layer.fc1.forward(be, store, &a, rows, &mut hid);
            be.gelu_tanh(&mut hid);
            layer.fc2.forward(be, store, &hid, rows, &mut proj);
            be.add_inplace(&mut x, &proj);
        }
        x
    }
}
