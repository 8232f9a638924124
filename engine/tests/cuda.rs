//! CUDA kernels against the CPU references (feature `cuda`).
//!
//! Every kernel runs on odd shapes (not multiples of the tile sizes, unaligned views for the
//! element-load variants) with fresh random inputs and NaN-poisoned outputs, and is compared
//! with `dvl_kernels` (the f64 references of `reference.rs` for matmul and attention, the CPU
//! kernels themselves for norms, RoPE, activations and unmasking). Each comparison prints one
//! JSON line (`{"figure":"kernel_error",...}`) so scripts/gpu-check.sh can record it.
//!
//! Without a GPU (no driver, no device, no NVRTC) every test prints a skip line and passes.
//!
//! Tolerances (relative L2 error ‖got − ref‖ / ‖ref‖, plus no NaN anywhere):
//!   f32-activation matmul (gemv.cu) vs the f64 reference: 2e-6 (f32 sums of <= 11k terms);
//!   tensor-core matmuls vs the f64 reference on bf16-rounded activations: 5e-5 (the tensor
//!   cores' f32 accumulation truncates), and vs the unrounded reference: 1e-2 (bf16 inputs,
//!   spec §11 item 1); attention vs the f64 reference: 5e-6; norms, RoPE, activations vs the
//!   CPU kernels: 1e-6;
//!   KV append and embedding gather: exact; unmasking: same tokens, confidences within 1e-5.
#![cfg(feature = "cuda")]

use std::sync::OnceLock;

use dvl::cuda::kernels::{bf16_bits, bf16_values};
use dvl::cuda::{AttnMask, Gpu, MatmulAlgo};
use dvl_kernels::attention::AttnShape;
use half::bf16;

/// The shared device, or None (after printing why) when this machine cannot run CUDA.
fn gpu(test: &str) -> Option<&'static Gpu> {
    static GPU: OnceLock<Result<Gpu, String>> = OnceLock::new();
    match GPU.get_or_init(|| Gpu::new(0).map_err(|e| e.to_string())) {
        Ok(g) => Some(g),
        Err(e) => {
            println!("cuda test {test}: skipped: {e}");
            None
        }
    }
}

struct Rng(u64);
impl Rng {
    fn new(seed: u64) -> Rng {
        // Fresh inputs per run, reproducible with DVL_TEST_SEED=<printed seed>.
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        let s = std::env::var("DVL_TEST_SEED")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(t);
        println!("{{\"figure\":\"test_seed\",\"stream\":{seed},\"seed\":{s}}}");
        Rng((s ^ seed.wrapping_mul(0x9e37_79b9_7f4a_7c15)) | 1)
    }
    fn f(&mut self) -> f32 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        ((self.0 >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }
    fn vec(&mut self, n: usize, scale: f32) -> Vec<f32> {
        (0..n).map(|_| self.f() * scale).collect()
    }
}

/// Relative L2 error; prints the JSON line; panics over tolerance or on NaN.
fn compare(kernel: &str, shape: &str, got: &[f32], want: &[f32], tol: f64) {
    assert_eq!(got.len(), want.len(), "{kernel} {shape}: length");
    let (mut num, mut den, mut nan) = (0f64, 0f64, 0usize);
    let mut worst = 0f64;
    for (&g, &w) in got.iter().zip(want) {
        if !g.is_finite() {
            nan += 1;
            continue;
        }
        let d = (g as f64 - w as f64).abs();
        num += d * d;
        den += (w as f64) * (w as f64);
        worst = worst.max(d);
    }
    let rel = if den > 0.0 {
        (num / den).sqrt()
    } else {
        num.sqrt()
    };
    let ok = nan == 0 && rel <= tol;
    println!(
        "{{\"figure\":\"kernel_error\",\"kernel\":\"{kernel}\",\"shape\":\"{shape}\",\"rel_l2\":{rel:.3e},\"max_abs\":{worst:.3e},\"non_finite\":{nan},\"tol\":{tol:.0e},\"ok\":{ok}}}"
    );
    assert!(
        ok,
        "{kernel} {shape}: rel {rel:.3e} (tol {tol:.0e}), {nan} non-finite"
    );
}

fn ref_matmul(
    x: &[f32],
    m: usize,
    k: usize,
    w: &[u16],
    n: usize,
    bias: Option<&[f32]>,
) -> Vec<f32> {
    let wb: Vec<bf16> = w.iter().map(|&b| bf16::from_bits(b)).collect();
    let mut out = vec![0f32; m * n];
    dvl_kernels::reference::matmul(x, m, k, &wb, n, bias, &mut out);
    out
}

fn round_bf16(v: &[f32]) -> Vec<f32> {
    bf16_values(&bf16_bits(v))
}

#[allow(clippy::too_many_arguments)]
fn run_matmul(
    g: &Gpu,
    rng: &mut Rng,
    algo: MatmulAlgo,
    m: usize,
    k: usize,
    n: usize,
    misalign: bool,
    bias_acc: bool,
    tc: bool,
) {
    let x = rng.vec(m * k, 1.0);
    let w = bf16_bits(&rng.vec(n * k, 0.5));
    let bias = rng.vec(n, 1.0);
    let init = rng.vec(m * n, 1.0);
    // An offset of one element makes the pointers 4-/2-byte aligned: the `_any` variants.
    let off = misalign as usize;
    let mut xh = vec![0f32; off];
    xh.extend_from_slice(&x);
    let mut wh = vec![0u16; off];
    wh.extend_from_slice(&w);
    let xd = g.upload(&xh).unwrap();
    let wd = g.upload(&wh).unwrap();
    let bd = g.upload(&bias).unwrap();
    let mut od = g
        .upload(&if bias_acc {
            init.clone()
        } else {
            vec![f32::NAN; m * n]
        })
        .unwrap();
    g.matmul(
        &xd.slice(off..),
        m,
        k,
        &wd.slice(off..),
        n,
        bias_acc.then_some(&bd),
        &mut od,
        bias_acc,
        algo,
    )
    .unwrap();
    let got = g.download(&od).unwrap();
    let xr = if tc { round_bf16(&x) } else { x.clone() };
    let mut want = ref_matmul(&xr, m, k, &w, n, bias_acc.then_some(&bias[..]));
    if bias_acc {
        for (w, i) in want.iter_mut().zip(&init) {
            *w += i;
        }
    }
    let shape = format!(
        "m{m} k{k} n{n}{}{}",
        if misalign { " unaligned" } else { "" },
        if bias_acc { " +bias +acc" } else { "" }
    );
    // Tensor cores accumulate f32 with truncation (not IEEE rounding): looser than the
    // CUDA-core GEMV, still orders of magnitude below any indexing mistake.
    compare(
        &format!("{algo:?}"),
        &shape,
        &got,
        &want,
        if tc { 5e-5 } else { 2e-6 },
    );
    if tc {
        // Against the unrounded activations: the bf16-input numerics.
        let mut exact = ref_matmul(&x, m, k, &w, n, bias_acc.then_some(&bias[..]));
        if bias_acc {
            for (w, i) in exact.iter_mut().zip(&init) {
                *w += i;
            }
        }
        compare(&format!("{algo:?} vs f32 x"), &shape, &got, &exact, 1e-2);
    }
}

#[test]
fn gemv_matches_reference() {
    let Some(g) = gpu("gemv_matches_reference") else {
        return;
    };
    let mut rng = Rng::new(1);
    for &(m, k, n, mis, ba) in &[
        (1, 64, 37, false, false),
        (2, 200, 129, false, true),
        (3, 2048, 300, false, false),
        (4, 96, 513, true, true),
        (5, 203, 77, false, false),
        (7, 1000, 4099, false, true),
        (8, 2048, 1000, false, false),
        (8, 11008, 96, false, true),
        (8, 3420, 65, false, false),
        (11, 512, 70, false, true),
        (8, 64, 33, true, false),
    ] {
        run_matmul(g, &mut rng, MatmulAlgo::Gemv, m, k, n, mis, ba, false);
    }
    for r in [2, 4] {
        run_matmul(
            g,
            &mut rng,
            MatmulAlgo::GemvRows(r),
            8,
            2048,
            515,
            false,
            true,
            false,
        );
        run_matmul(
            g,
            &mut rng,
            MatmulAlgo::GemvRows(r),
            3,
            720,
            77,
            false,
            false,
            false,
        );
    }
}

#[test]
fn tensor_core_matmuls_match_reference() {
    let Some(g) = gpu("tensor_core_matmuls_match_reference") else {
        return;
    };
    let mut rng = Rng::new(2);
    for &(m, k, n, mis, ba) in &[
        (1, 64, 37, false, false),
        (8, 2048, 300, false, true),
        (9, 200, 129, false, false),
        (19, 1000, 77, true, true),
        (33, 203, 515, false, false),
        (64, 2048, 260, false, true),
        (70, 128, 40, false, false),
    ] {
        run_matmul(g, &mut rng, MatmulAlgo::GemvTc, m, k, n, mis, ba, true);
    }
    for &(m, k, n, mis, ba) in &[
        (1, 32, 8, false, false),
        (130, 200, 129, false, true),
        (257, 1280, 300, false, false),
        (150, 203, 77, true, true),
        (300, 3420, 140, false, false),
        (64, 64, 1000, false, true),
    ] {
        run_matmul(g, &mut rng, MatmulAlgo::Gemm, m, k, n, mis, ba, true);
    }
    // Auto picks per m; its result must match whichever kernel it chose.
    run_matmul(
        g,
        &mut rng,
        MatmulAlgo::Auto,
        8,
        512,
        100,
        false,
        false,
        false,
    );
    run_matmul(
        g,
        &mut rng,
        MatmulAlgo::Auto,
        40,
        512,
        100,
        false,
        false,
        true,
    );
    run_matmul(
        g,
        &mut rng,
        MatmulAlgo::Auto,
        200,
        512,
        100,
        false,
        false,
        true,
    );
}

#[allow(clippy::too_many_arguments)]
fn ref_attention(
    q: &[f32],
    n_q: usize,
    k: &[f32],
    v: &[f32],
    n_keys: usize,
    s: AttnShape,
    scale: f32,
    visible: impl Fn(usize, usize) -> bool,
) -> Vec<f32> {
    let mut out = vec![0f32; n_q * s.q_stride];
    dvl_kernels::reference::attention(
        q,
        n_q,
        k,
        v,
        n_keys,
        s.n_heads,
        s.n_kv_heads,
        s.head_dim,
        scale,
        visible,
        &mut out,
    );
    out
}

#[test]
fn attention_matches_reference() {
    let Some(g) = gpu("attention_matches_reference") else {
        return;
    };
    let mut rng = Rng::new(3);
    // Denoising step of the 3B text model: 8 queries (one block) over a cache of `pos0`
    // committed rows plus the block itself, 16 q heads / 2 kv heads, head_dim 128.
    for &(pos0, n_q, heads, kv_heads, hd, block) in &[
        (40usize, 8usize, 16usize, 2usize, 128usize, 8usize),
        (0, 8, 16, 2, 128, 8),
        (1000, 8, 16, 2, 128, 8),
        (93, 21, 4, 4, 80, 8), // prefill-like: several blocks, bidirectional inside each
    ] {
        let s = AttnShape {
            n_heads: heads,
            n_kv_heads: kv_heads,
            head_dim: hd,
            q_stride: heads * hd,
            kv_stride: kv_heads * hd,
        };
        let n_keys = pos0 + n_q;
        let q = rng.vec(n_q * s.q_stride, 1.0);
        let kf = rng.vec(n_keys * s.kv_stride, 1.0);
        let vf = rng.vec(n_keys * s.kv_stride, 1.0);
        let scale = 1.0 / (hd as f32).sqrt();
        let vis = |i: usize, j: usize| j < n_keys.min(((pos0 + i) / block + 1) * block);
        for bf in [false, true] {
            let (kr, vr) = if bf {
                (round_bf16(&kf), round_bf16(&vf))
            } else {
                (kf.clone(), vf.clone())
            };
            let want = ref_attention(&q, n_q, &kr, &vr, n_keys, s, scale, vis);
            for splits in [1usize, 3, 0] {
                let qd = g.upload(&q).unwrap();
                let mut od = g.upload(&vec![f32::NAN; n_q * s.q_stride]).unwrap();
                let mut scratch = g.attn_scratch(64, n_q, heads, hd).unwrap();
                let mask = AttnMask::BlockCausal { pos0, block };
                if bf {
                    let (kd, vd) = (
                        g.upload(&bf16_bits(&kf)).unwrap(),
                        g.upload(&bf16_bits(&vf)).unwrap(),
                    );
                    g.attention(
                        &qd,
                        n_q,
                        &kd,
                        &vd,
                        n_keys,
                        s,
                        scale,
                        mask,
                        &mut od,
                        splits,
                        Some(&mut scratch),
                    )
                    .unwrap();
                } else {
                    let (kd, vd) = (g.upload(&kf).unwrap(), g.upload(&vf).unwrap());
                    g.attention(
                        &qd,
                        n_q,
                        &kd,
                        &vd,
                        n_keys,
                        s,
                        scale,
                        mask,
                        &mut od,
                        splits,
                        Some(&mut scratch),
                    )
                    .unwrap();
                }
                let got = g.download(&od).unwrap();
                compare(
                    if bf { "attn_bf16kv" } else { "attn_f32kv" },
                    &format!("block-causal pos0 {pos0} n_q {n_q} h{heads}/{kv_heads} hd{hd} splits {splits}"),
                    &got,
                    &want,
                    5e-6,
                );
            }
        }
    }
    // Vision tower: segments of a 2-image sequence (windows of 64 then one of 13, and a
    // full-attention segment), 16 heads of 80.
    let s = AttnShape {
        n_heads: 16,
        n_kv_heads: 16,
        head_dim: 80,
        q_stride: 1280,
        kv_stride: 1280,
    };
    let n = 205;
    let seg = |i: usize| -> (usize, usize) {
        if i < 64 {
            (0, 64)
        } else if i < 128 {
            (64, 128)
        } else if i < 141 {
            (128, 141)
        } else {
            (141, 205)
        }
    };
    let ranges: Vec<i32> = (0..n)
        .flat_map(|i| [seg(i).0 as i32, seg(i).1 as i32])
        .collect();
    let q = rng.vec(n * 1280, 1.0);
    let k = rng.vec(n * 1280, 1.0);
    let v = rng.vec(n * 1280, 1.0);
    let scale = 1.0 / 80f32.sqrt();
    let want = ref_attention(&q, n, &k, &v, n, s, scale, |i, j| {
        let (lo, hi) = seg(i);
        j >= lo && j < hi
    });
    let rd = g.upload(&ranges).unwrap();
    for splits in [1usize, 2] {
        let (qd, kd, vd) = (
            g.upload(&q).unwrap(),
            g.upload(&k).unwrap(),
            g.upload(&v).unwrap(),
        );
        let mut od = g.upload(&vec![f32::NAN; n * 1280]).unwrap();
        let mut scratch = g.attn_scratch(2, n, 16, 80).unwrap();
        g.attention(
            &qd,
            n,
            &kd,
            &vd,
            n,
            s,
            scale,
            AttnMask::Ranges(&rd),
            &mut od,
            splits,
            Some(&mut scratch),
        )
        .unwrap();
        let got = g.download(&od).unwrap();
        compare(
            "attn_f32kv",
            &format!("segments n {n} h16 hd80 splits {splits}"),
            &got,
            &want,
            5e-6,
        );
    }
}

#[test]
fn norms_match_cpu_kernels() {
    let Some(g) = gpu("norms_match_cpu_kernels") else {
        return;
    };
    let mut rng = Rng::new(4);
    for &(rows, d) in &[(1usize, 2048usize), (9, 1280), (3, 3584), (5, 100)] {
        let x = rng.vec(rows * d, 3.0);
        let delta = rng.vec(rows * d, 1.0);
        let w = rng.vec(d, 1.0);
        let b = rng.vec(d, 1.0);
        for fused in [false, true] {
            let mut xd = g.upload(&x).unwrap();
            let dd = g.upload(&delta).unwrap();
            let wd = g.upload(&w).unwrap();
            let mut od = g.upload(&vec![f32::NAN; rows * d]).unwrap();
            g.rms_norm(&mut xd, fused.then_some(&dd), &wd, 1e-6, rows, d, &mut od)
                .unwrap();
            let got = g.download(&od).unwrap();
            let xs: Vec<f32> = if fused {
                x.iter().zip(&delta).map(|(a, b)| a + b).collect()
            } else {
                x.clone()
            };
            let mut want = vec![0f32; rows * d];
            for (xr, or) in xs.chunks(d).zip(want.chunks_mut(d)) {
                dvl_kernels::norm::rms_norm(xr, &w, 1e-6, or);
            }
            let shape = format!("rows {rows} d {d}{}", if fused { " +residual" } else { "" });
            compare("rms_norm_f32", &shape, &got, &want, 1e-6);
            if fused {
                compare(
                    "rms_norm_f32 residual",
                    &shape,
                    &g.download(&xd).unwrap(),
                    &xs,
                    0.0,
                );
            }
        }
        let xd = g.upload(&x).unwrap();
        let (wd, bd) = (g.upload(&w).unwrap(), g.upload(&b).unwrap());
        let mut od = g.upload(&vec![f32::NAN; rows * d]).unwrap();
        g.layer_norm(&xd, &wd, &bd, 1e-6, rows, d, &mut od).unwrap();
        let mut want = vec![0f32; rows * d];
        for (xr, or) in x.chunks(d).zip(want.chunks_mut(d)) {
            dvl_kernels::norm::layer_norm(xr, &w, &b, 1e-6, or);
        }
        compare(
            "layer_norm_f32",
            &format!("rows {rows} d {d}"),
            &g.download(&od).unwrap(),
            &want,
            1e-6,
        );
    }
}

#[test]
fn rope_and_elementwise_match_cpu_kernels() {
    let Some(g) = gpu("rope_and_elementwise_match_cpu_kernels") else {
        return;
    };
    let mut rng = Rng::new(5);
    // RoPE: 8 rows of 16 q heads (stride 2048) and of the ViT's 16 × 80 with a padded stride.
    for &(rows, heads, hd, stride) in &[
        (8usize, 16usize, 128usize, 2048usize),
        (37, 16, 80, 1300),
        (3, 2, 128, 256),
    ] {
        let x = rng.vec(rows * stride, 1.0);
        let mut cos = vec![0f32; rows * hd];
        let mut sin = vec![0f32; rows * hd];
        for r in 0..rows {
            for i in 0..hd / 2 {
                let a = (r as f64 + 1000.0) * 1e6f64.powf(-2.0 * i as f64 / hd as f64);
                cos[r * hd + i] = a.cos() as f32;
                cos[r * hd + i + hd / 2] = a.cos() as f32;
                sin[r * hd + i] = a.sin() as f32;
                sin[r * hd + i + hd / 2] = a.sin() as f32;
            }
        }
        let mut want = x.clone();
        for r in 0..rows {
            for h in 0..heads {
                let o = r * stride + h * hd;
                dvl_kernels::rope::rope_rotate_half(
                    &mut want[o..o + hd],
                    &cos[r * hd..(r + 1) * hd],
                    &sin[r * hd..(r + 1) * hd],
                );
            }
        }
        let mut xd = g.upload(&x).unwrap();
        let (cd, sd) = (g.upload(&cos).unwrap(), g.upload(&sin).unwrap());
        g.rope(&mut xd, rows, heads, hd, stride, &cd, &sd).unwrap();
        compare(
            "rope_rotate_half_f32",
            &format!("rows {rows} heads {heads} hd {hd} stride {stride}"),
            &g.download(&xd).unwrap(),
            &want,
            1e-6,
        );
    }

    let n = 8 * 11008 + 5;
    let gate = rng.vec(n, 6.0);
    let up = rng.vec(n, 1.0);
    let mut want = gate.clone();
    dvl_kernels::elementwise::silu_mul(&mut want, &up);
    let mut gd = g.upload(&gate).unwrap();
    let ud = g.upload(&up).unwrap();
    g.silu_mul(&mut gd, &ud, n).unwrap();
    compare(
        "silu_mul_f32",
        &format!("n {n}"),
        &g.download(&gd).unwrap(),
        &want,
        1e-6,
    );

    let x = rng.vec(n, 4.0);
    let mut want = x.clone();
    dvl_kernels::elementwise::gelu_erf(&mut want);
    let mut xd = g.upload(&x).unwrap();
    g.gelu_erf(&mut xd, n).unwrap();
    compare(
        "gelu_erf_f32",
        &format!("n {n}"),
        &g.download(&xd).unwrap(),
        &want,
        1e-6,
    );
    let mut want = x.clone();
    dvl_kernels::elementwise::gelu_tanh(&mut want);
    let mut xd = g.upload(&x).unwrap();
    g.gelu_tanh(&mut xd, n).unwrap();
    compare(
        "gelu_tanh_f32",
        &format!("n {n}"),
        &g.download(&xd).unwrap(),
        &want,
        1e-6,
    );

    let a = rng.vec(n, 1.0);
    let mut want = a.clone();
    dvl_kernels::elementwise::add_inplace(&mut want, &x);
    let mut ad = g.upload(&a).unwrap();
    let xd = g.upload(&x).unwrap();
    g.add(&mut ad, &xd, n).unwrap();
    compare(
        "add_f32",
        &format!("n {n}"),
        &g.download(&ad).unwrap(),
        &want,
        0.0,
    );

    let (rows, width) = (7usize, 1283usize);
    let xb = rng.vec(rows * width, 1.0);
    let bias = rng.vec(width, 1.0);
    let want: Vec<f32> = xb
        .iter()
        .enumerate()
        .map(|(i, v)| v + bias[i % width])
        .collect();
    let mut xd = g.upload(&xb).unwrap();
    let bd = g.upload(&bias).unwrap();
    g.add_bias(&mut xd, &bd, rows, width).unwrap();
    compare(
        "add_bias_f32",
        &format!("rows {rows} n {width}"),
        &g.download(&xd).unwrap(),
        &want,
        0.0,
    );
}

#[test]
fn kv_append_and_embedding_are_exact() {
    let Some(g) = gpu("kv_append_and_embedding_are_exact") else {
        return;
    };
    let mut rng = Rng::new(6);
    // 8 rows of the 3B K/V (256 wide) out of a fused [8, 2560] qkv buffer, into a cache of 50
    // rows at row 40.
    let (rows, width, src_stride, kv_stride, cap, pos0) =
        (8usize, 256usize, 2560usize, 256usize, 50usize, 40usize);
    let ks = rng.vec(rows * src_stride, 1.0);
    let vs = rng.vec(rows * src_stride, 1.0);
    let kd = g.upload(&ks).unwrap();
    let vd = g.upload(&vs).unwrap();
    let mut want_k = vec![7f32; cap * kv_stride];
    let mut want_v = vec![7f32; cap * kv_stride];
    for r in 0..rows {
        for c in 0..width {
            want_k[(pos0 + r) * kv_stride + c] = ks[r * src_stride + c];
            want_v[(pos0 + r) * kv_stride + c] = vs[r * src_stride + c];
        }
    }
    let mut kc = g.upload(&vec![7f32; cap * kv_stride]).unwrap();
    let mut vc = g.upload(&vec![7f32; cap * kv_stride]).unwrap();
    g.kv_append(
        &kd, &vd, rows, width, src_stride, &mut kc, &mut vc, kv_stride, pos0,
    )
    .unwrap();
    compare(
        "kv_append_f32 k",
        "8×256 at 40",
        &g.download(&kc).unwrap(),
        &want_k,
        0.0,
    );
    compare(
        "kv_append_f32 v",
        "8×256 at 40",
        &g.download(&vc).unwrap(),
        &want_v,
        0.0,
    );
    let seven = bf16::from_f32(7.0).to_bits();
    let mut kcb = g.upload(&vec![seven; cap * kv_stride]).unwrap();
    let mut vcb = g.upload(&vec![seven; cap * kv_stride]).unwrap();
    g.kv_append(
        &kd, &vd, rows, width, src_stride, &mut kcb, &mut vcb, kv_stride, pos0,
    )
    .unwrap();
    compare(
        "kv_append_bf16 k",
        "8×256 at 40",
        &bf16_values(&g.download(&kcb).unwrap()),
        &round_bf16(&want_k),
        0.0,
    );
    compare(
        "kv_append_bf16 v",
        "8×256 at 40",
        &bf16_values(&g.download(&vcb).unwrap()),
        &round_bf16(&want_v),
        0.0,
    );

    let (vocab, dim) = (1000usize, 2048usize);
    let table = bf16_bits(&rng.vec(vocab * dim, 1.0));
    let ids: Vec<i32> = vec![0, 999, 17, 17, 500, -1, 1000];
    let want: Vec<f32> = ids
        .iter()
        .flat_map(|&id| {
            let t = &table;
            (0..dim).map(move |c| {
                if (0..vocab as i32).contains(&id) {
                    bf16::from_bits(t[id as usize * dim + c]).to_f32()
                } else {
                    0.0
                }
            })
        })
        .collect();
    let td = g.upload(&table).unwrap();
    let idd = g.upload(&ids).unwrap();
    let mut od = g.upload(&vec![f32::NAN; ids.len() * dim]).unwrap();
    g.embed_rows(&td, vocab, dim, &idd, ids.len(), &mut od)
        .unwrap();
    compare(
        "embed_rows_bf16",
        "7 ids (2 out of range) × 2048",
        &g.download(&od).unwrap(),
        &want,
        0.0,
    );
}

#[test]
fn unmask_matches_cpu_argmax_confidence() {
    let Some(g) = gpu("unmask_matches_cpu_argmax_confidence") else {
        return;
    };
    let mut rng = Rng::new(7);
    // 8 rows of the 3B vocabulary (151936, MASK = 151671 excluded), stored with a padded
    // stride; planted ties (lowest id wins), a maximum on the excluded id, ties across chunks.
    let (rows, n, ld, never) = (8usize, 151_936usize, 151_940usize, 151_671usize);
    let mut z = rng.vec(rows * ld, 8.0);
    z[ld + 3000] = 30.0;
    z[ld + 1200] = 30.0;
    z[2 * ld + never] = 40.0;
    z[3 * ld + 151_935] = 25.0;
    z[3 * ld + 4096] = 25.0;
    for r in 4..rows {
        // Sharp rows: a confident winner, as late in the denoising.
        z[r * ld + 100 * r] = 60.0;
    }
    let zd = g.upload(&z).unwrap();
    let mut scratch = g.unmask_scratch(rows, n).unwrap();
    let got = g
        .unmask(&zd, rows, n, ld, Some(never), &mut scratch)
        .unwrap();
    let mut conf_got = Vec::new();
    let mut conf_want = Vec::new();
    for r in 0..rows {
        let (tok, conf) =
            dvl_kernels::softmax::argmax_confidence(&z[r * ld..r * ld + n], Some(never));
        println!(
            "{{\"figure\":\"unmask_row\",\"row\":{r},\"token\":{},\"want\":{tok},\"conf\":{:.7},\"want_conf\":{conf:.7}}}",
            got[r].0.map_or(-1, |t| t as i64),
            got[r].1
        );
        assert_eq!(got[r].0, Some(tok), "row {r}: token");
        conf_got.push(got[r].1);
        conf_want.push(conf);
    }
    compare(
        "argmax_partial+finish",
        "8 × 151936, MASK excluded",
        &conf_got,
        &conf_want,
        1e-5,
    );
}

/// Needs NVRTC only (no GPU): runs in CI wherever NVRTC is installed, skips elsewhere.
#[test]
fn nvrtc_compiles_and_caches() {
    use dvl::cuda::{kernels, nvrtc};
    if let Err(e) = nvrtc::nvrtc() {
        println!("cuda test nvrtc_compiles_and_caches: skipped: {e}");
        return;
    }
    let dir = std::env::temp_dir().join(format!("dvl-cuda-test-cache-{}", std::process::id()));
    let (file, body) = kernels::SOURCES[kernels::SOURCES.len() - 1];
    let src = kernels::full_source(file, body);
    let a = nvrtc::compile(file, &src, "sm_80", &[], Some(&dir)).unwrap();
    let b = nvrtc::compile(file, &src, "sm_80", &[], Some(&dir)).unwrap();
    let p = nvrtc::compile(file, &src, "compute_80", &[], Some(&dir)).unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    assert!(!a.cached && b.cached && a.image == b.image);
    assert_eq!(a.kind, nvrtc::ImageKind::Cubin);
    assert_eq!(p.kind, nvrtc::ImageKind::Ptx);
    assert_eq!(
        p.image.last(),
        Some(&0),
        "PTX must be NUL-terminated for the driver"
    );
    // A compile error comes back as an error carrying NVRTC's log, not a panic.
    let err = nvrtc::compile(
        "broken.cu",
        "__global__ void f() { undefined_thing; }",
        "sm_80",
        &[],
        None,
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("undefined_thing"), "{err}");
    assert!(nvrtc::compile(file, &src, "sm_xx", &[], None).is_err());
}

#[test]
fn launchers_reject_bad_shapes() {
    let Some(g) = gpu("launchers_reject_bad_shapes") else {
        return;
    };
    let x = g.upload(&[0f32; 16]).unwrap();
    let w = g.upload(&[0u16; 16]).unwrap();
    let mut o = g.upload(&[0f32; 4]).unwrap();
    // 4 × 4 · 4ᵀ needs 16 outputs, only 4 given.
    assert!(g
        .matmul(&x, 4, 4, &w, 4, None, &mut o, false, MatmulAlgo::Auto)
        .is_err());
    let s = AttnShape {
        n_heads: 2,
        n_kv_heads: 1,
        head_dim: 256,
        q_stride: 512,
        kv_stride: 256,
    };
    let mut o2 = g.upload(&[0f32; 512]).unwrap();
    assert!(g
        .attention(
            &x,
            1,
            &x,
            &x,
            1,
            s,
            1.0,
            AttnMask::BlockCausal { pos0: 0, block: 8 },
            &mut o2,
            1,
            None
        )
        .is_err());
}
