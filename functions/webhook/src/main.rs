//! The `webhook` Lambda function: behind the Function URL it receives provider callbacks
//! and queues harvests.

use lambda_runtime::{Error, LambdaEvent, run, service_fn, tracing};
use webhook::{Handler, handle};

#[tokio::main]
async fn main() -> Result<(), Error> {
    tracing::init_default_subscriber();
    let handler = Handler::from_env().await?;
    run(service_fn(|event: LambdaEvent<_>| {
        handle(&handler, event.payload)
    }))
    .await
}
