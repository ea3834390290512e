//! A local OpenAI-compatible Batch API provider for tests and demos.
//!
//! Its answers are synthetic: JSON shaped by each request's own schema and
//! seeded from the image bytes, never a model's judgement of the image. It
//! shares no protocol code with the shotlabel client on purpose, so neither
//! side can hide the other's mistakes.
//!
//! ```no_run
//! # async fn demo() -> Result<(), batch_emulator::Error> {
//! let emulator = batch_emulator::spawn(batch_emulator::EmulatorConfig::new("sk-test")).await?;
//! println!("{}", emulator.base_url()); // http://127.0.0.1:PORT/v1
//! # Ok(()) }
//! ```

mod answer;
mod batch;
mod config;
mod error;
mod prng;
mod server;
mod state;
mod validate;
mod webhook;

pub use config::{EMULATOR_MODEL, EmulatorConfig, ErrorsShape, FaultSettings, IdStyle};
pub use error::Error;
pub use server::{RunningEmulator, spawn};
pub use state::{Stats, WebhookStats};
pub use webhook::{decode_secret, sign as sign_webhook};
