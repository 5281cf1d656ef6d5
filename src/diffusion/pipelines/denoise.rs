//! The denoising loop every pipeline shares: for each timestep from a start
//! index, predict the noise (guided) and step the scheduler, as diffusers'
//! `StableDiffusionPipeline.__call__` does between `prepare_latents` and the
//! VAE decode. What a task adds goes through [`StepHooks`] and [`DenoiseRun`]:
//! a later start (image to image's `strength`, diffusers' `get_timesteps` and
//! `set_begin_index`), extra UNet input channels per step (inpainting UNets),
//! a change to the latents after each step (the 4-channel inpainting blend),
//! and the conditioning the UNet gets ([`Conditioning`]).

use candle_core::{Device, Tensor};

use super::{StableDiffusion, StepProgress};
use crate::diffusion::latents::NoiseSource;
use crate::diffusion::models::unet::{AddedConditioning, Extra};
use crate::diffusion::schedulers::Scheduler;
use crate::error::{Error, Result};

/// What the UNet is conditioned on, rows matching the UNet batch (every image's
/// unconditional row first, then the conditional ones, under guidance). SD
/// 1.x/2.x: the text encoder's hidden states; model families with more
/// conditioning (SDXL's pooled text embedding and time ids, an LCM UNet's
/// guidance embedding) add it here.
#[derive(Debug, Clone)]
pub struct Conditioning {
    /// `[rows, tokens, cross_attention_dim]`.
    pub text: Tensor,
    /// SDXL's pooled text embedding and time ids (`added_cond_kwargs`), same rows.
    pub added: Option<AddedConditioning>,
    /// An LCM UNet's `timestep_cond` `[rows, time_cond_proj_dim]`: the guidance
    /// scale embedding.
    pub timestep_cond: Option<Tensor>,
}

impl Conditioning {
    /// Text conditioning only (SD 1.x/2.x).
    pub fn text(text: Tensor) -> Self {
        Self {
            text,
            added: None,
            timestep_cond: None,
        }
    }

    /// `f` applied to the text states and `timestep_cond`, `f_added` to SDXL's
    /// added conditioning (which keeps its dtype on a cast).
    fn map(
        &self,
        f: impl Fn(&Tensor) -> Result<Tensor>,
        f_added: impl Fn(&Tensor) -> Result<Tensor>,
    ) -> Result<Self> {
        Ok(Self {
            text: f(&self.text)?,
            added: self
                .added
                .as_ref()
                .map(|a| {
                    Ok::<_, Error>(AddedConditioning {
                        text_embeds: f_added(&a.text_embeds)?,
                        time_ids: f_added(&a.time_ids)?,
                    })
                })
                .transpose()?,
            timestep_cond: self.timestep_cond.as_ref().map(&f).transpose()?,
        })
    }

    /// Rows `start..start + len`.
    pub fn rows(&self, start: usize, len: usize) -> Result<Self> {
        let narrow = |t: &Tensor| Ok(t.narrow(0, start, len)?);
        self.map(narrow, narrow)
    }

    /// Every row repeated `n` times in place (`[a, b]` → `[a × n, b × n]`), as
    /// diffusers' `repeat(1, num_images_per_prompt, 1).view(...)` orders them.
    pub fn repeat_rows(&self, n: usize) -> Result<Self> {
        let repeat = |t: &Tensor| -> Result<Tensor> {
            let mut dims = t.dims().to_vec();
            let mut tiles = vec![1; dims.len() + 1];
            tiles[1] = n;
            let r = t.unsqueeze(1)?.repeat(tiles)?;
            dims[0] *= n;
            Ok(r.reshape(dims)?)
        };
        self.map(repeat, repeat)
    }

    /// `parts` one after the other along the rows; all with the same kinds of
    /// conditioning.
    pub fn cat(parts: &[Self]) -> Result<Self> {
        fn all<'a, T>(
            parts: &'a [Conditioning],
            get: impl Fn(&'a Conditioning) -> Option<T>,
        ) -> Result<Option<Vec<T>>> {
            let got: Vec<T> = parts.iter().filter_map(&get).collect();
            match got.len() {
                0 => Ok(None),
                n if n == parts.len() => Ok(Some(got)),
                _ => Err(Error::Internal(
                    "conditioning parts disagree on what they hold".into(),
                )),
            }
        }
        let cat = |ts: Vec<&Tensor>| Tensor::cat(&ts, 0);
        let texts: Vec<&Tensor> = parts.iter().map(|p| &p.text).collect();
        let added = all(parts, |p| p.added.as_ref())?
            .map(|a| {
                Ok::<_, Error>(AddedConditioning {
                    text_embeds: cat(a.iter().map(|a| &a.text_embeds).collect())?,
                    time_ids: cat(a.iter().map(|a| &a.time_ids).collect())?,
                })
            })
            .transpose()?;
        let timestep_cond = all(parts, |p| p.timestep_cond.as_ref())?
            .map(cat)
            .transpose()?;
        Ok(Self {
            text: cat(texts)?,
            added,
            timestep_cond,
        })
    }

    /// On `device`, in `dtype` (SDXL's added conditioning keeps its dtype: the
    /// UNet embeds it in f32).
    pub(super) fn to(&self, device: &Device, dtype: candle_core::DType) -> Result<Self> {
        self.map(
            |t| Ok(t.to_device(device)?.to_dtype(dtype)?),
            |t| Ok(t.to_device(device)?),
        )
    }

    /// What the UNet takes beyond the text states.
    pub fn extra(&self) -> Extra<'_> {
        Extra {
            added: self.added.as_ref(),
            timestep_cond: self.timestep_cond.as_ref(),
        }
    }
}

/// One run of the loop.
#[derive(Debug)]
pub struct DenoiseRun<'a> {
    pub conditioning: &'a Conditioning,
    /// The latents at the noise level of `timesteps()[start]`: for text to image
    /// the unit-variance noise times `init_noise_sigma`; for image to image the
    /// image latents after the scheduler's `add_noise` at `start`.
    pub latents: Tensor,
    /// Index into the scheduler's timesteps of the first step to run.
    pub start: usize,
    /// Guidance scale: classifier-free guidance runs where
    /// [`ModelInfo::runs_cfg`](super::ModelInfo::runs_cfg) says (above 1, on a
    /// UNet that does not embed it); otherwise the conditional pass only.
    pub guidance: f64,
}

/// What a task adds to the loop; every method defaults to doing nothing.
pub trait StepHooks {
    /// Channels appended to the scaled UNet input at step `step` (the mask and
    /// masked-image latents of a 9-channel inpainting UNet), one row per UNet row.
    fn extra_input(&mut self, _step: usize) -> Result<Option<Tensor>> {
        Ok(None)
    }

    /// The latents to carry on with after step `step`: inpainting with an
    /// ordinary UNet puts the original latents, noised to the next step's
    /// level, back outside the mask.
    fn after_step(
        &mut self,
        _step: usize,
        latents: Tensor,
        _scheduler: &dyn Scheduler,
    ) -> Result<Tensor> {
        Ok(latents)
    }
}

/// Text to image's hooks: none.
pub struct NoHooks;

impl StepHooks for NoHooks {}

impl StableDiffusion {
    /// Text to image's loop for text-only conditioning (SD 1.x/2.x):
    /// `embeddings` come from [`Self::prompt_embeddings`]; see [`Self::denoise_with`].
    pub fn denoise(
        &self,
        embeddings: &Tensor,
        latents: &Tensor,
        scheduler: &mut dyn Scheduler,
        guidance: f64,
        noise: &mut dyn NoiseSource,
        progress: &mut dyn FnMut(StepProgress<'_>) -> bool,
    ) -> Result<Tensor> {
        let conditioning = Conditioning::text(embeddings.clone());
        self.denoise_with(&conditioning, latents, scheduler, guidance, noise, progress)
    }

    /// Text to image's loop: `latents` are the unit-variance initial latents,
    /// scaled by `init_noise_sigma` here (diffusers' `prepare_latents`).
    pub fn denoise_with(
        &self,
        conditioning: &Conditioning,
        latents: &Tensor,
        scheduler: &mut dyn Scheduler,
        guidance: f64,
        noise: &mut dyn NoiseSource,
        progress: &mut dyn FnMut(StepProgress<'_>) -> bool,
    ) -> Result<Tensor> {
        let run = DenoiseRun {
            conditioning,
            latents: (latents.to_device(&self.device)?.to_dtype(self.dtype)?
                * scheduler.init_noise_sigma())?,
            start: 0,
            guidance,
        };
        self.run_denoise(run, scheduler, noise, &mut NoHooks, progress)
    }

    /// The loop itself: steps `run.start..` of `scheduler`, with `hooks`.
    /// `progress` counts the steps this run takes (1-based, out of those).
    pub fn run_denoise(
        &self,
        run: DenoiseRun<'_>,
        scheduler: &mut dyn Scheduler,
        noise: &mut dyn NoiseSource,
        hooks: &mut dyn StepHooks,
        progress: &mut dyn FnMut(StepProgress<'_>) -> bool,
    ) -> Result<Tensor> {
        let guided = self.info.runs_cfg(run.guidance);
        let conditioning = run.conditioning.to(&self.device, self.dtype)?;
        let mut latents = run.latents.to_device(&self.device)?.to_dtype(self.dtype)?;
        let timesteps = scheduler.timesteps().to_vec();
        if run.start >= timesteps.len() {
            return Err(Error::Internal(format!(
                "denoising starts at step {} of {}",
                run.start,
                timesteps.len()
            )));
        }
        let total = timesteps.len() - run.start;
        for (i, &t) in timesteps.iter().enumerate().skip(run.start) {
            let input = if guided {
                Tensor::cat(&[&latents, &latents], 0)?
            } else {
                latents.clone()
            };
            let mut input = scheduler.scale_model_input(&input, i)?;
            if let Some(extra) = hooks.extra_input(i)? {
                input = Tensor::cat(&[&input, &extra.to_dtype(self.dtype)?], 1)?;
            }
            let pred = self.predict_with(&input, t, &conditioning)?;
            let pred = if guided {
                let n = latents.dim(0)?;
                let uncond = pred.narrow(0, 0, n)?;
                let cond = pred.narrow(0, n, n)?;
                (&uncond + ((cond - &uncond)? * run.guidance)?)?
            } else {
                pred
            };
            latents = scheduler.step(&pred, i, &latents, noise)?;
            latents = hooks.after_step(i, latents, scheduler)?;
            if !progress(StepProgress {
                step: i + 1 - run.start,
                total,
                latents: &latents,
            }) {
                return Err(Error::Cancelled);
            }
        }
        Ok(latents)
    }
}
