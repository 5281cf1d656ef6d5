//! Request bodies: which Content-Types a route takes, the body as a JSON
//! object, and that object parsed into the type its schema is generated from.

use axum::body::Bytes;
use axum::http::{HeaderMap, header};
use serde::de::DeserializeOwned;
use serde_json::{Map, Value};

use super::ApiError;
use crate::diffusion::params::{AESTHETIC_FIELDS, MICRO_FIELDS, Pair};

/// Which bodies a route takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Bodies {
    /// `application/json` only: a page on another origin can't send that
    /// without a CORS preflight, so it can't submit jobs to a LAN server.
    Json,
    /// Also `text/plain` (a bare prompt), and JSON when no Content-Type is
    /// sent: what SageMaker callers send to `/invocations`.
    JsonOrText,
}

/// The request body as a JSON object (`text/plain`: `{"prompt": body}`).
pub(crate) fn body_object(
    headers: &HeaderMap,
    body: &Bytes,
    accepts: Bodies,
) -> Result<Map<String, Value>, ApiError> {
    let given = headers.get(header::CONTENT_TYPE);
    let content_type = match given {
        None if accepts == Bodies::JsonOrText => "application/json".to_string(),
        None => String::new(),
        Some(v) => v
            .to_str()
            .unwrap_or("")
            .split(';')
            .next()
            .unwrap_or("")
            .trim()
            .to_ascii_lowercase(),
    };
    let plain_ok = accepts == Bodies::JsonOrText;
    match content_type.as_str() {
        "application/json" => match serde_json::from_slice::<Value>(body) {
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
        "text/plain" if plain_ok => {
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
            "Content-Type {other:?} is not supported; send {}",
            match accepts {
                Bodies::Json => "application/json",
                Bodies::JsonOrText => "application/json or text/plain",
            }
        ))),
    }
}

/// Parses a request body object into the type its schema is generated from; a
/// mistyped field is a 400 naming it.
pub(crate) fn from_object<T: DeserializeOwned>(obj: Map<String, Value>) -> Result<T, ApiError> {
    // serde loses the path inside flattened fields (SDXL's size pairs): find
    // the mistyped one by parsing each on its own.
    let bad_pair = MICRO_FIELDS.iter().find(|f| {
        obj.get(**f)
            .is_some_and(|v| serde_json::from_value::<Option<Pair>>(v.clone()).is_err())
    });
    if let Some(field) = bad_pair {
        return Err(ApiError::BadRequest {
            field: field.to_string(),
            message: "expected two non-negative integers, [height, width] or [top, left]".into(),
        });
    }
    let bad_score = AESTHETIC_FIELDS.iter().find(|f| {
        obj.get(**f)
            .is_some_and(|v| !(v.is_number() || v.is_null()))
    });
    if let Some(field) = bad_score {
        return Err(ApiError::BadRequest {
            field: field.to_string(),
            message: "expected a number".into(),
        });
    }
    serde_path_to_error::deserialize(Value::Object(obj)).map_err(|e| {
        let path = e.path().to_string();
        ApiError::BadRequest {
            field: if path == "." { "body".into() } else { path },
            message: e.into_inner().to_string(),
        }
    })
}
