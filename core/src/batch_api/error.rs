//! What can go wrong talking to a Batch API provider, as every adapter reports it.

/// What went wrong talking to the provider. Messages never contain the API key.
#[derive(Debug, thiserror::Error)]
pub enum BatchApiError {
    #[error("{operation}: the provider answered HTTP {status}: {message}")]
    Status {
        operation: &'static str,
        status: u16,
        message: String,
    },
    #[error("{operation}: could not reach the provider: {detail}")]
    Transport {
        operation: &'static str,
        detail: String,
    },
    #[error("{operation}: the provider's answer could not be read: {detail}")]
    Decode {
        operation: &'static str,
        detail: String,
    },
    #[error("{operation}: cannot read {path}: {detail}")]
    File {
        operation: &'static str,
        path: String,
        detail: String,
    },
    #[error("upload file: the provider refused file {file_id}: {detail}")]
    FileRefused { file_id: String, detail: String },
    #[error("upload file: file {file_id} was still {status:?} after {waited_secs} s")]
    FileNotReady {
        file_id: String,
        status: String,
        waited_secs: u64,
    },
    #[error("batch API configuration: {0}")]
    Config(String),
}

impl BatchApiError {
    /// The HTTP status, when the provider answered.
    pub fn status(&self) -> Option<u16> {
        match self {
            Self::Status { status, .. } => Some(*status),
            _ => None,
        }
    }

    /// True for failures that may pass (rate limits, server errors, network trouble).
    pub fn is_transient(&self) -> bool {
        match self {
            Self::Status { status, .. } => *status == 429 || *status >= 500,
            Self::Transport { .. } | Self::FileNotReady { .. } => true,
            _ => false,
        }
    }
}
