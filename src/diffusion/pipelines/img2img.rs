//! Image to image: diffusers' `StableDiffusionImg2ImgPipeline.__call__`
//! (`pipelines/stable_diffusion/pipeline_stable_diffusion_img2img.py`; SDXL's
//! `StableDiffusionXLImg2ImgPipeline` conditions the same way as its text to
//! image): encode the prompts; encode the init image with the VAE and sample
//! its posterior (`prepare_latents`, `retrieve_latents(sample_mode="sample")`,
//! `* scaling_factor`); skip the first steps by `strength` (`get_timesteps`,
//! `set_begin_index`); noise the image latents to the first kept timestep
//! (`scheduler.add_noise`); run the rest of the shared loop; decode.
//!
//! Random draws, per image from its own seed: first the noise `add_noise`
//! mixes in (the same draw text to image starts from), then the posterior
//! sample's. diffusers, given one generator for several images, samples the
//! posterior once and shares it; `--latents`' `vae_noise` with one row does
//! the same.

use std::time::Instant;

use candle_core::{DType, Device, Tensor};

use super::txt2img::replay_noise;
use super::{DenoiseRun, Generated, NoHooks, StableDiffusion, StepProgress, Timings};
use crate::diffusion::latents::{NoiseSource, SeededNoise};
use crate::diffusion::models::vae::DiagonalGaussian;
use crate::diffusion::params::{GenerateRequest, InitImage, img2img_start};
use crate::error::{Error, Result};

impl StableDiffusion {
    /// The VAE posterior of images `[n, 3, H, W]` in [-1, 1] (diffusers'
    /// `vae.encode(image).latent_dist`), in f32 on the CPU.
    pub fn encode_image(&self, pixels: &Tensor) -> Result<DiagonalGaussian> {
        let x = pixels.to_device(&self.device)?.to_dtype(self.vae_dtype)?;
        let p = self.vae.encode(&x)?;
        let cpu = |t: &Tensor| t.to_dtype(DType::F32)?.to_device(&Device::Cpu);
        Ok(DiagonalGaussian {
            mean: cpu(&p.mean)?,
            logvar: cpu(&p.logvar)?,
        })
    }

    /// The latents of `pixels` as the edit pipelines take them
    /// (`_encode_vae_image`: `retrieve_latents(vae.encode(image),
    /// sample_mode="sample")`, `* scaling_factor`), the posterior sampled with
    /// `vae_noise` and broadcast to the shape of `like`, one row per image.
    pub(super) fn image_latents(
        &self,
        pixels: &Tensor,
        vae_noise: &Tensor,
        like: &Tensor,
    ) -> Result<Tensor> {
        let posterior = self.encode_image(pixels)?;
        Ok((posterior.sample(vae_noise)? * self.vae_scaling_factor)?
            .broadcast_as(like.shape())?
            .contiguous()?)
    }

    /// Runs one validated image-to-image request.
    pub(super) fn img2img(
        &self,
        req: &GenerateRequest,
        init: &InitImage,
        progress: &mut dyn FnMut(StepProgress<'_>) -> bool,
    ) -> Result<Generated> {
        let mut timings = Timings::default();
        let guided = self.info.runs_cfg(req.guidance);
        let t0 = Instant::now();
        let conditioning = self.conditioning(req, guided)?;
        timings.text_encoder = t0.elapsed().as_secs_f64();

        let seeds = req.seeds();
        let mut seeded = SeededNoise::new(&seeds);
        let f = self.info.vae_scale_factor;
        let (h, w) = (req.height / f, req.width / f);
        let noise = match &req.latents {
            Some(given) => given.latents.clone(),
            None => seeded.initial_latents(self.info.latent_channels, h, w, &Device::Cpu)?,
        };
        let t1 = Instant::now();
        let vae_noise = given_or_drawn(
            req.latents.as_ref().and_then(|g| g.vae_noise.as_ref()),
            &mut seeded,
            &noise,
        )?;
        let image_latents = self.image_latents(&init.pixels, &vae_noise, &noise)?;
        timings.vae_encode = t1.elapsed().as_secs_f64();

        let mut scheduler = self.scheduler(req.scheduler, &req.scheduler_options, req.steps)?;
        let start = img2img_start(req.steps, init.strength)
            .ok_or_else(|| Error::Internal("a validated strength leaves no step to run".into()))?;
        let latents = scheduler.add_noise(&image_latents, &noise, start)?;
        timings.steps = scheduler.timesteps().len() - start;
        let mut replay = replay_noise(req)?;
        let step_noise: &mut dyn NoiseSource = match &mut replay {
            Some(r) => r,
            None => &mut seeded,
        };
        let run = DenoiseRun {
            conditioning: &conditioning,
            latents,
            start,
            guidance: req.guidance,
        };
        let t2 = Instant::now();
        let latents =
            self.run_denoise(run, scheduler.as_mut(), step_noise, &mut NoHooks, progress)?;
        timings.denoise = t2.elapsed().as_secs_f64();
        let t3 = Instant::now();
        let images = self.decode(&latents)?;
        timings.vae_decode = t3.elapsed().as_secs_f64();
        Ok(Generated {
            images,
            seeds,
            timings,
        })
    }
}

/// The noise a request brought (`--latents`), else a draw shaped like `like`.
pub(super) fn given_or_drawn(
    given: Option<&Tensor>,
    seeded: &mut SeededNoise,
    like: &Tensor,
) -> Result<Tensor> {
    match given {
        Some(t) => Ok(t.clone()),
        None => seeded.noise_like(like),
    }
}
