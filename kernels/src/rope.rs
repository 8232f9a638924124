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
