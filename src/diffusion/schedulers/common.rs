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
        let this = Self {
            num_train_timesteps: cfg.positive("num_train_timesteps", 1000)?,
            beta_start: cfg.f64("beta_start", 0.0001)?,
            beta_end: cfg.f64("beta_end", 0.02)?,
            beta_schedule: cfg.string("beta_schedule", "linear")?,
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

/// `torch.linspace(start, end, n, dtype=torch.float32)`: torch's CPU kernel computes
/// `start + step * i` for the first half and `end - step * (n - 1 - i)` for the second,
/// each with a single rounding (a fused multiply-add), `step` itself in float32.
pub fn torch_linspace_f32(start: f64, end: f64, n: usize) -> Vec<f32> {
    let (s, e) = (start as f32, end as f32);
    match n {
        0 => Vec::new(),
        1 => vec![s],
        _ => {
            let step = (e - s) / (n - 1) as f32;
            let half = n / 2;
            (0..n)
                .map(|i| {
                    if i < half {
                        step.mul_add(i as f32, s)
                    } else {
                        (-step).mul_add((n - 1 - i) as f32, e)
                    }
                })
                .collect()
        }
    }
}

/// `betas_for_alpha_bar(n, max_beta=0.999, alpha_transform_type="cosine")`: the
/// squared-cosine schedule, computed in Python floats (f64) and stored as float32.
/// (candle-transformers' copy divides integers here; this one does not.)
pub fn betas_for_alpha_bar(n: usize) -> Vec<f32> {
    let alpha_bar = |t: f64| {
        ((t + 0.008) / 1.008 * std::f64::consts::PI / 2.0)
            .cos()
            .powi(2)
    };
    (0..n)
        .map(|i| {
            let t1 = i as f64 / n as f64;
            let t2 = (i + 1) as f64 / n as f64;
            (1.0 - alpha_bar(t2) / alpha_bar(t1)).min(0.999) as f32
        })
        .collect()
}

/// `torch.cumprod(1.0 - betas, dim=0)` on float32: torch's CPU kernel accumulates
/// the product in f64 and stores every prefix as f32.
pub fn alphas_cumprod(betas: &[f32]) -> Vec<f32> {
    let mut acc = 1.0f64;
    betas
        .iter()
        .map(|&b| {
            acc *= (1.0f32 - b) as f64;
            acc as f32
        })
        .collect()
}

/// `rescale_zero_terminal_snr(betas)` (arXiv:2305.08891, Algorithm 1) in float32.
pub fn rescale_zero_terminal_snr(betas: &[f32]) -> Vec<f32> {
    let ac = alphas_cumprod(betas);
    let mut sqrt: Vec<f32> = ac.iter().map(|a| a.sqrt()).collect();
    let (first, last) = (sqrt[0], sqrt[sqrt.len() - 1]);
    let scale = first / (first - last);
    for v in &mut sqrt {
        *v -= last;
        *v *= scale;
    }
    let bar: Vec<f32> = sqrt.iter().map(|v| v * v).collect();
    let mut out = Vec::with_capacity(bar.len());
    out.push(1.0 - bar[0]);
    for i in 1..bar.len() {
        out.push(1.0 - bar[i] / bar[i - 1]);
    }
    out
}

/// σ = ((1 − ᾱ) / ᾱ)^½ in float32, as `((1 - alphas_cumprod) / alphas_cumprod) ** 0.5`.
pub fn sigma_from_alpha_cumprod(alpha_cumprod: f32) -> f32 {
    ((1.0 - alpha_cumprod) / alpha_cumprod).sqrt()
}

/// The training sigmas, one per training timestep (float32).
pub fn train_sigmas(alphas_cumprod: &[f32]) -> Vec<f32> {
    alphas_cumprod
        .iter()
        .map(|&a| sigma_from_alpha_cumprod(a))
        .collect()
}

/// `np.log(sigmas)` of a float32 array: the result is float32 again.
pub fn log_sigmas(sigmas: &[f32]) -> Vec<f64> {
    sigmas
        .iter()
        .map(|&s| (s as f64).ln() as f32 as f64)
        .collect()
}

/// `np.linspace(start, stop, num)` (endpoint=True) in float64, with numpy's formula
/// `i * step + start` and the last element set to `stop`.
pub fn np_linspace(start: f64, stop: f64, num: usize) -> Vec<f64> {
    if num == 0 {
        return Vec::new();
    }
    let div = num - 1;
    let delta = stop - start;
    let mut y: Vec<f64> = (0..num).map(|i| i as f64).collect();
    if div > 0 {
        let step = delta / div as f64;
        if step == 0.0 {
            for v in &mut y {
                *v = *v / div as f64 * delta;
            }
        } else {
            for v in &mut y {
                *v *= step;
            }
        }
    } else {
        for v in &mut y {
            *v *= delta;
        }
    }
    for v in &mut y {
        *v += start;
    }
    if num > 1 {
        y[num - 1] = stop;
    }
    y
}

/// `np.arange(start, stop, step)` in float64: length `ceil((stop - start) / step)`,
/// then numpy's fill, `start + i * ((start + step) - start)`.
pub fn np_arange(start: f64, stop: f64, step: f64) -> Vec<f64> {
    let len = ((stop - start) / step).ceil();
    if len.is_nan() || len <= 0.0 {
        return Vec::new();
    }
    let len = len as usize;
    let second = start + step;
    let delta = second - start;
    (0..len)
        .map(|i| match i {
            0 => start,
            1 => second,
            _ => start + i as f64 * delta,
        })
        .collect()
}

/// `np.round`: round half to even.
pub fn np_round(x: f64) -> f64 {
    x.round_ties_even()
}

/// `np.interp(x, np.arange(len(fp)), fp)` for one point, with numpy's formula
/// `slope * (x - xp[j]) + fp[j]` and clamping outside the range.
pub fn interp(x: f64, fp: &[f64]) -> f64 {
    let n = fp.len();
    if x.is_nan() || n == 0 {
        return f64::NAN;
    }
    if x < 0.0 {
        return fp[0];
    }
    if x >= (n - 1) as f64 {
        return fp[n - 1];
    }
    let j = x.floor() as usize;
    if j as f64 == x {
        return fp[j];
    }
    let slope = fp[j + 1] - fp[j];
    slope * (x - j as f64) + fp[j]
}

/// `_sigma_to_t(sigma, log_sigmas)`: the fractional training timestep whose
/// log-sigma, interpolated linearly, equals `ln(sigma)`.
pub fn sigma_to_t(sigma: f64, log_sigmas: &[f64]) -> f64 {
    let n = log_sigmas.len();
    if n < 2 {
        return 0.0;
    }
    let log_sigma = sigma.max(1e-10).ln();
    // low_idx = cumsum(dists >= 0).argmax().clip(max=n - 2): the first index where the
    // running count of log_sigmas <= log_sigma peaks.
    let (mut count, mut best, mut low) = (0usize, 0usize, 0usize);
    for (i, &ls) in log_sigmas.iter().enumerate() {
        if log_sigma - ls >= 0.0 {
            count += 1;
        }
        if count > best {
            best = count;
            low = i;
        }
    }
    let low = low.min(n - 2);
    let high = low + 1;
    let (lo, hi) = (log_sigmas[low], log_sigmas[high]);
    let w = ((lo - log_sigma) / (lo - hi)).clamp(0.0, 1.0);
    (1.0 - w) * low as f64 + w * high as f64
}

/// `_convert_to_karras`: ρ = 7 interpolation between `sigma_max` and `sigma_min`.
pub fn karras_sigmas(sigma_min: f64, sigma_max: f64, n: usize) -> Vec<f64> {
    let rho = 7.0f64;
    let min_inv_rho = sigma_min.powf(1.0 / rho);
    let max_inv_rho = sigma_max.powf(1.0 / rho);
    np_linspace(0.0, 1.0, n)
        .into_iter()
        .map(|ramp| (max_inv_rho + ramp * (min_inv_rho - max_inv_rho)).powf(rho))
        .collect()
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
