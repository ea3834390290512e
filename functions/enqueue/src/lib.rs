//! The enqueue handler: S3 event records in, pending-queue messages out.

use aws_lambda_events::event::s3::S3Event;
use shotlabel_shared::aws::{S3Store, SqsQueue, load_sdk_config, s3_client, sqs_client};
use shotlabel_shared::enqueue::{EnqueueConfig, EnqueueReport, NewObject, enqueue_objects};
use shotlabel_shared::ports::{ObjectStore, Queue};
use shotlabel_shared::records::{Layout, TaskRef};
use shotlabel_shared::s3_key::decode_event_key;
use shotlabel_shared::settings;

/// Clients and settings, built once per cold start.
#[derive(Debug)]
pub struct Handler<S = S3Store, Q = SqsQueue> {
    pub store: S,
    pub queue: Q,
    pub config: EnqueueConfig,
}

/// Default largest object queued: 50 MiB (the submitter's decode limit).
const DEFAULT_MAX_OBJECT_BYTES: u64 = 50 * 1024 * 1024;

impl Handler {
    pub async fn from_env() -> Result<Self, lambda_runtime::Error> {
        let sdk = load_sdk_config().await;
        Ok(Self {
            store: S3Store::new(s3_client(&sdk)),
            queue: SqsQueue::new(sqs_client(&sdk)),
            config: config_from_env()?,
        })
    }
}

pub fn config_from_env() -> Result<EnqueueConfig, settings::SettingsError> {
    let task = settings::task()?;
    Ok(EnqueueConfig {
        layout: Layout::new(&settings::input_prefix()),
        pending_queue_url: settings::required(
            "SHOTLABEL_PENDING_QUEUE_URL",
            "the URL of the pending SQS queue",
        )?,
        max_object_bytes: settings::number_or(
            "SHOTLABEL_MAX_OBJECT_BYTES",
            DEFAULT_MAX_OBJECT_BYTES,
        )?,
        force_relabel: settings::flag("SHOTLABEL_FORCE_RELABEL")?,
        task: TaskRef {
            name: task.name().to_owned(),
            version: task.version().to_owned(),
        },
    })
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
    shotlabel_shared::metrics::emit(
        "enqueue",
        &shotlabel_shared::metrics::Counts {
            images_queued: report.queued as u64,
            images_failed: report.failed as u64,
            ..Default::default()
        },
    );
    Ok(report)
}
