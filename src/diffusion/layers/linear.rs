//! Linear layers (PyTorch `nn.Linear`: `y = x Wᵀ + b`): candle's, or in mixed
//! precision the bf16 kernel.

use candle_core::{Module, Result, Tensor};
use candle_nn::VarBuilder;

use super::{packs_bf16, parameters};
use crate::kernels::linear::Bf16Linear;

/// A linear layer; built by [`linear`], [`linear_no_bias`] or [`Linear::new`].
#[derive(Debug, Clone)]
pub enum Linear {
    Candle(candle_nn::Linear),
    Bf16(Bf16Linear),
}

/// `in_dim → out_dim` with bias from `vb` (`weight` `[out, in]`, `bias` `[out]`).
pub fn linear(in_dim: usize, out_dim: usize, vb: VarBuilder) -> Result<Linear> {
    let p = parameters(&vb);
    let w = p.get((out_dim, in_dim), "weight")?;
    let b = p.get(out_dim, "bias")?;
    Linear::new(w, Some(b), packs_bf16(&vb))
}

/// As [`linear`], without a bias.
pub fn linear_no_bias(in_dim: usize, out_dim: usize, vb: VarBuilder) -> Result<Linear> {
    let w = parameters(&vb).get((out_dim, in_dim), "weight")?;
    Linear::new(w, None, packs_bf16(&vb))
}

impl Linear {
    /// From `weight` `[out, in]` and `bias` `[out]`; `bf16` packs the weight (it
    /// must then be an f32 CPU tensor, as [`parameters`] reads it).
    pub fn new(weight: Tensor, bias: Option<Tensor>, bf16: bool) -> Result<Self> {
        if !bf16 {
            return Ok(Self::Candle(candle_nn::Linear::new(weight, bias)));
        }
        Ok(Self::Bf16(Bf16Linear::new(&weight, bias.as_ref())?))
    }

    /// Whether this layer is mixed precision (the layers around it then are too).
    pub fn is_bf16(&self) -> bool {
        matches!(self, Self::Bf16(_))
    }
}

impl Module for Linear {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        match self {
            Self::Candle(l) => l.forward(xs),
            Self::Bf16(l) => xs.contiguous()?.apply_op1_no_bwd(l),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::test_util::max_diff;
    use candle_core::Device;

    #[test]
    fn bf16_linear_matches_f32_within_bf16_rounding() {
        let dev = Device::Cpu;
        for (rows, k, n, bias) in [(77, 40, 24, true), (2, 320, 1280, true), (3, 33, 5, false)] {
            let x = Tensor::randn(0f32, 1.0, (1, rows, k), &dev).unwrap();
            let w = (Tensor::randn(0f32, 1.0, (n, k), &dev).unwrap() / (k as f64).sqrt()).unwrap();
            let b = bias.then(|| Tensor::randn(0f32, 1.0, n, &dev).unwrap());
            let want = candle_nn::Linear::new(w.clone(), b.clone())
                .forward(&x)
                .unwrap();
            let got = Linear::new(w, b, true).unwrap().forward(&x).unwrap();
            assert_eq!(got.dims(), want.dims());
            // Outputs are O(1); bf16 keeps 8 bits: relative error per product ~2^-9,
            // averaging out over k terms.
            let d = max_diff(&got, &want);
            assert!(d < 0.03, "rows {rows} k {k} n {n}: {d}");
            assert!(
                d > 0.0,
                "bf16 rounding left no trace: was the weight packed?"
            );
        }
    }
}
