//! The webhook function: the provider's callback receiver behind the Function URL.
//!
//! Each request goes through [`shotlabel_core::webhook::receive`] (authenticate,
//! deduplicate, queue one harvest request) and is answered at once: a provider waits for
//! its answer, and a slow answer is a failed delivery. The harvest itself is the `harvest`
//! function's, on the harvest queue. This one faces the internet, so it holds only what
//! authenticating and queueing need: the webhook secret, the delivery markers and the
//! harvest queue; never the provider's API key or the pending queue.

use std::time::{SystemTime, UNIX_EPOCH};

use aws_lambda_events::event::lambda_function_urls::{
    LambdaFunctionUrlRequest, LambdaFunctionUrlResponse,
};
use aws_lambda_events::http::HeaderValue;
use aws_lambda_events::http::header::CONTENT_TYPE;
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use shotlabel_aws::{
    S3Store, SqsQueue, load_sdk_config, resolve_secret, s3_client_with, sqs_client,
};
use shotlabel_core::ports::{ObjectStore, Queue};
use shotlabel_core::settings::{FunctionSettings, ReceiverSettings, WebhookMode};
use shotlabel_core::webhook::{WebhookConfig, WebhookRequest, WebhookResponse, receive};

/// Clients and settings, built once per cold start.
#[derive(Debug)]
pub struct Handler<S, Q> {
    pub store: S,
    pub queue: Q,
    pub webhook: WebhookConfig,
}

impl Handler<S3Store, SqsQueue> {
    pub async fn from_env() -> Result<Self, lambda_runtime::Error> {
        let settings = ReceiverSettings::from_env()?;
        let sdk = load_sdk_config().await;
        // Secrets come from Secrets Manager on AWS, read once here and cached for the
        // life of the execution environment.
        let secret = resolve_secret(
            &sdk,
            "SHOTLABEL_WEBHOOK_SECRET",
            settings.webhook.webhook_secret.as_ref(),
            settings.webhook.webhook_secret_secret_arn.as_deref(),
        )
        .await?;
        if settings.webhook.webhook_mode == WebhookMode::None {
            tracing::info!("no webhook mode configured: every callback is refused");
        }
        Ok(Self {
            store: S3Store::new(s3_client_with(&sdk, &settings.s3)),
            queue: SqsQueue::new(sqs_client(&sdk)),
            webhook: settings.config(secret)?,
        })
    }
}

/// Handles one Function URL request at the current time.
pub async fn handle<S: ObjectStore, Q: Queue>(
    handler: &Handler<S, Q>,
    request: LambdaFunctionUrlRequest,
) -> Result<LambdaFunctionUrlResponse, lambda_runtime::Error> {
    Ok(receive_function_url(handler, &request, unix_now()).await)
}

/// Answers one Function URL request through the receiver.
pub async fn receive_function_url<S: ObjectStore, Q: Queue>(
    handler: &Handler<S, Q>,
    event: &LambdaFunctionUrlRequest,
    now_unix: i64,
) -> LambdaFunctionUrlResponse {
    let response = match webhook_request(event) {
        Ok(request) => {
            receive(
                &handler.store,
                &handler.queue,
                &handler.webhook,
                &request,
                now_unix,
            )
            .await
        }
        Err(response) => response,
    };
    function_url_response(&response)
}

/// The receiver's view of a Function URL request. Function URLs hand over non-text
/// bodies base64-encoded; signatures are over the decoded bytes.
pub fn webhook_request(
    event: &LambdaFunctionUrlRequest,
) -> Result<WebhookRequest, WebhookResponse> {
    let body = match (&event.body, event.is_base64_encoded) {
        (None, _) => Vec::new(),
        (Some(text), false) => text.clone().into_bytes(),
        (Some(encoded), true) => STANDARD.decode(encoded).map_err(|_| {
            tracing::warn!("a Function URL body marked base64 is not base64");
            WebhookResponse {
                status: 400,
                body: r#"{"error":"the body is not valid base64"}"#.to_owned(),
            }
        })?,
    };
    let headers = event
        .headers
        .iter()
        // A header that is not text cannot be one the receiver reads; dropping it is safe.
        .filter_map(|(name, value)| {
            Some((
                name.as_str().to_ascii_lowercase(),
                value.to_str().ok()?.to_owned(),
            ))
        })
        .collect();
    Ok(WebhookRequest {
        method: event
            .request_context
            .http
            .method
            .clone()
            .unwrap_or_default(),
        headers,
        query: event.raw_query_string.clone().unwrap_or_default(),
        body,
    })
}

/// The receiver's answer as a Function URL response.
pub fn function_url_response(response: &WebhookResponse) -> LambdaFunctionUrlResponse {
    let mut out = LambdaFunctionUrlResponse::default();
    out.status_code = i64::from(response.status);
    if let Some(content_type) = response.content_type() {
        out.headers
            .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    }
    out.body = (!response.body.is_empty()).then(|| response.body.clone());
    out.is_base64_encoded = false;
    out
}

/// Seconds since the Unix epoch (0 if the clock is before it).
fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}
