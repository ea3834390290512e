//! The `webhook` Lambda function: behind the Function URL it receives provider callbacks
//! and queues harvests; on the harvest queue it harvests finished batches.

use lambda_runtime::{Error, LambdaEvent, run, service_fn, tracing};
use webhook::{Handler, handle};

#[tokio::main]
async fn main() -> Result<(), Error> {
    tracing::init_default_subscriber();
    let handler = Handler::from_env().await?;
    run(service_fn(|event: LambdaEvent<serde_json::Value>| {
        handle(&handler, event.payload)
    }))
    .await
}
