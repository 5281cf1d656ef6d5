//! Linear layers (PyTorch `nn.Linear`: `y = x Wᵀ + b`) and the rule that decides how
//! the UNet and VAE store their matmul weights.
//!
//! On the CPU with the `bf16` dtype, models run in mixed precision, the way PyTorch's
//! CPU autocast runs them: linear and convolution weights are packed once into bf16
//! ([`super::bf16`]) and multiplied in bf16 with f32 sums; everything between the
//! matmuls (norms, activations, softmax, residuals, the scheduler) stays in f32. The
//! weights' VarBuilder then has dtype `BF16` only as that signal: every tensor is read
//! from it as f32 ([`parameters`]). On other devices or dtypes, candle's `Linear`.

use std::sync::Arc;

use candle_core::{CpuStorage, CustomOp1, DType, Layout, Module, Result, Shape, Tensor};
use candle_nn::VarBuilder;

use super::bf16::{Options, PackedA, PackedB, gemm};
use super::contiguous_f32;

/// True when the layers built from `vb` are mixed precision (CPU and `BF16`).
pub fn packs_bf16(vb: &VarBuilder) -> bool {
    vb.device().is_cpu() && vb.dtype() == DType::BF16
}

/// The dtype of the activations of layers built from `vb`: f32 in mixed precision,
/// else the weights' dtype.
pub fn activation_dtype(vb: &VarBuilder) -> DType {
    if packs_bf16(vb) {
        DType::F32
    } else {
        vb.dtype()
    }
}

/// `vb` for reading parameters that stay in the activation dtype (norm scales,
/// biases, and matmul weights before they are packed).
pub fn parameters<'a>(vb: &VarBuilder<'a>) -> VarBuilder<'a> {
    vb.to_dtype(activation_dtype(vb))
}

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
        let (out_dim, in_dim) = weight.dims2()?;
        let w = weight.contiguous()?.flatten_all()?.to_vec1::<f32>()?;
        let bias = match bias {
            Some(b) => Some(Arc::new(b.to_vec1::<f32>()?)),
            None => None,
        };
        Ok(Self::Bf16(Bf16Linear {
            weight: Arc::new(PackedB::from_cols(&w, in_dim, out_dim, in_dim)),
            bias,
        }))
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

/// A linear layer with its weight packed in bf16, run on f32 activations.
#[derive(Debug, Clone)]
pub struct Bf16Linear {
    /// `Wᵀ` `[in, out]`, packed.
    weight: Arc<PackedB>,
    bias: Option<Arc<Vec<f32>>>,
}

impl CustomOp1 for Bf16Linear {
    fn name(&self) -> &'static str {
        "sdserve-bf16-linear"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = contiguous_f32(storage, layout, "linear", "input")?;
        let (k, n) = (self.weight.depth(), self.weight.cols());
        let dims = layout.shape().dims();
        if k == 0 || dims.last() != Some(&k) {
            candle_core::bail!("linear: input {:?} does not end in {k} features", dims);
        }
        let m = x.len() / k;
        let a = PackedA::from_rows(x, m, k, k);
        let mut opts = Options::default();
        let mut out = match &self.bias {
            // The products are accumulated onto the bias, written once.
            Some(b) => {
                let mut out = Vec::with_capacity(m * n);
                (0..m).for_each(|_| out.extend_from_slice(b));
                out
            }
            None => {
                opts.overwrite = true;
                vec![0f32; m * n]
            }
        };
        gemm(&a, &self.weight, &mut out, n, opts);
        let mut shape = dims.to_vec();
        *shape.last_mut().unwrap() = n;
        Ok((CpuStorage::F32(out), Shape::from(shape)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::diffusion::test_util::max_diff;
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
