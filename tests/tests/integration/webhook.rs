//! The webhook receiver behind a real HTTP listener, against moto and the batch emulator:
//! a Standard Webhooks delivery sent twice queues one harvest request; a per-batch URL
//! (readiness probe, then an unsigned POST) queues one with its manifest; forged requests
//! get 401 and queue nothing; and a submitted batch goes from the provider's callback
//! through the harvest queue to labels.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::common::*;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use batch_emulator::{EmulatorConfig, FaultSettings, RunningEmulator};
use secrecy::SecretString;
use shotlabel_aws::{S3Store, SqsQueue};
use shotlabel_batch_client::BatchClient;
use shotlabel_core::batch_api::CreateBatchRequest;
use shotlabel_core::batch_token;
use shotlabel_core::ports::Queue;
use shotlabel_core::records::{BatchPhase, BatchRecord, HarvestRequest, state_keys, unix_now};
use shotlabel_core::request::BatchLimits;
use shotlabel_core::standard_webhooks::{WebhookSecrets, sign};
use shotlabel_core::submit::{PerBatchWebhook, run_submit};
use shotlabel_core::task::Task;
use shotlabel_core::webhook::{WebhookConfig, WebhookRequest, receive};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A Standard Webhooks secret for these tests (32 bytes after `whsec_`).
fn standard_secret() -> String {
    format!(
        "whsec_{}",
        STANDARD.encode(b"integration webhook key: 32 byte")
    )
}

const PER_BATCH_SECRET: &str = "integration per-batch secret, long enough";

/// What the listener shares with its handler, and what it saw.
struct Receiver {
    store: S3Store,
    queue: SqsQueue,
    config: WebhookConfig,
    /// (method, status) of every request answered, in order.
    answered: Mutex<Vec<(String, u16)>>,
}

impl Receiver {
    fn answered(&self) -> Vec<(String, u16)> {
        self.answered.lock().map(|a| a.clone()).unwrap_or_default()
    }

    fn posts(&self) -> Vec<u16> {
        self.answered()
            .into_iter()
            .filter(|(method, _)| method == "POST")
            .map(|(_, status)| status)
            .collect()
    }
}

/// The local stack's way in: an HTTP request becomes a [`WebhookRequest`] for
/// [`receive`], and its answer goes back as it is.
async fn hook(
    State(receiver): State<Arc<Receiver>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> (StatusCode, String) {
    let request = WebhookRequest {
        method: method.as_str().to_owned(),
        headers: headers
            .iter()
            .filter_map(|(name, value)| {
                Some((name.as_str().to_owned(), value.to_str().ok()?.to_owned()))
            })
            .collect(),
        query: uri.query().unwrap_or_default().to_owned(),
        body: body.to_vec(),
    };
    let now = i64::try_from(unix_now()).unwrap_or(i64::MAX);
    let response = receive(
        &receiver.store,
        &receiver.queue,
        &receiver.config,
        &request,
        now,
    )
    .await;
    if let Ok(mut answered) = receiver.answered.lock() {
        answered.push((method.as_str().to_owned(), response.status));
    }
    (
        StatusCode::from_u16(response.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
        response.body,
    )
}

/// Serves the receiver on a free loopback port at `/hook`.
async fn serve(
    stack: &Stack,
    config: WebhookConfig,
) -> anyhow::Result<(Arc<Receiver>, SocketAddr)> {
    let receiver = Arc::new(Receiver {
        store: stack.store.clone(),
        queue: stack.queue.clone(),
        config,
        answered: Mutex::new(Vec::new()),
    });
    let app = axum::Router::new()
        .route("/hook", axum::routing::any(hook))
        .with_state(Arc::clone(&receiver));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            eprintln!("webhook listener stopped: {e}");
        }
    });
    Ok((receiver, addr))
}

fn receiver_config(stack: &Stack) -> WebhookConfig {
    WebhookConfig::new(
        stack.resources.bucket.clone(),
        stack.resources.harvest_queue_url.clone(),
    )
}

async fn start_emulator(config: EmulatorConfig) -> anyhow::Result<RunningEmulator> {
    let mut config = config.with_delays(20, 50, 20);
    config.api_key = KEY.into();
    config.listen = "127.0.0.1:0".parse()?;
    Ok(batch_emulator::spawn(config).await?)
}

/// Uploads a one-request input file (a tiny PNG) and creates a batch from it.
async fn create_batch(
    client: &BatchClient,
    work_dir: &Path,
    webhook_url: Option<String>,
) -> anyhow::Result<String> {
    let task = Task::default_task()?;
    let image = std::fs::read(data("awkward").join("pixel.png"))?;
    let line = serde_json::json!({
        "custom_id": "img-0",
        "method": "POST",
        "url": "/v1/chat/completions",
        "body": task.chat_completion_body(&format!(
            "data:image/png;base64,{}",
            STANDARD.encode(image)
        )),
    });
    let path = work_dir.join("requests.jsonl");
    std::fs::write(&path, format!("{line}\n"))?;
    let file = client.upload_file(&path).await?;
    let mut request = CreateBatchRequest::chat_completions(&file.id);
    request.webhook_url = webhook_url;
    Ok(client.create_batch(&request).await?.id)
}

/// Waits until `done` holds, or fails after 30 s.
async fn wait_for(what: &str, done: impl Fn() -> bool) -> anyhow::Result<()> {
    let start = Instant::now();
    while !done() {
        anyhow::ensure!(
            start.elapsed() < Duration::from_secs(30),
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    Ok(())
}

/// Every harvest request on the harvest queue (received, so hidden for a while).
async fn harvest_requests(stack: &Stack) -> anyhow::Result<Vec<HarvestRequest>> {
    let mut requests = Vec::new();
    loop {
        let messages = stack
            .queue
            .receive(
                &stack.resources.harvest_queue_url,
                10,
                Duration::from_secs(300),
                Duration::from_secs(1),
            )
            .await?;
        if messages.is_empty() {
            return Ok(requests);
        }
        for message in messages {
            // Each names the delivery marker it was claimed under; shown without it.
            let mut request: HarvestRequest = serde_json::from_str(&message.body)?;
            let marker = request.delivery.take();
            anyhow::ensure!(
                marker.is_some_and(|m| m.starts_with("state/deliveries/")),
                "no delivery marker in {}",
                message.body
            );
            requests.push(request);
        }
    }
}

/// Sends a raw HTTP/1.1 POST and returns the status code (a client only this test needs).
async fn post(
    addr: SocketAddr,
    path_and_query: &str,
    headers: &[(&str, String)],
    body: &[u8],
) -> anyhow::Result<u16> {
    let mut stream = tokio::net::TcpStream::connect(addr).await?;
    let mut head = format!(
        "POST {path_and_query} HTTP/1.1\r\nhost: {addr}\r\ncontent-type: application/json\r\n\
         content-length: {}\r\nconnection: close\r\n",
        body.len()
    );
    for (name, value) in headers {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    head.push_str("\r\n");
    stream.write_all(head.as_bytes()).await?;
    stream.write_all(body).await?;
    let mut response = String::new();
    stream.read_to_string(&mut response).await?;
    let status = response
        .split_whitespace()
        .nth(1)
        .ok_or_else(|| anyhow::anyhow!("no status line in {response:?}"))?;
    Ok(status.parse()?)
}

#[tokio::test]
async fn a_duplicated_standard_webhook_queues_one_harvest_request() -> anyhow::Result<()> {
    let stack = stack("webhook-standard").await?;
    let mut config = receiver_config(&stack);
    config.standard = Some(WebhookSecrets::parse(&standard_secret())?);
    let (receiver, addr) = serve(&stack, config).await?;

    let faults = FaultSettings {
        webhook_duplicate: 1.0,
        ..FaultSettings::default()
    };
    let emulator = start_emulator(
        EmulatorConfig::default()
            .with_webhook(format!("http://{addr}/hook"), vec![standard_secret()])
            .with_faults(faults),
    )
    .await?;
    let client = client(&emulator, quick_retries(3))?;
    let batch_id = create_batch(&client, stack.work_dir.path(), None).await?;

    wait_for("both copies of the delivery", || {
        receiver.posts().len() >= 2
    })
    .await?;
    assert_eq!(receiver.posts(), vec![200, 200], "both copies acknowledged");
    let stats = emulator.stats().webhooks;
    assert_eq!((stats.duplicated, stats.failed), (1, 0), "{stats:?}");

    assert_eq!(
        harvest_requests(&stack).await?,
        vec![HarvestRequest {
            batch_id: Some(batch_id),
            manifest: None,
            origin: "webhook".into(),
            shard: None,
            delivery: None,
        }],
        "exactly one harvest request despite the duplicate"
    );
    assert_eq!(list(&stack, "state/deliveries/").await?.len(), 1);
    Ok(())
}

#[tokio::test]
async fn a_per_batch_url_queues_one_harvest_request_with_its_manifest() -> anyhow::Result<()> {
    let stack = stack("webhook-per-batch").await?;
    let mut config = receiver_config(&stack);
    config.per_batch_secret = Some(SecretString::from(PER_BATCH_SECRET));
    let (receiver, addr) = serve(&stack, config).await?;

    // No project-level webhook: only the per-batch URL is called.
    let emulator = start_emulator(EmulatorConfig::default()).await?;
    let client = client(&emulator, quick_retries(3))?;
    let manifest = "swebhooktest1-0";
    let base = format!("http://{addr}/hook").parse()?;
    let url = batch_token::webhook_url(&base, PER_BATCH_SECRET.as_bytes(), manifest);
    let batch_id = create_batch(&client, stack.work_dir.path(), Some(url)).await?;

    wait_for("the per-batch delivery", || !receiver.posts().is_empty()).await?;
    assert_eq!(
        receiver.answered(),
        vec![("OPTIONS".to_owned(), 200), ("POST".to_owned(), 200)],
        "the readiness probe, then the delivery"
    );
    assert_eq!(
        harvest_requests(&stack).await?,
        vec![HarvestRequest {
            batch_id: Some(batch_id),
            manifest: Some(manifest.into()),
            origin: "webhook".into(),
            shard: None,
            delivery: None,
        }]
    );
    Ok(())
}

#[tokio::test]
async fn forged_requests_get_401_and_queue_nothing() -> anyhow::Result<()> {
    let stack = stack("webhook-forged").await?;
    let mut config = receiver_config(&stack);
    config.standard = Some(WebhookSecrets::parse(&standard_secret())?);
    config.per_batch_secret = Some(SecretString::from(PER_BATCH_SECRET));
    let (receiver, addr) = serve(&stack, config).await?;

    let event = |batch_id: &str| {
        serde_json::json!({
            "id": "evt_1",
            "object": "event",
            "created_at": 1,
            "type": "batch.completed",
            "data": { "id": batch_id },
        })
        .to_string()
        .into_bytes()
    };
    let now = i64::try_from(unix_now())?;
    let signed_with = |key: &[u8], id: &str, body: &[u8]| {
        vec![
            ("webhook-id", id.to_owned()),
            ("webhook-timestamp", now.to_string()),
            ("webhook-signature", sign(key, id, now, body)),
        ]
    };
    let forged_body = event("batch_forged");
    // Signed with a key the receiver does not have.
    let forged = signed_with(
        b"an attacker's key, thirty-two b.",
        "msg_forged",
        &forged_body,
    );
    assert_eq!(post(addr, "/hook", &forged, &forged_body).await?, 401);
    // No signature at all.
    assert_eq!(post(addr, "/hook", &[], &forged_body).await?, 401);
    // A per-batch URL whose token was made with another secret.
    let token = batch_token::token(b"an attacker's per-batch secret..", "s1-0");
    let query = format!("/hook?manifest=s1-0&token={token}");
    assert_eq!(post(addr, &query, &[], &forged_body).await?, 401);

    // The real key works through the same path (the listener is not simply refusing).
    let genuine_body = event("batch_genuine");
    let genuine = signed_with(
        b"integration webhook key: 32 byte",
        "msg_genuine",
        &genuine_body,
    );
    assert_eq!(post(addr, "/hook", &genuine, &genuine_body).await?, 200);

    assert_eq!(receiver.posts(), vec![401, 401, 401, 200]);
    let queued = harvest_requests(&stack).await?;
    let batch_ids: Vec<Option<String>> = queued.into_iter().map(|r| r.batch_id).collect();
    assert_eq!(
        batch_ids,
        vec![Some("batch_genuine".to_owned())],
        "only the genuine request is queued"
    );
    assert_eq!(list(&stack, "state/deliveries/").await?.len(), 1);
    Ok(())
}

/// The whole path: images queued and submitted with a per-batch URL, the emulator calls
/// the receiver, and the harvest request it queued, handed to the webhook function as the
/// harvest queue's SQS event, becomes labels.
#[tokio::test]
async fn a_submitted_batch_is_labelled_through_the_webhook_and_the_harvest_queue()
-> anyhow::Result<()> {
    let stack = stack("webhook-end-to-end").await?;
    let mut config = receiver_config(&stack);
    config.per_batch_secret = Some(SecretString::from(PER_BATCH_SECRET));
    let (receiver, addr) = serve(&stack, config).await?;
    let emulator = start_emulator(EmulatorConfig::default()).await?;

    let images = files("screenshots")?;
    let objects = put_files(&stack, &images[..2]).await?;
    enqueue(&stack, objects).await?;
    let mut submit = submit_config(&stack, BatchLimits::default())?;
    submit.per_batch_webhook = Some(PerBatchWebhook {
        base_url: format!("http://{addr}/hook").parse()?,
        secret: SecretString::from(PER_BATCH_SECRET),
    });
    let submitted = run_submit(
        &stack.store,
        &stack.queue,
        &client(&emulator, quick_retries(3))?,
        &submit,
    )
    .await?;
    anyhow::ensure!(submitted.errors.is_empty(), "{:?}", submitted.errors);
    let [batch] = submitted.batches.as_slice() else {
        anyhow::bail!("expected one batch: {:?}", submitted.batches);
    };

    wait_for("the per-batch delivery", || !receiver.posts().is_empty()).await?;
    assert_eq!(receiver.posts(), vec![200]);
    let messages = stack
        .queue
        .receive(
            &stack.resources.harvest_queue_url,
            10,
            Duration::from_secs(300),
            Duration::from_secs(1),
        )
        .await?;
    let [message] = messages.as_slice() else {
        anyhow::bail!("expected one harvest message: {messages:?}");
    };
    let request: HarvestRequest = serde_json::from_str(&message.body)?;
    assert_eq!(request.manifest.as_deref(), Some(batch.manifest.as_str()));
    assert_eq!(request.batch_id.as_deref(), Some(batch.batch_id.as_str()));

    // The same message as Lambda's SQS event source would hand it to the function.
    let event = serde_json::json!({
        "Records": [{
            "messageId": message.message_id,
            "receiptHandle": message.receipt_handle,
            "body": message.body,
            "attributes": { "ApproximateReceiveCount": "1" },
            "messageAttributes": {},
            "eventSource": "aws:sqs",
            "eventSourceARN": "arn:aws:sqs:us-east-1:123456789012:harvest",
            "awsRegion": "us-east-1",
        }]
    });
    let handler = harvest::Handler {
        store: stack.store.clone(),
        queue: stack.queue.clone(),
        provider: client(&emulator, quick_retries(3))?,
        harvest: harvest_config(&stack)?,
    };
    let response = harvest::handle(&handler, serde_json::from_value(event)?)
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    assert!(response.batch_item_failures.is_empty());
    assert_eq!(list(&stack, "labels/").await?.len(), 2);
    let record: BatchRecord = read_json(&stack, &state_keys::batch(&batch.batch_id)).await?;
    assert_eq!(record.phase, BatchPhase::Harvested);
    Ok(())
}
