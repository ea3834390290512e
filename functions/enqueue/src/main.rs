//! The `enqueue` Lambda function: S3 `ObjectCreated` events under the input prefix become
//! pending-queue messages.

use enqueue::{Handler, handle};
use lambda_runtime::{Error, LambdaEvent, run, service_fn, tracing};

#[tokio::main]
async fn main() -> Result<(), Error> {
    tracing::init_default_subscriber();
    let handler = Handler::from_env().await?;
    run(service_fn(|event: LambdaEvent<_>| {
        handle(&handler, event.payload)
    }))
    .await
}
