//! Rotary position embedding, rotate-half convention (spec §7.2, §5.1(f)).

/// `x' = x·cos + rotate_half(x)·sin`, `rotate_half([a, b]) = [−b, a]` on the two halves.
/// `cos`/`sin` hold `head_dim` values (the angle table duplicated: `concat(θ, θ)`).
#[inline]
pub fn rope_rotate_half(x: &mut [f32], cos: &[f32], sin: &[f32]) {
    let d = x.len();
    let h = d / 2;
    for i in 0..h {
        let a = x[i];
        let b = x[i + h];
        x[i] = a * cos[i] - b * sin[i];
        x[i + h] = b * cos[i + h] + a * sin[i + h];
    }
}

/// RoPE on `n_heads` heads of `head_dim` at the start of each of `rows` rows of `x`
/// (`stride` apart), with per-row tables `cos`, `sin` `[rows, head_dim]`: the reference,
/// one [`rope_rotate_half`] per row and head.
pub fn rope_rows_ref(
    x: &mut [f32],
    rows: usize,
    n_heads: usize,
    head_dim: usize,
    stride: usize,
    cos: &[f32],
    sin: &[f32],
) {
    let shape = (rows, n_heads, head_dim, stride);
    check(x, shape, cos, sin);
    for r in 0..rows {
        let (cr, sr) = (
            &cos[r * head_dim..(r + 1) * head_dim],
            &sin[r * head_dim..(r + 1) * head_dim],
        );
        for h in 0..n_heads {
            let o = r * stride + h * head_dim;
            rope_rotate_half(&mut x[o..o + head_dim], cr, sr);
        }
    }
}

fn check(
    x: &[f32],
    (rows, n_heads, head_dim, stride): (usize, usize, usize, usize),
    cos: &[f32],
    sin: &[f32],
) {
    assert!(
        stride >= n_heads * head_dim,
        "rope: stride < n_heads·head_dim"
    );
    if rows > 0 {
        assert!(
            x.len() >= (rows - 1) * stride + n_heads * head_dim,
            "rope: x too short"
        );
        assert!(
            cos.len() >= rows * head_dim && sin.len() >= rows * head_dim,
            "rope: tables too short"
        );
    }
}

dispatch! {
    /// [`rope_rows_ref`] for `isa`, bit-identical to it (same products and sums per element;
    /// odd half-widths end in a masked vector).
    #[allow(clippy::too_many_arguments)]
    pub fn rope_rows(
        x: &mut [f32],
        rows: usize,
        n_heads: usize,
        head_dim: usize,
        stride: usize,
        cos: &[f32],
        sin: &[f32],
    ) => rope_v::<__m512 | __m256>, else rope_rows_ref
}

#[cfg(target_arch = "x86_64")]
use core::arch::x86_64::{__m256, __m512};

#[cfg(target_arch = "x86_64")]
use crate::simd::F32x;

#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn rope_v<V: F32x>(
    x: &mut [f32],
    rows: usize,
    n_heads: usize,
    head_dim: usize,
    stride: usize,
    cos: &[f32],
    sin: &[f32],
) {
    check(x, (rows, n_heads, head_dim, stride), cos, sin);
    let h = head_dim / 2;
    let xp = x.as_mut_ptr();
    for r in 0..rows {
        let (cr, sr) = (
            cos.as_ptr().add(r * head_dim),
            sin.as_ptr().add(r * head_dim),
        );
        for hh in 0..n_heads {
            let xh = xp.add(r * stride + hh * head_dim);
            let mut i = 0;
            while i < h {
                let n = V::LANES.min(h - i);
                let a = V::load_n(xh.add(i), n);
                let b = V::load_n(xh.add(i + h), n);
                // x[i] = a·cos[i] − b·sin[i]; x[i+h] = b·cos[i+h] + a·sin[i+h]
                let lo = a
                    .mul(V::load_n(cr.add(i), n))
                    .sub(b.mul(V::load_n(sr.add(i), n)));
                let hi = b
                    .mul(V::load_n(cr.add(i + h), n))
                    .add(a.mul(V::load_n(sr.add(i + h), n)));
                lo.store_n(xh.add(i), n);
                hi.store_n(xh.add(i + h), n);
                i += n;
            }
        }
    }
}
