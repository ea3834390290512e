//! What the pipeline writes: pending-queue messages, failed records, and where outputs go.

use serde::{Deserialize, Serialize};

/// One image waiting to be labelled: the body of a pending-queue message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PendingItem {
    pub bucket: String,
    pub key: String,
    pub size: u64,
    pub etag: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version_id: Option<String>,
    /// 0 for the first try; each retry adds one.
    #[serde(default)]
    pub attempt: u32,
    /// Why earlier attempts failed, oldest first.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub reasons: Vec<AttemptReason>,
    /// Times the item went round again because of its batch or the provider (expired,
    /// cancelled, refused for capacity), not its own answer; bounded separately and more
    /// loosely than `attempt`.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub requeues: u32,
    /// For a forced relabel: the etag of the label this item may replace. Without it, an
    /// existing label for the same content and task version wins (see ARCHITECTURE.md).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replace_label: Option<String>,
}

impl PendingItem {
    pub fn source(&self) -> SourceRef {
        SourceRef {
            bucket: self.bucket.clone(),
            key: self.key.clone(),
            etag: self.etag.clone(),
            size: self.size,
            version_id: self.version_id.clone(),
        }
    }

    /// The same image, one attempt later, with the reason this attempt failed.
    pub fn next_attempt(&self, stage: Stage, reason: String) -> Self {
        let mut next = self.clone();
        next.reasons.push(AttemptReason {
            attempt: self.attempt,
            stage,
            reason,
        });
        next.attempt += 1;
        next
    }

    /// The same image sent again after a failure of its batch, not of its answer: the
    /// reason is kept, the attempt is not spent.
    pub fn requeued(&self, reason: String) -> Self {
        self.requeued_at(Stage::Batch, reason)
    }

    /// As [`Self::requeued`], for a cause found at `stage` (an object that cannot be read
    /// for now, at prepare).
    pub fn requeued_at(&self, stage: Stage, reason: String) -> Self {
        let mut next = self.clone();
        next.reasons.push(AttemptReason {
            attempt: self.attempt,
            stage,
            reason,
        });
        next.requeues += 1;
        next
    }

    /// Identifies the content being labelled, whatever message or batch carries it.
    pub fn content_key(&self) -> (&str, &str, &str) {
        (&self.bucket, &self.key, &self.etag)
    }
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

/// Why one attempt at an image failed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AttemptReason {
    pub attempt: u32,
    pub stage: Stage,
    pub reason: String,
}

/// The stage of the pipeline an attempt failed at.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Stage {
    /// Refused on arrival (empty, too large).
    Enqueue,
    /// The image could not be read or prepared.
    Prepare,
    /// The provider reported the request failed, or the batch ended without it.
    Provider,
    /// An answer arrived but is not a usable label.
    Validate,
    /// The batch or the provider failed, not this image (expired, cancelled, capacity).
    Batch,
}

impl Stage {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Enqueue => "enqueue",
            Self::Prepare => "prepare",
            Self::Provider => "provider",
            Self::Validate => "validate",
            Self::Batch => "batch",
        }
    }
}

impl std::fmt::Display for Stage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What a terminal record says became of its image.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RecordStatus {
    Labelled,
    Failed,
}

/// The source image a record is about.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SourceRef {
    pub bucket: String,
    pub key: String,
    pub etag: String,
    pub size: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version_id: Option<String>,
}

/// The task a record was made under.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskRef {
    pub name: String,
    pub version: String,
}

/// The terminal record of an image that could not be labelled.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FailedRecord {
    /// Always [`RecordStatus::Failed`].
    pub status: RecordStatus,
    pub source: SourceRef,
    pub task: TaskRef,
    /// Every attempt's reason, oldest first.
    pub reasons: Vec<AttemptReason>,
    /// Unix seconds.
    pub recorded_at: u64,
}

impl FailedRecord {
    pub fn new(source: SourceRef, task: TaskRef, reasons: Vec<AttemptReason>) -> Self {
        Self {
            status: RecordStatus::Failed,
            source,
            task,
            reasons,
            recorded_at: unix_now(),
        }
    }
}

/// Seconds since the Unix epoch (0 if the clock is before it).
pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Where outputs for an input key go. Outputs mirror the input's path below the input
/// prefix, so `incoming/a/b.png` is labelled at `labels/a/b.png.json`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layout {
    input_prefix: String,
}

impl Layout {
    pub fn new(input_prefix: &str) -> Self {
        Self {
            input_prefix: input_prefix.to_owned(),
        }
    }

    pub fn input_prefix(&self) -> &str {
        &self.input_prefix
    }

    /// The key below the input prefix, or `None` when the key is not an input.
    pub fn relative<'k>(&self, key: &'k str) -> Option<&'k str> {
        key.strip_prefix(&self.input_prefix)
            .filter(|r| !r.is_empty())
    }

    /// The key below the input prefix, or the whole key for an object outside it (one a
    /// backfill queued from elsewhere in the bucket).
    pub fn relative_or_key<'k>(&self, key: &'k str) -> &'k str {
        self.relative(key).unwrap_or(key)
    }

    /// `labels/<relative>.json`, or its shortened form when that is over S3's key limit
    /// (see [`output_key`]).
    pub fn label_key(&self, relative: &str) -> String {
        output_key("labels/", relative)
    }

    /// `failed/<relative>.json`, or its shortened form when that is over S3's key limit
    /// (see [`output_key`]).
    pub fn failed_key(&self, relative: &str) -> String {
        output_key("failed/", relative)
    }
}

/// The longest object key S3 accepts, in bytes (UTF-8).
pub const MAX_KEY_BYTES: usize = 1024;

/// `<prefix><relative>.json` when it fits in [`MAX_KEY_BYTES`]; otherwise the longest
/// prefix of `relative` that fits (cut at a character boundary) followed by `~`, the first
/// 16 hex digits of SHA-256 over the whole `relative`, and `.json`.
///
/// An input key may itself be 1,024 bytes long, and its mirrored output key is then over
/// the limit: S3 would refuse every write of its label or failed record, and the image
/// would never reach a terminal record. The shortened key is a pure function of the
/// input key, so every reader that asks [`Layout`] finds it; the record inside names the
/// full source key.
pub fn output_key(prefix: &str, relative: &str) -> String {
    const EXT: &str = ".json";
    let whole = format!("{prefix}{relative}{EXT}");
    if whole.len() <= MAX_KEY_BYTES {
        return whole;
    }
    use sha2::Digest;
    let digest = sha2::Sha256::digest(relative.as_bytes());
    let suffix = format!("~{}{EXT}", hex::encode(&digest[..8]));
    let mut room = MAX_KEY_BYTES.saturating_sub(prefix.len() + suffix.len());
    while room > 0 && !relative.is_char_boundary(room) {
        room -= 1;
    }
    format!("{prefix}{}{suffix}", &relative[..room.min(relative.len())])
}

/// Where the pipeline keeps its own state in the bucket.
pub mod state_keys {
    /// A batch's manifest, named before the batch exists.
    pub fn manifest(name: &str) -> String {
        format!("state/manifests/{name}.json")
    }

    /// The record of one provider batch.
    pub fn batch(batch_id: &str) -> String {
        format!("state/batches/{}.json", safe_segment(batch_id))
    }

    /// The batch id created for a manifest: how a per-batch webhook, which names only
    /// its manifest, finds its batch.
    pub fn manifest_batch(name: &str) -> String {
        format!("state/manifest-batch/{name}")
    }

    /// Where webhook delivery markers are.
    pub const DELIVERIES_PREFIX: &str = "state/deliveries/";

    /// A webhook delivery already accepted (deduplication of at-least-once delivery).
    pub fn delivery(digest: &str) -> String {
        format!("{DELIVERIES_PREFIX}{digest}")
    }

    /// The retries a harvest decided for a batch, written before they are sent.
    pub fn retries(batch_id: &str) -> String {
        format!("state/retries/{}.json", safe_segment(batch_id))
    }

    pub const OPEN_PREFIX: &str = "state/open/";

    pub const SLOTS_PREFIX: &str = "state/slots/";

    /// One open-batch slot (provider backpressure, `crate::backpressure`).
    pub fn slot(index: u32) -> String {
        format!("{SLOTS_PREFIX}{index}")
    }

    /// When the latest batch file was uploaded, shared by every submit worker.
    pub const UPLOAD_CLOCK: &str = "state/provider/upload-clock";

    /// An empty marker present while a batch is open; reconciliation lists these.
    pub fn open_marker(batch_id: &str) -> String {
        format!("{OPEN_PREFIX}{}", safe_segment(batch_id))
    }

    /// The batch id an open marker stands for.
    pub fn batch_id_of_marker(key: &str) -> Option<String> {
        let segment = key.strip_prefix(OPEN_PREFIX)?;
        percent_encoding::percent_decode_str(segment)
            .decode_utf8()
            .ok()
            .map(|s| s.into_owned())
    }

    /// A sharded harvest's plan: the batch's files copied into the bucket and the
    /// line-aligned byte range each shard takes.
    pub fn shard_plan(batch_id: &str) -> String {
        format!("state/shards/{}/plan.json", safe_segment(batch_id))
    }

    /// Where a sharded harvest's done markers are.
    pub fn shard_done_prefix(batch_id: &str) -> String {
        format!("state/shards/{}/done-", safe_segment(batch_id))
    }

    /// One shard's done marker: its counts and the requests it saw.
    pub fn shard_done(batch_id: &str, shard: u32) -> String {
        format!("{}{shard:05}.json", shard_done_prefix(batch_id))
    }

    /// A provider file of a sharded batch, copied once into the bucket.
    pub fn batch_file_copy(batch_id: &str, file: usize) -> String {
        format!("state/outputs/{}/{file}.jsonl", safe_segment(batch_id))
    }

    /// The retries one shard decided (the batch's own key is for what the last shard
    /// settles).
    pub fn shard_retries(batch_id: &str, shard: u32) -> String {
        format!(
            "state/retries/{}-shard-{shard:05}.json",
            safe_segment(batch_id)
        )
    }

    /// One shard's result lines.
    pub fn shard_results(batch_id: &str, shard: u32) -> String {
        format!("results/{}/shard-{shard:05}.jsonl", safe_segment(batch_id))
    }

    /// One JSONL of a batch's results.
    pub fn results(batch_id: &str) -> String {
        format!("results/{}.jsonl", safe_segment(batch_id))
    }

    /// Provider ids are usually `batch_abc`, but nothing promises that: escape anything
    /// that is not plainly safe in a key.
    fn safe_segment(id: &str) -> String {
        const SAFE: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
            .remove(b'-')
            .remove(b'_')
            .remove(b'.');
        percent_encoding::utf8_percent_encode(id, SAFE).to_string()
    }
}

/// The items of one batch input file, written before the file is uploaded, so that
/// whatever comes back can be traced to its image.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    /// Unique per input file: `<submission id>-<file index>`.
    pub name: String,
    pub submission_id: String,
    pub task: TaskRef,
    pub model: String,
    /// Unix seconds.
    pub created_at: u64,
    /// custom_id → the image it asks about.
    pub items: std::collections::BTreeMap<String, PendingItem>,
    /// The open-batch slot the batch holds until it is harvested, when the provider's
    /// limits are set (`crate::backpressure`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub slot: Option<u32>,
}

/// Where a batch is in shotlabel's eyes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BatchPhase {
    Open,
    Harvested,
}

/// What a harvest did with a batch's items.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HarvestCounts {
    pub labelled: u64,
    pub retried: u64,
    pub failed: u64,
    /// Answers for images already labelled by another batch (after a crash or a
    /// duplicate event), not written.
    pub duplicates: u64,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
}

impl HarvestCounts {
    pub fn add(&mut self, other: &HarvestCounts) {
        self.labelled += other.labelled;
        self.retried += other.retried;
        self.failed += other.failed;
        self.duplicates += other.duplicates;
        // Token counts are the provider's word and may be absurd: saturate, never overflow.
        self.prompt_tokens = self.prompt_tokens.saturating_add(other.prompt_tokens);
        self.completion_tokens = self
            .completion_tokens
            .saturating_add(other.completion_tokens);
    }

    /// Its share of the metrics an invocation publishes.
    pub fn metrics(&self) -> crate::metrics::Counts {
        crate::metrics::Counts {
            images_labelled: self.labelled,
            images_retried: self.retried,
            images_failed: self.failed,
            tokens_used: self.prompt_tokens.saturating_add(self.completion_tokens),
            ..crate::metrics::Counts::default()
        }
    }
}

/// The state record of one provider batch: `state/batches/<batch id>.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BatchRecord {
    pub batch_id: String,
    pub manifest: String,
    pub submission_id: String,
    pub input_file_id: String,
    pub requests: u64,
    pub bytes: u64,
    pub task: TaskRef,
    pub model: String,
    pub phase: BatchPhase,
    /// Unix seconds.
    pub submitted_at: u64,
    /// The provider's status when last seen.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub provider_status: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub harvest: Option<HarvestCounts>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub harvested_at: Option<u64>,
}

/// A message on the harvest queue: a batch that may have finished. Either field may be
/// missing (a per-batch webhook knows its manifest; a signed event knows the batch id).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct HarvestRequest {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub batch_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub manifest: Option<String>,
    /// What asked for it: `webhook`, `reconcile`, an operator.
    #[serde(default)]
    pub origin: String,
    /// One shard of a sharded harvest (`crate::harvest::shards`); `None`: the whole batch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shard: Option<u32>,
    /// The webhook delivery marker this request was queued under: released when the
    /// provider says the batch is not finished yet, so that a later delivery for it is
    /// acted on rather than taken for a duplicate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delivery: Option<String>,
}

/// Where a label came from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Provenance {
    pub batch_id: String,
    pub custom_id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finish_reason: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub usage: Option<crate::answer::Usage>,
}

/// The labelled result of one image: `labels/<key below the input prefix>.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LabelRecord {
    /// Always [`RecordStatus::Labelled`].
    pub status: RecordStatus,
    /// The answer, valid against the task's schema.
    pub label: serde_json::Value,
    pub source: SourceRef,
    pub task: TaskRef,
    /// The model that answered, as the provider reported it.
    pub model: String,
    pub provenance: Provenance,
    /// 0 when labelled at the first try.
    pub attempt: u32,
    /// Unix seconds.
    pub labelled_at: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn output_keys_never_exceed_the_s3_limit() {
        let layout = Layout::new("incoming/");
        assert_eq!(layout.label_key("a/b.png"), "labels/a/b.png.json");
        // Fits exactly: unchanged.
        let fits = "x".repeat(MAX_KEY_BYTES - "labels/.json".len());
        assert_eq!(layout.label_key(&fits), format!("labels/{fits}.json"));
        for relative in [
            "y".repeat(MAX_KEY_BYTES - "incoming/".len()),
            "é".repeat(600),
            format!("{fits}z"),
        ] {
            for key in [layout.label_key(&relative), layout.failed_key(&relative)] {
                assert!(key.len() <= MAX_KEY_BYTES, "{} bytes", key.len());
                assert!(key.ends_with(".json"));
                assert!(key.starts_with("labels/") || key.starts_with("failed/"));
            }
            // Deterministic, and distinct for keys that differ only past the cut.
            assert_eq!(layout.label_key(&relative), layout.label_key(&relative));
            assert_ne!(
                layout.label_key(&relative),
                layout.label_key(&format!("{relative}2"))
            );
        }
    }
}
