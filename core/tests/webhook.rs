//! The webhook receiver on the in-memory store and queue (`shotlabel_core::memory`): every
//! status code, both authentication modes, rotation, the timestamp window, deduplication
//! (also of concurrent copies), queue and store failures, and secrets kept out of every
//! answer and `Debug`.

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use shotlabel_core::SecretString;
use shotlabel_core::batch_token;
use shotlabel_core::memory::{MemoryQueue, MemoryStore, QueueOp, StoreOp};
use shotlabel_core::records::HarvestRequest;
use shotlabel_core::standard_webhooks::{WebhookSecrets, sign};
use shotlabel_core::webhook::{
    DEFAULT_MAX_BODY_BYTES, WebhookConfig, WebhookRequest, WebhookResponse, receive,
};

const BUCKET: &str = "bucket";
const HARVEST_QUEUE: &str = "http://queue/harvest";
const NOW: i64 = 1_750_000_000;

/// Two 32-byte Standard Webhooks keys (the old and the new while rotating) and one that
/// is not configured.
const KEY_OLD: &[u8] = b"old key: thirty-two bytes long!!";
const KEY_NEW: &[u8] = b"new key: thirty-two bytes long!!";
const KEY_STRANGER: &[u8] = b"someone else's key, 32 bytes ...";
/// The per-batch HMAC key, as configured (its bytes are the key).
const PER_BATCH_SECRET: &str = "per-batch secret: long enough to be safe";

fn whsec(key: &[u8]) -> String {
    format!("whsec_{}", STANDARD.encode(key))
}

// ---------------------------------------------------------------------------------------
// Requests and configuration.

fn config_with(standard: Option<&[&[u8]]>, per_batch: bool) -> WebhookConfig {
    let mut config = WebhookConfig::new(BUCKET, HARVEST_QUEUE);
    config.standard = standard.map(|keys| {
        let configured: Vec<String> = keys.iter().map(|key| whsec(key)).collect();
        WebhookSecrets::parse(&configured.join(" ")).expect("valid secrets")
    });
    config.per_batch_secret = per_batch.then(|| SecretString::from(PER_BATCH_SECRET));
    config
}

/// Both modes configured, the Standard Webhooks side with one key.
fn config() -> WebhookConfig {
    config_with(Some(&[KEY_NEW]), true)
}

fn event(event_type: &str, batch_id: &str) -> Vec<u8> {
    serde_json::json!({
        "id": "evt_1",
        "object": "event",
        "created_at": NOW,
        "type": event_type,
        "data": { "id": batch_id },
    })
    .to_string()
    .into_bytes()
}

/// A POST signed with `keys` (one `v1,` entry each) at `timestamp`.
fn signed(webhook_id: &str, timestamp: i64, body: Vec<u8>, keys: &[&[u8]]) -> WebhookRequest {
    let signature = keys
        .iter()
        .map(|key| sign(key, webhook_id, timestamp, &body))
        .collect::<Vec<_>>()
        .join(" ");
    WebhookRequest {
        method: "POST".into(),
        headers: vec![
            ("content-type".into(), "application/json".into()),
            ("webhook-id".into(), webhook_id.into()),
            ("webhook-timestamp".into(), timestamp.to_string()),
            ("webhook-signature".into(), signature),
        ],
        query: String::new(),
        body,
    }
}

fn completed(webhook_id: &str, batch_id: &str) -> WebhookRequest {
    signed(
        webhook_id,
        NOW,
        event("batch.completed", batch_id),
        &[KEY_NEW],
    )
}

/// A POST to a per-batch URL for `manifest` carrying `token`.
fn per_batch(manifest: &str, token: &str, body: &[u8]) -> WebhookRequest {
    let query = url::form_urlencoded::Serializer::new(String::new())
        .append_pair("manifest", manifest)
        .append_pair("token", token)
        .finish();
    WebhookRequest {
        method: "POST".into(),
        headers: vec![("content-type".into(), "application/json".into())],
        query,
        body: body.to_vec(),
    }
}

fn good_token(manifest: &str) -> String {
    batch_token::token(PER_BATCH_SECRET.as_bytes(), manifest)
}

const PER_BATCH_BODY: &[u8] = br#"{"event":"batch.completed","batch_id":"batch_pb","status":"completed","created_at":1750000000,"data":{"id":"batch_pb"}}"#;

/// Everything secret the tests use: none of it may appear in an answer.
fn secrets_in_play(requests: &[&WebhookRequest]) -> Vec<String> {
    let mut secrets = vec![
        PER_BATCH_SECRET.to_owned(),
        whsec(KEY_OLD),
        whsec(KEY_NEW),
        STANDARD.encode(KEY_OLD),
        STANDARD.encode(KEY_NEW),
        good_token("s1-0"),
    ];
    for request in requests {
        if let Some(signature) = request.header("webhook-signature") {
            secrets.extend(signature.split(' ').map(str::to_owned));
        }
        if let Some((_, token)) = batch_token::from_query(&request.query) {
            secrets.push(token);
        }
    }
    // An empty "secret" (a test's empty token) is contained in every string.
    secrets.retain(|s| !s.is_empty());
    secrets
}

fn assert_nothing_secret(response: &WebhookResponse, requests: &[&WebhookRequest]) {
    for secret in secrets_in_play(requests) {
        assert!(
            !response.body.contains(&secret),
            "the answer {:?} leaks a secret",
            response.body
        );
    }
}

/// The receiver on the in-memory store and queue (`shotlabel_core::memory`).
struct Harness {
    store: MemoryStore,
    queue: MemoryQueue,
    config: WebhookConfig,
}

impl Harness {
    fn new(config: WebhookConfig) -> Self {
        Self {
            store: MemoryStore::default(),
            queue: MemoryQueue::default(),
            config,
        }
    }

    async fn send(&self, request: &WebhookRequest) -> WebhookResponse {
        let response = receive(&self.store, &self.queue, &self.config, request, NOW).await;
        assert_nothing_secret(&response, &[request]);
        response
    }

    fn markers(&self) -> Vec<String> {
        self.store.keys(BUCKET, "state/deliveries/")
    }

    /// Every key the receiver wrote, in any bucket.
    fn keys(&self) -> Vec<(String, String)> {
        self.store.all_keys()
    }

    /// How many messages the queue took.
    fn queued(&self) -> usize {
        self.queue.sent().len()
    }

    /// The harvest requests the queue took, in order, each checked to name the delivery
    /// marker it was claimed under (a stored one) and shown without it.
    fn harvest_requests(&self) -> Vec<HarvestRequest> {
        let markers = self.store.keys(BUCKET, "state/deliveries/");
        self.queue
            .sent()
            .iter()
            .filter(|(url, _)| url == HARVEST_QUEUE)
            .filter_map(|(_, body)| serde_json::from_str::<HarvestRequest>(body).ok())
            .map(|mut request| {
                let marker = request.delivery.take().expect("a delivery marker");
                assert!(markers.contains(&marker), "{marker} is not stored");
                request
            })
            .collect()
    }
}

fn body_json(response: &WebhookResponse) -> serde_json::Value {
    serde_json::from_str(&response.body).expect("the answer is JSON")
}

// ---------------------------------------------------------------------------------------
// Method and size.

#[tokio::test]
async fn options_is_a_readiness_probe() {
    let h = Harness::new(config());
    let request = WebhookRequest {
        method: "OPTIONS".into(),
        ..WebhookRequest::default()
    };
    let response = h.send(&request).await;
    assert_eq!(response.status, 200);
    assert!(response.body.is_empty());
    assert_eq!(response.content_type(), None);
    assert_eq!(h.queued(), 0);
}

#[tokio::test]
async fn other_methods_get_405() {
    let h = Harness::new(config());
    for method in ["GET", "PUT", "DELETE", "HEAD", ""] {
        let mut request = completed("msg_1", "batch_1");
        request.method = method.into();
        let response = h.send(&request).await;
        assert_eq!(response.status, 405, "{method}");
    }
    assert_eq!(h.queued(), 0);
    assert!(h.keys().is_empty());
}

#[tokio::test]
async fn a_lower_case_post_is_a_post() {
    let h = Harness::new(config());
    let mut request = completed("msg_1", "batch_1");
    request.method = "post".into();
    assert_eq!(h.send(&request).await.status, 200);
}

#[tokio::test]
async fn an_oversized_body_gets_413_before_authentication() {
    let h = Harness::new(config());
    let big = vec![b' '; DEFAULT_MAX_BODY_BYTES + 1];
    // Correctly signed: the size check must not depend on authentication…
    let response = h.send(&signed("msg_1", NOW, big.clone(), &[KEY_NEW])).await;
    assert_eq!(response.status, 413);
    // …and an unsigned one gets 413 too, without any hashing.
    let unsigned = WebhookRequest {
        method: "POST".into(),
        body: big,
        ..WebhookRequest::default()
    };
    assert_eq!(h.send(&unsigned).await.status, 413);
    assert_eq!(h.queued(), 0);

    // Exactly at the limit is fine as far as size goes (it fails later, as not JSON).
    let mut small = Harness::new(config());
    small.config.max_body_bytes = 16;
    let at_limit = signed("msg_2", NOW, vec![b'x'; 16], &[KEY_NEW]);
    assert_eq!(small.send(&at_limit).await.status, 400);
}

// ---------------------------------------------------------------------------------------
// Standard Webhooks mode.

#[tokio::test]
async fn a_signed_batch_event_queues_one_harvest_request() {
    let h = Harness::new(config());
    let response = h.send(&completed("msg_1", "batch_abc")).await;
    assert_eq!(response.status, 200);
    assert_eq!(response.content_type(), Some("application/json"));
    assert_eq!(
        body_json(&response),
        serde_json::json!({ "accepted": true })
    );
    assert_eq!(
        h.harvest_requests(),
        vec![HarvestRequest {
            batch_id: Some("batch_abc".into()),
            manifest: None,
            origin: "webhook".into(),
            shard: None,
            delivery: None,
        }]
    );
    let markers = h.markers();
    assert_eq!(markers.len(), 1);
    let digest = markers[0].trim_start_matches("state/deliveries/");
    assert_eq!(digest.len(), 64, "a hex sha256");
    assert!(digest.bytes().all(|b| b.is_ascii_hexdigit()));
    let marker: serde_json::Value =
        serde_json::from_slice(&h.store.object(BUCKET, &markers[0]).expect("marker").body)
            .expect("json");
    assert_eq!(marker["batch_id"], "batch_abc");
    assert_eq!(marker["received_at"], NOW);
}

#[tokio::test]
async fn every_terminal_batch_event_is_harvested() {
    let h = Harness::new(config());
    for (i, kind) in [
        "batch.completed",
        "batch.failed",
        "batch.expired",
        "batch.cancelled",
    ]
    .iter()
    .enumerate()
    {
        let request = signed(
            &format!("msg_{i}"),
            NOW,
            event(kind, &format!("batch_{i}")),
            &[KEY_NEW],
        );
        assert_eq!(h.send(&request).await.status, 200, "{kind}");
    }
    let ids: Vec<Option<String>> = h
        .harvest_requests()
        .into_iter()
        .map(|r| r.batch_id)
        .collect();
    assert_eq!(
        ids,
        (0..4)
            .map(|i| Some(format!("batch_{i}")))
            .collect::<Vec<_>>()
    );
}

#[tokio::test]
async fn a_repeated_delivery_is_acknowledged_and_not_queued_again() {
    let h = Harness::new(config());
    assert_eq!(h.send(&completed("msg_1", "batch_abc")).await.status, 200);
    // The provider's retry: same message id, signed again with a later timestamp.
    let retry = signed(
        "msg_1",
        NOW + 30,
        event("batch.completed", "batch_abc"),
        &[KEY_NEW],
    );
    let response = h.send(&retry).await;
    assert_eq!(response.status, 200);
    assert_eq!(body_json(&response)["duplicate"], true);
    assert_eq!(h.harvest_requests().len(), 1);
    assert_eq!(h.markers().len(), 1);

    // A different message (even about the same batch) is new news: the harvest is
    // idempotent, the receiver does not second-guess it.
    assert_eq!(h.send(&completed("msg_2", "batch_abc")).await.status, 200);
    assert_eq!(h.harvest_requests().len(), 2);
}

#[tokio::test]
async fn concurrent_copies_of_one_delivery_queue_once() {
    let h = Harness::new(config());
    let request = completed("msg_1", "batch_abc");
    let (a, b, c) = tokio::join!(h.send(&request), h.send(&request), h.send(&request));
    assert_eq!([a.status, b.status, c.status], [200, 200, 200]);
    let duplicates = [&a, &b, &c]
        .iter()
        .filter(|r| body_json(r)["duplicate"] == true)
        .count();
    assert_eq!(duplicates, 2);
    assert_eq!(h.harvest_requests().len(), 1);
}

#[tokio::test]
async fn other_event_types_are_acknowledged_and_ignored() {
    let h = Harness::new(config());
    for kind in [
        "response.completed",
        "batch.in_progress",
        "eval.run.succeeded",
    ] {
        let request = signed("msg_x", NOW, event(kind, "batch_abc"), &[KEY_NEW]);
        let response = h.send(&request).await;
        assert_eq!(response.status, 200, "{kind}");
        assert_eq!(body_json(&response)["accepted"], false);
    }
    assert_eq!(h.queued(), 0);
    assert!(h.markers().is_empty(), "nothing to deduplicate");
}

#[tokio::test]
async fn a_numeric_batch_id_is_accepted() {
    let h = Harness::new(config());
    let body = br#"{"type":"batch.completed","data":{"id":12345}}"#.to_vec();
    assert_eq!(
        h.send(&signed("msg_1", NOW, body, &[KEY_NEW])).await.status,
        200
    );
    assert_eq!(h.harvest_requests()[0].batch_id.as_deref(), Some("12345"));
}

#[tokio::test]
async fn authentic_but_malformed_payloads_get_400() {
    let h = Harness::new(config());
    let cases: [&[u8]; 6] = [
        b"{not json",
        b"",
        br#"["batch.completed"]"#,
        br#"{"data":{"id":"batch_1"}}"#,
        br#"{"type":"batch.completed"}"#,
        br#"{"type":"batch.completed","data":{"id":""}}"#,
    ];
    for (i, body) in cases.into_iter().enumerate() {
        let request = signed(&format!("msg_{i}"), NOW, body.to_vec(), &[KEY_NEW]);
        let response = h.send(&request).await;
        assert_eq!(
            response.status,
            400,
            "case {i}: {}",
            String::from_utf8_lossy(body)
        );
    }
    assert_eq!(h.queued(), 0);
    assert!(h.markers().is_empty());
}

#[tokio::test]
async fn authentication_comes_before_parsing() {
    let h = Harness::new(config());
    // Malformed JSON with a wrong signature: 401, not 400.
    let request = signed("msg_1", NOW, b"{not json".to_vec(), &[KEY_STRANGER]);
    assert_eq!(h.send(&request).await.status, 401);
}

#[tokio::test]
async fn rotation_accepts_either_configured_secret() {
    let h = Harness::new(config_with(Some(&[KEY_OLD, KEY_NEW]), false));
    let old = signed(
        "msg_old",
        NOW,
        event("batch.completed", "batch_1"),
        &[KEY_OLD],
    );
    let new = signed(
        "msg_new",
        NOW,
        event("batch.completed", "batch_2"),
        &[KEY_NEW],
    );
    // A sender mid-rotation signs with both; one unknown entry must not spoil the other.
    let both = signed(
        "msg_both",
        NOW,
        event("batch.completed", "batch_3"),
        &[KEY_STRANGER, KEY_NEW],
    );
    for request in [&old, &new, &both] {
        assert_eq!(h.send(request).await.status, 200);
    }
    assert_eq!(h.harvest_requests().len(), 3);

    // After the rotation finishes, the old key no longer works.
    let after = Harness::new(config_with(Some(&[KEY_NEW]), false));
    assert_eq!(after.send(&old).await.status, 401);
}

#[tokio::test]
async fn bad_signatures_get_401_with_no_detail_and_nothing_happens() {
    let h = Harness::new(config());
    let good = completed("msg_1", "batch_abc");

    let stranger = signed(
        "msg_1",
        NOW,
        event("batch.completed", "batch_abc"),
        &[KEY_STRANGER],
    );
    // The body changed after signing.
    let mut tampered = good.clone();
    tampered.body = event("batch.completed", "batch_other");
    // The id changed after signing.
    let mut other_id = good.clone();
    other_id.headers[1].1 = "msg_2".into();
    // A bare `v1,` and garbage.
    let mut bare = good.clone();
    bare.headers[3].1 = "v1,".into();
    let mut garbage = good.clone();
    garbage.headers[3].1 = "v1,AAAA v2,whatever".into();
    // No headers at all.
    let mut unsigned = good.clone();
    unsigned.headers.retain(|(name, _)| name == "content-type");
    let mut no_timestamp = good.clone();
    no_timestamp.headers.remove(2);

    for (name, request) in [
        ("stranger", &stranger),
        ("tampered", &tampered),
        ("other id", &other_id),
        ("bare v1", &bare),
        ("garbage", &garbage),
        ("unsigned", &unsigned),
        ("no timestamp", &no_timestamp),
    ] {
        let response = h.send(request).await;
        assert_eq!(response.status, 401, "{name}");
        assert_eq!(
            body_json(&response),
            serde_json::json!({ "error": "unauthorized" }),
            "{name}: the answer gives no detail"
        );
        assert_nothing_secret(&response, &[request, &good]);
    }
    assert_eq!(h.queued(), 0);
    assert!(h.keys().is_empty(), "no marker for a refused request");
}

#[tokio::test]
async fn timestamps_outside_the_window_get_401() {
    let h = Harness::new(config());
    let body = || event("batch.completed", "batch_abc");
    let too_old = signed("msg_1", NOW - 301, body(), &[KEY_NEW]);
    let too_new = signed("msg_2", NOW + 301, body(), &[KEY_NEW]);
    let just_inside = signed("msg_3", NOW - 300, body(), &[KEY_NEW]);
    assert_eq!(h.send(&too_old).await.status, 401);
    assert_eq!(h.send(&too_new).await.status, 401);
    assert_eq!(h.send(&just_inside).await.status, 200);
    assert_eq!(h.harvest_requests().len(), 1);
}

#[tokio::test]
async fn a_signed_request_without_standard_mode_configured_gets_401() {
    let h = Harness::new(config_with(None, true));
    assert_eq!(h.send(&completed("msg_1", "batch_abc")).await.status, 401);
    let nothing = Harness::new(config_with(None, false));
    assert_eq!(
        nothing.send(&completed("msg_1", "batch_abc")).await.status,
        401
    );
    assert_eq!(h.queued() + nothing.queued(), 0);
}

// ---------------------------------------------------------------------------------------
// Per-batch URL mode.

#[tokio::test]
async fn a_good_per_batch_token_queues_the_manifest_and_the_batch_id() {
    let h = Harness::new(config());
    let response = h
        .send(&per_batch("s1-0", &good_token("s1-0"), PER_BATCH_BODY))
        .await;
    assert_eq!(response.status, 200);
    assert_eq!(
        h.harvest_requests(),
        vec![HarvestRequest {
            batch_id: Some("batch_pb".into()),
            manifest: Some("s1-0".into()),
            origin: "webhook".into(),
            shard: None,
            delivery: None,
        }]
    );
}

#[tokio::test]
async fn the_url_from_batch_token_round_trips() {
    let h = Harness::new(config());
    let base: url::Url = "https://hooks.example/webhook?x=1".parse().expect("url");
    let url: url::Url = batch_token::webhook_url(&base, PER_BATCH_SECRET.as_bytes(), "sub 1&-0")
        .parse()
        .expect("url");
    let request = WebhookRequest {
        method: "POST".into(),
        query: url.query().unwrap_or_default().to_owned(),
        body: PER_BATCH_BODY.to_vec(),
        ..WebhookRequest::default()
    };
    assert_eq!(h.send(&request).await.status, 200);
    assert_eq!(
        h.harvest_requests()[0].manifest.as_deref(),
        Some("sub 1&-0")
    );
}

#[tokio::test]
async fn bad_per_batch_tokens_get_401() {
    let h = Harness::new(config());
    let cases = [
        (
            "wrong manifest",
            per_batch("s1-1", &good_token("s1-0"), PER_BATCH_BODY),
        ),
        (
            "bad token",
            per_batch("s1-0", &"0".repeat(32), PER_BATCH_BODY),
        ),
        (
            "short token",
            per_batch("s1-0", &good_token("s1-0")[..31], PER_BATCH_BODY),
        ),
        (
            "not hex",
            per_batch("s1-0", &"z".repeat(32), PER_BATCH_BODY),
        ),
        ("empty token", per_batch("s1-0", "", PER_BATCH_BODY)),
        (
            "other secret",
            per_batch(
                "s1-0",
                &batch_token::token(b"another secret, also long enough", "s1-0"),
                PER_BATCH_BODY,
            ),
        ),
        (
            "long manifest",
            per_batch(
                &"m".repeat(300),
                &good_token(&"m".repeat(300)),
                PER_BATCH_BODY,
            ),
        ),
    ];
    for (name, request) in &cases {
        let response = h.send(request).await;
        assert_eq!(response.status, 401, "{name}");
        assert_eq!(body_json(&response)["error"], "unauthorized");
    }
    assert_eq!(h.queued(), 0);
    assert!(h.keys().is_empty());
}

#[tokio::test]
async fn a_per_batch_request_without_per_batch_mode_gets_401() {
    let h = Harness::new(config_with(Some(&[KEY_NEW]), false));
    let response = h
        .send(&per_batch("s1-0", &good_token("s1-0"), PER_BATCH_BODY))
        .await;
    assert_eq!(response.status, 401);
    assert_eq!(h.queued(), 0);
}

#[tokio::test]
async fn only_half_a_per_batch_query_falls_back_to_standard_webhooks() {
    let h = Harness::new(config());
    // A manifest without a token is not per-batch mode; unsigned, it is refused.
    let mut request = per_batch("s1-0", "x", PER_BATCH_BODY);
    request.query = "manifest=s1-0".into();
    assert_eq!(h.send(&request).await.status, 401);
    // A signed Standard Webhooks delivery with unrelated query parameters still works.
    let mut signed_with_query = completed("msg_1", "batch_abc");
    signed_with_query.query = "manifest=s1-0&utm=x".into();
    assert_eq!(h.send(&signed_with_query).await.status, 200);
}

#[tokio::test]
async fn per_batch_bodies_are_read_leniently() {
    let cases: [(&[u8], Option<&str>); 8] = [
        (br#"{"batch_id":"b1","status":"completed"}"#, Some("b1")),
        (
            br#"{"event":"batch.completed","data":{"id":"b2"}}"#,
            Some("b2"),
        ),
        (br#"{"batch":{"id":"b3","status":"completed"}}"#, Some("b3")),
        (
            br#"{"id":"b4","object":"batch","status":"completed"}"#,
            Some("b4"),
        ),
        (
            br#"{"id":"b5","input_file_id":"file-1","status":"completed"}"#,
            Some("b5"),
        ),
        // An event's own id is not a batch id.
        (br#"{"id":"evt_1","type":"something"}"#, None),
        // Nothing recognisable, or nothing at all: the manifest is enough.
        (br#"{"hello":"world"}"#, None),
        (b"", None),
    ];
    for (i, (body, expected)) in cases.into_iter().enumerate() {
        let h = Harness::new(config());
        let response = h.send(&per_batch("s1-0", &good_token("s1-0"), body)).await;
        assert_eq!(
            response.status,
            200,
            "case {i}: {}",
            String::from_utf8_lossy(body)
        );
        assert_eq!(
            h.harvest_requests(),
            vec![HarvestRequest {
                batch_id: expected.map(str::to_owned),
                manifest: Some("s1-0".into()),
                origin: "webhook".into(),
                shard: None,
                delivery: None,
            }],
            "case {i}"
        );
    }
}

/// The token in the URL authenticates a per-batch call, so a body that is not JSON (or
/// of a shape nobody documented) is a hint like any other: a 4xx would lose the delivery,
/// since Inference.net does not retry them. Without a good token it is still a 401.
#[tokio::test]
async fn a_per_batch_body_that_is_not_json_is_queued_on_its_url_alone() {
    let h = Harness::new(config());
    let bad = per_batch("s1-0", &"0".repeat(32), b"{not json");
    assert_eq!(h.send(&bad).await.status, 401);
    assert_eq!(h.queued(), 0);
    let good = per_batch("s1-0", &good_token("s1-0"), b"{not json");
    let response = h.send(&good).await;
    assert_eq!(response.status, 200, "{}", response.body);
    let other = per_batch(
        "s2-0",
        &good_token("s2-0"),
        br#"["an", "unknown", "shape"]"#,
    );
    assert_eq!(h.send(&other).await.status, 200);
    assert_eq!(h.queued(), 2);
}

#[tokio::test]
async fn per_batch_deliveries_are_deduplicated_by_manifest_and_status() {
    let h = Harness::new(config());
    let token = good_token("s1-0");
    let completed = per_batch("s1-0", &token, PER_BATCH_BODY);
    assert_eq!(h.send(&completed).await.status, 200);
    let again = h.send(&completed).await;
    assert_eq!(again.status, 200);
    assert_eq!(body_json(&again)["duplicate"], true);
    assert_eq!(h.harvest_requests().len(), 1);

    // A different status for the same manifest is new news.
    let failed = per_batch(
        "s1-0",
        &token,
        br#"{"event":"batch.failed","batch_id":"batch_pb","status":"failed"}"#,
    );
    assert_eq!(body_json(&h.send(&failed).await)["accepted"], true);
    // Another manifest with the same body is another batch.
    let other = per_batch("s1-1", &good_token("s1-1"), PER_BATCH_BODY);
    assert_eq!(body_json(&h.send(&other).await)["accepted"], true);
    assert_eq!(h.harvest_requests().len(), 3);

    // A Standard Webhooks delivery can never collide with a per-batch one.
    assert_eq!(h.markers().len(), 3);
}

// ---------------------------------------------------------------------------------------
// Store and queue failures.

#[tokio::test]
async fn refused_sends_are_retried() {
    let h = Harness::new(config());
    h.queue.refuse_next_sends(1);
    h.queue.fail_next(QueueOp::Send, 1);
    assert_eq!(h.send(&completed("msg_1", "batch_abc")).await.status, 200);
    assert_eq!(h.queue.calls(QueueOp::Send), 3);
    assert_eq!(h.harvest_requests().len(), 1);
}

#[tokio::test]
async fn a_queue_that_will_not_take_the_request_gets_500_and_the_retry_works() {
    let h = Harness::new(config());
    h.queue.refuse_next_sends(10);
    let request = completed("msg_1", "batch_abc");
    let response = h.send(&request).await;
    assert_eq!(response.status, 500);
    assert!(
        !response.body.contains("injected"),
        "no internals in the answer"
    );
    assert_eq!(h.queue.calls(QueueOp::Send), 3, "three attempts");
    assert!(
        h.markers().is_empty(),
        "the marker is released so the retry is not a duplicate"
    );

    h.queue.refuse_next_sends(0);
    let retry = h.send(&request).await;
    assert_eq!(retry.status, 200);
    assert_eq!(body_json(&retry), serde_json::json!({ "accepted": true }));
    assert_eq!(h.harvest_requests().len(), 1);
}

#[tokio::test]
async fn a_failing_queue_gets_500() {
    let h = Harness::new(config());
    h.queue.fail_next(QueueOp::Send, 10);
    assert_eq!(h.send(&completed("msg_1", "batch_abc")).await.status, 500);
    assert!(h.markers().is_empty());
}

#[tokio::test]
async fn a_marker_that_cannot_be_released_turns_retries_into_duplicates() {
    // The documented trade-off of claiming first: reconciliation then finds the batch.
    let h = Harness::new(config());
    h.queue.fail_next(QueueOp::Send, 10);
    h.store.fail_always_under(StoreOp::Delete, "");
    let request = completed("msg_1", "batch_abc");
    assert_eq!(h.send(&request).await.status, 500);
    h.queue.fail_next(QueueOp::Send, 0);
    assert_eq!(body_json(&h.send(&request).await)["duplicate"], true);
    assert_eq!(h.queued(), 0);
}

#[tokio::test]
async fn a_failing_store_gets_500_and_queues_nothing() {
    let h = Harness::new(config());
    h.store.fail_always_under(StoreOp::Put, "");
    let response = h.send(&completed("msg_1", "batch_abc")).await;
    assert_eq!(response.status, 500);
    assert!(!response.body.contains("injected"));
    assert_eq!(h.queued(), 0);
}

// ---------------------------------------------------------------------------------------
// Secrets.

#[test]
fn debug_output_hides_secrets_tokens_and_signatures() {
    let config = config_with(Some(&[KEY_OLD, KEY_NEW]), true);
    let shown = format!("{config:?}");
    assert!(shown.contains("2 secret(s) redacted"), "{shown}");
    let request = completed("msg_1", "batch_abc");
    let per_batch_request = per_batch("s1-0", &good_token("s1-0"), PER_BATCH_BODY);
    let shown_requests = format!("{request:?} {per_batch_request:?}");
    for secret in secrets_in_play(&[&request, &per_batch_request]) {
        assert!(!shown.contains(&secret), "config Debug leaks a secret");
        assert!(
            !shown_requests.contains(&secret),
            "request Debug leaks a secret or token"
        );
    }
}
