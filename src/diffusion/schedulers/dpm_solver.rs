//! DPM-Solver++ (multistep, data prediction), orders 1 to 3.
//!
//! Port of diffusers 0.42.1 `DPMSolverMultistepScheduler` (`scheduling_dpmsolver_multistep.py`)
//! for `algorithm_type="dpmsolver++"` (the default; `"deis"` maps to it as in diffusers):
//! `__init__` (defaults: `beta_schedule="linear"`, `solver_order=2`,
//! `prediction_type="epsilon"`, `solver_type="midpoint"`, `lower_order_final=True`,
//! `euler_at_final=False`, `use_karras_sigmas=False`, `final_sigmas_type="zero"`,
//! `lambda_min_clipped=-inf`, `timestep_spacing="linspace"`, `steps_offset=0`),
//! `set_timesteps` (with `_sigma_to_t` and `_convert_to_karras`), `convert_model_output`,
//! `_sigma_to_alpha_sigma_t`, `dpm_solver_first_order_update`,
//! `multistep_dpm_solver_second_order_update` (midpoint and heun),
//! `multistep_dpm_solver_third_order_update` and `step`.
//!
//! Papers: Lu, Zhou, Bao, Chen, Li & Zhu, "DPM-Solver++: Fast Solver for Guided Sampling
//! of Diffusion Probabilistic Models" (arXiv:2211.01095), Algorithm 2 (multistep
//! second order), and "DPM-Solver" (arXiv:2206.00927); Karras et al.
//! (arXiv:2206.00364) for Karras sigmas.
//!
//! Subtleties kept from diffusers:
//! - with Karras sigmas the timesteps are the rounded `_sigma_to_t` of each sigma
//!   (truncated, not rounded, for `squaredcos_cap_v2`), while the solver keeps the
//!   unrounded Karras sigmas; the Karras range is the full training range;
//! - `sigma_min` / `sigma_max` are not `__init__` arguments of this class, but a
//!   model config that carries them (saved for another class) still sets the Karras
//!   range, as diffusers registers such keys as hidden config;
//! - the last step is first order when `final_sigmas_type="zero"`, `euler_at_final`,
//!   or `lower_order_final` with fewer than 15 steps (the second-to-last then is at
//!   most second order);
//! - the solver's scalars (α_t, σ_t, λ_t, h, ...) are float32, and the update is
//!   computed on a float32 copy of the sample.

use candle_core::Tensor;
use serde_json::{Map, Value};

use super::Scheduler;
use super::common::{
    self, BetaConfig, ClassConfig, FinalSigmas, PredictionType, TimestepSpacing, interp,
    karras_sigmas, np_arange, np_linspace, np_round, scale, sigma_to_t, upcast,
};
use crate::diffusion::latents::NoiseSource;
use crate::error::Result;

const CLASS: &str = "DPMSolverMultistepScheduler";

/// `solver_type` of the second-order update.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SolverType {
    Midpoint,
    Heun,
}

/// The `DPMSolverMultistepScheduler.__init__` arguments this port reads.
#[derive(Clone, Debug)]
pub struct DpmSolverConfig {
    pub betas: BetaConfig,
    pub solver_order: usize,
    pub prediction_type: PredictionType,
    pub solver_type: SolverType,
    pub lower_order_final: bool,
    pub euler_at_final: bool,
    pub use_karras_sigmas: bool,
    pub final_sigmas: FinalSigmas,
    pub lambda_min_clipped: f64,
    pub timestep_spacing: TimestepSpacing,
    pub steps_offset: i64,
    /// Hidden config keys (see the module docs).
    pub sigma_min: Option<f64>,
    pub sigma_max: Option<f64>,
}

impl DpmSolverConfig {
    pub fn from_values(values: &Map<String, Value>) -> Result<Self> {
        let cfg = ClassConfig::new(CLASS, values);
        let algorithm = cfg.string("algorithm_type", "dpmsolver++")?;
        match algorithm.as_str() {
            "dpmsolver++" | "deis" => {}
            "dpmsolver" | "sde-dpmsolver" | "sde-dpmsolver++" => {
                return Err(cfg.invalid(
                    "algorithm_type",
                    format!("{algorithm:?}"),
                    "only \"dpmsolver++\" is implemented",
                ));
            }
            _ => {
                return Err(cfg.invalid(
                    "algorithm_type",
                    format!("{algorithm:?}"),
                    "expected \"dpmsolver++\"",
                ));
            }
        }
        let solver_type = cfg.string("solver_type", "midpoint")?;
        let solver_type = match solver_type.as_str() {
            // diffusers maps the UniPC names onto midpoint.
            "midpoint" | "logrho" | "bh1" | "bh2" => SolverType::Midpoint,
            "heun" => SolverType::Heun,
            other => {
                return Err(cfg.invalid(
                    "solver_type",
                    format!("{other:?}"),
                    "expected one of: midpoint, heun",
                ));
            }
        };
        let final_sigmas = FinalSigmas::read(&cfg)?;
        if algorithm != "dpmsolver++" && final_sigmas == FinalSigmas::Zero {
            // diffusers checks the algorithm_type as given, before mapping deis.
            return Err(cfg.invalid(
                "final_sigmas_type",
                "\"zero\"",
                &format!("algorithm_type {algorithm:?} needs final_sigmas_type \"sigma_min\""),
            ));
        }
        if cfg.bool("thresholding", false)? {
            return Err(common::config_error(
                CLASS,
                "thresholding=true (dynamic thresholding) is not supported",
            ));
        }
        if let Some(v) = cfg.opt_string("variance_type")? {
            return Err(cfg.invalid(
                "variance_type",
                format!("{v:?}"),
                "only null is supported (the UNet predicts no variance)",
            ));
        }
        for flag in [
            "use_exponential_sigmas",
            "use_beta_sigmas",
            "use_lu_lambdas",
            "use_flow_sigmas",
            "use_dynamic_shifting",
        ] {
            cfg.reject_flag(flag)?;
        }
        Ok(Self {
            betas: BetaConfig::read(&cfg, true)?,
            solver_order: cfg.positive("solver_order", 2)?,
            prediction_type: PredictionType::read(
                &cfg,
                &[
                    PredictionType::Epsilon,
                    PredictionType::Sample,
                    PredictionType::VPrediction,
                ],
            )?,
            solver_type,
            lower_order_final: cfg.bool("lower_order_final", true)?,
            euler_at_final: cfg.bool("euler_at_final", false)?,
            use_karras_sigmas: cfg.bool("use_karras_sigmas", false)?,
            final_sigmas,
            lambda_min_clipped: cfg.f64("lambda_min_clipped", f64::NEG_INFINITY)?,
            timestep_spacing: TimestepSpacing::read(&cfg, "linspace")?,
            steps_offset: cfg.i64("steps_offset", 0)?,
            sigma_min: cfg.opt_f64("sigma_min")?,
            sigma_max: cfg.opt_f64("sigma_max")?,
        })
    }
}

/// `DPMSolverMultistepScheduler.set_timesteps` without Karras sigmas (int64,
/// descending). `last_timestep` is `num_train_timesteps` minus the λ-clipped count.
pub fn dpm_timesteps(
    spacing: TimestepSpacing,
    num_train_timesteps: usize,
    last_timestep: usize,
    num_inference_steps: usize,
    steps_offset: i64,
) -> Vec<i64> {
    let n = num_inference_steps;
    match spacing {
        // np.linspace(0, last - 1, n + 1).round()[::-1][:-1]
        TimestepSpacing::Linspace => {
            let mut v: Vec<i64> = np_linspace(0.0, last_timestep as f64 - 1.0, n + 1)
                .into_iter()
                .rev()
                .map(|t| np_round(t) as i64)
                .collect();
            v.pop();
            v
        }
        // (np.arange(0, n + 1) * (last // (n + 1))).round()[::-1][:-1] + steps_offset
        TimestepSpacing::Leading => {
            let ratio = last_timestep / (n + 1);
            (1..=n)
                .rev()
                .map(|i| (i * ratio) as i64 + steps_offset)
                .collect()
        }
        // np.arange(last, 0, -N / n).round() - 1
        TimestepSpacing::Trailing => {
            let ratio = num_train_timesteps as f64 / n as f64;
            np_arange(last_timestep as f64, 0.0, -ratio)
                .into_iter()
                .map(|t| np_round(t) as i64 - 1)
                .collect()
        }
    }
}

/// α_t = 1 / (σ² + 1)^½ and σ_t = σ·α_t (`_sigma_to_alpha_sigma_t`), float32.
pub(super) fn alpha_sigma(sigma: f32) -> (f32, f32) {
    let alpha = 1.0 / (sigma * sigma + 1.0).sqrt();
    (alpha, sigma * alpha)
}

/// `α_t · original + σ_t · noise` at σ (`add_noise` of the classes that
/// parameterise by α and σ: DPM-Solver and UniPC).
pub(super) fn add_noise_alpha_sigma(
    original: &Tensor,
    noise: &Tensor,
    sigma: f32,
) -> Result<Tensor> {
    let (alpha_t, sigma_t) = alpha_sigma(sigma);
    let (original, noise) = common::promote(original, noise)?;
    Ok((scale(&original, alpha_t)? + scale(&noise, sigma_t)?)?)
}

/// λ = ln α − ln σ (float32; +∞ at σ = 0).
pub(super) fn lambda(alpha: f32, sigma: f32) -> f32 {
    alpha.ln() - sigma.ln()
}

/// A `DPMSolverMultistepScheduler` after `set_timesteps(num_inference_steps)`,
/// holding the previous steps' data predictions.
#[derive(Debug, Clone)]
pub struct DpmSolverMultistep {
    config: DpmSolverConfig,
    timesteps: Vec<f64>,
    sigmas: Vec<f32>,
    sigmas_f64: Vec<f64>,
    /// The last `solver_order` converted model outputs, oldest first.
    model_outputs: Vec<Option<Tensor>>,
    lower_order_nums: usize,
}

impl DpmSolverMultistep {
    pub fn new(values: &Map<String, Value>, num_inference_steps: usize) -> Result<Self> {
        let config = DpmSolverConfig::from_values(values)?;
        let n_train = config.betas.num_train_timesteps;
        common::check_steps(CLASS, num_inference_steps, n_train)?;
        let alphas_cumprod = config.betas.alphas_cumprod_for_sigmas(CLASS)?;

        // clipped_idx = torch.searchsorted(torch.flip(lambda_t, [0]), lambda_min_clipped)
        let mut flipped_lambdas: Vec<f32> = alphas_cumprod
            .iter()
            .map(|&a| a.sqrt().ln() - (1.0 - a).sqrt().ln())
            .collect();
        flipped_lambdas.reverse();
        let clip = config.lambda_min_clipped as f32;
        let clipped_idx = flipped_lambdas.partition_point(|&l| l < clip);
        let last_timestep = n_train.saturating_sub(clipped_idx);

        let train_sigmas = common::train_sigmas(&alphas_cumprod);
        let (timesteps, sigmas): (Vec<i64>, Vec<f64>) = if config.use_karras_sigmas {
            let log_sigmas = common::log_sigmas(&train_sigmas);
            // in_sigmas = np.flip(sigmas): the whole training range.
            let sigma_min = config.sigma_min.unwrap_or(train_sigmas[0] as f64);
            let sigma_max = config
                .sigma_max
                .unwrap_or(train_sigmas[train_sigmas.len() - 1] as f64);
            let sigmas = karras_sigmas(sigma_min, sigma_max, num_inference_steps);
            let round = config.betas.beta_schedule != "squaredcos_cap_v2";
            let timesteps = sigmas
                .iter()
                .map(|&s| {
                    let t = sigma_to_t(s, &log_sigmas);
                    // .round() unless squaredcos_cap_v2, then .to(torch.int64) truncates.
                    (if round { np_round(t) } else { t }) as i64
                })
                .collect();
            (timesteps, sigmas)
        } else {
            let timesteps = dpm_timesteps(
                config.timestep_spacing,
                n_train,
                last_timestep,
                num_inference_steps,
                config.steps_offset,
            );
            let train_sigmas_f64: Vec<f64> = train_sigmas.iter().map(|&s| s as f64).collect();
            let sigmas = timesteps
                .iter()
                .map(|&t| interp(t as f64, &train_sigmas_f64))
                .collect();
            (timesteps, sigmas)
        };
        if timesteps.is_empty() {
            return Err(common::config_error(
                CLASS,
                "the timestep schedule is empty (check lambda_min_clipped)",
            ));
        }

        let mut sigmas: Vec<f32> = sigmas.into_iter().map(|s| s as f32).collect();
        sigmas.push(config.final_sigmas.last_sigma(&alphas_cumprod));
        let order = config.solver_order;
        Ok(Self {
            timesteps: timesteps.iter().map(|&t| t as f64).collect(),
            sigmas_f64: sigmas.iter().map(|&s| s as f64).collect(),
            sigmas,
            model_outputs: vec![None; order],
            lower_order_nums: 0,
            config,
        })
    }

    pub fn config(&self) -> &DpmSolverConfig {
        &self.config
    }

    /// `convert_model_output` for dpmsolver++: the data prediction x₀, in the
    /// model output's dtype.
    fn convert_model_output(
        &self,
        model_output: &Tensor,
        sample: &Tensor,
        step_index: usize,
    ) -> Result<Tensor> {
        let (model_output, sample) = common::promote(model_output, sample)?;
        let (alpha_t, sigma_t) = alpha_sigma(self.sigmas[step_index]);
        Ok(match self.config.prediction_type {
            // (sample - sigma_t * model_output) / alpha_t
            PredictionType::Epsilon => {
                (&sample - scale(&model_output, sigma_t)?)?.affine(1.0 / alpha_t as f64, 0.0)?
            }
            PredictionType::Sample => model_output,
            // alpha_t * sample - sigma_t * model_output
            PredictionType::VPrediction => {
                (scale(&sample, alpha_t)? - scale(&model_output, sigma_t)?)?
            }
        })
    }

    /// The `k`-th most recent data prediction (0 = this step's).
    fn previous(&self, k: usize) -> Result<&Tensor> {
        let len = self.model_outputs.len();
        self.model_outputs
            .get(len.wrapping_sub(1 + k))
            .and_then(Option::as_ref)
            .ok_or_else(|| common::config_error(CLASS, "multistep update without enough history"))
    }

    /// `dpm_solver_first_order_update` (dpmsolver++): a DDIM step in λ.
    fn first_order_update(&self, x0: &Tensor, i: usize, sample: &Tensor) -> Result<Tensor> {
        let (alpha_t, sigma_t) = alpha_sigma(self.sigmas[i + 1]);
        let (alpha_s, sigma_s) = alpha_sigma(self.sigmas[i]);
        let h = lambda(alpha_t, sigma_t) - lambda(alpha_s, sigma_s);
        // (sigma_t / sigma_s) * sample - (alpha_t * (exp(-h) - 1.0)) * model_output
        let c_d0 = alpha_t * ((-h).exp() - 1.0);
        Ok((scale(sample, sigma_t / sigma_s)? - upcast(&scale(x0, c_d0)?)?)?)
    }

    /// `multistep_dpm_solver_second_order_update` (dpmsolver++).
    fn second_order_update(&self, i: usize, sample: &Tensor) -> Result<Tensor> {
        if i < 1 {
            return Err(common::config_error(
                CLASS,
                "second-order update needs a previous step",
            ));
        }
        let (alpha_t, sigma_t) = alpha_sigma(self.sigmas[i + 1]);
        let (alpha_s0, sigma_s0) = alpha_sigma(self.sigmas[i]);
        let (alpha_s1, sigma_s1) = alpha_sigma(self.sigmas[i - 1]);
        let lambda_t = lambda(alpha_t, sigma_t);
        let lambda_s0 = lambda(alpha_s0, sigma_s0);
        let lambda_s1 = lambda(alpha_s1, sigma_s1);
        let (m0, m1) = (self.previous(0)?, self.previous(1)?);

        let (h, h_0) = (lambda_t - lambda_s0, lambda_s0 - lambda_s1);
        let r0 = h_0 / h;
        // D0, D1 = m0, (1.0 / r0) * (m0 - m1)
        let d1 = scale(&(m0 - m1)?, 1.0 / r0)?;
        let exp_m1 = (-h).exp() - 1.0;
        let c_d0 = alpha_t * exp_m1;
        let base = (scale(sample, sigma_t / sigma_s0)? - upcast(&scale(m0, c_d0)?)?)?;
        Ok(match self.config.solver_type {
            // - 0.5 * (alpha_t * (exp(-h) - 1.0)) * D1
            SolverType::Midpoint => (base - upcast(&scale(&d1, 0.5 * c_d0)?)?)?,
            // + (alpha_t * ((exp(-h) - 1.0) / h + 1.0)) * D1
            SolverType::Heun => (base + upcast(&scale(&d1, alpha_t * (exp_m1 / h + 1.0))?)?)?,
        })
    }

    /// `multistep_dpm_solver_third_order_update` (dpmsolver++).
    fn third_order_update(&self, i: usize, sample: &Tensor) -> Result<Tensor> {
        if i < 2 {
            return Err(common::config_error(
                CLASS,
                "third-order update needs two previous steps",
            ));
        }
        let (alpha_t, sigma_t) = alpha_sigma(self.sigmas[i + 1]);
        let (alpha_s0, sigma_s0) = alpha_sigma(self.sigmas[i]);
        let (alpha_s1, sigma_s1) = alpha_sigma(self.sigmas[i - 1]);
        let (alpha_s2, sigma_s2) = alpha_sigma(self.sigmas[i - 2]);
        let lambda_t = lambda(alpha_t, sigma_t);
        let lambda_s0 = lambda(alpha_s0, sigma_s0);
        let lambda_s1 = lambda(alpha_s1, sigma_s1);
        let lambda_s2 = lambda(alpha_s2, sigma_s2);
        let (m0, m1, m2) = (self.previous(0)?, self.previous(1)?, self.previous(2)?);

        let (h, h_0, h_1) = (
            lambda_t - lambda_s0,
            lambda_s0 - lambda_s1,
            lambda_s1 - lambda_s2,
        );
        let (r0, r1) = (h_0 / h, h_1 / h);
        let d1_0 = scale(&(m0 - m1)?, 1.0 / r0)?;
        let d1_1 = scale(&(m1 - m2)?, 1.0 / r1)?;
        let d1_diff = (&d1_0 - &d1_1)?;
        let d1 = (&d1_0 + scale(&d1_diff, r0 / (r0 + r1))?)?;
        let d2 = scale(&d1_diff, 1.0 / (r0 + r1))?;

        let exp_m1 = (-h).exp() - 1.0;
        let c_d0 = alpha_t * exp_m1;
        let c_d1 = alpha_t * (exp_m1 / h + 1.0);
        let c_d2 = alpha_t * (((-h).exp() - 1.0 + h) / (h * h) - 0.5);
        let x = (scale(sample, sigma_t / sigma_s0)? - upcast(&scale(m0, c_d0)?)?)?;
        let x = (x + upcast(&scale(&d1, c_d1)?)?)?;
        Ok((x - upcast(&scale(&d2, c_d2)?)?)?)
    }
}

impl Scheduler for DpmSolverMultistep {
    fn class_name(&self) -> &'static str {
        CLASS
    }

    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    /// `scheduler.sigmas`: one per timestep plus the final sigma.
    fn sigmas(&self) -> Option<&[f64]> {
        Some(&self.sigmas_f64)
    }

    /// `α_t · original + σ_t · noise` at `sigmas[step_index]`, as diffusers'
    /// `DPMSolverMultistepScheduler.add_noise` (`_sigma_to_alpha_sigma_t`).
    fn add_noise(&self, original: &Tensor, noise: &Tensor, step_index: usize) -> Result<Tensor> {
        common::check_step_index(CLASS, step_index, self.timesteps.len())?;
        add_noise_alpha_sigma(original, noise, self.sigmas[step_index])
    }

    /// The model output at `timesteps()[step_index]` → the sample at the next sigma.
    fn step(
        &mut self,
        model_output: &Tensor,
        step_index: usize,
        sample: &Tensor,
        _noise: &mut dyn NoiseSource,
    ) -> Result<Tensor> {
        let n = self.timesteps.len();
        common::check_step_index(CLASS, step_index, n)?;
        let cfg = &self.config;
        let lower_order_final = step_index == n - 1
            && (cfg.euler_at_final
                || (cfg.lower_order_final && n < 15)
                || cfg.final_sigmas == FinalSigmas::Zero);
        let lower_order_second = step_index + 2 == n && cfg.lower_order_final && n < 15;

        let x0 = self.convert_model_output(model_output, sample, step_index)?;
        self.model_outputs.rotate_left(1);
        let last = self.model_outputs.len() - 1;
        self.model_outputs[last] = Some(x0.clone());

        let sample = upcast(sample)?;
        let order = self.config.solver_order;
        let prev_sample = if order == 1 || self.lower_order_nums < 1 || lower_order_final {
            self.first_order_update(&x0, step_index, &sample)?
        } else if order == 2 || self.lower_order_nums < 2 || lower_order_second {
            self.second_order_update(step_index, &sample)?
        } else {
            self.third_order_update(step_index, &sample)?
        };
        if self.lower_order_nums < order {
            self.lower_order_nums += 1;
        }
        Ok(prev_sample.to_dtype(model_output.dtype())?)
    }
}
