//! The bodies of shotlabel's fuzz targets.
//!
//! Each function takes the fuzzer's bytes, runs the production code on them the way the
//! pipeline does, and checks what must hold whatever the input; a panic is the fuzzer's
//! "crash". The targets in `fuzz_targets/` are one line each around these functions, and
//! the workspace test `tests/tests/integration/fuzz_corpus.rs` includes this file (`#[path]`) to replay
//! every committed corpus and regression input through the same code without cargo-fuzz.
//! So this file only uses crates that test has too: `shotlabel-core` (with its `memory`
//! feature), `enqueue`, `aws_lambda_events`, `serde_json` and `tokio`.
//!
//! The store, queue and provider are `shotlabel_core::memory`'s, with no fault injected:
//! every error or odd outcome a target sees comes from the input.

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::sync::{Arc, LazyLock};

use aws_lambda_events::event::s3::S3Event;
use serde_json::{Value, json};
use shotlabel_core::SecretString;
use shotlabel_core::answer::{LineOutcome, MAX_REASON_CHARS, interpret_line};
use shotlabel_core::batch_api::Batch;
use shotlabel_core::batch_token;
use shotlabel_core::enqueue::{EnqueueConfig, EnqueueReport, enqueue_objects};
use shotlabel_core::harvest::{HarvestConfig, HarvestOutcome, harvest, parse_output_line};
use shotlabel_core::memory::{MemoryProvider, MemoryQueue, MemoryStore};
use shotlabel_core::prepare::{
    DecodeLimits, JPEG_DATA_URI_PREFIX, PrepareError, PreparedImage, prepare_image, prepare_jpeg,
};
use shotlabel_core::records::Stage;
use shotlabel_core::records::{
    HarvestCounts, HarvestRequest, Layout, MAX_KEY_BYTES, Manifest, PendingItem, TaskRef,
    state_keys,
};
use shotlabel_core::s3_key::{KeyError, decode_event_key};
use shotlabel_core::standard_webhooks::{self, WebhookSecrets};
use shotlabel_core::task::{ImageSettings, Task};
use shotlabel_core::webhook::{WebhookConfig, WebhookRequest, WebhookResponse, receive};

/// The fuzz targets, named as in `fuzz/Cargo.toml` and `fuzz/corpus/<target>/`.
pub const TARGETS: [&str; 4] = [
    "prepare_image",
    "output_lines",
    "webhook_request",
    "s3_event",
];

// ---------------------------------------------------------------------------------------
// prepare_image
// ---------------------------------------------------------------------------------------

/// Decode limits small enough that no input can make the fuzzer run out of memory: 256 KiB
/// in, 512 x 512 pixels out (the decoder's allocations are capped from these).
pub const FUZZ_LIMITS: DecodeLimits = DecodeLimits {
    max_bytes: 256 * 1024,
    max_pixels: 512 * 512,
};

/// A longest side small enough that most inputs are downscaled on the second pass.
const SMALL_SIDE: u32 = 64;

/// Prepares the bytes as an image under the default task's settings and [`FUZZ_LIMITS`],
/// and, when that works, again at a 64-pixel longest side. Returns the first result.
pub fn prepare(data: &[u8]) -> Result<PreparedImage, PrepareError> {
    let settings = default_task().image().clone();
    let result = prepare_image(data, &settings, &FUZZ_LIMITS);
    match &result {
        Ok(prepared) => {
            check_prepared(prepared, &settings);
            let small = ImageSettings {
                max_side: SMALL_SIDE,
                ..settings
            };
            let jpeg = prepare_jpeg(data, &small, &FUZZ_LIMITS)
                .unwrap_or_else(|e| panic!("prepared at full size but not at {SMALL_SIDE}: {e}"));
            assert!(jpeg.width.max(jpeg.height) <= SMALL_SIDE);
            assert!(jpeg.width >= 1 && jpeg.height >= 1);
            assert_eq!(
                (jpeg.source_width, jpeg.source_height),
                (prepared.source_width, prepared.source_height)
            );
            assert!(jpeg.jpeg.starts_with(&[0xFF, 0xD8]), "not a JPEG");
        }
        Err(e) => {
            assert!(!e.to_string().is_empty());
            match e {
                PrepareError::Empty => assert!(data.is_empty()),
                PrepareError::TooLarge { bytes, limit } => {
                    assert!(*bytes > *limit && *limit == FUZZ_LIMITS.max_bytes);
                }
                PrepareError::TooManyPixels {
                    width,
                    height,
                    limit,
                } => assert!(u64::from(*width) * u64::from(*height) > *limit),
                _ => {}
            }
        }
    }
    result
}

fn check_prepared(prepared: &PreparedImage, settings: &ImageSettings) {
    let (w, h) = (prepared.width, prepared.height);
    assert!(w >= 1 && h >= 1, "{w}x{h}");
    assert!(
        w.max(h) <= settings.max_side,
        "{w}x{h} over {}",
        settings.max_side
    );
    assert!(
        w <= prepared.source_width && h <= prepared.source_height,
        "upscaled"
    );
    assert!(
        u64::from(prepared.source_width) * u64::from(prepared.source_height)
            <= FUZZ_LIMITS.max_pixels
    );
    assert!(prepared.data_uri.starts_with(JPEG_DATA_URI_PREFIX));
    assert_eq!(
        prepared.data_uri.len(),
        JPEG_DATA_URI_PREFIX.len() + prepared.jpeg_bytes.div_ceil(3) * 4
    );
}

// ---------------------------------------------------------------------------------------
// output_lines
// ---------------------------------------------------------------------------------------

/// What [`output_lines`] saw.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutputLinesOutcome {
    /// Lines that parsed as output lines.
    pub parsed: usize,
    /// Non-blank lines that did not.
    pub unparsed: usize,
    /// Parsed lines [`interpret_line`] made an answer of.
    pub answers: usize,
    /// Parsed lines it made a retry of.
    pub retries: usize,
    /// The harvest of a batch whose output file is the input.
    pub counts: HarvestCounts,
    /// Items in the manifest (every custom id of the input, and one the file never names).
    pub items: usize,
}

/// The most distinct custom ids of the input that get a manifest item.
const MAX_ITEMS: usize = 64;
const BUCKET: &str = "bucket";
const INPUT_PREFIX: &str = "incoming/";
const PENDING_QUEUE: &str = "queue/pending";
const HARVEST_QUEUE: &str = "queue/harvest";
const FUZZ_BATCH: &str = "batch_fuzz";
const FUZZ_MANIFEST: &str = "fuzz-0";
const MAX_RETRIES: u32 = 2;

/// The bytes as a finished batch's output file: every line as the harvest splits and
/// parses it ([`parse_output_line`]) and interprets it ([`interpret_line`] against the
/// default task), then the whole harvest of that batch, then the harvest again.
///
/// Checks: an answer passes the schema, a retry has a bounded reason at a known stage;
/// the harvest succeeds and every manifest item ends labelled, retried or failed, with the
/// labels, failed records and queue messages to show for it; a second harvest changes
/// nothing.
pub fn output_lines(data: &[u8]) -> OutputLinesOutcome {
    let task = default_task();
    let mut outcome = OutputLinesOutcome {
        parsed: 0,
        unparsed: 0,
        answers: 0,
        retries: 0,
        counts: HarvestCounts::default(),
        items: 0,
    };
    let mut custom_ids = BTreeSet::new();
    for line in data.split(|&b| b == b'\n') {
        let Some(parsed) = parse_output_line(line) else {
            continue;
        };
        let Ok(parsed) = parsed else {
            outcome.unparsed += 1;
            continue;
        };
        outcome.parsed += 1;
        if custom_ids.len() < MAX_ITEMS {
            custom_ids.insert(parsed.custom_id.clone());
        }
        match interpret_line(&parsed, task) {
            LineOutcome::Answer(answer) => {
                outcome.answers += 1;
                assert!(
                    task.validate_answer(&answer.label).is_ok(),
                    "an answer that breaks the schema: {}",
                    answer.label
                );
            }
            LineOutcome::Retry(retry) => {
                outcome.retries += 1;
                assert!(retry.stage == Stage::Provider || retry.stage == Stage::Validate);
                assert!(!retry.reason.trim().is_empty());
                // The ellipsis of a cut reason is the one character over.
                let chars = retry.reason.chars().count();
                assert!(chars <= MAX_REASON_CHARS + 1, "{chars} characters");
            }
        }
    }

    let manifest_items = manifest_items(&custom_ids);
    outcome.items = manifest_items.len();
    let store = MemoryStore::default();
    let queue = MemoryQueue::default();
    let manifest = Manifest {
        name: FUZZ_MANIFEST.to_owned(),
        submission_id: "fuzz".to_owned(),
        task: task_ref(task),
        model: task.model().to_owned(),
        created_at: 0,
        items: manifest_items,
        slot: None,
    };
    let manifest_json = serde_json::to_vec(&manifest).expect("a manifest serialises");
    store.insert(BUCKET, &state_keys::manifest(FUZZ_MANIFEST), manifest_json);
    let provider = finished_batch(data);
    let config = HarvestConfig {
        bucket: BUCKET.to_owned(),
        layout: Layout::new(INPUT_PREFIX),
        pending_queue_url: PENDING_QUEUE.to_owned(),
        task: Arc::new(task.clone()),
        max_retries: MAX_RETRIES,
        max_requeues: 10,
        shards: None,
        delete_provider_files: false,
    };
    let request = HarvestRequest {
        batch_id: Some(FUZZ_BATCH.to_owned()),
        manifest: None,
        origin: "fuzz".to_owned(),
        shard: None,
        delivery: None,
    };
    let counts = match block_on(harvest(&store, &queue, &provider, &config, &request)) {
        Ok(HarvestOutcome::Harvested { counts, .. }) => counts,
        other => panic!("a finished batch was not harvested: {other:?}"),
    };
    assert_eq!(
        counts.labelled + counts.retried + counts.failed,
        manifest.items.len() as u64,
        "not every item ended somewhere: {counts:?}"
    );
    assert_eq!(counts.duplicates, 0, "{counts:?}");
    let labels = store.keys(BUCKET, "labels/");
    let failed = store.keys(BUCKET, "failed/");
    assert_eq!(labels.len() as u64, counts.labelled, "{labels:?}");
    assert_eq!(failed.len() as u64, counts.failed, "{failed:?}");
    let sent = queue.sent();
    assert_eq!(sent.len() as u64, counts.retried);
    for (queue_url, body) in &sent {
        assert_eq!(queue_url, PENDING_QUEUE);
        let item: PendingItem = serde_json::from_str(body).expect("a retry is a pending item");
        assert!(item.attempt >= 1 && item.attempt <= MAX_RETRIES);
        assert_eq!(item.reasons.len() as u32, item.attempt);
    }

    let again = block_on(harvest(&store, &queue, &provider, &config, &request));
    assert!(
        matches!(again, Ok(HarvestOutcome::AlreadyHarvested { .. })),
        "harvesting twice: {again:?}"
    );
    assert_eq!(
        queue.sent().len(),
        sent.len(),
        "the second harvest requeued"
    );
    outcome.counts = counts;
    outcome
}

/// A provider holding one completed batch, [`FUZZ_BATCH`] of [`FUZZ_MANIFEST`], whose
/// output file is `output`.
fn finished_batch(output: &[u8]) -> MemoryProvider {
    let provider = MemoryProvider::default();
    let output_file = provider.add_file(output.to_vec());
    let batch = json!({
        "id": FUZZ_BATCH,
        "status": "completed",
        "input_file_id": "file-input",
        "output_file_id": output_file,
        "metadata": { "shotlabel_manifest": FUZZ_MANIFEST },
    });
    provider.insert_batch(serde_json::from_value::<Batch>(batch).expect("a batch parses"));
    provider
}

/// One item per custom id, and one the file never names (it goes round again). Every
/// third item is on its last attempt, so that a retry fails it instead.
fn manifest_items(custom_ids: &BTreeSet<String>) -> BTreeMap<String, PendingItem> {
    custom_ids
        .iter()
        .map(String::as_str)
        .chain(std::iter::once("fuzz-never-answered"))
        .enumerate()
        .map(|(i, custom_id)| {
            let attempt = if i % 3 == 2 { MAX_RETRIES } else { 0 };
            let item = PendingItem {
                bucket: BUCKET.to_owned(),
                key: format!("{INPUT_PREFIX}image-{i}.png"),
                size: 1000,
                etag: format!("etag-{i}"),
                version_id: None,
                attempt,
                reasons: (0..attempt)
                    .map(|a| shotlabel_core::records::AttemptReason {
                        attempt: a,
                        stage: Stage::Validate,
                        reason: "an earlier attempt".to_owned(),
                    })
                    .collect(),
                requeues: 0,
                replace_label: None,
            };
            (custom_id.to_owned(), item)
        })
        .collect()
}

// ---------------------------------------------------------------------------------------
// webhook_request
// ---------------------------------------------------------------------------------------

/// The Standard Webhooks secret of the webhook function's test fixtures.
pub const WEBHOOK_WHSEC: &str = "whsec_d2ViaG9vayBmaXh0dXJlIGtleSwgMzIgYnl0ZXMhISE=";
/// Its key bytes (the base64 above, decoded).
const WEBHOOK_KEY: &[u8] = b"webhook fixture key, 32 bytes!!!";
/// The per-batch secret of the same fixtures.
pub const PER_BATCH_SECRET: &str = "per-batch fixture secret, long enough";
/// "Now" for the receiver: the time the fixtures were signed.
pub const WEBHOOK_NOW: i64 = 1_750_000_000;
/// A body limit small enough that the fuzzer reaches it.
const WEBHOOK_MAX_BODY: usize = 4096;

/// Replaced by a valid Standard Webhooks signature of the request (in `webhook-signature`).
pub const SIGN_PLACEHOLDER: &str = "v1,SIGN";
/// Replaced by the valid per-batch token of the query's manifest (in the query).
pub const TOKEN_PLACEHOLDER: &str = "token=SIGN";

/// The bytes as an HTTP request to the webhook receiver, in this plain form:
///
/// ```text
/// POST manifest=m-0&token=SIGN        <- method, then the raw query (optional)
/// webhook-id: msg_1                   <- headers, `name: value`, one a line
/// webhook-timestamp: 1750000000
/// webhook-signature: v1,SIGN
///                                     <- an empty line
/// {"type":"batch.completed", ...}     <- the body, raw bytes to the end
/// ```
///
/// So that the fuzzer gets past authentication, `v1,SIGN` in the signature header and
/// `token=SIGN` in the query are replaced by what a provider holding the secret would
/// send; everything else is as given. The receiver runs with both authentication modes
/// configured, in memory, at [`WEBHOOK_NOW`].
///
/// Checks: the status is one the receiver documents; no answer holds a secret; exactly
/// the accepted requests queue one harvest request, which names a batch or a manifest;
/// the receiver's 401 agrees with Standard Webhooks verification; and the same request
/// again is a duplicate or the same refusal.
pub fn webhook_request(data: &[u8]) -> WebhookResponse {
    let request = parse_request(data);
    let store = MemoryStore::default();
    let queue = MemoryQueue::default();
    let mut config = WebhookConfig::new(BUCKET, HARVEST_QUEUE);
    config.standard =
        Some(WebhookSecrets::parse(WEBHOOK_WHSEC).expect("the fixture secret parses"));
    config.per_batch_secret = Some(SecretString::from(PER_BATCH_SECRET));
    config.max_body_bytes = WEBHOOK_MAX_BODY;

    let response = block_on(receive(&store, &queue, &config, &request, WEBHOOK_NOW));
    assert!(
        matches!(response.status, 200 | 400 | 401 | 405 | 413),
        "status {}",
        response.status
    );
    for secret in [WEBHOOK_WHSEC, PER_BATCH_SECRET] {
        assert!(!response.body.contains(secret), "a secret in the answer");
    }
    assert!(!response.body.contains("webhook fixture key"));
    let body: Option<Value> = if response.body.is_empty() {
        None
    } else {
        Some(serde_json::from_str(&response.body).expect("the answer is JSON"))
    };
    // Only the readiness probe is answered without a body.
    assert_eq!(
        request.method.eq_ignore_ascii_case("OPTIONS"),
        body.is_none()
    );
    let queued = response.status == 200
        && body
            .as_ref()
            .is_some_and(|b| b["accepted"] == json!(true) && b.get("duplicate").is_none());
    let sent = queue.sent();
    if queued {
        assert_eq!(
            sent.len(),
            1,
            "an accepted request queues one harvest request"
        );
        let (queue_url, message) = &sent[0];
        assert_eq!(queue_url, HARVEST_QUEUE);
        let harvest: HarvestRequest =
            serde_json::from_str(message).expect("a harvest request parses");
        assert!(harvest.batch_id.is_some() || harvest.manifest.is_some());
        assert_eq!(harvest.origin, shotlabel_core::webhook::ORIGIN);
    } else {
        assert!(
            sent.is_empty(),
            "status {} queued {sent:?}",
            response.status
        );
    }

    // Standard mode (no per-batch query): a 401 exactly when the signature does not verify.
    let is_post = request.method.eq_ignore_ascii_case("POST");
    if is_post
        && request.body.len() <= WEBHOOK_MAX_BODY
        && batch_token::from_query(&request.query).is_none()
    {
        let verified = standard_webhooks::verify(
            config.standard.as_ref().expect("configured above"),
            |name| request.header(name),
            &request.body,
            WEBHOOK_NOW,
            config.tolerance_secs,
        );
        assert_eq!(
            response.status == 401,
            verified.is_err(),
            "status {} but verification says {verified:?}",
            response.status
        );
    }

    // At-least-once delivery: the same request again.
    let again = block_on(receive(&store, &queue, &config, &request, WEBHOOK_NOW));
    if queued {
        assert_eq!(again.status, 200);
        assert!(again.body.contains("duplicate"), "{}", again.body);
        assert_eq!(queue.sent().len(), 1, "a duplicate was queued");
    } else {
        assert_eq!(again, response);
    }
    response
}

/// Reads the plain request form [`webhook_request`] describes, filling in the
/// placeholders.
pub fn parse_request(data: &[u8]) -> WebhookRequest {
    let (head, body) = match find(data, b"\n\n") {
        Some(at) => (&data[..at], &data[at + 2..]),
        None => (data, &[][..]),
    };
    let head = String::from_utf8_lossy(head);
    let mut lines = head.split('\n').map(|l| l.strip_suffix('\r').unwrap_or(l));
    let first = lines.next().unwrap_or_default();
    let (method, query) = first.split_once(' ').unwrap_or((first, ""));
    let mut request = WebhookRequest {
        method: method.to_owned(),
        headers: lines
            .filter_map(|line| line.split_once(':'))
            .map(|(name, value)| (name.trim().to_ascii_lowercase(), value.trim().to_owned()))
            .collect(),
        query: query.to_owned(),
        body: body.to_vec(),
    };
    if request.query.contains(TOKEN_PLACEHOLDER)
        && let Some((manifest, _)) = batch_token::from_query(&request.query)
    {
        let token = batch_token::token(PER_BATCH_SECRET.as_bytes(), &manifest);
        request.query = request
            .query
            .replace(TOKEN_PLACEHOLDER, &format!("token={token}"));
    }
    let id = request
        .header(standard_webhooks::HEADER_ID)
        .map(str::to_owned);
    let timestamp = request
        .header(standard_webhooks::HEADER_TIMESTAMP)
        .and_then(|t| t.trim_ascii().parse::<i64>().ok());
    if let (Some(id), Some(timestamp)) = (id, timestamp) {
        let signature = standard_webhooks::sign(WEBHOOK_KEY, &id, timestamp, &request.body);
        for (name, value) in &mut request.headers {
            if name == standard_webhooks::HEADER_SIGNATURE && value.contains(SIGN_PLACEHOLDER) {
                *value = value.replace(SIGN_PLACEHOLDER, &signature);
            }
        }
    }
    request
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack
        .windows(needle.len())
        .position(|window| window == needle)
}

// ---------------------------------------------------------------------------------------
// s3_event
// ---------------------------------------------------------------------------------------

/// What [`s3_event`] saw.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct S3Outcome {
    pub records: usize,
    /// Created objects with a decodable key ([`enqueue::new_objects`]).
    pub objects: usize,
    /// The first enqueue of those objects.
    pub report: EnqueueReport,
    /// The same objects again with `force_relabel`.
    pub relabel: EnqueueReport,
}

/// The largest object the enqueue target queues; bigger ones get a failed record.
const MAX_OBJECT_BYTES: u64 = 1024 * 1024;
/// An object already labelled under the default task version, with this etag.
pub const LABELLED_KEY: &str = "incoming/already-labelled.png";
pub const LABELLED_ETAG: &str = "0123456789abcdef0123456789abcdef";

/// The bytes as an S3 event notification, as the enqueue function receives it: parsed as
/// `S3Event` (`None` when it is not one), every record's key decoded, the created objects
/// taken out ([`enqueue::new_objects`]) and enqueued, then enqueued again with
/// `force_relabel`.
///
/// Checks: a key decodes to a non-empty key, and to itself when it holds no `%` or `+`;
/// every object is counted once as queued, already labelled, failed or ignored; each
/// queued message is a first-attempt pending item for one of the objects; failed records
/// have keys S3 accepts.
pub fn s3_event(data: &[u8]) -> Option<S3Outcome> {
    let event: S3Event = serde_json::from_slice(data).ok()?;
    for record in &event.records {
        let Some(raw) = record.s3.object.key.as_deref() else {
            continue;
        };
        match decode_event_key(raw) {
            Ok(key) => {
                assert!(!key.is_empty(), "{raw:?} decoded to nothing");
                if !raw.contains(['%', '+']) {
                    assert_eq!(key, raw);
                }
            }
            Err(KeyError::Empty) => assert!(raw.is_empty()),
            Err(KeyError::NotUtf8 { raw: reported }) => {
                assert_eq!(reported, raw);
                assert!(raw.contains('%'));
            }
        }
    }
    let objects = enqueue::new_objects(&event);
    assert!(objects.len() <= event.records.len());
    let task = default_task();
    let store = MemoryStore::default();
    let label = json!({
        "source": { "etag": LABELLED_ETAG },
        "task": { "name": task.name(), "version": task.version() },
    });
    let layout = Layout::new(INPUT_PREFIX);
    let label_key = layout.label_key(layout.relative_or_key(LABELLED_KEY));
    for bucket in objects
        .iter()
        .map(|o| o.bucket.as_str())
        .collect::<BTreeSet<_>>()
    {
        store.insert(bucket, &label_key, label.to_string().into_bytes());
    }

    let mut config = EnqueueConfig {
        layout,
        pending_queue_url: PENDING_QUEUE.to_owned(),
        max_object_bytes: MAX_OBJECT_BYTES,
        force_relabel: false,
        task: task_ref(task),
    };
    let report = enqueue_checked(&store, &config, &objects);
    config.force_relabel = true;
    let relabel = enqueue_checked(&store, &config, &objects);
    assert_eq!(relabel.already_labelled, 0, "force_relabel skipped a label");
    assert_eq!(relabel.ignored, report.ignored);
    assert_eq!(relabel.failed, report.failed);
    for (_, key) in store.all_keys() {
        assert!(
            key.len() <= MAX_KEY_BYTES,
            "a key S3 refuses: {} bytes",
            key.len()
        );
    }
    Some(S3Outcome {
        records: event.records.len(),
        objects: objects.len(),
        report,
        relabel,
    })
}

fn enqueue_checked(
    store: &MemoryStore,
    config: &EnqueueConfig,
    objects: &[shotlabel_core::enqueue::NewObject],
) -> EnqueueReport {
    let queue = MemoryQueue::default();
    let report = block_on(enqueue_objects(store, &queue, config, objects.to_vec()))
        .unwrap_or_else(|e| panic!("enqueue failed against stores that never fail: {e}"));
    assert_eq!(
        report.queued + report.already_labelled + report.failed + report.ignored,
        objects.len(),
        "{report:?}"
    );
    let sent = queue.sent();
    assert_eq!(sent.len(), report.queued);
    for (queue_url, body) in &sent {
        assert_eq!(queue_url, PENDING_QUEUE);
        let item: PendingItem = serde_json::from_str(body).expect("a pending item");
        assert_eq!(item.attempt, 0);
        assert!(
            objects
                .iter()
                .any(|o| o.key == item.key && o.etag == item.etag && o.bucket == item.bucket),
            "a message for an object the event did not name: {}",
            item.key
        );
        assert!(item.key.starts_with(INPUT_PREFIX));
        assert!(item.size > 0 && item.size <= MAX_OBJECT_BYTES);
    }
    if report.failed > 0 {
        assert!(
            store
                .all_keys()
                .iter()
                .any(|(_, key)| key.starts_with("failed/"))
        );
    }
    report
}

// ---------------------------------------------------------------------------------------
// Shared pieces
// ---------------------------------------------------------------------------------------

static DEFAULT_TASK: LazyLock<Task> =
    LazyLock::new(|| Task::default_task().expect("the built-in task loads"));

/// The built-in website-judgement task, loaded once.
pub fn default_task() -> &'static Task {
    &DEFAULT_TASK
}

fn task_ref(task: &Task) -> TaskRef {
    TaskRef {
        name: task.name().to_owned(),
        version: task.version().to_owned(),
    }
}

thread_local! {
    static RUNTIME: tokio::runtime::Runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .expect("a tokio runtime");
}

/// Runs a future to completion on this thread's runtime.
pub fn block_on<F: Future>(future: F) -> F::Output {
    RUNTIME.with(|runtime| runtime.block_on(future))
}
