//! Few-row matmul on AVX2 + FMA against panel weights ([`crate::packed`]): the denoising
//! step's kernel where the weights were repacked at load.
//!
//! A register tile is `MR` rows (≤ 4, one prepared group) × `NV` vectors of 8 outputs
//! (`NV / 2` panels). Each k pair loads a tile's weight vectors one at a time, widens each to
//! its even-k and odd-k halves ([`super::widen_pairs256`]) and does one FMA per row and half
//! with the row's broadcast activation: the activations cost one 4-byte broadcast per row,
//! k and vector, and nothing is summed across lanes. Tiles keep 8 accumulators (12 for 3
//! rows) in flight, enough to cover the FMA latency at two per cycle; each k block's sums
//! are added to the running totals ([`crate::packed::k_block`], as the many-row GEMM does).
//!
//! Rows are taken in groups of 4; for each panel (or pair of panels, when a group has
//! fewer than 4 rows and its tile spans two) every group runs over the same weights, which
//! the first group brought into L1/L2.

use core::arch::x86_64::*;

use super::widen_pairs256;
use crate::packed::{k_block, PackedBf16, PanelRows, PANEL};

/// Bytes ahead of the current pair that each panel's stream is prefetched (16 lines) by
/// tiles over 2 or 4 panels (1 or 2 rows), for panels of at least [`LONG_PANEL_BYTES`].
const PREFETCH_BYTES: usize = 1024;

/// The same for one-panel tiles (3 or 4 rows: the step's 8 rows run as two such groups;
/// 1 or 2 rows only at a range's last panel), whose single stream needs more lines in
/// flight to cover DRAM latency: 64 lines, about
/// what a 1 × 64 tile keeps in flight over its four streams. Measured on Zen 3, 2 threads,
/// against 1 KiB: 8 × 2048 × 11008 +5 to +8%, 8 × 896 × 4864 +2 to +6%, 4 rows +1 to +10%;
/// 2 KiB per stream for the 2 × 32 tile's two streams was 6-12% slower.
const ONE_PANEL_PREFETCH_BYTES: usize = 4096;

/// Below this many bytes a panel (k < 512) is over before a prefetch 1 KiB ahead in it
/// pays off (the tiny model's k = 64 panels are 2 KiB, a 1 × 64 tile reads four of them at
/// once): such tiles prefetch [`SHORT_PANEL_PREFETCH_BYTES`] ahead instead.
const LONG_PANEL_BYTES: usize = 16 * 1024;

/// How far ahead tiles over short panels prefetch, into L2 (`prefetcht1`): eight 2 KiB
/// panels. Against one tile ahead into L1 (2-8 KiB), in-process A/B on Zen 3 over rows
/// 1-8 of the tiny model's 151,936 × 64 projection with the unmasking pass: 3-4.5% faster
/// (2 threads and 1); 8, 16 and 32 KiB into L2 were within 2% of one another.
const SHORT_PANEL_PREFETCH_BYTES: usize = 16 * 1024;

/// `MR` rows × `NV` output vectors of a group over k; `xg`: the group's prepared rows,
/// `w`: its first panel (panels `panel_len` u32 apart).
#[inline(always)]
unsafe fn tile<const MR: usize, const NV: usize>(
    xg: *const f32,
    w: *const u32,
    panel_len: usize,
    k: usize,
) -> [[__m256; NV]; MR] {
    let kb = k_block(k);
    let panel_bytes = panel_len * 4;
    let ahead = if panel_bytes >= LONG_PANEL_BYTES {
        if NV == 2 {
            ONE_PANEL_PREFETCH_BYTES
        } else {
            PREFETCH_BYTES
        }
    } else {
        SHORT_PANEL_PREFETCH_BYTES
    };
    let into_l2 = panel_bytes < LONG_PANEL_BYTES;
    let mut total = [[_mm256_setzero_ps(); NV]; MR];
    let mut pc = 0;
    while pc < k {
        let end = (pc + kb).min(k);
        let mut acc = [[_mm256_setzero_ps(); NV]; MR];
        // Whole pairs of the block (blocks start at multiples of 8: always on a pair).
        for q in pc / 2..end / 2 {
            let xq = xg.add(q * 8);
            for v in 0..NV {
                let wq = w.add((v / 2) * panel_len + q * PANEL + (v % 2) * 8);
                if v % 2 == 0 {
                    // Past the last panel this points outside the weights: a prefetch never
                    // faults, and wrapping_add keeps the address computation defined.
                    let ahead = (wq as *const i8).wrapping_add(ahead);
                    if into_l2 {
                        _mm_prefetch::<_MM_HINT_T1>(ahead);
                    } else {
                        _mm_prefetch::<_MM_HINT_T0>(ahead);
                    }
                }
                let (even, odd) = widen_pairs256(_mm256_loadu_si256(wq as *const __m256i));
                for r in 0..MR {
                    let a = _mm256_broadcast_ss(&*xq.add(r));
                    acc[r][v] = _mm256_fmadd_ps(a, even, acc[r][v]);
                }
                for r in 0..MR {
                    let a = _mm256_broadcast_ss(&*xq.add(4 + r));
                    acc[r][v] = _mm256_fmadd_ps(a, odd, acc[r][v]);
                }
            }
        }
        if end % 2 == 1 {
            // Odd k: the last pair's even half alone (its odd weight is padding).
            let q = end / 2;
            let xq = xg.add(q * 8);
            for v in 0..NV {
                let wq = w.add((v / 2) * panel_len + q * PANEL + (v % 2) * 8);
                let (even, _) = widen_pairs256(_mm256_loadu_si256(wq as *const __m256i));
                for r in 0..MR {
                    let a = _mm256_broadcast_ss(&*xq.add(r));
                    acc[r][v] = _mm256_fmadd_ps(a, even, acc[r][v]);
                }
            }
        }
        for r in 0..MR {
            for v in 0..NV {
                total[r][v] = if pc == 0 {
                    acc[r][v]
                } else {
                    _mm256_add_ps(total[r][v], acc[r][v])
                };
            }
        }
        pc = end;
    }
    total
}

/// Writes a tile's outputs `j0 ..` (absolute, 8 per vector) that fall in `n0..n1`, plus
/// bias, to rows `ldo` apart of `out` (column 0 = output `n0`).
#[inline(always)]
unsafe fn store<const MR: usize, const NV: usize>(
    sums: &[[__m256; NV]; MR],
    j0: usize,
    (n0, n1): (usize, usize),
    bias: Option<&[f32]>,
    out: *mut f32,
    ldo: usize,
) {
    for v in 0..NV {
        let c0 = j0 + 8 * v;
        if c0 >= n1 || c0 + 8 <= n0 {
            continue;
        }
        if c0 >= n0 && c0 + 8 <= n1 {
            let b = bias.map_or(_mm256_setzero_ps(), |b| {
                _mm256_loadu_ps(b.as_ptr().add(c0 - n0))
            });
            for r in 0..MR {
                let s = if bias.is_some() {
                    _mm256_add_ps(sums[r][v], b)
                } else {
                    sums[r][v]
                };
                _mm256_storeu_ps(out.add(r * ldo + c0 - n0), s);
            }
        } else {
            for r in 0..MR {
                let mut lanes = [0f32; 8];
                _mm256_storeu_ps(lanes.as_mut_ptr(), sums[r][v]);
                for (l, &s) in lanes.iter().enumerate() {
                    let c = c0 + l;
                    if (n0..n1).contains(&c) {
                        *out.add(r * ldo + c - n0) = s + bias.map_or(0.0, |b| b[c - n0]);
                    }
                }
            }
        }
    }
}

/// The panels a call reads: the first word of panel 0, words per panel, k.
#[derive(Clone, Copy)]
struct PanelsAt {
    base: *const u32,
    panel_len: usize,
    k: usize,
}

/// One group's tile over panels `p ..` (`NV / 2` of them), stored.
#[inline(always)]
unsafe fn group_tile<const MR: usize, const NV: usize>(
    xg: *const f32,
    w: PanelsAt,
    p: usize,
    cols: (usize, usize),
    bias: Option<&[f32]>,
    out: *mut f32,
    ldo: usize,
) {
    let sums = tile::<MR, NV>(xg, w.base.add(p * w.panel_len), w.panel_len, w.k);
    store::<MR, NV>(&sums, p * PANEL, cols, bias, out, ldo);
}

/// Columns `n0..n1` of `rows · Wᵀ (+ bias)` into `out` (column 0 = output `n0`, rows `ldo`
/// apart): see [`crate::packed::matmul_panels`], which checks the shapes.
///
/// # Safety
/// AVX2 and FMA must be available; `bias` must hold `n1 − n0` values, `out` must be valid
/// for `rows.rows()` rows of `n1 − n0` values `ldo` apart, `n0 ≤ n1 ≤ w.n()`, and
/// `rows.k() == w.k()`.
#[target_feature(enable = "avx2,fma")]
pub unsafe fn matmul_panels_avx2(
    rows: &PanelRows,
    w: &PackedBf16,
    n0: usize,
    n1: usize,
    bias: Option<&[f32]>,
    out: *mut f32,
    ldo: usize,
) {
    let (m, k) = (rows.rows(), rows.k());
    let group_len = k.div_ceil(2) * 8;
    let (p0, p1) = (n0 / PANEL, n1.div_ceil(PANEL));
    // Panels per step: what the smallest group's tile takes (see `group_tiles`), so that
    // every group passes over the same weights while they are in L1/L2.
    let step = match m % 4 {
        1 => 4,
        2 => 2,
        _ => 1,
    };
    let cols = (n0, n1);
    // The words once per call (mapped panels are behind a trait object).
    let at = PanelsAt {
        base: w.as_words().as_ptr(),
        panel_len: PackedBf16::panel_len(k),
        k,
    };
    let mut p = p0;
    while p < p1 {
        let panels = step.min(p1 - p);
        for g in 0..m.div_ceil(4) {
            let xg = rows.x.as_ptr().add(g * group_len);
            let o = out.add(g * 4 * ldo);
            group_tiles(xg, (m - 4 * g).min(4), at, p, panels, cols, bias, o, ldo);
        }
        p += panels;
    }
}

/// One group's tiles over `panels` panels from `p`. Tiles keep 8 accumulators where the
/// rows allow (4 × 16, 2 × 32, 1 × 64 outputs) and 6 for 3 rows: with the activations'
/// broadcasts held for all the tile's vectors (2 per row), 3 × 32 would need 20 registers.
#[inline(always)]
unsafe fn group_tiles(
    xg: *const f32,
    mr: usize,
    w: PanelsAt,
    mut p: usize,
    panels: usize,
    cols: (usize, usize),
    bias: Option<&[f32]>,
    out: *mut f32,
    ldo: usize,
) {
    let end = p + panels;
    while p < end {
        let left = end - p;
        p += match (mr, left) {
            (4, _) => {
                group_tile::<4, 2>(xg, w, p, cols, bias, out, ldo);
                1
            }
            (3, _) => {
                group_tile::<3, 2>(xg, w, p, cols, bias, out, ldo);
                1
            }
            (2, 2..) => {
                group_tile::<2, 4>(xg, w, p, cols, bias, out, ldo);
                2
            }
            (2, _) => {
                group_tile::<2, 2>(xg, w, p, cols, bias, out, ldo);
                1
            }
            (_, 4..) => {
                group_tile::<1, 8>(xg, w, p, cols, bias, out, ldo);
                4
            }
            (_, 2..) => {
                group_tile::<1, 4>(xg, w, p, cols, bias, out, ldo);
                2
            }
            _ => {
                group_tile::<1, 2>(xg, w, p, cols, bias, out, ldo);
                1
            }
        };
    }
}
