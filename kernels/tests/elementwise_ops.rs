//! The element-wise kernels (SiLU·up, residual add, GELU erf / tanh, RoPE, RMSNorm,
//! LayerNorm) on every
//! instruction set this CPU supports against their scalar references, ggml test-backend-ops
//! style: lengths that are not multiples of the vector width (empty, 1, 15, 17, 1000+odd),
//! wide value ranges and special values. The vector variants perform the references'
//! operations in the same order, so the check is bit equality (NaN matches any NaN).

use dvl_kernels::elementwise::{
    add_inplace, add_inplace_isa, gelu_erf, gelu_erf_isa, gelu_tanh, gelu_tanh_isa, silu_mul,
    silu_mul_isa,
};
use dvl_kernels::matmul::Isa;
use dvl_kernels::norm::{layer_norm_rows, layer_norm_rows_ref, rms_norm_rows, rms_norm_rows_ref};
use dvl_kernels::rope::{rope_rows, rope_rows_ref};

const LENGTHS: [usize; 14] = [0, 1, 2, 7, 8, 9, 15, 16, 17, 31, 33, 100, 1003, 4099];

mod common;
use common::rand_vec;

/// Values where the scalar code branches (exp clamps, tanh / erf intervals), zeros,
/// infinities, NaN, subnormals and extremes.
fn specials() -> Vec<f32> {
    let mut v = vec![
        0.0,
        -0.0,
        1.0,
        -1.0,
        87.3,
        -87.3,
        87.31,
        -87.31,
        88.7,
        -88.7,
        88.71,
        -88.71,
        100.0,
        -100.0,
        1e-30,
        -1e-30,
        1e-45,
        f32::MIN_POSITIVE,
        f32::MAX,
        f32::MIN,
        f32::INFINITY,
        f32::NEG_INFINITY,
        f32::NAN,
        -f32::NAN,
    ];
    // tanhf / expm1f / erf thresholds (on the argument, which is a scaled input) and
    // neighbours.
    for t in [
        0.2554f32, 0.5493, 10.0, 0.3466, 1.0397, 0.84375, 1.25, 2.857_143, 6.0, 28.0, 3.0, 5.0,
    ] {
        for s in [1.0f32, core::f32::consts::SQRT_2, 1.0 / 0.797_884_6] {
            let x = t * s;
            for b in [x.to_bits() - 1, x.to_bits(), x.to_bits() + 1] {
                v.push(f32::from_bits(b));
                v.push(-f32::from_bits(b));
            }
        }
    }
    v
}

fn same_bits(got: &[f32], want: &[f32], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!(
            g.to_bits() == w.to_bits() || (g.is_nan() && w.is_nan()),
            "{what}: element {i}: {g:e} ({:#x}) vs reference {w:e} ({:#x})",
            g.to_bits(),
            w.to_bits()
        );
    }
}

fn isas() -> Vec<Isa> {
    let isas = dvl_kernels::cpu::supported_isas().to_vec();
    eprintln!("ISAs under test: {isas:?}");
    isas
}

/// Inputs for the unary activations: random at several scales for every length, the
/// special values, and a sweep over f32 bit patterns (every sign and exponent).
fn unary_inputs() -> Vec<Vec<f32>> {
    let mut sets = Vec::new();
    for &n in &LENGTHS {
        for (k, scale) in [1.0f32, 4.0, 30.0].into_iter().enumerate() {
            sets.push(
                rand_vec(n, (n * 3 + k) as u64)
                    .iter()
                    .map(|v| v * scale)
                    .collect(),
            );
        }
    }
    sets.push(specials());
    // Every 4099th bit pattern: ~1M values across all exponents, both signs.
    sets.push(
        (0..u32::MAX / 4099)
            .map(|i| f32::from_bits(i.wrapping_mul(4099)))
            .collect(),
    );
    // Dense over [-12, 12), where GELU's interesting branches are.
    sets.push((0..1_200_001).map(|i| -12.0 + i as f32 * 2e-5).collect());
    sets
}

fn check_unary(name: &str, reference: fn(&mut [f32]), fast: fn(Isa, &mut [f32])) {
    let inputs = unary_inputs();
    for isa in isas() {
        for x in &inputs {
            let mut want = x.clone();
            reference(&mut want);
            let mut got = x.clone();
            fast(isa, &mut got);
            same_bits(&got, &want, &format!("{name} {isa:?} n={}", x.len()));
        }
    }
}

#[test]
fn gelu_tanh_is_bit_identical_on_every_isa() {
    check_unary("gelu_tanh", gelu_tanh, gelu_tanh_isa);
}

#[test]
fn gelu_erf_is_bit_identical_on_every_isa() {
    check_unary("gelu_erf", gelu_erf, gelu_erf_isa);
}

#[test]
fn silu_mul_is_bit_identical_on_every_isa() {
    let mut cases: Vec<(Vec<f32>, Vec<f32>)> = Vec::new();
    for &n in &LENGTHS {
        for (k, scale) in [1.0f32, 8.0, 120.0].into_iter().enumerate() {
            let g = rand_vec(n, (n * 5 + k) as u64);
            cases.push((
                g.iter().map(|v| v * scale).collect(),
                rand_vec(n, 99 + n as u64),
            ));
        }
    }
    let sp = specials();
    let ones = vec![1.0f32; sp.len()];
    cases.push((sp.clone(), ones));
    cases.push((sp.clone(), sp.iter().rev().copied().collect()));
    // `up` longer or shorter than `gate`: only the common prefix is touched.
    cases.push((rand_vec(37, 1), rand_vec(20, 2)));
    cases.push((rand_vec(20, 3), rand_vec(37, 4)));
    for isa in isas() {
        for (g, u) in &cases {
            let mut want = g.clone();
            silu_mul(&mut want, u);
            let mut got = g.clone();
            silu_mul_isa(isa, &mut got, u);
            same_bits(&got, &want, &format!("silu_mul {isa:?} n={}", g.len()));
        }
    }
}

#[test]
fn add_inplace_is_bit_identical_on_every_isa() {
    for isa in isas() {
        for &n in &LENGTHS {
            let a = rand_vec(n, n as u64);
            let b = rand_vec(n + 3, 7 + n as u64);
            let mut want = a.clone();
            add_inplace(&mut want, &b);
            let mut got = a.clone();
            add_inplace_isa(isa, &mut got, &b);
            same_bits(&got, &want, &format!("add_inplace {isa:?} n={n}"));
        }
        let sp = specials();
        let mut want = sp.clone();
        add_inplace(&mut want, &sp);
        let mut got = sp.clone();
        add_inplace_isa(isa, &mut got, &sp);
        same_bits(&got, &want, &format!("add_inplace {isa:?} specials"));
    }
}

#[test]
fn rope_rows_is_bit_identical_on_every_isa() {
    // (rows, heads, head_dim, stride): model shapes (text 64/128, vision 80), half-widths
    // that are not multiples of 8 or 16, odd head_dim (last element untouched), padding
    // between rows (must stay untouched), no rows.
    let shapes = [
        (0, 2, 8, 16),
        (1, 1, 2, 2),
        (1, 1, 5, 5),
        (3, 2, 30, 64),
        (5, 3, 34, 110),
        (4, 14, 64, 896),
        (3, 2, 64, 128),
        (7, 16, 80, 1280),
        (2, 2, 128, 300),
        (9, 1, 6, 7),
        (2, 4, 66, 264),
    ];
    for isa in isas() {
        for &(rows, nh, hd, stride) in &shapes {
            let len = if rows == 0 {
                0
            } else {
                (rows - 1) * stride + nh * hd
            };
            let x: Vec<f32> = rand_vec(len + 5, (rows * hd) as u64)
                .iter()
                .map(|v| v * 10.0)
                .collect();
            let ang = rand_vec(rows * hd, 17 + stride as u64);
            let cos: Vec<f32> = ang.iter().map(|a| (a * 3.0).cos()).collect();
            let sin: Vec<f32> = ang.iter().map(|a| (a * 3.0).sin()).collect();
            let mut want = x.clone();
            rope_rows_ref(&mut want, rows, nh, hd, stride, &cos, &sin);
            let mut got = x.clone();
            rope_rows(isa, &mut got, rows, nh, hd, stride, &cos, &sin);
            same_bits(
                &got,
                &want,
                &format!("rope {isa:?} rows={rows} heads={nh} hd={hd} stride={stride}"),
            );
        }
    }
}

/// Rows of width `d`: random at mixed scales, an all-zero row, an all-negative-zero row and
/// a constant row (zero variance).
fn norm_rows(rows: usize, d: usize) -> Vec<f32> {
    let mut x: Vec<f32> = rand_vec(rows * d, (rows * 31 + d) as u64)
        .iter()
        .enumerate()
        .map(|(i, v)| v * (1 + i % 7 * 30) as f32 + (i / d % 3) as f32)
        .collect();
    if rows > 3 {
        x[d..2 * d].fill(0.0);
        x[2 * d..3 * d].fill(-0.0);
        x[3 * d..4 * d].fill(2.5);
    }
    x
}

const NORM_WIDTHS: [usize; 8] = [1, 3, 15, 16, 17, 64, 896, 1001];
const NORM_ROWS: [usize; 11] = [0, 1, 3, 4, 5, 7, 8, 9, 16, 17, 33];

#[test]
fn rms_norm_rows_is_bit_identical_on_every_isa() {
    for isa in isas() {
        for d in NORM_WIDTHS {
            for rows in NORM_ROWS {
                let x = norm_rows(rows, d);
                let w = rand_vec(d, 5 + d as u64);
                for eps in [1e-6f32, 0.0] {
                    let mut want = vec![f32::NAN; rows * d + 2];
                    rms_norm_rows_ref(&x, &w, eps, &mut want);
                    let mut got = vec![f32::NAN; rows * d + 2];
                    rms_norm_rows(isa, &x, &w, eps, &mut got);
                    same_bits(
                        &got,
                        &want,
                        &format!("rms_norm {isa:?} rows={rows} d={d} eps={eps}"),
                    );
                }
            }
        }
    }
}

#[test]
fn layer_norm_rows_is_bit_identical_on_every_isa() {
    for isa in isas() {
        for d in NORM_WIDTHS {
            for rows in NORM_ROWS {
                let x = norm_rows(rows, d);
                let w = rand_vec(d, 5 + d as u64);
                let b = rand_vec(d, 6 + d as u64);
                let zero_b = vec![0f32; d];
                for (eps, b) in [(1e-6f32, &b), (0.0, &b), (1e-6, &zero_b)] {
                    let mut want = vec![f32::NAN; rows * d + 2];
                    layer_norm_rows_ref(&x, &w, b, eps, &mut want);
                    let mut got = vec![f32::NAN; rows * d + 2];
                    layer_norm_rows(isa, &x, &w, b, eps, &mut got);
                    same_bits(
                        &got,
                        &want,
                        &format!("layer_norm {isa:?} rows={rows} d={d} eps={eps}"),
                    );
                }
            }
        }
    }
}

#[test]
fn rms_norm_rows_equals_the_per_row_kernel() {
    // The reference of the row kernel is the long-standing per-row `rms_norm`.
    let (d, rows) = (17, 5);
    let x = rand_vec(rows * d, 3);
    let w = rand_vec(d, 4);
    let mut a = vec![0f32; rows * d];
    rms_norm_rows_ref(&x, &w, 1e-6, &mut a);
    for r in 0..rows {
        let mut b = vec![0f32; d];
        dvl_kernels::norm::rms_norm(&x[r * d..(r + 1) * d], &w, 1e-6, &mut b);
        same_bits(&a[r * d..(r + 1) * d], &b, "row");
    }
}
