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

use serde::Serialize;

use crate::backpressure::release_slot;
use crate::batch_api::Batch;
use crate::dataset;
use crate::ports::{BatchProvider, ObjectStore, Queue, StoreError, WriteCondition};
use crate::records::{
    BatchPhase, BatchRecord, HarvestCounts, HarvestRequest, Layout, Manifest, TaskRef, state_keys,
    unix_now,
};
use crate::submit::METADATA_MANIFEST;
use crate::task::Task;
use crate::terminal::{RecordError, TerminalRecords};

mod batch;
mod lines;
mod retries;
pub mod shards;
mod state;

pub use lines::{MAX_LINE_BYTES, parse_output_line};

use batch::BatchHarvest;
use retries::requeue;
use shards::{ShardDone, plan_and_dispatch};
use state::{finish_record, read_json, remove_open_marker, resolve_batch_id};

#[derive(Debug, Clone)]
pub struct HarvestConfig {
    /// The bucket that holds manifests, state, labels and failed records.
    pub bucket: String,
    pub layout: Layout,
    pub pending_queue_url: String,
    pub task: Arc<Task>,
    /// Retries after the first attempt before an image is failed.
    pub max_retries: u32,
    /// Times an image may go round again because its batch failed (expired, cancelled,
    /// refused for capacity) before it is failed; these do not spend `max_retries`.
    pub max_requeues: u32,
    /// Sharded harvests of large batches; `None`: every batch is harvested in one run.
    pub shards: Option<ShardConfig>,
    /// Delete the batch's input, output and error files at the provider once the batch
    /// is recorded harvested, so that a long run does not fill the provider's storage.
    pub delete_provider_files: bool,
}

/// How large batches are harvested by several runs at once.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShardConfig {
    /// The harvest queue, where one message per shard goes.
    pub queue_url: String,
    /// Batches with more requests than this are sharded, this many requests a shard.
    pub requests_per_shard: usize,
    /// Shards still not done this long after their requests were queued are queued again
    /// by the next harvest request for the batch (a reconciliation): a shard message that
    /// went to the dead-letter queue must not leave its batch open for good.
    pub resend_after: std::time::Duration,
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
    /// A large batch: its shards were planned and `queued` of them sent to the harvest
    /// queue (those not done yet).
    Sharded {
        batch_id: String,
        shards: usize,
        queued: usize,
    },
    /// One shard harvested; `finished` when this run marked the batch harvested (it saw
    /// every shard done, and its write of the state record was the one that counted).
    ShardHarvested {
        batch_id: String,
        shard: u32,
        counts: HarvestCounts,
        finished: bool,
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
    #[error("writing the dataset part: {0}")]
    Dataset(#[from] crate::dataset::DatasetError),
}

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
        // A webhook that came before the batch finished must not use up its delivery
        // marker: a later delivery for the batch is then acted on, not taken for a repeat.
        if let Some(marker) = request
            .delivery
            .as_ref()
            .filter(|m| m.starts_with(state_keys::DELIVERIES_PREFIX))
            && let Err(e) = store.delete(bucket, marker).await
        {
            tracing::warn!(%batch_id, error = %e, "cannot release an early delivery's marker");
        }
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

    if let Some(shard) = request.shard {
        return Box::pin(harvest_shard(
            store, queue, provider, config, &batch, &manifest, shard,
        ))
        .await;
    }
    if let Some(shards) = shards::wants_shards(config, &manifest) {
        let (count, queued) = Box::pin(plan_and_dispatch(
            store, queue, provider, config, shards, &batch, &manifest,
        ))
        .await?;
        // Every shard is done, yet the batch is open: the shard that should have finished
        // it died after its done marker, and its message is gone. Finish it here.
        if queued == 0 {
            let plan = shards::read_plan(store, config, &batch_id).await?;
            if Box::pin(finish_shards(
                store, queue, provider, config, &batch, &manifest, &plan,
            ))
            .await?
            {
                let record =
                    read_json::<S, BatchRecord>(store, bucket, &state_keys::batch(&batch_id))
                        .await?;
                let counts = record.and_then(|(r, _)| r.harvest).unwrap_or_default();
                return Ok(HarvestOutcome::Harvested { batch_id, counts });
            }
        }
        return Ok(HarvestOutcome::Sharded {
            batch_id,
            shards: count,
            queued,
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
        rows: Vec::new(),
    };
    for file_id in [&batch.output_file_id, &batch.error_file_id]
        .into_iter()
        .flatten()
    {
        Box::pin(run.read_file(provider, file_id)).await?;
    }
    run.settle_missing().await?;
    let BatchHarvest {
        mut counts,
        results,
        retries,
        rows,
        ..
    } = run;
    write_part(store, config, &batch_id, 0, &rows).await?;
    let (retried, failed) = requeue(
        store,
        queue,
        config,
        records,
        &batch_id,
        &state_keys::retries(&batch_id),
        retries,
    )
    .await?;
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
    closed(store, bucket, &batch_id, &manifest).await;
    delete_provider_files(provider, config, &batch).await;
    tracing::info!(%batch_id, status = %batch.status, labelled = counts.labelled,
        retried = counts.retried, failed = counts.failed, duplicates = counts.duplicates,
        "batch harvested");
    Ok(HarvestOutcome::Harvested { batch_id, counts })
}

/// Writes the labels of one harvest (`part`: its shard, 0 for a whole batch) as its
/// dataset part, before anything marks the harvest done. Nothing when it labelled nothing.
async fn write_part<S: ObjectStore>(
    store: &S,
    config: &HarvestConfig,
    batch_id: &str,
    part: u32,
    rows: &[crate::records::LabelRecord],
) -> Result<(), HarvestError> {
    if rows.is_empty() {
        return Ok(());
    }
    let task = &config.task;
    let key = dataset::part_key(task.name(), task.version(), batch_id, part);
    let bytes = dataset::write_part(task, rows)?;
    store
        .put(
            &config.bucket,
            &key,
            bytes,
            dataset::PARQUET_CONTENT_TYPE,
            WriteCondition::Overwrite,
        )
        .await?;
    Ok(())
}

/// After the state record says harvested: the open marker and the batch's slot go.
async fn closed<S: ObjectStore>(store: &S, bucket: &str, batch_id: &str, manifest: &Manifest) {
    remove_open_marker(store, bucket, batch_id).await;
    if let Some(slot) = manifest.slot
        && let Err(e) = release_slot(store, bucket, slot, &manifest.name).await
    {
        // The next worker that finds every slot taken sees the batch harvested and
        // takes this one over.
        tracing::warn!(%batch_id, slot, error = %e, "cannot give back the batch's slot");
    }
}

/// Once the batch is recorded harvested, its files at the provider go (when configured):
/// every answer is in the bucket by then, and a repeated harvest stops at the record. Best
/// effort: a file left behind expires by the provider's own rule (OpenAI: 30 days).
async fn delete_provider_files<P: BatchProvider>(
    provider: &P,
    config: &HarvestConfig,
    batch: &Batch,
) {
    if !config.delete_provider_files {
        return;
    }
    for file_id in [
        &batch.input_file_id,
        &batch.output_file_id,
        &batch.error_file_id,
    ]
    .into_iter()
    .flatten()
    {
        if let Err(e) = provider.delete_file(file_id).await {
            tracing::warn!(batch_id = %batch.id, %file_id, error = %e,
                "cannot delete a harvested batch's file at the provider");
        }
    }
}

/// One shard of a sharded harvest, then the batch's finish if it was the last.
async fn harvest_shard<S: ObjectStore, Q: Queue, P: BatchProvider>(
    store: &S,
    queue: &Q,
    provider: &P,
    config: &HarvestConfig,
    batch: &Batch,
    manifest: &Manifest,
    shard: u32,
) -> Result<HarvestOutcome, HarvestError> {
    let bucket = &config.bucket;
    let done_key = state_keys::shard_done(&batch.id, shard);
    let plan = shards::read_plan(store, config, &batch.id).await?;
    let counts = match read_json::<S, ShardDone>(store, bucket, &done_key).await? {
        // Done before (a redelivered message): only the finish may be left.
        Some((done, _)) => done.counts,
        None => {
            let range =
                plan.shards
                    .get(shard as usize)
                    .copied()
                    .ok_or_else(|| HarvestError::NotOurs {
                        batch_id: batch.id.clone(),
                        reason: format!("its plan has no shard {shard}"),
                    })?;
            let file = plan
                .files
                .get(range.file)
                .ok_or_else(|| HarvestError::NotOurs {
                    batch_id: batch.id.clone(),
                    reason: format!("its plan has no file {}", range.file),
                })?;
            let bytes = store
                .get_range(bucket, &file.key, range.start, range.end)
                .await?;
            let task = task_ref(&config.task);
            let records = TerminalRecords::new(store, &config.layout, &task);
            let mut run = BatchHarvest {
                config,
                records,
                batch,
                manifest,
                seen: HashSet::new(),
                counts: HarvestCounts::default(),
                results: Vec::new(),
                retries: Vec::new(),
                unreadable: Vec::new(),
                rows: Vec::new(),
            };
            Box::pin(run.read_lines(Box::pin(std::io::Cursor::new(bytes)), &file.file_id)).await?;
            let BatchHarvest {
                mut counts,
                results,
                retries,
                seen,
                unreadable,
                rows,
                ..
            } = run;
            write_part(store, config, &batch.id, shard, &rows).await?;
            let plan_key = state_keys::shard_retries(&batch.id, shard);
            let (retried, failed) =
                requeue(store, queue, config, records, &batch.id, &plan_key, retries).await?;
            counts.retried += retried;
            counts.failed += failed;
            store
                .put(
                    bucket,
                    &state_keys::shard_results(&batch.id, shard),
                    results,
                    "application/x-ndjson",
                    WriteCondition::Overwrite,
                )
                .await?;
            let done = ShardDone {
                shard,
                counts,
                seen: seen.into_iter().collect(),
                unreadable,
            };
            store
                .put(
                    bucket,
                    &done_key,
                    serde_json::to_vec(&done)?,
                    "application/json",
                    WriteCondition::Overwrite,
                )
                .await?;
            counts
        }
    };
    let finished = Box::pin(finish_shards(
        store, queue, provider, config, batch, manifest, &plan,
    ))
    .await?;
    Ok(HarvestOutcome::ShardHarvested {
        batch_id: batch.id.clone(),
        shard,
        counts,
        finished,
    })
}

/// When every shard is done: settles the items no shard saw, and marks the batch
/// harvested (once: the state record moves with `If-Match`). `true` only for the call
/// that moved it; `false` while shards remain, or when another finished it.
async fn finish_shards<S: ObjectStore, Q: Queue, P: BatchProvider>(
    store: &S,
    queue: &Q,
    provider: &P,
    config: &HarvestConfig,
    batch: &Batch,
    manifest: &Manifest,
    plan: &shards::ShardPlan,
) -> Result<bool, HarvestError> {
    let Some(done) = shards::all_done(store, config, plan).await? else {
        return Ok(false);
    };
    let bucket = &config.bucket;
    let record = read_json::<S, BatchRecord>(store, bucket, &state_keys::batch(&batch.id)).await?;
    if let Some((record, _)) = &record
        && record.phase == BatchPhase::Harvested
    {
        closed(store, bucket, &batch.id, manifest).await;
        return Ok(false);
    }
    let task = task_ref(&config.task);
    let records = TerminalRecords::new(store, &config.layout, &task);
    let mut counts = HarvestCounts::default();
    let mut seen = HashSet::new();
    let mut unreadable = plan.unreadable.clone();
    for shard in done {
        counts.add(&shard.counts);
        seen.extend(shard.seen);
        unreadable.extend(shard.unreadable);
    }
    let mut run = BatchHarvest {
        config,
        records,
        batch,
        manifest,
        seen,
        counts: HarvestCounts::default(),
        results: Vec::new(),
        retries: Vec::new(),
        unreadable,
        rows: Vec::new(),
    };
    run.settle_missing().await?;
    let BatchHarvest {
        counts: settled,
        results,
        retries,
        ..
    } = run;
    counts.add(&settled);
    let plan_key = state_keys::retries(&batch.id);
    let (retried, failed) =
        requeue(store, queue, config, records, &batch.id, &plan_key, retries).await?;
    counts.retried += retried;
    counts.failed += failed;
    store
        .put(
            bucket,
            &state_keys::results(&batch.id),
            results,
            "application/x-ndjson",
            WriteCondition::Overwrite,
        )
        .await?;
    let moved = finish_record(store, config, batch, manifest, record, counts).await?;
    closed(store, bucket, &batch.id, manifest).await;
    if moved {
        delete_provider_files(provider, config, batch).await;
        tracing::info!(batch_id = %batch.id, shards = plan.shards.len(), labelled = counts.labelled,
            retried = counts.retried, failed = counts.failed, duplicates = counts.duplicates,
            "sharded batch harvested");
    }
    Ok(moved)
}

/// What reconciliation did.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct ReconcileReport {
    pub open: usize,
    pub harvested: usize,
    pub still_running: usize,
    /// Finished batches handed to shards on the harvest queue.
    pub sharded: usize,
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
            shard: None,
            delivery: None,
        };
        match Box::pin(harvest(store, queue, provider, config, &request)).await {
            Ok(HarvestOutcome::NotFinished { .. }) => report.still_running += 1,
            Ok(HarvestOutcome::Harvested { counts, .. }) => {
                report.harvested += 1;
                report.counts.add(&counts);
            }
            Ok(HarvestOutcome::AlreadyHarvested { .. }) => report.harvested += 1,
            // Its shards are on the harvest queue; the last one finishes it.
            Ok(HarvestOutcome::Sharded { .. } | HarvestOutcome::ShardHarvested { .. }) => {
                report.sharded += 1;
            }
            Err(e) => report.errors.push(format!("{batch_id}: {e}")),
        }
    }
    Ok(report)
}

fn task_ref(task: &Task) -> TaskRef {
    TaskRef {
        name: task.name().to_owned(),
        version: task.version().to_owned(),
    }
}
