//! `spatial_unpad` + `anyres_max_N` merge of one image's projected tile features (spec §5.2,
//! ARCH L481–542):
//!
//! 1. base tile (N = g² rows) first, as is;
//! 2. the crops' g×g maps laid out as one `[nph·g, npw·g]` map (tile row-major);
//! 3. `unpad_image`: drop the rows (or columns) that show the black padding;
//! 4. `times = sqrt(h·w / (N_max·g²))`; if `times > 1.1`, bilinear resize (PyTorch
//!    `align_corners=False`) to `[int(h // times), int(w // times)]`;
//! 5. `image_newline` appended to every row, flattened row-major.
//!
//! A single tile (pad mode) gives its N rows plus one `image_newline`.
//!
//! Sizes follow the Python source in f64 (`int()` truncation, float `//`).

use alloc::format;
use alloc::vec;
use alloc::vec::Vec;

use super::config::{AspectMode, SiglipQwenConfig};
use super::preprocess::select_best_resolution;
use crate::error::{Error, Result};

/// Python's float floor division `a // b` (CPython `float_floor_div`), which can differ from
/// `floor(a / b)` when the quotient rounds up to an integer.
pub fn py_floordiv(a: f64, b: f64) -> f64 {
    let m = libm::fmod(a, b);
    let mut div = (a - m) / b;
    if m != 0.0 && ((b < 0.0) != (m < 0.0)) {
        div -= 1.0;
    }
    if div != 0.0 {
        let mut f = libm::floor(div);
        if div - f > 0.5 {
            f += 1.0;
        }
        f
    } else {
        libm::copysign(0.0, a / b)
    }
}

/// `unpad_image` on a `[hc, wc]` map of an image of `width × height` pixels: the kept row and
/// column ranges `[r0, r1) × [c0, c1)`.
pub fn unpad(
    width: usize,
    height: usize,
    hc: usize,
    wc: usize,
) -> ((usize, usize), (usize, usize)) {
    let (ow, oh) = (width as f64, height as f64);
    let original_aspect = ow / oh;
    let current_aspect = wc as f64 / hc as f64;
    if original_aspect > current_aspect {
        let scale = wc as f64 / ow;
        let new_h = ((oh * scale) as usize).min(hc);
        let pad = (hc - new_h) / 2;
        ((pad, hc - pad), (0, wc))
    } else {
        let scale = hc as f64 / oh;
        let new_w = ((ow * scale) as usize).min(wc);
        let pad = (wc - new_w) / 2;
        ((0, hc), (pad, wc - pad))
    }
}

/// Geometry of one anyres image's merged map.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AnyresShape {
    /// Crop grid (columns, rows).
    pub npw: usize,
    pub nph: usize,
    /// Kept rows / columns of the `[nph·g, npw·g]` crop map.
    pub rows: (usize, usize),
    pub cols: (usize, usize),
    pub times: f64,
    /// Map size after the optional downscale (rows, columns); tokens = `out_h · (out_w + 1)`.
    pub out_h: usize,
    pub out_w: usize,
}

impl AnyresShape {
    pub fn unpadded(&self) -> (usize, usize) {
        (self.rows.1 - self.rows.0, self.cols.1 - self.cols.0)
    }

    pub fn downscaled(&self) -> bool {
        self.times > 1.1
    }
}

/// The merged-map geometry of a `width × height` image (spec §5.2 steps 2–5).
pub fn anyres_shape(
    width: usize,
    height: usize,
    cfg: &SiglipQwenConfig,
    max_patches: usize,
) -> AnyresShape {
    let tile = cfg.vision.image_size;
    let g = cfg.vision.patches_per_side();
    let (bw, bh) = select_best_resolution(width, height, &cfg.pinpoints);
    let (npw, nph) = (bw / tile, bh / tile);
    let (rows, cols) = unpad(width, height, nph * g, npw * g);
    let (h, w) = (rows.1 - rows.0, cols.1 - cols.0);
    let times = libm::sqrt((h * w) as f64 / (max_patches * g * g) as f64);
    let (out_h, out_w) = if times > 1.1 {
        (
            py_floordiv(h as f64, times) as usize,
            py_floordiv(w as f64, times) as usize,
        )
    } else {
        (h, w)
    };
    AnyresShape {
        npw,
        nph,
        rows,
        cols,
        times,
        out_h,
        out_w,
    }
}

/// `N_max` of `anyres_max_N` (pad-mode configs never build an anyres map).
fn max_patches(cfg: &SiglipQwenConfig) -> usize {
    match cfg.aspect {
        AspectMode::AnyresMax(n) => n,
        AspectMode::Pad => 1,
    }
}

/// LLM rows of one image: `n_tiles == 1` is a padded single tile (N + 1 rows), otherwise the
/// anyres count `N + out_h·(out_w + 1)` (spec §5.2).
pub fn image_tokens(width: usize, height: usize, n_tiles: usize, cfg: &SiglipQwenConfig) -> usize {
    let n = cfg.vision.patches_per_tile();
    if n_tiles == 1 {
        return n + 1;
    }
    let s = anyres_shape(width, height, cfg, max_patches(cfg));
    n + s.out_h * (s.out_w + 1)
}

/// `F.interpolate(x, [oh, ow], mode="bilinear", align_corners=False)` on a channels-last map
/// `[h][w][d]` (PyTorch `upsample_bilinear2d`: source index `scale·(dst + 0.5) − 0.5`
/// clamped at 0, scale = in/out).
pub fn bilinear(src: &[f32], h: usize, w: usize, d: usize, oh: usize, ow: usize) -> Vec<f32> {
    let axis = |inp: usize, out: usize| -> Vec<(usize, usize, f64, f64)> {
        let scale = inp as f64 / out as f64;
        (0..out)
            .map(|o| {
                let s = (scale * (o as f64 + 0.5) - 0.5).max(0.0);
                let i0 = (s as usize).min(inp - 1);
                let i1 = if i0 < inp - 1 { i0 + 1 } else { i0 };
                let l1 = s - i0 as f64;
                (i0, i1, 1.0 - l1, l1)
            })
            .collect()
    };
    let ys = axis(h, oh);
    let xs = axis(w, ow);
    let mut out = vec![0f32; oh * ow * d];
    for (oy, &(y0, y1, wy0, wy1)) in ys.iter().enumerate() {
        for (ox, &(x0, x1, wx0, wx1)) in xs.iter().enumerate() {
            let p00 = &src[(y0 * w + x0) * d..][..d];
            let p01 = &src[(y0 * w + x1) * d..][..d];
            let p10 = &src[(y1 * w + x0) * d..][..d];
            let p11 = &src[(y1 * w + x1) * d..][..d];
            let o = &mut out[(oy * ow + ox) * d..][..d];
            for c in 0..d {
                let top = wx0 * p00[c] as f64 + wx1 * p01[c] as f64;
                let bot = wx0 * p10[c] as f64 + wx1 * p11[c] as f64;
                o[c] = (wy0 * top + wy1 * bot) as f32;
            }
        }
    }
    out
}

/// Merge one image's projected tile features `[n_tiles, N, d]` into its LLM rows.
pub fn merge_image(
    feats: &[f32],
    n_tiles: usize,
    width: usize,
    height: usize,
    cfg: &SiglipQwenConfig,
    newline: &[f32],
) -> Result<Vec<f32>> {
    let d = newline.len();
    let n = cfg.vision.patches_per_tile();
    let g = cfg.vision.patches_per_side();
    if feats.len() != n_tiles * n * d {
        return Err(Error::InvalidArgument(format!(
            "merge: {} feature values for {n_tiles} tiles of {n} rows × {d}",
            feats.len()
        )));
    }
    let mut out = Vec::with_capacity(image_tokens(width, height, n_tiles, cfg) * d);
    out.extend_from_slice(&feats[..n * d]);
    if n_tiles == 1 {
        out.extend_from_slice(newline);
        return Ok(out);
    }
    let s = anyres_shape(width, height, cfg, max_patches(cfg));
    if n_tiles != 1 + s.npw * s.nph {
        return Err(Error::InvalidArgument(format!(
            "image {width}x{height} tiles as 1 + {}x{} but {n_tiles} tiles were given",
            s.npw, s.nph
        )));
    }
    // The unpadded region of the crop map, channels last.
    let (h, w) = s.unpadded();
    let mut map = Vec::with_capacity(h * w * d);
    for r in s.rows.0..s.rows.1 {
        let (ty, y) = (r / g, r % g);
        for col in s.cols.0..s.cols.1 {
            let (tx, x) = (col / g, col % g);
            let tile = 1 + ty * s.npw + tx;
            map.extend_from_slice(&feats[(tile * n + y * g + x) * d..][..d]);
        }
    }
    let map = if s.downscaled() {
        bilinear(&map, h, w, d, s.out_h, s.out_w)
    } else {
        map
    };
    if s.out_w == 0 {
        // Degenerate extreme aspect ratios: rows of nothing but the newline (keeps the count
        // equal to `image_tokens`).
        for _ in 0..s.out_h {
            out.extend_from_slice(newline);
        }
        return Ok(out);
    }
    for row in map.chunks_exact(s.out_w * d) {
        out.extend_from_slice(row);
        out.extend_from_slice(newline);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn cfg() -> SiglipQwenConfig {
        SiglipQwenConfig::from_json(&json!({})).unwrap()
    }

    /// spec §5.2 worked examples: W×H, npw×nph, unpadded h×w, times, final h×w, tokens.
    #[test]
    fn worked_examples_of_spec_5_2() {
        let c = cfg();
        for ((w, h), grid, unp, times, fin, tokens) in [
            ((640, 480), (2, 2), (40, 54), 0.861, (40, 54), 2929),
            ((1000, 1000), (3, 3), (81, 81), 1.5, (54, 54), 3699),
            ((1024, 768), (3, 2), (54, 73), 1.163, (46, 62), 3627),
            ((2048, 1365), (6, 4), (108, 162), 2.449, (44, 66), 3677),
            ((500, 375), (2, 1), (27, 36), 0.577, (27, 36), 1728),
        ] {
            let s = anyres_shape(w, h, &c, 4);
            assert_eq!((s.npw, s.nph), grid, "{w}x{h}");
            assert_eq!(s.unpadded(), unp, "{w}x{h}");
            assert!((s.times - times).abs() < 1e-3, "{w}x{h}: times {}", s.times);
            assert_eq!((s.out_h, s.out_w), fin, "{w}x{h}");
            assert_eq!(
                image_tokens(w, h, 1 + grid.0 * grid.1, &c),
                tokens,
                "{w}x{h}"
            );
        }
        // Multi-image pad mode: one tile, 729 + newline.
        assert_eq!(image_tokens(640, 480, 1, &c), 730);
    }

    #[test]
    fn extreme_aspect_ratios_merge_without_panicking() {
        let c = cfg();
        for (w, h) in [(10_000, 10), (10, 10_000), (1, 1), (3000, 7), (384, 1)] {
            let s = anyres_shape(w, h, &c, 4);
            let n = 1 + s.npw * s.nph;
            let feats = vec![0.5f32; n * 729 * 2];
            let out = merge_image(&feats, n, w, h, &c, &[1.0, 2.0]).unwrap();
            assert_eq!(out.len() / 2, image_tokens(w, h, n, &c), "{w}x{h}");
        }
    }

    #[test]
    fn python_floor_division() {
        assert_eq!(py_floordiv(81.0, 1.5), 54.0);
        assert_eq!(py_floordiv(73.0, 1.1626916409142416), 62.0);
        assert_eq!(py_floordiv(7.0, 2.0), 3.0);
        assert_eq!(py_floordiv(-7.0, 2.0), -4.0);
        // 1 // 0.1 is 9.0 in Python although 1 / 0.1 == 10.0.
        assert_eq!(py_floordiv(1.0, 0.1), 9.0);
    }

    #[test]
    fn unpad_keeps_the_image_region() {
        // 451×300 on a 2×1 grid (54×27): columns are cut, 7 on each side.
        assert_eq!(unpad(451, 300, 27, 54), ((0, 27), (7, 47)));
        // 800×500 on 3×2 (54×81): rows are cut.
        assert_eq!(unpad(800, 500, 54, 81), ((2, 52), (0, 81)));
    }

    #[test]
    fn bilinear_matches_pytorch_align_corners_false() {
        // torch.nn.functional.interpolate(torch.arange(4.).view(1,1,1,4), [1,3], mode="bilinear")
        // = [[0.1667, 1.5, 2.8333]]
        let src = [0f32, 1.0, 2.0, 3.0];
        let out = bilinear(&src, 1, 4, 1, 1, 3);
        for (a, b) in out.iter().zip([1.0 / 6.0, 1.5, 17.0 / 6.0]) {
            assert!((a - b).abs() < 1e-6, "{out:?}");
        }
        // Identity size is the identity.
        let m: Vec<f32> = (0..12).map(|x| x as f32).collect();
        assert_eq!(bilinear(&m, 3, 2, 2, 3, 2), m);
    }

    #[test]
    fn merge_layout_base_first_newline_per_row() {
        let mut c = cfg();
        c.vision.image_size = 28;
        c.vision.patch_size = 14; // g = 2, N = 4
        c.pinpoints = vec![(28, 28), (56, 28)];
        let d = 1;
        // 60×20 image -> best (56, 28): 2 crops; map 2×4; unpad rows: W/H = 3 > 2 -> s = 4/60,
        // new_h = int(20·4/60) = 1, pad = 0 -> rows [0, 2).
        let feats: Vec<f32> = (0..12).map(|x| x as f32).collect();
        let nl = [-1.0f32];
        let out = merge_image(&feats, 3, 60, 20, &c, &nl).unwrap();
        // base 0..4, then rows: crop1 row0 (4,5) crop2 row0 (8,9) NL, crop1 row1 (6,7) crop2 row1 (10,11) NL.
        assert_eq!(
            out,
            vec![0., 1., 2., 3., 4., 5., 8., 9., -1., 6., 7., 10., 11., -1.]
        );
        assert_eq!(out.len() / d, image_tokens(60, 20, 3, &c));
        // Wrong tile count is an error, not a panic.
        assert!(merge_image(&feats[..8], 2, 60, 20, &c, &nl).is_err());
    }
}
