//! The OpenAI-compatible Batch API: wire types and an HTTP client.

mod client;
mod types;

pub use client::{BatchApiConfig, BatchApiError, BatchClient, ByteStream, RetryPolicy};
pub use types::{
    Batch, BatchError, BatchErrors, BatchStatus, CreateBatchRequest, FileObject, OutputError,
    OutputLine, OutputResponse, RequestCounts, Timestamp,
};
