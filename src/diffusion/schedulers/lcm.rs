//! Multistep latent consistency sampling: at each step the consistency
//! function maps the sample to its denoised estimate, which is noised again
//! to the next timestep (all but the last step).
//!
//! Port of diffusers 0.42.1 `LCMScheduler` (`scheduling_lcm.py`): `__init__`
//! (defaults: `beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear"`,
//! `original_inference_steps=50`, `clip_sample=False`, `set_alpha_to_one=True`,
//! `timestep_scaling=10.0`), `set_timesteps` with `strength=1` and no custom
//! timesteps, `get_scalings_for_boundary_condition_discrete` and `step`.
//! `timestep_spacing` and `steps_offset` are accepted and, as in diffusers,
//! not used.
//!
//! Paper: Luo et al. 2023, "Latent Consistency Models" (arXiv:2310.04378),
//! Algorithm 3 (multistep sampling), with the boundary-condition scalings
//! c_skip, c_out of Song et al. 2023, "Consistency Models" (σ_data = 0.5).
//!
//! Each step but the last draws one noise tensor from the [`NoiseSource`], as
//! diffusers draws one `randn_tensor` when `step_index != num_inference_steps - 1`.

use candle_core::Tensor;
use serde_json::{Map, Value};

use super::Scheduler;
use super::alpha::AlphaSchedule;
use super::common::{self, BetaConfig, ClassConfig, PredictionType, scale};
use crate::diffusion::latents::NoiseSource;
use crate::error::{Error, Result};

const CLASS: &str = "LCMScheduler";

/// The `LCMScheduler.__init__` arguments this port reads.
#[derive(Clone, Debug)]
pub struct LcmConfig {
    pub betas: BetaConfig,
    pub original_inference_steps: usize,
    pub clip_sample: bool,
    pub clip_sample_range: f64,
    pub set_alpha_to_one: bool,
    pub prediction_type: PredictionType,
    pub timestep_scaling: f64,
}

impl LcmConfig {
    pub fn from_values(values: &Map<String, Value>) -> Result<Self> {
        let cfg = ClassConfig::new(CLASS, values);
        if cfg.bool("thresholding", false)? {
            return Err(common::config_error(
                CLASS,
                "thresholding=true (dynamic thresholding) is not supported; it is meant for \
                 pixel-space models, not latent diffusion",
            ));
        }
        let betas = BetaConfig::read_with_defaults(&cfg, true, (0.00085, 0.012, "scaled_linear"))?;
        let prediction_type = PredictionType::read(
            &cfg,
            &[
                PredictionType::Epsilon,
                PredictionType::Sample,
                PredictionType::VPrediction,
            ],
        )?;
        if betas.rescale_betas_zero_snr && prediction_type == PredictionType::Epsilon {
            // ᾱ = 0 at the last training timestep, where every schedule starts:
            // x₀ = (x − √β·ε) / √ᾱ divides by zero (diffusers returns inf there).
            return Err(cfg.invalid(
                "rescale_betas_zero_snr",
                "true",
                "with epsilon prediction the first step divides by zero; use v_prediction",
            ));
        }
        Ok(Self {
            betas,
            original_inference_steps: cfg.positive("original_inference_steps", 50)?,
            clip_sample: cfg.bool("clip_sample", false)?,
            clip_sample_range: cfg.f64("clip_sample_range", 1.0)?,
            set_alpha_to_one: cfg.bool("set_alpha_to_one", true)?,
            prediction_type,
            timestep_scaling: cfg.f64("timestep_scaling", 10.0)?,
        })
    }
}

/// `LCMScheduler.set_timesteps(num_inference_steps)`: the distillation schedule
/// `k·i − 1` for `i = 1..=original_steps` (`k = num_train // original_steps`),
/// reversed, then `num_inference_steps` of it at the indices
/// `floor(linspace(0, len, n, endpoint=False))`.
pub fn lcm_timesteps(
    num_train_timesteps: usize,
    original_steps: usize,
    num_inference_steps: usize,
) -> std::result::Result<Vec<i64>, String> {
    if original_steps > num_train_timesteps {
        return Err(format!(
            "original_inference_steps {original_steps} is over num_train_timesteps {num_train_timesteps}"
        ));
    }
    let n = num_inference_steps;
    if n > original_steps {
        return Err(format!(
            "{n} steps is more than original_inference_steps {original_steps}: an LCM \
             schedule is a subset of the one it was distilled on"
        ));
    }
    let k = (num_train_timesteps / original_steps) as i64;
    let origin: Vec<i64> = (1..=original_steps as i64)
        .rev()
        .map(|i| i * k - 1)
        .collect();
    let step = origin.len() as f64 / n as f64;
    Ok((0..n)
        .map(|i| origin[(i as f64 * step).floor() as usize])
        .collect())
}

/// An `LCMScheduler` after `set_timesteps(num_inference_steps)`.
#[derive(Debug, Clone)]
pub struct Lcm {
    config: LcmConfig,
    schedule: AlphaSchedule,
}

impl Lcm {
    pub fn new(values: &Map<String, Value>, num_inference_steps: usize) -> Result<Self> {
        let config = LcmConfig::from_values(values)?;
        let n_train = config.betas.num_train_timesteps;
        common::check_steps(CLASS, num_inference_steps, n_train)?;
        let int_timesteps = lcm_timesteps(
            n_train,
            config.original_inference_steps,
            num_inference_steps,
        )
        .map_err(|e| {
            if num_inference_steps > config.original_inference_steps {
                Error::invalid("steps", e)
            } else {
                common::config_error(CLASS, e)
            }
        })?;
        let schedule =
            AlphaSchedule::new(CLASS, &config.betas, config.set_alpha_to_one, int_timesteps)?;
        Ok(Self { config, schedule })
    }

    pub fn config(&self) -> &LcmConfig {
        &self.config
    }

    /// `get_scalings_for_boundary_condition_discrete(t)`: `(c_skip, c_out)` in
    /// float32, as torch computes them from the int64 timestep.
    pub fn boundary_scalings(&self, t: i64) -> (f32, f32) {
        let sigma_data2 = 0.25f32; // σ_data = 0.5
        let s = t as f32 * self.config.timestep_scaling as f32;
        let c_skip = sigma_data2 / (s * s + sigma_data2);
        let c_out = s / (s * s + sigma_data2).sqrt();
        (c_skip, c_out)
    }
}

impl Scheduler for Lcm {
    fn class_name(&self) -> &'static str {
        CLASS
    }

    fn timesteps(&self) -> &[f64] {
        self.schedule.timesteps()
    }

    fn add_noise(&self, original: &Tensor, noise: &Tensor, step_index: usize) -> Result<Tensor> {
        self.schedule.add_noise(original, noise, step_index)
    }

    /// The denoised estimate at `timesteps()[step_index]`, noised to the next
    /// timestep with fresh noise (the last step returns it as it is).
    fn step(
        &mut self,
        model_output: &Tensor,
        step_index: usize,
        sample: &Tensor,
        noise: &mut dyn NoiseSource,
    ) -> Result<Tensor> {
        let t = self.schedule.timestep(step_index)?;
        let timesteps = &self.schedule.int_timesteps;
        let n = timesteps.len();
        let (model_output, sample) = common::promote(model_output, sample)?;
        let prev_t = timesteps.get(step_index + 1).copied().unwrap_or(t);
        let alpha_prod_t = self.schedule.alpha(t)?;
        let alpha_prod_t_prev = self.schedule.alpha_prev(prev_t)?;
        let beta_prod_t = 1.0 - alpha_prod_t;
        let (sqrt_alpha, sqrt_beta) = (alpha_prod_t.sqrt(), beta_prod_t.sqrt());
        let (c_skip, c_out) = self.boundary_scalings(t);

        let x0 = match self.config.prediction_type {
            PredictionType::Epsilon => (&sample - scale(&model_output, sqrt_beta)?)?
                .affine(1.0 / sqrt_alpha as f64, 0.0)?,
            PredictionType::Sample => model_output.clone(),
            PredictionType::VPrediction => {
                (scale(&sample, sqrt_alpha)? - scale(&model_output, sqrt_beta)?)?
            }
        };
        let x0 = if self.config.clip_sample {
            let r = self.config.clip_sample_range;
            x0.clamp(-r, r)?
        } else {
            x0
        };
        let denoised = (scale(&x0, c_out)? + scale(&sample, c_skip)?)?;
        if step_index == n - 1 {
            return Ok(denoised);
        }
        let fresh = noise.noise_like(&sample)?;
        let beta_prod_t_prev = 1.0 - alpha_prod_t_prev;
        Ok(
            (scale(&denoised, alpha_prod_t_prev.sqrt())?
                + scale(&fresh, beta_prod_t_prev.sqrt())?)?,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `LCMScheduler().set_timesteps(n)` (original_inference_steps 50) in diffusers 0.42.1.
    #[test]
    fn timesteps_are_diffusers() {
        assert_eq!(lcm_timesteps(1000, 50, 4).unwrap(), [999, 759, 499, 259]);
        assert_eq!(lcm_timesteps(1000, 50, 1).unwrap(), [999]);
        assert_eq!(lcm_timesteps(1000, 50, 3).unwrap(), [999, 679, 339]);
        assert!(lcm_timesteps(1000, 50, 51).is_err());
    }
}
