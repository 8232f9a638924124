//! Normalisations. Statistics are accumulated in f64: it costs nothing next to the matmuls
//! and keeps the result within rounding of the float64 golden data (spec §11 items 2–3).

use crate::WeightElem;

/// RMSNorm (spec §7.1): `out = w ⊙ (x / sqrt(mean(x²) + eps))`.
pub fn rms_norm<W: WeightElem>(x: &[f32], w: &[W], eps: f32, out: &mut [f32]) {
    let n = x.len();
    let mut ss = 0f64;
    for &v in x {
        ss += (v as f64) * (v as f64);
    }
    let inv = 1.0 / libm::sqrt(ss / n as f64 + eps as f64);
    for i in 0..n {
        out[i] = ((x[i] as f64 * inv) as f32) * w[i].to_f32();
    }
}

/// LayerNorm with affine weight and bias (SigLIP, spec §5.2).
pub fn layer_norm<W: WeightElem>(x: &[f32], w: &[W], b: &[W], eps: f32, out: &mut [f32]) {
    let n = x.len() as f64;
    let mean = x.iter().map(|&v| v as f64).sum::<f64>() / n;
    let var = x
        .iter()
        .map(|&v| (v as f64 - mean) * (v as f64 - mean))
        .sum::<f64>()
        / n;
    let inv = 1.0 / libm::sqrt(var + eps as f64);
    for i in 0..x.len() {
        out[i] = (((x[i] as f64 - mean) * inv) as f32) * w[i].to_f32() + b[i].to_f32();
    }
}

/// [`rms_norm`] of each `w.len()`-wide row of `x` into `out` (as many whole rows as both
/// hold): the reference, one row at a time.
pub fn rms_norm_rows_ref(x: &[f32], w: &[f32], eps: f32, out: &mut [f32]) {
    let d = w.len();
    if d == 0 {
        return;
    }
    for (xr, or) in x.chunks_exact(d).zip(out.chunks_exact_mut(d)) {
        rms_norm(xr, w, eps, or);
    }
}

dispatch! {
    /// [`rms_norm_rows_ref`] for `isa`, bit-identical to it. The sum of squares is one f64
    /// chain per row in element order, as in [`rms_norm`]; the vector code runs the chains
    /// of 8 (AVX-512) or 4 (AVX2) rows side by side, one row per lane, so it keeps that
    /// order while doing several rows per instruction. The output pass is vectorised
    /// along the row.
    pub fn rms_norm_rows(x: &[f32], w: &[f32], eps: f32, out: &mut [f32])
        => rms_norm_v::<__m512d | __m256d>, else rms_norm_rows_ref
}

#[cfg(target_arch = "x86_64")]
use core::arch::x86_64::{__m256d, __m512d};

#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn rms_norm_v<V: crate::simd::F64x>(x: &[f32], w: &[f32], eps: f32, out: &mut [f32]) {
    let d = w.len();
    if d == 0 {
        return;
    }
    let rows = (x.len() / d).min(out.len() / d);
    // Gather offsets are i32: rows of a batch must lie within 2³¹ elements.
    let batched = if d
        .checked_mul(V::LANES)
        .is_some_and(|s| s <= i32::MAX as usize)
    {
        rows / V::LANES * V::LANES
    } else {
        0
    };
    let n = d as f64;
    let (xp, wp, op) = (x.as_ptr(), w.as_ptr(), out.as_mut_ptr());
    let mut r0 = 0;
    while r0 < batched {
        let base = xp.add(r0 * d);
        let mut ss = V::splat(0.0);
        for j in 0..d {
            let v = V::gather_f32(base.add(j), d);
            ss = ss.add(v.mul(v));
        }
        let inv = V::splat(1.0).div(ss.div(V::splat(n)).add(V::splat(eps as f64)).sqrt());
        let mut invs = [0f64; 8];
        inv.store(invs.as_mut_ptr());
        for (l, &inv) in invs[..V::LANES].iter().enumerate() {
            let r = r0 + l;
            let inv = V::splat(inv);
            let (xr, or) = (xp.add(r * d), op.add(r * d));
            let mut j = 0;
            while j < d {
                let t = V::LANES.min(d - j);
                // ((x as f64 · inv) as f32) · w
                let y = V::load_f32_n(xr.add(j), t).mul(inv).narrow();
                let y = V::narrow_mul(y, V::load_narrow(wp.add(j), t));
                V::store_narrow(y, or.add(j), t);
                j += t;
            }
        }
        r0 += V::LANES;
    }
    rms_norm_rows_ref(
        &x[batched * d..rows * d],
        w,
        eps,
        &mut out[batched * d..rows * d],
    );
}

/// [`layer_norm`] of each `w.len()`-wide row of `x` into `out` (as many whole rows as both
/// hold): the reference, one row at a time.
pub fn layer_norm_rows_ref(x: &[f32], w: &[f32], b: &[f32], eps: f32, out: &mut [f32]) {
    let d = w.len();
    if d == 0 {
        return;
    }
    for (xr, or) in x.chunks_exact(d).zip(out.chunks_exact_mut(d)) {
        layer_norm(xr, w, b, eps, or);
    }
}

dispatch! {
    /// [`layer_norm_rows_ref`] for `isa`, bit-identical to it: the mean and the variance
    /// are f64 chains per row in element order (started from the value `Iterator::sum`
    /// starts from, as the reference), 8 or 4 rows side by side as in [`rms_norm_rows`].
    pub fn layer_norm_rows(x: &[f32], w: &[f32], b: &[f32], eps: f32, out: &mut [f32])
        => layer_norm_v::<__m512d | __m256d>, else layer_norm_rows_ref
}

#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn layer_norm_v<V: crate::simd::F64x>(
    x: &[f32],
    w: &[f32],
    b: &[f32],
    eps: f32,
    out: &mut [f32],
) {
    let d = w.len();
    if d == 0 {
        return;
    }
    assert!(b.len() >= d, "layer_norm: bias too short");
    let rows = (x.len() / d).min(out.len() / d);
    let batched = if d
        .checked_mul(V::LANES)
        .is_some_and(|s| s <= i32::MAX as usize)
    {
        rows / V::LANES * V::LANES
    } else {
        0
    };
    // `Iterator::sum` for floats folds from -0.0 in current Rust (0.0 in older releases).
    let start = V::splat(core::iter::empty::<f64>().sum::<f64>());
    let n = V::splat(d as f64);
    let (xp, wp, bp, op) = (x.as_ptr(), w.as_ptr(), b.as_ptr(), out.as_mut_ptr());
    let mut r0 = 0;
    while r0 < batched {
        let base = xp.add(r0 * d);
        let mut sum = start;
        for j in 0..d {
            sum = sum.add(V::gather_f32(base.add(j), d));
        }
        let mean = sum.div(n);
        let mut ss = start;
        for j in 0..d {
            let v = V::gather_f32(base.add(j), d).sub(mean);
            ss = ss.add(v.mul(v));
        }
        let inv = V::splat(1.0).div(ss.div(n).add(V::splat(eps as f64)).sqrt());
        let (mut means, mut invs) = ([0f64; 8], [0f64; 8]);
        mean.store(means.as_mut_ptr());
        inv.store(invs.as_mut_ptr());
        for l in 0..V::LANES {
            let r = r0 + l;
            let (mean, inv) = (V::splat(means[l]), V::splat(invs[l]));
            let (xr, or) = (xp.add(r * d), op.add(r * d));
            let mut j = 0;
            while j < d {
                let t = V::LANES.min(d - j);
                // (((x as f64 − mean) · inv) as f32) · w + b
                let y = V::load_f32_n(xr.add(j), t).sub(mean).mul(inv).narrow();
                let y = V::narrow_mul(y, V::load_narrow(wp.add(j), t));
                let y = V::narrow_add(y, V::load_narrow(bp.add(j), t));
                V::store_narrow(y, or.add(j), t);
                j += t;
            }
        }
        r0 += V::LANES;
    }
    layer_norm_rows_ref(
        &x[batched * d..rows * d],
        w,
        b,
        eps,
        &mut out[batched * d..rows * d],
    );
}
