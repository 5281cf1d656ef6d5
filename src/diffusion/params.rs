//! What one generation runs with: a request already checked against the
//! model and the limits (by `crate::request`, the one place requests are
//! validated), so the pipeline runs it without further checks.

use candle_core::Tensor;

use super::schedulers::SchedulerKind;

/// A request checked against the model and the limits, ready to run.
#[derive(Debug, Clone)]
pub struct GenerateRequest {
    pub prompt: String,
    pub negative_prompt: String,
    pub width: usize,
    pub height: usize,
    pub steps: usize,
    pub guidance: f64,
    pub scheduler: SchedulerKind,
    /// Overrides applied on top of the model's scheduler_config.json.
    pub scheduler_options: serde_json::Map<String, serde_json::Value>,
    /// Seed of the first image; image `i` uses `seed + i` (wrapping).
    pub seed: u64,
    pub num_images: usize,
    /// Replaces the seeded noise (diffusers parity, reproducing other tools' images).
    pub latents: Option<GivenLatents>,
}

/// Noise supplied by the caller instead of drawn from the seed.
#[derive(Debug, Clone)]
pub struct GivenLatents {
    /// Initial latents `[num_images, c, height/f, width/f]`, f32, unit variance
    /// (like diffusers' `latents=` argument).
    pub latents: Tensor,
    /// Fresh noise for ancestral schedulers, one `[num_images, c, h, w]` slice per
    /// step along dim 0; seeded noise is used when absent.
    pub step_noise: Option<Tensor>,
}
