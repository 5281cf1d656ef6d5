//! What the σ-parameterised schedulers (Euler, Euler ancestral, LMS) share:
//! their schedule after `set_timesteps` (timesteps, one σ per timestep plus the
//! final one, `init_noise_sigma`) and every [`Scheduler`] method that only
//! reads it. Each class implements [`SigmaStep`] (its schedule and its step);
//! the blanket impl makes it a [`Scheduler`].

use candle_core::Tensor;

use super::Scheduler;
use super::common;
use crate::diffusion::latents::NoiseSource;
use crate::error::Result;

/// A σ schedule: diffusers' `scheduler.timesteps`, `scheduler.sigmas` (float32)
/// and `init_noise_sigma`.
#[derive(Debug, Clone)]
pub struct SigmaSchedule {
    /// The diffusers class, for errors.
    pub class: &'static str,
    pub timesteps: Vec<f64>,
    /// One per timestep plus the final σ.
    pub sigmas: Vec<f32>,
    sigmas_f64: Vec<f64>,
    pub init_noise_sigma: f32,
}

impl SigmaSchedule {
    pub fn new(
        class: &'static str,
        timesteps: Vec<f64>,
        sigmas: Vec<f32>,
        init_noise_sigma: f32,
    ) -> Self {
        Self {
            class,
            timesteps,
            sigmas_f64: sigmas.iter().map(|&s| s as f64).collect(),
            sigmas,
            init_noise_sigma,
        }
    }

    /// σ at `step_index`, which must index the timesteps.
    pub fn sigma(&self, step_index: usize) -> Result<f32> {
        common::check_step_index(self.class, step_index, self.timesteps.len())?;
        Ok(self.sigmas[step_index])
    }
}

/// A σ-parameterised scheduler: its schedule and its step.
pub trait SigmaStep: std::fmt::Debug + Send {
    fn schedule(&self) -> &SigmaSchedule;

    /// [`Scheduler::step`] (`step_index` is checked before this is called).
    fn sigma_step(
        &mut self,
        model_output: &Tensor,
        step_index: usize,
        sample: &Tensor,
        noise: &mut dyn NoiseSource,
    ) -> Result<Tensor>;
}

impl<T: SigmaStep> Scheduler for T {
    fn class_name(&self) -> &'static str {
        self.schedule().class
    }

    fn timesteps(&self) -> &[f64] {
        &self.schedule().timesteps
    }

    /// `scheduler.sigmas`: one per timestep plus the final σ.
    fn sigmas(&self) -> Option<&[f64]> {
        Some(&self.schedule().sigmas_f64)
    }

    fn init_noise_sigma(&self) -> f64 {
        self.schedule().init_noise_sigma as f64
    }

    /// `sample / (σ² + 1) ** 0.5`, in the sample's dtype.
    fn scale_model_input(&self, sample: &Tensor, step_index: usize) -> Result<Tensor> {
        let sigma = self.schedule().sigma(step_index)?;
        let denom = (sigma * sigma + 1.0).sqrt();
        Ok(sample.affine(1.0 / denom as f64, 0.0)?)
    }

    /// `original + noise · σ` (the Euler family's `add_noise`).
    fn add_noise(&self, original: &Tensor, noise: &Tensor, step_index: usize) -> Result<Tensor> {
        common::add_noise_sigma(original, noise, self.schedule().sigma(step_index)?)
    }

    fn step(
        &mut self,
        model_output: &Tensor,
        step_index: usize,
        sample: &Tensor,
        noise: &mut dyn NoiseSource,
    ) -> Result<Tensor> {
        self.schedule().sigma(step_index)?;
        self.sigma_step(model_output, step_index, sample, noise)
    }
}
