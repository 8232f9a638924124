//! Softmax helpers, including the decoder's unmasking primitive.

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
        *v = libm::expf(*v - m);
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
    let mut best = usize::MAX;
    let mut bv = f32::NEG_INFINITY;
    let mut m = f32::NEG_INFINITY;
    for (i, &v) in logits.iter().enumerate() {
        m = m.max(v);
        if Some(i) != never && (v > bv || best == usize::MAX) {
            bv = v;
            best = i;
        }
    }
    let mut s = 0f64;
    for &v in logits {
        s += libm::exp((v - m) as f64);
    }
    (best, (libm::exp((bv - m) as f64) / s) as f32)
}
