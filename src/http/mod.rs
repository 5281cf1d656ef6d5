//! The HTTP server: one axum router over one [`Engine`].
//!
//! Handlers live one module per front door ([`sagemaker`]); they validate into
//! the one [`crate::request::GenerateRequest`], submit it to the engine and map
//! outcomes to HTTP through [`ApiError`]'s single status table.

pub mod sagemaker;

use std::sync::Arc;

use axum::Json;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::json;

use crate::engine::{Engine, EngineState};
use crate::error::Error;
use crate::request::Limits;

/// Shared state of every handler.
#[derive(Clone)]
pub struct AppState {
    pub engine: Engine,
    pub limits: Limits,
}

/// Builds the router.
pub fn router(state: AppState) -> axum::Router {
    axum::Router::new()
        .route("/ping", axum::routing::get(sagemaker::ping))
        .route("/invocations", axum::routing::post(sagemaker::invocations))
        .layer(axum::extract::DefaultBodyLimit::max(MAX_BODY_BYTES))
        .with_state(Arc::new(state))
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
    /// The queue is full; retry after the given seconds.
    Busy { retry_after: u64, message: String },
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
            ApiError::Cancelled => StatusCode::CONFLICT,
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
            | ApiError::UnsupportedMedia(message)
            | ApiError::NotAcceptable(message)
            | ApiError::TooLarge(message)
            | ApiError::NotReady(message)
            | ApiError::Internal(message) => json!({"error": message}),
            ApiError::Cancelled => json!({"error": "the job was cancelled"}),
        };
        let mut resp = (status, Json(body)).into_response();
        if let ApiError::Busy { retry_after, .. } = self {
            resp.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(retry_after));
        }
        resp
    }
}

/// The model's info when the engine is ready, else a 503.
pub fn ready_model(
    state: &AppState,
) -> Result<Arc<crate::diffusion::pipeline::ModelInfo>, ApiError> {
    match state.engine.state() {
        EngineState::Ready(info) => Ok(info),
        EngineState::Loading => Err(ApiError::NotReady("the model is still loading".into())),
        EngineState::Failed(e) => Err(ApiError::NotReady(format!("the model failed to load: {e}"))),
    }
}
