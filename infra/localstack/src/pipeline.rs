//! The whole pipeline on one machine, wired the way AWS wires it: S3 notifications →
//! enqueue, a timer → submit, an HTTP listener → webhook, the harvest queue → harvest. Each function is called through its Lambda handler
//! with the event JSON AWS would deliver, so the code that runs here is the code that
//! runs there. With [`PipelineOptions::chaos`] set, the runners and the ports the
//! handlers use inject crashes, redeliveries and duplicate events ([`crate::chaos`]).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use aws_config::SdkConfig;
use aws_lambda_events::event::lambda_function_urls::{
    LambdaFunctionUrlRequest, LambdaFunctionUrlRequestContext,
    LambdaFunctionUrlRequestContextHttpDescription, LambdaFunctionUrlResponse,
};
use aws_lambda_events::event::s3::S3Event;
use aws_lambda_events::event::sqs::{SqsEvent, SqsMessage};
use axum::body::Bytes;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use base64::Engine;
use batch_emulator::{EmulatorConfig, FaultSettings, RunningEmulator};
use clap::ValueEnum;
use secrecy::{ExposeSecret, SecretString};
use serde_json::json;
use shotlabel_aws::{S3Store, SqsQueue};
use shotlabel_batch_client::{BatchApiConfig, BatchClient, RetryPolicy};
use shotlabel_core::metered::{Metered, RequestCounts, RequestSnapshot};
use shotlabel_core::ports::ObjectStore;
use shotlabel_core::provider::ProviderProfile;
use shotlabel_core::records::TaskRef;
use shotlabel_core::request::BatchLimits;
use shotlabel_core::settings::{
    EnqueueSettings, FunctionSettings, HarvestSettings, ReceiverSettings, SubmitSettings,
};
use shotlabel_core::task::Task;
use tokio::task::JoinHandle;

use crate::chaos::{Chaos, ChaosOptions, ChaosStats, Chaotic, Function, Invocation};
use crate::{LocalResources, MotoServer, create_resources, route_object_events, sqs_client};

/// How the provider tells the webhook a batch is done: the functions' own setting.
pub use shotlabel_core::settings::WebhookMode;

/// Where the batches go.
#[derive(Debug, Clone)]
pub enum ProviderChoice {
    /// The bundled emulator, with these faults.
    Emulator { faults: FaultSettings, seed: u64 },
    /// A real provider: it cannot reach a loopback webhook, so reconciliation (every
    /// submit run) harvests its batches.
    Remote {
        base_url: String,
        api_key: SecretString,
        /// Its documented limits and quirks (`SHOTLABEL_PROVIDER`).
        profile: ProviderProfile,
    },
}

#[derive(Debug, Clone)]
pub struct PipelineOptions {
    pub stack_name: String,
    pub input_prefix: String,
    pub task: Arc<Task>,
    pub provider: ProviderChoice,
    pub webhook_mode: WebhookMode,
    /// How often the scheduled submit runs.
    pub submit_every: Duration,
    pub limits: BatchLimits,
    pub max_retries: u32,
    /// Open batches younger than this are left to their webhook by reconciliation.
    pub reconcile_min_age: Duration,
    /// The emulator's status timeline: validating, in progress, finalizing (ms).
    pub emulator_delays_ms: (u64, u64, u64),
    /// Harvest-queue invocations run at once (Lambda runs several).
    pub harvest_concurrency: usize,
    /// Submit workers at once. 0: no fan-out, the scheduled run submits itself; more:
    /// the scheduled run dispatches up to this many workers through the work queue, which
    /// run as concurrent tasks (as the template's event source mapping runs Lambdas).
    pub submit_workers: usize,
    /// The provider's limits, as the submit function's settings.
    pub max_open_batches: u32,
    pub upload_interval: Duration,
    /// Batches of more requests than this are harvested in shards through the harvest
    /// queue (`None`: in one run).
    pub harvest_shard_requests: Option<usize>,
    /// Crashes, redeliveries and duplicate events injected into the functions (see
    /// [`crate::chaos`]); off by default.
    pub chaos: Option<ChaosOptions>,
}

impl PipelineOptions {
    pub fn new(task: Task) -> Self {
        Self {
            stack_name: "shotlabel-local".into(),
            input_prefix: "incoming/".into(),
            task: Arc::new(task),
            provider: ProviderChoice::Emulator {
                faults: FaultSettings::default(),
                seed: 0,
            },
            webhook_mode: WebhookMode::Standard,
            submit_every: Duration::from_secs(2),
            limits: BatchLimits::default(),
            max_retries: 3,
            reconcile_min_age: Duration::from_secs(30),
            emulator_delays_ms: (200, 800, 200),
            harvest_concurrency: 1,
            submit_workers: 0,
            max_open_batches: 0,
            upload_interval: Duration::ZERO,
            harvest_shard_requests: None,
            chaos: None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    #[error(transparent)]
    Stack(#[from] crate::LocalStackError),
    #[error("the local pipeline: {0}")]
    Start(String),
}

fn start_error(e: impl std::fmt::Display) -> PipelineError {
    PipelineError::Start(e.to_string())
}

/// Counts of what the local runners did, for progress and summaries.
#[derive(Debug, Default)]
pub struct RunnerStats {
    pub events: AtomicU64,
    /// Pending messages the enqueue handler sent, and images it found labelled already.
    pub queued: AtomicU64,
    pub already_labelled: AtomicU64,
    /// Notifications that were neither an S3 event nor S3's test event (logged, dropped).
    pub unreadable_events: AtomicU64,
    pub submit_runs: AtomicU64,
    pub webhook_requests: AtomicU64,
    pub harvest_messages: AtomicU64,
    pub handler_errors: AtomicU64,
    /// Every submit worker invocation that returned, in the order they ended.
    pub worker_runs: std::sync::Mutex<Vec<WorkerRun>>,
    /// Handler invocations and their wall time, by function.
    pub busy: FunctionTimes,
}

/// Invocations and wall time of one function's handler. Summed wall time is what Lambda
/// bills as duration; locally the handlers share this machine's cores, so it runs longer
/// than it would on Lambda, where each invocation has its own CPU share.
#[derive(Debug, Default)]
pub struct FunctionMeter {
    invocations: AtomicU64,
    busy_micros: AtomicU64,
}

impl FunctionMeter {
    fn record(&self, took: Duration) {
        self.invocations.fetch_add(1, Ordering::Relaxed);
        let micros = u64::try_from(took.as_micros()).unwrap_or(u64::MAX);
        self.busy_micros.fetch_add(micros, Ordering::Relaxed);
    }

    pub fn invocations(&self) -> u64 {
        self.invocations.load(Ordering::Relaxed)
    }

    /// The invocations' wall time, summed ("Lambda-seconds").
    pub fn busy(&self) -> Duration {
        Duration::from_micros(self.busy_micros.load(Ordering::Relaxed))
    }
}

/// Port calls by function.
#[derive(Debug, Default)]
struct FunctionRequests {
    enqueue: RequestCounts,
    submit: RequestCounts,
    webhook: RequestCounts,
    harvest: RequestCounts,
}

/// [`FunctionMeter`]s by function; the submit function's scheduled runs and its workers
/// apart.
#[derive(Debug, Default)]
pub struct FunctionTimes {
    pub enqueue: FunctionMeter,
    pub submit_scheduled: FunctionMeter,
    pub submit_worker: FunctionMeter,
    pub webhook: FunctionMeter,
    pub harvest: FunctionMeter,
}

impl FunctionTimes {
    /// (name, invocations, busy time) of each, in pipeline order.
    pub fn rows(&self) -> [(&'static str, u64, Duration); 5] {
        [
            ("enqueue", &self.enqueue),
            ("submit (scheduled)", &self.submit_scheduled),
            ("submit (worker)", &self.submit_worker),
            ("webhook", &self.webhook),
            ("harvest", &self.harvest),
        ]
        .map(|(name, meter)| (name, meter.invocations(), meter.busy()))
    }
}

/// When one submit worker ran and what it took.
#[derive(Debug, Clone)]
pub struct WorkerRun {
    pub started: std::time::Instant,
    pub ended: std::time::Instant,
    /// Pending messages it received.
    pub received: usize,
    /// Images it prepared into request lines.
    pub prepared: usize,
    /// Batches it created.
    pub batches: usize,
    /// Messages it deleted because their object is gone or changed (no record made).
    pub superseded: usize,
    /// Second copies of a message it already held this run.
    pub duplicate_messages: usize,
}

impl RunnerStats {
    /// The worker runs so far.
    pub fn worker_runs(&self) -> Vec<WorkerRun> {
        self.worker_runs
            .lock()
            .map(|runs| runs.clone())
            .unwrap_or_default()
    }
}

/// A running local pipeline. Dropping it stops the runners, the emulator and moto.
#[derive(Debug)]
pub struct LocalPipeline {
    pub resources: LocalResources,
    pub sdk: SdkConfig,
    pub webhook_url: String,
    pub provider_url: String,
    /// The queue S3 notifications go to before the enqueue runner hands them over.
    pub events_queue_url: String,
    pub stats: Arc<RunnerStats>,
    /// Every call the functions made through their ports.
    requests: FunctionRequests,
    chaos: Option<Arc<Chaos>>,
    emulator: Option<RunningEmulator>,
    runners: Vec<JoinHandle<()>>,
    moto: MotoServer,
}

impl Drop for LocalPipeline {
    fn drop(&mut self) {
        for runner in &self.runners {
            runner.abort();
        }
    }
}

// The ports are wrapped for fault injection, which does nothing unless chaos is on, and
// counted inside it, so that a call chaos fails before it is made is not counted.
type Store = Chaotic<Metered<S3Store>>;
type Sqs = Chaotic<Metered<SqsQueue>>;
type Provider = Chaotic<Metered<BatchClient>>;
type Enqueue = enqueue::Handler<Store, Sqs>;
type Submit = submit::Handler<Store, Sqs, Provider>;
type Webhook = webhook::Handler<Store, Sqs>;
type Harvest = harvest::Handler<Store, Sqs, Provider>;

impl LocalPipeline {
    pub async fn start(options: PipelineOptions) -> Result<Self, PipelineError> {
        let moto = MotoServer::start().await?;
        let sdk = moto.sdk_config().await;
        let resources = create_resources(&sdk, &options.stack_name).await?;
        let events_url =
            route_object_events(&sdk, &resources, &options.stack_name, &options.input_prefix)
                .await?;

        // The webhook listener first: the emulator needs its URL.
        let listener = tokio::net::TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], 0)))
            .await
            .map_err(start_error)?;
        let webhook_addr = listener.local_addr().map_err(start_error)?;
        let webhook_url = format!("http://{webhook_addr}/");
        let secret = random_whsec();

        let (emulator, base_url, api_key) = match &options.provider {
            ProviderChoice::Emulator { faults, seed } => {
                let key = format!("local-{}", hex_random(16));
                let (validating, running, finalizing) = options.emulator_delays_ms;
                let mut config = EmulatorConfig::new(key.clone())
                    .with_delays(validating, running, finalizing)
                    .with_faults(faults.clone())
                    .with_seed(*seed);
                config.listen = SocketAddr::from(([127, 0, 0, 1], 0));
                if options.webhook_mode == WebhookMode::Standard {
                    config = config
                        .with_webhook(webhook_url.clone(), vec![secret.expose_secret().to_owned()]);
                }
                let emulator = batch_emulator::spawn(config).await.map_err(start_error)?;
                let url = emulator.base_url();
                (Some(emulator), url, SecretString::from(key))
            }
            ProviderChoice::Remote {
                base_url, api_key, ..
            } => (None, base_url.clone(), api_key.clone()),
        };
        // The emulator is a generic OpenAI-compatible provider.
        let profile = match &options.provider {
            ProviderChoice::Remote { profile, .. } => *profile,
            ProviderChoice::Emulator { .. } => ProviderProfile::Generic,
        };
        let mut api = BatchApiConfig::new(&base_url, api_key).map_err(start_error)?;
        api.file_ready_timeout = profile.defaults().file_ready_wait;
        if emulator.is_some() {
            api.retry = RetryPolicy {
                max_attempts: 8,
                initial_backoff: Duration::from_millis(20),
                max_backoff: Duration::from_millis(500),
                max_retry_after: Duration::from_secs(1),
            };
        }
        // Each function gets ports of its own that count into its own `RequestCounts`,
        // so that a run's requests can be told apart by function.
        let requests = FunctionRequests::default();
        let batch_client = BatchClient::new(api).map_err(start_error)?;
        let (s3, sqs_ports) = (crate::s3_client(&sdk), sqs_client(&sdk));
        let provider =
            |counts: &RequestCounts| Chaotic(Metered::new(batch_client.clone(), counts.clone()));
        let store = |counts: &RequestCounts| {
            Chaotic(Metered::new(S3Store::new(s3.clone()), counts.clone()))
        };
        let queue = |counts: &RequestCounts| {
            Chaotic(Metered::new(
                SqsQueue::new(sqs_ports.clone()),
                counts.clone(),
            ))
        };

        // Each function is configured through its settings type from the variables a
        // deployment would set, so local runs and AWS read the same settings the same way.
        // Only the task is handed over loaded: it may not come from a file.
        let max_retries = options.max_retries.to_string();
        let webhook_mode = options
            .webhook_mode
            .to_possible_value()
            .map(|v| v.get_name().to_owned())
            .unwrap_or_default();
        let max_batch_requests = options.limits.max_requests.to_string();
        let max_batch_bytes = options.limits.max_bytes.to_string();
        // A remote provider cannot call back to this machine: reconcile at once.
        let reconcile_min_age = match options.provider {
            ProviderChoice::Remote { .. } => Duration::ZERO,
            ProviderChoice::Emulator { .. } => options.reconcile_min_age,
        }
        .as_secs()
        .to_string();
        let max_workers = options.submit_workers.to_string();
        // Unset (empty) where the options leave them at zero, so that a real provider's
        // profile sets them (Inference.net's one upload a minute).
        let max_open_batches = match options.max_open_batches {
            0 => String::new(),
            n => n.to_string(),
        };
        let upload_interval = if options.upload_interval.is_zero() {
            String::new()
        } else {
            options.upload_interval.as_secs_f64().to_string()
        };
        let work_queue = if options.submit_workers > 0 {
            resources.submit_work_queue_url.as_str()
        } else {
            ""
        };
        let shard_requests = options
            .harvest_shard_requests
            .map(|n| n.to_string())
            .unwrap_or_default();
        let shard_queue = if options.harvest_shard_requests.is_some() {
            resources.harvest_queue_url.as_str()
        } else {
            ""
        };
        let work_dir = std::env::temp_dir().join(format!("{}-work", options.stack_name));
        let work_dir = work_dir.to_string_lossy();
        let bucket = resources.bucket.as_str();
        let pending = resources.pending_queue_url.as_str();
        let prefix = options.input_prefix.as_str();

        let enqueue_settings = EnqueueSettings::from_vars([
            ("SHOTLABEL_PENDING_QUEUE_URL", pending),
            ("SHOTLABEL_INPUT_PREFIX", prefix),
        ])
        .map_err(start_error)?;
        let mut enqueue_config = enqueue_settings.config().map_err(start_error)?;
        enqueue_config.task = TaskRef {
            name: options.task.name().to_owned(),
            version: options.task.version().to_owned(),
        };
        let enqueue_handler = Enqueue {
            store: store(&requests.enqueue),
            queue: queue(&requests.enqueue),
            config: enqueue_config,
        };

        let harvest_settings = HarvestSettings::from_vars([
            ("SHOTLABEL_BUCKET", bucket),
            ("SHOTLABEL_PENDING_QUEUE_URL", pending),
            ("SHOTLABEL_INPUT_PREFIX", prefix),
            ("SHOTLABEL_MAX_RETRIES", max_retries.as_str()),
            ("SHOTLABEL_PROVIDER_URL", base_url.as_str()),
            ("SHOTLABEL_PROVIDER", profile.name()),
            // Empty (unset) without sharding.
            ("SHOTLABEL_HARVEST_QUEUE_URL", shard_queue),
            ("SHOTLABEL_HARVEST_SHARD_REQUESTS", shard_requests.as_str()),
            // Minutes, not the deployment's two hours: local runs are short, and the
            // local harvest queue's messages come back after 60 s, not 5,400.
            ("SHOTLABEL_HARVEST_SHARD_RESEND_SECONDS", "120"),
        ])
        .map_err(start_error)?;
        let mut harvest = harvest_settings
            .provider
            .harvest_config(&harvest_settings.harvest)
            .map_err(start_error)?;
        harvest.task = options.task.clone();

        let pending_max_receives = crate::QUEUES
            .iter()
            .find(|spec| spec.logical_id == "PendingQueue")
            .map_or(0, |spec| spec.max_receive_count)
            .to_string();
        let submit_settings = SubmitSettings::from_vars([
            ("SHOTLABEL_BUCKET", bucket),
            ("SHOTLABEL_PENDING_QUEUE_URL", pending),
            ("SHOTLABEL_INPUT_PREFIX", prefix),
            ("SHOTLABEL_MAX_RETRIES", max_retries.as_str()),
            ("SHOTLABEL_PROVIDER_URL", base_url.as_str()),
            ("SHOTLABEL_PROVIDER", profile.name()),
            ("SHOTLABEL_WEBHOOK_MODE", webhook_mode.as_str()),
            ("SHOTLABEL_WEBHOOK_URL", webhook_url.as_str()),
            ("SHOTLABEL_MAX_BATCH_REQUESTS", max_batch_requests.as_str()),
            ("SHOTLABEL_MAX_BATCH_BYTES", max_batch_bytes.as_str()),
            // Short runs and no long polls: the local timer fires every few seconds.
            ("SHOTLABEL_SUBMIT_BUDGET_SECONDS", "30"),
            ("SHOTLABEL_SUBMIT_VISIBILITY_SECONDS", "300"),
            // The local pending queue's redrive policy, as the template's.
            (
                "SHOTLABEL_PENDING_MAX_RECEIVES",
                pending_max_receives.as_str(),
            ),
            ("SHOTLABEL_RECEIVE_WAIT_SECONDS", "0"),
            ("SHOTLABEL_WORK_DIR", work_dir.as_ref()),
            (
                "SHOTLABEL_RECONCILE_MIN_AGE_SECONDS",
                reconcile_min_age.as_str(),
            ),
            // Empty (unset) without fan-out.
            ("SHOTLABEL_SUBMIT_WORK_QUEUE_URL", work_queue),
            ("SHOTLABEL_MAX_SUBMIT_WORKERS", max_workers.as_str()),
            ("SHOTLABEL_MAX_OPEN_BATCHES", max_open_batches.as_str()),
            (
                "SHOTLABEL_UPLOAD_INTERVAL_SECONDS",
                upload_interval.as_str(),
            ),
            // Longer than the 30 s budget, short enough that a crashed worker's slot
            // comes back within a chaos soak.
            ("SHOTLABEL_SLOT_LEASE_SECONDS", "45"),
        ])
        .map_err(start_error)?;
        let mut submit_config = submit_settings
            .config(Some(secret.clone()))
            .map_err(start_error)?;
        submit_config.task = Arc::new(
            (*options.task)
                .clone()
                .with_provider_token_field(profile.defaults().token_field),
        );
        let submit_handler = Submit {
            store: store(&requests.submit),
            queue: queue(&requests.submit),
            provider: provider(&requests.submit),
            config: submit_config,
            harvest: harvest.clone(),
            reconcile_min_age: submit_settings.reconcile_min_age(),
            dispatch: submit_settings.dispatch().map_err(start_error)?,
        };

        let receiver_settings = ReceiverSettings::from_vars([
            ("SHOTLABEL_BUCKET", bucket),
            (
                "SHOTLABEL_HARVEST_QUEUE_URL",
                resources.harvest_queue_url.as_str(),
            ),
            ("SHOTLABEL_WEBHOOK_MODE", webhook_mode.as_str()),
        ])
        .map_err(start_error)?;
        let webhook_handler = Webhook {
            store: store(&requests.webhook),
            queue: queue(&requests.webhook),
            webhook: receiver_settings
                .config(Some(secret.clone()))
                .map_err(start_error)?,
        };
        let harvest_handler = Harvest {
            store: store(&requests.harvest),
            queue: queue(&requests.harvest),
            provider: provider(&requests.harvest),
            harvest,
        };

        let stats = Arc::new(RunnerStats::default());
        let sqs = sqs_client(&sdk);
        let chaos = options
            .chaos
            .clone()
            .map(|chaos| Chaos::new(chaos, sqs.clone()));
        let webhook_handler = Arc::new(webhook_handler);
        let harvest_handler = Arc::new(harvest_handler);
        let submit_handler = Arc::new(submit_handler);
        let mut runners = vec![
            tokio::spawn(object_events(
                sqs.clone(),
                events_url.clone(),
                enqueue_handler,
                stats.clone(),
                chaos.clone(),
            )),
            tokio::spawn(schedule(
                submit_handler.clone(),
                options.submit_every,
                stats.clone(),
                chaos.clone(),
            )),
            tokio::spawn(serve_webhook(
                listener,
                webhook_handler.clone(),
                stats.clone(),
            )),
            tokio::spawn(harvest_queue(
                HarvestRunner {
                    sqs,
                    queue_url: resources.harvest_queue_url.clone(),
                    handler: harvest_handler,
                    stats: stats.clone(),
                    chaos: chaos.clone(),
                },
                options.harvest_concurrency,
            )),
        ];
        if options.submit_workers > 0 {
            runners.push(tokio::spawn(submit_workers(
                WorkerRunner {
                    sqs: sqs_client(&sdk),
                    queue_url: resources.submit_work_queue_url.clone(),
                    handler: submit_handler,
                    stats: stats.clone(),
                    chaos: chaos.clone(),
                },
                options.submit_workers,
            )));
        }
        Ok(Self {
            resources,
            sdk,
            webhook_url,
            provider_url: base_url,
            events_queue_url: events_url,
            stats,
            requests,
            chaos,
            emulator,
            runners,
            moto,
        })
    }

    pub fn endpoint(&self) -> &str {
        self.moto.endpoint()
    }

    /// The calls the functions made through their ports so far, by kind (the observers'
    /// own calls, [`Self::store`] and [`Self::terminal_count`], are not among them, nor
    /// the runners' own receives and deletes, which stand in for Lambda's event sources).
    pub fn request_counts(&self) -> RequestSnapshot {
        self.request_counts_by_function()
            .iter()
            .fold(RequestSnapshot::default(), |sum, (_, counts)| {
                sum.plus(counts)
            })
    }

    /// [`Self::request_counts`] by function; the submit function's include the harvests
    /// its reconciliation does.
    pub fn request_counts_by_function(&self) -> [(&'static str, RequestSnapshot); 4] {
        let r = &self.requests;
        [
            ("enqueue", r.enqueue.snapshot()),
            ("submit", r.submit.snapshot()),
            ("webhook", r.webhook.snapshot()),
            ("harvest", r.harvest.snapshot()),
        ]
    }

    /// What the fault injector did, when chaos is on.
    pub fn chaos_stats(&self) -> Option<ChaosStats> {
        self.chaos.as_ref().map(|chaos| chaos.stats())
    }

    /// The bundled emulator, when it is the provider.
    pub fn emulator(&self) -> Option<&RunningEmulator> {
        self.emulator.as_ref()
    }

    pub fn store(&self) -> S3Store {
        S3Store::new(crate::s3_client(&self.sdk))
    }

    /// Every queue's depth, visible and in flight, for a run that did not finish: an
    /// image whose message is in flight is hidden by a receive, not lost.
    pub async fn queue_depths(&self) -> String {
        use shotlabel_core::ports::Queue;
        let queue = SqsQueue::new(sqs_client(&self.sdk));
        let r = &self.resources;
        let mut parts = Vec::new();
        for (name, url) in [
            ("events", &self.events_queue_url),
            ("pending", &r.pending_queue_url),
            ("pending DLQ", &r.pending_dead_letter_queue_url),
            ("work", &r.submit_work_queue_url),
            ("harvest", &r.harvest_queue_url),
            ("harvest DLQ", &r.harvest_dead_letter_queue_url),
        ] {
            parts.push(match queue.depth(url).await {
                Ok(d) => format!("{name} {} visible + {} in flight", d.visible, d.in_flight),
                Err(e) => format!("{name}: {e}"),
            });
        }
        parts.join("; ")
    }

    /// How many of these input keys have a terminal record (a label or a failed record).
    pub async fn terminal_count(
        &self,
        layout: &shotlabel_core::records::Layout,
        keys: &[String],
    ) -> Result<usize, shotlabel_core::ports::StoreError> {
        let store = self.store();
        let bucket = &self.resources.bucket;
        let labels: std::collections::HashSet<String> =
            store.list(bucket, "labels/").await?.into_iter().collect();
        let failed: std::collections::HashSet<String> =
            store.list(bucket, "failed/").await?.into_iter().collect();
        Ok(keys
            .iter()
            .filter(|key| {
                let relative = layout.relative_or_key(key);
                labels.contains(&layout.label_key(relative))
                    || failed.contains(&layout.failed_key(relative))
            })
            .count())
    }
}

fn hex_random(bytes: usize) -> String {
    (0..bytes)
        .map(|_| format!("{:02x}", rand::random::<u8>()))
        .collect()
}

/// A fresh Standard Webhooks secret for this run.
fn random_whsec() -> SecretString {
    let key: Vec<u8> = (0..24).map(|_| rand::random::<u8>()).collect();
    SecretString::from(format!(
        "whsec_{}",
        base64::engine::general_purpose::STANDARD.encode(key)
    ))
}

/// Runs one handler call, as an invocation under chaos when it is on, and adds its wall
/// time to `meter` (a killed invocation's too: Lambda bills it up to the kill). `None`
/// when the process was killed.
async fn invoke<F: std::future::Future>(
    chaos: Option<&Arc<Chaos>>,
    function: Function,
    meter: &FunctionMeter,
    call: F,
) -> (Option<F::Output>, Option<Arc<Invocation>>) {
    let started = std::time::Instant::now();
    let result = invoke_untimed(chaos, function, call).await;
    meter.record(started.elapsed());
    result
}

async fn invoke_untimed<F: std::future::Future>(
    chaos: Option<&Arc<Chaos>>,
    function: Function,
    call: F,
) -> (Option<F::Output>, Option<Arc<Invocation>>) {
    // Boxed: handler futures are large, and a debug build moves them by value.
    let call = Box::pin(call);
    match chaos {
        Some(chaos) => {
            let (output, invocation) = chaos.run(function, call).await;
            if output.is_none() {
                tracing::warn!(
                    function = function.as_str(),
                    "chaos: the process was killed"
                );
            }
            (output, Some(invocation))
        }
        None => (Some(call.await), None),
    }
}

/// S3 → enqueue: each notification, as S3 wrote it, goes to the enqueue handler; it is
/// deleted only when the handler succeeds (Lambda's retry of an S3 invocation). The
/// notifications of one receive are handled at once, as S3 invokes the function
/// concurrently.
async fn object_events(
    sqs: aws_sdk_sqs::Client,
    queue_url: String,
    handler: Enqueue,
    stats: Arc<RunnerStats>,
    chaos: Option<Arc<Chaos>>,
) {
    let runner = Arc::new(EventRunner {
        sqs,
        queue_url,
        handler,
        stats,
        chaos,
    });
    loop {
        let received = runner
            .sqs
            .receive_message()
            .queue_url(&runner.queue_url)
            .max_number_of_messages(10)
            .wait_time_seconds(1)
            .visibility_timeout(30)
            .send()
            .await;
        let messages = match received {
            Ok(output) => output.messages.unwrap_or_default(),
            Err(e) => {
                tracing::warn!(error = %e, "receiving object events");
                tokio::time::sleep(Duration::from_millis(500)).await;
                continue;
            }
        };
        // Dropped with the runner, which aborts the invocations still running.
        let mut running = tokio::task::JoinSet::new();
        for message in messages {
            let runner = runner.clone();
            running.spawn(async move { runner.invocation(message).await });
        }
        while running.join_next().await.is_some() {}
    }
}

/// What the object-event runner works with.
struct EventRunner {
    sqs: aws_sdk_sqs::Client,
    queue_url: String,
    handler: Enqueue,
    stats: Arc<RunnerStats>,
    chaos: Option<Arc<Chaos>>,
}

impl EventRunner {
    /// One enqueue invocation on one S3 notification.
    async fn invocation(&self, message: aws_sdk_sqs::types::Message) {
        let (sqs, queue_url, stats, chaos) = (&self.sqs, &self.queue_url, &self.stats, &self.chaos);
        let body = message.body.as_deref().unwrap_or_default();
        let mut crashed = false;
        let handled = match crate::lambda_s3_event(body)
            .and_then(|v| serde_json::from_value::<S3Event>(v).ok())
        {
            // S3's test event, sent when notifications are configured: nothing to do.
            None if body.contains("s3:TestEvent") => true,
            None => {
                // Never an image's event as far as anyone can tell; counted, so that a
                // run missing an image can say whether its notification was here.
                stats.unreadable_events.fetch_add(1, Ordering::Relaxed);
                tracing::error!(body = %body.chars().take(300).collect::<String>(),
                    "an object notification is not an S3 event; dropped");
                true
            }
            Some(event) => {
                stats.events.fetch_add(1, Ordering::Relaxed);
                if let Some(chaos) = chaos
                    && chaos.duplicate_event()
                {
                    // S3 delivers the same notification once more, a little later.
                    let _ = sqs
                        .send_message()
                        .queue_url(queue_url)
                        .message_body(body)
                        .send()
                        .await;
                }
                let (outcome, invocation) = invoke(
                    chaos.as_ref(),
                    Function::Enqueue,
                    &stats.busy.enqueue,
                    enqueue::handle(&self.handler, event),
                )
                .await;
                crashed = invocation.is_some_and(|i| i.crashed());
                match outcome {
                    Some(Ok(report)) => {
                        stats
                            .queued
                            .fetch_add(report.queued as u64, Ordering::Relaxed);
                        stats
                            .already_labelled
                            .fetch_add(report.already_labelled as u64, Ordering::Relaxed);
                        true
                    }
                    Some(Err(e)) => {
                        stats.handler_errors.fetch_add(1, Ordering::Relaxed);
                        tracing::error!(error = %e, "enqueue failed; the event will be delivered again");
                        false
                    }
                    None => false,
                }
            }
        };
        let Some(handle) = message.receipt_handle else {
            return;
        };
        if handled {
            let _ = sqs
                .delete_message()
                .queue_url(queue_url)
                .receipt_handle(handle)
                .send()
                .await;
        } else if let Some(chaos) = chaos {
            let id = message.message_id.unwrap_or_default();
            chaos.release(queue_url, &[(id, handle)], crashed).await;
        }
    }
}

/// EventBridge → submit, on a fixed rate.
async fn schedule(
    handler: Arc<Submit>,
    every: Duration,
    stats: Arc<RunnerStats>,
    chaos: Option<Arc<Chaos>>,
) {
    let mut ticks = tokio::time::interval(every);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        let event = json!({
            "version": "0",
            "id": hex_random(16),
            "detail-type": "Scheduled Event",
            "source": "aws.events",
            "account": "000000000000",
            "time": rfc3339_now(),
            "region": "us-east-1",
            "resources": ["arn:aws:events:us-east-1:000000000000:rule/shotlabel-local-schedule"],
            "detail": {}
        });
        stats.submit_runs.fetch_add(1, Ordering::Relaxed);
        let (outcome, invocation) = invoke(
            chaos.as_ref(),
            Function::Submit,
            &stats.busy.submit_scheduled,
            submit::handle(&handler, event),
        )
        .await;
        if let Some(Err(e)) = outcome {
            stats.handler_errors.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(error = %e, "scheduled submit run reported errors");
        }
        release_held(
            chaos.as_ref(),
            invocation,
            &handler.config.pending_queue_url,
        )
        .await;
    }
}

/// Under chaos, the pending messages a submit invocation still held go back as its
/// crash or its end leaves them.
async fn release_held(chaos: Option<&Arc<Chaos>>, invocation: Option<Arc<Invocation>>, url: &str) {
    if let (Some(chaos), Some(invocation)) = (chaos, invocation) {
        let left = invocation.held(url);
        if !left.is_empty() {
            chaos.release(url, &left, invocation.crashed()).await;
        }
    }
}

/// What the submit workers' runner works with.
#[derive(Clone)]
struct WorkerRunner {
    sqs: aws_sdk_sqs::Client,
    queue_url: String,
    handler: Arc<Submit>,
    stats: Arc<RunnerStats>,
    chaos: Option<Arc<Chaos>>,
}

/// Work queue → submit workers: the template's event source mapping with batch size 1
/// and `MaximumConcurrency` = `workers`. Each ticket is one worker invocation, run as a
/// concurrent task; a ticket whose worker failed comes back, as Lambda retries it.
async fn submit_workers(runner: WorkerRunner, workers: usize) {
    let slots = Arc::new(tokio::sync::Semaphore::new(workers.max(1)));
    let mut running = tokio::task::JoinSet::new();
    loop {
        while running.try_join_next().is_some() {}
        let Ok(slot) = slots.clone().acquire_owned().await else {
            return;
        };
        let received = runner
            .sqs
            .receive_message()
            .queue_url(&runner.queue_url)
            .max_number_of_messages(1)
            .wait_time_seconds(1)
            .visibility_timeout(120)
            .send()
            .await;
        let message = match received {
            Ok(output) => output.messages.unwrap_or_default().into_iter().next(),
            Err(e) => {
                tracing::warn!(error = %e, "receiving work tickets");
                tokio::time::sleep(Duration::from_millis(500)).await;
                continue;
            }
        };
        let Some(message) = message else {
            continue;
        };
        let runner = runner.clone();
        running.spawn(async move {
            runner.invocation(message).await;
            drop(slot);
        });
    }
}

impl WorkerRunner {
    async fn invocation(&self, message: aws_sdk_sqs::types::Message) {
        self.stats.submit_runs.fetch_add(1, Ordering::Relaxed);
        let mut record = SqsMessage::default();
        record.message_id = message.message_id.clone();
        record.receipt_handle = message.receipt_handle.clone();
        record.body = message.body.clone();
        record.event_source = Some("aws:sqs".into());
        record.event_source_arn = Some(format!(
            "arn:aws:sqs:us-east-1:000000000000:{}",
            queue_name(&self.queue_url)
        ));
        record.aws_region = Some("us-east-1".into());
        let mut event = SqsEvent::default();
        event.records.push(record);
        let event = serde_json::to_value(&event).unwrap_or_default();
        let started = std::time::Instant::now();
        let (outcome, invocation) = invoke(
            self.chaos.as_ref(),
            Function::Submit,
            &self.stats.busy.submit_worker,
            submit::handle(&self.handler, event),
        )
        .await;
        if let Some(Ok(report)) = &outcome
            && let Ok(mut runs) = self.stats.worker_runs.lock()
        {
            runs.push(WorkerRun {
                started,
                ended: std::time::Instant::now(),
                received: report.submit.received,
                prepared: report.submit.prepared,
                batches: report.submit.batches.len(),
                superseded: report.submit.superseded,
                duplicate_messages: report.submit.duplicate_messages,
            });
        }
        let done = match outcome {
            Some(Ok(_)) => true,
            Some(Err(e)) => {
                self.stats.handler_errors.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(error = %e, "a submit worker reported errors");
                false
            }
            None => false,
        };
        release_held(
            self.chaos.as_ref(),
            invocation,
            &self.handler.config.pending_queue_url,
        )
        .await;
        // A failed worker's ticket is not retried here: the next scheduled run dispatches
        // again, which is what the dead-letter queue after two receives comes to on AWS.
        let _ = done;
        if let Some(handle) = message.receipt_handle {
            let _ = self
                .sqs
                .delete_message()
                .queue_url(&self.queue_url)
                .receipt_handle(handle)
                .send()
                .await;
        }
    }
}

/// Now in RFC 3339, as EventBridge writes `time`.
fn rfc3339_now() -> String {
    use aws_sdk_s3::primitives::{DateTime, DateTimeFormat};
    DateTime::from(std::time::SystemTime::now())
        .fmt(DateTimeFormat::DateTime)
        .unwrap_or_default()
}

/// Function URL → webhook: each HTTP request becomes the event a Function URL delivers.
async fn serve_webhook(
    listener: tokio::net::TcpListener,
    handler: Arc<Webhook>,
    stats: Arc<RunnerStats>,
) {
    let app = axum::Router::new()
        .fallback(function_url)
        .with_state((handler, stats));
    if let Err(e) = axum::serve(listener, app).await {
        tracing::error!(error = %e, "the webhook listener stopped");
    }
}

async fn function_url(
    State((handler, stats)): State<(Arc<Webhook>, Arc<RunnerStats>)>,
    request: Request,
) -> Response {
    stats.webhook_requests.fetch_add(1, Ordering::Relaxed);
    let (parts, body) = request.into_parts();
    // Function URLs cap payloads at 6 MB; so does this listener.
    let body: Bytes = match axum::body::to_bytes(body, 6 * 1024 * 1024).await {
        Ok(body) => body,
        Err(_) => return StatusCode::PAYLOAD_TOO_LARGE.into_response(),
    };
    let event = function_url_event(&parts, &body);
    let started = std::time::Instant::now();
    let outcome = webhook::handle(&handler, event).await;
    stats.busy.webhook.record(started.elapsed());
    match outcome {
        Ok(response) => function_url_response(&response),
        Err(e) => {
            stats.handler_errors.fetch_add(1, Ordering::Relaxed);
            tracing::error!(error = %e, "the webhook handler failed");
            StatusCode::INTERNAL_SERVER_ERROR.into_response()
        }
    }
}

/// The Function URL event Lambda delivers for an HTTP request (bodies base64-encoded, as
/// Function URLs send them).
pub fn function_url_event(
    parts: &axum::http::request::Parts,
    body: &[u8],
) -> LambdaFunctionUrlRequest {
    let mut event = LambdaFunctionUrlRequest::default();
    event.version = Some("2.0".into());
    event.raw_path = Some(parts.uri.path().to_owned());
    event.raw_query_string = Some(parts.uri.query().unwrap_or_default().to_owned());
    event.headers = parts.headers.clone();
    event.is_base64_encoded = true;
    event.body = Some(base64::engine::general_purpose::STANDARD.encode(body));
    let mut http = LambdaFunctionUrlRequestContextHttpDescription::default();
    http.method = Some(parts.method.to_string());
    http.path = Some(parts.uri.path().to_owned());
    http.protocol = Some("HTTP/1.1".into());
    http.source_ip = Some("127.0.0.1".into());
    let mut context = LambdaFunctionUrlRequestContext::default();
    context.http = http;
    event.request_context = context;
    event
}

/// A Function URL response as the HTTP response it stands for.
pub fn function_url_response(response: &LambdaFunctionUrlResponse) -> Response {
    let status = u16::try_from(response.status_code)
        .ok()
        .and_then(|s| StatusCode::from_u16(s).ok())
        .unwrap_or(StatusCode::OK);
    let body = response.body.clone().unwrap_or_default();
    let body = if response.is_base64_encoded {
        base64::engine::general_purpose::STANDARD
            .decode(&body)
            .unwrap_or_default()
    } else {
        body.into_bytes()
    };
    let mut headers = HeaderMap::new();
    for (name, value) in &response.headers {
        headers.insert(name.clone(), value.clone());
    }
    (status, headers, body).into_response()
}

/// What the harvest-queue runner works with.
#[derive(Clone)]
struct HarvestRunner {
    sqs: aws_sdk_sqs::Client,
    queue_url: String,
    handler: Arc<Harvest>,
    stats: Arc<RunnerStats>,
    chaos: Option<Arc<Chaos>>,
}

/// SQS harvest queue → the harvest function's handler, with Lambda's partial batch
/// failure semantics: only the messages the handler did not report are deleted. Up to
/// `concurrency` invocations run at once.
async fn harvest_queue(runner: HarvestRunner, concurrency: usize) {
    let slots = Arc::new(tokio::sync::Semaphore::new(concurrency.max(1)));
    // Dropped with the runner, which aborts the invocations still running.
    let mut running = tokio::task::JoinSet::new();
    loop {
        while running.try_join_next().is_some() {}
        let Ok(slot) = slots.clone().acquire_owned().await else {
            return;
        };
        let received = runner
            .sqs
            .receive_message()
            .queue_url(&runner.queue_url)
            .max_number_of_messages(10)
            .wait_time_seconds(1)
            .visibility_timeout(60)
            .message_system_attribute_names(
                aws_sdk_sqs::types::MessageSystemAttributeName::ApproximateReceiveCount,
            )
            .send()
            .await;
        let messages = match received {
            Ok(output) => output.messages.unwrap_or_default(),
            Err(e) => {
                tracing::warn!(error = %e, "receiving harvest requests");
                tokio::time::sleep(Duration::from_millis(500)).await;
                continue;
            }
        };
        if messages.is_empty() {
            continue;
        }
        if let Some(chaos) = &runner.chaos {
            chaos
                .redeliver(&runner.queue_url, &message_handles(&messages))
                .await;
        }
        let runner = runner.clone();
        running.spawn(async move {
            runner.invocation(messages).await;
            drop(slot);
        });
    }
}

/// (message id, receipt handle) of each message.
fn message_handles(messages: &[aws_sdk_sqs::types::Message]) -> Vec<(String, String)> {
    messages
        .iter()
        .filter_map(|m| Some((m.message_id.clone()?, m.receipt_handle.clone()?)))
        .collect()
}

impl HarvestRunner {
    /// One invocation on a batch of harvest-queue messages.
    async fn invocation(&self, messages: Vec<aws_sdk_sqs::types::Message>) {
        let (sqs, queue_url, stats) = (&self.sqs, &self.queue_url, &self.stats);
        stats
            .harvest_messages
            .fetch_add(messages.len() as u64, Ordering::Relaxed);
        let mut event = SqsEvent::default();
        for message in &messages {
            let mut record = SqsMessage::default();
            record.message_id = message.message_id.clone();
            record.receipt_handle = message.receipt_handle.clone();
            record.body = message.body.clone();
            record.event_source = Some("aws:sqs".into());
            record.event_source_arn = Some(format!(
                "arn:aws:sqs:us-east-1:000000000000:{}",
                queue_name(queue_url)
            ));
            record.aws_region = Some("us-east-1".into());
            event.records.push(record);
        }
        let all = || -> Vec<String> {
            messages
                .iter()
                .filter_map(|m| m.message_id.clone())
                .collect()
        };
        let (outcome, invocation) = invoke(
            self.chaos.as_ref(),
            Function::Harvest,
            &stats.busy.harvest,
            harvest::handle(&self.handler, event),
        )
        .await;
        let crashed = invocation.is_some_and(|i| i.crashed());
        let failures: Vec<String> = match outcome {
            Some(Ok(response)) => response
                .batch_item_failures
                .into_iter()
                .map(|f| f.item_identifier)
                .collect(),
            Some(Err(e)) => {
                stats.handler_errors.fetch_add(1, Ordering::Relaxed);
                tracing::error!(error = %e, "the harvest handler failed");
                all()
            }
            // Killed: Lambda retries the whole batch.
            None => all(),
        };
        let mut left = Vec::new();
        for message in messages {
            let failed = message
                .message_id
                .as_ref()
                .is_some_and(|id| failures.contains(id));
            let Some(handle) = message.receipt_handle else {
                continue;
            };
            if failed {
                stats.handler_errors.fetch_add(1, Ordering::Relaxed);
                left.push((message.message_id.unwrap_or_default(), handle));
                continue;
            }
            let _ = sqs
                .delete_message()
                .queue_url(queue_url)
                .receipt_handle(handle)
                .send()
                .await;
        }
        if let Some(chaos) = &self.chaos
            && !left.is_empty()
        {
            chaos.release(queue_url, &left, crashed).await;
        }
    }
}

fn queue_name(url: &str) -> &str {
    url.rsplit('/').next().unwrap_or(url)
}
