//! The one settings layer: every function's environment as a typed value, read once at cold
//! start and used the same way by the Lambda functions and the local pipeline.
//!
//! Each function has one [`clap::Parser`] type ([`EnqueueSettings`], [`SubmitSettings`],
//! [`ReceiverSettings`], [`HarvestSettings`]) built from the shared groups below, each field
//! bound to its `SHOTLABEL_*` variable. [`FunctionSettings::from_env`] reads them (never the
//! process's command line), and [`FunctionSettings::variables`] lists every variable the type
//! reads: the deployment description and the template test take that list from here, so a
//! new setting cannot be forgotten in `template.yaml`.
//!
//! The conversions into the pipeline's configurations (`HarvestSettings::config`,
//! `SubmitSettings::config`, …) are the only place defaults meet values, so the local
//! pipeline, which builds the settings in code, configures exactly what a deployment does.

use std::collections::BTreeSet;
use std::convert::Infallible;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use clap::error::{ContextKind, ContextValue, ErrorKind};
use clap::{Args, CommandFactory, Parser, ValueEnum};
use secrecy::{ExposeSecret, SecretString};

use crate::backpressure::ProviderLimits;
use crate::enqueue::EnqueueConfig;
use crate::harvest::HarvestConfig;
use crate::prepare::DecodeLimits;
use crate::provider::{ProviderDefaults, ProviderProfile};
use crate::records::{Layout, TaskRef};
use crate::request::BatchLimits;
use crate::standard_webhooks::WebhookSecrets;
use crate::task::{Task, TaskError};
use crate::webhook::{MIN_PER_BATCH_SECRET_LEN, WebhookConfig};

#[derive(Debug, thiserror::Error)]
pub enum SettingsError {
    #[error("{name} must be set ({what})")]
    Missing { name: String, what: String },
    #[error("{name}={value:?} is not valid: expected {what}")]
    Invalid {
        name: String,
        value: String,
        what: String,
    },
    #[error("settings: {0}")]
    Other(String),
    #[error(transparent)]
    Task(#[from] TaskError),
}

/// Reading a function's settings from the environment, and naming what it reads.
pub trait FunctionSettings: Parser {
    /// The settings from the process environment: its `SHOTLABEL_*` variables that this
    /// type reads, through [`FunctionSettings::from_vars`]. The process's arguments (a
    /// Lambda bootstrap has none that matter) are never read.
    fn from_env() -> Result<Self, SettingsError> {
        let read = Self::variables();
        let vars: Vec<(String, String)> = std::env::vars()
            .filter(|(name, _)| read.contains(name))
            .collect();
        Self::from_vars(vars.iter().map(|(n, v)| (n.as_str(), v.as_str())))
    }

    /// The settings from these variables alone, as a deployment would set them: the local
    /// pipeline configures its functions this way, and tests too. A variable that is empty
    /// or blank counts as unset; one this type does not read is an error.
    fn from_vars<'a>(
        vars: impl IntoIterator<Item = (&'a str, &'a str)>,
    ) -> Result<Self, SettingsError> {
        // Only the given variables count, never the process's: each becomes the argument
        // bound to it, and no argument reads the environment itself.
        let command = Self::command();
        let mut args = vec!["shotlabel".to_owned()];
        for (name, value) in vars {
            if value.trim().is_empty() {
                continue;
            }
            let long = command
                .get_arguments()
                .find(|a| a.get_env().is_some_and(|env| env == name))
                .and_then(|a| a.get_long().map(str::to_owned))
                .ok_or_else(|| SettingsError::Other(format!("{name} is not a setting here")))?;
            args.push(format!("--{long}={value}"));
        }
        let matches = command
            .mut_args(|arg| arg.env(None))
            .try_get_matches_from(args)
            .map_err(|e| settings_error::<Self>(&e))?;
        Self::from_arg_matches(&matches).map_err(|e| settings_error::<Self>(&e))
    }

    /// Every variable the settings read.
    fn variables() -> BTreeSet<String> {
        Self::command()
            .get_arguments()
            .filter_map(|arg| arg.get_env())
            .map(|name| name.to_string_lossy().into_owned())
            .collect()
    }
}

impl<T: Parser> FunctionSettings for T {}

/// clap's error as one that names the variable, never the command-line flag clap knows it
/// by. A secret's value can't appear: secrets parse infallibly.
fn settings_error<T: CommandFactory>(error: &clap::Error) -> SettingsError {
    let command = T::command();
    let flag = match error.get(ContextKind::InvalidArg) {
        Some(ContextValue::String(flag)) => Some(flag.clone()),
        Some(ContextValue::Strings(flags)) => flags.first().cloned(),
        _ => None,
    };
    // "--bucket <BUCKET>" → the argument whose long name is "bucket".
    let arg = flag.as_deref().and_then(|flag| {
        let long = flag.trim_start_matches('-').split([' ', '=']).next()?;
        command.get_arguments().find(|a| a.get_long() == Some(long))
    });
    let Some(arg) = arg else {
        return SettingsError::Other(error.kind().to_string());
    };
    let name = arg.get_env().map_or_else(
        || arg.get_id().to_string(),
        |n| n.to_string_lossy().into_owned(),
    );
    let what = arg.get_help().map(ToString::to_string).unwrap_or_default();
    match error.kind() {
        ErrorKind::MissingRequiredArgument => SettingsError::Missing { name, what },
        _ => {
            let value = match error.get(ContextKind::InvalidValue) {
                Some(ContextValue::String(value)) => value.clone(),
                _ => String::new(),
            };
            let expected = match error.get(ContextKind::ValidValue) {
                Some(ContextValue::Strings(values)) => values.join(", "),
                _ => what,
            };
            SettingsError::Invalid {
                name,
                value,
                what: expected,
            }
        }
    }
}

fn secret(value: &str) -> Result<SecretString, Infallible> {
    Ok(SecretString::from(value.trim().to_owned()))
}

/// Always ends in `/`, so that `incoming` and `incoming/` mean the same.
fn prefix(value: &str) -> Result<String, Infallible> {
    Ok(if value.ends_with('/') {
        value.to_owned()
    } else {
        format!("{value}/")
    })
}

/// The task and where its images live: every function that reads or writes images.
#[derive(Debug, Clone, Args)]
pub struct TaskSettings {
    /// the task file (TOML); the built-in website judgement when unset
    #[arg(long = "task", env = "SHOTLABEL_TASK")]
    pub task_file: Option<PathBuf>,
    /// the prefix images arrive under; labels are laid out below it
    #[arg(long, env = "SHOTLABEL_INPUT_PREFIX", default_value = "incoming/", value_parser = prefix)]
    pub input_prefix: String,
}

impl TaskSettings {
    pub fn load_task(&self) -> Result<Task, SettingsError> {
        Ok(match &self.task_file {
            Some(path) => Task::from_path(path)?,
            None => Task::default_task()?,
        })
    }

    pub fn layout(&self) -> Layout {
        Layout::new(&self.input_prefix)
    }
}

impl Default for TaskSettings {
    fn default() -> Self {
        Self {
            task_file: None,
            input_prefix: "incoming/".into(),
        }
    }
}

/// How the S3 client addresses the bucket.
#[derive(Debug, Clone, Default, Args)]
pub struct S3Settings {
    /// path-style addressing (true/false); by default only with a custom endpoint
    #[arg(long, env = "SHOTLABEL_S3_PATH_STYLE", value_parser = clap::builder::BoolishValueParser::new())]
    pub s3_path_style: Option<bool>,
}

/// The provider's Batch API and its key.
#[derive(Debug, Clone, Args)]
pub struct ProviderSettings {
    /// which provider: inference-net, openai or generic (its documented limits and quirks
    /// are the defaults; docs/providers.md)
    #[arg(long, env = "SHOTLABEL_PROVIDER", value_enum, default_value_t = ProviderProfile::Generic)]
    pub provider: ProviderProfile,
    /// delete a batch's files at the provider once it is harvested (true/false; default:
    /// the provider profile's)
    #[arg(long, env = "SHOTLABEL_DELETE_PROVIDER_FILES", value_parser = clap::builder::BoolishValueParser::new())]
    pub delete_provider_files: Option<bool>,
    /// the provider's Batch API root, e.g. https://api.openai.com/v1
    #[arg(long, env = "SHOTLABEL_PROVIDER_URL")]
    pub provider_url: String,
    /// the provider's API key itself (local runs)
    #[arg(long, env = "SHOTLABEL_API_KEY", value_parser = secret, hide_env_values = true)]
    pub api_key: Option<SecretString>,
    /// the Secrets Manager secret holding the provider's API key (deployments)
    #[arg(long, env = "SHOTLABEL_API_KEY_SECRET_ARN")]
    pub api_key_secret_arn: Option<String>,
}

impl ProviderSettings {
    /// A harvest's configuration with this provider's file clean-up.
    pub fn harvest_config(&self, args: &HarvestArgs) -> Result<HarvestConfig, SettingsError> {
        let mut config = args.config()?;
        config.delete_provider_files = self
            .delete_provider_files
            .unwrap_or(self.provider.defaults().delete_files_after_harvest);
        Ok(config)
    }
}

/// How providers' completion callbacks are authenticated. One enum, one default, for the
/// receiver and the submitter (which makes per-batch URLs) alike.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, ValueEnum)]
pub enum WebhookMode {
    /// Standard Webhooks signatures (OpenAI): the secret holds the `whsec_` secrets,
    /// space-separated while one rotates.
    Standard,
    /// Per-batch URL tokens (Inference.net): the secret's bytes are the HMAC key.
    PerBatch,
    /// No callbacks (reconciliation only): every callback is refused.
    #[default]
    None,
}

/// The webhook mode and its secret.
#[derive(Debug, Clone, Default, Args)]
pub struct WebhookSettings {
    /// how callbacks are authenticated: standard, per-batch or none
    #[arg(long, env = "SHOTLABEL_WEBHOOK_MODE", value_enum, default_value_t = WebhookMode::None)]
    pub webhook_mode: WebhookMode,
    /// the webhook secret itself (local runs)
    #[arg(long, env = "SHOTLABEL_WEBHOOK_SECRET", value_parser = secret, hide_env_values = true)]
    pub webhook_secret: Option<SecretString>,
    /// the Secrets Manager secret holding the webhook secret (deployments)
    #[arg(long, env = "SHOTLABEL_WEBHOOK_SECRET_SECRET_ARN")]
    pub webhook_secret_secret_arn: Option<String>,
}

/// What a harvest needs; the submitter's reconciliation harvests too, with the same.
#[derive(Debug, Clone, Args)]
pub struct HarvestArgs {
    /// the bucket shotlabel works in
    #[arg(long, env = "SHOTLABEL_BUCKET")]
    pub bucket: String,
    /// the URL of the pending SQS queue (retries go back onto it)
    #[arg(long, env = "SHOTLABEL_PENDING_QUEUE_URL")]
    pub pending_queue_url: String,
    /// attempts per image before it becomes a failed record
    #[arg(long, env = "SHOTLABEL_MAX_RETRIES", default_value_t = 3)]
    pub max_retries: u32,
    /// times an image may go round again because its batch failed (expired, cancelled,
    /// refused for capacity), apart from its retries
    #[arg(long, env = "SHOTLABEL_MAX_REQUEUES", default_value_t = 10)]
    pub max_requeues: u32,
    /// the harvest queue: when set, batches of more than SHOTLABEL_HARVEST_SHARD_REQUESTS
    /// requests are harvested in shards, one harvest-queue message each
    #[arg(long, env = "SHOTLABEL_HARVEST_QUEUE_URL")]
    pub harvest_queue_url: Option<String>,
    /// requests per harvest shard
    #[arg(
        long,
        env = "SHOTLABEL_HARVEST_SHARD_REQUESTS",
        default_value_t = 10_000
    )]
    pub harvest_shard_requests: usize,
    /// seconds after which the shards of a batch that are still not done are queued again
    /// (their message may be in the dead-letter queue); longer than the harvest queue's
    /// visibility timeout, so that a slow shard is not started twice
    #[arg(
        long,
        env = "SHOTLABEL_HARVEST_SHARD_RESEND_SECONDS",
        default_value_t = 7_200
    )]
    pub harvest_shard_resend_seconds: u64,
    #[command(flatten)]
    pub task: TaskSettings,
}

impl HarvestArgs {
    pub fn config(&self) -> Result<HarvestConfig, SettingsError> {
        Ok(HarvestConfig {
            bucket: self.bucket.clone(),
            layout: self.task.layout(),
            pending_queue_url: self.pending_queue_url.clone(),
            task: Arc::new(self.task.load_task()?),
            max_retries: self.max_retries,
            max_requeues: self.max_requeues,
            shards: self
                .harvest_queue_url
                .clone()
                .map(|queue_url| crate::harvest::ShardConfig {
                    queue_url,
                    requests_per_shard: self.harvest_shard_requests.max(1),
                    resend_after: std::time::Duration::from_secs(self.harvest_shard_resend_seconds),
                }),
            delete_provider_files: false,
        })
    }
}

/// The enqueue function: S3 events in, pending messages out.
#[derive(Debug, Clone, Parser)]
pub struct EnqueueSettings {
    /// the URL of the pending SQS queue
    #[arg(long, env = "SHOTLABEL_PENDING_QUEUE_URL")]
    pub pending_queue_url: String,
    /// the largest object queued, in bytes; larger ones become failed records
    #[arg(long, env = "SHOTLABEL_MAX_OBJECT_BYTES", default_value_t = DecodeLimits::default().max_bytes)]
    pub max_object_bytes: u64,
    /// label again objects that already have a label of this task version
    #[arg(long, env = "SHOTLABEL_FORCE_RELABEL", default_value_t = false, value_parser = clap::builder::BoolishValueParser::new(), action = clap::ArgAction::Set)]
    pub force_relabel: bool,
    #[command(flatten)]
    pub task: TaskSettings,
    #[command(flatten)]
    pub s3: S3Settings,
}

impl EnqueueSettings {
    pub fn config(&self) -> Result<EnqueueConfig, SettingsError> {
        let task = self.task.load_task()?;
        Ok(EnqueueConfig {
            layout: self.task.layout(),
            pending_queue_url: self.pending_queue_url.clone(),
            max_object_bytes: self.max_object_bytes,
            force_relabel: self.force_relabel,
            task: TaskRef {
                name: task.name().to_owned(),
                version: task.version().to_owned(),
            },
        })
    }
}

/// The submit function: reconcile, then drain the pending queue into batches.
#[derive(Debug, Clone, Parser)]
pub struct SubmitSettings {
    #[command(flatten)]
    pub harvest: HarvestArgs,
    #[command(flatten)]
    pub provider: ProviderSettings,
    #[command(flatten)]
    pub webhook: WebhookSettings,
    /// the webhook's public URL, for per-batch webhook mode
    #[arg(long, env = "SHOTLABEL_WEBHOOK_URL")]
    pub webhook_url: Option<url::Url>,
    /// most requests in one batch file (default and most: the provider's limit)
    #[arg(long, env = "SHOTLABEL_MAX_BATCH_REQUESTS")]
    pub max_batch_requests: Option<usize>,
    /// most bytes in one batch file (default and most: the provider's limit)
    #[arg(long, env = "SHOTLABEL_MAX_BATCH_BYTES")]
    pub max_batch_bytes: Option<u64>,
    /// the largest request line; a larger one gets a failed record (default and most: the
    /// provider's limit, if it documents one)
    #[arg(long, env = "SHOTLABEL_MAX_REQUEST_BYTES")]
    pub max_request_bytes: Option<u64>,
    /// the largest image read, in bytes
    #[arg(long, env = "SHOTLABEL_MAX_OBJECT_BYTES", default_value_t = DecodeLimits::default().max_bytes)]
    pub max_object_bytes: u64,
    /// the most pixels an image may claim
    #[arg(long, env = "SHOTLABEL_MAX_IMAGE_PIXELS", default_value_t = DecodeLimits::default().max_pixels)]
    pub max_image_pixels: u64,
    /// seconds one run may spend draining and preparing
    #[arg(long, env = "SHOTLABEL_SUBMIT_BUDGET_SECONDS", default_value_t = 240)]
    pub submit_budget_seconds: u64,
    /// seconds a received message stays hidden (must outlast the budget by 60 s)
    #[arg(
        long,
        env = "SHOTLABEL_SUBMIT_VISIBILITY_SECONDS",
        default_value_t = 900
    )]
    pub submit_visibility_seconds: u64,
    /// seconds one receive call waits for messages
    #[arg(long, env = "SHOTLABEL_RECEIVE_WAIT_SECONDS", default_value_t = 1)]
    pub receive_wait_seconds: u64,
    /// most images one run takes (0: no limit but the budget)
    #[arg(long, env = "SHOTLABEL_MAX_IMAGES_PER_RUN", default_value_t = 0)]
    pub max_images_per_run: usize,
    /// images prepared at once (default: the CPUs)
    #[arg(long, env = "SHOTLABEL_CONCURRENCY")]
    pub concurrency: Option<usize>,
    /// where request files are written (default: the temporary directory)
    #[arg(long, env = "SHOTLABEL_WORK_DIR")]
    pub work_dir: Option<PathBuf>,
    /// the batches' completion window
    #[arg(long, env = "SHOTLABEL_COMPLETION_WINDOW", default_value = "24h")]
    pub completion_window: String,
    /// open batches younger than this many seconds are left to their webhook
    #[arg(long, env = "SHOTLABEL_RECONCILE_MIN_AGE_SECONDS", default_value_t = 0)]
    pub reconcile_min_age_seconds: u64,
    /// the work queue: when set, a scheduled run starts workers through it instead of
    /// submitting itself
    #[arg(long, env = "SHOTLABEL_SUBMIT_WORK_QUEUE_URL")]
    pub submit_work_queue_url: Option<String>,
    /// the most submit workers at once
    #[arg(long, env = "SHOTLABEL_MAX_SUBMIT_WORKERS", default_value_t = 10)]
    pub max_submit_workers: usize,
    /// the pending queue's maxReceiveCount (0: it has no dead-letter queue); an image that
    /// cannot be read for now is sent back as a new message before its receives run out
    #[arg(long, env = "SHOTLABEL_PENDING_MAX_RECEIVES", default_value_t = 5)]
    pub pending_max_receives: u32,
    #[command(flatten)]
    pub provider_limits: ProviderLimitSettings,
    #[command(flatten)]
    pub s3: S3Settings,
}

/// A limit as set, or the provider's default; a set value over the provider's documented
/// limit is refused at start-up rather than by the provider later, batch by batch.
fn within(
    name: &str,
    set: Option<u64>,
    provider_limit: Option<u64>,
    profile: ProviderProfile,
) -> Result<Option<u64>, SettingsError> {
    match (set, provider_limit) {
        (Some(value), Some(limit)) if value > limit => Err(SettingsError::Invalid {
            name: name.into(),
            value: value.to_string(),
            what: format!("at most {limit}, the limit {} documents", profile.name()),
        }),
        (Some(0), _) => Err(SettingsError::Invalid {
            name: name.into(),
            value: "0".into(),
            what: "at least 1".into(),
        }),
        (Some(value), _) => Ok(Some(value)),
        (None, limit) => Ok(limit),
    }
}

/// What the provider takes at once (0: no limit; unset: the provider profile's).
#[derive(Debug, Clone, Default, Args)]
pub struct ProviderLimitSettings {
    /// the most batches open at the provider at once (0: no limit)
    #[arg(long, env = "SHOTLABEL_MAX_OPEN_BATCHES")]
    pub max_open_batches: Option<u32>,
    /// the most requests in open batches at once (0: no limit)
    #[arg(long, env = "SHOTLABEL_MAX_ENQUEUED_REQUESTS")]
    pub max_enqueued_requests: Option<u64>,
    /// the shortest time between two batch file uploads, in seconds (0: none)
    #[arg(long, env = "SHOTLABEL_UPLOAD_INTERVAL_SECONDS")]
    pub upload_interval_seconds: Option<f64>,
    /// seconds a slot claimed by a crashed worker stays held before it is taken over
    #[arg(long, env = "SHOTLABEL_SLOT_LEASE_SECONDS", default_value_t = 900)]
    pub slot_lease_seconds: u64,
}

impl ProviderLimitSettings {
    /// The limits set, the provider's defaults for those that are not.
    pub fn limits(&self, defaults: &ProviderDefaults) -> Result<ProviderLimits, SettingsError> {
        let interval = match self.upload_interval_seconds {
            None => defaults.upload_interval,
            Some(seconds) => {
                Duration::try_from_secs_f64(seconds).map_err(|_| SettingsError::Invalid {
                    name: "SHOTLABEL_UPLOAD_INTERVAL_SECONDS".into(),
                    value: seconds.to_string(),
                    what: "a number of seconds, 0 or more".into(),
                })?
            }
        };
        Ok(ProviderLimits {
            max_open_batches: self.max_open_batches.unwrap_or(defaults.max_open_batches),
            max_enqueued_requests: self
                .max_enqueued_requests
                .unwrap_or(defaults.max_enqueued_requests),
            upload_interval: interval,
            // Each look at the slots is a few S3 requests per slot.
            poll_interval: Duration::from_secs(2),
        })
    }
}

impl SubmitSettings {
    /// The submitter's configuration. The webhook secret is passed in resolved: on AWS it
    /// comes from Secrets Manager, which only an adapter can read.
    pub fn config(
        &self,
        webhook_secret: Option<SecretString>,
    ) -> Result<crate::submit::SubmitConfig, SettingsError> {
        let profile = self.provider.provider;
        let defaults = profile.defaults();
        let per_batch_webhook = match self.webhook.webhook_mode {
            WebhookMode::PerBatch if !defaults.accepts_webhook_url => {
                return Err(SettingsError::Invalid {
                    name: "SHOTLABEL_WEBHOOK_MODE".into(),
                    value: "per-batch".into(),
                    what: format!(
                        "standard or none: {} takes no per-batch webhook_url (it refuses \
                         unknown arguments with 400; its webhooks are set per project and \
                         signed: use standard)",
                        profile.name()
                    ),
                });
            }
            WebhookMode::PerBatch => {
                let base_url = self.webhook_url.clone().ok_or(SettingsError::Missing {
                    name: "SHOTLABEL_WEBHOOK_URL".into(),
                    what: "the webhook's public URL, for per-batch webhook mode".into(),
                })?;
                let secret = webhook_secret.ok_or(SettingsError::Missing {
                    name: "SHOTLABEL_WEBHOOK_SECRET".into(),
                    what: "the secret that signs per-batch webhook URLs".into(),
                })?;
                Some(crate::submit::PerBatchWebhook { base_url, secret })
            }
            WebhookMode::Standard | WebhookMode::None => None,
        };
        let harvest = self.harvest.config()?;
        let task = Arc::new(
            (*harvest.task)
                .clone()
                .with_provider_token_field(defaults.token_field),
        );
        Ok(crate::submit::SubmitConfig {
            bucket: harvest.bucket,
            layout: harvest.layout,
            pending_queue_url: harvest.pending_queue_url,
            task,
            limits: self.batch_limits()?,
            max_request_bytes: within(
                "SHOTLABEL_MAX_REQUEST_BYTES",
                self.max_request_bytes,
                defaults.max_request_bytes,
                profile,
            )?,
            decode_limits: DecodeLimits {
                max_bytes: self.max_object_bytes,
                max_pixels: self.max_image_pixels,
            },
            time_budget: Duration::from_secs(self.submit_budget_seconds),
            visibility_timeout: Duration::from_secs(self.submit_visibility_seconds),
            receive_wait: Duration::from_secs(self.receive_wait_seconds),
            max_images: self.max_images_per_run,
            concurrency: self.concurrency.unwrap_or_else(|| {
                std::thread::available_parallelism().map_or(2, std::num::NonZeroUsize::get)
            }),
            work_dir: self.work_dir.clone().unwrap_or_else(std::env::temp_dir),
            completion_window: self.completion_window.clone(),
            per_batch_webhook,
            provider_limits: self.provider_limits.limits(&defaults)?,
            slot_lease: Duration::from_secs(self.provider_limits.slot_lease_seconds),
            max_requeues: self.harvest.max_requeues,
            pending_max_receives: self.pending_max_receives,
        })
    }

    /// The request-file limits: those set, within the provider's, or the provider's.
    pub fn batch_limits(&self) -> Result<BatchLimits, SettingsError> {
        let profile = self.provider.provider;
        let file = profile.defaults().file_limits;
        let max_requests = within(
            "SHOTLABEL_MAX_BATCH_REQUESTS",
            self.max_batch_requests.map(|n| n as u64),
            Some(file.max_requests as u64),
            profile,
        )?
        .unwrap_or(file.max_requests as u64);
        let max_bytes = within(
            "SHOTLABEL_MAX_BATCH_BYTES",
            self.max_batch_bytes,
            Some(file.max_bytes),
            profile,
        )?
        .unwrap_or(file.max_bytes);
        Ok(BatchLimits {
            max_requests: usize::try_from(max_requests).unwrap_or(file.max_requests),
            max_bytes,
        })
    }

    /// The fan-out, when a work queue is set.
    pub fn dispatch(&self) -> Result<Option<crate::dispatch::DispatchConfig>, SettingsError> {
        let Some(work_queue_url) = self.submit_work_queue_url.clone() else {
            return Ok(None);
        };
        Ok(Some(crate::dispatch::DispatchConfig {
            pending_queue_url: self.harvest.pending_queue_url.clone(),
            work_queue_url,
            max_workers: self.max_submit_workers,
            images_per_worker: self.batch_limits()?.max_requests,
        }))
    }

    pub fn reconcile_min_age(&self) -> Duration {
        Duration::from_secs(self.reconcile_min_age_seconds)
    }
}

/// The webhook receiver behind the Function URL: authenticate, deduplicate, queue a
/// harvest. It holds no provider key and cannot reach the pending queue.
#[derive(Debug, Clone, Parser)]
pub struct ReceiverSettings {
    /// the bucket shotlabel works in (delivery markers)
    #[arg(long, env = "SHOTLABEL_BUCKET")]
    pub bucket: String,
    /// the URL of the harvest SQS queue
    #[arg(long, env = "SHOTLABEL_HARVEST_QUEUE_URL")]
    pub harvest_queue_url: String,
    /// the largest callback body accepted, in bytes
    #[arg(long, env = "SHOTLABEL_MAX_WEBHOOK_BYTES", default_value_t = crate::webhook::DEFAULT_MAX_BODY_BYTES)]
    pub max_webhook_bytes: usize,
    #[command(flatten)]
    pub webhook: WebhookSettings,
    #[command(flatten)]
    pub s3: S3Settings,
}

impl ReceiverSettings {
    /// The receiver's configuration. The secret is passed in resolved (on AWS it comes
    /// from Secrets Manager, which only an adapter can read).
    pub fn config(&self, secret: Option<SecretString>) -> Result<WebhookConfig, SettingsError> {
        let mut config = WebhookConfig::new(&self.bucket, &self.harvest_queue_url);
        config.max_body_bytes = self.max_webhook_bytes;
        apply_webhook_auth(&mut config, self.webhook.webhook_mode, secret)?;
        Ok(config)
    }
}

/// Configures the receiver's authentication for `mode` with its secret: the `whsec_`
/// secrets in standard mode, the HMAC key in per-batch mode, nothing in `none` (every
/// callback refused). A mode other than `none` needs its secret. Errors never show it.
pub fn apply_webhook_auth(
    config: &mut WebhookConfig,
    mode: WebhookMode,
    secret: Option<SecretString>,
) -> Result<(), SettingsError> {
    config.standard = None;
    config.per_batch_secret = None;
    let missing = || SettingsError::Missing {
        name: "SHOTLABEL_WEBHOOK_SECRET".into(),
        what: format!("the webhook secret for SHOTLABEL_WEBHOOK_MODE={mode:?}"),
    };
    match mode {
        WebhookMode::Standard => {
            let secret = secret.ok_or_else(missing)?;
            let secrets = WebhookSecrets::parse(secret.expose_secret()).map_err(|e| {
                SettingsError::Invalid {
                    name: "SHOTLABEL_WEBHOOK_SECRET".into(),
                    value: "[redacted]".into(),
                    what: format!("Standard Webhooks secrets ({e})"),
                }
            })?;
            config.standard = Some(secrets);
        }
        WebhookMode::PerBatch => {
            let secret = secret.ok_or_else(missing)?;
            if secret.expose_secret().len() < MIN_PER_BATCH_SECRET_LEN {
                return Err(SettingsError::Invalid {
                    name: "SHOTLABEL_WEBHOOK_SECRET".into(),
                    value: "[redacted]".into(),
                    what: format!(
                        "at least {MIN_PER_BATCH_SECRET_LEN} bytes for per-batch mode \
                         (it keys every per-batch URL token)"
                    ),
                });
            }
            config.per_batch_secret = Some(secret);
        }
        WebhookMode::None => {}
    }
    Ok(())
}

/// The harvest function on the harvest queue.
#[derive(Debug, Clone, Parser)]
pub struct HarvestSettings {
    #[command(flatten)]
    pub harvest: HarvestArgs,
    #[command(flatten)]
    pub provider: ProviderSettings,
    #[command(flatten)]
    pub s3: S3Settings,
}
