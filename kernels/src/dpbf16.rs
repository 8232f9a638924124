//! bf16 × bf16 dot products with `vdpbf16ps` (AVX512_BF16) for matmuls of few rows (the
//! denoising step): `out = x · Wᵀ` with the activations rounded to bf16 once per call and the
//! weights used as stored.
//!
//! The f32 kernels of [`crate::x86`] need one FMA per 16 weights per row, which on a core of
//! this class is about as fast as DRAM delivers weights for an 8-row block; `vdpbf16ps` does
//! 32 weights per instruction with no widening, so the step becomes bandwidth-bound. Rounding
//! the activations to bf16 is the numerics of the fixtures' "bf16 matmul inputs" engine and of
//! the AMX path ([`crate::amx`]), which is why the engine only uses it when asked.
//!
//! Lane l of an accumulator sums the products of k ≡ 2l, 2l+1 (mod 32) in k order, then one
//! fixed reduction tree: a row's result does not depend on the tile or thread split.

#![allow(clippy::too_many_arguments, clippy::needless_range_loop)]

use core::arch::x86_64::*;

use crate::amx::to_bf16_bits;
use crate::bf16;
use crate::x86::{hsum16, PREFETCH_AHEAD_BYTES};

#[inline(always)]
unsafe fn tile<const MR: usize, const NR: usize>(
    xb: *const u16,
    kp: usize,
    k: usize,
    w: *const u16,
    bias: Option<&[f32]>,
    out: *mut f32,
    ldo: usize,
    j0: usize,
) {
    let mut acc = [[_mm512_setzero_ps(); NR]; MR];
    let full = k / 32 * 32;
    let mut kk = 0;
    while kk < full {
        let mut wv = [_mm512_setzero_si512(); NR];
        let pf = (w as *const u8).wrapping_add(PREFETCH_AHEAD_BYTES + kk / 32 * NR * 64);
        for c in 0..NR {
            _mm_prefetch::<_MM_HINT_T1>(pf.wrapping_add(c * 64) as *const i8);
            wv[c] = _mm512_loadu_si512(w.add(c * k + kk) as *const _);
        }
        for r in 0..MR {
            let xv: __m512bh =
                core::mem::transmute(_mm512_loadu_si512(xb.add(r * kp + kk) as *const _));
            for c in 0..NR {
                acc[r][c] = _mm512_dpbf16_ps(
                    acc[r][c],
                    xv,
                    core::mem::transmute::<__m512i, __m512bh>(wv[c]),
                );
            }
        }
        kk += 32;
    }
    if full < k {
        // Zero-padded activations and masked weight loads: the padding adds exact zeros.
        let mask: __mmask32 = ((1u64 << (k - full)) - 1) as u32;
        let mut wv = [_mm512_setzero_si512(); NR];
        for c in 0..NR {
            wv[c] = _mm512_maskz_loadu_epi16(mask, w.add(c * k + full) as *const i16);
        }
        for r in 0..MR {
            let xv: __m512bh =
                core::mem::transmute(_mm512_loadu_si512(xb.add(r * kp + full) as *const _));
            for c in 0..NR {
                acc[r][c] = _mm512_dpbf16_ps(
                    acc[r][c],
                    xv,
                    core::mem::transmute::<__m512i, __m512bh>(wv[c]),
                );
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

/// `out[i·ldo + j] = Σ bf16(x[i·k + kk])·w[j·k + kk] + bias[j]` (f32 accumulation).
///
/// # Safety
/// The CPU must support AVX-512F/BW/VL and AVX512_BF16 ([`crate::cpu::has_avx512_bf16`]).
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
pub unsafe fn matmul_dpbf16(
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
        x.len() >= m * k && w.len() >= n * k && out.len() >= (m - 1) * ldo + n && ldo >= n,
        "matmul_dpbf16: slices too small for {m}×{k} · ({n}×{k})ᵀ"
    );
    assert!(
        bias.is_none_or(|b| b.len() >= n),
        "matmul_dpbf16: bias too short"
    );
    let kp = k.div_ceil(32) * 32;
    let mut xb = alloc::vec![0u16; m * kp];
    for r in 0..m {
        for (d, &v) in xb[r * kp..r * kp + k]
            .iter_mut()
            .zip(&x[r * k..(r + 1) * k])
        {
            *d = to_bf16_bits(v);
        }
    }
    let (xp, wp0, op0) = (xb.as_ptr(), w.as_ptr() as *const u16, out.as_mut_ptr());
    // Rows in chunks that stay in L2 while the weights stream past them.
    let m_chunk = (1024 * 1024 / (kp * 2).max(1)).clamp(8, 256) / 8 * 8;
    crate::x86::pair_strips!(tile, xp, kp, k, wp0, n, bias, op0, ldo, m, m_chunk);
}
