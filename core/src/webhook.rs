//! The webhook receiver: a provider's "your batch finished" callback becomes one message on
//! the harvest queue.
//!
//! This is the receiver's whole logic, independent of Lambda: the `webhook` function calls
//! [`receive`] from a Function URL event, the local stack from an HTTP listener.
//!
//! What it does, in order (cheapest and safest first):
//!
//! 1. `OPTIONS` is a provider's readiness probe (Inference.net sends one before each
//!    delivery): 200, the success its documentation asks of an endpoint. Any other method
//!    but `POST`: 405.
//! 2. A body over [`WebhookConfig::max_body_bytes`]: 413, before any hashing.
//! 3. Authentication, over the raw body and before parsing anything: a per-batch URL
//!    token ([`batch_token`]) when the query carries `manifest` and `token`, otherwise a
//!    Standard Webhooks signature ([`standard_webhooks`]). Any failure is a 401 whose body
//!    says nothing more; a warning in the log names the check that failed, never a secret,
//!    token or signature.
//! 4. Parsing: a Standard Webhooks event that is not JSON is a 400; it names its batch in
//!    `data.id`, and event types other than the batch's terminal ones are acknowledged and
//!    ignored. A per-batch body is undocumented: the token in the URL has authenticated the
//!    call and the manifest name in it is enough, so a body that is empty, not JSON or of
//!    an unknown shape is a hint like any other (a 4xx would lose the delivery: Inference.net
//!    does not retry them), and a batch id is looked for in it leniently.
//! 5. Deduplication: delivery is at least once, so a marker at
//!    [`state_keys::delivery`] is claimed with a conditional write; a delivery whose marker
//!    exists is acknowledged (200) and not queued again. The harvest request names the
//!    marker, and a harvest that finds the batch not finished yet releases it: a delivery
//!    that came early does not use up the one that follows.
//! 6. One [`HarvestRequest`] goes to the harvest queue: 200 `{"accepted":true}`. If the queue
//!    will not take it, the marker is released and the answer is 500 so the provider retries.
//!
//! The payload is a hint, never trusted: the receiver does not look the batch up. The harvest
//! retrieves it from the provider with the API key and acts on what the provider says, and
//! it is idempotent, so a forged-but-authenticated or repeated hint costs one harvest at most.
//! Nothing here is slow: one conditional write and one queue message.

use std::fmt;
use std::time::Duration;

use secrecy::{ExposeSecret, SecretString};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use crate::batch_token;
use crate::ports::{ObjectStore, OutgoingMessage, Queue, StoreError, WriteCondition};
use crate::records::{HarvestRequest, state_keys};
use crate::standard_webhooks::{self, VerifyError, WebhookSecrets};

/// Default largest accepted body: 10 MB, the most Inference.net documents for a webhook
/// payload (typically 5-50 KB). Behind a Lambda Function URL, AWS refuses bodies over
/// 6 MB itself before the function runs.
pub const DEFAULT_MAX_BODY_BYTES: usize = 10 * 1000 * 1000;

/// The `origin` of the harvest requests this receiver queues.
pub const ORIGIN: &str = "webhook";

/// The Standard Webhooks event types that mean a batch reached a terminal status: the ones
/// worth a harvest (a failed, expired or cancelled batch still has items to retry or fail).
pub const BATCH_EVENT_TYPES: [&str; 4] = [
    "batch.completed",
    "batch.failed",
    "batch.expired",
    "batch.cancelled",
];

/// Longest manifest name accepted from a URL. Real names are `<submission id>-<index>`,
/// far shorter; the cap bounds the work an unauthenticated caller can cause.
pub const MAX_MANIFEST_LEN: usize = 256;

/// Longest batch id accepted from a payload; a longer one is treated as absent (per-batch)
/// or as a bad payload (Standard Webhooks).
pub const MAX_BATCH_ID_LEN: usize = 256;

/// Shortest per-batch secret accepted, in bytes: the same floor as Standard Webhooks keys,
/// because a short key makes every per-batch URL token guessable offline.
pub const MIN_PER_BATCH_SECRET_LEN: usize = standard_webhooks::MIN_KEY_LEN;

/// How many times the harvest request is offered to the queue before giving up with a 500.
const SEND_ATTEMPTS: u32 = 3;
/// The pause before the second attempt (doubled before the third). Short: a provider
/// waits for our answer, and its own retry is the long-term fallback.
const SEND_RETRY_DELAY: Duration = Duration::from_millis(50);

/// Content type of every non-empty [`WebhookResponse`] body.
pub const RESPONSE_CONTENT_TYPE: &str = "application/json";

/// One HTTP request as the receiver sees it.
#[derive(Clone, Default)]
pub struct WebhookRequest {
    /// `POST`, `OPTIONS`, …
    pub method: String,
    /// Header names in lower case (a lookup also tolerates other cases).
    pub headers: Vec<(String, String)>,
    /// The raw query string, without the `?`.
    pub query: String,
    /// The raw body bytes, exactly as received: signatures are over these.
    pub body: Vec<u8>,
}

impl WebhookRequest {
    /// The first value of a header, looked up case-insensitively.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(key, _)| key.eq_ignore_ascii_case(name))
            .map(|(_, value)| value.as_str())
    }
}

impl fmt::Debug for WebhookRequest {
    // Hand-written: the query may hold a per-batch token and the headers a signature.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let header_names: Vec<&str> = self.headers.iter().map(|(name, _)| name.as_str()).collect();
        f.debug_struct("WebhookRequest")
            .field("method", &self.method)
            .field("header_names", &header_names)
            .field(
                "query",
                &format_args!("[{} bytes redacted]", self.query.len()),
            )
            .field("body_len", &self.body.len())
            .finish()
    }
}

/// The answer to send back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WebhookResponse {
    pub status: u16,
    /// A small JSON object, or empty (204). Never holds a secret, token or signature.
    pub body: String,
}

impl WebhookResponse {
    fn json(status: u16, body: Value) -> Self {
        Self {
            status,
            body: body.to_string(),
        }
    }

    fn empty(status: u16) -> Self {
        Self {
            status,
            body: String::new(),
        }
    }

    /// The `Content-Type` to send with [`Self::body`], `None` when the body is empty.
    pub fn content_type(&self) -> Option<&'static str> {
        (!self.body.is_empty()).then_some(RESPONSE_CONTENT_TYPE)
    }
}

/// The receiver's settings. Either authentication mode may be configured, or both; a
/// request is checked against the one its shape asks for, and refused if that one is not
/// configured.
pub struct WebhookConfig {
    /// The bucket holding the delivery markers (the pipeline's own bucket).
    pub bucket: String,
    pub harvest_queue_url: String,
    /// Standard Webhooks mode: the `whsec_` secrets (several while one rotates).
    pub standard: Option<WebhookSecrets>,
    /// Per-batch URL mode: the HMAC key the submitter made the URL tokens with (the
    /// configured string's bytes, as `submit` uses them).
    pub per_batch_secret: Option<SecretString>,
    /// Larger bodies get 413.
    pub max_body_bytes: usize,
    /// How far a Standard Webhooks timestamp may be from now, either way.
    pub tolerance_secs: i64,
}

impl WebhookConfig {
    /// No authentication configured yet (every POST gets 401), default limits.
    pub fn new(bucket: impl Into<String>, harvest_queue_url: impl Into<String>) -> Self {
        Self {
            bucket: bucket.into(),
            harvest_queue_url: harvest_queue_url.into(),
            standard: None,
            per_batch_secret: None,
            max_body_bytes: DEFAULT_MAX_BODY_BYTES,
            tolerance_secs: standard_webhooks::DEFAULT_TOLERANCE_SECS,
        }
    }
}

impl fmt::Debug for WebhookConfig {
    // Hand-written so that no secret can reach a log, whatever the field types do.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WebhookConfig")
            .field("bucket", &self.bucket)
            .field("harvest_queue_url", &self.harvest_queue_url)
            .field(
                "standard",
                &self
                    .standard
                    .as_ref()
                    .map(|s| format!("[{} secret(s) redacted]", s.len())),
            )
            .field(
                "per_batch_secret",
                &self.per_batch_secret.as_ref().map(|_| "[redacted]"),
            )
            .field("max_body_bytes", &self.max_body_bytes)
            .field("tolerance_secs", &self.tolerance_secs)
            .finish()
    }
}

/// Handles one request. Never fails: every outcome is an HTTP answer.
///
/// `now_unix` is the current time in unix seconds (for the Standard Webhooks timestamp
/// check and the delivery marker).
pub async fn receive<S: ObjectStore, Q: Queue>(
    store: &S,
    queue: &Q,
    config: &WebhookConfig,
    request: &WebhookRequest,
    now_unix: i64,
) -> WebhookResponse {
    match process(store, queue, config, request, now_unix).await {
        Ok(Accepted::Probe) => WebhookResponse::empty(200),
        Ok(Accepted::Queued) => WebhookResponse::json(200, json!({ "accepted": true })),
        Ok(Accepted::Duplicate) => WebhookResponse::json(
            200,
            json!({ "accepted": true, "duplicate": true, "detail": "duplicate delivery" }),
        ),
        Ok(Accepted::Ignored) => WebhookResponse::json(
            200,
            json!({ "accepted": false, "detail": "event type ignored" }),
        ),
        Err(rejection) => {
            rejection.log();
            WebhookResponse::json(rejection.status(), json!({ "error": rejection.public() }))
        }
    }
}

/// What became of a request that was not refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Accepted {
    /// An `OPTIONS` readiness probe.
    Probe,
    /// A harvest request is on the queue.
    Queued,
    /// This delivery was accepted before.
    Duplicate,
    /// Authentic, but not about a batch reaching a terminal status.
    Ignored,
}

/// Why a request was refused. The `Display` text is for the log only; clients get
/// [`Rejection::public`].
#[derive(Debug, thiserror::Error)]
enum Rejection {
    #[error("method {0:?} is not allowed")]
    MethodNotAllowed(String),
    #[error("body of {len} bytes is over the {max}-byte limit")]
    TooLarge { len: usize, max: usize },
    #[error("authentication failed: {0}")]
    Unauthorized(#[from] AuthFailure),
    #[error("bad payload: {0}")]
    BadPayload(&'static str),
    #[error("recording the delivery: {0}")]
    Store(#[from] StoreError),
    #[error("queueing the harvest request: {0}")]
    Queue(String),
}

/// Which authentication check failed. Messages name the check, never a secret, a token
/// or a signature.
#[derive(Debug, thiserror::Error)]
enum AuthFailure {
    #[error("the URL carries a per-batch token, but per-batch mode is not configured")]
    PerBatchNotConfigured,
    #[error("the manifest name in the URL is empty or too long")]
    BadManifest,
    #[error("the per-batch token does not match the manifest")]
    BadToken,
    #[error("no Standard Webhooks secret is configured")]
    StandardNotConfigured,
    #[error("{0}")]
    Signature(#[from] VerifyError),
}

impl Rejection {
    fn status(&self) -> u16 {
        match self {
            Self::MethodNotAllowed(_) => 405,
            Self::TooLarge { .. } => 413,
            Self::Unauthorized(_) => 401,
            Self::BadPayload(_) => 400,
            // 5xx makes the provider retry later, which is what a storage or queue hiccup needs.
            Self::Store(_) | Self::Queue(_) => 500,
        }
    }

    /// The client's view: no detail about authentication, nothing from our side's errors.
    fn public(&self) -> &'static str {
        match self {
            Self::MethodNotAllowed(_) => "method not allowed",
            Self::TooLarge { .. } => "payload too large",
            Self::Unauthorized(_) => "unauthorized",
            Self::BadPayload(reason) => reason,
            Self::Store(_) | Self::Queue(_) => "temporarily unavailable, try again",
        }
    }

    fn log(&self) {
        match self {
            Self::Unauthorized(check) => {
                tracing::warn!(check = %check, "webhook refused: unauthorized");
            }
            Self::Store(_) | Self::Queue(_) => {
                tracing::error!(error = %self, "webhook not accepted; the provider should retry");
            }
            _ => tracing::warn!(reason = %self, "webhook refused"),
        }
    }
}

/// Who vouched for the request.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Authenticated {
    /// A valid Standard Webhooks signature on this message id.
    Standard { webhook_id: String },
    /// A valid per-batch token for this manifest.
    PerBatch { manifest: String },
}

/// What to harvest, and how to recognise a repeat of this delivery.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Target {
    batch_id: Option<String>,
    manifest: Option<String>,
    /// Equal for every delivery of the same news; hashed into the marker key.
    dedupe_key: String,
}

async fn process<S: ObjectStore, Q: Queue>(
    store: &S,
    queue: &Q,
    config: &WebhookConfig,
    request: &WebhookRequest,
    now_unix: i64,
) -> Result<Accepted, Rejection> {
    if request.method.eq_ignore_ascii_case("OPTIONS") {
        return Ok(Accepted::Probe);
    }
    if !request.method.eq_ignore_ascii_case("POST") {
        return Err(Rejection::MethodNotAllowed(request.method.clone()));
    }
    if request.body.len() > config.max_body_bytes {
        return Err(Rejection::TooLarge {
            len: request.body.len(),
            max: config.max_body_bytes,
        });
    }

    let authenticated = authenticate(config, request, now_unix)?;
    let target = match &authenticated {
        Authenticated::Standard { webhook_id } => {
            let payload: Value = serde_json::from_slice(&request.body)
                .map_err(|_| Rejection::BadPayload("the body is not valid JSON"))?;
            match standard_target(webhook_id, &payload)? {
                Some(target) => target,
                None => return Ok(Accepted::Ignored),
            }
        }
        Authenticated::PerBatch { manifest } => {
            // The token in the URL already says which batch: a body that is empty or not
            // JSON is no less authentic, and is taken as a hint without one.
            let payload: Option<Value> = serde_json::from_slice(&request.body).ok();
            if payload.is_none() && !request.body.iter().all(u8::is_ascii_whitespace) {
                tracing::info!(
                    manifest = %manifest,
                    bytes = request.body.len(),
                    "a per-batch delivery whose body is not JSON; queued on its URL alone"
                );
            }
            per_batch_target(manifest, payload.as_ref())
        }
    };

    let marker = state_keys::delivery(&hex::encode(Sha256::digest(target.dedupe_key.as_bytes())));
    if !claim_delivery(store, config, &marker, &target, &authenticated, now_unix).await? {
        tracing::info!(
            batch_id = target.batch_id.as_deref().unwrap_or_default(),
            manifest = target.manifest.as_deref().unwrap_or_default(),
            "duplicate webhook delivery acknowledged"
        );
        return Ok(Accepted::Duplicate);
    }

    let request = HarvestRequest {
        batch_id: target.batch_id.clone(),
        manifest: target.manifest.clone(),
        origin: ORIGIN.to_owned(),
        shard: None,
        delivery: Some(marker.clone()),
    };
    if let Err(rejection) = send_harvest_request(queue, config, &request).await {
        // The marker was claimed before sending (see `claim_delivery`); release it so the
        // provider's retry of this delivery is not mistaken for a duplicate.
        if let Err(e) = store.delete(&config.bucket, &marker).await {
            tracing::error!(
                error = %e,
                marker = %marker,
                "could not release the delivery marker: retries of this delivery will be \
                 acknowledged as duplicates, and reconciliation must find the batch"
            );
        }
        return Err(rejection);
    }
    tracing::info!(
        batch_id = request.batch_id.as_deref().unwrap_or_default(),
        manifest = request.manifest.as_deref().unwrap_or_default(),
        "webhook accepted; harvest queued"
    );
    Ok(Accepted::Queued)
}

/// Checks the request against the mode its shape asks for: a per-batch token when the
/// query names a manifest and a token, otherwise a Standard Webhooks signature.
fn authenticate(
    config: &WebhookConfig,
    request: &WebhookRequest,
    now_unix: i64,
) -> Result<Authenticated, AuthFailure> {
    if let Some((manifest, token)) = batch_token::from_query(&request.query) {
        let secret = config
            .per_batch_secret
            .as_ref()
            .ok_or(AuthFailure::PerBatchNotConfigured)?;
        if manifest.is_empty() || manifest.len() > MAX_MANIFEST_LEN {
            return Err(AuthFailure::BadManifest);
        }
        if !batch_token::verify(secret.expose_secret().as_bytes(), &manifest, &token) {
            return Err(AuthFailure::BadToken);
        }
        return Ok(Authenticated::PerBatch { manifest });
    }
    let secrets = config
        .standard
        .as_ref()
        .ok_or(AuthFailure::StandardNotConfigured)?;
    let verified = standard_webhooks::verify(
        secrets,
        |name| request.header(name),
        &request.body,
        now_unix,
        config.tolerance_secs,
    )?;
    Ok(Authenticated::Standard {
        webhook_id: verified.webhook_id,
    })
}

/// The batch a Standard Webhooks event is about, or `None` for an event type that is not a
/// batch reaching a terminal status.
fn standard_target(webhook_id: &str, payload: &Value) -> Result<Option<Target>, Rejection> {
    let event_type = payload
        .get("type")
        .and_then(Value::as_str)
        .ok_or(Rejection::BadPayload("the event has no type"))?;
    if !BATCH_EVENT_TYPES.contains(&event_type) {
        tracing::info!(
            event_type = truncated(event_type, 64),
            "webhook event type ignored"
        );
        return Ok(None);
    }
    let batch_id = payload
        .pointer("/data/id")
        .and_then(scalar_id)
        .ok_or(Rejection::BadPayload(
            "the batch event has no usable data.id",
        ))?;
    Ok(Some(Target {
        batch_id: Some(batch_id),
        manifest: None,
        // The message id is the same on every retry and duplicate of one message, and
        // differs between messages, which is exactly what deduplication needs.
        dedupe_key: format!("standard\n{webhook_id}"),
    }))
}

/// What a per-batch delivery is about. The provider does not document the body's shape, so
/// nothing in it is required: the manifest name from the authenticated URL is enough for
/// the harvest, and a batch id found in the body only saves it a lookup.
fn per_batch_target(manifest: &str, payload: Option<&Value>) -> Target {
    let batch_id = payload.and_then(find_batch_id);
    // A provider may call once per status change: deliveries about different statuses or
    // events are different news, repeats of the same one are duplicates.
    let text_at = |pointer: &str| {
        payload
            .and_then(|p| p.pointer(pointer))
            .and_then(Value::as_str)
            .unwrap_or_default()
    };
    let event = first_non_empty(&[text_at("/event"), text_at("/type")]);
    let status = first_non_empty(&[
        text_at("/status"),
        text_at("/data/status"),
        text_at("/batch/status"),
    ]);
    Target {
        batch_id,
        manifest: Some(manifest.to_owned()),
        dedupe_key: format!("per-batch\n{manifest}\n{event}\n{status}"),
    }
}

/// A batch id in an undocumented body, by the shapes providers are likely to use:
/// `batch_id`, an event's `data.id`, a wrapped `batch.id`, or the body being a batch object
/// itself (`"object": "batch"`, or an `input_file_id`, which only batches have).
fn find_batch_id(payload: &Value) -> Option<String> {
    // Only a batch object's own `id` is a batch id: an event's `id` is the event's.
    let is_batch_object = payload.get("object").and_then(Value::as_str) == Some("batch")
        || payload.get("input_file_id").is_some();
    ["/batch_id", "/data/id", "/batch/id"]
        .into_iter()
        .find_map(|pointer| payload.pointer(pointer).and_then(scalar_id))
        .or_else(|| {
            if is_batch_object {
                payload.get("id").and_then(scalar_id)
            } else {
                None
            }
        })
}

/// An id given as a string or a number (providers differ), if it is usable as one.
fn scalar_id(value: &Value) -> Option<String> {
    let id = match value {
        Value::String(s) => s.trim().to_owned(),
        Value::Number(n) => n.to_string(),
        _ => return None,
    };
    (!id.is_empty() && id.len() <= MAX_BATCH_ID_LEN).then_some(id)
}

fn first_non_empty<'a>(candidates: &[&'a str]) -> &'a str {
    candidates
        .iter()
        .copied()
        .find(|s| !s.is_empty())
        .unwrap_or_default()
}

/// At most `max` bytes of `text`, cut at a character boundary (for logging what a
/// provider sent without letting it flood the log).
fn truncated(text: &str, max: usize) -> &str {
    let mut end = text.len().min(max);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

/// Claims the delivery marker; `false` when it exists (a duplicate).
///
/// The marker is claimed *before* the harvest request is sent, and released if sending
/// fails. Claiming first makes the conditional write the single point that decides which
/// of several concurrent copies of a delivery wins (providers retry while a slow first
/// attempt is still running, and duplicates arrive milliseconds apart), so exactly one
/// harvest request is queued. Writing the marker after a successful send would let two
/// concurrent copies both send. The cost of claiming first: if the process dies between
/// the claim and the send, or the release fails, retries are acknowledged as duplicates
/// and the batch is left to the submitter's reconciliation pass, which harvests any batch
/// still open.
async fn claim_delivery<S: ObjectStore>(
    store: &S,
    config: &WebhookConfig,
    marker: &str,
    target: &Target,
    authenticated: &Authenticated,
    now_unix: i64,
) -> Result<bool, Rejection> {
    let mode = match authenticated {
        Authenticated::Standard { .. } => "standard",
        Authenticated::PerBatch { .. } => "per-batch",
    };
    let body = json!({
        "received_at": now_unix,
        "mode": mode,
        "batch_id": target.batch_id,
        "manifest": target.manifest,
    });
    match store
        .put(
            &config.bucket,
            marker,
            body.to_string().into_bytes(),
            "application/json",
            WriteCondition::IfAbsent,
        )
        .await
    {
        Ok(_) => Ok(true),
        Err(StoreError::ConditionFailed { .. }) => Ok(false),
        Err(e) => Err(Rejection::Store(e)),
    }
}

/// Sends the harvest request, offering it again if the queue refuses it or fails.
async fn send_harvest_request<Q: Queue>(
    queue: &Q,
    config: &WebhookConfig,
    request: &HarvestRequest,
) -> Result<(), Rejection> {
    let body = serde_json::to_string(request)
        .map_err(|e| Rejection::Queue(format!("serialising the harvest request: {e}")))?;
    let message = OutgoingMessage {
        id: "harvest".to_owned(),
        body,
    };
    let mut last_problem = String::new();
    let mut delay = SEND_RETRY_DELAY;
    for attempt in 1..=SEND_ATTEMPTS {
        if attempt > 1 {
            tokio::time::sleep(delay).await;
            delay *= 2;
        }
        match queue
            .send_batch(&config.harvest_queue_url, std::slice::from_ref(&message))
            .await
        {
            Ok(refused) if refused.is_empty() => return Ok(()),
            Ok(_) => last_problem = "the queue refused the message".to_owned(),
            Err(e) => last_problem = e.to_string(),
        }
        tracing::warn!(attempt, problem = %last_problem, "sending the harvest request failed");
    }
    Err(Rejection::Queue(format!(
        "gave up after {SEND_ATTEMPTS} attempts: {last_problem}"
    )))
}
