//! Latent consistency models (Luo et al. 2023, "Latent Consistency Models:
//! Synthesizing High-Resolution Images with Few-Step Inference"): a UNet
//! distilled with the guidance scale as an input (`time_cond_proj_dim`) runs
//! one conditional pass per step, the scale embedded as diffusers'
//! `LatentConsistencyModelPipeline.get_guidance_scale_embedding` embeds it
//! (also `StableDiffusionPipeline` and `StableDiffusionXLPipeline` when
//! `unet.config.time_cond_proj_dim` is set). The sampler is
//! [`crate::diffusion::schedulers::lcm`].

use candle_core::{Device, Tensor};

use crate::error::Result;

/// `get_guidance_scale_embedding(w, embedding_dim)` for one `w` (the pipelines
/// pass `guidance_scale - 1`), `[rows, dim]` f32: `w · 1000` times
/// `exp(-ln(10000) · i / (dim/2 - 1))`, sines then cosines, zero-padded to an
/// odd `dim`, in f32 in torch's order of operations (torch's vectorised exp
/// and sin may differ from these in the last bit).
pub fn guidance_scale_embedding(
    w: f64,
    dim: usize,
    rows: usize,
    device: &Device,
) -> Result<Tensor> {
    let half = dim / 2;
    let step = 10000f32.ln() / (half as f32 - 1.0);
    let w = w as f32 * 1000.0;
    let args: Vec<f32> = (0..half).map(|i| w * (i as f32 * -step).exp()).collect();
    let mut row: Vec<f32> = args.iter().map(|a| a.sin()).collect();
    row.extend(args.iter().map(|a| a.cos()));
    row.resize(dim, 0.0);
    let data: Vec<f32> = (0..rows).flat_map(|_| row.iter().copied()).collect();
    Ok(Tensor::from_vec(data, (rows, dim), device)?)
}
