//! Fixture discovery shared by the integration tests.
//!
//! Fixtures are read from `../shared/fixtures` beside the checkout when present, else from
//! the copy the repository ships (`tests/fixtures`, model `a` at `models/tiny-dvl`).
#![allow(dead_code)]

use std::path::{Path, PathBuf};

pub fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

pub fn shared() -> Option<PathBuf> {
    let p = repo().join("../shared/fixtures");
    p.join("tiny-dvl/manifest.json").exists().then_some(p)
}

/// Directory holding `<model>/golden/*.json`.
pub fn tiny_root() -> PathBuf {
    match shared() {
        Some(s) => s.join("tiny-dvl"),
        None => repo().join("tests/fixtures/tiny-dvl"),
    }
}

pub fn images_dir() -> PathBuf {
    match shared() {
        Some(s) => s.join("images"),
        None => repo().join("tests/fixtures/images"),
    }
}

/// Checkpoint directory of a fixture model (`a` also ships as models/tiny-dvl).
pub fn model_dir(name: &str) -> Option<PathBuf> {
    let d = tiny_root().join(name);
    if d.join("config.json").exists() {
        return Some(d);
    }
    (name == "a").then(|| repo().join("models/tiny-dvl"))
}

/// Every golden case JSON available, sorted.
pub fn golden_cases() -> Vec<PathBuf> {
    let mut out = Vec::new();
    let root = tiny_root();
    for entry in std::fs::read_dir(&root).unwrap().flatten() {
        let g = entry.path().join("golden");
        if let Ok(rd) = std::fs::read_dir(&g) {
            for f in rd.flatten() {
                if f.path().extension().is_some_and(|e| e == "json") {
                    out.push(f.path());
                }
            }
        }
    }
    out.sort();
    assert!(!out.is_empty(), "no golden cases under {}", root.display());
    out
}

/// A float32 (or int64, widened) tensor from a safetensors file.
pub fn read_tensor(path: &Path, name: &str) -> Option<(Vec<usize>, Vec<f64>)> {
    let bytes = std::fs::read(path).ok()?;
    let st = safetensors::SafeTensors::deserialize(&bytes).ok()?;
    let t = st.tensor(name).ok()?;
    let data: Vec<f64> = match t.dtype() {
        safetensors::Dtype::F32 => t
            .data()
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()) as f64)
            .collect(),
        safetensors::Dtype::I64 => t
            .data()
            .chunks_exact(8)
            .map(|c| i64::from_le_bytes(c.try_into().unwrap()) as f64)
            .collect(),
        safetensors::Dtype::U8 => t.data().iter().map(|&b| b as f64).collect(),
        other => panic!("unexpected dtype {other:?} for {name}"),
    };
    Some((t.shape().to_vec(), data))
}

/// ‖a − b‖ / ‖b‖.
pub fn rel_l2(a: &[f64], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len());
    let num: f64 = a.iter().zip(b).map(|(x, y)| (x - y) * (x - y)).sum();
    let den: f64 = b.iter().map(|y| y * y).sum();
    (num / den.max(1e-300)).sqrt()
}
