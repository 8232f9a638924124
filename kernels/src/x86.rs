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

mod gemm;
mod panels;
pub use gemm::{gemm_avx2, gemm_avx2_panels, gemm_rows_len, pack_gemm_rows, GemmActs};
pub use panels::matmul_panels_avx2;

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

/// Prefetch distance in weight elements for f32/f16 weights (1 KiB of bf16).
const PREFETCH_ELEMS: usize = 512;

/// How far ahead (bytes) the bf16 kernels prefetch the weights they stream, into L2. A
/// strip of rows is contiguous and strips follow each other, so a linear cursor running
/// this far ahead of the bytes consumed covers the next strips. Measured on this VM class:
/// with the FMAs of an 8-row tile in the loop, the out-of-order window alone keeps too
/// little in flight (~6 GB/s per core); 16 KiB ahead into L2 reaches the plain streaming
/// rate (~12 GB/s); 1–2 KiB into L1 barely helps.
pub(crate) const PREFETCH_AHEAD_BYTES: usize = 16 * 1024;

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
            _mm_prefetch::<_MM_HINT_T0>(w.wrapping_add(c * k + kk + PREFETCH_ELEMS) as *const i8);
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
pub(crate) unsafe fn hsum16(v: &[__m512; 16]) -> [f32; 16] {
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

/// Row chunks × weight strips × row tiles for the pair-layout kernels (`tile512_bf16`,
/// `dpbf16::tile`), which share the argument list `(x, kp, k, w, bias, out, ldo, j0)`.
///
/// Tile shape: up to 8 rows (the denoising block) × 2 weight rows when there are few rows,
/// so each weight vector feeds 8 rows; 4 × 4 for many rows (prefill, vision), where
/// activations come from L2 and each activation load must feed 4 weight rows. Any shape
/// gives a row bit-identical results (one accumulator per output, one reduction tree).
macro_rules! pair_strips {
    ($tile:ident, $xp:expr, $kp:expr, $k:expr, $w:expr, $n:expr, $bias:expr, $out:expr, $ldo:expr, $m:expr, $m_chunk:expr) => {{
        let (xp, kp, k, w, n, bias, out, ldo, m) = ($xp, $kp, $k, $w, $n, $bias, $out, $ldo, $m);
        let mut c0 = 0;
        while c0 < m {
            let c1 = (c0 + $m_chunk).min(m);
            let tall = if c1 - c0 > 8 { 4 } else { 8 };
            let strip = (16 / (c1 - c0).min(tall)).min(4);
            let mut j0 = 0;
            while j0 < n {
                let nr = strip.min(n - j0);
                let wp = w.add(j0 * k);
                let mut i0 = c0;
                while i0 < c1 {
                    let mr = (c1 - i0).min(tall);
                    let (xr, op) = (xp.add(i0 * kp), out.add(i0 * ldo + j0));
                    // mr·nr ≤ 16 accumulators (one hsum16 per tile).
                    match (mr, nr) {
                        (8, 1) => $tile::<8, 1>(xr, kp, k, wp, bias, op, ldo, j0),
                        (8, 2) => $tile::<8, 2>(xr, kp, k, wp, bias, op, ldo, j0),
                        (7, 1) => $tile::<7, 1>(xr, kp, k, wp, bias, op, ldo, j0),
                        (7, 2) => $tile::<7, 2>(xr, kp, k, wp, bias, op, ldo, j0),
                        (6, 1) => $tile::<6, 1>(xr, kp, k, wp, bias, op, ldo, j0),
                        (6, 2) => $tile::<6, 2>(xr, kp, k, wp, bias, op, ldo, j0),
                        (5, 1) => $tile::<5, 1>(xr, kp, k, wp, bias, op, ldo, j0),
                        (5, 2) => $tile::<5, 2>(xr, kp, k, wp, bias, op, ldo, j0),
                        (5, 3) => $tile::<5, 3>(xr, kp, k, wp, bias, op, ldo, j0),
                        (4, 1) => $tile::<4, 1>(xr, kp, k, wp, bias, op, ldo, j0),
                        (4, 2) => $tile::<4, 2>(xr, kp, k, wp, bias, op, ldo, j0),
                        (4, 3) => $tile::<4, 3>(xr, kp, k, wp, bias, op, ldo, j0),
                        (4, 4) => $tile::<4, 4>(xr, kp, k, wp, bias, op, ldo, j0),
                        (3, 1) => $tile::<3, 1>(xr, kp, k, wp, bias, op, ldo, j0),
                        (3, 2) => $tile::<3, 2>(xr, kp, k, wp, bias, op, ldo, j0),
                        (3, 3) => $tile::<3, 3>(xr, kp, k, wp, bias, op, ldo, j0),
                        (3, 4) => $tile::<3, 4>(xr, kp, k, wp, bias, op, ldo, j0),
                        (2, 1) => $tile::<2, 1>(xr, kp, k, wp, bias, op, ldo, j0),
                        (2, 2) => $tile::<2, 2>(xr, kp, k, wp, bias, op, ldo, j0),
                        (2, 3) => $tile::<2, 3>(xr, kp, k, wp, bias, op, ldo, j0),
                        (2, 4) => $tile::<2, 4>(xr, kp, k, wp, bias, op, ldo, j0),
                        (1, 1) => $tile::<1, 1>(xr, kp, k, wp, bias, op, ldo, j0),
                        (1, 2) => $tile::<1, 2>(xr, kp, k, wp, bias, op, ldo, j0),
                        (1, 3) => $tile::<1, 3>(xr, kp, k, wp, bias, op, ldo, j0),
                        (1, 4) => $tile::<1, 4>(xr, kp, k, wp, bias, op, ldo, j0),
                        _ => unreachable!(),
                    }
                    i0 += mr;
                }
                j0 += nr;
            }
            c0 = c1;
        }
    }};
}
pub(crate) use pair_strips;

/// bf16 weights on AVX-512: each 64-byte load holds 16 (even, odd) pairs of weights, and
/// two integer ops widen them (`<< 16` gives the even ones, `& 0xffff0000` the odd ones)
/// instead of a zero-extend shuffle and a shift per 16. The activations are pre-split into
/// the same even/odd halves (`xd`, rows of `kp` = k rounded up to 32, zero-padded), so
/// lane l of an accumulator sums the products of k ≡ 2l and 2l+1 (mod 32) in k order: a
/// fixed order per output, whatever the tile shape or thread split.
#[inline(always)]
unsafe fn tile512_bf16<const MR: usize, const NR: usize>(
    xd: *const f32,
    kp: usize,
    k: usize,
    w: *const u16,
    bias: Option<&[f32]>,
    out: *mut f32,
    ldo: usize,
    j0: usize,
) {
    let mut acc = [[_mm512_setzero_ps(); NR]; MR];
    let high = _mm512_set1_epi32(0xffff_0000u32 as i32);
    let full = k / 32 * 32;
    let mut kk = 0;
    while kk < full {
        let mut we = [_mm512_setzero_ps(); NR];
        let mut wo = [_mm512_setzero_ps(); NR];
        let pf = (w as *const u8).wrapping_add(PREFETCH_AHEAD_BYTES + kk / 32 * NR * 64);
        for c in 0..NR {
            _mm_prefetch::<_MM_HINT_T1>(pf.wrapping_add(c * 64) as *const i8);
            let v = _mm512_loadu_si512(w.add(c * k + kk) as *const _);
            we[c] = _mm512_castsi512_ps(_mm512_slli_epi32(v, 16));
            wo[c] = _mm512_castsi512_ps(_mm512_and_si512(v, high));
        }
        for r in 0..MR {
            let xe = _mm512_loadu_ps(xd.add(r * kp + kk));
            let xo = _mm512_loadu_ps(xd.add(r * kp + kk + 16));
            for c in 0..NR {
                acc[r][c] = _mm512_fmadd_ps(xe, we[c], acc[r][c]);
                acc[r][c] = _mm512_fmadd_ps(xo, wo[c], acc[r][c]);
            }
        }
        kk += 32;
    }
    if full < k {
        let mask: __mmask32 = ((1u64 << (k - full)) - 1) as u32;
        let mut we = [_mm512_setzero_ps(); NR];
        let mut wo = [_mm512_setzero_ps(); NR];
        for c in 0..NR {
            let v = _mm512_maskz_loadu_epi16(mask, w.add(c * k + full) as *const i16);
            we[c] = _mm512_castsi512_ps(_mm512_slli_epi32(v, 16));
            wo[c] = _mm512_castsi512_ps(_mm512_and_si512(v, high));
        }
        for r in 0..MR {
            let xe = _mm512_loadu_ps(xd.add(r * kp + full));
            let xo = _mm512_loadu_ps(xd.add(r * kp + full + 16));
            for c in 0..NR {
                acc[r][c] = _mm512_fmadd_ps(xe, we[c], acc[r][c]);
                acc[r][c] = _mm512_fmadd_ps(xo, wo[c], acc[r][c]);
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

/// Split rows of `x` into the even/odd halves of each `block`-wide k block (32 for
/// [`tile512_bf16`], 16 for [`tile256_bf16`]); rows of k rounded up to `block`, zero past
/// `k`.
pub(crate) fn deinterleave_pairs(
    block: usize,
    x: &[f32],
    m: usize,
    k: usize,
) -> alloc::vec::Vec<f32> {
    let kp = k.div_ceil(block) * block;
    let mut xd = alloc::vec![0f32; m * kp];
    for r in 0..m {
        let (src, dst) = (&x[r * k..(r + 1) * k], &mut xd[r * kp..(r + 1) * kp]);
        let (whole, half) = (k / block * block, block / 2);
        // Whole blocks without per-element index arithmetic (LLVM turns this into shuffles).
        for (s, d) in src[..whole]
            .chunks_exact(block)
            .zip(dst.chunks_exact_mut(block))
        {
            for i in 0..half {
                d[i] = s[2 * i];
                d[half + i] = s[2 * i + 1];
            }
        }
        for (t, &v) in src.iter().enumerate().skip(whole) {
            let i = t - whole;
            dst[whole + (i & 1) * half + i / 2] = v;
        }
    }
    xd
}

/// [`tile512_bf16`] over the whole matrix: 8-row tiles (the denoising block) against 2
/// weight rows, so each widened weight vector feeds 8 rows; fewer rows get more columns.
/// `xp`: `m` rows of `kp` = k rounded up to 32, split by [`deinterleave_pairs`] (block 32).
#[target_feature(enable = "avx512f,avx512bw,avx512vl,fma")]
pub(crate) unsafe fn matmul_bf16_avx512_paired(
    xp: *const f32,
    m: usize,
    k: usize,
    w: *const u16,
    n: usize,
    bias: Option<&[f32]>,
    out: *mut f32,
    ldo: usize,
) {
    let kp = k.div_ceil(32) * 32;
    // Rows in chunks that stay in L2 while every weight tile streams past them.
    let m_chunk = (512 * 1024 / (kp * 4).max(1)).clamp(8, 256) / 8 * 8;
    pair_strips!(tile512_bf16, xp, kp, k, w, n, bias, out, ldo, m, m_chunk);
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
    if W::KIND == WKind::BF16 {
        // bf16 has its own widening trick (the checkpoints' weights are all bf16).
        let w16 = w.as_ptr() as *const u16;
        let xd = deinterleave_pairs(32, x, m, k);
        return matmul_bf16_avx512_paired(xd.as_ptr(), m, k, w16, n, bias, out.as_mut_ptr(), ldo);
    }
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

/// Eight [`hsum256`]s at once: lane j of the result is `hsum256(v[j])`, bit for bit (the
/// same pairs added in the same order), for ~20 operations instead of ~50. Tiles with a
/// short k (the tiny model's k = 64 vocabulary projection: 8 FMAs a row and output) spent
/// as long in their per-output sums as in their products.
#[inline(always)]
unsafe fn hsum256x8(v: &[__m256; 8]) -> __m256 {
    // w_j = [s_j | s_{j+4}] with s = lo + hi: lanes (0+4, 1+5, 2+6, 3+7).
    let w: [__m256; 4] = core::array::from_fn(|j| {
        _mm256_add_ps(
            _mm256_permute2f128_ps::<0x20>(v[j], v[j + 4]),
            _mm256_permute2f128_ps::<0x31>(v[j], v[j + 4]),
        )
    });
    // (s[0] + s[2]) and (s[1] + s[3]) of every s, side by side, then their sum.
    let even = _mm256_hadd_ps(
        _mm256_shuffle_ps::<0x88>(w[0], w[1]),
        _mm256_shuffle_ps::<0x88>(w[2], w[3]),
    );
    let odd = _mm256_hadd_ps(
        _mm256_shuffle_ps::<0xDD>(w[0], w[1]),
        _mm256_shuffle_ps::<0xDD>(w[2], w[3]),
    );
    _mm256_add_ps(even, odd)
}

/// `out[r·ldo + c] = hsum256(acc[r][c]) + bias[c]` for a tile's accumulators.
#[inline(always)]
unsafe fn store_sums<const MR: usize, const NR: usize>(
    acc: &[[__m256; NR]; MR],
    bias: Option<&[f32]>,
    out: *mut f32,
    ldo: usize,
    j0: usize,
) {
    let b = |c: usize| bias.map_or(0.0, |b| b[j0 + c]);
    if MR * NR >= 4 {
        let mut v = [_mm256_setzero_ps(); 8];
        for r in 0..MR {
            for c in 0..NR {
                v[r * NR + c] = acc[r][c];
            }
        }
        let mut sums = [0f32; 8];
        _mm256_storeu_ps(sums.as_mut_ptr(), hsum256x8(&v));
        for r in 0..MR {
            for c in 0..NR {
                *out.add(r * ldo + c) = sums[r * NR + c] + b(c);
            }
        }
    } else {
        for r in 0..MR {
            for c in 0..NR {
                *out.add(r * ldo + c) = hsum256(acc[r][c]) + b(c);
            }
        }
    }
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

/// 16 bf16 weights read as 8 32-bit pairs, widened to f32 without unpacking: the even
/// weights (low halves shifted up) and the odd ones (high halves with the low bits cleared).
#[inline(always)]
unsafe fn widen_pairs256(v: __m256i) -> (__m256, __m256) {
    let high = _mm256_set1_epi32(0xffff_0000u32 as i32);
    (
        _mm256_castsi256_ps(_mm256_slli_epi32(v, 16)),
        _mm256_castsi256_ps(_mm256_and_si256(v, high)),
    )
}

/// One 16-weight block of [`tile256_bf16`], weights first: widen the `NR` weight rows,
/// then FMA them into every row (each row's 2 vectors loaded once per block).
#[inline(always)]
unsafe fn pair_step256<const MR: usize, const NR: usize>(
    acc: &mut [[__m256; NR]; MR],
    xd: *const f32,
    kp: usize,
    kk: usize,
    wv: &[__m256i; NR],
) {
    let mut we = [_mm256_setzero_ps(); NR];
    let mut wo = [_mm256_setzero_ps(); NR];
    for c in 0..NR {
        (we[c], wo[c]) = widen_pairs256(wv[c]);
    }
    for r in 0..MR {
        let xe = _mm256_loadu_ps(xd.add(r * kp + kk));
        let xo = _mm256_loadu_ps(xd.add(r * kp + kk + 8));
        for c in 0..NR {
            acc[r][c] = _mm256_fmadd_ps(xe, we[c], acc[r][c]);
            acc[r][c] = _mm256_fmadd_ps(xo, wo[c], acc[r][c]);
        }
    }
}

/// The same block, rows first: load every row's 2 vectors, then widen one weight row at a
/// time and use it for every row. For 1 × 8 and 2 × 4 tiles (8 accumulators, 2·MR row
/// vectors and one widened weight pair in registers, where the weights-first order would
/// hold 2·NR widened vectors and spill). Same products in the same order.
#[inline(always)]
unsafe fn rows_first_step256<const MR: usize, const NR: usize>(
    acc: &mut [[__m256; NR]; MR],
    xd: *const f32,
    kp: usize,
    kk: usize,
    wv: &[__m256i; NR],
) {
    let xe: [__m256; MR] = core::array::from_fn(|r| _mm256_loadu_ps(xd.add(r * kp + kk)));
    let xo: [__m256; MR] = core::array::from_fn(|r| _mm256_loadu_ps(xd.add(r * kp + kk + 8)));
    for c in 0..NR {
        let (we, wo) = widen_pairs256(wv[c]);
        for r in 0..MR {
            acc[r][c] = _mm256_fmadd_ps(xe[r], we, acc[r][c]);
            acc[r][c] = _mm256_fmadd_ps(xo[r], wo, acc[r][c]);
        }
    }
}

/// bf16 weights on AVX2: the pair trick of [`tile512_bf16`] with 16-weight blocks (lane l
/// sums k ≡ 2l, 2l+1 mod 16), then one 8-lane tree per output ([`store_sums`]). Each block
/// by [`pair_step256`] or, with `ROWS_FIRST`, [`rows_first_step256`] (same bits).
#[inline(always)]
unsafe fn tile256_bf16<const MR: usize, const NR: usize, const ROWS_FIRST: bool>(
    xd: *const f32,
    kp: usize,
    k: usize,
    w: *const u16,
    bias: Option<&[f32]>,
    out: *mut f32,
    ldo: usize,
    j0: usize,
) {
    let step = |acc: &mut [[__m256; NR]; MR], kk: usize, wv: &[__m256i; NR]| {
        if ROWS_FIRST {
            rows_first_step256::<MR, NR>(acc, xd, kp, kk, wv)
        } else {
            pair_step256::<MR, NR>(acc, xd, kp, kk, wv)
        }
    };
    let mut acc = [[_mm256_setzero_ps(); NR]; MR];
    let full = k / 16 * 16;
    let mut kk = 0;
    while kk < full {
        let mut wv = [_mm256_setzero_si256(); NR];
        let pf = (w as *const u8).wrapping_add(PREFETCH_AHEAD_BYTES + kk / 16 * NR * 32);
        for c in 0..NR {
            if !ROWS_FIRST {
                _mm_prefetch::<_MM_HINT_T1>(pf.wrapping_add(c * 32) as *const i8);
            }
            wv[c] = _mm256_loadu_si256(w.add(c * k + kk) as *const __m256i);
        }
        step(&mut acc, kk, &wv);
        kk += 16;
    }
    if full < k {
        // No 16-bit masked loads on AVX2: copy the tail, zero-padded.
        let mut tail = [[0u16; 16]; NR];
        for (c, t) in tail.iter_mut().enumerate() {
            for i in full..k {
                t[i - full] = *w.add(c * k + i);
            }
        }
        let wv: [__m256i; NR] =
            core::array::from_fn(|c| _mm256_loadu_si256(tail[c].as_ptr() as *const __m256i));
        step(&mut acc, full, &wv);
    }
    store_sums(&acc, bias, out, ldo, j0);
}

/// Up to this many k (rounded to 16) the paired kernel takes 8 outputs at a time, so that
/// every tile ends in one [`hsum256x8`]: for k = 64 (the tiny model's 151,936-entry
/// vocabulary projection, ~60% of its generation) a 1-row × 2-output tile did 8 FMAs per
/// output and spent longer in its two scalar sums. Above it the sums are a few percent
/// of a tile and 2 weight rows (not 8) stay in L1 for all row tiles.
const WIDE_MAX_K: usize = 256;

/// [`tile256_bf16`] over the whole matrix: 4-row tiles against 2 weight rows (16 ymm);
/// for k ≤ [`WIDE_MAX_K`], blocks of 8 outputs with tiles of 4 × 2, 3 × 2, 2 × 4 or 1 × 8.
/// `xp`: `m` rows of `kp` = k rounded up to 16, split by [`deinterleave_pairs`] (block 16).
#[target_feature(enable = "avx2,fma")]
pub(crate) unsafe fn matmul_bf16_avx2_paired(
    xp: *const f32,
    m: usize,
    k: usize,
    w: *const u16,
    n: usize,
    bias: Option<&[f32]>,
    out: *mut f32,
    ldo: usize,
) {
    let kp = k.div_ceil(16) * 16;
    let m_chunk = (512 * 1024 / (kp * 4).max(1)).clamp(4, 256) / 4 * 4;
    let wide = kp <= WIDE_MAX_K;
    let mut c0 = 0;
    while c0 < m {
        let c1 = (c0 + m_chunk).min(m);
        let mut j0 = 0;
        while j0 < n {
            let nb = if wide && n - j0 >= 8 {
                8
            } else {
                2.min(n - j0)
            };
            let mut i0 = c0;
            while i0 < c1 {
                let mr = (c1 - i0).min(4);
                let (xr, op) = (xp.add(i0 * kp), out.add(i0 * ldo + j0));
                // Outputs j0 + j of the tile starting at the block's j-th output.
                let at = |j: usize| (w.add((j0 + j) * k), op.add(j), j0 + j);
                match (mr, nb) {
                    (4, 8) => {
                        for j in [0, 2, 4, 6] {
                            let (wp, o, jj) = at(j);
                            tile256_bf16::<4, 2, false>(xr, kp, k, wp, bias, o, ldo, jj);
                        }
                    }
                    (3, 8) => {
                        for j in [0, 2, 4, 6] {
                            let (wp, o, jj) = at(j);
                            tile256_bf16::<3, 2, false>(xr, kp, k, wp, bias, o, ldo, jj);
                        }
                    }
                    (2, 8) => {
                        for j in [0, 4] {
                            let (wp, o, jj) = at(j);
                            tile256_bf16::<2, 4, true>(xr, kp, k, wp, bias, o, ldo, jj);
                        }
                    }
                    (_, 8) => {
                        let (wp, o, jj) = at(0);
                        tile256_bf16::<1, 8, true>(xr, kp, k, wp, bias, o, ldo, jj);
                    }
                    (4, 2) => tile256_bf16::<4, 2, false>(xr, kp, k, at(0).0, bias, op, ldo, j0),
                    (4, _) => tile256_bf16::<4, 1, false>(xr, kp, k, at(0).0, bias, op, ldo, j0),
                    (3, 2) => tile256_bf16::<3, 2, false>(xr, kp, k, at(0).0, bias, op, ldo, j0),
                    (3, _) => tile256_bf16::<3, 1, false>(xr, kp, k, at(0).0, bias, op, ldo, j0),
                    (2, 2) => tile256_bf16::<2, 2, false>(xr, kp, k, at(0).0, bias, op, ldo, j0),
                    (2, _) => tile256_bf16::<2, 1, false>(xr, kp, k, at(0).0, bias, op, ldo, j0),
                    (_, 2) => tile256_bf16::<1, 2, false>(xr, kp, k, at(0).0, bias, op, ldo, j0),
                    _ => tile256_bf16::<1, 1, false>(xr, kp, k, at(0).0, bias, op, ldo, j0),
                }
                i0 += mr;
            }
            j0 += nb;
        }
        c0 = c1;
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
    if W::KIND == WKind::BF16 {
        let w16 = w.as_ptr() as *const u16;
        let xd = deinterleave_pairs(16, x, m, k);
        return matmul_bf16_avx2_paired(xd.as_ptr(), m, k, w16, n, bias, out.as_mut_ptr(), ldo);
    }
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
