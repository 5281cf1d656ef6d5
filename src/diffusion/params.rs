//! What one generation runs with: a request already checked against the
//! model and the limits (by `crate::request`, the one place requests are
//! validated), so the pipeline runs it without further checks.

use candle_core::Tensor;
use serde::{Deserialize, Serialize};

use super::schedulers::SchedulerKind;

/// A request checked against the model and the limits, ready to run.
#[derive(Debug, Clone)]
pub struct GenerateRequest {
    pub prompt: String,
    /// `None` when none was given: SD 1.x/2.x then encode `""`, and SDXL models
    /// with `force_zeros_for_empty_prompt` condition the unconditional pass on
    /// zeros; an explicit `""` is encoded (diffusers keeps the same distinction).
    pub negative_prompt: Option<String>,
    /// SDXL's `prompt_2`, for the second text encoder (default: `prompt`).
    pub prompt_2: Option<String>,
    /// SDXL's `negative_prompt_2` (default: `negative_prompt`).
    pub negative_prompt_2: Option<String>,
    /// SDXL's size and crop conditioning (empty for other models).
    pub micro: MicroConditioning,
    pub width: usize,
    pub height: usize,
    pub steps: usize,
    pub guidance: f64,
    /// Whether classifier-free guidance runs (two UNet rows per image):
    /// [`ModelInfo::runs_cfg`](crate::diffusion::pipelines::ModelInfo::runs_cfg).
    pub guided: bool,
    pub scheduler: SchedulerKind,
    /// Overrides applied on top of the model's scheduler_config.json.
    pub scheduler_options: serde_json::Map<String, serde_json::Value>,
    /// Seed of the first image; image `i` uses `seed + i` (wrapping).
    pub seed: u64,
    pub num_images: usize,
    /// Replaces the seeded noise (diffusers parity, reproducing other tools' images).
    pub latents: Option<GivenLatents>,
    /// Image to image: the picture to start from and how much to change it.
    pub init: Option<InitImage>,
}

/// The starting picture of an image-to-image or inpainting request.
#[derive(Debug, Clone)]
pub struct InitImage {
    /// `[1, 3, height, width]` f32 in [-1, 1], at the request's size
    /// (diffusers' `VaeImageProcessor.preprocess`).
    pub pixels: Tensor,
    /// In (0, 1]: the share of the schedule that runs (diffusers' `strength`).
    pub strength: f64,
    /// Inpainting: `[1, 1, height, width]` f32, 1 where the picture is
    /// repainted and 0 where it is kept (diffusers' `mask_processor.preprocess`:
    /// grayscale, binarised at 0.5).
    pub mask: Option<Tensor>,
}

/// diffusers' img2img `get_timesteps`: the index of the first of `steps`
/// inference steps that runs at `strength`, `steps - min(⌊steps · strength⌋,
/// steps)` (every scheduler here has `order` 1). `None` when no step would run.
pub fn img2img_start(steps: usize, strength: f64) -> Option<usize> {
    let init = ((steps as f64 * strength).floor() as usize).min(steps);
    (init > 0).then(|| steps - init)
}

/// A `[height, width]` pair in pixels (diffusers' `(h, w)` tuples), or a crop
/// corner `[top, left]`.
pub type Pair = [u32; 2];

/// SDXL's micro-conditioning (Podell et al. 2023, section 2.2), as the arguments
/// of diffusers' `StableDiffusionXLPipeline.__call__`: every field optional,
/// defaults applied by [`Self::time_ids`].
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema,
)]
pub struct MicroConditioning {
    /// SDXL: the `[height, width]` the image should look as if it was upscaled from
    /// (default: the image's size).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub original_size: Option<Pair>,
    /// SDXL: the `[top, left]` corner of the crop the image should look cut from (default `[0, 0]`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub crops_coords_top_left: Option<Pair>,
    /// SDXL: the `[height, width]` of the target (default: the image's size).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_size: Option<Pair>,
    /// SDXL: `original_size` of the unconditional pass (used with `negative_target_size`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub negative_original_size: Option<Pair>,
    /// SDXL: `crops_coords_top_left` of the unconditional pass.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub negative_crops_coords_top_left: Option<Pair>,
    /// SDXL: `target_size` of the unconditional pass (used with `negative_original_size`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub negative_target_size: Option<Pair>,
}

/// The request fields of [`MicroConditioning`], as callers name them.
pub const MICRO_FIELDS: [&str; 6] = [
    "original_size",
    "crops_coords_top_left",
    "target_size",
    "negative_original_size",
    "negative_crops_coords_top_left",
    "negative_target_size",
];

impl MicroConditioning {
    pub fn is_empty(&self) -> bool {
        *self == Self::default()
    }

    /// Each field with its request name.
    pub fn fields(&self) -> [(&'static str, Option<Pair>); 6] {
        let v = [
            self.original_size,
            self.crops_coords_top_left,
            self.target_size,
            self.negative_original_size,
            self.negative_crops_coords_top_left,
            self.negative_target_size,
        ];
        std::array::from_fn(|i| (MICRO_FIELDS[i], v[i]))
    }

    /// `(add_time_ids, negative_add_time_ids)` for an image of `height` x
    /// `width`, as diffusers' `StableDiffusionXLPipeline.__call__` builds them
    /// with `_get_add_time_ids`: `original_size + crops_coords_top_left +
    /// target_size`, sizes defaulting to `(height, width)` and the crop to
    /// `(0, 0)`; the negative ids are their own only when both
    /// `negative_original_size` and `negative_target_size` are given.
    pub fn time_ids(&self, height: usize, width: usize) -> ([f32; 6], [f32; 6]) {
        let size = [height as u32, width as u32];
        let ids = |orig: Pair, crop: Pair, target: Pair| {
            let v = [orig[0], orig[1], crop[0], crop[1], target[0], target[1]];
            v.map(|x| x as f32)
        };
        let positive = ids(
            self.original_size.unwrap_or(size),
            self.crops_coords_top_left.unwrap_or([0, 0]),
            self.target_size.unwrap_or(size),
        );
        let negative = match (self.negative_original_size, self.negative_target_size) {
            (Some(orig), Some(target)) => ids(
                orig,
                self.negative_crops_coords_top_left.unwrap_or([0, 0]),
                target,
            ),
            _ => positive,
        };
        (positive, negative)
    }
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
    /// Image to image: the unit-variance draw of each image's VAE posterior
    /// sample, `[1 or num_images, c, h, w]`; seeded noise is used when absent.
    pub vae_noise: Option<Tensor>,
    /// Inpainting: the same for the masked picture's posterior sample (what a
    /// 9-channel UNet is conditioned on).
    pub masked_image_vae_noise: Option<Tensor>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn img2img_start_is_diffusers_get_timesteps() {
        assert_eq!(img2img_start(10, 0.6), Some(4));
        assert_eq!(img2img_start(8, 0.75), Some(2));
        assert_eq!(img2img_start(6, 0.5), Some(3));
        assert_eq!(img2img_start(4, 1.0), Some(0));
        // int(5 * 0.19) = 0: nothing would run
        assert_eq!(img2img_start(5, 0.19), None);
        assert_eq!(img2img_start(5, 0.2), Some(4));
    }

    #[test]
    fn time_ids_default_to_the_image_size_and_negatives_need_both_sizes() {
        let none = MicroConditioning::default();
        let (p, n) = none.time_ids(96, 128);
        assert_eq!(p, [96.0, 128.0, 0.0, 0.0, 96.0, 128.0]);
        assert_eq!(n, p);
        let m = MicroConditioning {
            original_size: Some([64, 80]),
            crops_coords_top_left: Some([4, 8]),
            negative_original_size: Some([48, 56]),
            negative_crops_coords_top_left: Some([0, 2]),
            ..Default::default()
        };
        let (p, n) = m.time_ids(96, 96);
        assert_eq!(p, [64.0, 80.0, 4.0, 8.0, 96.0, 96.0]);
        // diffusers ignores the negative crop unless both negative sizes are given.
        assert_eq!(n, p);
        let m = MicroConditioning {
            negative_target_size: Some([96, 88]),
            ..m
        };
        assert_eq!(m.time_ids(96, 96).1, [48.0, 56.0, 0.0, 2.0, 96.0, 88.0]);
    }
}
