//! Pseudo numerical methods for diffusion models: PLMS (linear multistep) and the
//! optional Runge–Kutta warm-up.
//!
//! Port of diffusers 0.42.1 `PNDMScheduler` (`scheduling_pndm.py`): `__init__`
//! (defaults: `beta_schedule="linear"`, `skip_prk_steps=False`, `set_alpha_to_one=False`,
//! `prediction_type="epsilon"`, `timestep_spacing="leading"`, `steps_offset=0`),
//! `set_timesteps`, `step`, `step_prk`, `step_plms` and `_get_prev_sample`.
//!
//! Paper: Liu, Ren, Lin & Zhao, "Pseudo Numerical Methods for Diffusion Models on
//! Manifolds" (arXiv:2202.09778): the transfer part is eq. (11) (`_get_prev_sample`),
//! the gradient part PLMS (eq. 12) or pseudo Runge–Kutta (eq. 13).
//!
//! Timesteps, as diffusers builds them:
//! - `skip_prk_steps=True` (Stable Diffusion's config): the spaced timesteps with the
//!   second one repeated, so there are `num_inference_steps + 1` UNet calls (just 1
//!   for a single step). The first two calls form one Heun-like step: the second
//!   call re-evaluates at the target and averages the two outputs.
//! - `skip_prk_steps=False`: 12 pseudo-Runge–Kutta calls over the first three
//!   intervals (midpoints at `t - num_train // steps // 2`), then PLMS; diffusers
//!   needs at least 4 steps for this.
//!
//! The scheduler has no `rescale_betas_zero_snr`; that key is ignored.

use candle_core::Tensor;
use serde_json::{Map, Value};

use super::Scheduler;
use super::alpha::AlphaSchedule;
use super::common::{
    self, BetaConfig, ClassConfig, PredictionType, TimestepSpacing, np_arange, np_linspace,
    np_round, scale,
};
use crate::diffusion::latents::NoiseSource;
use crate::error::{Error, Result};

const CLASS: &str = "PNDMScheduler";

/// The `PNDMScheduler.__init__` arguments this port reads.
#[derive(Clone, Debug)]
pub struct PndmConfig {
    pub betas: BetaConfig,
    pub skip_prk_steps: bool,
    pub set_alpha_to_one: bool,
    pub prediction_type: PredictionType,
    pub timestep_spacing: TimestepSpacing,
    pub steps_offset: i64,
}

impl PndmConfig {
    pub fn from_values(values: &Map<String, Value>) -> Result<Self> {
        let cfg = ClassConfig::new(CLASS, values);
        Ok(Self {
            betas: BetaConfig::read(&cfg, false)?,
            skip_prk_steps: cfg.bool("skip_prk_steps", false)?,
            set_alpha_to_one: cfg.bool("set_alpha_to_one", false)?,
            prediction_type: PredictionType::read(
                &cfg,
                &[PredictionType::Epsilon, PredictionType::VPrediction],
            )?,
            timestep_spacing: TimestepSpacing::read(&cfg, "leading")?,
            steps_offset: cfg.i64("steps_offset", 0)?,
        })
    }
}

/// `self._timesteps` of `PNDMScheduler.set_timesteps`: the spaced timesteps, ascending.
pub fn pndm_base_timesteps(
    spacing: TimestepSpacing,
    num_train_timesteps: usize,
    num_inference_steps: usize,
    steps_offset: i64,
) -> Vec<i64> {
    let (n_train, n) = (num_train_timesteps, num_inference_steps);
    match spacing {
        TimestepSpacing::Linspace => np_linspace(0.0, (n_train - 1) as f64, n)
            .into_iter()
            .map(|t| np_round(t) as i64)
            .collect(),
        TimestepSpacing::Leading => {
            let ratio = n_train / n;
            (0..n).map(|i| (i * ratio) as i64 + steps_offset).collect()
        }
        TimestepSpacing::Trailing => {
            let ratio = n_train as f64 / n as f64;
            np_arange(n_train as f64, 0.0, -ratio)
                .into_iter()
                .rev()
                .map(|t| np_round(t) as i64 - 1)
                .collect()
        }
    }
}

/// A `PNDMScheduler` after `set_timesteps(num_inference_steps)`, with its
/// multistep state (`ets`, `counter`, `cur_sample`, `cur_model_output`).
#[derive(Debug, Clone)]
pub struct Pndm {
    config: PndmConfig,
    /// Runge–Kutta timesteps first (if any), then PLMS.
    schedule: AlphaSchedule,
    num_inference_steps: usize,
    prk_timesteps: Vec<i64>,
    counter: usize,
    ets: Vec<Tensor>,
    cur_sample: Option<Tensor>,
    cur_model_output: Option<Tensor>,
}

impl Pndm {
    pub fn new(values: &Map<String, Value>, num_inference_steps: usize) -> Result<Self> {
        let config = PndmConfig::from_values(values)?;
        let n_train = config.betas.num_train_timesteps;
        let n = num_inference_steps;
        common::check_steps(CLASS, n, n_train)?;
        let base = pndm_base_timesteps(config.timestep_spacing, n_train, n, config.steps_offset);
        let len = base.len();
        let (prk_timesteps, plms_timesteps): (Vec<i64>, Vec<i64>) = if config.skip_prk_steps {
            // concatenate([_t[:-1], _t[-2:-1], _t[-1:]])[::-1]
            let mut plms: Vec<i64> = base[..len.saturating_sub(1)].to_vec();
            if len >= 2 {
                plms.push(base[len - 2]);
            }
            plms.extend(base.last().copied());
            plms.reverse();
            (Vec::new(), plms)
        } else {
            const PNDM_ORDER: usize = 4;
            if len < PNDM_ORDER {
                return Err(Error::invalid(
                    "steps",
                    format!(
                        "{CLASS} with skip_prk_steps=false needs at least {PNDM_ORDER} steps, got {n}"
                    ),
                ));
            }
            let half = (n_train / n / 2) as i64;
            // _t[-4:].repeat(2) + tile([0, half], 4), drop the last, repeat(2)[1:-1], reverse.
            let mut pairs: Vec<i64> = base[len - PNDM_ORDER..]
                .iter()
                .flat_map(|&t| [t, t + half])
                .collect();
            pairs.pop();
            let doubled: Vec<i64> = pairs.iter().flat_map(|&t| [t, t]).collect();
            let mut prk = doubled[1..doubled.len() - 1].to_vec();
            prk.reverse();
            let mut plms = base[..len - 3].to_vec();
            plms.reverse();
            (prk, plms)
        };
        let int_timesteps: Vec<i64> = prk_timesteps
            .iter()
            .chain(&plms_timesteps)
            .copied()
            .collect();
        let schedule =
            AlphaSchedule::new(CLASS, &config.betas, config.set_alpha_to_one, int_timesteps)?;
        Ok(Self {
            schedule,
            prk_timesteps,
            config,
            num_inference_steps: n,
            counter: 0,
            ets: Vec::new(),
            cur_sample: None,
            cur_model_output: None,
        })
    }

    pub fn config(&self) -> &PndmConfig {
        &self.config
    }

    fn ratio(&self) -> i64 {
        (self.config.betas.num_train_timesteps / self.num_inference_steps) as i64
    }

    /// `step_prk`: one of the four evaluations of a pseudo Runge–Kutta step.
    fn step_prk(&mut self, model_output: Tensor, timestep: i64, sample: Tensor) -> Result<Tensor> {
        let diff_to_prev = if self.counter % 2 == 1 {
            0
        } else {
            self.ratio() / 2
        };
        let prev_timestep = timestep - diff_to_prev;
        let timestep = self.prk_timesteps[self.counter / 4 * 4];

        let model_output = match self.counter % 4 {
            0 => {
                self.cur_model_output = Some(scale(&model_output, (1.0 / 6.0) as f32)?);
                self.ets.push(model_output.clone());
                self.cur_sample = Some(sample.clone());
                model_output
            }
            1 | 2 => {
                let acc = self.accumulated()?;
                self.cur_model_output = Some((acc + scale(&model_output, (1.0 / 3.0) as f32)?)?);
                model_output
            }
            _ => {
                let acc = self.accumulated()?;
                self.cur_model_output = None;
                (acc + scale(&model_output, (1.0 / 6.0) as f32)?)?
            }
        };
        let cur_sample = self.cur_sample.clone().unwrap_or(sample);
        let prev = self.prev_sample(&cur_sample, timestep, prev_timestep, &model_output)?;
        self.counter += 1;
        Ok(prev)
    }

    fn accumulated(&self) -> Result<Tensor> {
        self.cur_model_output
            .clone()
            .ok_or_else(|| common::config_error(CLASS, "Runge-Kutta step out of order"))
    }

    /// `step_plms`: the linear multistep update from the last four model outputs.
    fn step_plms(&mut self, model_output: Tensor, timestep: i64, sample: Tensor) -> Result<Tensor> {
        let ratio = self.ratio();
        let mut timestep = timestep;
        let mut prev_timestep = timestep - ratio;
        if self.counter != 1 {
            let keep = self.ets.len().saturating_sub(3);
            self.ets.drain(..keep);
            self.ets.push(model_output.clone());
        } else {
            prev_timestep = timestep;
            timestep += ratio;
        }

        let e = &self.ets;
        let k = e.len();
        let mut sample = sample;
        let model_output = if k == 1 && self.counter == 0 {
            self.cur_sample = Some(sample.clone());
            model_output
        } else if k == 1 && self.counter == 1 {
            // (model_output + ets[-1]) / 2, from the sample before the first step.
            let avg = (&model_output + &e[0])?.affine(0.5, 0.0)?;
            sample = self
                .cur_sample
                .take()
                .ok_or_else(|| common::config_error(CLASS, "PLMS step out of order"))?;
            avg
        } else if k == 2 {
            // (3 * ets[-1] - ets[-2]) / 2
            (scale(&e[1], 3.0)? - &e[0])?.affine(0.5, 0.0)?
        } else if k == 3 {
            // (23 * ets[-1] - 16 * ets[-2] + 5 * ets[-3]) / 12
            let x = (scale(&e[2], 23.0)? - scale(&e[1], 16.0)?)?;
            (x + scale(&e[0], 5.0)?)?.affine(1.0 / 12.0, 0.0)?
        } else if k == 4 {
            // (1 / 24) * (55 * ets[-1] - 59 * ets[-2] + 37 * ets[-3] - 9 * ets[-4])
            let x = (scale(&e[3], 55.0)? - scale(&e[2], 59.0)?)?;
            let x = (x + scale(&e[1], 37.0)?)?;
            let x = (x - scale(&e[0], 9.0)?)?;
            scale(&x, (1.0 / 24.0) as f32)?
        } else {
            return Err(common::config_error(CLASS, "PLMS step out of order"));
        };

        let prev = self.prev_sample(&sample, timestep, prev_timestep, &model_output)?;
        self.counter += 1;
        Ok(prev)
    }

    /// `_get_prev_sample`: the PNDM transfer from `timestep` to `prev_timestep`
    /// (eq. 11 of arXiv:2202.09778), float32 coefficients.
    fn prev_sample(
        &self,
        sample: &Tensor,
        timestep: i64,
        prev_timestep: i64,
        model_output: &Tensor,
    ) -> Result<Tensor> {
        let alpha_prod_t = self.schedule.alpha(timestep)?;
        let alpha_prod_t_prev = self.schedule.alpha_prev(prev_timestep)?;
        let beta_prod_t = 1.0 - alpha_prod_t;
        let beta_prod_t_prev = 1.0 - alpha_prod_t_prev;

        let model_output = match self.config.prediction_type {
            PredictionType::VPrediction => {
                (scale(model_output, alpha_prod_t.sqrt())? + scale(sample, beta_prod_t.sqrt())?)?
            }
            _ => model_output.clone(),
        };

        let sample_coeff = (alpha_prod_t_prev / alpha_prod_t).sqrt();
        let denom = alpha_prod_t * beta_prod_t_prev.sqrt()
            + (alpha_prod_t * beta_prod_t * alpha_prod_t_prev).sqrt();
        // sample_coeff * sample - (alpha_prod_t_prev - alpha_prod_t) * model_output / denom
        let eps_term = scale(&model_output, alpha_prod_t_prev - alpha_prod_t)?
            .affine(1.0 / denom as f64, 0.0)?;
        Ok((scale(sample, sample_coeff)? - eps_term)?)
    }
}

impl Scheduler for Pndm {
    fn class_name(&self) -> &'static str {
        CLASS
    }

    /// The UNet timesteps: Runge–Kutta ones first (if any), then PLMS.
    fn timesteps(&self) -> &[f64] {
        self.schedule.timesteps()
    }

    fn add_noise(&self, original: &Tensor, noise: &Tensor, step_index: usize) -> Result<Tensor> {
        self.schedule.add_noise(original, noise, step_index)
    }

    fn step(
        &mut self,
        model_output: &Tensor,
        step_index: usize,
        sample: &Tensor,
        _noise: &mut dyn NoiseSource,
    ) -> Result<Tensor> {
        let t = self.schedule.timestep(step_index)?;
        let (model_output, sample) = common::promote(model_output, sample)?;
        if self.counter < self.prk_timesteps.len() && !self.config.skip_prk_steps {
            self.step_prk(model_output, t, sample)
        } else {
            self.step_plms(model_output, t, sample)
        }
    }
}
