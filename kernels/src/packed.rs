//! bf16 weights repacked once, at load, into 16-output panels for the AVX2 FMA kernels.
//!
//! Why: a denoising step multiplies a handful of rows (the 8 of a block) by every weight.
//! Read as stored (`W[n, k]`, one output's weights contiguous), each output is a dot
//! product: every pair of FMAs needs an activation vector from L1/L2 and ends in a
//! horizontal sum. With 8 rows of k = 2048 (64 KiB) the activations no longer fit in L1
//! and the dot-product tiles are bound by L2 reads (8 × 2048 × 11008 on two threads: 52
//! GFLOP/s). In panels, 8 outputs sit in the 8 lanes of one vector: a k step loads one
//! weight vector, broadcasts one activation per row and does one FMA per row, as the
//! many-row GEMM's micro-kernel does (the same shape on two threads: 108 GFLOP/s).
//!
//! Layout: panel `p` holds outputs `16p .. 16p + 16`; for each pair `q` of k (`2q`,
//! `2q + 1`) it stores 16 `u32`, lane `j` = `W[16p + j][2q] | W[16p + j][2q + 1] << 16`
//! (zero past `n` or `k`). One 64-byte line per pair; a panel's pairs are contiguous and
//! panels follow each other, so a range of outputs streams from one place. Widening a
//! vector of pairs is one shift (even k) and one mask (odd k), as in
//! [`crate::matmul::PairedRows`]' kernels.
//!
//! Arithmetic: each output sums its products in k order, one FMA after the other, in the
//! k blocks of the many-row GEMM ([`k_block`]), adding each block's sum to the previous
//! blocks', then the bias. So the few-row panel kernel, the GEMM on panels and the GEMM on
//! stored weights give the same bits for a row, whatever the rows around it, the columns of
//! the call or the thread.

use alloc::sync::Arc;
use alloc::vec;
use alloc::vec::Vec;

use crate::bf16;
use crate::matmul::Isa;

/// Outputs per panel.
pub const PANEL: usize = 16;

/// k per summation block of the many-row GEMM and the panel kernels: equal blocks of at
/// most 256, a multiple of 8 (depends on k alone).
pub fn k_block(k: usize) -> usize {
    if k == 0 {
        return 8;
    }
    k.div_ceil(k.div_ceil(256)).next_multiple_of(8).min(256)
}

/// Version of the panel layout above. Panels kept outside the process (the engine's
/// on-disk panel cache) record it; change it with anything that changes the words a
/// matrix packs to.
pub const PANEL_LAYOUT_VERSION: u32 = 1;

/// Panels held elsewhere (e.g. a mapped cache file) and shared by reference: the words of
/// one matrix.
pub type SharedPanels = Arc<dyn AsRef<[u32]> + Send + Sync>;

/// Where a [`PackedBf16`]'s words live.
#[derive(Clone)]
enum Words {
    /// Packed in this process.
    Owned(Vec<u32>),
    /// Packed before, held by someone else (see [`PackedBf16::from_shared`]).
    Shared(SharedPanels),
}

/// A bf16 `[n, k]` weight matrix in 16-output panels of k pairs (see the module docs).
#[derive(Clone)]
pub struct PackedBf16 {
    data: Words,
    n: usize,
    k: usize,
}

impl core::fmt::Debug for PackedBf16 {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        let held = match self.data {
            Words::Owned(_) => "owned",
            Words::Shared(_) => "shared",
        };
        f.debug_struct("PackedBf16")
            .field("n", &self.n)
            .field("k", &self.k)
            .field("words", &held)
            .finish()
    }
}

impl PackedBf16 {
    /// `u32` per panel: 16 per pair of k.
    pub fn panel_len(k: usize) -> usize {
        PANEL * k.div_ceil(2)
    }

    /// Panels for `n` outputs.
    pub fn panels(n: usize) -> usize {
        n.div_ceil(PANEL)
    }

    /// Repack `w` (`n` rows of `k`, as stored).
    pub fn new(w: &[bf16], n: usize, k: usize) -> Self {
        let mut data = vec![0u32; Self::words(n, k)];
        pack_panels(w, n, k, 0, &mut data);
        PackedBf16 {
            data: Words::Owned(data),
            n,
            k,
        }
    }

    /// `u32` words of the panels of `n × k`.
    pub fn words(n: usize, k: usize) -> usize {
        Self::panels(n) * Self::panel_len(k)
    }

    /// [`PackedBf16::words`] for sizes read from outside (a cache file's manifest): `None`
    /// where it overflows.
    pub fn checked_words(n: u64, k: u64) -> Option<u64> {
        n.div_ceil(PANEL as u64)
            .checked_mul(PANEL as u64)?
            .checked_mul(k.div_ceil(2))
    }

    /// Wrap panels filled by [`pack_panels`] (e.g. by several threads); `None` when `data`
    /// does not hold exactly the panels of `n × k`.
    pub fn from_panels(data: Vec<u32>, n: usize, k: usize) -> Option<Self> {
        (data.len() == Self::words(n, k)).then_some(PackedBf16 {
            data: Words::Owned(data),
            n,
            k,
        })
    }

    /// Wrap panels that [`pack_panels`] wrote before and someone else holds (a mapped
    /// cache file); `None` when they are not exactly the panels of `n × k`. Whether they
    /// are the panels of the right weights is the holder's to know.
    pub fn from_shared(data: SharedPanels, n: usize, k: usize) -> Option<Self> {
        let len = (*data).as_ref().len();
        (len == Self::words(n, k)).then_some(PackedBf16 {
            data: Words::Shared(data),
            n,
            k,
        })
    }

    /// All panels' words, in order (what [`pack_panels`] writes).
    pub fn as_words(&self) -> &[u32] {
        match &self.data {
            Words::Owned(v) => v,
            Words::Shared(s) => (**s).as_ref(),
        }
    }

    /// Whether the words are held elsewhere ([`PackedBf16::from_shared`]).
    pub fn is_shared(&self) -> bool {
        matches!(self.data, Words::Shared(_))
    }

    pub fn n(&self) -> usize {
        self.n
    }

    /// Bytes of the panels (padding included).
    pub fn bytes(&self) -> usize {
        self.as_words().len() * 4
    }

    pub fn k(&self) -> usize {
        self.k
    }

    /// Panels `p0..` as stored.
    pub fn panels_from(&self, p0: usize) -> &[u32] {
        &self.as_words()[p0 * Self::panel_len(self.k)..]
    }

    /// `W[j][kk]` widened to f32.
    pub fn weight(&self, j: usize, kk: usize) -> f32 {
        assert!(j < self.n && kk < self.k, "PackedBf16: index out of range");
        let pair =
            self.as_words()[j / PANEL * Self::panel_len(self.k) + kk / 2 * PANEL + j % PANEL];
        f32::from_bits(if kk.is_multiple_of(2) {
            pair << 16
        } else {
            pair & 0xffff_0000
        })
    }

    /// `W[j][start .. start + out.len()]` widened to f32 (an embedding row of a tied table).
    pub fn read_row(&self, j: usize, start: usize, out: &mut [f32]) {
        for (i, o) in out.iter_mut().enumerate() {
            *o = self.weight(j, start + i);
        }
    }
}

/// Panels `p0 ..` of `w` (`n` rows of `k`) into `dst`, which holds a whole number of them.
pub fn pack_panels(w: &[bf16], n: usize, k: usize, p0: usize, dst: &mut [u32]) {
    assert!(w.len() >= n * k, "pack_panels: weights too short");
    let len = PackedBf16::panel_len(k);
    if len == 0 {
        return;
    }
    assert!(
        dst.len().is_multiple_of(len),
        "pack_panels: not whole panels"
    );
    assert!(
        p0 + dst.len() / len <= PackedBf16::panels(n),
        "pack_panels: panels past n"
    );
    let pairs = k.div_ceil(2);
    for (i, panel) in dst.chunks_exact_mut(len).enumerate() {
        let j0 = (p0 + i) * PANEL;
        let lanes = PANEL.min(n - j0);
        // Written in order (a line per pair), read from 16 rows advancing together (writing
        // a lane at a time touched a new line every 4 bytes).
        let rows: [&[bf16]; PANEL] = core::array::from_fn(|l| {
            if l < lanes {
                &w[(j0 + l) * k..(j0 + l + 1) * k]
            } else {
                &[]
            }
        });
        for (q, line) in panel.chunks_exact_mut(PANEL).enumerate().take(pairs) {
            for (lane, out) in line.iter_mut().enumerate() {
                *out = if lane < lanes {
                    let row = rows[lane];
                    let lo = row[2 * q].to_bits() as u32;
                    let hi = row.get(2 * q + 1).map_or(0, |h| h.to_bits() as u32);
                    lo | hi << 16
                } else {
                    0
                };
            }
        }
    }
}

/// A matmul's activation rows prepared once for the panel kernels: groups of 4 rows, k
/// pair-major, `[group][pair][even, odd][4 rows]` (zero past `m` and `k`), so that a k pair
/// of a group's rows is 32 contiguous bytes to broadcast from.
#[derive(Clone, Debug)]
pub struct PanelRows {
    pub(crate) x: Vec<f32>,
    m: usize,
    k: usize,
}

impl PanelRows {
    pub fn new(x: &[f32], m: usize, k: usize) -> Self {
        assert!(x.len() >= m * k, "PanelRows: x too short");
        let pairs = k.div_ceil(2);
        let mut t = vec![0f32; m.div_ceil(4) * pairs * 8];
        for r in 0..m {
            let (g, lane) = (r / 4, r % 4);
            for (kk, &v) in x[r * k..(r + 1) * k].iter().enumerate() {
                t[(g * pairs + kk / 2) * 8 + (kk % 2) * 4 + lane] = v;
            }
        }
        PanelRows { x: t, m, k }
    }

    pub fn rows(&self) -> usize {
        self.m
    }

    pub fn k(&self) -> usize {
        self.k
    }
}

/// The checks of the safe entries: rows of `w.k()`, columns inside the weights, `out` and
/// `bias` long enough. Returns the number of columns.
#[allow(clippy::too_many_arguments)]
fn check_shapes(
    what: &str,
    m: usize,
    k: usize,
    w: &PackedBf16,
    (n0, n1): (usize, usize),
    bias: Option<&[f32]>,
    out: &[f32],
    ldo: usize,
) -> usize {
    assert!(k == w.k, "{what}: rows of {k}, weights of {}", w.k);
    assert!(n0 <= n1 && n1 <= w.n, "{what}: columns outside the weights");
    let width = n1 - n0;
    assert!(ldo >= width, "{what}: ldo < columns");
    assert!(
        m == 0 || width == 0 || out.len() >= (m - 1) * ldo + width,
        "{what}: output too short"
    );
    assert!(
        bias.is_none_or(|b| b.len() >= width),
        "{what}: bias too short"
    );
    width
}

/// Columns `n0..n1` of `x · Wᵀ (+ bias)` for panel weights: `out[i·ldo + c]` is output
/// `n0 + c` of row `i`; `bias` holds the `n1 − n0` biases of those columns. The AVX2 kernel
/// ([`crate::x86::matmul_panels_avx2`]) where `isa` allows it, else a portable loop in the
/// same summation order (without fused multiply-adds).
#[allow(clippy::too_many_arguments)]
pub fn matmul_panels(
    isa: Isa,
    rows: &PanelRows,
    w: &PackedBf16,
    n0: usize,
    n1: usize,
    bias: Option<&[f32]>,
    out: &mut [f32],
    ldo: usize,
) {
    let (m, k) = (rows.m, rows.k);
    let width = check_shapes("matmul_panels", m, k, w, (n0, n1), bias, out, ldo);
    if m == 0 || width == 0 {
        return;
    }
    #[cfg(target_arch = "x86_64")]
    if isa != Isa::Portable {
        // SAFETY: Avx2 and Avx512 both come from cpu::detect_isa, which checked AVX2 and
        // FMA; shapes were checked above.
        return unsafe {
            crate::x86::matmul_panels_avx2(rows, w, n0, n1, bias, out.as_mut_ptr(), ldo)
        };
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = isa;
    let kb = k_block(k);
    let pairs = k.div_ceil(2);
    // Each output's weights widened once, then every row against them.
    let mut wrow = vec![0f32; k];
    for (c, j) in (n0..n1).enumerate() {
        w.read_row(j, 0, &mut wrow);
        for i in 0..m {
            let xg = &rows.x[i / 4 * pairs * 8..];
            let xv = |kk: usize| xg[kk / 2 * 8 + (kk % 2) * 4 + i % 4];
            let mut total = 0f32;
            let mut pc = 0;
            while pc < k {
                let end = (pc + kb).min(k);
                let block = (pc..end).fold(0f32, |s, kk| s + xv(kk) * wrow[kk]);
                total = if pc == 0 { block } else { total + block };
                pc = end;
            }
            out[i * ldo + c] = total + bias.map_or(0.0, |b| b[c]);
        }
    }
}

/// [`matmul_panels`] with the rows prepared here.
#[allow(clippy::too_many_arguments)]
pub fn matmul_packed(
    isa: Isa,
    x: &[f32],
    m: usize,
    k: usize,
    w: &PackedBf16,
    n0: usize,
    n1: usize,
    bias: Option<&[f32]>,
    out: &mut [f32],
    ldo: usize,
) {
    matmul_panels(isa, &PanelRows::new(x, m, k), w, n0, n1, bias, out, ldo)
}

/// [`matmul_packed`] for many rows (prefill, vision): on AVX2 the many-row GEMM reading the
/// panels ([`crate::x86::gemm_avx2_panels`]; `n0` must then be a multiple of [`PANEL`],
/// else this falls back to the panel kernel), elsewhere [`matmul_packed`]. Same bits as
/// [`matmul_packed`] on AVX2, so callers may pick either for any call.
#[allow(clippy::too_many_arguments)]
pub fn matmul_many_rows_packed(
    isa: Isa,
    x: &[f32],
    m: usize,
    k: usize,
    w: &PackedBf16,
    n0: usize,
    n1: usize,
    bias: Option<&[f32]>,
    out: &mut [f32],
    ldo: usize,
) {
    #[cfg(target_arch = "x86_64")]
    if isa == Isa::Avx2 && n0.is_multiple_of(PANEL) {
        assert!(x.len() >= m * k, "matmul_many_rows_packed: x too short");
        check_shapes("matmul_many_rows_packed", m, k, w, (n0, n1), bias, out, ldo);
        // SAFETY: Isa::Avx2 comes from cpu::detect_isa (AVX2, FMA, F16C); shapes checked.
        return unsafe {
            crate::x86::gemm_avx2_panels(
                crate::x86::GemmActs::Rows(x),
                m,
                w,
                n0,
                n1,
                bias,
                out.as_mut_ptr(),
                ldo,
            )
        };
    }
    matmul_packed(isa, x, m, k, w, n0, n1, bias, out, ldo)
}
