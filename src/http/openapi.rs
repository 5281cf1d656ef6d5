//! `GET /openapi.json`: an OpenAPI 3.1 description of every route. A test
//! checks that every route the router serves is described here and back.

use axum::Json;
use serde_json::{Value, json};

fn error_response(description: &str) -> Value {
    json!({
        "description": description,
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}
    })
}

fn id_param() -> Value {
    json!({"name": "image_id", "in": "path", "required": true, "schema": {"type": "string", "format": "uuid"}})
}

/// The document, built once per request (it is small).
pub fn spec() -> Value {
    json!({
        "openapi": "3.1.0",
        "info": {
            "title": "sdserve",
            "version": env!("CARGO_PKG_VERSION"),
            "description": "Self-hosted Stable Diffusion: the SageMaker container contract and a public job API."
        },
        "paths": {
            "/ping": {"get": {
                "summary": "SageMaker health check: 200 once the model is loaded",
                "responses": {
                    "200": {"description": "ready", "content": {"application/json": {"schema": {"type": "object"}}}},
                    "503": error_response("loading, or the model failed to load")
                }
            }},
            "/invocations": {"post": {
                "summary": "SageMaker inference: generate and return the image(s) synchronously",
                "parameters": [{"name": "X-Amzn-SageMaker-Custom-Attributes", "in": "header", "required": false,
                    "schema": {"type": "string"}, "description": "key=value;key=value overrides of body fields"}],
                "requestBody": {"required": true, "content": {
                    "application/json": {"schema": {"$ref": "#/components/schemas/Invocation"}},
                    "text/plain": {"schema": {"type": "string", "description": "the prompt"}}
                }},
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
                    "413": error_response("the response would exceed 6 MB"),
                    "415": error_response("unsupported Content-Type"),
                    "503": error_response("loading, or the queue is full (Retry-After)")
                }
            }},
            "/generate": {"post": {
                "summary": "Queue a text-to-image job",
                "requestBody": {"required": true, "content": {"application/json": {"schema": {"$ref": "#/components/schemas/GenerateRequest"}}}},
                "responses": {
                    "202": {"description": "accepted", "headers": {"Location": {"schema": {"type": "string"}}},
                        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Accepted"}}}},
                    "400": error_response("a field is invalid; `field` names it"),
                    "415": error_response("unsupported Content-Type"),
                    "429": error_response("the queue is full; retry after Retry-After seconds"),
                    "503": error_response("loading or shutting down")
                }
            }},
            "/image/{image_id}": {
                "get": {
                    "summary": "A job's status, progress and image URLs",
                    "parameters": [id_param()],
                    "responses": {
                        "200": {"description": "the job", "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Status"}}}},
                        "404": error_response("no such job")
                    }
                },
                "delete": {
                    "summary": "Cancel a queued or running job",
                    "parameters": [id_param()],
                    "responses": {
                        "200": {"description": "cancelled", "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Status"}}}},
                        "202": {"description": "cancel requested; the running step finishes first", "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Status"}}}},
                        "404": error_response("no such job"),
                        "409": error_response("the job already finished")
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
                        "type": "object", "required": ["images"],
                        "properties": {"images": {"type": "array", "items": {"$ref": "#/components/schemas/Status"}}}}}}},
                    "400": error_response("bad limit")
                }
            }},
            "/files/{image_id}/{file}": {"get": {
                "summary": "A stored image (`0.png`, `1.png`, ...)",
                "parameters": [id_param(), {"name": "file", "in": "path", "required": true, "schema": {"type": "string", "pattern": "^[0-9]+\\.png$"}}],
                "responses": {
                    "200": {"description": "the PNG", "content": {"image/png": {"schema": {"type": "string", "format": "binary"}}}},
                    "404": error_response("no such image")
                }
            }},
            "/styles": {"get": {
                "summary": "Style presets",
                "responses": {"200": {"description": "the presets", "content": {"application/json": {"schema": {"type": "object"}}}}}
            }},
            "/info": {"get": {
                "summary": "The model, resolutions, schedulers and limits",
                "responses": {
                    "200": {"description": "model info", "content": {"application/json": {"schema": {"type": "object"}}}},
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
        "components": {"schemas": {
            "Error": {"type": "object", "required": ["error"], "properties": {
                "error": {"type": "string"},
                "field": {"type": "string", "description": "the request field at fault"}
            }},
            "GenerateRequest": {"type": "object", "required": ["text"], "additionalProperties": false, "properties": {
                "text": {"type": "string", "description": "the prompt (also accepted as `prompt`)"},
                "style": {"type": "string", "description": "a preset from GET /styles", "default": "none"},
                "resolution": {"type": "string", "pattern": "^[0-9]+[xX×][0-9]+$", "examples": ["512x512"]},
                "negative_prompt": {"type": "string"},
                "steps": {"type": "integer", "minimum": 1},
                "guidance": {"type": "number", "minimum": 0, "maximum": 100},
                "seed": {"type": "integer", "minimum": 0},
                "scheduler": {"type": "string", "enum": ["default", "ddim", "euler", "euler_a", "dpmpp_2m", "dpmpp_2m_karras", "pndm"]},
                "num_images": {"type": "integer", "minimum": 1},
                "scheduler_options": {"type": "object"}
            }},
            "Accepted": {"type": "object", "required": ["image_id", "status"], "properties": {
                "image_id": {"type": "string", "format": "uuid"},
                "status": {"type": "string", "enum": ["queued", "processing"]},
                "queue_position": {"type": ["integer", "null"]},
                "estimated_time": {"type": ["number", "null"], "description": "seconds until done, from measured step times"},
                "status_url": {"type": "string"},
                "events_url": {"type": "string"}
            }},
            "Status": {"type": "object", "required": ["image_id", "status", "progress"], "properties": {
                "image_id": {"type": "string", "format": "uuid"},
                "status": {"type": "string", "enum": ["queued", "processing", "completed", "failed", "cancelled"]},
                "image_url": {"type": ["string", "null"]},
                "image_urls": {"type": "array", "items": {"type": "string"}},
                "created_at": {"type": "string", "format": "date-time"},
                "started_at": {"type": ["string", "null"], "format": "date-time"},
                "generated_at": {"type": ["string", "null"], "format": "date-time"},
                "progress": {"type": "number", "minimum": 0, "maximum": 1},
                "step": {"type": "integer"},
                "total_steps": {"type": "integer"},
                "queue_position": {"type": ["integer", "null"]},
                "estimated_time": {"type": ["number", "null"]},
                "error": {"type": ["string", "null"]},
                "request": {"$ref": "#/components/schemas/GenerateRequest"},
                "seeds": {"type": "array", "items": {"type": "integer"}},
                "timings": {"type": ["object", "null"]}
            }},
            "Invocation": {"type": "object", "required": ["prompt"], "properties": {
                "prompt": {"type": "string"},
                "negative_prompt": {"type": "string"},
                "width": {"type": "integer"},
                "height": {"type": "integer"},
                "num_inference_steps": {"type": "integer"},
                "guidance_scale": {"type": "number"},
                "seed": {"type": "integer"},
                "num_images_per_prompt": {"type": "integer"},
                "scheduler": {"type": "string"},
                "scheduler_options": {"type": "object"},
                "eta": {"type": "number", "enum": [0]}
            }},
            "InvocationResult": {"type": "object", "properties": {
                "generated_images": {"type": "array", "items": {"type": "string", "contentEncoding": "base64"}},
                "content_type": {"type": "string"},
                "seeds": {"type": "array", "items": {"type": "integer"}},
                "prompt": {"type": "string"},
                "parameters": {"type": "object"},
                "timings": {"type": "object"}
            }}
        }}
    })
}

pub async fn document() -> Json<Value> {
    Json(spec())
}
