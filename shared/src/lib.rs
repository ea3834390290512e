//! shotlabel's shared library: the domain (tasks, batch requests and results) and the
//! adapters the Lambda functions and the CLI are built from.
//!
//! See `ARCHITECTURE.md` at the repository root for the bird's-eye view.

pub mod answer;
pub mod aws;
pub mod batch_api;
pub mod batch_token;
pub mod deploy;
pub mod enqueue;
pub mod harvest;
pub mod metrics;
pub mod ports;
pub mod prepare;
pub mod records;
pub mod request;
pub mod s3_key;
pub mod settings;
pub mod standard_webhooks;
pub mod submit;
pub mod task;
pub mod webhook;

pub use secrecy::{ExposeSecret, SecretString};
