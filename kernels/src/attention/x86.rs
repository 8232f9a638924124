//! AVX-512 and AVX2+FMA register tiles for the two products of tiled attention.
//!
//! Both are "NN" products, `C[m×n] (+)= A[m×k] · B[k×n]` with B read row by row: each depth
//! step loads NR vectors of one B row, broadcasts MR elements of A and does MR·NR FMAs into
//! register accumulators. Nothing is reduced horizontally, so every output is one FMA chain
//! in a fixed order. A is addressed element by element, which is what lets P be read out of
//! the keys-major score tile without a transpose.

#![allow(clippy::needless_range_loop)]

use core::arch::x86_64::*;

use super::{tiled, AttnShape, Gemm, Tiles, KC};

/// All `m` rows of one column strip: tiles of `$mr` rows, then one tile for the remainder
/// (`$rem` lists every remainder size, 1 to `$mr − 1`, each its own instantiation).
macro_rules! strip {
    ($tile:ident, $nr:literal, $acol:literal, $mr:literal, [$($rem:literal),*], $m:expr, $g:expr) => {{
        let (m, g): (usize, Gemm) = ($m, $g);
        let mut i = 0;
        while i + $mr <= m {
            $tile::<$mr, $nr, $acol>(g.row::<$acol>(i));
            i += $mr;
        }
        match m - i {
            0 => {}
            $($rem => $tile::<$rem, $nr, $acol>(g.row::<$acol>(i)),)*
            _ => unreachable!(),
        }
    }};
}

/// One column strip of `nr` vectors of the P·V product, all `m` rows.
trait PvStrip {
    const LANES: usize;
    const NR_MAX: usize;
    unsafe fn strip(nr: usize, m: usize, g: Gemm);
}

/// The P·V product in depth passes of [`KC`] keys (see there) and column strips of at most
/// `NR_MAX` vectors, balanced: 80 columns in 16-lane vectors is one strip of 5, 128 is
/// 4 + 4.
#[inline(always)]
unsafe fn pv_passes<S: PvStrip>(m: usize, n: usize, g: Gemm) {
    let lanes = S::LANES;
    let nvec = n.div_ceil(lanes);
    let n_strips = nvec.div_ceil(S::NR_MAX);
    let mut p0 = 0;
    while p0 < g.k {
        let kc = KC.min(g.k - p0);
        let mut v0 = 0;
        for st in 0..n_strips {
            let nr = (nvec - v0) / (n_strips - st);
            let cols = (n - v0 * lanes).min(nr * lanes);
            let gs = Gemm {
                k: kc,
                acc: g.acc || p0 > 0,
                tail: cols - (nr - 1) * lanes,
                ..g.at::<true>(p0, v0 * lanes)
            };
            S::strip(nr, m, gs);
            v0 += nr;
        }
        p0 += kc;
    }
}

// ---------------------------------------------------------------- AVX-512

struct Avx512;

/// # Safety
/// The CPU must support AVX-512F/BW/VL (checked by [`crate::cpu::detect_isa`]); the
/// arguments must have passed [`super::check_bounds`].
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma")]
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn tiled_avx512(
    q: &[f32],
    n_q: usize,
    k: &[f32],
    v: &[f32],
    out: &mut [f32],
    s: AttnShape,
    scale: f32,
    ranges: &[(usize, usize)],
) {
    tiled::<Avx512>(q, n_q, k, v, out, s, scale, ranges)
}

#[inline(always)]
unsafe fn tile512<const MR: usize, const NR: usize, const ACOL: bool>(g: Gemm) {
    // Masked loads and stores cost the same as plain ones, so the last vector of a strip is
    // always masked, and a row may end mid-vector at the end of an allocation.
    let tail = ((1u32 << g.tail) - 1) as u16;
    let mask = |v: usize| if v + 1 == NR { tail } else { 0xFFFF };
    let mut s = [[_mm512_setzero_ps(); NR]; MR];
    if g.acc {
        for i in 0..MR {
            for v in 0..NR {
                s[i][v] = _mm512_maskz_loadu_ps(mask(v), g.c.add(i * g.ldc + v * 16));
            }
        }
    }
    for p in 0..g.k {
        let bp = g.b.add(p * g.ldb);
        let mut bv = [_mm512_setzero_ps(); NR];
        for v in 0..NR {
            bv[v] = _mm512_maskz_loadu_ps(mask(v), bp.add(v * 16));
        }
        for i in 0..MR {
            let av = _mm512_set1_ps(g.a_at::<ACOL>(i, p));
            for v in 0..NR {
                s[i][v] = _mm512_fmadd_ps(av, bv[v], s[i][v]);
            }
        }
    }
    for i in 0..MR {
        for v in 0..NR {
            _mm512_mask_storeu_ps(g.c.add(i * g.ldc + v * 16), mask(v), s[i][v]);
        }
    }
}

impl Tiles for Avx512 {
    #[inline(always)]
    unsafe fn qk(m: usize, n: usize, g: Gemm) {
        let g = Gemm { tail: 16, ..g };
        // 32 zmm registers. One vector of lanes: 12 key rows (their broadcasts fold into
        // the FMAs). Two: 8 rows, 16 accumulators; with 12 rows LLVM hoists all twelve
        // broadcasts next to 24 accumulators and spills (vision full attention 70 → 79 ms,
        // text prefill 19.5 → 23 ms; 6 or 10 rows time the same as 8).
        if n == 16 {
            strip!(
                tile512,
                1,
                false,
                12,
                [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11],
                m,
                g
            )
        } else {
            strip!(tile512, 2, false, 8, [1, 2, 3, 4, 5, 6, 7], m, g)
        }
    }

    #[inline(always)]
    unsafe fn pv(m: usize, n: usize, g: Gemm) {
        pv_passes::<Avx512>(m, n, g)
    }
}

impl PvStrip for Avx512 {
    const LANES: usize = 16;
    // Up to 5 vectors × 4 rows = 20 accumulators; a 32-pair tile is 8 row tiles.
    const NR_MAX: usize = 5;
    #[inline(always)]
    unsafe fn strip(nr: usize, m: usize, g: Gemm) {
        match nr {
            1 => strip!(tile512, 1, true, 4, [1, 2, 3], m, g),
            2 => strip!(tile512, 2, true, 4, [1, 2, 3], m, g),
            3 => strip!(tile512, 3, true, 4, [1, 2, 3], m, g),
            4 => strip!(tile512, 4, true, 4, [1, 2, 3], m, g),
            _ => strip!(tile512, 5, true, 4, [1, 2, 3], m, g),
        }
    }
}

// ---------------------------------------------------------------- AVX2

struct Avx2;

/// # Safety
/// The CPU must support AVX2 and FMA (checked by [`crate::cpu::detect_isa`]); the
/// arguments must have passed [`super::check_bounds`].
#[target_feature(enable = "avx2,fma")]
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn tiled_avx2(
    q: &[f32],
    n_q: usize,
    k: &[f32],
    v: &[f32],
    out: &mut [f32],
    s: AttnShape,
    scale: f32,
    ranges: &[(usize, usize)],
) {
    tiled::<Avx2>(q, n_q, k, v, out, s, scale, ranges)
}

#[inline(always)]
unsafe fn load8<const NR: usize, const PARTIAL: bool>(
    p: *const f32,
    v: usize,
    mask: __m256i,
) -> __m256 {
    if PARTIAL && v + 1 == NR {
        _mm256_maskload_ps(p, mask)
    } else {
        _mm256_loadu_ps(p)
    }
}

/// `PARTIAL`: the last vector of the strip is partial and goes through vmaskmov (masked
/// lanes are neither read nor written). A const so that full strips, the usual case, keep
/// no mask register live: with one, 6 × 2 accumulators no longer fit the 16 ymm registers
/// and LLVM spilled half of them.
#[inline(always)]
unsafe fn tile256<const MR: usize, const NR: usize, const ACOL: bool, const PARTIAL: bool>(
    g: Gemm,
) {
    let mask = _mm256_cmpgt_epi32(
        _mm256_set1_epi32(g.tail as i32),
        _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7),
    );
    let mut s = [[_mm256_setzero_ps(); NR]; MR];
    if g.acc {
        for i in 0..MR {
            for v in 0..NR {
                s[i][v] = load8::<NR, PARTIAL>(g.c.add(i * g.ldc + v * 8), v, mask);
            }
        }
    }
    for p in 0..g.k {
        let bp = g.b.add(p * g.ldb);
        let mut bv = [_mm256_setzero_ps(); NR];
        for v in 0..NR {
            bv[v] = load8::<NR, PARTIAL>(bp.add(v * 8), v, mask);
        }
        for i in 0..MR {
            let av = _mm256_set1_ps(g.a_at::<ACOL>(i, p));
            for v in 0..NR {
                s[i][v] = _mm256_fmadd_ps(av, bv[v], s[i][v]);
            }
        }
    }
    for i in 0..MR {
        for v in 0..NR {
            let p = g.c.add(i * g.ldc + v * 8);
            if PARTIAL && v + 1 == NR {
                _mm256_maskstore_ps(p, mask, s[i][v]);
            } else {
                _mm256_storeu_ps(p, s[i][v]);
            }
        }
    }
}

/// [`tile256`] for full strips.
#[inline(always)]
unsafe fn tile256f<const MR: usize, const NR: usize, const ACOL: bool>(g: Gemm) {
    tile256::<MR, NR, ACOL, false>(g)
}

/// [`tile256`] for strips that end mid-vector.
#[inline(always)]
unsafe fn tile256p<const MR: usize, const NR: usize, const ACOL: bool>(g: Gemm) {
    tile256::<MR, NR, ACOL, true>(g)
}

impl Tiles for Avx2 {
    #[inline(always)]
    unsafe fn qk(m: usize, n: usize, g: Gemm) {
        // 16 ymm registers: 6 key rows × 2 vectors is 12 accumulators, 2 B vectors and a
        // broadcast.
        let g = Gemm { tail: 8, ..g };
        for j in (0..n).step_by(16) {
            let gj = g.at::<false>(0, j);
            strip!(tile256f, 2, false, 6, [1, 2, 3, 4, 5], m, gj)
        }
    }

    #[inline(always)]
    unsafe fn pv(m: usize, n: usize, g: Gemm) {
        pv_passes::<Avx2>(m, n, g)
    }
}

impl PvStrip for Avx2 {
    const LANES: usize = 8;
    // 2 vectors × 6 rows = 12 accumulators, as for the scores.
    const NR_MAX: usize = 2;
    #[inline(always)]
    unsafe fn strip(nr: usize, m: usize, g: Gemm) {
        match (nr, g.tail < 8) {
            (1, false) => strip!(tile256f, 1, true, 6, [1, 2, 3, 4, 5], m, g),
            (1, true) => strip!(tile256p, 1, true, 6, [1, 2, 3, 4, 5], m, g),
            (_, false) => strip!(tile256f, 2, true, 6, [1, 2, 3, 4, 5], m, g),
            (_, true) => strip!(tile256p, 2, true, 6, [1, 2, 3, 4, 5], m, g),
        }
    }
}
