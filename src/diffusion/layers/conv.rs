//! Convolution layers (PyTorch `nn.Conv2d`, NCHW): the CPU kernel in f32,
//! the bf16-packed kernel in mixed precision, else candle's conv2d.

use candle_core::{DType, Module, Result, Tensor};
use candle_nn::{Conv2dConfig, VarBuilder};

use super::{packs_bf16, parameters, plain_kernels};
use crate::kernels::conv::{Bf16Conv, CpuConv};

/// A convolution layer; built by [`conv2d`] like `candle_nn::conv2d`.
#[derive(Debug, Clone)]
pub enum Conv2d {
    /// candle's layer, and the CPU f32 kernel when this layer can use it.
    Candle {
        candle: candle_nn::Conv2d,
        cpu: Option<CpuConv>,
    },
    /// Mixed precision: bf16 packed weight, f32 activations.
    Bf16(Bf16Conv),
}

/// Loads `weight` `[out, in, k, k]` and `bias` `[out]` from `vb`, like
/// `candle_nn::conv2d`.
pub fn conv2d(
    in_channels: usize,
    out_channels: usize,
    kernel: usize,
    cfg: Conv2dConfig,
    vb: VarBuilder,
) -> Result<Conv2d> {
    let candle = candle_nn::conv2d(in_channels, out_channels, kernel, cfg, parameters(&vb))?;
    if packs_bf16(&vb) {
        Conv2d::bf16(candle, cfg)
    } else {
        Conv2d::new(candle, cfg)
    }
}

impl Conv2d {
    fn new(candle: candle_nn::Conv2d, cfg: Conv2dConfig) -> Result<Self> {
        let cpu = CpuConv::new(&candle, cfg)?;
        Ok(Self::Candle { candle, cpu })
    }

    /// Packs `candle`'s f32 weight in bf16 (when the geometry allows; else keeps
    /// candle's layer).
    fn bf16(candle: candle_nn::Conv2d, cfg: Conv2dConfig) -> Result<Self> {
        match Bf16Conv::pack(&candle, cfg)? {
            Some(op) => Ok(Self::Bf16(op)),
            None => Self::new(candle, cfg),
        }
    }
}

impl Module for Conv2d {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        match self {
            Self::Candle {
                candle,
                cpu: Some(op),
            } if xs.device().is_cpu() && xs.dtype() == DType::F32 && !plain_kernels() => {
                // Loaded weights are contiguous already; this is then free.
                let w = candle.weight().contiguous()?;
                xs.contiguous()?.apply_op2_no_bwd(&w, op)
            }
            Self::Candle { candle, .. } => candle.forward(xs),
            Self::Bf16(op) => xs.contiguous()?.apply_op1_no_bwd(op),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::test_util::{self, max_rel_diff};

    fn fixed(dims: &[usize], salt: f32) -> Tensor {
        test_util::fixed(dims, salt, 2.0, -1.0)
    }

    #[test]
    fn matches_candle_for_every_shape_the_models_use() {
        // (batch, c_in, c_out, h, w, kernel, stride, padding, bias)
        let cases = [
            (2, 4, 32, 12, 8, 3, 1, 1, true),   // conv_in
            (2, 32, 32, 12, 8, 3, 1, 1, true),  // resnet
            (1, 32, 64, 9, 7, 3, 1, 1, false),  // odd sizes, no bias
            (2, 32, 64, 12, 8, 1, 1, 0, true),  // 1x1 shortcut
            (2, 32, 32, 12, 8, 3, 2, 1, true),  // downsample
            (1, 16, 16, 7, 5, 3, 2, 1, true),   // odd downsample
            (1, 8, 8, 6, 6, 3, 2, 0, true),     // VAE-encoder style, no padding
            (2, 64, 32, 80, 64, 3, 1, 1, true), // several tiles (parallel path)
        ];
        for (b, ci, co, h, w, k, s, p, bias) in cases {
            let x = fixed(&[b, ci, h, w], 0.1);
            let weight = fixed(&[co, ci, k, k], 0.2);
            let bias = bias.then(|| fixed(&[co], 0.3));
            let cfg = Conv2dConfig {
                padding: p,
                stride: s,
                ..Default::default()
            };
            let candle = candle_nn::Conv2d::new(weight, bias, cfg);
            let want = candle.forward(&x).unwrap();
            let ours = Conv2d::new(candle.clone(), cfg).unwrap();
            assert!(matches!(ours, Conv2d::Candle { cpu: Some(_), .. }));
            let got = ours.forward(&x).unwrap();
            assert_eq!(got.dims(), want.dims(), "{b} {ci} {co} {h} {w} {k} {s} {p}");
            let d = max_rel_diff(&got, &want);
            assert!(d < 1e-5, "case {b} {ci} {co} {h}x{w} k{k} s{s} p{p}: {d}");
            // Mixed precision: bf16 operands, f32 sums; ~2^-9 relative per product.
            let mixed = Conv2d::bf16(candle, cfg).unwrap();
            assert!(matches!(mixed, Conv2d::Bf16(_)));
            let got = mixed.forward(&x).unwrap();
            assert_eq!(got.dims(), want.dims());
            let d = max_rel_diff(&got, &want);
            assert!(
                d < 1e-2 && d > 0.0,
                "bf16 case {b} {ci} {co} {h}x{w} k{k} s{s} p{p}: {d}"
            );
        }
    }

    /// Reading the input in place (channel pairs) gives exactly what unfolding it
    /// gives: the same bf16 products summed in the same order.
    #[test]
    fn non_contiguous_input_is_handled() {
        let x = fixed(&[1, 8, 6, 10], 0.4).transpose(2, 3).unwrap();
        let cfg = Conv2dConfig {
            padding: 1,
            ..Default::default()
        };
        let candle = candle_nn::Conv2d::new(fixed(&[4, 8, 3, 3], 0.5), None, cfg);
        let want = candle.forward(&x.contiguous().unwrap()).unwrap();
        let got = Conv2d::new(candle, cfg).unwrap().forward(&x).unwrap();
        assert!(max_rel_diff(&got, &want) < 1e-5);
    }
}
