//! LLaVA-OneVision image preprocessing for the SigLIP variant (spec §4.2).
//!
//! One image (`anyres_max_N`): pick the best pinpoint resolution, resize it in (PIL bicubic)
//! keeping the aspect ratio and paste it centred on black, cut 384² crops row-major, and put
//! the whole image squashed to 384² (aspect distorted) in front as the base tile. Several
//! images in one request (or `image_aspect_ratio = pad`): each image padded to a square with
//! (127,127,127), resized to 384², one tile. Every tile then goes through the SigLIP
//! processor: ×1/255 in f64 stored as f32, (x − 0.5) / 0.5 in f32, channel-first.
//!
//! All float arithmetic that decides sizes follows the Python source operation by operation in
//! f64 (Python floats), with `int()` truncation and `math.ceil`.

use alloc::format;
use alloc::vec;
use alloc::vec::Vec;

use super::config::{AspectMode, SiglipQwenConfig};
use crate::error::{Error, Result};
use crate::images::{resize_bicubic, RgbImage};
use crate::models::qwen2_5_vl::vision::Grid;

/// `expand2square` background: `int(0.5 · 255)` per channel (spec §4.2 step 7).
pub const PAD_BACKGROUND: [u8; 3] = [127, 127, 127];

/// How one image is tiled.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TileLayout {
    /// Base tile + `npw × nph` crops of the image resized and padded to `best_w × best_h`.
    Anyres {
        best_w: usize,
        best_h: usize,
        npw: usize,
        nph: usize,
    },
    /// One tile: the image padded to a square.
    Pad,
}

impl TileLayout {
    pub fn n_tiles(&self) -> usize {
        match self {
            TileLayout::Anyres { npw, nph, .. } => 1 + npw * nph,
            TileLayout::Pad => 1,
        }
    }
}

/// `select_best_resolution` (spec §4.2 step 2): maximal effective resolution, then minimal
/// waste; the first candidate wins full ties. Returns (width, height).
pub fn select_best_resolution(
    width: usize,
    height: usize,
    pinpoints: &[(usize, usize)],
) -> (usize, usize) {
    let (ow, oh) = (width as f64, height as f64);
    let mut best = pinpoints[0];
    let mut max_eff = 0u128;
    let mut min_waste = u128::MAX;
    for &(w, h) in pinpoints {
        let scale = f64::min(w as f64 / ow, h as f64 / oh);
        // Python int() truncates; the products are far below 2^53.
        let dw = (ow * scale) as u128;
        let dh = (oh * scale) as u128;
        let eff = (dw * dh).min(width as u128 * height as u128);
        let waste = (w as u128 * h as u128).saturating_sub(eff);
        if eff > max_eff || (eff == max_eff && waste < min_waste) {
            max_eff = eff;
            min_waste = waste;
            best = (w, h);
        }
    }
    best
}

/// The tiling of one image (spec §4.2): `pad` when the request has several images or the
/// config says so, else anyres.
pub fn plan(
    width: usize,
    height: usize,
    cfg: &SiglipQwenConfig,
    several_images: bool,
) -> TileLayout {
    if several_images || cfg.aspect == AspectMode::Pad {
        return TileLayout::Pad;
    }
    let tile = cfg.vision.image_size;
    let (best_w, best_h) = select_best_resolution(width, height, &cfg.pinpoints);
    TileLayout::Anyres {
        best_w,
        best_h,
        npw: best_w / tile,
        nph: best_h / tile,
    }
}

/// `resize_and_pad_image` (spec §4.2 step 3): fill one side, keep the aspect ratio (ceil),
/// PIL bicubic, paste centred on black.
pub fn resize_and_pad(img: &RgbImage, tw: usize, th: usize) -> RgbImage {
    let (ow, oh) = (img.width as f64, img.height as f64);
    let scale_w = tw as f64 / ow;
    let scale_h = th as f64 / oh;
    let (nw, nh) = if scale_w < scale_h {
        (tw, (libm::ceil(oh * scale_w) as usize).min(th))
    } else {
        ((libm::ceil(ow * scale_h) as usize).min(tw), th)
    };
    let resized = resize_bicubic(img, nw.max(1), nh.max(1));
    let mut out = RgbImage {
        width: tw,
        height: th,
        data: vec![0u8; tw * th * 3],
    };
    paste(
        &mut out,
        &resized,
        (tw - resized.width) / 2,
        (th - resized.height) / 2,
    );
    out
}

/// `expand2square` (spec §4.2 step 7): centre on a square canvas of the longer side.
pub fn expand_to_square(img: &RgbImage, bg: [u8; 3]) -> RgbImage {
    let (w, h) = (img.width, img.height);
    if w == h {
        return img.clone();
    }
    let s = w.max(h);
    let mut out = RgbImage {
        width: s,
        height: s,
        data: bg.repeat(s * s),
    };
    if w > h {
        paste(&mut out, img, 0, (w - h) / 2);
    } else {
        paste(&mut out, img, (h - w) / 2, 0);
    }
    out
}

fn paste(dst: &mut RgbImage, src: &RgbImage, x0: usize, y0: usize) {
    let row = src.width * 3;
    for y in 0..src.height {
        let d = ((y0 + y) * dst.width + x0) * 3;
        dst.data[d..d + row].copy_from_slice(&src.data[y * row..(y + 1) * row]);
    }
}

/// The `size × size` crop at (x0, y0) (inside the image).
pub fn crop(img: &RgbImage, x0: usize, y0: usize, size: usize) -> RgbImage {
    let mut data = Vec::with_capacity(size * size * 3);
    for y in y0..y0 + size {
        let s = (y * img.width + x0) * 3;
        data.extend_from_slice(&img.data[s..s + size * 3]);
    }
    RgbImage {
        width: size,
        height: size,
        data,
    }
}

/// The RGB tiles of one image, in tensor order (base first for anyres), each
/// `image_size²` — what the SigLIP processor normalises.
pub fn tile_images(img: &RgbImage, layout: &TileLayout, tile: usize) -> Vec<RgbImage> {
    match *layout {
        TileLayout::Pad => {
            let sq = expand_to_square(img, PAD_BACKGROUND);
            vec![resize_bicubic(&sq, tile, tile)]
        }
        TileLayout::Anyres {
            best_w,
            best_h,
            npw,
            nph,
        } => {
            let mut tiles = Vec::with_capacity(1 + npw * nph);
            // The base image is squashed, not padded (MMU L284–288; spec §4.2 step 5).
            tiles.push(resize_bicubic(img, tile, tile));
            let padded = resize_and_pad(img, best_w, best_h);
            for ty in 0..nph {
                for tx in 0..npw {
                    tiles.push(crop(&padded, tx * tile, ty * tile, tile));
                }
            }
            tiles
        }
    }
}

/// SigLIP processor normalisation, appended channel-first: `((v · (1/255) as f64) as f32 −
/// 0.5) / 0.5` in f32 (transformers' rescale and normalize, spec §11 item 14).
pub fn normalize_into(tile: &RgbImage, out: &mut Vec<f32>) {
    let mut table = [0f32; 256];
    for (v, t) in table.iter_mut().enumerate() {
        let x = (v as f64 * (1.0 / 255.0)) as f32;
        *t = (x - 0.5f32) / 0.5f32;
    }
    let plane = tile.width * tile.height;
    let start = out.len();
    out.resize(start + 3 * plane, 0.0);
    let dst = &mut out[start..];
    for (i, px) in tile.data.chunks_exact(3).enumerate() {
        for c in 0..3 {
            dst[c * plane + i] = table[px[c] as usize];
        }
    }
}

/// One image's preprocessed tiles.
#[derive(Clone, PartialEq)]
pub struct Tiles {
    /// `[n_tiles, 3, image_size, image_size]`.
    pub pixels: Vec<f32>,
    /// `t` = number of tiles, `h × w` = the original image size in pixels (what the anyres
    /// merge needs, spec §5.2 steps 2–4).
    pub grid: Grid,
    pub layout: TileLayout,
}

impl core::fmt::Debug for Tiles {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Tiles")
            .field("pixels_len", &self.pixels.len())
            .field("grid", &self.grid)
            .field("layout", &self.layout)
            .finish()
    }
}

/// The full §4.2 path for one image. `several_images`: the request has more than one image
/// (pad mode, step 7).
pub fn preprocess(img: &RgbImage, cfg: &SiglipQwenConfig, several_images: bool) -> Result<Tiles> {
    img.check()?;
    if img.width == 0 || img.height == 0 {
        return Err(Error::Image(format!(
            "image is empty ({}x{} pixels)",
            img.width, img.height
        )));
    }
    let tile = cfg.vision.image_size;
    let layout = plan(img.width, img.height, cfg, several_images);
    let tiles = tile_images(img, &layout, tile);
    let mut pixels = Vec::new();
    pixels
        .try_reserve_exact(tiles.len() * cfg.vision.tile_len())
        .map_err(|_| Error::Image(format!("cannot allocate {} tiles", tiles.len())))?;
    for t in &tiles {
        normalize_into(t, &mut pixels);
    }
    Ok(Tiles {
        pixels,
        grid: Grid {
            t: tiles.len(),
            h: img.height,
            w: img.width,
        },
        layout,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pins() -> Vec<(usize, usize)> {
        super::super::config::default_pinpoints(384)
    }

    #[test]
    fn best_resolution_matches_spec_5_2_table() {
        // spec §5.2 worked examples: W×H -> best (w, h).
        for ((w, h), best) in [
            ((640, 480), (768, 768)),
            ((1000, 1000), (1152, 1152)),
            ((1024, 768), (1152, 768)),
            ((2048, 1365), (2304, 1536)),
            ((500, 375), (768, 384)),
            ((451, 300), (768, 384)),
            ((128, 128), (384, 384)),
        ] {
            assert_eq!(select_best_resolution(w, h, &pins()), best, "{w}x{h}");
        }
    }

    #[test]
    fn tall_image_gets_a_1x2_grid() {
        assert_eq!(select_best_resolution(300, 500, &pins()), (384, 768));
    }

    #[test]
    fn resize_and_pad_centres_on_black() {
        let img = RgbImage {
            width: 4,
            height: 2,
            data: [200u8, 100, 50].repeat(8),
        };
        let out = resize_and_pad(&img, 8, 8);
        // Width fills (8), height = ceil(2 · 2) = 4, pasted at y = 2.
        let px = |x: usize, y: usize| &out.data[(y * 8 + x) * 3..(y * 8 + x) * 3 + 3];
        assert_eq!(px(0, 0), [0, 0, 0]);
        assert_eq!(px(3, 3), [200, 100, 50]);
        assert_eq!(px(7, 5), [200, 100, 50]);
        assert_eq!(px(7, 6), [0, 0, 0]);
    }

    #[test]
    fn expand_to_square_uses_grey_and_centres() {
        let img = RgbImage {
            width: 2,
            height: 5,
            data: [1u8, 2, 3].repeat(10),
        };
        let sq = expand_to_square(&img, PAD_BACKGROUND);
        assert_eq!((sq.width, sq.height), (5, 5));
        assert_eq!(&sq.data[0..3], &[127, 127, 127]);
        // Column offset (5 − 2) / 2 = 1.
        assert_eq!(&sq.data[3..6], &[1, 2, 3]);
        assert_eq!(&sq.data[9..12], &[127, 127, 127]);
    }

    #[test]
    fn normalisation_maps_to_minus_one_one() {
        let t = RgbImage {
            width: 1,
            height: 1,
            data: vec![0, 255, 128],
        };
        let mut v = Vec::new();
        normalize_into(&t, &mut v);
        assert_eq!(v[0], -1.0);
        assert_eq!(v[1], 1.0);
        assert!((v[2] - 0.003_921_628).abs() < 1e-6);
    }
}
