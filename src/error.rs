//! The crate's one error type.
//!
//! Every failure a user can cause or meet is a variant here, carrying what a
//! person needs to fix it: the request field, the model file, the hub repo.

use std::path::PathBuf;

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A request parameter is out of range or malformed. `field` names the
    /// parameter as the caller spelled it (CLI flag or JSON field).
    #[error("invalid value for `{field}`: {message}")]
    InvalidRequest { field: String, message: String },

    /// A model file is missing, truncated or does not match its config.
    #[error("model file {}: {message}", path.display())]
    ModelFile { path: PathBuf, message: String },

    /// The model could not be fetched from the Hugging Face hub.
    #[error("{0}")]
    Hub(String),

    /// A tensor operation failed inside the pipeline.
    #[error("tensor computation failed: {0}")]
    Candle(#[from] candle_core::Error),

    /// Reading or writing a file outside the model folder failed.
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// Image or job-record storage (local folder or S3) failed; names the location.
    #[error("storage {location}: {message}")]
    Storage { location: String, message: String },

    /// The server could not start: its address can't be bound, or its async
    /// runtime can't be made (not a usage error: the flags were valid).
    #[error("{0}")]
    Startup(String),

    /// A broken invariant between sdserve's own parts (a bug, not bad input).
    #[error("internal error: {0}")]
    Internal(String),

    /// A generation was cancelled before it finished.
    #[error("cancelled")]
    Cancelled,
}

/// `message` with every absolute filesystem path cut to its last component:
/// callers see which file, not where the server keeps it (the log has it all).
pub fn without_paths(message: &str) -> String {
    message
        .split(' ')
        .map(|word| match word.strip_prefix('/') {
            Some(rest) if rest.contains('/') => {
                // The file and its folder (`unet/config.json:`), not the root.
                let tail: Vec<&str> = word.rsplitn(3, '/').take(2).collect();
                format!(".../{}/{}", tail[1], tail[0])
            }
            _ => word.to_string(),
        })
        .collect::<Vec<_>>()
        .join(" ")
}

impl Error {
    pub fn invalid(field: impl Into<String>, message: impl Into<String>) -> Self {
        Error::InvalidRequest {
            field: field.into(),
            message: message.into(),
        }
    }

    pub fn model_file(path: impl Into<PathBuf>, message: impl std::fmt::Display) -> Self {
        Error::ModelFile {
            path: path.into(),
            message: message.to_string(),
        }
    }

    pub fn storage(location: impl Into<String>, message: impl std::fmt::Display) -> Self {
        Error::Storage {
            location: location.into(),
            message: message.to_string(),
        }
    }

    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }
}
