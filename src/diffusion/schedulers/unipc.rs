//! UniPC: a unified predictor-corrector multistep solver of the diffusion ODE
//! (Zhao, Bai, Rao, Zhou & Lu 2023, "UniPC: A Unified Predictor-Corrector
//! Framework for Fast Sampling of Diffusion Models", arXiv:2302.04867; UniP-p
//! and UniC-p with the B(h) choices bh1 = h and bh2 = eʰ − 1).
//!
//! Port of diffusers 0.42.1 `UniPCMultistepScheduler` (`scheduling_unipc_multistep.py`):
//! `__init__` (defaults: `beta_schedule="linear"`, `solver_order=2`,
//! `prediction_type="epsilon"`, `predict_x0=True`, `solver_type="bh2"`,
//! `lower_order_final=True`, `disable_corrector=[]`, `use_karras_sigmas=False`,
//! `timestep_spacing="linspace"`, `steps_offset=0`, `final_sigmas_type="zero"`),
//! `set_timesteps`, `convert_model_output`, `multistep_uni_p_bh_update`,
//! `multistep_uni_c_bh_update`, `step` and `add_noise`. The schedule is
//! DPM-Solver's (both classes share diffusers' `set_timesteps` spacing code),
//! without `lambda_min_clipped`.
//!
//! As in diffusers, every scalar (α, σ, λ, h, the φ terms, the ρ coefficients
//! solved from the small Vandermonde-like system) is float32, and each step
//! first corrects the sample the previous step predicted, using this step's
//! model output, then predicts the next one.

use candle_core::Tensor;
use serde_json::{Map, Value};

use super::Scheduler;
use super::common::{
    self, BetaConfig, ClassConfig, FinalSigmas, PredictionType, TimestepSpacing, interp,
    karras_sigmas, np_round, scale, sigma_to_t, upcast,
};
use super::dpm_solver::{add_noise_alpha_sigma, alpha_sigma, dpm_timesteps, lambda};
use crate::diffusion::latents::NoiseSource;
use crate::error::Result;

const CLASS: &str = "UniPCMultistepScheduler";

/// B(h) of the update (`solver_type`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BhType {
    /// B(h) = h.
    Bh1,
    /// B(h) = eʰ − 1.
    Bh2,
}

/// The `UniPCMultistepScheduler.__init__` arguments this port reads.
#[derive(Clone, Debug)]
pub struct UniPcConfig {
    pub betas: BetaConfig,
    pub solver_order: usize,
    pub prediction_type: PredictionType,
    /// Solve for the data prediction x₀ (true) or the noise ε.
    pub predict_x0: bool,
    pub solver_type: BhType,
    pub lower_order_final: bool,
    /// Step indices whose following step skips the corrector.
    pub disable_corrector: Vec<usize>,
    pub use_karras_sigmas: bool,
    pub final_sigmas: FinalSigmas,
    pub timestep_spacing: TimestepSpacing,
    pub steps_offset: i64,
    pub sigma_min: Option<f64>,
    pub sigma_max: Option<f64>,
}

impl UniPcConfig {
    pub fn from_values(values: &Map<String, Value>) -> Result<Self> {
        let cfg = ClassConfig::new(CLASS, values);
        let solver_type = match cfg.string("solver_type", "bh2")?.as_str() {
            "bh1" => BhType::Bh1,
            // diffusers registers DPM-Solver's names as bh2.
            "bh2" | "midpoint" | "heun" | "logrho" => BhType::Bh2,
            other => {
                return Err(cfg.invalid(
                    "solver_type",
                    format!("{other:?}"),
                    "expected one of: bh1, bh2",
                ));
            }
        };
        if cfg.bool("thresholding", false)? {
            return Err(common::config_error(
                CLASS,
                "thresholding=true (dynamic thresholding) is not supported",
            ));
        }
        if values.get("solver_p").is_some_and(|v| !v.is_null()) {
            return Err(common::config_error(CLASS, "solver_p is not supported"));
        }
        for flag in [
            "use_exponential_sigmas",
            "use_beta_sigmas",
            "use_flow_sigmas",
            "use_dynamic_shifting",
        ] {
            cfg.reject_flag(flag)?;
        }
        let disable_corrector = cfg
            .opt_f64_list("disable_corrector")?
            .unwrap_or_default()
            .into_iter()
            .map(|v| v as usize)
            .collect();
        let final_sigmas = FinalSigmas::read(&cfg)?;
        let predict_x0 = cfg.bool("predict_x0", true)?;
        if final_sigmas == FinalSigmas::Zero && (solver_type == BhType::Bh1 || !predict_x0) {
            // B(h) = h and the ε form multiply by ∞ · 0 at σ = 0: diffusers'
            // last step returns NaN.
            return Err(cfg.invalid(
                "final_sigmas_type",
                "\"zero\"",
                "solver_type bh1 and predict_x0 false end in NaN at a final sigma of 0 (as in \
                 diffusers); use final_sigmas_type \"sigma_min\"",
            ));
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
            predict_x0,
            solver_type,
            lower_order_final: cfg.bool("lower_order_final", true)?,
            disable_corrector,
            use_karras_sigmas: cfg.bool("use_karras_sigmas", false)?,
            final_sigmas,
            timestep_spacing: TimestepSpacing::read(&cfg, "linspace")?,
            steps_offset: cfg.i64("steps_offset", 0)?,
            sigma_min: cfg.opt_f64("sigma_min")?,
            sigma_max: cfg.opt_f64("sigma_max")?,
        })
    }
}

/// Solves `a · x = b` (n ≤ 3) by Gaussian elimination with partial pivoting
/// in float32, as LAPACK's `sgesv` behind `torch.linalg.solve` does.
fn solve(mut a: Vec<Vec<f32>>, mut b: Vec<f32>) -> Vec<f32> {
    let n = b.len();
    for col in 0..n {
        let pivot = (col..n)
            .max_by(|&i, &j| a[i][col].abs().total_cmp(&a[j][col].abs()))
            .unwrap_or(col);
        a.swap(col, pivot);
        b.swap(col, pivot);
        let pivot_row = a[col].clone();
        for row in col + 1..n {
            let f = a[row][col] / pivot_row[col];
            for (x, p) in a[row][col..].iter_mut().zip(&pivot_row[col..]) {
                *x -= f * p;
            }
            b[row] -= f * b[col];
        }
    }
    let mut x = vec![0f32; n];
    for row in (0..n).rev() {
        let s: f32 = (row + 1..n).map(|k| a[row][k] * x[k]).sum();
        x[row] = (b[row] - s) / a[row][row];
    }
    x
}

/// What the predictor and the corrector share for one update from σ_s0 to
/// σ_t: the φ terms, B(h), and the `R` / `b` system of `order` rows.
struct Terms {
    alpha_t: f32,
    sigma_t: f32,
    alpha_s0: f32,
    sigma_s0: f32,
    h_phi_1: f32,
    b_h: f32,
    /// `rks`: (λ_si − λ_s0) / h for the earlier outputs, then 1.
    rks: Vec<f32>,
    /// `R[i][k] = rks[k]^i`.
    r: Vec<Vec<f32>>,
    b: Vec<f32>,
}

/// A `UniPCMultistepScheduler` after `set_timesteps(num_inference_steps)`,
/// holding the previous steps' converted outputs and the last sample.
#[derive(Debug, Clone)]
pub struct UniPc {
    config: UniPcConfig,
    timesteps: Vec<f64>,
    sigmas: Vec<f32>,
    sigmas_f64: Vec<f64>,
    /// The last `solver_order` converted model outputs, oldest first.
    model_outputs: Vec<Option<Tensor>>,
    lower_order_nums: usize,
    /// The order of the last predictor step (the next corrector's).
    this_order: usize,
    last_sample: Option<Tensor>,
}

impl UniPc {
    pub fn new(values: &Map<String, Value>, num_inference_steps: usize) -> Result<Self> {
        let config = UniPcConfig::from_values(values)?;
        let n_train = config.betas.num_train_timesteps;
        common::check_steps(CLASS, num_inference_steps, n_train)?;
        let alphas_cumprod = config.betas.alphas_cumprod_for_sigmas(CLASS)?;
        let train_sigmas = common::train_sigmas(&alphas_cumprod);
        let (timesteps, mut sigmas): (Vec<i64>, Vec<f32>) = if config.use_karras_sigmas {
            // `_convert_to_karras(np.flip(sigmas))`: the whole training range
            // unless sigma_min / sigma_max are set; timesteps rounded.
            let log_sigmas = common::log_sigmas(&train_sigmas);
            let sigma_min = config.sigma_min.unwrap_or(train_sigmas[0] as f64);
            let sigma_max = config
                .sigma_max
                .unwrap_or(train_sigmas[train_sigmas.len() - 1] as f64);
            let sigmas = karras_sigmas(sigma_min, sigma_max, num_inference_steps);
            let timesteps = sigmas
                .iter()
                .map(|&s| np_round(sigma_to_t(s, &log_sigmas)) as i64)
                .collect();
            (timesteps, sigmas.into_iter().map(|s| s as f32).collect())
        } else {
            let timesteps = dpm_timesteps(
                config.timestep_spacing,
                n_train,
                n_train,
                num_inference_steps,
                config.steps_offset,
            );
            let train_f64: Vec<f64> = train_sigmas.iter().map(|&s| s as f64).collect();
            let sigmas = timesteps
                .iter()
                .map(|&t| interp(t as f64, &train_f64) as f32)
                .collect();
            (timesteps, sigmas)
        };
        let last = match config.final_sigmas {
            // With Karras sigmas diffusers repeats the last Karras sigma.
            FinalSigmas::SigmaMin if config.use_karras_sigmas => sigmas[sigmas.len() - 1],
            f => f.last_sigma(&alphas_cumprod),
        };
        sigmas.push(last);
        let order = config.solver_order;
        Ok(Self {
            timesteps: timesteps.iter().map(|&t| t as f64).collect(),
            sigmas_f64: sigmas.iter().map(|&s| s as f64).collect(),
            sigmas,
            model_outputs: vec![None; order],
            lower_order_nums: 0,
            this_order: 1,
            last_sample: None,
            config,
        })
    }

    pub fn config(&self) -> &UniPcConfig {
        &self.config
    }

    /// `convert_model_output`: x₀ (`predict_x0`) or ε, in float32.
    fn convert(&self, model_output: &Tensor, sample: &Tensor, i: usize) -> Result<Tensor> {
        let (model_output, sample) = (upcast(model_output)?, upcast(sample)?);
        let (alpha_t, sigma_t) = alpha_sigma(self.sigmas[i]);
        let p = self.config.prediction_type;
        Ok(match (self.config.predict_x0, p) {
            // (sample - sigma_t * model_output) / alpha_t
            (true, PredictionType::Epsilon) => {
                (&sample - scale(&model_output, sigma_t)?)?.affine(1.0 / alpha_t as f64, 0.0)?
            }
            (true, PredictionType::Sample) | (false, PredictionType::Epsilon) => model_output,
            // alpha_t * sample - sigma_t * model_output
            (true, PredictionType::VPrediction) => {
                (scale(&sample, alpha_t)? - scale(&model_output, sigma_t)?)?
            }
            // (sample - alpha_t * model_output) / sigma_t
            (false, PredictionType::Sample) => {
                (&sample - scale(&model_output, alpha_t)?)?.affine(1.0 / sigma_t as f64, 0.0)?
            }
            // alpha_t * model_output + sigma_t * sample
            (false, PredictionType::VPrediction) => {
                (scale(&model_output, alpha_t)? + scale(&sample, sigma_t)?)?
            }
        })
    }

    /// The `k`-th most recent converted output (0 = the newest stored).
    fn previous(&self, k: usize) -> Result<&Tensor> {
        let len = self.model_outputs.len();
        self.model_outputs
            .get(len.wrapping_sub(1 + k))
            .and_then(Option::as_ref)
            .ok_or_else(|| common::config_error(CLASS, "multistep update without enough history"))
    }

    /// The update's scalars from σ at `s0` to σ at `t`, with the earlier
    /// outputs at the σ indices `earlier` (newest first).
    fn terms(&self, t: usize, s0: usize, earlier: &[usize]) -> Terms {
        let (alpha_t, sigma_t) = alpha_sigma(self.sigmas[t]);
        let (alpha_s0, sigma_s0) = alpha_sigma(self.sigmas[s0]);
        let lambda_s0 = lambda(alpha_s0, sigma_s0);
        let h = lambda(alpha_t, sigma_t) - lambda_s0;
        let mut rks: Vec<f32> = earlier
            .iter()
            .map(|&si| {
                let (a, s) = alpha_sigma(self.sigmas[si]);
                (lambda(a, s) - lambda_s0) / h
            })
            .collect();
        rks.push(1.0);
        let hh = if self.config.predict_x0 { -h } else { h };
        let h_phi_1 = hh.exp_m1();
        let mut h_phi_k = h_phi_1 / hh - 1.0;
        let mut factorial = 1u64;
        let b_h = match self.config.solver_type {
            BhType::Bh1 => hh,
            BhType::Bh2 => hh.exp_m1(),
        };
        let order = rks.len();
        let mut r = Vec::with_capacity(order);
        let mut b = Vec::with_capacity(order);
        for i in 1..=order {
            r.push(rks.iter().map(|&rk| rk.powi(i as i32 - 1)).collect());
            b.push(h_phi_k * factorial as f32 / b_h);
            factorial *= i as u64 + 1;
            h_phi_k = h_phi_k / hh - (1.0 / factorial as f64) as f32;
        }
        Terms {
            alpha_t,
            sigma_t,
            alpha_s0,
            sigma_s0,
            h_phi_1,
            b_h,
            rks,
            r,
            b,
        }
    }

    /// `x_t_`: the first-order part of both updates, and the factor the
    /// higher-order residual is multiplied by (α_t·B(h) or σ_t·B(h)).
    fn base(&self, terms: &Terms, x: &Tensor, m0: &Tensor) -> Result<(Tensor, f32)> {
        let Terms {
            alpha_t,
            sigma_t,
            alpha_s0,
            sigma_s0,
            h_phi_1,
            b_h,
            ..
        } = *terms;
        Ok(if self.config.predict_x0 {
            let x_t = (scale(x, sigma_t / sigma_s0)? - scale(m0, alpha_t * h_phi_1)?)?;
            (x_t, alpha_t * b_h)
        } else {
            let x_t = (scale(x, alpha_t / alpha_s0)? - scale(m0, sigma_t * h_phi_1)?)?;
            (x_t, sigma_t * b_h)
        })
    }

    /// `Σ_k ρ_k · D1_k` with `D1_k = (m_k − m0) / r_k` (the einsum), or `None`
    /// without earlier outputs.
    fn residual(&self, rhos: &[f32], rks: &[f32], m0: &Tensor) -> Result<Option<Tensor>> {
        let mut sum: Option<Tensor> = None;
        for (k, (&rho, &rk)) in rhos.iter().zip(rks).enumerate() {
            let d1 = (self.previous(k + 1)? - m0)?.affine(1.0 / rk as f64, 0.0)?;
            let term = scale(&d1, rho)?;
            sum = Some(match sum {
                None => term,
                Some(s) => (s + term)?,
            });
        }
        Ok(sum)
    }

    /// `multistep_uni_p_bh_update` at step `i` with `order`.
    fn predict(&self, x: &Tensor, i: usize, order: usize) -> Result<Tensor> {
        let earlier: Vec<usize> = (1..order).map(|k| i - k).collect();
        let terms = self.terms(i + 1, i, &earlier);
        let m0 = self.previous(0)?;
        let rhos: Vec<f32> = match order {
            1 => Vec::new(),
            2 => vec![0.5],
            _ => {
                let n = order - 1;
                let a = terms.r[..n].iter().map(|row| row[..n].to_vec()).collect();
                solve(a, terms.b[..n].to_vec())
            }
        };
        let (x_t, factor) = self.base(&terms, x, m0)?;
        Ok(match self.residual(&rhos, &terms.rks, m0)? {
            Some(res) => (x_t - scale(&res, factor)?)?,
            None => x_t,
        })
    }

    /// `multistep_uni_c_bh_update` at step `i` (the model output `model_t` at
    /// σ_i corrects `this_sample`, predicted from `last_sample` at σ_{i−1}).
    fn correct(
        &self,
        model_t: &Tensor,
        last_sample: &Tensor,
        i: usize,
        order: usize,
    ) -> Result<Tensor> {
        let earlier: Vec<usize> = (1..order).map(|k| i - (k + 1)).collect();
        let terms = self.terms(i, i - 1, &earlier);
        let m0 = self.previous(0)?;
        let rhos_c = if order == 1 {
            vec![0.5]
        } else {
            solve(terms.r.clone(), terms.b.clone())
        };
        let (x_t, factor) = self.base(&terms, last_sample, m0)?;
        let (last_rho, rhos) = rhos_c.split_last().expect("order >= 1");
        let d1_t = scale(&(model_t - m0)?, *last_rho)?;
        let res = match self.residual(rhos, &terms.rks, m0)? {
            Some(corr) => (corr + d1_t)?,
            None => d1_t,
        };
        Ok((x_t - scale(&res, factor)?)?)
    }
}

impl Scheduler for UniPc {
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

    /// `α_t · original + σ_t · noise` at `sigmas[step_index]` (`add_noise`).
    fn add_noise(&self, original: &Tensor, noise: &Tensor, step_index: usize) -> Result<Tensor> {
        common::check_step_index(CLASS, step_index, self.timesteps.len())?;
        add_noise_alpha_sigma(original, noise, self.sigmas[step_index])
    }

    /// Corrects `sample` with this step's output (after the first step), then
    /// predicts the sample at the next sigma.
    fn step(
        &mut self,
        model_output: &Tensor,
        step_index: usize,
        sample: &Tensor,
        _noise: &mut dyn NoiseSource,
    ) -> Result<Tensor> {
        let n = self.timesteps.len();
        common::check_step_index(CLASS, step_index, n)?;
        let i = step_index;
        let converted = self.convert(model_output, sample, i)?;
        let mut sample = upcast(sample)?;
        let use_corrector = i > 0 && !self.config.disable_corrector.contains(&(i - 1));
        if let (true, Some(last)) = (use_corrector, &self.last_sample) {
            sample = self.correct(&converted, last, i, self.this_order)?;
        }
        self.model_outputs.rotate_left(1);
        let newest = self.model_outputs.len() - 1;
        self.model_outputs[newest] = Some(converted);

        let order = self.config.solver_order;
        let this_order = if self.config.lower_order_final {
            order.min(n - i)
        } else {
            order
        };
        self.this_order = this_order.min(self.lower_order_nums + 1);
        let prev = self.predict(&sample, i, self.this_order)?;
        self.last_sample = Some(sample);
        if self.lower_order_nums < order {
            self.lower_order_nums += 1;
        }
        Ok(prev.to_dtype(model_output.dtype())?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn solve_matches_a_known_system() {
        let x = solve(
            vec![
                vec![1.0, 1.0, 1.0],
                vec![0.2, 0.5, 1.0],
                vec![0.04, 0.25, 1.0],
            ],
            vec![3.0, 1.7, 1.29],
        );
        for (got, want) in x.iter().zip([1.0f32, 1.0, 1.0]) {
            assert!((got - want).abs() < 1e-5, "{x:?}");
        }
    }
}
