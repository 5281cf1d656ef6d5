//! Text to image: diffusers' `StableDiffusionPipeline.__call__`
//! (`pipelines/stable_diffusion/pipeline_stable_diffusion.py`) and
//! `StableDiffusionXLPipeline.__call__`, which differ only in what the prompt
//! encodes to ([`super::TextEncoders`]): encode the prompts, draw the seeded
//! noise, run the shared denoising loop, decode. A request with an init image
//! goes to [`super::img2img`] instead, or with a mask too to [`super::inpaint`].

use std::time::Instant;

use candle_core::Device;

use super::{Conditioning, Generated, StableDiffusion, StepProgress, Timings};
use crate::diffusion::latents::{NoiseSource, ReplayNoise, SeededNoise};
use crate::diffusion::params::GenerateRequest;
use crate::error::{Error, Result};

impl StableDiffusion {
    /// Runs one validated request end to end.
    pub fn generate(
        &self,
        req: &GenerateRequest,
        progress: &mut dyn FnMut(StepProgress<'_>) -> bool,
    ) -> Result<Generated> {
        let mut out = self.generate_batch(&[req], progress)?;
        Ok(out.remove(0))
    }

    /// Runs requests that [`GenerateRequest::batches_with`] each other as one
    /// UNet batch (rows: every request's images, uncond halves first under
    /// guidance). Each image comes from its own seed, so it is the same as when
    /// its request runs alone. Returns one result per request, in order; the
    /// timings are the batch's.
    pub fn generate_batch(
        &self,
        reqs: &[&GenerateRequest],
        progress: &mut dyn FnMut(StepProgress<'_>) -> bool,
    ) -> Result<Vec<Generated>> {
        let Some(&first) = reqs.first() else {
            return Ok(Vec::new());
        };
        if reqs.len() > 1 && reqs.iter().any(|r| !first.batches_with(r)) {
            return Err(Error::Internal(
                "requests in one batch need the same size, steps, scheduler, guidance and no given latents"
                    .into(),
            ));
        }
        if let Some(init) = &first.init {
            // Edits never batch (`batches_with`): one request, its own image.
            let out = match &init.mask {
                Some(mask) => self.inpaint(first, init, mask, progress)?,
                None => self.img2img(first, init, progress)?,
            };
            return Ok(vec![out]);
        }
        let mut timings = Timings::default();
        // The loop decides the same way (`run_denoise`): rows and passes agree.
        let guided = self.info.runs_cfg(first.guidance);
        let t0 = Instant::now();
        let conditioning = self.batch_conditioning(reqs, guided)?;
        timings.text_encoder = t0.elapsed().as_secs_f64();

        let seeds: Vec<u64> = reqs.iter().flat_map(|r| r.seeds()).collect();
        let mut seeded = SeededNoise::new(&seeds);
        let f = self.info.vae_scale_factor;
        let latents = match &first.latents {
            Some(given) => given.latents.clone(),
            None => seeded.initial_latents(
                self.info.latent_channels,
                first.height / f,
                first.width / f,
                &Device::Cpu,
            )?,
        };
        let mut replay = replay_noise(first)?;
        let noise: &mut dyn NoiseSource = match &mut replay {
            Some(r) => r,
            None => &mut seeded,
        };
        let mut scheduler =
            self.scheduler(first.scheduler, &first.scheduler_options, first.steps)?;
        timings.steps = scheduler.timesteps().len();
        let t1 = Instant::now();
        let latents = self.denoise_with(
            &conditioning,
            &latents,
            scheduler.as_mut(),
            first.guidance,
            noise,
            progress,
        )?;
        timings.denoise = t1.elapsed().as_secs_f64();
        let t2 = Instant::now();
        let images = self.decode(&latents)?;
        timings.vae_decode = t2.elapsed().as_secs_f64();
        split_results(reqs, &images, &timings)
    }

    /// Every request's conditioning as one UNet batch: under guidance
    /// `[uncond of every request..., cond of every request...]`, as the loop expects.
    pub(super) fn batch_conditioning(
        &self,
        reqs: &[&GenerateRequest],
        guided: bool,
    ) -> Result<Conditioning> {
        let per_request = reqs
            .iter()
            .map(|r| self.conditioning(r, guided))
            .collect::<Result<Vec<_>>>()?;
        if per_request.len() == 1 {
            return Ok(per_request.into_iter().next().expect("one request"));
        }
        if !guided {
            return Conditioning::cat(&per_request);
        }
        let half = |second: bool| {
            reqs.iter()
                .zip(&per_request)
                .map(move |(r, c)| c.rows(if second { r.num_images } else { 0 }, r.num_images))
        };
        let rows = half(false).chain(half(true)).collect::<Result<Vec<_>>>()?;
        Conditioning::cat(&rows)
    }
}

/// The per-step noise a request brought (`--latents`' `noise`), to replay.
pub(super) fn replay_noise(req: &GenerateRequest) -> Result<Option<ReplayNoise>> {
    let Some(steps) = req.latents.as_ref().and_then(|g| g.step_noise.as_ref()) else {
        return Ok(None);
    };
    let slices = steps
        .chunk(steps.dim(0)?, 0)?
        .into_iter()
        .map(|t| t.squeeze(0))
        .collect::<candle_core::Result<Vec<_>>>()?;
    Ok(Some(ReplayNoise::new(slices)))
}

/// One result per request from the batch's `images`, in order.
pub(super) fn split_results(
    reqs: &[&GenerateRequest],
    images: &candle_core::Tensor,
    timings: &Timings,
) -> Result<Vec<Generated>> {
    let mut offset = 0;
    let mut out = Vec::with_capacity(reqs.len());
    for r in reqs {
        out.push(Generated {
            images: images.narrow(0, offset, r.num_images)?,
            seeds: r.seeds(),
            timings: timings.clone(),
        });
        offset += r.num_images;
    }
    Ok(out)
}
