//! Softmax helpers, including the decoder's unmasking primitive.

use crate::math::exp_f32;

/// In-place softmax of one row (attention probabilities). Max-subtracted; sum in f32 is
/// ample for attention rows (at most a few thousand keys).
#[inline]
pub fn softmax_inplace(x: &mut [f32]) {
    let mut m = f32::NEG_INFINITY;
    for &v in x.iter() {
        m = m.max(v);
    }
    let mut s = 0f32;
    for v in x.iter_mut() {
        *v = exp_f32(*v - m);
        s += *v;
    }
    let inv = 1.0 / s;
    for v in x.iter_mut() {
        *v *= inv;
    }
}

/// Greedy unmasking primitive (spec §8.6, §11 items 9 and 18): the arg-max token (lowest id
/// on ties) and its softmax probability over the whole row. `never` (the MASK id) is never
/// chosen but still counts in the denominator, so confidences equal the reference's. The
/// denominator is accumulated in f64: a sequential f32 sum over ~152k terms is off by up to
/// 1e-2 relative.
pub fn argmax_confidence(logits: &[f32], never: Option<usize>) -> (usize, f32) {
    if logits.is_empty() {
        return (0, 0.0);
    }
    let m = max_of(logits);
    // Best value among the allowed ids, then its first (lowest) index.
    let bv = match never {
        Some(nv) if nv < logits.len() => max_of(&logits[..nv]).max(max_of(&logits[nv + 1..])),
        _ => m,
    };
    let best = logits
        .iter()
        .enumerate()
        .position(|(i, &v)| v == bv && Some(i) != never)
        .unwrap_or(0);
    // Σ exp(z − m): 8-lane f32 partial sums over chunks of 256, chunks added in f64.
    let mut total = 0f64;
    for chunk in logits.chunks(256) {
        let mut lanes = [0f32; 8];
        let mut it = chunk.chunks_exact(8);
        for c in &mut it {
            for l in 0..8 {
                lanes[l] += exp_f32(c[l] - m);
            }
        }
        let mut s = 0f32;
        for &v in it.remainder() {
            s += exp_f32(v - m);
        }
        total += ((lanes[0] + lanes[4]) + (lanes[2] + lanes[6])) as f64
            + ((lanes[1] + lanes[5]) + (lanes[3] + lanes[7])) as f64
            + s as f64;
    }
    (best, (exp_f32(bv - m) as f64 / total) as f32)
}

/// Maximum of a slice (−inf when empty), in 8 lanes so it vectorises.
#[inline]
pub fn max_of(x: &[f32]) -> f32 {
    let mut lanes = [f32::NEG_INFINITY; 8];
    let mut it = x.chunks_exact(8);
    for c in &mut it {
        for l in 0..8 {
            lanes[l] = lanes[l].max(c[l]);
        }
    }
    let mut m = lanes.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
    for &v in it.remainder() {
        m = m.max(v);
    }
    m
}
