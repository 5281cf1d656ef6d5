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
use schemars::generate::SchemaSettings;
use serde::de::DeserializeOwned;
use serde_json::{Map, Value, json};

use super::sagemaker::Invocation;
use super::{ApiError, AppState};
use crate::diffusion::pipeline::ModelInfo;
use crate::diffusion::schedulers::{Allowed, OVERRIDABLE_KEYS, SchedulerKind, allowed};
use crate::engine::EngineState;
use crate::fields::NO_NUL;
use crate::jobs::JobRequest;
use crate::request::Limits;
use crate::styles::STYLES;

/// Sides are multiples of this when no model is loaded yet: every SD 1.x/2.x
/// VAE's scale factor.
const DEFAULT_MULTIPLE: usize = 8;

/// Parses a request body object into the type its schema is generated from; a
/// mistyped field is a 400 naming it.
pub(crate) fn from_object<T: DeserializeOwned>(obj: Map<String, Value>) -> Result<T, ApiError> {
    serde_path_to_error::deserialize(Value::Object(obj)).map_err(|e| {
        let path = e.path().to_string();
        ApiError::BadRequest {
            field: if path == "." { "body".into() } else { path },
            message: e.into_inner().to_string(),
        }
    })
}

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
}

impl Bounds {
    pub fn new(limits: Limits, model: Option<&ModelInfo>) -> Self {
        let multiple = model.map_or(DEFAULT_MULTIPLE, |m| m.vae_scale_factor.max(1));
        Self {
            limits,
            multiple,
            default_size: model.map(|m| limits.default_side(m.default_size, multiple)),
            train_steps: model.map(|m| m.scheduler_config.num_train_timesteps(&Map::new())),
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
        let steps = self.limits.default_steps().min(self.max_steps());
        (steps > 0).then_some((side, steps))
    }

    /// Whether the default step count passes validation (it is capped by the
    /// step limit, but not by the model's training steps): if not, a request
    /// must give its steps.
    fn default_steps_fit(&self) -> bool {
        self.limits.default_steps() <= self.max_steps()
    }
}

/// The schemas of the request types, as `components/schemas` entries.
fn generated_schemas() -> Map<String, Value> {
    let mut generator = SchemaSettings::draft2020_12()
        .with(|s| {
            s.definitions_path = "/components/schemas".into();
            s.meta_schema = None;
        })
        .into_generator();
    generator.subschema_for::<JobRequest>();
    generator.subschema_for::<Invocation>();
    let mut schemas = generator.take_definitions(true);
    for schema in schemas.values_mut() {
        tidy(schema);
    }
    schemas
}

/// Drops what the derive adds that says nothing to an API caller: Rust's
/// integer formats (`uint`, `uint64`: the bounds say it), `"default": null`
/// (an absent field is the default), the types' rustdoc.
fn tidy(schema: &mut Value) {
    if let Some(obj) = schema.as_object_mut() {
        obj.remove("description");
    }
    let Some(Value::Object(properties)) = schema.get_mut("properties") else {
        return;
    };
    for prop in properties.values_mut().filter_map(Value::as_object_mut) {
        if prop.get("default").is_some_and(Value::is_null) {
            prop.remove("default");
        }
        if prop
            .get("format")
            .and_then(Value::as_str)
            .is_some_and(|f| f.starts_with("uint") || f.starts_with("int"))
        {
            prop.remove("format");
        }
    }
}

/// Property `name` of the object schema `schema` (a missing one is a bug the
/// unit tests catch: the type and this module disagree).
fn property<'a>(schema: &'a mut Value, name: &str) -> &'a mut Map<String, Value> {
    schema
        .pointer_mut(&format!("/properties/{name}"))
        .and_then(Value::as_object_mut)
        .unwrap_or_else(|| panic!("the request type has no field {name:?}"))
}

/// Adds (or replaces) `keywords` in property `name`.
fn constrain(schema: &mut Value, name: &str, keywords: Value) {
    let prop = property(schema, name);
    if let Value::Object(keywords) = keywords {
        prop.extend(keywords);
    }
}

/// Appends a sentence to property `name`'s description.
fn describe(schema: &mut Value, name: &str, sentence: &str) {
    let prop = property(schema, name);
    let text = match prop.get("description").and_then(Value::as_str) {
        Some(d) => format!("{d} {sentence}"),
        None => sentence.to_string(),
    };
    prop.insert("description".into(), Value::String(text));
}

/// Makes property `name` required and not null.
fn require(schema: &mut Value, name: &str) {
    let prop = property(schema, name);
    if let Some(Value::Array(types)) = prop.get_mut("type") {
        types.retain(|t| t != "null");
        if let [only] = types.as_slice() {
            let only = only.clone();
            prop.insert("type".into(), only);
        }
    }
    if let Some(Value::Array(values)) = prop.get_mut("enum") {
        values.retain(|v| !v.is_null());
    }
    if let Some(Value::Array(required)) = schema.get_mut("required") {
        if !required.iter().any(|r| r == name) {
            required.push(Value::String(name.to_string()));
        }
    } else {
        schema["required"] = json!([name]);
    }
}

/// A closed enum of names, or null (the default).
fn names_or_null<'a>(names: impl Iterator<Item = &'a str>) -> Value {
    let mut values: Vec<Value> = names.map(|n| Value::String(n.to_string())).collect();
    values.push(Value::Null);
    Value::Array(values)
}

/// What each scheduler option may be set to, whatever scheduler runs: the
/// ranges `check_overrides` enforces, as JSON Schema (a unit test probes both).
fn scheduler_option(key: &str) -> Value {
    match allowed(key) {
        Allowed::Bool => json!({"type": "boolean"}),
        Allowed::OneOf(names) => json!({"type": "string", "enum": names}),
        Allowed::Open(lo, hi) => {
            json!({"type": "number", "exclusiveMinimum": lo, "exclusiveMaximum": hi})
        }
        Allowed::PositiveOrNull => json!({"type": ["number", "null"], "exclusiveMinimum": 0}),
        Allowed::Integer(lo, hi) => json!({"type": "integer", "minimum": lo, "maximum": hi}),
    }
}

/// The bounds every request type shares: steps, images, seed, scheduler.
fn constrain_common(
    schema: &mut Value,
    b: &Bounds,
    [steps, images, scheduler, options]: [&str; 4],
) {
    constrain(schema, steps, json!({"maximum": b.max_steps()}));
    if !b.default_steps_fit() {
        require(schema, steps);
        describe(
            schema,
            steps,
            &format!(
                "Required here: the default of {} is over this model's limit of {}.",
                b.limits.default_steps(),
                b.max_steps()
            ),
        );
    }
    constrain(schema, images, json!({"maximum": b.limits.max_images}));
    constrain(schema, "seed", json!({"minimum": 0, "maximum": u64::MAX}));
    constrain(
        schema,
        scheduler,
        json!({"enum": names_or_null(SchedulerKind::ALL.iter().map(|k| k.name()))}),
    );
    let properties: Map<String, Value> = OVERRIDABLE_KEYS
        .iter()
        .map(|k| (k.to_string(), scheduler_option(k)))
        .collect();
    constrain(
        schema,
        options,
        json!({"properties": properties, "additionalProperties": false}),
    );
    describe(
        schema,
        options,
        "Each option's type and range is checked at once; whether the chosen scheduler \
         takes the combination (with the model's scheduler config and the step count) is \
         checked by building it, as diffusers raises in `__init__`/`set_timesteps`: a 400 \
         names `scheduler_options` (or `scheduler`/`steps`).",
    );
}

/// A regex matching exactly the sides `b` accepts, `(8|16|...)`.
fn sides_regex(b: &Bounds) -> String {
    let sides: Vec<String> = b.sides().map(|s| s.to_string()).collect();
    format!("({})", sides.join("|"))
}

/// `GenerateRequest`: the `POST /generate` body. With `stored`, the request
/// as a job record keeps it (every default resolved), for `Status.request`:
/// the text is then bounded by the limit alone, a style's template being
/// checked with it when the job was accepted.
fn generate_request(mut schema: Value, b: &Bounds, stored: bool) -> Value {
    let max = b.limits.max_prompt_chars;
    for field in ["text", "negative_prompt"] {
        constrain(&mut schema, field, json!({"maxLength": max}));
    }
    if !stored {
        for field in ["text", "negative_prompt"] {
            describe(
                &mut schema,
                field,
                &format!("At most {max} characters (the style's template is not counted)."),
            );
        }
    }
    constrain(
        &mut schema,
        "style",
        json!({"enum": names_or_null(STYLES.iter().map(|s| s.name)), "default": crate::styles::DEFAULT_STYLE}),
    );
    constrain(
        &mut schema,
        "resolution",
        json!({"pattern": format!("^{0}[xX×]{0}$", sides_regex(b))}),
    );
    describe(
        &mut schema,
        "resolution",
        &format!(
            "Each side a multiple of {} from {} to {}, and width × height at most {} pixels \
             (a larger area, or more working memory than this server allows per request, \
             is a 400 naming `resolution`).",
            b.multiple,
            b.multiple,
            b.max_side(),
            b.limits.max_pixels
        ),
    );
    if !b.default_size_fits() && !stored {
        require(&mut schema, "resolution");
        describe(
            &mut schema,
            "resolution",
            "Required here: no size fits this server's limits.",
        );
    }
    constrain_common(
        &mut schema,
        b,
        ["steps", "num_images", "scheduler", "scheduler_options"],
    );
    schema
}

/// `Invocation`: the `POST /invocations` JSON body.
fn invocation(mut schema: Value, b: &Bounds) -> Value {
    let max = b.limits.max_prompt_chars;
    for field in ["prompt", "negative_prompt"] {
        constrain(&mut schema, field, json!({"maxLength": max}));
    }
    for side in ["width", "height"] {
        constrain(
            &mut schema,
            side,
            json!({"minimum": b.multiple, "maximum": b.max_side(), "multipleOf": b.multiple}),
        );
        describe(
            &mut schema,
            side,
            &format!(
                "A multiple of {} up to {}; width × height at most {} pixels (a larger area, \
                 or more working memory than this server allows per request, is a 400 naming `width`).",
                b.multiple,
                b.max_side(),
                b.limits.max_pixels
            ),
        );
        if !b.default_size_fits() {
            require(&mut schema, side);
            describe(
                &mut schema,
                side,
                "Required here: no size fits this server's limits.",
            );
        }
    }
    constrain_common(
        &mut schema,
        b,
        [
            "num_inference_steps",
            "num_images_per_prompt",
            "scheduler",
            "scheduler_options",
        ],
    );
    schema
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
            "required": ["image_id", "status", "image_url", "image_urls", "created_at", "started_at",
                "generated_at", "progress", "step", "total_steps", "queue_position", "estimated_time",
                "error", "request", "seeds", "timings"],
            "properties": {
                "image_id": {"type": "string", "format": "uuid"},
                "status": {"type": "string", "enum": ["queued", "processing", "completed", "failed", "cancelled"]},
                "image_url": {"type": ["string", "null"]},
                "image_urls": {"type": "array", "items": {"type": "string"}},
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
                        "negative_prompt": {"type": "string"},
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
            "required": ["model", "default_resolution", "resolutions", "resolution_multiple", "schedulers",
                "default_scheduler", "default_steps", "default_guidance", "max_steps", "max_images", "max_pixels",
                "queue_length", "queue_capacity"],
            "properties": {
                "model": {"type": "string"},
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::diffusion::schedulers::check_overrides;

    fn bounds() -> Bounds {
        Bounds {
            limits: Limits {
                max_pixels: 4096,
                max_side: 64,
                max_steps: 3,
                max_images: 2,
                ..Limits::default()
            },
            multiple: 8,
            // A 96-px model's default, as `Bounds::new` fits it to these limits.
            default_size: Some(64),
            train_steps: Some(1000),
        }
    }

    fn property_names(schema: &Value) -> Vec<String> {
        let mut names: Vec<String> = schema["properties"]
            .as_object()
            .unwrap()
            .keys()
            .cloned()
            .collect();
        names.sort();
        names
    }

    #[test]
    fn the_field_tables_are_the_types_fields() {
        let doc = spec(&bounds());
        let schemas = &doc["components"]["schemas"];
        let mut generate: Vec<String> = super::super::jobs::FIELDS
            .iter()
            .map(|f| f.to_string())
            .collect();
        generate.sort();
        assert_eq!(property_names(&schemas["GenerateRequest"]), generate);
        assert_eq!(property_names(&schemas["JobRequest"]), generate);
        let mut invocation: Vec<String> = super::super::sagemaker::FIELDS
            .iter()
            .map(|(f, _)| f.to_string())
            .chain(["eta".to_string()])
            .collect();
        invocation.sort();
        assert_eq!(property_names(&schemas["Invocation"]), invocation);
        for name in ["GenerateRequest", "Invocation"] {
            assert_eq!(schemas[name]["additionalProperties"], false, "{name}");
        }
    }

    #[test]
    fn bounds_come_from_the_limits() {
        let b = bounds();
        assert_eq!(b.max_side(), 64);
        let doc = spec(&b);
        let s = &doc["components"]["schemas"];
        let g = &s["GenerateRequest"]["properties"];
        assert_eq!(g["steps"]["maximum"], 3);
        assert_eq!(g["num_images"]["maximum"], 2);
        assert_eq!(
            g["resolution"]["pattern"],
            "^(8|16|24|32|40|48|56|64)[xX×](8|16|24|32|40|48|56|64)$"
        );
        // The defaults fit these limits (64x64, 3 steps): only the text is required.
        assert_eq!(s["GenerateRequest"]["required"], json!(["text"]));
        let i = &s["Invocation"]["properties"];
        assert_eq!(i["width"]["multipleOf"], 8);
        assert_eq!(i["height"]["maximum"], 64);
        assert_eq!(i["prompt"]["maxLength"], Limits::default().max_prompt_chars);
        let bodies = &doc["paths"]["/invocations"]["post"]["requestBody"]["content"];
        assert!(bodies.get("text/plain").is_some());
        // Limits below one multiple leave no default size: the size is
        // required, and a bare prompt is not offered.
        let tiny = Bounds {
            limits: Limits {
                max_pixels: 32,
                ..b.limits
            },
            default_size: Some(b.limits.default_side(96, 8)),
            ..b
        };
        let doc = spec(&tiny);
        let required = doc["components"]["schemas"]["GenerateRequest"]["required"].clone();
        assert_eq!(required, json!(["text", "resolution"]));
        let bodies = &doc["paths"]["/invocations"]["post"]["requestBody"]["content"];
        assert!(bodies.get("text/plain").is_none());

        // The default limits: the area bounds a side only through the other side.
        let wide = Bounds {
            limits: Limits {
                max_side: 2048,
                max_pixels: 4096,
                ..Limits::default()
            },
            ..b
        };
        assert_eq!(wide.max_side(), 512);
        let roomy = Bounds {
            limits: Limits::default(),
            default_size: Some(512),
            ..b
        };
        assert_eq!(roomy.max_side(), Limits::default().max_side);
        let doc = spec(&roomy);
        let required = doc["components"]["schemas"]["GenerateRequest"]["required"].clone();
        assert_eq!(required, json!(["text"]));
        assert!(
            doc["paths"]["/invocations"]["post"]["requestBody"]["content"]
                .get("text/plain")
                .is_some()
        );
        // The caller's text is bounded by the limit, a style's template aside.
        let s = &doc["components"]["schemas"];
        for schema in ["GenerateRequest", "JobRequest"] {
            assert_eq!(
                s[schema]["properties"]["text"]["maxLength"],
                Limits::default().max_prompt_chars,
                "{schema}"
            );
        }
    }

    /// Whether `v` is valid per the keywords `scheduler_option` uses.
    fn valid(schema: &Value, v: &Value) -> bool {
        let types: Vec<&str> = match &schema["type"] {
            Value::String(t) => vec![t.as_str()],
            Value::Array(ts) => ts.iter().filter_map(Value::as_str).collect(),
            _ => vec![],
        };
        let type_ok = types.iter().any(|t| match *t {
            "boolean" => v.is_boolean(),
            "string" => v.is_string(),
            "null" => v.is_null(),
            "integer" => v.is_i64() || v.is_u64(),
            "number" => v.is_number(),
            other => panic!("unexpected type {other}"),
        });
        let enum_ok = schema
            .get("enum")
            .and_then(Value::as_array)
            .is_none_or(|e| e.contains(v));
        let n = v.as_f64();
        let bound = |key: &str, ok: fn(f64, f64) -> bool| match (
            schema.get(key).and_then(Value::as_f64),
            n,
        ) {
            (Some(b), Some(n)) => ok(n, b),
            _ => true,
        };
        type_ok
            && enum_ok
            && bound("minimum", |n, b| n >= b)
            && bound("maximum", |n, b| n <= b)
            && bound("exclusiveMinimum", |n, b| n > b)
            && bound("exclusiveMaximum", |n, b| n < b)
    }

    #[test]
    fn scheduler_option_schemas_match_check_overrides() {
        // (Integral floats such as 3.0 are left out: JSON Schema counts them
        // as integers, check_overrides does not; the API's parser makes them
        // integers first, see `integer::options`.)
        let mut probes = vec![
            json!(true),
            json!(false),
            Value::Null,
            json!(0),
            json!(1),
            json!(3),
            json!(4),
            json!(-1),
            json!(999),
            json!(1000),
            json!(0.5),
            json!(1e-9),
            json!(-0.5),
            json!("nope"),
        ];
        for key in OVERRIDABLE_KEYS {
            if let Some(names) = scheduler_option(key)["enum"].as_array() {
                probes.extend(names.iter().cloned());
            }
        }
        for key in OVERRIDABLE_KEYS {
            let schema = scheduler_option(key);
            for v in &probes {
                let options = Map::from_iter([(key.to_string(), v.clone())]);
                assert_eq!(
                    valid(&schema, v),
                    check_overrides(&options).is_ok(),
                    "{key} = {v}: the schema {schema} and check_overrides disagree"
                );
            }
        }
    }

    #[test]
    fn integers_may_be_written_as_floats() {
        #[derive(serde::Deserialize)]
        struct T {
            #[serde(default, deserialize_with = "crate::fields::integer::option")]
            n: Option<usize>,
        }
        let parse = |v: Value| serde_json::from_value::<T>(v).map(|t| t.n);
        assert_eq!(parse(json!({"n": 8})).unwrap(), Some(8));
        assert_eq!(parse(json!({"n": 8.0})).unwrap(), Some(8));
        assert_eq!(parse(json!({"n": null})).unwrap(), None);
        assert_eq!(parse(json!({})).unwrap(), None);
        for bad in [json!(8.5), json!(-1), json!(-1.0), json!("8"), json!(1e30)] {
            assert!(parse(json!({ "n": bad })).is_err(), "{bad}");
        }
        #[derive(serde::Deserialize)]
        struct S {
            #[serde(default, deserialize_with = "crate::fields::integer::option")]
            seed: Option<u64>,
        }
        let max: S = serde_json::from_str(r#"{"seed": 18446744073709551615}"#).unwrap();
        assert_eq!(max.seed, Some(u64::MAX));
        assert!(serde_json::from_str::<S>(r#"{"seed": 18446744073709551616}"#).is_err());
    }

    #[test]
    fn a_mistyped_field_is_named() {
        let obj = json!({"text": "a", "steps": "many"});
        match from_object::<JobRequest>(obj.as_object().unwrap().clone()) {
            Err(ApiError::BadRequest { field, message }) => {
                assert_eq!(field, "steps");
                assert!(message.contains("integer"), "{message}");
            }
            other => panic!("{other:?}"),
        }
        let ok = json!({"text": "a", "steps": 2.0, "seed": 7,
            "scheduler_options": {"solver_order": 2.0, "beta_start": 0.5, "sigma_max": 3.0}});
        let r: JobRequest = from_object(ok.as_object().unwrap().clone()).unwrap();
        assert_eq!((r.steps, r.seed), (Some(2), Some(7)));
        let options = r.scheduler_options.unwrap();
        assert!(options["solver_order"].is_i64() && options["sigma_max"].is_i64());
        assert_eq!(options["beta_start"], 0.5);
        check_overrides(&options).unwrap();
    }
}
