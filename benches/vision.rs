//! Preprocessing + vision tower for one 448×448 image (`cargo bench -p dvl --bench vision`):
//! on the shipped tiny checkpoint, and on a random-weight Qwen2.5-VL tower of the real shape
//! (depth 32, width 1280, built in memory by `dvl::synth`).

use std::path::Path;

use criterion::{criterion_group, criterion_main, Criterion};
use dvl::images::{self, RgbImage};
use dvl::{CpuBackend, Model};

/// A deterministic 448×448 test picture (smooth gradients and edges, like a photo).
fn picture() -> RgbImage {
    let (w, h) = (448usize, 448usize);
    let mut data = Vec::with_capacity(w * h * 3);
    for y in 0..h {
        for x in 0..w {
            data.extend_from_slice(&[
                (x * 255 / w) as u8,
                (y * 255 / h) as u8,
                (((x / 32 + y / 32) % 2) * 200) as u8,
            ]);
        }
    }
    RgbImage::from_rgb8(w, h, w * 3, &data).unwrap()
}

fn run(c: &mut Criterion, name: &str, model: &Model<'_>, samples: usize) {
    let be = CpuBackend::with_threads(0).unwrap();
    let img = picture();
    let cfg = &model.config;
    let mut g = c.benchmark_group(name);
    g.sample_size(samples);
    g.bench_function("preprocess_448", |b| {
        b.iter(|| {
            images::preprocess_qwen2vl(&img, &cfg.vision, cfg.min_pixels, cfg.max_pixels).unwrap()
        })
    });
    g.bench_function("preprocess_and_vision_448", |b| {
        b.iter(|| {
            let p = images::preprocess_qwen2vl(&img, &cfg.vision, cfg.min_pixels, cfg.max_pixels)
                .unwrap();
            model
                .encode_images(&be, &p.pixel_values, &[p.grid])
                .unwrap()
        })
    });
    g.finish();
}

fn tiny(c: &mut Criterion) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../models/tiny-dvl");
    let engine = dvl::Engine::open(&dir).unwrap();
    run(c, "vision_tiny", &engine.model, 20);
}

fn real_shape(c: &mut Criterion) {
    // The real tower (depth 32, width 1280, merger 5120) in front of a tiny text model.
    let shape = dvl::synth::Shape {
        name: "vision-real",
        ..dvl::synth::shape("0.5b").unwrap()
    };
    let shape = dvl::synth::Shape {
        hidden: 64,
        layers: 1,
        heads: 4,
        kv_heads: 2,
        intermediate: 64,
        ..shape
    };
    let (config, weights) = dvl::synth::in_memory(&shape, 1);
    let model = dvl::load_from_bytes(&config, &[&weights]).unwrap();
    run(c, "vision_real_shape", &model, 10);
}

criterion_group!(benches, tiny, real_shape);
criterion_main!(benches);
