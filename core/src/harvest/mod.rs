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
mod state;

pub use lines::{MAX_LINE_BYTES, parse_output_line};

use batch::BatchHarvest;
use retries::requeue;
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

fn task_ref(task: &Task) -> TaskRef {
    TaskRef {
        name: task.name().to_owned(),
        version: task.version().to_owned(),
    }
}
