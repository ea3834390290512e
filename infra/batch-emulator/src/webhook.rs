//! Webhook deliveries: a project-level endpoint signed with Standard Webhooks
//! (OpenAI style) and per-batch `webhook_url`s (Inference.net style: an
//! OPTIONS readiness probe, then an unsigned POST).

use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use hmac::{Hmac, Mac};
use reqwest::{Method, Url};
use serde_json::json;
use sha2::Sha256;

use crate::error::Error;
use crate::state::{AppState, Counters, Status, unix_now};

/// Decodes `whsec_<base64>` (or bare base64) into the HMAC key, as the
/// Standard Webhooks libraries do.
pub fn decode_secret(secret: &str) -> Result<Vec<u8>, Error> {
    let encoded = secret.strip_prefix("whsec_").unwrap_or(secret);
    // Padding optional, as the reference libraries accept unpadded secrets.
    let engine = base64::engine::GeneralPurpose::new(
        &base64::alphabet::STANDARD,
        base64::engine::GeneralPurposeConfig::new()
            .with_decode_padding_mode(base64::engine::DecodePaddingMode::Indifferent),
    );
    let key = engine
        .decode(encoded)
        .map_err(|e| Error::InvalidSecret(format!("not base64 after whsec_: {e}")))?;
    if key.is_empty() {
        return Err(Error::InvalidSecret("the key is empty".into()));
    }
    Ok(key)
}

/// Accepts http(s) URLs with a host (plain http is allowed: this is local).
pub fn check_url(url: &str) -> Result<Url, String> {
    let parsed = Url::parse(url).map_err(|e| format!("webhook URL is not a URL: {e}"))?;
    if !matches!(parsed.scheme(), "http" | "https") || parsed.host_str().is_none() {
        return Err("webhook URL must be http(s) with a host".into());
    }
    Ok(parsed)
}

/// Scheme, host and port only: paths and queries may carry a receiver's token.
pub fn redact_url(url: &str) -> String {
    match Url::parse(url) {
        Ok(u) => format!(
            "{}://{}{}/…",
            u.scheme(),
            u.host_str().unwrap_or_default(),
            u.port().map(|p| format!(":{p}")).unwrap_or_default()
        ),
        Err(_) => "<invalid url>".into(),
    }
}

/// `webhook-signature` value: one `v1,<base64>` per key, space-separated.
pub fn sign(keys: &[Vec<u8>], msg_id: &str, timestamp: u64, body: &[u8]) -> String {
    keys.iter()
        .filter_map(|key| {
            let mut mac = Hmac::<Sha256>::new_from_slice(key).ok()?;
            mac.update(msg_id.as_bytes());
            mac.update(b".");
            mac.update(timestamp.to_string().as_bytes());
            mac.update(b".");
            mac.update(body);
            let sig = base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes());
            Some(format!("v1,{sig}"))
        })
        .collect::<Vec<_>>()
        .join(" ")
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    StandardWebhooks,
    PerBatch,
}

#[derive(Debug, Clone)]
struct Delivery {
    kind: Kind,
    url: String,
    /// `webhook-id` / `X-Inference-Webhook-ID`: the same on retries and
    /// duplicates, so receivers can deduplicate.
    delivery_id: String,
    event_type: String,
    body: Vec<u8>,
}

/// Fires every configured webhook for a batch that reached `status`.
pub fn dispatch(
    state: &Arc<AppState>,
    batch_id: &str,
    status: Status,
    webhook_url: Option<String>,
) {
    let event_type = format!("batch.{}", status.as_str());
    let mut deliveries = Vec::new();
    if let Some(url) = state.cfg.webhook_url.clone() {
        let event = json!({
            "id": state.new_token("evt_"),
            "object": "event",
            "created_at": unix_now().as_secs(),
            "type": event_type,
            "data": { "id": batch_id },
        });
        deliveries.push(Delivery {
            kind: Kind::StandardWebhooks,
            url,
            delivery_id: state.new_token("msg_"),
            event_type: event_type.clone(),
            body: event.to_string().into_bytes(),
        });
    }
    if let Some(url) = webhook_url {
        let body = json!({
            "event": event_type,
            "batch_id": batch_id,
            "status": status.as_str(),
            "created_at": state.timestamp(),
            "data": { "id": batch_id },
        });
        deliveries.push(Delivery {
            kind: Kind::PerBatch,
            url,
            delivery_id: state.new_token("whd_"),
            event_type: event_type.clone(),
            body: body.to_string().into_bytes(),
        });
    }

    let faults = state.faults();
    let counters = &state.counters;
    for delivery in deliveries {
        if faults.webhook_drop > 0.0 && state.draw() < faults.webhook_drop {
            Counters::add(&counters.webhooks_dropped, 1);
            counters.fault("webhook_drop");
            tracing::info!(batch_id, event = %delivery.event_type, "webhook dropped (fault)");
            continue;
        }
        let copies = if faults.webhook_duplicate > 0.0 && state.draw() < faults.webhook_duplicate {
            Counters::add(&counters.webhooks_duplicated, 1);
            counters.fault("webhook_duplicate");
            2
        } else {
            1
        };
        for copy in 0..copies {
            let mut delay = Duration::from_millis(faults.webhook_delay_ms + 10 * copy);
            if faults.webhook_delay_ms > 0 {
                counters.fault("webhook_delay");
            }
            if faults.webhook_reorder {
                // A random extra delay per delivery shuffles arrival order.
                let window = (2 * faults.webhook_delay_ms).max(250) as f64;
                delay += Duration::from_millis((state.draw() * window) as u64);
                counters.fault("webhook_reorder");
            }
            let task_state = Arc::clone(state);
            let delivery = delivery.clone();
            state.spawn(async move {
                tokio::time::sleep(delay).await;
                deliver(&task_state, &delivery).await;
            });
        }
    }
}

async fn deliver(state: &AppState, delivery: &Delivery) {
    let counters = &state.counters;
    let target = redact_url(&delivery.url);
    if delivery.kind == Kind::PerBatch
        && let Err(reason) = send_with_retries(state, delivery, Method::OPTIONS).await
    {
        Counters::add(&counters.webhooks_failed, 1);
        tracing::warn!(%target, event = %delivery.event_type, %reason, "webhook readiness probe failed; POST not sent");
        return;
    }
    match send_with_retries(state, delivery, Method::POST).await {
        Ok(()) => {
            Counters::add(&counters.webhooks_sent, 1);
            tracing::info!(%target, event = %delivery.event_type, id = %delivery.delivery_id, "webhook delivered");
        }
        Err(reason) => {
            Counters::add(&counters.webhooks_failed, 1);
            tracing::warn!(%target, event = %delivery.event_type, %reason, "webhook delivery failed");
        }
    }
}

/// Retries 5xx, timeouts and connection errors with doubling backoff; any
/// other non-2xx answer ends the delivery.
async fn send_with_retries(
    state: &AppState,
    delivery: &Delivery,
    method: Method,
) -> Result<(), String> {
    let counters = &state.counters;
    let mut backoff = state.cfg.webhook_backoff;
    let mut last_error = String::new();
    for attempt in 0..=state.cfg.webhook_retries {
        if attempt > 0 {
            Counters::add(&counters.webhook_retries, 1);
            tokio::time::sleep(backoff).await;
            backoff = backoff.saturating_mul(2);
        }
        Counters::add(&counters.webhook_attempts, 1);
        let mut request = state
            .http
            .request(method.clone(), &delivery.url)
            .timeout(state.cfg.webhook_timeout);
        if method == Method::POST {
            request = request
                .header("content-type", "application/json")
                .body(delivery.body.clone());
        }
        request = match delivery.kind {
            Kind::StandardWebhooks => {
                // Signed per attempt: the timestamp is the attempt's.
                let timestamp = unix_now().as_secs();
                request
                    .header("webhook-id", &delivery.delivery_id)
                    .header("webhook-timestamp", timestamp.to_string())
                    .header(
                        "webhook-signature",
                        sign(
                            &state.webhook_keys,
                            &delivery.delivery_id,
                            timestamp,
                            &delivery.body,
                        ),
                    )
            }
            Kind::PerBatch => request
                .header("x-inference-event", &delivery.event_type)
                .header("x-inference-webhook-id", &delivery.delivery_id),
        };
        match request.send().await {
            Ok(response) if response.status().is_success() => return Ok(()),
            Ok(response) if response.status().is_server_error() => {
                last_error = format!("{method} answered {}", response.status());
            }
            Ok(response) => {
                return Err(format!(
                    "{method} answered {} (not retried)",
                    response.status()
                ));
            }
            Err(e) => {
                // without_url: the URL may hold the receiver's token.
                last_error = format!("{method} failed: {}", e.without_url());
            }
        }
        tracing::debug!(attempt, reason = %last_error, "webhook attempt failed");
    }
    Err(format!(
        "gave up after {} attempts: {last_error}",
        state.cfg.webhook_retries + 1
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signature_matches_standard_webhooks_example() {
        // The example from the Standard Webhooks spec / reference libraries.
        let key = decode_secret("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").expect("secret");
        let body = br#"{"test": 2432232314}"#;
        let sig = sign(&[key], "msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, body);
        assert_eq!(sig, "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=");
    }

    #[test]
    fn redaction_hides_path_and_query() {
        let r = redact_url("http://127.0.0.1:9000/hook/secret-token?x=1");
        assert_eq!(r, "http://127.0.0.1:9000/…");
    }
}
