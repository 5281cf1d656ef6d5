//! Noise schedulers, built per job the way diffusers' `SchedulerMixin.from_config`
//! builds them: the model's `scheduler/scheduler_config.json`, keys it lacks taking
//! the chosen class's own `__init__` defaults, plus per-request overrides.
//!
//! One file per diffusers scheduler class, each implementing [`Scheduler`]; what
//! the ᾱ classes (DDIM, PNDM, LCM) share is in [`alpha`], what the σ classes
//! (Euler, Euler ancestral, LMS) share in [`sigma`].
//! Tables and coefficients follow torch's float32 arithmetic on the host and are
//! applied to device tensors as scalars.

pub mod alpha;
pub mod common;
pub mod ddim;
pub mod dpm_solver;
pub mod euler;
pub mod euler_ancestral;
pub mod lcm;
pub mod lms;
pub mod pndm;
pub mod sigma;
pub mod tables;
pub mod unipc;

use std::path::Path;

use candle_core::Tensor;
use serde_json::{Map, Value};

use crate::diffusion::latents::NoiseSource;
use crate::error::{Error, Result};

/// Scheduler config keys a request may override (diffusers' `from_config(config,
/// **overrides)`); anything else is refused so a typo is not silently ignored.
pub const OVERRIDABLE_KEYS: &[&str] = &[
    "algorithm_type",
    "beta_end",
    "beta_schedule",
    "beta_start",
    "clip_sample",
    "euler_at_final",
    "final_sigmas_type",
    "interpolation_type",
    "lower_order_final",
    "original_inference_steps",
    "predict_x0",
    "prediction_type",
    "rescale_betas_zero_snr",
    "set_alpha_to_one",
    "sigma_max",
    "sigma_min",
    "skip_prk_steps",
    "solver_order",
    "solver_type",
    "steps_offset",
    "timestep_spacing",
    "timestep_type",
    "use_karras_sigmas",
];

/// What a request may set an overridable key to, whatever scheduler runs:
/// the values some diffusers class accepts for it, within ranges that keep the
/// schedule finite. Whether the chosen class takes the value is checked by
/// building it ([`SchedulerConfig::build`]).
pub enum Allowed {
    Bool,
    OneOf(&'static [&'static str]),
    /// A number strictly between the bounds.
    Open(f64, f64),
    /// A positive number, or `null` (unset).
    PositiveOrNull,
    /// An integer in the inclusive range.
    Integer(i64, i64),
}

/// What `key` may be set to: the values diffusers takes that some scheduler
/// here implements (the DPM-Solver variants and Euler's `log_linear` are not).
pub fn allowed(key: &str) -> Allowed {
    match key {
        // `deis` is read as `dpmsolver++`, as in diffusers.
        "algorithm_type" => Allowed::OneOf(&["dpmsolver++", "deis"]),
        "beta_start" | "beta_end" => Allowed::Open(0.0, 1.0),
        "beta_schedule" => Allowed::OneOf(&["linear", "scaled_linear", "squaredcos_cap_v2"]),
        "final_sigmas_type" => Allowed::OneOf(&["zero", "sigma_min"]),
        "interpolation_type" => Allowed::OneOf(&["linear"]),
        "prediction_type" => Allowed::OneOf(&["epsilon", "v_prediction", "sample"]),
        "sigma_max" | "sigma_min" => Allowed::PositiveOrNull,
        "solver_order" => Allowed::Integer(1, 3),
        // LCMScheduler's distillation schedule; checked against the training steps.
        "original_inference_steps" => Allowed::Integer(1, 1000),
        // DPM-Solver's and UniPC's (each class maps the other's names).
        "solver_type" => Allowed::OneOf(&["midpoint", "heun", "bh1", "bh2"]),
        // Below the training schedule's 1000 steps; the built schedule is
        // checked against the model's own count.
        "steps_offset" => Allowed::Integer(0, 999),
        "timestep_spacing" => Allowed::OneOf(&["linspace", "leading", "trailing"]),
        "timestep_type" => Allowed::OneOf(&["discrete", "continuous"]),
        _ => Allowed::Bool,
    }
}

/// Checks that every override key is one of [`OVERRIDABLE_KEYS`] and holds a
/// value of the right type and range; errors name `scheduler_options.<key>`.
pub fn check_overrides(overrides: &Map<String, Value>) -> Result<()> {
    for (key, value) in overrides {
        if !OVERRIDABLE_KEYS.contains(&key.as_str()) {
            return Err(Error::invalid(
                "scheduler_options",
                format!(
                    "unknown scheduler option {key:?}; known: {}",
                    OVERRIDABLE_KEYS.join(", ")
                ),
            ));
        }
        let bad = |expected: String| {
            Error::invalid(
                format!("scheduler_options.{key}"),
                format!("{value} is not {expected}"),
            )
        };
        match allowed(key) {
            Allowed::Bool => {
                if !value.is_boolean() {
                    return Err(bad("true or false".into()));
                }
            }
            Allowed::OneOf(names) => {
                if !value.as_str().is_some_and(|s| names.contains(&s)) {
                    return Err(bad(format!("one of: {}", names.join(", "))));
                }
            }
            Allowed::Open(lo, hi) => {
                if !value.as_f64().is_some_and(|v| v > lo && v < hi) {
                    return Err(bad(format!("a number between {lo} and {hi} (exclusive)")));
                }
            }
            Allowed::PositiveOrNull => {
                let ok =
                    value.is_null() || value.as_f64().is_some_and(|v| v > 0.0 && v.is_finite());
                if !ok {
                    return Err(bad("a positive number or null".into()));
                }
            }
            Allowed::Integer(lo, hi) => {
                if !value.as_i64().is_some_and(|v| (lo..=hi).contains(&v)) {
                    return Err(bad(format!("an integer in {lo}..={hi}")));
                }
            }
        }
    }
    Ok(())
}

/// The schedulers a request can name.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum SchedulerKind {
    /// Whatever class the model's scheduler_config.json names.
    Default,
    /// DDIMScheduler with eta = 0.
    Ddim,
    /// EulerDiscreteScheduler.
    Euler,
    /// EulerAncestralDiscreteScheduler.
    EulerAncestral,
    /// DPMSolverMultistepScheduler (dpmsolver++, order 2).
    DpmPp2M,
    /// DPMSolverMultistepScheduler with `use_karras_sigmas=True`.
    DpmPp2MKarras,
    /// PNDMScheduler (PLMS when `skip_prk_steps`).
    Pndm,
    /// LCMScheduler: for latent consistency models (LCM-distilled UNets, LCM-LoRA).
    Lcm,
    /// LMSDiscreteScheduler (linear multistep, order 4).
    Lms,
    /// UniPCMultistepScheduler (bh2, order 2 by default).
    UniPc,
}

impl SchedulerKind {
    pub const ALL: [SchedulerKind; 10] = [
        SchedulerKind::Default,
        SchedulerKind::Ddim,
        SchedulerKind::Euler,
        SchedulerKind::EulerAncestral,
        SchedulerKind::DpmPp2M,
        SchedulerKind::DpmPp2MKarras,
        SchedulerKind::Pndm,
        SchedulerKind::Lcm,
        SchedulerKind::Lms,
        SchedulerKind::UniPc,
    ];

    /// The canonical name used in requests, PNG metadata and the CLI.
    pub fn name(self) -> &'static str {
        match self {
            SchedulerKind::Default => "default",
            SchedulerKind::Ddim => "ddim",
            SchedulerKind::Euler => "euler",
            SchedulerKind::EulerAncestral => "euler_a",
            SchedulerKind::DpmPp2M => "dpmpp_2m",
            SchedulerKind::DpmPp2MKarras => "dpmpp_2m_karras",
            SchedulerKind::Pndm => "pndm",
            SchedulerKind::Lcm => "lcm",
            SchedulerKind::Lms => "lms",
            SchedulerKind::UniPc => "unipc",
        }
    }

    /// Parses a scheduler name. Accepts the canonical names, common aliases
    /// (`euler_ancestral`, `dpm++_2m`, `k_euler`...) and diffusers class names.
    pub fn parse(s: &str) -> Option<Self> {
        let norm: String = s
            .trim()
            .to_ascii_lowercase()
            .chars()
            .filter(|c| !matches!(c, '_' | '-' | ' ' | '+'))
            .collect();
        Some(match norm.as_str() {
            "" | "default" => SchedulerKind::Default,
            "ddim" | "ddimscheduler" => SchedulerKind::Ddim,
            "euler" | "keuler" | "eulerdiscrete" | "eulerdiscretescheduler" => SchedulerKind::Euler,
            "eulera"
            | "eulerancestral"
            | "keulera"
            | "keulerancestral"
            | "eulerancestraldiscretescheduler" => SchedulerKind::EulerAncestral,
            "dpmpp2m" | "dpmsolvermultistep" | "dpmsolvermultistepscheduler" => {
                SchedulerKind::DpmPp2M
            }
            "dpmpp2mkarras" | "karras" => SchedulerKind::DpmPp2MKarras,
            "pndm" | "plms" | "pndmscheduler" => SchedulerKind::Pndm,
            "lcm" | "lcmscheduler" => SchedulerKind::Lcm,
            "lms" | "klms" | "lmsdiscrete" | "lmsdiscretescheduler" => SchedulerKind::Lms,
            "unipc" | "unipcmultistep" | "unipcmultistepscheduler" => SchedulerKind::UniPc,
            _ => return None,
        })
    }

    /// Maps a diffusers `_class_name` to the kind that implements it.
    fn from_class_name(class: &str) -> Option<Self> {
        match class {
            "DDIMScheduler" => Some(SchedulerKind::Ddim),
            "EulerDiscreteScheduler" => Some(SchedulerKind::Euler),
            "EulerAncestralDiscreteScheduler" => Some(SchedulerKind::EulerAncestral),
            "DPMSolverMultistepScheduler" => Some(SchedulerKind::DpmPp2M),
            "PNDMScheduler" => Some(SchedulerKind::Pndm),
            "LCMScheduler" => Some(SchedulerKind::Lcm),
            "LMSDiscreteScheduler" => Some(SchedulerKind::Lms),
            "UniPCMultistepScheduler" => Some(SchedulerKind::UniPc),
            _ => None,
        }
    }

    /// Comma-separated list of the names [`SchedulerKind::parse`] accepts canonically.
    pub fn names() -> String {
        Self::ALL.map(|k| k.name()).join(", ")
    }
}

impl std::fmt::Display for SchedulerKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// A model's `scheduler_config.json`, kept as raw keys so every scheduler class
/// applies its own defaults to whatever the file does not set (as diffusers'
/// `ConfigMixin.from_config` does).
#[derive(Clone, Debug, Default)]
pub struct SchedulerConfig {
    class_name: String,
    values: Map<String, Value>,
}

impl SchedulerConfig {
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::model_file(path, e))?;
        Self::from_json(&text).map_err(|e| Error::model_file(path, e))
    }

    pub fn from_json(text: &str) -> std::result::Result<Self, String> {
        let value: Value = serde_json::from_str(text).map_err(|e| format!("invalid JSON: {e}"))?;
        let Value::Object(values) = value else {
            return Err("expected a JSON object".into());
        };
        let class_name = values
            .get("_class_name")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string();
        Ok(Self { class_name, values })
    }

    /// The diffusers class the model ships with, e.g. `PNDMScheduler`.
    pub fn class_name(&self) -> &str {
        &self.class_name
    }

    /// `num_train_timesteps` with `overrides` applied (diffusers' default: 1000).
    pub fn num_train_timesteps(&self, overrides: &Map<String, Value>) -> usize {
        overrides
            .get("num_train_timesteps")
            .or_else(|| self.values.get("num_train_timesteps"))
            .and_then(Value::as_u64)
            .map_or(1000, |n| n as usize)
    }

    /// The kind `SchedulerKind::Default` resolves to for this model.
    pub fn default_kind(&self) -> Result<SchedulerKind> {
        SchedulerKind::from_class_name(&self.class_name).ok_or_else(|| {
            Error::invalid(
                "scheduler",
                format!(
                    "the model's default scheduler {:?} is not supported; choose one of: {}",
                    self.class_name,
                    SchedulerKind::names()
                ),
            )
        })
    }

    /// The kind that runs for `kind`: itself, or for `Default` the model's own.
    pub fn resolve(&self, kind: SchedulerKind) -> Result<SchedulerKind> {
        match kind {
            SchedulerKind::Default => self.default_kind(),
            k => Ok(k),
        }
    }

    /// Merges the model's keys with `overrides` (overrides win), the dict that
    /// diffusers' `from_config(config, **overrides)` hands to `__init__`.
    pub fn merged(&self, overrides: &Map<String, Value>) -> Map<String, Value> {
        let mut merged = self.values.clone();
        for (k, v) in overrides {
            merged.insert(k.clone(), v.clone());
        }
        merged
    }

    /// Builds a fresh scheduler for one job, already set to `num_inference_steps`
    /// (diffusers' `from_config` followed by `set_timesteps`).
    pub fn build(
        &self,
        kind: SchedulerKind,
        overrides: &Map<String, Value>,
        num_inference_steps: usize,
    ) -> Result<Box<dyn Scheduler>> {
        if num_inference_steps == 0 {
            return Err(Error::invalid("steps", "must be at least 1"));
        }
        let kind = self.resolve(kind)?;
        let mut values = self.merged(overrides);
        if kind == SchedulerKind::DpmPp2MKarras {
            values.insert("use_karras_sigmas".into(), Value::Bool(true));
        }
        let n = num_inference_steps;
        Ok(match kind {
            SchedulerKind::Ddim => Box::new(ddim::Ddim::new(&values, n)?),
            SchedulerKind::Euler => Box::new(euler::Euler::new(&values, n)?),
            SchedulerKind::EulerAncestral => {
                Box::new(euler_ancestral::EulerAncestral::new(&values, n)?)
            }
            SchedulerKind::DpmPp2M | SchedulerKind::DpmPp2MKarras => {
                Box::new(dpm_solver::DpmSolverMultistep::new(&values, n)?)
            }
            SchedulerKind::Pndm => Box::new(pndm::Pndm::new(&values, n)?),
            SchedulerKind::Lcm => Box::new(lcm::Lcm::new(&values, n)?),
            SchedulerKind::Lms => Box::new(lms::Lms::new(&values, n)?),
            SchedulerKind::UniPc => Box::new(unipc::UniPc::new(&values, n)?),
            SchedulerKind::Default => unreachable!("resolved above"),
        })
    }
}

/// One job's scheduler, set up for a fixed number of inference steps: what
/// the denoising loop asks of every diffusers scheduler class here.
pub trait Scheduler: std::fmt::Debug + Send {
    /// The diffusers class this implements, e.g. `"PNDMScheduler"`.
    fn class_name(&self) -> &'static str;

    /// The timesteps the UNet is called with, in loop order (diffusers'
    /// `scheduler.timesteps`). Its length is the number of UNet calls, which can
    /// differ from the requested steps (PNDM adds one).
    fn timesteps(&self) -> &[f64];

    /// The noise levels of a sigma-parameterised scheduler (diffusers'
    /// `scheduler.sigmas`, one more than the timesteps); `None` for the others.
    fn sigmas(&self) -> Option<&[f64]> {
        None
    }

    /// The factor the pipeline multiplies the initial unit-variance noise by.
    fn init_noise_sigma(&self) -> f64 {
        1.0
    }

    /// Scales the UNet input for step `step_index` (diffusers' `scale_model_input`).
    fn scale_model_input(&self, sample: &Tensor, _step_index: usize) -> Result<Tensor> {
        Ok(sample.clone())
    }

    /// `original` noised to the level of `timesteps()[step_index]`: diffusers'
    /// `add_noise(original, noise, timesteps[step_index:step_index + 1])` after
    /// `set_begin_index(step_index)`, as the image-to-image and inpainting
    /// pipelines call it for the first step they run (alphas for DDIM and PNDM,
    /// sigmas for the Euler family and DPM-Solver).
    fn add_noise(&self, original: &Tensor, noise: &Tensor, step_index: usize) -> Result<Tensor>;

    /// Advances `sample` by one step given the (guided) model output at
    /// `timesteps()[step_index]`. Ancestral schedulers draw fresh noise from `noise`.
    fn step(
        &mut self,
        model_output: &Tensor,
        step_index: usize,
        sample: &Tensor,
        noise: &mut dyn NoiseSource,
    ) -> Result<Tensor>;
}
