//! The convolutional blocks of diffusers 0.42.1, operation for operation:
//! [`ResnetBlock2D`] (`models/resnet.py`, `time_embedding_norm="default"`,
//! SiLU, pre-norm: He et al. 2016 residual blocks as used by Ho et al. 2020,
//! DDPM), [`Downsample2D`] / [`Upsample2D`] (`models/downsampling.py` /
//! `models/upsampling.py` with `use_conv=True`). Every tensor is requested under
//! diffusers' `state_dict` name and shape; construction does no arithmetic.

use candle_core::{D, Module, Result, Tensor};
use candle_nn::{Conv2dConfig, VarBuilder};

use super::conv::{Conv2d, conv2d};
use super::linear::{Linear, linear};
use super::norm::{GroupNorm, group_norm};

/// Normalisation and time-embedding settings shared by a UNet block's resnets.
#[derive(Debug, Clone, Copy)]
pub struct ResnetConfig {
    /// `resnet_groups` (the UNet's `norm_num_groups`).
    pub groups: usize,
    /// `resnet_eps` (the UNet's `norm_eps`).
    pub eps: f64,
    /// `temb_channels`: width of the time embedding; `None` for blocks without one
    /// (the VAE's, `temb_channels=None`).
    pub temb_channels: Option<usize>,
    /// `output_scale_factor` (the UNet's `mid_block_scale_factor` in the mid block, else 1).
    pub output_scale_factor: f64,
}

/// diffusers `ResnetBlock2D`: `norm1 → SiLU → conv1 → + time_emb_proj(SiLU(temb)) →
/// norm2 → SiLU → conv2`, plus the (1×1-projected when channels change) input; without
/// a time embedding the `+ time_emb_proj` step is left out.
#[derive(Debug)]
pub struct ResnetBlock2D {
    norm1: GroupNorm,
    conv1: Conv2d,
    time_emb_proj: Option<Linear>,
    norm2: GroupNorm,
    conv2: Conv2d,
    conv_shortcut: Option<Conv2d>,
    output_scale_factor: f64,
}

impl ResnetBlock2D {
    pub fn new(
        vb: VarBuilder,
        in_channels: usize,
        out_channels: usize,
        cfg: &ResnetConfig,
    ) -> Result<Self> {
        let conv3 = Conv2dConfig {
            padding: 1,
            ..Default::default()
        };
        let norm1 = group_norm(cfg.groups, in_channels, cfg.eps, vb.pp("norm1"))?;
        let conv1 = conv2d(in_channels, out_channels, 3, conv3, vb.pp("conv1"))?;
        let time_emb_proj = cfg
            .temb_channels
            .map(|c| linear(c, out_channels, vb.pp("time_emb_proj")))
            .transpose()?;
        let norm2 = group_norm(cfg.groups, out_channels, cfg.eps, vb.pp("norm2"))?;
        let conv2 = conv2d(out_channels, out_channels, 3, conv3, vb.pp("conv2"))?;
        // `use_in_shortcut = in_channels != conv_2d_out_channels`, 1x1 with bias.
        let conv_shortcut = if in_channels != out_channels {
            Some(conv2d(
                in_channels,
                out_channels,
                1,
                Default::default(),
                vb.pp("conv_shortcut"),
            )?)
        } else {
            None
        };
        Ok(Self {
            norm1,
            conv1,
            time_emb_proj,
            norm2,
            conv2,
            conv_shortcut,
            output_scale_factor: cfg.output_scale_factor,
        })
    }

    /// `temb_act` is `SiLU(temb)` (`[1 or batch, temb_channels]`): every resnet applies
    /// the same nonlinearity to the same embedding, so the UNet does it once. `None`
    /// for a block built without a time embedding.
    pub fn forward(&self, xs: &Tensor, temb_act: Option<&Tensor>) -> Result<Tensor> {
        let mut h = self.conv1.forward(&self.norm1.forward_silu(xs)?)?;
        match (&self.time_emb_proj, temb_act) {
            (Some(proj), Some(temb_act)) => {
                let t = proj.forward(temb_act)?;
                let (tb, tc) = t.dims2()?;
                h = h.broadcast_add(&t.reshape((tb, tc, 1, 1))?)?;
            }
            (None, None) => {}
            (Some(_), None) => candle_core::bail!("ResnetBlock2D: time embedding missing"),
            (None, Some(_)) => candle_core::bail!("ResnetBlock2D: built without a time embedding"),
        }
        let h = self.conv2.forward(&self.norm2.forward_silu(&h)?)?;
        let shortcut = match &self.conv_shortcut {
            Some(conv) => conv.forward(xs)?,
            None => xs.clone(),
        };
        let out = (shortcut + h)?;
        if self.output_scale_factor == 1.0 {
            Ok(out)
        } else {
            out / self.output_scale_factor
        }
    }
}

/// diffusers `Downsample2D(use_conv=True)`: a stride-2 3×3 conv; with `padding=0` the
/// input is first padded by one zero row/column at the bottom/right.
#[derive(Debug)]
pub struct Downsample2D {
    conv: Conv2d,
    pad_bottom_right: bool,
}

impl Downsample2D {
    pub fn new(vb: VarBuilder, channels: usize, padding: usize) -> Result<Self> {
        let cfg = Conv2dConfig {
            padding,
            stride: 2,
            ..Default::default()
        };
        Ok(Self {
            conv: conv2d(channels, channels, 3, cfg, vb.pp("conv"))?,
            pad_bottom_right: padding == 0,
        })
    }

    pub fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        if self.pad_bottom_right {
            let xs = xs
                .pad_with_zeros(D::Minus1, 0, 1)?
                .pad_with_zeros(D::Minus2, 0, 1)?;
            self.conv.forward(&xs)
        } else {
            self.conv.forward(xs)
        }
    }
}

/// diffusers `Upsample2D(use_conv=True)`: nearest-neighbour ×2 (or to `output_size`,
/// which the UNet passes when the latent side is not a multiple of its overall factor),
/// then a 3×3 conv.
#[derive(Debug)]
pub struct Upsample2D {
    conv: Conv2d,
}

impl Upsample2D {
    pub fn new(vb: VarBuilder, channels: usize) -> Result<Self> {
        let cfg = Conv2dConfig {
            padding: 1,
            ..Default::default()
        };
        Ok(Self {
            conv: conv2d(channels, channels, 3, cfg, vb.pp("conv"))?,
        })
    }

    pub fn forward(&self, xs: &Tensor, output_size: Option<(usize, usize)>) -> Result<Tensor> {
        let (h, w) = match output_size {
            Some(size) => size,
            None => {
                let (_, _, h, w) = xs.dims4()?;
                (2 * h, 2 * w)
            }
        };
        self.conv.forward(&xs.upsample_nearest2d(h, w)?)
    }
}
