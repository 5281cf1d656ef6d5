//! GroupNorm (Wu & He 2018; PyTorch `nn.GroupNorm`), optionally fused with the
//! SiLU that follows it in every diffusers resnet and output block.
//!
//! candle 0.11's GroupNorm makes about nine passes over the activation (sum,
//! subtract, square, sum, divide, reshape, scale, shift), each allocating a
//! tensor; at 512 px the VAE's activations are 130 MB each. On the CPU in f32
//! this does one pass for the statistics (f64 accumulators) and one that
//! writes `silu?(x * scale + shift)`, one group per task across all cores.
//! Other devices and dtypes use candle's implementation (+ `silu()`).

use candle_core::{CpuStorage, CustomOp3, DType, Layout, Module, Result, Shape, Tensor};
use candle_nn::VarBuilder;
use rayon::prelude::*;

use super::contiguous_f32;

const OP: &str = "group_norm";

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
    let vb = super::linear::parameters(&vb);
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

struct FusedGroupNorm {
    groups: usize,
    eps: f64,
    silu: bool,
}

impl CustomOp3 for FusedGroupNorm {
    fn name(&self) -> &'static str {
        "sdserve-group-norm"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = contiguous_f32(s1, l1, OP, "input")?;
        let weight = contiguous_f32(s2, l2, OP, "weight")?;
        let bias = contiguous_f32(s3, l3, OP, "bias")?;
        let dims = l1.shape().dims();
        let c = dims[1];
        if !c.is_multiple_of(self.groups) || weight.len() != c || bias.len() != c {
            candle_core::bail!(
                "group_norm: {c} channels, {} groups, {} weights",
                self.groups,
                weight.len()
            );
        }
        let spatial: usize = dims[2..].iter().product();
        let per_group = c / self.groups;
        let block = per_group * spatial;
        let mut out = vec![0f32; x.len()];
        if block == 0 {
            return Ok((CpuStorage::F32(out), l1.shape().clone()));
        }
        out.par_chunks_mut(block)
            .zip(x.par_chunks(block))
            .enumerate()
            .for_each(|(i, (dst, src))| {
                let g = i % self.groups;
                let chans = g * per_group..(g + 1) * per_group;
                let group = Group {
                    spatial,
                    weight: &weight[chans.clone()],
                    bias: &bias[chans],
                    eps: self.eps,
                    silu: self.silu,
                };
                normalize(&group, dst, src);
            });
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }
}

/// One group's channels: their scales, shifts and plane size.
struct Group<'a> {
    spatial: usize,
    weight: &'a [f32],
    bias: &'a [f32],
    eps: f64,
    silu: bool,
}

simd_dispatch! {
    /// Normalises one group (`src` → `dst`), with AVX-512 or AVX2 where the CPU has them.
    fn normalize(g: &Group, dst: &mut [f32], src: &[f32]) => normalize_body
}

/// Independent f64 accumulators (one AVX-512 register), so the sums vectorise.
const LANES: usize = 8;

/// Sum of `f(x)` over `xs` in f64, in [`LANES`] independent lanes.
#[inline(always)]
fn sum_f64(xs: &[f32], f: impl Fn(f64) -> f64) -> f64 {
    let mut lanes = [0f64; LANES];
    let mut chunks = xs.chunks_exact(LANES);
    for c in &mut chunks {
        for i in 0..LANES {
            lanes[i] += f(c[i] as f64);
        }
    }
    lanes.iter().sum::<f64>() + chunks.remainder().iter().map(|&v| f(v as f64)).sum::<f64>()
}

#[inline(always)]
fn normalize_body(g: &Group, dst: &mut [f32], src: &[f32]) {
    let n = src.len() as f64;
    // Two passes like torch/candle (mean, then squared deviations), in f64.
    let mean = sum_f64(src, |v| v) / n;
    let var = sum_f64(src, |v| (v - mean) * (v - mean)) / n;
    let rstd = 1.0 / (var + g.eps).sqrt();
    let planes = dst
        .chunks_exact_mut(g.spatial)
        .zip(src.chunks_exact(g.spatial));
    for ((d, s), (&w, &b)) in planes.zip(g.weight.iter().zip(g.bias)) {
        let scale = (rstd * w as f64) as f32;
        let shift = (b as f64 - mean * rstd * w as f64) as f32;
        if g.silu {
            for (o, &v) in d.iter_mut().zip(s) {
                let y = v * scale + shift;
                *o = y / (1.0 + super::attention::exp(-y));
            }
        } else {
            for (o, &v) in d.iter_mut().zip(s) {
                *o = v * scale + shift;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::diffusion::test_util::max_diff;
    use candle_core::Device;

    fn fixed(dims: &[usize], salt: f32, scale: f32, offset: f32) -> Tensor {
        let n: usize = dims.iter().product();
        let data: Vec<f32> = (0..n)
            .map(|i| ((i as f32 * 12.9898 + salt).sin() * 43758.547).fract() * scale + offset)
            .collect();
        Tensor::from_vec(data, dims, &Device::Cpu).unwrap()
    }

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
