//! DDIM with η = 0: deterministic sampling along the non-Markovian DDIM trajectory.
//!
//! Port of diffusers 0.42.1 `DDIMScheduler` (`scheduling_ddim.py`): `__init__`
//! (defaults: `beta_schedule="linear"`, `clip_sample=True`, `set_alpha_to_one=True`,
//! `steps_offset=0`, `timestep_spacing="leading"`), `set_timesteps` and `step` with
//! `eta=0.0`, `use_clipped_model_output=False`.
//!
//! Paper: Song, Meng & Ermon, "Denoising Diffusion Implicit Models" (arXiv:2010.02502),
//! eq. (12) with σ_t = 0.
//!
//! As in diffusers, the previous timestep is always `t - num_train_timesteps //
//! num_inference_steps`, whatever the spacing (so `trailing`/`linspace` steps do not
//! land exactly on the next scheduled timestep), and the coefficients are float32.

use candle_core::Tensor;
use serde_json::{Map, Value};

use super::Scheduler;
use super::alpha::AlphaSchedule;
use super::common::{
    self, BetaConfig, ClassConfig, PredictionType, TimestepSpacing, np_arange, np_linspace,
    np_round, scale,
};
use crate::diffusion::latents::NoiseSource;
use crate::error::Result;

const CLASS: &str = "DDIMScheduler";

/// The `DDIMScheduler.__init__` arguments this port reads.
#[derive(Clone, Debug)]
pub struct DdimConfig {
    pub betas: BetaConfig,
    pub clip_sample: bool,
    pub clip_sample_range: f64,
    pub set_alpha_to_one: bool,
    pub steps_offset: i64,
    pub prediction_type: PredictionType,
    pub timestep_spacing: TimestepSpacing,
}

impl DdimConfig {
    pub fn from_values(values: &Map<String, Value>) -> Result<Self> {
        let cfg = ClassConfig::new(CLASS, values);
        if cfg.bool("thresholding", false)? {
            return Err(common::config_error(
                CLASS,
                "thresholding=true (dynamic thresholding) is not supported; it is meant for \
                 pixel-space models, not latent diffusion",
            ));
        }
        Ok(Self {
            betas: BetaConfig::read(&cfg, true)?,
            clip_sample: cfg.bool("clip_sample", true)?,
            clip_sample_range: cfg.f64("clip_sample_range", 1.0)?,
            set_alpha_to_one: cfg.bool("set_alpha_to_one", true)?,
            steps_offset: cfg.i64("steps_offset", 0)?,
            prediction_type: PredictionType::read(
                &cfg,
                &[
                    PredictionType::Epsilon,
                    PredictionType::Sample,
                    PredictionType::VPrediction,
                ],
            )?,
            timestep_spacing: TimestepSpacing::read(&cfg, "leading")?,
        })
    }
}

/// `DDIMScheduler.set_timesteps` (int64 timesteps, descending).
pub fn ddim_timesteps(
    spacing: TimestepSpacing,
    num_train_timesteps: usize,
    num_inference_steps: usize,
    steps_offset: i64,
) -> Vec<i64> {
    let (n_train, n) = (num_train_timesteps, num_inference_steps);
    match spacing {
        TimestepSpacing::Linspace => np_linspace(0.0, (n_train - 1) as f64, n)
            .into_iter()
            .rev()
            .map(|t| np_round(t) as i64)
            .collect(),
        TimestepSpacing::Leading => {
            let ratio = n_train / n;
            (0..n)
                .rev()
                .map(|i| (i * ratio) as i64 + steps_offset)
                .collect()
        }
        TimestepSpacing::Trailing => {
            let ratio = n_train as f64 / n as f64;
            np_arange(n_train as f64, 0.0, -ratio)
                .into_iter()
                .map(|t| np_round(t) as i64 - 1)
                .collect()
        }
    }
}

/// A `DDIMScheduler` after `set_timesteps(num_inference_steps)`.
#[derive(Debug, Clone)]
pub struct Ddim {
    config: DdimConfig,
    schedule: AlphaSchedule,
    num_inference_steps: usize,
}

impl Ddim {
    pub fn new(values: &Map<String, Value>, num_inference_steps: usize) -> Result<Self> {
        let config = DdimConfig::from_values(values)?;
        let n_train = config.betas.num_train_timesteps;
        common::check_steps(CLASS, num_inference_steps, n_train)?;
        let int_timesteps = ddim_timesteps(
            config.timestep_spacing,
            n_train,
            num_inference_steps,
            config.steps_offset,
        );
        let schedule =
            AlphaSchedule::new(CLASS, &config.betas, config.set_alpha_to_one, int_timesteps)?;
        Ok(Self {
            config,
            schedule,
            num_inference_steps,
        })
    }

    pub fn config(&self) -> &DdimConfig {
        &self.config
    }

    /// The training ᾱ table (float32).
    pub fn alphas_cumprod(&self) -> &[f32] {
        self.schedule.alphas_cumprod()
    }
}

impl Scheduler for Ddim {
    fn class_name(&self) -> &'static str {
        CLASS
    }

    fn timesteps(&self) -> &[f64] {
        self.schedule.timesteps()
    }

    fn add_noise(&self, original: &Tensor, noise: &Tensor, step_index: usize) -> Result<Tensor> {
        self.schedule.add_noise(original, noise, step_index)
    }

    /// DDIM's update from `timesteps()[step_index]` to `t - num_train // steps` (η = 0).
    fn step(
        &mut self,
        model_output: &Tensor,
        step_index: usize,
        sample: &Tensor,
        _noise: &mut dyn NoiseSource,
    ) -> Result<Tensor> {
        let t = self.schedule.timestep(step_index)?;
        let (model_output, sample) = common::promote(model_output, sample)?;
        let prev_t = t - (self.config.betas.num_train_timesteps / self.num_inference_steps) as i64;

        let alpha_prod_t = self.schedule.alpha(t)?;
        let alpha_prod_t_prev = self.schedule.alpha_prev(prev_t)?;
        let beta_prod_t = 1.0 - alpha_prod_t;
        let (sqrt_alpha, sqrt_beta) = (alpha_prod_t.sqrt(), beta_prod_t.sqrt());

        let (pred_original_sample, pred_epsilon) = match self.config.prediction_type {
            PredictionType::Epsilon => {
                let x0 = (&sample - scale(&model_output, sqrt_beta)?)?
                    .affine(1.0 / sqrt_alpha as f64, 0.0)?;
                (x0, model_output.clone())
            }
            PredictionType::Sample => {
                let eps = (&sample - scale(&model_output, sqrt_alpha)?)?
                    .affine(1.0 / sqrt_beta as f64, 0.0)?;
                (model_output.clone(), eps)
            }
            PredictionType::VPrediction => {
                let x0 = (scale(&sample, sqrt_alpha)? - scale(&model_output, sqrt_beta)?)?;
                let eps = (scale(&model_output, sqrt_alpha)? + scale(&sample, sqrt_beta)?)?;
                (x0, eps)
            }
        };
        let pred_original_sample = if self.config.clip_sample {
            let r = self.config.clip_sample_range;
            pred_original_sample.clamp(-r, r)?
        } else {
            pred_original_sample
        };

        // η = 0: std_dev_t = 0 * variance ** 0.5 (NaN only if the variance is).
        let beta_prod_t_prev = 1.0 - alpha_prod_t_prev;
        let variance = (beta_prod_t_prev / beta_prod_t) * (1.0 - alpha_prod_t / alpha_prod_t_prev);
        let std_dev_t = 0.0f32 * variance.sqrt();
        let direction_coeff = (1.0 - alpha_prod_t_prev - std_dev_t * std_dev_t).sqrt();

        let direction = scale(&pred_epsilon, direction_coeff)?;
        Ok((scale(&pred_original_sample, alpha_prod_t_prev.sqrt())? + direction)?)
    }
}
