//! Scaled dot-product attention where each query sees one contiguous range of keys.
//!
//! Both attention patterns of the model reduce to that: block-causal text attention (a query
//! in block b sees keys `[0, (b+1)·B)`, spec §7.3) and the vision tower's segment / window
//! attention (a query sees its own segment `[s0, s1)`, spec §5.1(f)). GQA: query head `h`
//! reads kv head `h / (n_heads / n_kv_heads)`.

use crate::matmul::{dot, Isa};
use crate::softmax::softmax_inplace;

#[derive(Clone, Copy, Debug)]
pub struct AttnShape {
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    /// Row strides (in f32) of q / out and of k / v.
    pub q_stride: usize,
    pub kv_stride: usize,
}

/// Attention for query rows `q_rows` (each `q_stride` long, heads contiguous), writing the
/// same rows of `out`. `key_range(i)` gives the visible keys of query `i` (index into the
/// rows of `k`/`v`). `scores` is scratch of at least the longest range. `isa` selects the
/// instruction set the (auto-vectorised) loops are compiled for; results are identical in
/// structure, rounding may differ between ISAs.
#[allow(clippy::too_many_arguments)]
pub fn attention<F: Fn(usize) -> (usize, usize)>(
    isa: Isa,
    q: &[f32],
    n_q: usize,
    k: &[f32],
    v: &[f32],
    out: &mut [f32],
    s: AttnShape,
    scale: f32,
    key_range: F,
    scores: &mut [f32],
) {
    match isa {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: Isa values come from cpu::detect_isa, which checked CPU and OS support.
        Isa::Avx512 => unsafe { attention_avx512(q, n_q, k, v, out, s, scale, &key_range, scores) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as above.
        Isa::Avx2 => unsafe { attention_avx2(q, n_q, k, v, out, s, scale, &key_range, scores) },
        _ => attention_body(q, n_q, k, v, out, s, scale, &key_range, scores),
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma")]
#[allow(clippy::too_many_arguments)]
unsafe fn attention_avx512(
    q: &[f32],
    n_q: usize,
    k: &[f32],
    v: &[f32],
    out: &mut [f32],
    s: AttnShape,
    scale: f32,
    key_range: &dyn Fn(usize) -> (usize, usize),
    scores: &mut [f32],
) {
    attention_body(q, n_q, k, v, out, s, scale, key_range, scores)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[allow(clippy::too_many_arguments)]
unsafe fn attention_avx2(
    q: &[f32],
    n_q: usize,
    k: &[f32],
    v: &[f32],
    out: &mut [f32],
    s: AttnShape,
    scale: f32,
    key_range: &dyn Fn(usize) -> (usize, usize),
    scores: &mut [f32],
) {
    attention_body(q, n_q, k, v, out, s, scale, key_range, scores)
}

#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn attention_body(
    q: &[f32],
    n_q: usize,
    k: &[f32],
    v: &[f32],
    out: &mut [f32],
    s: AttnShape,
    scale: f32,
    key_range: &dyn Fn(usize) -> (usize, usize),
    scores: &mut [f32],
) {
    let group = s.n_heads / s.n_kv_heads;
    let hd = s.head_dim;
    for i in 0..n_q {
        let (lo, hi) = key_range(i);
        let n_keys = hi - lo;
        for h in 0..s.n_heads {
            let kvh = h / group;
            let qv = &q[i * s.q_stride + h * hd..i * s.q_stride + (h + 1) * hd];
            let sc = &mut scores[..n_keys];
            for (jj, slot) in sc.iter_mut().enumerate() {
                let j = lo + jj;
                let kr = &k[j * s.kv_stride + kvh * hd..j * s.kv_stride + (kvh + 1) * hd];
                *slot = dot(qv, kr) * scale;
            }
            softmax_inplace(sc);
            let o = &mut out[i * s.q_stride + h * hd..i * s.q_stride + (h + 1) * hd];
            o.fill(0.0);
            for (jj, &p) in sc.iter().enumerate() {
                let j = lo + jj;
                let vr = &v[j * s.kv_stride + kvh * hd..j * s.kv_stride + (kvh + 1) * hd];
                for (od, &vd) in o.iter_mut().zip(vr) {
                    *od += p * vd;
                }
            }
        }
    }
}
