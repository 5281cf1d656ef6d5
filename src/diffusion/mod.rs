//! Stable Diffusion on candle: model loading, text encoding, denoising, decoding.

pub mod clip;
pub mod config;
pub mod conv;
pub mod hub;
pub mod image;
pub mod latents;
pub mod pipeline;
pub mod schedulers;
pub mod tokenizer;
pub mod unet;
pub mod unet_blocks;
pub mod vae;
pub mod weights;
