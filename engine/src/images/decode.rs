//! JPEG / PNG decoding to RGB8 the way the reference sees images (spec §4.1 step 1,
//! §11 item 19): PIL decodes the file and transformers' `convert_to_rgb` turns every
//! non-RGB mode into RGB by converting to RGBA and alpha-compositing onto opaque white.
//!
//! Pixel decoding is done by the `image` crate; what PIL does differently from it is
//! reproduced here from the PNG header (colour type, bit depth, `tRNS`):
//!
//! * 16-bit RGB / RGBA / gray+alpha samples keep their high byte (PIL's `;16B` unpackers);
//! * 16-bit grayscale opens as mode `I;16`, whose conversion to RGBA clips to 255;
//! * a `tRNS` colour key on an RGB image is ignored (`convert_to_rgb` returns RGB images
//!   unchanged); on a grayscale image it marks pixels whose *converted 8-bit* value equals
//!   the key's low byte (PIL's `convert_transparent`), which for 1-bit images means 0/255;
//! * palette entries, palette alpha and low-bit gray expansion match PIL already.
//!
//! Untrusted input must give errors, never panics or huge allocations: dimensions are read
//! from the header and checked against [`DecodeLimits`] before the `image` crate is asked to
//! do anything, and its own `Limits` are set before decoding too.

use std::io::Cursor;
use std::path::Path;

use crate::error::{Error, Result};

use super::RgbImage;

/// Resource limits for decoding untrusted images.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DecodeLimits {
    /// Largest accepted width × height (default 64 Mpx).
    pub max_pixels: u64,
    /// Largest accepted encoded input and decoder allocation, in bytes (default 256 MiB).
    pub max_bytes: u64,
}

impl Default for DecodeLimits {
    fn default() -> Self {
        DecodeLimits {
            max_pixels: 64_000_000,
            max_bytes: 256 << 20,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Format {
    Png,
    Jpeg,
}

impl Format {
    fn name(self) -> &'static str {
        match self {
            Format::Png => "PNG",
            Format::Jpeg => "JPEG",
        }
    }
}

pub(super) const PNG_SIGNATURE: [u8; 8] = [0x89, b'P', b'N', b'G', 0x0D, 0x0A, 0x1A, 0x0A];

fn img_err(msg: impl Into<String>) -> Error {
    Error::Image(msg.into())
}

fn sniff(bytes: &[u8]) -> Result<Format> {
    if bytes.is_empty() {
        return Err(img_err("empty input (0 bytes) is not an image"));
    }
    if bytes.starts_with(&PNG_SIGNATURE) {
        Ok(Format::Png)
    } else if bytes.starts_with(&[0xFF, 0xD8, 0xFF]) {
        Ok(Format::Jpeg)
    } else {
        let head: Vec<String> = bytes.iter().take(8).map(|b| format!("{b:02x}")).collect();
        Err(img_err(format!(
            "unrecognised image format (only JPEG and PNG are supported); first bytes: {}",
            head.join(" ")
        )))
    }
}

/// What PIL's handling depends on, read straight from the PNG chunks.
#[derive(Clone, Debug)]
struct PngHeader {
    width: u32,
    height: u32,
    bit_depth: u8,
    color_type: u8,
    /// Raw `tRNS` payload if the chunk appears before the image data.
    trns: Option<Vec<u8>>,
}

fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes([b[0], b[1], b[2], b[3]])
}

fn png_header(bytes: &[u8]) -> Result<PngHeader> {
    // Signature (8) + IHDR length/type (8) + IHDR payload (13) + CRC (4).
    if bytes.len() < 33 {
        return Err(img_err(format!(
            "truncated PNG: {} bytes, too short for its header",
            bytes.len()
        )));
    }
    if be32(&bytes[8..12]) != 13 || &bytes[12..16] != b"IHDR" {
        return Err(img_err(
            "corrupt PNG: the first chunk is not a 13-byte IHDR",
        ));
    }
    let mut hdr = PngHeader {
        width: be32(&bytes[16..20]),
        height: be32(&bytes[20..24]),
        bit_depth: bytes[24],
        color_type: bytes[25],
        trns: None,
    };
    // Walk the ancillary chunks up to the first IDAT looking for tRNS. Anything malformed
    // here is left for the decoder to report.
    let mut pos = 33usize;
    // `pos` only grows through checked additions, and `pos + 8` is in bounds once the chunk
    // head has been read, so no arithmetic here can overflow on any pointer width.
    while let Some(head) = pos.checked_add(8).and_then(|end| bytes.get(pos..end)) {
        let len = be32(&head[0..4]) as usize;
        let kind = &head[4..8];
        if kind == b"IDAT" || kind == b"IEND" {
            break;
        }
        let body = pos + 8;
        if kind == b"tRNS" {
            hdr.trns = body
                .checked_add(len)
                .and_then(|end| bytes.get(body..end))
                .map(<[u8]>::to_vec);
        }
        match body.checked_add(len).and_then(|p| p.checked_add(4)) {
            Some(next) => pos = next,
            None => break,
        }
    }
    Ok(hdr)
}

/// Walks the JPEG marker structure: returns the frame size from the first SOFn and fails
/// unless an end-of-image marker is reached. The `image` crate's JPEG decoder runs in
/// non-strict mode and would silently pad a truncated file with grey; PIL raises
/// "image file is truncated" instead, and so do we.
fn jpeg_header(bytes: &[u8]) -> Result<(u32, u32)> {
    let truncated = || img_err("truncated JPEG: the data ends before the end-of-image marker");
    let mut size = None;
    let mut pos = 2usize; // after SOI
    loop {
        // Skip anything up to the next marker prefix, then fill bytes.
        while *bytes.get(pos).ok_or_else(truncated)? != 0xFF {
            pos += 1;
        }
        while *bytes.get(pos).ok_or_else(truncated)? == 0xFF {
            pos += 1;
        }
        let marker = bytes[pos];
        pos += 1;
        match marker {
            0xD9 => break, // EOI
            // Standalone markers without a length: RSTn, SOI, TEM; 0x00 is stray stuffing.
            0xD0..=0xD8 | 0x01 | 0x00 => continue,
            _ => {}
        }
        let seg = bytes.get(pos..pos + 2).ok_or_else(truncated)?;
        let len = usize::from(u16::from_be_bytes([seg[0], seg[1]]));
        if len < 2 {
            return Err(img_err(format!(
                "corrupt JPEG: marker 0x{marker:02X} has segment length {len}"
            )));
        }
        let body = bytes.get(pos + 2..pos + len).ok_or_else(truncated)?;
        // SOF0..SOF15 except DHT (C4), JPG (C8) and DAC (CC).
        if matches!(marker, 0xC0..=0xCF) && !matches!(marker, 0xC4 | 0xC8 | 0xCC) && size.is_none()
        {
            if body.len() < 5 {
                return Err(img_err("corrupt JPEG: frame header too short"));
            }
            let h = u32::from(u16::from_be_bytes([body[1], body[2]]));
            let w = u32::from(u16::from_be_bytes([body[3], body[4]]));
            size = Some((w, h));
        }
        pos += len;
        if marker == 0xDA {
            // Entropy-coded data: 0xFF is followed by 0x00 (stuffing) or RSTn inside it;
            // any other marker ends the scan.
            loop {
                let b = *bytes.get(pos).ok_or_else(truncated)?;
                if b == 0xFF {
                    let next = *bytes.get(pos + 1).ok_or_else(truncated)?;
                    if next != 0x00 && !(0xD0..=0xD7).contains(&next) && next != 0xFF {
                        break;
                    }
                }
                pos += 1;
            }
        }
    }
    size.ok_or_else(|| {
        img_err("corrupt JPEG: no frame header (SOFn) before the end-of-image marker")
    })
}

fn check_limits(width: u32, height: u32, limits: &DecodeLimits) -> Result<()> {
    if width == 0 || height == 0 {
        return Err(img_err(format!(
            "image header declares an empty size {width}x{height}"
        )));
    }
    let pixels = u64::from(width) * u64::from(height);
    if pixels > limits.max_pixels {
        return Err(img_err(format!(
            "image header declares {width}x{height} = {pixels} pixels, over the limit of {} pixels",
            limits.max_pixels
        )));
    }
    Ok(())
}

/// Decode JPEG or PNG bytes to RGB8 like PIL + transformers' `convert_to_rgb` (see the module
/// documentation). Errors (`Error::Image`) on empty, unrecognised, truncated or corrupt
/// input and on images over `limits`, before allocating their pixels.
pub fn decode(bytes: &[u8], limits: &DecodeLimits) -> Result<RgbImage> {
    let format = sniff(bytes)?;
    if bytes.len() as u64 > limits.max_bytes {
        return Err(img_err(format!(
            "{} input is {} bytes, over the limit of {} bytes",
            format.name(),
            bytes.len(),
            limits.max_bytes
        )));
    }
    let png = match format {
        Format::Png => {
            let hdr = png_header(bytes)?;
            check_limits(hdr.width, hdr.height, limits)?;
            Some(hdr)
        }
        Format::Jpeg => {
            let (w, h) = jpeg_header(bytes)?;
            check_limits(w, h, limits)?;
            #[cfg(feature = "exact-jpeg")]
            if let Some(img) = decode_jpeg_libjpeg(bytes)? {
                return Ok(img);
            }
            None
        }
    };

    let decode_err = |e: ::image::ImageError| match e {
        ::image::ImageError::Limits(l) => img_err(format!(
            "{} image exceeds the decoding limits ({l}; max {} bytes)",
            format.name(),
            limits.max_bytes
        )),
        other => img_err(format!("cannot decode {} image: {other}", format.name())),
    };
    let side = u32::try_from(limits.max_pixels).unwrap_or(u32::MAX);
    let mut lim = ::image::Limits::default();
    lim.max_image_width = Some(side);
    lim.max_image_height = Some(side);
    lim.max_alloc = Some(limits.max_bytes);
    let fmt = match format {
        Format::Png => ::image::ImageFormat::Png,
        Format::Jpeg => ::image::ImageFormat::Jpeg,
    };
    let mut reader = ::image::ImageReader::with_format(Cursor::new(bytes), fmt);
    reader.limits(lim);
    let decoder = reader.into_decoder().map_err(decode_err)?;
    let needed = ::image::ImageDecoder::total_bytes(&decoder);
    if needed > limits.max_bytes {
        return Err(img_err(format!(
            "decoding this {} image needs {needed} bytes, over the limit of {} bytes",
            format.name(),
            limits.max_bytes
        )));
    }
    let img = ::image::DynamicImage::from_decoder(decoder).map_err(decode_err)?;
    to_rgb(img, png.as_ref())
}

/// Decode a JPEG with libjpeg-turbo's code (the `mozjpeg` crate): the same IDCT (islow),
/// fancy upsampling and colour conversion as PIL, so the pixels are bit-identical to the
/// reference processor's. YCbCr, RGB and grayscale come out as RGB; four-channel JPEGs
/// (CMYK, YCCK) come out as CMYK and are converted as PIL does ([`pil_cmyk_to_rgb`]).
/// `None` for other colour spaces, which then go through the `image` crate. Dimensions were
/// checked against the limits before this is called.
#[cfg(feature = "exact-jpeg")]
fn decode_jpeg_libjpeg(bytes: &[u8]) -> Result<Option<RgbImage>> {
    use mozjpeg::ColorSpace;
    // libjpeg errors unwind out of its error handler (resume_unwind: no panic hook runs).
    let run = std::panic::catch_unwind(|| -> std::io::Result<Option<(usize, usize, Vec<u8>)>> {
        let d = mozjpeg::Decompress::new_mem(bytes)?;
        let cmyk = match d.color_space() {
            ColorSpace::JCS_YCbCr | ColorSpace::JCS_RGB | ColorSpace::JCS_GRAYSCALE => false,
            ColorSpace::JCS_CMYK | ColorSpace::JCS_YCCK => true,
            _ => return Ok(None),
        };
        let mut started = if cmyk {
            d.to_colorspace(ColorSpace::JCS_CMYK)?
        } else {
            d.rgb()?
        };
        let (w, h) = (started.width(), started.height());
        let data: Vec<u8> = started.read_scanlines::<u8>()?;
        started.finish()?;
        if cmyk {
            if data.len() != w * h * 4 {
                return Err(std::io::Error::other("libjpeg returned a short CMYK image"));
            }
            let rgb = data
                .chunks_exact(4)
                .flat_map(|p| pil_cmyk_to_rgb([p[0], p[1], p[2], p[3]]))
                .collect();
            return Ok(Some((w, h, rgb)));
        }
        Ok(Some((w, h, data)))
    });
    match run {
        Ok(Ok(Some((width, height, data)))) if data.len() == width * height * 3 => {
            Ok(Some(RgbImage {
                width,
                height,
                data,
            }))
        }
        Ok(Ok(Some(_))) => Err(img_err("JPEG decoder returned a short image")),
        Ok(Ok(None)) => Ok(None),
        Ok(Err(e)) => Err(img_err(format!("cannot decode JPEG image: {e}"))),
        Err(panic) => {
            let msg = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "libjpeg error".to_string());
            Err(img_err(format!("cannot decode JPEG image: {msg}")))
        }
    }
}

/// One pixel of a four-channel JPEG as libjpeg decodes it (`JCS_CMYK`) to RGB, as PIL
/// does: PIL reads every such JPEG as Adobe's inverted CMYK (raw mode `CMYK;I`: each byte
/// is 255 − value) and converts CMYK to RGB as `nk − c·nk/255` with `nk = 255 − k`
/// (`libImaging/Convert.c`, `cmyk2rgb`, its rounded division by 255). Checked equal to
/// PIL's `convert("RGB")` on 65,536 random CMYK values when this was written.
#[cfg(any(feature = "exact-jpeg", test))]
pub(super) fn pil_cmyk_to_rgb(raw: [u8; 4]) -> [u8; 3] {
    let [c, m, y, k] = raw.map(|v| 255 - v as u32);
    let nk = 255 - k;
    let channel = |v: u32| {
        let t = v * nk + 128;
        // nk − round(v·nk/255) never leaves 0..=255.
        (nk - (((t >> 8) + t) >> 8)) as u8
    };
    [channel(c), channel(m), channel(y)]
}

/// Decode a JPEG or PNG file. I/O failures give `Error::Io`; decoding failures give
/// `Error::Image` with the file name in the message.
pub fn load(path: &Path, limits: &DecodeLimits) -> Result<RgbImage> {
    let io = |e: std::io::Error| Error::Io {
        path: path.display().to_string(),
        detail: e.to_string(),
    };
    let named = |m: String| Error::Image(format!("{}: {m}", path.display()));
    let meta = std::fs::metadata(path).map_err(io)?;
    if !meta.is_file() {
        return Err(Error::Io {
            path: path.display().to_string(),
            detail: "not a regular file".into(),
        });
    }
    if meta.len() > limits.max_bytes {
        return Err(named(format!(
            "file is {} bytes, over the limit of {} bytes",
            meta.len(),
            limits.max_bytes
        )));
    }
    let bytes = std::fs::read(path).map_err(io)?;
    decode(&bytes, limits).map_err(|e| match e {
        Error::Image(m) => named(m),
        other => other,
    })
}

/// PIL `Image.alpha_composite(white, rgba)` for one pixel, then dropping alpha
/// (libImaging/AlphaComposite.c, 7 extra bits of precision, divisions by 255 done as
/// `((x >> 8) + x) >> 8` with rounding offsets). With an opaque white destination this is
/// the exact integer result transformers' `convert_to_rgb` produces.
pub(super) fn over_white(rgb: [u8; 3], a: u8) -> [u8; 3] {
    const PREC: u32 = 7;
    if a == 0 {
        return [255; 3];
    }
    let (sa, da) = (u32::from(a), 255u32);
    let blend = da * (255 - sa);
    let outa255 = sa * 255 + blend;
    let coef1 = sa * 255 * 255 * (1 << PREC) / outa255;
    let coef2 = 255 * (1 << PREC) - coef1;
    let shift_div_255 = |x: u32| ((x >> 8) + x) >> 8;
    rgb.map(|c| {
        let t = u32::from(c) * coef1 + 255 * coef2;
        (shift_div_255(t + (0x80 << PREC)) >> PREC) as u8
    })
}

/// Colour key of a grayscale PNG's `tRNS`, as PIL applies it to the converted 8-bit value:
/// the key's low byte, except 1-bit images (mode "1"), whose key becomes 0 or 255.
fn gray_key(png: Option<&PngHeader>) -> Option<u8> {
    let hdr = png.filter(|h| h.color_type == 0)?;
    let t = hdr.trns.as_ref().filter(|t| t.len() >= 2)?;
    let key = u16::from_be_bytes([t[0], t[1]]);
    Some(if hdr.bit_depth == 1 {
        if key != 0 {
            255
        } else {
            0
        }
    } else {
        (key & 0xFF) as u8
    })
}

fn to_rgb(img: ::image::DynamicImage, png: Option<&PngHeader>) -> Result<RgbImage> {
    use ::image::DynamicImage as D;
    let (width, height) = (img.width() as usize, img.height() as usize);
    // Colour type 0 is grayscale (any alpha the decoder made comes from a tRNS key, which
    // is re-derived PIL's way); colour type 2 is RGB (a tRNS key is ignored).
    let gray_source = png.is_none_or(|h| h.color_type == 0);
    let rgb_source = png.is_some_and(|h| h.color_type == 2);
    let key = gray_key(png);
    let gray = |g: u8| match key {
        Some(k) if g == k => [255; 3],
        _ => [g; 3],
    };
    let hi = |v: u16| (v >> 8) as u8;

    let mut data = Vec::new();
    data.try_reserve_exact(width * height * 3)
        .map_err(|_| img_err(format!("cannot allocate a {width}x{height} RGB image")))?;
    let mut push = |px: [u8; 3]| data.extend_from_slice(&px);
    match img {
        D::ImageLuma8(b) => b.as_raw().iter().for_each(|&g| push(gray(g))),
        D::ImageLumaA8(b) if gray_source => {
            b.as_raw().chunks_exact(2).for_each(|p| push(gray(p[0])))
        }
        D::ImageLumaA8(b) => b
            .as_raw()
            .chunks_exact(2)
            .for_each(|p| push(over_white([p[0]; 3], p[1]))),
        // PIL opens 16-bit grayscale as I;16 and clips it to 255 when converting.
        D::ImageLuma16(b) => b
            .as_raw()
            .iter()
            .for_each(|&g| push(gray(g.min(255) as u8))),
        D::ImageLumaA16(b) if gray_source => b
            .as_raw()
            .chunks_exact(2)
            .for_each(|p| push(gray(p[0].min(255) as u8))),
        D::ImageLumaA16(b) => b
            .as_raw()
            .chunks_exact(2)
            .for_each(|p| push(over_white([hi(p[0]); 3], hi(p[1])))),
        D::ImageRgb8(b) => data.extend_from_slice(b.as_raw()),
        D::ImageRgb16(b) => b
            .as_raw()
            .chunks_exact(3)
            .for_each(|p| push([hi(p[0]), hi(p[1]), hi(p[2])])),
        D::ImageRgba8(b) if rgb_source => b
            .as_raw()
            .chunks_exact(4)
            .for_each(|p| push([p[0], p[1], p[2]])),
        D::ImageRgba8(b) => b
            .as_raw()
            .chunks_exact(4)
            .for_each(|p| push(over_white([p[0], p[1], p[2]], p[3]))),
        D::ImageRgba16(b) if rgb_source => b
            .as_raw()
            .chunks_exact(4)
            .for_each(|p| push([hi(p[0]), hi(p[1]), hi(p[2])])),
        D::ImageRgba16(b) => b
            .as_raw()
            .chunks_exact(4)
            .for_each(|p| push(over_white([hi(p[0]), hi(p[1]), hi(p[2])], hi(p[3])))),
        other => {
            return Err(img_err(format!(
                "unsupported decoded pixel format {:?}",
                other.color()
            )));
        }
    }
    RgbImage::from_packed(width, height, data)
}
