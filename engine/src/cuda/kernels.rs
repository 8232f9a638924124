//! The CUDA sources, their compilation into modules, and typed launchers on [`Gpu`].
//!
//! Every launcher checks buffer lengths and shapes on the host (a bad call is an
//! `InvalidArgument` error, never an out-of-bounds kernel), picks the kernel variant and the
//! launch geometry documented at the top of each `.cu` file, and queues the kernel on the
//! stream without waiting. Device faults surface at the next synchronising call.

// `usize::is_multiple_of` is Rust 1.87; the workspace MSRV is 1.85.
#![allow(clippy::manual_is_multiple_of)]

use std::collections::HashMap;
use std::format;
use std::path::Path;
use std::string::String;
use std::sync::Arc;
use std::vec::Vec;

use cudarc::driver::{
    CudaContext, CudaFunction, CudaModule, CudaSlice, DevicePtr, DevicePtrMut, DeviceRepr,
    LaunchConfig, PushKernelArg,
};
use cudarc::nvrtc::Ptx;
use dvl_kernels::attention::AttnShape;

use super::nvrtc::{self, Compiled};
use super::{cuda_error, Gpu};
use crate::{Error, Result};

/// Prepended to every source (bf16 helpers, warp reductions, the mma wrapper).
pub const PRELUDE: &str = include_str!("../../../kernels/cuda/common.cuh");

/// (file name, source) of every kernel file, in load order.
pub const SOURCES: &[(&str, &str)] = &[
    ("gemv.cu", include_str!("../../../kernels/cuda/gemv.cu")),
    (
        "gemv_tc.cu",
        include_str!("../../../kernels/cuda/gemv_tc.cu"),
    ),
    ("gemm.cu", include_str!("../../../kernels/cuda/gemm.cu")),
    (
        "attention.cu",
        include_str!("../../../kernels/cuda/attention.cu"),
    ),
    ("norm.cu", include_str!("../../../kernels/cuda/norm.cu")),
    ("rope.cu", include_str!("../../../kernels/cuda/rope.cu")),
    (
        "elementwise.cu",
        include_str!("../../../kernels/cuda/elementwise.cu"),
    ),
    ("unmask.cu", include_str!("../../../kernels/cuda/unmask.cu")),
];

/// Every kernel entry point the launchers use, by file (checked at load and by the NVRTC
/// check).
pub const ENTRY_POINTS: &[(&str, &[&str])] = &[
    (
        "gemv.cu",
        &[
            "gemv_bf16_m1_r2",
            "gemv_bf16_m1_r4",
            "gemv_bf16_m2_r2",
            "gemv_bf16_m2_r4",
            "gemv_bf16_m4_r2",
            "gemv_bf16_m4_r4",
            "gemv_bf16_m8_r2",
            "gemv_bf16_m8_r4",
            "gemv_bf16_m1_r2_any",
            "gemv_bf16_m1_r4_any",
            "gemv_bf16_m2_r2_any",
            "gemv_bf16_m2_r4_any",
            "gemv_bf16_m4_r2_any",
            "gemv_bf16_m4_r4_any",
            "gemv_bf16_m8_r2_any",
            "gemv_bf16_m8_r4_any",
        ],
    ),
    (
        "gemv_tc.cu",
        &[
            "gemv_tc_bf16_n1",
            "gemv_tc_bf16_n2",
            "gemv_tc_bf16_n4",
            "gemv_tc_bf16_n8",
            "gemv_tc_bf16_n1_any",
            "gemv_tc_bf16_n2_any",
            "gemv_tc_bf16_n4_any",
            "gemv_tc_bf16_n8_any",
        ],
    ),
    ("gemm.cu", &["gemm_bf16_tc", "gemm_bf16_tc_any"]),
    (
        "attention.cu",
        &["attn_f32kv", "attn_bf16kv", "attn_combine"],
    ),
    ("norm.cu", &["rms_norm_f32", "layer_norm_f32"]),
    ("rope.cu", &["rope_rotate_half_f32"]),
    (
        "elementwise.cu",
        &[
            "silu_mul_f32",
            "gelu_erf_f32",
            "gelu_tanh_f32",
            "add_f32",
            "add_bias_f32",
            "kv_append_f32",
            "kv_append_bf16",
            "embed_rows_bf16",
        ],
    ),
    ("unmask.cu", &["argmax_partial", "argmax_finish"]),
];

/// The translation unit NVRTC compiles for `file`: the prelude, then the file with its own
/// line numbers.
pub fn full_source(file: &str, body: &str) -> String {
    format!("{PRELUDE}\n#line 1 \"{file}\"\n{body}")
}

/// Compile every source for `arch` (in parallel), through the cache in `cache` (None: no
/// cache).
pub fn compile_all(
    arch: &str,
    extra: &[String],
    cache: Option<&Path>,
) -> Vec<(&'static str, Result<Compiled>)> {
    std::thread::scope(|s| {
        let handles: Vec<_> = SOURCES
            .iter()
            .map(|&(file, body)| {
                (
                    file,
                    s.spawn(move || {
                        nvrtc::compile(file, &full_source(file, body), arch, extra, cache)
                    }),
                )
            })
            .collect();
        handles
            .into_iter()
            .map(|(file, h)| {
                (
                    file,
                    h.join()
                        .unwrap_or_else(|_| Err(cuda_error(file, "compiler thread panicked"))),
                )
            })
            .collect()
    })
}

/// The compilation target for a device: its own `sm_XY` when NVRTC supports it (machine code,
/// nothing compiled at load), else PTX for the newest supported architecture not above it
/// (the driver compiles that at load).
pub fn target_for(cc: (i32, i32), nvrtc_archs: &[i32]) -> Result<String> {
    let dev = cc.0 * 10 + cc.1;
    if nvrtc_archs.is_empty() || nvrtc_archs.contains(&dev) {
        return Ok(format!("sm_{dev}"));
    }
    nvrtc_archs
        .iter()
        .copied()
        .filter(|&a| (80..=dev).contains(&a))
        .max()
        .map(|a| format!("compute_{a}"))
        .ok_or_else(|| {
            cuda_error(
                "NVRTC",
                format!("no supported architecture for sm_{dev} among {nvrtc_archs:?}"),
            )
        })
}

/// The loaded kernel modules.
pub struct Kernels {
    funcs: HashMap<&'static str, CudaFunction>,
    _modules: Vec<Arc<CudaModule>>,
}

impl Kernels {
    /// Compile (or load from the cache) every source for `target` and load it into `ctx`.
    pub fn load(ctx: &Arc<CudaContext>, target: &str) -> Result<Kernels> {
        let nv = nvrtc::nvrtc()?;
        let mut funcs = HashMap::new();
        let mut modules = Vec::new();
        let cache = nvrtc::cache_dir();
        for (file, compiled) in compile_all(target, &[], cache.as_deref()) {
            let compiled = compiled?;
            let module = ctx
                .load_module(Ptx::from_binary(compiled.image))
                .map_err(|e| {
                    let mut driver = 0;
                    // SAFETY: out-pointer to a live local.
                    unsafe {
                        cudarc::driver::sys::cuDriverGetVersion(&mut driver);
                    }
                    cuda_error(
                        file,
                        format!(
                            "the driver rejected the {target} image: {e:?} (driver API \
                             {}.{}, NVRTC {}.{}; an NVRTC newer than the driver produces \
                             code it cannot load: point DVL_NVRTC at one no newer)",
                            driver / 1000,
                            driver % 1000 / 10,
                            nv.version.0,
                            nv.version.1
                        ),
                    )
                })?;
            let names = ENTRY_POINTS
                .iter()
                .find(|(f, _)| *f == file)
                .map_or(&[][..], |(_, n)| n);
            for &name in names {
                let f = module
                    .load_function(name)
                    .map_err(|e| cuda_error(file, format!("kernel {name} not found: {e:?}")))?;
                funcs.insert(name, f);
            }
            modules.push(module);
        }
        Ok(Kernels {
            funcs,
            _modules: modules,
        })
    }

    pub fn get(&self, name: &str) -> Result<&CudaFunction> {
        self.funcs
            .get(name)
            .ok_or_else(|| cuda_error("kernels", format!("no kernel named {name}")))
    }
}

/// A kernel argument, kept alive in a slice until the launch has read it.
#[derive(Clone, Copy, Debug)]
pub enum KArg {
    I32(i32),
    I64(i64),
    F32(f32),
    /// A device address (0 = null).
    Ptr(u64),
}

fn bad(msg: String) -> Error {
    Error::InvalidArgument(msg)
}

/// `v` as a kernel `int`.
fn int(what: &str, v: usize) -> Result<i32> {
    i32::try_from(v).map_err(|_| {
        bad(format!(
            "{what} = {v} does not fit a 32-bit kernel argument"
        ))
    })
}

fn need(what: &str, len: usize, at_least: usize) -> Result<()> {
    if len < at_least {
        return Err(bad(format!(
            "{what} holds {len} elements but the call needs {at_least}"
        )));
    }
    Ok(())
}

fn grid_1d(gpu: &Gpu, n: usize) -> u32 {
    let cap = (gpu.info().multiprocessors as usize * 32).max(1);
    n.div_ceil(256).clamp(1, cap) as u32
}

/// Element type of a KV cache: `f32`, or `u16` holding bf16 bits.
pub trait KvElem: DeviceRepr {
    const ATTN_KERNEL: &'static str;
    const APPEND_KERNEL: &'static str;
}
impl KvElem for f32 {
    const ATTN_KERNEL: &'static str = "attn_f32kv";
    const APPEND_KERNEL: &'static str = "kv_append_f32";
}
impl KvElem for u16 {
    const ATTN_KERNEL: &'static str = "attn_bf16kv";
    const APPEND_KERNEL: &'static str = "kv_append_bf16";
}

/// Which matmul kernel (all compute `out = x·Wᵀ + bias` with bf16 `W [n, k]`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MatmulAlgo {
    /// `Gemv` for m <= 8 (exact f32 activations), `GemvTc` for m <= 64, else `Gemm`.
    Auto,
    /// CUDA-core GEMV (gemv.cu), f32 activations; rows per warp chosen from the shape.
    Gemv,
    /// `Gemv` with 2 or 4 weight rows per warp (benchmarks).
    GemvRows(u8),
    /// Tensor-core skinny GEMM (gemv_tc.cu), activations rounded to bf16.
    GemvTc,
    /// Tensor-core tiled GEMM (gemm.cu), activations rounded to bf16.
    Gemm,
}

/// Key visibility for [`Gpu::attention`].
#[derive(Clone, Copy, Debug)]
pub enum AttnMask<'a> {
    /// Block-causal over a cache (spec §7.3): query row i (absolute position pos0 + i) sees
    /// keys [0, min(n_keys, ((pos0 + i) / block + 1) · block)).
    BlockCausal { pos0: usize, block: usize },
    /// Query row i sees keys [ranges[2i], ranges[2i+1]) (vision segments / windows); the
    /// values must lie in [0, n_keys] (they are read on the device, not checked).
    Ranges(&'a CudaSlice<i32>),
}

/// Partial results of split attention ([`Gpu::attention`] with more than one split).
pub struct AttnScratch {
    part_o: CudaSlice<f32>,
    part_ml: CudaSlice<f32>,
}

/// Per-chunk partials and per-row results of [`Gpu::unmask`].
pub struct UnmaskScratch {
    pmax: CudaSlice<f32>,
    pbest: CudaSlice<f32>,
    pid: CudaSlice<i32>,
    psum: CudaSlice<f64>,
    token: CudaSlice<i32>,
    conf: CudaSlice<f32>,
}

/// Vocabulary ids per block of the unmasking reduction.
pub const UNMASK_CHUNK: usize = 4096;

impl Gpu {
    /// Queue kernel `name` with `args` (in the kernel's parameter order).
    pub fn launch(
        &self,
        name: &str,
        grid: (u32, u32, u32),
        block: u32,
        args: &[KArg],
    ) -> Result<()> {
        let f = self.kernels().get(name)?;
        let mut b = self.stream().launch_builder(f);
        for a in args {
            match a {
                KArg::I32(v) => b.arg(v),
                KArg::I64(v) => b.arg(v),
                KArg::F32(v) => b.arg(v),
                KArg::Ptr(v) => b.arg(v),
            };
        }
        let cfg = LaunchConfig {
            grid_dim: grid,
            block_dim: (block, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: every launcher passes the argument list of the kernel's signature, with
        // device addresses of buffers whose lengths it has checked against the shapes.
        unsafe { b.launch(cfg) }
            .map(|_| ())
            .map_err(|e| cuda_error("launch", format!("{name}: {e:?}")))
    }

    /// `out[m, n] = (accumulate ? out : 0) + x[m, k] · Wᵀ + bias` with `W [n, k]` bf16 bits.
    #[allow(clippy::too_many_arguments)]
    pub fn matmul(
        &self,
        x: &impl DevicePtr<f32>,
        m: usize,
        k: usize,
        w: &impl DevicePtr<u16>,
        n: usize,
        bias: Option<&CudaSlice<f32>>,
        out: &mut impl DevicePtrMut<f32>,
        accumulate: bool,
        algo: MatmulAlgo,
    ) -> Result<()> {
        if m == 0 || n == 0 {
            return Ok(());
        }
        if k == 0 {
            return Err(bad("matmul with k = 0".into()));
        }
        need("matmul x", x.len(), m * k)?;
        need("matmul W", w.len(), n * k)?;
        need("matmul out", out.len(), m * n)?;
        if let Some(b) = bias {
            need("matmul bias", b.len(), n)?;
        }
        let (mi, ki, ni) = (int("m", m)?, int("k", k)?, int("n", n)?);
        let s = self.stream();
        let (xp, _xg) = x.device_ptr(s);
        let (wp, _wg) = w.device_ptr(s);
        let bp = bias.map(|b| b.device_ptr(s));
        let (op, _og) = out.device_ptr_mut(s);
        let vec = k % 8 == 0 && xp % 16 == 0 && wp % 16 == 0;
        let any = if vec { "" } else { "_any" };
        let algo = match algo {
            MatmulAlgo::Auto if m <= 8 => MatmulAlgo::Gemv,
            MatmulAlgo::Auto if m <= 64 => MatmulAlgo::GemvTc,
            MatmulAlgo::Auto => MatmulAlgo::Gemm,
            a => a,
        };
        let (name, grid, block) = match algo {
            MatmulAlgo::Gemv | MatmulAlgo::GemvRows(_) => {
                let mt = match m {
                    1 => 1,
                    2 => 2,
                    3 | 4 => 4,
                    _ => 8,
                };
                let r = match algo {
                    MatmulAlgo::GemvRows(r) if r == 2 || r == 4 => r as usize,
                    MatmulAlgo::GemvRows(r) => {
                        return Err(bad(format!("GemvRows({r}): rows per warp must be 2 or 4")))
                    }
                    // 4 rows per warp streams more bytes per lane, but the 8-row variant
                    // needs 160 registers at R = 4 (see scripts/nvrtc-check.sh's report);
                    // small n needs more warps.
                    _ if mt == 8 => 2,
                    _ if n.div_ceil(32) < 2 * self.info().multiprocessors as usize => 2,
                    _ => 4,
                };
                (
                    format!("gemv_bf16_m{mt}_r{r}{any}"),
                    (n.div_ceil(8 * r) as u32, m.div_ceil(mt) as u32, 1),
                    256,
                )
            }
            MatmulAlgo::GemvTc => {
                let nt = match m {
                    0..=8 => 1,
                    9..=16 => 2,
                    17..=32 => 4,
                    _ => 8,
                };
                (
                    format!("gemv_tc_bf16_n{nt}{any}"),
                    (n.div_ceil(16) as u32, m.div_ceil(8 * nt) as u32, 1),
                    256,
                )
            }
            _ => (
                format!("gemm_bf16_tc{any}"),
                (n.div_ceil(128) as u32, m.div_ceil(128) as u32, 1),
                256,
            ),
        };
        if grid.0 == 0 || grid.0 > i32::MAX as u32 || grid.1 > 65535 {
            return Err(bad(format!(
                "matmul {m}×{k}·{n}: grid {grid:?} out of range"
            )));
        }
        self.launch(
            &name,
            grid,
            block,
            &[
                KArg::Ptr(xp),
                KArg::I32(mi),
                KArg::I32(ki),
                KArg::Ptr(wp),
                KArg::I32(ni),
                KArg::Ptr(bp.as_ref().map_or(0, |b| b.0)),
                KArg::Ptr(op),
                KArg::I32(accumulate as i32),
            ],
        )
    }

    /// Scratch for attention with up to `max_splits` splits of `max_q` query rows.
    pub fn attn_scratch(
        &self,
        max_splits: usize,
        max_q: usize,
        n_heads: usize,
        head_dim: usize,
    ) -> Result<AttnScratch> {
        let rows = max_splits.max(1) * max_q.max(1) * n_heads.max(1);
        Ok(AttnScratch {
            part_o: self.zeros(rows * head_dim.max(1))?,
            part_ml: self.zeros(rows * 2)?,
        })
    }

    /// Attention of `n_q` query rows over `n_keys` K/V rows (see attention.cu). `n_splits`
    /// splits each block's key span across blocks (0 = choose from the shape); more than one
    /// split needs `scratch` sized for at least that many.
    #[allow(clippy::too_many_arguments)]
    pub fn attention<T: KvElem>(
        &self,
        q: &impl DevicePtr<f32>,
        n_q: usize,
        k: &impl DevicePtr<T>,
        v: &impl DevicePtr<T>,
        n_keys: usize,
        shape: AttnShape,
        scale: f32,
        mask: AttnMask<'_>,
        out: &mut impl DevicePtrMut<f32>,
        n_splits: usize,
        scratch: Option<&mut AttnScratch>,
    ) -> Result<()> {
        let s = shape;
        if n_q == 0 {
            return Ok(());
        }
        if s.head_dim == 0 || s.head_dim > 128 {
            return Err(bad(format!(
                "attention head_dim {} (1..=128 supported)",
                s.head_dim
            )));
        }
        if s.n_kv_heads == 0 || s.n_heads % s.n_kv_heads != 0 {
            return Err(bad(format!(
                "attention: {} heads not a multiple of {} kv heads",
                s.n_heads, s.n_kv_heads
            )));
        }
        if s.q_stride < s.n_heads * s.head_dim || s.kv_stride < s.n_kv_heads * s.head_dim {
            return Err(bad(format!("attention strides too small for {s:?}")));
        }
        need("attention q", q.len(), n_q * s.q_stride)?;
        need("attention out", out.len(), n_q * s.q_stride)?;
        need("attention k", k.len(), n_keys * s.kv_stride)?;
        need("attention v", v.len(), n_keys * s.kv_stride)?;
        let (pos0, block, ranges) = match mask {
            AttnMask::BlockCausal { pos0, block } => {
                if block == 0 {
                    return Err(bad("attention block size 0".into()));
                }
                (pos0, block, None)
            }
            AttnMask::Ranges(r) => {
                need("attention ranges", r.len(), 2 * n_q)?;
                (0, 1, Some(r))
            }
        };
        let q_blocks = n_q.div_ceil(16);
        let blocks = q_blocks * s.n_heads;
        let splits = if n_splits == 0 {
            let want = (2 * self.info().multiprocessors as usize).div_ceil(blocks.max(1));
            want.min(n_keys.div_ceil(128)).clamp(1, 64)
        } else {
            n_splits
        };
        let st = self.stream();
        let (qp, _qg) = q.device_ptr(st);
        let (kp, _kg) = k.device_ptr(st);
        let (vp, _vg) = v.device_ptr(st);
        let rp = ranges.map(|r| r.device_ptr(st));
        let (op, _og) = out.device_ptr_mut(st);
        let args_head = [
            KArg::Ptr(qp),
            KArg::I32(int("n_q", n_q)?),
            KArg::I32(int("q_stride", s.q_stride)?),
            KArg::Ptr(kp),
            KArg::Ptr(vp),
            KArg::I32(int("kv_stride", s.kv_stride)?),
            KArg::I32(int("n_heads", s.n_heads)?),
            KArg::I32(int("n_kv_heads", s.n_kv_heads)?),
            KArg::I32(int("head_dim", s.head_dim)?),
            KArg::F32(scale),
            KArg::Ptr(rp.as_ref().map_or(0, |r| r.0)),
            KArg::I32(int("pos0", pos0)?),
            KArg::I32(int("block", block)?),
            KArg::I32(int("n_keys", n_keys)?),
            KArg::Ptr(op),
        ];
        let grid = (q_blocks as u32, s.n_heads as u32, splits as u32);
        if splits == 1 {
            let mut args = args_head.to_vec();
            args.extend([KArg::Ptr(0), KArg::Ptr(0)]);
            return self.launch(T::ATTN_KERNEL, grid, 128, &args);
        }
        let scratch =
            scratch.ok_or_else(|| bad("attention with several splits needs scratch".into()))?;
        let rows = splits * n_q * s.n_heads;
        need("attention scratch", scratch.part_o.len(), rows * s.head_dim)?;
        need("attention scratch", scratch.part_ml.len(), rows * 2)?;
        let (pop, _pog) = scratch.part_o.device_ptr_mut(st);
        let (pmp, _pmg) = scratch.part_ml.device_ptr_mut(st);
        let mut args = args_head.to_vec();
        args.extend([KArg::Ptr(pop), KArg::Ptr(pmp)]);
        self.launch(T::ATTN_KERNEL, grid, 128, &args)?;
        self.launch(
            "attn_combine",
            (n_q as u32, s.n_heads as u32, 1),
            128,
            &[
                KArg::Ptr(pop),
                KArg::Ptr(pmp),
                KArg::I32(splits as i32),
                KArg::I32(n_q as i32),
                KArg::I32(s.n_heads as i32),
                KArg::I32(s.head_dim as i32),
                KArg::I32(s.q_stride as i32),
                KArg::Ptr(op),
            ],
        )
    }

    /// RMSNorm of `rows` rows of width `d`: `out = x / rms(x) · w`. With `delta`, first
    /// `x += delta` (written back).
    #[allow(clippy::too_many_arguments)]
    pub fn rms_norm(
        &self,
        x: &mut impl DevicePtrMut<f32>,
        delta: Option<&CudaSlice<f32>>,
        w: &impl DevicePtr<f32>,
        eps: f32,
        rows: usize,
        d: usize,
        out: &mut impl DevicePtrMut<f32>,
    ) -> Result<()> {
        if rows == 0 {
            return Ok(());
        }
        need("rms_norm x", x.len(), rows * d)?;
        need("rms_norm out", out.len(), rows * d)?;
        need("rms_norm w", w.len(), d)?;
        if let Some(dl) = delta {
            need("rms_norm delta", dl.len(), rows * d)?;
        }
        let st = self.stream();
        let (xp, _xg) = x.device_ptr_mut(st);
        let dp = delta.map(|dl| dl.device_ptr(st));
        let (wp, _wg) = w.device_ptr(st);
        let (op, _og) = out.device_ptr_mut(st);
        self.launch(
            "rms_norm_f32",
            (int("rows", rows)? as u32, 1, 1),
            256,
            &[
                KArg::Ptr(xp),
                KArg::Ptr(dp.as_ref().map_or(0, |p| p.0)),
                KArg::Ptr(wp),
                KArg::F32(eps),
                KArg::I32(int("d", d)?),
                KArg::Ptr(op),
            ],
        )
    }

    /// LayerNorm with weight and bias of `rows` rows of width `d`.
    #[allow(clippy::too_many_arguments)]
    pub fn layer_norm(
        &self,
        x: &impl DevicePtr<f32>,
        w: &impl DevicePtr<f32>,
        b: &impl DevicePtr<f32>,
        eps: f32,
        rows: usize,
        d: usize,
        out: &mut impl DevicePtrMut<f32>,
    ) -> Result<()> {
        if rows == 0 {
            return Ok(());
        }
        need("layer_norm x", x.len(), rows * d)?;
        need("layer_norm out", out.len(), rows * d)?;
        need("layer_norm w", w.len(), d)?;
        need("layer_norm b", b.len(), d)?;
        let st = self.stream();
        let (xp, _xg) = x.device_ptr(st);
        let (wp, _wg) = w.device_ptr(st);
        let (bp, _bg) = b.device_ptr(st);
        let (op, _og) = out.device_ptr_mut(st);
        self.launch(
            "layer_norm_f32",
            (int("rows", rows)? as u32, 1, 1),
            256,
            &[
                KArg::Ptr(xp),
                KArg::Ptr(wp),
                KArg::Ptr(bp),
                KArg::F32(eps),
                KArg::I32(int("d", d)?),
                KArg::Ptr(op),
            ],
        )
    }

    /// Rotate-half RoPE in place on `n_heads` heads of `head_dim` at the start of each of
    /// `rows` rows (`stride` apart), with per-row `cos`/`sin` tables `[rows, head_dim]`.
    #[allow(clippy::too_many_arguments)]
    pub fn rope(
        &self,
        x: &mut impl DevicePtrMut<f32>,
        rows: usize,
        n_heads: usize,
        head_dim: usize,
        stride: usize,
        cos: &impl DevicePtr<f32>,
        sin: &impl DevicePtr<f32>,
    ) -> Result<()> {
        if head_dim % 2 != 0 || stride < n_heads * head_dim {
            return Err(bad(format!(
                "rope: head_dim {head_dim} must be even and stride {stride} >= {n_heads}·{head_dim}"
            )));
        }
        if rows == 0 {
            return Ok(());
        }
        need("rope x", x.len(), (rows - 1) * stride + n_heads * head_dim)?;
        need("rope cos", cos.len(), rows * head_dim)?;
        need("rope sin", sin.len(), rows * head_dim)?;
        let st = self.stream();
        let (xp, _xg) = x.device_ptr_mut(st);
        let (cp, _cg) = cos.device_ptr(st);
        let (sp, _sg) = sin.device_ptr(st);
        self.launch(
            "rope_rotate_half_f32",
            (grid_1d(self, rows * n_heads * head_dim / 2), 1, 1),
            256,
            &[
                KArg::Ptr(xp),
                KArg::I32(int("rows", rows)?),
                KArg::I32(int("n_heads", n_heads)?),
                KArg::I32(int("head_dim", head_dim)?),
                KArg::I32(int("stride", stride)?),
                KArg::Ptr(cp),
                KArg::Ptr(sp),
            ],
        )
    }

    /// `gate = silu(gate) ⊙ up` over `n` elements.
    pub fn silu_mul(
        &self,
        gate: &mut impl DevicePtrMut<f32>,
        up: &impl DevicePtr<f32>,
        n: usize,
    ) -> Result<()> {
        need("silu_mul gate", gate.len(), n)?;
        need("silu_mul up", up.len(), n)?;
        let st = self.stream();
        let (gp, _gg) = gate.device_ptr_mut(st);
        let (up_, _ug) = up.device_ptr(st);
        self.launch(
            "silu_mul_f32",
            (grid_1d(self, n), 1, 1),
            256,
            &[KArg::Ptr(gp), KArg::Ptr(up_), KArg::I64(n as i64)],
        )
    }

    /// Exact (erf) GELU in place over `n` elements.
    pub fn gelu_erf(&self, x: &mut impl DevicePtrMut<f32>, n: usize) -> Result<()> {
        self.unary("gelu_erf_f32", x, n)
    }

    /// Tanh-approximated GELU in place over `n` elements.
    pub fn gelu_tanh(&self, x: &mut impl DevicePtrMut<f32>, n: usize) -> Result<()> {
        self.unary("gelu_tanh_f32", x, n)
    }

    fn unary(&self, name: &str, x: &mut impl DevicePtrMut<f32>, n: usize) -> Result<()> {
        need(name, x.len(), n)?;
        let (xp, _xg) = x.device_ptr_mut(self.stream());
        self.launch(
            name,
            (grid_1d(self, n), 1, 1),
            256,
            &[KArg::Ptr(xp), KArg::I64(n as i64)],
        )
    }

    /// `acc += x` over `n` elements.
    pub fn add(
        &self,
        acc: &mut impl DevicePtrMut<f32>,
        x: &impl DevicePtr<f32>,
        n: usize,
    ) -> Result<()> {
        need("add acc", acc.len(), n)?;
        need("add x", x.len(), n)?;
        let st = self.stream();
        let (ap, _ag) = acc.device_ptr_mut(st);
        let (xp, _xg) = x.device_ptr(st);
        self.launch(
            "add_f32",
            (grid_1d(self, n), 1, 1),
            256,
            &[KArg::Ptr(ap), KArg::Ptr(xp), KArg::I64(n as i64)],
        )
    }

    /// `x[r, c] += bias[c]` for `rows` rows of width `n`.
    pub fn add_bias(
        &self,
        x: &mut impl DevicePtrMut<f32>,
        bias: &impl DevicePtr<f32>,
        rows: usize,
        n: usize,
    ) -> Result<()> {
        need("add_bias x", x.len(), rows * n)?;
        need("add_bias bias", bias.len(), n)?;
        int("rows·n", rows * n)?;
        let st = self.stream();
        let (xp, _xg) = x.device_ptr_mut(st);
        let (bp, _bg) = bias.device_ptr(st);
        self.launch(
            "add_bias_f32",
            (grid_1d(self, rows * n), 1, 1),
            256,
            &[
                KArg::Ptr(xp),
                KArg::Ptr(bp),
                KArg::I32(rows as i32),
                KArg::I32(n as i32),
            ],
        )
    }

    /// Append `rows` rows (first `width` columns of `[rows, src_stride]` k/v) at cache row
    /// `pos0` of `[capacity, kv_stride]` caches (bf16 caches round to nearest even).
    #[allow(clippy::too_many_arguments)]
    pub fn kv_append<T: KvElem>(
        &self,
        k_src: &impl DevicePtr<f32>,
        v_src: &impl DevicePtr<f32>,
        rows: usize,
        width: usize,
        src_stride: usize,
        k_cache: &mut impl DevicePtrMut<T>,
        v_cache: &mut impl DevicePtrMut<T>,
        kv_stride: usize,
        pos0: usize,
    ) -> Result<()> {
        if rows == 0 {
            return Ok(());
        }
        if width > src_stride || width > kv_stride {
            return Err(bad(format!("kv_append width {width} exceeds a stride")));
        }
        need(
            "kv_append k_src",
            k_src.len(),
            (rows - 1) * src_stride + width,
        )?;
        need(
            "kv_append v_src",
            v_src.len(),
            (rows - 1) * src_stride + width,
        )?;
        need(
            "kv_append k_cache",
            k_cache.len(),
            (pos0 + rows - 1) * kv_stride + width,
        )?;
        need(
            "kv_append v_cache",
            v_cache.len(),
            (pos0 + rows - 1) * kv_stride + width,
        )?;
        int("rows·width", rows * width)?;
        let st = self.stream();
        let (kp, _kg) = k_src.device_ptr(st);
        let (vp, _vg) = v_src.device_ptr(st);
        let (kcp, _kcg) = k_cache.device_ptr_mut(st);
        let (vcp, _vcg) = v_cache.device_ptr_mut(st);
        self.launch(
            T::APPEND_KERNEL,
            (grid_1d(self, rows * width), 1, 1),
            256,
            &[
                KArg::Ptr(kp),
                KArg::Ptr(vp),
                KArg::I32(rows as i32),
                KArg::I32(width as i32),
                KArg::I32(int("src_stride", src_stride)?),
                KArg::Ptr(kcp),
                KArg::Ptr(vcp),
                KArg::I32(int("kv_stride", kv_stride)?),
                KArg::I32(int("pos0", pos0)?),
            ],
        )
    }

    /// `out[r] = table[ids[r]]` widened to f32 (`table [vocab, dim]` bf16 bits; an id outside
    /// the table gives a zero row).
    pub fn embed_rows(
        &self,
        table: &impl DevicePtr<u16>,
        vocab: usize,
        dim: usize,
        ids: &impl DevicePtr<i32>,
        rows: usize,
        out: &mut impl DevicePtrMut<f32>,
    ) -> Result<()> {
        need("embed_rows table", table.len(), vocab * dim)?;
        need("embed_rows ids", ids.len(), rows)?;
        need("embed_rows out", out.len(), rows * dim)?;
        int("rows·dim", rows * dim)?;
        let st = self.stream();
        let (tp, _tg) = table.device_ptr(st);
        let (ip, _ig) = ids.device_ptr(st);
        let (op, _og) = out.device_ptr_mut(st);
        self.launch(
            "embed_rows_bf16",
            (grid_1d(self, rows * dim), 1, 1),
            256,
            &[
                KArg::Ptr(tp),
                KArg::I32(int("vocab", vocab)?),
                KArg::I32(int("dim", dim)?),
                KArg::Ptr(ip),
                KArg::I32(rows as i32),
                KArg::Ptr(op),
            ],
        )
    }

    /// Scratch for [`Gpu::unmask`] of up to `rows` rows over a vocabulary of `n`.
    pub fn unmask_scratch(&self, rows: usize, n: usize) -> Result<UnmaskScratch> {
        let parts = rows.max(1) * n.div_ceil(UNMASK_CHUNK).max(1);
        Ok(UnmaskScratch {
            pmax: self.zeros(parts)?,
            pbest: self.zeros(parts)?,
            pid: self.zeros(parts)?,
            psum: self.zeros(parts)?,
            token: self.zeros(rows.max(1))?,
            conf: self.zeros(rows.max(1))?,
        })
    }

    /// Greedy unmasking (spec §8.6): for each of `rows` rows of `logits [rows, ld]` (first `n`
    /// columns), the arg-max id (lowest on ties, `never` excluded) and its softmax probability
    /// over all `n` logits. Waits for the stream; only 8 bytes per row cross to the host.
    /// `None` for a row with no eligible id.
    #[allow(clippy::too_many_arguments)]
    pub fn unmask(
        &self,
        logits: &impl DevicePtr<f32>,
        rows: usize,
        n: usize,
        ld: usize,
        never: Option<usize>,
        scratch: &mut UnmaskScratch,
    ) -> Result<Vec<(Option<usize>, f32)>> {
        if rows == 0 {
            return Ok(Vec::new());
        }
        if n == 0 || ld < n {
            return Err(bad(format!("unmask: vocabulary {n} with row stride {ld}")));
        }
        need("unmask logits", logits.len(), (rows - 1) * ld + n)?;
        let chunks = n.div_ceil(UNMASK_CHUNK);
        need("unmask scratch", scratch.pmax.len(), rows * chunks)?;
        need("unmask scratch", scratch.token.len(), rows)?;
        let never = never.filter(|&v| v < n).map_or(-1, |v| v as i32);
        let st = self.stream();
        {
            let (lp, _lg) = logits.device_ptr(st);
            let (a, _ag) = scratch.pmax.device_ptr_mut(st);
            let (b, _bg) = scratch.pbest.device_ptr_mut(st);
            let (c, _cg) = scratch.pid.device_ptr_mut(st);
            let (d, _dg) = scratch.psum.device_ptr_mut(st);
            let (t, _tg) = scratch.token.device_ptr_mut(st);
            let (f, _fg) = scratch.conf.device_ptr_mut(st);
            self.launch(
                "argmax_partial",
                (chunks as u32, int("rows", rows)? as u32, 1),
                256,
                &[
                    KArg::Ptr(lp),
                    KArg::I32(int("n", n)?),
                    KArg::I32(int("ld", ld)?),
                    KArg::I32(UNMASK_CHUNK as i32),
                    KArg::I32(never),
                    KArg::Ptr(a),
                    KArg::Ptr(b),
                    KArg::Ptr(c),
                    KArg::Ptr(d),
                ],
            )?;
            self.launch(
                "argmax_finish",
                (rows as u32, 1, 1),
                32,
                &[
                    KArg::Ptr(a),
                    KArg::Ptr(b),
                    KArg::Ptr(c),
                    KArg::Ptr(d),
                    KArg::I32(chunks as i32),
                    KArg::Ptr(t),
                    KArg::Ptr(f),
                ],
            )?;
        }
        let tok = self.download(&scratch.token.slice(..rows))?;
        let conf = self.download(&scratch.conf.slice(..rows))?;
        Ok(tok
            .into_iter()
            .zip(conf)
            .map(|(t, c)| (usize::try_from(t).ok(), c))
            .collect())
    }
}

/// Host-side bf16 bits of an f32 (round to nearest even), for uploads.
pub fn bf16_bits(v: &[f32]) -> Vec<u16> {
    v.iter()
        .map(|&x| half::bf16::from_f32(x).to_bits())
        .collect()
}

/// f32 values of bf16 bits.
pub fn bf16_values(v: &[u16]) -> Vec<f32> {
    v.iter()
        .map(|&b| half::bf16::from_bits(b).to_f32())
        .collect()
}
