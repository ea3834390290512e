//! The cross-crate integration tests against moto and the batch emulator, as one test
//! binary: each module was a binary of its own, and every one linked the AWS SDK. The
//! chaos soak, the Lambda runtime test and the secrets test (which captures every log
//! line of its process at TRACE) stay binaries of their own.

#[path = "../common/mod.rs"]
mod common;

mod backfill;
mod batch_client;
mod dataset;
mod dependencies;
mod end_to_end;
mod enqueue;
mod fuzz_corpus;
mod harvest;
mod harvest_shards;
mod hostile;
mod local_stack;
mod scale_out;
mod secrets;
mod submit;
mod template;
mod webhook;
mod webhook_interop;
