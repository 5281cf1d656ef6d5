//! Why a call into the job service failed. The service knows nothing of HTTP:
//! `http/` maps each variant to a status (and `Retry-After`) in one table.

use crate::error::Error;

/// Seconds a caller is asked to wait while storage is unreachable.
pub const STORAGE_RETRY_AFTER: u64 = 5;

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum JobError {
    /// A request field is invalid; `field` is named as the caller sent it.
    #[error("invalid value for `{field}`: {message}")]
    Invalid { field: String, message: String },
    /// The model is loading or failed to load, or the server is shutting down.
    #[error("{0}")]
    NotReady(String),
    /// The engine's queue is full: retry after `retry_after` seconds.
    #[error("{message}")]
    QueueFull { retry_after: u64, message: String },
    /// Storage can't be reached (the detail is logged): retry after `retry_after` seconds.
    #[error("image storage is unavailable; retry later")]
    StorageUnavailable { retry_after: u64 },
    /// The job's state forbids it (cancelling a finished job).
    #[error("{0}")]
    Conflict(String),
    /// Something on the server's side failed (an unreadable stored record).
    #[error("{0}")]
    Internal(String),
}

impl JobError {
    pub(crate) fn storage_unavailable() -> Self {
        JobError::StorageUnavailable {
            retry_after: STORAGE_RETRY_AFTER,
        }
    }

    /// A validation error, its field renamed as the job API spells it.
    pub(crate) fn invalid(e: Error) -> Self {
        match e {
            Error::InvalidRequest { field, message } => JobError::Invalid {
                field: super::record::caller_name(&field),
                message,
            },
            other => JobError::Internal(other.to_string()),
        }
    }
}
