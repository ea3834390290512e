//! Run settings: everything the CLI flags map to, usable from Rust tests too.

use std::net::SocketAddr;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::error::Error;

/// The model name written into every chat completion, so nobody mistakes a
/// synthetic answer for a real model's label.
pub const EMULATOR_MODEL: &str = "shotlabel-batch-emulator";

/// How batch and file ids look.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum IdStyle {
    /// OpenAI style: `batch_<random>`, `file-<random>`.
    #[default]
    OpenAi,
    /// Non-OpenAI ids (uuid-like batches, numeric-ish files), as some
    /// providers hand out.
    Plain,
}

impl std::str::FromStr for IdStyle {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "openai" => Ok(Self::OpenAi),
            "plain" => Ok(Self::Plain),
            other => Err(Error::InvalidConfig(format!(
                "unknown id style {other:?} (expected openai or plain)"
            ))),
        }
    }
}

/// How a batch's `errors` is written, for the shapes real providers send.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ErrorsShape {
    /// OpenAI's documented shape: `{"object": "list", "data": [...]}`, `null` when none.
    #[default]
    OpenAi,
    /// `{"object": "list", "data": null}` when there are none (the `openai` SDK types
    /// `data` as optional).
    NullData,
    /// The list bare, `[]` when none (some OpenAI-compatible providers).
    Bare,
    /// Codes as numbers (400) with the code's name in the message, lines as strings.
    Loose,
}

impl std::str::FromStr for ErrorsShape {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "openai" => Ok(Self::OpenAi),
            "null-data" => Ok(Self::NullData),
            "bare" => Ok(Self::Bare),
            "loose" => Ok(Self::Loose),
            other => Err(Error::InvalidConfig(format!(
                "unknown errors shape {other:?} (expected openai, null-data, bare or loose)"
            ))),
        }
    }
}

/// Fault injection settings. Fractions are probabilities in `0.0..=1.0`,
/// drawn from generators seeded by [`EmulatorConfig::seed`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
pub struct FaultSettings {
    /// Requests answered as error lines (`inference_failed`).
    pub error_line: f64,
    /// Requests answered 200 with content that is not JSON.
    pub non_json: f64,
    /// Requests answered 200 with valid JSON that breaks the request's schema.
    pub schema_break: f64,
    /// Requests answered with `finish_reason: "length"` and cut-off content.
    pub length: f64,
    /// API calls answered 429 with `Retry-After`.
    pub http_429: f64,
    /// API calls answered 500.
    pub http_500: f64,
    /// Batches that expire with only part of their requests done.
    pub expire: f64,
    /// Batches failed whole at validation with `token_limit_exceeded`, as OpenAI fails a
    /// batch when the organisation's enqueued-token limit is reached.
    pub enqueued_limit: f64,
    /// The shortest time between two file uploads; a sooner upload is answered 429 with
    /// `Retry-After` (Inference.net allows one batch-file upload a minute). 0: no limit.
    pub upload_interval_ms: u64,
    /// How long an uploaded file stays `uploaded` before it is `processed`; a batch
    /// created from it sooner is refused with 400, as OpenAI refused an immediate create
    /// ("Cannot find file"). 0: processed at once.
    pub file_processing_ms: u64,
    /// Batch creations that create the batch and then answer 500, as when the answer is
    /// lost on its way back (a gateway timeout, a dropped connection).
    pub create_lost_answer: f64,
    /// Webhook deliveries silently dropped.
    pub webhook_drop: f64,
    /// Webhook deliveries sent twice with the same delivery id.
    pub webhook_duplicate: f64,
    /// Extra delay before each webhook delivery.
    pub webhook_delay_ms: u64,
    /// Give each delivery a random extra delay so deliveries arrive out of order.
    pub webhook_reorder: bool,
}

impl FaultSettings {
    /// Rejects fractions outside `0..=1` (and NaN).
    pub fn validate(&self) -> Result<(), Error> {
        let fractions = [
            ("error_line", self.error_line),
            ("non_json", self.non_json),
            ("schema_break", self.schema_break),
            ("length", self.length),
            ("http_429", self.http_429),
            ("http_500", self.http_500),
            ("expire", self.expire),
            ("enqueued_limit", self.enqueued_limit),
            ("create_lost_answer", self.create_lost_answer),
            ("webhook_drop", self.webhook_drop),
            ("webhook_duplicate", self.webhook_duplicate),
        ];
        for (name, value) in fractions {
            if !(0.0..=1.0).contains(&value) {
                return Err(Error::InvalidConfig(format!(
                    "fault {name} must be a fraction between 0 and 1, got {value}"
                )));
            }
        }
        Ok(())
    }
}

/// Everything the emulator needs to run. Start from [`Default`] (or
/// [`EmulatorConfig::new`]) and set fields.
#[derive(Clone)]
pub struct EmulatorConfig {
    /// Address to bind; port 0 picks a free port.
    pub listen: SocketAddr,
    /// Bearer key every `/v1` and `/admin` call must present.
    pub api_key: String,
    /// Largest accepted upload, in bytes.
    pub max_file_bytes: u64,
    /// Most requests accepted in one batch input file.
    pub max_requests: usize,
    /// Time spent in `validating`.
    pub validating: Duration,
    /// Time spent in `in_progress` (requests finish evenly across it).
    pub in_progress: Duration,
    /// Time spent in `finalizing` (and in `cancelling`).
    pub finalizing: Duration,
    pub id_style: IdStyle,
    /// Batch timestamps in milliseconds instead of seconds (Inference.net style).
    pub millis_timestamps: bool,
    /// How batch objects write `errors`.
    pub errors_shape: ErrorsShape,
    /// Refuse a batch creation with any argument OpenAI does not define (such as
    /// Inference.net's `webhook_url`) with 400, as OpenAI refuses unknown arguments.
    pub strict_arguments: bool,
    /// Seeds answers, output order, ids and every fault draw.
    pub seed: u64,
    /// Project-level Standard Webhooks endpoint.
    pub webhook_url: Option<String>,
    /// `whsec_<base64>` secrets; every one signs each delivery (rotation).
    pub webhook_secrets: Vec<String>,
    /// Per-attempt timeout for webhook deliveries.
    pub webhook_timeout: Duration,
    /// Retries after the first attempt (on 5xx, timeouts, connection errors).
    pub webhook_retries: u32,
    /// First retry delay; doubles each retry.
    pub webhook_backoff: Duration,
    /// `retry-after-ms` sent with injected 429s (`Retry-After` is this in whole seconds).
    pub retry_after_ms: u64,
    pub faults: FaultSettings,
}

impl std::fmt::Debug for EmulatorConfig {
    // Hand-written so the API key and webhook secrets never reach a log.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EmulatorConfig")
            .field("listen", &self.listen)
            .field("api_key", &"<redacted>")
            .field("max_file_bytes", &self.max_file_bytes)
            .field("max_requests", &self.max_requests)
            .field("validating", &self.validating)
            .field("in_progress", &self.in_progress)
            .field("finalizing", &self.finalizing)
            .field("id_style", &self.id_style)
            .field("millis_timestamps", &self.millis_timestamps)
            .field("strict_arguments", &self.strict_arguments)
            .field("seed", &self.seed)
            // The URL's path may carry the receiver's token.
            .field(
                "webhook_url",
                &self.webhook_url.as_deref().map(crate::webhook::redact_url),
            )
            .field(
                "webhook_secrets",
                &format!("<{} redacted>", self.webhook_secrets.len()),
            )
            .field("webhook_timeout", &self.webhook_timeout)
            .field("webhook_retries", &self.webhook_retries)
            .field("webhook_backoff", &self.webhook_backoff)
            .field("retry_after_ms", &self.retry_after_ms)
            .field("faults", &self.faults)
            .finish()
    }
}

impl Default for EmulatorConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            api_key: "sk-emulator".to_owned(),
            max_file_bytes: 200 * 1024 * 1024,
            max_requests: 50_000,
            validating: Duration::from_millis(200),
            in_progress: Duration::from_millis(500),
            finalizing: Duration::from_millis(200),
            id_style: IdStyle::OpenAi,
            millis_timestamps: false,
            errors_shape: ErrorsShape::OpenAi,
            strict_arguments: false,
            seed: 0,
            webhook_url: None,
            webhook_secrets: Vec::new(),
            webhook_timeout: Duration::from_secs(30),
            webhook_retries: 3,
            webhook_backoff: Duration::from_secs(1),
            retry_after_ms: 20,
            faults: FaultSettings::default(),
        }
    }
}

impl EmulatorConfig {
    /// Defaults with the given API key.
    pub fn new(api_key: impl Into<String>) -> Self {
        Self {
            api_key: api_key.into(),
            ..Self::default()
        }
    }

    /// Sets the three status delays at once.
    #[must_use]
    pub fn with_delays(
        mut self,
        validating_ms: u64,
        in_progress_ms: u64,
        finalizing_ms: u64,
    ) -> Self {
        self.validating = Duration::from_millis(validating_ms);
        self.in_progress = Duration::from_millis(in_progress_ms);
        self.finalizing = Duration::from_millis(finalizing_ms);
        self
    }

    #[must_use]
    pub fn with_seed(mut self, seed: u64) -> Self {
        self.seed = seed;
        self
    }

    #[must_use]
    pub fn with_faults(mut self, faults: FaultSettings) -> Self {
        self.faults = faults;
        self
    }

    /// Points the Standard Webhooks sender at `url`, signing with `secrets`.
    #[must_use]
    pub fn with_webhook(mut self, url: impl Into<String>, secrets: Vec<String>) -> Self {
        self.webhook_url = Some(url.into());
        self.webhook_secrets = secrets;
        self
    }

    /// Checks everything that can be wrong before binding.
    pub fn validate(&self) -> Result<(), Error> {
        if self.api_key.is_empty() {
            return Err(Error::InvalidConfig("the API key must not be empty".into()));
        }
        self.faults.validate()?;
        for secret in &self.webhook_secrets {
            crate::webhook::decode_secret(secret)?;
        }
        if let Some(url) = &self.webhook_url {
            crate::webhook::check_url(url).map_err(Error::InvalidConfig)?;
            if self.webhook_secrets.is_empty() {
                return Err(Error::InvalidConfig(
                    "a webhook URL needs at least one webhook secret".into(),
                ));
            }
        }
        Ok(())
    }
}
