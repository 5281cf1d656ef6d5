//! The networks of a Stable Diffusion model, each built from
//! [`crate::diffusion::layers`] and requesting exactly diffusers' (or
//! transformers') `state_dict` names and shapes: the CLIP text encoder, the
//! conditional UNet, the VAE. They hold weights and compute; loading files,
//! the denoising loop and scheduling live elsewhere.

pub mod clip;
pub mod unet;
pub mod vae;
