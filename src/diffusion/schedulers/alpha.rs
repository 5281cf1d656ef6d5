//! What the ᾱ-parameterised schedulers (DDIM, PNDM, LCM) share: the training
//! ᾱ table, the integer timesteps of their schedule after `set_timesteps`, the
//! `final_alpha_cumprod` a step past timestep 0 lands on, and the lookups and
//! `add_noise` every one of them makes. (The σ schedulers' blanket
//! [`Scheduler`](super::Scheduler) impl in [`super::sigma`] cannot have a twin here: two blanket
//! impls overlap, so each class forwards its few trait methods.)

use candle_core::Tensor;

use super::common::{self, BetaConfig};
use crate::error::Result;

/// An ᾱ schedule: diffusers' `alphas_cumprod` (float32), `final_alpha_cumprod`
/// and `scheduler.timesteps` (int64).
#[derive(Debug, Clone)]
pub struct AlphaSchedule {
    /// The diffusers class, for errors.
    pub class: &'static str,
    /// The timesteps the UNet is called with, in loop order.
    pub int_timesteps: Vec<i64>,
    timesteps: Vec<f64>,
    alphas_cumprod: Vec<f32>,
    final_alpha_cumprod: f32,
}

impl AlphaSchedule {
    /// The schedule of `int_timesteps` over the ᾱ table of `betas`
    /// (`final_alpha_cumprod` 1 with `set_alpha_to_one`, else ᾱ at 0); every
    /// timestep must index the table (diffusers fails in `step` otherwise).
    pub fn new(
        class: &'static str,
        betas: &BetaConfig,
        set_alpha_to_one: bool,
        int_timesteps: Vec<i64>,
    ) -> Result<Self> {
        let alphas_cumprod = betas.alphas_cumprod(class)?;
        let final_alpha_cumprod = if set_alpha_to_one {
            1.0
        } else {
            alphas_cumprod[0]
        };
        for &t in &int_timesteps {
            common::alpha_at(class, &alphas_cumprod, t)?;
        }
        Ok(Self {
            class,
            timesteps: int_timesteps.iter().map(|&t| t as f64).collect(),
            int_timesteps,
            alphas_cumprod,
            final_alpha_cumprod,
        })
    }

    /// The training ᾱ table (float32).
    pub fn alphas_cumprod(&self) -> &[f32] {
        &self.alphas_cumprod
    }

    /// ᾱ at training timestep `t`.
    pub fn alpha(&self, t: i64) -> Result<f32> {
        common::alpha_at(self.class, &self.alphas_cumprod, t)
    }

    /// ᾱ at the previous timestep `t`: `final_alpha_cumprod` below 0.
    pub fn alpha_prev(&self, t: i64) -> Result<f32> {
        if t >= 0 {
            self.alpha(t)
        } else {
            Ok(self.final_alpha_cumprod)
        }
    }

    /// `scheduler.timesteps` as the UNet gets them.
    pub fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    /// `√ᾱ_t · original + √(1 − ᾱ_t) · noise` at loop step `step_index`
    /// (`add_noise` after `set_begin_index(step_index)`).
    pub fn add_noise(
        &self,
        original: &Tensor,
        noise: &Tensor,
        step_index: usize,
    ) -> Result<Tensor> {
        common::add_noise_alpha(original, noise, self.alpha(self.timestep(step_index)?)?)
    }

    /// The timestep of loop step `step_index`, which must be one.
    pub fn timestep(&self, step_index: usize) -> Result<i64> {
        common::check_step_index(self.class, step_index, self.int_timesteps.len())?;
        Ok(self.int_timesteps[step_index])
    }
}
