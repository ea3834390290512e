//! The harvest handler: on the harvest SQS queue, each message's [`HarvestRequest`] goes
//! through [`shotlabel_core::harvest::harvest`]; records whose harvest failed are reported
//! as batch item failures, so only they come back (and, past the queue's receive limit,
//! land in its dead-letter queue).

use aws_lambda_events::event::sqs::{SqsBatchResponse, SqsEvent};
use shotlabel_aws::{S3Store, SqsQueue, batch_client, load_sdk_config, s3_client_with, sqs_client};
use shotlabel_batch_client::BatchClient;
use shotlabel_core::harvest::{HarvestConfig, HarvestOutcome, harvest};
use shotlabel_core::ports::{BatchProvider, ObjectStore, Queue};
use shotlabel_core::records::{HarvestCounts, HarvestRequest};
use shotlabel_core::settings::{FunctionSettings, HarvestSettings};

/// Clients and settings, built once per cold start.
#[derive(Debug)]
pub struct Handler<S, Q, P> {
    pub store: S,
    pub queue: Q,
    pub provider: P,
    pub harvest: HarvestConfig,
}

impl Handler<S3Store, SqsQueue, BatchClient> {
    pub async fn from_env() -> Result<Self, lambda_runtime::Error> {
        let settings = HarvestSettings::from_env()?;
        let sdk = load_sdk_config().await;
        Ok(Self {
            store: S3Store::new(s3_client_with(&sdk, &settings.s3)),
            queue: SqsQueue::new(sqs_client(&sdk)),
            provider: batch_client(&sdk, &settings.provider).await?,
            // The same settings as the submitter's reconciliation, so both harvest alike.
            harvest: settings.provider.harvest_config(&settings.harvest)?,
        })
    }
}

/// Harvests each record's batch; the records whose harvest failed (or whose body is not a
/// harvest request) are reported back so that only they are retried.
pub async fn handle<S: ObjectStore, Q: Queue, P: BatchProvider>(
    handler: &Handler<S, Q, P>,
    event: SqsEvent,
) -> Result<SqsBatchResponse, lambda_runtime::Error> {
    let mut response = SqsBatchResponse::default();
    let mut harvested = HarvestCounts::default();
    for record in &event.records {
        let Some(message_id) = record.message_id.as_deref() else {
            // Without an id this record's failure cannot be reported on its own; failing the
            // invocation retries the whole batch, which is safe: harvests are idempotent.
            return Err("an SQS record has no messageId".into());
        };
        let request = match serde_json::from_str::<HarvestRequest>(
            record.body.as_deref().unwrap_or_default(),
        ) {
            Ok(request) => request,
            Err(e) => {
                // Reported as a failure so that, after the queue's retries, it lands in
                // the dead-letter queue for someone to look at instead of vanishing.
                tracing::error!(message_id, error = %e, "the message is not a harvest request");
                response.add_failure(message_id);
                continue;
            }
        };
        // Boxed: the harvest's future is large, and a debug build polling it inline
        // overflowed a 2 MiB worker stack.
        match Box::pin(harvest(
            &handler.store,
            &handler.queue,
            &handler.provider,
            &handler.harvest,
            &request,
        ))
        .await
        {
            Ok(outcome) => {
                if let HarvestOutcome::Harvested { counts, .. }
                | HarvestOutcome::ShardHarvested { counts, .. } = &outcome
                {
                    harvested.add(counts);
                }
                tracing::info!(
                    message_id,
                    origin = %request.origin,
                    outcome = %serde_json::to_string(&outcome).unwrap_or_default(),
                    "harvest request done"
                );
            }
            Err(e) => {
                tracing::error!(
                    message_id,
                    batch_id = request.batch_id.as_deref().unwrap_or_default(),
                    manifest = request.manifest.as_deref().unwrap_or_default(),
                    error = %e,
                    "harvest failed; the message will be retried"
                );
                response.add_failure(message_id);
            }
        }
    }
    shotlabel_aws::metrics::emit("harvest", &harvested.metrics());
    Ok(response)
}
