//! The batch-API client against a scripted HTTP server: retry rules, `Retry-After`,
//! streamed uploads, and the API key kept out of errors.
//!
//! The emulator-driven tests (real batches, injected 429/500) are in `tests/`.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::{DefaultBodyLimit, Multipart, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use futures_util::TryStreamExt;
use secrecy::SecretString;
use shotlabel_batch_client::{BatchApiConfig, BatchClient, RetryPolicy};
use shotlabel_core::batch_api::{BatchApiError, BatchStatus, CreateBatchRequest};
use tokio::io::AsyncBufReadExt;

const KEY: &str = "sk-test-0123456789abcdef";

/// One scripted answer: status, extra headers, body.
#[derive(Clone)]
struct Scripted {
    status: u16,
    headers: Vec<(&'static str, String)>,
    body: String,
    delay: Duration,
}

fn answer(status: u16, body: &str) -> Scripted {
    Scripted {
        status,
        headers: Vec::new(),
        body: body.to_owned(),
        delay: Duration::ZERO,
    }
}

#[derive(Default)]
struct Script {
    answers: Mutex<VecDeque<Scripted>>,
    seen: Mutex<Vec<Seen>>,
}

#[derive(Debug, Clone)]
struct Seen {
    authorization: Option<String>,
    upload: Option<(String, String, Vec<u8>)>,
}

type Shared = Arc<Script>;

async fn reply(script: &Script) -> Response {
    let next = script.answers.lock().ok().and_then(|mut a| a.pop_front());
    let Some(next) = next else {
        return (StatusCode::INTERNAL_SERVER_ERROR, "script exhausted").into_response();
    };
    tokio::time::sleep(next.delay).await;
    let mut response = (
        StatusCode::from_u16(next.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
        next.body,
    )
        .into_response();
    for (name, value) in next.headers {
        if let Ok(value) = value.parse() {
            response.headers_mut().insert(name, value);
        }
    }
    response
}

fn record(script: &Script, headers: &HeaderMap, upload: Option<(String, String, Vec<u8>)>) {
    if let Ok(mut seen) = script.seen.lock() {
        seen.push(Seen {
            authorization: headers
                .get("authorization")
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned),
            upload,
        });
    }
}

async fn any_call(State(script): State<Shared>, headers: HeaderMap) -> Response {
    record(&script, &headers, None);
    reply(&script).await
}

async fn upload(State(script): State<Shared>, headers: HeaderMap, mut form: Multipart) -> Response {
    let mut purpose = String::new();
    let mut filename = String::new();
    let mut content = Vec::new();
    while let Ok(Some(field)) = form.next_field().await {
        match field.name() {
            Some("purpose") => purpose = field.text().await.unwrap_or_default(),
            Some("file") => {
                filename = field.file_name().unwrap_or_default().to_owned();
                content = field.bytes().await.map(|b| b.to_vec()).unwrap_or_default();
            }
            _ => {}
        }
    }
    record(&script, &headers, Some((purpose, filename, content)));
    reply(&script).await
}

async fn serve(answers: Vec<Scripted>) -> anyhow::Result<(String, Shared)> {
    let script: Shared = Arc::new(Script {
        answers: Mutex::new(answers.into()),
        seen: Mutex::new(Vec::new()),
    });
    let app = Router::new()
        .route("/v1/files", post(upload))
        .route("/v1/files/{id}/content", get(any_call))
        .route("/v1/batches", post(any_call))
        .route("/v1/batches/{id}", get(any_call))
        .route("/v1/batches/{id}/cancel", post(any_call))
        .layer(DefaultBodyLimit::disable())
        .with_state(script.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let base = format!("http://{}/v1", listener.local_addr()?);
    tokio::spawn(async move { axum::serve(listener, app).await });
    Ok((base, script))
}

fn client(base: &str, retry: RetryPolicy) -> anyhow::Result<BatchClient> {
    let mut config = BatchApiConfig::new(base, SecretString::from(KEY))?;
    config.retry = retry;
    config.read_timeout = Duration::from_millis(500);
    Ok(BatchClient::new(config)?)
}

fn fast_retries(max_attempts: u32) -> RetryPolicy {
    RetryPolicy {
        max_attempts,
        initial_backoff: Duration::from_millis(5),
        max_backoff: Duration::from_millis(20),
        max_retry_after: Duration::from_secs(2),
    }
}

const BATCH: &str =
    r#"{"id":"batch_1","object":"batch","status":"in_progress","input_file_id":"file-1"}"#;

fn calls(script: &Script) -> Vec<Seen> {
    script.seen.lock().map(|s| s.clone()).unwrap_or_default()
}

#[tokio::test]
async fn retries_429_and_5xx_then_succeeds_with_the_key_as_bearer() -> anyhow::Result<()> {
    let (base, script) = serve(vec![
        answer(429, r#"{"error":{"message":"Rate limit reached"}}"#),
        answer(500, "oops"),
        answer(503, ""),
        answer(200, BATCH),
    ])
    .await?;
    let batch = client(&base, fast_retries(5))?
        .retrieve_batch("batch_1")
        .await?;
    assert_eq!(batch.id, "batch_1");
    assert_eq!(batch.status, BatchStatus::InProgress);
    let seen = calls(&script);
    assert_eq!(seen.len(), 4);
    for call in seen {
        assert_eq!(
            call.authorization.as_deref(),
            Some(&*format!("Bearer {KEY}"))
        );
    }
    Ok(())
}

#[tokio::test]
async fn other_4xx_are_not_retried() -> anyhow::Result<()> {
    for status in [400, 401, 404, 409, 422] {
        let (base, script) = serve(vec![
            answer(
                status,
                r#"{"error":{"message":"nope","type":"invalid_request_error"}}"#,
            ),
            answer(200, BATCH),
        ])
        .await?;
        let err = client(&base, fast_retries(5))?
            .create_batch(&CreateBatchRequest::chat_completions("file-1"))
            .await
            .expect_err("a 4xx fails");
        assert_eq!(err.status(), Some(status));
        assert!(!err.is_transient());
        assert!(err.to_string().contains("nope"), "{err}");
        assert!(err.to_string().contains("create batch"), "{err}");
        assert_eq!(calls(&script).len(), 1, "HTTP {status} must not be retried");
    }
    Ok(())
}

#[tokio::test]
async fn gives_up_after_max_attempts() -> anyhow::Result<()> {
    let (base, script) = serve(vec![answer(500, "down"); 10]).await?;
    let err = client(&base, fast_retries(3))?
        .retrieve_batch("b")
        .await
        .expect_err("always 500");
    assert_eq!(err.status(), Some(500));
    assert!(err.is_transient());
    assert_eq!(calls(&script).len(), 3);
    Ok(())
}

#[tokio::test]
async fn honours_retry_after() -> anyhow::Result<()> {
    let mut limited = answer(429, "slow down");
    limited.headers.push(("retry-after", "1".into()));
    let (base, script) = serve(vec![limited, answer(200, BATCH)]).await?;
    // Backoff alone would wait at most 20 ms; Retry-After asks for a second.
    let started = Instant::now();
    client(&base, fast_retries(3))?.retrieve_batch("b").await?;
    assert!(
        started.elapsed() >= Duration::from_millis(950),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(calls(&script).len(), 2);

    let mut limited = answer(429, "slow down");
    limited.headers.push(("retry-after-ms", "300".into()));
    limited.headers.push(("retry-after", "30".into()));
    let (base, _) = serve(vec![limited, answer(200, BATCH)]).await?;
    let started = Instant::now();
    client(&base, fast_retries(3))?.retrieve_batch("b").await?;
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(290) && waited < Duration::from_secs(5),
        "retry-after-ms wins over retry-after: {waited:?}"
    );
    Ok(())
}

#[tokio::test]
async fn retry_after_is_capped() -> anyhow::Result<()> {
    let mut limited = answer(429, "come back tomorrow");
    limited.headers.push(("retry-after", "86400".into()));
    let (base, _) = serve(vec![limited, answer(200, BATCH)]).await?;
    let mut policy = fast_retries(2);
    policy.max_retry_after = Duration::from_millis(100);
    let started = Instant::now();
    client(&base, policy)?.retrieve_batch("b").await?;
    assert!(started.elapsed() < Duration::from_secs(5));
    Ok(())
}

#[tokio::test]
async fn timeouts_are_retried() -> anyhow::Result<()> {
    let mut slow = answer(200, BATCH);
    slow.delay = Duration::from_secs(2);
    let (base, script) = serve(vec![slow, answer(200, BATCH)]).await?;
    let batch = client(&base, fast_retries(3))?.retrieve_batch("b").await?;
    assert_eq!(batch.id, "batch_1");
    assert_eq!(calls(&script).len(), 2);

    let mut slow = answer(200, BATCH);
    slow.delay = Duration::from_secs(2);
    let (base, _) = serve(vec![slow]).await?;
    let err = client(&base, RetryPolicy::none())?
        .retrieve_batch("b")
        .await
        .expect_err("timed out");
    assert!(matches!(err, BatchApiError::Transport { .. }), "{err:?}");
    assert!(err.to_string().contains("timed out"), "{err}");
    Ok(())
}

#[tokio::test]
async fn connection_refused_is_a_transport_error_after_retries() -> anyhow::Result<()> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    let port = listener.local_addr()?.port();
    drop(listener);
    let err = client(&format!("http://127.0.0.1:{port}/v1"), fast_retries(2))?
        .retrieve_batch("b")
        .await
        .expect_err("nothing listens");
    assert!(matches!(err, BatchApiError::Transport { .. }), "{err:?}");
    assert!(err.is_transient());
    Ok(())
}

#[tokio::test]
async fn the_key_never_appears_in_errors_or_debug_output() -> anyhow::Result<()> {
    let echoed = format!(r#"{{"error":{{"message":"Incorrect API key provided: {KEY}"}}}}"#);
    let (base, _) = serve(vec![answer(401, &echoed)]).await?;
    let client = client(&base, fast_retries(3))?;
    let err = client.retrieve_batch("b").await.expect_err("401");
    for text in [err.to_string(), format!("{err:?}"), format!("{client:?}")] {
        assert!(!text.contains(KEY), "key leaked: {text}");
    }
    assert!(err.to_string().contains("[redacted]"), "{err}");

    let garbage = format!("not json but has the key {KEY}");
    let (base, _) = serve(vec![answer(200, &garbage)]).await?;
    let err = self::client(&base, fast_retries(1))?
        .retrieve_batch("b")
        .await
        .expect_err("undecodable");
    assert!(matches!(err, BatchApiError::Decode { .. }), "{err:?}");
    assert!(!err.to_string().contains(KEY), "{err}");
    Ok(())
}

#[tokio::test]
async fn upload_streams_the_file_as_multipart_purpose_batch() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("requests.jsonl");
    // Large enough to span many read chunks.
    let line = format!("{{\"custom_id\":\"x\",\"pad\":\"{}\"}}\n", "a".repeat(1000));
    let content = line.repeat(3000);
    std::fs::write(&path, &content)?;
    let file_answer = r#"{"id":"file-xyz","object":"file","bytes":3000,"purpose":"batch","filename":"requests.jsonl"}"#;
    // The first attempt fails, so the body must be rebuilt from disk for the second.
    let (base, script) = serve(vec![answer(502, "bad gateway"), answer(200, file_answer)]).await?;
    let file = client(&base, fast_retries(3))?.upload_file(&path).await?;
    assert_eq!(file.id, "file-xyz");
    let seen = calls(&script);
    assert_eq!(seen.len(), 2);
    for call in seen {
        let (purpose, filename, bytes) = call.upload.expect("an upload");
        assert_eq!(purpose, "batch");
        assert_eq!(filename, "requests.jsonl");
        assert_eq!(bytes.len(), content.len());
        assert!(bytes == content.as_bytes());
    }
    Ok(())
}

#[tokio::test]
async fn a_missing_upload_file_is_a_clear_error() -> anyhow::Result<()> {
    let (base, script) = serve(vec![]).await?;
    let err = client(&base, fast_retries(3))?
        .upload_file(std::path::Path::new("/nonexistent/requests.jsonl"))
        .await
        .expect_err("no such file");
    assert!(err.to_string().contains("requests.jsonl"), "{err}");
    assert!(calls(&script).is_empty());
    Ok(())
}

#[tokio::test]
async fn file_content_streams_lines() -> anyhow::Result<()> {
    let body: String = (0..5000)
        .map(|i| format!("{{\"custom_id\":\"c{i}\"}}\n"))
        .collect();
    let (base, _) = serve(vec![answer(200, &body)]).await?;
    let client = client(&base, fast_retries(1))?;
    let mut lines = client.file_reader("file-out").await?.lines();
    let mut count = 0;
    while let Some(line) = lines.next_line().await? {
        assert_eq!(line, format!("{{\"custom_id\":\"c{count}\"}}"));
        count += 1;
    }
    assert_eq!(count, 5000);

    let (base, _) = serve(vec![answer(200, "abc")]).await?;
    let chunks: Vec<_> = self::client(&base, fast_retries(1))?
        .file_content("f")
        .await?
        .try_collect()
        .await?;
    assert_eq!(chunks.concat(), b"abc");
    Ok(())
}

#[tokio::test]
async fn cancel_posts_to_the_cancel_route() -> anyhow::Result<()> {
    let cancelling = r#"{"id":"batch_1","status":"cancelling"}"#;
    let (base, script) = serve(vec![answer(200, cancelling)]).await?;
    let batch = client(&base, fast_retries(1))?
        .cancel_batch("batch_1")
        .await?;
    assert_eq!(batch.status, BatchStatus::Cancelling);
    assert_eq!(calls(&script).len(), 1);
    Ok(())
}
