//! Scalar f32 math for the kernels' inner loops, written branch-free so the
//! loops around them vectorise.

/// `eˣ` in f32, branch-free so loops over it vectorise: Cody-Waite reduction
/// `x = n ln 2 + r`, `|r| ≤ ln 2 / 2`, and Cephes' `expf` polynomial for `eʳ`, about
/// 1 ulp. Inputs are clamped to [-87.3, 88.3], where the result is a normal f32.
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    // ln 2 = LN2_HI + LN2_LO, LN2_HI with few enough bits that n · LN2_HI is exact.
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // 1.5 · 2²³: adding it rounds to the nearest integer, which lands in the low
    // mantissa bits.
    const SHIFTER: f32 = 12_582_912.0;
    let x = if x < -87.3 { -87.3 } else { x };
    let x = if x > 88.3 { 88.3 } else { x };
    let t = x * LOG2E + SHIFTER;
    let n = t - SHIFTER;
    let r = x - n * LN2_HI - n * LN2_LO;
    let p = ((((1.987_569_2e-4 * r + 1.398_199_9e-3) * r + 8.333_452e-3) * r + 4.166_579_6e-2) * r
        + 1.666_666_5e-1)
        * r
        + 0.5; // Cephes: 5.0000001201e-1, which is 0.5 in f32
    let e = p * r * r + r + 1.0;
    // 2ⁿ from n's bits: t's mantissa holds n + 2²², so t.bits - bits(1.5·2²³) = n.
    let n_int = (t.to_bits() as i32).wrapping_sub(SHIFTER.to_bits() as i32);
    e * f32::from_bits(((n_int + 127) << 23) as u32)
}

/// The exact GELU, `x Φ(x) = x (1 + erf(x / √2)) / 2`.
#[inline(always)]
pub fn gelu(x: f32) -> f32 {
    0.5 * x * (1.0 + erf(x * std::f32::consts::FRAC_1_SQRT_2))
}

/// `erf(x)`, branch-free so loops over it vectorise: Abramowitz & Stegun 7.1.26
/// (absolute error below 1.5e-7 in exact arithmetic, 5e-7 measured in f32: far below
/// the bf16 rounding of the matmuls around it, 2^-9 relative).
#[inline(always)]
pub fn erf(x: f32) -> f32 {
    let a = x.abs();
    let t = 1.0 / (1.0 + 0.327_591_1 * a);
    let poly = ((((1.061_405_4 * t - 1.453_152) * t + 1.421_413_8) * t - 0.284_496_72) * t
        + 0.254_829_6)
        * t;
    let y = 1.0 - poly * exp(-a * a);
    y.copysign(x)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn erf_is_within_6e7_of_f64() {
        let mut worst = 0f64;
        for i in -40_000..=40_000 {
            let x = i as f32 * 1e-4;
            let want = erf_f64(x as f64);
            worst = worst.max((erf(x) as f64 - want).abs());
        }
        assert!(worst < 6e-7, "{worst}");
        assert!(worst > 0.0);
        assert!(erf(0.0).abs() < 2e-7);
        assert_eq!(erf(10.0), 1.0);
        assert_eq!(erf(-10.0), -1.0);
    }

    /// erf in f64 from its Taylor series (|x| <= 4 here, 60 terms are plenty) for
    /// small |x| and the continued fraction of erfc beyond.
    fn erf_f64(x: f64) -> f64 {
        let a = x.abs();
        let r = if a < 2.5 {
            let (mut term, mut sum) = (a, a);
            for n in 1..80 {
                term *= -a * a / n as f64;
                sum += term / (2 * n + 1) as f64;
            }
            sum * 2.0 / std::f64::consts::PI.sqrt()
        } else {
            // erfc(a) = exp(-a²)/√π · 1/(a + 1/2/(a + 1/(a + 3/2/(a + ...))))
            let mut f = 0.0;
            for k in (1..60).rev() {
                f = (k as f64 / 2.0) / (a + f);
            }
            1.0 - (-a * a).exp() / std::f64::consts::PI.sqrt() / (a + f)
        };
        r.copysign(x)
    }
}
