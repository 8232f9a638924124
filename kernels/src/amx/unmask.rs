//! Greedy unmasking fused into the vocabulary projection on AMX tiles: per masked row, the
//! arg-max id over a slice of the vocabulary, the largest logit and Σ exp(z − max), as
//! [`ArgmaxPartial`]s, without writing the logits out.
//!
//! The C tile of a weight block holds 16 vocabulary rows × the masked positions, so the
//! softmax statistics are kept per lane straight from it: no transpose into row-major
//! logits and no second pass over them. With the tile's columns cut to the next power of
//! two of the row count (`m_pad`), a C tile stored compactly is `16·m_pad` logits in
//! `m_pad` vectors whose lane `l` belongs to position `l % m_pad`, so a single masked row
//! still fills all 16 lanes. Each lane keeps a running max, the (lowest) id reaching it
//! and Σ exp(z − max), rescaled in the rare vectors that raise a max (online softmax).
//! Lane sums are moved into f64 every 256 ids, as in [`crate::softmax`]'s sums.
//!
//! The logits are the bits [`super::matmul_amx_bf16_packed`] writes (same tile products;
//! three-term rows summed `(hi + mid) + lo` the same way), so arg-max ids and maxima equal
//! [`ArgmaxPartial::of`] over those logits exactly; sums differ in rounding order only.

use core::arch::asm;
use core::arch::x86_64::*;

use super::{
    load_resident_b, tile_dp, tile_load, tile_store, tile_zero, Aligned, PackedActs, WeightTiles,
};
use crate::bf16;
use crate::softmax::ArgmaxPartial;

/// Rows that one fused pass takes (one tile of masked positions per term).
pub const MAX_ROWS: usize = 16;

/// Where a block's logits land in its C tiles.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Layout {
    /// One term: a C tile of 16 ids × `m_pad` columns (row `i` in column `i`).
    Compact,
    /// Three terms (f32 rows as bf16 hi + mid + lo) in the columns of C tiles, as
    /// [`super::pack_activations_f32x3`] packs them: term `p` of row `i` in column
    /// `p·rows + i` (as many tile products as one term, the terms summed across lanes).
    /// The tiles (one for 3·rows ≤ 16, two for ≤ 32) have just those columns and are
    /// stored as one compact block of 16 ids × 3·rows, whose terms are gathered into the
    /// compact layout with two permutes a vector ([`Gather`]).
    Columns { tiles: usize },
    /// Three terms in three compact C tiles (more rows than two tiles' columns hold).
    Terms,
}

/// Packed activations as [`argmax_partials`] reads them: B tiles (16 pair rows × 64 bytes)
/// in (tile, k block) order; for [`Layout::Terms`] tile `p` holds term `p` of every row
/// in column `i`, zero past the rows. Built once per projection and shared by the threads
/// taking vocabulary slices.
pub struct UnmaskActs {
    data: Aligned<u16>,
    rows: usize,
    k: usize,
    layout: Layout,
}

impl UnmaskActs {
    /// From activations packed by [`super::pack_activations`] or
    /// [`super::pack_activations_f32x3`]; `None` past [`MAX_ROWS`] rows.
    pub fn new(packed: &PackedActs) -> Option<UnmaskActs> {
        let (parts, k) = (packed.parts, packed.k);
        let rows = packed.m / parts;
        if rows == 0 || rows > MAX_ROWS {
            return None;
        }
        let kb = k.div_ceil(32);
        let layout = match parts {
            1 => Layout::Compact,
            _ if 3 * rows <= 32 => Layout::Columns {
                tiles: (3 * rows).div_ceil(16),
            },
            _ => Layout::Terms,
        };
        let data = match layout {
            Layout::Compact => Aligned::from_slice(&packed.data[..kb * 512]),
            Layout::Columns { tiles } => Aligned::from_slice(&packed.data[..tiles * kb * 512]),
            Layout::Terms => {
                let mut data = Aligned::<u16>::zeroed(3 * kb * 512);
                // Packed row v sits in row block v / 16, column v % 16 (u32 pairs, see
                // PackedActs); term p of row i is packed row p·rows + i.
                for p in 0..3 {
                    for i in 0..rows {
                        let v = p * rows + i;
                        let (mb, col) = (v / 16, v % 16);
                        for q in 0..kb {
                            let src = (mb * kb + q) * 512 + col * 2;
                            let dst = (p * kb + q) * 512 + i * 2;
                            for r in 0..16 {
                                data[dst + r * 32] = packed.data[src + r * 32];
                                data[dst + r * 32 + 1] = packed.data[src + r * 32 + 1];
                            }
                        }
                    }
                }
                data
            }
        };
        Some(UnmaskActs {
            data,
            rows,
            k,
            layout,
        })
    }

    /// Masked rows (output rows of the projection).
    pub fn rows(&self) -> usize {
        self.rows
    }
}

/// Per-lane running statistics of one slice.
struct Lanes {
    /// Largest logit among the allowed ids seen (the excluded id is −∞ here).
    max: __m512,
    /// Its lowest id (−1: none yet).
    id: __m512i,
    /// Σ exp(z − max) since the last flush into `sum_lo`/`sum_hi`.
    sum: __m512,
    /// Flushed sums in f64, lanes 0–7 and 8–15, at the same `max`.
    sum_lo: __m512d,
    sum_hi: __m512d,
}

/// `out[i]` = the unmasking partial of row `i` over vocabulary rows `w` (`n` rows of
/// `acts.k`, ids `offset..offset + n`); `never` is excluded from the arg-max but counted in
/// the max and sum (spec §8.6), as [`ArgmaxPartial::of`] does.
///
/// # Safety
/// [`super::available`] must have returned true.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq")]
pub unsafe fn argmax_partials(
    acts: &UnmaskActs,
    w: &[bf16],
    n: usize,
    offset: usize,
    never: Option<usize>,
    out: &mut [ArgmaxPartial],
) {
    let (rows, k, layout) = (acts.rows, acts.k, acts.layout);
    assert!(
        w.len() >= n * k && out.len() >= rows,
        "amx::unmask: {} weights for {n}×{k}, {} outputs for {rows} rows",
        w.len(),
        out.len()
    );
    assert!(offset + n < i32::MAX as usize, "amx::unmask: ids past i32");
    if n == 0 {
        out[..rows].fill(ArgmaxPartial::EMPTY);
        return;
    }
    let m_pad = rows.next_power_of_two();
    let kb = k.div_ceil(32);
    let nb = n.div_ceil(16);
    // Tiles: A (the weights, tmm4/tmm5) 16 rows × 32 bf16; C and B 16 rows × `cols` f32 /
    // bf16 pairs.
    // (Stored rows are `cols` f32 apart: with two Columns tiles the first holds columns
    // 0–15 of each id's 3·rows and the second the rest, stored 16 f32 further on, so both
    // land in one compact 16 ids × 3·rows block.)
    let cols = match layout {
        Layout::Compact => m_pad,
        Layout::Columns { .. } => 3 * rows,
        Layout::Terms => 16,
    };
    let mut cfg = super::TileConfig::full();
    for t in [0usize, 1, 2, 3, 6, 7] {
        // Two Columns tiles: tmm0/2/6 carry columns 0–15 (C and B), tmm1/3/7 the rest.
        let width = match layout {
            Layout::Columns { tiles: 2 } if t % 2 == 0 || t == 6 => 16,
            Layout::Columns { tiles: 2 } => 3 * rows - 16,
            _ => cols,
        };
        let colsb = (4 * width) as u16;
        cfg.0[16 + 2 * t..18 + 2 * t].copy_from_slice(&colsb.to_le_bytes());
    }
    asm!("ldtilecfg [{}]", in(reg) cfg.0.as_ptr(), options(nostack, readonly));

    let wt = WeightTiles::new(w, n, k);
    let b_tile = |t: usize, q: usize| acts.data.as_ptr().add((t * kb + q) * 512);
    // A block's C tiles (256 f32 apart, rows 4·cols bytes apart), two slots so a block's
    // statistics are taken while the next block's products run.
    let mut slots = Aligned::<f32>::zeroed(2 * 3 * 256);
    let slots_ptr = slots.as_mut_ptr();
    let slot = |b: usize| slots_ptr.add((b % 2) * 3 * 256);
    let c_stride = 4 * cols;

    let mut st = Lanes {
        max: _mm512_set1_ps(f32::NEG_INFINITY),
        id: _mm512_set1_epi32(-1),
        sum: _mm512_setzero_ps(),
        sum_lo: _mm512_setzero_pd(),
        sum_hi: _mm512_setzero_pd(),
    };
    // Id of lane l in a block's vector j: offset + 16·b + (16·j + l) / m_pad.
    let lane_ids = _mm512_add_epi32(
        _mm512_set1_epi32(offset as i32),
        _mm512_srlv_epi32(
            _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
            _mm512_set1_epi32(m_pad.trailing_zeros() as i32),
        ),
    );
    let local_never = never.and_then(|v| v.checked_sub(offset)).filter(|&v| v < n);
    let mut blk = Block {
        rows,
        m_pad,
        layout,
        n,
        local_never,
        never_z: [f32::NEG_INFINITY; MAX_ROWS],
        lane_ids,
        z: [0.0; 256],
        gather: alloc::vec::Vec::new(),
    };
    if let Layout::Columns { .. } = layout {
        for j in 0..m_pad {
            for t in 0..3 {
                blk.gather.push(Gather::new(rows, m_pad, j, t));
            }
        }
    }

    // Tile products of weight block `b`. One C tile (Compact, one Columns tile): blocks
    // alternate tmm0/tmm1 so a block's products need not wait for the previous block's
    // store; B tiles stay loaded (tmm6/tmm7) for k ≤ 64. Two Columns tiles: C in tmm0/1,
    // with k ≤ 64 the four B tiles in tmm2/3 and tmm6/7, else C alternating tmm0/1 and
    // tmm2/3 and B reloaded into tmm6/7. Terms: C in tmm0–2, B reloaded into tmm3/6/7.
    // A tiles alternate tmm4/tmm5 by k block: a load need not wait for the products
    // reading the other one (tiles are not renamed).
    let two = layout == Layout::Columns { tiles: 2 };
    let w_bytes = wt.w16.as_ptr() as *const i8;
    let (total, block_bytes) = (n * k * 2, 32 * k);
    let ahead = (2 * block_bytes).max(16 << 10);
    let pf_step = block_bytes.div_ceil(kb * 64) * 64;
    let prefetch = block_bytes > 4096;
    let b_resident = layout != Layout::Terms && kb <= 2;
    if b_resident {
        load_resident_b!(two, kb, b_tile);
    }
    // (Macros, not closures: closures do not inherit this function's target features, and
    // asm! needs literal tile numbers.)
    macro_rules! a_load {
        ($b:expr, $q:expr) => {{
            let (ap, stride) = wt.tile($b, $q);
            // Blocks spanning pages (16 rows of k > 128) are 16 strided streams, which the
            // hardware prefetchers do not follow: their weights ahead go into L2 a few lines
            // per k step, as in the matmul's step kernel (0.5b, k = 896, 272 MB from DRAM:
            // the tile loads alone fell ~25% behind). A block of k ≤ 128 is one contiguous
            // stream the hardware follows; prefetching it too cost 5–15% (tiny, k = 64).
            let mut pf = $b * block_bytes + ahead + $q * pf_step;
            let pf_end = if prefetch {
                (pf + pf_step).min(total)
            } else {
                0
            };
            while pf < pf_end {
                _mm_prefetch::<_MM_HINT_T1>(w_bytes.add(pf));
                pf += 64;
            }
            if $q % 2 == 0 {
                tile_load!("4", ap, stride);
            } else {
                tile_load!("5", ap, stride);
            }
        }};
    }
    macro_rules! dp_a {
        ($q:expr, $c:literal, $b:literal) => {{
            if $q % 2 == 0 {
                tile_dp!($c, "4", $b);
            } else {
                tile_dp!($c, "5", $b);
            }
        }};
    }
    macro_rules! one_tile {
        ($b:expr, $c:literal) => {{
            tile_zero!($c);
            for q in 0..kb {
                a_load!($b, q);
                if q % 2 == 0 {
                    if !b_resident {
                        tile_load!("6", b_tile(0, q), 64usize);
                    }
                    dp_a!(q, $c, "6");
                } else {
                    if !b_resident {
                        tile_load!("7", b_tile(0, q), 64usize);
                    }
                    dp_a!(q, $c, "7");
                }
            }
        }};
    }
    macro_rules! two_tiles_reloaded {
        ($b:expr, $c0:literal, $c1:literal) => {{
            tile_zero!($c0);
            tile_zero!($c1);
            for q in 0..kb {
                a_load!($b, q);
                tile_load!("6", b_tile(0, q), 64usize);
                dp_a!(q, $c0, "6");
                tile_load!("7", b_tile(1, q), 64usize);
                dp_a!(q, $c1, "7");
            }
        }};
    }
    for b in 0..nb {
        match layout {
            Layout::Compact | Layout::Columns { tiles: 1 } => {
                if b % 2 == 0 {
                    one_tile!(b, "0");
                } else {
                    one_tile!(b, "1");
                }
            }
            Layout::Columns { .. } if b_resident => {
                tile_zero!("0");
                tile_zero!("1");
                for q in 0..kb {
                    a_load!(b, q);
                    if q == 0 {
                        tile_dp!("0", "4", "2");
                        tile_dp!("1", "4", "3");
                    } else {
                        tile_dp!("0", "5", "6");
                        tile_dp!("1", "5", "7");
                    }
                }
            }
            Layout::Columns { .. } => {
                if b % 2 == 0 {
                    two_tiles_reloaded!(b, "0", "1");
                } else {
                    two_tiles_reloaded!(b, "2", "3");
                }
            }
            Layout::Terms => {
                tile_zero!("0");
                tile_zero!("1");
                tile_zero!("2");
                for q in 0..kb {
                    a_load!(b, q);
                    tile_load!("3", b_tile(0, q), 64usize);
                    dp_a!(q, "0", "3");
                    tile_load!("6", b_tile(1, q), 64usize);
                    dp_a!(q, "1", "6");
                    tile_load!("7", b_tile(2, q), 64usize);
                    dp_a!(q, "2", "7");
                }
            }
        }
        // The previous block's statistics while this block's products run, then this
        // block's store (which waits for them). (Letting the statistics trail by up to
        // three blocks, C rotating through four tiles, was no faster.)
        if b > 0 {
            take_block(&mut st, &mut blk, slot(b - 1), b - 1);
        }
        let c = slot(b);
        match layout {
            Layout::Compact | Layout::Columns { tiles: 1 } if b % 2 == 0 => {
                tile_store!("0", c, c_stride)
            }
            Layout::Compact | Layout::Columns { tiles: 1 } => tile_store!("1", c, c_stride),
            Layout::Columns { .. } if b_resident || b % 2 == 0 => {
                tile_store!("0", c, c_stride);
                tile_store!("1", c.add(16), c_stride);
            }
            Layout::Columns { .. } => {
                tile_store!("2", c, c_stride);
                tile_store!("3", c.add(16), c_stride);
            }
            Layout::Terms => {
                tile_store!("0", c, c_stride);
                tile_store!("1", c.add(256), c_stride);
                tile_store!("2", c.add(512), c_stride);
            }
        }
    }
    take_block(&mut st, &mut blk, slot(nb - 1), nb - 1);
    asm!("tilerelease", options(nostack, nomem));
    flush(&mut st);
    finish(
        &st,
        m_pad,
        rows,
        local_never.map(|v| v + offset),
        &blk.never_z,
        out,
    );
}

/// What [`take_block`] needs to know of the slice.
struct Block {
    rows: usize,
    m_pad: usize,
    layout: Layout,
    /// Ids in the slice.
    n: usize,
    /// The excluded id, relative to the slice, if in it.
    local_never: Option<usize>,
    /// The excluded id's logit per row (it counts in the max and sum only).
    never_z: [f32; MAX_ROWS],
    lane_ids: __m512i,
    /// A block's logits, compact, where they pass through memory.
    z: [f32; 256],
    /// [`Layout::Columns`]: term `t` of compact vector `j` at `3·j + t`.
    gather: alloc::vec::Vec<Gather>,
}

/// Where the 16 lanes of one term of one compact vector sit in a [`Layout::Columns`] block,
/// stored as 16 ids × 3·rows f32: lanes from vectors `first` and
/// `first + 1` by `near` (a two-source permute), the rest (`far_lanes`) from `first + 2`.
struct Gather {
    first: usize,
    near: __m512i,
    far: __m512i,
    far_lanes: __mmask16,
}

impl Gather {
    /// Term `t` of compact vector `j`: lane l is row l % m_pad (row 0 stands in for the
    /// padding rows) of id (16·j + l) / m_pad, at 3·rows·id + t·rows + row.
    fn new(rows: usize, m_pad: usize, j: usize, t: usize) -> Gather {
        let src = |l: usize| {
            let (id, row) = ((16 * j + l) / m_pad, l % m_pad);
            3 * rows * id + t * rows + if row < rows { row } else { 0 }
        };
        let first = (0..16).map(src).min().unwrap_or(0) / 16;
        let (mut near, mut far, mut far_lanes) = ([0i32; 16], [0i32; 16], 0u16);
        for l in 0..16 {
            let rel = src(l) - 16 * first;
            // A vector's ids span 16 / m_pad · 3·rows ≤ 48 values: at most three vectors.
            debug_assert!(rel < 48);
            if rel < 32 {
                near[l] = rel as i32;
            } else {
                far[l] = (rel - 32) as i32;
                far_lanes |= 1 << l;
            }
        }
        // SAFETY: unaligned loads of 16 i32 from local arrays.
        unsafe {
            Gather {
                first,
                near: _mm512_loadu_si512(near.as_ptr() as *const _),
                far: _mm512_loadu_si512(far.as_ptr() as *const _),
                far_lanes,
            }
        }
    }

    /// The 16 lanes from the block's stored tile at `c`.
    #[inline(always)]
    unsafe fn take(&self, c: *const f32) -> __m512 {
        let v = c.add(16 * self.first);
        let out = _mm512_permutex2var_ps(_mm512_load_ps(v), self.near, _mm512_load_ps(v.add(16)));
        if self.far_lanes == 0 {
            out
        } else {
            _mm512_mask_permutexvar_ps(out, self.far_lanes, self.far, _mm512_load_ps(v.add(32)))
        }
    }
}

/// Fold weight block `b`'s logits (its C tiles at `c`, see [`Layout`]) into the lane
/// statistics.
#[inline(always)]
unsafe fn take_block(st: &mut Lanes, blk: &mut Block, c: *const f32, b: usize) {
    let (rows, m_pad) = (blk.rows, blk.m_pad);
    let j0 = b * 16;
    let special = j0 + 16 > blk.n || blk.local_never.is_some_and(|v| (j0..j0 + 16).contains(&v));
    // Vector j of the block's logits (lane l: row l % m_pad of id j0 + (16·j + l) / m_pad).
    let Block { z, never_z, .. } = blk;
    if special {
        for j in 0..m_pad {
            _mm512_storeu_ps(
                z.as_mut_ptr().add(16 * j),
                block_vector(blk.layout, &blk.gather, c, j),
            );
        }
    }
    if special {
        // The block holding the excluded id or the slice's end: the excluded id's logits
        // kept per row, it and ids past the end set to −∞.
        for r in 0..16 {
            let id = j0 + r;
            if id >= blk.n || Some(id) == blk.local_never {
                if id < blk.n {
                    never_z[..rows].copy_from_slice(&z[r * m_pad..r * m_pad + rows]);
                }
                z[r * m_pad..(r + 1) * m_pad].fill(f32::NEG_INFINITY);
            }
        }
    }
    let mut ids = _mm512_add_epi32(blk.lane_ids, _mm512_set1_epi32(j0 as i32));
    let step = _mm512_set1_epi32((16 / m_pad) as i32);
    let in_z = special;
    for j in 0..m_pad {
        let v = if in_z {
            _mm512_loadu_ps(z.as_ptr().add(16 * j))
        } else {
            block_vector(blk.layout, &blk.gather, c, j)
        };
        update(st, v, ids);
        ids = _mm512_add_epi32(ids, step);
    }
    // Every 256 ids the f32 lane sums move into f64 (each lane then holds at most 256
    // terms, as in the unfused sums).
    if b % 16 == 15 {
        flush(st);
    }
}

/// Vector `j` of a block's logits from its C tiles at `c` (lane l: row l % m_pad of id
/// 16·b + (16·j + l) / m_pad), for the layouts stored compactly. (A function, not a
/// closure: closures do not inherit the caller's target features, and the intrinsics in
/// them became calls.)
#[inline(always)]
unsafe fn block_vector(layout: Layout, gather: &[Gather], c: *const f32, j: usize) -> __m512 {
    match layout {
        Layout::Columns { .. } => {
            // ((hi + mid) + lo), the order of the matmul's write-out.
            let g = &gather[3 * j..3 * j + 3];
            _mm512_add_ps(_mm512_add_ps(g[0].take(c), g[1].take(c)), g[2].take(c))
        }
        Layout::Terms => _mm512_add_ps(
            _mm512_add_ps(
                _mm512_load_ps(c.add(16 * j)),
                _mm512_load_ps(c.add(256 + 16 * j)),
            ),
            _mm512_load_ps(c.add(512 + 16 * j)),
        ),
        Layout::Compact => _mm512_load_ps(c.add(16 * j)),
    }
}

/// Online softmax step for 16 lanes of logits `z` with ids `ids`.
#[inline(always)]
unsafe fn update(st: &mut Lanes, z: __m512, ids: __m512i) {
    let log2e = _mm512_set1_ps(core::f32::consts::LOG2_E);
    let up = _mm512_cmp_ps_mask::<_CMP_GT_OQ>(z, st.max);
    if up != 0 {
        // New maxima (rare after the first blocks): rescale those lanes' sums. Strictly
        // greater, so a lane keeps the lowest id of equal logits.
        let max = _mm512_mask_mov_ps(st.max, up, z);
        let scale = crate::math::exp2_avx512(_mm512_mul_ps(_mm512_sub_ps(st.max, max), log2e));
        st.sum = _mm512_mask_mul_ps(st.sum, up, st.sum, scale);
        st.sum_lo = _mm512_mask_mul_pd(
            st.sum_lo,
            up as u8,
            st.sum_lo,
            _mm512_cvtps_pd(_mm512_castps512_ps256(scale)),
        );
        st.sum_hi = _mm512_mask_mul_pd(
            st.sum_hi,
            (up >> 8) as u8,
            st.sum_hi,
            _mm512_cvtps_pd(_mm512_extractf32x8_ps::<1>(scale)),
        );
        st.max = max;
        st.id = _mm512_mask_mov_epi32(st.id, up, ids);
    }
    // z − max first, as in the unfused sum (scaling max first would cost its rounding).
    let e = crate::math::exp2_avx512(_mm512_mul_ps(_mm512_sub_ps(z, st.max), log2e));
    st.sum = _mm512_add_ps(st.sum, e);
}

#[inline(always)]
unsafe fn flush(st: &mut Lanes) {
    st.sum_lo = _mm512_add_pd(st.sum_lo, _mm512_cvtps_pd(_mm512_castps512_ps256(st.sum)));
    st.sum_hi = _mm512_add_pd(
        st.sum_hi,
        _mm512_cvtps_pd(_mm512_extractf32x8_ps::<1>(st.sum)),
    );
    st.sum = _mm512_setzero_ps();
}

/// Lanes → rows: row `i` owns lanes `l ≡ i (mod m_pad)`; the excluded id's logit joins the
/// max and the sum.
#[inline(always)]
unsafe fn finish(
    st: &Lanes,
    m_pad: usize,
    rows: usize,
    never: Option<usize>,
    never_z: &[f32; MAX_ROWS],
    out: &mut [ArgmaxPartial],
) {
    let (mut max, mut id) = ([0f32; 16], [0i32; 16]);
    let mut sum = [0f64; 16];
    _mm512_storeu_ps(max.as_mut_ptr(), st.max);
    _mm512_storeu_si512(id.as_mut_ptr() as *mut __m512i, st.id);
    _mm512_storeu_pd(sum.as_mut_ptr(), st.sum_lo);
    _mm512_storeu_pd(sum.as_mut_ptr().add(8), st.sum_hi);
    for (i, o) in out[..rows].iter_mut().enumerate() {
        let lanes = (i..16).step_by(m_pad);
        let mut p = ArgmaxPartial::EMPTY;
        for l in lanes.clone() {
            if max[l] > p.best || (max[l] == p.best && id[l] >= 0 && (id[l] as usize) < p.best_id) {
                p.best = max[l];
                p.best_id = if id[l] < 0 {
                    usize::MAX
                } else {
                    id[l] as usize
                };
            }
        }
        p.max = p.best;
        if never.is_some() && never_z[i] > p.max {
            p.max = never_z[i];
        }
        if p.max > f32::NEG_INFINITY {
            for l in lanes {
                if sum[l] != 0.0 {
                    p.sum += sum[l] * libm::exp((max[l] - p.max) as f64);
                }
            }
            if never.is_some() {
                p.sum += libm::exp((never_z[i] - p.max) as f64);
            }
        }
        *o = p;
    }
}
