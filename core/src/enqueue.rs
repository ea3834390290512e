//! Enqueue: new objects under the input prefix become pending-queue messages.
//!
//! Objects that can never be labelled (empty, too large) get a failed record instead of a
//! message; objects already labelled under the same etag and task version are skipped.
//! A message the queue keeps refusing fails the call, so the S3 event is delivered again
//! (sending twice is harmless: the submitter and harvest deduplicate).

use crate::ports::{ObjectStore, Queue};
use crate::records::{AttemptReason, Layout, PendingItem, SourceRef, Stage, TaskRef};
use crate::terminal::{RecordError, TerminalRecords, send_pending};

/// A new object as an S3 event reports it, key already decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewObject {
    pub bucket: String,
    pub key: String,
    pub size: u64,
    pub etag: String,
    pub version_id: Option<String>,
}

#[derive(Debug, Clone)]
pub struct EnqueueConfig {
    pub layout: Layout,
    pub pending_queue_url: String,
    /// Objects larger than this are failed, not queued.
    pub max_object_bytes: u64,
    /// Queue even what is already labelled under this task version.
    pub force_relabel: bool,
    pub task: TaskRef,
}

/// What one call did with its objects.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct EnqueueReport {
    pub queued: usize,
    pub already_labelled: usize,
    pub failed: usize,
    /// Not under the input prefix, or a folder marker.
    pub ignored: usize,
}

/// Why a call failed; its S3 event is delivered again.
#[derive(Debug, thiserror::Error)]
#[error(transparent)]
pub struct EnqueueError(#[from] pub RecordError);

pub async fn enqueue_objects<S: ObjectStore, Q: Queue>(
    store: &S,
    queue: &Q,
    config: &EnqueueConfig,
    objects: Vec<NewObject>,
) -> Result<EnqueueReport, EnqueueError> {
    let mut report = EnqueueReport::default();
    let records = TerminalRecords::new(store, &config.layout, &config.task);
    let mut pending = Vec::new();
    for object in objects {
        let Some(relative) = config.layout.relative(&object.key) else {
            report.ignored += 1;
            continue;
        };
        if relative.ends_with('/') {
            // A "folder" created by the console: not an image.
            report.ignored += 1;
            continue;
        }
        let refusal = if object.size == 0 {
            Some("the object is empty (0 bytes)".to_owned())
        } else if object.size > config.max_object_bytes {
            Some(format!(
                "the object is {} bytes, over the {}-byte limit",
                object.size, config.max_object_bytes
            ))
        } else {
            None
        };
        if let Some(reason) = refusal {
            let source = SourceRef {
                bucket: object.bucket,
                key: object.key,
                etag: object.etag,
                size: object.size,
                version_id: object.version_id,
            };
            let reasons = vec![AttemptReason {
                attempt: 0,
                stage: Stage::Enqueue,
                reason,
            }];
            records.write_failed(source, reasons).await?;
            report.failed += 1;
            continue;
        }
        let mut replace_label = None;
        if config.force_relabel {
            // Harvest may replace exactly this label, and nothing newer.
            replace_label = records.label_etag(&object.bucket, &object.key).await?;
        } else if records
            .is_labelled(&object.bucket, &object.key, &object.etag)
            .await?
        {
            report.already_labelled += 1;
            continue;
        }
        pending.push(PendingItem {
            bucket: object.bucket,
            key: object.key,
            size: object.size,
            etag: object.etag,
            version_id: object.version_id,
            attempt: 0,
            reasons: Vec::new(),
            requeues: 0,
            replace_label,
        });
    }
    send_pending(queue, &config.pending_queue_url, &pending).await?;
    report.queued += pending.len();
    Ok(report)
}
