//! Pipelines, as diffusers' `pipelines/stable_diffusion/` has them: the loaded
//! model's components ([`components`]; their configs read and checked
//! without weights in [`configs`]), its text encoders per family ([`text`];
//! SDXL's two in [`sdxl`]; an LCM UNet's guidance embedding in [`lcm`]), one
//! denoising loop every task shares ([`denoise`], with [`StepHooks`] for what
//! a task adds), and one file per
//! task over them ([`txt2img`]: diffusers' `StableDiffusionPipeline.__call__`
//! and `StableDiffusionXLPipeline.__call__`; [`img2img`]: their image-to-image
//! pipelines; [`inpaint`]: their inpainting ones), plus what the model
//! accepts ([`info`]).
//!
//! Rombach et al. 2022, "High-Resolution Image Synthesis with Latent Diffusion
//! Models"; classifier-free guidance after Ho & Salimans 2022. Components load
//! once from an unmodified diffusers folder and stay loaded between requests.

mod clip_text;
mod components;
mod configs;
mod denoise;
mod img2img;
mod info;
mod inpaint;
mod lcm;
mod sdxl;
mod text;
mod txt2img;

use candle_core::Tensor;

pub use components::{
    LoadOptions, StableDiffusion, build_unet, build_vae, device_from_name, load_model,
};
pub use configs::inspect;
pub use denoise::{Conditioning, DenoiseRun, NoHooks, StepHooks};
pub use info::{Family, MemoryProfile, ModelInfo, SamplingDefaults};
pub use lcm::guidance_scale_embedding;
pub use sdxl::XlText;
pub use text::{ClipText, TextEncoders};

use crate::diffusion::params::GenerateRequest;
use crate::error::Result;

/// What the engine runs: one loaded model and the generation it offers. A
/// model family implements it once; the engine, its queue
/// and batching know nothing else of the model.
pub trait Pipeline: Send {
    /// What the model is and accepts (front ends validate requests with it).
    fn info(&self) -> &ModelInfo;

    /// Runs requests that [`GenerateRequest::batches_with`] each other as one
    /// batch, one [`Generated`] per request; `progress` after every step
    /// (`false` cancels).
    fn generate_batch(
        &self,
        reqs: &[&GenerateRequest],
        progress: &mut dyn FnMut(StepProgress<'_>) -> bool,
    ) -> Result<Vec<Generated>>;
}

impl Pipeline for StableDiffusion {
    fn info(&self) -> &ModelInfo {
        StableDiffusion::info(self)
    }

    fn generate_batch(
        &self,
        reqs: &[&GenerateRequest],
        progress: &mut dyn FnMut(StepProgress<'_>) -> bool,
    ) -> Result<Vec<Generated>> {
        StableDiffusion::generate_batch(self, reqs, progress)
    }
}

/// Called after every denoising step; returning `false` cancels the job.
pub struct StepProgress<'a> {
    /// 1-based index of the step just finished.
    pub step: usize,
    pub total: usize,
    /// Latents after this step (diffusers' `callback_on_step_end` sees the same).
    pub latents: &'a Tensor,
}

/// Wall-clock seconds spent in each stage of one generation.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Timings {
    pub text_encoder: f64,
    pub denoise: f64,
    pub steps: usize,
    /// Image to image: encoding the init image.
    pub vae_encode: f64,
    pub vae_decode: f64,
}

/// The result of one request.
#[derive(Debug)]
pub struct Generated {
    /// `[n, 3, H, W]` f32 in [0, 1] on the CPU (diffusers `output_type="np"`, channel-first).
    pub images: Tensor,
    pub seeds: Vec<u64>,
    pub timings: Timings,
}
