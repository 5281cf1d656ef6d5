//! `GET /openapi.json`: an OpenAPI 3.1 description of every route. A test
//! checks that every route the router serves is described here and back, and
//! `tests/schema.rs` runs schemathesis over the document against a server.
//!
//! The request bodies' schemas are generated (JSON Schema 2020-12, OpenAPI
//! 3.1's dialect) from the types the handlers parse them into —
//! [`JobRequest`] for `POST /generate`, [`Invocation`] for `POST
//! /invocations` — so a field can't be documented differently from how it is
//! parsed. The bounds that are this server's settings (the limits, the model's
//! size multiple, the scheduler and style names) are filled in per request from
//! the app state, so every body the document allows is one validation accepts,
//! except for the combinations each description names (an area or memory limit
//! over two fields, a scheduler option the chosen scheduler can't take).

use std::sync::Arc;

use axum::Json;
use axum::extract::State;
use serde_json::{Map, Value, json};

use super::AppState;
use crate::diffusion::pipelines::{ModelInfo, SamplingDefaults};
use crate::engine::EngineState;
use crate::fields::NO_NUL;
use crate::request::Limits;

/// Sides are multiples of this when no model is loaded yet: every SD 1.x/2.x
/// VAE's scale factor.
const DEFAULT_MULTIPLE: usize = 8;

/// What a request is checked against, as the document states it.
#[derive(Debug, Clone, Copy)]
pub struct Bounds {
    pub limits: Limits,
    /// Widths and heights are multiples of this (the model's VAE scale factor).
    pub multiple: usize,
    /// The side a request that gives none gets (the model's default within
    /// the limits, [`Limits::default_side`]); `None` while loading.
    pub default_size: Option<usize>,
    /// The model scheduler's training steps (no schedule may have more).
    pub train_steps: Option<usize>,
    /// Whether the model takes SDXL's fields (`prompt_2`, the size
    /// conditioning); `None` while loading.
    pub xl: Option<bool>,
    /// Whether the model is an SDXL refiner (takes the aesthetic scores, not
    /// the second prompts); `None` while loading.
    pub refiner: Option<bool>,
    /// The steps and guidance a request that gives none gets (SD's while loading).
    pub defaults: SamplingDefaults,
}

impl Bounds {
    pub fn new(limits: Limits, model: Option<&ModelInfo>) -> Self {
        let multiple = model.map_or(DEFAULT_MULTIPLE, |m| m.vae_scale_factor.max(1));
        Self {
            limits,
            multiple,
            default_size: model.map(|m| limits.default_side(m.default_size, multiple)),
            train_steps: model.map(|m| m.scheduler_config.num_train_timesteps(&Map::new())),
            xl: model.map(|m| m.family.is_xl()),
            refiner: model.map(|m| m.refiner),
            defaults: model.map_or(SamplingDefaults::SD, |m| m.defaults),
        }
    }

    /// The largest side validation accepts: a multiple, within the per-side
    /// limit, and within the area limit when the other side is the smallest.
    pub fn max_side(&self) -> usize {
        let m = self.multiple;
        let by_area = self.limits.max_pixels / m;
        self.limits.max_side.min(by_area) / m * m
    }

    /// Every side validation can accept, smallest first.
    fn sides(&self) -> impl Iterator<Item = usize> {
        (1..=self.max_side() / self.multiple).map(move |k| k * self.multiple)
    }

    pub fn max_steps(&self) -> usize {
        self.train_steps
            .map_or(self.limits.max_steps, |t| self.limits.max_steps.min(t))
    }

    /// Whether the default size passes validation (it is made to fit, so only
    /// limits below one multiple fail): if not, a request must give its size.
    fn default_size_fits(&self) -> bool {
        self.default_size.is_some_and(|d| {
            d % self.multiple == 0
                && d <= self.limits.max_side
                && d.saturating_mul(d) <= self.limits.max_pixels
        })
    }

    /// A square size and a step count for the examples: the model's default
    /// size or the largest square within the limits, the default steps or the
    /// most allowed.
    fn example_size_and_steps(&self) -> Option<(usize, usize)> {
        let side = match self.default_size {
            Some(d) if self.default_size_fits() => d,
            _ => self
                .sides()
                .filter(|s| s.saturating_mul(*s) <= self.limits.max_pixels)
                .last()?,
        };
        let steps = self.default_steps().min(self.max_steps());
        (steps > 0).then_some((side, steps))
    }

    /// Whether the default step count passes validation (it is capped by the
    /// step limit, but not by the model's training steps): if not, a request
    /// must give its steps.
    fn default_steps_fit(&self) -> bool {
        self.default_steps() <= self.max_steps()
    }

    /// The steps a request that gives none gets ([`Limits::default_steps`]).
    pub fn default_steps(&self) -> usize {
        self.limits.default_steps(&self.defaults)
    }
}

fn error_response(description: &str) -> Value {
    json!({
        "description": description,
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}
    })
}

/// An error answered with `Retry-After` (`always`, or only for some causes).
fn retry_response(description: &str, always: bool) -> Value {
    let mut r = error_response(description);
    r["headers"] = json!({"Retry-After": {"required": always, "description": "seconds to wait",
        "schema": {"type": "string", "pattern": "^[0-9]+$"}}});
    r
}

fn id_param() -> Value {
    json!({"name": "image_id", "in": "path", "required": true, "schema": {"type": "string", "format": "uuid"}})
}

/// The document for a server with these bounds.
pub fn spec(b: &Bounds) -> Value {
    let mut generated = generated_schemas();
    let request = generated
        .remove("GenerateRequest")
        .expect("JobRequest's schema is GenerateRequest");
    let invocation_schema = generated.remove("Invocation").expect("Invocation's schema");
    let mut stored_request = generate_request(request.clone(), b, true);
    stored_request["description"] =
        "A job's request as its record keeps it: every default resolved, the seed included.".into();
    let mut request = generate_request(request, b, false);
    request["description"] = "A `POST /generate` body. Unknown fields are refused.".into();
    if let Some((side, steps)) = b.example_size_and_steps() {
        request["examples"] = json!([{"text": "a lighthouse at dusk", "style": "oil-painting",
            "resolution": format!("{side}x{side}"), "steps": steps, "seed": 42}]);
    }
    let mut invocation_schema = invocation(invocation_schema, b);
    // serde refuses unknown fields by name before parsing (see `http::jobs`
    // and `http::sagemaker`), not through `deny_unknown_fields`.
    for schema in [&mut request, &mut stored_request, &mut invocation_schema] {
        schema["additionalProperties"] = false.into();
    }
    invocation_schema["description"] =
        "A `POST /invocations` body: the fields SageMaker JumpStart's Stable Diffusion \
         endpoints take, plus `scheduler` and `scheduler_options`. Unknown fields are refused."
            .into();
    if let Some((side, steps)) = b.example_size_and_steps() {
        invocation_schema["examples"] = json!([{"prompt": "a lighthouse at dusk",
            "negative_prompt": "blurry", "width": side, "height": side,
            "num_inference_steps": steps, "guidance_scale": 7.5, "seed": 42}]);
    }
    // A bare prompt runs with every default: offered when the defaults fit.
    let mut invocation_bodies = json!({
        "application/json": {"schema": {"$ref": "#/components/schemas/Invocation"}}
    });
    if b.default_size_fits() && b.default_steps_fit() {
        invocation_bodies["text/plain"] = json!({"schema": {
            "type": "string", "maxLength": b.limits.max_prompt_chars, "pattern": NO_NUL,
            "description": "the prompt (trimmed); every other field takes its default"
        }});
    }
    let json_body = |schema: &str| json!({"application/json": {"schema": {"$ref": format!("#/components/schemas/{schema}")}}});
    let mut schemas = json!({
        "Error": {"type": "object", "required": ["error"], "additionalProperties": false, "properties": {
            "error": {"type": "string"},
            "field": {"type": "string", "description": "the request field at fault"}
        }},
        "GenerateRequest": request,
        "JobRequest": stored_request,
        "Accepted": {"type": "object", "additionalProperties": false,
            "required": ["image_id", "status", "queue_position", "estimated_time", "status_url", "events_url"],
            "properties": {
                "image_id": {"type": "string", "format": "uuid"},
                "status": {"type": "string", "enum": ["queued", "processing", "completed", "failed", "cancelled"],
                    "description": "the job's state by the time the answer is sent (a tiny job may already be done)"},
                "queue_position": {"type": ["integer", "null"], "minimum": 0},
                "estimated_time": {"type": "number", "minimum": 0, "description": "seconds until done, from measured step times"},
                "status_url": {"type": "string"},
                "events_url": {"type": "string"}
            }},
        "Status": {"type": "object", "additionalProperties": false,
            "required": ["image_id", "status", "image_url", "image_urls", "init_image_url", "mask_image_url", "created_at", "started_at",
                "generated_at", "progress", "step", "total_steps", "queue_position", "estimated_time",
                "error", "request", "seeds", "timings"],
            "properties": {
                "image_id": {"type": "string", "format": "uuid"},
                "status": {"type": "string", "enum": ["queued", "processing", "completed", "failed", "cancelled"]},
                "image_url": {"type": ["string", "null"]},
                "image_urls": {"type": "array", "items": {"type": "string"}},
                "init_image_url": {"type": ["string", "null"], "description": "an edit's input picture, as stored with the job"},
                "mask_image_url": {"type": ["string", "null"], "description": "an inpainting job's mask, as stored with the job"},
                "created_at": {"type": "string", "format": "date-time"},
                "started_at": {"type": ["string", "null"], "format": "date-time"},
                "generated_at": {"type": ["string", "null"], "format": "date-time"},
                "progress": {"type": "number", "minimum": 0, "maximum": 1},
                "step": {"type": "integer", "minimum": 0},
                "total_steps": {"type": "integer", "minimum": 0},
                "queue_position": {"type": ["integer", "null"], "minimum": 0},
                "estimated_time": {"type": "number", "minimum": 0, "description": "seconds until done (0 once final)"},
                "error": {"type": ["string", "null"]},
                "request": {"$ref": "#/components/schemas/JobRequest"},
                "seeds": {"type": "array", "items": {"type": "integer", "minimum": 0}},
                "timings": {"oneOf": [{"type": "null"}, {"$ref": "#/components/schemas/JobTimings"}]}
            }},
        "JobTimings": {"type": "object", "additionalProperties": false,
            "required": ["queue", "text_encoder", "denoise", "vae_decode"],
            "properties": {
                "queue": {"type": "number", "minimum": 0},
                "text_encoder": {"type": "number", "minimum": 0},
                "denoise": {"type": "number", "minimum": 0},
                "vae_decode": {"type": "number", "minimum": 0}
            }},
        "Invocation": invocation_schema,
        "InvocationResult": {"type": "object", "additionalProperties": false,
            "required": ["generated_images", "content_type", "seeds", "prompt", "parameters", "timings"],
            "properties": {
                "generated_images": {"type": "array", "minItems": 1, "items": {"type": "string", "contentEncoding": "base64"}},
                "content_type": {"type": "string", "enum": ["image/png", "image/jpeg", "image/webp"]},
                "seeds": {"type": "array", "items": {"type": "integer", "minimum": 0}},
                "prompt": {"type": "string"},
                "parameters": {"type": "object", "required": ["negative_prompt", "width", "height",
                        "num_inference_steps", "guidance_scale", "scheduler", "scheduler_options", "num_images_per_prompt"],
                    "properties": {
                        "negative_prompt": {"type": ["string", "null"], "description": "null when none was given"},
                        "width": {"type": "integer"},
                        "height": {"type": "integer"},
                        "num_inference_steps": {"type": "integer"},
                        "guidance_scale": {"type": "number"},
                        "scheduler": {"type": "string", "description": "the scheduler class that ran"},
                        "scheduler_options": {"type": "object"},
                        "num_images_per_prompt": {"type": "integer"}
                    }},
                "timings": {"type": "object", "properties": {
                    "queue_seconds": {"type": "number"},
                    "text_encoder_seconds": {"type": "number"},
                    "denoise_seconds": {"type": "number"},
                    "vae_decode_seconds": {"type": "number"}
                }}
            }},
        "Ping": {"type": "object", "required": ["status", "model"], "properties": {
            "status": {"const": "ready"},
            "model": {"type": "string"}
        }},
        "Info": {"type": "object",
            "required": ["model", "family", "pipeline_class", "inpainting", "refiner", "default_resolution", "resolutions", "resolution_multiple", "schedulers",
                "default_scheduler", "default_steps", "default_guidance", "max_steps", "max_images", "max_pixels",
                "queue_length", "queue_capacity"],
            "properties": {
                "model": {"type": "string"},
                "family": {"type": "string", "enum": ["sd", "sdxl"], "description": "sd: Stable Diffusion 1.x/2.x; sdxl: SDXL and its descendants (they take prompt_2 and the size conditioning)"},
                "pipeline_class": {"type": "string", "description": "model_index.json's _class_name"},
                "inpainting": {"type": "boolean", "description": "an inpainting model (9-channel UNet): every request needs init_image and mask_image"},
                "refiner": {"type": "boolean", "description": "an SDXL refiner: every request needs init_image; it takes aesthetic_score and negative_aesthetic_score, not prompt_2"},
                "default_resolution": {"type": "string"},
                "resolutions": {"type": "array", "items": {"type": "string"}},
                "resolution_multiple": {"type": "integer", "minimum": 1},
                "schedulers": {"type": "array", "items": {"type": "string"}},
                "default_scheduler": {"type": "string"},
                "default_scheduler_class": {"type": "string"},
                "default_steps": {"type": "integer"},
                "default_guidance": {"type": "number"},
                "max_steps": {"type": "integer"},
                "max_images": {"type": "integer"},
                "max_pixels": {"type": "integer"},
                "queue_length": {"type": "integer", "minimum": 0},
                "queue_capacity": {"type": "integer", "minimum": 0}
            }},
        "Styles": {"type": "object", "required": ["default", "styles"], "properties": {
            "default": {"type": "string"},
            "styles": {"type": "array", "items": {"type": "object",
                "required": ["name", "label", "prompt", "negative_prompt"],
                "properties": {
                    "name": {"type": "string"},
                    "label": {"type": "string"},
                    "prompt": {"type": "string", "description": "the template; `{prompt}` is the caller's text"},
                    "negative_prompt": {"type": "string"}
                }}}
        }}
    });
    // Anything else the types pulled in (none today).
    for (name, schema) in generated {
        schemas[name] = schema;
    }
    json!({
        "openapi": "3.1.0",
        "info": {
            "title": "sdserve",
            "version": env!("CARGO_PKG_VERSION"),
            "description": "Self-hosted Stable Diffusion: the SageMaker container contract and a public job API. \
                Request bounds are this server's limits and its model's."
        },
        "paths": {
            "/ping": {"get": {
                "summary": "SageMaker health check: 200 once the model is loaded",
                "responses": {
                    "200": {"description": "ready", "content": json_body("Ping")},
                    "503": error_response("loading, the model failed to load, or shutting down")
                }
            }},
            "/invocations": {"post": {
                "summary": "SageMaker inference: generate and return the image(s) synchronously",
                "parameters": [{"name": "X-Amzn-SageMaker-Custom-Attributes", "in": "header", "required": false,
                    "schema": {"type": "string"},
                    "description": "key=value;key=value overrides of body fields, checked as the body's are; other keys are ignored"}],
                "requestBody": {"required": true, "content": invocation_bodies},
                "responses": {
                    "200": {"description": "the image (Accept: image/png|jpeg|webp) or base64 images (Accept: application/json)",
                        "content": {
                            "image/png": {"schema": {"type": "string", "format": "binary"}},
                            "image/jpeg": {"schema": {"type": "string", "format": "binary"}},
                            "image/webp": {"schema": {"type": "string", "format": "binary"}},
                            "application/json": {"schema": {"$ref": "#/components/schemas/InvocationResult"}}
                        }},
                    "400": error_response("a field is invalid; `field` names it"),
                    "406": error_response("unsupported Accept"),
                    "409": error_response("the job was cancelled"),
                    "413": error_response("the response would exceed 6 MB"),
                    "415": error_response("unsupported Content-Type"),
                    "503": retry_response("loading, or the queue is full (then with Retry-After)", false)
                }
            }},
            "/generate": {"post": {
                "summary": "Queue a text-to-image job",
                "requestBody": {"required": true, "content": json_body("GenerateRequest")},
                "responses": {
                    "202": {"description": "accepted",
                        "headers": {"Location": {"required": true, "schema": {"type": "string"}, "description": "the status URL"}},
                        "content": json_body("Accepted")},
                    "400": error_response("a field is invalid; `field` names it"),
                    "415": error_response("unsupported Content-Type"),
                    "429": retry_response("the queue is full", true),
                    "503": retry_response("loading, shutting down, or storage is unavailable (then with Retry-After)", false)
                }
            }},
            "/image/{image_id}": {
                "get": {
                    "summary": "A job's status, progress and image URLs",
                    "parameters": [id_param()],
                    "responses": {
                        "200": {"description": "the job", "content": json_body("Status")},
                        "404": error_response("no such job"),
                        "503": error_response("storage is unavailable")
                    }
                },
                "delete": {
                    "summary": "Cancel a queued or running job",
                    "parameters": [id_param()],
                    "responses": {
                        "200": {"description": "cancelled", "content": json_body("Status")},
                        "202": {"description": "cancel requested; the running step finishes first", "content": json_body("Status")},
                        "404": error_response("no such job"),
                        "409": error_response("the job already finished"),
                        "503": error_response("storage is unavailable")
                    }
                }
            },
            "/image/{image_id}/events": {"get": {
                "summary": "Server-Sent Events: queued, progress, then completed | failed | cancelled",
                "parameters": [id_param()],
                "responses": {
                    "200": {"description": "an event stream", "content": {"text/event-stream": {"schema": {"type": "string"}}}},
                    "404": error_response("no such job")
                }
            }},
            "/images": {"get": {
                "summary": "Recent completed jobs, newest first",
                "parameters": [{"name": "limit", "in": "query", "required": false, "schema": {"type": "integer", "minimum": 1, "maximum": 100, "default": 12}}],
                "responses": {
                    "200": {"description": "recent jobs", "content": {"application/json": {"schema": {
                        "type": "object", "required": ["images"], "additionalProperties": false,
                        "properties": {"images": {"type": "array", "items": {"$ref": "#/components/schemas/Status"}}}}}}},
                    "400": error_response("bad limit"),
                    "503": error_response("storage is unavailable")
                }
            }},
            "/files/{image_id}/{file}": {"get": {
                "summary": "A stored image (`0.png`, `1.png`, ...)",
                "parameters": [id_param(), {"name": "file", "in": "path", "required": true, "schema": {"type": "string", "pattern": "^[0-9]+\\.png$"}}],
                "responses": {
                    "200": {"description": "the PNG", "content": {"image/png": {"schema": {"type": "string", "format": "binary"}}}},
                    "404": error_response("no such image"),
                    "503": error_response("storage is unavailable")
                }
            }},
            "/styles": {"get": {
                "summary": "Style presets",
                "responses": {"200": {"description": "the presets", "content": json_body("Styles")}}
            }},
            "/info": {"get": {
                "summary": "The model, resolutions, schedulers and limits",
                "responses": {
                    "200": {"description": "model info", "content": json_body("Info")},
                    "503": error_response("loading")
                }
            }},
            "/": {"get": {
                "summary": "The web page",
                "responses": {"200": {"description": "HTML", "content": {"text/html": {"schema": {"type": "string"}}}}}
            }},
            "/config.js": {"get": {
                "summary": "The page's API base (empty: same origin)",
                "responses": {"200": {"description": "JavaScript", "content": {"text/javascript": {"schema": {"type": "string"}}}}}
            }},
            "/metrics": {"get": {
                "summary": "Prometheus metrics (OpenMetrics text)",
                "responses": {"200": {"description": "metrics", "content": {"application/openmetrics-text": {"schema": {"type": "string"}}}}}
            }},
            "/openapi.json": {"get": {
                "summary": "This document",
                "responses": {"200": {"description": "OpenAPI 3.1", "content": {"application/json": {"schema": {"type": "object"}}}}}
            }}
        },
        "components": {"schemas": schemas}
    })
}

pub async fn document(State(state): State<Arc<AppState>>) -> Json<Value> {
    let model = match state.engine.state() {
        EngineState::Ready(info) => Some(info),
        _ => None,
    };
    Json(spec(&Bounds::new(state.limits, model.as_deref())))
}

mod schemas;
use schemas::{generate_request, generated_schemas, invocation};

#[cfg(test)]
mod tests;
