//! Reference kernels: the plain loops the fast kernels are tested against. Accumulation in
//! f64, no blocking, no dispatch. Slow on purpose; never on a hot path.

use crate::WeightElem;

/// `out[i·n + j] = Σ x[i·k + kk] · w[j·k + kk] + bias[j]`.
pub fn matmul<W: WeightElem>(
    x: &[f32],
    m: usize,
    k: usize,
    w: &[W],
    n: usize,
    bias: Option<&[f32]>,
    out: &mut [f32],
) {
    for i in 0..m {
        for j in 0..n {
            let mut acc = bias.map_or(0.0, |b| b[j] as f64);
            for kk in 0..k {
                acc += x[i * k + kk] as f64 * w[j * k + kk].to_f32() as f64;
            }
            out[i * n + j] = acc as f32;
        }
    }
}

/// Attention with an explicit visibility predicate (the mask as a function), f64 softmax.
/// Scores are recomputed per pass instead of stored, so the reference needs no scratch.
#[allow(clippy::too_many_arguments)]
pub fn attention<F: Fn(usize, usize) -> bool>(
    q: &[f32],
    n_q: usize,
    k: &[f32],
    v: &[f32],
    n_k: usize,
    n_heads: usize,
    n_kv_heads: usize,
    head_dim: usize,
    scale: f32,
    visible: F,
    out: &mut [f32],
) {
    let group = n_heads / n_kv_heads;
    let qs = n_heads * head_dim;
    let ks = n_kv_heads * head_dim;
    for i in 0..n_q {
        for h in 0..n_heads {
            let kvh = h / group;
            let score = |j: usize| {
                let mut d = 0f64;
                for t in 0..head_dim {
                    d +=
                        q[i * qs + h * head_dim + t] as f64 * k[j * ks + kvh * head_dim + t] as f64;
                }
                d * scale as f64
            };
            let mut m = f64::NEG_INFINITY;
            for j in (0..n_k).filter(|&j| visible(i, j)) {
                m = m.max(score(j));
            }
            let mut sum = 0f64;
            for j in (0..n_k).filter(|&j| visible(i, j)) {
                sum += libm::exp(score(j) - m);
            }
            for t in 0..head_dim {
                out[i * qs + h * head_dim + t] = 0.0;
            }
            for j in (0..n_k).filter(|&j| visible(i, j)) {
                let p = libm::exp(score(j) - m) / sum;
                for t in 0..head_dim {
                    let o = &mut out[i * qs + h * head_dim + t];
                    *o = (*o as f64 + p * v[j * ks + kvh * head_dim + t] as f64) as f32;
                }
            }
        }
    }
}
