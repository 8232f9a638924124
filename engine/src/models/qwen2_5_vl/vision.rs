//! Qwen2.5-VL vision transformer and patch merger (spec §5.1).

use alloc::format;
use alloc::vec;
use alloc::vec::Vec;

use dvl_kernels::attention::AttnShape;

use super::text::Linear;
use crate::backend::Backend;
use crate::config::QwenVisionConfig;
use crate::error::{Error, Result};
use crate::weights::WeightStore;

const PREFIX: &str = "model.vision_tower.vision_tower";
const MERGER: &str = "model.mm_projector.merger";
/// RMSNorm eps of norm1 / norm2 / ln_q, hard-coded in the reference (spec §11 item 2).
const EPS: f32 = 1e-6;
/// Vision RoPE base (spec §5.1(b)).
const THETA: f64 = 10_000.0;

/// `image_grid_thw` of one image: temporal slices and patch rows / columns.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Grid {
    pub t: usize,
    pub h: usize,
    pub w: usize,
}

impl Grid {
    pub fn patches(&self) -> usize {
        self.t * self.h * self.w
    }
}

pub struct VisionBlock {
    norm1: Vec<f32>,
    qkv: Linear,
    proj: Linear,
    norm2: Vec<f32>,
    gate: Linear,
    up: Linear,
    down: Linear,
}

pub struct VisionModel {
    pub cfg: QwenVisionConfig,
    patch_embed: Linear,
    blocks: Vec<VisionBlock>,
    ln_q: Vec<f32>,
    mlp0: Linear,
    mlp2: Linear,
}

/// Window index and window boundaries over merged units (spec §5.1(c)).
///
/// Returns `window_index` (merged-unit ids in window order) and `cu_window_seqlens` in
/// patches, zero-length windows removed.
pub fn window_index(
    grids: &[Grid],
    window_merged: usize,
    merge: usize,
) -> (Vec<usize>, Vec<usize>) {
    let unit = merge * merge;
    let mut index = Vec::new();
    let mut cu = vec![0usize];
    let mut base = 0;
    for g in grids {
        let (lh, lw) = (g.h / merge, g.w / merge);
        // Note: pad is a full window (not 0) when lh is a multiple of the window; the
        // resulting all-padding windows are empty and dropped below.
        let pad_h = window_merged - lh % window_merged;
        let pad_w = window_merged - lw % window_merged;
        let (nwh, nww) = ((lh + pad_h) / window_merged, (lw + pad_w) / window_merged);
        for t in 0..g.t {
            for wy in 0..nwh {
                for wx in 0..nww {
                    let mut n = 0;
                    for y in wy * window_merged..(wy + 1) * window_merged {
                        for x in wx * window_merged..(wx + 1) * window_merged {
                            if y < lh && x < lw {
                                index.push(base + t * lh * lw + y * lw + x);
                                n += 1;
                            }
                        }
                    }
                    if n > 0 {
                        cu.push(cu.last().unwrap() + n * unit);
                    }
                }
            }
        }
        base += g.t * lh * lw;
    }
    (index, cu)
}

/// (hpos, wpos) of every patch in pixel-row order (spec §5.1(b)).
fn patch_positions(grids: &[Grid], merge: usize) -> Vec<(usize, usize)> {
    let mut pos = Vec::new();
    for g in grids {
        for _ in 0..g.t {
            for by in 0..g.h / merge {
                for bx in 0..g.w / merge {
                    for ry in 0..merge {
                        for rx in 0..merge {
                            pos.push((by * merge + ry, bx * merge + rx));
                        }
                    }
                }
            }
        }
    }
    pos
}

impl VisionModel {
    pub fn load(
        store: &WeightStore<'_>,
        cfg: &QwenVisionConfig,
        out_hidden: usize,
    ) -> Result<Self> {
        let c = cfg.hidden_size;
        let ci = cfg.intermediate_size;
        let pe_name = format!("{PREFIX}.patch_embed.proj.weight");
        let pe = store
            .expect(
                &pe_name,
                &[
                    c,
                    cfg.in_chans,
                    cfg.temporal_patch_size,
                    cfg.patch_size,
                    cfg.patch_size,
                ],
            )?
            .clone();
        // The Conv3d kernel's natural flatten order [C][T][py][px] is the patch row order of
        // §4.1 step 7, so it is a Linear(1176 → C) as stored.
        let patch_embed = Linear {
            w: pe,
            b: None,
            n_out: c,
            n_in: cfg.patch_dim(),
            packed: None,
        };
        let mut blocks = Vec::with_capacity(cfg.depth);
        for b in 0..cfg.depth {
            let p = format!("{PREFIX}.blocks.{b}");
            blocks.push(VisionBlock {
                norm1: store.f32_vec(&format!("{p}.norm1.weight"), &[c])?,
                qkv: Linear::load(store, &format!("{p}.attn.qkv"), 3 * c, c, true)?,
                proj: Linear::load(store, &format!("{p}.attn.proj"), c, c, true)?,
                norm2: store.f32_vec(&format!("{p}.norm2.weight"), &[c])?,
                gate: Linear::load(store, &format!("{p}.mlp.gate_proj"), ci, c, true)?,
                up: Linear::load(store, &format!("{p}.mlp.up_proj"), ci, c, true)?,
                down: Linear::load(store, &format!("{p}.mlp.down_proj"), c, ci, true)?,
            });
        }
        let mc = c * cfg.merge_unit();
        Ok(VisionModel {
            cfg: cfg.clone(),
            patch_embed,
            blocks,
            ln_q: store.f32_vec(&format!("{MERGER}.ln_q.weight"), &[c])?,
            mlp0: Linear::load(store, &format!("{MERGER}.mlp.0"), mc, mc, true)?,
            mlp2: Linear::load(store, &format!("{MERGER}.mlp.2"), out_hidden, mc, true)?,
        })
    }

    /// LLM rows each image produces (spec §4.1).
    pub fn tokens_for(&self, g: &Grid) -> usize {
        g.patches() / self.cfg.merge_unit()
    }

    /// Check grids against `pixel_values` and the tower's geometry.
    pub fn check_inputs(&self, pixels: &[f32], grids: &[Grid]) -> Result<usize> {
        let m = self.cfg.spatial_merge_size;
        let mut s = 0usize;
        for (i, g) in grids.iter().enumerate() {
            if g.t == 0 || g.h == 0 || g.w == 0 || g.h % m != 0 || g.w % m != 0 {
                return Err(Error::InvalidArgument(format!(
                    "image {i}: grid {}x{}x{} must be non-empty with h and w multiples of {m}",
                    g.t, g.h, g.w
                )));
            }
            s = s
                .checked_add(g.patches())
                .filter(|&s| s <= 1 << 20)
                .ok_or_else(|| Error::InvalidArgument(format!("image {i}: too many patches")))?;
        }
        if pixels.len() != s * self.cfg.patch_dim() {
            return Err(Error::InvalidArgument(format!(
                "pixel_values has {} values; the grids need {s} patches × {} = {}",
                pixels.len(),
                self.cfg.patch_dim(),
                s * self.cfg.patch_dim()
            )));
        }
        Ok(s)
    }

    /// Encode preprocessed `pixel_values [S, patch_dim]` of all images; returns the merged
    /// features `[Σ tokens, out_hidden]` in image order, raster order within an image.
    pub fn forward(
        &self,
        be: &dyn Backend,
        store: &WeightStore<'_>,
        pixels: &[f32],
        grids: &[Grid],
    ) -> Result<Vec<f32>> {
        let s = self.check_inputs(pixels, grids)?;
        let cfg = &self.cfg;
        let c = cfg.hidden_size;
        let nh = cfg.num_heads;
        let hd = cfg.head_dim();
        let merge = cfg.spatial_merge_size;
        let unit = cfg.merge_unit();

        // (a) patch embedding.
        let mut x0 = vec![0f32; s * c];
        self.patch_embed.forward(be, store, pixels, s, &mut x0);

        // (b) 2-D rotary angles per patch: rows use the first hd/4 frequencies, columns the
        // same frequencies again; emb = concat(θ, θ).
        let quarter = hd / 4;
        let inv_freq: Vec<f64> = (0..quarter)
            .map(|k| libm::pow(THETA, -2.0 * k as f64 / (hd / 2) as f64))
            .collect();
        let positions = patch_positions(grids, merge);

        // (c, d) window permutation of merged units, applied to rows and angles.
        let window_merged = cfg.window_size / merge / cfg.patch_size;
        let (widx, cu_window) = window_index(grids, window_merged, merge);
        let mut x = vec![0f32; s * c];
        let mut cos = vec![0f32; s * hd];
        let mut sin = vec![0f32; s * hd];
        for (dst_unit, &src_unit) in widx.iter().enumerate() {
            for r in 0..unit {
                let (src, dst) = (src_unit * unit + r, dst_unit * unit + r);
                x[dst * c..(dst + 1) * c].copy_from_slice(&x0[src * c..(src + 1) * c]);
                let (hp, wp) = positions[src];
                for (k, &f) in inv_freq.iter().enumerate() {
                    let (a_h, a_w) = (hp as f64 * f, wp as f64 * f);
                    for (slot, a) in [(k, a_h), (quarter + k, a_w)] {
                        let (sv, cv) = (libm::sin(a) as f32, libm::cos(a) as f32);
                        cos[dst * hd + slot] = cv;
                        cos[dst * hd + 2 * quarter + slot] = cv;
                        sin[dst * hd + slot] = sv;
                        sin[dst * hd + 2 * quarter + slot] = sv;
                    }
                }
            }
        }
        drop(x0);

        // (e) full-attention segments: one per image per temporal slice.
        let mut cu_full = vec![0usize];
        for g in grids {
            for _ in 0..g.t {
                cu_full.push(cu_full.last().unwrap() + g.h * g.w);
            }
        }
        let segments = |cu: &[usize]| -> Vec<(usize, usize)> {
            let mut seg = vec![(0, 0); s];
            for w in cu.windows(2) {
                seg[w[0]..w[1]].fill((w[0], w[1]));
            }
            seg
        };
        let seg_window = segments(&cu_window);
        let seg_full = segments(&cu_full);

        // (f) blocks.
        let mut a = vec![0f32; s * c];
        let mut qkv = vec![0f32; s * 3 * c];
        let mut q = vec![0f32; s * c];
        let mut k = vec![0f32; s * c];
        let mut v = vec![0f32; s * c];
        let mut att = vec![0f32; s * c];
        let mut proj = vec![0f32; s * c];
        let mut gate = vec![0f32; s * cfg.intermediate_size];
        let shape = AttnShape {
            n_heads: nh,
            n_kv_heads: nh,
            head_dim: hd,
            q_stride: c,
            kv_stride: c,
        };
        let scale = 1.0 / libm::sqrtf(hd as f32);
        for (bi, blk) in self.blocks.iter().enumerate() {
            be.rms_norm(&x, &blk.norm1, EPS, &mut a);
            blk.qkv.forward(be, store, &a, s, &mut qkv);
            for r in 0..s {
                let row = &qkv[r * 3 * c..(r + 1) * 3 * c];
                q[r * c..(r + 1) * c].copy_from_slice(&row[..c]);
                k[r * c..(r + 1) * c].copy_from_slice(&row[c..2 * c]);
                v[r * c..(r + 1) * c].copy_from_slice(&row[2 * c..]);
            }
            be.rope(&mut q, s, nh, hd, c, &cos, &sin);
            be.rope(&mut k, s, nh, hd, c, &cos, &sin);
            let seg = if cfg.fullatt_block_indexes.contains(&bi) {
                &seg_full
            } else {
                &seg_window
            };
            let keys = |i: usize| seg[i];
            be.attention(&q, s, &k, &v, &mut att, shape, scale, &keys);
            blk.proj.forward(be, store, &att, s, &mut proj);
            be.add_inplace(&mut x, &proj);
            be.rms_norm(&x, &blk.norm2, EPS, &mut a);
            be.matmul_swiglu(
                &a,
                s,
                c,
                blk.gate.operands(store),
                blk.up.operands(store),
                cfg.intermediate_size,
                &mut gate,
            );
            blk.down.forward(be, store, &gate, s, &mut proj);
            be.add_inplace(&mut x, &proj);
        }

        // (g) merger: RMSNorm, 2×2 units concatenated (rows are still window-permuted, but
        // whole units moved together), MLP with exact GELU.
        be.rms_norm(&x, &self.ln_q, EPS, &mut a);
        let n_tok = s / unit;
        let mc = c * unit;
        let mut hmid = vec![0f32; n_tok * mc];
        self.mlp0.forward(be, store, &a, n_tok, &mut hmid);
        be.gelu_erf(&mut hmid);
        let out_h = self.mlp2.n_out;
        let mut z = vec![0f32; n_tok * out_h];
        self.mlp2.forward(be, store, &hmid, n_tok, &mut z);

        // (h) un-permute to raster order.
        let mut feats = vec![0f32; n_tok * out_h];
        for (i, &src_unit) in widx.iter().enumerate() {
            feats[src_unit * out_h..(src_unit + 1) * out_h]
                .copy_from_slice(&z[i * out_h..(i + 1) * out_h]);
        }
        Ok(feats)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn window_index_6x6_example() {
        // spec §5.1(c): lh = lw = 6 (grid 12×12 patches).
        let (idx, cu) = window_index(&[Grid { t: 1, h: 12, w: 12 }], 4, 2);
        let expect = [
            0, 1, 2, 3, 6, 7, 8, 9, 12, 13, 14, 15, 18, 19, 20, 21, 4, 5, 10, 11, 16, 17, 22, 23,
            24, 25, 26, 27, 30, 31, 32, 33, 28, 29, 34, 35,
        ];
        assert_eq!(idx, expect);
        assert_eq!(cu, vec![0, 64, 96, 128, 144]);
    }

    #[test]
    fn window_index_multiple_of_four_drops_empty_windows() {
        // lh = lw = 4: pad = 4 (not 0), so the padded grid is 8×8 with three all-padding
        // windows; only the one real window survives.
        let (idx, cu) = window_index(&[Grid { t: 1, h: 8, w: 8 }], 4, 2);
        assert_eq!(idx, (0..16).collect::<Vec<_>>());
        assert_eq!(cu, vec![0, 64]);
        // 8×4 merged: two real windows stacked, padding column windows dropped.
        let (idx, cu) = window_index(&[Grid { t: 1, h: 16, w: 8 }], 4, 2);
        assert_eq!(idx.len(), 32);
        assert_eq!(cu, vec![0, 64, 128]);
    }

    #[test]
    fn window_index_continues_across_images() {
        let (idx, cu) = window_index(
            &[Grid { t: 1, h: 4, w: 4 }, Grid { t: 1, h: 4, w: 6 }],
            4,
            2,
        );
        assert_eq!(idx, vec![0, 1, 2, 3, 4, 5, 6, 7, 8, 9]);
        assert_eq!(cu, vec![0, 16, 40]);
    }
}
