//! Webhooks: per-batch (OPTIONS then POST, retry rules) and Standard
//! Webhooks signatures verified here, independently, per the spec.

mod common;

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context as _, bail};
use axum::body::Bytes;
use axum::http::{HeaderMap, Method, StatusCode};
use base64::Engine as _;
use batch_emulator::FaultSettings;
use common::*;
use hmac::{Hmac, Mac};
use serde_json::{Value, json};
use sha2::Sha256;

#[derive(Debug, Clone)]
struct Received {
    method: Method,
    path: String,
    headers: HeaderMap,
    body: Bytes,
    at: Instant,
}

/// A tiny receiver that records every request and answers POSTs from a
/// script of status codes (200 once the script runs out).
#[derive(Debug, Default)]
struct Receiver {
    received: Mutex<Vec<Received>>,
    post_script: Mutex<VecDeque<u16>>,
}

impl Receiver {
    async fn start(script: &[u16]) -> anyhow::Result<(String, Arc<Self>)> {
        let receiver = Arc::new(Self {
            received: Mutex::new(Vec::new()),
            post_script: Mutex::new(script.iter().copied().collect()),
        });
        let state = Arc::clone(&receiver);
        let app = axum::Router::new().fallback(
            move |method: Method, uri: axum::http::Uri, headers: HeaderMap, body: Bytes| {
                let state = Arc::clone(&state);
                async move {
                    let status = if method == Method::POST {
                        state
                            .post_script
                            .lock()
                            .expect("lock")
                            .pop_front()
                            .unwrap_or(200)
                    } else {
                        200
                    };
                    state.received.lock().expect("lock").push(Received {
                        method,
                        path: uri.path().to_owned(),
                        headers,
                        body,
                        at: Instant::now(),
                    });
                    StatusCode::from_u16(status).unwrap_or(StatusCode::OK)
                }
            },
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        tokio::spawn(async move { axum::serve(listener, app).await });
        Ok((format!("http://{addr}"), receiver))
    }

    fn received(&self) -> Vec<Received> {
        self.received.lock().expect("lock").clone()
    }

    fn posts(&self) -> Vec<Received> {
        self.received()
            .into_iter()
            .filter(|r| r.method == Method::POST)
            .collect()
    }

    /// Waits until at least `n` requests arrived.
    async fn wait_for(&self, n: usize) -> anyhow::Result<Vec<Received>> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let got = self.received();
            if got.len() >= n {
                return Ok(got);
            }
            if Instant::now() > deadline {
                bail!("only {} of {n} webhook requests arrived", got.len());
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}

fn header<'a>(r: &'a Received, name: &str) -> anyhow::Result<&'a str> {
    r.headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .with_context(|| format!("header {name}"))
}

/// Standard Webhooks v1 verification, written from the spec.
fn verify(secret: &str, headers: &HeaderMap, body: &[u8]) -> anyhow::Result<()> {
    let get = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .with_context(|| format!("missing {name}"))
    };
    let msg_id = get("webhook-id")?;
    let timestamp = get("webhook-timestamp")?;
    let signatures = get("webhook-signature")?;
    let ts: i64 = timestamp.parse()?;
    let now = SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs() as i64;
    if (now - ts).abs() > 300 {
        bail!("timestamp {ts} too far from {now}");
    }
    let key = base64::engine::general_purpose::STANDARD
        .decode(secret.strip_prefix("whsec_").context("whsec_ prefix")?)?;
    let mut mac = Hmac::<Sha256>::new_from_slice(&key)?;
    mac.update(format!("{msg_id}.{timestamp}.").as_bytes());
    mac.update(body);
    let expected = mac.finalize().into_bytes();
    for entry in signatures.split(' ') {
        let Some(sig) = entry.strip_prefix("v1,") else {
            continue;
        };
        let Ok(sig) = base64::engine::general_purpose::STANDARD.decode(sig) else {
            continue;
        };
        // Lengths first, then a constant-time comparison.
        if sig.len() == expected.len()
            && sig
                .iter()
                .zip(expected.iter())
                .fold(0u8, |acc, (a, b)| acc | (a ^ b))
                == 0
        {
            return Ok(());
        }
    }
    bail!("no matching signature")
}

fn secret(byte: u8) -> String {
    format!(
        "whsec_{}",
        base64::engine::general_purpose::STANDARD.encode([byte; 24])
    )
}

#[tokio::test]
async fn per_batch_webhook_sends_options_then_post() -> anyhow::Result<()> {
    let (url, receiver) = Receiver::start(&[]).await?;
    let (_emulator, api) = start(fast_config()).await?;
    let file_id = api
        .upload(jsonl(&tiny_requests(2, &landing_schema())))
        .await?;
    let hook = format!("{url}/hooks/token-abc");
    let created = api
        .create_batch(&file_id, json!({"webhook_url": hook}))
        .await?;
    let id = created["id"].as_str().context("id")?;
    assert!(
        created.get("webhook_url").is_none_or(Value::is_null),
        "the URL holds a token"
    );
    let got = receiver.wait_for(2).await?;
    assert_eq!(got[0].method, Method::OPTIONS);
    assert_eq!(got[1].method, Method::POST);
    assert_eq!(got[1].path, "/hooks/token-abc");
    assert_eq!(header(&got[1], "x-inference-event")?, "batch.completed");
    assert!(!header(&got[1], "x-inference-webhook-id")?.is_empty());
    let body: Value = serde_json::from_slice(&got[1].body)?;
    assert_eq!(body["batch_id"], id);
    // Sent on completion, without anyone polling.
    assert_eq!(api.batch(id).await?["status"], "completed");
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(receiver.received().len(), 2, "exactly one delivery");
    Ok(())
}

#[tokio::test]
async fn per_batch_webhook_retries_5xx_but_not_4xx() -> anyhow::Result<()> {
    // Two 500s, then success: three POSTs carrying one delivery id.
    let (url, receiver) = Receiver::start(&[500, 503]).await?;
    let (emulator, api) = start(fast_config()).await?;
    let file_id = api
        .upload(jsonl(&tiny_requests(1, &landing_schema())))
        .await?;
    api.create_batch(&file_id, json!({"webhook_url": format!("{url}/h")}))
        .await?;
    receiver.wait_for(4).await?;
    let posts = receiver.posts();
    assert_eq!(posts.len(), 3);
    let ids: Vec<_> = posts
        .iter()
        .map(|p| header(p, "x-inference-webhook-id").map(str::to_owned))
        .collect::<anyhow::Result<_>>()?;
    assert!(ids.iter().all(|i| *i == ids[0]));
    // Backoff doubles: 10 ms then 20 ms.
    assert!(posts[2].at - posts[1].at >= Duration::from_millis(15));
    // The receiver records before it answers: give the emulator a moment to count.
    let deadline = Instant::now() + Duration::from_secs(5);
    while emulator.stats().webhooks.sent == 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let stats = emulator.stats();
    assert_eq!(stats.webhooks.sent, 1);
    assert_eq!(stats.webhooks.retries, 2);

    // A 400 is final.
    let (url, receiver) = Receiver::start(&[400, 200]).await?;
    emulator.reset_stats();
    let file_id = api
        .upload(jsonl(&tiny_requests(1, &landing_schema())))
        .await?;
    api.create_batch(&file_id, json!({"webhook_url": format!("{url}/h")}))
        .await?;
    receiver.wait_for(2).await?;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(receiver.posts().len(), 1, "no retry after a 4xx");
    let stats = emulator.stats();
    assert_eq!(stats.webhooks.failed, 1);
    assert_eq!(stats.webhooks.sent, 0);
    Ok(())
}

#[tokio::test]
async fn webhook_retries_connection_errors_then_gives_up() -> anyhow::Result<()> {
    // Bind then drop to get a port nobody listens on.
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let (emulator, api) = start(fast_config()).await?;
    let file_id = api
        .upload(jsonl(&tiny_requests(1, &landing_schema())))
        .await?;
    api.create_batch(
        &file_id,
        json!({"webhook_url": format!("http://127.0.0.1:{port}/h")}),
    )
    .await?;
    let deadline = Instant::now() + Duration::from_secs(10);
    while emulator.stats().webhooks.failed == 0 {
        assert!(Instant::now() < deadline, "delivery never gave up");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let stats = emulator.stats();
    assert_eq!(
        stats.webhooks.attempts, 4,
        "first attempt plus three retries"
    );
    assert_eq!(stats.webhooks.retries, 3);
    Ok(())
}

#[tokio::test]
async fn standard_webhooks_signature_verifies() -> anyhow::Result<()> {
    let (url, receiver) = Receiver::start(&[]).await?;
    let key = secret(7);
    let config = fast_config().with_webhook(format!("{url}/openai"), vec![key.clone()]);
    let (_emulator, api) = start(config).await?;
    let batch = api.run_batch(&tiny_requests(2, &landing_schema())).await?;
    let got = receiver.wait_for(1).await?;
    assert_eq!(got.len(), 1);
    let delivery = &got[0];
    assert_eq!(
        delivery.method,
        Method::POST,
        "no OPTIONS probe for Standard Webhooks"
    );
    verify(&key, &delivery.headers, &delivery.body)?;

    let event: Value = serde_json::from_slice(&delivery.body)?;
    assert_eq!(event["object"], "event");
    assert_eq!(event["type"], "batch.completed");
    assert_eq!(event["data"], json!({"id": batch["id"]}));
    assert!(event["id"].as_str().is_some_and(|s| s.starts_with("evt_")));
    assert!(event["created_at"].as_i64().is_some());

    // Tampering, a wrong key, or a bare "v1," must fail.
    let mut tampered = delivery.body.to_vec();
    tampered.extend_from_slice(b" ");
    assert!(verify(&key, &delivery.headers, &tampered).is_err());
    assert!(verify(&secret(8), &delivery.headers, &delivery.body).is_err());
    let mut bare = delivery.headers.clone();
    bare.insert("webhook-signature", "v1,".parse()?);
    assert!(verify(&key, &bare, &delivery.body).is_err());
    Ok(())
}

#[tokio::test]
async fn rotated_secrets_sign_twice() -> anyhow::Result<()> {
    let (url, receiver) = Receiver::start(&[]).await?;
    let (old, new) = (secret(1), secret(2));
    let config = fast_config().with_webhook(url, vec![old.clone(), new.clone()]);
    let (_emulator, api) = start(config).await?;
    api.run_batch(&tiny_requests(1, &landing_schema())).await?;
    let got = receiver.wait_for(1).await?;
    let signatures = header(&got[0], "webhook-signature")?;
    assert_eq!(
        signatures
            .split(' ')
            .filter(|s| s.starts_with("v1,"))
            .count(),
        2
    );
    verify(&old, &got[0].headers, &got[0].body)?;
    verify(&new, &got[0].headers, &got[0].body)?;
    Ok(())
}

#[tokio::test]
async fn terminal_events_for_failed_expired_and_cancelled() -> anyhow::Result<()> {
    let (url, receiver) = Receiver::start(&[]).await?;
    let key = secret(3);
    let config = fast_config()
        .with_delays(10, 300, 10)
        .with_webhook(url, vec![key.clone()]);
    let (emulator, api) = start(config).await?;

    let mut bad = tiny_requests(2, &landing_schema());
    bad[1]["custom_id"] = json!("req-0");
    let failed = api.run_batch(&bad).await?;
    assert_eq!(failed["status"], "failed");

    let file_id = api
        .upload(jsonl(&tiny_requests(4, &landing_schema())))
        .await?;
    let created = api.create_batch(&file_id, json!({})).await?;
    let cancel_id = created["id"].as_str().context("id")?.to_owned();
    api.cancel(&cancel_id).await?;
    assert_eq!(api.wait(&cancel_id).await?["status"], "cancelled");

    emulator.set_faults(FaultSettings {
        expire: 1.0,
        ..Default::default()
    })?;
    let expired = api.run_batch(&tiny_requests(2, &landing_schema())).await?;
    assert_eq!(expired["status"], "expired");

    let got = receiver.wait_for(3).await?;
    let mut events: Vec<(String, String)> = Vec::new();
    for delivery in &got {
        verify(&key, &delivery.headers, &delivery.body)?;
        let event: Value = serde_json::from_slice(&delivery.body)?;
        events.push((
            event["type"].as_str().unwrap_or_default().to_owned(),
            event["data"]["id"].as_str().unwrap_or_default().to_owned(),
        ));
    }
    events.sort();
    let mut expected = vec![
        ("batch.cancelled".to_owned(), cancel_id),
        (
            "batch.expired".to_owned(),
            expired["id"].as_str().unwrap_or_default().to_owned(),
        ),
        (
            "batch.failed".to_owned(),
            failed["id"].as_str().unwrap_or_default().to_owned(),
        ),
    ];
    expected.sort();
    assert_eq!(events, expected);
    Ok(())
}

#[tokio::test]
async fn webhook_drop_duplicate_delay_and_reorder_faults() -> anyhow::Result<()> {
    let (url, receiver) = Receiver::start(&[]).await?;
    let key = secret(4);
    let config = fast_config().with_webhook(url.clone(), vec![key.clone()]);
    let (emulator, api) = start(config).await?;

    // Dropped: the batch completes, nothing arrives.
    emulator.set_faults(FaultSettings {
        webhook_drop: 1.0,
        ..Default::default()
    })?;
    api.run_batch(&tiny_requests(1, &landing_schema())).await?;
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(receiver.received().is_empty());
    assert_eq!(emulator.stats().webhooks.dropped, 1);
    assert_eq!(emulator.stats().faults["webhook_drop"], 1);

    // Duplicated: the same delivery (same webhook-id) twice, both valid.
    emulator.set_faults(FaultSettings {
        webhook_duplicate: 1.0,
        ..Default::default()
    })?;
    api.run_batch(&tiny_requests(1, &landing_schema())).await?;
    let got = receiver.wait_for(2).await?;
    assert_eq!(
        header(&got[0], "webhook-id")?,
        header(&got[1], "webhook-id")?
    );
    assert_eq!(got[0].body, got[1].body);
    for delivery in &got {
        verify(&key, &delivery.headers, &delivery.body)?;
    }
    assert_eq!(emulator.stats().webhooks.duplicated, 1);

    // Delayed: nothing for the first 200 ms after completion.
    emulator.set_faults(FaultSettings {
        webhook_delay_ms: 250,
        ..Default::default()
    })?;
    let before = receiver.received().len();
    let batch = api.run_batch(&tiny_requests(1, &landing_schema())).await?;
    let seen_completed = Instant::now();
    assert_eq!(batch["status"], "completed");
    let got = receiver.wait_for(before + 1).await?;
    assert!(got[before].at - seen_completed >= Duration::from_millis(200));

    // Reordered: deliveries still arrive, each with its own random delay.
    emulator.set_faults(FaultSettings {
        webhook_reorder: true,
        ..Default::default()
    })?;
    let before = receiver.received().len();
    for _ in 0..3 {
        let file_id = api
            .upload(jsonl(&tiny_requests(1, &landing_schema())))
            .await?;
        api.create_batch(&file_id, json!({})).await?;
    }
    receiver.wait_for(before + 3).await?;
    assert_eq!(emulator.stats().faults["webhook_reorder"], 3);
    Ok(())
}
