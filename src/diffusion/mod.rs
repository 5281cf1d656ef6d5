//! Stable Diffusion on candle: [`loading`] reads configs, weights and
//! tokenizers; [`models`] (CLIP, UNet, VAE) are built from [`layers`], which
//! choose per layer between candle's ops and the CPU kernels of
//! [`crate::kernels`] (and hold the precision choice; nothing else calls a
//! kernel); [`schedulers`] behind one trait; [`pipelines`] own the loaded
//! components and run the one denoising loop; [`params`] and [`latents`] are
//! what a generation is asked for and starts from.

pub mod latents;
pub mod layers;
pub mod loading;
pub mod models;
pub mod params;
pub mod pipelines;
pub mod schedulers;
