//! Tests of `dvl::images` against the spec tables, Pillow's outputs and the tiny-dvl
//! fixtures (`shared/fixtures`; skipped with a note when absent).

use alloc::vec::Vec;

use super::*;

/// The `smart_resize` worked examples of spec §4.1 (input W×H → resized W′×H′).
#[test]
fn smart_resize_spec_table() {
    let table = [
        ((640, 480), (588, 420)),
        ((1024, 768), (588, 420)),
        ((1000, 1000), (504, 504)),
        ((200, 200), (392, 392)),
        ((500, 375), (504, 364)),
        ((2048, 1365), (616, 392)),
    ];
    for ((w, h), (rw, rh)) in table {
        let got = smart_resize(h, w, 28, DEFAULT_MIN_PIXELS, DEFAULT_MAX_PIXELS).unwrap();
        assert_eq!(got, (rh, rw), "{w}x{h}");
        // Grid / token counts of the same table.
        assert_eq!((rh / 14) % 2, 0);
        assert_eq!((rw / 14) % 2, 0);
    }
}

#[test]
fn smart_resize_rounds_half_to_even() {
    // 70/28 = 2.5 → 2 (half-up would give 3 → 84); 98/28 = 3.5 → 4; 42/28 = 1.5 → 2.
    let (min, max) = (56 * 56, 14 * 14 * 4 * 1280);
    assert_eq!(smart_resize(70, 98, 28, min, max).unwrap(), (56, 112));
    assert_eq!(smart_resize(42, 70, 28, min, max).unwrap(), (56, 56));
    // Ties only come from exact halves; 71/28 = 2.54 rounds up.
    assert_eq!(smart_resize(71, 71, 28, min, max).unwrap(), (84, 84));
}

#[test]
fn smart_resize_errors() {
    let e = smart_resize(20, 20, 28, DEFAULT_MIN_PIXELS, DEFAULT_MAX_PIXELS).unwrap_err();
    assert!(
        matches!(&e, Error::Image(m) if m.contains("too small")),
        "{e}"
    );
    let e = smart_resize(28, 5657, 28, DEFAULT_MIN_PIXELS, DEFAULT_MAX_PIXELS).unwrap_err();
    assert!(
        matches!(&e, Error::Image(m) if m.contains("aspect ratio")),
        "{e}"
    );
    // Exactly 200 is still accepted (the check is strict `> 200`).
    assert!(smart_resize(28, 5600, 28, DEFAULT_MIN_PIXELS, DEFAULT_MAX_PIXELS).is_ok());
    assert!(smart_resize(1, 201, 28, DEFAULT_MIN_PIXELS, DEFAULT_MAX_PIXELS).is_err());
    assert!(smart_resize(0, 100, 28, DEFAULT_MIN_PIXELS, DEFAULT_MAX_PIXELS).is_err());
    assert!(matches!(
        smart_resize(100, 100, 0, 1, 2),
        Err(Error::InvalidArgument(_))
    ));
    // A degenerate max_pixels never produces a zero side.
    assert_eq!(smart_resize(100, 100, 28, 0, 1).unwrap(), (28, 28));
}

/// Deterministic test pattern with high-frequency content (exercises clipping); the same
/// formula generated the Pillow reference hashes below.
fn pattern(w: usize, h: usize) -> RgbImage {
    let mut data = Vec::with_capacity(w * h * 3);
    for y in 0..h {
        for x in 0..w {
            for c in 0..3 {
                data.push(((x * 31 + y * 17 + c * 89 + ((x * y) % 13) * 7) % 256) as u8);
            }
        }
    }
    RgbImage {
        width: w,
        height: h,
        data,
    }
}

fn fnv1a64(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// FNV-1a-64 of `Image.fromarray(pattern(w, h)).resize((ow, oh), Image.BICUBIC).tobytes()`
/// under Pillow 12.1.1, 12.2.0 and 13.0.0 (the three pass-order rules).
const PIL_RESIZE_HASHES: [(usize, usize, usize, usize, [u64; 3]); 15] = [
    (451, 300, 476, 336, [0x141c016a70d291cd; 3]),
    (512, 600, 448, 532, [0x1e66368aecb85ae6; 3]),
    (128, 128, 392, 392, [0x3f3ace23832bf682; 3]),
    (97, 61, 13, 200, [0x73b229bc7d474a60; 3]),
    (640, 480, 588, 420, [0xf6e75234af4190ad; 3]),
    (
        3,
        400,
        2,
        50,
        [0x81baaed7f9a8e91d, 0x06dc5c7dedc2301e, 0x06dc5c7dedc2301e],
    ),
    (
        3,
        301,
        5,
        300,
        [0xa3e107885befaa53, 0x41c5ef739e80759d, 0x41c5ef739e80759d],
    ),
    (
        7,
        800,
        4,
        333,
        [0x3f45d515610b3f78, 0x48cf72dee21ecd31, 0x48cf72dee21ecd31],
    ),
    (
        300,
        1000,
        280,
        924,
        [0x81fa4dcd7c14bae0, 0x81fa4dcd7c14bae0, 0x060dc5c189a787b5],
    ),
    (301, 3, 2, 3, [0x5bcb48041354a29a; 3]),
    (50, 40, 50, 90, [0x1172be1ccbe0dd4b; 3]),
    (50, 40, 120, 40, [0x2197d2e7dba2612c; 3]),
    (1000, 10, 7, 3, [0xa9bd55cdfbd7202c; 3]),
    (
        2,
        301,
        3,
        150,
        [0xc1eff032c4e01e22, 0x65d27c55eed7694b, 0x65d27c55eed7694b],
    ),
    (
        60,
        90,
        70,
        20,
        [0x6e3287d4fbf4e7cb, 0x6e3287d4fbf4e7cb, 0x6a882b1a303608c8],
    ),
];

#[test]
fn resize_matches_pillow_bytes() {
    let orders = [
        PassOrder::HorizontalFirst,
        PassOrder::Pillow12_2,
        PassOrder::Pillow13,
    ];
    for (w, h, ow, oh, hashes) in PIL_RESIZE_HASHES {
        let img = pattern(w, h);
        for (order, want) in orders.iter().zip(hashes) {
            let out = resize_bicubic_with(&img, ow, oh, *order);
            assert_eq!((out.width, out.height), (ow, oh));
            assert_eq!(
                fnv1a64(&out.data),
                want,
                "{w}x{h} -> {ow}x{oh} with {order:?}"
            );
        }
        assert_eq!(
            resize_bicubic(&img, ow, oh).data,
            resize_bicubic_with(&img, ow, oh, PassOrder::HorizontalFirst).data
        );
    }
}

#[test]
fn resize_degenerate_sizes() {
    let img = pattern(5, 4);
    assert_eq!(resize_bicubic(&img, 5, 4), img);
    assert_eq!(resize_bicubic(&img, 0, 4).data.len(), 0);
    let one = resize_bicubic(&img, 1, 1);
    assert_eq!((one.width, one.height, one.data.len()), (1, 1, 3));
}

#[test]
fn from_rgb8_validates_and_repacks() {
    // 2x2 image with 2 bytes of padding per row; the last row may omit its padding.
    let buf = [1, 2, 3, 4, 5, 6, 0, 0, 7, 8, 9, 10, 11, 12];
    let img = RgbImage::from_rgb8(2, 2, 8, &buf).unwrap();
    assert_eq!(img.data, [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12]);
    assert!(matches!(
        RgbImage::from_rgb8(2, 2, 5, &buf),
        Err(Error::InvalidArgument(_))
    ));
    assert!(matches!(
        RgbImage::from_rgb8(2, 3, 8, &buf),
        Err(Error::InvalidArgument(_))
    ));
    assert!(matches!(
        RgbImage::from_rgb8(0, 2, 8, &buf),
        Err(Error::InvalidArgument(_))
    ));
    assert!(RgbImage::from_rgb8(usize::MAX, 2, usize::MAX, &buf).is_err());
    assert!(RgbImage::from_rgb8(2, usize::MAX, 8, &buf).is_err());
    assert!(RgbImage::from_packed(2, 2, alloc::vec![0; 11]).is_err());
}

fn vision_cfg() -> QwenVisionConfig {
    QwenVisionConfig {
        depth: 1,
        hidden_size: 64,
        intermediate_size: 96,
        num_heads: 2,
        patch_size: 14,
        temporal_patch_size: 2,
        spatial_merge_size: 2,
        window_size: 112,
        fullatt_block_indexes: Vec::new(),
        out_hidden_size: 64,
        in_chans: 3,
    }
}

#[test]
fn preprocess_rejects_bad_images() {
    let cfg = vision_cfg();
    let small = RgbImage {
        width: 20,
        height: 20,
        data: alloc::vec![0; 20 * 20 * 3],
    };
    let e = preprocess_qwen2vl(&small, &cfg, DEFAULT_MIN_PIXELS, DEFAULT_MAX_PIXELS).unwrap_err();
    assert!(
        matches!(&e, Error::Image(m) if m.contains("too small")),
        "{e}"
    );
    let line = RgbImage {
        width: 201,
        height: 1,
        data: alloc::vec![0; 201 * 3],
    };
    assert!(matches!(
        preprocess_qwen2vl(&line, &cfg, DEFAULT_MIN_PIXELS, DEFAULT_MAX_PIXELS),
        Err(Error::Image(_))
    ));
    let wide = RgbImage {
        width: 5657,
        height: 28,
        data: alloc::vec![0; 5657 * 28 * 3],
    };
    let e = preprocess_qwen2vl(&wide, &cfg, DEFAULT_MIN_PIXELS, DEFAULT_MAX_PIXELS).unwrap_err();
    assert!(
        matches!(&e, Error::Image(m) if m.contains("aspect ratio")),
        "{e}"
    );
    let broken = RgbImage {
        width: 30,
        height: 30,
        data: alloc::vec![0; 10],
    };
    assert!(matches!(
        preprocess_qwen2vl(&broken, &cfg, DEFAULT_MIN_PIXELS, DEFAULT_MAX_PIXELS),
        Err(Error::InvalidArgument(_))
    ));
    let mut gray = cfg.clone();
    gray.in_chans = 1;
    assert!(matches!(
        preprocess_qwen2vl(
            &pattern(56, 56),
            &gray,
            DEFAULT_MIN_PIXELS,
            DEFAULT_MAX_PIXELS
        ),
        Err(Error::InvalidArgument(_))
    ));
}

#[test]
fn preprocess_layout() {
    // 56x84 stays 56x84 with a tiny pixel range: grid 4x6, one merge block = rows 0..4.
    let img = pattern(56, 84);
    let cfg = vision_cfg();
    let pre = preprocess_qwen2vl(&img, &cfg, 1, 1 << 20).unwrap();
    assert_eq!((pre.resized_width, pre.resized_height), (56, 84));
    assert_eq!(pre.grid, Grid { t: 1, h: 6, w: 4 });
    assert_eq!(pre.pixel_values.len(), 24 * 1176);
    let table = normalisation_table();
    let value = |x: usize, y: usize, c: usize| table[c][img.data[(y * 56 + x) * 3 + c] as usize];
    // Row index of patch (py, px) in the grid: merge block (py/2, px/2), then (py%2, px%2).
    let row_of = |py: usize, px: usize| ((py / 2) * 2 + px / 2) * 4 + (py % 2) * 2 + px % 2;
    for (py, px) in [(0, 0), (0, 1), (1, 0), (1, 1), (3, 2), (5, 3)] {
        let row = &pre.pixel_values[row_of(py, px) * 1176..][..1176];
        for c in 0..3 {
            for t in 0..2 {
                for iy in 0..14 {
                    for ix in 0..14 {
                        let col = ((c * 2 + t) * 14 + iy) * 14 + ix;
                        assert_eq!(
                            row[col],
                            value(px * 14 + ix, py * 14 + iy, c),
                            "patch ({py},{px}) col {col}"
                        );
                    }
                }
            }
        }
    }
}

#[test]
fn normalisation_matches_numpy_values() {
    // numpy: ((np.float64(v) * (1/255)).astype(np.float32) - np.float32(mean)) / np.float32(std)
    let t = normalisation_table();
    assert_eq!(t[0][0], -1.792_262_6_f32);
    assert_eq!(t[2][255], 2.145_897_f32);
    assert_eq!(t[1][128], 0.168_897_32_f32);
}

#[cfg(feature = "std")]
mod with_std {
    use super::*;
    use std::path::PathBuf;
    use std::string::String;

    fn fixtures() -> Option<PathBuf> {
        let dir = PathBuf::from(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../shared/fixtures"
        ));
        if dir.is_dir() {
            Some(dir)
        } else {
            std::println!("note: {} not found; skipping fixture test", dir.display());
            None
        }
    }

    /// The fixture images, their pixel files, and the largest per-byte difference of the
    /// decoded source allowed. PNG decoding is lossless and matches PIL exactly; JPEG goes
    /// through libjpeg-turbo's code here as in PIL (see `JPEG_MAX_DIFF`).
    const IMAGES: [(&str, &str); 3] = [
        ("chelsea.png", "chelsea"),
        ("grace_hopper.jpg", "grace_hopper"),
        ("Minduka_Present_Blue_Pack.png", "Minduka_Present_Blue_Pack"),
    ];

    struct PixelFixture {
        pixel_values: Vec<f32>,
        rows: usize,
        grid: [i64; 3],
        resized: RgbImage,
    }

    fn read_pixels(dir: &std::path::Path, name: &str) -> PixelFixture {
        let path = dir.join(format!("tiny-dvl/pixels/{name}.safetensors"));
        let bytes = std::fs::read(&path).unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        let pv = st.tensor("pixel_values").unwrap();
        assert_eq!(pv.shape()[1], 1176);
        let pixel_values = pv
            .data()
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
        let g = st.tensor("image_grid_thw").unwrap();
        let gv: Vec<i64> = g
            .data()
            .chunks_exact(8)
            .map(|b| i64::from_le_bytes(b.try_into().unwrap()))
            .collect();
        let rgb = st.tensor("resized_rgb").unwrap();
        let (h, w) = (rgb.shape()[0], rgb.shape()[1]);
        PixelFixture {
            pixel_values,
            rows: pv.shape()[0],
            grid: [gv[0], gv[1], gv[2]],
            resized: RgbImage {
                width: w,
                height: h,
                data: rgb.data().to_vec(),
            },
        }
    }

    fn max_byte_diff(a: &[u8], b: &[u8]) -> u8 {
        assert_eq!(a.len(), b.len());
        a.iter()
            .zip(b)
            .map(|(x, y)| x.abs_diff(*y))
            .max()
            .unwrap_or(0)
    }

    fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
        assert_eq!(a.len(), b.len());
        a.iter()
            .zip(b)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0, f32::max)
    }

    /// JPEG decoding uses libjpeg-turbo's code (the `mozjpeg` crate), as PIL does, so it is
    /// bit-identical; zune-jpeg (the `image` crate's) differed by up to 4 levels.
    const JPEG_MAX_DIFF: u8 = 0; // exact

    #[test]
    fn fixture_resize_matches_pil() {
        let Some(dir) = fixtures() else { return };
        for (file, name) in IMAGES {
            let src = load(&dir.join("images").join(file), &DecodeLimits::default()).unwrap();
            let fx = read_pixels(&dir, name);
            let out = resize_bicubic(&src, fx.resized.width, fx.resized.height);
            let diff = max_byte_diff(&out.data, &fx.resized.data);
            let differing = out
                .data
                .iter()
                .zip(&fx.resized.data)
                .filter(|(a, b)| a != b)
                .count();
            std::println!(
                "{file}: resized_rgb max |diff| = {diff} ({differing} of {} bytes differ)",
                out.data.len()
            );
            // PNG and JPEG decode exactly as PIL does, so the resize is byte-exact too.
            assert_eq!(diff, JPEG_MAX_DIFF, "{file}: resize must be byte-exact");
        }
    }

    #[test]
    fn fixture_preprocess_from_resized_rgb_is_exact() {
        // The fixtures' resized sizes are fixed points of smart_resize, so preprocessing the
        // stored `resized_rgb` checks rescale/normalise/patchify independently of decoding.
        let Some(dir) = fixtures() else { return };
        let cfg = vision_cfg();
        for (_, name) in IMAGES {
            let fx = read_pixels(&dir, name);
            let pre = preprocess_qwen2vl(&fx.resized, &cfg, DEFAULT_MIN_PIXELS, DEFAULT_MAX_PIXELS)
                .unwrap();
            assert_eq!(
                [pre.grid.t as i64, pre.grid.h as i64, pre.grid.w as i64],
                fx.grid,
                "{name}"
            );
            assert_eq!(pre.grid.patches(), fx.rows);
            let diff = max_abs_diff(&pre.pixel_values, &fx.pixel_values);
            std::println!("{name}: pixel_values from resized_rgb max |diff| = {diff:e}");
            assert!(diff <= 1e-5, "{name}: {diff}");
        }
    }

    #[test]
    fn fixture_preprocess_end_to_end() {
        let Some(dir) = fixtures() else { return };
        let cfg = vision_cfg();
        for (file, name) in IMAGES {
            let src = load(&dir.join("images").join(file), &DecodeLimits::default()).unwrap();
            let fx = read_pixels(&dir, name);
            let pre =
                preprocess_qwen2vl(&src, &cfg, DEFAULT_MIN_PIXELS, DEFAULT_MAX_PIXELS).unwrap();
            assert_eq!(
                [pre.grid.t as i64, pre.grid.h as i64, pre.grid.w as i64],
                fx.grid,
                "{file}"
            );
            assert_eq!(
                (pre.resized_width, pre.resized_height),
                (fx.resized.width, fx.resized.height)
            );
            let diff = max_abs_diff(&pre.pixel_values, &fx.pixel_values);
            std::println!("{file}: pixel_values end to end max |diff| = {diff:e}");
            if file.ends_with(".png") {
                assert!(diff <= 1e-5, "{file}: {diff}");
            } else {
                // One uint8 level is 1/255/std ≈ 0.0152 after normalisation.
                assert!(
                    diff <= f32::from(JPEG_MAX_DIFF) / 255.0 / 0.26 + 1e-5,
                    "{file}: {diff}"
                );
            }
        }
    }

    #[test]
    fn fixture_golden_sizes() {
        let Some(dir) = fixtures() else { return };
        let golden = dir.join("tiny-dvl/a/golden");
        let mut checked = 0;
        for entry in std::fs::read_dir(&golden).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().and_then(|e| e.to_str()) != Some("json") {
                continue;
            }
            let v: serde_json::Value =
                serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
            for im in v["images"].as_array().unwrap() {
                let file = im["file"].as_str().unwrap();
                let wh = |k: &str| {
                    (
                        im[k][0].as_u64().unwrap() as usize,
                        im[k][1].as_u64().unwrap() as usize,
                    )
                };
                let (ow, oh) = wh("original_size_wh");
                let (rw, rh) = wh("resized_size_wh");
                let src = load(&dir.join("images").join(file), &DecodeLimits::default()).unwrap();
                assert_eq!((src.width, src.height), (ow, oh), "{file}");
                assert_eq!(
                    smart_resize(oh, ow, 28, DEFAULT_MIN_PIXELS, DEFAULT_MAX_PIXELS).unwrap(),
                    (rh, rw)
                );
                let g: Vec<u64> = im["grid_thw"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|x| x.as_u64().unwrap())
                    .collect();
                assert_eq!(g, [1, (rh / 14) as u64, (rw / 14) as u64]);
                checked += 1;
            }
        }
        assert!(checked > 0);
    }

    // ---- PNG / JPEG construction helpers -------------------------------------------------

    fn crc32(data: &[u8]) -> u32 {
        let mut crc = !0u32;
        for &b in data {
            crc ^= u32::from(b);
            for _ in 0..8 {
                crc = if crc & 1 != 0 {
                    (crc >> 1) ^ 0xEDB8_8320
                } else {
                    crc >> 1
                };
            }
        }
        !crc
    }

    fn chunk(out: &mut Vec<u8>, kind: &[u8; 4], data: &[u8]) {
        out.extend_from_slice(&(data.len() as u32).to_be_bytes());
        let start = out.len();
        out.extend_from_slice(kind);
        out.extend_from_slice(data);
        let crc = crc32(&out[start..]);
        out.extend_from_slice(&crc.to_be_bytes());
    }

    /// zlib stream made of stored (uncompressed) deflate blocks.
    fn zlib_stored(raw: &[u8]) -> Vec<u8> {
        let mut z = alloc::vec![0x78, 0x01];
        let blocks: Vec<&[u8]> = if raw.is_empty() {
            alloc::vec![raw]
        } else {
            raw.chunks(65_535).collect()
        };
        for (i, b) in blocks.iter().enumerate() {
            z.push(u8::from(i + 1 == blocks.len()));
            z.extend_from_slice(&(b.len() as u16).to_le_bytes());
            z.extend_from_slice(&(!(b.len() as u16)).to_le_bytes());
            z.extend_from_slice(b);
        }
        let (mut a, mut s) = (1u32, 0u32);
        for &x in raw {
            a = (a + u32::from(x)) % 65_521;
            s = (s + a) % 65_521;
        }
        z.extend_from_slice(&((s << 16) | a).to_be_bytes());
        z
    }

    /// A PNG with any colour type / bit depth; `sample(i)` gives the i-th sample in raster
    /// order (channels interleaved).
    fn make_png(
        w: u32,
        h: u32,
        bits: u8,
        ct: u8,
        plte: Option<&[u8]>,
        trns: Option<&[u8]>,
        sample: impl Fn(usize) -> u16,
    ) -> Vec<u8> {
        let ch = match ct {
            0 | 3 => 1,
            2 => 3,
            4 => 2,
            _ => 4,
        };
        let mut raw = Vec::new();
        let mut i = 0;
        for _ in 0..h {
            raw.push(0); // filter: none
            let mut row: Vec<u16> = Vec::new();
            for _ in 0..w * ch {
                row.push(sample(i));
                i += 1;
            }
            match bits {
                16 => row
                    .iter()
                    .for_each(|v| raw.extend_from_slice(&v.to_be_bytes())),
                8 => row.iter().for_each(|&v| raw.push(v as u8)),
                _ => {
                    let per = 8 / bits as usize;
                    let mut packed = alloc::vec![0u8; row.len().div_ceil(per)];
                    for (k, &v) in row.iter().enumerate() {
                        packed[k / per] |= (v as u8) << (8 - bits as usize * (k % per + 1));
                    }
                    raw.extend_from_slice(&packed);
                }
            }
        }
        let mut png = crate::images::decode::PNG_SIGNATURE.to_vec();
        let mut ihdr = Vec::new();
        ihdr.extend_from_slice(&w.to_be_bytes());
        ihdr.extend_from_slice(&h.to_be_bytes());
        ihdr.extend_from_slice(&[bits, ct, 0, 0, 0]);
        chunk(&mut png, b"IHDR", &ihdr);
        if let Some(p) = plte {
            chunk(&mut png, b"PLTE", p);
        }
        if let Some(t) = trns {
            chunk(&mut png, b"tRNS", t);
        }
        chunk(&mut png, b"IDAT", &zlib_stored(&raw));
        chunk(&mut png, b"IEND", &[]);
        png
    }

    /// Rewrites the IHDR size of a PNG and fixes the chunk CRC.
    fn patch_png_size(png: &mut [u8], w: u32, h: u32) {
        png[16..20].copy_from_slice(&w.to_be_bytes());
        png[20..24].copy_from_slice(&h.to_be_bytes());
        let crc = crc32(&png[12..29]);
        png[29..33].copy_from_slice(&crc.to_be_bytes());
    }

    fn hex(bytes: &[u8]) -> String {
        bytes.iter().map(|b| format!("{b:02x}")).collect()
    }

    const T8: [u16; 16] = [
        0, 1, 17, 85, 127, 128, 170, 200, 254, 255, 3, 64, 99, 250, 33, 77,
    ];
    const T16: [u16; 16] = [
        0, 1, 127, 255, 256, 257, 511, 4660, 32768, 65280, 65535, 300, 128, 254, 65534, 200,
    ];
    const PAL: [u8; 12] = [10, 20, 30, 200, 100, 50, 0, 255, 128, 250, 250, 5];

    /// `convert_to_rgb(Image.open(png))` bytes from PIL (identical under Pillow 12.1.1 and
    /// 13.0.0) for 5x3 PNGs of every colour type / bit depth, with and without tRNS.
    /// Columns: name, bit depth, colour type, palette entries, tRNS, expected RGB (hex).
    #[allow(clippy::type_complexity)]
    const PIL_CONVERT: [(&str, u8, u8, usize, &[u8], &str); 25] = [
        ("g1", 1, 0, 0, &[], "ffffff000000ffffff000000ffffff000000ffffff000000ffffff000000ffffff000000ffffff000000ffffff"),
        ("g1t1", 1, 0, 0, &[0, 1], "ffffff000000ffffff000000ffffff000000ffffff000000ffffff000000ffffff000000ffffff000000ffffff"),
        ("g1t0", 1, 0, 0, &[0, 0], "ffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff"),
        ("g2t2", 2, 0, 0, &[0, 2], "ffffff000000555555aaaaaaffffff000000555555aaaaaaffffff000000555555aaaaaaffffff000000555555"),
        ("g2t0", 2, 0, 0, &[0, 0], "ffffffffffff555555aaaaaaffffffffffff555555aaaaaaffffffffffff555555aaaaaaffffffffffff555555"),
        ("g4t0", 4, 0, 0, &[0, 0], "333333888888dddddd222222777777cccccc111111666666bbbbbbffffff555555aaaaaaffffff444444999999"),
        ("g4t5", 4, 0, 0, &[0, 5], "333333888888dddddd222222777777cccccc111111666666bbbbbb000000555555aaaaaaffffff444444999999"),
        ("g8", 8, 0, 0, &[], "0000000101011111115555557f7f7f808080aaaaaac8c8c8fefefeffffff030303404040636363fafafa212121"),
        ("g8t128", 8, 0, 0, &[0, 128], "0000000101011111115555557f7f7fffffffaaaaaac8c8c8fefefeffffff030303404040636363fafafa212121"),
        ("g16", 16, 0, 0, &[], "0000000101017f7f7fffffffffffffffffffffffffffffffffffffffffffffffffffffff808080fefefeffffff"),
        ("g16t255", 16, 0, 0, &[0, 255], "0000000101017f7f7fffffffffffffffffffffffffffffffffffffffffffffffffffffff808080fefefeffffff"),
        ("g16t256", 16, 0, 0, &[1, 0], "ffffff0101017f7f7fffffffffffffffffffffffffffffffffffffffffffffffffffffff808080fefefeffffff"),
        ("g16t300", 16, 0, 0, &[1, 44], "0000000101017f7f7fffffffffffffffffffffffffffffffffffffffffffffffffffffff808080fefefeffffff"),
        ("rgb8t", 8, 2, 0, &[0, 0, 0, 1, 0, 17], "000111557f80aac8feff034063fa214d000111557f80aac8feff034063fa214d000111557f80aac8feff034063"),
        ("rgb16", 16, 2, 0, &[], "000000000101011280ffff010000ff00000000000101011280ffff010000ff00000000000101011280ffff0100"),
        ("rgb16t", 16, 2, 0, &[0, 0, 0, 1, 0, 127], "000000000101011280ffff010000ff00000000000101011280ffff010000ff00000000000101011280ffff0100"),
        ("p8", 8, 3, 4, &[], "0a141ec8643200ff80fafa050a141ec8643200ff80fafa050a141ec8643200ff80fafa050a141ec8643200ff80"),
        ("p8t", 8, 3, 4, &[0, 128], "ffffffe3b19800ff80fafa05ffffffe3b19800ff80fafa05ffffffe3b19800ff80fafa05ffffffe3b19800ff80"),
        ("p8simple", 8, 3, 4, &[255, 0], "0a141effffff00ff80fafa050a141effffff00ff80fafa050a141effffff00ff80fafa050a141effffff00ff80"),
        ("p2t", 2, 3, 4, &[255, 255, 7], "0a141ec86432f8fffcfafa050a141ec86432f8fffcfafa050a141ec86432f8fffcfafa050a141ec86432f8fffc"),
        ("p1", 1, 3, 2, &[], "0a141ec864320a141ec864320a141ec864320a141ec864320a141ec864320a141ec864320a141ec864320a141e"),
        ("la8", 8, 4, 0, &[], "fefefeb0b0b0bfbfbfbcbcbcfefefec0c0c0666666bcbcbcfefefeb0b0b0bfbfbfbcbcbcfefefec0c0c0666666"),
        ("la16", 16, 4, 0, &[], "fffffffffffffefefeededed808080fffffffffffffffffffffffffffffffefefeededed808080ffffffffffff"),
        ("rgba8", 8, 6, 0, &[], "aaaab09b9bbcffffc0d0fdbcaaaab09b9bbcffffc0d0fdbcaaaab09b9bbcffffc0d0fdbcaaaab09b9bbcffffc0"),
        ("rgba16", 16, 6, 0, &[], "ffffffedededffffffffffffffffffedededffffffffffffffffffedededffffffffffffffffffedededffffff"),
    ];

    #[test]
    fn decode_matches_pil_convert_to_rgb() {
        for (name, bits, ct, npal, trns, want) in PIL_CONVERT {
            let sample = |i: usize| -> u16 {
                if ct == 3 {
                    (i % npal) as u16
                } else if bits == 16 {
                    T16[i % 16]
                } else if bits == 8 {
                    T8[i % 16]
                } else {
                    ((i * 5 + 3) % (1 << bits)) as u16
                }
            };
            let plte = (ct == 3).then(|| &PAL[..npal * 3]);
            let trns = (!trns.is_empty()).then_some(trns);
            let png = make_png(5, 3, bits, ct, plte, trns, sample);
            let img =
                decode(&png, &DecodeLimits::default()).unwrap_or_else(|e| panic!("{name}: {e}"));
            assert_eq!((img.width, img.height), (5, 3), "{name}");
            assert_eq!(hex(&img.data), want, "{name}");
        }
        // Palette indices beyond the palette decode as black in both PIL and here.
        let png = make_png(5, 3, 8, 3, Some(&PAL[..6]), None, |i| {
            ((i / 5) * 5 + i % 5) as u16 % 4
        });
        let img = decode(&png, &DecodeLimits::default()).unwrap();
        assert_eq!(
            hex(&img.data),
            "0a141ec864320000000000000a141ec864320000000000000a141ec864320000000000000a141ec86432000000"
        );
    }

    #[test]
    fn alpha_composite_matches_pil_spot_values() {
        // Spot values of PIL alpha_composite(white, (c, c, c, a)) (the formula was checked
        // against PIL for all 65,536 (c, a) pairs when this was written).
        use crate::images::decode::over_white;
        assert_eq!(over_white([0; 3], 255), [0; 3]);
        assert_eq!(over_white([17; 3], 0), [255; 3]);
        assert_eq!(over_white([200, 100, 50], 128), [0xe3, 0xb1, 0x98]);
        for c in 0..=255u8 {
            assert_eq!(over_white([c; 3], 255), [c; 3]);
        }
    }

    fn jpeg_bytes(w: u32, h: u32) -> Vec<u8> {
        let data = pattern(w as usize, h as usize).data;
        let mut out = Vec::new();
        ::image::codecs::jpeg::JpegEncoder::new_with_quality(&mut out, 90)
            .encode(&data, w, h, ::image::ExtendedColorType::Rgb8)
            .unwrap();
        out
    }

    fn image_err(r: Result<RgbImage>) -> String {
        match r {
            Err(Error::Image(m)) => m,
            other => panic!("expected Error::Image, got {other:?}"),
        }
    }

    #[test]
    fn bad_inputs_give_clear_errors() {
        let lim = DecodeLimits::default();
        let m = image_err(decode(&[], &lim));
        assert!(m.contains("empty"), "{m}");
        let m = image_err(decode(b"GIF89a not supported", &lim));
        assert!(m.contains("JPEG and PNG"), "{m}");

        // Truncated JPEG: the full file decodes, its first half is refused.
        let jpg = jpeg_bytes(64, 48);
        let ok = decode(&jpg, &lim).unwrap();
        assert_eq!((ok.width, ok.height), (64, 48));
        let m = image_err(decode(&jpg[..jpg.len() / 2], &lim));
        assert!(m.contains("truncated"), "{m}");
        let m = image_err(decode(&jpg[..3], &lim));
        assert!(m.contains("truncated"), "{m}");

        // A JPEG whose frame header declares 65000x65000.
        let mut big = jpg.clone();
        let sof = big.windows(2).position(|w| w == [0xFF, 0xC0]).unwrap();
        big[sof + 5..sof + 7].copy_from_slice(&65000u16.to_be_bytes());
        big[sof + 7..sof + 9].copy_from_slice(&65000u16.to_be_bytes());
        let m = image_err(decode(&big, &lim));
        assert!(m.contains("65000x65000") && m.contains("limit"), "{m}");

        // PNGs whose IHDR declares absurd sizes (CRC fixed so only the size is wrong).
        let png = make_png(4, 4, 8, 2, None, None, |i| (i % 256) as u16);
        for (w, h) in [(100_000, 100_000), (30_000, 30_000), (u32::MAX >> 1, 1)] {
            let mut p = png.clone();
            patch_png_size(&mut p, w, h);
            let m = image_err(decode(&p, &lim));
            assert!(m.contains("limit"), "{w}x{h}: {m}");
            // With the pixel limit lifted, the byte limit still refuses before allocating.
            let loose = DecodeLimits {
                max_pixels: u64::MAX,
                max_bytes: 64 << 20,
            };
            let m = image_err(decode(&p, &loose));
            assert!(m.contains("limit") || m.contains("decode"), "{w}x{h}: {m}");
        }
        let mut p = png.clone();
        patch_png_size(&mut p, 0, 4);
        assert!(image_err(decode(&p, &lim)).contains("empty"));

        // Truncated and corrupt PNGs.
        let m = image_err(decode(&png[..20], &lim));
        assert!(m.contains("truncated"), "{m}");
        let m = image_err(decode(&png[..png.len() - 20], &lim));
        assert!(m.contains("PNG"), "{m}");
        let mut bad = png.clone();
        let last = bad.len() - 20;
        bad[last] ^= 0xFF;
        let _ = image_err(decode(&bad, &lim));

        // Decodable but unusable: too small, aspect ratio over 200.
        let cfg = vision_cfg();
        let tiny = decode(&make_png(20, 20, 8, 2, None, None, |_| 7), &lim).unwrap();
        let e =
            preprocess_qwen2vl(&tiny, &cfg, DEFAULT_MIN_PIXELS, DEFAULT_MAX_PIXELS).unwrap_err();
        assert!(
            matches!(&e, Error::Image(m) if m.contains("too small")),
            "{e}"
        );
        let line = decode(&make_png(201, 1, 8, 0, None, None, |_| 7), &lim).unwrap();
        assert!(preprocess_qwen2vl(&line, &cfg, DEFAULT_MIN_PIXELS, DEFAULT_MAX_PIXELS).is_err());
        let wide = decode(
            &make_png(5657, 28, 8, 0, None, None, |i| (i % 251) as u16),
            &lim,
        )
        .unwrap();
        let e =
            preprocess_qwen2vl(&wide, &cfg, DEFAULT_MIN_PIXELS, DEFAULT_MAX_PIXELS).unwrap_err();
        assert!(
            matches!(&e, Error::Image(m) if m.contains("aspect ratio")),
            "{e}"
        );

        // Input over the byte limit.
        let small = DecodeLimits {
            max_pixels: 1 << 20,
            max_bytes: 100,
        };
        assert!(image_err(decode(&jpg, &small)).contains("limit"));
    }

    #[test]
    fn load_names_the_file() {
        let lim = DecodeLimits::default();
        let dir = std::env::temp_dir().join(format!("dvl-images-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let missing = dir.join("missing.png");
        match load(&missing, &lim) {
            Err(Error::Io { path, .. }) => assert!(path.contains("missing.png")),
            other => panic!("{other:?}"),
        }
        let empty = dir.join("empty.jpg");
        std::fs::write(&empty, b"").unwrap();
        let m = image_err(load(&empty, &lim));
        assert!(m.contains("empty.jpg") && m.contains("empty"), "{m}");
        let cut = dir.join("cut.jpg");
        let jpg = jpeg_bytes(32, 32);
        std::fs::write(&cut, &jpg[..jpg.len() / 2]).unwrap();
        let m = image_err(load(&cut, &lim));
        assert!(m.contains("cut.jpg") && m.contains("truncated"), "{m}");
        assert!(matches!(load(&dir, &lim), Err(Error::Io { .. })));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// A 24x16 progressive 4:2:0 JPEG with a restart marker after every MCU (10 scans),
    /// written by PIL; its top-left pixels as PIL decodes them.
    const PROGRESSIVE_JPEG: [&str; 14] = [
        "ffd8ffe000104a46494600010100000100010000ffdb0043000302020302020303030304030304050805050404050a07",
        "0706080c0a0c0c0b0a0b0b0d0e12100d0e110e0b0b1016101113141515150c0f171816141812141514ffdb0043010304",
        "0405040509050509140d0b0d141414141414141414141414141414141414141414141414141414141414141414141414",
        "1414141414141414141414141414ffc20011080010001803012200021101031101ffc400160001010100000000000000",
        "000000000000060007ffc400160101010100000000000000000000000000050206ffdd00040001ffda000c0301000210",
        "0310000001c4133e4c715fffd0396c94efff00ffc400161000030000000000000000000000000000000405ffda000801",
        "01000105025e51ffd05e51ffd15e51ffd25e51ffd35e51ffd45e51ffc400191100020301000000000000000000000000",
        "000504213123ffda0008010301013f0154fb2cffd08cfb9e9fffc4001711000301000000000000000000000000000002",
        "0403ffda0008010201013f01ceb3ffd05acfffc4001510010100000000000000000000000000000031ffda0008010100",
        "063f028fffd08fffd18fffd28fffd38fffd48fffc4001510010100000000000000000000000000000031ffda00080101",
        "00013f2183ffd083ffd183ffd283ffd383ffd483ffda000c03010002000300000010fbffd0ff00ffc400151101010000",
        "0000000000000000000000000021ffda0008010301013f102fffd099ffc4001711010003000000000000000000000000",
        "0000213161ffda0008010201013f10d5ffd082dfffc40015100101000000000000000000000000000000f1ffda000801",
        "0100013f1088ffd088ffd188ffd288ffd388ffd488ffd9",
    ];
    const PROGRESSIVE_PIL_ROW0: [[u8; 3]; 4] = [[0, 2, 0], [4, 3, 1], [13, 4, 7], [24, 5, 11]];

    /// A 12x8 CMYK JPEG of random values written by PIL (`Image.frombytes("CMYK", ...)
    /// .save(..., quality=92)`, with the Adobe marker), and transformers'
    /// `convert_to_rgb(Image.open(...))` of it.
    const CMYK_JPEG: [&str; 18] = [
        "ffd8ffee000e41646f626500640000000000ffdb004300030202020202030202020303030304060404040404",
        "080606050609080a0a090809090a0c0f0c0a0b0e0b09090d110d0e0f101011100a0c12131210130f101010ff",
        "c00014080008000c044311004d11005911004b1100ffc4001f00000105010101010101000000000000000001",
        "02030405060708090a0bffc400b5100002010303020403050504040000017d01020300041105122131410613",
        "516107227114328191a1082342b1c11552d1f02433627282090a161718191a25262728292a3435363738393a",
        "434445464748494a535455565758595a636465666768696a737475767778797a838485868788898a92939495",
        "969798999aa2a3a4a5a6a7a8a9aab2b3b4b5b6b7b8b9bac2c3c4c5c6c7c8c9cad2d3d4d5d6d7d8d9dae1e2e3",
        "e4e5e6e7e8e9eaf1f2f3f4f5f6f7f8f9faffda000e0443004d0059004b00003f00b1aff87bc47e1ef0e788a6",
        "d37c1904fe4d85de97ad6a36779249a85ade2e749b49aef4eb3cc514138fb4dd48908ba767b9dd1a42f0bdc2",
        "6a6a5f15bc3d7fab587c51f0debba247a4d8e87696ab70f6b0a5cdb24ef15b812dd96b5d56e2091e0b88d508",
        "9267799e710a2c76770fb9e27f15fc35d03c27addc1d5ed352d26eb43f0ee9274a6f105d436fa57da257b355",
        "b3964b379625b7b7b5bb951d83288fcd6f262fb4482e732c3c29e1cd07c5ba5e85e18d5fc29717f6ba65929f",
        "b7598d3e7d22f7498614649a38a1b996d924b2b9b9b85bbb98d3cb9e196695b7245145c9fc49f177c2cd6bc4",
        "ad0ea9a0f80b53d474e88417936adaadfdc2992466b806d9ece3684c2e93a48769389649802ca158f25f123c",
        "37f165f58b4d2ec7c53f107c2e9a558a5abe9fe04bc67b31233bccf25c3dfeab14cd76ed31690ed641940b24",
        "d8f35f125f02dcc5adeb97faa788b488aef56d4e5d52796d63d22d44f3ce16498b5bdd69325c425256921026",
        "28ee90a4be5c624550584fe17d4b4db26fda1f4ff15ffc25f1dac2d249aa6896d7e24b69504f1182e3fb16f9",
        "a488098aee7b877322ca5c96259bffd9",
    ];
    const CMYK_JPEG_PIL_RGB: [&str; 7] = [
        "070b021e475a212e440705094303672326182025193e9f42aea4c147351796a00705150a0c0708d9e4a7107d",
        "05152f2587c34b010d32c4ad701e3a1d1f06295d554e5070593d158403363ca7ac8f02010260400977055072",
        "786e30325f2971204a6d490000001f310c2d0504163a334354495f586f0100010b11575b6aa81f0c17134cd3",
        "1207104c3c14cb218d6835b785271441a8d768c0a70520190005046b6057192301040b05191708140357704e",
        "011866305d8c9c0372669c208d88a4770000001616fb4e5a1c8b9698030307324c410c11088608853e071f4d",
        "0542627c64c9430e3a4b5b2728150827071036626b58257c705b01060a091113b813463a2d3b0807070e0706",
        "412835562f168500382714071b6f6a6fb3880f524c194637",
    ];

    fn unhex(parts: &[&str]) -> Vec<u8> {
        let hex: String = parts.concat();
        (0..hex.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap())
            .collect()
    }

    #[test]
    fn cmyk_jpeg_converts_as_pil_does() {
        let img = decode(&unhex(&CMYK_JPEG), &DecodeLimits::default()).unwrap();
        assert_eq!((img.width, img.height), (12, 8));
        let want = unhex(&CMYK_JPEG_PIL_RGB);
        // libjpeg's CMYK samples and PIL's conversion: byte-exact. (Without `exact-jpeg`
        // the `image` crate converts CMYK its own way.)
        #[cfg(feature = "exact-jpeg")]
        assert_eq!(hex(&img.data), hex(&want));
        #[cfg(not(feature = "exact-jpeg"))]
        assert_eq!(img.data.len(), want.len());
    }

    #[test]
    fn cmyk_to_rgb_matches_pil_spot_values() {
        // PIL `Image.frombytes("CMYK", (1, 1), c).convert("RGB")`, c given as CMYK values;
        // the function takes libjpeg's Adobe-inverted bytes (255 - c).
        use crate::images::decode::pil_cmyk_to_rgb;
        let inv = |c: [u8; 4]| c.map(|v| 255 - v);
        for (cmyk, rgb) in [
            ([0, 0, 0, 0], [255, 255, 255]),
            ([255, 255, 255, 255], [0, 0, 0]),
            ([10, 200, 128, 50], [197, 44, 102]),
            ([255, 0, 0, 0], [0, 255, 255]),
            ([0, 0, 0, 255], [0, 0, 0]),
            ([77, 77, 77, 128], [89, 89, 89]),
        ] {
            assert_eq!(pil_cmyk_to_rgb(inv(cmyk)), rgb, "{cmyk:?}");
        }
    }

    #[test]
    fn progressive_jpeg_with_restarts() {
        let hex: String = PROGRESSIVE_JPEG.concat();
        let bytes: Vec<u8> = (0..hex.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap())
            .collect();
        let lim = DecodeLimits::default();
        let img = decode(&bytes, &lim).unwrap();
        assert_eq!((img.width, img.height), (24, 16));
        for (x, want) in PROGRESSIVE_PIL_ROW0.iter().enumerate() {
            for (got, want) in img.data[x * 3..x * 3 + 3].iter().zip(want) {
                assert_eq!(
                    got.abs_diff(*want),
                    JPEG_MAX_DIFF,
                    "pixel {x}: {got} vs {want}"
                );
            }
        }
        // Cut inside the later scans (after some complete scans): still refused.
        for cut in [bytes.len() - 2, bytes.len() * 2 / 3, bytes.len() / 3] {
            let m = image_err(decode(&bytes[..cut], &lim));
            assert!(m.contains("truncated"), "cut at {cut}: {m}");
        }
        // Bytes after the end-of-image marker are ignored (as PIL does).
        let mut trailing = bytes.clone();
        trailing.extend_from_slice(b"trailing junk");
        assert_eq!(decode(&trailing, &lim).unwrap(), img);
    }
}
