//! Attention on AMX-BF16 tiles, for the engine's bf16 mode: queries (pre-scaled), keys,
//! values and the softmax probabilities are rounded to bf16 and every product accumulates
//! in f32 — numerics (b)/(c) of the fixtures' §6, which PyTorch's bf16 SDPA also uses.
//!
//! The loop is the FMA tiles' (see the parent module): a tile of up to 16 (query, head)
//! pairs that read one kv head meets the key range in online-softmax chunks on the fixed
//! [`CHUNK`] grid. Per chunk:
//!
//! * `S = Q · Kᵀ` — Q (16 pairs × head_dim, bf16) is tile A and stays in tmm4–tmm7 (one
//!   tile per 32 of head_dim, hence [`MAX_HEAD_DIM`]); K, packed once per call into the
//!   VNNI pair layout of tile B ([`pack_kv`]), streams through tmm2/tmm3; the C tiles
//!   (16 pairs × 16 keys) alternate tmm0/tmm1 and are stored to the score rows.
//! * the softmax runs along each pair's score row (keys contiguous): masked keys −∞, row
//!   max, `exp(s − m)` summed and rounded to bf16 into P.
//! * `O += P · V` — P rows are tile A, V (packed per 32 keys × 16 of head_dim) tile B, up
//!   to four O tiles at a time in tmm0–tmm3; the chunk's O is stored and folded into the
//!   running output with the softmax rescaling factor.
//!
//! A pair's result does not depend on the tile it lands in (so the engine's thread split
//! changes no bit): a C element is a fixed chain over its own row and column; key blocks
//! and chunks lie on absolute grids (32 keys, [`CHUNK`] keys) whatever the tile's union of
//! ranges; keys a pair does not see give exact zeros in P; the row sums go to two
//! accumulators by the parity of the absolute 16-key block.

#![allow(clippy::needless_range_loop)]

use alloc::vec::Vec;
use core::arch::asm;
use core::arch::x86_64::*;

use super::{tile_end, AttnShape, Tile, CHUNK};
use crate::amx::{
    pack_avx512, round_bf16_lanes, tile_dp, tile_load, tile_store, tile_zero, Aligned, TileConfig,
};
use crate::math::{exp2_avx512, exp_f32};

/// Largest head_dim: the Q tiles of a row block (one per 32 of head_dim) must fit in
/// tmm4–tmm7 beside two C and two K tiles.
pub const MAX_HEAD_DIM: usize = 128;
/// (query, head) pairs per tile: the 16 rows of a tile register.
const MB: usize = 16;
/// Row strides of the score (f32) and probability (bf16) buffers: a chunk plus one cache
/// line, so the 16 rows of a tile store do not all fall into the same two L1 sets.
const S_LD: usize = CHUNK + 16;
const P_LD: usize = CHUNK + 32;

/// Whether [`attention_amx`] can run this shape here: AMX granted and head_dim ≤
/// [`MAX_HEAD_DIM`].
pub fn supported(s: &AttnShape) -> bool {
    s.head_dim >= 1 && s.head_dim <= MAX_HEAD_DIM && crate::amx::available() && has_bf16_convert()
}

/// `vcvtne2ps2bf16` (AVX512_BF16), which rounds the probabilities: every AMX CPU so far
/// has it, but it is a separate cpuid bit. Checked once (cpuid traps in a VM).
fn has_bf16_convert() -> bool {
    use core::sync::atomic::{AtomicU8, Ordering};
    static STATE: AtomicU8 = AtomicU8::new(0);
    match STATE.load(Ordering::Relaxed) {
        1 => true,
        2 => false,
        _ => {
            let ok = crate::cpu::has_avx512_bf16();
            STATE.store(if ok { 1 } else { 2 }, Ordering::Relaxed);
            ok
        }
    }
}

/// Keys and values of every kv head rounded to bf16 in the tile-B layouts, packed once per
/// attention call and shared by the threads that split its queries.
///
/// K of kv head `h`: blocks (16 keys, 32 of head_dim) as [`crate::amx::pack_activations`]
/// lays out activations. V of kv head `h`: blocks (32 keys, 16 of head_dim), u16 index
/// `r·32 + i·2 + e` of block (b, j) holding `V[32b + 2r + e][16j + i]`. Keys are padded to
/// a multiple of 32 and head_dim to the block width with zeros.
pub struct PackedKv {
    k: Aligned<u16>,
    v: Aligned<u16>,
    n_keys: usize,
    n_kv_heads: usize,
    head_dim: usize,
}

impl PackedKv {
    /// Keys packed (the rows of K and V).
    pub fn n_keys(&self) -> usize {
        self.n_keys
    }
    fn kb32(&self) -> usize {
        self.n_keys.div_ceil(32)
    }
    fn db32(&self) -> usize {
        self.head_dim.div_ceil(32)
    }
    fn db16(&self) -> usize {
        self.head_dim.div_ceil(16)
    }
    fn k_head_len(&self) -> usize {
        2 * self.kb32() * self.db32() * 512
    }
    fn v_head_len(&self) -> usize {
        self.kb32() * self.db16() * 512
    }
}

/// Pack the first `n_keys` rows of `k` and `v` (row stride `s.kv_stride`, kv heads
/// contiguous) for [`attention_amx`].
///
/// # Panics
/// If [`supported`] is false for `s`, or `k`/`v` hold fewer than `n_keys` rows.
pub fn pack_kv(k: &[f32], v: &[f32], n_keys: usize, s: AttnShape) -> PackedKv {
    assert!(
        supported(&s),
        "pack_kv: AMX attention unavailable for {s:?}"
    );
    let hd = s.head_dim;
    assert!(
        s.n_kv_heads * hd <= s.kv_stride,
        "pack_kv: heads overflow kv_stride"
    );
    if n_keys > 0 {
        let need = (n_keys - 1) * s.kv_stride + s.n_kv_heads * hd;
        assert!(
            k.len() >= need && v.len() >= need,
            "pack_kv: k/v hold fewer than {n_keys} rows"
        );
    }
    let mut p = PackedKv {
        k: Aligned::zeroed(0),
        v: Aligned::zeroed(0),
        n_keys,
        n_kv_heads: s.n_kv_heads,
        head_dim: hd,
    };
    let (kl, vl) = (p.k_head_len(), p.v_head_len());
    p.k = Aligned::zeroed(s.n_kv_heads * kl);
    p.v = Aligned::zeroed(s.n_kv_heads * vl);
    if n_keys == 0 {
        return p;
    }
    for h in 0..s.n_kv_heads {
        // SAFETY: AMX implies AVX-512 F/BW; the rows were checked above, and the buffers
        // hold the packed sizes (2·kb32 ≥ ⌈n_keys/16⌉ key blocks).
        unsafe {
            pack_avx512(
                &k[h * hd..],
                n_keys,
                hd,
                s.kv_stride,
                &mut p.k[h * kl..(h + 1) * kl],
            );
            pack_v(&v[h * hd..], n_keys, hd, s.kv_stride, &mut p.v[h * vl..]);
        }
    }
    p
}

/// One kv head's values into the V layout of [`PackedKv`]: each key pair's two rows
/// rounded and interleaved, 16 of head_dim per 64-byte tile row.
#[target_feature(enable = "avx512f,avx512bw")]
unsafe fn pack_v(v: &[f32], n_keys: usize, hd: usize, ld: usize, data: &mut [u16]) {
    let db16 = hd.div_ceil(16);
    assert!(data.len() >= n_keys.div_ceil(32) * db16 * 512);
    // u16 lane 2i ← the bf16 (high half) of u32 lane i of the even key's row, 2i + 1 ← the
    // odd key's.
    let mut idx = [0u16; 32];
    for i in 0..16 {
        idx[2 * i] = (2 * i + 1) as u16;
        idx[2 * i + 1] = (32 + 2 * i + 1) as u16;
    }
    let idx = _mm512_loadu_si512(idx.as_ptr() as *const _);
    for key0 in (0..n_keys).step_by(2) {
        let (b, r) = (key0 / 32, (key0 % 32) / 2);
        for j in 0..db16 {
            let dn = (hd - j * 16).min(16);
            let mask = lanes(dn);
            let row = |key: usize| {
                round_bf16_lanes(_mm512_maskz_loadu_ps(
                    mask,
                    v.as_ptr().add(key * ld + j * 16),
                ))
            };
            let even = row(key0);
            let odd = if key0 + 1 < n_keys {
                row(key0 + 1)
            } else {
                _mm512_setzero_si512()
            };
            let pair = _mm512_permutex2var_epi16(even, idx, odd);
            _mm512_storeu_si512(
                data.as_mut_ptr().add((b * db16 + j) * 512 + r * 32) as *mut _,
                pair,
            );
        }
    }
}

/// Attention of `n_q` query rows over keys and values packed by [`pack_kv`], with the same
/// contract as [`super::attention`] (strides in `s`, `key_range(i)` the keys of query `i`,
/// empty ranges give zero rows, a row's bits do not depend on the other rows of the call),
/// but bf16 inputs (see the module).
///
/// # Panics
/// If AMX is not granted, `kv` was packed for another shape, a range exceeds the packed
/// keys, or `q`/`out` are too short.
pub fn attention_amx<F: Fn(usize) -> (usize, usize)>(
    q: &[f32],
    n_q: usize,
    kv: &PackedKv,
    out: &mut [f32],
    s: AttnShape,
    scale: f32,
    key_range: F,
) {
    assert!(supported(&s), "attention_amx: unavailable for {s:?}");
    assert!(
        kv.n_kv_heads == s.n_kv_heads && kv.head_dim == s.head_dim,
        "attention_amx: keys packed for another shape"
    );
    super::check_q_bounds(q, n_q, out, s);
    if n_q == 0 {
        return;
    }
    let ranges: Vec<(usize, usize)> = (0..n_q).map(&key_range).collect();
    for (i, &(lo, hi)) in ranges.iter().enumerate() {
        assert!(
            lo <= hi,
            "attention_amx: key range of query {i} is reversed"
        );
        assert!(
            lo == hi || hi <= kv.n_keys,
            "attention_amx: query {i} sees key {} of {} packed",
            hi - 1,
            kv.n_keys
        );
    }
    // SAFETY: AMX (hence AVX-512) is granted; the checks above bound every access.
    unsafe { tiled(q, n_q, kv, out, s, scale, &ranges) }
}

#[inline(always)]
unsafe fn hsum(v: __m512) -> f32 {
    // A fixed tree: 8 + 8, 4 + 4, 2 + 2, 1 + 1.
    let a = _mm256_add_ps(_mm512_castps512_ps256(v), _mm512_extractf32x8_ps::<1>(v));
    let b = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps::<1>(a));
    let c = _mm_add_ps(b, _mm_movehl_ps(b, b));
    _mm_cvtss_f32(_mm_add_ss(c, _mm_movehdup_ps(c)))
}

/// `e^(s − m)` on 16 lanes, `mlog` = m·log2 e: m is the same for a whole score row, so the
/// rounding of `mlog` scales every probability of the row alike and cancels in O / l.
#[inline(always)]
unsafe fn exp_shifted(s: __m512, mlog: __m512) -> __m512 {
    exp2_avx512(_mm512_fmsub_ps(s, _mm512_set1_ps(LOG2E), mlog))
}

const LOG2E: f32 = core::f32::consts::LOG2_E;

/// Lanes `0..n` of a 16-lane mask (`n` ≤ 16).
#[inline(always)]
fn lanes(n: usize) -> u16 {
    if n >= 16 {
        0xffff
    } else {
        (1u16 << n) - 1
    }
}

#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,avx2,fma")]
unsafe fn tiled(
    q: &[f32],
    n_q: usize,
    kv: &PackedKv,
    out: &mut [f32],
    s: AttnShape,
    scale: f32,
    ranges: &[(usize, usize)],
) {
    let group = s.n_heads / s.n_kv_heads;
    let hd = s.head_dim;
    let (db32, db16) = (kv.db32(), kv.db16());
    let (dq, dv) = (db32 * 32, db16 * 16);
    let n_pairs = n_q * group;

    let mut q_tiles = Aligned::<u16>::zeroed(MB * dq);
    let qbuf = q_tiles.as_mut_ptr();
    let mut s_tiles = Aligned::<f32>::zeroed(MB * S_LD);
    let sbuf = s_tiles.as_mut_ptr();
    let mut p_tiles = Aligned::<u16>::zeroed(MB * P_LD);
    let pbuf = p_tiles.as_mut_ptr();
    let mut o_chunk = Aligned::<f32>::zeroed(MB * dv);
    let ochunk = o_chunk.as_mut_ptr();
    let mut o_acc = Aligned::<f32>::zeroed(MB * dv);
    let oacc = o_acc.as_mut_ptr();

    let cfg = TileConfig::full();
    asm!("ldtilecfg [{}]", in(reg) cfg.0.as_ptr(), options(nostack, readonly));

    let mut c0 = 0;
    while c0 < n_pairs {
        let c1 = tile_end(ranges, group, c0, n_pairs, MB);
        let t = Tile::new(ranges, group, c0, c1);
        c0 = c1;
        let nc = t.nc;
        for kvh in 0..s.n_kv_heads {
            let pair = |x: usize| ((t.c0 + x) / group, kvh * group + (t.c0 + x) % group);
            // Q rows, scaled and rounded; rows past the tile's pairs are zero.
            core::ptr::write_bytes(qbuf, 0, MB * dq);
            for x in 0..nc {
                let (i, h) = pair(x);
                let src = q.as_ptr().add(i * s.q_stride + h * hd);
                for d0 in (0..hd).step_by(16) {
                    let dn = (hd - d0).min(16);
                    let mask = lanes(dn);
                    let xv = _mm512_mul_ps(
                        _mm512_maskz_loadu_ps(mask, src.add(d0)),
                        _mm512_set1_ps(scale),
                    );
                    let bits = _mm512_cvtepi32_epi16(_mm512_srli_epi32::<16>(round_bf16_lanes(xv)));
                    _mm256_storeu_si256(qbuf.add(x * dq + d0) as *mut __m256i, bits);
                }
            }
            let mut m = [f32::NEG_INFINITY; MB];
            let mut l = [0f32; MB];
            let mut alpha = [0f32; MB];
            core::ptr::write_bytes(oacc, 0, MB * dv);
            let kh = kv.k.as_ptr().add(kvh * kv.k_head_len());
            let vh = kv.v.as_ptr().add(kvh * kv.v_head_len());
            let (lo32, hi32) = if t.uhi > t.ulo {
                (t.ulo / 32 * 32, t.uhi.next_multiple_of(32))
            } else {
                (0, 0)
            };
            let grid = if hi32 > lo32 {
                lo32 / CHUNK..hi32.div_ceil(CHUNK)
            } else {
                0..0
            };
            for c in grid {
                let k0 = (c * CHUNK).max(lo32);
                let k1 = ((c + 1) * CHUNK).min(hi32);
                let nk = k1 - k0;

                // S = Q · Kᵀ, 16 keys per C tile.
                let q_ld = dq * 2;
                tile_load!("4", qbuf, q_ld);
                if db32 > 1 {
                    tile_load!("5", qbuf.add(32), q_ld);
                }
                if db32 > 2 {
                    tile_load!("6", qbuf.add(64), q_ld);
                }
                if db32 > 3 {
                    tile_load!("7", qbuf.add(96), q_ld);
                }
                let s_ld = S_LD * 4;
                // Two key blocks at a time, C in tmm0/tmm1 and their K tiles in tmm2/tmm3:
                // the second block's load and product overlap the first's, where one block
                // at a time left every product waiting for its K tile (tiles are not
                // renamed, so a reload also waits for the product reading the register).
                // (Macros, not closures: closures do not inherit the target features.)
                macro_rules! qk_step {
                    ($q:literal, $kb:expr) => {{
                        let kb: *const u16 = $kb;
                        tile_load!("2", kb, 64usize);
                        tile_load!("3", kb.add(db32 * 512), 64usize);
                        tile_dp!("0", $q, "2");
                        tile_dp!("1", $q, "3");
                    }};
                }
                for b in (0..nk / 16).step_by(2) {
                    let kb = kh.add((k0 / 16 + b) * db32 * 512);
                    tile_zero!("0");
                    tile_zero!("1");
                    qk_step!("4", kb);
                    if db32 > 1 {
                        qk_step!("5", kb.add(512));
                    }
                    if db32 > 2 {
                        qk_step!("6", kb.add(1024));
                    }
                    if db32 > 3 {
                        qk_step!("7", kb.add(1536));
                    }
                    tile_store!("0", sbuf.add(b * 16), s_ld);
                    tile_store!("1", sbuf.add(b * 16 + 16), s_ld);
                }

                // Softmax along each pair's row; P = exp(s − m) in bf16.
                let n16 = nk / 16;
                for x in 0..nc {
                    let row = sbuf.add(x * S_LD);
                    let (lo, hi) = (t.lo[x], t.hi[x]);
                    if !(lo <= k0 && k1 <= hi) {
                        // Row offsets [0, a) and [b, nk) are keys outside [lo, hi): −∞.
                        let (a, b) = if hi > lo {
                            (lo.clamp(k0, k1) - k0, hi.clamp(k0, k1) - k0)
                        } else {
                            (nk, nk)
                        };
                        let ninf = _mm512_set1_ps(f32::NEG_INFINITY);
                        for v in 0..n16 {
                            let base = v * 16;
                            let below: u16 = match a.saturating_sub(base) {
                                0 => 0,
                                n if n >= 16 => 0xffff,
                                n => (1u16 << n) - 1,
                            };
                            let above: u16 = match b.saturating_sub(base) {
                                0 => 0xffff,
                                n if n >= 16 => 0,
                                n => !((1u16 << n) - 1),
                            };
                            let mask = below | above;
                            if mask != 0 {
                                let p = row.add(base);
                                _mm512_storeu_ps(
                                    p,
                                    _mm512_mask_mov_ps(_mm512_loadu_ps(p), mask, ninf),
                                );
                            }
                        }
                    }
                    let mut mx = _mm512_set1_ps(f32::NEG_INFINITY);
                    for v in 0..n16 {
                        mx = _mm512_max_ps(mx, _mm512_loadu_ps(row.add(v * 16)));
                    }
                    let mn = m[x].max(_mm512_reduce_max_ps(mx));
                    // A pair with no visible key yet keeps max −∞; subtracting 0 keeps its
                    // (masked) scores at exp = 0 rather than NaN.
                    let mu = if mn == f32::NEG_INFINITY { 0.0 } else { mn };
                    alpha[x] = exp_f32(m[x] - mu);
                    m[x] = mn;
                    let mlog = _mm512_set1_ps(mu * LOG2E);
                    let prow = pbuf.add(x * P_LD);
                    // Two sums, one per 16-key block of a 32-key pair (k0 is a multiple
                    // of 32): a fixed split by absolute key index.
                    let (mut sum0, mut sum1) = (_mm512_setzero_ps(), _mm512_setzero_ps());
                    for v in (0..n16).step_by(2) {
                        let p0 = exp_shifted(_mm512_loadu_ps(row.add(v * 16)), mlog);
                        let p1 = exp_shifted(_mm512_loadu_ps(row.add(v * 16 + 16)), mlog);
                        sum0 = _mm512_add_ps(sum0, p0);
                        sum1 = _mm512_add_ps(sum1, p1);
                        let bits = _mm512_cvtne2ps_pbh(p1, p0);
                        _mm512_storeu_si512(
                            prow.add(v * 16) as *mut _,
                            core::mem::transmute::<__m512bh, __m512i>(bits),
                        );
                    }
                    l[x] = l[x] * alpha[x] + hsum(_mm512_add_ps(sum0, sum1));
                }

                // O_chunk = P · V, two 16-column O tiles (tmm0/tmm1) per pass over P.
                // Consecutive key blocks alternate their P and V registers (tmm2, tmm4/5
                // and tmm3, tmm6/7), so the next block's loads need not wait for the
                // products still reading this block's tiles.
                let p_ld = P_LD * 2;
                let o_ld = dv * 4;
                let n32 = nk / 32;
                macro_rules! pv_block {
                    ($p:literal, $v0:literal, $v1:literal, $b:expr, $g0:expr, $two:expr) => {{
                        let b: usize = $b;
                        let vb = vh.add(((k0 / 32 + b) * db16 + $g0) * 512);
                        tile_load!($p, pbuf.add(b * 32), p_ld);
                        tile_load!($v0, vb, 64usize);
                        if $two {
                            tile_load!($v1, vb.add(512), 64usize);
                        }
                        tile_dp!("0", $p, $v0);
                        if $two {
                            tile_dp!("1", $p, $v1);
                        }
                    }};
                }
                let mut g0 = 0;
                while g0 < db16 {
                    let two = g0 + 1 < db16;
                    tile_zero!("0");
                    tile_zero!("1");
                    let mut b = 0;
                    while b + 2 <= n32 {
                        pv_block!("2", "4", "5", b, g0, two);
                        pv_block!("3", "6", "7", b + 1, g0, two);
                        b += 2;
                    }
                    if b < n32 {
                        pv_block!("2", "4", "5", b, g0, two);
                    }
                    tile_store!("0", ochunk.add(g0 * 16), o_ld);
                    if two {
                        tile_store!("1", ochunk.add(g0 * 16 + 16), o_ld);
                    }
                    g0 += 2;
                }
                // Running output: O ← O·α + O_chunk.
                for x in 0..nc {
                    let a = _mm512_set1_ps(alpha[x]);
                    for d in (0..dv).step_by(16) {
                        let o = oacc.add(x * dv + d);
                        let oc = _mm512_loadu_ps(ochunk.add(x * dv + d));
                        _mm512_storeu_ps(
                            o,
                            _mm512_add_ps(_mm512_mul_ps(_mm512_loadu_ps(o), a), oc),
                        );
                    }
                }
            }
            for x in 0..nc {
                let (i, h) = pair(x);
                let dst = out.as_mut_ptr().add(i * s.q_stride + h * hd);
                // No visible key (empty range): zeros, as a softmax over nothing gives.
                let inv = if l[x] == 0.0 { 0.0 } else { 1.0 / l[x] };
                for d0 in (0..hd).step_by(16) {
                    let dn = (hd - d0).min(16);
                    let mask = lanes(dn);
                    let o =
                        _mm512_mul_ps(_mm512_loadu_ps(oacc.add(x * dv + d0)), _mm512_set1_ps(inv));
                    _mm512_mask_storeu_ps(dst.add(d0), mask, o);
                }
            }
        }
    }
    asm!("tilerelease", options(nostack, nomem));
}
