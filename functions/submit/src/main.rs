//! The `submit` Lambda function: on a schedule, drain the pending queue into batches.

use lambda_runtime::{Error, LambdaEvent, run, service_fn, tracing};
use submit::{Handler, handle};

#[tokio::main]
async fn main() -> Result<(), Error> {
    tracing::init_default_subscriber();
    let handler = Handler::from_env().await?;
    run(service_fn(|event: LambdaEvent<serde_json::Value>| {
        handle(&handler, event.payload)
    }))
    .await
}
