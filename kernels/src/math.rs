//! Branch-free f32 exponential that LLVM vectorises (libm's `expf` is a scalar call, and the
//! unmasking pass evaluates ~1.2M of them per denoising step).

const LOG2E: f32 = core::f32::consts::LOG2_E;
/// ln 2 split in two so `n·ln2` is exact in the first part (Cody–Waite reduction).
const LN2_HI: f32 = 0.693_359_4; // 0.693359375 = 355/512, exact in f32
const LN2_LO: f32 = -2.121_944_4e-4;
/// 1.5·2²³: adding and subtracting it rounds to the nearest integer in f32.
const ROUND: f32 = 12_582_912.0;

/// `e^x` within ~2 ulp for x in [-87.3, 88.7]; 0 below, +inf above.
#[inline(always)]
pub fn exp_f32(x: f32) -> f32 {
    let xc = x.clamp(-87.3, 88.7);
    let t = xc * LOG2E + ROUND;
    let n = t - ROUND;
    let r = xc - n * LN2_HI - n * LN2_LO;
    // Minimax polynomial for e^r on |r| <= ln2/2 (Cephes expf coefficients).
    let mut p = 1.987_569_1e-4f32;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 1.666_666_5e-1;
    p = p * r + 0.5;
    let e = p * r * r + r + 1.0;
    // 2ⁿ straight from t's bits: t = 1.5·2²³ + n has ulp 1, so its low mantissa bits hold
    // n (offset by ROUND's bits). Integer ops only: a float→int cast (`n as i32`) saturates
    // and checks NaN lane by lane, which stops LLVM from vectorising the whole loop.
    let scale = f32::from_bits(
        t.to_bits()
            .wrapping_sub(ROUND.to_bits())
            .wrapping_add(127)
            .wrapping_shl(23),
    );
    let v = e * scale;
    let v = if x < -87.3 { 0.0 } else { v };
    if x > 88.7 {
        f32::INFINITY
    } else {
        v
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn exp_is_accurate_over_its_range() {
        let mut worst = 0f64;
        let mut x = -87.0f32;
        while x < 88.0 {
            let want = (x as f64).exp();
            let got = super::exp_f32(x) as f64;
            worst = worst.max(((got - want) / want).abs());
            x += 0.0137;
        }
        assert!(worst < 3e-7, "worst relative error {worst}");
        assert_eq!(super::exp_f32(-200.0), 0.0);
        assert_eq!(super::exp_f32(0.0), 1.0);
    }
}
