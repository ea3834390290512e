//! Hostile input (issue 8): awkward object keys through the whole local pipeline, a
//! 100 MB body and a flood of forged requests at the webhook, task schemas a provider
//! would reject, and a provider that answers garbage.
//!
//! Run: `cargo test -p shotlabel-integration --test integration hostile:: -- --nocapture`

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::common::*;
use aws_sdk_s3::primitives::ByteStream;
use axum::body::{Body, Bytes};
use axum::extract::{Path as UrlPath, Request, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use secrecy::SecretString;
use serde_json::{Value, json};
use shotlabel_batch_client::{BatchApiConfig, BatchClient};
use shotlabel_core::harvest::{HarvestOutcome, MAX_LINE_BYTES, harvest};
use shotlabel_core::ports::ObjectStore;
use shotlabel_core::records::{
    FailedRecord, HarvestRequest, LabelRecord, Layout, MAX_KEY_BYTES, Manifest, PendingItem,
    state_keys, unix_now,
};
use shotlabel_core::standard_webhooks::{WebhookSecrets, sign};
use shotlabel_core::task::Task;
use shotlabel_core::webhook::WebhookConfig;
use shotlabel_localstack::pipeline::{
    LocalPipeline, PipelineOptions, function_url_event, function_url_response,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const OUTPUT_PREFIXES: [&str; 6] = [
    "incoming/",
    "labels/",
    "failed/",
    "results/",
    "state/",
    "dataset/",
];

fn screenshot() -> anyhow::Result<Vec<u8>> {
    Ok(std::fs::read(data("screenshots").join("saas-landing.png"))?)
}

/// A key of exactly `MAX_KEY_BYTES` bytes: `head`, then `fill` repeated, then `.png`.
fn key_of_max_length(head: &str, fill: char) -> String {
    let mut key = head.to_owned();
    while key.len() + fill.len_utf8() + ".png".len() <= MAX_KEY_BYTES {
        key.push(fill);
    }
    while key.len() + ".png".len() < MAX_KEY_BYTES {
        key.push('x');
    }
    key.push_str(".png");
    key
}

/// Keys S3 accepts and a careless pipeline would not: path tricks, control characters,
/// and keys as long as S3 allows (whose mirrored output keys would be over the limit).
fn hostile_keys() -> Vec<String> {
    vec![
        "incoming/../escape.png".into(),
        "incoming/a/../../up.png".into(),
        "incoming/./dot.png".into(),
        "incoming//double-slash.png".into(),
        // Not `\n`: moto's router cannot serve such a key (a 404 before S3 logic); S3
        // takes it, and the key is handled as any other string here.
        "incoming/carriage\rreturn.png".into(),
        "incoming/escape\u{1b}[31mred.png".into(),
        "incoming/tab\there.png".into(),
        "incoming/del\u{7f}.png".into(),
        "incoming/percent%2F..%2Fencoded.png".into(),
        "incoming/plus+and space.png".into(),
        key_of_max_length("incoming/long-", 'k'),
        key_of_max_length("incoming/accents-", 'é'),
        key_of_max_length("incoming/deep/", 'd').replacen("dddd", "d/d/", 40),
    ]
}

/// Keys of 1,024 bytes whose objects are empty: refused at enqueue, so their failed
/// record is written by enqueue itself.
fn hostile_empty_key() -> String {
    key_of_max_length("incoming/empty-", 'e')
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_keys_end_with_one_terminal_record_each_and_a_huge_body_gets_413()
-> anyhow::Result<()> {
    let task = Task::default_task()?;
    let mut options = PipelineOptions::new(task.clone());
    options.stack_name = "hostile-keys".into();
    options.submit_every = Duration::from_millis(500);
    options.emulator_delays_ms = (50, 200, 50);
    // Labels can only come through the webhook, so they also show that the receiver kept
    // serving after the 100 MB body below.
    options.reconcile_min_age = Duration::from_secs(3600);
    let pipeline = LocalPipeline::start(options).await?;
    let bucket = pipeline.resources.bucket.clone();
    let s3 = shotlabel_localstack::s3_client(&pipeline.sdk);
    let image = screenshot()?;

    let mut keys = hostile_keys();
    for key in &keys {
        assert!(key.len() <= MAX_KEY_BYTES, "{} bytes", key.len());
        s3.put_object()
            .bucket(&bucket)
            .key(key)
            .body(ByteStream::from(image.clone()))
            .send()
            .await
            .map_err(|e| {
                anyhow::anyhow!(
                    "putting {key:?}: {}",
                    aws_sdk_s3::error::DisplayErrorContext(&e)
                )
            })?;
    }
    let empty = hostile_empty_key();
    s3.put_object()
        .bucket(&bucket)
        .key(&empty)
        .body(ByteStream::from(Vec::new()))
        .send()
        .await?;
    keys.push(empty.clone());
    let layout = Layout::new("incoming/");
    for key in keys.iter().filter(|k| k.len() == MAX_KEY_BYTES) {
        let naive = format!("labels/{}.json", layout.relative_or_key(key));
        assert!(
            naive.len() > MAX_KEY_BYTES,
            "the mirrored key is over the limit"
        );
    }

    // While the pipeline works: 100 MB at the webhook listener.
    let addr: SocketAddr = pipeline
        .webhook_url
        .trim_start_matches("http://")
        .trim_end_matches('/')
        .parse()?;
    let huge = huge_post(addr, 100 * 1024 * 1024).await?;
    eprintln!(
        "100 MB POST: HTTP {} after {} of {} bytes were sent, in {:?}",
        huge.status, huge.sent, huge.total, huge.elapsed
    );
    assert_eq!(huge.status, 413);
    assert!(
        huge.sent < huge.total,
        "the listener answered only after reading the whole body"
    );
    // It still answers (a readiness probe), and the webhook deliveries below still work.
    assert_eq!(raw_request(addr, "OPTIONS", &[], b"").await?, 200);

    let start = Instant::now();
    while pipeline.terminal_count(&layout, &keys).await? < keys.len() {
        if start.elapsed() > Duration::from_secs(45) {
            let store = pipeline.store();
            let mut missing = Vec::new();
            for key in &keys {
                let relative = layout.relative_or_key(key);
                if store
                    .head(&bucket, &layout.label_key(relative))
                    .await?
                    .is_none()
                    && store
                        .head(&bucket, &layout.failed_key(relative))
                        .await?
                        .is_none()
                {
                    missing.push(format!("{key:?} ({} bytes)", key.len()));
                }
            }
            anyhow::bail!("no terminal record for {missing:?}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    let store = pipeline.store();
    let mut expected_records = BTreeSet::new();
    for key in &keys {
        let relative = layout.relative_or_key(key);
        let label_key = layout.label_key(relative);
        let failed_key = layout.failed_key(relative);
        let label = store.get(&bucket, &label_key).await.ok();
        let failed = store.get(&bucket, &failed_key).await.ok();
        match (label, failed) {
            (Some(label), None) => {
                let label: LabelRecord = serde_json::from_slice(&label.body)?;
                assert_eq!(&label.source.key, key, "the label names its image");
                task.validate_answer(&label.label)
                    .map_err(|e| anyhow::anyhow!("{key:?}: {e:?}"))?;
                expected_records.insert(label_key);
            }
            (None, Some(failed)) => {
                let failed: FailedRecord = serde_json::from_slice(&failed.body)?;
                assert_eq!(&failed.source.key, key, "the failed record names its image");
                assert!(!failed.reasons.is_empty() && !failed.reasons[0].reason.is_empty());
                expected_records.insert(failed_key);
            }
            (label, failed) => anyhow::bail!(
                "{key:?}: label {}, failed record {}",
                label.is_some(),
                failed.is_some()
            ),
        }
    }
    // Only the empty object fails; every other key, however awkward, is labelled.
    let failed_keys = store.list(&bucket, "failed/").await?;
    assert_eq!(
        failed_keys,
        vec![layout.failed_key(layout.relative_or_key(&empty))]
    );

    // Nothing over S3's key limit, nothing outside the pipeline's prefixes, and no record
    // that is not one of the inputs'.
    let everything = store.list(&bucket, "").await?;
    for key in &everything {
        assert!(
            key.len() <= MAX_KEY_BYTES,
            "a key of {} bytes was written",
            key.len()
        );
        assert!(
            OUTPUT_PREFIXES.iter().any(|p| key.starts_with(p)),
            "{key:?} is outside the pipeline's prefixes"
        );
    }
    let records: BTreeSet<String> = everything
        .iter()
        .filter(|k| k.starts_with("labels/") || k.starts_with("failed/"))
        .cloned()
        .collect();
    assert_eq!(records, expected_records);
    eprintln!(
        "{} hostile keys: {} labelled, {} failed",
        keys.len(),
        records.len() - failed_keys.len(),
        failed_keys.len()
    );
    Ok(())
}

struct HugePost {
    status: u16,
    sent: u64,
    total: u64,
    elapsed: Duration,
}

/// POSTs `total` bytes (announced in `content-length`) while reading the answer, and
/// stops sending as soon as it comes.
async fn huge_post(addr: SocketAddr, total: u64) -> anyhow::Result<HugePost> {
    let start = Instant::now();
    let stream = tokio::net::TcpStream::connect(addr).await?;
    let (mut read, mut write) = stream.into_split();
    let head = format!(
        "POST / HTTP/1.1\r\nhost: {addr}\r\ncontent-type: application/json\r\n\
         content-length: {total}\r\n\r\n"
    );
    write.write_all(head.as_bytes()).await?;
    let sent = Arc::new(AtomicU64::new(0));
    let counter = Arc::clone(&sent);
    let writer = tokio::spawn(async move {
        let chunk = vec![b'x'; 64 * 1024];
        let mut left = total;
        while left > 0 {
            let n = usize::try_from(left.min(chunk.len() as u64)).unwrap_or(chunk.len());
            if write.write_all(&chunk[..n]).await.is_err() {
                break;
            }
            counter.fetch_add(n as u64, Ordering::SeqCst);
            left -= n as u64;
        }
        write
    });
    let mut response = Vec::new();
    let mut buf = [0u8; 4096];
    // A guard against hanging, not a timing assertion.
    let status = tokio::time::timeout(Duration::from_secs(120), async {
        loop {
            let n = read.read(&mut buf).await?;
            if n == 0 {
                anyhow::bail!("the connection closed without an answer");
            }
            response.extend_from_slice(&buf[..n]);
            if let Some(status) = status_of(&response) {
                return Ok(status);
            }
        }
    })
    .await??;
    let sent_then = sent.load(Ordering::SeqCst);
    writer.abort();
    Ok(HugePost {
        status,
        sent: sent_then,
        total,
        elapsed: start.elapsed(),
    })
}

/// The status code once the status line is complete.
fn status_of(response: &[u8]) -> Option<u16> {
    let end = response.windows(2).position(|w| w == b"\r\n")?;
    let line = std::str::from_utf8(&response[..end]).ok()?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// One raw HTTP/1.1 request; returns the status.
async fn raw_request(
    addr: SocketAddr,
    method: &str,
    headers: &[(&str, String)],
    body: &[u8],
) -> anyhow::Result<u16> {
    let mut stream = tokio::net::TcpStream::connect(addr).await?;
    let mut head = format!(
        "{method} / HTTP/1.1\r\nhost: {addr}\r\ncontent-length: {}\r\nconnection: close\r\n",
        body.len()
    );
    for (name, value) in headers {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    head.push_str("\r\n");
    stream.write_all(head.as_bytes()).await?;
    stream.write_all(body).await?;
    let mut response = Vec::new();
    stream.read_to_end(&mut response).await?;
    status_of(&response).ok_or_else(|| anyhow::anyhow!("no status line"))
}

// ---------------------------------------------------------------------------------------
// The webhook function behind a Function URL, flooded.

/// The Standard Webhooks key of the flood test.
const FLOOD_KEY: &[u8] = b"hostile-input test webhook key!!";

type WebhookHandler = webhook::Handler<shotlabel_aws::S3Store, shotlabel_aws::SqsQueue>;

/// The webhook function's real handler, each HTTP request turned into the Function URL
/// event Lambda would deliver.
async fn function_url(State(handler): State<Arc<WebhookHandler>>, request: Request) -> Response {
    let (parts, body) = request.into_parts();
    let Ok(body) = axum::body::to_bytes(body, 6 * 1024 * 1024).await else {
        return StatusCode::PAYLOAD_TOO_LARGE.into_response();
    };
    let event = function_url_event(&parts, &body);
    match webhook::handle(&handler, event).await {
        Ok(response) => function_url_response(&response),
        Err(_) => StatusCode::INTERNAL_SERVER_ERROR.into_response(),
    }
}

async fn serve_function_url(stack: &Stack) -> anyhow::Result<SocketAddr> {
    let mut config = WebhookConfig::new(
        stack.resources.bucket.clone(),
        stack.resources.harvest_queue_url.clone(),
    );
    config.standard = Some(WebhookSecrets::parse(&format!(
        "whsec_{}",
        STANDARD.encode(FLOOD_KEY)
    ))?);
    let handler = Arc::new(WebhookHandler {
        store: stack.store.clone(),
        queue: stack.queue.clone(),
        webhook: config,
    });
    let app = axum::Router::new()
        .fallback(function_url)
        .with_state(handler);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            eprintln!("the test listener stopped: {e}");
        }
    });
    Ok(addr)
}

fn batch_event(batch_id: &str) -> Vec<u8> {
    json!({
        "id": "evt_1",
        "object": "event",
        "created_at": 1,
        "type": "batch.completed",
        "data": {"id": batch_id},
    })
    .to_string()
    .into_bytes()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bounded_flood_of_forged_webhooks_is_refused_and_the_receiver_keeps_serving()
-> anyhow::Result<()> {
    const REQUESTS: usize = 2_000;
    const IN_FLIGHT: usize = 50;
    let stack = stack("hostile-flood").await?;
    let addr = serve_function_url(&stack).await?;
    let url = format!("http://{addr}/");
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(IN_FLIGHT)
        .build()?;
    let now = i64::try_from(unix_now())?;

    // Each kind of forgery, in turn: wrong key, no signature, a bare `v1,`, a stale
    // timestamp with the right key, a mangled signature, a bad per-batch token.
    let forged = move |i: usize| -> (String, Vec<(&'static str, String)>, Vec<u8>) {
        let id = format!("msg_flood_{i}");
        let body = batch_event(&format!("batch_flood_{i}"));
        let headers = match i % 6 {
            0 => vec![
                ("webhook-id", id.clone()),
                ("webhook-timestamp", now.to_string()),
                (
                    "webhook-signature",
                    sign(b"an attacker's key, thirty-two b.", &id, now, &body),
                ),
            ],
            1 => Vec::new(),
            2 => vec![
                ("webhook-id", id.clone()),
                ("webhook-timestamp", now.to_string()),
                ("webhook-signature", "v1,".to_owned()),
            ],
            3 => vec![
                ("webhook-id", id.clone()),
                ("webhook-timestamp", (now - 3_600).to_string()),
                (
                    "webhook-signature",
                    sign(FLOOD_KEY, &id, now - 3_600, &body),
                ),
            ],
            4 => vec![
                ("webhook-id", id.clone()),
                ("webhook-timestamp", now.to_string()),
                (
                    "webhook-signature",
                    sign(FLOOD_KEY, &id, now, &body).replace('A', "B") + "x",
                ),
            ],
            _ => Vec::new(),
        };
        let path = if i % 6 == 5 {
            format!("?manifest=s1-0&token={}", "0".repeat(64))
        } else {
            String::new()
        };
        (path, headers, body)
    };

    let semaphore = Arc::new(tokio::sync::Semaphore::new(IN_FLIGHT));
    let start = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..REQUESTS {
        let permit = Arc::clone(&semaphore).acquire_owned().await?;
        let http = http.clone();
        let (path, headers, body) = forged(i);
        let url = format!("{url}{path}");
        tasks.spawn(async move {
            let mut request = http.post(url).body(body);
            for (name, value) in headers {
                request = request.header(name, value);
            }
            let status = request.send().await.map(|r| r.status().as_u16());
            drop(permit);
            status
        });
    }
    let mut statuses: BTreeMap<String, usize> = BTreeMap::new();
    while let Some(done) = tasks.join_next().await {
        let status = match done? {
            Ok(status) => status.to_string(),
            Err(e) => format!("transport error: {e}"),
        };
        *statuses.entry(status).or_default() += 1;
    }
    let elapsed = start.elapsed();
    eprintln!(
        "webhook flood: {REQUESTS} forged requests, {IN_FLIGHT} in flight, in {elapsed:?} \
         ({:.0} rejections/s): {statuses:?}",
        REQUESTS as f64 / elapsed.as_secs_f64()
    );
    assert_eq!(statuses.get("401"), Some(&REQUESTS), "{statuses:?}");
    assert_eq!(statuses.len(), 1, "{statuses:?}");
    assert_eq!(
        queue_depth(&stack, &stack.resources.harvest_queue_url).await?,
        0
    );
    assert!(list(&stack, "state/").await?.is_empty(), "nothing recorded");

    // A genuine delivery right after is accepted and queued.
    let id = "msg_genuine";
    let body = batch_event("batch_genuine");
    let status = http
        .post(&url)
        .header("webhook-id", id)
        .header("webhook-timestamp", now.to_string())
        .header("webhook-signature", sign(FLOOD_KEY, id, now, &body))
        .body(body)
        .send()
        .await?
        .status();
    assert_eq!(status.as_u16(), 200);
    assert_eq!(
        queue_depth(&stack, &stack.resources.harvest_queue_url).await?,
        1
    );

    // The receiver's own limit (10 MB, the most Inference.net documents; a Function URL
    // refuses over 6 MB before the function runs): a body over it is refused with a 413
    // before any signature work, and nothing is queued.
    let big = vec![b'{'; shotlabel_core::webhook::DEFAULT_MAX_BODY_BYTES + 1];
    let status = http.post(&url).body(big).send().await?.status();
    assert_eq!(status.as_u16(), 413);
    assert_eq!(
        queue_depth(&stack, &stack.resources.harvest_queue_url).await?,
        1
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Task schemas a provider would reject.

/// The default task as JSON with its answer schema changed by `edit`, loaded.
fn load_with_schema(edit: impl FnOnce(&mut Value)) -> anyhow::Result<Result<Task, String>> {
    let mut spec = serde_json::to_value(Task::default_task()?.spec())?;
    edit(&mut spec["response_schema"]["schema"]);
    Ok(Task::from_json_str(&spec.to_string(), "hostile-task.json").map_err(|e| e.to_string()))
}

/// What a case is, how it breaks the schema, and what the error must name.
type SchemaCase = (&'static str, Box<dyn FnOnce(&mut Value)>, Vec<&'static str>);

#[test]
fn task_schemas_a_provider_would_reject_are_refused_with_the_problem_named() -> anyhow::Result<()> {
    // The default task loads: the edits below are what break it.
    assert!(load_with_schema(|_| {})?.is_ok());
    let cases: Vec<SchemaCase> = vec![
        (
            "non-strict: no additionalProperties",
            Box::new(|s| {
                s.as_object_mut().map(|o| o.remove("additionalProperties"));
            }),
            vec!["strict mode", "additionalProperties", "at /"],
        ),
        (
            "additionalProperties: true",
            Box::new(|s| s["additionalProperties"] = json!(true)),
            vec!["additionalProperties"],
        ),
        (
            "required does not list every property",
            Box::new(|s| s["required"] = json!(["landing_page"])),
            vec!["required", "aesthetic"],
        ),
        (
            "no required at all",
            Box::new(|s| {
                s.as_object_mut().map(|o| o.remove("required"));
            }),
            vec!["required"],
        ),
        (
            "the root is not an object",
            Box::new(|s| *s = json!({"type": "array", "items": {"type": "string"}})),
            vec!["root", "object"],
        ),
        (
            "a nested object without additionalProperties",
            Box::new(|s| {
                s["properties"]["extra"] = json!({"type": "array", "items": {"type": "object"}});
                s["required"] = json!(["landing_page", "aesthetic", "extra"]);
            }),
            vec!["/properties/extra/items", "additionalProperties"],
        ),
        (
            "allOf",
            Box::new(|s| s["allOf"] = json!([{"required": ["landing_page"]}])),
            vec!["allOf", "not support"],
        ),
        (
            "oneOf in a property",
            Box::new(|s| {
                s["properties"]["aesthetic"] =
                    json!({"oneOf": [{"type": "integer"}, {"type": "string"}]});
            }),
            vec!["/properties/aesthetic", "oneOf"],
        ),
        (
            "patternProperties",
            Box::new(|s| s["patternProperties"] = json!({"^x": {"type": "string"}})),
            vec!["patternProperties"],
        ),
        (
            "if/then/else",
            Box::new(|s| {
                s["if"] = json!({"properties": {"landing_page": {"const": true}}});
                s["then"] = json!({"properties": {"aesthetic": {"minimum": 3}}});
            }),
            vec!["\"if\""],
        ),
        (
            "not a JSON Schema at all",
            Box::new(|s| s["type"] = json!("no-such-type")),
            vec!["not a valid JSON Schema"],
        ),
    ];
    for (what, edit, needles) in cases {
        let Err(message) = load_with_schema(edit)? else {
            anyhow::bail!("{what}: the task loaded");
        };
        assert!(
            message.contains("response_schema.schema"),
            "{what}: {message}"
        );
        for needle in needles {
            assert!(
                message.contains(needle),
                "{what}: {message:?} lacks {needle:?}"
            );
        }
    }
    // A property merely *named* like a keyword is fine.
    let named = load_with_schema(|s| {
        s["properties"]["not"] = json!({"type": "string"});
        s["required"] = json!(["landing_page", "aesthetic", "not"]);
    })?;
    assert!(named.is_ok(), "{named:?}");
    Ok(())
}

// ---------------------------------------------------------------------------------------
// A provider answering garbage.

/// What the junk provider answers, per batch id and per file id.
#[derive(Default)]
struct Junk {
    batches: HashMap<String, (u16, String)>,
    files: HashMap<String, FileAnswer>,
}

#[derive(Clone)]
enum FileAnswer {
    Body(u16, Vec<u8>),
    /// These bytes, then the connection breaks.
    BreaksAfter(Vec<u8>),
}

type JunkState = Arc<Mutex<Junk>>;

async fn junk_batch(State(junk): State<JunkState>, UrlPath(id): UrlPath<String>) -> Response {
    let answer = junk.lock().ok().and_then(|j| j.batches.get(&id).cloned());
    match answer {
        Some((status, body)) => {
            (StatusCode::from_u16(status).unwrap_or(StatusCode::OK), body).into_response()
        }
        None => StatusCode::NOT_FOUND.into_response(),
    }
}

async fn junk_file(State(junk): State<JunkState>, UrlPath(id): UrlPath<String>) -> Response {
    let answer = junk.lock().ok().and_then(|j| j.files.get(&id).cloned());
    match answer {
        Some(FileAnswer::Body(status, body)) => {
            (StatusCode::from_u16(status).unwrap_or(StatusCode::OK), body).into_response()
        }
        Some(FileAnswer::BreaksAfter(bytes)) => {
            let chunks: Vec<Result<Bytes, std::io::Error>> = vec![
                Ok(Bytes::from(bytes)),
                Err(std::io::Error::other("the connection broke")),
            ];
            Body::from_stream(futures_util::stream::iter(chunks)).into_response()
        }
        None => (
            StatusCode::NOT_FOUND,
            r#"{"error":{"message":"No such file"}}"#,
        )
            .into_response(),
    }
}

async fn serve_junk(junk: JunkState) -> anyhow::Result<String> {
    let app = axum::Router::new()
        .route("/v1/batches/{id}", axum::routing::get(junk_batch))
        .route("/v1/files/{id}/content", axum::routing::get(junk_file))
        .with_state(junk);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            eprintln!("the junk provider stopped: {e}");
        }
    });
    Ok(format!("http://{addr}/v1"))
}

fn completed(id: &str, manifest: &str, output: Option<&str>) -> String {
    json!({
        "id": id,
        "object": "batch",
        "status": "completed",
        "output_file_id": output,
        "error_file_id": null,
        "request_counts": {"total": 2, "completed": 2, "failed": 0},
        "metadata": {"shotlabel_manifest": manifest},
    })
    .to_string()
}

fn answer_line(custom_id: &str, aesthetic: u8) -> String {
    let content = json!({"landing_page": true, "aesthetic": aesthetic}).to_string();
    json!({
        "id": format!("req_{custom_id}"),
        "custom_id": custom_id,
        "response": {"status_code": 200, "request_id": format!("rq_{custom_id}"), "body": {
            "id": "chatcmpl-1",
            "object": "chat.completion",
            "model": "junk-provider-model",
            "choices": [{"index": 0, "finish_reason": "stop",
                "message": {"role": "assistant", "content": content}}],
            "usage": {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15},
        }},
        "error": null,
    })
    .to_string()
}

/// Puts `count` images and a manifest naming them as `c0`, `c1`, …
async fn manifest_for(
    stack: &Stack,
    name: &str,
    count: usize,
) -> anyhow::Result<BTreeMap<String, PendingItem>> {
    let task = Task::default_task()?;
    let mut items = BTreeMap::new();
    for i in 0..count {
        let object = put(stack, &format!("{INPUT}{name}/{i}.png"), screenshot()?).await?;
        items.insert(
            format!("c{i}"),
            PendingItem {
                bucket: object.bucket,
                key: object.key,
                size: object.size,
                etag: object.etag,
                version_id: None,
                attempt: 0,
                reasons: Vec::new(),
                requeues: 0,
                replace_label: None,
            },
        );
    }
    let manifest = Manifest {
        name: name.into(),
        submission_id: name.into(),
        task: task_ref(&task),
        model: task.model().into(),
        created_at: 0,
        items: items.clone(),
        slot: None,
    };
    stack
        .s3
        .put_object()
        .bucket(&stack.resources.bucket)
        .key(state_keys::manifest(name))
        .body(serde_json::to_vec(&manifest)?.into())
        .send()
        .await?;
    Ok(items)
}

/// `results/<batch>.jsonl`, by custom id: every item exactly once.
async fn results_by_id(stack: &Stack, batch_id: &str) -> anyhow::Result<BTreeMap<String, Value>> {
    let object = stack
        .s3
        .get_object()
        .bucket(&stack.resources.bucket)
        .key(state_keys::results(batch_id))
        .send()
        .await?;
    let text = String::from_utf8(object.body.collect().await?.into_bytes().to_vec())?;
    let mut out = BTreeMap::new();
    for line in text.lines() {
        let value: Value = serde_json::from_str(line)?;
        let id = value["custom_id"].as_str().unwrap_or_default().to_owned();
        anyhow::ensure!(out.insert(id.clone(), value).is_none(), "{id} twice");
    }
    Ok(out)
}

fn request(batch_id: &str) -> HarvestRequest {
    HarvestRequest {
        batch_id: Some(batch_id.into()),
        manifest: None,
        origin: "hostile-test".into(),
        shard: None,
        delivery: None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_provider_answering_garbage_loses_nothing() -> anyhow::Result<()> {
    let stack = stack("hostile-provider").await?;
    let junk: JunkState = Arc::default();
    let base_url = serve_junk(Arc::clone(&junk)).await?;
    let mut api = BatchApiConfig::new(&base_url, SecretString::from(KEY))?;
    api.retry = quick_retries(2);
    let client = BatchClient::new(api)?;
    let config = harvest_config(&stack)?;
    let set = |f: &dyn Fn(&mut Junk)| {
        if let Ok(mut junk) = junk.lock() {
            f(&mut junk);
        }
    };

    // 1. An output file of junk: one good answer, then a line that is not JSON, bytes
    // that are not UTF-8, a JSON line that is not an output line, an endless line, and a
    // last line cut off mid-way. Every item without an answer goes round again.
    let items = manifest_for(&stack, "junk-lines", 4).await?;
    let mut file = Vec::new();
    file.extend_from_slice(answer_line("c0", 4).as_bytes());
    file.extend_from_slice(b"\nthis is not JSONL\n");
    file.extend_from_slice(&[0xff, 0xfe, 0x00, 0x9f, b'{', b'\n']);
    file.extend_from_slice(b"[1, 2, 3]\n");
    file.extend(std::iter::repeat_n(b'z', MAX_LINE_BYTES + 1024));
    file.push(b'\n');
    let cut = answer_line("c1", 3);
    file.extend_from_slice(&cut.as_bytes()[..cut.len() / 2]);
    set(&|j| {
        j.batches.insert(
            "batch_junk".into(),
            (
                200,
                completed("batch_junk", "junk-lines", Some("file_junk")),
            ),
        );
        j.files
            .insert("file_junk".into(), FileAnswer::Body(200, file.clone()));
    });
    let outcome = harvest(
        &stack.store,
        &stack.queue,
        &client,
        &config,
        &request("batch_junk"),
    )
    .await?;
    let HarvestOutcome::Harvested { counts, .. } = outcome else {
        anyhow::bail!("not harvested: {outcome:?}");
    };
    assert_eq!((counts.labelled, counts.retried, counts.failed), (1, 3, 0));
    let results = results_by_id(&stack, "batch_junk").await?;
    assert_eq!(results.len(), items.len());
    assert_eq!(results["c0"]["outcome"], "labelled");
    for id in ["c1", "c2", "c3"] {
        let reason = results[id]["reason"].as_str().unwrap_or_default();
        assert_eq!(results[id]["outcome"], "retry", "{id}");
        assert!(
            reason.contains("were not output lines") && reason.contains("bytes"),
            "{id}: {reason}"
        );
    }
    assert_eq!(
        queue_depth(&stack, &stack.resources.pending_queue_url).await?,
        3
    );

    // 2. A file longer than announced: two answers announced, the file repeats one with
    // another answer and names thousands of requests that were never made.
    manifest_for(&stack, "more-than-announced", 2).await?;
    let mut file = String::new();
    file.push_str(&answer_line("c0", 5));
    file.push('\n');
    file.push_str(&answer_line("c0", 1));
    file.push('\n');
    for i in 0..5_000 {
        file.push_str(&answer_line(&format!("stranger-{i}"), 2));
        file.push('\n');
    }
    file.push_str(&answer_line("c1", 2));
    set(&|j| {
        j.batches.insert(
            "batch_more".into(),
            (
                200,
                completed("batch_more", "more-than-announced", Some("file_more")),
            ),
        );
        j.files.insert(
            "file_more".into(),
            FileAnswer::Body(200, file.clone().into_bytes()),
        );
    });
    let outcome = harvest(
        &stack.store,
        &stack.queue,
        &client,
        &config,
        &request("batch_more"),
    )
    .await?;
    let HarvestOutcome::Harvested { counts, .. } = outcome else {
        anyhow::bail!("not harvested: {outcome:?}");
    };
    assert_eq!((counts.labelled, counts.retried, counts.failed), (2, 0, 0));
    let label: LabelRecord = read_json(&stack, "labels/more-than-announced/0.png.json").await?;
    assert_eq!(label.label["aesthetic"], 5, "the first answer counts");
    assert_eq!(list(&stack, "labels/more-than-announced/").await?.len(), 2);
    assert_eq!(results_by_id(&stack, "batch_more").await?.len(), 2);

    // 3. An output file id that points at nothing: the items go round again, saying so.
    manifest_for(&stack, "gone-file", 2).await?;
    set(&|j| {
        j.batches.insert(
            "batch_gone".into(),
            (
                200,
                completed("batch_gone", "gone-file", Some("file_nowhere")),
            ),
        );
    });
    let outcome = harvest(
        &stack.store,
        &stack.queue,
        &client,
        &config,
        &request("batch_gone"),
    )
    .await?;
    let HarvestOutcome::Harvested { counts, .. } = outcome else {
        anyhow::bail!("not harvested: {outcome:?}");
    };
    assert_eq!((counts.labelled, counts.retried), (0, 2));
    for result in results_by_id(&stack, "batch_gone").await?.values() {
        let reason = result["reason"].as_str().unwrap_or_default();
        assert!(reason.contains("has no file"), "{reason}");
    }

    // 4. Garbage for the batch itself, and a file whose transfer breaks half-way: the
    // harvest fails (to be retried), writes no record and keeps the batch open; once the
    // provider answers properly, the same batch is harvested in full.
    manifest_for(&stack, "garbage-batch", 2).await?;
    let good_file = format!("{}\n{}\n", answer_line("c0", 3), answer_line("c1", 4));
    for garbage in [
        (200, "<html><body>502 Bad Gateway</body></html>".to_owned()),
        (200, r#"{"id": "batch_garbage", "status": "#.to_owned()),
        (200, r#"{"id": "batch_garbage"}"#.to_owned()),
        (200, "null".to_owned()),
        (200, String::new()),
        (500, "{\"error\": {\"message\": \"\u{0}\u{1}\"}}".to_owned()),
    ] {
        set(&|j| {
            j.batches.insert("batch_garbage".into(), garbage.clone());
        });
        let outcome = harvest(
            &stack.store,
            &stack.queue,
            &client,
            &config,
            &request("batch_garbage"),
        )
        .await;
        assert!(outcome.is_err(), "{garbage:?} gave {outcome:?}");
        assert!(list(&stack, "labels/garbage-batch/").await?.is_empty());
    }
    set(&|j| {
        j.batches.insert(
            "batch_garbage".into(),
            (
                200,
                json!({"id": "batch_garbage", "status": "exploded"}).to_string(),
            ),
        );
    });
    let outcome = harvest(
        &stack.store,
        &stack.queue,
        &client,
        &config,
        &request("batch_garbage"),
    )
    .await?;
    assert!(
        matches!(outcome, HarvestOutcome::NotFinished { .. }),
        "an unknown status is not finished: {outcome:?}"
    );
    set(&|j| {
        j.batches.insert(
            "batch_garbage".into(),
            (
                200,
                completed("batch_garbage", "garbage-batch", Some("file_breaks")),
            ),
        );
        let half = good_file.len() / 2;
        j.files.insert(
            "file_breaks".into(),
            FileAnswer::BreaksAfter(good_file.as_bytes()[..half].to_vec()),
        );
    });
    let broken = harvest(
        &stack.store,
        &stack.queue,
        &client,
        &config,
        &request("batch_garbage"),
    )
    .await;
    assert!(broken.is_err(), "{broken:?}");
    assert!(list(&stack, "failed/").await?.is_empty());
    set(&|j| {
        j.files.insert(
            "file_breaks".into(),
            FileAnswer::Body(200, good_file.clone().into_bytes()),
        );
    });
    let outcome = harvest(
        &stack.store,
        &stack.queue,
        &client,
        &config,
        &request("batch_garbage"),
    )
    .await?;
    let HarvestOutcome::Harvested { counts, .. } = outcome else {
        anyhow::bail!("not harvested: {outcome:?}");
    };
    assert_eq!((counts.labelled, counts.retried, counts.failed), (2, 0, 0));
    assert!(list(&stack, "failed/").await?.is_empty(), "nothing failed");
    Ok(())
}
