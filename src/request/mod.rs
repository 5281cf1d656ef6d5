//! The one validated generation request.
//!
//! Every front door (CLI flags, HTTP JSON) fills a [`GenerateParams`] with what
//! the caller sent and calls [`GenerateParams::validate`], which checks each
//! field against the loaded model and the server's [`Limits`] and returns a
//! [`GenerateRequest`] that the pipeline can run without further checks.
//! Errors name the field as [`Error::InvalidRequest`].

mod edit;
mod limits;

use serde::{Deserialize, Serialize};

pub use self::edit::{
    DEFAULT_INPAINT_STRENGTH, DEFAULT_STRENGTH, DEFAULT_XL_INPAINT_STRENGTH, DEFAULT_XL_STRENGTH,
    default_strength,
};
use self::edit::{EditImages, Settled};
pub use self::limits::{Limits, default_request_bytes};
pub use crate::diffusion::params::{
    GenerateRequest, GivenLatents, InitImage, MicroConditioning, img2img_start,
};
use crate::diffusion::pipelines::ModelInfo;
use crate::diffusion::schedulers::{SchedulerKind, check_overrides};
pub use crate::edit::SourceImage;
use crate::error::{Error, Result};

/// What a caller asked for; every field optional, defaults applied by `validate`.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
pub struct GenerateParams {
    pub prompt: Option<String>,
    pub negative_prompt: Option<String>,
    /// SDXL's second prompt (default: `prompt`).
    #[serde(default)]
    pub prompt_2: Option<String>,
    /// SDXL's second negative prompt (default: `negative_prompt`).
    #[serde(default)]
    pub negative_prompt_2: Option<String>,
    /// SDXL's size and crop conditioning.
    #[serde(default, flatten)]
    pub micro: MicroConditioning,
    pub width: Option<usize>,
    pub height: Option<usize>,
    pub steps: Option<usize>,
    pub guidance: Option<f64>,
    pub scheduler: Option<String>,
    /// Scheduler config overrides, e.g. `{"timestep_spacing": "trailing"}`.
    pub scheduler_options: Option<serde_json::Map<String, serde_json::Value>>,
    pub seed: Option<u64>,
    pub num_images: Option<usize>,
    /// Image to image and inpainting: how much of the schedule runs, in (0, 1]
    /// (diffusers' `strength`; default 0.8 (SDXL 0.3), inpainting 1.0 (SDXL
    /// 0.9999), as its pipelines'); needs an init image.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub strength: Option<f64>,
}

/// What a request brings beyond its parameters.
#[derive(Debug, Clone, Default)]
pub struct Inputs {
    /// Replaces the seeded noise and fixes the number of images.
    pub latents: Option<GivenLatents>,
    /// Image to image: the picture to start from, and the field it came in
    /// (`init_image`, the CLI's `--init-image`).
    pub init_image: Option<(SourceImage, String)>,
    /// Inpainting: white where the init image is repainted, and its field
    /// (`mask_image`, the CLI's `--mask`).
    pub mask_image: Option<(SourceImage, String)>,
}

fn check_side(field: &str, v: usize, factor: usize, limits: &Limits) -> Result<usize> {
    if v == 0 || !v.is_multiple_of(factor) {
        return Err(Error::invalid(
            field,
            format!("{v} is not a positive multiple of {factor}"),
        ));
    }
    if v > limits.max_side {
        return Err(Error::invalid(
            field,
            format!("{v} is over the limit of {} pixels", limits.max_side),
        ));
    }
    Ok(v)
}

fn mib(bytes: u64) -> u64 {
    bytes.div_ceil(1 << 20)
}

/// `text` within the prompt limit and free of NUL characters; errors name `field`.
pub fn check_text(field: &str, text: &str, limits: &Limits) -> Result<()> {
    let n = text.chars().count();
    if n > limits.max_prompt_chars {
        return Err(Error::invalid(
            field,
            format!(
                "{n} characters is over the limit of {}",
                limits.max_prompt_chars
            ),
        ));
    }
    if text.contains('\0') {
        return Err(Error::invalid(field, "contains a NUL character"));
    }
    Ok(())
}

impl GenerateParams {
    /// Checks every field; `latents`, when given, replaces the seeded noise and
    /// fixes the number of images.
    pub fn validate(
        &self,
        model: &ModelInfo,
        limits: &Limits,
        latents: Option<GivenLatents>,
    ) -> Result<GenerateRequest> {
        let inputs = Inputs {
            latents,
            ..Default::default()
        };
        self.validate_with(model, limits, inputs)
    }

    /// [`Self::validate`] with every input: an init image makes the request
    /// image to image, its size (rounded down to the VAE's factor) the default
    /// width and height.
    pub fn validate_with(
        &self,
        model: &ModelInfo,
        limits: &Limits,
        inputs: Inputs,
    ) -> Result<GenerateRequest> {
        let Inputs {
            latents,
            init_image,
            mask_image,
        } = inputs;
        let images = EditImages {
            init: init_image,
            mask: mask_image,
        };
        let prompt = self.prompt.clone().unwrap_or_default();
        check_text("prompt", &prompt, limits)?;
        for (field, text) in [
            ("negative_prompt", &self.negative_prompt),
            ("prompt_2", &self.prompt_2),
            ("negative_prompt_2", &self.negative_prompt_2),
        ] {
            check_text(field, text.as_deref().unwrap_or(""), limits)?;
        }
        check_family_fields(self, model)?;

        let f = model.vae_scale_factor;
        let default_side = limits.default_side(model.default_size, f);
        let (default_w, default_h) = images
            .default_size(f)?
            .unwrap_or((default_side, default_side));
        let width = check_side("width", self.width.unwrap_or(default_w), f, limits)?;
        let height = check_side("height", self.height.unwrap_or(default_h), f, limits)?;
        // Checked: sides come from callers, and a wrapped product would pass.
        let pixels = width.saturating_mul(height);
        if pixels > limits.max_pixels {
            return Err(Error::invalid(
                "width",
                format!(
                    "{width}x{height} is {pixels} pixels, over the limit of {}",
                    limits.max_pixels
                ),
            ));
        }

        let steps = self.steps.unwrap_or(limits.default_steps(&model.defaults));
        if steps == 0 || steps > limits.max_steps {
            return Err(Error::invalid(
                "steps",
                format!("{steps} is outside 1..={}", limits.max_steps),
            ));
        }
        let guidance = self.guidance.unwrap_or(model.defaults.guidance);
        if !guidance.is_finite() || !(0.0..=100.0).contains(&guidance) {
            return Err(Error::invalid(
                "guidance",
                format!("{guidance} is outside 0..=100"),
            ));
        }
        let scheduler = match &self.scheduler {
            None => SchedulerKind::Default,
            Some(s) => SchedulerKind::parse(s).ok_or_else(|| {
                Error::invalid(
                    "scheduler",
                    format!(
                        "unknown scheduler {s:?}; choose one of: {}",
                        SchedulerKind::names()
                    ),
                )
            })?,
        };

        let scheduler_options = self.scheduler_options.clone().unwrap_or_default();
        check_overrides(&scheduler_options)?;
        check_scheduler(model, scheduler, &scheduler_options, steps)?;

        let mut num_images = self.num_images.unwrap_or(1);
        if let Some(given) = &latents {
            let l = &given.latents;
            let expected = (model.latent_channels, height / f, width / f);
            let (n, c, h, w) = l.dims4().map_err(|_| {
                Error::invalid(
                    "latents",
                    format!("expected 4 dimensions, got shape {:?}", l.dims()),
                )
            })?;
            if (c, h, w) != expected {
                return Err(Error::invalid(
                    "latents",
                    format!(
                        "shape {:?} does not fit {width}x{height}: expected [n, {}, {}, {}]",
                        l.dims(),
                        expected.0,
                        expected.1,
                        expected.2
                    ),
                ));
            }
            if self.num_images.is_some_and(|k| k != n) {
                return Err(Error::invalid(
                    "num_images",
                    format!("{num_images} does not match the {n} latents given"),
                ));
            }
            num_images = n;
            if let Some(noise) = &given.step_noise {
                let ok = noise.dims().len() == 5 && noise.dims()[1..] == *l.dims();
                if !ok {
                    return Err(Error::invalid(
                        "latents",
                        format!(
                            "`noise` shape {:?} must be [steps, {:?}...]",
                            noise.dims(),
                            l.dims()
                        ),
                    ));
                }
            }
        }
        if num_images == 0 || num_images > limits.max_images {
            return Err(Error::invalid(
                "num_images",
                format!("{num_images} is outside 1..={}", limits.max_images),
            ));
        }
        let guided = model.runs_cfg(guidance);
        let rows_per_image = if guided { 2 } else { 1 };
        let needed = model.working_bytes(width, height, num_images, rows_per_image);
        if needed.is_none_or(|n| n > limits.max_request_bytes) {
            let field = if num_images > 1 {
                "num_images"
            } else {
                "width"
            };
            return Err(Error::invalid(
                field,
                format!(
                    "{num_images} image(s) of {width}x{height} need about {} MiB of working memory, \
                     over this server's limit of {} MiB per request; ask for fewer or smaller images",
                    needed.map_or(u64::MAX, mib),
                    mib(limits.max_request_bytes)
                ),
            ));
        }
        let settled = Settled {
            width,
            height,
            steps,
            scheduler,
            num_images,
            latents: latents.as_ref(),
        };
        let init = images.check(self, model, &settled)?;
        let seed = self.seed.unwrap_or_else(random_seed);
        Ok(GenerateRequest {
            prompt,
            negative_prompt: self.negative_prompt.clone(),
            prompt_2: self.prompt_2.clone(),
            negative_prompt_2: self.negative_prompt_2.clone(),
            micro: self.micro,
            width,
            height,
            steps,
            guidance,
            guided,
            scheduler,
            scheduler_options,
            seed,
            num_images,
            latents,
            init,
        })
    }
}

/// The largest value a micro-conditioning field may hold (SDXL was trained on
/// sizes up to about 2048; larger ones are certainly a mistake).
pub const MAX_MICRO_VALUE: u32 = 16384;

/// Fields only some model families take are refused by name elsewhere, and
/// SDXL's micro-conditioning must be sizes (positive) and crop corners.
fn check_family_fields(params: &GenerateParams, model: &ModelInfo) -> Result<()> {
    let second_prompts = [
        ("prompt_2", params.prompt_2.is_some()),
        ("negative_prompt_2", params.negative_prompt_2.is_some()),
    ];
    let scores = params.micro.scores().map(|(name, v)| (name, v.is_some()));
    let xl_only = second_prompts
        .into_iter()
        .chain(params.micro.fields().map(|(name, v)| (name, v.is_some())))
        .chain(scores);
    let refused = |field: &str, why: String| {
        let model = format!("this model ({}) is {}", model.name, model.pipeline_class);
        Err(Error::invalid(field, format!("{why}; {model}")))
    };
    if !model.family.is_xl() {
        if let Some((field, _)) = xl_only.into_iter().find(|(_, given)| *given) {
            return refused(field, "only SDXL models take it".into());
        }
        return Ok(());
    }
    if model.refiner {
        // diffusers' refiner has no first tokenizer, and silently drops them.
        if let Some((field, _)) = second_prompts.iter().find(|(_, given)| *given) {
            return refused(
                field,
                "an SDXL refiner has one text encoder (text_encoder_2), which takes `prompt` and \
                 `negative_prompt`"
                    .into(),
            );
        }
    } else if let Some((field, _)) = scores.iter().find(|(_, given)| *given) {
        return refused(
            field,
            "only an SDXL refiner (requires_aesthetics_score) takes it".into(),
        );
    }
    for (field, value) in params.micro.scores() {
        if let Some(v) = value.filter(|v| !(0.0..=10.0).contains(v)) {
            return Err(Error::invalid(
                field,
                format!("{v} is outside [0, 10] (the LAION aesthetic scale)"),
            ));
        }
    }
    for (field, value) in params.micro.fields() {
        let Some(pair) = value else { continue };
        let is_crop = field.contains("crops");
        if pair
            .iter()
            .any(|&v| v > MAX_MICRO_VALUE || (!is_crop && v == 0))
        {
            let what = if is_crop {
                format!("[top, left] from 0 to {MAX_MICRO_VALUE}")
            } else {
                format!("[height, width] from 1 to {MAX_MICRO_VALUE}")
            };
            return Err(Error::invalid(
                field,
                format!("{pair:?} is outside the range: give {what}"),
            ));
        }
    }
    Ok(())
}

/// Builds the scheduler the request will run with, so a bad option or an
/// option the model's config can't take is refused now, not when the job runs
/// (diffusers raises these in `__init__`/`set_timesteps`/`step`).
fn check_scheduler(
    model: &ModelInfo,
    kind: SchedulerKind,
    options: &serde_json::Map<String, serde_json::Value>,
    steps: usize,
) -> Result<()> {
    let config = &model.scheduler_config;
    let built = config.build(kind, options, steps).and_then(|s| {
        // Every timestep must index the training schedule (steps_offset can
        // push `leading` spacings past it; diffusers fails in `step`). Only the
        // top is checked: continuous Euler timesteps are log-sigmas, below 0.
        let train = config.num_train_timesteps(options);
        match s
            .timesteps()
            .iter()
            .find(|&&t| t.is_nan() || t >= train as f64)
        {
            Some(t) => Err(Error::invalid(
                "scheduler",
                format!("timestep {t} is outside the {train} training timesteps"),
            )),
            None => Ok(()),
        }
    });
    match built {
        Ok(()) => Ok(()),
        Err(Error::InvalidRequest { field, message })
            if (field == "scheduler" || field == "steps") && !options.is_empty() =>
        {
            // The options are at fault when the model's own config builds;
            // one that fails on its own is named.
            let builds = |o: &serde_json::Map<String, serde_json::Value>| {
                config.build(kind, o, steps).is_ok()
            };
            let field = if !builds(&Default::default()) {
                field
            } else {
                options
                    .iter()
                    .find(|(k, v)| {
                        !builds(&serde_json::Map::from_iter([((*k).clone(), (*v).clone())]))
                    })
                    .map_or("scheduler_options".to_string(), |(k, _)| {
                        format!("scheduler_options.{k}")
                    })
            };
            Err(Error::InvalidRequest { field, message })
        }
        Err(e) => Err(e),
    }
}

impl GenerateRequest {
    /// Whether `other` can share a UNet batch with this request: same size,
    /// steps, scheduler (and options) and guidance, and neither brings its own
    /// latents. Prompts, seeds, image counts and SDXL's micro-conditioning may
    /// differ: every UNet row gets its own text states, pooled embedding and
    /// time ids.
    pub fn batches_with(&self, other: &GenerateRequest) -> bool {
        self.width == other.width
            && self.height == other.height
            && self.steps == other.steps
            && self.scheduler == other.scheduler
            && self.scheduler_options == other.scheduler_options
            && self.guidance.to_bits() == other.guidance.to_bits()
            && self.latents.is_none()
            && other.latents.is_none()
            && self.init.is_none()
            && other.init.is_none()
    }

    /// One seed per image: `seed, seed + 1, ...`.
    pub fn seeds(&self) -> Vec<u64> {
        (0..self.num_images as u64)
            .map(|i| self.seed.wrapping_add(i))
            .collect()
    }
}

/// A seed from the OS clock and process, for requests that give none. Seeds are
/// limited to 2^53 so JSON clients (JavaScript numbers) can echo them back exactly.
pub fn random_seed() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or_default(),
    );
    h.finish() & ((1 << 53) - 1)
}
