//! Sharded harvests: a large finished batch is read by several harvest runs at once.
//!
//! 1. **Plan** (the run that finds the batch finished): each provider file is streamed
//!    once into the bucket (`state/outputs/<batch>/<n>.jsonl`); while it streams, every
//!    `requests_per_shard` lines a cut is made at a line start, so each shard is an exact,
//!    line-aligned byte range. The plan is written with `If-None-Match: *` (a repeated
//!    planner reuses the first plan), then one harvest request per shard goes onto the
//!    harvest queue, once (`sent_at`; after `ShardConfig::resend_after`, two hours by default, shards still not done are queued
//!    again, for a message that was lost).
//! 2. **Shards** (one harvest-queue message each): a ranged GET of its bytes, the same
//!    line handling as a whole-batch harvest (labels with conditional writes, retries
//!    planned in `state/retries/<batch>-shard-<n>.json` before they are sent), its result
//!    lines, and last its done marker with its counts and the requests it saw. A shard
//!    that crashes is redone by its message's retry: its labels recognise themselves and
//!    its retry plan is reused, so nothing is written or sent twice.
//! 3. **Finish** (whichever shard sees every done marker, or a later harvest request for
//!    the batch that finds every shard done and the batch still open): items no shard saw are settled
//!    as a whole-batch harvest settles them, and the state record moves to harvested with
//!    `If-Match`, so the batch is marked harvested exactly once, after every shard.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use tokio::io::AsyncWriteExt;

use crate::batch_api::Batch;
use crate::ports::{
    BatchProvider, MAX_BATCH_MESSAGES, ObjectStore, OutgoingMessage, Queue, StoreError,
    WriteCondition,
};
use crate::records::{HarvestCounts, HarvestRequest, Manifest, state_keys};

use super::lines::{MAX_LINE_BYTES, RawLine, read_raw_line};
use super::state::read_json;
use super::{HarvestConfig, HarvestError, ShardConfig};

/// One provider file copied into the bucket.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CopiedFile {
    /// The provider's file id (named in reasons).
    pub file_id: String,
    pub key: String,
    pub bytes: u64,
}

/// The bytes `start..end` of one copied file: whole lines.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardRange {
    pub file: usize,
    pub start: u64,
    pub end: u64,
}

/// `state/shards/<batch>/plan.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardPlan {
    pub batch_id: String,
    pub manifest: String,
    pub files: Vec<CopiedFile>,
    pub shards: Vec<ShardRange>,
    /// Files the provider no longer has, for the reasons of the items nobody saw.
    #[serde(default)]
    pub unreadable: Vec<String>,
    /// When the shard requests were last queued (unix seconds); `None` until they were.
    #[serde(default)]
    pub sent_at: Option<u64>,
}

/// `state/shards/<batch>/done-<n>.json`: what one shard did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardDone {
    pub shard: u32,
    pub counts: HarvestCounts,
    /// Custom ids the shard settled (answered or sent round again).
    pub seen: Vec<String>,
    /// Lines of its range that could not be read, for the reasons of unseen items.
    #[serde(default)]
    pub unreadable: Vec<String>,
}

/// True when this batch is to be harvested in shards.
pub(super) fn wants_shards<'c>(
    config: &'c HarvestConfig,
    manifest: &Manifest,
) -> Option<&'c ShardConfig> {
    config
        .shards
        .as_ref()
        .filter(|shards| manifest.items.len() > shards.requests_per_shard)
}

/// Plans the shards (once) and queues a request for every shard not yet done. Returns
/// the number of shards and how many were queued.
pub(super) async fn plan_and_dispatch<S: ObjectStore, Q: Queue, P: BatchProvider>(
    store: &S,
    queue: &Q,
    provider: &P,
    config: &HarvestConfig,
    shards: &ShardConfig,
    batch: &Batch,
    manifest: &Manifest,
) -> Result<(usize, usize), HarvestError> {
    let bucket = &config.bucket;
    let key = state_keys::shard_plan(&batch.id);
    let (mut plan, etag) = match read_json::<S, ShardPlan>(store, bucket, &key).await? {
        Some(found) => found,
        None => {
            let plan = make_plan(store, provider, config, shards, batch, manifest).await?;
            match store
                .put(
                    bucket,
                    &key,
                    serde_json::to_vec(&plan)?,
                    "application/json",
                    WriteCondition::IfAbsent,
                )
                .await
            {
                Ok(etag) => (plan, etag),
                // Another planner was first: its plan is the one every shard reads.
                Err(StoreError::ConditionFailed { .. }) => {
                    read_json::<S, ShardPlan>(store, bucket, &key)
                        .await?
                        .ok_or_else(|| HarvestError::InProgress {
                            batch_id: batch.id.clone(),
                        })?
                }
                Err(e) => return Err(e.into()),
            }
        }
    };
    let now = crate::records::unix_now();
    if plan
        .sent_at
        .is_some_and(|at| now.saturating_sub(at) < shards.resend_after.as_secs())
    {
        // Queued already, and the harvest queue retries its own messages.
        return Ok((plan.shards.len(), 0));
    }
    let done: std::collections::HashSet<String> = store
        .list(bucket, &state_keys::shard_done_prefix(&batch.id))
        .await?
        .into_iter()
        .collect();
    let requests: Vec<OutgoingMessage> = (0..plan.shards.len() as u32)
        .filter(|shard| !done.contains(&state_keys::shard_done(&batch.id, *shard)))
        .map(|shard| {
            let request = HarvestRequest {
                batch_id: Some(batch.id.clone()),
                manifest: Some(manifest.name.clone()),
                origin: "shard".into(),
                shard: Some(shard),
                delivery: None,
            };
            Ok(OutgoingMessage {
                id: format!("s{shard}"),
                body: serde_json::to_string(&request)?,
            })
        })
        .collect::<Result<_, HarvestError>>()?;
    for chunk in requests.chunks(MAX_BATCH_MESSAGES) {
        let refused = queue.send_batch(&shards.queue_url, chunk).await?;
        if !refused.is_empty() {
            // The next harvest request for the batch (a reconciliation) queues them again.
            return Err(HarvestError::Queue(crate::ports::QueueError::Other(
                format!(
                    "{} shard request(s) of batch {} were refused",
                    refused.len(),
                    batch.id
                ),
            )));
        }
    }
    if !requests.is_empty() {
        plan.sent_at = Some(now);
        match store
            .put(
                bucket,
                &key,
                serde_json::to_vec(&plan)?,
                "application/json",
                WriteCondition::IfMatch(etag),
            )
            .await
        {
            // Another run queued them too: the shards' idempotence absorbs it.
            Ok(_) | Err(StoreError::ConditionFailed { .. }) => {}
            Err(e) => return Err(e.into()),
        }
    }
    tracing::info!(batch_id = %batch.id, shards = plan.shards.len(), queued = requests.len(),
        "sharded harvest planned");
    Ok((plan.shards.len(), requests.len()))
}

/// Streams each of the batch's files into the bucket, cutting shards at line starts.
async fn make_plan<S: ObjectStore, P: BatchProvider>(
    store: &S,
    provider: &P,
    config: &HarvestConfig,
    shards: &ShardConfig,
    batch: &Batch,
    manifest: &Manifest,
) -> Result<ShardPlan, HarvestError> {
    let mut plan = ShardPlan {
        batch_id: batch.id.clone(),
        manifest: manifest.name.clone(),
        files: Vec::new(),
        shards: Vec::new(),
        unreadable: Vec::new(),
        sent_at: None,
    };
    let file_ids = [&batch.output_file_id, &batch.error_file_id]
        .into_iter()
        .flatten();
    for file_id in file_ids {
        let mut reader = match provider.open_file(file_id).await {
            Ok(reader) => reader,
            // As in a whole-batch harvest: a file the provider says is gone stays gone.
            Err(e) if matches!(e.status(), Some(404 | 410)) => {
                plan.unreadable
                    .push(format!("the provider has no file {file_id:?}: {e}"));
                continue;
            }
            Err(e) => return Err(e.into()),
        };
        let index = plan.files.len();
        let copy = TempFile::new(&batch.id, index)?;
        let mut out = tokio::io::BufWriter::new(tokio::fs::File::create(&copy.0).await?);
        let (mut offset, mut shard_start, mut lines) = (0u64, 0u64, 0usize);
        while let Some(raw) = read_raw_line(&mut reader, MAX_LINE_BYTES).await? {
            let bytes = match raw {
                // Too long to be an answer: left out of the copy, its item goes round
                // again (as a whole-batch harvest skips it).
                RawLine::TooLong(_) => continue,
                RawLine::Line(line) => line,
            };
            if lines == shards.requests_per_shard {
                plan.shards.push(ShardRange {
                    file: index,
                    start: shard_start,
                    end: offset,
                });
                (shard_start, lines) = (offset, 0);
            }
            out.write_all(&bytes).await?;
            out.write_all(b"\n").await?;
            offset += bytes.len() as u64 + 1;
            lines += 1;
        }
        out.flush().await?;
        drop(out);
        if offset > shard_start {
            plan.shards.push(ShardRange {
                file: index,
                start: shard_start,
                end: offset,
            });
        }
        let key = state_keys::batch_file_copy(&batch.id, index);
        store
            .put_file(&config.bucket, &key, &copy.0, "application/x-ndjson")
            .await?;
        plan.files.push(CopiedFile {
            file_id: file_id.clone(),
            key,
            bytes: offset,
        });
    }
    Ok(plan)
}

/// A local copy of a provider file, removed when dropped.
struct TempFile(PathBuf);

impl TempFile {
    fn new(batch_id: &str, index: usize) -> std::io::Result<Self> {
        let safe: String = batch_id
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
            .collect();
        let path = std::env::temp_dir().join(format!(
            "shotlabel-{safe}-{index}-{}.jsonl",
            rand::random::<u32>()
        ));
        Ok(Self(path))
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Reads a shard's plan, or says there is none yet.
pub(super) async fn read_plan<S: ObjectStore>(
    store: &S,
    config: &HarvestConfig,
    batch_id: &str,
) -> Result<ShardPlan, HarvestError> {
    read_json::<S, ShardPlan>(store, &config.bucket, &state_keys::shard_plan(batch_id))
        .await?
        .map(|(plan, _)| plan)
        .ok_or_else(|| HarvestError::NotOurs {
            batch_id: batch_id.to_owned(),
            reason: "a shard was asked for, but the batch has no shard plan".into(),
        })
}

/// The done markers of every shard, when all are there.
pub(super) async fn all_done<S: ObjectStore>(
    store: &S,
    config: &HarvestConfig,
    plan: &ShardPlan,
) -> Result<Option<Vec<ShardDone>>, HarvestError> {
    let keys = store
        .list(
            &config.bucket,
            &state_keys::shard_done_prefix(&plan.batch_id),
        )
        .await?;
    if keys.len() < plan.shards.len() {
        return Ok(None);
    }
    let mut done = Vec::with_capacity(keys.len());
    for shard in 0..plan.shards.len() as u32 {
        let key = state_keys::shard_done(&plan.batch_id, shard);
        match read_json::<S, ShardDone>(store, &config.bucket, &key).await? {
            Some((marker, _)) => done.push(marker),
            None => return Ok(None),
        }
    }
    Ok(Some(done))
}
