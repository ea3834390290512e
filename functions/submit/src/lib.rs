//! The submit handler: on each scheduled run, drain the pending queue into batches.

use std::time::Duration;

use shotlabel_aws::{
    S3Store, SqsQueue, batch_client, load_sdk_config, resolve_secret, s3_client_with, sqs_client,
};
use shotlabel_batch_client::BatchClient;
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
            harvest: settings.harvest.config()?,
            reconcile_min_age: settings.reconcile_min_age(),
        })
    }
}

/// What one scheduled run did: reconcile open batches, then submit new ones.
#[derive(Debug, Clone, serde::Serialize)]
pub struct RunReport {
    pub reconcile: ReconcileReport,
    pub submit: SubmitReport,
}

/// Handles one scheduled run (the event's content does not matter). Errors after the
/// run has done what it could, so that they show in the function's error metric.
pub async fn handle<S: ObjectStore, Q: Queue, P: BatchProvider>(
    handler: &Handler<S, Q, P>,
    _event: serde_json::Value,
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
    let report = run_submit(
        &handler.store,
        &handler.queue,
        &handler.provider,
        &handler.config,
    )
    .await?;
    tracing::info!(
        open_batches = reconcile.open,
        harvested = reconcile.harvested,
        submission = %report.submission_id,
        received = report.received,
        prepared = report.prepared,
        failed = report.failed,
        superseded = report.superseded,
        deferred = report.deferred,
        batches = report.batches.len(),
        unsubmitted = report.unsubmitted,
        "scheduled run finished"
    );
    let mut metrics = reconcile.counts.metrics();
    metrics.images_prepared = report.prepared as u64;
    metrics.images_submitted = report.batches.iter().map(|b| b.requests).sum();
    metrics.images_failed += report.failed as u64;
    metrics.batches_submitted = report.batches.len() as u64;
    shotlabel_aws::metrics::emit("submit", &metrics);
    let errors: Vec<&String> = reconcile.errors.iter().chain(&report.errors).collect();
    if let Some(first) = errors.first() {
        return Err(format!("{} error(s) in this run; the first: {first}", errors.len()).into());
    }
    Ok(RunReport {
        reconcile,
        submit: report,
    })
}
