//! GroupNorm layers (PyTorch `nn.GroupNorm`), optionally fused with the SiLU
//! that follows: the CPU kernel in f32 (unless plain kernels are asked for),
//! else candle's (+ `silu()`).

use candle_core::{DType, Module, Result, Tensor};
use candle_nn::VarBuilder;

use crate::kernels::norm::FusedGroupNorm;

/// A GroupNorm layer; built by [`group_norm`] like `candle_nn::group_norm`.
#[derive(Debug, Clone)]
pub struct GroupNorm {
    candle: candle_nn::GroupNorm,
    weight: Tensor,
    bias: Tensor,
    groups: usize,
    eps: f64,
}

/// Loads `weight` and `bias` `[channels]` from `vb`.
pub fn group_norm(groups: usize, channels: usize, eps: f64, vb: VarBuilder) -> Result<GroupNorm> {
    let vb = super::parameters(&vb);
    let weight = vb.get(channels, "weight")?;
    let bias = vb.get(channels, "bias")?;
    let candle = candle_nn::GroupNorm::new(weight.clone(), bias.clone(), channels, groups, eps)?;
    Ok(GroupNorm {
        candle,
        weight,
        bias,
        groups,
        eps,
    })
}

impl GroupNorm {
    fn fast(&self, xs: &Tensor) -> bool {
        !super::plain_kernels()
            && xs.device().is_cpu()
            && xs.dtype() == DType::F32
            && self.weight.dtype() == DType::F32
            && xs.rank() >= 3
    }

    fn run(&self, xs: &Tensor, silu: bool) -> Result<Tensor> {
        let op = FusedGroupNorm {
            groups: self.groups,
            eps: self.eps,
            silu,
        };
        xs.contiguous()?
            .apply_op3_no_bwd(&self.weight.contiguous()?, &self.bias.contiguous()?, &op)
    }

    /// `silu(group_norm(xs))`, in one pass on the CPU.
    pub fn forward_silu(&self, xs: &Tensor) -> Result<Tensor> {
        if self.fast(xs) {
            self.run(xs, true)
        } else {
            self.candle.forward(xs)?.silu()
        }
    }
}

impl GroupNorm {
    /// `group_norm(xs)` for `xs` `[b, c, h, w]` as contiguous tokens `[b, h*w, c]`
    /// (diffusers' `permute(0, 2, 3, 1).reshape(b, h*w, c)`): one copy, so the
    /// matmuls that follow see plain row-major input (a transposed view would take
    /// candle 0.11's CPU matmul down a path that mis-strides transposed inputs
    /// against a batch-broadcast weight).
    pub fn forward_tokens(&self, xs: &Tensor) -> Result<Tensor> {
        let (b, c, h, w) = xs.dims4()?;
        self.forward(xs)?
            .reshape((b, c, h * w))?
            .transpose(1, 2)?
            .contiguous()
    }
}

impl Module for GroupNorm {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        if self.fast(xs) {
            self.run(xs, false)
        } else {
            self.candle.forward(xs)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::test_util::{fixed, max_diff};

    #[test]
    fn matches_candle_with_and_without_silu() {
        for (dims, groups) in [
            (vec![2, 32, 6, 8], 32),
            (vec![1, 64, 5, 7], 32),
            (vec![2, 32, 48], 8),
            (vec![1, 8, 3, 3], 1),
        ] {
            let c = dims[1];
            // An offset mean and a large spread, as real activations have.
            let x = fixed(&dims, 0.1, 6.0, 2.5);
            let w = fixed(&[c], 0.2, 2.0, 0.0);
            let b = fixed(&[c], 0.3, 1.0, 0.0);
            let candle = candle_nn::GroupNorm::new(w.clone(), b.clone(), c, groups, 1e-6).unwrap();
            let ours = GroupNorm {
                candle: candle.clone(),
                weight: w,
                bias: b,
                groups,
                eps: 1e-6,
            };
            let want = candle.forward(&x).unwrap();
            assert!(
                max_diff(&ours.forward(&x).unwrap(), &want) < 2e-5,
                "{dims:?}"
            );
            let want = want.silu().unwrap();
            assert!(
                max_diff(&ours.forward_silu(&x).unwrap(), &want) < 2e-5,
                "{dims:?} silu"
            );
        }
    }
}
