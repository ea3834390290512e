//! One finished batch's files read into labels, retries, failed records and result lines.

use std::collections::HashSet;

use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use serde_json::{Value, json};

use crate::answer::{Answer, LineOutcome, Usage, interpret_line};
use crate::batch_api::{Batch, BatchStatus};
use crate::ports::{BatchProvider, ObjectStore};
use crate::records::{
    HarvestCounts, LabelRecord, Manifest, PendingItem, Provenance, RecordStatus, Stage, unix_now,
};
use crate::terminal::{FailedWrite, LabelWrite, TerminalRecords};

use super::lines::{MAX_LINE_BYTES, RawLine, parse_output_line, read_raw_line};
use super::{HarvestConfig, HarvestError, task_ref};

/// Codes of a batch-level failure that resubmitting the same requests cannot fix: the
/// file itself was rejected. (`file_too_large`, `too_many_tasks` and OpenAI's
/// `token_limit_exceeded` are not here: the same items in smaller files, or later, can
/// succeed, so those go round again.) OpenAI publishes no list of codes: these are the
/// spellings seen from OpenAI (`invalid_json_line`) and documented for Azure OpenAI's
/// Batch API (`url_mismatch`, `model_mismatch`, …), then the batch emulator's own codes for
/// line faults no provider documents a code for. An unknown code is treated as passing,
/// so it costs requeues (bounded by `max_requeues`), never a wrongly failed image.
const PERMANENT_BATCH_ERRORS: [&str; 14] = [
    "invalid_request",
    "invalid_json_line",
    "empty_file",
    "empty_batch",
    "duplicate_custom_id",
    "url_mismatch",
    "model_mismatch",
    "model_not_found",
    "invalid_file_format",
    "missing_custom_id",
    "invalid_method",
    "missing_body",
    "missing_model",
    "invalid_model",
];

/// Label writes a harvest keeps in flight at once. One at a time, S3's 20-50 ms per PUT
/// would hold a 50,000-answer batch for longer than a Lambda may run (15 minutes); writes
/// for different images are independent, and two for the same label key never overlap.
const LABEL_WRITES_IN_FLIGHT: usize = 32;

/// What one finished label write reports back to the harvest.
struct LabelDone<'a> {
    custom_id: String,
    item: &'a PendingItem,
    key: String,
    record: LabelRecord,
    written: Result<LabelWrite, HarvestError>,
}

pub(super) struct BatchHarvest<'a, S> {
    pub(super) config: &'a HarvestConfig,
    pub(super) records: TerminalRecords<'a, S>,
    pub(super) batch: &'a Batch,
    pub(super) manifest: &'a Manifest,
    pub(super) seen: HashSet<String>,
    pub(super) counts: HarvestCounts,
    /// `results/<batch id>.jsonl`, one line per item.
    pub(super) results: Vec<u8>,
    /// Items to go round again, already one attempt later.
    pub(super) retries: Vec<PendingItem>,
    /// What could not be read of the batch's files (a file the provider says is gone,
    /// lines that are not output lines or are too long), for the reasons of the items
    /// left without an answer.
    pub(super) unreadable: Vec<String>,
    /// The labels this harvest wrote, or found it had written before: its dataset part.
    pub(super) rows: Vec<LabelRecord>,
}

impl<'a, S: ObjectStore> BatchHarvest<'a, S> {
    /// Streams one output or error file line by line. Labels are written up to
    /// [`LABEL_WRITES_IN_FLIGHT`] at a time while the file is read on.
    pub(super) async fn read_file<P: BatchProvider>(
        &mut self,
        provider: &P,
        file_id: &str,
    ) -> Result<(), HarvestError> {
        let reader = match provider.open_file(file_id).await {
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
        self.read_lines(reader, file_id).await
    }

    /// Reads output or error lines (a whole file, or a shard's range of one) and settles
    /// each item they answer. `file` names the file in reasons.
    pub(super) async fn read_lines(
        &mut self,
        mut reader: crate::ports::LineReader,
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
                            record,
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
    pub(super) async fn settle_missing(&mut self) -> Result<(), HarvestError> {
        // The batch ended early, not because of these images: they go round again without
        // spending their retries (a separate, looser bound applies).
        let batch_level = matches!(
            self.batch.status,
            BatchStatus::Failed | BatchStatus::Expired | BatchStatus::Cancelled
        );
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
            } else if batch_level {
                self.requeue(&id, &item, reason.clone()).await?;
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

    /// Sends an item round again after its batch failed: its attempt is not spent.
    async fn requeue(
        &mut self,
        custom_id: &str,
        item: &PendingItem,
        reason: String,
    ) -> Result<(), HarvestError> {
        if self.already_labelled(item).await? {
            self.counts.duplicates += 1;
            self.result(custom_id, item, json!({"outcome": "duplicate"}));
            return Ok(());
        }
        let next = item.requeued(reason.clone());
        let outcome = if next.requeues <= self.config.max_requeues {
            "retry"
        } else {
            "failed"
        };
        self.result(
            custom_id,
            item,
            json!({"outcome": outcome, "stage": Stage::Batch, "reason": reason}),
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
        let mut record = done.record;
        let outcome = match done.written? {
            LabelWrite::Written => {
                self.counts.labelled += 1;
                "labelled"
            }
            LabelWrite::AlreadyOurs { labelled_at } => {
                // The stored label's time, so that the part is written the same again.
                record.labelled_at = labelled_at.unwrap_or(record.labelled_at);
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
            json!({"outcome": outcome, "label": record.label}),
        );
        if outcome == "labelled" {
            self.rows.push(record);
        }
        Ok(())
    }
}
