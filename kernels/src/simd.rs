//! Lane-generic vectors for the element-wise kernels (activations, residual adds, RoPE,
//! RMSNorm): one body per kernel, compiled for AVX-512 and for AVX2.
//!
//! Every arithmetic method is one IEEE operation (no FMA, no reassociation, no approximate
//! reciprocal), so a body that applies them in the order of the scalar reference rounds
//! exactly like it: the vector kernels are bit-identical to the references, whichever lane
//! or tail an element lands in. `min`/`max` keep the x86 operand rule (the *second* operand
//! is returned when either is NaN), which bodies use to propagate NaN like `f32::clamp`.
//!
//! Methods are `unsafe` and `#[inline(always)]`: they must only run inside a function
//! compiled with the matching `#[target_feature]` (the `dispatch!` macro in lib.rs makes
//! those wrappers).

#![allow(clippy::missing_safety_doc)]

use core::arch::x86_64::*;

/// f32 lanes.
pub(crate) trait F32x: Copy {
    const LANES: usize;
    type Mask: Copy;
    /// i32 lanes (bit patterns and converted integers).
    type I: Copy;
    unsafe fn splat(v: f32) -> Self;
    unsafe fn load(p: *const f32) -> Self;
    unsafe fn store(self, p: *mut f32);
    /// The first `n < LANES` lanes from `p`, the rest 0 (nothing past `p + n` is read).
    unsafe fn load_part(p: *const f32, n: usize) -> Self;
    /// Store the first `n < LANES` lanes (nothing past `p + n` is written).
    unsafe fn store_part(self, p: *mut f32, n: usize);
    unsafe fn add(self, b: Self) -> Self;
    unsafe fn sub(self, b: Self) -> Self;
    unsafe fn mul(self, b: Self) -> Self;
    unsafe fn div(self, b: Self) -> Self;
    /// x86 `minps`: `b` when either is NaN.
    unsafe fn min(self, b: Self) -> Self;
    /// x86 `maxps`: `b` when either is NaN.
    unsafe fn max(self, b: Self) -> Self;
    /// `self < b` (false for NaN).
    unsafe fn lt(self, b: Self) -> Self::Mask;
    /// `self > b` (false for NaN).
    unsafe fn gt(self, b: Self) -> Self::Mask;
    /// `!(self < b)` (true for NaN).
    unsafe fn nlt(self, b: Self) -> Self::Mask;
    /// `m ? t : f` per lane.
    unsafe fn select(m: Self::Mask, t: Self, f: Self) -> Self;
    unsafe fn any(m: Self::Mask) -> bool;
    /// Sign bit cleared.
    unsafe fn abs(self) -> Self;
    /// Sign bit flipped (exactly `-x`, also for 0 and NaN).
    unsafe fn neg(self) -> Self;
    /// `self` with its sign bit xor-ed with the sign bit of `s`.
    unsafe fn xor_sign(self, s: Self) -> Self;
    unsafe fn to_bits(self) -> Self::I;
    unsafe fn isplat(v: i32) -> Self::I;
    /// `from_bits((bits + c) << 23)`, wrapping: 2ⁿ built in the exponent field.
    unsafe fn shl23(i: Self::I, c: Self::I) -> Self;
    /// Truncating conversion to i32 (`x as i32` for in-range x).
    unsafe fn cvtt(self) -> Self::I;
    /// i32 → f32 (`k as f32`).
    unsafe fn from_i(i: Self::I) -> Self;

    #[inline(always)]
    unsafe fn splat_bits(bits: u32) -> Self {
        Self::splat(f32::from_bits(bits))
    }
    /// `n <= LANES` values: a whole vector or a masked part.
    #[inline(always)]
    unsafe fn load_n(p: *const f32, n: usize) -> Self {
        if n == Self::LANES {
            Self::load(p)
        } else {
            Self::load_part(p, n)
        }
    }
    #[inline(always)]
    unsafe fn store_n(self, p: *mut f32, n: usize) {
        if n == Self::LANES {
            self.store(p)
        } else {
            self.store_part(p, n)
        }
    }
}

/// f64 lanes, read from f32 memory (`x as f64`) and narrowed back (`y as f32`).
pub(crate) trait F64x: Copy {
    const LANES: usize;
    type Mask: Copy;
    unsafe fn splat(v: f64) -> Self;
    /// `LANES` f32 from `p`, widened.
    unsafe fn load_f32(p: *const f32) -> Self;
    /// The first `n < LANES` f32 from `p`, widened; the rest 0.
    unsafe fn load_f32_part(p: *const f32, n: usize) -> Self;
    /// Lane `l` is `*(p + l·stride)` widened (`stride·LANES` must fit an i32).
    unsafe fn gather_f32(p: *const f32, stride: usize) -> Self;
    /// f32 lanes as many as `Self` has f64 lanes (`__m256` for `__m512d`, `__m128` for
    /// `__m256d`), for the f32 arithmetic after a narrowing.
    type Narrow: Copy;
    /// Rounded to f32 (nearest-even, `as f32`).
    unsafe fn narrow(self) -> Self::Narrow;
    /// `n <= LANES` f32 at `p` (masked when `n < LANES`), as the narrow lanes.
    unsafe fn load_narrow(p: *const f32, n: usize) -> Self::Narrow;
    unsafe fn store_narrow(v: Self::Narrow, p: *mut f32, n: usize);
    unsafe fn narrow_mul(a: Self::Narrow, b: Self::Narrow) -> Self::Narrow;
    unsafe fn narrow_add(a: Self::Narrow, b: Self::Narrow) -> Self::Narrow;
    unsafe fn store(self, p: *mut f64);
    #[cfg(test)]
    unsafe fn load(p: *const f64) -> Self;
    unsafe fn add(self, b: Self) -> Self;
    unsafe fn sub(self, b: Self) -> Self;
    unsafe fn mul(self, b: Self) -> Self;
    unsafe fn div(self, b: Self) -> Self;
    unsafe fn sqrt(self) -> Self;
    /// `self < b` (false for NaN).
    unsafe fn lt(self, b: Self) -> Self::Mask;
    /// `!(self < b)` (true for NaN).
    unsafe fn nlt(self, b: Self) -> Self::Mask;
    unsafe fn select(m: Self::Mask, t: Self, f: Self) -> Self;
    unsafe fn any(m: Self::Mask) -> bool;
    unsafe fn abs(self) -> Self;
    unsafe fn neg(self) -> Self;
    /// `self` with its sign bit xor-ed with the sign bit of `s`.
    unsafe fn xor_sign(self, s: Self) -> Self;
    /// Low 32 bits of each lane cleared (fdlibm's `SET_LOW_WORD(x, 0)`).
    unsafe fn clear_low_word(self) -> Self;
    /// `(self as i32) as f64`: truncation toward zero, for |self| < 2³¹.
    unsafe fn trunc_i32(self) -> Self;
    /// `2^self` for integral lanes in the normal exponent range (exact).
    unsafe fn pow2i(self) -> Self;

    /// `n <= LANES` f32: a whole vector or a masked part.
    #[inline(always)]
    unsafe fn load_f32_n(p: *const f32, n: usize) -> Self {
        if n == Self::LANES {
            Self::load_f32(p)
        } else {
            Self::load_f32_part(p, n)
        }
    }
}

const SIGN32: i32 = i32::MIN;
const SIGN64: i64 = i64::MIN;

// ------------------------------------------------------------------------------ AVX-512

#[inline(always)]
fn mask16(n: usize) -> __mmask16 {
    ((1u32 << n) - 1) as __mmask16
}

#[inline(always)]
fn mask8(n: usize) -> __mmask8 {
    ((1u32 << n) - 1) as __mmask8
}

impl F32x for __m512 {
    const LANES: usize = 16;
    type Mask = __mmask16;
    type I = __m512i;
    #[inline(always)]
    unsafe fn splat(v: f32) -> Self {
        _mm512_set1_ps(v)
    }
    #[inline(always)]
    unsafe fn load(p: *const f32) -> Self {
        _mm512_loadu_ps(p)
    }
    #[inline(always)]
    unsafe fn store(self, p: *mut f32) {
        _mm512_storeu_ps(p, self)
    }
    #[inline(always)]
    unsafe fn load_part(p: *const f32, n: usize) -> Self {
        _mm512_maskz_loadu_ps(mask16(n), p)
    }
    #[inline(always)]
    unsafe fn store_part(self, p: *mut f32, n: usize) {
        _mm512_mask_storeu_ps(p, mask16(n), self)
    }
    #[inline(always)]
    unsafe fn add(self, b: Self) -> Self {
        _mm512_add_ps(self, b)
    }
    #[inline(always)]
    unsafe fn sub(self, b: Self) -> Self {
        _mm512_sub_ps(self, b)
    }
    #[inline(always)]
    unsafe fn mul(self, b: Self) -> Self {
        _mm512_mul_ps(self, b)
    }
    #[inline(always)]
    unsafe fn div(self, b: Self) -> Self {
        _mm512_div_ps(self, b)
    }
    #[inline(always)]
    unsafe fn min(self, b: Self) -> Self {
        _mm512_min_ps(self, b)
    }
    #[inline(always)]
    unsafe fn max(self, b: Self) -> Self {
        _mm512_max_ps(self, b)
    }
    #[inline(always)]
    unsafe fn lt(self, b: Self) -> Self::Mask {
        _mm512_cmp_ps_mask::<_CMP_LT_OQ>(self, b)
    }
    #[inline(always)]
    unsafe fn gt(self, b: Self) -> Self::Mask {
        _mm512_cmp_ps_mask::<_CMP_GT_OQ>(self, b)
    }
    #[inline(always)]
    unsafe fn nlt(self, b: Self) -> Self::Mask {
        _mm512_cmp_ps_mask::<_CMP_NLT_UQ>(self, b)
    }
    #[inline(always)]
    unsafe fn select(m: Self::Mask, t: Self, f: Self) -> Self {
        _mm512_mask_blend_ps(m, f, t)
    }
    #[inline(always)]
    unsafe fn any(m: Self::Mask) -> bool {
        m != 0
    }
    #[inline(always)]
    unsafe fn abs(self) -> Self {
        _mm512_castsi512_ps(_mm512_andnot_si512(
            _mm512_set1_epi32(SIGN32),
            _mm512_castps_si512(self),
        ))
    }
    #[inline(always)]
    unsafe fn neg(self) -> Self {
        _mm512_castsi512_ps(_mm512_xor_si512(
            _mm512_castps_si512(self),
            _mm512_set1_epi32(SIGN32),
        ))
    }
    #[inline(always)]
    unsafe fn xor_sign(self, s: Self) -> Self {
        let sign = _mm512_and_si512(_mm512_castps_si512(s), _mm512_set1_epi32(SIGN32));
        _mm512_castsi512_ps(_mm512_xor_si512(_mm512_castps_si512(self), sign))
    }
    #[inline(always)]
    unsafe fn to_bits(self) -> Self::I {
        _mm512_castps_si512(self)
    }
    #[inline(always)]
    unsafe fn isplat(v: i32) -> Self::I {
        _mm512_set1_epi32(v)
    }
    #[inline(always)]
    unsafe fn shl23(i: Self::I, c: Self::I) -> Self {
        _mm512_castsi512_ps(_mm512_slli_epi32::<23>(_mm512_add_epi32(i, c)))
    }
    #[inline(always)]
    unsafe fn cvtt(self) -> Self::I {
        _mm512_cvttps_epi32(self)
    }
    #[inline(always)]
    unsafe fn from_i(i: Self::I) -> Self {
        _mm512_cvtepi32_ps(i)
    }
}

impl F64x for __m512d {
    const LANES: usize = 8;
    type Mask = __mmask8;
    #[inline(always)]
    unsafe fn splat(v: f64) -> Self {
        _mm512_set1_pd(v)
    }
    #[inline(always)]
    unsafe fn load_f32(p: *const f32) -> Self {
        _mm512_cvtps_pd(_mm256_loadu_ps(p))
    }
    #[inline(always)]
    unsafe fn load_f32_part(p: *const f32, n: usize) -> Self {
        _mm512_cvtps_pd(_mm256_maskz_loadu_ps(mask8(n), p))
    }
    #[inline(always)]
    unsafe fn gather_f32(p: *const f32, stride: usize) -> Self {
        let s = stride as i32;
        let idx = _mm256_setr_epi32(0, s, 2 * s, 3 * s, 4 * s, 5 * s, 6 * s, 7 * s);
        _mm512_cvtps_pd(_mm256_i32gather_ps::<4>(p, idx))
    }
    type Narrow = __m256;
    #[inline(always)]
    unsafe fn narrow(self) -> __m256 {
        _mm512_cvtpd_ps(self)
    }
    #[inline(always)]
    unsafe fn load_narrow(p: *const f32, n: usize) -> __m256 {
        if n == 8 {
            _mm256_loadu_ps(p)
        } else {
            _mm256_maskz_loadu_ps(mask8(n), p)
        }
    }
    #[inline(always)]
    unsafe fn store_narrow(v: __m256, p: *mut f32, n: usize) {
        if n == 8 {
            _mm256_storeu_ps(p, v)
        } else {
            _mm256_mask_storeu_ps(p, mask8(n), v)
        }
    }
    #[inline(always)]
    unsafe fn narrow_mul(a: __m256, b: __m256) -> __m256 {
        _mm256_mul_ps(a, b)
    }
    #[inline(always)]
    unsafe fn narrow_add(a: __m256, b: __m256) -> __m256 {
        _mm256_add_ps(a, b)
    }
    #[inline(always)]
    unsafe fn store(self, p: *mut f64) {
        _mm512_storeu_pd(p, self)
    }
    #[cfg(test)]
    #[inline(always)]
    unsafe fn load(p: *const f64) -> Self {
        _mm512_loadu_pd(p)
    }
    #[inline(always)]
    unsafe fn add(self, b: Self) -> Self {
        _mm512_add_pd(self, b)
    }
    #[inline(always)]
    unsafe fn sub(self, b: Self) -> Self {
        _mm512_sub_pd(self, b)
    }
    #[inline(always)]
    unsafe fn mul(self, b: Self) -> Self {
        _mm512_mul_pd(self, b)
    }
    #[inline(always)]
    unsafe fn div(self, b: Self) -> Self {
        _mm512_div_pd(self, b)
    }
    #[inline(always)]
    unsafe fn sqrt(self) -> Self {
        _mm512_sqrt_pd(self)
    }
    #[inline(always)]
    unsafe fn lt(self, b: Self) -> Self::Mask {
        _mm512_cmp_pd_mask::<_CMP_LT_OQ>(self, b)
    }
    #[inline(always)]
    unsafe fn nlt(self, b: Self) -> Self::Mask {
        _mm512_cmp_pd_mask::<_CMP_NLT_UQ>(self, b)
    }
    #[inline(always)]
    unsafe fn select(m: Self::Mask, t: Self, f: Self) -> Self {
        _mm512_mask_blend_pd(m, f, t)
    }
    #[inline(always)]
    unsafe fn any(m: Self::Mask) -> bool {
        m != 0
    }
    #[inline(always)]
    unsafe fn abs(self) -> Self {
        _mm512_castsi512_pd(_mm512_andnot_si512(
            _mm512_set1_epi64(SIGN64),
            _mm512_castpd_si512(self),
        ))
    }
    #[inline(always)]
    unsafe fn neg(self) -> Self {
        _mm512_castsi512_pd(_mm512_xor_si512(
            _mm512_castpd_si512(self),
            _mm512_set1_epi64(SIGN64),
        ))
    }
    #[inline(always)]
    unsafe fn xor_sign(self, s: Self) -> Self {
        let sign = _mm512_and_si512(_mm512_castpd_si512(s), _mm512_set1_epi64(SIGN64));
        _mm512_castsi512_pd(_mm512_xor_si512(_mm512_castpd_si512(self), sign))
    }
    #[inline(always)]
    unsafe fn clear_low_word(self) -> Self {
        _mm512_castsi512_pd(_mm512_and_si512(
            _mm512_castpd_si512(self),
            _mm512_set1_epi64(-1i64 << 32),
        ))
    }
    #[inline(always)]
    unsafe fn trunc_i32(self) -> Self {
        _mm512_cvtepi32_pd(_mm512_cvttpd_epi32(self))
    }
    #[inline(always)]
    unsafe fn pow2i(self) -> Self {
        let k = _mm512_cvtepi32_epi64(_mm512_cvttpd_epi32(self));
        let e = _mm512_slli_epi64::<52>(_mm512_add_epi64(k, _mm512_set1_epi64(1023)));
        _mm512_castsi512_pd(e)
    }
}

// ------------------------------------------------------------------------------ AVX2

/// Lanes `0..n` set (all bits) in an i32 lane mask, for `maskload`/`maskstore`.
#[inline(always)]
unsafe fn lane_mask8(n: usize) -> __m256i {
    _mm256_cmpgt_epi32(
        _mm256_set1_epi32(n as i32),
        _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7),
    )
}

#[inline(always)]
unsafe fn lane_mask4(n: usize) -> __m128i {
    _mm_cmpgt_epi32(_mm_set1_epi32(n as i32), _mm_setr_epi32(0, 1, 2, 3))
}

impl F32x for __m256 {
    const LANES: usize = 8;
    type Mask = __m256;
    type I = __m256i;
    #[inline(always)]
    unsafe fn splat(v: f32) -> Self {
        _mm256_set1_ps(v)
    }
    #[inline(always)]
    unsafe fn load(p: *const f32) -> Self {
        _mm256_loadu_ps(p)
    }
    #[inline(always)]
    unsafe fn store(self, p: *mut f32) {
        _mm256_storeu_ps(p, self)
    }
    #[inline(always)]
    unsafe fn load_part(p: *const f32, n: usize) -> Self {
        _mm256_maskload_ps(p, lane_mask8(n))
    }
    #[inline(always)]
    unsafe fn store_part(self, p: *mut f32, n: usize) {
        _mm256_maskstore_ps(p, lane_mask8(n), self)
    }
    #[inline(always)]
    unsafe fn add(self, b: Self) -> Self {
        _mm256_add_ps(self, b)
    }
    #[inline(always)]
    unsafe fn sub(self, b: Self) -> Self {
        _mm256_sub_ps(self, b)
    }
    #[inline(always)]
    unsafe fn mul(self, b: Self) -> Self {
        _mm256_mul_ps(self, b)
    }
    #[inline(always)]
    unsafe fn div(self, b: Self) -> Self {
        _mm256_div_ps(self, b)
    }
    #[inline(always)]
    unsafe fn min(self, b: Self) -> Self {
        _mm256_min_ps(self, b)
    }
    #[inline(always)]
    unsafe fn max(self, b: Self) -> Self {
        _mm256_max_ps(self, b)
    }
    #[inline(always)]
    unsafe fn lt(self, b: Self) -> Self::Mask {
        _mm256_cmp_ps::<_CMP_LT_OQ>(self, b)
    }
    #[inline(always)]
    unsafe fn gt(self, b: Self) -> Self::Mask {
        _mm256_cmp_ps::<_CMP_GT_OQ>(self, b)
    }
    #[inline(always)]
    unsafe fn nlt(self, b: Self) -> Self::Mask {
        _mm256_cmp_ps::<_CMP_NLT_UQ>(self, b)
    }
    #[inline(always)]
    unsafe fn select(m: Self::Mask, t: Self, f: Self) -> Self {
        _mm256_blendv_ps(f, t, m)
    }
    #[inline(always)]
    unsafe fn any(m: Self::Mask) -> bool {
        _mm256_movemask_ps(m) != 0
    }
    #[inline(always)]
    unsafe fn abs(self) -> Self {
        _mm256_andnot_ps(_mm256_set1_ps(-0.0), self)
    }
    #[inline(always)]
    unsafe fn neg(self) -> Self {
        _mm256_xor_ps(self, _mm256_set1_ps(-0.0))
    }
    #[inline(always)]
    unsafe fn xor_sign(self, s: Self) -> Self {
        _mm256_xor_ps(self, _mm256_and_ps(s, _mm256_set1_ps(-0.0)))
    }
    #[inline(always)]
    unsafe fn to_bits(self) -> Self::I {
        _mm256_castps_si256(self)
    }
    #[inline(always)]
    unsafe fn isplat(v: i32) -> Self::I {
        _mm256_set1_epi32(v)
    }
    #[inline(always)]
    unsafe fn shl23(i: Self::I, c: Self::I) -> Self {
        _mm256_castsi256_ps(_mm256_slli_epi32::<23>(_mm256_add_epi32(i, c)))
    }
    #[inline(always)]
    unsafe fn cvtt(self) -> Self::I {
        _mm256_cvttps_epi32(self)
    }
    #[inline(always)]
    unsafe fn from_i(i: Self::I) -> Self {
        _mm256_cvtepi32_ps(i)
    }
}

impl F64x for __m256d {
    const LANES: usize = 4;
    type Mask = __m256d;
    #[inline(always)]
    unsafe fn splat(v: f64) -> Self {
        _mm256_set1_pd(v)
    }
    #[inline(always)]
    unsafe fn load_f32(p: *const f32) -> Self {
        _mm256_cvtps_pd(_mm_loadu_ps(p))
    }
    #[inline(always)]
    unsafe fn load_f32_part(p: *const f32, n: usize) -> Self {
        _mm256_cvtps_pd(_mm_maskload_ps(p, lane_mask4(n)))
    }
    #[inline(always)]
    unsafe fn gather_f32(p: *const f32, stride: usize) -> Self {
        let s = stride as i32;
        let idx = _mm_setr_epi32(0, s, 2 * s, 3 * s);
        _mm256_cvtps_pd(_mm_i32gather_ps::<4>(p, idx))
    }
    type Narrow = __m128;
    #[inline(always)]
    unsafe fn narrow(self) -> __m128 {
        _mm256_cvtpd_ps(self)
    }
    #[inline(always)]
    unsafe fn load_narrow(p: *const f32, n: usize) -> __m128 {
        if n == 4 {
            _mm_loadu_ps(p)
        } else {
            _mm_maskload_ps(p, lane_mask4(n))
        }
    }
    #[inline(always)]
    unsafe fn store_narrow(v: __m128, p: *mut f32, n: usize) {
        if n == 4 {
            _mm_storeu_ps(p, v)
        } else {
            _mm_maskstore_ps(p, lane_mask4(n), v)
        }
    }
    #[inline(always)]
    unsafe fn narrow_mul(a: __m128, b: __m128) -> __m128 {
        _mm_mul_ps(a, b)
    }
    #[inline(always)]
    unsafe fn narrow_add(a: __m128, b: __m128) -> __m128 {
        _mm_add_ps(a, b)
    }
    #[inline(always)]
    unsafe fn store(self, p: *mut f64) {
        _mm256_storeu_pd(p, self)
    }
    #[cfg(test)]
    #[inline(always)]
    unsafe fn load(p: *const f64) -> Self {
        _mm256_loadu_pd(p)
    }
    #[inline(always)]
    unsafe fn add(self, b: Self) -> Self {
        _mm256_add_pd(self, b)
    }
    #[inline(always)]
    unsafe fn sub(self, b: Self) -> Self {
        _mm256_sub_pd(self, b)
    }
    #[inline(always)]
    unsafe fn mul(self, b: Self) -> Self {
        _mm256_mul_pd(self, b)
    }
    #[inline(always)]
    unsafe fn div(self, b: Self) -> Self {
        _mm256_div_pd(self, b)
    }
    #[inline(always)]
    unsafe fn sqrt(self) -> Self {
        _mm256_sqrt_pd(self)
    }
    #[inline(always)]
    unsafe fn lt(self, b: Self) -> Self::Mask {
        _mm256_cmp_pd::<_CMP_LT_OQ>(self, b)
    }
    #[inline(always)]
    unsafe fn nlt(self, b: Self) -> Self::Mask {
        _mm256_cmp_pd::<_CMP_NLT_UQ>(self, b)
    }
    #[inline(always)]
    unsafe fn select(m: Self::Mask, t: Self, f: Self) -> Self {
        _mm256_blendv_pd(f, t, m)
    }
    #[inline(always)]
    unsafe fn any(m: Self::Mask) -> bool {
        _mm256_movemask_pd(m) != 0
    }
    #[inline(always)]
    unsafe fn abs(self) -> Self {
        _mm256_andnot_pd(_mm256_set1_pd(-0.0), self)
    }
    #[inline(always)]
    unsafe fn neg(self) -> Self {
        _mm256_xor_pd(self, _mm256_set1_pd(-0.0))
    }
    #[inline(always)]
    unsafe fn xor_sign(self, s: Self) -> Self {
        _mm256_xor_pd(self, _mm256_and_pd(s, _mm256_set1_pd(-0.0)))
    }
    #[inline(always)]
    unsafe fn clear_low_word(self) -> Self {
        _mm256_castsi256_pd(_mm256_and_si256(
            _mm256_castpd_si256(self),
            _mm256_set1_epi64x(-1i64 << 32),
        ))
    }
    #[inline(always)]
    unsafe fn trunc_i32(self) -> Self {
        _mm256_cvtepi32_pd(_mm256_cvttpd_epi32(self))
    }
    #[inline(always)]
    unsafe fn pow2i(self) -> Self {
        let k = _mm256_cvtepi32_epi64(_mm256_cvttpd_epi32(self));
        let e = _mm256_slli_epi64::<52>(_mm256_add_epi64(k, _mm256_set1_epi64x(1023)));
        _mm256_castsi256_pd(e)
    }
}
