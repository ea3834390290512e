//! The `harvest` Lambda function: on the harvest queue, each message's finished batch
//! becomes labels, retries and failed records.

use harvest::{Handler, handle};
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
