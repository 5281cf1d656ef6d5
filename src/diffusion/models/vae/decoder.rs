//! The decoder half of diffusers' `AutoencoderKL` (Kingma & Welling 2014, as
//! used by Rombach et al. 2022): `post_quant_conv`, then `Decoder` —
//! `conv_in`, `UNetMidBlock2D` (resnet, single-head attention, resnet),
//! `UpDecoderBlock2D`s with nearest-neighbour 2x upsampling, GroupNorm, SiLU,
//! `conv_out`. Follows diffusers 0.42 `models/autoencoders/vae.py::Decoder`,
//! `unets/unet_2d_blocks.py::{UNetMidBlock2D, UpDecoderBlock2D}`,
//! `resnet.py::ResnetBlock2D` (no time embedding), `upsampling.py::Upsample2D`
//! and `attention_processor.py::AttnProcessor2_0`.
//!
//! Text-to-image only decodes, so the encoder is not loaded (a third of the
//! VAE's weights). The blocks are the UNet's ([`crate::diffusion::layers`]): resnets
//! without a time embedding, spatial self-attention, `Upsample2D`.

use std::path::Path;

use candle_core::{Module, Result, Tensor};
use candle_nn::{Conv2dConfig, VarBuilder};

use crate::diffusion::layers::conv::{Conv2d, conv2d};
use crate::diffusion::layers::norm::{GroupNorm, group_norm};
use crate::diffusion::layers::resnet::{ResnetBlock2D, ResnetConfig, Upsample2D};
use crate::diffusion::layers::transformer::SpatialSelfAttention;
use crate::diffusion::loading::config::{VaeConfig, require, require_groups_divide};

/// diffusers builds every VAE norm with eps 1e-6.
const EPS: f64 = 1e-6;

fn conv3(c_in: usize, c_out: usize, vb: VarBuilder) -> Result<Conv2d> {
    let cfg = Conv2dConfig {
        padding: 1,
        ..Default::default()
    };
    conv2d(c_in, c_out, 3, cfg, vb)
}

/// `ResnetBlock2D(temb_channels=None)` with the VAE's groups and eps.
fn resnet(vb: VarBuilder, c_in: usize, c_out: usize, groups: usize) -> Result<ResnetBlock2D> {
    let cfg = ResnetConfig {
        groups,
        eps: EPS,
        temb_channels: None,
        output_scale_factor: 1.0,
    };
    ResnetBlock2D::new(vb, c_in, c_out, &cfg)
}

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
    mid_resnets: [ResnetBlock2D; 2],
    mid_attention: Option<SpatialSelfAttention>,
    up_blocks: Vec<UpBlock>,
    norm_out: GroupNorm,
    conv_out: Conv2d,
}

impl VaeDecoder {
    /// Builds the decoder described by `vae/config.json` (`cfg`, read from `path`)
    /// from `vb`, the VAE's weights.
    pub fn new(vb: VarBuilder, cfg: &VaeConfig, path: &Path) -> crate::Result<Self> {
        let n = cfg.block_out_channels.len();
        require(path, n > 0, "block_out_channels", "empty")?;
        require(path, cfg.act_fn == "silu", "act_fn", &cfg.act_fn)?;
        require(
            path,
            cfg.out_channels == 3,
            "out_channels",
            "only RGB (3) is supported",
        )?;
        require(
            path,
            cfg.up_block_types.len() == n
                && cfg.up_block_types.iter().all(|t| t == "UpDecoderBlock2D"),
            "up_block_types",
            "expected UpDecoderBlock2D per block",
        )?;
        // SD3/Flux-style VAEs shift latents before scaling; SD 1.x/2.x do not.
        require(
            path,
            cfg.shift_factor.is_none_or(|f| f == 0.0),
            "shift_factor",
            format!("{:?}", cfg.shift_factor),
        )?;
        let groups = cfg.norm_num_groups;
        require_groups_divide(path, groups, &cfg.block_out_channels)?;
        Ok(Self::build(vb, cfg)?)
    }

    fn build(vb: VarBuilder, cfg: &VaeConfig) -> Result<Self> {
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
        let mid = vb.pp("mid_block");
        let mid_resnets = [
            resnet(mid.pp("resnets.0"), top, top, groups)?,
            resnet(mid.pp("resnets.1"), top, top, groups)?,
        ];
        let mid_attention = if cfg.mid_block_add_attention {
            Some(SpatialSelfAttention::new(
                mid.pp("attentions.0"),
                top,
                groups,
                EPS,
            )?)
        } else {
            None
        };
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
            mid_resnets,
            mid_attention,
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
        xs = self.mid_resnets[0].forward(&xs, None)?;
        if let Some(a) = &self.mid_attention {
            xs = a.forward(&xs)?;
        }
        xs = self.mid_resnets[1].forward(&xs, None)?;
        for b in &self.up_blocks {
            xs = b.forward(&xs)?;
        }
        let xs = self.norm_out.forward_silu(&xs)?;
        self.conv_out.forward(&xs)
    }
}
