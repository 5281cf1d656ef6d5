//! The HTTP server: one axum router over one [`Engine`].
//!
//! Handlers live one module per front door ([`sagemaker`] for the SageMaker
//! container contract, [`jobs`] for the public job API, [`ui`] for the page,
//! [`metrics`], [`openapi`]); they validate into the one
//! [`crate::request::GenerateRequest`], submit it to the engine and map
//! outcomes to HTTP through [`ApiError`]'s single status table.

mod body;
pub mod jobs;
pub mod metrics;
pub mod openapi;
pub mod sagemaker;
pub mod server;
pub mod ui;

use std::sync::Arc;

use axum::Json;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde_json::json;

use crate::engine::Engine;
use crate::error::Error;
use crate::jobs::JobError;
use crate::request::Limits;
pub(crate) use body::{Bodies, body_object, from_object};

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
        .route("/editor.js", get(ui::editor_js))
        .route("/metrics", get(metrics::render))
        .route("/openapi.json", get(openapi::document))
        .route_layer(axum::middleware::from_fn_with_state(
            state.clone(),
            metrics::track,
        ))
        .fallback(not_found)
        .layer(axum::extract::DefaultBodyLimit::max(MAX_BODY_BYTES))
        .layer(tower_http::timeout::RequestBodyTimeoutLayer::new(
            BODY_READ_TIMEOUT,
        ))
        .with_state(state);
    let app = match cors {
        Some(c) => app.layer(c),
        None => app,
    };
    app.layer(axum::middleware::from_fn(harden))
}

/// Longest a client may take to send a request body.
pub const BODY_READ_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);

/// Every response: `nosniff`; every error: the one JSON shape, whatever
/// produced it (axum's own rejections — body too large, bad path or query,
/// method not allowed — answer in plain text or with no body).
async fn harden(request: axum::extract::Request, next: axum::middleware::Next) -> Response {
    let method = request.method().clone();
    let response = next.run(request).await;
    let (mut parts, body) = response.into_parts();
    parts.headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    let is_json = parts
        .headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    if parts.status.as_u16() < 400 || is_json {
        return Response::from_parts(parts, body);
    }
    // Rejection bodies are one short line; anything longer is cut.
    let text = axum::body::to_bytes(body, 4096)
        .await
        .map(|b| String::from_utf8_lossy(&b).trim().to_string())
        .unwrap_or_default();
    let message = match parts.status {
        StatusCode::PAYLOAD_TOO_LARGE => {
            format!("the request body is over the limit of {MAX_BODY_BYTES} bytes")
        }
        // axum adds the Allow header after this layer.
        StatusCode::METHOD_NOT_ALLOWED => {
            format!("{method} is not allowed on this route; the Allow header lists what is")
        }
        StatusCode::REQUEST_TIMEOUT => "the request body took too long to arrive".into(),
        status if text.is_empty() => status
            .canonical_reason()
            .unwrap_or("request failed")
            .to_string(),
        _ => text,
    };
    let body = serde_json::to_vec(&json!({ "error": message })).unwrap_or_default();
    parts.headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    parts.headers.remove(header::CONTENT_LENGTH);
    Response::from_parts(parts, axum::body::Body::from(body))
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
    /// Unavailable for now (the queue is full, storage is unreachable): retry
    /// after the given seconds (503).
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
) -> Result<Arc<crate::diffusion::pipelines::ModelInfo>, ApiError> {
    engine.ready_info().map_err(ApiError::NotReady)
}

impl From<JobError> for ApiError {
    fn from(e: JobError) -> Self {
        match e {
            JobError::Invalid { field, message } => ApiError::BadRequest { field, message },
            JobError::NotReady(m) => ApiError::NotReady(m),
            JobError::QueueFull {
                retry_after,
                message,
            } => ApiError::TooManyRequests {
                retry_after,
                message,
            },
            e @ JobError::StorageUnavailable { retry_after } => ApiError::Busy {
                retry_after,
                message: e.to_string(),
            },
            JobError::Conflict(m) => ApiError::Conflict(m),
            JobError::Internal(m) => ApiError::Internal(m),
        }
    }
}
