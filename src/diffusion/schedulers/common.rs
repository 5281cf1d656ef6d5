//! Pieces shared by the scheduler ports: reading a class's config from the merged
//! `scheduler_config.json` map, beta schedules and `alphas_cumprod`, the numpy
//! helpers the timestep spacings are built from, sigma interpolation and Karras
//! sigmas.
//!
//! Ported from diffusers 0.42.1 (`diffusers/schedulers/`):
//! - `betas_for_alpha_bar` (cosine, `max_beta = 0.999`) and `rescale_zero_terminal_snr`
//!   from `scheduling_ddim.py` (copied verbatim into every scheduler module);
//! - the `linear` / `scaled_linear` / `squaredcos_cap_v2` / `trained_betas` branches of
//!   each class's `__init__`;
//! - `_sigma_to_t` and `_convert_to_karras` from `EulerDiscreteScheduler` /
//!   `DPMSolverMultistepScheduler`.
//!
//! Papers: DDPM (Ho et al. 2020, arXiv:2006.11239) for the beta schedules;
//! Improved DDPM (Nichol & Dhariwal 2021, arXiv:2102.09672) for `squaredcos_cap_v2`;
//! "Common Diffusion Noise Schedules and Sample Steps are Flawed" (Lin et al. 2023,
//! arXiv:2305.08891) for zero-terminal-SNR rescaling and the timestep spacings;
//! "Elucidating the Design Space of Diffusion-Based Generative Models" (Karras et al.
//! 2022, arXiv:2206.00364) for Karras sigmas.
//!
//! Precision: diffusers keeps its tables in float32 torch tensors (and numpy arrays
//! made from them), while spacings and interpolation run in numpy float64. The
//! helpers here reproduce that split: tables are `f32` computed with the same
//! operations torch uses (`torch.linspace` is `start + step * i` with one rounding,
//! from the far end for the second half; `torch.cumprod` accumulates in f64), and the
//! numpy parts are f64 with numpy's exact formulas (`np.linspace`, `np.arange`'s
//! fill, banker's rounding of `np.round`, `np.interp`).

use serde_json::{Map, Value};

use candle_core::{DType, Tensor};

use crate::error::{Error, Result};

// The tables and numpy helpers, reachable as `common::` like the rest.
pub use super::tables::*;

/// Builds the error every scheduler config problem becomes.
pub fn config_error(class: &str, message: impl std::fmt::Display) -> Error {
    Error::invalid("scheduler", format!("{class}: {message}"))
}

/// Typed access to one scheduler class's view of the merged config map.
///
/// Every getter takes the class's own `__init__` default for a missing key, as
/// diffusers' `from_config` does; keys a class does not read are ignored.
/// A JSON `null` is Python's `None`: falsy for booleans, "unset" for the
/// optional keys, and an error where the class needs a value.
#[derive(Clone, Copy, Debug)]
pub struct ClassConfig<'a> {
    class: &'static str,
    values: &'a Map<String, Value>,
}

impl<'a> ClassConfig<'a> {
    pub fn new(class: &'static str, values: &'a Map<String, Value>) -> Self {
        Self { class, values }
    }

    pub fn class(&self) -> &'static str {
        self.class
    }

    /// The error for `key` holding `value`; `expected` says what would be accepted.
    pub fn invalid(&self, key: &str, value: impl std::fmt::Display, expected: &str) -> Error {
        config_error(self.class, format!("unsupported {key} {value}; {expected}"))
    }

    fn wrong_type(&self, key: &str, value: &Value, expected: &str) -> Error {
        config_error(self.class, format!("{key} must be {expected}, got {value}"))
    }

    fn present(&self, key: &str) -> Option<&'a Value> {
        self.values.get(key)
    }

    pub fn bool(&self, key: &str, default: bool) -> Result<bool> {
        match self.present(key) {
            None => Ok(default),
            Some(Value::Null) => Ok(false),
            Some(Value::Bool(b)) => Ok(*b),
            Some(v) => Err(self.wrong_type(key, v, "true or false")),
        }
    }

    pub fn f64(&self, key: &str, default: f64) -> Result<f64> {
        match self.present(key) {
            None => Ok(default),
            Some(v) => v
                .as_f64()
                .ok_or_else(|| self.wrong_type(key, v, "a number")),
        }
    }

    /// A number or `null` (Python `None`); missing keys are `None` too.
    pub fn opt_f64(&self, key: &str) -> Result<Option<f64>> {
        match self.present(key) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => v
                .as_f64()
                .map(Some)
                .ok_or_else(|| self.wrong_type(key, v, "a number or null")),
        }
    }

    pub fn i64(&self, key: &str, default: i64) -> Result<i64> {
        match self.present(key) {
            None => Ok(default),
            Some(v) => as_integer(v).ok_or_else(|| self.wrong_type(key, v, "an integer")),
        }
    }

    /// A strictly positive integer.
    pub fn positive(&self, key: &str, default: usize) -> Result<usize> {
        let v = self.i64(key, default as i64)?;
        if v < 1 {
            return Err(config_error(
                self.class,
                format!("{key} must be at least 1, got {v}"),
            ));
        }
        Ok(v as usize)
    }

    pub fn string(&self, key: &str, default: &str) -> Result<String> {
        match self.present(key) {
            None => Ok(default.to_string()),
            Some(Value::String(s)) => Ok(s.clone()),
            Some(v) => Err(self.wrong_type(key, v, "a string")),
        }
    }

    /// A string or `null`; missing keys are `None`.
    pub fn opt_string(&self, key: &str) -> Result<Option<String>> {
        match self.present(key) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(v) => Err(self.wrong_type(key, v, "a string or null")),
        }
    }

    /// A list of numbers or `null`; missing keys are `None`.
    pub fn opt_f64_list(&self, key: &str) -> Result<Option<Vec<f64>>> {
        match self.present(key) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::Array(items)) => items
                .iter()
                .map(|v| {
                    v.as_f64()
                        .ok_or_else(|| self.wrong_type(key, v, "a list of numbers"))
                })
                .collect::<Result<Vec<_>>>()
                .map(Some),
            Some(v) => Err(self.wrong_type(key, v, "a list of numbers or null")),
        }
    }

    /// Errors if a boolean feature this port does not implement is switched on.
    pub fn reject_flag(&self, key: &str) -> Result<()> {
        if self.bool(key, false)? {
            return Err(config_error(
                self.class,
                format!("{key}=true is not supported"),
            ));
        }
        Ok(())
    }
}

fn as_integer(v: &Value) -> Option<i64> {
    if let Some(i) = v.as_i64() {
        return Some(i);
    }
    // Python accepts 1.0 where an int is expected as long as the arithmetic works out.
    v.as_f64()
        .filter(|f| f.fract() == 0.0 && f.abs() < 9.0e15)
        .map(|f| f as i64)
}

/// What the model predicts (`prediction_type`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PredictionType {
    /// The added noise ε.
    Epsilon,
    /// v = α·ε − σ·x₀ (Salimans & Ho 2022, arXiv:2202.00512).
    VPrediction,
    /// The denoised sample x₀ (`"sample"`; Euler also accepts `"original_sample"`).
    Sample,
}

impl PredictionType {
    /// Reads `prediction_type` (default `"epsilon"` in every class), accepting only `allowed`.
    pub fn read(cfg: &ClassConfig<'_>, allowed: &[PredictionType]) -> Result<Self> {
        let name = cfg.string("prediction_type", "epsilon")?;
        let kind = match name.as_str() {
            "epsilon" => Some(PredictionType::Epsilon),
            "v_prediction" => Some(PredictionType::VPrediction),
            "sample" => Some(PredictionType::Sample),
            "original_sample" if cfg.class() == "EulerDiscreteScheduler" => {
                Some(PredictionType::Sample)
            }
            _ => None,
        };
        match kind {
            Some(k) if allowed.contains(&k) => Ok(k),
            _ => {
                let names: Vec<&str> = allowed.iter().map(|p| p.name()).collect();
                Err(cfg.invalid(
                    "prediction_type",
                    format!("{name:?}"),
                    &format!("expected one of: {}", names.join(", ")),
                ))
            }
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            PredictionType::Epsilon => "epsilon",
            PredictionType::VPrediction => "v_prediction",
            PredictionType::Sample => "sample",
        }
    }
}

/// How inference timesteps are spread over the training range (`timestep_spacing`,
/// Table 2 of arXiv:2305.08891).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TimestepSpacing {
    Linspace,
    Leading,
    Trailing,
}

impl TimestepSpacing {
    /// Reads `timestep_spacing`; the default differs per class.
    pub fn read(cfg: &ClassConfig<'_>, default: &str) -> Result<Self> {
        let name = cfg.string("timestep_spacing", default)?;
        match name.as_str() {
            "linspace" => Ok(TimestepSpacing::Linspace),
            "leading" => Ok(TimestepSpacing::Leading),
            "trailing" => Ok(TimestepSpacing::Trailing),
            _ => Err(cfg.invalid(
                "timestep_spacing",
                format!("{name:?}"),
                "expected one of: linspace, leading, trailing",
            )),
        }
    }
}

/// `final_sigmas_type` of the sigma-based schedulers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FinalSigmas {
    /// The last sigma is 0: the final step lands on the denoised sample.
    Zero,
    /// The last sigma is the training schedule's smallest, σ(t = 0).
    SigmaMin,
}

impl FinalSigmas {
    pub fn read(cfg: &ClassConfig<'_>) -> Result<Self> {
        let name = cfg.string("final_sigmas_type", "zero")?;
        match name.as_str() {
            "zero" => Ok(FinalSigmas::Zero),
            "sigma_min" => Ok(FinalSigmas::SigmaMin),
            _ => Err(cfg.invalid(
                "final_sigmas_type",
                format!("{name:?}"),
                "expected one of: zero, sigma_min",
            )),
        }
    }

    /// The sigma appended after the schedule, as float32 like diffusers computes it:
    /// `((1 - alphas_cumprod[0]) / alphas_cumprod[0]) ** 0.5`.
    pub fn last_sigma(self, alphas_cumprod: &[f32]) -> f32 {
        match self {
            FinalSigmas::Zero => 0.0,
            FinalSigmas::SigmaMin => sigma_from_alpha_cumprod(alphas_cumprod[0]),
        }
    }
}

/// The training noise schedule keys every class shares, with their common defaults
/// (`num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear"`).
#[derive(Clone, Debug)]
pub struct BetaConfig {
    pub num_train_timesteps: usize,
    pub beta_start: f64,
    pub beta_end: f64,
    /// Kept as written: diffusers only checks it when `trained_betas` is null, and
    /// DPM-Solver compares it to `"squaredcos_cap_v2"` even then.
    pub beta_schedule: String,
    pub trained_betas: Option<Vec<f64>>,
    pub rescale_betas_zero_snr: bool,
}

impl BetaConfig {
    /// Reads the keys; `has_rescale` is false for classes whose `__init__` has no
    /// `rescale_betas_zero_snr` (PNDM), which therefore ignore it.
    pub fn read(cfg: &ClassConfig<'_>, has_rescale: bool) -> Result<Self> {
        Self::read_with_defaults(cfg, has_rescale, (0.0001, 0.02, "linear"))
    }

    /// [`Self::read`] for a class whose `__init__` defaults `(beta_start,
    /// beta_end, beta_schedule)` differ from the common ones (LCMScheduler's
    /// are Stable Diffusion's own).
    pub fn read_with_defaults(
        cfg: &ClassConfig<'_>,
        has_rescale: bool,
        (start, end, schedule): (f64, f64, &str),
    ) -> Result<Self> {
        let this = Self {
            num_train_timesteps: cfg.positive("num_train_timesteps", 1000)?,
            beta_start: cfg.f64("beta_start", start)?,
            beta_end: cfg.f64("beta_end", end)?,
            beta_schedule: cfg.string("beta_schedule", schedule)?,
            trained_betas: cfg.opt_f64_list("trained_betas")?,
            rescale_betas_zero_snr: has_rescale && cfg.bool("rescale_betas_zero_snr", false)?,
        };
        // Validate now: diffusers raises in `__init__`.
        this.betas(cfg.class())?;
        Ok(this)
    }

    /// `self.betas` as diffusers builds it (float32), before any rescaling.
    pub fn betas(&self, class: &str) -> Result<Vec<f32>> {
        let n = self.num_train_timesteps;
        if let Some(trained) = &self.trained_betas {
            if trained.is_empty() {
                return Err(config_error(class, "trained_betas must not be empty"));
            }
            return Ok(trained.iter().map(|&b| b as f32).collect());
        }
        match self.beta_schedule.as_str() {
            "linear" => Ok(torch_linspace_f32(self.beta_start, self.beta_end, n)),
            "scaled_linear" => {
                Ok(
                    torch_linspace_f32(self.beta_start.sqrt(), self.beta_end.sqrt(), n)
                        .into_iter()
                        .map(|b| b * b)
                        .collect(),
                )
            }
            "squaredcos_cap_v2" => Ok(betas_for_alpha_bar(n)),
            other => Err(config_error(
                class,
                format!(
                    "unsupported beta_schedule {other:?}; expected one of: linear, scaled_linear, \
                     squaredcos_cap_v2 (or trained_betas)"
                ),
            )),
        }
    }

    /// `alphas_cumprod` (float32), rescaled to zero terminal SNR when asked.
    pub fn alphas_cumprod(&self, class: &str) -> Result<Vec<f32>> {
        let mut betas = self.betas(class)?;
        if self.rescale_betas_zero_snr {
            betas = rescale_zero_terminal_snr(&betas);
        }
        Ok(alphas_cumprod(&betas))
    }

    /// `alphas_cumprod` as the sigma-based classes (Euler, Euler ancestral, DPM-Solver)
    /// keep it: with zero-SNR rescaling the last entry becomes 2⁻²⁴ ("close to 0
    /// without being 0 so first sigma is not inf"), making the largest sigma ≈ 4096.
    pub fn alphas_cumprod_for_sigmas(&self, class: &str) -> Result<Vec<f32>> {
        let mut ac = self.alphas_cumprod(class)?;
        if self.rescale_betas_zero_snr
            && let Some(last) = ac.last_mut()
        {
            *last = 2f32.powi(-24);
        }
        Ok(ac)
    }
}

/// Rejects step counts diffusers cannot (or should not) schedule.
pub fn check_steps(
    class: &str,
    num_inference_steps: usize,
    num_train_timesteps: usize,
) -> Result<()> {
    if num_inference_steps == 0 {
        return Err(Error::invalid("steps", "must be at least 1"));
    }
    if num_inference_steps > num_train_timesteps {
        return Err(Error::invalid(
            "steps",
            format!(
                "{class} cannot take more steps ({num_inference_steps}) than the model's \
                 num_train_timesteps ({num_train_timesteps})"
            ),
        ));
    }
    Ok(())
}

/// Looks up `alphas_cumprod[t]`, erroring (where Python would raise or wrap) when
/// `t` is outside the table.
pub fn alpha_at(class: &str, alphas_cumprod: &[f32], t: i64) -> Result<f32> {
    usize::try_from(t)
        .ok()
        .and_then(|i| alphas_cumprod.get(i).copied())
        .ok_or_else(|| {
            config_error(
                class,
                format!(
                    "timestep {t} is outside the {} training timesteps (check steps_offset and \
                     num_train_timesteps)",
                    alphas_cumprod.len()
                ),
            )
        })
}

/// The step's index into the schedule, or an error if the loop ran past it.
pub fn check_step_index(class: &str, step_index: usize, len: usize) -> Result<()> {
    if step_index >= len {
        return Err(config_error(
            class,
            format!("step index {step_index} is past the end of the {len} timesteps"),
        ));
    }
    Ok(())
}

/// Brings two tensors to one dtype the way torch promotes floats: equal dtypes stay;
/// otherwise both become F64 if either is, else F32.
pub fn promote(a: &Tensor, b: &Tensor) -> Result<(Tensor, Tensor)> {
    if a.dtype() == b.dtype() {
        return Ok((a.clone(), b.clone()));
    }
    let dt = if a.dtype() == DType::F64 || b.dtype() == DType::F64 {
        DType::F64
    } else {
        DType::F32
    };
    Ok((a.to_dtype(dt)?, b.to_dtype(dt)?))
}

/// `x * c` with `c` a float32 scalar (a 0-dim float32 tensor in diffusers), keeping
/// `x`'s dtype.
pub fn scale(x: &Tensor, c: f32) -> Result<Tensor> {
    Ok(x.affine(c as f64, 0.0)?)
}

/// `√ᾱ · original + √(1 − ᾱ) · noise` in float32 scalars: diffusers'
/// `DDPMScheduler.add_noise`, which `DDIMScheduler` and `PNDMScheduler` copy
/// (ᾱ = `alphas_cumprod[t]`).
pub fn add_noise_alpha(original: &Tensor, noise: &Tensor, alpha_prod: f32) -> Result<Tensor> {
    let (original, noise) = promote(original, noise)?;
    Ok((scale(&original, alpha_prod.sqrt())? + scale(&noise, (1.0 - alpha_prod).sqrt())?)?)
}

/// `original + noise · σ`: diffusers' `EulerDiscreteScheduler.add_noise` (and
/// `EulerAncestralDiscreteScheduler`'s copy).
pub fn add_noise_sigma(original: &Tensor, noise: &Tensor, sigma: f32) -> Result<Tensor> {
    let (original, noise) = promote(original, noise)?;
    Ok((original + scale(&noise, sigma)?)?)
}

/// Upcasts to float32 (`.to(torch.float32)`), leaving f64 alone.
pub fn upcast(x: &Tensor) -> Result<Tensor> {
    Ok(match x.dtype() {
        DType::F32 | DType::F64 => x.clone(),
        _ => x.to_dtype(DType::F32)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arange_matches_numpy_lengths() {
        // np.arange(1000, 0, -1000 / 3) has 3 elements: 1000, 666.67, 333.33.
        let v = np_arange(1000.0, 0.0, -1000.0 / 3.0);
        assert_eq!(v.len(), 3);
        assert_eq!(np_round(v[1]), 667.0);
        assert!(np_arange(0.0, 0.0, 1.0).is_empty());
    }

    #[test]
    fn linspace_endpoints() {
        assert_eq!(np_linspace(0.0, 999.0, 1), vec![0.0]);
        let v = np_linspace(0.0, 999.0, 4);
        assert_eq!(v, vec![0.0, 333.0, 666.0, 999.0]);
        let t = torch_linspace_f32(0.1, 0.2, 5);
        assert_eq!(t[0], 0.1f32);
        assert_eq!(t[4], 0.2f32);
    }

    #[test]
    fn interp_and_sigma_to_t_invert() {
        let fp = [0.0, 1.0, 4.0, 9.0];
        assert_eq!(interp(1.5, &fp), 2.5);
        assert_eq!(interp(-1.0, &fp), 0.0);
        assert_eq!(interp(7.0, &fp), 9.0);
        let logs: Vec<f64> = [0.1f64, 0.2, 0.4, 0.8].iter().map(|s| s.ln()).collect();
        assert!((sigma_to_t(0.2, &logs) - 1.0).abs() < 1e-12);
        assert!((sigma_to_t(0.4f64.sqrt() * 0.2f64.sqrt(), &logs) - 1.5).abs() < 1e-12);
        assert_eq!(sigma_to_t(10.0, &logs), 3.0);
        assert_eq!(sigma_to_t(0.01, &logs), 0.0);
    }

    #[test]
    fn cosine_betas_are_fractional() {
        let b = betas_for_alpha_bar(1000);
        assert!(b[0] > 0.0 && b[0] < 1e-3);
        assert_eq!(b[999], 0.999);
    }
}
