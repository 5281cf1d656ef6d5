//! The encoder half of diffusers' `AutoencoderKL`: `Encoder` — `conv_in`,
//! `DownEncoderBlock2D`s (resnets, then a stride-2 `Downsample2D` padded at the
//! bottom and right, except the last block), `UNetMidBlock2D`, GroupNorm, SiLU,
//! `conv_out` to twice the latent channels (`double_z`) — then `quant_conv`,
//! giving the moments of a diagonal Gaussian posterior ([`DiagonalGaussian`]).
//! Follows diffusers 0.42 `models/autoencoders/vae.py::{Encoder,
//! DiagonalGaussianDistribution}`, `unets/unet_2d_blocks.py::DownEncoderBlock2D`
//! and `autoencoder_kl.py::AutoencoderKL._encode`.

use candle_core::{Module, Result, Tensor};
use candle_nn::VarBuilder;

use super::blocks::{EPS, MidBlock, conv3, resnet};
use crate::diffusion::layers::conv::{Conv2d, conv2d};
use crate::diffusion::layers::norm::{GroupNorm, group_norm};
use crate::diffusion::layers::resnet::{Downsample2D, ResnetBlock2D};
use crate::diffusion::loading::config::VaeConfig;

/// `DownEncoderBlock2D`: resnets, then (except the last block) `Downsample2D`
/// with `padding=0` (diffusers' `downsample_padding` for the VAE).
#[derive(Debug)]
struct DownBlock {
    resnets: Vec<ResnetBlock2D>,
    downsample: Option<Downsample2D>,
}

/// The VAE encoder: images in [-1, 1] to the posterior over latents.
#[derive(Debug)]
pub struct VaeEncoder {
    conv_in: Conv2d,
    down_blocks: Vec<DownBlock>,
    mid: MidBlock,
    norm_out: GroupNorm,
    conv_out: Conv2d,
    quant_conv: Option<Conv2d>,
}

impl VaeEncoder {
    /// Builds the encoder from `vb`, the VAE's weights, for a config
    /// [`super::AutoencoderKL::new`] has checked.
    pub(super) fn build(vb: VarBuilder, cfg: &VaeConfig) -> Result<Self> {
        let groups = cfg.norm_num_groups;
        let moments = 2 * cfg.latent_channels;
        let quant_conv = if cfg.use_quant_conv {
            Some(conv2d(
                moments,
                moments,
                1,
                Default::default(),
                vb.pp("quant_conv"),
            )?)
        } else {
            None
        };
        let vb = vb.pp("encoder");
        let channels = &cfg.block_out_channels;
        let mut prev = channels[0];
        let mut down_blocks = Vec::with_capacity(channels.len());
        for (i, &out) in channels.iter().enumerate() {
            let b = vb.pp(format!("down_blocks.{i}"));
            let resnets = (0..cfg.layers_per_block)
                .map(|j| {
                    let c_in = if j == 0 { prev } else { out };
                    resnet(b.pp(format!("resnets.{j}")), c_in, out, groups)
                })
                .collect::<Result<Vec<_>>>()?;
            let downsample = if i + 1 < channels.len() {
                Some(Downsample2D::new(b.pp("downsamplers.0"), out, 0)?)
            } else {
                None
            };
            down_blocks.push(DownBlock {
                resnets,
                downsample,
            });
            prev = out;
        }
        let top = prev;
        Ok(Self {
            conv_in: conv3(cfg.in_channels, channels[0], vb.pp("conv_in"))?,
            down_blocks,
            mid: MidBlock::new(vb.pp("mid_block"), top, cfg)?,
            norm_out: group_norm(groups, top, EPS, vb.pp("conv_norm_out"))?,
            conv_out: conv3(top, moments, vb.pp("conv_out"))?,
            quant_conv,
        })
    }

    /// `AutoencoderKL.encode(x).latent_dist` for images `x` `[n, 3, H, W]` in [-1, 1].
    pub fn encode(&self, x: &Tensor) -> Result<DiagonalGaussian> {
        let mut xs = self.conv_in.forward(x)?;
        for b in &self.down_blocks {
            for r in &b.resnets {
                xs = r.forward(&xs, None)?;
            }
            if let Some(down) = &b.downsample {
                xs = down.forward(&xs)?;
            }
        }
        xs = self.mid.forward(&xs)?;
        let xs = self.norm_out.forward_silu(&xs)?;
        let mut moments = self.conv_out.forward(&xs)?;
        if let Some(q) = &self.quant_conv {
            moments = q.forward(&moments)?;
        }
        DiagonalGaussian::from_moments(&moments)
    }
}

/// diffusers' `DiagonalGaussianDistribution`: the VAE posterior, mean and log
/// variance per latent value.
#[derive(Debug, Clone)]
pub struct DiagonalGaussian {
    pub mean: Tensor,
    /// Clamped to [-30, 20], as diffusers does before taking `std`.
    pub logvar: Tensor,
}

impl DiagonalGaussian {
    /// Splits `moments` `[n, 2c, h, w]` into mean and log variance (`torch.chunk(2, dim=1)`).
    pub fn from_moments(moments: &Tensor) -> Result<Self> {
        let c = moments.dim(1)? / 2;
        let mean = moments.narrow(1, 0, c)?;
        let logvar = moments.narrow(1, c, c)?.clamp(-30f32, 20f32)?;
        Ok(Self { mean, logvar })
    }

    /// `exp(logvar / 2)`.
    pub fn std(&self) -> Result<Tensor> {
        (&self.logvar * 0.5)?.exp()
    }

    /// `sample()` with its unit-variance draw given: `mean + std · noise`
    /// (a one-row posterior broadcasts over the rows of `noise`).
    pub fn sample(&self, noise: &Tensor) -> Result<Tensor> {
        let noise = noise.to_dtype(self.mean.dtype())?;
        self.mean.broadcast_add(&self.std()?.broadcast_mul(&noise)?)
    }

    /// `mode()`: the mean (diffusers' `retrieve_latents(..., sample_mode="argmax")`).
    pub fn mode(&self) -> &Tensor {
        &self.mean
    }
}
