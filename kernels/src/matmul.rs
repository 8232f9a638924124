//! `out = x · Wᵀ (+ bias)`: f32 activations `x [m, k]` times a weight `W [n, k]` stored as in
//! the checkpoint (PyTorch Linear layout, row j = output j), widened to f32 on the fly.
//!
//! Three implementations behind one entry point, chosen once per context ([`crate::cpu`]):
//! hand-written AVX-512 and AVX2+FMA microkernels ([`crate::x86`]) and a portable version
//! written so LLVM vectorises it (8-lane accumulator arrays, four activation rows per
//! weight row).

use crate::WeightElem;

const LANES: usize = 8;

/// Which instruction set the fast kernels may use. Chosen once per context.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Isa {
    /// Baseline x86-64 (SSE2) or any other architecture: portable code.
    Portable,
    /// x86-64 with AVX2, FMA and F16C, verified through cpuid and XGETBV.
    Avx2,
    /// x86-64 with AVX-512F/BW/VL (and the AVX2 set), OS-enabled ZMM state.
    Avx512,
}

#[inline(always)]
fn widen<W: WeightElem>(w: &[W], out: &mut [f32; LANES]) {
    for l in 0..LANES {
        out[l] = w[l].to_f32();
    }
}

#[inline(always)]
fn hsum(acc: &[f32; LANES]) -> f32 {
    // Fixed pairwise order: results do not depend on how work was split.
    let a = [
        acc[0] + acc[4],
        acc[1] + acc[5],
        acc[2] + acc[6],
        acc[3] + acc[7],
    ];
    (a[0] + a[2]) + (a[1] + a[3])
}

/// Four dot products of four activation rows against one weight row.
#[inline(always)]
fn dot4<W: WeightElem>(x: [&[f32]; 4], w: &[W], k: usize) -> [f32; 4] {
    let mut acc = [[0f32; LANES]; 4];
    let mut wl = [0f32; LANES];
    let chunks = k / LANES;
    for c in 0..chunks {
        let o = c * LANES;
        widen(&w[o..o + LANES], &mut wl);
        for r in 0..4 {
            let xr = &x[r][o..o + LANES];
            for l in 0..LANES {
                acc[r][l] += xr[l] * wl[l];
            }
        }
    }
    let mut res = [hsum(&acc[0]), hsum(&acc[1]), hsum(&acc[2]), hsum(&acc[3])];
    for kk in chunks * LANES..k {
        let wv = w[kk].to_f32();
        for r in 0..4 {
            res[r] += x[r][kk] * wv;
        }
    }
    res
}

#[inline(always)]
fn dot1<W: WeightElem>(x: &[f32], w: &[W], k: usize) -> f32 {
    let mut acc = [0f32; LANES];
    let mut wl = [0f32; LANES];
    let chunks = k / LANES;
    for c in 0..chunks {
        let o = c * LANES;
        widen(&w[o..o + LANES], &mut wl);
        let xr = &x[o..o + LANES];
        for l in 0..LANES {
            acc[l] += xr[l] * wl[l];
        }
    }
    let mut res = hsum(&acc);
    for kk in chunks * LANES..k {
        res += x[kk] * w[kk].to_f32();
    }
    res
}

/// Rows of `x` processed together while one tile of weight rows stays in cache.
const ROW_TILE: usize = 32;

#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn matmul_body<W: WeightElem>(
    x: &[f32],
    m: usize,
    k: usize,
    w: &[W],
    n: usize,
    bias: Option<&[f32]>,
    out: &mut [f32],
    ldo: usize,
) {
    let mut i0 = 0;
    while i0 < m {
        let i1 = (i0 + ROW_TILE).min(m);
        for j in 0..n {
            let wr = &w[j * k..j * k + k];
            let b = bias.map_or(0.0, |b| b[j]);
            let mut i = i0;
            while i + 4 <= i1 {
                let r = dot4(
                    [
                        &x[i * k..i * k + k],
                        &x[(i + 1) * k..(i + 1) * k + k],
                        &x[(i + 2) * k..(i + 2) * k + k],
                        &x[(i + 3) * k..(i + 3) * k + k],
                    ],
                    wr,
                    k,
                );
                for (r_i, v) in r.iter().enumerate() {
                    out[(i + r_i) * ldo + j] = v + b;
                }
                i += 4;
            }
            while i < i1 {
                out[i * ldo + j] = dot1(&x[i * k..i * k + k], wr, k) + b;
                i += 1;
            }
        }
        i0 = i1;
    }
}

#[allow(clippy::too_many_arguments)]
fn check_shapes<W>(
    x: &[f32],
    m: usize,
    k: usize,
    w: &[W],
    n: usize,
    bias: Option<&[f32]>,
    out: &[f32],
    ldo: usize,
) {
    assert!(
        x.len() >= m * k && w.len() >= n * k,
        "matmul: operand too short"
    );
    assert!(
        m == 0 || out.len() >= (m - 1) * ldo + n,
        "matmul: output too short"
    );
    assert!(ldo >= n, "matmul: ldo < n");
    if let Some(b) = bias {
        assert!(b.len() >= n, "matmul: bias too short");
    }
}

/// `out[i·ldo + j] = Σ_k x[i·k + kk] · w[j·k + kk] + bias[j]` for `i < m`, `j < n`.
///
/// Panics if a slice is shorter than the shape requires (callers validate shapes at load).
#[allow(clippy::too_many_arguments)]
pub fn matmul<W: WeightElem>(
    isa: Isa,
    x: &[f32],
    m: usize,
    k: usize,
    w: &[W],
    n: usize,
    bias: Option<&[f32]>,
    out: &mut [f32],
    ldo: usize,
) {
    check_shapes(x, m, k, w, n, bias, out, ldo);
    match isa {
        // SAFETY (both arms): these Isa values come from cpu::detect_isa, which checked the
        // CPU features and the OS register-state support; shapes were checked above.
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => unsafe { crate::x86::matmul_avx512(x, m, k, w, n, bias, out, ldo) },
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => unsafe { crate::x86::matmul_avx2(x, m, k, w, n, bias, out, ldo) },
        _ => matmul_body(x, m, k, w, n, bias, out, ldo),
    }
}

/// A matmul's activations prepared once for the bf16-weight FMA kernels, to be shared by
/// the pieces of a split (each piece would otherwise prepare them again): the rows split into
/// the even/odd halves of each pair block, as the AVX-512 (32-wide blocks) and AVX2
/// (16-wide) kernels read them next to bf16 weight pairs.
pub struct PairedRows {
    isa: Isa,
    xd: alloc::vec::Vec<f32>,
    m: usize,
    k: usize,
}

impl PairedRows {
    /// `m` rows of `k` from `x`; `None` where the ISA's kernel reads rows as they are
    /// (portable code).
    pub fn new(isa: Isa, x: &[f32], m: usize, k: usize) -> Option<Self> {
        assert!(x.len() >= m * k, "PairedRows: x too short");
        #[cfg(target_arch = "x86_64")]
        let xd = match isa {
            Isa::Avx512 => crate::x86::deinterleave_pairs(32, x, m, k),
            Isa::Avx2 => crate::x86::deinterleave_pairs(16, x, m, k),
            Isa::Portable => return None,
        };
        #[cfg(target_arch = "x86_64")]
        return Some(PairedRows { isa, xd, m, k });
        #[cfg(not(target_arch = "x86_64"))]
        None
    }

    pub fn rows(&self) -> usize {
        self.m
    }

    pub fn k(&self) -> usize {
        self.k
    }
}

/// [`matmul`] of prepared rows against bf16 weights: the same results, bit for bit, without
/// preparing the rows again.
#[allow(clippy::too_many_arguments)]
pub fn matmul_bf16_paired(
    rows: &PairedRows,
    w: &[crate::bf16],
    n: usize,
    bias: Option<&[f32]>,
    out: &mut [f32],
    ldo: usize,
) {
    let (m, k) = (rows.m, rows.k);
    assert!(w.len() >= n * k, "matmul: operand too short");
    assert!(
        m == 0 || out.len() >= (m - 1) * ldo + n,
        "matmul: output too short"
    );
    assert!(ldo >= n, "matmul: ldo < n");
    if let Some(b) = bias {
        assert!(b.len() >= n, "matmul: bias too short");
    }
    let (xp, wp, op) = (rows.xd.as_ptr(), w.as_ptr() as *const u16, out.as_mut_ptr());
    match rows.isa {
        // SAFETY (both arms): `rows.isa` came from cpu::detect_isa via the caller and chose
        // the split these kernels read; shapes were checked above.
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => unsafe {
            crate::x86::matmul_bf16_avx512_paired(xp, m, k, wp, n, bias, op, ldo)
        },
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => unsafe { crate::x86::matmul_bf16_avx2_paired(xp, m, k, wp, n, bias, op, ldo) },
        _ => unreachable!("PairedRows exist only for AVX-512 and AVX2"),
    }
}

/// Least rows for which [`matmul_many_rows`] pays off (its packing costs a pass over the
/// weights; a denoising step of ≤ 16 rows is memory-bound and wants them streamed as stored).
pub const MANY_ROWS: usize = 32;

/// [`matmul`] for many rows (prefill, vision): on AVX2 a packed GEMM
/// ([`crate::x86::gemm_avx2`]), elsewhere [`matmul`]. Each output sums its products in k
/// order (in k blocks that depend on k alone), so a row's result does not depend on the
/// other rows or the split, but it differs from [`matmul`]'s by rounding: choose between the two
/// on the whole call's row count (e.g. `m >= MANY_ROWS`), never per piece of a split.
#[allow(clippy::too_many_arguments)]
pub fn matmul_many_rows<W: WeightElem>(
    isa: Isa,
    x: &[f32],
    m: usize,
    k: usize,
    w: &[W],
    n: usize,
    bias: Option<&[f32]>,
    out: &mut [f32],
    ldo: usize,
) {
    #[cfg(target_arch = "x86_64")]
    if isa == Isa::Avx2 {
        check_shapes(x, m, k, w, n, bias, out, ldo);
        // SAFETY: Isa::Avx2 comes from cpu::detect_isa (AVX2, FMA, F16C and OS support);
        // shapes were checked above.
        return unsafe {
            crate::x86::gemm_avx2(
                crate::x86::GemmActs::Rows(x),
                m,
                k,
                w,
                n,
                bias,
                out.as_mut_ptr(),
                ldo,
            )
        };
    }
    matmul(isa, x, m, k, w, n, bias, out, ldo)
}

/// Dot product with the same lane order as [`matmul`] (used by attention).
#[inline(always)]
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    dot1(a, b, a.len().min(b.len()))
}
