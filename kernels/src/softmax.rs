#![allow(clippy::needless_range_loop)] // fixed-size lane loops are what vectorises
//! Softmax helpers, including the decoder's unmasking primitive.

use crate::math::exp_f32;

/// In-place softmax of one row (attention probabilities). Max-subtracted; sum in f32 is
/// ample for attention rows (at most a few thousand keys).
#[inline]
pub fn softmax_inplace(x: &mut [f32]) {
    let mut m = f32::NEG_INFINITY;
    for &v in x.iter() {
        m = m.max(v);
    }
    let mut s = 0f32;
    for v in x.iter_mut() {
        *v = exp_f32(*v - m);
        s += *v;
    }
    let inv = 1.0 / s;
    for v in x.iter_mut() {
        *v *= inv;
    }
}

/// Greedy unmasking primitive (spec §8.6, §11 items 9 and 18): the arg-max token (lowest id
/// on ties) and its softmax probability over the whole row. `never` (the MASK id) is never
/// chosen but still counts in the denominator, so confidences equal the reference's. The
/// denominator is accumulated in f64: a sequential f32 sum over ~152k terms is off by up to
/// 1e-2 relative.
pub fn argmax_confidence(logits: &[f32], never: Option<usize>) -> (usize, f32) {
    if logits.is_empty() {
        return (0, 0.0);
    }
    ArgmaxPartial::of(logits, 0, never).finish()
}

/// Maximum of a slice (−inf when empty), in 16 lanes so it vectorises. NaNs are skipped.
#[inline(always)]
pub fn max_of(x: &[f32]) -> f32 {
    let mut lanes = [f32::NEG_INFINITY; 16];
    let mut it = x.chunks_exact(16);
    for c in &mut it {
        for l in 0..16 {
            // A compare-select is one vmaxps; f32::max adds a NaN fix-up per lane.
            lanes[l] = if c[l] > lanes[l] { c[l] } else { lanes[l] };
        }
    }
    let mut m = f32::NEG_INFINITY;
    for &v in lanes.iter().chain(it.remainder()) {
        m = if v > m { v } else { m };
    }
    m
}

/// Index of the first element equal to `v`, other than `skip`. Sixteen compares at a time
/// (one mask test per vector) before looking inside the vector that matched.
#[inline(always)]
fn first_index_of(x: &[f32], v: f32, skip: Option<usize>) -> Option<usize> {
    let scan = |base: usize, c: &[f32]| {
        c.iter()
            .enumerate()
            .map(|(i, &e)| (base + i, e))
            .find(|&(i, e)| e == v && Some(i) != skip)
            .map(|(i, _)| i)
    };
    let mut it = x.chunks_exact(16);
    for (ci, c) in (&mut it).enumerate() {
        let mut hit = false;
        for l in 0..16 {
            hit |= c[l] == v;
        }
        if hit {
            if let Some(i) = scan(ci * 16, c) {
                return Some(i);
            }
        }
    }
    scan(x.len() / 16 * 16, it.remainder())
}

/// Running state of the unmasking reduction over one slice of a logits row, so the
/// vocabulary can be split across threads without materialising whole rows.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ArgmaxPartial {
    /// Largest logit seen (all ids).
    pub max: f32,
    /// Largest logit among allowed ids and its (lowest) id.
    pub best: f32,
    pub best_id: usize,
    /// Σ exp(z − max) over the slice.
    pub sum: f64,
}

impl ArgmaxPartial {
    pub const EMPTY: ArgmaxPartial = ArgmaxPartial {
        max: f32::NEG_INFINITY,
        best: f32::NEG_INFINITY,
        best_id: usize::MAX,
        sum: 0.0,
    };

    /// Reduce logits `z` whose first element is id `offset` (portable code).
    pub fn of(z: &[f32], offset: usize, never: Option<usize>) -> ArgmaxPartial {
        partial_body(z, offset, never)
    }

    /// [`ArgmaxPartial::of`] compiled for `isa` (the exp and max loops vectorise 16 wide
    /// with AVX-512 instead of 4 wide with baseline SSE2).
    pub fn of_isa(
        isa: crate::matmul::Isa,
        z: &[f32],
        offset: usize,
        never: Option<usize>,
    ) -> ArgmaxPartial {
        match isa {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: Isa values come from cpu::detect_isa, which checked CPU and OS support.
            crate::matmul::Isa::Avx512 => unsafe { partial_avx512(z, offset, never) },
            #[cfg(target_arch = "x86_64")]
            // SAFETY: as above.
            crate::matmul::Isa::Avx2 => unsafe { partial_avx2(z, offset, never) },
            _ => partial_body(z, offset, never),
        }
    }

    /// Combine with the partial of a slice of *higher* ids (ties keep the lower id).
    pub fn merge(self, later: ArgmaxPartial) -> ArgmaxPartial {
        let max = self.max.max(later.max);
        let scale = |p: &ArgmaxPartial| {
            if p.sum == 0.0 {
                0.0
            } else {
                p.sum * libm::exp((p.max - max) as f64)
            }
        };
        let (best, best_id) = if later.best > self.best || self.best_id == usize::MAX {
            (later.best, later.best_id)
        } else {
            (self.best, self.best_id)
        };
        ArgmaxPartial {
            max,
            best,
            best_id,
            sum: scale(&self) + scale(&later),
        }
    }

    /// (token, softmax probability of the token).
    pub fn finish(self) -> (usize, f32) {
        (
            self.best_id,
            (exp_f32(self.best - self.max) as f64 / self.sum) as f32,
        )
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma")]
unsafe fn partial_avx512(z: &[f32], offset: usize, never: Option<usize>) -> ArgmaxPartial {
    partial_with(z, offset, never, |z, m| sum_exp_avx512(z, m))
}

/// Σ exp(zᵢ − m) in AVX-512 as [`crate::math::exp2_avx512`] of `(z − m)·log2 e` (12
/// operations a vector where [`crate::math::exp_f32`]'s algorithm takes 18: unmasking a
/// 151,936-logit row is most of a tiny model's denoising step). Rounding differs from the
/// portable sum in the last bits. Same chunking: f32 lanes per 256 values, chunk sums
/// added in f64.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma")]
unsafe fn sum_exp_avx512(z: &[f32], m: f32) -> f64 {
    use core::arch::x86_64::*;
    let log2e = _mm512_set1_ps(core::f32::consts::LOG2_E);
    let mv = _mm512_set1_ps(m);
    // z − m first: scaling m before subtracting would cost its rounding (1e-5 relative for
    // |m| ≈ 200).
    let exp16 = |x: __m512| crate::math::exp2_avx512(_mm512_mul_ps(_mm512_sub_ps(x, mv), log2e));
    let mut sum = 0f64;
    for chunk in z.chunks(256) {
        let mut acc = _mm512_setzero_ps();
        let mut it = chunk.chunks_exact(16);
        for v in &mut it {
            acc = _mm512_add_ps(acc, exp16(_mm512_loadu_ps(v.as_ptr())));
        }
        let rest = it.remainder();
        if !rest.is_empty() {
            let mask: __mmask16 = ((1u32 << rest.len()) - 1) as u16;
            let x = _mm512_maskz_loadu_ps(mask, rest.as_ptr());
            acc = _mm512_add_ps(acc, _mm512_maskz_mov_ps(mask, exp16(x)));
        }
        sum += _mm512_reduce_add_ps(acc) as f64;
    }
    sum
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn partial_avx2(z: &[f32], offset: usize, never: Option<usize>) -> ArgmaxPartial {
    // A closure, not a fn item: closures inherit this function's target features, while a
    // fn item passed as `impl Fn` is called through its `Fn::call` shim, compiled for
    // baseline x86-64 (an exp loop ran 4 wide on SSE2 that way).
    partial_with(z, offset, never, |z, m| sum_exp_avx2(z, m))
}

/// [`sum_exp_avx512`] on AVX2: [`crate::math::exp2_avx2`] of `(z − m)·log2 e`, two 8-lane
/// accumulators per 256 values (16 lanes, as the portable sum), chunk sums added in f64.
/// Rounding differs from the portable sum in the last bits.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn sum_exp_avx2(z: &[f32], m: f32) -> f64 {
    use core::arch::x86_64::*;
    let log2e = _mm256_set1_ps(core::f32::consts::LOG2_E);
    let mv = _mm256_set1_ps(m);
    let exp8 = |x: __m256| crate::math::exp2_avx2(_mm256_mul_ps(_mm256_sub_ps(x, mv), log2e));
    let mut sum = 0f64;
    for chunk in z.chunks(256) {
        let mut acc = [_mm256_setzero_ps(); 2];
        let mut it = chunk.chunks_exact(16);
        for v in &mut it {
            acc[0] = _mm256_add_ps(acc[0], exp8(_mm256_loadu_ps(v.as_ptr())));
            acc[1] = _mm256_add_ps(acc[1], exp8(_mm256_loadu_ps(v.as_ptr().add(8))));
        }
        for (h, part) in it.remainder().chunks(8).enumerate() {
            let lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
            let mask = _mm256_cmpgt_epi32(_mm256_set1_epi32(part.len() as i32), lanes);
            let x = _mm256_maskload_ps(part.as_ptr(), mask);
            let e = _mm256_and_ps(exp8(x), _mm256_castsi256_ps(mask));
            acc[h] = _mm256_add_ps(acc[h], e);
        }
        let v = _mm256_add_ps(acc[0], acc[1]);
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        sum += _mm_cvtss_f32(_mm_add_ss(s, _mm_shuffle_ps::<1>(s, s))) as f64;
    }
    sum
}

#[inline(always)]
fn partial_body(z: &[f32], offset: usize, never: Option<usize>) -> ArgmaxPartial {
    partial_with(z, offset, never, sum_exp_lanes)
}

/// Σ exp(zᵢ − m): 16 f32 lanes per 256 values (vectorisable), chunk sums added in f64.
#[inline(always)]
fn sum_exp_lanes(z: &[f32], m: f32) -> f64 {
    let mut sum = 0f64;
    for chunk in z.chunks(256) {
        let mut lanes = [0f32; 16];
        let mut it = chunk.chunks_exact(16);
        for c in &mut it {
            for l in 0..16 {
                lanes[l] += exp_f32(c[l] - m);
            }
        }
        let mut s = 0f32;
        for &v in it.remainder() {
            s += exp_f32(v - m);
        }
        let mut half = [0f32; 8];
        for l in 0..8 {
            half[l] = lanes[l] + lanes[l + 8];
        }
        sum += ((half[0] + half[4]) + (half[2] + half[6])) as f64
            + ((half[1] + half[5]) + (half[3] + half[7])) as f64
            + s as f64;
    }
    sum
}

#[inline(always)]
fn partial_with(
    z: &[f32],
    offset: usize,
    never: Option<usize>,
    sum_exp: impl Fn(&[f32], f32) -> f64,
) -> ArgmaxPartial {
    if z.is_empty() {
        return ArgmaxPartial::EMPTY;
    }
    let local_never = never
        .and_then(|n| n.checked_sub(offset))
        .filter(|&n| n < z.len());
    let m = max_of(z);
    let bv = match local_never {
        Some(nv) => max_of(&z[..nv]).max(max_of(&z[nv + 1..])),
        None => m,
    };
    let best = first_index_of(z, bv, local_never);
    let sum = sum_exp(z, m);
    ArgmaxPartial {
        max: m,
        best: bv,
        best_id: best.map_or(usize::MAX, |b| b + offset),
        sum,
    }
}
