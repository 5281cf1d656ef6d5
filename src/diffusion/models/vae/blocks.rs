//! What the VAE's encoder and decoder both build: 3×3 convolutions, resnets
//! without a time embedding, and `UNetMidBlock2D` (resnet, single-head
//! attention, resnet), with the eps diffusers gives every VAE norm.

use candle_core::{Result, Tensor};
use candle_nn::{Conv2dConfig, VarBuilder};

use crate::diffusion::layers::conv::{Conv2d, conv2d};
use crate::diffusion::layers::resnet::{ResnetBlock2D, ResnetConfig};
use crate::diffusion::layers::transformer::SpatialSelfAttention;
use crate::diffusion::loading::config::VaeConfig;

/// diffusers builds every VAE norm with eps 1e-6.
pub(super) const EPS: f64 = 1e-6;

/// A 3×3 convolution with padding 1.
pub(super) fn conv3(c_in: usize, c_out: usize, vb: VarBuilder) -> Result<Conv2d> {
    let cfg = Conv2dConfig {
        padding: 1,
        ..Default::default()
    };
    conv2d(c_in, c_out, 3, cfg, vb)
}

/// `ResnetBlock2D(temb_channels=None)` with the VAE's groups and eps.
pub(super) fn resnet(
    vb: VarBuilder,
    c_in: usize,
    c_out: usize,
    groups: usize,
) -> Result<ResnetBlock2D> {
    let cfg = ResnetConfig {
        groups,
        eps: EPS,
        temb_channels: None,
        output_scale_factor: 1.0,
    };
    ResnetBlock2D::new(vb, c_in, c_out, &cfg)
}

/// diffusers' `UNetMidBlock2D` as the VAE builds it (`temb_channels=None`,
/// `attention_head_dim` = the channels: one head; the attention only where
/// `mid_block_add_attention`).
#[derive(Debug)]
pub(super) struct MidBlock {
    resnets: [ResnetBlock2D; 2],
    attention: Option<SpatialSelfAttention>,
}

impl MidBlock {
    pub(super) fn new(vb: VarBuilder, channels: usize, cfg: &VaeConfig) -> Result<Self> {
        let groups = cfg.norm_num_groups;
        let attention = if cfg.mid_block_add_attention {
            Some(SpatialSelfAttention::new(
                vb.pp("attentions.0"),
                channels,
                groups,
                EPS,
            )?)
        } else {
            None
        };
        Ok(Self {
            resnets: [
                resnet(vb.pp("resnets.0"), channels, channels, groups)?,
                resnet(vb.pp("resnets.1"), channels, channels, groups)?,
            ],
            attention,
        })
    }

    pub(super) fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let mut xs = self.resnets[0].forward(xs, None)?;
        if let Some(a) = &self.attention {
            xs = a.forward(&xs)?;
        }
        self.resnets[1].forward(&xs, None)
    }
}
