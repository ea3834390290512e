//! The enqueue handler: S3 event records in, pending-queue messages out.

use aws_lambda_events::event::s3::S3Event;
#[cfg(feature = "aws")]
use shotlabel_aws::{S3Store, SqsQueue, load_sdk_config, s3_client_with, sqs_client};
use shotlabel_core::enqueue::{EnqueueConfig, EnqueueReport, NewObject, enqueue_objects};
use shotlabel_core::ports::{ObjectStore, Queue};
use shotlabel_core::s3_key::decode_event_key;
#[cfg(feature = "aws")]
use shotlabel_core::settings::{EnqueueSettings, FunctionSettings};

/// Clients and settings, built once per cold start.
#[derive(Debug)]
pub struct Handler<S, Q> {
    pub store: S,
    pub queue: Q,
    pub config: EnqueueConfig,
}

#[cfg(feature = "aws")]
impl Handler<S3Store, SqsQueue> {
    pub async fn from_env() -> Result<Self, lambda_runtime::Error> {
        let settings = EnqueueSettings::from_env()?;
        let sdk = load_sdk_config().await;
        Ok(Self {
            store: S3Store::new(s3_client_with(&sdk, &settings.s3)),
            queue: SqsQueue::new(sqs_client(&sdk)),
            config: settings.config()?,
        })
    }
}

/// The created objects an event reports, keys decoded. Other event types are left out;
/// a record whose key cannot be decoded is logged and left out (it could never be read).
pub fn new_objects(event: &S3Event) -> Vec<NewObject> {
    let mut objects = Vec::new();
    for record in &event.records {
        let created = record
            .event_name
            .as_deref()
            .is_some_and(|name| name.starts_with("ObjectCreated:"));
        if !created {
            continue;
        }
        let object = &record.s3.object;
        let Some(raw_key) = object.key.as_deref() else {
            tracing::warn!("an S3 event record has no object key");
            continue;
        };
        let key = match decode_event_key(raw_key) {
            Ok(key) => key,
            Err(e) => {
                tracing::error!(error = %e, "skipping an S3 event record");
                continue;
            }
        };
        objects.push(NewObject {
            bucket: record.s3.bucket.name.clone().unwrap_or_default(),
            key,
            size: object.size.unwrap_or(0).max(0) as u64,
            etag: object
                .e_tag
                .as_deref()
                .unwrap_or_default()
                .trim_matches('"')
                .to_owned(),
            version_id: object.version_id.clone().filter(|v| !v.is_empty()),
        });
    }
    objects
}

/// Handles one S3 event. An error makes Lambda deliver the event again.
pub async fn handle<S: ObjectStore, Q: Queue>(
    handler: &Handler<S, Q>,
    event: S3Event,
) -> Result<EnqueueReport, lambda_runtime::Error> {
    let objects = new_objects(&event);
    let report = enqueue_objects(&handler.store, &handler.queue, &handler.config, objects).await?;
    tracing::info!(
        queued = report.queued,
        already_labelled = report.already_labelled,
        failed = report.failed,
        ignored = report.ignored,
        "enqueued"
    );
    #[cfg(feature = "aws")]
    shotlabel_aws::metrics::emit(
        "enqueue",
        &shotlabel_core::metrics::Counts {
            images_queued: report.queued as u64,
            images_failed: report.failed as u64,
            ..Default::default()
        },
    );
    Ok(report)
}
