//! The submit handler. On the schedule it reconciles open batches, then either starts
//! workers through the work queue (when one is configured) or drains the pending queue
//! itself. On a work-queue event it is one worker: it drains the pending queue into batches.

use std::time::Duration;

use shotlabel_aws::{
    S3Store, SqsQueue, batch_client, load_sdk_config, resolve_secret, s3_client_with, sqs_client,
};
use shotlabel_batch_client::BatchClient;
use shotlabel_core::dispatch::{DispatchConfig, DispatchReport, dispatch};
use shotlabel_core::harvest::{HarvestConfig, ReconcileReport, reconcile};
use shotlabel_core::ports::{BatchProvider, ObjectStore, Queue};
use shotlabel_core::settings::{FunctionSettings, SubmitSettings, WebhookMode};
use shotlabel_core::submit::{SubmitConfig, SubmitReport, run_submit};

/// Clients and settings, built once per cold start.
#[derive(Debug)]
pub struct Handler<S, Q, P> {
    pub store: S,
    pub queue: Q,
    pub provider: P,
    pub config: SubmitConfig,
    pub harvest: HarvestConfig,
    /// Open batches younger than this are left to their webhook.
    pub reconcile_min_age: Duration,
    /// The fan-out to workers; `None`: the scheduled run submits itself.
    pub dispatch: Option<DispatchConfig>,
}

impl Handler<S3Store, SqsQueue, BatchClient> {
    pub async fn from_env() -> Result<Self, lambda_runtime::Error> {
        let settings = SubmitSettings::from_env()?;
        let sdk = load_sdk_config().await;
        // Secrets come from Secrets Manager on AWS, read once here and cached for the
        // life of the execution environment. Only per-batch mode signs anything.
        let webhook_secret = match settings.webhook.webhook_mode {
            WebhookMode::PerBatch => {
                resolve_secret(
                    &sdk,
                    "SHOTLABEL_WEBHOOK_SECRET",
                    settings.webhook.webhook_secret.as_ref(),
                    settings.webhook.webhook_secret_secret_arn.as_deref(),
                )
                .await?
            }
            WebhookMode::Standard | WebhookMode::None => None,
        };
        Ok(Self {
            store: S3Store::new(s3_client_with(&sdk, &settings.s3)),
            queue: SqsQueue::new(sqs_client(&sdk)),
            provider: batch_client(&sdk, &settings.provider).await?,
            config: settings.config(webhook_secret)?,
            harvest: settings.provider.harvest_config(&settings.harvest)?,
            reconcile_min_age: settings.reconcile_min_age(),
            dispatch: settings.dispatch()?,
        })
    }
}

/// What one invocation did: a scheduled run reconciles, then dispatches workers or
/// submits; a worker only submits.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct RunReport {
    pub reconcile: ReconcileReport,
    /// Workers started, when the run fans out.
    pub dispatch: Option<DispatchReport>,
    pub submit: SubmitReport,
}

/// True for the work queue's event (SQS records), false for the schedule's.
fn is_work_ticket(event: &serde_json::Value) -> bool {
    event
        .get("Records")
        .and_then(serde_json::Value::as_array)
        .and_then(|records| records.first())
        .and_then(|record| record.get("eventSource"))
        .is_some_and(|source| source == "aws:sqs")
}

/// Handles one invocation: a work ticket makes this a worker, anything else is the
/// schedule. Errors after the run has done what it could, so that they show in the
/// function's error metric.
pub async fn handle<S: ObjectStore, Q: Queue, P: BatchProvider>(
    handler: &Handler<S, Q, P>,
    event: serde_json::Value,
) -> Result<RunReport, lambda_runtime::Error> {
    if is_work_ticket(&event) {
        return work(handler).await;
    }
    scheduled(handler).await
}

/// One worker: drain the pending queue into batches.
async fn work<S: ObjectStore, Q: Queue, P: BatchProvider>(
    handler: &Handler<S, Q, P>,
) -> Result<RunReport, lambda_runtime::Error> {
    let report = run_submit(
        &handler.store,
        &handler.queue,
        &handler.provider,
        &handler.config,
    )
    .await?;
    log_submit(&report, "submit worker finished");
    shotlabel_aws::metrics::emit("submit", &submit_metrics(&report, None));
    if let Some(first) = report.errors.first() {
        return Err(format!(
            "{} error(s) in this run; the first: {first}",
            report.errors.len()
        )
        .into());
    }
    Ok(RunReport {
        submit: report,
        ..RunReport::default()
    })
}

fn log_submit(report: &SubmitReport, message: &str) {
    tracing::info!(
        submission = %report.submission_id,
        received = report.received,
        prepared = report.prepared,
        failed = report.failed,
        superseded = report.superseded,
        deferred = report.deferred,
        batches = report.batches.len(),
        unsubmitted = report.unsubmitted,
        held_back = report.held_back,
        "{message}"
    );
}

fn submit_metrics(
    report: &SubmitReport,
    reconcile: Option<&ReconcileReport>,
) -> shotlabel_core::metrics::Counts {
    let mut metrics = reconcile.map(|r| r.counts.metrics()).unwrap_or_default();
    metrics.images_prepared = report.prepared as u64;
    metrics.images_submitted = report.batches.iter().map(|b| b.requests).sum();
    metrics.images_failed += report.failed as u64;
    metrics.batches_submitted = report.batches.len() as u64;
    metrics
}

/// The scheduled run: reconcile open batches, then start workers or submit.
async fn scheduled<S: ObjectStore, Q: Queue, P: BatchProvider>(
    handler: &Handler<S, Q, P>,
) -> Result<RunReport, lambda_runtime::Error> {
    // Reconcile first: a batch that finished without a webhook is harvested, and its
    // retries are on the queue in time for this run to submit them.
    let reconciled = reconcile(
        &handler.store,
        &handler.queue,
        &handler.provider,
        &handler.harvest,
        handler.reconcile_min_age,
    )
    .await;
    let reconcile = match reconciled {
        Ok(report) => report,
        Err(e) => ReconcileReport {
            errors: vec![format!("listing open batches: {e}")],
            ..ReconcileReport::default()
        },
    };
    let mut errors: Vec<String> = reconcile.errors.clone();
    let (dispatched, report) = match &handler.dispatch {
        Some(config) => match dispatch(&handler.queue, config).await {
            Ok(report) => (Some(report), SubmitReport::default()),
            Err(e) => {
                errors.push(format!("starting submit workers: {e}"));
                (None, SubmitReport::default())
            }
        },
        None => {
            let report = run_submit(
                &handler.store,
                &handler.queue,
                &handler.provider,
                &handler.config,
            )
            .await?;
            log_submit(&report, "scheduled submit finished");
            errors.extend(report.errors.iter().cloned());
            (None, report)
        }
    };
    tracing::info!(
        open_batches = reconcile.open,
        harvested = reconcile.harvested,
        workers_started = dispatched.as_ref().map_or(0, |d| d.started),
        "scheduled run finished"
    );
    shotlabel_aws::metrics::emit("submit", &submit_metrics(&report, Some(&reconcile)));
    if let Some(first) = errors.first() {
        return Err(format!("{} error(s) in this run; the first: {first}", errors.len()).into());
    }
    Ok(RunReport {
        reconcile,
        dispatch: dispatched,
        submit: report,
    })
}
