//! The denoising loop every pipeline shares: scale the noise, then for each
//! timestep predict the noise (guided), and step the scheduler, as diffusers'
//! `StableDiffusionPipeline.__call__` does between `prepare_latents` and the
//! VAE decode.

use candle_core::Tensor;

use super::{StableDiffusion, StepProgress};
use crate::diffusion::latents::NoiseSource;
use crate::diffusion::schedulers::Scheduler;
use crate::error::{Error, Result};

impl StableDiffusion {
    /// The denoising loop. `latents` are the unit-variance initial latents
    /// (scaled by `init_noise_sigma` here, as diffusers' `prepare_latents` does);
    /// `embeddings` come from [`Self::prompt_embeddings`]. `guidance <= 1` runs
    /// the conditional pass only.
    pub fn denoise(
        &self,
        embeddings: &Tensor,
        latents: &Tensor,
        scheduler: &mut dyn Scheduler,
        guidance: f64,
        noise: &mut dyn NoiseSource,
        progress: &mut dyn FnMut(StepProgress<'_>) -> bool,
    ) -> Result<Tensor> {
        let guided = guidance > 1.0;
        let embeddings = embeddings.to_dtype(self.dtype)?;
        let mut latents = (latents.to_device(&self.device)?.to_dtype(self.dtype)?
            * scheduler.init_noise_sigma())?;
        let timesteps = scheduler.timesteps().to_vec();
        let total = timesteps.len();
        for (i, &t) in timesteps.iter().enumerate() {
            let input = if guided {
                Tensor::cat(&[&latents, &latents], 0)?
            } else {
                latents.clone()
            };
            let input = scheduler.scale_model_input(&input, i)?;
            let pred = self.predict(&input, t, &embeddings)?;
            let pred = if guided {
                let n = latents.dim(0)?;
                let uncond = pred.narrow(0, 0, n)?;
                let cond = pred.narrow(0, n, n)?;
                (&uncond + ((cond - &uncond)? * guidance)?)?
            } else {
                pred
            };
            latents = scheduler.step(&pred, i, &latents, noise)?;
            if !progress(StepProgress {
                step: i + 1,
                total,
                latents: &latents,
            }) {
                return Err(Error::Cancelled);
            }
        }
        Ok(latents)
    }
}
