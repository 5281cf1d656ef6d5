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
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
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
    /// SDXL refiner: the aesthetic score the picture should look rated
    /// (LAION aesthetics, about 1 to 10; default 6).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub aesthetic_score: Option<f64>,
    /// SDXL refiner: the aesthetic score of the unconditional pass (default 2.5).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub negative_aesthetic_score: Option<f64>,
}

/// The SDXL refiner's request fields (only models with
/// `requires_aesthetics_score` take them).
pub const AESTHETIC_FIELDS: [&str; 2] = ["aesthetic_score", "negative_aesthetic_score"];

/// diffusers' defaults for the refiner's `aesthetic_score` and
/// `negative_aesthetic_score` (`StableDiffusionXLImg2ImgPipeline.__call__`).
pub const DEFAULT_AESTHETIC_SCORES: (f64, f64) = (6.0, 2.5);

/// Which of diffusers' SDXL pipelines the time ids follow: they differ in
/// how the unconditional ids default.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TimeIdRule {
    /// `StableDiffusionXLPipeline`: the negatives are their own only when
    /// both negative sizes are given.
    TextToImage,
    /// `StableDiffusionXLImg2ImgPipeline` / `…InpaintPipeline._get_add_time_ids`
    /// without aesthetics: each negative size defaults to its positive one on
    /// its own, and the negative ids take the *positive* crop.
    Edit,
    /// The same with `requires_aesthetics_score` (the refiner): five ids,
    /// `original_size + crop + (score,)` and `negative_original_size +
    /// negative_crop + (negative_score,)`.
    Aesthetic,
}

/// The size and crop fields of [`MicroConditioning`], as callers name them.
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

    /// Each size or crop field with its request name.
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

    /// The refiner's aesthetic scores with their request names.
    pub fn scores(&self) -> [(&'static str, Option<f64>); 2] {
        let v = [self.aesthetic_score, self.negative_aesthetic_score];
        std::array::from_fn(|i| (AESTHETIC_FIELDS[i], v[i]))
    }

    /// `(add_time_ids, negative_add_time_ids)` for an image of `height` x
    /// `width`, as diffusers' SDXL pipelines build them with
    /// `_get_add_time_ids` (`rule` says which): `original_size +
    /// crops_coords_top_left + target_size` (or `+ (aesthetic_score,)`), sizes
    /// defaulting to `(height, width)`, crops to `(0, 0)`.
    pub fn time_ids(&self, height: usize, width: usize, rule: TimeIdRule) -> (Vec<f32>, Vec<f32>) {
        let size = [height as u32, width as u32];
        let f = |p: Pair| p.map(|x| x as f32);
        let ids = |a: Pair, b: Pair, c: &[f32]| [&f(a)[..], &f(b)[..], c].concat();
        let orig = self.original_size.unwrap_or(size);
        let crop = self.crops_coords_top_left.unwrap_or([0, 0]);
        let target = self.target_size.unwrap_or(size);
        let neg_crop = self.negative_crops_coords_top_left.unwrap_or([0, 0]);
        match rule {
            TimeIdRule::TextToImage => {
                let positive = ids(orig, crop, &f(target));
                let negative = match (self.negative_original_size, self.negative_target_size) {
                    (Some(o), Some(t)) => ids(o, neg_crop, &f(t)),
                    _ => positive.clone(),
                };
                (positive, negative)
            }
            TimeIdRule::Edit => {
                let neg_orig = self.negative_original_size.unwrap_or(orig);
                let neg_target = self.negative_target_size.unwrap_or(target);
                (
                    ids(orig, crop, &f(target)),
                    ids(neg_orig, crop, &f(neg_target)),
                )
            }
            TimeIdRule::Aesthetic => {
                let (score, negative) = DEFAULT_AESTHETIC_SCORES;
                let score = self.aesthetic_score.unwrap_or(score) as f32;
                let negative = self.negative_aesthetic_score.unwrap_or(negative) as f32;
                let neg_orig = self.negative_original_size.unwrap_or(orig);
                (
                    ids(orig, crop, &[score]),
                    ids(neg_orig, neg_crop, &[negative]),
                )
            }
        }
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
        let (p, n) = none.time_ids(96, 128, TimeIdRule::TextToImage);
        assert_eq!(p, [96.0, 128.0, 0.0, 0.0, 96.0, 128.0]);
        assert_eq!(n, p);
        let m = MicroConditioning {
            original_size: Some([64, 80]),
            crops_coords_top_left: Some([4, 8]),
            negative_original_size: Some([48, 56]),
            negative_crops_coords_top_left: Some([0, 2]),
            ..Default::default()
        };
        let (p, n) = m.time_ids(96, 96, TimeIdRule::TextToImage);
        assert_eq!(p, [64.0, 80.0, 4.0, 8.0, 96.0, 96.0]);
        // diffusers ignores the negative crop unless both negative sizes are given.
        assert_eq!(n, p);
        let m = MicroConditioning {
            negative_target_size: Some([96, 88]),
            ..m
        };
        let both = m.time_ids(96, 96, TimeIdRule::TextToImage).1;
        assert_eq!(both, [48.0, 56.0, 0.0, 2.0, 96.0, 88.0]);
    }

    #[test]
    fn edit_time_ids_default_each_negative_size_and_take_the_positive_crop() {
        let m = MicroConditioning {
            original_size: Some([64, 80]),
            crops_coords_top_left: Some([4, 8]),
            negative_original_size: Some([48, 56]),
            negative_crops_coords_top_left: Some([0, 2]),
            ..Default::default()
        };
        let (p, n) = m.time_ids(96, 112, TimeIdRule::Edit);
        assert_eq!(p, [64.0, 80.0, 4.0, 8.0, 96.0, 112.0]);
        // negative_target_size defaults to target_size; the crop is the positive one
        assert_eq!(n, [48.0, 56.0, 4.0, 8.0, 96.0, 112.0]);
        let (p, n) = m.time_ids(96, 112, TimeIdRule::Aesthetic);
        assert_eq!(p, [64.0, 80.0, 4.0, 8.0, 6.0]);
        assert_eq!(n, [48.0, 56.0, 0.0, 2.0, 2.5]);
        let scored = MicroConditioning {
            aesthetic_score: Some(8.0),
            negative_aesthetic_score: Some(1.0),
            ..Default::default()
        };
        let (p, n) = scored.time_ids(96, 112, TimeIdRule::Aesthetic);
        assert_eq!(
            (p, n),
            (
                vec![96.0, 112.0, 0.0, 0.0, 8.0],
                vec![96.0, 112.0, 0.0, 0.0, 1.0]
            )
        );
    }
}
