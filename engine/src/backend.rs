//! The compute interface model code is written against.
//!
//! Model files (text, vision) only compose these operations; where they run is the
//! backend's business. [`CpuBackend`] runs the `dvl-kernels` fast kernels, optionally split
//! across a private rayon pool (never the global one) along output columns or query rows:
//! every output element is computed by the same code in the same order whatever the split,
//! so results do not depend on the thread count.

use alloc::format;
use alloc::string::String;
use alloc::vec;
use alloc::vec::Vec;

use dvl_kernels::attention::AttnShape;
use dvl_kernels::matmul::matmul;
pub use dvl_kernels::matmul::Isa;

use crate::weights::WData;

/// Key range `[lo, hi)` visible to query row `i`.
pub type KeyRange<'f> = &'f (dyn Fn(usize) -> (usize, usize) + Sync);

/// One of several projections of the same input ([`Backend::matmul_many`]): `out[m, n] =
/// x · Wᵀ + bias`, `W [n, k]` as stored.
pub struct Projection<'a> {
    pub w: WData<'a>,
    pub n: usize,
    pub bias: Option<&'a [f32]>,
    pub out: &'a mut [f32],
}

pub trait Backend: Sync {
    /// `out[m, n] = x[m, k] · Wᵀ + bias`, `W [n, k]` as stored.
    #[allow(clippy::too_many_arguments)]
    fn matmul(
        &self,
        x: &[f32],
        m: usize,
        k: usize,
        w: WData<'_>,
        n: usize,
        bias: Option<&[f32]>,
        out: &mut [f32],
    );

    /// Several projections of the same `x [m, k]` (an attention layer's q, k and v): the
    /// values of one [`Backend::matmul`] each. A backend may prepare `x` once for all of
    /// them and split them as one piece of work.
    fn matmul_many(&self, x: &[f32], m: usize, k: usize, projs: &mut [Projection<'_>]) {
        for p in projs.iter_mut() {
            self.matmul(x, m, k, p.w, p.n, p.bias, p.out);
        }
    }

    /// SwiGLU (spec §7.1; the Qwen2.5-VL vision MLP, §5.1(f)):
    /// `out[m, n] = silu(x · W_gateᵀ + b_gate) ⊙ (x · W_upᵀ + b_up)`, the values of two
    /// [`Backend::matmul`]s and [`Backend::silu_mul`]. A backend may fuse them, so that the
    /// up projection's output never leaves cache.
    #[allow(clippy::too_many_arguments)]
    fn matmul_swiglu(
        &self,
        x: &[f32],
        m: usize,
        k: usize,
        gate: (WData<'_>, Option<&[f32]>),
        up: (WData<'_>, Option<&[f32]>),
        n: usize,
        out: &mut [f32],
    ) {
        swiglu_unfused(self, x, m, k, gate, up, n, out);
    }

    /// Attention of `n_q` query rows over the rows of `k`/`v` (see [`dvl_kernels::attention`]).
    #[allow(clippy::too_many_arguments)]
    fn attention(
        &self,
        q: &[f32],
        n_q: usize,
        k: &[f32],
        v: &[f32],
        out: &mut [f32],
        shape: AttnShape,
        scale: f32,
        keys: KeyRange<'_>,
    );

    /// Run `work` (a forward pass or more: many kernel calls with serial work between
    /// them) where this backend's kernels run, calling it exactly once. The CPU backend
    /// runs it on one of its pool threads while the calling thread waits asleep: with as
    /// many pool threads as cores, serial work on the calling thread shares a core with
    /// the workers that spin between kernels (the tiny model's denoising forward pass:
    /// 0.12 ms alone, 0.42 ms beside two spinning workers).
    fn run(&self, work: &mut (dyn FnMut() + Send)) {
        work()
    }

    /// Greedy unmasking fused with the vocabulary projection: for each of `rows` rows of
    /// `hn [rows, k]`, the arg-max id of `hn · Wᵀ` (`W [n, k]`; lowest id on ties, `never`
    /// excluded) and its softmax probability over all `n` logits (spec §8.6). Backends may
    /// split the vocabulary and never materialise whole logit rows.
    fn logits_argmax(
        &self,
        hn: &[f32],
        rows: usize,
        k: usize,
        w: WData<'_>,
        n: usize,
        never: Option<usize>,
    ) -> Vec<(usize, f32)> {
        let mut logits = vec![0f32; rows * n];
        self.matmul(hn, rows, k, w, n, None, &mut logits);
        logits
            .chunks_exact(n.max(1))
            .map(|z| dvl_kernels::softmax::argmax_confidence(z, never))
            .collect()
    }

    // Element-wise work between the matmuls. The defaults are the scalar references on the
    // calling thread; a backend may split rows across threads or vectorise, but must give
    // the same result for every element.

    /// RMSNorm of each `w.len()`-wide row of `x` into `out` (spec §7.1, §5.1(f)).
    fn rms_norm(&self, x: &[f32], w: &[f32], eps: f32, out: &mut [f32]) {
        dvl_kernels::norm::rms_norm_rows_ref(x, w, eps, out);
    }

    /// LayerNorm with weight and bias of each `w.len()`-wide row of `x` into `out` (SigLIP,
    /// spec §5.2).
    fn layer_norm(&self, x: &[f32], w: &[f32], b: &[f32], eps: f32, out: &mut [f32]) {
        dvl_kernels::norm::layer_norm_rows_ref(x, w, b, eps, out);
    }

    /// Rotate-half RoPE in place on `n_heads` heads of `head_dim` at the start of each of
    /// `rows` rows of `x` (`stride` apart), with per-row tables `cos`, `sin`
    /// `[rows, head_dim]` (spec §7.2, §5.1(b)).
    #[allow(clippy::too_many_arguments)]
    fn rope(
        &self,
        x: &mut [f32],
        rows: usize,
        n_heads: usize,
        head_dim: usize,
        stride: usize,
        cos: &[f32],
        sin: &[f32],
    ) {
        dvl_kernels::rope::rope_rows_ref(x, rows, n_heads, head_dim, stride, cos, sin);
    }

    /// `gate = silu(gate) ⊙ up` (spec §7.1).
    fn silu_mul(&self, gate: &mut [f32], up: &[f32]) {
        dvl_kernels::elementwise::silu_mul(gate, up);
    }

    /// `acc += x` (residual adds).
    fn add_inplace(&self, acc: &mut [f32], x: &[f32]) {
        dvl_kernels::elementwise::add_inplace(acc, x);
    }

    /// Exact GELU in place (Qwen merger, SigLIP projector).
    fn gelu_erf(&self, x: &mut [f32]) {
        dvl_kernels::elementwise::gelu_erf(x);
    }

    /// Tanh-approximated GELU in place (SigLIP MLP).
    fn gelu_tanh(&self, x: &mut [f32]) {
        dvl_kernels::elementwise::gelu_tanh(x);
    }
}

/// [`Backend::matmul_swiglu`] as its definition: two matmuls, then the SiLU product.
#[allow(clippy::too_many_arguments)]
fn swiglu_unfused<B: Backend + ?Sized>(
    be: &B,
    x: &[f32],
    m: usize,
    k: usize,
    gate: (WData<'_>, Option<&[f32]>),
    up: (WData<'_>, Option<&[f32]>),
    n: usize,
    out: &mut [f32],
) {
    let mut u = vec![0f32; m * n];
    be.matmul(x, m, k, gate.0, n, gate.1, out);
    be.matmul(x, m, k, up.0, n, up.1, &mut u);
    be.silu_mul(&mut out[..m * n], &u);
}

/// `work` on the backend's threads ([`Backend::run`]), returning its result.
pub fn on_backend<R: Send>(be: &dyn Backend, work: impl FnOnce() -> R + Send) -> R {
    let mut work = Some(work);
    let mut out = None;
    be.run(&mut || {
        if let Some(w) = work.take() {
            out = Some(w());
        }
    });
    match (out, work) {
        (Some(r), _) => r,
        // A backend whose `run` did not call its work: run it here.
        (None, Some(w)) => w(),
        (None, None) => unreachable!("the work ran but returned nothing"),
    }
}

/// The CPU backend.
pub struct CpuBackend {
    isa: Isa,
    /// The kernels for bf16 weights: f32 activations, or bf16 matmul inputs (see
    /// [`CpuBackend::with_bf16`]) on AMX tiles or with `vdpbf16ps`.
    bf16: Bf16Kernel,
    /// Whether f32 matmuls may run on AMX tiles as three bf16 terms (see
    /// [`CpuBackend::with_f32_on_amx`]).
    f32_on_amx: bool,
    /// Least work (rows × k) for that (see `AMX_F32_MIN_WORK`).
    f32_amx_min_work: usize,
    #[cfg(feature = "std")]
    pool: Option<rayon::ThreadPool>,
    /// The last AMX matmul's packed activations, whose allocation the next one reuses when
    /// large enough (a fresh one per matmul is megabytes of pages to map and fault in during
    /// a prefill). Bf16 and three-term packings share it, so it keeps the largest
    /// allocation since (3B, 1024-row prefill: the down projection's 22 MB; three terms
    /// triple that) until a larger one replaces it.
    #[cfg(all(feature = "std", target_arch = "x86_64"))]
    pack_scratch: std::sync::Mutex<Option<dvl_kernels::amx::PackedActs>>,
    /// The AVX2 GEMM's rows packed once for all pieces of a split (`GemmRows`); kept
    /// between matmuls for the same reason as `pack_scratch`.
    #[cfg(all(feature = "std", target_arch = "x86_64"))]
    gemm_rows_scratch: std::sync::Mutex<Vec<f32>>,
}

impl CpuBackend {
    /// Single-threaded backend with the best ISA this CPU supports. Under std the
    /// environment can override: `DVL_ISA` (`portable`, `avx2`, `avx512`) lowers the ISA,
    /// `DVL_BF16=1` (or the older `DVL_AMX=1`) turns on [`CpuBackend::with_bf16`].
    pub fn single_threaded() -> Self {
        let mut be = CpuBackend {
            isa: dvl_kernels::cpu::detect_isa(),
            bf16: Bf16Kernel::F32,
            f32_on_amx: true,
            f32_amx_min_work: AMX_F32_MIN_WORK,
            #[cfg(feature = "std")]
            pool: None,
            #[cfg(all(feature = "std", target_arch = "x86_64"))]
            pack_scratch: std::sync::Mutex::new(None),
            #[cfg(all(feature = "std", target_arch = "x86_64"))]
            gemm_rows_scratch: std::sync::Mutex::new(Vec::new()),
        };
        be.bf16 = be.f32_kernel();
        #[cfg(feature = "std")]
        {
            if std::env::var("DVL_AMX_F32").is_ok_and(|v| v == "0") {
                be = be.with_f32_on_amx(false);
            }
            if let Ok(v) = std::env::var("DVL_ISA") {
                match parse_isa(&v) {
                    Some(isa) => {
                        be = be.with_isa(isa);
                        if be.isa != isa {
                            log::warn!(
                                "DVL_ISA={v}: this CPU does not support it; {:?} kept",
                                be.isa
                            );
                        }
                    }
                    None => log::warn!("DVL_ISA={v:?} is not portable, avx2 or avx512: ignored"),
                }
            }
            if ["DVL_BF16", "DVL_AMX"]
                .iter()
                .any(|k| std::env::var(k).is_ok_and(|v| v == "1"))
            {
                be = be.with_bf16(true);
            }
            be
        }
        #[cfg(not(feature = "std"))]
        be
    }

    /// Backend on a private pool of `n_threads` (0 = one per available core).
    #[cfg(feature = "std")]
    pub fn with_threads(n_threads: usize) -> crate::Result<Self> {
        if n_threads > 1024 {
            return Err(crate::Error::InvalidArgument(alloc::format!(
                "n_threads {n_threads} is out of range (0 = all cores, at most 1024)"
            )));
        }
        let n = if n_threads == 0 {
            std::thread::available_parallelism().map_or(1, |n| n.get())
        } else {
            n_threads
        };
        let mut be = Self::single_threaded();
        if n > 1 {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(n)
                .thread_name(|i| alloc::format!("dvl-worker-{i}"))
                .build()
                .map_err(|e| {
                    crate::Error::InvalidArgument(alloc::format!("cannot start {n} threads: {e}"))
                })?;
            be.pool = Some(pool);
        }
        Ok(be)
    }

    /// Use `isa` if this CPU supports it (e.g. force AVX2 or portable code to compare).
    pub fn with_isa(mut self, isa: Isa) -> Self {
        if dvl_kernels::cpu::supported_isas().contains(&isa) {
            self.isa = isa;
        }
        if self.isa != Isa::Avx512 {
            // The bf16 and AMX kernels are AVX-512 code.
            self.bf16 = Bf16Kernel::F32;
        } else if !self.bf16() {
            self.bf16 = self.f32_kernel();
        }
        self
    }

    /// The kernel for f32 activations: where AMX is granted, tiles with the activations
    /// split into three bf16 terms (as accurate as f32 FMAs — products exact, f32
    /// accumulation — and faster: at the memory rate in denoising steps, ~1.4-1.8× in
    /// prefill and vision), else f32 FMAs.
    fn f32_kernel(&self) -> Bf16Kernel {
        #[cfg(target_arch = "x86_64")]
        if self.f32_on_amx && self.isa == Isa::Avx512 && dvl_kernels::amx::available() {
            return Bf16Kernel::AmxF32x3;
        }
        Bf16Kernel::F32
    }

    /// Allow (default) or forbid AMX tiles for f32 matmuls (three bf16 terms per
    /// activation, see [`dvl_kernels::amx::split_bf16x3`]); forbidden, f32 matmuls use the
    /// AVX-512/AVX2 FMA kernels. `DVL_AMX_F32=0` forbids it from the environment. No effect
    /// in bf16 mode.
    pub fn with_f32_on_amx(mut self, on: bool) -> Self {
        self.f32_on_amx = on;
        if !self.bf16() {
            self.bf16 = self.f32_kernel();
        }
        self
    }

    /// bf16 matmul inputs: activations are rounded to bf16 (f32 accumulation) for every
    /// matmul against bf16 weights, which moves hidden states by ~1e-3 relative — the
    /// fixtures' "bf16 matmul inputs" numerics, under which every golden trace is unchanged
    /// (the default f32 path matches the float64 references to 1e-7). The matmuls run on
    /// AMX tiles where the CPU and OS grant them, otherwise on AVX512_BF16 dot products;
    /// where neither exists the f32 kernels stay. [`CpuBackend::bf16`] tells what is in use.
    pub fn with_bf16(mut self, on: bool) -> Self {
        #[cfg(target_arch = "x86_64")]
        {
            self.bf16 = if !on || self.isa != Isa::Avx512 {
                self.f32_kernel()
            } else if dvl_kernels::amx::available() {
                Bf16Kernel::Amx
            } else if dvl_kernels::cpu::has_avx512_bf16() {
                Bf16Kernel::Dot
            } else {
                Bf16Kernel::F32
            };
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            let _ = on;
        }
        self
    }

    /// The earlier name of [`CpuBackend::with_bf16`].
    pub fn with_amx(self, on: bool) -> Self {
        self.with_bf16(on)
    }

    /// Whether AMX tiles are in use (bf16 mode, or f32 as three bf16 terms).
    pub fn amx(&self) -> bool {
        matches!(self.bf16, Bf16Kernel::Amx | Bf16Kernel::AmxF32x3)
    }

    /// Whether any matmul runs with bf16-rounded inputs.
    pub fn bf16(&self) -> bool {
        matches!(self.bf16, Bf16Kernel::Amx | Bf16Kernel::Dot)
    }

    /// Kernel set in words: `Avx512`, `Avx512+AMX(f32x3)` (f32 on tiles), `Avx512+AMX` or
    /// `Avx512+BF16` (bf16 inputs).
    pub fn describe(&self) -> String {
        let suffix = match self.bf16 {
            Bf16Kernel::F32 => "",
            Bf16Kernel::AmxF32x3 => "+AMX(f32x3)",
            Bf16Kernel::Amx => "+AMX",
            Bf16Kernel::Dot => "+BF16",
        };
        format!("{:?}{suffix}", self.isa)
    }

    pub fn isa(&self) -> Isa {
        self.isa
    }

    pub fn threads(&self) -> usize {
        #[cfg(feature = "std")]
        if let Some(p) = &self.pool {
            return p.current_num_threads();
        }
        1
    }
}

/// Matmuls smaller than this (multiply-adds) run on the calling thread: waking the pool
/// costs tens of microseconds, more than a few hundred thousand multiply-adds take (the
/// tiny model's layers are 8 × 64 × 160).
#[cfg(feature = "std")]
const PAR_MIN_MACS: usize = 1 << 20;

/// Element-wise work on fewer elements than this stays on the calling thread: with vector
/// code a 64k-element pass takes ~10–30 µs, about what waking the pool costs. Denoising
/// steps of the small models (8 rows) stay single-threaded; prefill and vision rows split.
#[cfg(feature = "std")]
const PAR_MIN_ELEMS: usize = 1 << 16;

/// The kernel family for bf16 weights, decided per backend.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Bf16Kernel {
    /// f32 activations, weights widened in registers (exact to f32 rounding).
    F32,
    /// bf16-rounded activations on AMX tiles.
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    Amx,
    /// bf16-rounded activations with `vdpbf16ps`.
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    Dot,
    /// f32 activations split into three bf16 terms on AMX tiles (f32-accurate; the
    /// default f32 kernels where AMX is granted, see `kernel_for`). A denoising step is
    /// memory-bound, and three tile products per weight tile cost little there, while the
    /// FMA kernels run out of issue slots near the DRAM rate. Prefill and vision are
    /// compute-bound, and even three tile passes beat the FMA kernels (0.5B shape, 2
    /// threads, FMA → tiles, `dvl bench` alternating: prefill 288 1.58/1.83 → 1.00/1.03 s,
    /// prefill 1024 6.6 → 4.6 s, vision 448² 10.8/10.1 → 6.8/7.1 s).
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    AmxF32x3,
}

/// Least rows × k for [`Bf16Kernel::AmxF32x3`]. A weight tile costs the tiles about the
/// same whatever the rows (up to 5, or 10 in two row blocks), the FMA kernels in proportion
/// to rows × k: the tiny model's k = 64 vocabulary projection written out as logits ran
/// 1.4× slower on tiles for one row, 1.2× faster for four and 2× for eight. (The fused
/// unmasking pass of `logits_argmax` takes tiles for any rows: it has no logits to write.)
const AMX_F32_MIN_WORK: usize = 256;

impl CpuBackend {
    /// The kernel for a matmul of `m` rows of `k`.
    fn kernel_for(&self, m: usize, k: usize) -> Bf16Kernel {
        match self.bf16 {
            Bf16Kernel::AmxF32x3 if m * k < self.f32_amx_min_work => Bf16Kernel::F32,
            kernel => kernel,
        }
    }

    /// Lower the least work (rows × k) that takes f32 matmuls to AMX tiles (default 256):
    /// 0 lets tests run every step's matmuls on that path.
    #[doc(hidden)]
    pub fn with_f32_amx_min_work(mut self, work: usize) -> Self {
        self.f32_amx_min_work = work;
        self
    }
}

/// Columns `n0..n1` of `x · Wᵀ`, with the kernel chosen per backend (never per split, so
/// thread splits never change which kernel a row gets).
#[allow(clippy::too_many_arguments)]
fn matmul_any(
    isa: Isa,
    bf16: Bf16Kernel,
    x: &[f32],
    m: usize,
    k: usize,
    w: WData<'_>,
    n0: usize,
    n1: usize,
    bias: Option<&[f32]>,
    out: &mut [f32],
    ldo: usize,
) {
    let b = bias.map(|b| &b[n0..n1]);
    match w {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `Dot` is only chosen after cpu::has_avx512_bf16(); shapes are checked by
        // callers (and asserted by the kernel).
        WData::BF16(s) if bf16 == Bf16Kernel::Dot => unsafe {
            dvl_kernels::dpbf16::matmul_dpbf16(x, m, k, &s[n0 * k..n1 * k], n1 - n0, b, out, ldo)
        },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `Amx` is only chosen after amx::available(); shapes as above.
        WData::BF16(s) if bf16 == Bf16Kernel::Amx => unsafe {
            dvl_kernels::amx::matmul_amx_bf16(x, m, k, &s[n0 * k..n1 * k], n1 - n0, b, out, ldo)
        },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `AmxF32x3` is only chosen after amx::available(); shapes as above.
        WData::BF16(s) if bf16 == Bf16Kernel::AmxF32x3 => unsafe {
            dvl_kernels::amx::matmul_amx_f32x3(x, m, k, &s[n0 * k..n1 * k], n1 - n0, b, out, ldo)
        },
        WData::BF16(s) => matmul(isa, x, m, k, &s[n0 * k..n1 * k], n1 - n0, b, out, ldo),
        WData::F16(s) => matmul(isa, x, m, k, &s[n0 * k..n1 * k], n1 - n0, b, out, ldo),
        WData::F32(s) => matmul(isa, x, m, k, &s[n0 * k..n1 * k], n1 - n0, b, out, ldo),
        // Panels are read by the f32 FMA kernels whatever the bf16 mode.
        WData::Packed(p) => {
            dvl_kernels::packed::matmul_packed(isa, x, m, k, p, n0, n1, b, out, ldo)
        }
    }
}

/// A piece's `rows` × width values (`piece`, row-major) into columns `n0..` of `out`, whose
/// rows are `n` apart (the pieces of a split by outputs are computed into their own buffers).
#[cfg_attr(not(feature = "std"), allow(dead_code))]
fn put_columns(out: &mut [f32], n: usize, n0: usize, piece: &[f32], rows: usize) {
    let width = piece.len() / rows.max(1);
    for (i, src) in piece.chunks_exact(width.max(1)).take(rows).enumerate() {
        out[i * n + n0..i * n + n0 + width].copy_from_slice(src);
    }
}

/// Columns `n0..n1` of `x · Wᵀ` into `out` (rows `n1 − n0` apart), from rows `prepared` where
/// the caller prepared them ([`CpuBackend::prepared_rows`]), else as [`matmul_any`].
#[allow(clippy::too_many_arguments)]
fn matmul_prepared(
    prepared: Option<&PreparedRows>,
    (isa, bf16): (Isa, Bf16Kernel),
    x: &[f32],
    m: usize,
    k: usize,
    w: WData<'_>,
    (n0, n1): (usize, usize),
    bias: Option<&[f32]>,
    out: &mut [f32],
) {
    match (prepared, w) {
        (Some(PreparedRows::Paired(p)), WData::BF16(s)) => dvl_kernels::matmul::matmul_bf16_paired(
            p,
            &s[n0 * k..n1 * k],
            n1 - n0,
            bias.map(|b| &b[n0..n1]),
            out,
            n1 - n0,
        ),
        (Some(PreparedRows::Panels(r)), WData::Packed(p)) => dvl_kernels::packed::matmul_panels(
            isa,
            r,
            p,
            n0,
            n1,
            bias.map(|b| &b[n0..n1]),
            out,
            n1 - n0,
        ),
        _ => matmul_any(isa, bf16, x, m, k, w, n0, n1, bias, out, n1 - n0),
    }
}

/// A matmul's rows prepared once for the pieces of a split: paired for the bf16 FMA
/// kernels on weights as stored, or in groups for panel weights.
enum PreparedRows {
    Paired(dvl_kernels::matmul::PairedRows),
    Panels(dvl_kernels::packed::PanelRows),
}

impl CpuBackend {
    /// The rows of `x` prepared once for the f32-activation bf16 kernels, where a matmul's
    /// pieces would each prepare them ([`dvl_kernels::matmul::PairedRows`],
    /// [`dvl_kernels::packed::PanelRows`]); `None` for other kernels and weight types.
    fn prepared_rows(
        &self,
        bf16: Bf16Kernel,
        x: &[f32],
        m: usize,
        k: usize,
        w: WData<'_>,
    ) -> Option<PreparedRows> {
        match (bf16, w) {
            (_, WData::Packed(_)) => Some(PreparedRows::Panels(
                dvl_kernels::packed::PanelRows::new(x, m, k),
            )),
            (Bf16Kernel::F32, WData::BF16(_)) => {
                dvl_kernels::matmul::PairedRows::new(self.isa, x, m, k).map(PreparedRows::Paired)
            }
            _ => None,
        }
    }
}

/// Column pieces of few-row splits are multiples of this: panel weights are computed a whole
/// 16-output panel at a time (a piece ending inside one would compute it again).
#[cfg(feature = "std")]
const COLUMN_PIECE: usize = dvl_kernels::packed::PANEL;

/// Few-row matmuls of one input on the FMA kernels, as one pool region each: a denoising
/// step's q/k/v and SwiGLU were five regions (k and v, 8 × 896 × 128 for 0.5B, too small to
/// split on their own, ran on one thread while the other waited) plus a one-thread SiLU
/// product; now they are two. Every output element goes through the same kernel as in
/// [`Backend::matmul`] (the pieces are column ranges), so the bits are those of the
/// definitions.
#[cfg(feature = "std")]
impl CpuBackend {
    /// Whether `m` rows of `k` against `n` outputs in all take the pooled few-row path.
    fn few_rows_pooled(&self, m: usize, k: usize, n: usize) -> Option<&rayon::ThreadPool> {
        let bf16 = self.kernel_for(m, k);
        let pool = self.pool.as_ref()?;
        (bf16 == Bf16Kernel::F32
            && !self.many_rows_gemm(bf16, m)
            && m > 0
            && n >= 64
            && m * n * k >= PAR_MIN_MACS)
            .then_some(pool)
    }

    /// [`Backend::matmul_many`] for few rows: the projections' weight rows, end to end, in
    /// pieces across the pool; the rows prepared once for all. False where it does not
    /// apply (nothing done).
    fn few_rows_many(&self, x: &[f32], m: usize, k: usize, projs: &mut [Projection<'_>]) -> bool {
        use rayon::prelude::*;
        let total: usize = projs.iter().map(|p| p.n).sum();
        let Some(pool) = self.few_rows_pooled(m, k, total) else {
            return false;
        };
        let (isa, bf16) = (self.isa, self.kernel_for(m, k));
        let prepared = projs
            .iter()
            .find_map(|p| self.prepared_rows(bf16, x, m, k, p.w));
        let specs: Vec<(WData<'_>, usize, Option<&[f32]>)> =
            projs.iter().map(|p| (p.w, p.n, p.bias)).collect();
        let chunk = total
            .div_ceil(pool.current_num_threads() * 4)
            .next_multiple_of(COLUMN_PIECE);
        // (projection, first column, m × width values) per piece and projection it touches.
        let pieces: Vec<Vec<(usize, usize, Vec<f32>)>> = pool.install(|| {
            (0..total.div_ceil(chunk))
                .into_par_iter()
                .map(|c| {
                    let (g0, g1) = (c * chunk, ((c + 1) * chunk).min(total));
                    let mut parts = Vec::new();
                    let mut start = 0;
                    for (pi, &(w, n, bias)) in specs.iter().enumerate() {
                        let (n0, n1) = (
                            g0.max(start) - start,
                            g1.min(start + n).saturating_sub(start),
                        );
                        if n0 < n1 {
                            let mut buf = vec![0f32; m * (n1 - n0)];
                            let mode = (isa, bf16);
                            matmul_prepared(
                                prepared.as_ref(),
                                mode,
                                x,
                                m,
                                k,
                                w,
                                (n0, n1),
                                bias,
                                &mut buf,
                            );
                            parts.push((pi, n0, buf));
                        }
                        start += n;
                    }
                    parts
                })
                .collect()
        });
        for (pi, n0, buf) in pieces.into_iter().flatten() {
            let n = projs[pi].n;
            put_columns(projs[pi].out, n, n0, &buf, m);
        }
        true
    }

    /// [`Backend::matmul_swiglu`] for few rows: each piece of columns computes its gate and
    /// up values and their SiLU product while they are in cache. False where it does not
    /// apply (nothing done).
    #[allow(clippy::too_many_arguments)]
    fn few_rows_swiglu(
        &self,
        x: &[f32],
        m: usize,
        k: usize,
        gate: (WData<'_>, Option<&[f32]>),
        up: (WData<'_>, Option<&[f32]>),
        n: usize,
        out: &mut [f32],
    ) -> bool {
        use rayon::prelude::*;
        let Some(pool) = self.few_rows_pooled(m, k, 2 * n) else {
            return false;
        };
        let (isa, bf16) = (self.isa, self.kernel_for(m, k));
        let prepared = self
            .prepared_rows(bf16, x, m, k, gate.0)
            .or_else(|| self.prepared_rows(bf16, x, m, k, up.0));
        let chunk = n
            .div_ceil(pool.current_num_threads() * 4)
            .next_multiple_of(COLUMN_PIECE);
        let pieces: Vec<(usize, Vec<f32>)> = pool.install(|| {
            (0..n.div_ceil(chunk))
                .into_par_iter()
                .map(|c| {
                    let cols = (c * chunk, ((c + 1) * chunk).min(n));
                    let width = cols.1 - cols.0;
                    let (mut g, mut u) = (vec![0f32; m * width], vec![0f32; m * width]);
                    let p = prepared.as_ref();
                    matmul_prepared(p, (isa, bf16), x, m, k, gate.0, cols, gate.1, &mut g);
                    matmul_prepared(p, (isa, bf16), x, m, k, up.0, cols, up.1, &mut u);
                    dvl_kernels::elementwise::silu_mul_isa(isa, &mut g, &u);
                    (cols.0, g)
                })
                .collect()
        });
        for (n0, g) in pieces {
            put_columns(out, n, n0, &g, m);
        }
        true
    }
}

/// An output pointer shared by threads that write disjoint columns.
#[cfg(target_arch = "x86_64")]
#[derive(Clone, Copy)]
struct SharedOut(*mut f32);
// SAFETY: only used for writes to disjoint elements, joined before the borrow ends.
#[cfg(target_arch = "x86_64")]
unsafe impl Send for SharedOut {}
#[cfg(target_arch = "x86_64")]
unsafe impl Sync for SharedOut {}

#[cfg(target_arch = "x86_64")]
impl SharedOut {
    /// A method, so closures capture the whole (Sync) wrapper rather than its pointer field.
    fn get(self) -> *mut f32 {
        self.0
    }
}

#[cfg(target_arch = "x86_64")]
impl CpuBackend {
    /// AMX matmuls of one input (one projection, or several: [`Backend::matmul_many`]): the
    /// activations are packed once for all of them, then their weight rows, taken end to
    /// end, are split into one range per thread (whole 32-row weight pairs), so the weights
    /// stream from memory once in all and every output element goes through the same tile
    /// arithmetic whatever the thread count. `kernel` (`Amx` or `AmxF32x3`) is the caller's
    /// choice for this shape; every projection's weights are bf16.
    fn matmul_many_amx(
        &self,
        kernel: Bf16Kernel,
        x: &[f32],
        m: usize,
        k: usize,
        projs: &mut [Projection<'_>],
    ) {
        assert!(
            x.len() >= m * k,
            "matmul: x holds fewer than {m} rows of {k}"
        );
        // (weights, rows, bias, output) per projection, checked before any thread starts.
        type Job<'a> = (&'a [dvl_kernels::bf16], usize, Option<&'a [f32]>, SharedOut);
        let jobs: Vec<Job<'_>> = projs
            .iter_mut()
            .map(|p| {
                let WData::BF16(w) = p.w else {
                    unreachable!("matmul_many_amx takes bf16 weights")
                };
                assert!(w.len() >= p.n * k && p.out.len() >= m * p.n);
                assert!(p.bias.is_none_or(|b| b.len() >= p.n));
                (w, p.n, p.bias, SharedOut(p.out.as_mut_ptr()))
            })
            .collect();
        let total: usize = jobs.iter().map(|j| j.1).sum();
        if m == 0 || total == 0 {
            return;
        }
        // f32 mode: three bf16 terms per activation, summed by the kernel.
        let packed = self.pack_rows(x, m, k, kernel == Bf16Kernel::AmxF32x3);
        let piece = total.div_ceil(self.threads()).next_multiple_of(32);
        self.for_pieces(total.div_ceil(piece), |p| {
            // This thread's weight rows g0..g1 of all projections end to end.
            let (g0, g1) = (p * piece, ((p + 1) * piece).min(total));
            let mut start = 0;
            for &(w, n, bias, out) in &jobs {
                let (n0, n1) = (
                    g0.saturating_sub(start).min(n),
                    g1.saturating_sub(start).min(n),
                );
                start += n;
                if n0 < n1 {
                    // SAFETY: AMX was granted (the kernel was chosen after amx::available());
                    // w holds rows n0..n1, out holds m rows of n and this call alone writes
                    // its columns n0..n1.
                    unsafe {
                        dvl_kernels::amx::matmul_amx_bf16_packed(
                            &packed,
                            &w[n0 * k..n1 * k],
                            n1 - n0,
                            bias.map(|b| &b[n0..n1]),
                            out.get().add(n0),
                            n,
                        )
                    }
                }
            }
        });
        self.keep_packing(packed);
    }

    /// [`Backend::matmul_swiglu`] on AMX tiles: the activations packed once for both
    /// projections; each thread takes one range of output columns and runs it in pieces
    /// whose gate and up outputs (1 MiB together) are still in L2 when the SiLU product
    /// reads them; the up outputs go to a per-thread buffer. Pieces keep at least 256
    /// columns: every kernel call streams the packed activations past its weight blocks,
    /// and with 1024 rows (vision) 128-column pieces did that often enough to run ~3%
    /// slower than the unfused pass (in-process A/B, 2 threads).
    #[allow(clippy::too_many_arguments)]
    fn matmul_swiglu_amx(
        &self,
        kernel: Bf16Kernel,
        x: &[f32],
        m: usize,
        k: usize,
        gate: (&[dvl_kernels::bf16], Option<&[f32]>),
        up: (&[dvl_kernels::bf16], Option<&[f32]>),
        n: usize,
        out: &mut [f32],
    ) {
        assert!(
            x.len() >= m * k,
            "matmul: x holds fewer than {m} rows of {k}"
        );
        for (w, b) in [gate, up] {
            assert!(w.len() >= n * k && b.is_none_or(|b| b.len() >= n));
        }
        assert!(out.len() >= m * n);
        if m == 0 || n == 0 {
            return;
        }
        let packed = self.pack_rows(x, m, k, kernel == Bf16Kernel::AmxF32x3);
        let (dst, isa) = (SharedOut(out.as_mut_ptr()), self.isa);
        let piece = n.div_ceil(self.threads()).next_multiple_of(32);
        let sub = ((1usize << 20) / (8 * m)).max(256) / 32 * 32;
        self.for_pieces(n.div_ceil(piece), |p| {
            let (n0, n1) = (p * piece, ((p + 1) * piece).min(n));
            let mut u = vec![0f32; m * sub.min(n1 - n0)];
            let mut a = n0;
            while a < n1 {
                let b = (a + sub).min(n1);
                let wd = b - a;
                // SAFETY: AMX was granted (as in matmul_many_amx); both weights hold rows
                // a..b, out holds m rows of n of which this call alone writes columns a..b,
                // and u holds m rows of wd.
                unsafe {
                    dvl_kernels::amx::matmul_amx_bf16_packed(
                        &packed,
                        &gate.0[a * k..b * k],
                        wd,
                        gate.1.map(|v| &v[a..b]),
                        dst.get().add(a),
                        n,
                    );
                    dvl_kernels::amx::matmul_amx_bf16_packed(
                        &packed,
                        &up.0[a * k..b * k],
                        wd,
                        up.1.map(|v| &v[a..b]),
                        u.as_mut_ptr(),
                        wd,
                    );
                }
                for i in 0..m {
                    // SAFETY: columns a..b of row i are this call's alone (see above).
                    let g =
                        unsafe { core::slice::from_raw_parts_mut(dst.get().add(i * n + a), wd) };
                    dvl_kernels::elementwise::silu_mul_isa(isa, g, &u[i * wd..(i + 1) * wd]);
                }
                a = b;
            }
        });
        self.keep_packing(packed);
    }

    /// Keep a packing's allocation for the next matmul (see `pack_scratch`).
    fn keep_packing(&self, packed: dvl_kernels::amx::PackedActs) {
        #[cfg(feature = "std")]
        if let Ok(mut scratch) = self.pack_scratch.lock() {
            *scratch = Some(packed);
        }
        #[cfg(not(feature = "std"))]
        drop(packed);
    }

    /// Activations packed for the tiles (as three bf16 terms each when `f32x3`), in
    /// row-block pieces across the pool (the packing is a pass over x at memory speed:
    /// single-threaded it was ~15% of a 3B prefill matmul's time on two threads), into the
    /// previous matmul's storage when it is large enough. Same bits whatever the split.
    fn pack_rows(
        &self,
        x: &[f32],
        m: usize,
        k: usize,
        f32x3: bool,
    ) -> dvl_kernels::amx::PackedActs {
        use dvl_kernels::amx::{pack_row_blocks, pack_row_blocks_f32x3, PackedActs};
        #[cfg(feature = "std")]
        let reuse = self.pack_scratch.lock().ok().and_then(|mut s| s.take());
        #[cfg(not(feature = "std"))]
        let reuse = None;
        let mut packed = if f32x3 {
            PackedActs::storage_f32x3(m, k, reuse)
        } else {
            PackedActs::storage(m, k, reuse)
        };
        let pack = |mb0: usize, dst: &mut [u16]| {
            if f32x3 {
                pack_row_blocks_f32x3(x, m, k, mb0, dst)
            } else {
                pack_row_blocks(x, m, k, mb0, dst)
            }
        };
        let packed_rows = m * if f32x3 { 3 } else { 1 };
        let blocks = packed_rows.div_ceil(16).div_ceil(self.threads());
        let pieces = packed.row_block_pieces(blocks);
        #[cfg(feature = "std")]
        if let (Some(pool), true) = (
            &self.pool,
            pieces.len() > 1 && packed_rows * k >= PAR_MIN_ELEMS,
        ) {
            use rayon::prelude::*;
            pool.install(|| pieces.into_par_iter().for_each(|(mb0, dst)| pack(mb0, dst)));
            return packed;
        }
        for (mb0, dst) in pieces {
            pack(mb0, dst);
        }
        packed
    }
}

impl CpuBackend {
    /// `run(p)` for every piece `p < pieces`, on the pool when there is one and more than one
    /// piece.
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    fn for_pieces(&self, pieces: usize, run: impl Fn(usize) + Sync + Send) {
        #[cfg(feature = "std")]
        if let (Some(pool), true) = (&self.pool, pieces > 1) {
            use rayon::prelude::*;
            pool.install(|| (0..pieces).into_par_iter().for_each(run));
            return;
        }
        (0..pieces).for_each(run);
    }

    /// `f(first_row, n_rows, piece)` over pieces of `out` holding whole rows (`row` elements
    /// apart; the last piece is whatever remains of `out`), `align` rows or a multiple of
    /// it per piece: on the pool when `rows · row` reaches [`PAR_MIN_ELEMS`], else once on
    /// this thread. Pieces are disjoint and every row is computed by the same code whatever
    /// the split, so results do not depend on the thread count.
    fn for_rows(
        &self,
        out: &mut [f32],
        rows: usize,
        row: usize,
        align: usize,
        f: impl Fn(usize, usize, &mut [f32]) + Sync,
    ) {
        if rows == 0 {
            return;
        }
        #[cfg(feature = "std")]
        if let Some(pool) = &self.pool {
            if rows * row >= PAR_MIN_ELEMS && rows > align && row > 0 {
                use rayon::prelude::*;
                let per = rows
                    .div_ceil(pool.current_num_threads() * 4)
                    .next_multiple_of(align);
                pool.install(|| {
                    out.par_chunks_mut(per * row)
                        .enumerate()
                        .for_each(|(c, piece)| {
                            let r0 = c * per;
                            if r0 < rows {
                                f(r0, per.min(rows - r0), piece);
                            }
                        })
                });
                return;
            }
        }
        #[cfg(not(feature = "std"))]
        let _ = (row, align);
        f(0, rows, out);
    }
}

/// Outputs per piece of a [`CpuBackend::matmul_many_rows`] split: whole 16-output panels,
/// at least 64 (each piece reads all the activations), about four pieces per thread.
#[cfg(all(feature = "std", target_arch = "x86_64"))]
fn many_rows_piece(n: usize, threads: usize) -> usize {
    n.div_ceil(threads * 4).max(64).next_multiple_of(16)
}

impl CpuBackend {
    /// Whether a matmul of `m` rows with kernel `bf16` takes the packed many-row GEMM
    /// ([`dvl_kernels::matmul::matmul_many_rows`]): f32 activations on AVX2, at least
    /// [`dvl_kernels::matmul::MANY_ROWS`] rows. Decided on the whole call, so a row's
    /// arithmetic never depends on the thread split.
    fn many_rows_gemm(&self, bf16: Bf16Kernel, m: usize) -> bool {
        cfg!(target_arch = "x86_64")
            && bf16 == Bf16Kernel::F32
            && self.isa == Isa::Avx2
            && m >= dvl_kernels::matmul::MANY_ROWS
    }
}

/// A matmul's rows for the AVX2 GEMM ([`CpuBackend::matmul_many_rows`]): as they are, or
/// packed once ([`dvl_kernels::x86::pack_gemm_rows`]) where the outputs split into pieces
/// that would each pack them again (every piece reads all the rows).
#[cfg(target_arch = "x86_64")]
enum GemmRows<'a> {
    Plain(&'a [f32]),
    // Without std there is no pool, so nothing splits.
    #[cfg_attr(not(feature = "std"), allow(dead_code))]
    Packed(Vec<f32>),
}

#[cfg(target_arch = "x86_64")]
impl CpuBackend {
    /// Outputs per piece where `m × k` rows against `n` outputs split across the pool
    /// (whole panels, see [`many_rows_piece`]), `None` where they run as one piece.
    fn many_rows_split(&self, m: usize, k: usize, n: usize) -> Option<usize> {
        #[cfg(feature = "std")]
        if let Some(pool) = &self.pool {
            let per = many_rows_piece(n, pool.current_num_threads());
            if m * n * k >= PAR_MIN_MACS && n > per {
                return Some(per);
            }
        }
        let _ = (m, k, n);
        None
    }

    /// `x` ready for matmuls against outputs `ns`: packed once (in the kept scratch) when any
    /// of them splits into pieces.
    fn gemm_rows<'a>(&self, x: &'a [f32], m: usize, k: usize, ns: &[usize]) -> GemmRows<'a> {
        #[cfg(feature = "std")]
        if ns.iter().any(|&n| self.many_rows_split(m, k, n).is_some()) {
            let mut rows = self
                .gemm_rows_scratch
                .lock()
                .map(|mut s| std::mem::take(&mut *s))
                .unwrap_or_default();
            // Grown, never shrunk: the packing overwrites what it uses, and a regrown tail
            // would be zeroed again for nothing.
            let len = dvl_kernels::x86::gemm_rows_len(m, k);
            if rows.len() < len {
                rows.resize(len, 0.0);
            }
            dvl_kernels::x86::pack_gemm_rows(x, m, k, &mut rows[..len]);
            return GemmRows::Packed(rows);
        }
        let _ = (m, k, ns);
        GemmRows::Plain(x)
    }

    /// Give a packing's allocation back for the next matmul.
    fn keep_gemm_rows(&self, rows: GemmRows<'_>) {
        #[cfg(feature = "std")]
        if let GemmRows::Packed(v) = rows {
            if let Ok(mut s) = self.gemm_rows_scratch.lock() {
                *s = v;
            }
        }
        #[cfg(not(feature = "std"))]
        drop(rows);
    }

    /// Many rows on the packed AVX2 GEMM, the outputs split into whole-panel column ranges,
    /// one per pool task: each range's weights are widened and packed once, by one thread.
    #[allow(clippy::too_many_arguments)]
    fn matmul_many_rows(
        &self,
        x: &[f32],
        m: usize,
        k: usize,
        w: WData<'_>,
        n: usize,
        bias: Option<&[f32]>,
        out: &mut [f32],
    ) {
        let rows = self.gemm_rows(x, m, k, &[n]);
        self.matmul_many_rows_of(&rows, m, k, w, n, bias, out);
        self.keep_gemm_rows(rows);
    }

    /// [`CpuBackend::matmul_many_rows`] on rows already prepared.
    #[allow(clippy::too_many_arguments)]
    fn matmul_many_rows_of(
        &self,
        rows: &GemmRows<'_>,
        m: usize,
        k: usize,
        w: WData<'_>,
        n: usize,
        bias: Option<&[f32]>,
        out: &mut [f32],
    ) {
        use dvl_kernels::x86::{gemm_avx2, gemm_avx2_panels, GemmActs};
        assert!(self.isa == Isa::Avx2, "matmul_many_rows: AVX2 only");
        assert!(out.len() >= m * n, "matmul: output too short");
        assert!(bias.is_none_or(|b| b.len() >= n), "matmul: bias too short");
        let acts = match rows {
            GemmRows::Plain(x) => GemmActs::Rows(x),
            GemmRows::Packed(r) => GemmActs::Packed(r),
        };
        let shared = SharedOut(out.as_mut_ptr());
        // SAFETY (every arm): the ISA is AVX2 (asserted above; it comes from
        // cpu::detect_isa); the kernel asserts its operands and writes only columns n0..n1
        // of rows 0..m, inside `out` (asserted above), which no other piece writes.
        let columns = |n0: usize, n1: usize| unsafe {
            let (b, o) = (bias.map(|b| &b[n0..n1]), shared.get().add(n0));
            match w {
                WData::BF16(s) => gemm_avx2(acts, m, k, &s[n0 * k..n1 * k], n1 - n0, b, o, n),
                WData::F16(s) => gemm_avx2(acts, m, k, &s[n0 * k..n1 * k], n1 - n0, b, o, n),
                WData::F32(s) => gemm_avx2(acts, m, k, &s[n0 * k..n1 * k], n1 - n0, b, o, n),
                // Pieces are whole panels (many_rows_piece), so n0 is on a panel boundary.
                WData::Packed(p) => gemm_avx2_panels(acts, m, p, n0, n1, b, o, n),
            }
        };
        if let Some(per) = self.many_rows_split(m, k, n) {
            // for_pieces joins before `out`'s borrow ends.
            self.for_pieces(n.div_ceil(per), |p| {
                columns(p * per, ((p + 1) * per).min(n))
            });
            return;
        }
        columns(0, n);
    }
}

/// The ISA a backend made now runs: the best this CPU supports, lowered by `DVL_ISA` where
/// that names one the CPU supports (the backend warns about any other value). The weight
/// layout is chosen for it too (`Engine::open`: panels where it is AVX2).
pub fn default_isa() -> Isa {
    let best = dvl_kernels::cpu::detect_isa();
    #[cfg(feature = "std")]
    if let Some(isa) = std::env::var("DVL_ISA").ok().as_deref().and_then(parse_isa) {
        if dvl_kernels::cpu::supported_isas().contains(&isa) {
            return isa;
        }
    }
    best
}

/// `portable`, `avx2` or `avx512`.
pub fn parse_isa(name: &str) -> Option<Isa> {
    match name {
        "portable" => Some(Isa::Portable),
        "avx2" => Some(Isa::Avx2),
        "avx512" => Some(Isa::Avx512),
        _ => None,
    }
}

impl Backend for CpuBackend {
    fn matmul(
        &self,
        x: &[f32],
        m: usize,
        k: usize,
        w: WData<'_>,
        n: usize,
        bias: Option<&[f32]>,
        out: &mut [f32],
    ) {
        // Decided on the whole matmul's row count, never per thread split.
        let bf16 = self.kernel_for(m, k);
        #[cfg(target_arch = "x86_64")]
        if let (Bf16Kernel::Amx | Bf16Kernel::AmxF32x3, WData::BF16(_)) = (bf16, w) {
            self.matmul_many_amx(bf16, x, m, k, &mut [Projection { w, n, bias, out }]);
            return;
        }
        #[cfg(target_arch = "x86_64")]
        if self.many_rows_gemm(bf16, m) {
            self.matmul_many_rows(x, m, k, w, n, bias, out);
            return;
        }
        #[cfg(feature = "std")]
        if let Some(pool) = &self.pool {
            use rayon::prelude::*;
            let threads = pool.current_num_threads();
            let isa = self.isa;
            if m * n * k >= PAR_MIN_MACS && m >= 16 * threads {
                // Many rows (prefill, vision): split rows; each thread's outputs are contiguous.
                let per = m.div_ceil(threads * 4).next_multiple_of(4);
                pool.install(|| {
                    out[..m * n]
                        .par_chunks_mut(per * n)
                        .enumerate()
                        .for_each(|(c, o)| {
                            let rows = o.len() / n;
                            let xs = &x[c * per * k..(c * per + rows) * k];
                            matmul_any(isa, bf16, xs, rows, k, w, 0, n, bias, o, n);
                        })
                });
                return;
            }
            if m * n * k >= PAR_MIN_MACS && n >= 64 {
                // Few rows (denoising step): split weight rows so each thread streams its
                // share of the weights once. The rows are prepared for the kernel once, not
                // per piece (an 8 × 4864 down projection spent ~15% of its time on that).
                let chunk = n.div_ceil(threads * 4).next_multiple_of(COLUMN_PIECE);
                let prepared = self.prepared_rows(bf16, x, m, k, w);
                let pieces: Vec<(usize, Vec<f32>)> = pool.install(|| {
                    (0..n.div_ceil(chunk))
                        .into_par_iter()
                        .map(|p| {
                            let (n0, n1) = (p * chunk, ((p + 1) * chunk).min(n));
                            let mut buf = vec![0f32; m * (n1 - n0)];
                            matmul_prepared(
                                prepared.as_ref(),
                                (isa, bf16),
                                x,
                                m,
                                k,
                                w,
                                (n0, n1),
                                bias,
                                &mut buf,
                            );
                            (n0, buf)
                        })
                        .collect()
                });
                for (n0, buf) in pieces {
                    put_columns(out, n, n0, &buf, m);
                }
                return;
            }
        }
        matmul_any(self.isa, bf16, x, m, k, w, 0, n, bias, out, n);
    }

    fn matmul_many(&self, x: &[f32], m: usize, k: usize, projs: &mut [Projection<'_>]) {
        #[cfg(target_arch = "x86_64")]
        {
            let kernel = self.kernel_for(m, k);
            if matches!(kernel, Bf16Kernel::Amx | Bf16Kernel::AmxF32x3)
                && projs.iter().all(|p| matches!(p.w, WData::BF16(_)))
            {
                self.matmul_many_amx(kernel, x, m, k, projs);
                return;
            }
        }
        #[cfg(feature = "std")]
        if self.few_rows_many(x, m, k, projs) {
            return;
        }
        // The AVX2 GEMM: the rows packed once for all the projections and their pieces.
        #[cfg(target_arch = "x86_64")]
        if self.many_rows_gemm(self.kernel_for(m, k), m) {
            let ns: Vec<usize> = projs.iter().map(|p| p.n).collect();
            let rows = self.gemm_rows(x, m, k, &ns);
            for p in projs.iter_mut() {
                self.matmul_many_rows_of(&rows, m, k, p.w, p.n, p.bias, p.out);
            }
            self.keep_gemm_rows(rows);
            return;
        }
        for p in projs.iter_mut() {
            self.matmul(x, m, k, p.w, p.n, p.bias, p.out);
        }
    }

    fn matmul_swiglu(
        &self,
        x: &[f32],
        m: usize,
        k: usize,
        gate: (WData<'_>, Option<&[f32]>),
        up: (WData<'_>, Option<&[f32]>),
        n: usize,
        out: &mut [f32],
    ) {
        #[cfg(target_arch = "x86_64")]
        {
            let kernel = self.kernel_for(m, k);
            if let (
                Bf16Kernel::Amx | Bf16Kernel::AmxF32x3,
                (WData::BF16(wg), bg),
                (WData::BF16(wu), bu),
            ) = (kernel, gate, up)
            {
                self.matmul_swiglu_amx(kernel, x, m, k, (wg, bg), (wu, bu), n, out);
                return;
            }
        }
        #[cfg(feature = "std")]
        if self.few_rows_swiglu(x, m, k, gate, up, n, out) {
            return;
        }
        // The AVX2 GEMM: the rows packed once for both projections and their pieces; the
        // values of swiglu_unfused's two matmuls.
        #[cfg(target_arch = "x86_64")]
        if self.many_rows_gemm(self.kernel_for(m, k), m) {
            assert!(out.len() >= m * n, "matmul: output too short");
            let rows = self.gemm_rows(x, m, k, &[n]);
            let mut u = vec![0f32; m * n];
            self.matmul_many_rows_of(&rows, m, k, gate.0, n, gate.1, out);
            self.matmul_many_rows_of(&rows, m, k, up.0, n, up.1, &mut u);
            self.keep_gemm_rows(rows);
            self.silu_mul(&mut out[..m * n], &u);
            return;
        }
        swiglu_unfused(self, x, m, k, gate, up, n, out);
    }

    fn rms_norm(&self, x: &[f32], w: &[f32], eps: f32, out: &mut [f32]) {
        let d = w.len();
        if d == 0 {
            return;
        }
        let rows = x.len().min(out.len()) / d;
        let isa = self.isa;
        // Eight rows per piece: the AVX-512 kernel runs eight rows' sums side by side.
        self.for_rows(&mut out[..rows * d], rows, d, 8, |r0, n, o| {
            dvl_kernels::norm::rms_norm_rows(isa, &x[r0 * d..(r0 + n) * d], w, eps, o);
        });
    }

    fn layer_norm(&self, x: &[f32], w: &[f32], b: &[f32], eps: f32, out: &mut [f32]) {
        let d = w.len();
        if d == 0 {
            return;
        }
        let rows = x.len().min(out.len()) / d;
        let isa = self.isa;
        self.for_rows(&mut out[..rows * d], rows, d, 8, |r0, n, o| {
            dvl_kernels::norm::layer_norm_rows(isa, &x[r0 * d..(r0 + n) * d], w, b, eps, o);
        });
    }

    fn rope(
        &self,
        x: &mut [f32],
        rows: usize,
        n_heads: usize,
        head_dim: usize,
        stride: usize,
        cos: &[f32],
        sin: &[f32],
    ) {
        let isa = self.isa;
        let hd = head_dim;
        if rows > 0 {
            assert!(
                stride >= n_heads * hd && x.len() >= (rows - 1) * stride + n_heads * hd,
                "rope: x too short for {rows} rows of stride {stride}"
            );
        }
        let len = if rows == 0 {
            0
        } else {
            (rows - 1) * stride + n_heads * hd
        };
        self.for_rows(&mut x[..len], rows, stride, 1, |r0, n, xs| {
            let (c, s) = (&cos[r0 * hd..(r0 + n) * hd], &sin[r0 * hd..(r0 + n) * hd]);
            dvl_kernels::rope::rope_rows(isa, xs, n, n_heads, hd, stride, c, s);
        });
    }

    fn silu_mul(&self, gate: &mut [f32], up: &[f32]) {
        let n = gate.len().min(up.len());
        let isa = self.isa;
        self.for_rows(&mut gate[..n], n, 1, 64, |i, n, g| {
            dvl_kernels::elementwise::silu_mul_isa(isa, g, &up[i..i + n]);
        });
    }

    fn add_inplace(&self, acc: &mut [f32], x: &[f32]) {
        let n = acc.len().min(x.len());
        let isa = self.isa;
        self.for_rows(&mut acc[..n], n, 1, 64, |i, n, a| {
            dvl_kernels::elementwise::add_inplace_isa(isa, a, &x[i..i + n]);
        });
    }

    fn gelu_erf(&self, x: &mut [f32]) {
        let (isa, n) = (self.isa, x.len());
        self.for_rows(x, n, 1, 64, |_, _, v| {
            dvl_kernels::elementwise::gelu_erf_isa(isa, v);
        });
    }

    fn gelu_tanh(&self, x: &mut [f32]) {
        let (isa, n) = (self.isa, x.len());
        self.for_rows(x, n, 1, 64, |_, _, v| {
            dvl_kernels::elementwise::gelu_tanh_isa(isa, v);
        });
    }

    fn logits_argmax(
        &self,
        hn: &[f32],
        rows: usize,
        k: usize,
        w: WData<'_>,
        n: usize,
        never: Option<usize>,
    ) -> Vec<(usize, f32)> {
        use dvl_kernels::softmax::ArgmaxPartial;
        // Vocabulary slices small enough that their logits stay in L2.
        const CHUNK: usize = 2048;
        let (isa, bf16) = (self.isa, self.kernel_for(rows, k));
        // Up to a tile of rows the unmasking runs fused on AMX tiles whatever the work: it
        // beats the FMA kernels + a separate pass even for one row of k = 64 (where
        // `kernel_for` keeps f32 matmuls off the tiles).
        #[cfg(target_arch = "x86_64")]
        let bf16 = match self.bf16 {
            Bf16Kernel::AmxF32x3 if rows <= dvl_kernels::amx::unmask::MAX_ROWS => self.bf16,
            _ => bf16,
        };
        // On AMX tiles the rows are packed once for every slice (packing per slice was ~10%
        // of the tiny model's projection).
        #[cfg(target_arch = "x86_64")]
        let packed = match (bf16, w) {
            (Bf16Kernel::Amx, WData::BF16(_)) => {
                Some(dvl_kernels::amx::pack_activations(hn, rows, k))
            }
            (Bf16Kernel::AmxF32x3, WData::BF16(_)) => {
                Some(dvl_kernels::amx::pack_activations_f32x3(hn, rows, k))
            }
            _ => None,
        };
        // Up to a tile of rows the unmasking statistics are taken straight from the C tiles
        // (`amx::unmask`): no logits written out and read back.
        #[cfg(target_arch = "x86_64")]
        let fused = packed
            .as_ref()
            .and_then(dvl_kernels::amx::unmask::UnmaskActs::new);
        // The FMA kernels' rows, prepared once for all slices.
        let prepared = self.prepared_rows(bf16, hn, rows, k, w);
        // `z`: a thread's logits buffer, reused for each of its slices.
        let slice = |z: &mut Vec<f32>, c: usize| -> Vec<ArgmaxPartial> {
            let (n0, n1) = (c * CHUNK, ((c + 1) * CHUNK).min(n));
            #[cfg(target_arch = "x86_64")]
            if let (Some(acts), WData::BF16(s)) = (&fused, w) {
                assert!(s.len() >= n1 * k, "logits_argmax: weights too short");
                let mut parts = alloc::vec![ArgmaxPartial::EMPTY; rows];
                // SAFETY: `fused` exists only for the AMX kernels, chosen after
                // amx::available(); s holds rows n0..n1 of k.
                unsafe {
                    dvl_kernels::amx::unmask::argmax_partials(
                        acts,
                        &s[n0 * k..n1 * k],
                        n1 - n0,
                        n0,
                        never,
                        &mut parts,
                    )
                };
                return parts;
            }
            z.resize(rows * CHUNK, 0.0);
            let z = &mut z[..rows * (n1 - n0)];
            #[cfg(target_arch = "x86_64")]
            let on_tiles = if let (Some(p), WData::BF16(s)) = (&packed, w) {
                assert!(s.len() >= n1 * k, "logits_argmax: weights too short");
                // SAFETY: `packed` exists only for the AMX kernels, chosen after
                // amx::available(); s holds rows n0..n1 of k and z holds rows × (n1 − n0).
                unsafe {
                    dvl_kernels::amx::matmul_amx_bf16_packed(
                        p,
                        &s[n0 * k..n1 * k],
                        n1 - n0,
                        None,
                        z.as_mut_ptr(),
                        n1 - n0,
                    )
                };
                true
            } else {
                false
            };
            #[cfg(not(target_arch = "x86_64"))]
            let on_tiles = false;
            if !on_tiles {
                let mode = (isa, bf16);
                matmul_prepared(prepared.as_ref(), mode, hn, rows, k, w, (n0, n1), None, z);
            }
            z.chunks_exact(n1 - n0)
                .map(|zr| ArgmaxPartial::of_isa(isa, zr, n0, never))
                .collect()
        };
        let n_chunks = n.div_ceil(CHUNK);
        #[cfg(feature = "std")]
        let parts: Vec<Vec<ArgmaxPartial>> = match &self.pool {
            Some(pool) => {
                use rayon::prelude::*;
                pool.install(|| {
                    (0..n_chunks)
                        .into_par_iter()
                        .map_init(Vec::new, slice)
                        .collect()
                })
            }
            None => {
                let mut z = Vec::new();
                (0..n_chunks).map(|c| slice(&mut z, c)).collect()
            }
        };
        #[cfg(not(feature = "std"))]
        let parts: Vec<Vec<ArgmaxPartial>> = {
            let mut z = Vec::new();
            (0..n_chunks).map(|c| slice(&mut z, c)).collect()
        };
        // Merge in vocabulary order: ties resolve to the lowest id as in one pass.
        (0..rows)
            .map(|r| {
                parts
                    .iter()
                    .fold(ArgmaxPartial::EMPTY, |acc, p| acc.merge(p[r]))
                    .finish()
            })
            .collect()
    }

    fn run(&self, work: &mut (dyn FnMut() + Send)) {
        #[cfg(feature = "std")]
        if let Some(pool) = &self.pool {
            // Inline when already on one of the pool's threads.
            return pool.install(work);
        }
        work()
    }

    fn attention(
        &self,
        q: &[f32],
        n_q: usize,
        k: &[f32],
        v: &[f32],
        out: &mut [f32],
        s: AttnShape,
        scale: f32,
        keys: KeyRange<'_>,
    ) {
        let max_keys = (0..n_q)
            .map(keys)
            .map(|(lo, hi)| hi - lo)
            .max()
            .unwrap_or(0);
        let isa = self.isa;
        // bf16 mode on AMX: keys and values are rounded and packed for the tiles once, here,
        // and shared by the threads (fixtures §6 (c) numerics; see attention::amx).
        #[cfg(target_arch = "x86_64")]
        let packed = (matches!(self.bf16, Bf16Kernel::Amx)
            && dvl_kernels::attention::amx::supported(&s))
        .then(|| {
            let n_keys = (0..n_q)
                .map(keys)
                .filter(|(lo, hi)| hi > lo)
                .map(|(_, hi)| hi)
                .max()
                .unwrap_or(0);
            dvl_kernels::attention::amx::pack_kv(k, v, n_keys, s)
        });
        let run = |i0: usize, q_rows: &[f32], out_rows: &mut [f32], rows: usize| {
            #[cfg(target_arch = "x86_64")]
            if let Some(kv) = &packed {
                dvl_kernels::attention::amx::attention_amx(
                    q_rows,
                    rows,
                    kv,
                    out_rows,
                    s,
                    scale,
                    |i| keys(i0 + i),
                );
                return;
            }
            let mut scores = vec![0f32; max_keys];
            dvl_kernels::attention::attention(
                isa,
                q_rows,
                rows,
                k,
                v,
                out_rows,
                s,
                scale,
                |i| keys(i0 + i),
                &mut scores,
            );
        };
        #[cfg(feature = "std")]
        if let Some(pool) = &self.pool {
            if n_q >= 2 && n_q * max_keys * s.n_heads >= 1 << 14 {
                use rayon::prelude::*;
                let per = n_q.div_ceil(pool.current_num_threads() * 4).max(1);
                pool.install(|| {
                    out[..n_q * s.q_stride]
                        .par_chunks_mut(per * s.q_stride)
                        .enumerate()
                        .for_each(|(c, o)| {
                            let i0 = c * per;
                            let rows = o.len() / s.q_stride;
                            run(i0, &q[i0 * s.q_stride..(i0 + rows) * s.q_stride], o, rows);
                        })
                });
                return;
            }
        }
        run(0, q, out, n_q);
    }
}

#[cfg(all(test, feature = "std"))]
mod tests {
    use super::*;
    use dvl_kernels::packed::PackedBf16;

    /// `w` as stored, or its panels `p`.
    fn stored_or_panels<'a>(
        panels: bool,
        w: &'a [dvl_kernels::bf16],
        p: &'a PackedBf16,
    ) -> WData<'a> {
        if panels {
            WData::Packed(p)
        } else {
            WData::BF16(w)
        }
    }

    /// The trait's default (scalar, single-threaded) element-wise methods.
    struct Defaults;

    impl Backend for Defaults {
        fn matmul(
            &self,
            _: &[f32],
            _: usize,
            _: usize,
            _: WData<'_>,
            _: usize,
            _: Option<&[f32]>,
            _: &mut [f32],
        ) {
            unimplemented!()
        }
        fn attention(
            &self,
            _: &[f32],
            _: usize,
            _: &[f32],
            _: &[f32],
            _: &mut [f32],
            _: AttnShape,
            _: f32,
            _: KeyRange<'_>,
        ) {
            unimplemented!()
        }
    }

    fn rand_vec(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
        (0..n)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                ((s >> 40) as f32 / (1u64 << 24) as f32) * 6.0 - 3.0
            })
            .collect()
    }

    fn bits(v: &[f32]) -> Vec<u32> {
        v.iter().map(|x| x.to_bits()).collect()
    }

    /// `matmul_many` and `matmul_swiglu` give what their definitions give (one `matmul` per
    /// projection; two and `silu_mul`) bit for bit, for every kernel set this CPU has
    /// (f32 FMAs, f32 as three terms on tiles, bf16 inputs) and thread count, on shapes
    /// that are not multiples of a tile: 1 to 300 rows, 30- to 1000-wide outputs, so
    /// thread ranges end inside a projection and a SwiGLU range takes several pieces.
    #[test]
    fn fused_projections_equal_their_definitions() {
        let weights = |rows: usize, k: usize, seed: u64| -> Vec<dvl_kernels::bf16> {
            rand_vec(rows * k, seed)
                .iter()
                .map(|&v| dvl_kernels::bf16::from_f32(v * 0.1))
                .collect()
        };
        let tiles = CpuBackend::single_threaded().with_f32_amx_min_work(0);
        let kernel_sets = [
            tiles.amx().then_some((true, false)),
            Some((false, false)),
            CpuBackend::single_threaded()
                .with_bf16(true)
                .bf16()
                .then_some((true, true)),
        ];
        for (f32_tiles, bf16) in kernel_sets.into_iter().flatten() {
            let with = |threads| {
                CpuBackend::with_threads(threads)
                    .unwrap()
                    .with_f32_amx_min_work(0)
                    .with_f32_on_amx(f32_tiles)
                    .with_bf16(bf16)
            };
            let one = with(1);
            for threads in [1, 2, 3] {
                let be = with(threads);
                for (m, k, n, kv) in [
                    (1, 64, 96, 32),
                    (8, 200, 130, 30),
                    // Few rows, enough work for the pool: one region for all projections.
                    (8, 300, 500, 100),
                    (13, 96, 1000, 60),
                    (33, 96, 64, 16),
                    (300, 136, 100, 40),
                    (300, 40, 1000, 30),
                ] {
                    let what = format!("{}, {threads} threads, {m}×{k}×{n}", be.describe());
                    let x = rand_vec(m * k, 1);
                    let (wq, wk, wv, wu) = (
                        weights(n, k, 2),
                        weights(kv, k, 3),
                        weights(kv, k, 4),
                        weights(n, k, 5),
                    );
                    let (bq, bk, bu) = (rand_vec(n, 6), rand_vec(kv, 7), rand_vec(n, 8));
                    // The weights as stored, and repacked into panels.
                    let pack = |w: &[dvl_kernels::bf16], rows| PackedBf16::new(w, rows, k);
                    let (pq, pk, pv, pu) =
                        (pack(&wq, n), pack(&wk, kv), pack(&wv, kv), pack(&wu, n));
                    for panels in [false, true] {
                        let what = format!("{what}, panels {panels}");

                        // q and k with biases, v without: one matmul each, then all at once.
                        let mut want = [vec![0f32; m * n], vec![0f32; m * kv], vec![0f32; m * kv]];
                        be.matmul(
                            &x,
                            m,
                            k,
                            stored_or_panels(panels, &wq, &pq),
                            n,
                            Some(&bq),
                            &mut want[0],
                        );
                        be.matmul(
                            &x,
                            m,
                            k,
                            stored_or_panels(panels, &wk, &pk),
                            kv,
                            Some(&bk),
                            &mut want[1],
                        );
                        be.matmul(
                            &x,
                            m,
                            k,
                            stored_or_panels(panels, &wv, &pv),
                            kv,
                            None,
                            &mut want[2],
                        );
                        let mut got = [vec![1f32; m * n], vec![1f32; m * kv], vec![1f32; m * kv]];
                        let [q, kk, v] = &mut got;
                        be.matmul_many(
                            &x,
                            m,
                            k,
                            &mut [
                                Projection {
                                    w: stored_or_panels(panels, &wq, &pq),
                                    n,
                                    bias: Some(&bq),
                                    out: q,
                                },
                                Projection {
                                    w: stored_or_panels(panels, &wk, &pk),
                                    n: kv,
                                    bias: Some(&bk),
                                    out: kk,
                                },
                                Projection {
                                    w: stored_or_panels(panels, &wv, &pv),
                                    n: kv,
                                    bias: None,
                                    out: v,
                                },
                            ],
                        );
                        for (name, (g, w)) in ["q", "k", "v"].iter().zip(got.iter().zip(&want)) {
                            assert_eq!(bits(g), bits(w), "matmul_many {name}: {what}");
                        }
                        for bias in [false, true] {
                            let (bg, bu) = if bias {
                                (Some(&bq[..]), Some(&bu[..]))
                            } else {
                                (None, None)
                            };
                            let (gate, up) = (
                                (stored_or_panels(panels, &wq, &pq), bg),
                                (stored_or_panels(panels, &wu, &pu), bu),
                            );
                            let (mut g, mut u) = (vec![0f32; m * n], vec![0f32; m * n]);
                            be.matmul(&x, m, k, gate.0, n, gate.1, &mut g);
                            be.matmul(&x, m, k, up.0, n, up.1, &mut u);
                            be.silu_mul(&mut g, &u);
                            let mut fused = vec![1f32; m * n];
                            be.matmul_swiglu(&x, m, k, gate, up, n, &mut fused);
                            assert_eq!(
                                bits(&fused),
                                bits(&g),
                                "matmul_swiglu (bias {bias}): {what}"
                            );
                            let mut single = vec![1f32; m * n];
                            one.matmul_swiglu(&x, m, k, gate, up, n, &mut single);
                            assert_eq!(
                                bits(&fused),
                                bits(&single),
                                "matmul_swiglu, 1 thread: {what}"
                            );
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn many_row_matmuls_do_not_depend_on_the_thread_count() {
        // At MANY_ROWS rows and more the f32 kernels take the packed GEMM on AVX2, split
        // into column ranges across the pool: every weight type, bias or not, the same bits
        // for 1–3 threads, and the reference's values to f32 rounding.
        let (m, k, n) = (dvl_kernels::matmul::MANY_ROWS + 5, 130, 700);
        let x = rand_vec(m * k, 11);
        let w32: Vec<f32> = rand_vec(n * k, 12);
        let w16: Vec<dvl_kernels::bf16> = w32
            .iter()
            .map(|&v| dvl_kernels::bf16::from_f32(v))
            .collect();
        let wh: Vec<dvl_kernels::f16> =
            w32.iter().map(|&v| dvl_kernels::f16::from_f32(v)).collect();
        let bias = rand_vec(n, 13);
        for isa in dvl_kernels::cpu::supported_isas() {
            let panels = PackedBf16::new(&w16, n, k);
            for (name, w) in [
                ("bf16", WData::BF16(&w16)),
                ("f16", WData::F16(&wh)),
                ("f32", WData::F32(&w32)),
                ("bf16 panels", WData::Packed(&panels)),
            ] {
                for b in [None, Some(&bias[..])] {
                    let mut want = vec![0f32; m * n];
                    match w {
                        WData::BF16(s) => {
                            dvl_kernels::reference::matmul(&x, m, k, s, n, b, &mut want)
                        }
                        WData::F16(s) => {
                            dvl_kernels::reference::matmul(&x, m, k, s, n, b, &mut want)
                        }
                        WData::F32(s) => {
                            dvl_kernels::reference::matmul(&x, m, k, s, n, b, &mut want)
                        }
                        WData::Packed(_) => {
                            dvl_kernels::reference::matmul(&x, m, k, &w16, n, b, &mut want)
                        }
                    }
                    let mut first: Option<Vec<f32>> = None;
                    for threads in [1, 2, 3] {
                        let be = CpuBackend::with_threads(threads)
                            .unwrap()
                            .with_isa(*isa)
                            .with_f32_on_amx(false);
                        let mut got = vec![f32::NAN; m * n];
                        be.matmul(&x, m, k, w, n, b, &mut got);
                        let what = format!("{isa:?} {name} bias {} {threads} threads", b.is_some());
                        for (g, r) in got.iter().zip(&want) {
                            assert!(
                                (g - r).abs() <= 1e-4 * (1.0 + r.abs()),
                                "{what}: {g} vs {r}"
                            );
                        }
                        match &first {
                            None => first = Some(got),
                            Some(f) => assert_eq!(bits(&got), bits(f), "{what}"),
                        }
                    }
                }
            }
        }
    }

    /// Pooled, vectorised element-wise ops give the scalar single-thread results bit for
    /// bit, for every ISA and thread count, above and below the pool threshold.
    #[test]
    fn element_wise_ops_equal_the_scalar_defaults() {
        let want = Defaults;
        for isa in dvl_kernels::cpu::supported_isas() {
            for threads in [1, 2, 3] {
                let be = CpuBackend::with_threads(threads).unwrap().with_isa(*isa);
                // (rows, d): a decode step (below PAR_MIN_ELEMS) and a prefill (above).
                for (rows, d) in [(8usize, 96usize), (301, 896), (1025, 80)] {
                    let n = rows * d;
                    let what = format!("{isa:?} {threads} threads {rows}×{d}");
                    let x = rand_vec(n, 1);
                    let y = rand_vec(n, 2);
                    let w = rand_vec(d, 3);
                    let b = rand_vec(d, 4);
                    let (mut o1, mut o2) = (vec![0f32; n], vec![0f32; n]);
                    want.rms_norm(&x, &w, 1e-6, &mut o1);
                    be.rms_norm(&x, &w, 1e-6, &mut o2);
                    assert_eq!(bits(&o1), bits(&o2), "rms_norm {what}");
                    want.layer_norm(&x, &w, &b, 1e-6, &mut o1);
                    be.layer_norm(&x, &w, &b, 1e-6, &mut o2);
                    assert_eq!(bits(&o1), bits(&o2), "layer_norm {what}");
                    type Unary = fn(&dyn Backend, &mut [f32]);
                    let unary: [(&str, Unary); 2] = [
                        ("gelu_erf", |be, v| be.gelu_erf(v)),
                        ("gelu_tanh", |be, v| be.gelu_tanh(v)),
                    ];
                    for (name, f) in unary {
                        let (mut a, mut c) = (x.clone(), x.clone());
                        f(&want, &mut a);
                        f(&be, &mut c);
                        assert_eq!(bits(&a), bits(&c), "{name} {what}");
                    }
                    let (mut a, mut c) = (x.clone(), x.clone());
                    want.silu_mul(&mut a, &y);
                    be.silu_mul(&mut c, &y);
                    assert_eq!(bits(&a), bits(&c), "silu_mul {what}");
                    want.add_inplace(&mut a, &y);
                    be.add_inplace(&mut c, &y);
                    assert_eq!(bits(&a), bits(&c), "add_inplace {what}");
                    // RoPE: heads of 16 (d = 96: 6 heads; 896: 56; 80: 5), tables per row.
                    let hd = 16;
                    let (cos, sin): (Vec<f32>, Vec<f32>) = rand_vec(rows * hd, 5)
                        .iter()
                        .map(|t| (t.cos(), t.sin()))
                        .unzip();
                    for heads in [d / hd, d / hd - 1] {
                        let (mut a, mut c) = (x.clone(), x.clone());
                        want.rope(&mut a, rows, heads, hd, d, &cos, &sin);
                        be.rope(&mut c, rows, heads, hd, d, &cos, &sin);
                        assert_eq!(bits(&a), bits(&c), "rope {heads} heads {what}");
                    }
                }
            }
        }
    }
}
