//! Enqueue: new objects under the input prefix become pending-queue messages.
//!
//! Objects that can never be labelled (empty, too large) get a failed record instead of a
//! message; objects already labelled under the same etag and task version are skipped.
//! A message the queue keeps refusing fails the call, so the S3 event is delivered again
//! (sending twice is harmless: the submitter and harvest deduplicate).

use std::time::Duration;

use serde_json::Value;

use crate::ports::{
    MAX_BATCH_MESSAGES, ObjectStore, OutgoingMessage, Queue, QueueError, StoreError, WriteCondition,
};
use crate::records::{AttemptReason, FailedRecord, Layout, PendingItem, SourceRef, TaskRef};

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

#[derive(Debug, thiserror::Error)]
pub enum EnqueueError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Queue(#[from] QueueError),
    #[error("the pending queue refused {count} message(s) after retries")]
    Refused { count: usize },
    #[error("cannot encode a message: {0}")]
    Encode(#[from] serde_json::Error),
}

/// Rounds of re-sending entries the queue refused before giving up.
const SEND_ROUNDS: u32 = 4;

pub async fn enqueue_objects<S: ObjectStore, Q: Queue>(
    store: &S,
    queue: &Q,
    config: &EnqueueConfig,
    objects: Vec<NewObject>,
) -> Result<EnqueueReport, EnqueueError> {
    let mut report = EnqueueReport::default();
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
            write_failed(store, config, &object, relative, reason).await?;
            report.failed += 1;
            continue;
        }
        let mut replace_label = None;
        if config.force_relabel {
            // Harvest may replace exactly this label, and nothing newer.
            let label_key = config.layout.label_key(relative);
            replace_label = store
                .head(&object.bucket, &label_key)
                .await?
                .map(|l| l.etag);
        } else if is_labelled(store, config, &object, relative).await? {
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
            replace_label,
        });
    }
    for chunk in pending.chunks(MAX_BATCH_MESSAGES) {
        send_all(queue, &config.pending_queue_url, chunk).await?;
        report.queued += chunk.len();
    }
    Ok(report)
}

/// Sends up to ten items, re-sending refused entries with a short backoff.
async fn send_all<Q: Queue>(
    queue: &Q,
    queue_url: &str,
    items: &[PendingItem],
) -> Result<(), EnqueueError> {
    let mut messages = items
        .iter()
        .enumerate()
        .map(|(i, item)| {
            Ok(OutgoingMessage {
                id: i.to_string(),
                body: serde_json::to_string(item)?,
            })
        })
        .collect::<Result<Vec<_>, serde_json::Error>>()?;
    for round in 0..SEND_ROUNDS {
        if round > 0 {
            tokio::time::sleep(Duration::from_millis(100 << round)).await;
        }
        let refused = queue.send_batch(queue_url, &messages).await?;
        if refused.is_empty() {
            return Ok(());
        }
        tracing::warn!(
            refused = refused.len(),
            round,
            "the pending queue refused messages"
        );
        messages.retain(|m| refused.contains(&m.id));
    }
    Err(EnqueueError::Refused {
        count: messages.len(),
    })
}

/// True when a label exists for this exact object content under this task version.
async fn is_labelled<S: ObjectStore>(
    store: &S,
    config: &EnqueueConfig,
    object: &NewObject,
    relative: &str,
) -> Result<bool, EnqueueError> {
    let label_key = config.layout.label_key(relative);
    let body = match store.get(&object.bucket, &label_key).await {
        Ok(object) => object.body,
        Err(StoreError::NotFound { .. }) => return Ok(false),
        Err(e) => return Err(e.into()),
    };
    // An unreadable label is no reason to skip the image: label it again.
    let Ok(label) = serde_json::from_slice::<Value>(&body) else {
        return Ok(false);
    };
    Ok(
        label["source"]["etag"].as_str() == Some(object.etag.as_str())
            && label["task"]["version"].as_str() == Some(config.task.version.as_str()),
    )
}

async fn write_failed<S: ObjectStore>(
    store: &S,
    config: &EnqueueConfig,
    object: &NewObject,
    relative: &str,
    reason: String,
) -> Result<(), EnqueueError> {
    let record = FailedRecord::new(
        SourceRef {
            bucket: object.bucket.clone(),
            key: object.key.clone(),
            etag: object.etag.clone(),
            size: object.size,
            version_id: object.version_id.clone(),
        },
        config.task.clone(),
        vec![AttemptReason {
            attempt: 0,
            stage: "enqueue".into(),
            reason,
        }],
    );
    let body = serde_json::to_vec_pretty(&record)?;
    store
        .put(
            &object.bucket,
            &config.layout.failed_key(relative),
            body,
            "application/json",
            WriteCondition::Overwrite,
        )
        .await?;
    Ok(())
}
