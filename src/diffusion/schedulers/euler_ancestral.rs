//! Ancestral Euler sampling: an Euler step down to σ_down, then fresh noise of
//! standard deviation σ_up so the marginal lands on σ_{i+1}.
//!
//! Port of diffusers 0.42.1 `EulerAncestralDiscreteScheduler`
//! (`scheduling_euler_ancestral_discrete.py`): `__init__` (defaults:
//! `beta_schedule="linear"`, `prediction_type="epsilon"`, `timestep_spacing="linspace"`,
//! `steps_offset=0`), `init_noise_sigma`, `scale_model_input`, `set_timesteps` and
//! `step`. It has no Karras sigmas and no `final_sigmas_type`: keys for those are
//! ignored, as `from_config` ignores them.
//!
//! Paper: Karras et al. (arXiv:2206.00364) for the σ parametrisation; the ancestral
//! split σ_up/σ_down follows Katherine Crowson's k-diffusion `sample_euler_ancestral`
//! (`get_ancestral_step` with η = 1).
//!
//! Each step draws one noise tensor from the [`NoiseSource`], the last step included
//! (where σ_up = 0), exactly as diffusers draws one `randn_tensor` per step.

use candle_core::Tensor;
use serde_json::{Map, Value};

use super::common::{
    self, BetaConfig, ClassConfig, PredictionType, TimestepSpacing, interp, scale, upcast,
};
use super::euler::{euler_timesteps, init_noise_sigma, predict_x0};
use super::sigma::{SigmaSchedule, SigmaStep};
use crate::diffusion::latents::NoiseSource;
use crate::error::Result;

const CLASS: &str = "EulerAncestralDiscreteScheduler";

/// The `EulerAncestralDiscreteScheduler.__init__` arguments this port reads.
#[derive(Clone, Debug)]
pub struct EulerAncestralConfig {
    pub betas: BetaConfig,
    pub prediction_type: PredictionType,
    pub timestep_spacing: TimestepSpacing,
    pub steps_offset: i64,
}

impl EulerAncestralConfig {
    pub fn from_values(values: &Map<String, Value>) -> Result<Self> {
        let cfg = ClassConfig::new(CLASS, values);
        Ok(Self {
            betas: BetaConfig::read(&cfg, true)?,
            // diffusers raises NotImplementedError for "sample".
            prediction_type: PredictionType::read(
                &cfg,
                &[PredictionType::Epsilon, PredictionType::VPrediction],
            )?,
            timestep_spacing: TimestepSpacing::read(&cfg, "linspace")?,
            steps_offset: cfg.i64("steps_offset", 0)?,
        })
    }
}

/// An `EulerAncestralDiscreteScheduler` after `set_timesteps(num_inference_steps)`.
#[derive(Debug, Clone)]
pub struct EulerAncestral {
    config: EulerAncestralConfig,
    schedule: SigmaSchedule,
}

impl EulerAncestral {
    pub fn new(values: &Map<String, Value>, num_inference_steps: usize) -> Result<Self> {
        let config = EulerAncestralConfig::from_values(values)?;
        let n_train = config.betas.num_train_timesteps;
        common::check_steps(CLASS, num_inference_steps, n_train)?;
        let alphas_cumprod = config.betas.alphas_cumprod_for_sigmas(CLASS)?;
        let timesteps = euler_timesteps(
            config.timestep_spacing,
            n_train,
            num_inference_steps,
            config.steps_offset,
        );
        let train_sigmas: Vec<f64> = common::train_sigmas(&alphas_cumprod)
            .into_iter()
            .map(|s| s as f64)
            .collect();
        let mut sigmas: Vec<f32> = timesteps
            .iter()
            .map(|&t| interp(t as f64, &train_sigmas) as f32)
            .collect();
        sigmas.push(0.0);
        let init_noise_sigma = init_noise_sigma(&sigmas, config.timestep_spacing);
        let timesteps = timesteps.iter().map(|&t| t as f64).collect();
        Ok(Self {
            schedule: SigmaSchedule::new(CLASS, timesteps, sigmas, init_noise_sigma),
            config,
        })
    }

    pub fn config(&self) -> &EulerAncestralConfig {
        &self.config
    }
}

impl SigmaStep for EulerAncestral {
    fn schedule(&self) -> &SigmaSchedule {
        &self.schedule
    }

    /// One ancestral Euler step from σ_i to σ_{i+1}, drawing fresh noise from `noise`.
    fn sigma_step(
        &mut self,
        model_output: &Tensor,
        step_index: usize,
        sample: &Tensor,
        noise: &mut dyn NoiseSource,
    ) -> Result<Tensor> {
        let sigmas = &self.schedule.sigmas;
        let sigma = sigmas[step_index];
        let sample32 = upcast(sample)?;
        let pred_original_sample =
            predict_x0(self.config.prediction_type, model_output, &sample32, sigma)?;

        let (sigma_from, sigma_to) = (sigma, sigmas[step_index + 1]);
        let (from2, to2) = (sigma_from * sigma_from, sigma_to * sigma_to);
        let sigma_up = (to2 * (from2 - to2) / from2).sqrt();
        let sigma_down = (to2 - sigma_up * sigma_up).sqrt();

        let derivative = (&sample32 - pred_original_sample)?.affine(1.0 / sigma as f64, 0.0)?;
        let dt = sigma_down - sigma;
        let prev_sample = (&sample32 + scale(&derivative, dt)?)?;

        let fresh = noise.noise_like(sample)?;
        let prev_sample = (prev_sample + upcast(&scale(&fresh, sigma_up)?)?)?;
        Ok(prev_sample.to_dtype(model_output.dtype())?)
    }
}
