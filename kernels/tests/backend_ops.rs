//! Every fast kernel against its reference on odd shapes (ggml test-backend-ops style):
//! sizes that are not multiples of the SIMD width, single rows, empty operands, and every
//! instruction set this CPU supports.

use dvl_kernels::attention::{attention, AttnShape};
use dvl_kernels::matmul::{matmul, Isa};
use dvl_kernels::{bf16, f16, reference, WeightElem};

/// Deterministic pseudo-random values in [-1, 1).
fn rand_vec(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (0..n)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}

fn isas() -> Vec<Isa> {
    dvl_kernels::cpu::supported_isas().to_vec()
}

fn max_rel_err(a: &[f32], b: &[f32]) -> f32 {
    let scale = b.iter().fold(1e-6f32, |m, v| m.max(v.abs()));
    a.iter()
        .zip(b)
        .fold(0f32, |m, (x, y)| m.max((x - y).abs() / scale))
}

fn check_matmul<W: WeightElem>(conv: impl Fn(f32) -> W, name: &str) {
    let shapes = [
        (1, 1, 1),
        (1, 7, 3),
        (3, 13, 9),
        (5, 31, 17),
        (8, 64, 40),
        (9, 100, 33),
        (33, 17, 65),
        (64, 129, 7),
        (0, 8, 8),
        (4, 0, 5),
    ];
    for &(m, k, n) in &shapes {
        let x = rand_vec(m * k, 1 + m as u64);
        let w: Vec<W> = rand_vec(n * k, 7 + k as u64)
            .into_iter()
            .map(&conv)
            .collect();
        let bias = rand_vec(n, 3);
        let mut want = vec![0f32; m * n];
        reference::matmul(&x, m, k, &w, n, Some(&bias), &mut want);
        for isa in isas() {
            let mut got = vec![f32::NAN; m * n];
            matmul(isa, &x, m, k, &w, n, Some(&bias), &mut got, n);
            let e = max_rel_err(&got, &want);
            assert!(
                e < 1e-5,
                "{name} {isa:?} m={m} k={k} n={n}: max rel err {e}"
            );
        }
    }
}

#[test]
fn matmul_matches_reference_for_every_weight_type_and_isa() {
    check_matmul(|v| v, "f32");
    check_matmul(bf16::from_f32, "bf16");
    check_matmul(f16::from_f32, "f16");
}

#[test]
fn matmul_writes_with_leading_dimension() {
    let (m, k, n, ldo) = (3, 10, 4, 7);
    let x = rand_vec(m * k, 5);
    let w = rand_vec(n * k, 6);
    let mut out = vec![-9f32; m * ldo];
    matmul(Isa::Portable, &x, m, k, &w, n, None, &mut out, ldo);
    let mut want = vec![0f32; m * n];
    reference::matmul(&x, m, k, &w, n, None, &mut want);
    for i in 0..m {
        assert!(max_rel_err(&out[i * ldo..i * ldo + n], &want[i * n..(i + 1) * n]) < 1e-5);
        assert!(
            out[i * ldo + n..(i + 1) * ldo].iter().all(|&v| v == -9.0),
            "columns past n untouched"
        );
    }
}

#[test]
fn matmul_is_identical_across_isas_row_counts() {
    // A row's result must not depend on how many rows are computed together (this is what
    // makes fused commit passes and thread splits bit-identical).
    let (k, n) = (77, 5);
    let x = rand_vec(9 * k, 11);
    let w: Vec<bf16> = rand_vec(n * k, 12)
        .into_iter()
        .map(bf16::from_f32)
        .collect();
    for isa in isas() {
        let mut all = vec![0f32; 9 * n];
        matmul(isa, &x, 9, k, &w, n, None, &mut all, n);
        for r in 0..9 {
            let mut one = vec![0f32; n];
            matmul(isa, &x[r * k..(r + 1) * k], 1, k, &w, n, None, &mut one, n);
            assert_eq!(&all[r * n..(r + 1) * n], &one[..], "{isa:?} row {r}");
        }
    }
}

#[test]
fn attention_matches_masked_reference() {
    // GQA 6 q-heads over 2 kv-heads, head_dim 10, block-causal with block 4 over a cache.
    let (nh, nkv, hd, cache, t, block) = (6, 2, 10, 8, 7, 4);
    let n_k = cache + t;
    let q = rand_vec(t * nh * hd, 21);
    let k = rand_vec(n_k * nkv * hd, 22);
    let v = rand_vec(n_k * nkv * hd, 23);
    let shape = AttnShape {
        n_heads: nh,
        n_kv_heads: nkv,
        head_dim: hd,
        q_stride: nh * hd,
        kv_stride: nkv * hd,
    };
    let scale = 1.0 / (hd as f32).sqrt();
    let mut want = vec![0f32; t * nh * hd];
    let visible = |i: usize, j: usize| j / block <= (cache + i) / block;
    reference::attention(&q, t, &k, &v, n_k, nh, nkv, hd, scale, visible, &mut want);
    for isa in isas() {
        let mut got = vec![0f32; t * nh * hd];
        let mut scratch = vec![0f32; n_k];
        let keys = |i: usize| (0, n_k.min(((cache + i) / block + 1) * block));
        attention(
            isa,
            &q,
            t,
            &k,
            &v,
            &mut got,
            shape,
            scale,
            keys,
            &mut scratch,
        );
        assert!(max_rel_err(&got, &want) < 1e-5, "{isa:?}");
    }
}

#[test]
fn attention_segments_match_reference() {
    let (nh, hd, s) = (3, 8, 11);
    let q = rand_vec(s * nh * hd, 31);
    let k = rand_vec(s * nh * hd, 32);
    let v = rand_vec(s * nh * hd, 33);
    let seg = |i: usize| if i < 4 { (0, 4) } else { (4, 11) };
    let shape = AttnShape {
        n_heads: nh,
        n_kv_heads: nh,
        head_dim: hd,
        q_stride: nh * hd,
        kv_stride: nh * hd,
    };
    let mut want = vec![0f32; s * nh * hd];
    reference::attention(
        &q,
        s,
        &k,
        &v,
        s,
        nh,
        nh,
        hd,
        0.3,
        |i, j| seg(i) == seg(j),
        &mut want,
    );
    for isa in isas() {
        let mut got = vec![0f32; s * nh * hd];
        let mut scratch = vec![0f32; s];
        attention(isa, &q, s, &k, &v, &mut got, shape, 0.3, seg, &mut scratch);
        assert!(max_rel_err(&got, &want) < 1e-5, "{isa:?}");
    }
}

#[test]
fn rms_norm_and_rope_against_closed_forms() {
    let x = [3.0f32, -4.0];
    let mut out = [0f32; 2];
    dvl_kernels::norm::rms_norm(&x, &[1.0f32, 2.0], 0.0, &mut out);
    // rms = sqrt((9 + 16) / 2)
    let r = (12.5f32).sqrt();
    assert!((out[0] - 3.0 / r).abs() < 1e-6 && (out[1] + 8.0 / r).abs() < 1e-6);
    // RoPE by 90 degrees: [a, b] -> [-b, a].
    let mut v = [1.0f32, 2.0, 3.0, 4.0];
    dvl_kernels::rope::rope_rotate_half(&mut v, &[0.0; 4], &[1.0; 4]);
    assert_eq!(v, [-3.0, -4.0, 1.0, 2.0]);
    // Zero angle is the identity.
    let mut v2 = [1.0f32, 2.0, 3.0, 4.0];
    dvl_kernels::rope::rope_rotate_half(&mut v2, &[1.0; 4], &[0.0; 4]);
    assert_eq!(v2, [1.0, 2.0, 3.0, 4.0]);
}

#[test]
fn argmax_confidence_is_exact_on_a_long_row() {
    // Two dominant logits and 150k small ones: chunked sums keep the confidence within
    // rounding (a sequential f32 sum drifts by up to 1e-2 relative; README §6).
    let n = 151_936;
    let mut z = vec![0f32; n];
    z[5] = 12.0;
    z[9] = 12.0;
    let (i, c) = dvl_kernels::softmax::argmax_confidence(&z, None);
    assert_eq!(i, 5, "lowest index wins ties");
    let want = (12f64.exp() / (2.0 * 12f64.exp() + (n - 2) as f64)) as f32;
    assert!(((c - want) / want).abs() < 2e-6, "{c} vs {want}");
    let (i, _) = dvl_kernels::softmax::argmax_confidence(&z, Some(5));
    assert_eq!(i, 9);
}

#[test]
fn activations_match_closed_forms() {
    let mut g = [1.0f32, -2.0];
    dvl_kernels::elementwise::silu_mul(&mut g, &[2.0, 3.0]);
    assert!((g[0] - 2.0 / (1.0 + (-1f32).exp())).abs() < 1e-6);
    assert!((g[1] - 3.0 * -2.0 / (1.0 + 2f32.exp())).abs() < 1e-6);
    let mut e = [1.0f32];
    dvl_kernels::elementwise::gelu_erf(&mut e);
    assert!((e[0] - 0.841_344_7).abs() < 1e-6);
    let mut t = [1.0f32];
    dvl_kernels::elementwise::gelu_tanh(&mut t);
    assert!((t[0] - 0.841_192).abs() < 1e-5);
}

#[test]
fn split_unmasking_equals_one_pass() {
    use dvl_kernels::softmax::ArgmaxPartial;
    let z: Vec<f32> = rand_vec(10_007, 77).iter().map(|v| v * 9.0).collect();
    for never in [None, Some(3), Some(10_006)] {
        let whole = dvl_kernels::softmax::argmax_confidence(&z, never);
        for chunk in [1usize, 100, 4096, 10_007] {
            let mut acc = ArgmaxPartial::EMPTY;
            for (i, c) in z.chunks(chunk).enumerate() {
                acc = acc.merge(ArgmaxPartial::of(c, i * chunk, never));
            }
            let (t, p) = acc.finish();
            assert_eq!(t, whole.0, "chunk {chunk}");
            assert!(
                ((p - whole.1) / whole.1).abs() < 1e-5,
                "chunk {chunk}: {p} vs {}",
                whole.1
            );
        }
    }
    // The excluded id is never chosen even when it is the maximum.
    let mut z2 = vec![0f32; 50];
    z2[7] = 5.0;
    z2[8] = 4.0;
    assert_eq!(dvl_kernels::softmax::argmax_confidence(&z2, Some(7)).0, 8);
}

#[cfg(target_arch = "x86_64")]
#[test]
fn amx_matches_reference_on_bf16_rounded_activations() {
    if !dvl_kernels::amx::available() {
        eprintln!("AMX not available here: skipped");
        return;
    }
    let round = |v: f32| bf16::from_f32(v).to_f32();
    for &(m, k, n) in &[
        (1, 32, 16),
        (16, 64, 32),
        (17, 40, 33),
        (70, 1176, 45),
        (300, 96, 20),
        (33, 3420, 17),
    ] {
        let x = rand_vec(m * k, 91 + k as u64);
        let w: Vec<bf16> = rand_vec(n * k, 92 + n as u64)
            .into_iter()
            .map(bf16::from_f32)
            .collect();
        let bias = rand_vec(n, 93);
        let xr: Vec<f32> = x.iter().map(|&v| round(v)).collect();
        let mut want = vec![0f32; m * n];
        reference::matmul(&xr, m, k, &w, n, Some(&bias), &mut want);
        let mut got = vec![f32::NAN; m * n];
        unsafe { dvl_kernels::amx::matmul_amx_bf16(&x, m, k, &w, n, Some(&bias), &mut got, n) };
        let e = max_rel_err(&got, &want);
        assert!(e < 1e-5, "m={m} k={k} n={n}: max rel err {e}");
        // Rows do not depend on how many rows are computed together.
        let mut one = vec![0f32; n];
        unsafe {
            dvl_kernels::amx::matmul_amx_bf16(
                &x[(m - 1) * k..],
                1,
                k,
                &w,
                n,
                Some(&bias),
                &mut one,
                n,
            )
        };
        assert_eq!(&one[..], &got[(m - 1) * n..]);
    }
}

#[cfg(target_arch = "x86_64")]
#[test]
fn avx512_rows_are_bitwise_stable_across_tile_shapes() {
    // Every (rows, cols) tile shape reduces with the same lane tree: compare a full
    // 4-row call with each row computed alone and with odd column counts.
    if !isas().contains(&Isa::Avx512) {
        return;
    }
    let k = 45;
    let x = rand_vec(7 * k, 5);
    let w: Vec<f32> = rand_vec(11 * k, 6);
    let mut all = vec![0f32; 7 * 11];
    matmul(Isa::Avx512, &x, 7, k, &w, 11, None, &mut all, 11);
    for r in 0..7 {
        for n in [1usize, 3, 11] {
            let mut one = vec![0f32; n];
            matmul(
                Isa::Avx512,
                &x[r * k..(r + 1) * k],
                1,
                k,
                &w,
                n,
                None,
                &mut one,
                n,
            );
            assert_eq!(&one[..], &all[r * 11..r * 11 + n], "row {r}, {n} columns");
        }
    }
}
