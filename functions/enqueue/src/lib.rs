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

// ---- deployment description ----
// What this function needs from `template.yaml`; `tests/tests/template.rs` holds the
// template to it (see `shotlabel_shared::deploy`).

use shotlabel_shared::deploy::{
    self, Deployment, Env, FAILED, Grant, HAS_TASK, LABELS, PENDING_QUEUE, Resource, S3_GET,
    S3_PUT, SQS_SEND,
};

/// Every variable [`Handler::from_env`] reads (held to the source by a unit test).
pub const ENV_VARS: &[&str] = &[
    "SHOTLABEL_FORCE_RELABEL",
    "SHOTLABEL_INPUT_PREFIX",
    "SHOTLABEL_MAX_OBJECT_BYTES",
    "SHOTLABEL_PENDING_QUEUE_URL",
    "SHOTLABEL_S3_PATH_STYLE",
    "SHOTLABEL_TASK",
];

/// What [`handle`] does on AWS: looks for a current label (GET, or HEAD when relabelling),
/// writes failed records for refused objects, and sends the pending messages.
pub const GRANTS: &[Grant] = &[
    Grant::new(&[S3_GET], &[Resource::Objects(LABELS)]),
    Grant::new(&[S3_PUT], &[Resource::Objects(FAILED)]),
    Grant::new(&[SQS_SEND], &[Resource::Queue(PENDING_QUEUE)]),
];

/// The one deployment: triggered by objects created under the input prefix.
pub const DEPLOYMENTS: &[Deployment] = &[Deployment {
    function: "EnqueueFunction",
    binary: "enqueue",
    env: &[
        Env::Required("SHOTLABEL_PENDING_QUEUE_URL"),
        // Must be the S3 trigger's prefix filter, or events would be ignored.
        Env::Required("SHOTLABEL_INPUT_PREFIX"),
        Env::RequiredIf("SHOTLABEL_TASK", HAS_TASK),
    ],
    grants: &[deploy::LOGGING, deploy::SEE_MISSING_KEYS, GRANTS],
}];

#[cfg(test)]
mod deployment_tests {
    use std::collections::BTreeSet;

    #[test]
    fn env_vars_are_what_the_code_reads() {
        let read = shotlabel_shared::deploy::variables_read_by(include_str!("lib.rs"));
        let declared: BTreeSet<String> = super::ENV_VARS.iter().map(|v| (*v).to_owned()).collect();
        assert_eq!(declared, read);
    }
}
