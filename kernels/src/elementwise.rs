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
