//! The `webhook` Lambda function: receives provider callbacks and harvests finished batches.
//!
//! Its handler is not built yet (issue 4). Until then every invocation fails loudly, so
//! that a deployed stack never drops an event silently: Lambda retries it and, past the
//! retry limit, it lands in the dead-letter queue.

use lambda_runtime::{Error, LambdaEvent, run, service_fn, tracing};
use serde_json::Value;

async fn handler(event: LambdaEvent<Value>) -> Result<Value, Error> {
    tracing::error!(request_id = %event.context.request_id, "the webhook handler is not built yet");
    Err("the webhook handler is not built yet (issue 4)".into())
}

#[tokio::main]
async fn main() -> Result<(), Error> {
    tracing::init_default_subscriber();
    run(service_fn(handler)).await
}
