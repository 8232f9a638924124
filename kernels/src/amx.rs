//! AMX-BF16 matmul for many rows (prefill, vision): `out = x · Wᵀ` with bf16 weights as
//! stored and activations rounded to bf16 (f32 accumulation in the tiles).
//!
//! Operand roles are swapped so the weights need no repacking: a weight block (16 rows of W
//! × 32 k, contiguous 64-byte rows with stride k) is the tile-A operand as stored, and the
//! activations, which are converted to bf16 anyway, are packed into the VNNI pair layout of
//! tile B. Each C tile is 16 weight rows × 16 activation rows and is transposed on the way
//! out. Partial blocks (k not a multiple of 32, n or m not of 16) are zero-padded copies, so
//! every row goes through the same arithmetic whatever the shape or the thread split.
//!
//! Rounding activations to bf16 changes results at the 1e-3 level (the fixtures' "bf16
//! matmul inputs" numerics), which is why the engine only uses this path when asked.
//! Tile instructions are issued with `asm!`: their intrinsics are not stable.

#![allow(clippy::too_many_arguments)]

use core::arch::asm;
use core::arch::x86_64::*;
use core::sync::atomic::{AtomicU8, Ordering};

use crate::bf16;

pub mod unmask;

/// 0 = not checked, 1 = usable, 2 = unavailable.
static AMX_STATE: AtomicU8 = AtomicU8::new(0);

/// True when the CPU has AMX-TILE + AMX-BF16, the OS enables tile state, and (Linux) this
/// process was granted tile data through `arch_prctl(ARCH_REQ_XCOMP_PERM)`. Checked once.
pub fn available() -> bool {
    match AMX_STATE.load(Ordering::Relaxed) {
        1 => return true,
        2 => return false,
        _ => {}
    }
    let ok = probe();
    AMX_STATE.store(if ok { 1 } else { 2 }, Ordering::Relaxed);
    ok
}

fn probe() -> bool {
    if !crate::cpu::supported_isas().contains(&crate::matmul::Isa::Avx512) {
        return false;
    }
    let edx = __cpuid_count(7, 0).edx;
    let amx_bf16 = edx & (1 << 22) != 0;
    let amx_tile = edx & (1 << 24) != 0;
    if !(amx_bf16 && amx_tile) {
        return false;
    }
    // SAFETY: AVX-512 support implies OSXSAVE (checked in cpu.rs).
    let xcr0 = unsafe { crate::cpu::xcr0() };
    if xcr0 & (0b11 << 17) != 0b11 << 17 {
        return false;
    }
    request_permission()
}

#[cfg(target_os = "linux")]
fn request_permission() -> bool {
    const ARCH_REQ_XCOMP_PERM: i64 = 0x1023;
    const XFEATURE_XTILEDATA: i64 = 18;
    const SYS_ARCH_PRCTL: i64 = 158;
    let ret: i64;
    // SAFETY: arch_prctl only changes this process's permitted XSAVE features.
    unsafe {
        asm!("syscall", inlateout("rax") SYS_ARCH_PRCTL => ret, in("rdi") ARCH_REQ_XCOMP_PERM,
             in("rsi") XFEATURE_XTILEDATA, lateout("rcx") _, lateout("r11") _, options(nostack));
    }
    ret == 0
}

#[cfg(not(target_os = "linux"))]
fn request_permission() -> bool {
    false
}

/// Palette 1, eight tiles of 16 rows × 64 bytes.
#[repr(C, align(64))]
pub(crate) struct TileConfig(pub(crate) [u8; 64]);

impl TileConfig {
    pub(crate) fn full() -> Self {
        let mut c = [0u8; 64];
        c[0] = 1;
        for t in 0..8 {
            c[16 + 2 * t] = 64; // colsb, little-endian u16
            c[48 + t] = 16; // rows
        }
        TileConfig(c)
    }
}

/// Round to nearest even, as bf16 bits (NaN stays a quiet NaN).
#[inline(always)]
pub fn to_bf16_bits(v: f32) -> u16 {
    let b = v.to_bits();
    if v.is_nan() {
        return ((b >> 16) | 0x40) as u16;
    }
    ((b + 0x7fff + ((b >> 16) & 1)) >> 16) as u16
}

/// k blocks (of 32) per L1 slice of a weight-block pair.
const KC_BLOCKS: usize = 8;

/// Rows per pass over the weights (at most 1024). About 1.5 MiB of packed activations stay
/// L2-resident while the weights stream past. Where not even 192 rows fit (k > 4096: the
/// down projections), the activation tiles come from L3 whatever the pass, and each pass
/// streams all of W from memory: those take every row in one pass (3B down projection,
/// single thread: 288 rows 20.1 → 13.2 ms, was two passes; 1024 rows 51.9 → 43.4 ms, was
/// six; best of four alternating runs). Passes are balanced so the last is not a sliver.
fn m_chunk(kp: usize, m: usize) -> usize {
    let fit = (3 << 19) / (kp * 2);
    let c = if fit < 192 { 1024 } else { fit.min(1024) } / 32 * 32;
    m.div_ceil(m.div_ceil(c).max(1)).next_multiple_of(32)
}

/// k blocks per k chunk of a row pass of `rows` rows ([`matmul_amx_bf16_packed`]): all of
/// them where the pass's packed activations fit the L2 budget [`m_chunk`] plans for, else
/// about half that budget's worth (the other half holds the parked C tiles), in whole
/// slices of [`KC_BLOCKS`].
fn k_chunk_blocks(rows: usize, kb: usize) -> usize {
    let block_row_bytes = rows.next_multiple_of(16) * 64;
    if block_row_bytes * kb <= 3 << 19 {
        return kb;
    }
    ((3 << 18) / block_row_bytes).max(KC_BLOCKS) / KC_BLOCKS * KC_BLOCKS
}

macro_rules! tile_load {
    ($t:literal, $p:expr, $stride:expr) => {
        asm!(concat!("tileloadd tmm", $t, ", [{p} + {s}*1]"), p = in(reg) $p, s = in(reg) $stride, options(nostack, readonly))
    };
}
macro_rules! tile_dp {
    ($c:literal, $a:literal, $b:literal) => {
        asm!(
            concat!("tdpbf16ps tmm", $c, ", tmm", $a, ", tmm", $b),
            options(nostack, nomem)
        )
    };
}
macro_rules! tile_store {
    ($t:literal, $p:expr, $stride:expr) => {
        asm!(concat!("tilestored [{p} + {s}*1], tmm", $t), p = in(reg) $p, s = in(reg) $stride, options(nostack))
    };
}
macro_rules! tile_zero {
    ($t:literal) => {
        asm!(concat!("tilezero tmm", $t), options(nostack, nomem))
    };
}
/// Load the B tiles that stay resident over all weight blocks when k ≤ 64 (`kb` ≤ 2): with
/// two row blocks (`two`) tmm2/tmm3 for k block 0 and tmm6/tmm7 for k block 1, else tmm6
/// and tmm7. `b_tile(t, q)` is the address of B tile `t` (row block or term tile) at k
/// block `q`.
macro_rules! load_resident_b {
    ($two:expr, $kb:expr, $b_tile:expr) => {{
        if $two {
            tile_load!("2", $b_tile(0, 0), 64usize);
            tile_load!("3", $b_tile(1, 0), 64usize);
            if $kb == 2 {
                tile_load!("6", $b_tile(0, 1), 64usize);
                tile_load!("7", $b_tile(1, 1), 64usize);
            }
        } else {
            tile_load!("6", $b_tile(0, 0), 64usize);
            if $kb == 2 {
                tile_load!("7", $b_tile(0, 1), 64usize);
            }
        }
    }};
}

// Shared with the AMX attention tiles and the fused unmasking.
pub(crate) use {load_resident_b, tile_dp, tile_load, tile_store, tile_zero};

/// Activations rounded to bf16 and packed once into the VNNI pair layout of tile B, so
/// that threads splitting the weight rows of one matmul share a single copy.
///
/// Block (mb, q) (16 rows × 32 k) holds, at u16 index r·32 + i·2 + e,
/// x[16·mb + i][32·q + 2r + e], zero past m or k.
pub struct PackedActs {
    data: Aligned<u16>,
    /// Packed rows (3 per output row for [`pack_activations_f32x3`]).
    m: usize,
    k: usize,
    /// Packed rows per output row: 1, or 3 when rows `p·m_out + i` hold term `p` of row `i`.
    parts: usize,
}

/// Pack `x` (`m` rows of `k`) for [`matmul_amx_bf16_packed`]: AVX-512 (16×16 pair
/// transposes in registers) where AMX is usable, [`pack_activations_reference`] otherwise;
/// both give the same bits.
pub fn pack_activations(x: &[f32], m: usize, k: usize) -> PackedActs {
    assert!(
        x.len() >= m * k,
        "pack_activations: x holds {} < {m}×{k}",
        x.len()
    );
    let mut packed = PackedActs::storage(m, k, None);
    pack_row_blocks(x, m, k, 0, &mut packed.data);
    packed
}

impl PackedActs {
    /// The packed bf16 bits, blocks in (row block, k block) order.
    pub fn bits(&self) -> &[u16] {
        &self.data
    }

    /// Storage for `m` rows of `k` (one term per row) to be filled by
    /// [`pack_row_blocks`], piece by piece (possibly on several threads); `reuse`'s
    /// allocation is taken when it is large enough, so a prefill's matmuls do not each map
    /// and fault in fresh pages. Contents are unspecified until packed.
    pub fn storage(m: usize, k: usize, reuse: Option<PackedActs>) -> PackedActs {
        let len = m.div_ceil(16) * k.div_ceil(32) * 512;
        let data = match reuse {
            Some(p) if p.data.capacity() >= len => {
                let mut data = p.data;
                data.resize(len);
                data
            }
            _ => Aligned::zeroed(len),
        };
        PackedActs {
            data,
            m,
            k,
            parts: 1,
        }
    }

    /// [`storage`](Self::storage) for `m` rows of `k` as three bf16 terms each
    /// ([`pack_activations_f32x3`]'s layout), filled by [`pack_row_blocks_f32x3`].
    pub fn storage_f32x3(m: usize, k: usize, reuse: Option<PackedActs>) -> PackedActs {
        let mut p = Self::storage(3 * m, k, reuse);
        p.parts = 3;
        p
    }

    /// The storage split into pieces of `blocks` row blocks (16 rows each, the last piece
    /// shorter): (first row block, its packed data), for [`pack_row_blocks`].
    pub fn row_block_pieces(&mut self, blocks: usize) -> alloc::vec::Vec<(usize, &mut [u16])> {
        let per = blocks.max(1) * self.k.div_ceil(32) * 512;
        self.data
            .chunks_mut(per)
            .enumerate()
            .map(|(i, c)| (i * blocks.max(1), c))
            .collect()
    }
}

/// Pack the row blocks of `x` (`m` rows of `k`) from `mb0` on into `dst`, a piece of
/// [`PackedActs::row_block_pieces`] of the same `m` and `k`: the same bits as
/// [`pack_activations`] gives for those blocks.
pub fn pack_row_blocks(x: &[f32], m: usize, k: usize, mb0: usize, dst: &mut [u16]) {
    pack_term_blocks(x, m, 1, k, mb0, dst)
}

/// [`pack_row_blocks`] for storage from [`PackedActs::storage_f32x3`]: the same bits as
/// [`pack_activations_f32x3`] gives for those blocks of its `3m` packed rows.
pub fn pack_row_blocks_f32x3(x: &[f32], m: usize, k: usize, mb0: usize, dst: &mut [u16]) {
    pack_term_blocks(x, m, 3, k, mb0, dst)
}

/// Packed rows `16·mb0…` (as many as `dst` holds) of `parts` terms per row of `x`.
fn pack_term_blocks(x: &[f32], m: usize, parts: usize, k: usize, mb0: usize, dst: &mut [u16]) {
    let kb = k.div_ceil(32);
    let blocks = dst.len() / (kb * 512).max(1);
    let total = parts * m;
    let r0 = (mb0 * 16).min(total);
    let rows = (total - r0).min(blocks * 16);
    assert!(
        x.len() >= m * k && dst.len() == blocks * kb * 512,
        "pack_row_blocks: x holds {} < {m}×{k} or dst is not whole blocks",
        x.len()
    );
    // `available` is a cached flag that implies AVX-512 (cpuid itself traps to the
    // hypervisor in a VM: too slow to ask per call).
    if available() {
        // SAFETY: AMX implies AVX-512 F/BW (probe); x holds m rows of k, r0 is a multiple
        // of 16 with r0 + rows ≤ parts·m, and dst holds the packed size of `blocks` row
        // blocks (rows past `rows` are written as zeros).
        unsafe { pack_terms_avx512(x, m, (r0, rows), k, k, dst) };
        dst[rows.div_ceil(16) * kb * 512..].fill(0);
    } else {
        let split;
        let terms = if parts == 1 {
            &x[..m * k]
        } else {
            split = split_bf16x3(x, m, k);
            &split[..]
        };
        let p = pack_activations_reference(&terms[r0 * k..(r0 + rows) * k], rows, k);
        dst[..p.data.len()].copy_from_slice(&p.data);
        dst[p.data.len()..].fill(0);
    }
}

/// The scalar packer: one value at a time, the definition of the layout.
pub fn pack_activations_reference(x: &[f32], m: usize, k: usize) -> PackedActs {
    assert!(
        x.len() >= m * k,
        "pack_activations: x holds {} < {m}×{k}",
        x.len()
    );
    let kb = k.div_ceil(32);
    let mblocks = m.div_ceil(16);
    let mut data = Aligned::zeroed(mblocks * kb * 512);
    let mut row16 = alloc::vec![0u16; kb * 32];
    for i in 0..m {
        let (mb, mi) = (i / 16, i % 16);
        for (d, &v) in row16.iter_mut().zip(&x[i * k..(i + 1) * k]) {
            *d = to_bf16_bits(v);
        }
        // Pair r of k block q lands at u32 index (mb·kb + q)·256 + r·16 + mi.
        for q in 0..kb {
            let base = ((mb * kb + q) * 256 + mi) * 2;
            let src = &row16[q * 32..q * 32 + 32];
            for r in 0..16 {
                data[base + r * 32] = src[2 * r];
                data[base + r * 32 + 1] = src[2 * r + 1];
            }
        }
    }
    PackedActs {
        data,
        m,
        k,
        parts: 1,
    }
}

/// [`to_bf16_bits`] on 16 lanes: the bf16 bits land in the high half of each u32 lane
/// (round half to even, NaN kept quiet).
#[inline(always)]
pub(crate) unsafe fn round_bf16_lanes(v: __m512) -> __m512i {
    let b = _mm512_castps_si512(v);
    let lsb = _mm512_and_si512(_mm512_srli_epi32::<16>(b), _mm512_set1_epi32(1));
    let t = _mm512_add_epi32(_mm512_add_epi32(b, _mm512_set1_epi32(0x7fff)), lsb);
    let nan = _mm512_cmp_ps_mask::<_CMP_UNORD_Q>(v, v);
    _mm512_mask_mov_epi32(t, nan, _mm512_or_si512(b, _mm512_set1_epi32(0x40_0000)))
}

/// Term `p` of [`split_bf16x3`] on 16 lanes, rounded as [`round_bf16_lanes`] rounds: the
/// same f32 operations, so the same bits (non-finite values travel in term 0 alone).
#[inline(always)]
unsafe fn split_term_lanes(v: __m512, p: usize) -> __m512i {
    let hi = round_bf16_lanes(v);
    if p == 0 {
        return hi;
    }
    let top = _mm512_set1_epi32(0xffff_0000u32 as i32);
    // v − v is 0 for finite lanes and NaN for the others.
    let finite = _mm512_cmp_ps_mask::<_CMP_ORD_Q>(_mm512_sub_ps(v, v), _mm512_setzero_ps());
    let r1 = _mm512_sub_ps(v, _mm512_castsi512_ps(_mm512_and_si512(hi, top)));
    let mid = round_bf16_lanes(r1);
    let t = if p == 1 {
        mid
    } else {
        round_bf16_lanes(_mm512_sub_ps(
            r1,
            _mm512_castsi512_ps(_mm512_and_si512(mid, top)),
        ))
    };
    _mm512_maskz_mov_epi32(finite, t)
}

/// Block (mb, q) at a time: each of its 16 rows' 32 values rounded to bf16 and narrowed
/// to 16 u32 pairs in one register, then the 16×16 pairs transposed so that register r
/// holds pair r of every row, which is the block's layout. Row `i` of `x` starts at
/// `i·ld` (attention packs one head's columns of the K rows this way).
///
/// # Safety
/// AVX-512 F/BW must be available; `x` must hold `(m − 1)·ld + k` values and `data` the
/// packed size of `m` rows of `k`.
#[target_feature(enable = "avx512f,avx512bw")]
pub(crate) unsafe fn pack_avx512(x: &[f32], m: usize, k: usize, ld: usize, data: &mut [u16]) {
    pack_terms_avx512(x, m, (0, m), k, ld, data)
}

/// [`pack_avx512`] of up to three terms per value, packed rows `r0..r0 + count` of them:
/// packed row `p·m + i` holds term `p` of row `i` as [`split_bf16x3`] defines them (term 0
/// is `x` rounded: `count` ≤ m packs plain rows), computed in registers on the way into
/// the blocks, so no split copy of `x` is made.
///
/// # Safety
/// As [`pack_avx512`], with `r0` a multiple of 16, `r0 + count ≤ 3m` and `data` the packed
/// size of `count` rows of `k`.
#[target_feature(enable = "avx512f,avx512bw")]
unsafe fn pack_terms_avx512(
    x: &[f32],
    m: usize,
    (r0, count): (usize, usize),
    k: usize,
    ld: usize,
    data: &mut [u16],
) {
    let kb = k.div_ceil(32);
    // u16 lane j of (lo, hi) ← the high half of u32 lane j of the 32 rounded values.
    let mut idx = [0u16; 32];
    for (j, v) in idx.iter_mut().enumerate() {
        *v = (2 * j + 1) as u16;
    }
    let idx = _mm512_loadu_si512(idx.as_ptr() as *const _);
    for mb in 0..count.div_ceil(16) {
        let rows = (count - mb * 16).min(16);
        for q in 0..kb {
            let k0 = q * 32;
            let kn = (k - k0).min(32);
            let lo: __mmask16 = if kn >= 16 { 0xffff } else { (1u16 << kn) - 1 };
            let hi: __mmask16 = if kn >= 32 {
                0xffff
            } else if kn > 16 {
                (1u16 << (kn - 16)) - 1
            } else {
                0
            };
            let mut v = [_mm512_setzero_ps(); 16];
            for (i, vi) in v.iter_mut().enumerate().take(rows) {
                let (part, row) = ((r0 + mb * 16 + i) / m, (r0 + mb * 16 + i) % m);
                let p = x.as_ptr().add(row * ld + k0);
                let a = split_term_lanes(_mm512_maskz_loadu_ps(lo, p), part);
                // Masked-off lanes are not read; wrapping_add keeps the address arithmetic
                // defined when the row ends before them.
                let b = split_term_lanes(_mm512_maskz_loadu_ps(hi, p.wrapping_add(16)), part);
                *vi = _mm512_castsi512_ps(_mm512_permutex2var_epi16(a, idx, b));
            }
            transpose16(&mut v);
            let dst = data.as_mut_ptr().add((mb * kb + q) * 512) as *mut f32;
            for (r, &vr) in v.iter().enumerate() {
                _mm512_storeu_ps(dst.add(r * 16), vr);
            }
        }
    }
}

/// `out[i·ldo + j] = Σ x[i·k + kk]·w[j·k + kk] + bias[j]`.
///
/// # Safety
/// [`available`] must have returned true; slices must hold the shapes.
#[target_feature(enable = "avx512f")]
pub unsafe fn matmul_amx_bf16(
    x: &[f32],
    m: usize,
    k: usize,
    w: &[bf16],
    n: usize,
    bias: Option<&[f32]>,
    out: &mut [f32],
    ldo: usize,
) {
    matmul_amx_with(pack_activations, x, m, k, w, n, bias, out, ldo)
}

/// Pack `x` with `pack`, then [`matmul_amx_bf16_packed`] into `out` (checked).
#[target_feature(enable = "avx512f")]
unsafe fn matmul_amx_with(
    pack: fn(&[f32], usize, usize) -> PackedActs,
    x: &[f32],
    m: usize,
    k: usize,
    w: &[bf16],
    n: usize,
    bias: Option<&[f32]>,
    out: &mut [f32],
    ldo: usize,
) {
    if m == 0 || n == 0 {
        return;
    }
    assert!(
        out.len() >= (m - 1) * ldo + n && ldo >= n,
        "matmul_amx: out too small"
    );
    matmul_amx_bf16_packed(&pack(x, m, k), w, n, bias, out.as_mut_ptr(), ldo);
}

/// [`matmul_amx_bf16`] on activations packed by [`pack_activations`], writing `n` columns
/// through `out` (row stride `ldo`): threads may each take a range of weight rows and write
/// their own columns of one output matrix.
///
/// # Safety
/// [`available`] must have returned true; `w` must hold `n` rows of `k`, `bias` (if any) `n`
/// values, and `out` must be valid for writes at `i·ldo + j` for every row `i < m`, `j < n`,
/// with no other thread writing those elements meanwhile.
#[target_feature(enable = "avx512f")]
pub unsafe fn matmul_amx_bf16_packed(
    packed: &PackedActs,
    w: &[bf16],
    n: usize,
    bias: Option<&[f32]>,
    out: *mut f32,
    ldo: usize,
) {
    let (m, k, parts) = (packed.m, packed.k, packed.parts);
    if m == 0 || n == 0 {
        return;
    }
    // Output row of packed row v. With three terms per row they are summed on the way
    // out in packed-row order: term 0 stored, term 1 added, term 2 added and then the bias
    // — ((hi + mid) + lo) + bias whatever the chunking or thread split (rows are packed
    // hi block, mid block, lo block, and chunks and row blocks run in ascending order).
    let m_out = m / parts;
    let out_row = |v: usize| out.add((v % m_out) * ldo);
    assert!(w.len() >= n * k, "matmul_amx_bf16_packed: w too small");
    let kb = k.div_ceil(32); // k blocks of 32
    let kp = kb * 32;
    let nb = n.div_ceil(16);
    let cfg = TileConfig::full();
    asm!("ldtilecfg [{}]", in(reg) cfg.0.as_ptr(), options(nostack, readonly));

    let wt = WeightTiles::new(w, n, k);
    let w16 = wt.w16;
    let a_tile = |b: usize, q: usize| wt.tile(b, q);

    let b_tile = |mb: usize, q: usize| packed.data.as_ptr().add((mb * kb + q) * 512);
    if m <= 32 {
        // Denoising steps (at most two row blocks): each weight tile is used once, so it is
        // loaded straight from the weights and the C tiles stay in registers over the whole
        // k. One weight block at a time, its tiles loaded alternately into tmm4 and tmm5:
        // the next k step's load (from memory) then need not wait for the tile products
        // still reading the current one (with two weight blocks in flight the stream fell
        // from 8.2 to 5.6 GB/s). The weights ahead are prefetched into L2 a few lines per
        // k step, so the stream from memory runs ahead of the tiles.
        //
        // A block is written out only after the next block's tile products are issued, so
        // its transposes overlap those products instead of waiting behind the chain
        // zero → products → store → reload; consecutive blocks accumulate in alternate C
        // tile sets (tmm0/1, tmm2/3) where the B tiles leave room. Tiles are not renamed:
        // reloading a B tile waits for the products still reading it, so with k ≤ 64 (two
        // products per block) the B tiles are loaded once for all blocks. Short rows are
        // all chain: the tiny model's k = 64 vocabulary projection, per 2048-id slice,
        // 12.6 → 8.9 µs with bf16 inputs and 23.1 → 14.4 µs as three f32 terms (best of
        // six alternating rounds); long rows are memory-bound and unchanged.
        let two_m = m > 16;
        let b_resident = kb <= 2;
        let mut parked = Aligned::<f32>::zeroed(4 * 256);
        let parked_ptr = parked.as_mut_ptr();
        let slot = |b: usize| parked_ptr.add((b % 2) * 512);
        let w_bytes = w16.as_ptr() as *const i8;
        let (total, block_bytes) = (n * k * 2, 16 * k * 2);
        let ahead = (2 * block_bytes).max(16 << 10);
        let pf_per_step = block_bytes.div_ceil(64 * kb);
        // (A macro, not a closure: closures do not inherit this function's target features,
        // and the intrinsics inside would become calls.)
        macro_rules! write_out {
            ($b:expr) => {
                write_block(slot($b), m, parts, $b * 16, n, bias, out, ldo)
            };
        }
        // Two row blocks with B resident (k step 0 in tmm2/tmm3, step 1 in tmm6/tmm7): C
        // stays in tmm0/tmm1 (only the `yes` arm emits code; asm! refuses repeated tiles
        // even where a branch never runs).
        macro_rules! resident_pair {
            (yes, $q:ident, $ap:ident, $st:ident) => {{
                if $q == 0 {
                    tile_load!("4", $ap, $st);
                    tile_dp!("0", "4", "2");
                    tile_dp!("1", "4", "3");
                } else {
                    tile_load!("5", $ap, $st);
                    tile_dp!("0", "5", "6");
                    tile_dp!("1", "5", "7");
                }
            }};
            (no, $q:ident, $ap:ident, $st:ident) => {{
                unreachable!()
            }};
        }
        macro_rules! block {
            ($b:expr, $c0:literal, $c1:literal, $res:tt) => {{
                let b = $b;
                let mut pf = (b * block_bytes + ahead).min(total);
                let pf_end = (pf + block_bytes).min(total);
                tile_zero!($c0);
                if two_m {
                    tile_zero!($c1);
                }
                let mut q = 0;
                while q < kb {
                    for _ in 0..pf_per_step {
                        if pf < pf_end {
                            _mm_prefetch::<_MM_HINT_T1>(w_bytes.add(pf));
                            pf += 64;
                        }
                    }
                    let (ap, st) = a_tile(b, q);
                    if two_m && b_resident {
                        resident_pair!($res, q, ap, st);
                    } else if two_m {
                        // Both row blocks' B tiles each step, in tmm6 and tmm7.
                        if q % 2 == 0 {
                            tile_load!("4", ap, st);
                            tile_load!("6", b_tile(0, q), 64usize);
                            tile_dp!($c0, "4", "6");
                            tile_load!("7", b_tile(1, q), 64usize);
                            tile_dp!($c1, "4", "7");
                        } else {
                            tile_load!("5", ap, st);
                            tile_load!("6", b_tile(0, q), 64usize);
                            tile_dp!($c0, "5", "6");
                            tile_load!("7", b_tile(1, q), 64usize);
                            tile_dp!($c1, "5", "7");
                        }
                    } else if q % 2 == 0 {
                        // One row block: its B tiles alternate too (even k steps in tmm6,
                        // odd in tmm7), and with two k blocks they stay loaded throughout.
                        tile_load!("4", ap, st);
                        if !b_resident {
                            tile_load!("6", b_tile(0, q), 64usize);
                        }
                        tile_dp!($c0, "4", "6");
                    } else {
                        tile_load!("5", ap, st);
                        if !b_resident {
                            tile_load!("7", b_tile(0, q), 64usize);
                        }
                        tile_dp!($c0, "5", "7");
                    }
                    q += 1;
                }
                if b > 0 {
                    write_out!(b - 1);
                }
                tile_store!($c0, slot(b), 64usize);
                if two_m {
                    tile_store!($c1, slot(b).add(256), 64usize);
                }
            }};
        }
        if b_resident {
            load_resident_b!(two_m, kb, b_tile);
        }
        for b in 0..nb {
            if two_m && b_resident {
                block!(b, "0", "1", yes);
            } else if b % 2 == 0 {
                block!(b, "0", "1", no);
            } else {
                block!(b, "2", "3", no);
            }
        }
        write_out!(nb - 1);
        asm!("tilerelease", options(nostack, nomem));
        return;
    }
    let chunk = m_chunk(kp, m);
    // k chunks: where a row pass's packed activations overflow L2 (the down projections,
    // k > 4096: 6.3 MB for 288 rows of the 3B's k = 11008), every weight-block pair would
    // read them all again from L3. Taken a chunk of k at a time, each chunk's activations
    // stay in L2 while all the pairs pass over them, and every pair's C tiles stay parked
    // from one chunk to the next. Each C tile still sees the same products and parkings in
    // the same order (slices of KC_BLOCKS k blocks, ascending k), so the bits are the same.
    let kc_blocks = k_chunk_blocks(chunk.min(m), kb);
    let pairs_parked = if kc_blocks < kb { nb.div_ceil(2) } else { 1 };
    // C tiles of the parked weight-block pairs over a row chunk, parked between k slices:
    // slot ((b / 2) % pairs_parked · mblocks + mb − mb0)·2 + db. Parking is exact (f32 out
    // and back), so results do not depend on the slicing.
    let mblocks_max = chunk.min(m).div_ceil(16);
    let mut cbuf = Aligned::<f32>::zeroed(pairs_parked * mblocks_max * 2 * 256);
    let cptr = cbuf.as_mut_ptr();
    let pair_slots = |b: usize| cptr.add((b / 2) % pairs_parked * mblocks_max * 512);
    // The current weight slice, 64-byte aligned: 2 blocks × KC_BLOCKS k blocks × 16 rows
    // of 32 bf16.
    let mut slice_buf = Aligned::<u16>::zeroed(2 * KC_BLOCKS * 16 * 32);
    let slice_ptr = slice_buf.as_mut_ptr();
    let mut m0 = 0;
    while m0 < m {
        let mc = chunk.min(m - m0);
        let (mb0, mblocks) = (m0 / 16, mc.div_ceil(16));
        let mb_end = mb0 + mblocks;
        let mut qc0 = 0;
        while qc0 < kb {
            let qc1 = (qc0 + kc_blocks).min(kb);
            let mut b = 0;
            while b < nb {
                let two_n = b + 1 < nb;
                let pair = pair_slots(b);
                // k slices of KC_BLOCKS·32: the weight-block pair's slice (32 rows × 512
                // bytes) is copied into a contiguous buffer and stays in L1 while every row
                // block of the chunk passes over it. Read in place, rows k·2 bytes apart
                // alias to the same L1 sets whenever k is a power of two (2048, 4096...), and
                // the tiles came from L2 on every use.
                {
                    let mut q0 = qc0;
                    while q0 < qc1 {
                        let q1 = (q0 + KC_BLOCKS).min(qc1);
                        // Copy the slice (16 rows of 64 bytes per block and k block); prefetch the
                        // matching lines of the next slice on the way, so it is in cache when its
                        // turn comes.
                        let (pf_b, pf_q) = if q1 < qc1 { (b, q1) } else { (b + 2, qc0) };
                        for db in 0..if two_n { 2 } else { 1 } {
                            for q in q0..q1 {
                                let (src, st) = a_tile(b + db, q);
                                let dst = slice_ptr.add(((db * KC_BLOCKS + (q - q0)) * 16) * 32);
                                let pf = if pf_b + db < nb && pf_q + (q - q0) < kb {
                                    Some(a_tile(pf_b + db, pf_q + (q - q0)))
                                } else {
                                    None
                                };
                                for row in 0..16 {
                                    let v = _mm512_loadu_si512(
                                        (src as *const u8).add(row * st) as *const _
                                    );
                                    _mm512_store_si512(dst.add(row * 32) as *mut _, v);
                                    if let Some((pp, pst)) = pf {
                                        _mm_prefetch::<_MM_HINT_T0>(
                                            (pp as *const u8).add(row * pst) as *const i8,
                                        );
                                    }
                                }
                            }
                        }
                        let a_slice = |db: usize, q: usize| {
                            slice_ptr.add(((db * KC_BLOCKS + (q - q0)) * 16) * 32)
                        };
                        let mut mb = mb0;
                        while mb < mb_end {
                            let two_m = mb + 1 < mb_end;
                            let slot =
                                |dm: usize, db: usize| pair.add(((mb - mb0 + dm) * 2 + db) * 256);
                            if q0 == 0 {
                                tile_zero!("0");
                                tile_zero!("1");
                                tile_zero!("2");
                                tile_zero!("3");
                            } else {
                                tile_load!("0", slot(0, 0), 64usize);
                                if two_m {
                                    tile_load!("1", slot(1, 0), 64usize);
                                }
                                if two_n {
                                    tile_load!("2", slot(0, 1), 64usize);
                                    if two_m {
                                        tile_load!("3", slot(1, 1), 64usize);
                                    }
                                }
                            }
                            for q in q0..q1 {
                                if q1 == kb {
                                    // Last slice: claim (prefetchw) this row-block pair's
                                    // output lines a few rows per k step, so the transposed
                                    // stores after the row loop hit cache instead of each
                                    // waiting for its own read-for-ownership (output rows are
                                    // ldo apart: no hardware prefetcher follows them).
                                    let per = 32usize.div_ceil(q1 - q0);
                                    let r0 = mb * 16 + (q - q0) * per;
                                    let r1 = (r0 + per).min(((mb + 2) * 16).min(m));
                                    let cols = if two_n { 32 } else { 16 }.min(n - b * 16);
                                    for r in r0..r1 {
                                        let row = out_row(r).add(b * 16) as *const i8;
                                        _mm_prefetch::<_MM_HINT_ET0>(row);
                                        _mm_prefetch::<_MM_HINT_ET0>(row.add(cols * 4 - 4));
                                        if cols > 16 {
                                            _mm_prefetch::<_MM_HINT_ET0>(row.add(64));
                                        }
                                    }
                                }
                                tile_load!("4", a_slice(0, q), 64usize);
                                tile_load!("6", b_tile(mb, q), 64usize);
                                tile_dp!("0", "4", "6");
                                if two_m {
                                    tile_load!("7", b_tile(mb + 1, q), 64usize);
                                    tile_dp!("1", "4", "7");
                                }
                                if two_n {
                                    tile_load!("5", a_slice(1, q), 64usize);
                                    tile_dp!("2", "5", "6");
                                    if two_m {
                                        tile_dp!("3", "5", "7");
                                    }
                                }
                            }
                            tile_store!("0", slot(0, 0), 64usize);
                            if two_m {
                                tile_store!("1", slot(1, 0), 64usize);
                            }
                            if two_n {
                                tile_store!("2", slot(0, 1), 64usize);
                                if two_m {
                                    tile_store!("3", slot(1, 1), 64usize);
                                }
                            }
                            mb += if two_m { 2 } else { 1 };
                        }
                        q0 = q1;
                    }
                }
                // Parked C tile: rows = 16 weight rows (outputs j), columns = 16 activation
                // rows. Transposed on the way out (16×16 in registers), then the bias and a
                // (masked) contiguous store of 16 outputs per activation row.
                for db in 0..if qc1 == kb && two_n {
                    2
                } else if qc1 == kb {
                    1
                } else {
                    0
                } {
                    let j0 = (b + db) * 16;
                    let (jmask, bias_v) = block_mask_bias(j0, n, bias);
                    for mb in mb0..mb_end {
                        let tile = pair.add(((mb - mb0) * 2 + db) * 256);
                        let mut rows = [_mm512_setzero_ps(); 16];
                        for (r, v) in rows.iter_mut().enumerate() {
                            *v = _mm512_loadu_ps(tile.add(r * 16));
                        }
                        transpose16(&mut rows);
                        let i_base = mb * 16;
                        let mvalid = m.saturating_sub(i_base).min(16);
                        for (ir, &col) in rows.iter().enumerate().take(mvalid) {
                            let v = i_base + ir;
                            let dst = out_row(v).add(j0);
                            let val = match (parts, v / m_out) {
                                (1, _) => _mm512_add_ps(col, bias_v),
                                (_, 0) => col,
                                (_, 1) => _mm512_add_ps(_mm512_maskz_loadu_ps(jmask, dst), col),
                                _ => _mm512_add_ps(
                                    _mm512_add_ps(_mm512_maskz_loadu_ps(jmask, dst), col),
                                    bias_v,
                                ),
                            };
                            _mm512_mask_storeu_ps(dst, jmask, val);
                        }
                    }
                }
                b += if two_n { 2 } else { 1 };
            }
            qc0 = qc1;
        }
        m0 += mc;
    }
    asm!("tilerelease", options(nostack, nomem));
}

/// f32 activations on bf16 tiles: `x = hi + mid + lo` with each term a bf16 (`hi` = x
/// rounded, `mid` = the remainder rounded, `lo` = what is left rounded; the three carry 24
/// significant bits, all of an f32's). Products with bf16 weights are exact and the tiles
/// accumulate in f32, so `x·W` from the three partial products is as accurate as an f32
/// dot product — the default path's numerics at bf16-tile speed, for three times the tile
/// work (a denoising step is memory-bound, so that work is hidden there).
///
/// Returns the `3m × k` split: rows `0..m` the `hi` terms, `m..2m` `mid`, `2m..3m` `lo`
/// (each exactly a bf16, so packing them rounds nothing).
pub fn split_bf16x3(x: &[f32], m: usize, k: usize) -> alloc::vec::Vec<f32> {
    assert!(
        x.len() >= m * k,
        "split_bf16x3: x holds {} < {m}×{k}",
        x.len()
    );
    let mut s = alloc::vec![0f32; 3 * m * k];
    let (hi, rest) = s.split_at_mut(m * k);
    let (mid, lo) = rest.split_at_mut(m * k);
    let round = |v: f32| f32::from_bits((to_bf16_bits(v) as u32) << 16);
    for (((&v, h), md), l) in x[..m * k].iter().zip(hi).zip(mid).zip(lo) {
        if !v.is_finite() {
            // inf/NaN travel in the first term alone (inf − inf would make a NaN).
            *h = v;
            continue;
        }
        *h = round(v);
        let r1 = v - *h;
        *md = round(r1);
        *l = round(r1 - *md);
    }
    s
}

/// `out[i·ldo + j] = Σ x[i·k + kk]·w[j·k + kk] + bias[j]` with f32 activations on bf16
/// tiles ([`split_bf16x3`]): f32-accurate, single thread.
///
/// # Safety
/// [`available`] must have returned true; slices must hold the shapes.
#[target_feature(enable = "avx512f")]
pub unsafe fn matmul_amx_f32x3(
    x: &[f32],
    m: usize,
    k: usize,
    w: &[bf16],
    n: usize,
    bias: Option<&[f32]>,
    out: &mut [f32],
    ldo: usize,
) {
    matmul_amx_with(pack_activations_f32x3, x, m, k, w, n, bias, out, ldo)
}

/// Pack `x` for [`matmul_amx_bf16_packed`] as three bf16 terms per value
/// ([`split_bf16x3`]); the kernel sums the terms' products on the way out, so the result
/// is the f32-accurate `x·Wᵀ`.
pub fn pack_activations_f32x3(x: &[f32], m: usize, k: usize) -> PackedActs {
    assert!(
        x.len() >= m * k,
        "pack_activations_f32x3: x holds {} < {m}×{k}",
        x.len()
    );
    let mut p = PackedActs::storage_f32x3(m, k, None);
    pack_row_blocks_f32x3(x, m, k, 0, &mut p.data);
    p
}

/// In-register transpose of a 16×16 f32 tile (64 shuffles; 16 gathers cost about twice
/// that): 32-bit then 64-bit interleaves inside 128-bit lanes, then two rounds of 128-bit
/// lane shuffles.
#[inline(always)]
unsafe fn transpose16(r: &mut [__m512; 16]) {
    let mut t = [_mm512_setzero_ps(); 16];
    for i in 0..8 {
        t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
        t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
    }
    for g in 0..4 {
        let (a, b, c, d) = (t[4 * g], t[4 * g + 1], t[4 * g + 2], t[4 * g + 3]);
        let pd = _mm512_castps_pd;
        r[4 * g] = _mm512_castpd_ps(_mm512_unpacklo_pd(pd(a), pd(c)));
        r[4 * g + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(pd(a), pd(c)));
        r[4 * g + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(pd(b), pd(d)));
        r[4 * g + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(pd(b), pd(d)));
    }
    for h in 0..2 {
        for i in 0..4 {
            let (a, b) = (r[8 * h + i], r[8 * h + 4 + i]);
            t[8 * h + i] = _mm512_shuffle_f32x4::<0x88>(a, b);
            t[8 * h + 4 + i] = _mm512_shuffle_f32x4::<0xdd>(a, b);
        }
    }
    for i in 0..8 {
        r[i] = _mm512_shuffle_f32x4::<0x88>(t[i], t[8 + i]);
        r[8 + i] = _mm512_shuffle_f32x4::<0xdd>(t[i], t[8 + i]);
    }
}

/// Lane mask of the outputs `j0..j0 + 16` that exist (`n` in all) and their bias (zeros
/// without one).
#[inline(always)]
unsafe fn block_mask_bias(j0: usize, n: usize, bias: Option<&[f32]>) -> (u16, __m512) {
    let nvalid = (n - j0).min(16);
    let jmask: u16 = if nvalid == 16 {
        0xffff
    } else {
        ((1u32 << nvalid) - 1) as u16
    };
    let bias_v = match bias {
        Some(bb) => _mm512_maskz_loadu_ps(jmask, bb.as_ptr().add(j0)),
        None => _mm512_setzero_ps(),
    };
    (jmask, bias_v)
}

/// Direct path's write-out of weight block `j0 / 16`: `tiles` holds its C tile per row block
/// (16 weight rows × 16 packed rows each, 256 f32 apart); each output row `i` gets
/// `((term 0 + term 1) + term 2) + bias` over its packed rows `p·m_out + i` (one term when
/// `parts` is 1), in the order the sliced path sums them, so both paths give the same bits.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn write_block(
    tiles: *const f32,
    m: usize,
    parts: usize,
    j0: usize,
    n: usize,
    bias: Option<&[f32]>,
    out: *mut f32,
    ldo: usize,
) {
    let (jmask, bias_v) = block_mask_bias(j0, n, bias);
    let mut cols = [_mm512_setzero_ps(); 32];
    for dm in 0..m.div_ceil(16) {
        let mut rows = [_mm512_setzero_ps(); 16];
        for (r, v) in rows.iter_mut().enumerate() {
            *v = _mm512_load_ps(tiles.add(dm * 256 + r * 16));
        }
        transpose16(&mut rows);
        cols[dm * 16..dm * 16 + 16].copy_from_slice(&rows);
    }
    let m_out = m / parts;
    for i in 0..m_out {
        let mut v = cols[i];
        for p in 1..parts {
            v = _mm512_add_ps(v, cols[p * m_out + i]);
        }
        _mm512_mask_storeu_ps(out.add(i * ldo + j0), jmask, _mm512_add_ps(v, bias_v));
    }
}

/// A weight matrix (`n` rows of `k`, as stored) seen as tile-A operands: block `b` (rows
/// 16·b…) at k block `q` (32 values). Blocks are read in place where they can be; the
/// last k block (when k is not a multiple of 32) and a short last block are copied
/// zero-padded: row stride 64 bytes for the k tail, kp·2 bytes for the short block.
pub(crate) struct WeightTiles<'a> {
    pub(crate) w16: &'a [u16],
    k: usize,
    kp: usize,
    k_full: usize,
    n_full: usize,
    k_tail: Aligned<u16>,
    n_tail: Aligned<u16>,
}

impl<'a> WeightTiles<'a> {
    pub(crate) fn new(w: &'a [bf16], n: usize, k: usize) -> Self {
        let w16 = bytemuck_u16(w);
        let (kb, nb) = (k.div_ceil(32), n.div_ceil(16));
        let (kp, k_full, n_full) = (kb * 32, k / 32, n / 16);
        let mut k_tail = Aligned::zeroed(if k_full < kb { nb * 16 * 32 } else { 0 });
        if k_full < kb {
            for j in 0..n {
                let t0 = k_full * 32;
                k_tail[j * 32..j * 32 + (k - t0)].copy_from_slice(&w16[j * k + t0..(j + 1) * k]);
            }
        }
        let mut n_tail = Aligned::zeroed(if n_full < nb { 16 * kp } else { 0 });
        for j in n_full * 16..n {
            let r = j - n_full * 16;
            n_tail[r * kp..r * kp + k].copy_from_slice(&w16[j * k..(j + 1) * k]);
        }
        WeightTiles {
            w16,
            k,
            kp,
            k_full,
            n_full,
            k_tail,
            n_tail,
        }
    }

    /// Address and row stride (bytes) of tile A for weight block `b`, k block `q`.
    ///
    /// # Safety
    /// `b < n.div_ceil(16)` and `q < k.div_ceil(32)`.
    #[inline(always)]
    pub(crate) unsafe fn tile(&self, b: usize, q: usize) -> (*const u16, usize) {
        if b >= self.n_full {
            (self.n_tail.as_ptr().add(q * 32), self.kp * 2)
        } else if q >= self.k_full {
            (self.k_tail.as_ptr().add(b * 16 * 32), 64)
        } else {
            (self.w16.as_ptr().add(b * 16 * self.k + q * 32), self.k * 2)
        }
    }
}

fn bytemuck_u16(w: &[bf16]) -> &[u16] {
    // SAFETY: bf16 is a transparent u16.
    unsafe { core::slice::from_raw_parts(w.as_ptr() as *const u16, w.len()) }
}

/// Element types an [`Aligned`] buffer may hold: plain numbers, zero by default.
pub(crate) trait Plain: Copy + Default {}
impl Plain for u16 {}
impl Plain for f32 {}

/// A zeroed buffer that starts on a 64-byte boundary, for everything tiles are loaded
/// from or stored to. A tile row of 64 bytes that straddles two cache lines makes
/// `tileloadd` about six times slower (16 rows from L1: 2.9 ns aligned, 19 ns 16 bytes
/// off, on this machine kind), and a plain `Vec` of u16 or f32 is only 16-byte aligned.
/// The storage is such a `Vec` with 64 bytes to spare (allocated zeroed, so large buffers
/// come as lazily zeroed pages, not a memset pass before the packer's own writes).
pub(crate) struct Aligned<T: Plain> {
    buf: alloc::vec::Vec<T>,
    start: usize,
    len: usize,
}

impl<T: Plain> Aligned<T> {
    /// `len` zeroed elements.
    pub(crate) fn zeroed(len: usize) -> Self {
        let spare = 64 / core::mem::size_of::<T>();
        let buf = alloc::vec![T::default(); len + spare];
        let start = buf.as_ptr().align_offset(64);
        debug_assert!(start < spare);
        Aligned { buf, start, len }
    }

    /// A copy of `src`.
    pub(crate) fn from_slice(src: &[T]) -> Self {
        let mut a = Self::zeroed(src.len());
        a.copy_from_slice(src);
        a
    }

    /// Elements the allocation can hold without growing.
    fn capacity(&self) -> usize {
        self.buf.len() - self.start
    }

    /// Shrink or grow (up to [`capacity`](Self::capacity)) to `len` elements; new ones
    /// hold whatever the allocation held.
    fn resize(&mut self, len: usize) {
        assert!(
            len <= self.capacity(),
            "Aligned::resize beyond the allocation"
        );
        self.len = len;
    }
}

impl<T: Plain> core::ops::Deref for Aligned<T> {
    type Target = [T];
    fn deref(&self) -> &[T] {
        &self.buf[self.start..self.start + self.len]
    }
}

impl<T: Plain> core::ops::DerefMut for Aligned<T> {
    fn deref_mut(&mut self) -> &mut [T] {
        &mut self.buf[self.start..self.start + self.len]
    }
}
