//! Activations and residual adds.

/// SiLU-gated product, in place on `gate`: `gate = silu(gate) ⊙ up` (spec §7.1, §5.1(f)).
#[inline]
pub fn silu_mul(gate: &mut [f32], up: &[f32]) {
    for (g, &u) in gate.iter_mut().zip(up) {
        let v = *g;
        *g = v / (1.0 + crate::math::exp_f32(-v)) * u;
    }
}

/// Exact GELU: `0.5·x·(1 + erf(x/√2))` (Qwen merger, SigLIP projector; spec §11 item 10).
#[inline]
pub fn gelu_erf(x: &mut [f32]) {
    for v in x.iter_mut() {
        let a = *v as f64;
        *v = (0.5 * a * (1.0 + libm::erf(a * core::f64::consts::FRAC_1_SQRT_2))) as f32;
    }
}

/// Tanh-approximated GELU (`gelu_pytorch_tanh`, SigLIP MLP).
#[inline]
pub fn gelu_tanh(x: &mut [f32]) {
    const C: f32 = 0.797_884_6; // sqrt(2/pi)
    for v in x.iter_mut() {
        let a = *v;
        *v = 0.5 * a * (1.0 + libm::tanhf(C * (a + 0.044715 * a * a * a)));
    }
}

/// `acc += x`.
#[inline]
pub fn add_inplace(acc: &mut [f32], x: &[f32]) {
    for (a, &b) in acc.iter_mut().zip(x) {
        *a += b;
    }
}

// ------------------------------------------------------------------ ISA variants
//
// Each `*_isa` function computes exactly what its reference above computes, bit for bit:
// the AVX-512 / AVX2 bodies apply the same IEEE operations in the same order (no FMA), and
// the last partial vector goes through masked loads and stores rather than a scalar loop.
// Results therefore never depend on the ISA, on where a slice starts, or on how a caller
// split it between threads.

dispatch! {
    /// [`silu_mul`] for `isa`.
    pub fn silu_mul_isa(gate: &mut [f32], up: &[f32])
        => silu_mul_v::<__m512 | __m256>, else silu_mul
}

dispatch! {
    /// [`add_inplace`] for `isa`.
    pub fn add_inplace_isa(acc: &mut [f32], x: &[f32])
        => add_v::<__m512 | __m256>, else add_inplace
}

dispatch! {
    /// [`gelu_tanh`] for `isa`: libm's `tanhf` (musl/FreeBSD, through `expm1f`) evaluated
    /// branch-free on vector lanes.
    pub fn gelu_tanh_isa(x: &mut [f32])
        => gelu_tanh_v::<__m512 | __m256>, else gelu_tanh
}

dispatch! {
    /// [`gelu_erf`] for `isa`: libm's f64 `erf` (FreeBSD `s_erf.c`, with its `exp`) evaluated
    /// branch-free on f64 lanes, 8 (AVX-512) or 4 (AVX2) at a time.
    pub fn gelu_erf_isa(x: &mut [f32])
        => gelu_erf_v::<__m512d | __m256d>, else gelu_erf
}

#[cfg(target_arch = "x86_64")]
use core::arch::x86_64::{__m256, __m256d, __m512, __m512d};

#[cfg(target_arch = "x86_64")]
use crate::simd::{F32x, F64x};

// No closures in the vector bodies below: a closure is a function of its own without the
// caller's `#[target_feature]`s, so the intrinsics in it would not be inlined.

#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn silu_mul_v<V: F32x>(gate: &mut [f32], up: &[f32]) {
    let n = gate.len().min(up.len());
    let (g, u) = (gate.as_mut_ptr(), up.as_ptr());
    let mut i = 0;
    while i < n {
        let l = V::LANES.min(n - i);
        let v = V::load_n(g.add(i), l);
        // v / (1 + exp(-v)) * u
        let s = v.div(V::splat(1.0).add(crate::math::exp_v(v.neg())));
        s.mul(V::load_n(u.add(i), l)).store_n(g.add(i), l);
        i += l;
    }
}

#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn add_v<V: F32x>(acc: &mut [f32], x: &[f32]) {
    let n = acc.len().min(x.len());
    let (a, b) = (acc.as_mut_ptr(), x.as_ptr());
    let mut i = 0;
    while i < n {
        let l = V::LANES.min(n - i);
        V::load_n(a.add(i), l)
            .add(V::load_n(b.add(i), l))
            .store_n(a.add(i), l);
        i += l;
    }
}

/// `0.5·a·(1 + tanhf(C·(a + 0.044715·a³)))` on lanes, tanhf and expm1f as in libm 0.2
/// (FreeBSD `s_tanhf.c`, `s_expm1f.c`): every branch of the scalar code is a lane select
/// here, computed in the scalar code's operation order.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn gelu_tanh_v<V: F32x>(x: &mut [f32]) {
    const C: f32 = 0.797_884_6;
    let p = x.as_mut_ptr();
    let mut i = 0;
    while i < x.len() {
        let l = V::LANES.min(x.len() - i);
        let a = V::load_n(p.add(i), l);
        let u = V::splat(C).mul(a.add(V::splat(0.044715).mul(a).mul(a).mul(a)));
        let th = tanhf_v(u);
        V::splat(0.5)
            .mul(a)
            .mul(V::splat(1.0).add(th))
            .store_n(p.add(i), l);
        i += l;
    }
}

/// libm 0.2 `tanhf` (FreeBSD `s_tanhf.c`) on lanes. Its branches test the bit pattern w of
/// |u|: `w > H` is `|u| >= from_bits(H + 1)`; NaN fails every ordered compare and takes the
/// `|u| > 10` branch through `nlt` (unordered), as `w > 0x41200000` does.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn tanhf_v<V: F32x>(u: V) -> V {
    let ua = u.abs();
    // |u| > 10 or NaN: 1 + 0/|u|.
    let big = ua.nlt(V::splat_bits(0x4120_0001));
    // |u| > log(3)/2: 1 − 2/(t + 2) with t = expm1f(2|u|).
    let mid = ua.nlt(V::splat_bits(0x3f0c_9f55));
    // |u| > log(5/3)/2: t/(t + 2) with t = expm1f(2|u|).
    let low = ua.nlt(V::splat_bits(0x3e82_c579));
    // |u| >= 2⁻¹²⁶: −t/(t + 2) with t = expm1f(−2|u|); below, |u| itself.
    let nrm = ua.nlt(V::splat_bits(0x0080_0000));
    let t = expm1f_v(V::select(
        low,
        V::splat(2.0).mul(ua),
        V::splat(-2.0).mul(ua),
    ));
    let t2 = t.add(V::splat(2.0));
    let mut tt = ua;
    tt = V::select(nrm, t.neg().div(t2), tt);
    tt = V::select(low, t.div(t2), tt);
    tt = V::select(mid, V::splat(1.0).sub(V::splat(2.0).div(t2)), tt);
    if V::any(big) {
        tt = V::select(big, V::splat(1.0).add(V::splat(0.0).div(ua)), tt);
    }
    tt.xor_sign(u)
}

/// libm 0.2 `expm1f` for the arguments `tanhf` passes it: `2|u|` with |u| in (0.2554, 10]
/// and `−2|u|` with |u| in [2⁻¹²⁶, 0.2554]. The scalar code's early returns for |x| >=
/// 27·ln2 apply only to negative x (−1), NaN or x > 88.7, none of which occur here, and its
/// `k < 0 || k > 56` branch only to k = −1 (handled first) or k > 56 (x > 39); those lanes
/// are never selected by the caller.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn expm1f_v<V: F32x>(x: V) -> V {
    // libm's constants, by bit pattern.
    let ln2_hi = f32::from_bits(0x3f31_7180);
    let ln2_lo = f32::from_bits(0x3717_f7d1);
    let inv_ln2 = f32::from_bits(0x3fb8_aa3b);
    let q1 = -(0x88_8868 as f32) / (1u32 << 28) as f32; // -0x888868.0p-28
    let q2 = 0xcf_3010 as f32 / (1u64 << 33) as f32; // 0xcf3010.0p-33
    let xa = x.abs();
    let neg = x.lt(V::splat(0.0));
    let reduce = xa.nlt(V::splat_bits(0x3eb1_7219)); // |x| > 0.5·ln2
    let near = xa.lt(V::splat_bits(0x3f85_1592)); // |x| < 1.5·ln2: k = ±1
    let tiny = xa.lt(V::splat_bits(0x3300_0000)); // |x| < 2⁻²⁵: x
                                                  // k: ±1 near ln2, else trunc(x/ln2 ± 0.5); 0 without reduction.
    let half = V::select(neg, V::splat(-0.5), V::splat(0.5));
    let kt = V::from_i(V::splat(inv_ln2).mul(x).add(half).cvtt());
    let kn = V::select(neg, V::splat(-1.0), V::splat(1.0));
    let k = V::select(reduce, V::select(near, kn, kt), V::splat(0.0));
    // k = ±1: hi = x ∓ LN2_HI, lo = ±LN2_LO, which is the general t·LN2 form with t = ±1.
    let hi = x.sub(k.mul(V::splat(ln2_hi)));
    let lo = k.mul(V::splat(ln2_lo));
    let xr_red = hi.sub(lo);
    let cc_red = hi.sub(xr_red).sub(lo);
    let xr = V::select(reduce, xr_red, x);
    let cc = V::select(reduce, cc_red, V::splat(0.0));
    // Primary range.
    let hfx = V::splat(0.5).mul(xr);
    let hxs = xr.mul(hfx);
    let r1 = V::splat(1.0).add(hxs.mul(V::splat(q1).add(hxs.mul(V::splat(q2)))));
    let t = V::splat(3.0).sub(r1.mul(hfx));
    let e0 = hxs.mul(r1.sub(t).div(V::splat(6.0).sub(xr.mul(t))));
    // k == 0 (c is 0).
    let y0 = xr.sub(xr.mul(e0).sub(hxs));
    let e = xr.mul(e0.sub(cc)).sub(cc).sub(hxs);
    // k == −1, k == 1.
    let ym1 = V::splat(0.5).mul(xr.sub(e)).sub(V::splat(0.5));
    let yp1 = V::select(
        xr.lt(V::splat(-0.25)),
        V::splat(-2.0).mul(e.sub(xr.add(V::splat(0.5)))),
        V::splat(1.0).add(V::splat(2.0).mul(xr.sub(e))),
    );
    // 2 <= k <= 56: 2^k and 2^-k from the exponent field.
    let ki = k.cvtt();
    let twopk = V::shl23(ki, V::isplat(0x7f));
    let uf = V::shl23(k.neg().cvtt(), V::isplat(0x7f));
    let y_small = xr.sub(e).add(V::splat(1.0).sub(uf)).mul(twopk); // k < 23
    let y_large = xr.sub(e.add(uf)).add(V::splat(1.0)).mul(twopk); // k >= 23
    let mut y = V::select(k.lt(V::splat(23.0)), y_small, y_large);
    y = V::select(k.lt(V::splat(1.5)), yp1, y);
    y = V::select(k.lt(V::splat(0.5)), y0, y);
    y = V::select(k.lt(V::splat(-0.5)), ym1, y);
    V::select(tiny, x, y)
}

/// libm 0.2's `erf` and `exp` constants (FreeBSD `s_erf.c`, `e_exp.c`), by bit pattern;
/// polynomials highest degree first.
#[cfg(target_arch = "x86_64")]
mod erf_consts {
    const fn f(bits: u64) -> f64 {
        f64::from_bits(bits)
    }
    pub const ERX: f64 = f(0x3feb0ac160000000);
    pub const EFX8: f64 = f(0x3ff06eba8214db69);
    /// `|x| < 0.84375`: `erf = x + x·PP(z)/QQ(z)`, `z = x²`.
    pub const PP: [f64; 5] = [
        f(0xbef8ead6120016ac),
        f(0xbf77a291236668e4),
        f(0xbf9d2a51dbd7194f),
        f(0xbfd4cd7d691cb913),
        f(0x3fc06eba8214db68),
    ];
    pub const QQ: [f64; 6] = [
        f(0xbed09c4342a26120),
        f(0x3f215dc9221c1a10),
        f(0x3f74d022c4d36b0f),
        f(0x3fb0a54c5536ceba),
        f(0x3fd97779cddadc09),
        1.0,
    ];
    /// `|x| in [0.84375, 1.25)`: `erfc = (1 − ERX) − PA(s)/QA(s)`, `s = |x| − 1`.
    pub const PA: [f64; 7] = [
        f(0xbf61bf380a96073f),
        f(0x3fa22a36599795eb),
        f(0xbfbc63983d3e28ec),
        f(0x3fd45fca805120e4),
        f(0xbfd7d240fbb8c3f1),
        f(0x3fda8d00ad92b34d),
        f(0xbf6359b8bef77538),
    ];
    pub const QA: [f64; 7] = [
        f(0x3f888b545735151d),
        f(0x3f8bedc26b51dd1c),
        f(0x3fc02660e763351f),
        f(0x3fb2635cd99fe9a7),
        f(0x3fe14af092eb6f33),
        f(0x3fbb3e6618eee323),
        1.0,
    ];
    /// `|x| in [1.25, 1/0.35)`: R = RA(s), S = SA(s), `s = 1/x²`.
    pub const RA: [f64; 8] = [
        f(0xc023a0efc69ac25c),
        f(0xc054526557e4d2f2),
        f(0xc067135cebccabb2),
        f(0xc0644cb184282266),
        f(0xc04f300ae4cba38d),
        f(0xc0251e0441b0e726),
        f(0xbfe63416e4ba7360),
        f(0xbf843412600d6435),
    ];
    pub const SA: [f64; 9] = [
        f(0xbfaeeff2ee749a62),
        f(0x401a47ef8e484a93),
        f(0x405b28a3ee48ae2c),
        f(0x407ad02157700314),
        f(0x40842b1921ec2868),
        f(0x407b290dd58a1a71),
        f(0x4061350c526ae721),
        f(0x4033a6b9bd707687),
        1.0,
    ];
    /// `|x| in [1/0.35, 6)`: one degree lower than RA / SA. The leading 0 keeps the Horner
    /// steps aligned with RA / SA and is exact: `RB6 + s·0 = RB6`.
    pub const RB: [f64; 8] = [
        0.0,
        f(0xc07e384e9bdc383f),
        f(0xc09004616a2e5992),
        f(0xc083ec881375f228),
        f(0xc064145d43c5ed98),
        f(0xc031c209555f995a),
        f(0xbfe993ba70c285de),
        f(0xbf84341239e86f4a),
    ];
    pub const SB: [f64; 9] = [
        0.0,
        f(0xc03670e242712d62),
        f(0x407da874e79fe763),
        f(0x40a3f219cedf3be6),
        f(0x40a8ffb7688c246a),
        f(0x409802eb189d5118),
        f(0x40745cae221b9f0a),
        f(0x403e568b261d5190),
        1.0,
    ];
    pub const LN2HI: f64 = f(0x3fe62e42fee00000);
    pub const LN2LO: f64 = f(0x3dea39ef35793c76);
    pub const INVLN2: f64 = f(0x3ff71547652b82fe);
    /// `exp`: `c = x − xx·P(xx)`.
    pub const P: [f64; 5] = [
        f(0x3e66376972bea4d0),
        f(0xbebbbd41c5d26bf1),
        f(0x3f11566aaf25de2c),
        f(0xbf66c16c16bebd93),
        f(0x3fc555555555553e),
    ];
    /// Threshold on `|x|` equivalent to fdlibm's test of the high word: `hx < h` is
    /// `|x| < hw(h)` and `hx >= h` is `!(|x| < hw(h))`.
    pub const fn hw(h: u32) -> f64 {
        f((h as u64) << 32)
    }
}

/// `c[0]·zⁿ + … + c[n]` as fdlibm nests it: `c[n] + z·(c[n−1] + z·(…))`.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn horner<V: F64x>(z: V, c: &[f64]) -> V {
    let mut acc = V::splat(c[0]);
    for &k in &c[1..] {
        acc = V::splat(k).add(z.mul(acc));
    }
    acc
}

/// libm 0.2 `exp` for |x| < 708 (the arguments `erf` passes it lie in [−37, 1]).
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn exp_f64_v<V: F64x>(x: V) -> V {
    use erf_consts::*;
    let ax = x.abs();
    let neg = x.lt(V::splat(0.0));
    let reduce = ax.nlt(V::splat(hw(0x3fd6_2e43))); // hx > 0x3fd62e42: |x| > 0.5·ln2
    let far = ax.nlt(V::splat(hw(0x3ff0_a2b2))); // hx >= 0x3ff0a2b2: |x| >= 1.5·ln2
    let small = ax.nlt(V::splat(hw(0x3e30_0001))); // hx > 0x3e300000: |x| > 2⁻²⁸
    let kt = V::splat(INVLN2)
        .mul(x)
        .add(V::select(neg, V::splat(-0.5), V::splat(0.5)))
        .trunc_i32();
    let kn = V::select(neg, V::splat(-1.0), V::splat(1.0));
    // k = 0 gives hi = x, lo = 0, x unchanged and 2⁰ = 1: the scalar k = 0 branch exactly.
    let k = V::select(reduce, V::select(far, kt, kn), V::splat(0.0));
    let hi = x.sub(k.mul(V::splat(LN2HI)));
    let lo = k.mul(V::splat(LN2LO));
    let xr = hi.sub(lo);
    let xx = xr.mul(xr);
    let cc = xr.sub(xx.mul(horner(xx, &P)));
    let y = V::splat(1.0).add(xr.mul(cc).div(V::splat(2.0).sub(cc)).sub(lo).add(hi));
    V::select(small, y.mul(k.pow2i()), V::splat(1.0).add(x))
}

/// libm 0.2 `erf` (FreeBSD `s_erf.c`) on f64 lanes, every interval computed and selected.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn erf_v<V: F64x>(x: V) -> V {
    use erf_consts::*;
    let ax = x.abs();
    // |x| < 0.84375: x + x·R(x²), or 0.125·(8x + EFX8·x) below 2⁻²⁸.
    let r1 = ax.lt(V::splat(hw(0x3feb_0000)));
    let z = x.mul(x);
    let e1 = x.add(x.mul(horner(z, &PP).div(horner(z, &QQ))));
    let e1 = V::select(
        ax.lt(V::splat(hw(0x3e30_0000))),
        V::splat(0.125).mul(V::splat(8.0).mul(x).add(V::splat(EFX8).mul(x))),
        e1,
    );
    let mut erf = e1;
    if V::any(ax.nlt(V::splat(hw(0x3feb_0000)))) {
        // 0.84375 <= |x| < 1.25: erfc = (1 − ERX) − P(s)/Q(s), s = |x| − 1.
        let s = ax.sub(V::splat(1.0));
        let erfc1 = V::splat(1.0)
            .sub(V::splat(ERX))
            .sub(horner(s, &PA).div(horner(s, &QA)));
        // 1.25 <= |x| < 6: erfc = exp(−z² − 0.5625)·exp((z − x)(z + x) + R/S)/x, z = x
        // with its low word cleared, R/S in s = 1/x² (RA/SA below 1/0.35, else RB/SB).
        let s = V::splat(1.0).div(ax.mul(ax));
        let ra = ax.lt(V::splat(hw(0x4006_db6d)));
        let mut r = V::splat(0.0);
        let mut big_s = V::splat(0.0);
        for j in 0..RA.len() {
            r = V::select(ra, V::splat(RA[j]), V::splat(RB[j])).add(s.mul(r));
        }
        for j in 0..SA.len() {
            big_s = V::select(ra, V::splat(SA[j]), V::splat(SB[j])).add(s.mul(big_s));
        }
        let zz = ax.clear_low_word();
        let e_a = exp_f64_v(zz.neg().mul(zz).sub(V::splat(0.5625)));
        let e_b = exp_f64_v(zz.sub(ax).mul(zz.add(ax)).add(r.div(big_s)));
        let erfc2 = e_a.mul(e_b).div(ax);
        let erfc = V::select(ax.lt(V::splat(hw(0x3ff4_0000))), erfc1, erfc2);
        let y = V::splat(1.0).sub(erfc);
        // |x| >= 6: 1 − 2⁻¹⁰²²; then the sign of x.
        let y = V::select(
            ax.nlt(V::splat(hw(0x4018_0000))),
            V::splat(1.0).sub(V::splat(hw(0x0010_0000))),
            y,
        );
        erf = V::select(r1, e1, y.xor_sign(x));
    }
    let special = ax.nlt(V::splat(hw(0x7ff0_0000))); // ±inf, NaN: 1 − 2·sign + 1/x
    if V::any(special) {
        erf = V::select(
            special,
            V::splat(1.0).xor_sign(x).add(V::splat(1.0).div(x)),
            erf,
        );
    }
    erf
}

/// `gelu_erf` on f64 lanes: `((0.5·a)·(1 + erf(a/√2))) as f32` with libm 0.2's `erf`.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn gelu_erf_v<V: F64x>(xs: &mut [f32]) {
    let p = xs.as_mut_ptr();
    let mut i = 0;
    while i < xs.len() {
        let l = V::LANES.min(xs.len() - i);
        let a = V::load_f32_n(p.add(i), l);
        let erf = erf_v(a.mul(V::splat(core::f64::consts::FRAC_1_SQRT_2)));
        let g = V::splat(0.5).mul(a).mul(V::splat(1.0).add(erf));
        V::store_narrow(g.narrow(), p.add(i), l);
        i += l;
    }
}

#[cfg(all(test, target_arch = "x86_64"))]
mod tests {
    //! The lane functions against the libm functions they port, bit for bit, at their own
    //! precision (f64 for erf / exp: a 1-ulp f64 slip would almost never show in the f32
    //! GELU outputs that tests/elementwise_ops.rs compares).
    extern crate std;
    use super::*;
    use core::arch::x86_64::{__m256, __m256d, __m512, __m512d};
    use std::vec::Vec;

    fn isas() -> &'static [crate::matmul::Isa] {
        crate::cpu::supported_isas()
    }

    /// f64 arguments: dense over [-8, 8] plus a sweep over bit patterns.
    fn f64_args() -> Vec<f64> {
        let mut v: Vec<f64> = (0..1_600_001).map(|i| -8.0 + i as f64 * 1e-5).collect();
        v.extend((0..1u64 << 20).map(|i| f64::from_bits(i.wrapping_mul(0x9e37_79b9_7f4a_7c15))));
        v.extend([
            0.0,
            -0.0,
            f64::INFINITY,
            f64::NEG_INFINITY,
            f64::NAN,
            1e-300,
            -1e-310,
        ]);
        v
    }

    fn same64(got: f64, want: f64, what: &str, x: f64) {
        assert!(
            got.to_bits() == want.to_bits() || (got.is_nan() && want.is_nan()),
            "{what}({x:e}) = {got:e}, libm {want:e}"
        );
    }

    unsafe fn lanes64<V: F64x>(xs: &[f64], f: impl Fn(V) -> V) -> Vec<f64> {
        let mut out = std::vec![0f64; xs.len() + V::LANES];
        let mut buf = [0f64; 8];
        for (i, ch) in xs.chunks(V::LANES).enumerate() {
            buf[..ch.len()].copy_from_slice(ch);
            f(V::load(buf.as_ptr())).store(out.as_mut_ptr().add(i * V::LANES));
        }
        out.truncate(xs.len());
        out
    }

    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma")]
    unsafe fn erf512(xs: &[f64]) -> Vec<f64> {
        lanes64::<__m512d>(xs, |v| erf_v(v))
    }
    #[target_feature(enable = "avx2,fma")]
    unsafe fn erf256(xs: &[f64]) -> Vec<f64> {
        lanes64::<__m256d>(xs, |v| erf_v(v))
    }
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma")]
    unsafe fn exp512(xs: &[f64]) -> Vec<f64> {
        lanes64::<__m512d>(xs, |v| exp_f64_v(v))
    }
    #[target_feature(enable = "avx2,fma")]
    unsafe fn exp256(xs: &[f64]) -> Vec<f64> {
        lanes64::<__m256d>(xs, |v| exp_f64_v(v))
    }

    #[test]
    fn erf_lanes_equal_libm_erf() {
        let xs = f64_args();
        for &isa in isas() {
            // SAFETY: the ISA is supported.
            let got = match isa {
                crate::matmul::Isa::Avx512 => unsafe { erf512(&xs) },
                crate::matmul::Isa::Avx2 => unsafe { erf256(&xs) },
                _ => continue,
            };
            for (&x, &g) in xs.iter().zip(&got) {
                same64(g, libm::erf(x), "erf", x);
            }
        }
    }

    #[test]
    fn exp_lanes_equal_libm_exp_on_the_range_erf_uses() {
        let xs: Vec<f64> = f64_args()
            .into_iter()
            .map(|x| {
                if x.abs() < 40.0 {
                    x
                } else {
                    x.rem_euclid(40.0) - 38.0
                }
            })
            .filter(|x| x.is_finite())
            .collect();
        for &isa in isas() {
            // SAFETY: the ISA is supported.
            let got = match isa {
                crate::matmul::Isa::Avx512 => unsafe { exp512(&xs) },
                crate::matmul::Isa::Avx2 => unsafe { exp256(&xs) },
                _ => continue,
            };
            for (&x, &g) in xs.iter().zip(&got) {
                same64(g, libm::exp(x), "exp", x);
            }
        }
    }

    unsafe fn lanes32<V: F32x>(xs: &[f32], f: impl Fn(V) -> V) -> Vec<f32> {
        let mut out = std::vec![0f32; xs.len() + V::LANES];
        let mut buf = [0f32; 16];
        for (i, ch) in xs.chunks(V::LANES).enumerate() {
            buf[..ch.len()].copy_from_slice(ch);
            f(V::load(buf.as_ptr())).store(out.as_mut_ptr().add(i * V::LANES));
        }
        out.truncate(xs.len());
        out
    }

    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma")]
    unsafe fn tanh512(xs: &[f32]) -> Vec<f32> {
        lanes32::<__m512>(xs, |v| tanhf_v(v))
    }
    #[target_feature(enable = "avx2,fma")]
    unsafe fn tanh256(xs: &[f32]) -> Vec<f32> {
        lanes32::<__m256>(xs, |v| tanhf_v(v))
    }

    #[test]
    fn tanh_lanes_equal_libm_tanhf() {
        // Every 257th bit pattern (all signs and exponents), and dense over [-12, 12].
        let mut xs: Vec<f32> = (0..u32::MAX / 257)
            .map(|i| f32::from_bits(i * 257))
            .collect();
        xs.extend((0..2_400_001).map(|i| -12.0 + i as f32 * 1e-5));
        for &isa in isas() {
            // SAFETY: the ISA is supported.
            let got = match isa {
                crate::matmul::Isa::Avx512 => unsafe { tanh512(&xs) },
                crate::matmul::Isa::Avx2 => unsafe { tanh256(&xs) },
                _ => continue,
            };
            for (&x, &g) in xs.iter().zip(&got) {
                let want = libm::tanhf(x);
                assert!(
                    g.to_bits() == want.to_bits() || (g.is_nan() && want.is_nan()),
                    "{isa:?} tanhf({x:e}) = {g:e}, libm {want:e}"
                );
            }
        }
    }
}
