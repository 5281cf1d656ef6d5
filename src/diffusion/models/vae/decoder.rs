//! The decoder half of diffusers' `AutoencoderKL` (Kingma & Welling 2014, as
//! used by Rombach et al. 2022): `post_quant_conv`, then `Decoder` —
//! `conv_in`, `UNetMidBlock2D` (resnet, single-head attention, resnet),
//! `UpDecoderBlock2D`s with nearest-neighbour 2x upsampling, GroupNorm, SiLU,
//! `conv_out`. Follows diffusers 0.42 `models/autoencoders/vae.py::Decoder`,
//! `unets/unet_2d_blocks.py::{UNetMidBlock2D, UpDecoderBlock2D}`,
//! `resnet.py::ResnetBlock2D` (no time embedding), `upsampling.py::Upsample2D`
//! and `attention_processor.py::AttnProcessor2_0`.
//!
//! The blocks are the UNet's ([`crate::diffusion::layers`]): resnets without a
//! time embedding, spatial self-attention, `Upsample2D`.

use candle_core::{Module, Result, Tensor};
use candle_nn::VarBuilder;

use super::blocks::{EPS, MidBlock, conv3, resnet};
use crate::diffusion::layers::conv::{Conv2d, conv2d};
use crate::diffusion::layers::norm::{GroupNorm, group_norm};
use crate::diffusion::layers::resnet::{ResnetBlock2D, Upsample2D};
use crate::diffusion::loading::config::VaeConfig;

/// `UpDecoderBlock2D`: resnets, then (except the last block) `Upsample2D`.
#[derive(Debug)]
struct UpBlock {
    resnets: Vec<ResnetBlock2D>,
    upsample: Option<Upsample2D>,
}

impl UpBlock {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let mut xs = xs.clone();
        for r in &self.resnets {
            xs = r.forward(&xs, None)?;
        }
        match &self.upsample {
            Some(up) => up.forward(&xs, None),
            None => Ok(xs),
        }
    }
}

/// The VAE decoder: latents (already divided by the scaling factor) to images in about [-1, 1].
#[derive(Debug)]
pub struct VaeDecoder {
    post_quant_conv: Option<Conv2d>,
    conv_in: Conv2d,
    mid: MidBlock,
    up_blocks: Vec<UpBlock>,
    norm_out: GroupNorm,
    conv_out: Conv2d,
}

impl VaeDecoder {
    /// Builds the decoder from `vb`, the VAE's weights, for a config
    /// [`super::AutoencoderKL::new`] has checked.
    pub(super) fn build(vb: VarBuilder, cfg: &VaeConfig) -> Result<Self> {
        let groups = cfg.norm_num_groups;
        let latent = cfg.latent_channels;
        let top = *cfg.block_out_channels.last().expect("checked non-empty");
        let post_quant_conv = if cfg.use_post_quant_conv {
            Some(conv2d(
                latent,
                latent,
                1,
                Default::default(),
                vb.pp("post_quant_conv"),
            )?)
        } else {
            None
        };
        let vb = vb.pp("decoder");
        let reversed: Vec<usize> = cfg.block_out_channels.iter().rev().copied().collect();
        let mut up_blocks = Vec::with_capacity(reversed.len());
        let mut prev = reversed[0];
        for (i, &out) in reversed.iter().enumerate() {
            let b = vb.pp(format!("up_blocks.{i}"));
            let resnets = (0..=cfg.layers_per_block)
                .map(|j| {
                    let c_in = if j == 0 { prev } else { out };
                    resnet(b.pp(format!("resnets.{j}")), c_in, out, groups)
                })
                .collect::<Result<Vec<_>>>()?;
            let upsample = if i + 1 < reversed.len() {
                Some(Upsample2D::new(b.pp("upsamplers.0"), out)?)
            } else {
                None
            };
            up_blocks.push(UpBlock { resnets, upsample });
            prev = out;
        }
        let first = cfg.block_out_channels[0];
        Ok(Self {
            post_quant_conv,
            conv_in: conv3(latent, top, vb.pp("conv_in"))?,
            mid: MidBlock::new(vb.pp("mid_block"), top, cfg)?,
            up_blocks,
            norm_out: group_norm(groups, first, EPS, vb.pp("conv_norm_out"))?,
            conv_out: conv3(first, cfg.out_channels, vb.pp("conv_out"))?,
        })
    }

    /// `AutoencoderKL.decode(z).sample` for `z` already divided by the scaling factor.
    pub fn decode(&self, z: &Tensor) -> Result<Tensor> {
        let mut xs = match &self.post_quant_conv {
            Some(c) => c.forward(z)?,
            None => z.clone(),
        };
        xs = self.conv_in.forward(&xs)?;
        xs = self.mid.forward(&xs)?;
        for b in &self.up_blocks {
            xs = b.forward(&xs)?;
        }
        let xs = self.norm_out.forward_silu(&xs)?;
        self.conv_out.forward(&xs)
    }
}
