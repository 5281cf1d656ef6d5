//! diffusers' `AutoencoderKL`: the encoder (pixels to the latent posterior,
//! for image to image and inpainting: [`encoder`]) and the decoder (latents
//! to pixels: [`decoder`]), built from the same blocks ([`blocks`]) from one
//! `vae/` folder whose config is checked here, once.

mod blocks;
mod decoder;
mod encoder;

use std::path::Path;

use candle_core::Tensor;
use candle_nn::VarBuilder;

pub use decoder::VaeDecoder;
pub use encoder::{DiagonalGaussian, VaeEncoder};

use crate::diffusion::loading::config::{VaeConfig, require, require_groups_divide};

/// The whole VAE.
#[derive(Debug)]
pub struct AutoencoderKL {
    pub encoder: VaeEncoder,
    pub decoder: VaeDecoder,
}

impl AutoencoderKL {
    /// Builds the VAE described by `vae/config.json` (`cfg`, read from `path`)
    /// from `vb`, the VAE's weights.
    pub fn new(vb: VarBuilder, cfg: &VaeConfig, path: &Path) -> crate::Result<Self> {
        let n = cfg.block_out_channels.len();
        require(path, n > 0, "block_out_channels", "empty")?;
        require(path, cfg.act_fn == "silu", "act_fn", &cfg.act_fn)?;
        for (field, channels) in [
            ("in_channels", cfg.in_channels),
            ("out_channels", cfg.out_channels),
        ] {
            require(path, channels == 3, field, "only RGB (3) is supported")?;
        }
        require(
            path,
            cfg.up_block_types.len() == n
                && cfg.up_block_types.iter().all(|t| t == "UpDecoderBlock2D"),
            "up_block_types",
            "expected UpDecoderBlock2D per block",
        )?;
        require(
            path,
            cfg.down_block_types.len() == n
                && cfg
                    .down_block_types
                    .iter()
                    .all(|t| t == "DownEncoderBlock2D"),
            "down_block_types",
            "expected DownEncoderBlock2D per block",
        )?;
        // SD3/Flux-style VAEs shift latents before scaling; SD 1.x/2.x and SDXL do not.
        require(
            path,
            cfg.shift_factor.is_none_or(|f| f == 0.0),
            "shift_factor",
            format!("{:?}", cfg.shift_factor),
        )?;
        require_groups_divide(path, cfg.norm_num_groups, &cfg.block_out_channels)?;
        Ok(Self {
            encoder: VaeEncoder::build(vb.clone(), cfg)?,
            decoder: VaeDecoder::build(vb, cfg)?,
        })
    }

    /// `AutoencoderKL.encode(x).latent_dist`.
    pub fn encode(&self, x: &Tensor) -> candle_core::Result<DiagonalGaussian> {
        self.encoder.encode(x)
    }

    /// `AutoencoderKL.decode(z).sample`.
    pub fn decode(&self, z: &Tensor) -> candle_core::Result<Tensor> {
        self.decoder.decode(z)
    }
}
