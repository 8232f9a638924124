//! Many-row matmul on AVX2 + FMA (prefill, vision): `out = x · Wᵀ (+ bias)` as a packed
//! GEMM in Goto/BLIS blocking, with the 6-row × 16-output register tile of BLIS's Haswell
//! sgemm kernel.
//!
//! Why a second AVX2 kernel: the dot-product tiles of [`super::matmul_avx2`] stream weights
//! as stored, which is what a denoising step (memory-bound, ≤ 16 rows) wants, but with many
//! rows they are bound by their loads: every 2 FMAs need an activation vector from L2, and
//! every weight vector is widened again for each 4-row tile. Here each step of k broadcasts
//! 6 activations and loads 16 weights already widened, for 12 FMAs, with no widening in the
//! inner loop: the FMA units set the pace.
//!
//! The weights are widened to f32 into panels of 16 outputs × [`KC`] k, k-major (16 KiB: in
//! L1 while every 6-row tile of a row block passes over it), [`NC`] outputs at a time: a
//! transient per-call buffer of at most 1 MiB, never a load-time copy. Activations are copied
//! per [`MC`]-row block (in L2 while all panels pass) into 6-row tiles, k-major, so that a
//! tile's broadcasts read one contiguous stream (BLIS packs both operands the same way;
//! in-process A/B against broadcasting from 6 rows in place, one thread: 2-4% faster).
//!
//! Summation order: k is cut into equal blocks of at most [`KC`] (they depend on k alone);
//! each output sums a block's products in k order, one FMA after the other, adds that sum to
//! the previous blocks' (kept in `out`), and after the last block adds the bias. A row's
//! result never depends on the other rows of the call, the tile or the thread it landed
//! in. It differs
//! from the dot-product kernels' lane order by rounding only, so callers choose between
//! the two on a whole call's row count, never per piece.

use core::arch::x86_64::*;

use super::load8;
use crate::packed::{k_block, PackedBf16, PANEL};
use crate::WeightElem;

/// Activation rows per register tile.
const MR: usize = 6;
/// Outputs per register tile (two vectors) and per packed weight panel.
const NR: usize = 16;
/// k per block: one panel is `KC × 16` f32 = 16 KiB (half of a 32 KiB L1).
const KC: usize = 256;
/// Activation rows per block: `MC × KC` f32 = 96 KiB, in L2 while all panels pass.
const MC: usize = 96;
/// Outputs packed at a time: `NC × KC` f32 = 1 MiB at most.
const NC: usize = 1024;

/// 12 accumulators: rows 0..6 × two 8-output halves.
type Acc = [__m256; 2 * MR];

/// `acc[2r + h] += Σ_kk a[kk·6 + r] · b[kk·16 + 8h ..]`, kk in order, one FMA after the
/// other; `a`: the tile's rows packed k-major ([`pack_rows`]).
#[inline(always)]
unsafe fn micro_tile(a: *const f32, kc: usize, b: *const f32, acc: &mut Acc) {
    let mut c = *acc;
    // Four k at a time with the pointers bumped once: every load's offset is a constant.
    let (mut ap, mut bp) = (a, b);
    for _ in 0..kc / 4 {
        k_step(&mut c, ap, bp, 0);
        k_step(&mut c, ap, bp, 1);
        k_step(&mut c, ap, bp, 2);
        k_step(&mut c, ap, bp, 3);
        ap = ap.add(4 * MR);
        bp = bp.add(4 * NR);
    }
    for kk in 0..kc % 4 {
        k_step(&mut c, ap, bp, kk);
    }
    *acc = c;
}

#[inline(always)]
unsafe fn k_step(c: &mut Acc, a: *const f32, b: *const f32, kk: usize) {
    let b0 = _mm256_loadu_ps(b.add(kk * NR));
    let b1 = _mm256_loadu_ps(b.add(kk * NR + 8));
    for r in 0..MR {
        let a = _mm256_broadcast_ss(&*a.add(kk * MR + r));
        c[2 * r] = _mm256_fmadd_ps(a, b0, c[2 * r]);
        c[2 * r + 1] = _mm256_fmadd_ps(a, b1, c[2 * r + 1]);
    }
}

/// A tile's `mr` activation rows (rows `k` apart from `x`), k `0..kc`, packed k-major:
/// `dst[kk·6 + r]`, so that the micro-tile's broadcasts read one contiguous stream. Rows
/// past `mr` repeat the last one (computed, never stored).
#[inline(always)]
unsafe fn pack_rows(x: *const f32, k: usize, mr: usize, kc: usize, dst: *mut f32) {
    for r in 0..MR {
        let row = x.add(r.min(mr - 1) * k);
        for kk in 0..kc {
            *dst.add(kk * MR + r) = *row.add(kk);
        }
    }
}

/// Floats of `m` rows of `k` packed by [`pack_gemm_rows`].
pub fn gemm_rows_len(m: usize, k: usize) -> usize {
    let kc = k_block(k);
    m.div_ceil(MR) * MR * k.div_ceil(kc) * kc
}

/// `m` rows of `k` (`x`) packed once for all the pieces of a GEMM split by outputs
/// ([`GemmActs::Packed`]), which would otherwise each pack them again: per k block, per 6-row tile, the tile's rows k-major, as
/// [`pack_rows`] packs them (block `b`, tile `t` at `(b · tiles + t) · 6 · kc`, `kc` the k
/// block size). `dst` must hold [`gemm_rows_len`] floats.
pub fn pack_gemm_rows(x: &[f32], m: usize, k: usize, dst: &mut [f32]) {
    assert!(
        x.len() >= m * k && dst.len() >= gemm_rows_len(m, k),
        "pack_gemm_rows: operand too short"
    );
    if k == 0 || m == 0 {
        return;
    }
    let kc_step = k_block(k);
    let tiles = m.div_ceil(MR);
    for (b, pc) in (0..k).step_by(kc_step).enumerate() {
        let kc = kc_step.min(k - pc);
        for t in 0..tiles {
            let mr = MR.min(m - t * MR);
            // SAFETY: pack_rows reads rows t·6 .. t·6 + mr (< m) at k pc .. pc + kc (≤ k) of
            // x, and writes 6 · kc floats from (b · tiles + t) · 6 · kc_step, inside dst
            // (both lengths asserted above).
            unsafe {
                pack_rows(
                    x.as_ptr().add(t * MR * k + pc),
                    k,
                    mr,
                    kc,
                    dst.as_mut_ptr().add((b * tiles + t) * MR * kc_step),
                )
            };
        }
    }
}

/// In-register transpose of 8 × 8 floats: `v[c][t]` becomes `v[t][c]`.
#[inline(always)]
unsafe fn transpose8(v: &mut [__m256; 8]) {
    let t0 = _mm256_unpacklo_ps(v[0], v[1]);
    let t1 = _mm256_unpackhi_ps(v[0], v[1]);
    let t2 = _mm256_unpacklo_ps(v[2], v[3]);
    let t3 = _mm256_unpackhi_ps(v[2], v[3]);
    let t4 = _mm256_unpacklo_ps(v[4], v[5]);
    let t5 = _mm256_unpackhi_ps(v[4], v[5]);
    let t6 = _mm256_unpacklo_ps(v[6], v[7]);
    let t7 = _mm256_unpackhi_ps(v[6], v[7]);
    // s_j: lanes (j, j+4) of columns 0-3 | 4-7 … of four columns.
    let s0 = _mm256_shuffle_ps::<0x44>(t0, t2);
    let s1 = _mm256_shuffle_ps::<0xEE>(t0, t2);
    let s2 = _mm256_shuffle_ps::<0x44>(t1, t3);
    let s3 = _mm256_shuffle_ps::<0xEE>(t1, t3);
    let s4 = _mm256_shuffle_ps::<0x44>(t4, t6);
    let s5 = _mm256_shuffle_ps::<0xEE>(t4, t6);
    let s6 = _mm256_shuffle_ps::<0x44>(t5, t7);
    let s7 = _mm256_shuffle_ps::<0xEE>(t5, t7);
    v[0] = _mm256_permute2f128_ps::<0x20>(s0, s4);
    v[1] = _mm256_permute2f128_ps::<0x20>(s1, s5);
    v[2] = _mm256_permute2f128_ps::<0x20>(s2, s6);
    v[3] = _mm256_permute2f128_ps::<0x20>(s3, s7);
    v[4] = _mm256_permute2f128_ps::<0x31>(s0, s4);
    v[5] = _mm256_permute2f128_ps::<0x31>(s1, s5);
    v[6] = _mm256_permute2f128_ps::<0x31>(s2, s6);
    v[7] = _mm256_permute2f128_ps::<0x31>(s3, s7);
}

/// One panel: `dst[kk·16 + c] = W[c][pc + kk]` widened, for `c < nr` (zero for `c ≥ nr`),
/// `kk < kc`; `w` points at the panel's first weight row (rows `k` apart).
#[inline(always)]
unsafe fn pack_panel<W: WeightElem>(
    w: *const W,
    k: usize,
    nr: usize,
    pc: usize,
    kc: usize,
    dst: *mut f32,
) {
    let k8 = kc / 8 * 8;
    for c0 in [0, 8] {
        if c0 + 8 <= nr {
            // Whole 8 × 8 blocks: 8 loads, 24 shuffles, 8 stores.
            let mut kk = 0;
            while kk < k8 {
                let mut v = [_mm256_setzero_ps(); 8];
                for (c, vc) in v.iter_mut().enumerate() {
                    *vc = load8(w.add((c0 + c) * k + pc + kk));
                }
                transpose8(&mut v);
                for (t, vt) in v.iter().enumerate() {
                    _mm256_storeu_ps(dst.add((kk + t) * NR + c0), *vt);
                }
                kk += 8;
            }
            for kk in k8..kc {
                for c in 0..8 {
                    *dst.add(kk * NR + c0 + c) = (*w.add((c0 + c) * k + pc + kk)).to_f32();
                }
            }
        } else {
            for kk in 0..kc {
                for c in 0..8 {
                    *dst.add(kk * NR + c0 + c) = if c0 + c < nr {
                        (*w.add((c0 + c) * k + pc + kk)).to_f32()
                    } else {
                        0.0
                    };
                }
            }
        }
    }
}

/// The tile's running sums from `out` (`mr` rows × `nr` outputs), zero where outside.
#[inline(always)]
unsafe fn load_tile(out: *const f32, ldo: usize, mr: usize, nr: usize) -> Acc {
    let mut acc = [_mm256_setzero_ps(); 2 * MR];
    if nr == NR {
        for r in 0..mr {
            acc[2 * r] = _mm256_loadu_ps(out.add(r * ldo));
            acc[2 * r + 1] = _mm256_loadu_ps(out.add(r * ldo + 8));
        }
    } else {
        let mut row = [0f32; NR];
        for r in 0..mr {
            row[..nr].copy_from_slice(core::slice::from_raw_parts(out.add(r * ldo), nr));
            acc[2 * r] = _mm256_loadu_ps(row.as_ptr());
            acc[2 * r + 1] = _mm256_loadu_ps(row.as_ptr().add(8));
        }
    }
    acc
}

/// Writes `mr` rows × `nr` outputs of the tile, plus `bias` (the tile's 16, or fewer).
#[inline(always)]
unsafe fn store_tile(
    mut acc: Acc,
    bias: Option<&[f32]>,
    out: *mut f32,
    ldo: usize,
    mr: usize,
    nr: usize,
) {
    if let Some(b) = bias {
        let mut bv = [0f32; NR];
        bv[..nr].copy_from_slice(&b[..nr]);
        let (b0, b1) = (
            _mm256_loadu_ps(bv.as_ptr()),
            _mm256_loadu_ps(bv.as_ptr().add(8)),
        );
        for r in 0..mr {
            acc[2 * r] = _mm256_add_ps(acc[2 * r], b0);
            acc[2 * r + 1] = _mm256_add_ps(acc[2 * r + 1], b1);
        }
    }
    if nr == NR {
        for r in 0..mr {
            _mm256_storeu_ps(out.add(r * ldo), acc[2 * r]);
            _mm256_storeu_ps(out.add(r * ldo + 8), acc[2 * r + 1]);
        }
    } else {
        let mut row = [0f32; NR];
        for r in 0..mr {
            _mm256_storeu_ps(row.as_mut_ptr(), acc[2 * r]);
            _mm256_storeu_ps(row.as_mut_ptr().add(8), acc[2 * r + 1]);
            core::ptr::copy_nonoverlapping(row.as_ptr(), out.add(r * ldo), nr);
        }
    }
}

/// `out[i·ldo + j] = Σ_kk x[i·k + kk] · W[j·k + kk] + bias[j]` for `i < m`, `j < n`; writes
/// nothing else (threads may own other columns of the same rows).
///
/// # Safety
/// The CPU must support AVX2, FMA and F16C (checked by [`crate::cpu::detect_isa`]); the
/// slices must hold the shapes and `out` must be valid for writes of `(m − 1)·ldo + n`
/// floats with `ldo ≥ n` (checked by the safe entry, [`crate::matmul::matmul_many_rows`]).
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn gemm_avx2<W: WeightElem>(
    x: GemmActs<'_>,
    m: usize,
    k: usize,
    w: &[W],
    n: usize,
    bias: Option<&[f32]>,
    out: *mut f32,
    ldo: usize,
) {
    assert!(w.len() >= n * k, "gemm_avx2: operand too short");
    gemm(
        x.checked(m, k),
        m,
        k,
        Stored(w.as_ptr(), k),
        n,
        bias,
        out,
        ldo,
    )
}

/// [`gemm_avx2`] for columns `n0..n1` of panel weights ([`crate::packed`]), `n0` on a panel
/// boundary; column 0 of `out` is output `n0`. Same bits as [`gemm_avx2`] on the weights as
/// stored (the panels are widened into the same f32 panels).
///
/// # Safety
/// As [`gemm_avx2`]; `x` must hold `m` rows of `w.k()` (checked), `n0 % 16 == 0`,
/// `n0 ≤ n1 ≤ w.n()` (checked).
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn gemm_avx2_panels(
    x: GemmActs<'_>,
    m: usize,
    w: &PackedBf16,
    n0: usize,
    n1: usize,
    bias: Option<&[f32]>,
    out: *mut f32,
    ldo: usize,
) {
    let k = w.k();
    let acts = x.checked(m, k);
    assert!(
        n0.is_multiple_of(PANEL) && n0 <= n1 && n1 <= w.n(),
        "gemm_avx2_panels: columns"
    );
    let src = Panels(w.panels_from(n0 / PANEL).as_ptr(), PackedBf16::panel_len(k));
    gemm(acts, m, k, src, n1 - n0, bias, out, ldo)
}

/// The GEMM's activations, `m` rows of `k`: as they are (each call packs the 6-row tiles it
/// needs, per row block), or packed once beforehand by [`pack_gemm_rows`] for several calls
/// (the pieces of a split by outputs): the same bits either way.
#[derive(Clone, Copy, Debug)]
pub enum GemmActs<'a> {
    Rows(&'a [f32]),
    Packed(&'a [f32]),
}

impl GemmActs<'_> {
    /// The pointer the GEMM reads, after checking the length for `m` rows of `k`.
    fn checked(self, m: usize, k: usize) -> Acts {
        match self {
            GemmActs::Rows(x) => {
                assert!(x.len() >= m * k, "gemm_avx2: operand too short");
                Acts::Rows(x.as_ptr())
            }
            GemmActs::Packed(r) => {
                assert!(
                    r.len() >= gemm_rows_len(m, k),
                    "gemm_avx2: operand too short"
                );
                Acts::Packed(r.as_ptr())
            }
        }
    }
}

/// [`GemmActs`] as the GEMM reads them.
#[derive(Clone, Copy)]
enum Acts {
    Rows(*const f32),
    Packed(*const f32),
}

/// Where the GEMM's f32 panels come from: weights as stored, or repacked panels.
trait PanelSource: Copy {
    /// Panel of outputs `j0 .. j0 + nr` (`j0` a multiple of 16), k `pc .. pc + kc`, into
    /// `dst` (`kc × 16`, k-major, zero for outputs ≥ `nr`).
    unsafe fn pack(self, j0: usize, nr: usize, pc: usize, kc: usize, dst: *mut f32);
}

/// Weights as stored: rows of `k`.
#[derive(Clone, Copy)]
struct Stored<W>(*const W, usize);

impl<W: WeightElem> PanelSource for Stored<W> {
    #[inline(always)]
    unsafe fn pack(self, j0: usize, nr: usize, pc: usize, kc: usize, dst: *mut f32) {
        pack_panel(self.0.add(j0 * self.1), self.1, nr, pc, kc, dst)
    }
}

/// Repacked panels (`u32` pairs), `panel_len` apart; padding outputs are zero already.
#[derive(Clone, Copy)]
struct Panels(*const u32, usize);

impl PanelSource for Panels {
    #[inline(always)]
    unsafe fn pack(self, j0: usize, _nr: usize, pc: usize, kc: usize, dst: *mut f32) {
        let panel = self.0.add(j0 / PANEL * self.1);
        // pc is a multiple of 8: the block starts on a pair.
        for q in pc / 2..(pc + kc).div_ceil(2) {
            let (e0, o0) =
                super::widen_pairs256(_mm256_loadu_si256(panel.add(q * PANEL) as *const __m256i));
            let (e1, o1) = super::widen_pairs256(_mm256_loadu_si256(
                panel.add(q * PANEL + 8) as *const __m256i
            ));
            let row = dst.add((2 * q - pc) * NR);
            _mm256_storeu_ps(row, e0);
            _mm256_storeu_ps(row.add(8), e1);
            if 2 * q + 1 < pc + kc {
                _mm256_storeu_ps(row.add(NR), o0);
                _mm256_storeu_ps(row.add(NR + 8), o1);
            }
        }
    }
}

#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn gemm<S: PanelSource>(
    acts: Acts,
    m: usize,
    k: usize,
    w: S,
    n: usize,
    bias: Option<&[f32]>,
    out: *mut f32,
    ldo: usize,
) {
    assert!(
        bias.is_none_or(|b| b.len() >= n),
        "gemm_avx2: bias too short"
    );
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        for i in 0..m {
            for j in 0..n {
                *out.add(i * ldo + j) = bias.map_or(0.0, |b| b[j]);
            }
        }
        return;
    }
    // k blocks of equal size, at most KC (896 = 4 × 224, not 3 × 256 + 128: a short block
    // pays a tile's fixed costs for half the products); the panel kernels use the same.
    let kc_step = k_block(k);
    debug_assert!(kc_step <= KC);
    let mut packed = alloc::vec![0f32; NC.min(n.next_multiple_of(NR)) * kc_step];
    let packed = packed.as_mut_ptr();
    // Rows packed per row block, unless they came packed.
    let mut block_rows = match acts {
        Acts::Rows(_) => alloc::vec![0f32; MC * kc_step],
        Acts::Packed(_) => alloc::vec::Vec::new(),
    };
    let block_rows = block_rows.as_mut_ptr();
    let tiles = m.div_ceil(MR);
    for jc in (0..n).step_by(NC) {
        let nc = NC.min(n - jc);
        let panels = nc.div_ceil(NR);
        for pc in (0..k).step_by(kc_step) {
            let kc = kc_step.min(k - pc);
            for p in 0..panels {
                let nr = NR.min(nc - p * NR);
                w.pack(jc + p * NR, nr, pc, kc, packed.add(p * kc * NR));
            }
            let (first, last) = (pc == 0, pc + kc == k);
            for ic in (0..m).step_by(MC) {
                let mc = MC.min(m - ic);
                if let Acts::Rows(x) = acts {
                    for ir in (ic..ic + mc).step_by(MR) {
                        let mr = MR.min(ic + mc - ir);
                        let dst = block_rows.add((ir - ic) * kc);
                        pack_rows(x.add(ir * k + pc), k, mr, kc, dst);
                    }
                }
                for p in 0..panels {
                    let j0 = jc + p * NR;
                    let nr = NR.min(n - j0);
                    let panel = packed.add(p * kc * NR);
                    let tile_bias = if last { bias.map(|b| &b[j0..]) } else { None };
                    for ir in (ic..ic + mc).step_by(MR) {
                        let mr = MR.min(ic + mc - ir);
                        let o = out.add(ir * ldo + j0);
                        if !first {
                            // The sums so far come from L3 or memory: ask for them now,
                            // add them after this block's products.
                            for r in 0..mr {
                                _mm_prefetch::<_MM_HINT_T0>(o.add(r * ldo) as *const i8);
                                _mm_prefetch::<_MM_HINT_T0>(o.add(r * ldo + 15) as *const i8);
                            }
                        }
                        let mut acc = [_mm256_setzero_ps(); 2 * MR];
                        let tile_rows = match acts {
                            Acts::Rows(_) => block_rows.add((ir - ic) * kc),
                            // ir is a multiple of 6 (row blocks are 96 rows).
                            Acts::Packed(p) => {
                                p.add(((pc / kc_step) * tiles + ir / MR) * MR * kc_step)
                            }
                        };
                        micro_tile(tile_rows, kc, panel, &mut acc);
                        if !first {
                            let before = load_tile(o, ldo, mr, nr);
                            for (a, b) in acc.iter_mut().zip(before) {
                                *a = _mm256_add_ps(b, *a);
                            }
                        }
                        store_tile(acc, tile_bias, o, ldo, mr, nr);
                    }
                }
            }
        }
    }
}
