//! Branch-free f32 exponential that LLVM vectorises (libm's `expf` is a scalar call, and the
//! unmasking pass evaluates ~1.2M of them per denoising step).

const LOG2E: f32 = core::f32::consts::LOG2_E;
/// ln 2 split in two so `n·ln2` is exact in the first part (Cody–Waite reduction).
const LN2_HI: f32 = 0.693_359_4; // 0.693359375 = 355/512, exact in f32
const LN2_LO: f32 = -2.121_944_4e-4;
/// 1.5·2²³: adding and subtracting it rounds to the nearest integer in f32.
const ROUND: f32 = 12_582_912.0;

/// Below this `exp_f32` is 0, above [`HI`] +inf.
const LO: f32 = -87.3;
const HI: f32 = 88.7;
/// Minimax polynomial for e^r on |r| <= ln2/2 (Cephes expf coefficients), highest first.
const P: [f32; 6] = [
    1.987_569_1e-4,
    1.398_199_9e-3,
    8.333_452e-3,
    4.166_579_6e-2,
    1.666_666_5e-1,
    0.5,
];

/// `e^x` within ~2 ulp for x in [-87.3, 88.7]; 0 below, +inf above.
#[inline(always)]
pub fn exp_f32(x: f32) -> f32 {
    let xc = x.clamp(LO, HI);
    let t = xc * LOG2E + ROUND;
    let n = t - ROUND;
    let r = xc - n * LN2_HI - n * LN2_LO;
    let mut p = P[0];
    p = p * r + P[1];
    p = p * r + P[2];
    p = p * r + P[3];
    p = p * r + P[4];
    p = p * r + P[5];
    let e = p * r * r + r + 1.0;
    // 2ⁿ straight from t's bits: t = 1.5·2²³ + n has ulp 1, so its low mantissa bits hold
    // n (offset by ROUND's bits). Integer ops only: a float→int cast (`n as i32`) saturates
    // and checks NaN lane by lane, which stops LLVM from vectorising the whole loop.
    let scale = f32::from_bits(
        t.to_bits()
            .wrapping_sub(ROUND.to_bits())
            .wrapping_add(127)
            .wrapping_shl(23),
    );
    let v = e * scale;
    let v = if x < LO { 0.0 } else { v };
    if x > HI {
        f32::INFINITY
    } else {
        v
    }
}

/// [`exp_f32`] on vector lanes: the same operations in the same order (bit-identical,
/// NaN propagated as by `f32::clamp`).
#[cfg(target_arch = "x86_64")]
#[inline(always)]
pub(crate) unsafe fn exp_v<V: crate::simd::F32x>(x: V) -> V {
    // max(lo, x) returns x when x is NaN (x86 rule: second operand), min likewise.
    let xc = V::splat(HI).min(V::splat(LO).max(x));
    let t = xc.mul(V::splat(LOG2E)).add(V::splat(ROUND));
    let n = t.sub(V::splat(ROUND));
    let r = xc.sub(n.mul(V::splat(LN2_HI))).sub(n.mul(V::splat(LN2_LO)));
    let mut p = V::splat(P[0]);
    for &k in &P[1..] {
        p = p.mul(r).add(V::splat(k));
    }
    let e = p.mul(r).mul(r).add(r).add(V::splat(1.0));
    let bias = V::isplat(127i32.wrapping_sub(ROUND.to_bits() as i32));
    let v = e.mul(V::shl23(t.to_bits(), bias));
    let v = V::select(x.lt(V::splat(LO)), V::splat(0.0), v);
    V::select(x.gt(V::splat(HI)), V::splat(f32::INFINITY), v)
}

/// `2^f` on f ∈ [−½, ½] by its degree-6 Taylor polynomial: (ln 2)^i / i!, i = 6 … 1
/// (then 1), for [`exp2_avx512`] and [`exp2_avx2`].
#[cfg(target_arch = "x86_64")]
const EXP2_POLY: [f32; 6] = [
    1.540_353e-4,
    1.333_355_8e-3,
    9.618_129e-3,
    5.550_411e-2,
    0.240_226_5,
    core::f32::consts::LN_2,
];

/// `2^t` on 16 lanes: t split into an integer n (`vrndscaleps`) and f ∈ [−½, ½], `2^f` by
/// its degree-6 Taylor polynomial (relative error ~1e-7), scaled by 2ⁿ with `vscalefps`:
/// 11 operations where [`exp_f32`]'s algorithm takes 18. Below 2⁻²⁰⁰ (and for −∞) the
/// result is exactly 0. For the exponentials of softmax rows, whose callers form
/// `t = (x − m)·log2 e` as their accuracy needs.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
pub(crate) unsafe fn exp2_avx512(t: core::arch::x86_64::__m512) -> core::arch::x86_64::__m512 {
    use core::arch::x86_64::*;
    let t = _mm512_max_ps(t, _mm512_set1_ps(-200.0));
    let n = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(t);
    let f = _mm512_sub_ps(t, n);
    let mut p = _mm512_set1_ps(EXP2_POLY[0]);
    for &c in &EXP2_POLY[1..] {
        p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(c));
    }
    _mm512_scalef_ps(_mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0)), n)
}

/// `2^t` on 8 lanes with AVX2 + FMA, for `t ≤ 0` (softmax exponentials): the polynomial
/// of [`exp2_avx512`], n by `vroundps`, and 2ⁿ written into the exponent field. AVX2 has
/// no `vscalefps`, so t is first raised to −125 (2ⁿ stays a normal number): below that
/// the result is ~2⁻¹²⁵ instead of 0, nothing next to a softmax sum of at least 1.
/// 14 operations where [`exp_f32`]'s algorithm takes ~30 without FMA.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
pub(crate) unsafe fn exp2_avx2(t: core::arch::x86_64::__m256) -> core::arch::x86_64::__m256 {
    use core::arch::x86_64::*;
    let t = _mm256_max_ps(t, _mm256_set1_ps(-125.0));
    let n = _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(t);
    let f = _mm256_sub_ps(t, n);
    let mut p = _mm256_set1_ps(EXP2_POLY[0]);
    for &c in &EXP2_POLY[1..] {
        p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(c));
    }
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.0));
    let bits = _mm256_slli_epi32::<23>(_mm256_add_epi32(
        _mm256_cvtps_epi32(n),
        _mm256_set1_epi32(127),
    ));
    _mm256_mul_ps(p, _mm256_castsi256_ps(bits))
}

#[cfg(test)]
mod tests {
    #[test]
    fn exp_is_accurate_over_its_range() {
        let mut worst = 0f64;
        let mut x = -87.0f32;
        while x < 88.0 {
            let want = (x as f64).exp();
            let got = super::exp_f32(x) as f64;
            worst = worst.max(((got - want) / want).abs());
            x += 0.0137;
        }
        assert!(worst < 3e-7, "worst relative error {worst}");
        assert_eq!(super::exp_f32(-200.0), 0.0);
        assert_eq!(super::exp_f32(0.0), 1.0);
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn exp2_avx2_is_accurate_for_softmax_exponents() {
        use core::arch::x86_64::*;
        if crate::cpu::detect_isa() == crate::matmul::Isa::Portable {
            return;
        }
        let mut worst = 0f64;
        let mut t = -124.9f32;
        while t <= 0.0 {
            // SAFETY: detect_isa found AVX2 + FMA with OS support.
            let got = unsafe {
                let mut out = [0f32; 8];
                _mm256_storeu_ps(out.as_mut_ptr(), super::exp2_avx2(_mm256_set1_ps(t)));
                out[0]
            } as f64;
            let want = (t as f64).exp2();
            worst = worst.max(((got - want) / want).abs());
            t += 0.0071;
        }
        assert!(worst < 3e-7, "worst relative error {worst}");
        // Far below: clamped to 2^-125 (normal), never NaN or negative.
        // SAFETY: as above.
        let tiny = unsafe {
            let mut out = [0f32; 8];
            _mm256_storeu_ps(
                out.as_mut_ptr(),
                super::exp2_avx2(_mm256_set1_ps(f32::NEG_INFINITY)),
            );
            out[0]
        };
        assert!(tiny > 0.0 && tiny < 1e-37 && tiny.is_normal(), "{tiny}");
    }
}
