//! The one owner of an image's terminal records, and of its trips round the pending queue.
//!
//! Every image ends with exactly one terminal record: a label (`labels/<key>.json`) or a
//! failed record (`failed/<key>.json`). Enqueue (refused objects), submit (images that
//! cannot be prepared) and harvest (answers, exhausted retries) all write them here, and
//! send pending items here, so the rules that keep "exactly one" hold in one place:
//!
//! - A label is written with a conditional PUT and recognises its own earlier copy and a
//!   duplicate of the same content (see ARCHITECTURE.md, *Crash safety*).
//! - A label supersedes a failed record of the same content; each side writes before it
//!   looks for the other, so when two copies race at least one sees the other.
//! - A store error is an error: it propagates to the caller, which leaves its message or
//!   harvest request to be retried. It is never read as "no label", which could leave an
//!   image with both records.
//!
//! Existing records are read through small typed views ([`LabelIdentity`]); a record that
//! cannot be parsed counts as another content's (it is replaced, never trusted).

use std::time::Duration;

use serde::Deserialize;

use crate::ports::{
    MAX_BATCH_MESSAGES, ObjectStore, OutgoingMessage, Queue, QueueError, StoreError, WriteCondition,
};
use crate::records::{
    AttemptReason, FailedRecord, LabelRecord, Layout, PendingItem, SourceRef, TaskRef,
};

#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Queue(#[from] QueueError),
    #[error("encoding a record: {0}")]
    Encode(#[from] serde_json::Error),
    #[error("the pending queue refused {count} message(s) after {SEND_ROUNDS} rounds")]
    Refused { count: usize },
}

/// How writing one label ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LabelWrite {
    Written,
    /// This very answer was written before (a repeated harvest), at `labelled_at` (unix
    /// seconds; `None` for a label written before the field was read back).
    AlreadyOurs {
        labelled_at: Option<u64>,
    },
    /// Another batch's answer for the same content and task version is there already.
    Duplicate,
    /// The object changed after this item was queued; its newer content has its own run.
    Superseded,
}

/// How writing one failed record ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailedWrite {
    Written,
    /// A label of the same content is there: it stands, and the failed record was removed.
    Labelled,
}

/// What a stored label or failed record says about whom it is for: the part of it the
/// pipeline's rules read.
#[derive(Debug, Clone, Deserialize)]
pub struct LabelIdentity {
    pub source: SourceIdentity,
    pub task: TaskIdentity,
    #[serde(default)]
    pub provenance: Option<ProvenanceIdentity>,
    /// Labels only: when it was written, for a repeated harvest's dataset part.
    #[serde(default)]
    pub labelled_at: Option<u64>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct SourceIdentity {
    pub etag: String,
}

#[derive(Debug, Clone, Deserialize)]
pub struct TaskIdentity {
    pub version: String,
}

#[derive(Debug, Clone, Deserialize)]
pub struct ProvenanceIdentity {
    pub batch_id: String,
    pub custom_id: String,
}

impl LabelIdentity {
    /// Whether the record is about this content (source etag) under this task version.
    pub fn is_for(&self, etag: &str, task_version: &str) -> bool {
        self.source.etag == etag && self.task.version == task_version
    }
}

/// Rounds of re-sending entries the queue refused before giving up.
pub const SEND_ROUNDS: u32 = 4;

/// Labels and failed records of one task version, under one layout.
#[derive(Debug)]
pub struct TerminalRecords<'a, S> {
    store: &'a S,
    layout: &'a Layout,
    task: &'a TaskRef,
}

impl<S> Clone for TerminalRecords<'_, S> {
    fn clone(&self) -> Self {
        *self
    }
}

// Copy, so that many label writes can be in flight while a harvest reads on.
impl<S> Copy for TerminalRecords<'_, S> {}

impl<'a, S: ObjectStore> TerminalRecords<'a, S> {
    pub fn new(store: &'a S, layout: &'a Layout, task: &'a TaskRef) -> Self {
        Self {
            store,
            layout,
            task,
        }
    }

    /// `labels/<key below the input prefix>.json` for an object key.
    pub fn label_key(&self, key: &str) -> String {
        self.layout.label_key(self.layout.relative_or_key(key))
    }

    /// `failed/<key below the input prefix>.json` for an object key.
    pub fn failed_key(&self, key: &str) -> String {
        self.layout.failed_key(self.layout.relative_or_key(key))
    }

    /// The record at `key` as its identity and etag: `None` when there is none;
    /// `Some((None, etag))` when it is there but cannot be read as one.
    async fn identity_at(
        &self,
        bucket: &str,
        key: &str,
    ) -> Result<Option<(Option<LabelIdentity>, String)>, RecordError> {
        match self.store.get(bucket, key).await {
            Ok(object) => Ok(Some((
                serde_json::from_slice(&object.body).ok(),
                object.etag,
            ))),
            Err(StoreError::NotFound { .. }) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// True when a label of this exact content (source etag) and task version exists. A
    /// store error is returned as one, never read as "not labelled".
    pub async fn is_labelled(
        &self,
        bucket: &str,
        key: &str,
        etag: &str,
    ) -> Result<bool, RecordError> {
        Ok(self
            .identity_at(bucket, &self.label_key(key))
            .await?
            .and_then(|(identity, _)| identity)
            .is_some_and(|label| label.is_for(etag, &self.task.version)))
    }

    /// The current label's etag, for a forced relabel that may replace exactly it.
    pub async fn label_etag(&self, bucket: &str, key: &str) -> Result<Option<String>, RecordError> {
        Ok(self
            .store
            .head(bucket, &self.label_key(key))
            .await?
            .map(|info| info.etag))
    }

    /// Writes an item's label (see [`Self::write_label_once`]), then removes a failed record
    /// of the same content: another copy of the item may have been failed meanwhile, and a
    /// label supersedes it.
    pub async fn write_label(
        &self,
        item: &PendingItem,
        record: &LabelRecord,
    ) -> Result<LabelWrite, RecordError> {
        let written = Box::pin(self.write_label_once(item, record)).await?;
        if matches!(
            written,
            LabelWrite::Written | LabelWrite::AlreadyOurs { .. }
        ) {
            self.remove_failed(&item.bucket, &item.key, &item.etag)
                .await?;
        }
        Ok(written)
    }

    /// Writes a label unless one for the same content and task version is there. The
    /// common case (no label yet) costs one conditional PUT.
    async fn write_label_once(
        &self,
        item: &PendingItem,
        record: &LabelRecord,
    ) -> Result<LabelWrite, RecordError> {
        let key = self.label_key(&item.key);
        let body = serde_json::to_vec_pretty(record)?;
        let first = match &item.replace_label {
            Some(etag) => WriteCondition::IfMatch(etag.clone()),
            None => WriteCondition::IfAbsent,
        };
        if self.put(&item.bucket, &key, body.clone(), first).await? {
            return Ok(LabelWrite::Written);
        }
        let Some((existing, etag)) = self.identity_at(&item.bucket, &key).await? else {
            // Deleted in between: try once more from scratch.
            return Ok(
                if self
                    .put(&item.bucket, &key, body, WriteCondition::IfAbsent)
                    .await?
                {
                    LabelWrite::Written
                } else {
                    LabelWrite::Duplicate
                },
            );
        };
        if let Some(existing) = &existing {
            if existing.provenance.as_ref().is_some_and(|p| {
                p.batch_id == record.provenance.batch_id
                    && p.custom_id == record.provenance.custom_id
            }) {
                return Ok(LabelWrite::AlreadyOurs {
                    labelled_at: existing.labelled_at,
                });
            }
            if existing.is_for(&item.etag, &self.task.version) {
                return Ok(LabelWrite::Duplicate);
            }
        }
        if item.replace_label.is_some() {
            return Ok(LabelWrite::Duplicate);
        }
        // A label for other content or another task version (or one that cannot be read):
        // replace it, but only if this item's content is still what the object holds.
        match self.store.head(&item.bucket, &item.key).await? {
            Some(info) if info.etag == item.etag => {}
            _ => return Ok(LabelWrite::Superseded),
        }
        Ok(
            if self
                .put(&item.bucket, &key, body, WriteCondition::IfMatch(etag))
                .await?
            {
                LabelWrite::Written
            } else {
                LabelWrite::Duplicate
            },
        )
    }

    /// Writes an image's failed record, unless a label of the same content is there: then
    /// the label stands and the record is removed again ([`FailedWrite::Labelled`]). The
    /// label is looked for after the write, and a label writer looks for a failed record
    /// after its own write ([`Self::write_label`]): when the two race, at least one sees the
    /// other, and the image keeps one terminal record.
    pub async fn write_failed(
        &self,
        source: SourceRef,
        reasons: Vec<AttemptReason>,
    ) -> Result<FailedWrite, RecordError> {
        let key = self.failed_key(&source.key);
        let (bucket, object_key, etag) = (
            source.bucket.clone(),
            source.key.clone(),
            source.etag.clone(),
        );
        let record = FailedRecord::new(source, self.task.clone(), reasons);
        self.store
            .put(
                &bucket,
                &key,
                serde_json::to_vec_pretty(&record)?,
                "application/json",
                WriteCondition::Overwrite,
            )
            .await?;
        if self.is_labelled(&bucket, &object_key, &etag).await? {
            self.store.delete(&bucket, &key).await?;
            return Ok(FailedWrite::Labelled);
        }
        Ok(FailedWrite::Written)
    }

    /// Deletes the image's failed record if it is about this content and task version.
    async fn remove_failed(&self, bucket: &str, key: &str, etag: &str) -> Result<(), RecordError> {
        let failed_key = self.failed_key(key);
        let Some((identity, _)) = self.identity_at(bucket, &failed_key).await? else {
            return Ok(());
        };
        if identity.is_some_and(|record| record.is_for(etag, &self.task.version)) {
            tracing::info!(%key, "a label supersedes the image's failed record");
            self.store.delete(bucket, &failed_key).await?;
        }
        Ok(())
    }

    /// `false` when the condition failed.
    async fn put(
        &self,
        bucket: &str,
        key: &str,
        body: Vec<u8>,
        condition: WriteCondition,
    ) -> Result<bool, RecordError> {
        match self
            .store
            .put(bucket, key, body, "application/json", condition)
            .await
        {
            Ok(_) => Ok(true),
            Err(StoreError::ConditionFailed { .. }) => Ok(false),
            Err(e) => Err(e.into()),
        }
    }
}

/// Sends pending items (new images, retries) to the pending queue, ten per call,
/// re-sending refused entries with a short backoff for [`SEND_ROUNDS`] rounds.
pub async fn send_pending<Q: Queue>(
    queue: &Q,
    queue_url: &str,
    items: &[PendingItem],
) -> Result<(), RecordError> {
    for chunk in items.chunks(MAX_BATCH_MESSAGES) {
        let mut messages = chunk
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
                messages.clear();
                break;
            }
            tracing::warn!(
                refused = refused.len(),
                round,
                "the pending queue refused messages"
            );
            messages.retain(|m| refused.contains(&m.id));
        }
        if !messages.is_empty() {
            return Err(RecordError::Refused {
                count: messages.len(),
            });
        }
    }
    Ok(())
}
