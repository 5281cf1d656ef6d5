//! Stable Diffusion on candle: model loading, text encoding, denoising,
//! decoding. The models are built from [`layers`], which choose per layer
//! between candle's ops and the CPU kernels of [`crate::kernels`] (and hold
//! the precision choice); nothing here calls a kernel directly.

pub mod clip;
pub mod config;
pub mod hub;
pub mod latents;
pub mod layers;
pub mod params;
pub mod pipelines;
pub mod schedulers;
pub mod tokenizer;
pub mod unet;
pub mod vae;
pub mod weights;
