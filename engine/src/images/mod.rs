//! Image input and Qwen2-VL preprocessing (spec §4.1).
//!
//! The reference feeds images through transformers' `Qwen2VLImageProcessor` (slow, PIL
//! path): convert to RGB, `smart_resize`, PIL bicubic resize, rescale, CLIP normalisation,
//! temporal duplication and patchification. Everything here reproduces that path bit for
//! bit (the fixtures' `resized_rgb` and `pixel_values` are matched exactly), because the
//! vision tower sees these values directly.
//!
//! The core (RGB8 buffers → `pixel_values`) is `no_std` + `alloc`; JPEG/PNG decoding
//! (`decode`, `load`) needs the `std` feature and the `image` crate.

use alloc::format;
use alloc::vec::Vec;
use core::fmt;

use crate::config::QwenVisionConfig;
use crate::error::{Error, Result};
use crate::models::qwen2_5_vl::vision::Grid;

mod resize;
pub use resize::{resize_bicubic, resize_bicubic_with, PassOrder};

#[cfg(feature = "std")]
mod decode;
#[cfg(feature = "std")]
pub use decode::{decode, load, DecodeLimits};

#[cfg(test)]
mod tests;

/// OPENAI CLIP normalisation constants used by the Qwen2-VL processor (spec §4.1 step 4).
/// transformers builds them with `np.array(mean, dtype=float32)`, i.e. the Python float
/// (f64) literal rounded to f32; writing them as f64 and casting reproduces that exactly.
pub const CLIP_MEAN: [f64; 3] = [0.48145466, 0.4578275, 0.40821073];
pub const CLIP_STD: [f64; 3] = [0.26862954, 0.26130258, 0.27577711];

/// Default `smart_resize` pixel range of the DiffusionVL Qwen2.5-VL checkpoints (spec §4.1).
pub const DEFAULT_MIN_PIXELS: usize = 147_456;
pub const DEFAULT_MAX_PIXELS: usize = 262_144;

/// Largest allowed ratio between the long and the short side (transformers' limit).
const MAX_ASPECT_RATIO: f64 = 200.0;

/// Tightly packed RGB8, row-major.
#[derive(Clone, PartialEq, Eq)]
pub struct RgbImage {
    pub width: usize,
    pub height: usize,
    pub data: Vec<u8>,
}

impl fmt::Debug for RgbImage {
    // The pixel buffer is megabytes; print its size instead.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "RgbImage({}x{}, {} bytes)",
            self.width,
            self.height,
            self.data.len()
        )
    }
}

impl RgbImage {
    /// From a caller's RGB8 buffer with a row stride in bytes (>= 3*width); validates sizes
    /// (no panic on bad input). The last row may be exactly `3 * width` bytes long.
    pub fn from_rgb8(width: usize, height: usize, stride: usize, data: &[u8]) -> Result<Self> {
        if width == 0 || height == 0 {
            return Err(Error::InvalidArgument(format!(
                "RGB image has a zero side ({width}x{height})"
            )));
        }
        let row = width.checked_mul(3).ok_or_else(|| {
            Error::InvalidArgument(format!("RGB image width {width} is too large"))
        })?;
        if stride < row {
            return Err(Error::InvalidArgument(format!(
                "RGB row stride {stride} is smaller than 3 x width = {row} bytes"
            )));
        }
        let needed = (height - 1)
            .checked_mul(stride)
            .and_then(|n| n.checked_add(row))
            .ok_or_else(|| {
                Error::InvalidArgument(format!("RGB image {width}x{height} is too large"))
            })?;
        if data.len() < needed {
            return Err(Error::InvalidArgument(format!(
                "RGB buffer has {} bytes; {width}x{height} with stride {stride} needs {needed}",
                data.len()
            )));
        }
        let mut packed = Vec::new();
        packed.try_reserve_exact(row * height).map_err(|_| {
            Error::InvalidArgument(format!("cannot allocate a {width}x{height} RGB image"))
        })?;
        for y in 0..height {
            packed.extend_from_slice(&data[y * stride..y * stride + row]);
        }
        Ok(RgbImage {
            width,
            height,
            data: packed,
        })
    }

    /// From an owned, tightly packed RGB8 buffer (`data.len() == 3 * width * height`).
    pub fn from_packed(width: usize, height: usize, data: Vec<u8>) -> Result<Self> {
        let img = RgbImage {
            width,
            height,
            data,
        };
        img.check()?;
        Ok(img)
    }

    /// Checks that `data` holds exactly `3 · width · height` bytes (the fields are public,
    /// so an image can be assembled inconsistently by hand).
    pub fn check(&self) -> Result<()> {
        let expected = self
            .width
            .checked_mul(self.height)
            .and_then(|n| n.checked_mul(3));
        if expected != Some(self.data.len()) {
            return Err(Error::InvalidArgument(format!(
                "RgbImage {}x{} must hold 3 x width x height bytes, found {}",
                self.width,
                self.height,
                self.data.len()
            )));
        }
        Ok(())
    }
}

/// Python's `round()` for the non-negative values `smart_resize` sees: ties go to the even
/// integer (spec §11 item 15). `rint` rounds to nearest-even in the default FP mode.
fn round_half_even(x: f64) -> f64 {
    libm::rint(x)
}

/// HF Qwen2-VL `smart_resize` (spec §4.1 step 2): returns `(new_height, new_width)`, both
/// multiples of `factor`, with the area pulled into `[min_pixels, max_pixels]` while keeping
/// the aspect ratio. Python `round()` is half-to-even. Errors (`Error::Image`) if the aspect
/// ratio is over 200 or `min(height, width) < factor`.
///
/// Arithmetic follows the Python source operation by operation in f64 (the same IEEE
/// doubles Python uses), so results agree for every size where `height·width` is exact in
/// f64 (below 2^53).
pub fn smart_resize(
    height: usize,
    width: usize,
    factor: usize,
    min_pixels: usize,
    max_pixels: usize,
) -> Result<(usize, usize)> {
    if factor == 0 {
        return Err(Error::InvalidArgument(
            "smart_resize factor must be positive".into(),
        ));
    }
    if height == 0 || width == 0 {
        return Err(Error::Image(format!(
            "image is empty ({width}x{height} pixels)"
        )));
    }
    let (h, w, f) = (height as f64, width as f64, factor as f64);
    let ratio = h.max(w) / h.min(w);
    if ratio > MAX_ASPECT_RATIO {
        return Err(Error::Image(format!(
            "image of {width}x{height} pixels has an aspect ratio of {ratio:.1}; at most {MAX_ASPECT_RATIO} is supported"
        )));
    }
    if height < factor || width < factor {
        return Err(Error::Image(format!(
            "image of {width}x{height} pixels is too small: both sides must be at least {factor} pixels"
        )));
    }
    // f64 -> usize casts saturate, and products are compared in u128, so absurd inputs give
    // absurd sizes rather than overflow panics.
    let snap = |x: f64| (x as usize).saturating_mul(factor);
    let mut h_bar = snap(round_half_even(h / f));
    let mut w_bar = snap(round_half_even(w / f));
    let area = (height as u128 * width as u128) as f64;
    let bar_area = h_bar as u128 * w_bar as u128;
    if bar_area > max_pixels as u128 {
        let beta = libm::sqrt(area / max_pixels as f64);
        // `max(factor, …)` as in current transformers: a tiny max_pixels never yields 0.
        h_bar = factor.max(snap(libm::floor(h / beta / f)));
        w_bar = factor.max(snap(libm::floor(w / beta / f)));
    } else if bar_area < min_pixels as u128 {
        let beta = libm::sqrt(min_pixels as f64 / area);
        h_bar = snap(libm::ceil(h * beta / f));
        w_bar = snap(libm::ceil(w * beta / f));
    }
    Ok((h_bar, w_bar))
}

/// Output of [`preprocess_qwen2vl`] for one image.
#[derive(Clone, PartialEq)]
pub struct Preprocessed {
    /// `[grid.t · grid.h · grid.w, patch_dim]`, row-major.
    pub pixel_values: Vec<f32>,
    pub grid: Grid,
    pub resized_width: usize,
    pub resized_height: usize,
}

impl fmt::Debug for Preprocessed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Preprocessed")
            .field("pixel_values_len", &self.pixel_values.len())
            .field("grid", &self.grid)
            .field("resized_width", &self.resized_width)
            .field("resized_height", &self.resized_height)
            .finish()
    }
}

/// Per-channel lookup `u8 → normalised f32`, computed exactly as transformers does:
/// `rescale` multiplies in float64 by `1/255` and stores float32 (spec §11 item 14), then
/// `normalize` computes `(x - mean) / std` in float32 with float32 constants.
fn normalisation_table() -> [[f32; 256]; 3] {
    const RESCALE: f64 = 1.0 / 255.0; // the processor's rescale_factor 0.00392156862745098
    let mut table = [[0f32; 256]; 3];
    for (c, row) in table.iter_mut().enumerate() {
        let (mean, std) = (CLIP_MEAN[c] as f32, CLIP_STD[c] as f32);
        for (v, out) in row.iter_mut().enumerate() {
            let x = (v as f64 * RESCALE) as f32;
            *out = (x - mean) / std;
        }
    }
    table
}

/// Full `Qwen2VLImageProcessor` path for one image (spec §4.1 steps 2–7): `smart_resize`
/// (factor = patch_size · spatial_merge_size), PIL bicubic, rescale 1/255 (f64 then f32),
/// CLIP mean/std normalisation in f32, the frame repeated to `temporal_patch_size` slices,
/// and patchification into rows of `patch_dim` values.
///
/// Row order: merge-block row, merge-block column, then the `merge × merge` patches inside
/// the block in raster order; column order inside a row: channel, temporal slice, patch row,
/// patch column (`((c·tp + t)·p + py)·p + px`).
pub fn preprocess_qwen2vl(
    img: &RgbImage,
    cfg: &QwenVisionConfig,
    min_pixels: usize,
    max_pixels: usize,
) -> Result<Preprocessed> {
    let (p, m, tp) = (
        cfg.patch_size,
        cfg.spatial_merge_size,
        cfg.temporal_patch_size,
    );
    if p == 0 || m == 0 || tp == 0 {
        return Err(Error::InvalidArgument(format!(
            "vision config needs positive patch_size, spatial_merge_size and temporal_patch_size (found {p}, {m}, {tp})"
        )));
    }
    if cfg.in_chans != 3 {
        return Err(Error::InvalidArgument(format!(
            "images are RGB but the vision config expects {} input channels",
            cfg.in_chans
        )));
    }
    img.check()?;
    let factor = p.checked_mul(m).ok_or_else(|| {
        Error::InvalidArgument(format!("patch_size {p} x spatial_merge_size {m} overflows"))
    })?;
    let (rh, rw) = smart_resize(img.height, img.width, factor, min_pixels, max_pixels)?;
    let (gh, gw) = (rh / p, rw / p);
    let patch_dim = cfg.patch_dim();
    let total = gh
        .checked_mul(gw)
        .and_then(|n| n.checked_mul(patch_dim))
        .filter(|&n| n.checked_mul(4).is_some())
        .ok_or_else(|| Error::Image(format!("resized image {rw}x{rh} is too large")))?;
    let mut pixel_values = Vec::new();
    pixel_values.try_reserve_exact(total).map_err(|_| {
        Error::Image(format!(
            "cannot allocate pixel values for a {rw}x{rh} image"
        ))
    })?;

    let resized = resize_bicubic(img, rw, rh);

    // Channel-first normalised planes (transformers transposes to CHW before patchifying).
    let table = normalisation_table();
    let plane = rh * rw;
    let mut planes = alloc::vec![0f32; 3 * plane];
    for (i, px) in resized.data.chunks_exact(3).enumerate() {
        for c in 0..3 {
            planes[c * plane + i] = table[c][px[c] as usize];
        }
    }

    for bh in 0..gh / m {
        for bw in 0..gw / m {
            for ih in 0..m {
                for iw in 0..m {
                    let (y0, x0) = ((bh * m + ih) * p, (bw * m + iw) * p);
                    for c in 0..3 {
                        // The single frame is repeated `tp` times (spec §4.1 step 5).
                        for _t in 0..tp {
                            for py in 0..p {
                                let start = c * plane + (y0 + py) * rw + x0;
                                pixel_values.extend_from_slice(&planes[start..start + p]);
                            }
                        }
                    }
                }
            }
        }
    }
    debug_assert_eq!(pixel_values.len(), total);

    Ok(Preprocessed {
        pixel_values,
        grid: Grid { t: 1, h: gh, w: gw },
        resized_width: rw,
        resized_height: rh,
    })
}
