//! Linear multistep sampling of the probability-flow ODE in k-diffusion's σ
//! parametrisation: each step combines the last (up to four) derivatives with
//! coefficients that integrate their Lagrange interpolant over [σ_i, σ_{i+1}].
//!
//! Port of diffusers 0.42.1 `LMSDiscreteScheduler` (`scheduling_lms_discrete.py`):
//! `__init__` (defaults: `beta_schedule="linear"`, `prediction_type="epsilon"`,
//! `use_karras_sigmas=False`, `timestep_spacing="linspace"`, `steps_offset=0`),
//! `init_noise_sigma`, `scale_model_input`, `set_timesteps`, `get_lms_coefficient`
//! and `step` with its default `order=4`. diffusers integrates each coefficient
//! with `scipy.integrate.quad`; the integrand is a polynomial of degree < 4, which
//! three-point Gauss–Legendre quadrature integrates exactly. The step is
//! computed in float32 whatever the model's dtype, as sdserve's Euler port does
//! (diffusers' LMS computes in the model's dtype: the same in float32, which is
//! what the references check).
//!
//! Method: Katherine Crowson's k-diffusion `sample_lms` (`linear_multistep_coeff`);
//! the σ parametrisation of Karras et al. (arXiv:2206.00364).

use candle_core::Tensor;
use serde_json::{Map, Value};

use super::common::{
    self, BetaConfig, ClassConfig, PredictionType, TimestepSpacing, scale, upcast,
};
use super::euler::{euler_sigmas, init_noise_sigma, predict_x0};
use super::sigma::{SigmaSchedule, SigmaStep};
use crate::diffusion::latents::NoiseSource;
use crate::error::Result;

const CLASS: &str = "LMSDiscreteScheduler";
/// `step(..., order=4)`, what the pipelines call.
const ORDER: usize = 4;

/// The `LMSDiscreteScheduler.__init__` arguments this port reads.
#[derive(Clone, Debug)]
pub struct LmsConfig {
    pub betas: BetaConfig,
    pub prediction_type: PredictionType,
    pub use_karras_sigmas: bool,
    pub timestep_spacing: TimestepSpacing,
    pub steps_offset: i64,
}

impl LmsConfig {
    pub fn from_values(values: &Map<String, Value>) -> Result<Self> {
        let cfg = ClassConfig::new(CLASS, values);
        cfg.reject_flag("use_exponential_sigmas")?;
        cfg.reject_flag("use_beta_sigmas")?;
        Ok(Self {
            // No `rescale_betas_zero_snr` in this class's `__init__`.
            betas: BetaConfig::read(&cfg, false)?,
            prediction_type: PredictionType::read(
                &cfg,
                &[
                    PredictionType::Epsilon,
                    PredictionType::VPrediction,
                    PredictionType::Sample,
                ],
            )?,
            use_karras_sigmas: cfg.bool("use_karras_sigmas", false)?,
            timestep_spacing: TimestepSpacing::read(&cfg, "linspace")?,
            steps_offset: cfg.i64("steps_offset", 0)?,
        })
    }
}

/// `get_lms_coefficient(order, t, current_order)`: ∫ from σ_t to σ_{t+1} of
/// the Lagrange basis polynomial that is 1 at σ_{t−current_order} and 0 at the
/// other σ_{t−k}, k < order.
fn lms_coefficient(sigmas: &[f32], order: usize, t: usize, current_order: usize) -> f64 {
    let s = |i: usize| sigmas[i] as f64;
    let basis = |tau: f64| {
        (0..order)
            .filter(|&k| k != current_order)
            .map(|k| (tau - s(t - k)) / (s(t - current_order) - s(t - k)))
            .product::<f64>()
    };
    // Gauss–Legendre nodes ±√(3/5), 0 with weights 5/9, 8/9, 5/9 on [-1, 1].
    let (a, b) = (s(t), s(t + 1));
    let (mid, half) = ((a + b) / 2.0, (b - a) / 2.0);
    let node = (3.0f64 / 5.0).sqrt();
    half * (5.0 / 9.0 * basis(mid - half * node)
        + 8.0 / 9.0 * basis(mid)
        + 5.0 / 9.0 * basis(mid + half * node))
}

/// An `LMSDiscreteScheduler` after `set_timesteps(num_inference_steps)`, with
/// the derivatives of the steps taken so far.
#[derive(Debug, Clone)]
pub struct Lms {
    config: LmsConfig,
    schedule: SigmaSchedule,
    /// The last [`ORDER`] derivatives, oldest first.
    derivatives: Vec<Tensor>,
}

impl Lms {
    pub fn new(values: &Map<String, Value>, num_inference_steps: usize) -> Result<Self> {
        let config = LmsConfig::from_values(values)?;
        let n_train = config.betas.num_train_timesteps;
        common::check_steps(CLASS, num_inference_steps, n_train)?;
        let alphas_cumprod = config.betas.alphas_cumprod(CLASS)?;
        // `_convert_to_karras(in_sigmas)` over the interpolated range: this class
        // has no sigma_min / sigma_max.
        let karras = config.use_karras_sigmas.then_some((None, None));
        let (timesteps, sigmas) = euler_sigmas(
            (config.timestep_spacing, n_train, config.steps_offset),
            &alphas_cumprod,
            num_inference_steps,
            karras,
        );
        let mut sigmas: Vec<f32> = sigmas.into_iter().map(|s| s as f32).collect();
        sigmas.push(0.0);
        let init_noise_sigma = init_noise_sigma(&sigmas, config.timestep_spacing);
        let timesteps = timesteps.iter().map(|&t| t as f64).collect();
        Ok(Self {
            schedule: SigmaSchedule::new(CLASS, timesteps, sigmas, init_noise_sigma),
            config,
            derivatives: Vec::new(),
        })
    }

    pub fn config(&self) -> &LmsConfig {
        &self.config
    }
}

impl SigmaStep for Lms {
    fn schedule(&self) -> &SigmaSchedule {
        &self.schedule
    }

    /// One linear multistep step from σ_i to σ_{i+1}, of order min(i + 1, 4).
    fn sigma_step(
        &mut self,
        model_output: &Tensor,
        step_index: usize,
        sample: &Tensor,
        _noise: &mut dyn NoiseSource,
    ) -> Result<Tensor> {
        let sample32 = upcast(sample)?;
        let sigmas = &self.schedule.sigmas;
        let sigma = sigmas[step_index];
        let x0 = predict_x0(self.config.prediction_type, model_output, &sample32, sigma)?;
        let derivative = (&sample32 - x0)?.affine(1.0 / sigma as f64, 0.0)?;
        self.derivatives.push(derivative);
        if self.derivatives.len() > ORDER {
            self.derivatives.remove(0);
        }
        let order = (step_index + 1).min(ORDER);
        // `sum(coeff * derivative for ... zip(coeffs, reversed(derivatives)))`,
        // newest derivative first, each coefficient applied as float32.
        let mut sum: Option<Tensor> = None;
        for (current, d) in (0..order).zip(self.derivatives.iter().rev()) {
            let c = lms_coefficient(sigmas, order, step_index, current) as f32;
            let term = scale(d, c)?;
            sum = Some(match sum {
                None => term,
                Some(s) => (s + term)?,
            });
        }
        let sum = sum.expect("at least one derivative");
        Ok((sample32 + sum)?.to_dtype(model_output.dtype())?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The coefficients of a step integrate the basis exactly: they sum to the
    /// step length (the basis polynomials sum to 1), and order 1 is Euler's dt.
    #[test]
    fn coefficients_integrate_the_lagrange_basis() {
        let sigmas = [14.6f32, 9.2, 5.1, 2.7, 1.3, 0.0];
        for t in 0..5 {
            let order = (t + 1).min(ORDER);
            let total: f64 = (0..order)
                .map(|c| lms_coefficient(&sigmas, order, t, c))
                .sum();
            let dt = sigmas[t + 1] as f64 - sigmas[t] as f64;
            assert!((total - dt).abs() < 1e-12, "t {t}: {total} vs {dt}");
        }
        let euler = lms_coefficient(&sigmas, 1, 2, 0);
        assert!((euler - (2.7f32 as f64 - 5.1f32 as f64)).abs() < 1e-12);
    }
}
