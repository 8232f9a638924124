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

    /// RMSNorm of each `w.len()`-wide row of `x` into `out`.
    fn rms_norm(&self, x: &[f32], w: &[f32], eps: f32, out: &mut [f32]) {
        let d = w.len();
        for (xr, or) in x.chunks_exact(d).zip(out.chunks_exact_mut(d)) {
            dvl_kernels::norm::rms_norm(xr, w, eps, or);
        }
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
    /// Shortest rows for that (see `AMX_F32_MIN_K`).
    f32_amx_min_k: usize,
    #[cfg(feature = "std")]
    pool: Option<rayon::ThreadPool>,
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
            f32_amx_min_k: AMX_F32_MIN_K,
            #[cfg(feature = "std")]
            pool: None,
        };
        be.bf16 = be.f32_kernel();
        #[cfg(feature = "std")]
        {
            if std::env::var("DVL_AMX_F32").is_ok_and(|v| v == "0") {
                be = be.with_f32_on_amx(false);
            }
            if let Some(isa) = std::env::var("DVL_ISA").ok().and_then(|v| parse_isa(&v)) {
                be = be.with_isa(isa);
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
    /// split into three bf16 terms for the few-row matmuls of denoising steps (as accurate
    /// as f32 FMAs — products exact, f32 accumulation — and at the memory rate), else f32
    /// FMAs.
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
    /// default f32 kernels for denoising steps where AMX is granted, see `kernel_for`).
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    AmxF32x3,
}

/// Rows up to which f32 matmuls take [`Bf16Kernel::AmxF32x3`]. A denoising step streams
/// every weight once and is memory-bound: three tile products per weight tile cost nothing
/// there, while the FMA kernels run out of issue slots near the DRAM rate. Prefill and
/// vision are compute-bound, where three tile passes (at this kernel's tile efficiency)
/// are no faster than the FMA kernels, so they keep those.
const AMX_F32_MAX_ROWS: usize = 32;
/// Shortest rows for [`Bf16Kernel::AmxF32x3`]: with a few k blocks per weight tile the
/// transposed output stores outweigh the tile work (the tiny model's k = 64 lm_head runs
/// slower on tiles than with FMAs).
const AMX_F32_MIN_K: usize = 256;

impl CpuBackend {
    /// The kernel for a matmul of `m` rows of `k`.
    fn kernel_for(&self, m: usize, k: usize) -> Bf16Kernel {
        match self.bf16 {
            Bf16Kernel::AmxF32x3 if m > AMX_F32_MAX_ROWS || k < self.f32_amx_min_k => {
                Bf16Kernel::F32
            }
            kernel => kernel,
        }
    }

    /// Lower the shortest row length that takes f32 matmuls to AMX tiles (default 256):
    /// lets tests run that path on the tiny fixture models (k = 64).
    #[doc(hidden)]
    pub fn with_f32_amx_min_k(mut self, k: usize) -> Self {
        self.f32_amx_min_k = k;
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
    /// AMX matmul: the activations are packed once, then each thread takes one range of
    /// whole 32-row weight pairs, so the weights stream from memory once in all and every
    /// output element goes through the same tile arithmetic whatever the thread count.
    #[allow(clippy::too_many_arguments)]
    fn matmul_amx(
        &self,
        x: &[f32],
        m: usize,
        k: usize,
        w: &[dvl_kernels::bf16],
        n: usize,
        bias: Option<&[f32]>,
        out: &mut [f32],
    ) {
        assert!(x.len() >= m * k && w.len() >= n * k && out.len() >= m * n);
        // f32 mode: three bf16 terms per activation, summed by the kernel.
        let packed = if self.bf16 == Bf16Kernel::AmxF32x3 {
            dvl_kernels::amx::pack_activations_f32x3(x, m, k)
        } else {
            dvl_kernels::amx::pack_activations(x, m, k)
        };
        let dst = SharedOut(out.as_mut_ptr());
        let piece = n.div_ceil(self.threads()).next_multiple_of(32);
        let run = |p: usize| {
            let (n0, n1) = (p * piece, ((p + 1) * piece).min(n));
            // SAFETY: AMX was granted (with_amx); w holds rows n0..n1, out holds m rows of
            // n and this call alone writes its columns n0..n1.
            unsafe {
                dvl_kernels::amx::matmul_amx_bf16_packed(
                    &packed,
                    &w[n0 * k..n1 * k],
                    n1 - n0,
                    bias.map(|b| &b[n0..n1]),
                    dst.get().add(n0),
                    n,
                )
            }
        };
        let pieces = n.div_ceil(piece);
        #[cfg(feature = "std")]
        if let Some(pool) = &self.pool {
            use rayon::prelude::*;
            pool.install(|| (0..pieces).into_par_iter().for_each(run));
            return;
        }
        (0..pieces).for_each(run);
    }
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
        if let (Bf16Kernel::Amx | Bf16Kernel::AmxF32x3, WData::BF16(ws)) = (bf16, w) {
            self.matmul_amx(x, m, k, ws, n, bias, out);
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
                // share of the weights once.
                let chunk = n.div_ceil(threads * 4).next_multiple_of(4);
                let pieces: Vec<(usize, Vec<f32>)> = pool.install(|| {
                    (0..n.div_ceil(chunk))
                        .into_par_iter()
                        .map(|p| {
                            let (n0, n1) = (p * chunk, ((p + 1) * chunk).min(n));
                            let mut buf = vec![0f32; m * (n1 - n0)];
                            matmul_any(isa, bf16, x, m, k, w, n0, n1, bias, &mut buf, n1 - n0);
                            (n0, buf)
                        })
                        .collect()
                });
                for (n0, buf) in pieces {
                    let wdt = buf.len() / m.max(1);
                    for i in 0..m {
                        out[i * n + n0..i * n + n0 + wdt]
                            .copy_from_slice(&buf[i * wdt..(i + 1) * wdt]);
                    }
                }
                return;
            }
        }
        matmul_any(self.isa, bf16, x, m, k, w, 0, n, bias, out, n);
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
        let slice = |c: usize| -> Vec<ArgmaxPartial> {
            let (n0, n1) = (c * CHUNK, ((c + 1) * CHUNK).min(n));
            let mut z = vec![0f32; rows * (n1 - n0)];
            matmul_any(isa, bf16, hn, rows, k, w, n0, n1, None, &mut z, n1 - n0);
            z.chunks_exact(n1 - n0)
                .map(|zr| ArgmaxPartial::of_isa(isa, zr, n0, never))
                .collect()
        };
        let n_chunks = n.div_ceil(CHUNK);
        #[cfg(feature = "std")]
        let parts: Vec<Vec<ArgmaxPartial>> = match &self.pool {
            Some(pool) => {
                use rayon::prelude::*;
                pool.install(|| (0..n_chunks).into_par_iter().map(slice).collect())
            }
            None => (0..n_chunks).map(slice).collect(),
        };
        #[cfg(not(feature = "std"))]
        let parts: Vec<Vec<ArgmaxPartial>> = (0..n_chunks).map(slice).collect();
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
        let run = |i0: usize, q_rows: &[f32], out_rows: &mut [f32], rows: usize| {
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
