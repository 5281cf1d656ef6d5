//! The persisted record of one public job (`jobs/{image_id}.json` in storage),
//! written at every state change so a restarted server, or another replica on
//! the same bucket, answers for it.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::diffusion::pipelines::ModelInfo;
use crate::error::{Error, Result};
use crate::request::{
    GenerateParams, GenerateRequest, Inputs, Limits, MicroConditioning, SourceImage, check_text,
};
use crate::styles;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum JobState {
    Queued,
    Processing,
    Completed,
    Failed,
    Cancelled,
}

impl JobState {
    pub fn is_final(self) -> bool {
        matches!(
            self,
            JobState::Completed | JobState::Failed | JobState::Cancelled
        )
    }
}

/// A `POST /generate` body, as the caller sends it (every field optional here;
/// [`JobRequest::to_params`] checks them). Its JSON Schema is `/openapi.json`'s
/// `GenerateRequest`: the bounds that are the server's settings (maxima, the
/// resolution's sides, enums) are filled in by the HTTP layer's document.
// Unknown fields are refused by name in `http::jobs` before this parses
// (serde's `deny_unknown_fields` can't be combined with the flattened fields).
#[derive(Debug, Clone, Default, Serialize, Deserialize, schemars::JsonSchema)]
#[schemars(rename = "GenerateRequest")]
#[schemars(extend("dependentSchemas" = {
    "strength": {"required": ["init_image"], "properties": {"init_image": {"not": {"type": "null"}}}},
    "mask_image": {"required": ["init_image"], "properties": {"init_image": {"not": {"type": "null"}}}}
}))]
pub struct JobRequest {
    /// The prompt (`prompt` is accepted instead): not blank, no NUL.
    // Not `default`: schemars then lists it as required (serde still takes
    // an absent Option as None; `to_params` names it).
    #[schemars(with = "String", length(min = 1))]
    #[schemars(pattern(crate::fields::NON_BLANK))]
    pub text: Option<String>,
    /// A preset from `GET /styles`, wrapping the text and adding to the negative prompt.
    #[serde(default)]
    pub style: Option<String>,
    /// `"WIDTHxHEIGHT"`, e.g. `"512x512"`.
    #[serde(default)]
    pub resolution: Option<String>,
    /// What the image should not show; no NUL.
    #[serde(default)]
    #[schemars(pattern(crate::fields::NO_NUL))]
    pub negative_prompt: Option<String>,
    /// SDXL only: the prompt of the second text encoder (default: the styled text); no NUL.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(pattern(crate::fields::NO_NUL))]
    pub prompt_2: Option<String>,
    /// SDXL only: the second encoder's negative prompt (default: `negative_prompt`); no NUL.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(pattern(crate::fields::NO_NUL))]
    pub negative_prompt_2: Option<String>,
    /// SDXL only: size and crop conditioning.
    #[serde(default, flatten)]
    pub micro: MicroConditioning,
    /// Denoising steps.
    #[serde(default, deserialize_with = "crate::fields::integer::option")]
    #[schemars(range(min = 1))]
    pub steps: Option<usize>,
    /// Classifier-free guidance scale; at most 1 skips the unconditional pass.
    #[serde(default)]
    #[schemars(range(min = 0, max = 100))]
    pub guidance: Option<f64>,
    /// Seed of the first image; image `i` uses `seed + i` (wrapping). Default: random.
    #[serde(default, deserialize_with = "crate::fields::integer::option")]
    pub seed: Option<u64>,
    /// A scheduler name (`default`: the model's own).
    #[serde(default)]
    pub scheduler: Option<String>,
    /// Images to generate.
    #[serde(default, deserialize_with = "crate::fields::integer::option")]
    #[schemars(range(min = 1))]
    pub num_images: Option<usize>,
    /// Scheduler config overrides, as diffusers' `from_config(config, **options)`.
    #[serde(default, deserialize_with = "crate::fields::integer::options")]
    pub scheduler_options: Option<serde_json::Map<String, serde_json::Value>>,
    /// Image to image: the picture to start from, as base64 (PNG, JPEG or
    /// WebP; a `data:` URL too) or an earlier result. The output is its size
    /// rounded down to a multiple of 8 unless `resolution` says. Kept in
    /// storage with the job (the record holds no image bytes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub init_image: Option<ImageSource>,
    /// Inpainting: where to repaint `init_image`, white (repainted) on black
    /// (kept), in the same forms; resized to the output size. Kept in storage
    /// with the job too.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mask_image: Option<ImageSource>,
    /// Image to image and inpainting: how much of `init_image` to change, in
    /// (0, 1] (default 0.8, SDXL 0.3; with a mask 1.0, SDXL 0.9999): the share of the
    /// steps that run; at least one must.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(extend("exclusiveMinimum" = 0, "maximum" = 1))]
    pub strength: Option<f64>,
}

/// An edit job's pictures, decoded.
#[derive(Debug, Clone, Default)]
pub struct EditInputs {
    pub init: Option<SourceImage>,
    pub mask: Option<SourceImage>,
}

/// Where an edit's input picture (or mask) comes from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(untagged)]
pub enum ImageSource {
    /// The image's bytes, base64 (or a `data:image/...;base64,` URL).
    #[schemars(extend("contentEncoding" = "base64"))]
    Encoded(String),
    /// Image `index` (default 0) of an earlier job's result.
    Result {
        #[schemars(extend("format" = "uuid"))]
        image_id: String,
        #[serde(default)]
        index: usize,
    },
}

/// Request fields named as `POST /generate` callers spell them.
pub fn caller_name(field: &str) -> String {
    match field {
        "prompt" => "text",
        "width" | "height" => "resolution",
        f => f,
    }
    .to_string()
}

/// Parses `"512x768"` (also `X` or `×`) into (width, height).
pub fn parse_resolution(s: &str) -> Result<(usize, usize)> {
    let bad = || {
        Error::invalid(
            "resolution",
            format!("{s:?} is not WIDTHxHEIGHT (e.g. \"512x512\")"),
        )
    };
    let (w, h) = s.trim().split_once(['x', 'X', '×']).ok_or_else(bad)?;
    let w = w.trim().parse().map_err(|_| bad())?;
    let h = h.trim().parse().map_err(|_| bad())?;
    Ok((w, h))
}

impl JobRequest {
    /// Checks the request against the model and the limits, ready to run. The
    /// prompt limit bounds what the caller typed (`text`, `negative_prompt`),
    /// not the longer prompt its style makes of it.
    pub fn validate(&self, model: &ModelInfo, limits: &Limits) -> Result<GenerateRequest> {
        self.validate_with_images(model, limits, EditInputs::default())
    }

    /// [`Self::validate`] for an edit: its `init_image` and `mask_image`,
    /// already fetched and decoded.
    pub fn validate_with_images(
        &self,
        model: &ModelInfo,
        limits: &Limits,
        images: EditInputs,
    ) -> Result<GenerateRequest> {
        for (field, value) in [
            ("text", &self.text),
            ("negative_prompt", &self.negative_prompt),
            ("prompt_2", &self.prompt_2),
            ("negative_prompt_2", &self.negative_prompt_2),
        ] {
            check_text(field, value.as_deref().unwrap_or(""), limits)?;
        }
        let styled = limits.with_prompt_room(styles::overheads());
        let named = |img: Option<SourceImage>, field: &str| img.map(|i| (i, field.to_string()));
        let inputs = Inputs {
            latents: None,
            init_image: named(images.init, "init_image"),
            mask_image: named(images.mask, "mask_image"),
        };
        self.to_params()?.validate_with(model, &styled, inputs)
    }

    /// The pipeline parameters: the style applied to the text and negative prompt.
    pub fn to_params(&self) -> Result<GenerateParams> {
        let text = self.text.as_deref().unwrap_or("");
        if text.trim().is_empty() {
            return Err(Error::invalid("text", "is required and must not be empty"));
        }
        let style_name = self.style.as_deref().unwrap_or(styles::DEFAULT_STYLE);
        let style = styles::find(style_name).ok_or_else(|| {
            Error::invalid(
                "style",
                format!(
                    "unknown style {style_name:?}; choose one of: {}",
                    styles::names()
                ),
            )
        })?;
        let (prompt, negative) = style.apply(text, self.negative_prompt.as_deref());
        let (width, height) = match &self.resolution {
            Some(r) => {
                let (w, h) = parse_resolution(r)?;
                (Some(w), Some(h))
            }
            None => (None, None),
        };
        Ok(GenerateParams {
            prompt: Some(prompt),
            negative_prompt: negative,
            prompt_2: self.prompt_2.clone(),
            negative_prompt_2: self.negative_prompt_2.clone(),
            micro: self.micro,
            width,
            height,
            steps: self.steps,
            guidance: self.guidance,
            scheduler: self.scheduler.clone(),
            scheduler_options: self.scheduler_options.clone(),
            seed: self.seed,
            num_images: self.num_images,
            strength: self.strength,
        })
    }
}

/// Timings of a finished job, seconds.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize)]
pub struct JobTimings {
    pub queue: f64,
    pub text_encoder: f64,
    pub denoise: f64,
    pub vae_decode: f64,
}

/// Everything stored about one job.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct JobRecord {
    pub image_id: String,
    pub status: JobState,
    pub created_at: DateTime<Utc>,
    #[serde(default)]
    pub started_at: Option<DateTime<Utc>>,
    #[serde(default)]
    pub generated_at: Option<DateTime<Utc>>,
    /// The request with every default resolved (seed included), so a re-run
    /// after a restart makes the same images.
    pub request: JobRequest,
    /// Storage keys of the images, in order.
    #[serde(default)]
    pub images: Vec<String>,
    #[serde(default)]
    pub seeds: Vec<u64>,
    #[serde(default)]
    pub error: Option<String>,
    #[serde(default)]
    pub timings: Option<JobTimings>,
    /// Runs of this job started so far. A job whose record says `processing`
    /// at a start was running when its server stopped; after
    /// [`MAX_ATTEMPTS`] such runs it is failed instead of run again.
    #[serde(default)]
    pub attempts: u32,
    /// Last time the server running the job said it still runs it.
    #[serde(default)]
    pub heartbeat_at: Option<DateTime<Utc>>,
    /// An edit's input picture, stored as PNG: its storage key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub init_image: Option<String>,
    /// An inpainting job's mask, stored as PNG: its storage key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mask_image: Option<String>,
}

/// Runs a job may start before one that was running whenever its server
/// died is treated as the cause (a poison job) and failed, not retried.
pub const MAX_ATTEMPTS: u32 = 2;

impl JobRecord {
    /// Storage key of job `id`'s record.
    pub fn key(id: &str) -> String {
        format!("jobs/{id}.json")
    }

    /// Storage key of job `id`'s input `field` (`init_image`: `init.png`,
    /// `mask_image`: `mask.png`).
    pub fn input_key(id: &str, field: &str) -> String {
        let name = field.strip_suffix("_image").unwrap_or(field);
        format!("inputs/{id}/{name}.png")
    }

    /// Storage key of job `id`'s image `index`.
    pub fn image_key(id: &str, index: usize) -> String {
        format!("images/{id}/{index}.png")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolutions_parse_and_bad_ones_name_the_field() {
        assert_eq!(parse_resolution("512x768").unwrap(), (512, 768));
        assert_eq!(parse_resolution(" 64 X 32 ").unwrap(), (64, 32));
        assert_eq!(parse_resolution("8×16").unwrap(), (8, 16));
        for bad in ["512", "x512", "512x", "axb", "-8x8", ""] {
            match parse_resolution(bad) {
                Err(Error::InvalidRequest { field, .. }) => assert_eq!(field, "resolution"),
                other => panic!("{bad}: {other:?}"),
            }
        }
    }

    #[test]
    fn params_apply_the_style_and_require_text() {
        let req = JobRequest {
            text: Some("a cat".into()),
            style: Some("anime".into()),
            resolution: Some("64x32".into()),
            ..Default::default()
        };
        let p = req.to_params().unwrap();
        assert!(p.prompt.unwrap().contains("a cat"));
        assert_eq!((p.width, p.height), (Some(64), Some(32)));
        let err = |r: JobRequest| match r.to_params() {
            Err(Error::InvalidRequest { field, .. }) => field,
            other => panic!("{other:?}"),
        };
        assert_eq!(err(JobRequest::default()), "text");
        assert_eq!(
            err(JobRequest {
                text: Some("x".into()),
                style: Some("nope".into()),
                ..Default::default()
            }),
            "style"
        );
    }

    #[test]
    fn records_round_trip_through_json() {
        let r = JobRecord {
            image_id: "id".into(),
            status: JobState::Processing,
            created_at: Utc::now(),
            started_at: None,
            generated_at: None,
            request: JobRequest {
                text: Some("x".into()),
                seed: Some(7),
                ..Default::default()
            },
            images: vec![],
            seeds: vec![],
            error: None,
            timings: None,
            attempts: 1,
            heartbeat_at: None,
            init_image: None,
            mask_image: None,
        };
        let back: JobRecord = serde_json::from_str(&serde_json::to_string(&r).unwrap()).unwrap();
        assert_eq!(back.status, JobState::Processing);
        assert_eq!(back.request.seed, Some(7));
        assert!(
            serde_json::to_string(&r)
                .unwrap()
                .contains(r#""status":"processing""#)
        );
    }
}
