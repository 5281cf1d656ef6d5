//! The HTTP server: one axum router over one [`Engine`].
//!
//! Handlers live one module per front door ([`sagemaker`] for the SageMaker
//! container contract, [`jobs`] for the public job API, [`ui`] for the page,
//! [`metrics`], [`openapi`]); they validate into the one
//! [`crate::request::GenerateRequest`], submit it to the engine and map
//! outcomes to HTTP through [`ApiError`]'s single status table.

pub mod jobs;
pub mod metrics;
pub mod openapi;
pub mod sagemaker;
pub mod ui;

use std::sync::Arc;

use axum::Json;
use axum::body::Bytes;
use axum::http::HeaderMap;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde::de::DeserializeOwned;
use serde_json::{Map, Value, json};

use crate::engine::{Engine, EngineState};
use crate::error::Error;
use crate::request::Limits;

/// Shared state of every handler.
#[derive(Clone)]
pub struct AppState {
    pub engine: Engine,
    pub jobs: crate::jobs::Jobs,
    pub limits: Limits,
    /// Origins allowed to call the API from a page hosted elsewhere (`*`: any).
    pub cors_origins: Vec<String>,
}

/// Builds the router.
pub fn router(state: AppState) -> axum::Router {
    let cors = cors_layer(&state.cors_origins);
    let state = Arc::new(state);
    let app = axum::Router::new()
        .route("/ping", get(sagemaker::ping))
        .route("/invocations", axum::routing::post(sagemaker::invocations))
        .route("/generate", axum::routing::post(jobs::generate))
        .route("/image/{image_id}", get(jobs::status).delete(jobs::cancel))
        .route("/image/{image_id}/events", get(jobs::events))
        .route("/images", get(jobs::recent))
        .route("/files/{image_id}/{file}", get(jobs::file))
        .route("/styles", get(jobs::styles))
        .route("/info", get(jobs::info))
        .route("/", get(ui::index))
        .route("/config.js", get(ui::config_js))
        .route("/metrics", get(metrics::render))
        .route("/openapi.json", get(openapi::document))
        .route_layer(axum::middleware::from_fn_with_state(
            state.clone(),
            metrics::track,
        ))
        .fallback(not_found)
        .layer(axum::extract::DefaultBodyLimit::max(MAX_BODY_BYTES))
        .with_state(state);
    match cors {
        Some(c) => app.layer(c),
        None => app,
    }
}

async fn not_found(uri: axum::http::Uri) -> ApiError {
    ApiError::NotFound(format!("no route for {}", uri.path()))
}

/// CORS for the configured origins; none configured, no CORS headers.
fn cors_layer(origins: &[String]) -> Option<tower_http::cors::CorsLayer> {
    use tower_http::cors::{AllowOrigin, Any, CorsLayer};
    if origins.is_empty() {
        return None;
    }
    let allow = if origins.iter().any(|o| o == "*") {
        AllowOrigin::from(Any)
    } else {
        AllowOrigin::list(origins.iter().filter_map(|o| HeaderValue::from_str(o).ok()))
    };
    Some(
        CorsLayer::new()
            .allow_origin(allow)
            .allow_methods([
                axum::http::Method::GET,
                axum::http::Method::POST,
                axum::http::Method::DELETE,
            ])
            .allow_headers([header::CONTENT_TYPE, header::ACCEPT])
            .expose_headers([header::RETRY_AFTER, header::LOCATION])
            .max_age(std::time::Duration::from_secs(3600)),
    )
}

/// Largest request body accepted (SageMaker's own real-time payload limit is 6 MB).
pub const MAX_BODY_BYTES: usize = 6 * 1024 * 1024;

/// Every way a request can fail, with one status table ([`ApiError::status`]).
#[derive(Debug)]
pub enum ApiError {
    /// A field is missing or out of range; `field` is named as the caller sent it.
    BadRequest { field: String, message: String },
    /// The body is not what the Content-Type says, or the Content-Type is not accepted.
    UnsupportedMedia(String),
    /// The Accept header asks for a format we cannot produce.
    NotAcceptable(String),
    /// The response would exceed a size limit.
    TooLarge(String),
    /// The queue is full; retry after the given seconds (SageMaker routes: 503).
    Busy { retry_after: u64, message: String },
    /// The queue is full; retry after the given seconds (public routes: 429).
    TooManyRequests { retry_after: u64, message: String },
    /// No such job, image or route.
    NotFound(String),
    /// The request conflicts with the job's state (e.g. cancelling a finished job).
    Conflict(String),
    /// The model is loading or failed to load.
    NotReady(String),
    /// The job was cancelled before it finished.
    Cancelled,
    /// Generation failed.
    Internal(String),
}

impl ApiError {
    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::BadRequest { .. } => StatusCode::BAD_REQUEST,
            ApiError::UnsupportedMedia(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ApiError::NotAcceptable(_) => StatusCode::NOT_ACCEPTABLE,
            ApiError::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            // SageMaker retries 503s; it is also what its docs ask a busy container to return.
            ApiError::Busy { .. } | ApiError::NotReady(_) => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::TooManyRequests { .. } => StatusCode::TOO_MANY_REQUESTS,
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::Cancelled | ApiError::Conflict(_) => StatusCode::CONFLICT,
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// Maps a pipeline error, renaming request fields through `rename`.
    pub fn from_error(e: Error, rename: impl Fn(&str) -> String) -> Self {
        match e {
            Error::InvalidRequest { field, message } => ApiError::BadRequest {
                field: rename(&field),
                message,
            },
            Error::Cancelled => ApiError::Cancelled,
            other => ApiError::Internal(other.to_string()),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status();
        let body = match &self {
            ApiError::BadRequest { field, message } => {
                json!({"error": format!("invalid value for `{field}`: {message}"), "field": field})
            }
            ApiError::Busy { message, .. }
            | ApiError::TooManyRequests { message, .. }
            | ApiError::NotFound(message)
            | ApiError::Conflict(message)
            | ApiError::UnsupportedMedia(message)
            | ApiError::NotAcceptable(message)
            | ApiError::TooLarge(message)
            | ApiError::NotReady(message)
            | ApiError::Internal(message) => json!({"error": message}),
            ApiError::Cancelled => json!({"error": "the job was cancelled"}),
        };
        let mut resp = (status, Json(body)).into_response();
        if let ApiError::Busy { retry_after, .. } | ApiError::TooManyRequests { retry_after, .. } =
            self
        {
            resp.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(retry_after));
        }
        resp
    }
}

/// The model's info when the engine is ready, else a 503.
pub fn ready_model(
    engine: &Engine,
) -> Result<Arc<crate::diffusion::pipeline::ModelInfo>, ApiError> {
    match engine.state() {
        EngineState::Ready(info) => Ok(info),
        EngineState::Loading => Err(ApiError::NotReady("the model is still loading".into())),
        EngineState::Failed(e) => Err(ApiError::NotReady(format!("the model failed to load: {e}"))),
    }
}

/// The request body as a JSON object (`text/plain`: `{"prompt": body}`).
pub(crate) fn body_object(
    headers: &HeaderMap,
    body: &Bytes,
) -> Result<Map<String, Value>, ApiError> {
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("application/json")
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    match content_type.as_str() {
        "application/json" | "" => match serde_json::from_slice::<Value>(body) {
            Ok(Value::Object(m)) => Ok(m),
            Ok(_) => Err(ApiError::BadRequest {
                field: "body".into(),
                message: "expected a JSON object".into(),
            }),
            Err(e) => Err(ApiError::BadRequest {
                field: "body".into(),
                message: format!("invalid JSON: {e}"),
            }),
        },
        "text/plain" => {
            let prompt = std::str::from_utf8(body).map_err(|_| ApiError::BadRequest {
                field: "body".into(),
                message: "not UTF-8 text".into(),
            })?;
            Ok(Map::from_iter([(
                "prompt".to_string(),
                Value::String(prompt.trim().to_string()),
            )]))
        }
        other => Err(ApiError::UnsupportedMedia(format!(
            "Content-Type {other:?} is not supported; send application/json or text/plain"
        ))),
    }
}

/// Field `name` of `obj`, typed; a wrong type is a 400 naming the field.
pub(crate) fn field<T: DeserializeOwned>(
    obj: &Map<String, Value>,
    name: &str,
) -> Result<Option<T>, ApiError> {
    match obj.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => serde_json::from_value(v.clone())
            .map(Some)
            .map_err(|e| ApiError::BadRequest {
                field: name.to_string(),
                message: e.to_string(),
            }),
    }
}
