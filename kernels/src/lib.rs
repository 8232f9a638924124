//! Compute kernels for dvl.
//!
//! `#![no_std]`: kernels work on caller-provided slices (only the AMX path allocates its
//! packing buffers, through `alloc`), so the same code runs in an embedded firmware, inside
//! the engine's thread pool, or in a test.
//!
//! Each kernel family has a plain *reference* (`reference` module: the textbook loop, one
//! f32 or f64 accumulator, written to be obviously right) beside the *fast* variant that the
//! engine calls. Tests compare fast against reference on odd shapes, ggml test-backend-ops
//! style. Activations are f32; weights are read as stored (bf16, f16 or f32) and widened in
//! registers (the AVX2 many-row GEMM widens ≤ 1 MiB panels per call); bf16 weights may be
//! repacked once into 16-output panels ([`packed`]) for the AVX2 few-row kernel.
#![no_std]

extern crate alloc;

/// `$vis fn $name(isa, args…)`: runs `$body::<V>(args…)` compiled for AVX-512 (`V` =
/// `$v512`) or AVX2 (`$v256`) as `isa` says, else the portable `$portable(args…)`.
macro_rules! dispatch {
    (
        $(#[$meta:meta])*
        $vis:vis fn $name:ident($($arg:ident: $ty:ty),* $(,)?)
            => $body:ident::<$v512:ty | $v256:ty>, else $portable:expr
    ) => {
        $(#[$meta])*
        $vis fn $name(isa: $crate::matmul::Isa, $($arg: $ty),*) {
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma")]
                unsafe fn avx512($($arg: $ty),*) {
                    $body::<$v512>($($arg),*)
                }
                #[target_feature(enable = "avx2,fma")]
                unsafe fn avx2($($arg: $ty),*) {
                    $body::<$v256>($($arg),*)
                }
                match isa {
                    // SAFETY: Isa values come from cpu::detect_isa, which checked CPU and OS
                    // support; the bodies check their slice lengths.
                    $crate::matmul::Isa::Avx512 => return unsafe { avx512($($arg),*) },
                    // SAFETY: as above.
                    $crate::matmul::Isa::Avx2 => return unsafe { avx2($($arg),*) },
                    $crate::matmul::Isa::Portable => {}
                }
            }
            #[cfg(not(target_arch = "x86_64"))]
            let _ = isa;
            $portable($($arg),*)
        }
    };
}

#[cfg(target_arch = "x86_64")]
pub mod amx;
pub mod attention;
pub mod cpu;
#[cfg(target_arch = "x86_64")]
pub mod dpbf16;
pub mod elementwise;
pub mod math;
pub mod matmul;
pub mod norm;
pub mod packed;
pub mod reference;
pub mod rope;
#[cfg(target_arch = "x86_64")]
mod simd;
pub mod softmax;
#[cfg(target_arch = "x86_64")]
pub mod x86;

pub use half::{bf16, f16};

/// Storage kind of a weight element, for kernels that load several at once.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WKind {
    F32,
    BF16,
    F16,
}

/// A weight element type that the kernels can widen to f32.
pub trait WeightElem: Copy + Send + Sync + 'static {
    const KIND: WKind;
    fn to_f32(self) -> f32;
}

impl WeightElem for f32 {
    const KIND: WKind = WKind::F32;
    #[inline(always)]
    fn to_f32(self) -> f32 {
        self
    }
}

impl WeightElem for bf16 {
    const KIND: WKind = WKind::BF16;
    #[inline(always)]
    fn to_f32(self) -> f32 {
        // bf16 is the top half of an f32: widening is a shift, which vectorises.
        f32::from_bits((self.to_bits() as u32) << 16)
    }
}

impl WeightElem for f16 {
    const KIND: WKind = WKind::F16;
    #[inline(always)]
    fn to_f32(self) -> f32 {
        f16::to_f32(self)
    }
}
