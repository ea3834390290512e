//! The submit handler: on each scheduled run, drain the pending queue into batches.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use shotlabel_shared::SecretString;
use shotlabel_shared::aws::{
    S3Store, SqsQueue, batch_client_from_env, load_sdk_config, process_env, s3_client,
    secret_setting, sqs_client,
};
use shotlabel_shared::batch_api::BatchClient;
use shotlabel_shared::harvest::{HarvestConfig, ReconcileReport, reconcile};
use shotlabel_shared::ports::{BatchProvider, ObjectStore, Queue};
use shotlabel_shared::prepare::DecodeLimits;
use shotlabel_shared::records::Layout;
use shotlabel_shared::request::BatchLimits;
use shotlabel_shared::settings::{self, SettingsError};
use shotlabel_shared::submit::{PerBatchWebhook, SubmitConfig, SubmitReport, run_submit};

/// Clients and settings, built once per cold start.
#[derive(Debug)]
pub struct Handler<S = S3Store, Q = SqsQueue, P = BatchClient> {
    pub store: S,
    pub queue: Q,
    pub provider: P,
    pub config: SubmitConfig,
    pub harvest: HarvestConfig,
    /// Open batches younger than this are left to their webhook.
    pub reconcile_min_age: Duration,
}

impl Handler {
    pub async fn from_env() -> Result<Self, lambda_runtime::Error> {
        let sdk = load_sdk_config().await;
        // Secrets come from Secrets Manager on AWS, read once here and cached for the
        // life of the execution environment.
        let webhook_secret = secret_setting(&sdk, "SHOTLABEL_WEBHOOK_SECRET", process_env).await?;
        Ok(Self {
            store: S3Store::new(s3_client(&sdk)),
            queue: SqsQueue::new(sqs_client(&sdk)),
            provider: batch_client_from_env(&sdk, process_env).await?,
            config: config_from_env(webhook_secret)?,
            harvest: settings::harvest_config()?,
            reconcile_min_age: seconds("SHOTLABEL_RECONCILE_MIN_AGE_SECONDS", 0)?,
        })
    }
}

fn seconds(name: &'static str, default: u64) -> Result<Duration, SettingsError> {
    Ok(Duration::from_secs(settings::number_or(name, default)?))
}

/// Settings from the environment; the webhook secret is read by the caller (it may live
/// in Secrets Manager).
pub fn config_from_env(
    webhook_secret: Option<SecretString>,
) -> Result<SubmitConfig, SettingsError> {
    let defaults = BatchLimits::default();
    let decode = DecodeLimits::default();
    let cpus = std::thread::available_parallelism().map_or(2, |n| n.get());
    let per_batch_webhook = match settings::optional("SHOTLABEL_WEBHOOK_MODE").as_deref() {
        Some("per-batch") => {
            let url = settings::required(
                "SHOTLABEL_WEBHOOK_URL",
                "the webhook's public URL, for per-batch webhook mode",
            )?;
            let base_url = url::Url::parse(&url).map_err(|_| SettingsError::Invalid {
                name: "SHOTLABEL_WEBHOOK_URL",
                value: url.clone(),
                what: "an https URL",
            })?;
            let secret = webhook_secret.ok_or(SettingsError::Missing {
                name: "SHOTLABEL_WEBHOOK_SECRET",
                what: "the secret that signs per-batch webhook URLs",
            })?;
            Some(PerBatchWebhook { base_url, secret })
        }
        None | Some("standard") | Some("none") => None,
        Some(other) => {
            return Err(SettingsError::Invalid {
                name: "SHOTLABEL_WEBHOOK_MODE",
                value: other.to_owned(),
                what: "standard, per-batch or none",
            });
        }
    };
    Ok(SubmitConfig {
        bucket: settings::required("SHOTLABEL_BUCKET", "the bucket shotlabel works in")?,
        layout: Layout::new(&settings::input_prefix()),
        pending_queue_url: settings::required(
            "SHOTLABEL_PENDING_QUEUE_URL",
            "the URL of the pending SQS queue",
        )?,
        task: Arc::new(settings::task()?),
        limits: BatchLimits {
            max_requests: settings::number_or(
                "SHOTLABEL_MAX_BATCH_REQUESTS",
                defaults.max_requests as u64,
            )? as usize,
            max_bytes: settings::number_or("SHOTLABEL_MAX_BATCH_BYTES", defaults.max_bytes)?,
        },
        decode_limits: DecodeLimits {
            max_bytes: settings::number_or("SHOTLABEL_MAX_OBJECT_BYTES", decode.max_bytes)?,
            max_pixels: settings::number_or("SHOTLABEL_MAX_IMAGE_PIXELS", decode.max_pixels)?,
        },
        time_budget: seconds("SHOTLABEL_SUBMIT_BUDGET_SECONDS", 240)?,
        visibility_timeout: seconds("SHOTLABEL_SUBMIT_VISIBILITY_SECONDS", 900)?,
        receive_wait: seconds("SHOTLABEL_RECEIVE_WAIT_SECONDS", 1)?,
        max_images: settings::number_or("SHOTLABEL_MAX_IMAGES_PER_RUN", 0)? as usize,
        concurrency: settings::number_or("SHOTLABEL_CONCURRENCY", cpus as u64)? as usize,
        work_dir: settings::optional("SHOTLABEL_WORK_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(std::env::temp_dir),
        completion_window: settings::optional("SHOTLABEL_COMPLETION_WINDOW")
            .unwrap_or_else(|| "24h".into()),
        per_batch_webhook,
    })
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
    shotlabel_shared::metrics::emit("submit", &metrics);
    let errors: Vec<&String> = reconcile.errors.iter().chain(&report.errors).collect();
    if let Some(first) = errors.first() {
        return Err(format!("{} error(s) in this run; the first: {first}", errors.len()).into());
    }
    Ok(RunReport {
        reconcile,
        submit: report,
    })
}

// ---- deployment description ----
// What this function needs from `template.yaml`; `tests/tests/template.rs` holds the
// template to it (see `shotlabel_shared::deploy`).

use shotlabel_shared::deploy::{
    self, BATCHES, Deployment, Env, FAILED, GET_SECRET, Grant, HAS_TASK, MANIFEST_BATCH, MANIFESTS,
    OPEN, PENDING_QUEUE, PER_BATCH_WEBHOOKS, Prefix, Resource, S3_GET, S3_PUT, SQS_DELETE,
    SQS_RECEIVE, WEBHOOK_SECRET,
};

/// Every variable [`Handler::from_env`] reads (held to the source by a unit test).
pub const ENV_VARS: &[&str] = &[
    "SHOTLABEL_API_KEY",
    "SHOTLABEL_API_KEY_SECRET_ARN",
    "SHOTLABEL_BUCKET",
    "SHOTLABEL_COMPLETION_WINDOW",
    "SHOTLABEL_CONCURRENCY",
    "SHOTLABEL_INPUT_PREFIX",
    "SHOTLABEL_MAX_BATCH_BYTES",
    "SHOTLABEL_MAX_BATCH_REQUESTS",
    "SHOTLABEL_MAX_IMAGES_PER_RUN",
    "SHOTLABEL_MAX_IMAGE_PIXELS",
    "SHOTLABEL_MAX_OBJECT_BYTES",
    "SHOTLABEL_MAX_RETRIES",
    "SHOTLABEL_PENDING_QUEUE_URL",
    "SHOTLABEL_PROVIDER_URL",
    "SHOTLABEL_RECEIVE_WAIT_SECONDS",
    "SHOTLABEL_RECONCILE_MIN_AGE_SECONDS",
    "SHOTLABEL_S3_PATH_STYLE",
    "SHOTLABEL_SUBMIT_BUDGET_SECONDS",
    "SHOTLABEL_SUBMIT_VISIBILITY_SECONDS",
    "SHOTLABEL_TASK",
    "SHOTLABEL_WEBHOOK_MODE",
    "SHOTLABEL_WEBHOOK_SECRET",
    "SHOTLABEL_WEBHOOK_SECRET_SECRET_ARN",
    "SHOTLABEL_WEBHOOK_URL",
    "SHOTLABEL_WORK_DIR",
];

/// What a submit run does on AWS ([`run_submit`]): takes pending messages (and deletes
/// them once their batch exists), reads each image, writes failed records, manifests,
/// manifest → batch links, state records and open markers; in per-batch webhook mode it
/// signs each batch's webhook URL with the webhook secret. Reconciliation, which runs
/// first, is a harvest ([`deploy::HARVEST`]) and lists the open markers.
pub const GRANTS: &[Grant] = &[
    Grant::new(
        &[SQS_RECEIVE, SQS_DELETE],
        &[Resource::Queue(PENDING_QUEUE)],
    ),
    Grant::new(&[S3_GET], &[Resource::Objects(Prefix::Input)]),
    Grant::new(
        &[S3_PUT],
        &[
            Resource::Objects(FAILED),
            Resource::Objects(MANIFESTS),
            Resource::Objects(MANIFEST_BATCH),
            Resource::Objects(BATCHES),
            Resource::Objects(OPEN),
        ],
    ),
    Grant::new(&[GET_SECRET], &[Resource::Secret(WEBHOOK_SECRET)]).only_if(PER_BATCH_WEBHOOKS),
];

/// The one deployment: run on a schedule.
pub const DEPLOYMENTS: &[Deployment] = &[Deployment {
    function: "SubmitFunction",
    binary: "submit",
    env: &[
        Env::Required("SHOTLABEL_BUCKET"),
        Env::Required("SHOTLABEL_PENDING_QUEUE_URL"),
        Env::Required("SHOTLABEL_PROVIDER_URL"),
        Env::Required("SHOTLABEL_API_KEY_SECRET_ARN"),
        // Must agree with the other functions' (labels are laid out below it).
        Env::Required("SHOTLABEL_INPUT_PREFIX"),
        // Must agree with the webhook receiver's.
        Env::Required("SHOTLABEL_WEBHOOK_MODE"),
        // Must agree with the harvest's.
        Env::Required("SHOTLABEL_MAX_RETRIES"),
        // Must outlast the function's timeout (checked by the template test).
        Env::Required("SHOTLABEL_SUBMIT_VISIBILITY_SECONDS"),
        Env::Required("SHOTLABEL_SUBMIT_BUDGET_SECONDS"),
        Env::RequiredIf("SHOTLABEL_WEBHOOK_URL", PER_BATCH_WEBHOOKS),
        Env::RequiredIf("SHOTLABEL_WEBHOOK_SECRET_SECRET_ARN", PER_BATCH_WEBHOOKS),
        Env::RequiredIf("SHOTLABEL_TASK", HAS_TASK),
    ],
    grants: &[
        deploy::LOGGING,
        deploy::SEE_MISSING_KEYS,
        deploy::PROVIDER,
        deploy::HARVEST,
        GRANTS,
    ],
}];

#[cfg(test)]
mod deployment_tests {
    use std::collections::BTreeSet;

    #[test]
    fn env_vars_are_what_the_code_reads() {
        let read = shotlabel_shared::deploy::variables_read_by(include_str!("lib.rs"));
        let declared: BTreeSet<String> = super::ENV_VARS.iter().map(|v| (*v).to_owned()).collect();
        assert_eq!(declared, read);
    }
}
