//! Inpainting: diffusers' `StableDiffusionInpaintPipeline.__call__`
//! (`pipelines/stable_diffusion/pipeline_stable_diffusion_inpaint.py`; SDXL's
//! `StableDiffusionXLInpaintPipeline` conditions as its text to image does and
//! inpaints the same way). Over the shared loop, with either kind of UNet:
//!
//! - an inpainting UNet (9 input channels) gets the mask and the masked
//!   picture's latents appended to its scaled input at every step
//!   ([`StepHooks::extra_input`]);
//! - an ordinary UNet (4 channels) denoises everything, and after each step
//!   the latents outside the mask are put back to the picture's, noised to the
//!   next step's level with the same noise ([`StepHooks::after_step`]).
//!
//! The start is image to image's (`get_timesteps`, `add_noise` at the first
//! kept step), except at `strength` 1, where it is pure noise times
//! `init_noise_sigma` (`prepare_latents`' `is_strength_max`). The mask is cut
//! down to the latents by nearest-neighbour sampling (`F.interpolate`'s
//! default), the masked picture is `image * (mask < 0.5)`.
//!
//! Random draws per image, from its own seed: the noise (text to image's
//! draw), the picture's posterior sample, the masked picture's: all three
//! always, so a seed gives the same draws whichever UNet the model has.

use std::time::Instant;

use candle_core::{Device, Tensor};

use super::img2img::given_or_drawn;
use super::txt2img::replay_noise;
use super::{DenoiseRun, Generated, StableDiffusion, StepHooks, StepProgress, Timings};
use crate::diffusion::latents::{NoiseSource, SeededNoise};
use crate::diffusion::params::{GenerateRequest, InitImage, img2img_start};
use crate::diffusion::schedulers::Scheduler;
use crate::error::{Error, Result};

impl StableDiffusion {
    /// Runs one validated inpainting request; `mask` is `init`'s.
    pub(super) fn inpaint(
        &self,
        req: &GenerateRequest,
        init: &InitImage,
        mask: &Tensor,
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
        let given = req.latents.as_ref();
        let noise = match given {
            Some(g) => g.latents.clone(),
            None => seeded.initial_latents(self.info.latent_channels, h, w, &Device::Cpu)?,
        };
        let vae_noise = given_or_drawn(
            given.and_then(|g| g.vae_noise.as_ref()),
            &mut seeded,
            &noise,
        )?;
        let masked_noise = given_or_drawn(
            given.and_then(|g| g.masked_image_vae_noise.as_ref()),
            &mut seeded,
            &noise,
        )?;

        let mut scheduler = self.scheduler(req.scheduler, &req.scheduler_options, req.steps)?;
        let start = img2img_start(req.steps, init.strength)
            .ok_or_else(|| Error::Internal("a validated strength leaves no step to run".into()))?;
        let from_noise = init.strength >= 1.0;
        let nine = self.info.inpainting;
        let t1 = Instant::now();
        // An inpainting UNet starting from pure noise never needs the picture's own latents.
        let image_latents = if nine && from_noise {
            None
        } else {
            Some(self.image_latents(&init.pixels, &vae_noise, &noise)?)
        };
        let latents = match &image_latents {
            Some(image) if !from_noise => scheduler.add_noise(image, &noise, start)?,
            _ => (&noise * scheduler.init_noise_sigma())?,
        };
        let latent_mask = nearest_downsample(mask, f)?;
        let mut hooks: Box<dyn StepHooks> = match image_latents {
            Some(image) if !nine => Box::new(Blend::new(image, &noise, &latent_mask, self)?),
            _ => {
                let keep = (1.0 - mask)?;
                let masked = init.pixels.broadcast_mul(&keep)?;
                let masked_latents = self.image_latents(&masked, &masked_noise, &noise)?;
                Box::new(MaskedInput::new(
                    &latent_mask,
                    &masked_latents,
                    guided,
                    self,
                )?)
            }
        };
        timings.vae_encode = t1.elapsed().as_secs_f64();
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
        let latents = self.run_denoise(
            run,
            scheduler.as_mut(),
            step_noise,
            hooks.as_mut(),
            progress,
        )?;
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

/// `mask` `[n, 1, H, W]` at every `f`-th pixel from the top left,
/// `[n, 1, H / f, W / f]`: `torch.nn.functional.interpolate(mask, size=(H / f,
/// W / f))` in its default `nearest` mode (source index `⌊i · f⌋`).
fn nearest_downsample(mask: &Tensor, f: usize) -> Result<Tensor> {
    let (_, _, h, w) = mask.dims4()?;
    let picks = |n: usize| {
        let idx: Vec<u32> = (0..n / f).map(|i| (i * f) as u32).collect();
        Tensor::new(idx.as_slice(), mask.device())
    };
    Ok(mask
        .index_select(&picks(h)?, 2)?
        .index_select(&picks(w)?, 3)?)
}

/// On the model's device, in the UNet's dtype.
fn on_model(t: &Tensor, model: &StableDiffusion) -> Result<Tensor> {
    Ok(t.to_device(&model.device)?.to_dtype(model.dtype)?)
}

/// An inpainting UNet's extra input: `cat([mask, masked_image_latents], 1)`,
/// the same at every step, doubled under guidance as the latents are.
struct MaskedInput {
    extra: Tensor,
}

impl MaskedInput {
    fn new(
        latent_mask: &Tensor,
        masked_latents: &Tensor,
        guided: bool,
        model: &StableDiffusion,
    ) -> Result<Self> {
        let (n, _, h, w) = masked_latents.dims4()?;
        let mask = on_model(latent_mask, model)?.broadcast_as((n, 1, h, w))?;
        let extra = Tensor::cat(&[&mask, &on_model(masked_latents, model)?], 1)?;
        let extra = if guided {
            Tensor::cat(&[&extra, &extra], 0)?
        } else {
            extra
        };
        Ok(Self { extra })
    }
}

impl StepHooks for MaskedInput {
    fn extra_input(&mut self, _step: usize) -> Result<Option<Tensor>> {
        Ok(Some(self.extra.clone()))
    }
}

/// An ordinary UNet's inpainting: after step `i`, `(1 - mask) · picture +
/// mask · latents`, the picture's latents noised to step `i + 1`'s level
/// (clean after the last step), as the pipeline's loop does for
/// `num_channels_unet == 4`.
struct Blend {
    image_latents: Tensor,
    noise: Tensor,
    mask: Tensor,
    keep: Tensor,
}

impl Blend {
    fn new(
        image_latents: Tensor,
        noise: &Tensor,
        latent_mask: &Tensor,
        model: &StableDiffusion,
    ) -> Result<Self> {
        let mask = on_model(latent_mask, model)?;
        Ok(Self {
            image_latents: on_model(&image_latents, model)?,
            noise: on_model(noise, model)?,
            keep: (1.0 - &mask)?,
            mask,
        })
    }
}

impl StepHooks for Blend {
    fn after_step(
        &mut self,
        step: usize,
        latents: Tensor,
        scheduler: &dyn Scheduler,
    ) -> Result<Tensor> {
        let next = step + 1;
        let picture = if next < scheduler.timesteps().len() {
            scheduler
                .add_noise(&self.image_latents, &self.noise, next)?
                .to_dtype(latents.dtype())?
        } else {
            self.image_latents.clone()
        };
        let kept = picture.broadcast_mul(&self.keep)?;
        let painted = latents.broadcast_mul(&self.mask)?;
        Ok((kept + painted)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::DType;

    #[test]
    fn nearest_downsample_takes_every_fth_pixel_from_the_corner() {
        // 16 x 8 values 0..128, rows of 16
        let v: Vec<f32> = (0..128).map(|x| x as f32).collect();
        let t = Tensor::from_vec(v, (1, 1, 8, 16), &Device::Cpu).unwrap();
        let d = nearest_downsample(&t, 4).unwrap();
        assert_eq!(d.dims(), [1, 1, 2, 4]);
        let got = d.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(got, [0.0, 4.0, 8.0, 12.0, 64.0, 68.0, 72.0, 76.0]);
        assert_eq!(d.dtype(), DType::F32);
    }
}
