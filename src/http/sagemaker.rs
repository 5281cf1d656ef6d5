//! The SageMaker bring-your-own-container contract: `GET /ping` and
//! `POST /invocations` (real-time, and asynchronous inference unchanged: there
//! SageMaker posts the S3 payload to the same route and stores the response).
//!
//! Request bodies take the fields SageMaker JumpStart's Stable Diffusion
//! endpoints accept (`prompt`, `negative_prompt`, `width`, `height`,
//! `num_inference_steps`, `guidance_scale`, `seed`, `num_images_per_prompt`),
//! plus `scheduler` and `scheduler_options`, or a bare `text/plain` prompt.
//! `X-Amzn-SageMaker-Custom-Attributes: key=value;key=value` sets the same
//! fields per request (unknown keys are ignored, as SageMaker treats the header
//! as opaque).

use std::io::Cursor;
use std::sync::Arc;

use axum::Json;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use serde_json::{Map, Value, json};

use super::{ApiError, AppState, Bodies, body_object, ready_model};
use crate::engine::JobStatus;
use crate::output::{ImageMetadata, encode_png, to_rgb8};
use crate::request::{GenerateParams, Inputs, SourceImage};

/// SageMaker real-time inference refuses responses over 6 MB.
pub const MAX_RESPONSE_BYTES: usize = 6_000_000;

const CUSTOM_ATTRIBUTES: &str = "x-amzn-sagemaker-custom-attributes";

/// JSON fields accepted on /invocations (the fields of [`Invocation`] but
/// `eta`), with the request field each fills.
pub(crate) const FIELDS: &[(&str, &str)] = &[
    ("prompt", "prompt"),
    ("negative_prompt", "negative_prompt"),
    ("prompt_2", "prompt_2"),
    ("negative_prompt_2", "negative_prompt_2"),
    ("original_size", "original_size"),
    ("crops_coords_top_left", "crops_coords_top_left"),
    ("target_size", "target_size"),
    ("negative_original_size", "negative_original_size"),
    (
        "negative_crops_coords_top_left",
        "negative_crops_coords_top_left",
    ),
    ("negative_target_size", "negative_target_size"),
    ("aesthetic_score", "aesthetic_score"),
    ("negative_aesthetic_score", "negative_aesthetic_score"),
    ("width", "width"),
    ("height", "height"),
    ("num_inference_steps", "steps"),
    ("guidance_scale", "guidance"),
    ("seed", "seed"),
    ("num_images_per_prompt", "num_images"),
    ("scheduler", "scheduler"),
    ("scheduler_options", "scheduler_options"),
    ("image", "init_image"),
    ("mask_image", "mask_image"),
    ("strength", "strength"),
];

/// Names a request field as this route's callers spell it.
fn caller_name(field: &str) -> String {
    FIELDS
        .iter()
        .find(|(_, f)| *f == field)
        .map(|(c, _)| c.to_string())
        .unwrap_or_else(|| field.to_string())
}

/// 200 while the model is loaded and the server takes work; 503 while it
/// loads, when it failed to load, and once it is draining for shutdown (so a
/// load balancer stops routing to it).
pub async fn ping(State(state): State<Arc<AppState>>) -> Response {
    if state.jobs.is_shutting_down() {
        return ApiError::NotReady("the server is shutting down".into()).into_response();
    }
    match ready_model(&state.engine) {
        Ok(info) => Json(json!({"status": "ready", "model": info.name})).into_response(),
        Err(e) => e.into_response(),
    }
}

/// Output formats a caller can ask for with `Accept`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Format {
    Png,
    Jpeg,
    Webp,
}

impl Format {
    fn content_type(self) -> &'static str {
        match self {
            Format::Png => "image/png",
            Format::Jpeg => "image/jpeg",
            Format::Webp => "image/webp",
        }
    }
}

/// What the response body is: raw image bytes, or JSON with base64 images.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Reply {
    Image(Format),
    Json(Format),
}

/// Picks the first acceptable media range of the Accept header, in order.
fn negotiate(headers: &HeaderMap) -> Result<Reply, ApiError> {
    let accept = headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    if accept.trim().is_empty() {
        return Ok(Reply::Json(Format::Png));
    }
    for range in accept.split(',') {
        let mut parts = range.split(';').map(str::trim);
        let media = parts.next().unwrap_or("").to_ascii_lowercase();
        // JumpStart's `application/json;jpeg` asks for JSON with JPEG images.
        let param = parts.next().unwrap_or("").to_ascii_lowercase();
        let json_format = match param.as_str() {
            "jpeg" | "jpg" => Format::Jpeg,
            "webp" => Format::Webp,
            _ => Format::Png,
        };
        match media.as_str() {
            "image/png" => return Ok(Reply::Image(Format::Png)),
            "image/jpeg" | "image/jpg" => return Ok(Reply::Image(Format::Jpeg)),
            "image/webp" => return Ok(Reply::Image(Format::Webp)),
            "application/json" | "*/*" | "application/*" => return Ok(Reply::Json(json_format)),
            "image/*" => return Ok(Reply::Image(Format::Png)),
            _ => {}
        }
    }
    Err(ApiError::NotAcceptable(format!(
        "cannot produce {accept:?}; accepted: application/json, image/png, image/jpeg, image/webp"
    )))
}

/// Parses `key=value;key=value` custom attributes into JSON values.
fn custom_attributes(headers: &HeaderMap) -> Map<String, Value> {
    let mut out = Map::new();
    let Some(raw) = headers.get(CUSTOM_ATTRIBUTES).and_then(|v| v.to_str().ok()) else {
        return out;
    };
    for pair in raw.split(';') {
        if let Some((k, v)) = pair.split_once('=') {
            let (k, v) = (k.trim(), v.trim());
            // An image does not fit a header.
            if k != "image" && k != "mask_image" && FIELDS.iter().any(|(name, _)| *name == k) {
                let value =
                    serde_json::from_str(v).unwrap_or_else(|_| Value::String(v.to_string()));
                out.insert(k.to_string(), value);
            }
        }
    }
    out
}

/// A `POST /invocations` JSON body: the fields SageMaker JumpStart's Stable
/// Diffusion endpoints take, plus `scheduler` and `scheduler_options`. It is
/// what [`params`] parses and, as `Invocation`, what `/openapi.json` documents
/// (the bounds that are the server's settings are filled in by
/// [`super::openapi`]).
// Unknown fields are refused by name in `params` before this parses (serde's
// `deny_unknown_fields` can't be combined with the flattened fields).
#[derive(Debug, Default, serde::Deserialize, schemars::JsonSchema)]
#[schemars(extend("dependentSchemas" = {
    "strength": {"required": ["image"], "properties": {"image": {"type": "string"}}},
    "mask_image": {"required": ["image"], "properties": {"image": {"type": "string"}}}
}))]
pub struct Invocation {
    /// The prompt; no NUL.
    #[schemars(required, with = "String", pattern(crate::fields::NO_NUL))]
    pub prompt: Option<String>,
    /// What the image should not show; no NUL.
    #[schemars(pattern(crate::fields::NO_NUL))]
    pub negative_prompt: Option<String>,
    /// SDXL only: the prompt of the second text encoder (default: `prompt`); no NUL.
    #[schemars(pattern(crate::fields::NO_NUL))]
    pub prompt_2: Option<String>,
    /// SDXL only: the second encoder's negative prompt (default: `negative_prompt`); no NUL.
    #[schemars(pattern(crate::fields::NO_NUL))]
    pub negative_prompt_2: Option<String>,
    /// SDXL only: size and crop conditioning, as diffusers' arguments.
    #[serde(default, flatten)]
    pub micro: crate::request::MicroConditioning,
    /// Pixels.
    #[serde(default, deserialize_with = "crate::fields::integer::option")]
    pub width: Option<usize>,
    /// Pixels.
    #[serde(default, deserialize_with = "crate::fields::integer::option")]
    pub height: Option<usize>,
    /// Denoising steps.
    #[schemars(range(min = 1))]
    #[serde(default, deserialize_with = "crate::fields::integer::option")]
    pub num_inference_steps: Option<usize>,
    /// Classifier-free guidance scale; at most 1 skips the unconditional pass.
    #[schemars(range(min = 0, max = 100))]
    pub guidance_scale: Option<f64>,
    /// Seed of the first image; image `i` uses `seed + i` (wrapping). Default: random.
    #[serde(default, deserialize_with = "crate::fields::integer::option")]
    pub seed: Option<u64>,
    /// Images to generate (1 when `Accept` asks for an image type).
    #[schemars(range(min = 1))]
    #[serde(default, deserialize_with = "crate::fields::integer::option")]
    pub num_images_per_prompt: Option<usize>,
    /// A scheduler name (`default`: the model's own).
    pub scheduler: Option<String>,
    /// Scheduler config overrides, as diffusers' `from_config(config, **options)`.
    #[serde(default, deserialize_with = "crate::fields::integer::options")]
    pub scheduler_options: Option<Map<String, Value>>,
    /// Image to image: the picture to start from, base64 (PNG, JPEG or WebP;
    /// a `data:` URL too). The output is its size rounded down to a multiple
    /// of 8 unless `width` / `height` say.
    #[schemars(extend("contentEncoding" = "base64"))]
    pub image: Option<String>,
    /// Inpainting (JumpStart's field): where to repaint `image`, base64 like
    /// it, white (repainted) on black (kept); resized to the output size.
    #[schemars(extend("contentEncoding" = "base64"))]
    pub mask_image: Option<String>,
    /// Image to image and inpainting: how much of `image` to change, in (0, 1]
    /// (default 0.8, SDXL 0.3; with a mask 1.0, SDXL 0.9999); needs `image`, and at
    /// least one step to run (`strength` × `num_inference_steps` ≥ 1).
    #[schemars(extend("exclusiveMinimum" = 0, "maximum" = 1))]
    pub strength: Option<f64>,
    /// DDIM's `eta`, which JumpStart clients send: only the deterministic 0 is implemented.
    #[schemars(extend("enum" = [0, null]))]
    pub eta: Option<f64>,
}

/// Builds the typed parameters from the body object (custom attributes
/// merged in), refusing unknown and mistyped fields by name.
fn params(obj: &Map<String, Value>) -> Result<GenerateParams, ApiError> {
    if let Some(unknown) = obj
        .keys()
        .find(|k| !FIELDS.iter().any(|(name, _)| name == k) && k.as_str() != "eta")
    {
        let known: Vec<&str> = FIELDS.iter().map(|(n, _)| *n).collect();
        return Err(ApiError::BadRequest {
            field: unknown.clone(),
            message: format!("unknown field; accepted: {}", known.join(", ")),
        });
    }
    if obj.get("prompt").is_none_or(Value::is_null) {
        return Err(ApiError::BadRequest {
            field: "prompt".into(),
            message: "required".into(),
        });
    }
    let body: Invocation = super::from_object(obj.clone())?;
    // JumpStart clients send DDIM's `eta`; only the deterministic 0 is implemented.
    if body.eta.is_some_and(|eta| eta != 0.0) {
        return Err(ApiError::BadRequest {
            field: "eta".into(),
            message: "only 0 is supported".into(),
        });
    }
    Ok(GenerateParams {
        prompt: body.prompt,
        negative_prompt: body.negative_prompt,
        prompt_2: body.prompt_2,
        negative_prompt_2: body.negative_prompt_2,
        micro: body.micro,
        width: body.width,
        height: body.height,
        steps: body.num_inference_steps,
        guidance: body.guidance_scale,
        scheduler: body.scheduler,
        scheduler_options: body.scheduler_options,
        seed: body.seed,
        num_images: body.num_images_per_prompt,
        strength: body.strength,
    })
}

fn encode(
    img: &image::RgbImage,
    format: Format,
    meta: &ImageMetadata,
) -> Result<Vec<u8>, ApiError> {
    let internal =
        |e: &dyn std::fmt::Display| ApiError::Internal(format!("image encoding failed: {e}"));
    match format {
        Format::Png => encode_png(img, Some(meta)).map_err(|e| internal(&e)),
        Format::Jpeg => {
            let mut out = Cursor::new(Vec::new());
            image::codecs::jpeg::JpegEncoder::new_with_quality(&mut out, 92)
                .encode_image(img)
                .map_err(|e| internal(&e))?;
            Ok(out.into_inner())
        }
        Format::Webp => {
            let mut out = Cursor::new(Vec::new());
            image::codecs::webp::WebPEncoder::new_lossless(&mut out)
                .encode(
                    img.as_raw(),
                    img.width(),
                    img.height(),
                    image::ExtendedColorType::Rgb8,
                )
                .map_err(|e| internal(&e))?;
            Ok(out.into_inner())
        }
    }
}

pub async fn invocations(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    match invoke(&state, &headers, &body).await {
        Ok(resp) => resp,
        Err(e) => e.into_response(),
    }
}

async fn invoke(state: &AppState, headers: &HeaderMap, body: &Bytes) -> Result<Response, ApiError> {
    let info = ready_model(&state.engine)?;
    let reply = negotiate(headers)?;
    let mut obj = body_object(headers, body, Bodies::JsonOrText)?;
    obj.extend(custom_attributes(headers));
    // `params` has refused an `image` or `mask_image` that is not a string.
    let params = params(&obj)?;
    let decode = |key: &str, field: &str| {
        obj.get(key)
            .and_then(Value::as_str)
            .map(|text| {
                let img = SourceImage::from_base64(text, field, state.limits.max_pixels)
                    .map_err(|e| ApiError::from_error(e, caller_name))?;
                Ok::<_, ApiError>((img, field.to_string()))
            })
            .transpose()
    };
    let inputs = Inputs {
        latents: None,
        init_image: decode("image", "init_image")?,
        mask_image: decode("mask_image", "mask_image")?,
    };
    let request = params
        .validate_with(&info, &state.limits, inputs)
        .map_err(|e| ApiError::from_error(e, caller_name))?;
    if matches!(reply, Reply::Image(_)) && request.num_images > 1 {
        return Err(ApiError::BadRequest {
            field: "num_images_per_prompt".into(),
            message:
                "an image Accept type returns one image; ask for application/json to get several"
                    .into(),
        });
    }
    let mut ticket = state
        .engine
        .submit(request.clone())
        .map_err(|e| ApiError::Busy {
            retry_after: state.engine.retry_after_seconds(),
            message: format!("{e}; retry later"),
        })?;
    // A caller that hangs up drops this future, and with it the guard: the job is
    // skipped if still queued, or stopped after its current step.
    let guard = ticket.cancel_on_drop();
    let status = ticket.wait().await;
    guard.disarm();
    let out = match status {
        JobStatus::Done(out) => out,
        JobStatus::Cancelled => return Err(ApiError::Cancelled),
        JobStatus::Failed(e) => return Err(ApiError::Internal(crate::error::without_paths(&e))),
        JobStatus::Interrupted => {
            return Err(ApiError::NotReady(
                "the server shut down before the job finished; retry".into(),
            ));
        }
        JobStatus::Queued { .. } | JobStatus::Running { .. } => {
            unreachable!("wait returns a final status")
        }
    };

    let images = to_rgb8(&out.images).map_err(|e| ApiError::Internal(e.to_string()))?;

    let too_large = |n: usize| {
        ApiError::TooLarge(format!(
            "the response would be {n} bytes, over SageMaker's {MAX_RESPONSE_BYTES}-byte real-time limit; \
             ask for fewer or smaller images, JPEG, or use asynchronous inference"
        ))
    };
    match reply {
        Reply::Image(format) => {
            let bytes = encode(&images[0], format, &out.metadata[0])?;
            if bytes.len() > MAX_RESPONSE_BYTES {
                return Err(too_large(bytes.len()));
            }
            Ok((
                StatusCode::OK,
                [(header::CONTENT_TYPE, format.content_type())],
                bytes,
            )
                .into_response())
        }
        Reply::Json(format) => {
            let mut encoded = Vec::with_capacity(images.len());
            for (img, meta) in images.iter().zip(&out.metadata) {
                let bytes = encode(img, format, meta)?;
                encoded.push(base64::engine::general_purpose::STANDARD.encode(bytes));
            }
            let body = json!({
                "generated_images": encoded,
                "content_type": format.content_type(),
                "seeds": out.seeds,
                "prompt": request.prompt,
                "parameters": {
                    "negative_prompt": request.negative_prompt,
                    "width": request.width,
                    "height": request.height,
                    "num_inference_steps": request.steps,
                    "guidance_scale": request.guidance,
                    "scheduler": out.scheduler,
                    "scheduler_options": request.scheduler_options,
                    "num_images_per_prompt": request.num_images,
                },
                "timings": {
                    "queue_seconds": out.queue_seconds,
                    "text_encoder_seconds": out.timings.text_encoder,
                    "denoise_seconds": out.timings.denoise,
                    "vae_decode_seconds": out.timings.vae_decode,
                },
            });
            let bytes = serde_json::to_vec(&body).expect("JSON serialises");
            if bytes.len() > MAX_RESPONSE_BYTES {
                return Err(too_large(bytes.len()));
            }
            Ok((
                StatusCode::OK,
                [(header::CONTENT_TYPE, "application/json")],
                bytes,
            )
                .into_response())
        }
    }
}
