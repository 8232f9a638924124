//! Scaled dot-product attention where each query sees one contiguous range of keys.
//!
//! Both attention patterns of the model reduce to that: block-causal text attention (a query
//! in block b sees keys `[0, (b+1)·B)`, spec §7.3) and the vision tower's segment / window
//! attention (a query sees its own segment `[s0, s1)`, spec §5.1(f)). GQA: query head `h`
//! reads kv head `h / (n_heads / n_kv_heads)`.
//!
//! Two paths. Without AVX-512, calls with one to three (query, head) pairs per kv head, or
//! very short ranges, go one query at a time (a dot per key, then an AXPY per key).
//! Everything else is tiled like a GEMM: up to 32 (query, head) pairs that read the same kv
//! head form a tile, and the tile meets each key and value row once:
//!
//! * `Sᵀ = K · Qᵀ` — keys are the GEMM rows and the tile's queries the vector lanes, so the
//!   only operand to rearrange is the tile's small `Qᵀ` (`head_dim × 32`), which every key
//!   reuses; K is read in place. (Transposing K instead would have to be redone for every
//!   tile unless a call covers many tiles, and the engine splits calls across threads.)
//! * the softmax then runs down the columns of `Sᵀ`: maxima and sums are per-lane vector
//!   operations, with no horizontal reductions.
//! * `O = P · V` reads `P` straight out of `Sᵀ` (a broadcast does not care about strides)
//!   and V rows in place.
//!
//! Long key ranges are processed in chunks with online-softmax rescaling (flash attention),
//! so scratch stays bounded and the score tile stays in L2.

use alloc::vec;
use alloc::vec::Vec;

use crate::math::exp_f32;
use crate::matmul::{dot, Isa};
use crate::softmax::softmax_inplace;

#[cfg(target_arch = "x86_64")]
pub mod amx;
#[cfg(target_arch = "x86_64")]
mod x86;

#[derive(Clone, Copy, Debug)]
pub struct AttnShape {
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    /// Row strides (in f32) of q / out and of k / v.
    pub q_stride: usize,
    pub kv_stride: usize,
}

/// (query, head) pairs per tile: the lanes of two AVX-512 vectors. Also the width of the
/// score tile, so it bounds the scratch to `QB · CHUNK` floats.
pub(crate) const QB: usize = 32;
/// Keys per online-softmax step. The score tile (`CHUNK × QB` f32 = 64 KiB) stays in L2
/// between the two products; longer chunks gain nothing measurable.
const CHUNK: usize = 512;
/// Calls with fewer (query, head) pairs per kv head than the first limit, or whose longest
/// range is shorter than the second, take the per-query path: there the tile's fixed costs
/// (gathering Qᵀ, padding the lanes to whole vectors) are not amortised. Measured, single
/// thread, min of 2000 calls, 16 heads of 80:
///
/// * AVX-512 never: the tiles win or tie from one pair up (1 query × 1024 keys 0.94 →
///   0.81 ms, × 64 keys 0.038 both) and down to 4-key ranges (64 queries, 0.137 vs
///   0.139 ms); they lose only on 1–2 key ranges, which neither model produces, and on
///   calls of a few µs (1 query × 8 keys: 4 → 9 µs). Always tiling makes every result
///   independent of how the engine splits rows across threads (see [`tiled`]).
/// * AVX2 below 2 pairs (1 × 1024 keys 1.12 vs 1.21 ms, × 64 keys 0.042 vs 0.058 ms; 2 × 64
///   keys wins 0.084 → 0.058 ms) or 8 keys (64 × 4 keys ties, 64 × 8 wins 0.31 → 0.17 ms).
/// * portable code below 4 pairs (3 × 32 keys loses 0.061 → 0.095 ms; 8 pairs × 300 keys
///   win 0.24 → 0.17 ms) or 8 keys (64 × 4 keys 0.18 vs 0.28 ms, 64 × 8 ties).
///
/// With AVX2 and portable code, a thread split that leaves a call under these limits can
/// therefore change the last bits of its rows.
fn small_call_limits(isa: Isa) -> (usize, usize) {
    match isa {
        Isa::Avx512 => (1, 1),
        Isa::Avx2 => (2, 8),
        Isa::Portable => (4, 8),
    }
}

/// Attention for query rows `q_rows` (each `q_stride` long, heads contiguous), writing the
/// same rows of `out`. `key_range(i)` gives the visible keys of query `i` (index into the
/// rows of `k`/`v`); an empty range (`lo == hi`) yields a zero output row. `scores` is
/// scratch of at least the longest range (only the per-query path for small calls uses it).
/// `isa` selects the instruction set; the arithmetic is the same, rounding may differ
/// between ISAs and between the per-query and tiled paths. A row's result does not depend
/// on the other rows of the call, so splitting rows across calls (threads) changes no bit,
/// unless with AVX2 or portable code a split sends a call below the small-call limits
/// (`small_call_limits` in the source).
#[allow(clippy::too_many_arguments)]
pub fn attention<F: Fn(usize) -> (usize, usize)>(
    isa: Isa,
    q: &[f32],
    n_q: usize,
    k: &[f32],
    v: &[f32],
    out: &mut [f32],
    s: AttnShape,
    scale: f32,
    key_range: F,
    scores: &mut [f32],
) {
    let group = s.n_heads / s.n_kv_heads;
    let max_keys = (0..n_q)
        .map(|i| {
            let (lo, hi) = key_range(i);
            assert!(lo <= hi, "attention: key range of query {i} is reversed");
            hi - lo
        })
        .max()
        .unwrap_or(0);
    let (min_pairs, min_keys) = small_call_limits(isa);
    if n_q * group < min_pairs || max_keys < min_keys {
        match isa {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: Isa values come from cpu::detect_isa, which checked CPU and OS support.
            Isa::Avx512 => unsafe { rows_avx512(q, n_q, k, v, out, s, scale, &key_range, scores) },
            #[cfg(target_arch = "x86_64")]
            // SAFETY: as above.
            Isa::Avx2 => unsafe { rows_avx2(q, n_q, k, v, out, s, scale, &key_range, scores) },
            _ => rows_body(q, n_q, k, v, out, s, scale, &key_range, scores),
        }
        return;
    }
    let ranges: Vec<(usize, usize)> = (0..n_q).map(&key_range).collect();
    check_bounds(q, n_q, k, v, out, s, &ranges);
    match isa {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: Isa values come from cpu::detect_isa, which checked CPU and OS support;
        // check_bounds validated every access the tiles make.
        Isa::Avx512 => unsafe { x86::tiled_avx512(q, n_q, k, v, out, s, scale, &ranges) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as above.
        Isa::Avx2 => unsafe { x86::tiled_avx2(q, n_q, k, v, out, s, scale, &ranges) },
        // SAFETY: check_bounds validated every access the tiles make.
        _ => unsafe { tiled::<Portable>(q, n_q, k, v, out, s, scale, &ranges) },
    }
}

/// The query and output rows of [`check_bounds`].
fn check_q_bounds(q: &[f32], n_q: usize, out: &[f32], s: AttnShape) {
    assert!(
        s.n_heads * s.head_dim <= s.q_stride,
        "attention: heads overflow q_stride"
    );
    if n_q > 0 {
        let q_end = (n_q - 1) * s.q_stride + s.n_heads * s.head_dim;
        assert!(
            q.len() >= q_end && out.len() >= q_end,
            "attention: q/out too short"
        );
    }
}

/// The tiles use raw pointers: check once per call what slice indexing would have checked.
fn check_bounds(
    q: &[f32],
    n_q: usize,
    k: &[f32],
    v: &[f32],
    out: &[f32],
    s: AttnShape,
    ranges: &[(usize, usize)],
) {
    check_q_bounds(q, n_q, out, s);
    let hd = s.head_dim;
    let kv_heads_read = (s.n_heads - 1) / (s.n_heads / s.n_kv_heads) + 1;
    assert!(
        kv_heads_read * hd <= s.kv_stride,
        "attention: heads overflow kv_stride"
    );
    if let Some(hi) = ranges.iter().filter(|r| r.1 > r.0).map(|r| r.1).max() {
        let kv_end = (hi - 1) * s.kv_stride + kv_heads_read * hd;
        assert!(
            k.len() >= kv_end && v.len() >= kv_end,
            "attention: k/v too short"
        );
    }
}

// ------------------------------------------------------------------ per-query path

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma")]
#[allow(clippy::too_many_arguments)]
unsafe fn rows_avx512(
    q: &[f32],
    n_q: usize,
    k: &[f32],
    v: &[f32],
    out: &mut [f32],
    s: AttnShape,
    scale: f32,
    key_range: &dyn Fn(usize) -> (usize, usize),
    scores: &mut [f32],
) {
    rows_body(q, n_q, k, v, out, s, scale, key_range, scores)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[allow(clippy::too_many_arguments)]
unsafe fn rows_avx2(
    q: &[f32],
    n_q: usize,
    k: &[f32],
    v: &[f32],
    out: &mut [f32],
    s: AttnShape,
    scale: f32,
    key_range: &dyn Fn(usize) -> (usize, usize),
    scores: &mut [f32],
) {
    rows_body(q, n_q, k, v, out, s, scale, key_range, scores)
}

#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn rows_body(
    q: &[f32],
    n_q: usize,
    k: &[f32],
    v: &[f32],
    out: &mut [f32],
    s: AttnShape,
    scale: f32,
    key_range: &dyn Fn(usize) -> (usize, usize),
    scores: &mut [f32],
) {
    let group = s.n_heads / s.n_kv_heads;
    let hd = s.head_dim;
    for i in 0..n_q {
        let (lo, hi) = key_range(i);
        let n_keys = hi - lo;
        for h in 0..s.n_heads {
            let kvh = h / group;
            let qv = &q[i * s.q_stride + h * hd..i * s.q_stride + (h + 1) * hd];
            let sc = &mut scores[..n_keys];
            for (jj, slot) in sc.iter_mut().enumerate() {
                let j = lo + jj;
                let kr = &k[j * s.kv_stride + kvh * hd..j * s.kv_stride + (kvh + 1) * hd];
                *slot = dot(qv, kr) * scale;
            }
            softmax_inplace(sc);
            let o = &mut out[i * s.q_stride + h * hd..i * s.q_stride + (h + 1) * hd];
            o.fill(0.0);
            for (jj, &p) in sc.iter().enumerate() {
                let j = lo + jj;
                let vr = &v[j * s.kv_stride + kvh * hd..j * s.kv_stride + (kvh + 1) * hd];
                for (od, &vd) in o.iter_mut().zip(vr) {
                    *od += p * vd;
                }
            }
        }
    }
}

// ------------------------------------------------------------------ tiled path

/// Operands of one register-tile product `C[m×n] (+)= A[m×k] · B[k×n]`, as raw parts so the
/// per-ISA tiles can be handed row offsets cheaply. A element (row `i`, depth `p`) sits at
/// `a[i·lda + p]` (key rows of K, for the scores) or, with `ACOL`, at `a[p·lda + i]` (P
/// inside the keys-major score tile, for the values). B and C are row-major.
#[derive(Clone, Copy)]
pub(crate) struct Gemm {
    pub k: usize,
    pub a: *const f32,
    pub lda: usize,
    pub b: *const f32,
    pub ldb: usize,
    pub c: *mut f32,
    pub ldc: usize,
    /// Add to C instead of overwriting it.
    pub acc: bool,
    /// Valid lanes of the last vector of a column strip (a full vector's width when the
    /// strip ends on a vector boundary); the others are neither read nor written.
    pub tail: usize,
}

impl Gemm {
    /// The same product starting at row `i` of A and C.
    ///
    /// # Safety
    /// Row `i` must lie within both allocations.
    #[inline(always)]
    pub unsafe fn row<const ACOL: bool>(self, i: usize) -> Gemm {
        Gemm {
            a: if ACOL {
                self.a.add(i)
            } else {
                self.a.add(i * self.lda)
            },
            c: self.c.add(i * self.ldc),
            ..self
        }
    }

    /// The same product starting at depth `p` and column `j`.
    ///
    /// # Safety
    /// Depth `p` and column `j` must lie within the allocations.
    #[inline(always)]
    pub unsafe fn at<const ACOL: bool>(self, p: usize, j: usize) -> Gemm {
        Gemm {
            a: if ACOL {
                self.a.add(p * self.lda)
            } else {
                self.a.add(p)
            },
            b: self.b.add(p * self.ldb + j),
            c: self.c.add(j),
            ..self
        }
    }

    /// A element (row `i`, depth `p`).
    ///
    /// # Safety
    /// The element must lie within A.
    #[inline(always)]
    pub unsafe fn a_at<const ACOL: bool>(&self, i: usize, p: usize) -> f32 {
        if ACOL {
            *self.a.add(p * self.lda + i)
        } else {
            *self.a.add(i * self.lda + p)
        }
    }
}

/// The two products of a tile, one implementation per instruction set.
pub(crate) trait Tiles {
    /// Scores `Sᵀ = K · Qᵀ`: `m` key rows (`g.a`, row stride `g.lda`) times `Qᵀ` (`g.b`,
    /// `k × n` with `n` = 16 or 32 and `ldb = ldc = n`) into the score tile `g.c`.
    ///
    /// # Safety
    /// Every element the product names must be in bounds of its allocation.
    unsafe fn qk(m: usize, n: usize, g: Gemm);

    /// Values `O (+)= P · V`: `m` pairs (`ACOL` A: P in the score tile) times `k` value rows
    /// (`g.b`, `n` = head_dim columns) into O (`g.c`). `g.tail` is ignored.
    ///
    /// # Safety
    /// Every element the product names must be in bounds of its allocation.
    unsafe fn pv(m: usize, n: usize, g: Gemm);
}

/// Depth of one pass of the P·V product: the value rows it touches stay in L1 while all the
/// row tiles of a tile stream past them. Value rows lie a power-of-two-ish stride apart
/// (1 KiB in the text model, 5 KiB in the vision tower), so they crowd a few L1 sets: 64
/// rows of 5–8 lines each overflow the 12 ways and ran 15% slower than 32.
pub(crate) const KC: usize = 32;

/// End of the tile of at most `max` pairs that starts at (query, head) pair `c0`. Pairs are numbered query-major
/// (`c = i·group + head-in-group`), so a tile holds a few whole queries of a GQA group. A
/// tile's scores cover the union of its queries' ranges; it stops growing once more than a
/// fifth of those scores would be masked (a segment boundary in window attention), since a
/// shorter tile costs less than computing dead scores.
fn tile_end(
    ranges: &[(usize, usize)],
    group: usize,
    c0: usize,
    n_pairs: usize,
    max: usize,
) -> usize {
    let (mut ulo, mut uhi, mut useful) = (usize::MAX, 0usize, 0usize);
    let mut c = c0;
    while c < n_pairs && c - c0 < max {
        let (lo, hi) = ranges[c / group];
        let (nlo, nhi) = if hi > lo {
            (ulo.min(lo), uhi.max(hi))
        } else {
            (ulo, uhi)
        };
        let span = nhi.saturating_sub(nlo);
        let nuseful = useful + (hi - lo);
        if c > c0 && (c + 1 - c0) * span * 4 > nuseful * 5 {
            break;
        }
        (ulo, uhi, useful) = (nlo, nhi, nuseful);
        c += 1;
    }
    c
}

/// One tile: pairs `c0..c0 + nc`, their key ranges, and what the chunk loop needs.
struct Tile {
    c0: usize,
    nc: usize,
    /// Score rows are one or two 16-lane vectors wide; lanes past `nc` are padding whose
    /// results are never read.
    w: usize,
    lo: [usize; QB],
    hi: [usize; QB],
    /// Union of the pairs' ranges.
    ulo: usize,
    uhi: usize,
    /// Keys every pair of the tile sees: score rows there need no mask.
    full: (usize, usize),
}

impl Tile {
    fn new(ranges: &[(usize, usize)], group: usize, c0: usize, c1: usize) -> Tile {
        let nc = c1 - c0;
        let mut t = Tile {
            c0,
            nc,
            w: if nc <= 16 { 16 } else { QB },
            lo: [0; QB],
            hi: [0; QB],
            ulo: usize::MAX,
            uhi: 0,
            full: (0, usize::MAX),
        };
        for x in 0..nc {
            let (l, h) = ranges[(c0 + x) / group];
            (t.lo[x], t.hi[x]) = (l, h);
            if h > l {
                (t.ulo, t.uhi) = (t.ulo.min(l), t.uhi.max(h));
            }
            t.full = (t.full.0.max(l), t.full.1.min(h));
        }
        t
    }

    /// Online-softmax chunks `[k0, k1)`: the union cut on a fixed grid of [`CHUNK`] keys.
    /// The grid, not the union, fixes where a pair's rescaling steps fall, so they do not
    /// depend on which other pairs share the tile (see [`tiled`]).
    fn chunks(&self) -> impl Iterator<Item = (usize, usize)> {
        let (ulo, uhi) = (self.ulo, self.uhi);
        let grid = if uhi > ulo {
            ulo / CHUNK..uhi.div_ceil(CHUNK)
        } else {
            0..0
        };
        grid.map(move |c| ((c * CHUNK).max(ulo), ((c + 1) * CHUNK).min(uhi)))
    }
}

/// The whole tiled attention, generic over the instruction set's tiles; compiled inside
/// each ISA's `#[target_feature]` wrapper so the softmax loops vectorise to match.
///
/// A pair's result depends only on its own query, range and the K/V rows, not on the tile
/// it lands in: each score and each output is one FMA chain over the same operands in the
/// same order, keys a pair does not see add exact zeros (exp(−∞) = 0, and a fully masked
/// chunk rescales by exp(0) = 1), chunk boundaries lie on a fixed grid and row sums are
/// split by absolute key index. So the engine's thread splits do not change any bit, as
/// with the per-query path (which small calls take with AVX2 and portable code, see
/// [`small_call_limits`]).
///
/// # Safety
/// [`check_bounds`] must have accepted the arguments.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn tiled<T: Tiles>(
    q: &[f32],
    n_q: usize,
    k: &[f32],
    v: &[f32],
    out: &mut [f32],
    s: AttnShape,
    scale: f32,
    ranges: &[(usize, usize)],
) {
    let group = s.n_heads / s.n_kv_heads;
    let hd = s.head_dim;
    let n_pairs = n_q * group;
    let mut tiles = Vec::new();
    let mut c0 = 0;
    while c0 < n_pairs {
        let c1 = tile_end(ranges, group, c0, n_pairs, QB);
        tiles.push(Tile::new(ranges, group, c0, c1));
        c0 = c1;
    }
    let mut qt = vec![0f32; hd * QB];
    let mut st = vec![0f32; CHUNK * QB];
    let mut o = vec![0f32; QB * hd];
    // Tile outermost, kv heads inner: a tile's key rows are then read for every head while
    // they are in L2 (what makes window attention fast); for long ranges the order made no
    // measurable difference.
    for t in &tiles {
        for kvh in 0..s.n_kv_heads {
            let (w, nc) = (t.w, t.nc);
            let pair = |x: usize| ((t.c0 + x) / group, kvh * group + (t.c0 + x) % group);
            for x in 0..nc {
                let (i, h) = pair(x);
                let qr = &q[i * s.q_stride + h * hd..][..hd];
                for (d, &qv) in qr.iter().enumerate() {
                    qt[d * w + x] = qv * scale;
                }
            }
            let mut m = [f32::NEG_INFINITY; QB];
            let mut l = [0f32; QB];
            let mut alpha = [0f32; QB];
            let mut any = false;
            for (ch, (k0, k1)) in t.chunks().enumerate() {
                let nk = k1 - k0;
                any = true;
                let kv_off = k0 * s.kv_stride + kvh * hd;
                let g = Gemm {
                    k: hd,
                    a: k.as_ptr().add(kv_off),
                    lda: s.kv_stride,
                    b: qt.as_ptr(),
                    ldb: w,
                    c: st.as_mut_ptr(),
                    ldc: w,
                    acc: false,
                    tail: 0,
                };
                T::qk(nk, w, g);
                let st = &mut st[..nk * w];
                mask_rows(st, w, k0, t.full, &t.lo, &t.hi);
                for g in 0..w / 16 {
                    softmax_lanes(st, w, k0, g * 16, &mut m, &mut l, &mut alpha);
                }
                if ch > 0 {
                    for (orow, &a) in o.chunks_exact_mut(hd).zip(&alpha[..nc]) {
                        for ov in orow {
                            *ov *= a;
                        }
                    }
                }
                let g = Gemm {
                    k: nk,
                    a: st.as_ptr(),
                    lda: w,
                    b: v.as_ptr().add(kv_off),
                    ldb: s.kv_stride,
                    c: o.as_mut_ptr(),
                    ldc: hd,
                    acc: ch > 0,
                    tail: 0,
                };
                T::pv(nc, hd, g);
            }
            for x in 0..nc {
                let (i, h) = pair(x);
                let dst = &mut out[i * s.q_stride + h * hd..][..hd];
                // No visible key (empty range): zeros, as a softmax over nothing gives.
                if !any || l[x] == 0.0 {
                    dst.fill(0.0);
                    continue;
                }
                let inv = 1.0 / l[x];
                for (d, &ov) in dst.iter_mut().zip(&o[x * hd..(x + 1) * hd]) {
                    *d = ov * inv;
                }
            }
        }
    }
}

/// −∞ for the scores of keys a pair does not see, in rows outside `full` (the keys every
/// pair of the tile sees); `exp_f32` maps them to exactly 0. Padding lanes have the empty
/// range `[0, 0)`.
#[inline(always)]
fn mask_rows(
    st: &mut [f32],
    w: usize,
    k0: usize,
    full: (usize, usize),
    lo: &[usize; QB],
    hi: &[usize; QB],
) {
    for (jj, row) in st.chunks_exact_mut(w).enumerate() {
        let j = k0 + jj;
        if j >= full.0 && j < full.1 {
            continue;
        }
        for (x, sv) in row.iter_mut().enumerate() {
            if j < lo[x] || j >= hi[x] {
                *sv = f32::NEG_INFINITY;
            }
        }
    }
}

/// One online-softmax step for the 16 lanes `x0..x0+16` of the score tile `st` (rows of
/// width `w`, the first one key `k0`): scores become `exp(s − m)` under the new running max
/// `m`, `l` gets the new row sums, `alpha` the factor that rescales what was accumulated
/// under the old max.
#[inline(always)]
fn softmax_lanes(
    st: &mut [f32],
    w: usize,
    k0: usize,
    x0: usize,
    m: &mut [f32; QB],
    l: &mut [f32; QB],
    alpha: &mut [f32; QB],
) {
    let mut mx = [f32::NEG_INFINITY; 16];
    for row in st.chunks_exact(w) {
        let r = &row[x0..x0 + 16];
        for x in 0..16 {
            // A compare-select is one vmaxps; f32::max adds a NaN fix-up per lane.
            mx[x] = if r[x] > mx[x] { r[x] } else { mx[x] };
        }
    }
    let mut mu = [0f32; 16];
    for x in 0..16 {
        let mn = m[x0 + x].max(mx[x]);
        // A lane with no visible key yet keeps max −∞; subtracting 0 instead keeps its
        // (masked, −∞) scores at exp = 0 rather than NaN.
        mu[x] = if mn == f32::NEG_INFINITY { 0.0 } else { mn };
        alpha[x0 + x] = exp_f32(m[x0 + x] - mu[x]);
        m[x0 + x] = mn;
    }
    // Four partial sums per lane (shorter dependency chains, a pairwise-ish sum): row `jj`
    // goes to `sum[jj % 4]`, i.e. key `k0 + jj` to class `(k0 + jj) % 4`, and the classes
    // are added in absolute order below.
    let mut sum = [[0f32; 16]; 4];
    let mut quads = st.chunks_exact_mut(4 * w);
    for quad in &mut quads {
        for (u, su) in sum.iter_mut().enumerate() {
            let r = &mut quad[u * w + x0..u * w + x0 + 16];
            for x in 0..16 {
                let p = exp_f32(r[x] - mu[x]);
                r[x] = p;
                su[x] += p;
            }
        }
    }
    for (u, row) in quads.into_remainder().chunks_exact_mut(w).enumerate() {
        let r = &mut row[x0..x0 + 16];
        for x in 0..16 {
            let p = exp_f32(r[x] - mu[x]);
            r[x] = p;
            sum[u][x] += p;
        }
    }
    let cls = |c: usize| &sum[(c + 4 - k0 % 4) % 4];
    let (c0, c1, c2, c3) = (cls(0), cls(1), cls(2), cls(3));
    for x in 0..16 {
        let s = (c0[x] + c1[x]) + (c2[x] + c3[x]);
        l[x0 + x] = l[x0 + x] * alpha[x0 + x] + s;
    }
}

// ------------------------------------------------------------------ portable tiles

/// Tiles in plain Rust over 8-lane arrays, which LLVM turns into SSE2 (or whatever the
/// target has).
struct Portable;

const PL: usize = 8;

#[inline(always)]
unsafe fn tile_portable<const MR: usize, const NR: usize, const ACOL: bool>(g: Gemm) {
    let lanes = |v: usize| if v + 1 == NR { g.tail } else { PL };
    let mut s = [[[0f32; PL]; NR]; MR];
    if g.acc {
        for (i, si) in s.iter_mut().enumerate() {
            for (v, sv) in si.iter_mut().enumerate() {
                for (t, e) in sv.iter_mut().enumerate().take(lanes(v)) {
                    *e = *g.c.add(i * g.ldc + v * PL + t);
                }
            }
        }
    }
    for p in 0..g.k {
        let bp = g.b.add(p * g.ldb);
        let mut bv = [[0f32; PL]; NR];
        for (v, bvv) in bv.iter_mut().enumerate() {
            if lanes(v) == PL {
                bvv.copy_from_slice(core::slice::from_raw_parts(bp.add(v * PL), PL));
            } else {
                for (t, e) in bvv.iter_mut().enumerate().take(lanes(v)) {
                    *e = *bp.add(v * PL + t);
                }
            }
        }
        for (i, si) in s.iter_mut().enumerate() {
            let av = g.a_at::<ACOL>(i, p);
            for (sv, bvv) in si.iter_mut().zip(&bv) {
                for t in 0..PL {
                    sv[t] += av * bvv[t];
                }
            }
        }
    }
    for (i, si) in s.iter().enumerate() {
        for (v, sv) in si.iter().enumerate() {
            for (t, &e) in sv.iter().enumerate().take(lanes(v)) {
                *g.c.add(i * g.ldc + v * PL + t) = e;
            }
        }
    }
}

/// All `m` rows of one column strip: tiles of 4 rows, then single rows.
#[inline(always)]
unsafe fn strip_portable<const NR: usize, const ACOL: bool>(m: usize, g: Gemm) {
    let mut i = 0;
    while i + 4 <= m {
        tile_portable::<4, NR, ACOL>(g.row::<ACOL>(i));
        i += 4;
    }
    while i < m {
        tile_portable::<1, NR, ACOL>(g.row::<ACOL>(i));
        i += 1;
    }
}

impl Tiles for Portable {
    #[inline(always)]
    unsafe fn qk(m: usize, n: usize, g: Gemm) {
        let g = Gemm { tail: PL, ..g };
        for j in (0..n).step_by(2 * PL) {
            strip_portable::<2, false>(m, g.at::<false>(0, j));
        }
    }

    #[inline(always)]
    unsafe fn pv(m: usize, n: usize, g: Gemm) {
        let mut p0 = 0;
        while p0 < g.k {
            let kc = KC.min(g.k - p0);
            let mut j = 0;
            while j < n {
                let left = n - j;
                let gj = Gemm {
                    k: kc,
                    acc: g.acc || p0 > 0,
                    tail: if left > PL { (left - PL).min(PL) } else { left },
                    ..g.at::<true>(p0, j)
                };
                if left > PL {
                    strip_portable::<2, true>(m, gj);
                    j += 2 * PL;
                } else {
                    strip_portable::<1, true>(m, gj);
                    j += PL;
                }
            }
            p0 += kc;
        }
    }
}
