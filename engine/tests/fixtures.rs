//! Golden fixtures: every case reproduces the reference's greedy trace token for token, and
//! the probe tensors (vision features, hidden states, logits) agree within the fp32
//! tolerances of the fixture README §6. Runs with `fuse_commit` on and off.

mod common;

use std::collections::BTreeMap;
use std::path::Path;

use common::*;
use dvl::decoder::{Observer, ProbeData};
use dvl::{CpuBackend, Engine, GenerateParams, ImageInput, Request, Strategy};
use serde_json::Value;

#[derive(Default)]
struct Probes(BTreeMap<String, (Vec<usize>, Vec<f64>)>);

impl Observer for Probes {
    fn wants_probes(&self) -> bool {
        true
    }
    fn probe(&mut self, name: &str, shape: &[usize], data: ProbeData<'_>) {
        let v = match data {
            ProbeData::F32(d) => d.iter().map(|&x| x as f64).collect(),
            ProbeData::I64(d) => d.iter().map(|&x| x as f64).collect(),
        };
        self.0.insert(name.to_string(), (shape.to_vec(), v));
    }
}

fn params_of(g: &Value, fuse: bool) -> GenerateParams {
    let i = &g["inputs"];
    GenerateParams {
        gen_length: i["gen_length"].as_u64().unwrap() as usize,
        steps: i["steps"].as_u64().unwrap() as usize,
        block_size: Some(i["block_size"].as_u64().unwrap() as usize),
        strategy: Strategy::parse(i["strategy"].as_str().unwrap()).unwrap(),
        threshold: i["threshold"].as_f64().unwrap_or(0.85) as f32,
        temperature: i["temperature"].as_f64().unwrap() as f32,
        top_k: i["top_k"].as_u64().unwrap() as usize,
        top_p: i["top_p"].as_f64().unwrap() as f32,
        seed: 0,
        fuse_commit: fuse,
    }
}

/// The case's request, with images as files or, with `from_pixels`, as the fixture's
/// preprocessed `pixel_values` (isolates the vision tower from preprocessing). `None` when
/// pixel files are not available.
fn request_of(g: &Value, from_pixels: bool) -> Option<Request> {
    let mut images = Vec::new();
    for im in g["images"].as_array().unwrap() {
        if from_pixels {
            // `pixel_file` is relative to the model's directory.
            let pf = tiny_root()
                .join(g["model"].as_str().unwrap())
                .join(im["pixel_file"].as_str().unwrap());
            let (shape, vals) = read_tensor(&pf, "pixel_values")?;
            let (_, thw) = read_tensor(&pf, "image_grid_thw")?;
            assert_eq!(shape[1], 1176);
            let grid = dvl::Grid {
                t: thw[0] as usize,
                h: thw[1] as usize,
                w: thw[2] as usize,
            };
            images.push(ImageInput::Pixels {
                values: vals.iter().map(|&v| v as f32).collect(),
                grid,
            });
        } else {
            images.push(ImageInput::Path(
                images_dir().join(im["file"].as_str().unwrap()),
            ));
        }
    }
    Some(Request {
        prompt: g["inputs"]["question"].as_str().unwrap().to_string(),
        images,
        raw_prompt: false,
    })
}

/// Which matmul kernels a run uses.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Kernels {
    /// The default f32 path (on AMX machines: f32 activations as three bf16 terms on tiles).
    F32,
    /// f32 with the AVX-512/AVX2 FMA kernels (AMX forbidden for f32) on the weights as
    /// stored.
    F32Fma,
    /// f32 with the text decoder's weights repacked into panels (what `Engine::open` does
    /// where AVX2 is the best ISA), whatever the CPU.
    F32Panels,
    /// f32 with AMX tiles (three bf16 terms) for every few-row matmul, however short its
    /// rows (by default only rows of 256 and more, which the tiny models do not have).
    F32AmxAll,
    /// bf16-rounded matmul inputs (AMX tiles or vdpbf16ps).
    Bf16,
}

fn check_case(
    path: &Path,
    engines: &mut BTreeMap<String, Engine>,
    from_pixels: bool,
    kernels: Kernels,
) -> Vec<String> {
    let amx = kernels == Kernels::Bf16;
    let g: Value = serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap();
    let case = g["case"].as_str().unwrap().to_string();
    let model = g["model"].as_str().unwrap().to_string();
    let mut errs = Vec::new();
    let Some(dir) = model_dir(&model) else {
        eprintln!("skip {case}: model {model} not available");
        return errs;
    };
    // Panels or the weights as stored: one engine per model and layout.
    let packed = match kernels {
        Kernels::F32Fma => Some(false),
        Kernels::F32Panels => Some(true),
        _ => None,
    };
    let engine = engines
        .entry(format!("{model} {packed:?}"))
        .or_insert_with(|| {
            let mut e = Engine::open(&dir).unwrap();
            if let Some(p) = packed {
                e.set_packed(p);
            }
            e
        });
    let be = CpuBackend::with_threads(2)
        .unwrap()
        .with_f32_on_amx(kernels != Kernels::F32Fma)
        .with_f32_amx_min_work(if kernels == Kernels::F32AmxAll {
            0
        } else {
            256
        })
        .with_bf16(amx);
    // Probe tolerance: fp32 engine 1e-5; with AMX (bf16-rounded matmul inputs) the
    // fixture README's bf16 bound, 1.5e-2.
    let tol = if amx { 1.5e-2 } else { 1e-5 };
    let Some(req) = request_of(&g, from_pixels) else {
        eprintln!("skip {case}: pixel files not available");
        return errs;
    };
    let want_ids: Vec<u64> = g["ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap())
        .collect();

    // Prompt text and ids (spec §2.2, §2.3).
    let ids = engine.prompt_ids(&req).unwrap();
    let want_prompt: Vec<i64> = g["prompt_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_i64().unwrap())
        .collect();
    if ids != want_prompt {
        errs.push(format!("{case}: prompt_ids differ"));
    }

    for fuse in [false, true] {
        let mut probes = Probes::default();
        let out = match engine.generate(&be, &req, &params_of(&g, fuse), &mut probes) {
            Ok(o) => o,
            Err(e) => {
                errs.push(format!("{case} (fuse {fuse}): {e}"));
                continue;
            }
        };
        let o = &out.output;
        let tag = format!(
            "{case} (fuse_commit {fuse}{}{})",
            if from_pixels { ", fixture pixels" } else { "" },
            if amx { ", amx" } else { "" }
        );
        let got: Vec<u64> = o.ids.iter().map(|&x| x as u64).collect();
        if got != want_ids {
            let first = got.iter().zip(&want_ids).position(|(a, b)| a != b);
            errs.push(format!(
                "{tag}: ids differ (first at generated index {first:?})"
            ));
        }
        if o.prompt_rows as u64 != g["prompt_rows"].as_u64().unwrap() {
            errs.push(format!(
                "{tag}: prompt_rows {} vs {}",
                o.prompt_rows, g["prompt_rows"]
            ));
        }
        if o.forward_passes as u64 != g["forward_passes"].as_u64().unwrap() {
            errs.push(format!(
                "{tag}: forward_passes {} vs {}",
                o.forward_passes, g["forward_passes"]
            ));
        }
        if fuse {
            // One model call fewer per committed block that has a successor.
            assert!(
                o.forward_calls < o.forward_passes || o.trace.len() <= 1,
                "{tag}: fusion saved no forward"
            );
        } else {
            assert_eq!(o.forward_calls, o.forward_passes);
        }
        if o.stopped_at_eos != g["stopped_at_eos"].as_bool().unwrap() {
            errs.push(format!("{tag}: stopped_at_eos differs"));
        }
        if out.image_tokens as u64 != g["n_image_tokens"].as_u64().unwrap() {
            errs.push(format!(
                "{tag}: n_image_tokens {} vs {}",
                out.image_tokens, g["n_image_tokens"]
            ));
        }
        let grids: Vec<[u64; 3]> = out
            .image_grids
            .iter()
            .map(|x| [x.t as u64, x.h as u64, x.w as u64])
            .collect();
        let want_grids: Vec<[u64; 3]> =
            serde_json::from_value(g["image_grid_thw"].clone()).unwrap();
        if grids != want_grids {
            errs.push(format!("{tag}: grids {grids:?} vs {want_grids:?}"));
        }
        // Trace: block order, commit order, tokens, confidences (≲ 5e-4 for fp32).
        let trace = g["trace"].as_array().unwrap();
        if trace.len() != o.trace.len() {
            errs.push(format!(
                "{tag}: {} blocks decoded vs {}",
                o.trace.len(),
                trace.len()
            ));
        }
        for (tb, ob) in trace.iter().zip(&o.trace) {
            let steps = tb["steps"].as_array().unwrap();
            if tb["block"].as_u64() != Some(ob.block as u64) || steps.len() != ob.steps.len() {
                errs.push(format!("{tag}: block {} trace shape differs", ob.block));
                continue;
            }
            for (ts, os) in steps.iter().zip(&ob.steps) {
                let com = ts["committed"].as_array().unwrap();
                let want: Vec<(u64, u64)> = com
                    .iter()
                    .map(|c| (c["pos"].as_u64().unwrap(), c["token"].as_u64().unwrap()))
                    .collect();
                let mut have: Vec<(u64, u64)> = os
                    .committed
                    .iter()
                    .map(|c| (c.pos as u64, c.token as u64))
                    .collect();
                let mut want_sorted = want.clone();
                want_sorted.sort();
                have.sort();
                if have != want_sorted {
                    errs.push(format!(
                        "{tag}: block {} step {} commits {have:?} vs {want:?}",
                        ob.block, os.step
                    ));
                }
                for c in com {
                    let pos = c["pos"].as_u64().unwrap() as usize;
                    if let Some(mine) = os.committed.iter().find(|m| m.pos == pos) {
                        let d = (mine.conf as f64 - c["conf"].as_f64().unwrap()).abs();
                        if d > if amx { 3e-2 } else { 5e-4 } {
                            errs.push(format!("{tag}: conf at {pos} off by {d:.2e}"));
                        }
                    }
                }
            }
        }
        // Probe tensors (fixture README §5), relative L2 for an fp32 engine ≲ 1e-5.
        let tensors = path.with_file_name(g["tensors"].as_str().unwrap());
        for name in [
            "vision_features",
            "prefill_last_block_hidden",
            "prefill_last_block_prenorm",
            "first_step_hidden",
            "first_step_logsumexp",
            "first_step_logits_tail",
        ] {
            let Some((shape, want)) = read_tensor(&tensors, name) else {
                continue;
            };
            match probes.0.get(name) {
                None => errs.push(format!("{tag}: engine produced no {name}")),
                Some((s, have)) => {
                    if *s != shape {
                        errs.push(format!("{tag}: {name} shape {s:?} vs {shape:?}"));
                        continue;
                    }
                    let e = rel_l2(have, &want);
                    eprintln!("{tag}: {name} rel L2 {e:.1e}");
                    if e > tol {
                        errs.push(format!("{tag}: {name} rel L2 error {e:.2e}"));
                    }
                }
            }
        }
        // Top-64 logits: values at the golden indices; the top 4 indices identical.
        if let (Some((_, vals)), Some((_, idx))) = (
            read_tensor(&tensors, "first_step_logits_top64_values"),
            read_tensor(&tensors, "first_step_logits_top64_indices"),
        ) {
            let (_, my_idx) = &probes.0["first_step_logits_top64_indices"];
            let (_, my_vals) = &probes.0["first_step_logits_top64_values"];
            for r in 0..vals.len() / 64 {
                let (gi, gv) = (&idx[r * 64..(r + 1) * 64], &vals[r * 64..(r + 1) * 64]);
                let mi = &my_idx[r * 64..r * 64 + 4];
                if amx {
                    // fixtures README §6: with bf16 inputs the top index is exact and near-equal
                    // later ranks may swap: an id in another rank of the top 4 must have a
                    // golden value within the bf16 tolerance of the one it displaced.
                    let scale = gv[0].abs().max(1.0);
                    for (rank, &id) in mi.iter().enumerate() {
                        let ok = if rank == 0 {
                            id == gi[0]
                        } else {
                            gi.iter()
                                .position(|&g| g == id)
                                .is_some_and(|g| (gv[g] - gv[rank]).abs() <= 2.0 * tol * scale)
                        };
                        if !ok {
                            errs.push(format!("{tag}: logit id at rank {rank} of row {r} differs"));
                        }
                    }
                } else if gi[..4] != *mi {
                    errs.push(format!("{tag}: top-4 logit ids of row {r} differ"));
                }
                let e = rel_l2(&my_vals[r * 64..r * 64 + 4], &vals[r * 64..r * 64 + 4]);
                if e > tol.max(1e-5) {
                    errs.push(format!("{tag}: top logits of row {r} rel error {e:.2e}"));
                }
            }
        }
        eprintln!(
            "{tag}: {} ids, {} passes, {} calls",
            o.ids.len(),
            o.forward_passes,
            o.forward_calls
        );
    }
    errs
}

fn run_all(from_pixels: bool, kernels: Kernels) {
    let mut engines = BTreeMap::new();
    let mut errs = Vec::new();
    let cases = golden_cases();
    for c in &cases {
        errs.extend(check_case(c, &mut engines, from_pixels, kernels));
    }
    assert!(
        errs.is_empty(),
        "{} problems over {} cases:\n{}",
        errs.len(),
        cases.len(),
        errs.join("\n")
    );
}

/// The whole pipeline from image files.
#[test]
fn every_golden_case_matches_from_image_files() {
    run_all(false, Kernels::F32)
}

/// Vision tower, assembly and decoding from the fixtures' own `pixel_values`.
#[test]
fn every_golden_case_matches_from_fixture_pixels() {
    run_all(true, Kernels::F32)
}

/// The f32 FMA kernels (what the default path is on CPUs without AMX), also where AMX
/// exists.
#[test]
fn every_golden_case_matches_with_f32_fma_kernels() {
    run_all(true, Kernels::F32Fma)
}

/// The text decoder's weights repacked into 16-output panels: on x86-64 the AVX2 panel
/// kernel (and, where AVX2 is the best ISA, the GEMM on panels), elsewhere the portable
/// loop in the same order.
#[test]
fn every_golden_case_matches_with_panel_weights() {
    run_all(true, Kernels::F32Panels)
}

/// Denoising-step matmuls on AMX tiles with f32 activations as three bf16 terms (what
/// real-size models get on AMX machines): f32 numerics, the same traces. Skipped without
/// AMX.
#[test]
fn every_golden_case_matches_with_f32_on_amx_tiles() {
    if !CpuBackend::single_threaded().with_f32_amx_min_work(0).amx() {
        eprintln!("AMX not available: skipped");
        return;
    }
    run_all(true, Kernels::F32AmxAll)
}

/// With AMX tiles (bf16-rounded matmul inputs) for prefill and vision: the same traces, probes
/// within the bf16 tolerance. Skipped where the CPU or OS has no AMX.
#[test]
fn every_golden_case_matches_with_bf16_inputs() {
    if !CpuBackend::single_threaded().with_amx(true).amx() {
        eprintln!("AMX not available: skipped");
        return;
    }
    run_all(true, Kernels::Bf16)
}
