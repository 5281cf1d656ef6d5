//! Euler sampling of the probability-flow ODE in k-diffusion's σ parametrisation.
//!
//! Port of diffusers 0.42.1 `EulerDiscreteScheduler` (`scheduling_euler_discrete.py`):
//! `__init__` (defaults: `beta_schedule="linear"`, `prediction_type="epsilon"`,
//! `interpolation_type="linear"`, `use_karras_sigmas=False`, `timestep_spacing="linspace"`,
//! `timestep_type="discrete"`, `steps_offset=0`, `final_sigmas_type="zero"`),
//! `init_noise_sigma`, `scale_model_input`, `set_timesteps` (with `_sigma_to_t` and
//! `_convert_to_karras`) and `step` with the default `s_churn=0` (no churn noise).
//!
//! Paper: Karras, Aittala, Aila & Laine, "Elucidating the Design Space of
//! Diffusion-Based Generative Models" (arXiv:2206.00364), Algorithm 2 with γ = 0.
//!
//! Precision, as in diffusers: timesteps are float32 (and fractional for `linspace`
//! spacing and Karras sigmas), sigmas are interpolated in float64 from the float32
//! training sigmas and stored as float32, and `step` upcasts the sample to float32
//! and casts the result back to the model output's dtype.

use candle_core::Tensor;
use serde_json::{Map, Value};

use super::common::{
    self, BetaConfig, ClassConfig, FinalSigmas, PredictionType, TimestepSpacing, interp,
    karras_sigmas, np_arange, np_linspace, np_round, scale, sigma_to_t, upcast,
};
use super::sigma::{SigmaSchedule, SigmaStep};
use crate::diffusion::latents::NoiseSource;
use crate::error::Result;

const CLASS: &str = "EulerDiscreteScheduler";

/// The `EulerDiscreteScheduler.__init__` arguments this port reads.
#[derive(Clone, Debug)]
pub struct EulerConfig {
    pub betas: BetaConfig,
    pub prediction_type: PredictionType,
    pub use_karras_sigmas: bool,
    pub sigma_min: Option<f64>,
    pub sigma_max: Option<f64>,
    pub timestep_spacing: TimestepSpacing,
    /// `timestep_type="continuous"`: with v-prediction the UNet gets `0.25 * ln(σ)`.
    pub continuous_timesteps: bool,
    pub steps_offset: i64,
    pub final_sigmas: FinalSigmas,
}

impl EulerConfig {
    pub fn from_values(values: &Map<String, Value>) -> Result<Self> {
        let cfg = ClassConfig::new(CLASS, values);
        let interpolation = cfg.string("interpolation_type", "linear")?;
        if interpolation != "linear" {
            return Err(cfg.invalid(
                "interpolation_type",
                format!("{interpolation:?}"),
                "only \"linear\" is supported",
            ));
        }
        cfg.reject_flag("use_exponential_sigmas")?;
        cfg.reject_flag("use_beta_sigmas")?;
        let timestep_type = cfg.string("timestep_type", "discrete")?;
        let continuous_timesteps = match timestep_type.as_str() {
            "discrete" => false,
            "continuous" => true,
            other => {
                return Err(cfg.invalid(
                    "timestep_type",
                    format!("{other:?}"),
                    "expected one of: discrete, continuous",
                ));
            }
        };
        Ok(Self {
            betas: BetaConfig::read(&cfg, true)?,
            prediction_type: PredictionType::read(
                &cfg,
                &[
                    PredictionType::Epsilon,
                    PredictionType::VPrediction,
                    PredictionType::Sample,
                ],
            )?,
            use_karras_sigmas: cfg.bool("use_karras_sigmas", false)?,
            sigma_min: cfg.opt_f64("sigma_min")?,
            sigma_max: cfg.opt_f64("sigma_max")?,
            timestep_spacing: TimestepSpacing::read(&cfg, "linspace")?,
            continuous_timesteps,
            steps_offset: cfg.i64("steps_offset", 0)?,
            final_sigmas: FinalSigmas::read(&cfg)?,
        })
    }
}

/// Timesteps of `EulerDiscreteScheduler.set_timesteps` (also used verbatim by
/// `EulerAncestralDiscreteScheduler`): float32, descending, not rounded for `linspace`.
pub fn euler_timesteps(
    spacing: TimestepSpacing,
    num_train_timesteps: usize,
    num_inference_steps: usize,
    steps_offset: i64,
) -> Vec<f32> {
    let (n_train, n) = (num_train_timesteps, num_inference_steps);
    match spacing {
        // np.linspace(0, N - 1, n, dtype=np.float32)[::-1]
        TimestepSpacing::Linspace => np_linspace(0.0, (n_train - 1) as f64, n)
            .into_iter()
            .rev()
            .map(|t| t as f32)
            .collect(),
        // (np.arange(0, n) * (N // n)).round()[::-1].astype(np.float32) + steps_offset
        TimestepSpacing::Leading => {
            let ratio = n_train / n;
            (0..n)
                .rev()
                .map(|i| (i * ratio) as f32 + steps_offset as f32)
                .collect()
        }
        // np.arange(N, 0, -N / n).round().astype(np.float32) - 1
        TimestepSpacing::Trailing => {
            let ratio = n_train as f64 / n as f64;
            np_arange(n_train as f64, 0.0, -ratio)
                .into_iter()
                .map(|t| np_round(t) as f32 - 1.0)
                .collect()
        }
    }
}

/// The timesteps and their sigmas (float64, before the final one is appended)
/// of `EulerDiscreteScheduler.set_timesteps`, which `LMSDiscreteScheduler`
/// shares: `euler_timesteps`, the training sigmas interpolated at them, and with
/// `karras = Some((sigma_min, sigma_max))` Karras sigmas over that range (each
/// bound, when `None`, the interpolated one: the range depends on the spacing)
/// with `_sigma_to_t` timesteps.
pub(crate) fn euler_sigmas(
    (spacing, n_train, steps_offset): (TimestepSpacing, usize, i64),
    alphas_cumprod: &[f32],
    num_inference_steps: usize,
    karras: Option<(Option<f64>, Option<f64>)>,
) -> (Vec<f32>, Vec<f64>) {
    let timesteps = euler_timesteps(spacing, n_train, num_inference_steps, steps_offset);
    let train_sigmas = common::train_sigmas(alphas_cumprod);
    let train_f64: Vec<f64> = train_sigmas.iter().map(|&s| s as f64).collect();
    let sigmas: Vec<f64> = timesteps
        .iter()
        .map(|&t| interp(t as f64, &train_f64))
        .collect();
    let Some((sigma_min, sigma_max)) = karras else {
        return (timesteps, sigmas);
    };
    let log_sigmas = common::log_sigmas(&train_sigmas);
    let sigma_min = sigma_min.unwrap_or(sigmas[sigmas.len() - 1]);
    let sigma_max = sigma_max.unwrap_or(sigmas[0]);
    let sigmas = karras_sigmas(sigma_min, sigma_max, num_inference_steps);
    let timesteps = sigmas
        .iter()
        .map(|&s| sigma_to_t(s, &log_sigmas) as f32)
        .collect();
    (timesteps, sigmas)
}

/// `init_noise_sigma` of the Euler schedulers: the largest sigma for `linspace` /
/// `trailing` spacing, `(max_sigma ** 2 + 1) ** 0.5` for `leading` (float32).
pub(crate) fn init_noise_sigma(sigmas: &[f32], spacing: TimestepSpacing) -> f32 {
    let max = sigmas.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    match spacing {
        TimestepSpacing::Linspace | TimestepSpacing::Trailing => max,
        TimestepSpacing::Leading => (max * max + 1.0).sqrt(),
    }
}

/// The denoised estimate x₀ from the model output at noise level σ. `sample` is
/// float32 already; the result is float32.
pub(crate) fn predict_x0(
    prediction_type: PredictionType,
    model_output: &Tensor,
    sample: &Tensor,
    sigma: f32,
) -> Result<Tensor> {
    Ok(match prediction_type {
        // sample - sigma_hat * model_output
        PredictionType::Epsilon => (sample - upcast(&scale(model_output, sigma)?)?)?,
        // model_output * (-sigma / (sigma**2 + 1) ** 0.5) + sample / (sigma**2 + 1)
        PredictionType::VPrediction => {
            let s2p1 = sigma * sigma + 1.0;
            let c_out = -sigma / s2p1.sqrt();
            let skip = sample.affine(1.0 / s2p1 as f64, 0.0)?;
            (upcast(&scale(model_output, c_out)?)? + skip)?
        }
        PredictionType::Sample => upcast(model_output)?,
    })
}

/// An `EulerDiscreteScheduler` after `set_timesteps(num_inference_steps)`.
#[derive(Debug, Clone)]
pub struct Euler {
    config: EulerConfig,
    schedule: SigmaSchedule,
}
impl Euler {
    pub fn new(values: &Map<String, Value>, num_inference_steps: usize) -> Result<Self> {
        let config = EulerConfig::from_values(values)?;
        let n_train = config.betas.num_train_timesteps;
        common::check_steps(CLASS, num_inference_steps, n_train)?;
        let alphas_cumprod = config.betas.alphas_cumprod_for_sigmas(CLASS)?;

        let karras = config
            .use_karras_sigmas
            .then_some((config.sigma_min, config.sigma_max));
        let (timesteps, sigmas) = euler_sigmas(
            (config.timestep_spacing, n_train, config.steps_offset),
            &alphas_cumprod,
            num_inference_steps,
            karras,
        );
        let mut sigmas: Vec<f32> = sigmas.into_iter().map(|s| s as f32).collect();
        sigmas.push(config.final_sigmas.last_sigma(&alphas_cumprod));

        let timesteps: Vec<f64> = if config.continuous_timesteps
            && config.prediction_type == PredictionType::VPrediction
        {
            sigmas[..sigmas.len() - 1]
                .iter()
                .map(|&s| (0.25f32 * s.ln()) as f64)
                .collect()
        } else {
            timesteps.iter().map(|&t| t as f64).collect()
        };

        let init_noise_sigma = init_noise_sigma(&sigmas, config.timestep_spacing);
        Ok(Self {
            schedule: SigmaSchedule::new(CLASS, timesteps, sigmas, init_noise_sigma),
            config,
        })
    }

    pub fn config(&self) -> &EulerConfig {
        &self.config
    }
}

impl SigmaStep for Euler {
    fn schedule(&self) -> &SigmaSchedule {
        &self.schedule
    }

    /// One Euler step from σ_i to σ_{i+1}.
    fn sigma_step(
        &mut self,
        model_output: &Tensor,
        step_index: usize,
        sample: &Tensor,
        _noise: &mut dyn NoiseSource,
    ) -> Result<Tensor> {
        let sample = upcast(sample)?;
        let sigmas = &self.schedule.sigmas;
        let sigma = sigmas[step_index];
        // s_churn = 0: gamma = 0 and sigma_hat = sigma.
        let sigma_hat = sigma;
        let pred_original_sample =
            predict_x0(self.config.prediction_type, model_output, &sample, sigma)?;
        let derivative = (&sample - pred_original_sample)?.affine(1.0 / sigma_hat as f64, 0.0)?;
        let dt = sigmas[step_index + 1] - sigma_hat;
        let prev_sample = (&sample + scale(&derivative, dt)?)?;
        Ok(prev_sample.to_dtype(model_output.dtype())?)
    }
}
