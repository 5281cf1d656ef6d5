//! GroupNorm (Wu & He 2018; PyTorch `nn.GroupNorm`), optionally fused with the
//! SiLU that follows it in every diffusers resnet and output block.
//!
//! candle 0.11's GroupNorm makes about nine passes over the activation (sum,
//! subtract, square, sum, divide, reshape, scale, shift), each allocating a
//! tensor; at 512 px the VAE's activations are 130 MB each. On the CPU in f32
//! this does one pass for the statistics (f64 accumulators) and one that
//! writes `silu?(x * scale + shift)`, one group per task across all cores.
//! Other devices and dtypes use candle's implementation (+ `silu()`).

use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape};
use rayon::prelude::*;

use super::contiguous_f32;

const OP: &str = "group_norm";

/// `silu?(group_norm(x))` over `[b, c, ...]` with `weight` and `bias` `[c]`
/// as its second and third operands.
pub struct FusedGroupNorm {
    pub groups: usize,
    pub eps: f64,
    /// Apply SiLU to the result (in the same pass).
    pub silu: bool,
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
                *o = y / (1.0 + super::math::exp(-y));
            }
        } else {
            for (o, &v) in d.iter_mut().zip(s) {
                *o = v * scale + shift;
            }
        }
    }
}
