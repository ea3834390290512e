//! The webhook function's handling of real event JSON: Function URL requests (signed,
//! per-batch, base64, OPTIONS), on the in-memory store and queue
//! (`shotlabel_core::memory`); and its settings.

use std::path::Path;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use serde_json::{Value, json};
use shotlabel_core::SecretString;
use shotlabel_core::memory::{MemoryQueue, MemoryStore};
use shotlabel_core::records::HarvestRequest;
use shotlabel_core::settings::{
    FunctionSettings, ReceiverSettings, SettingsError, WebhookMode, apply_webhook_auth,
};
use shotlabel_core::standard_webhooks::WebhookSecrets;
use shotlabel_core::webhook::WebhookConfig;
use webhook::{Handler, handle, receive_function_url};

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

/// The harvest requests the queue holds, in order.
/// The queued harvest requests, each checked to name a delivery marker, shown without it.
fn harvest_requests(queue: &MemoryQueue) -> anyhow::Result<Vec<HarvestRequest>> {
    queue
        .bodies(HARVEST_QUEUE)
        .iter()
        .map(|body| {
            let mut request: HarvestRequest = serde_json::from_str(body)?;
            let marker = request.delivery.take();
            anyhow::ensure!(
                marker.is_some_and(|m| m.starts_with("state/deliveries/")),
                "no delivery marker in {body}"
            );
            Ok(request)
        })
        .collect()
}

fn handler(
    standard: Option<&str>,
    per_batch: Option<&str>,
) -> anyhow::Result<Handler<MemoryStore, MemoryQueue>> {
    let mut config = WebhookConfig::new(BUCKET, HARVEST_QUEUE);
    config.standard = standard.map(WebhookSecrets::parse).transpose()?;
    config.per_batch_secret = per_batch.map(SecretString::from);
    Ok(Handler {
        store: MemoryStore::default(),
        queue: MemoryQueue::default(),
        webhook: config,
    })
}

fn both_modes() -> anyhow::Result<Handler<MemoryStore, MemoryQueue>> {
    handler(Some(FIXTURE_WHSEC), Some(FIXTURE_PER_BATCH_SECRET))
}

/// [`handle`] on a fixture, its response as the JSON Lambda would return.
async fn call(h: &Handler<MemoryStore, MemoryQueue>, event: Value) -> anyhow::Result<Value> {
    let response = handle(h, serde_json::from_value(event)?)
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok(serde_json::to_value(response)?)
}

/// [`receive_function_url`] at a given time (unix seconds), for the signed fixtures.
async fn call_at(
    h: &Handler<MemoryStore, MemoryQueue>,
    event: Value,
    now_unix: i64,
) -> anyhow::Result<Value> {
    let response = receive_function_url(h, &serde_json::from_value(event)?, now_unix).await;
    Ok(serde_json::to_value(response)?)
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
        harvest_requests(&h.queue)?,
        vec![HarvestRequest {
            batch_id: Some(FIXTURE_BATCH.into()),
            manifest: None,
            origin: "webhook".into(),
            shard: None,
            delivery: None,
        }]
    );

    // The provider's retry of the same delivery.
    let again = call_at(&h, load("function-url-post.json")?, FIXTURE_TIME + 60).await?;
    assert_eq!(status(&again), 200);
    assert_eq!(body(&again)["duplicate"], true);
    assert_eq!(harvest_requests(&h.queue)?.len(), 1);
    Ok(())
}

#[tokio::test]
async fn handle_uses_the_real_clock() -> anyhow::Result<()> {
    // The fixture was signed in 2025: far outside the window today.
    let h = both_modes()?;
    let response = call(&h, load("function-url-post.json")?).await?;
    assert_eq!(status(&response), 401);
    assert!(harvest_requests(&h.queue)?.is_empty());
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
    assert!(harvest_requests(&h.queue)?.is_empty());
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
        harvest_requests(&h.queue)?,
        vec![HarvestRequest {
            batch_id: Some(FIXTURE_PER_BATCH_ID.into()),
            manifest: Some(FIXTURE_MANIFEST.into()),
            origin: "webhook".into(),
            shard: None,
            delivery: None,
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
    assert_eq!(harvest_requests(&h.queue)?.len(), 1);
    Ok(())
}

#[tokio::test]
async fn the_readiness_probe_gets_200_without_a_body() -> anyhow::Result<()> {
    let h = both_modes()?;
    let response = call(&h, load("function-url-options.json")?).await?;
    assert_eq!(status(&response), 200);
    assert!(response["body"].is_null(), "{response}");
    assert!(harvest_requests(&h.queue)?.is_empty());
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
// Settings.

fn blank() -> WebhookConfig {
    WebhookConfig::new(BUCKET, HARVEST_QUEUE)
}

fn secret(text: &str) -> Option<SecretString> {
    Some(SecretString::from(text.to_owned()))
}

#[test]
fn the_mode_decides_how_the_secret_is_read() -> anyhow::Result<()> {
    let mut config = blank();
    apply_webhook_auth(&mut config, WebhookMode::Standard, secret(FIXTURE_WHSEC))?;
    assert!(config.standard.is_some() && config.per_batch_secret.is_none());

    // Rotation: two secrets, space-separated.
    let two = format!("{FIXTURE_WHSEC} whsec_{}", STANDARD.encode([7u8; 32]));
    apply_webhook_auth(&mut config, WebhookMode::Standard, secret(&two))?;
    assert_eq!(config.standard.as_ref().map(WebhookSecrets::len), Some(2));

    apply_webhook_auth(
        &mut config,
        WebhookMode::PerBatch,
        secret(FIXTURE_PER_BATCH_SECRET),
    )?;
    assert!(config.standard.is_none() && config.per_batch_secret.is_some());

    apply_webhook_auth(&mut config, WebhookMode::None, secret(FIXTURE_WHSEC))?;
    assert!(config.standard.is_none() && config.per_batch_secret.is_none());
    Ok(())
}

/// The receiver's settings read from variables as a deployment gives them: the mode is
/// `none` unless set, and a set mode is one of the three.
#[test]
fn the_receiver_reads_its_settings_from_variables() -> anyhow::Result<()> {
    let settings = ReceiverSettings::from_vars([
        ("SHOTLABEL_BUCKET", BUCKET),
        ("SHOTLABEL_HARVEST_QUEUE_URL", HARVEST_QUEUE),
    ])?;
    assert_eq!(settings.webhook.webhook_mode, WebhookMode::None);
    let config = settings.config(None)?;
    assert!(config.standard.is_none() && config.per_batch_secret.is_none());

    let settings = ReceiverSettings::from_vars([
        ("SHOTLABEL_BUCKET", BUCKET),
        ("SHOTLABEL_HARVEST_QUEUE_URL", HARVEST_QUEUE),
        ("SHOTLABEL_WEBHOOK_MODE", "per-batch"),
        ("SHOTLABEL_MAX_WEBHOOK_BYTES", "2048"),
    ])?;
    assert_eq!(settings.webhook.webhook_mode, WebhookMode::PerBatch);
    let config = settings.config(secret(FIXTURE_PER_BATCH_SECRET))?;
    assert!(config.per_batch_secret.is_some());
    assert_eq!(config.max_body_bytes, 2048);

    let missing = ReceiverSettings::from_vars([("SHOTLABEL_BUCKET", BUCKET)])
        .expect_err("the harvest queue is required");
    assert!(
        matches!(&missing, SettingsError::Missing { name, .. } if name == "SHOTLABEL_HARVEST_QUEUE_URL"),
        "{missing}"
    );
    let unknown = ReceiverSettings::from_vars([
        ("SHOTLABEL_BUCKET", BUCKET),
        ("SHOTLABEL_HARVEST_QUEUE_URL", HARVEST_QUEUE),
        ("SHOTLABEL_WEBHOOK_MODE", "signed"),
    ])
    .expect_err("an unknown mode");
    assert!(
        matches!(&unknown, SettingsError::Invalid { name, value, .. }
            if name == "SHOTLABEL_WEBHOOK_MODE" && value == "signed"),
        "{unknown}"
    );
    // The receiver does not read the provider's key: a deployment giving it one is wrong.
    assert!(
        ReceiverSettings::from_vars([("SHOTLABEL_API_KEY", "sk-nope")]).is_err(),
        "the receiver has no provider key setting"
    );
    Ok(())
}

#[test]
fn bad_webhook_settings_are_refused_without_showing_the_secret() {
    let leaked = "whsec_this-is-not-base64-but-it-is-secret";
    let cases: [(WebhookMode, Option<&str>); 4] = [
        (WebhookMode::Standard, None),
        (WebhookMode::PerBatch, None),
        (WebhookMode::Standard, Some(leaked)),
        (WebhookMode::PerBatch, Some("short-secret")),
    ];
    for (mode, configured) in cases {
        let err = apply_webhook_auth(&mut blank(), mode, configured.and_then(secret))
            .expect_err("refused");
        let text = err.to_string();
        assert!(text.contains("SHOTLABEL_WEBHOOK_"), "{text}");
        assert!(!text.contains("secret-but"), "{text}");
        assert!(!text.contains("short-secret"), "{text}");
        if mode == WebhookMode::PerBatch && configured.is_some() {
            assert!(text.contains("per-batch mode"), "{text}");
        }
    }
}
