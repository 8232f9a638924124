//! Runtime CPU feature detection without std (cpuid + XGETBV).

use crate::matmul::Isa;

/// The best instruction set this CPU and OS support for the fast kernels.
pub fn detect_isa() -> Isa {
    #[cfg(target_arch = "x86_64")]
    {
        if x86::has_avx512() {
            return Isa::Avx512;
        }
        if x86::has_avx2_fma() {
            return Isa::Avx2;
        }
    }
    Isa::Portable
}

/// Every ISA this CPU can run, best last (for tests that compare all of them).
pub fn supported_isas() -> &'static [Isa] {
    match detect_isa() {
        Isa::Avx512 => &[Isa::Portable, Isa::Avx2, Isa::Avx512],
        Isa::Avx2 => &[Isa::Portable, Isa::Avx2],
        Isa::Portable => &[Isa::Portable],
    }
}

#[cfg(target_arch = "x86_64")]
pub(crate) use x86::xcr0;

/// AVX-512 plus AVX512_BF16 (`vdpbf16ps`): bf16 dot products for [`crate::dpbf16`].
pub fn has_avx512_bf16() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        x86::has_avx512() && core::arch::x86_64::__cpuid_count(7, 1).eax & (1 << 5) != 0
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use core::arch::x86_64::{__cpuid, __cpuid_count, _xgetbv};

    /// # Safety
    /// The CPU must support XGETBV (cpuid OSXSAVE).
    #[target_feature(enable = "xsave")]
    pub unsafe fn xcr0() -> u64 {
        _xgetbv(0)
    }

    pub fn has_avx512() -> bool {
        if !has_avx2_fma() {
            return false;
        }
        // SAFETY: has_avx2_fma checked OSXSAVE.
        let xcr0 = unsafe { xcr0() };
        // Opmask (5), upper ZMM0-15 (6) and ZMM16-31 (7) state must be OS-enabled.
        if xcr0 & 0b1110_0000 != 0b1110_0000 {
            return false;
        }
        let ebx = __cpuid_count(7, 0).ebx;
        let f = ebx & (1 << 16) != 0;
        let bw = ebx & (1 << 30) != 0;
        let vl = ebx & (1 << 31) != 0;
        f && bw && vl
    }

    pub fn has_avx2_fma() -> bool {
        let leaf1 = __cpuid(1);
        let f16c = leaf1.ecx & (1 << 29) != 0;
        let fma = leaf1.ecx & (1 << 12) != 0 && f16c;
        let osxsave = leaf1.ecx & (1 << 27) != 0;
        let avx = leaf1.ecx & (1 << 28) != 0;
        if !(fma && osxsave && avx) {
            return false;
        }
        // SAFETY: OSXSAVE is set, so XGETBV is available.
        let xcr0 = unsafe { xcr0() };
        // The OS must save XMM (bit 1) and YMM (bit 2) state.
        if xcr0 & 0b110 != 0b110 {
            return false;
        }
        if __cpuid(0).eax < 7 {
            return false;
        }
        __cpuid_count(7, 0).ebx & (1 << 5) != 0
    }
}
