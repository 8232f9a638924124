//! Hand-written x86-64 matmul microkernels: AVX-512F (16 lanes) and AVX2+FMA (8 lanes).
//!
//! `out = x · Wᵀ` with f32 activations and weights widened in registers as they stream
//! (bf16: zero-extend and shift; f16: vcvtph2ps; f32: plain loads). Activations stay f32,
//! so results match the f32 reference to rounding. Register tiles of MR activation rows ×
//! NR weight rows keep every widened weight vector in use MR times and every activation
//! vector NR times. Each output keeps its own vector accumulator over k in a fixed order and
//! is reduced once at the end, so a row's result never depends on the tile it landed in:
//! results are identical whatever the thread split or the number of rows in a call.

#![allow(clippy::too_many_arguments, clippy::needless_range_loop)]

use core::arch::x86_64::*;

use crate::{WKind, WeightElem};

// ---------------------------------------------------------------- AVX-512

#[inline(always)]
unsafe fn load16<W: WeightElem>(p: *const W) -> __m512 {
    match W::KIND {
        WKind::F32 => _mm512_loadu_ps(p as *const f32),
        WKind::BF16 => _mm512_castsi512_ps(_mm512_slli_epi32(
            _mm512_cvtepu16_epi32(_mm256_loadu_si256(p as *const __m256i)),
            16,
        )),
        WKind::F16 => _mm512_cvtph_ps(_mm256_loadu_si256(p as *const __m256i)),
    }
}

#[inline(always)]
unsafe fn load16_mask<W: WeightElem>(p: *const W, mask: u16) -> __m512 {
    match W::KIND {
        WKind::F32 => _mm512_maskz_loadu_ps(mask, p as *const f32),
        WKind::BF16 => {
            let h = _mm256_maskz_loadu_epi16(mask, p as *const i16);
            _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16))
        }
        WKind::F16 => _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(mask, p as *const i16)),
    }
}

/// Prefetch distance in weight elements (512 bf16 = 1 KiB).
const PREFETCH_ELEMS: usize = 512;

#[inline(always)]
unsafe fn tile512<W: WeightElem, const MR: usize, const NR: usize>(
    x: *const f32,
    k: usize,
    w: *const W,
    bias: Option<&[f32]>,
    out: *mut f32,
    ldo: usize,
    j0: usize,
) {
    let mut acc = [[_mm512_setzero_ps(); NR]; MR];
    let full = k / 16 * 16;
    let mut kk = 0;
    while kk < full {
        let mut wv = [_mm512_setzero_ps(); NR];
        for c in 0..NR {
            // Weights stream from DRAM once: ask for them ~1 KiB ahead (the hardware
            // prefetcher alone leaves one thread at half the channel's bandwidth).
            _mm_prefetch::<_MM_HINT_T0>(w.add(c * k + kk + PREFETCH_ELEMS) as *const i8);
            wv[c] = load16(w.add(c * k + kk));
        }
        for r in 0..MR {
            let xv = _mm512_loadu_ps(x.add(r * k + kk));
            for c in 0..NR {
                acc[r][c] = _mm512_fmadd_ps(xv, wv[c], acc[r][c]);
            }
        }
        kk += 16;
    }
    if full < k {
        let mask: u16 = ((1u32 << (k - full)) - 1) as u16;
        let mut wv = [_mm512_setzero_ps(); NR];
        for c in 0..NR {
            wv[c] = load16_mask(w.add(c * k + full), mask);
        }
        for r in 0..MR {
            let xv = _mm512_maskz_loadu_ps(mask, x.add(r * k + full));
            for c in 0..NR {
                acc[r][c] = _mm512_fmadd_ps(xv, wv[c], acc[r][c]);
            }
        }
    }
    let mut v = [_mm512_setzero_ps(); 16];
    for r in 0..MR {
        for c in 0..NR {
            v[r * NR + c] = acc[r][c];
        }
    }
    let sums = hsum16(&v);
    for r in 0..MR {
        for c in 0..NR {
            let b = bias.map_or(0.0, |b| b[j0 + c]);
            *out.add(r * ldo + c) = sums[r * NR + c] + b;
        }
    }
}

/// Horizontal sums of 16 vectors at once, in the order of `_mm512_reduce_add_ps`
/// (lanes i + i+8, then + i+4, + i+2, + i+1) so a sum never depends on which other
/// accumulators shared the call; 15 shuffle-and-add steps instead of 16 full reductions.
#[inline(always)]
unsafe fn hsum16(v: &[__m512; 16]) -> [f32; 16] {
    // Level 1: pairs of vectors -> [a_i + a_{i+8} | b_i + b_{i+8}].
    let mut w = [_mm512_setzero_ps(); 8];
    for j in 0..8 {
        let (a, b) = (v[2 * j], v[2 * j + 1]);
        w[j] = _mm512_add_ps(
            _mm512_shuffle_f32x4::<0b01_00_01_00>(a, b),
            _mm512_shuffle_f32x4::<0b11_10_11_10>(a, b),
        );
    }
    // Level 2: + i+4 inside each 8-lane half.
    let mut x = [_mm512_setzero_ps(); 4];
    for j in 0..4 {
        let (a, b) = (w[2 * j], w[2 * j + 1]);
        x[j] = _mm512_add_ps(
            _mm512_shuffle_f32x4::<0b10_00_10_00>(a, b),
            _mm512_shuffle_f32x4::<0b11_01_11_01>(a, b),
        );
    }
    // Level 3: + i+2 inside each 4-lane quarter.
    let mut y = [_mm512_setzero_ps(); 2];
    for j in 0..2 {
        let (a, b) = (x[2 * j], x[2 * j + 1]);
        y[j] = _mm512_add_ps(
            _mm512_shuffle_ps::<0b01_00_01_00>(a, b),
            _mm512_shuffle_ps::<0b11_10_11_10>(a, b),
        );
    }
    // Level 4: + i+1.
    let z = _mm512_add_ps(
        _mm512_shuffle_ps::<0b10_00_10_00>(y[0], y[1]),
        _mm512_shuffle_ps::<0b11_01_11_01>(y[0], y[1]),
    );
    let mut lanes = [0f32; 16];
    _mm512_storeu_ps(lanes.as_mut_ptr(), z);
    // Vector k ends in lane 4·(k mod 4) + k/4.
    let mut out = [0f32; 16];
    for (k, o) in out.iter_mut().enumerate() {
        *o = lanes[4 * (k % 4) + k / 4];
    }
    out
}

macro_rules! dispatch_tiles {
    ($tile:ident, $W:ty, $mr_max:expr, $nr_max:expr, $x:expr, $m:expr, $k:expr, $w:expr, $n:expr, $bias:expr, $out:expr, $ldo:expr) => {{
        let (x, m, k, w, n, bias, out, ldo) = ($x, $m, $k, $w, $n, $bias, $out, $ldo);
        // Rows in chunks that stay in L2 while every weight tile streams past them.
        let m_chunk = (512 * 1024 / (k * 4).max(1)).clamp($mr_max, 256) / $mr_max * $mr_max;
        let mut c0 = 0;
        while c0 < m {
            let c1 = (c0 + m_chunk).min(m);
            let mut j0 = 0;
            while j0 < n {
                let nr = ($nr_max).min(n - j0);
                let wp = w.add(j0 * k);
                let mut i0 = c0;
                while i0 < c1 {
                    let mr = ($mr_max).min(c1 - i0);
                    let xp = x.add(i0 * k);
                    let op = out.add(i0 * ldo + j0);
                    match (mr, nr) {
                        (4, 4) => $tile::<$W, 4, 4>(xp, k, wp, bias, op, ldo, j0),
                        (4, 3) => $tile::<$W, 4, 3>(xp, k, wp, bias, op, ldo, j0),
                        (4, 2) => $tile::<$W, 4, 2>(xp, k, wp, bias, op, ldo, j0),
                        (4, 1) => $tile::<$W, 4, 1>(xp, k, wp, bias, op, ldo, j0),
                        (3, 4) => $tile::<$W, 3, 4>(xp, k, wp, bias, op, ldo, j0),
                        (3, 3) => $tile::<$W, 3, 3>(xp, k, wp, bias, op, ldo, j0),
                        (3, 2) => $tile::<$W, 3, 2>(xp, k, wp, bias, op, ldo, j0),
                        (3, 1) => $tile::<$W, 3, 1>(xp, k, wp, bias, op, ldo, j0),
                        (2, 4) => $tile::<$W, 2, 4>(xp, k, wp, bias, op, ldo, j0),
                        (2, 3) => $tile::<$W, 2, 3>(xp, k, wp, bias, op, ldo, j0),
                        (2, 2) => $tile::<$W, 2, 2>(xp, k, wp, bias, op, ldo, j0),
                        (2, 1) => $tile::<$W, 2, 1>(xp, k, wp, bias, op, ldo, j0),
                        (1, 4) => $tile::<$W, 1, 4>(xp, k, wp, bias, op, ldo, j0),
                        (1, 3) => $tile::<$W, 1, 3>(xp, k, wp, bias, op, ldo, j0),
                        (1, 2) => $tile::<$W, 1, 2>(xp, k, wp, bias, op, ldo, j0),
                        _ => $tile::<$W, 1, 1>(xp, k, wp, bias, op, ldo, j0),
                    }
                    i0 += mr;
                }
                j0 += nr;
            }
            c0 = c1;
        }
    }};
}

/// # Safety
/// The CPU must support AVX-512F and AVX-512BW (checked by [`crate::cpu::detect_isa`]);
/// slices must hold the shapes (checked by the caller, [`crate::matmul::matmul`]).
#[target_feature(enable = "avx512f,avx512bw,avx512vl,fma,f16c")]
pub unsafe fn matmul_avx512<W: WeightElem>(
    x: &[f32],
    m: usize,
    k: usize,
    w: &[W],
    n: usize,
    bias: Option<&[f32]>,
    out: &mut [f32],
    ldo: usize,
) {
    dispatch_tiles!(
        tile512,
        W,
        4,
        4,
        x.as_ptr(),
        m,
        k,
        w.as_ptr(),
        n,
        bias,
        out.as_mut_ptr(),
        ldo
    )
}

// ---------------------------------------------------------------- AVX2

#[inline(always)]
unsafe fn load8<W: WeightElem>(p: *const W) -> __m256 {
    match W::KIND {
        WKind::F32 => _mm256_loadu_ps(p as *const f32),
        WKind::BF16 => _mm256_castsi256_ps(_mm256_slli_epi32(
            _mm256_cvtepu16_epi32(_mm_loadu_si128(p as *const __m128i)),
            16,
        )),
        WKind::F16 => _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i)),
    }
}

#[inline(always)]
unsafe fn hsum256(v: __m256) -> f32 {
    // Same pairing order as an 8-lane tree: (0+4, 1+5, 2+6, 3+7), then (0+2, 1+3), then 0+1.
    let lo = _mm256_castps256_ps128(v);
    let hi = _mm256_extractf128_ps(v, 1);
    let s = _mm_add_ps(lo, hi);
    let s2 = _mm_add_ps(s, _mm_movehl_ps(s, s));
    let s3 = _mm_add_ss(s2, _mm_shuffle_ps(s2, s2, 1));
    _mm_cvtss_f32(s3)
}

#[inline(always)]
unsafe fn tile256<W: WeightElem, const MR: usize, const NR: usize>(
    x: *const f32,
    k: usize,
    w: *const W,
    bias: Option<&[f32]>,
    out: *mut f32,
    ldo: usize,
    j0: usize,
) {
    let mut acc = [[_mm256_setzero_ps(); NR]; MR];
    let full = k / 8 * 8;
    let mut kk = 0;
    while kk < full {
        let mut wv = [_mm256_setzero_ps(); NR];
        for c in 0..NR {
            wv[c] = load8(w.add(c * k + kk));
        }
        for r in 0..MR {
            let xv = _mm256_loadu_ps(x.add(r * k + kk));
            for c in 0..NR {
                acc[r][c] = _mm256_fmadd_ps(xv, wv[c], acc[r][c]);
            }
        }
        kk += 8;
    }
    for r in 0..MR {
        for c in 0..NR {
            let mut s = hsum256(acc[r][c]);
            for t in full..k {
                s += *x.add(r * k + t) * (*w.add(c * k + t)).to_f32();
            }
            let b = bias.map_or(0.0, |b| b[j0 + c]);
            *out.add(r * ldo + c) = s + b;
        }
    }
}

/// # Safety
/// The CPU must support AVX2, FMA and F16C (checked by [`crate::cpu::detect_isa`]).
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn matmul_avx2<W: WeightElem>(
    x: &[f32],
    m: usize,
    k: usize,
    w: &[W],
    n: usize,
    bias: Option<&[f32]>,
    out: &mut [f32],
    ldo: usize,
) {
    // 16 ymm registers: 4×2 accumulators + 2 weights + 1 activation.
    dispatch_tiles!(
        tile256,
        W,
        4,
        2,
        x.as_ptr(),
        m,
        k,
        w.as_ptr(),
        n,
        bias,
        out.as_mut_ptr(),
        ldo
    )
}
