//! The webhook function: one binary for two event sources.
//!
//! - Behind the **Function URL** it is the provider's callback receiver: each request goes
//!   through [`shotlabel_shared::webhook::receive`] (authenticate, deduplicate, queue one
//!   harvest request) and is answered at once.
//! - On the **harvest SQS queue** it harvests: each message's
//!   [`HarvestRequest`] goes through [`shotlabel_shared::harvest::harvest`], and records
//!   that fail are reported as batch item failures, so only they come back (and, past the
//!   queue's receive limit, land in its dead-letter queue).
//!
//! Splitting the two keeps the receiver fast (a provider waits for its answer, and a slow
//! answer is a failed delivery) while the harvest gets the queue's retries.

use std::time::{SystemTime, UNIX_EPOCH};

use aws_lambda_events::event::lambda_function_urls::{
    LambdaFunctionUrlRequest, LambdaFunctionUrlResponse,
};
use aws_lambda_events::event::sqs::{SqsBatchResponse, SqsEvent};
use aws_lambda_events::http::HeaderValue;
use aws_lambda_events::http::header::CONTENT_TYPE;
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use serde_json::Value;
use shotlabel_shared::aws::{
    S3Store, SqsQueue, batch_client_from_env, load_sdk_config, process_env, s3_client,
    secret_setting, sqs_client,
};
use shotlabel_shared::batch_api::BatchClient;
use shotlabel_shared::harvest::{HarvestConfig, HarvestOutcome, harvest};
use shotlabel_shared::ports::{BatchProvider, ObjectStore, Queue};
use shotlabel_shared::records::{HarvestCounts, HarvestRequest};
use shotlabel_shared::settings::{self, SettingsError};
use shotlabel_shared::standard_webhooks::{SecretError, WebhookSecrets};
use shotlabel_shared::webhook::{
    DEFAULT_MAX_BODY_BYTES, MIN_PER_BATCH_SECRET_LEN, WebhookConfig, WebhookRequest,
    WebhookResponse, receive,
};
use shotlabel_shared::{ExposeSecret, SecretString};

/// Clients and settings, built once per cold start.
#[derive(Debug)]
pub struct Handler<S = S3Store, Q = SqsQueue, P = BatchClient> {
    pub store: S,
    pub queue: Q,
    pub provider: P,
    pub webhook: WebhookConfig,
    pub harvest: HarvestConfig,
}

impl Handler {
    pub async fn from_env() -> Result<Self, lambda_runtime::Error> {
        let sdk = load_sdk_config().await;
        // Secrets come from Secrets Manager on AWS, read once here and cached for the
        // life of the execution environment.
        let secret = secret_setting(&sdk, "SHOTLABEL_WEBHOOK_SECRET", process_env)
            .await?
            .map(|s| s.expose_secret().to_owned());
        let webhook = webhook_config_from_env(secret)?;
        // Shared with the submitter's reconciliation, so both harvest alike.
        let harvest = settings::harvest_config()?;
        let provider = batch_client_from_env(&sdk, process_env).await?;
        Ok(Self {
            store: S3Store::new(s3_client(&sdk)),
            queue: SqsQueue::new(sqs_client(&sdk)),
            provider,
            webhook,
            harvest,
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error(transparent)]
    Settings(#[from] SettingsError),
    #[error("SHOTLABEL_WEBHOOK_SECRET: {0}")]
    Secret(#[from] SecretError),
    #[error(
        "SHOTLABEL_WEBHOOK_SECRET is too short for per-batch mode \
         (at least {MIN_PER_BATCH_SECRET_LEN} bytes; it keys every per-batch URL token)"
    )]
    PerBatchSecretTooShort,
    #[error("SHOTLABEL_WEBHOOK_MODE={0:?} is not valid: expected standard, per-batch or none")]
    Mode(String),
}

/// How the receiver authenticates callbacks (`SHOTLABEL_WEBHOOK_MODE`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WebhookMode {
    /// Standard Webhooks signatures (OpenAI): `SHOTLABEL_WEBHOOK_SECRET` holds the
    /// `whsec_` secrets, space-separated while one rotates.
    Standard,
    /// Per-batch URL tokens (Inference.net): `SHOTLABEL_WEBHOOK_SECRET`'s bytes are the
    /// HMAC key, exactly as the submitter uses them to make the URLs.
    PerBatch,
    /// No callbacks expected (reconciliation only): every POST is refused.
    None,
}

/// Configures the receiver's authentication from the mode and secret settings.
///
/// An unset mode means `standard` when a secret is set and `none` otherwise, so the
/// deployment on the harvest queue needs no secret. A mode that is set needs its secret.
pub fn apply_webhook_auth(
    config: &mut WebhookConfig,
    mode: Option<&str>,
    secret: Option<String>,
) -> Result<WebhookMode, ConfigError> {
    let mode = match mode.map(str::trim) {
        Some("standard") => WebhookMode::Standard,
        Some("per-batch") => WebhookMode::PerBatch,
        Some("none") => WebhookMode::None,
        None | Some("") if secret.is_some() => WebhookMode::Standard,
        None | Some("") => WebhookMode::None,
        Some(other) => return Err(ConfigError::Mode(other.to_owned())),
    };
    config.standard = None;
    config.per_batch_secret = None;
    let missing = || {
        ConfigError::Settings(SettingsError::Missing {
            name: "SHOTLABEL_WEBHOOK_SECRET",
            what: "the webhook secret for the configured SHOTLABEL_WEBHOOK_MODE",
        })
    };
    match mode {
        WebhookMode::Standard => {
            let secret = secret.ok_or_else(missing)?;
            config.standard = Some(WebhookSecrets::parse(&secret)?);
        }
        WebhookMode::PerBatch => {
            let secret = secret.ok_or_else(missing)?;
            if secret.len() < MIN_PER_BATCH_SECRET_LEN {
                return Err(ConfigError::PerBatchSecretTooShort);
            }
            config.per_batch_secret = Some(SecretString::from(secret));
        }
        WebhookMode::None => {}
    }
    Ok(mode)
}

/// The receiver's settings: `SHOTLABEL_BUCKET`, `SHOTLABEL_HARVEST_QUEUE_URL`,
/// `SHOTLABEL_WEBHOOK_MODE`, `SHOTLABEL_WEBHOOK_SECRET`, `SHOTLABEL_MAX_WEBHOOK_BYTES`.
pub fn webhook_config_from_env(secret: Option<String>) -> Result<WebhookConfig, ConfigError> {
    let mut config = WebhookConfig::new(
        settings::required("SHOTLABEL_BUCKET", "the bucket shotlabel works in")?,
        settings::required(
            "SHOTLABEL_HARVEST_QUEUE_URL",
            "the URL of the harvest SQS queue",
        )?,
    );
    let max_bytes =
        settings::number_or("SHOTLABEL_MAX_WEBHOOK_BYTES", DEFAULT_MAX_BODY_BYTES as u64)?;
    config.max_body_bytes = usize::try_from(max_bytes).unwrap_or(usize::MAX);
    let mode = apply_webhook_auth(
        &mut config,
        settings::optional("SHOTLABEL_WEBHOOK_MODE").as_deref(),
        secret,
    )?;
    if mode == WebhookMode::None {
        tracing::info!("no webhook mode configured: callbacks are refused, harvests still run");
    }
    Ok(config)
}

/// Which of the two sources an invocation came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventSource {
    /// Harvest-queue messages.
    Sqs,
    /// An HTTP request through the Function URL.
    FunctionUrl,
}

/// Recognises the event by its shape: SQS events are `Records` that all come from
/// `aws:sqs`; Function URL events carry `requestContext.http`.
pub fn event_source(event: &Value) -> Option<EventSource> {
    if let Some(records) = event.get("Records").and_then(Value::as_array) {
        let all_sqs = !records.is_empty()
            && records
                .iter()
                .all(|r| r.get("eventSource").and_then(Value::as_str) == Some("aws:sqs"));
        return all_sqs.then_some(EventSource::Sqs);
    }
    event
        .pointer("/requestContext/http")
        .is_some_and(Value::is_object)
        .then_some(EventSource::FunctionUrl)
}

/// Handles one invocation from either source, at the current time.
pub async fn handle<S: ObjectStore, Q: Queue, P: BatchProvider>(
    handler: &Handler<S, Q, P>,
    event: Value,
) -> Result<Value, lambda_runtime::Error> {
    handle_at(handler, event, unix_now()).await
}

/// [`handle`] with the clock given (unix seconds), for tests of signed fixtures.
pub async fn handle_at<S: ObjectStore, Q: Queue, P: BatchProvider>(
    handler: &Handler<S, Q, P>,
    event: Value,
    now_unix: i64,
) -> Result<Value, lambda_runtime::Error> {
    match event_source(&event) {
        Some(EventSource::Sqs) => {
            let event: SqsEvent = serde_json::from_value(event)?;
            Ok(serde_json::to_value(
                harvest_records(handler, &event).await?,
            )?)
        }
        Some(EventSource::FunctionUrl) => {
            let request: LambdaFunctionUrlRequest = serde_json::from_value(event)?;
            Ok(serde_json::to_value(
                receive_function_url(handler, &request, now_unix).await,
            )?)
        }
        None => {
            // Failing loudly makes a miswired trigger visible in the error metric.
            tracing::error!("unrecognised event: neither SQS records nor a Function URL request");
            Err("unrecognised event: expected an SQS event or a Function URL request".into())
        }
    }
}

/// Harvests each record's batch; the records whose harvest failed (or whose body is not a
/// harvest request) are reported back so that only they are retried.
pub async fn harvest_records<S: ObjectStore, Q: Queue, P: BatchProvider>(
    handler: &Handler<S, Q, P>,
    event: &SqsEvent,
) -> Result<SqsBatchResponse, lambda_runtime::Error> {
    let mut response = SqsBatchResponse::default();
    let mut harvested = HarvestCounts::default();
    for record in &event.records {
        let Some(message_id) = record.message_id.as_deref() else {
            // Without an id this record's failure cannot be reported on its own; failing the
            // invocation retries the whole batch, which is safe: harvests are idempotent.
            return Err("an SQS record has no messageId".into());
        };
        let request = match serde_json::from_str::<HarvestRequest>(
            record.body.as_deref().unwrap_or_default(),
        ) {
            Ok(request) => request,
            Err(e) => {
                // Reported as a failure so that, after the queue's retries, it lands in
                // the dead-letter queue for someone to look at instead of vanishing.
                tracing::error!(message_id, error = %e, "the message is not a harvest request");
                response.add_failure(message_id);
                continue;
            }
        };
        match harvest(
            &handler.store,
            &handler.queue,
            &handler.provider,
            &handler.harvest,
            &request,
        )
        .await
        {
            Ok(outcome) => {
                if let HarvestOutcome::Harvested { counts, .. } = &outcome {
                    harvested.add(counts);
                }
                tracing::info!(
                    message_id,
                    origin = %request.origin,
                    outcome = %serde_json::to_string(&outcome).unwrap_or_default(),
                    "harvest request done"
                );
            }
            Err(e) => {
                tracing::error!(
                    message_id,
                    batch_id = request.batch_id.as_deref().unwrap_or_default(),
                    manifest = request.manifest.as_deref().unwrap_or_default(),
                    error = %e,
                    "harvest failed; the message will be retried"
                );
                response.add_failure(message_id);
            }
        }
    }
    shotlabel_shared::metrics::emit("harvest", &harvested.metrics());
    Ok(response)
}

/// Answers one Function URL request through the receiver.
pub async fn receive_function_url<S: ObjectStore, Q: Queue, P: BatchProvider>(
    handler: &Handler<S, Q, P>,
    event: &LambdaFunctionUrlRequest,
    now_unix: i64,
) -> LambdaFunctionUrlResponse {
    let response = match webhook_request(event) {
        Ok(request) => {
            receive(
                &handler.store,
                &handler.queue,
                &handler.webhook,
                &request,
                now_unix,
            )
            .await
        }
        Err(response) => response,
    };
    function_url_response(&response)
}

/// The receiver's view of a Function URL request. Function URLs hand over non-text
/// bodies base64-encoded; signatures are over the decoded bytes.
pub fn webhook_request(
    event: &LambdaFunctionUrlRequest,
) -> Result<WebhookRequest, WebhookResponse> {
    let body = match (&event.body, event.is_base64_encoded) {
        (None, _) => Vec::new(),
        (Some(text), false) => text.clone().into_bytes(),
        (Some(encoded), true) => STANDARD.decode(encoded).map_err(|_| {
            tracing::warn!("a Function URL body marked base64 is not base64");
            WebhookResponse {
                status: 400,
                body: r#"{"error":"the body is not valid base64"}"#.to_owned(),
            }
        })?,
    };
    let headers = event
        .headers
        .iter()
        // A header that is not text cannot be one the receiver reads; dropping it is safe.
        .filter_map(|(name, value)| {
            Some((
                name.as_str().to_ascii_lowercase(),
                value.to_str().ok()?.to_owned(),
            ))
        })
        .collect();
    Ok(WebhookRequest {
        method: event
            .request_context
            .http
            .method
            .clone()
            .unwrap_or_default(),
        headers,
        query: event.raw_query_string.clone().unwrap_or_default(),
        body,
    })
}

/// The receiver's answer as a Function URL response.
pub fn function_url_response(response: &WebhookResponse) -> LambdaFunctionUrlResponse {
    let mut out = LambdaFunctionUrlResponse::default();
    out.status_code = i64::from(response.status);
    if let Some(content_type) = response.content_type() {
        out.headers
            .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    }
    out.body = (!response.body.is_empty()).then(|| response.body.clone());
    out.is_base64_encoded = false;
    out
}

/// Seconds since the Unix epoch (0 if the clock is before it).
fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

// ---- deployment description ----
// What this binary needs from `template.yaml`, once per deployment;
// `tests/tests/template.rs` holds the template to it (see `shotlabel_shared::deploy`).

use shotlabel_shared::deploy::{
    self, DELIVERIES, Deployment, Env, GET_SECRET, Grant, HARVEST_QUEUE, HAS_TASK, Resource,
    S3_DELETE, S3_PUT, SQS_ATTRIBUTES, SQS_DELETE, SQS_RECEIVE, SQS_SEND, WEBHOOK_SECRET,
};

/// Every variable [`Handler::from_env`] reads (held to the source by a unit test).
pub const ENV_VARS: &[&str] = &[
    "SHOTLABEL_API_KEY",
    "SHOTLABEL_API_KEY_SECRET_ARN",
    "SHOTLABEL_BUCKET",
    "SHOTLABEL_HARVEST_QUEUE_URL",
    "SHOTLABEL_INPUT_PREFIX",
    "SHOTLABEL_MAX_RETRIES",
    "SHOTLABEL_MAX_WEBHOOK_BYTES",
    "SHOTLABEL_PENDING_QUEUE_URL",
    "SHOTLABEL_PROVIDER_URL",
    "SHOTLABEL_S3_PATH_STYLE",
    "SHOTLABEL_TASK",
    "SHOTLABEL_WEBHOOK_MODE",
    "SHOTLABEL_WEBHOOK_SECRET",
    "SHOTLABEL_WEBHOOK_SECRET_SECRET_ARN",
];

/// What the receiver does ([`receive_function_url`]): claims and, when sending fails,
/// releases a delivery marker; queues one harvest request; authenticates with the webhook
/// secret.
pub const RECEIVER_GRANTS: &[Grant] = &[
    Grant::new(&[S3_PUT, S3_DELETE], &[Resource::Objects(DELIVERIES)]),
    Grant::new(&[SQS_SEND], &[Resource::Queue(HARVEST_QUEUE)]),
    Grant::new(&[GET_SECRET], &[Resource::Secret(WEBHOOK_SECRET)]),
];

/// The harvest queue's event source mapping polls with the function's role and deletes
/// what [`harvest_records`] did not report as failed.
pub const HARVEST_QUEUE_GRANTS: &[Grant] = &[Grant::new(
    &[SQS_RECEIVE, SQS_DELETE, SQS_ATTRIBUTES],
    &[Resource::Queue(HARVEST_QUEUE)],
)];

/// Two deployments of the one binary.
pub const DEPLOYMENTS: &[Deployment] = &[
    // Behind the Function URL: fast, never harvests. It holds the provider's key and the
    // pending queue's URL only because [`Handler::from_env`] builds the whole handler.
    Deployment {
        function: "WebhookFunction",
        binary: "webhook",
        env: &[
            Env::Required("SHOTLABEL_BUCKET"),
            Env::Required("SHOTLABEL_HARVEST_QUEUE_URL"),
            Env::Required("SHOTLABEL_PENDING_QUEUE_URL"),
            Env::Required("SHOTLABEL_PROVIDER_URL"),
            Env::Required("SHOTLABEL_API_KEY_SECRET_ARN"),
            Env::Required("SHOTLABEL_WEBHOOK_MODE"),
            Env::Required("SHOTLABEL_WEBHOOK_SECRET_SECRET_ARN"),
        ],
        grants: &[deploy::LOGGING, deploy::PROVIDER, RECEIVER_GRANTS],
    },
    // On the harvest queue: no callbacks to authenticate, so no mode and no webhook secret
    // (an unset mode with no secret is `none`).
    Deployment {
        function: "HarvestFunction",
        binary: "webhook",
        env: &[
            Env::Required("SHOTLABEL_BUCKET"),
            Env::Required("SHOTLABEL_HARVEST_QUEUE_URL"),
            Env::Required("SHOTLABEL_PENDING_QUEUE_URL"),
            Env::Required("SHOTLABEL_PROVIDER_URL"),
            Env::Required("SHOTLABEL_API_KEY_SECRET_ARN"),
            // Must agree with the other functions'.
            Env::Required("SHOTLABEL_INPUT_PREFIX"),
            Env::Required("SHOTLABEL_MAX_RETRIES"),
            Env::RequiredIf("SHOTLABEL_TASK", HAS_TASK),
            Env::Unset("SHOTLABEL_WEBHOOK_MODE"),
            Env::Unset("SHOTLABEL_WEBHOOK_SECRET_SECRET_ARN"),
        ],
        grants: &[
            deploy::LOGGING,
            deploy::SEE_MISSING_KEYS,
            deploy::PROVIDER,
            deploy::HARVEST,
            deploy::HARVEST_BY_MANIFEST,
            HARVEST_QUEUE_GRANTS,
        ],
    },
];

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
