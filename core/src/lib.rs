//! shotlabel's core: the domain (tasks, images, batch requests and results, records) and
//! the pipeline's logic (enqueue, submit, harvest, the webhook receiver), written against
//! the small traits in [`ports`]. It knows nothing of AWS, Lambda or HTTP clients: the
//! adapters (`shotlabel-aws`, `shotlabel-batch-client`) implement the ports, and a test in
//! `tests/` reads `cargo metadata` to keep it so.
//!
//! See `ARCHITECTURE.md` at the repository root for the bird's-eye view.

pub mod answer;
pub mod backpressure;
pub mod batch_api;
pub mod batch_token;
pub mod dataset;
pub mod dispatch;
pub mod enqueue;
pub mod eval;
pub mod harvest;
#[cfg(any(test, feature = "memory"))]
pub mod memory;
pub mod metered;
pub mod metrics;
pub mod ports;
pub mod prepare;
pub mod provider;
pub mod records;
pub mod request;
pub mod s3_key;
pub mod settings;
pub mod standard_webhooks;
pub mod submit;
pub mod task;
pub mod terminal;
pub mod webhook;

pub use secrecy::{ExposeSecret, SecretString};
