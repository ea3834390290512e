//! The webhook function's handling of real event JSON: Function URL requests (signed,
//! per-batch, base64, OPTIONS) and harvest-queue SQS events, against in-memory fakes.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use serde_json::{Value, json};
use shotlabel_shared::SecretString;
use shotlabel_shared::batch_api::{Batch, BatchApiError, CreateBatchRequest, FileObject};
use shotlabel_shared::harvest::HarvestConfig;
use shotlabel_shared::ports::{
    BatchProvider, LineReader, ObjectInfo, ObjectStore, OutgoingMessage, Queue, QueueError,
    ReceivedMessage, StoreError, StoredObject, WriteCondition,
};
use shotlabel_shared::records::{HarvestRequest, Layout};
use shotlabel_shared::standard_webhooks::WebhookSecrets;
use shotlabel_shared::task::Task;
use shotlabel_shared::webhook::WebhookConfig;
use webhook::{
    ConfigError, EventSource, Handler, WebhookMode, apply_webhook_auth, event_source, handle,
    handle_at,
};

/// The secrets the fixtures were made with (see `tests/fixtures/`).
const FIXTURE_WHSEC: &str = "whsec_d2ViaG9vayBmaXh0dXJlIGtleSwgMzIgYnl0ZXMhISE=";
const FIXTURE_PER_BATCH_SECRET: &str = "per-batch fixture secret, long enough";
/// `webhook-timestamp` of the signed fixture.
const FIXTURE_TIME: i64 = 1_750_000_000;
const FIXTURE_BATCH: &str = "batch_6851b8a0e2d88190b8f1a2c3d4e5f607";
const FIXTURE_MANIFEST: &str = "sqf3k2ab7x9c1d-0";
const FIXTURE_PER_BATCH_ID: &str = "0f8e7d6c-5b4a-4392-8170-6f5e4d3c2b1a";

const BUCKET: &str = "bucket";
const HARVEST_QUEUE: &str = "http://queue/harvest";

fn load(name: &str) -> anyhow::Result<Value> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name);
    Ok(serde_json::from_str(&std::fs::read_to_string(path)?)?)
}

// ---------------------------------------------------------------------------------------
// Fakes.

#[derive(Default)]
struct MemStore {
    objects: Mutex<HashMap<String, Vec<u8>>>,
}

fn store_error<E: std::fmt::Display>(e: E) -> StoreError {
    StoreError::Other(e.to_string())
}

impl ObjectStore for MemStore {
    async fn get(&self, bucket: &str, key: &str) -> Result<StoredObject, StoreError> {
        let objects = self.objects.lock().map_err(store_error)?;
        objects
            .get(key)
            .map(|body| StoredObject {
                body: body.clone(),
                etag: "etag".into(),
            })
            .ok_or_else(|| StoreError::NotFound {
                bucket: bucket.into(),
                key: key.into(),
            })
    }

    async fn head(&self, _: &str, key: &str) -> Result<Option<ObjectInfo>, StoreError> {
        let objects = self.objects.lock().map_err(store_error)?;
        Ok(objects.get(key).map(|body| ObjectInfo {
            size: body.len() as u64,
            etag: "etag".into(),
        }))
    }

    async fn put(
        &self,
        bucket: &str,
        key: &str,
        body: Vec<u8>,
        _: &str,
        condition: WriteCondition,
    ) -> Result<String, StoreError> {
        let mut objects = self.objects.lock().map_err(store_error)?;
        if condition == WriteCondition::IfAbsent && objects.contains_key(key) {
            return Err(StoreError::ConditionFailed {
                bucket: bucket.into(),
                key: key.into(),
            });
        }
        objects.insert(key.to_owned(), body);
        Ok("etag".into())
    }

    async fn delete(&self, _: &str, key: &str) -> Result<(), StoreError> {
        self.objects.lock().map_err(store_error)?.remove(key);
        Ok(())
    }

    async fn list(&self, _: &str, prefix: &str) -> Result<Vec<String>, StoreError> {
        let objects = self.objects.lock().map_err(store_error)?;
        let mut keys: Vec<String> = objects
            .keys()
            .filter(|k| k.starts_with(prefix))
            .cloned()
            .collect();
        keys.sort();
        Ok(keys)
    }
}

#[derive(Default)]
struct MemQueue {
    sent: Mutex<Vec<(String, String)>>,
}

impl MemQueue {
    fn harvest_requests(&self) -> Vec<HarvestRequest> {
        self.sent
            .lock()
            .map(|sent| {
                sent.iter()
                    .filter(|(url, _)| url == HARVEST_QUEUE)
                    .filter_map(|(_, body)| serde_json::from_str(body).ok())
                    .collect()
            })
            .unwrap_or_default()
    }
}

impl Queue for MemQueue {
    async fn send_batch(
        &self,
        queue_url: &str,
        messages: &[OutgoingMessage],
    ) -> Result<Vec<String>, QueueError> {
        let mut sent = self
            .sent
            .lock()
            .map_err(|e| QueueError::Other(e.to_string()))?;
        sent.extend(
            messages
                .iter()
                .map(|m| (queue_url.to_owned(), m.body.clone())),
        );
        Ok(Vec::new())
    }

    async fn receive(
        &self,
        _: &str,
        _: u32,
        _: Duration,
        _: Duration,
    ) -> Result<Vec<ReceivedMessage>, QueueError> {
        Ok(Vec::new())
    }

    async fn delete_batch(&self, _: &str, _: &[String]) -> Result<Vec<String>, QueueError> {
        Ok(Vec::new())
    }
}

/// A provider that is down: every call fails as a 503 would.
struct DownProvider;

fn unavailable(operation: &'static str) -> BatchApiError {
    BatchApiError::Status {
        operation,
        status: 503,
        message: "the fake provider is down".into(),
    }
}

impl BatchProvider for DownProvider {
    async fn upload(&self, _: &Path) -> Result<FileObject, BatchApiError> {
        Err(unavailable("upload"))
    }
    async fn create(&self, _: &CreateBatchRequest) -> Result<Batch, BatchApiError> {
        Err(unavailable("create batch"))
    }
    async fn retrieve(&self, _: &str) -> Result<Batch, BatchApiError> {
        Err(unavailable("retrieve batch"))
    }
    async fn open_file(&self, _: &str) -> Result<LineReader, BatchApiError> {
        Err(unavailable("open file"))
    }
}

fn handler(
    standard: Option<&str>,
    per_batch: Option<&str>,
) -> anyhow::Result<Handler<MemStore, MemQueue, DownProvider>> {
    let mut config = WebhookConfig::new(BUCKET, HARVEST_QUEUE);
    config.standard = standard.map(WebhookSecrets::parse).transpose()?;
    config.per_batch_secret = per_batch.map(SecretString::from);
    Ok(Handler {
        store: MemStore::default(),
        queue: MemQueue::default(),
        provider: DownProvider,
        webhook: config,
        harvest: HarvestConfig {
            bucket: BUCKET.into(),
            layout: Layout::new("incoming/"),
            pending_queue_url: "http://queue/pending".into(),
            task: Arc::new(Task::default_task()?),
            max_retries: 3,
        },
    })
}

fn both_modes() -> anyhow::Result<Handler<MemStore, MemQueue, DownProvider>> {
    handler(Some(FIXTURE_WHSEC), Some(FIXTURE_PER_BATCH_SECRET))
}

/// [`handle`], its boxed error made an `anyhow` one.
async fn call(
    h: &Handler<MemStore, MemQueue, DownProvider>,
    event: Value,
) -> anyhow::Result<Value> {
    handle(h, event).await.map_err(|e| anyhow::anyhow!("{e}"))
}

/// [`handle_at`], its boxed error made an `anyhow` one.
async fn call_at(
    h: &Handler<MemStore, MemQueue, DownProvider>,
    event: Value,
    now_unix: i64,
) -> anyhow::Result<Value> {
    handle_at(h, event, now_unix)
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))
}

fn status(response: &Value) -> i64 {
    response["statusCode"].as_i64().unwrap_or_default()
}

fn body(response: &Value) -> Value {
    response["body"]
        .as_str()
        .and_then(|b| serde_json::from_str(b).ok())
        .unwrap_or(Value::Null)
}

// ---------------------------------------------------------------------------------------
// Function URL requests.

#[tokio::test]
async fn a_signed_function_url_post_queues_a_harvest() -> anyhow::Result<()> {
    let h = both_modes()?;
    let response = call_at(&h, load("function-url-post.json")?, FIXTURE_TIME).await?;
    assert_eq!(status(&response), 200, "{response}");
    assert_eq!(body(&response), json!({ "accepted": true }));
    assert_eq!(response["headers"]["content-type"], "application/json");
    assert_eq!(response["isBase64Encoded"], false);
    assert_eq!(
        h.queue.harvest_requests(),
        vec![HarvestRequest {
            batch_id: Some(FIXTURE_BATCH.into()),
            manifest: None,
            origin: "webhook".into(),
        }]
    );

    // The provider's retry of the same delivery.
    let again = call_at(&h, load("function-url-post.json")?, FIXTURE_TIME + 60).await?;
    assert_eq!(status(&again), 200);
    assert_eq!(body(&again)["duplicate"], true);
    assert_eq!(h.queue.harvest_requests().len(), 1);
    Ok(())
}

#[tokio::test]
async fn handle_uses_the_real_clock() -> anyhow::Result<()> {
    // The fixture was signed in 2025: far outside the window today.
    let h = both_modes()?;
    let response = call(&h, load("function-url-post.json")?).await?;
    assert_eq!(status(&response), 401);
    assert!(h.queue.harvest_requests().is_empty());
    Ok(())
}

#[tokio::test]
async fn a_tampered_body_gets_401() -> anyhow::Result<()> {
    let h = both_modes()?;
    let mut event = load("function-url-post.json")?;
    let tampered = event["body"]
        .as_str()
        .unwrap_or_default()
        .replace(FIXTURE_BATCH, "batch_someone_elses");
    event["body"] = Value::String(tampered);
    let response = call_at(&h, event, FIXTURE_TIME).await?;
    assert_eq!(status(&response), 401);
    assert_eq!(body(&response), json!({ "error": "unauthorized" }));
    assert!(h.queue.harvest_requests().is_empty());
    Ok(())
}

#[tokio::test]
async fn a_base64_body_is_verified_on_its_decoded_bytes() -> anyhow::Result<()> {
    let h = both_modes()?;
    let mut event = load("function-url-post.json")?;
    let raw = event["body"].as_str().unwrap_or_default().to_owned();
    event["body"] = Value::String(STANDARD.encode(raw));
    event["isBase64Encoded"] = Value::Bool(true);
    let response = call_at(&h, event, FIXTURE_TIME).await?;
    assert_eq!(status(&response), 200, "{response}");

    let mut broken = load("function-url-post.json")?;
    broken["body"] = Value::String("not base64!".into());
    broken["isBase64Encoded"] = Value::Bool(true);
    assert_eq!(status(&call_at(&h, broken, FIXTURE_TIME).await?), 400);
    Ok(())
}

#[tokio::test]
async fn a_per_batch_url_post_queues_the_manifest() -> anyhow::Result<()> {
    let h = both_modes()?;
    // This fixture's body is base64-encoded, as Function URLs may hand it over.
    let response = call(&h, load("function-url-per-batch.json")?).await?;
    assert_eq!(status(&response), 200, "{response}");
    assert_eq!(
        h.queue.harvest_requests(),
        vec![HarvestRequest {
            batch_id: Some(FIXTURE_PER_BATCH_ID.into()),
            manifest: Some(FIXTURE_MANIFEST.into()),
            origin: "webhook".into(),
        }]
    );

    // Another manifest with this manifest's token.
    let mut forged = load("function-url-per-batch.json")?;
    let query = forged["rawQueryString"]
        .as_str()
        .unwrap_or_default()
        .replace(FIXTURE_MANIFEST, "sqf3k2ab7x9c1d-1");
    forged["rawQueryString"] = Value::String(query);
    assert_eq!(status(&call(&h, forged).await?), 401);

    // Standard mode only: the per-batch URL is refused.
    let standard_only = handler(Some(FIXTURE_WHSEC), None)?;
    let refused = call(&standard_only, load("function-url-per-batch.json")?).await?;
    assert_eq!(status(&refused), 401);
    assert_eq!(h.queue.harvest_requests().len(), 1);
    Ok(())
}

#[tokio::test]
async fn the_readiness_probe_gets_204_without_a_body() -> anyhow::Result<()> {
    let h = both_modes()?;
    let response = call(&h, load("function-url-options.json")?).await?;
    assert_eq!(status(&response), 204);
    assert!(response["body"].is_null(), "{response}");
    assert!(h.queue.harvest_requests().is_empty());
    Ok(())
}

#[tokio::test]
async fn other_methods_get_405() -> anyhow::Result<()> {
    let h = both_modes()?;
    let mut event = load("function-url-post.json")?;
    event["requestContext"]["http"]["method"] = Value::String("GET".into());
    assert_eq!(status(&call_at(&h, event, FIXTURE_TIME).await?), 405);
    Ok(())
}

#[tokio::test]
async fn an_oversized_body_gets_413() -> anyhow::Result<()> {
    let mut h = both_modes()?;
    h.webhook.max_body_bytes = 64;
    let response = call_at(&h, load("function-url-post.json")?, FIXTURE_TIME).await?;
    assert_eq!(status(&response), 413);
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Harvest-queue events.

#[tokio::test]
async fn failed_harvests_and_unreadable_messages_are_batch_item_failures() -> anyhow::Result<()> {
    // The provider is down and the store holds no state, so the harvest of the first
    // record fails however far it gets; the second record is not a harvest request.
    let h = both_modes()?;
    let response = call(&h, load("sqs-harvest.json")?).await?;
    assert_eq!(
        response,
        json!({
            "batchItemFailures": [
                { "itemIdentifier": "059f36b4-87a3-44ab-83d2-661975830a7d" },
                { "itemIdentifier": "2e1424d4-f796-459a-8184-9c92662be6da" },
            ]
        })
    );
    assert!(
        h.queue.harvest_requests().is_empty(),
        "a harvest never queues another harvest"
    );
    Ok(())
}

#[tokio::test]
async fn a_record_without_a_message_id_fails_the_invocation() -> anyhow::Result<()> {
    let h = both_modes()?;
    let mut event = load("sqs-harvest.json")?;
    if let Some(record) = event["Records"][0].as_object_mut() {
        record.remove("messageId");
    }
    assert!(handle(&h, event).await.is_err());
    Ok(())
}

#[tokio::test]
async fn unrecognised_events_fail_loudly() -> anyhow::Result<()> {
    let h = both_modes()?;
    for event in [
        json!({}),
        json!({ "Records": [] }),
        json!({ "Records": [{ "eventSource": "aws:s3" }] }),
        json!({ "source": "aws.scheduler" }),
    ] {
        assert!(handle(&h, event.clone()).await.is_err(), "{event}");
    }
    Ok(())
}

#[test]
fn event_sources_are_told_apart() -> anyhow::Result<()> {
    assert_eq!(
        event_source(&load("sqs-harvest.json")?),
        Some(EventSource::Sqs)
    );
    for name in [
        "function-url-post.json",
        "function-url-per-batch.json",
        "function-url-options.json",
    ] {
        assert_eq!(
            event_source(&load(name)?),
            Some(EventSource::FunctionUrl),
            "{name}"
        );
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Settings.

fn blank() -> WebhookConfig {
    WebhookConfig::new(BUCKET, HARVEST_QUEUE)
}

#[test]
fn the_mode_decides_how_the_secret_is_read() -> anyhow::Result<()> {
    let mut config = blank();
    let mode = apply_webhook_auth(&mut config, Some("standard"), Some(FIXTURE_WHSEC.into()))?;
    assert_eq!(mode, WebhookMode::Standard);
    assert!(config.standard.is_some() && config.per_batch_secret.is_none());

    // Rotation: two secrets, space-separated.
    let two = format!("{FIXTURE_WHSEC} whsec_{}", STANDARD.encode([7u8; 32]));
    apply_webhook_auth(&mut config, None, Some(two))?;
    assert_eq!(config.standard.as_ref().map(WebhookSecrets::len), Some(2));

    let mode = apply_webhook_auth(
        &mut config,
        Some("per-batch"),
        Some(FIXTURE_PER_BATCH_SECRET.into()),
    )?;
    assert_eq!(mode, WebhookMode::PerBatch);
    assert!(config.standard.is_none() && config.per_batch_secret.is_some());

    assert_eq!(
        apply_webhook_auth(&mut config, None, None)?,
        WebhookMode::None
    );
    assert_eq!(
        apply_webhook_auth(&mut config, Some("none"), Some(FIXTURE_WHSEC.into()))?,
        WebhookMode::None
    );
    assert!(config.standard.is_none() && config.per_batch_secret.is_none());
    Ok(())
}

#[test]
fn bad_webhook_settings_are_refused_without_showing_the_secret() {
    let secret = "whsec_this-is-not-base64-but-it-is-secret";
    let cases: [(Option<&str>, Option<&str>); 5] = [
        (Some("standard"), None),
        (Some("per-batch"), None),
        (Some("standard"), Some(secret)),
        (Some("per-batch"), Some("short-secret")),
        (Some("signed"), Some(secret)),
    ];
    for (mode, configured) in cases {
        let err = apply_webhook_auth(&mut blank(), mode, configured.map(str::to_owned))
            .expect_err("refused");
        let text = err.to_string();
        assert!(text.contains("SHOTLABEL_WEBHOOK_"), "{text}");
        assert!(!text.contains("secret-but"), "{text}");
        assert!(!text.contains("short-secret"), "{text}");
        if mode == Some("per-batch") && configured.is_some() {
            assert!(matches!(err, ConfigError::PerBatchSecretTooShort));
        }
    }
}
