//! Normalisations. Statistics are accumulated in f64: it costs nothing next to the matmuls
//! and keeps the result within rounding of the float64 golden data (spec §11 items 2–3).

use crate::WeightElem;

/// RMSNorm (spec §7.1): `out = w ⊙ (x / sqrt(mean(x²) + eps))`.
pub fn rms_norm<W: WeightElem>(x: &[f32], w: &[W], eps: f32, out: &mut [f32]) {
    let n = x.len();
    let mut ss = 0f64;
    for &v in x {
        ss += (v as f64) * (v as f64);
    }
    let inv = 1.0 / libm::sqrt(ss / n as f64 + eps as f64);
    for i in 0..n {
        out[i] = ((x[i] as f64 * inv) as f32) * w[i].to_f32();
    }
}

/// LayerNorm with affine weight and bias (SigLIP, spec §5.2).
pub fn layer_norm<W: WeightElem>(x: &[f32], w: &[W], b: &[W], eps: f32, out: &mut [f32]) {
    let n = x.len() as f64;
    let mean = x.iter().map(|&v| v as f64).sum::<f64>() / n;
    let var = x
        .iter()
        .map(|&v| (v as f64 - mean) * (v as f64 - mean))
        .sum::<f64>()
        / n;
    let inv = 1.0 / libm::sqrt(var + eps as f64);
    for i in 0..x.len() {
        out[i] = (((x[i] as f64 - mean) * inv) as f32) * w[i].to_f32() + b[i].to_f32();
    }
}
