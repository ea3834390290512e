//! The OpenAI-compatible Batch API: wire types and the error every provider adapter
//! reports. The HTTP client lives in the `shotlabel-batch-client` crate.

mod error;
mod types;

pub use error::BatchApiError;
pub use types::{
    Batch, BatchError, BatchErrors, BatchPage, BatchStatus, CreateBatchRequest, FileObject,
    FileReadiness, OutputError, OutputLine, OutputResponse, RequestCounts, Timestamp,
};
