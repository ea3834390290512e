//! Harvest: a finished batch's output and error files become labels, retries and failed
//! records. Shared by the webhook's harvest handler and the submitter's reconciliation.
//!
//! Idempotent by construction: labels are written with conditional writes and recognise
//! their own earlier copy; the retries of a batch are planned once in S3 before they are
//! sent; the state record moves to harvested last. Running it twice, or two at once, or
//! again after a crash half-way, writes each label once and requeues nothing twice.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tokio::io::AsyncBufReadExt;

use crate::answer::{Answer, LineOutcome, Usage, interpret_line};
use crate::batch_api::{Batch, BatchStatus, OutputLine};
use crate::ports::{BatchProvider, ObjectStore, Queue, StoreError, WriteCondition};
use crate::records::{
    BatchPhase, BatchRecord, HarvestCounts, HarvestRequest, LabelRecord, Layout, Manifest,
    PendingItem, Provenance, RecordStatus, Stage, TaskRef, state_keys, unix_now,
};
use crate::submit::METADATA_MANIFEST;
use crate::task::Task;
use crate::terminal::{FailedWrite, LabelWrite, RecordError, TerminalRecords, send_pending};

#[derive(Debug, Clone)]
pub struct HarvestConfig {
    /// The bucket that holds manifests, state, labels and failed records.
    pub bucket: String,
    pub layout: Layout,
    pub pending_queue_url: String,
    pub task: Arc<Task>,
    /// Retries after the first attempt before an image is failed.
    pub max_retries: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "outcome", rename_all = "snake_case")]
pub enum HarvestOutcome {
    /// The provider says the batch is still running; nothing was done.
    NotFinished { batch_id: String, status: String },
    /// Harvested before (a duplicate webhook, or reconciliation after a webhook).
    AlreadyHarvested { batch_id: String },
    Harvested {
        batch_id: String,
        counts: HarvestCounts,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum HarvestError {
    #[error("the harvest request names neither a batch nor a known manifest")]
    Unresolvable,
    #[error("batch {batch_id} is not one of ours: {reason}")]
    NotOurs { batch_id: String, reason: String },
    #[error(
        "batch {batch_id} was made under task version {batch_version}, this harvester runs {ours}"
    )]
    TaskMismatch {
        batch_id: String,
        batch_version: String,
        ours: String,
    },
    #[error("batch {batch_id}: another harvest has planned its retries but not sent them yet")]
    InProgress { batch_id: String },
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Records(#[from] RecordError),
    #[error(transparent)]
    Queue(#[from] crate::ports::QueueError),
    #[error(transparent)]
    Provider(#[from] crate::batch_api::BatchApiError),
    #[error("reading a batch file: {0}")]
    Read(#[from] std::io::Error),
    #[error("encoding: {0}")]
    Encode(#[from] serde_json::Error),
}

/// Codes of a batch-level failure that resubmitting the same requests cannot fix: the
/// file itself was rejected. (`file_too_large` and `too_many_requests` are not here: the
/// same items in smaller files can succeed, so those go round again.)
const PERMANENT_BATCH_ERRORS: [&str; 13] = [
    "invalid_request",
    "invalid_file_format",
    "empty_file",
    "invalid_json_line",
    "duplicate_custom_id",
    "missing_custom_id",
    "invalid_method",
    "invalid_url",
    "missing_body",
    "mismatched_model",
    "missing_model",
    "model_not_found",
    "invalid_model",
];

/// Harvests one batch if the provider says it is finished.
pub async fn harvest<S: ObjectStore, Q: Queue, P: BatchProvider>(
    store: &S,
    queue: &Q,
    provider: &P,
    config: &HarvestConfig,
    request: &HarvestRequest,
) -> Result<HarvestOutcome, HarvestError> {
    let bucket = &config.bucket;
    let batch_id = resolve_batch_id(store, bucket, request).await?;
    let record = read_json::<S, BatchRecord>(store, bucket, &state_keys::batch(&batch_id)).await?;
    if let Some((record, _)) = &record
        && record.phase == BatchPhase::Harvested
    {
        remove_open_marker(store, bucket, &batch_id).await;
        return Ok(HarvestOutcome::AlreadyHarvested { batch_id });
    }

    // Never trust a webhook's payload: the provider's word decides.
    let batch = provider.retrieve(&batch_id).await?;
    if !batch.status.is_terminal() {
        return Ok(HarvestOutcome::NotFinished {
            batch_id,
            status: batch.status.to_string(),
        });
    }
    tracing::debug!(%batch_id, status = %batch.status, "harvest started");
    let manifest_name = batch
        .metadata
        .get(METADATA_MANIFEST)
        .cloned()
        .or_else(|| record.as_ref().map(|(r, _)| r.manifest.clone()))
        .or_else(|| request.manifest.clone())
        .ok_or_else(|| HarvestError::NotOurs {
            batch_id: batch_id.clone(),
            reason: "it names no manifest".into(),
        })?;
    let Some((manifest, _)) =
        read_json::<S, Manifest>(store, bucket, &state_keys::manifest(&manifest_name)).await?
    else {
        return Err(HarvestError::NotOurs {
            batch_id,
            reason: format!("there is no manifest {manifest_name}"),
        });
    };
    if manifest.task.version != config.task.version() {
        return Err(HarvestError::TaskMismatch {
            batch_id,
            batch_version: manifest.task.version,
            ours: config.task.version().to_owned(),
        });
    }

    let task = task_ref(&config.task);
    let records = TerminalRecords::new(store, &config.layout, &task);
    let mut run = BatchHarvest {
        config,
        records,
        batch: &batch,
        manifest: &manifest,
        seen: HashSet::new(),
        counts: HarvestCounts::default(),
        results: Vec::new(),
        retries: Vec::new(),
        unreadable: Vec::new(),
    };
    for file_id in [&batch.output_file_id, &batch.error_file_id]
        .into_iter()
        .flatten()
    {
        run.read_file(provider, file_id).await?;
    }
    run.settle_missing().await?;
    let BatchHarvest {
        mut counts,
        results,
        retries,
        ..
    } = run;
    let (retried, failed) = requeue(store, queue, config, records, &batch_id, retries).await?;
    counts.retried += retried;
    counts.failed += failed;

    store
        .put(
            bucket,
            &state_keys::results(&batch_id),
            results,
            "application/x-ndjson",
            WriteCondition::Overwrite,
        )
        .await?;
    finish_record(store, config, &batch, &manifest, record, counts).await?;
    remove_open_marker(store, bucket, &batch_id).await;
    tracing::info!(%batch_id, status = %batch.status, labelled = counts.labelled,
        retried = counts.retried, failed = counts.failed, duplicates = counts.duplicates,
        "batch harvested");
    Ok(HarvestOutcome::Harvested { batch_id, counts })
}

/// One line of an output or error file, as [`harvest`] reads it: the bytes between two
/// newlines (a trailing `\r` is whitespace). `None` for a blank line, which is skipped;
/// otherwise the parsed line, or why it is not one (not UTF-8, not JSON, or no
/// `custom_id`), in which case the line is skipped and its item goes round again.
pub fn parse_output_line(line: &[u8]) -> Option<Result<OutputLine, serde_json::Error>> {
    if line.trim_ascii().is_empty() {
        return None;
    }
    Some(serde_json::from_slice(line))
}

/// What reconciliation did.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct ReconcileReport {
    pub open: usize,
    pub harvested: usize,
    pub still_running: usize,
    pub skipped_young: usize,
    /// What the harvests it ran did, summed.
    pub counts: HarvestCounts,
    pub errors: Vec<String>,
}

/// Asks the provider about every open batch submitted at least `min_age` ago and
/// harvests those that finished: a lost webhook costs latency, never data.
pub async fn reconcile<S: ObjectStore, Q: Queue, P: BatchProvider>(
    store: &S,
    queue: &Q,
    provider: &P,
    config: &HarvestConfig,
    min_age: Duration,
) -> Result<ReconcileReport, HarvestError> {
    let mut report = ReconcileReport::default();
    let now = unix_now();
    for key in store.list(&config.bucket, state_keys::OPEN_PREFIX).await? {
        let Some(batch_id) = state_keys::batch_id_of_marker(&key) else {
            continue;
        };
        report.open += 1;
        if !min_age.is_zero() {
            let record =
                read_json::<S, BatchRecord>(store, &config.bucket, &state_keys::batch(&batch_id))
                    .await?;
            if let Some((record, _)) = record
                && now.saturating_sub(record.submitted_at) < min_age.as_secs()
            {
                report.skipped_young += 1;
                continue;
            }
        }
        let request = HarvestRequest {
            batch_id: Some(batch_id.clone()),
            manifest: None,
            origin: "reconcile".into(),
        };
        match harvest(store, queue, provider, config, &request).await {
            Ok(HarvestOutcome::NotFinished { .. }) => report.still_running += 1,
            Ok(HarvestOutcome::Harvested { counts, .. }) => {
                report.harvested += 1;
                report.counts.add(&counts);
            }
            Ok(HarvestOutcome::AlreadyHarvested { .. }) => report.harvested += 1,
            Err(e) => report.errors.push(format!("{batch_id}: {e}")),
        }
    }
    Ok(report)
}

async fn resolve_batch_id<S: ObjectStore>(
    store: &S,
    bucket: &str,
    request: &HarvestRequest,
) -> Result<String, HarvestError> {
    if let Some(id) = request.batch_id.as_deref().filter(|id| !id.is_empty()) {
        return Ok(id.to_owned());
    }
    let Some(manifest) = request.manifest.as_deref() else {
        return Err(HarvestError::Unresolvable);
    };
    match store
        .get(bucket, &state_keys::manifest_batch(manifest))
        .await
    {
        Ok(object) => String::from_utf8(object.body)
            .ok()
            .filter(|id| !id.is_empty())
            .ok_or(HarvestError::Unresolvable),
        Err(StoreError::NotFound { .. }) => Err(HarvestError::Unresolvable),
        Err(e) => Err(e.into()),
    }
}

/// A JSON object and its etag, or `None` when absent.
async fn read_json<S: ObjectStore, T: serde::de::DeserializeOwned>(
    store: &S,
    bucket: &str,
    key: &str,
) -> Result<Option<(T, String)>, HarvestError> {
    match store.get(bucket, key).await {
        Ok(object) => Ok(Some((serde_json::from_slice(&object.body)?, object.etag))),
        Err(StoreError::NotFound { .. }) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

async fn remove_open_marker<S: ObjectStore>(store: &S, bucket: &str, batch_id: &str) {
    if let Err(e) = store
        .delete(bucket, &state_keys::open_marker(batch_id))
        .await
    {
        // Reconciliation will find the batch harvested and try again.
        tracing::warn!(%batch_id, error = %e, "cannot remove the open marker");
    }
}

/// Moves the state record to harvested, creating it if the submitter crashed before
/// writing it. A lost race means another harvest finished the same batch: fine.
async fn finish_record<S: ObjectStore>(
    store: &S,
    config: &HarvestConfig,
    batch: &Batch,
    manifest: &Manifest,
    record: Option<(BatchRecord, String)>,
    counts: HarvestCounts,
) -> Result<(), HarvestError> {
    let (mut next, condition) = match record {
        Some((record, etag)) => (record, WriteCondition::IfMatch(etag)),
        None => (
            BatchRecord {
                batch_id: batch.id.clone(),
                manifest: manifest.name.clone(),
                submission_id: manifest.submission_id.clone(),
                input_file_id: batch.input_file_id.clone().unwrap_or_default(),
                requests: manifest.items.len() as u64,
                bytes: 0,
                task: manifest.task.clone(),
                model: manifest.model.clone(),
                phase: BatchPhase::Open,
                submitted_at: manifest.created_at,
                provider_status: None,
                harvest: None,
                harvested_at: None,
            },
            WriteCondition::IfAbsent,
        ),
    };
    next.phase = BatchPhase::Harvested;
    next.provider_status = Some(batch.status.to_string());
    next.harvest = Some(counts);
    next.harvested_at = Some(unix_now());
    let body = serde_json::to_vec_pretty(&next)?;
    match store
        .put(
            &config.bucket,
            &state_keys::batch(&batch.id),
            body,
            "application/json",
            condition,
        )
        .await
    {
        Ok(_) | Err(StoreError::ConditionFailed { .. }) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// A retry decided during a harvest: the item one attempt later.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct RetryPlan {
    items: Vec<PendingItem>,
    sent: bool,
}

/// Requeues the retries of a batch exactly once: the plan is written to S3 before it is
/// sent and marked sent after, so a second harvest reuses the first one's decision.
/// Returns (requeued, failed).
async fn requeue<S: ObjectStore, Q: Queue>(
    store: &S,
    queue: &Q,
    config: &HarvestConfig,
    records: TerminalRecords<'_, S>,
    batch_id: &str,
    retries: Vec<PendingItem>,
) -> Result<(u64, u64), HarvestError> {
    let (requeue, exhausted): (Vec<_>, Vec<_>) = retries
        .into_iter()
        .partition(|item| item.attempt <= config.max_retries);
    let mut failed = 0;
    for item in exhausted {
        if records.write_failed(item.source(), item.reasons).await? == FailedWrite::Written {
            failed += 1;
        }
    }
    if requeue.is_empty() {
        return Ok((0, failed));
    }
    let key = state_keys::retries(batch_id);
    let plan = RetryPlan {
        items: requeue,
        sent: false,
    };
    let (plan, etag) = match store
        .put(
            &config.bucket,
            &key,
            serde_json::to_vec(&plan)?,
            "application/json",
            WriteCondition::IfAbsent,
        )
        .await
    {
        Ok(etag) => (plan, etag),
        Err(StoreError::ConditionFailed { .. }) => {
            let Some((earlier, etag)) =
                read_json::<S, RetryPlan>(store, &config.bucket, &key).await?
            else {
                return Err(HarvestError::InProgress {
                    batch_id: batch_id.to_owned(),
                });
            };
            if earlier.sent {
                return Ok((earlier.items.len() as u64, failed));
            }
            (earlier, etag)
        }
        Err(e) => return Err(e.into()),
    };
    send_pending(queue, &config.pending_queue_url, &plan.items).await?;
    let sent = RetryPlan {
        items: plan.items,
        sent: true,
    };
    let count = sent.items.len() as u64;
    match store
        .put(
            &config.bucket,
            &key,
            serde_json::to_vec(&sent)?,
            "application/json",
            WriteCondition::IfMatch(etag),
        )
        .await
    {
        Ok(_) | Err(StoreError::ConditionFailed { .. }) => {}
        Err(e) => return Err(e.into()),
    }
    Ok((count, failed))
}

fn task_ref(task: &Task) -> TaskRef {
    TaskRef {
        name: task.name().to_owned(),
        version: task.version().to_owned(),
    }
}

/// Label writes a harvest keeps in flight at once. One at a time, S3's 20-50 ms per PUT
/// would hold a 50,000-answer batch for longer than a Lambda may run (15 minutes); writes
/// for different images are independent, and two for the same label key never overlap.
const LABEL_WRITES_IN_FLIGHT: usize = 32;

/// What one finished label write reports back to the harvest.
struct LabelDone<'a> {
    custom_id: String,
    item: &'a PendingItem,
    key: String,
    label: Value,
    written: Result<LabelWrite, HarvestError>,
}

struct BatchHarvest<'a, S> {
    config: &'a HarvestConfig,
    records: TerminalRecords<'a, S>,
    batch: &'a Batch,
    manifest: &'a Manifest,
    seen: HashSet<String>,
    counts: HarvestCounts,
    /// `results/<batch id>.jsonl`, one line per item.
    results: Vec<u8>,
    /// Items to go round again, already one attempt later.
    retries: Vec<PendingItem>,
    /// What could not be read of the batch's files (a file the provider says is gone,
    /// lines that are not output lines or are too long), for the reasons of the items
    /// left without an answer.
    unreadable: Vec<String>,
}

/// The longest output or error line read. An answer line is a few kilobytes; a longer
/// line is junk and is skipped without being held in memory (its item goes round again).
pub const MAX_LINE_BYTES: usize = 8 * 1024 * 1024;

/// One line of a provider's file, read as bytes.
enum RawLine {
    Line(Vec<u8>),
    /// Over [`MAX_LINE_BYTES`]: this many bytes, dropped as they were read.
    TooLong(usize),
}

/// Reads the next line (without its `\n`), holding at most `max` bytes of it. A file
/// that ends without a newline still yields its last line. `None` at the end.
async fn read_raw_line<R: tokio::io::AsyncBufRead + Unpin>(
    reader: &mut R,
    max: usize,
) -> std::io::Result<Option<RawLine>> {
    let mut line = Vec::new();
    let mut total = 0usize;
    let mut started = false;
    loop {
        let available = reader.fill_buf().await?;
        if available.is_empty() {
            if !started {
                return Ok(None);
            }
            break;
        }
        started = true;
        let newline = available.iter().position(|b| *b == b'\n');
        let chunk = &available[..newline.unwrap_or(available.len())];
        total = total.saturating_add(chunk.len());
        if total <= max {
            line.extend_from_slice(chunk);
        } else if !line.is_empty() {
            line = Vec::new();
        }
        let used = newline.map_or(available.len(), |i| i + 1);
        reader.consume(used);
        if newline.is_some() {
            break;
        }
    }
    Ok(Some(if total > max {
        RawLine::TooLong(total)
    } else {
        RawLine::Line(line)
    }))
}

impl<'a, S: ObjectStore> BatchHarvest<'a, S> {
    /// Streams one output or error file line by line. Labels are written up to
    /// [`LABEL_WRITES_IN_FLIGHT`] at a time while the file is read on.
    async fn read_file<P: BatchProvider>(
        &mut self,
        provider: &P,
        file_id: &str,
    ) -> Result<(), HarvestError> {
        let manifest: &'a Manifest = self.manifest;
        let records = self.records;
        let mut writes = FuturesUnordered::new();
        // Label keys with a write in flight: a second item for the same key waits.
        let mut busy: HashSet<String> = HashSet::new();
        // Split on bytes, not `lines()`: one line that is not UTF-8 must cost its own item
        // a retry, not fail the whole file (and so the batch, at every harvest).
        // Lines are also bounded: one endless line must not hold the file in memory.
        let mut reader = match provider.open_file(file_id).await {
            Ok(reader) => reader,
            // The provider says the file does not exist: waiting will not bring it back.
            // Its items are left unseen and go round again with this reason. Any other
            // failure (the key refused, the provider down) fails the harvest, which is
            // retried later, so that nothing is resubmitted that may yet be read.
            Err(e) if matches!(e.status(), Some(404 | 410)) => {
                tracing::warn!(batch_id = %self.batch.id, error = %e, "a batch file is gone");
                self.unreadable
                    .push(format!("the provider has no file {file_id:?}: {e}"));
                return Ok(());
            }
            Err(e) => return Err(e.into()),
        };
        let (mut bad_lines, mut long_lines) = (0u64, 0u64);
        while let Some(raw) = read_raw_line(&mut reader, MAX_LINE_BYTES).await? {
            let line = match raw {
                RawLine::Line(line) => line,
                RawLine::TooLong(bytes) => {
                    tracing::warn!(batch_id = %self.batch.id, bytes, "an output line is too long; skipped");
                    long_lines += 1;
                    continue;
                }
            };
            let parsed = match parse_output_line(&line) {
                None => continue,
                Some(Ok(parsed)) => parsed,
                Some(Err(e)) => {
                    // Its item is not marked seen, so it goes round again below.
                    tracing::warn!(batch_id = %self.batch.id, error = %e, "an output line is not JSON");
                    bad_lines += 1;
                    continue;
                }
            };
            let Some(item) = manifest.items.get(&parsed.custom_id) else {
                tracing::warn!(batch_id = %self.batch.id, custom_id = %parsed.custom_id,
                    "an output line names no item of the manifest");
                continue;
            };
            if !self.seen.insert(parsed.custom_id.clone()) {
                continue;
            }
            let outcome = interpret_line(&parsed, &self.config.task);
            self.add_usage(outcome.usage());
            let key = records.label_key(&item.key);
            while busy.contains(&key) || writes.len() >= LABEL_WRITES_IN_FLIGHT {
                let Some(done) = writes.next().await else {
                    break;
                };
                self.label_written(done, &mut busy)?;
            }
            match outcome {
                LineOutcome::Answer(answer) => {
                    let record = self.label_record(&parsed.custom_id, item, &answer);
                    busy.insert(key.clone());
                    let custom_id = parsed.custom_id;
                    writes.push(async move {
                        let written = records
                            .write_label(item, &record)
                            .await
                            .map_err(HarvestError::from);
                        LabelDone {
                            custom_id,
                            item,
                            key,
                            label: answer.label,
                            written,
                        }
                    });
                }
                LineOutcome::Retry(retry) => {
                    self.retry(&parsed.custom_id, item, retry.stage, retry.reason)
                        .await?;
                }
            }
        }
        while let Some(done) = writes.next().await {
            self.label_written(done, &mut busy)?;
        }
        if bad_lines > 0 {
            self.unreadable.push(format!(
                "{bad_lines} line(s) of file {file_id:?} were not output lines"
            ));
        }
        if long_lines > 0 {
            self.unreadable.push(format!(
                "{long_lines} line(s) of file {file_id:?} were over {MAX_LINE_BYTES} bytes"
            ));
        }
        Ok(())
    }

    fn add_usage(&mut self, usage: Option<&Usage>) {
        if let Some(usage) = usage {
            // Saturating: the counts are the provider's word, and may be absurd.
            self.counts.prompt_tokens = self
                .counts
                .prompt_tokens
                .saturating_add(usage.prompt_tokens);
            self.counts.completion_tokens = self
                .counts
                .completion_tokens
                .saturating_add(usage.completion_tokens);
        }
    }

    /// Items in neither file: what became of them depends on how the batch ended.
    async fn settle_missing(&mut self) -> Result<(), HarvestError> {
        let (reason, permanent) = match &self.batch.status {
            BatchStatus::Failed => {
                let summary = self
                    .batch
                    .error_summary()
                    .unwrap_or_else(|| "no reason given".into());
                let codes: Vec<&str> = self
                    .batch
                    .errors
                    .iter()
                    .flat_map(|e| &e.data)
                    .filter_map(|e| e.code.as_deref())
                    .collect();
                let permanent =
                    !codes.is_empty() && codes.iter().all(|c| PERMANENT_BATCH_ERRORS.contains(c));
                (
                    format!("the provider failed the batch: {summary}"),
                    permanent,
                )
            }
            BatchStatus::Expired => (
                "the batch expired before this request was processed".to_owned(),
                false,
            ),
            BatchStatus::Cancelled => (
                "the batch was cancelled before this request was processed".to_owned(),
                false,
            ),
            _ => (
                "the request is in neither the output nor the error file".to_owned(),
                false,
            ),
        };
        let reason = if self.unreadable.is_empty() {
            reason
        } else {
            format!("{reason} ({})", self.unreadable.join("; "))
        };
        let missing: Vec<(String, PendingItem)> = self
            .manifest
            .items
            .iter()
            .filter(|(id, _)| !self.seen.contains(*id))
            .map(|(id, item)| (id.clone(), item.clone()))
            .collect();
        for (id, item) in missing {
            if permanent {
                let next = item.next_attempt(Stage::Provider, reason.clone());
                if self.already_labelled(&item).await? {
                    self.counts.duplicates += 1;
                    self.result(&id, &item, json!({"outcome": "duplicate"}));
                    continue;
                }
                if self
                    .records
                    .write_failed(item.source(), next.reasons)
                    .await?
                    == FailedWrite::Written
                {
                    self.counts.failed += 1;
                    self.result(&id, &item, json!({"outcome": "failed", "reason": reason}));
                } else {
                    self.counts.duplicates += 1;
                    self.result(&id, &item, json!({"outcome": "duplicate"}));
                }
            } else {
                self.retry(&id, &item, Stage::Provider, reason.clone())
                    .await?;
            }
        }
        Ok(())
    }

    fn result(&mut self, custom_id: &str, item: &PendingItem, mut outcome: Value) {
        outcome["custom_id"] = json!(custom_id);
        outcome["key"] = json!(item.key);
        outcome["attempt"] = json!(item.attempt);
        self.results
            .extend_from_slice(outcome.to_string().as_bytes());
        self.results.push(b'\n');
    }

    async fn retry(
        &mut self,
        custom_id: &str,
        item: &PendingItem,
        stage: Stage,
        reason: String,
    ) -> Result<(), HarvestError> {
        // An image labelled by another batch meanwhile needs nothing more.
        if self.already_labelled(item).await? {
            self.counts.duplicates += 1;
            self.result(custom_id, item, json!({"outcome": "duplicate"}));
            return Ok(());
        }
        let next = item.next_attempt(stage, reason.clone());
        let outcome = if next.attempt <= self.config.max_retries {
            "retry"
        } else {
            "failed"
        };
        self.result(
            custom_id,
            item,
            json!({"outcome": outcome, "stage": stage, "reason": reason}),
        );
        self.retries.push(next);
        Ok(())
    }

    /// True when a label for this exact content and task version exists.
    async fn already_labelled(&self, item: &PendingItem) -> Result<bool, HarvestError> {
        Ok(self
            .records
            .is_labelled(&item.bucket, &item.key, &item.etag)
            .await?)
    }

    /// The label record for an answer.
    fn label_record(&self, custom_id: &str, item: &PendingItem, answer: &Answer) -> LabelRecord {
        LabelRecord {
            status: RecordStatus::Labelled,
            label: answer.label.clone(),
            source: item.source(),
            task: task_ref(&self.config.task),
            model: answer
                .model
                .clone()
                .unwrap_or_else(|| self.manifest.model.clone()),
            provenance: Provenance {
                batch_id: self.batch.id.clone(),
                custom_id: custom_id.to_owned(),
                request_id: answer.request_id.clone(),
                finish_reason: answer.finish_reason.clone(),
                usage: answer.usage,
            },
            attempt: item.attempt,
            labelled_at: unix_now(),
        }
    }

    /// Counts a finished label write and records its result line.
    fn label_written(
        &mut self,
        done: LabelDone<'_>,
        busy: &mut HashSet<String>,
    ) -> Result<(), HarvestError> {
        busy.remove(&done.key);
        let outcome = match done.written? {
            LabelWrite::Written | LabelWrite::AlreadyOurs => {
                self.counts.labelled += 1;
                "labelled"
            }
            LabelWrite::Duplicate => {
                self.counts.duplicates += 1;
                "duplicate"
            }
            LabelWrite::Superseded => "superseded",
        };
        self.result(
            &done.custom_id,
            done.item,
            json!({"outcome": outcome, "label": done.label}),
        );
        Ok(())
    }
}
