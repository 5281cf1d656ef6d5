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

    /// `(xs Wᵀ + b)ᵀ` for `xs` `[batch, tokens, in]`: `[batch, out, tokens]`, for a
    /// projection back to a channel-first feature map. In f32 it is computed as
    /// `W · xsᵀ`, whose output needs no transpose copy; in mixed precision it is the
    /// bf16 product, transposed.
    pub fn forward_channel_first(&self, xs: &Tensor) -> Result<Tensor> {
        match self {
            Self::Candle(l) => {
                let out = l.weight().broadcast_left(xs.dim(0)?)?.matmul(&xs.t()?)?;
                match l.bias() {
                    Some(b) => out.broadcast_add(&b.reshape((b.dim(0)?, 1))?),
                    None => Ok(out),
                }
            }
            Self::Bf16(_) => self.forward(xs)?.t()?.contiguous(),
        }
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
    fn channel_first_equals_the_token_major_product_transposed() {
        let dev = Device::Cpu;
        let tokens = Tensor::randn(0f32, 1f32, (2, 6, 4), &dev).unwrap();
        let w = Tensor::randn(0f32, 1f32, (3, 4), &dev).unwrap();
        let bias = Tensor::randn(0f32, 1f32, 3, &dev).unwrap();
        for bf16 in [false, true] {
            let lin = Linear::new(w.clone(), Some(bias.clone()), bf16).unwrap();
            let want = lin.forward(&tokens).unwrap().transpose(1, 2).unwrap();
            let got = lin.forward_channel_first(&tokens).unwrap();
            assert_eq!(got.dims(), &[2, 3, 6]);
            assert!(max_diff(&got, &want) < 1e-6, "bf16 {bf16}");
        }
    }

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
