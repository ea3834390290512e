//! AWS SDK clients built from standard configuration.
//!
//! The endpoint comes from the SDK's own settings (`AWS_ENDPOINT_URL`,
//! `AWS_ENDPOINT_URL_S3`, profiles), so the same binary talks to AWS or to moto server.
//! This crate is the AWS adapter: [`S3Store`] and [`SqsQueue`] implement the core's ports,
//! secrets come from Secrets Manager, and [`metrics`] publishes counts as CloudWatch EMF.
//! The core never depends on it.

pub mod metrics;

use std::time::Duration;

use aws_config::{BehaviorVersion, SdkConfig};
use aws_sdk_s3::error::{DisplayErrorContext, SdkError};
use aws_sdk_sqs::types::{
    DeleteMessageBatchRequestEntry, MessageSystemAttributeName, QueueAttributeName,
    SendMessageBatchRequestEntry,
};
use secrecy::{ExposeSecret, SecretString};

use shotlabel_core::ports::{
    ObjectInfo, ObjectStore, OutgoingMessage, Queue, QueueDepth, QueueError, ReceivedMessage,
    StoreError, StoredObject, WriteCondition,
};
use shotlabel_core::provider::ProviderProfile;
use shotlabel_core::settings::{ProviderSettings, S3Settings, SettingsError};

/// Loads the SDK configuration the standard way (environment, profile, instance role).
pub async fn load_sdk_config() -> SdkConfig {
    aws_config::defaults(BehaviorVersion::latest()).load().await
}

/// Whether S3 must be addressed path-style (`http://host/bucket/key`): always for a custom
/// endpoint such as moto, which serves no bucket subdomains, unless the setting
/// (`SHOTLABEL_S3_PATH_STYLE`) says otherwise.
pub fn wants_path_style(custom_endpoint: bool, setting: Option<bool>) -> bool {
    setting.unwrap_or(custom_endpoint)
}

/// An S3 client for `config`, path-style where [`wants_path_style`] says so, with the
/// function's settings.
pub fn s3_client_with(config: &SdkConfig, settings: &S3Settings) -> aws_sdk_s3::Client {
    let custom_endpoint = config.endpoint_url().is_some()
        || std::env::var_os("AWS_ENDPOINT_URL_S3").is_some_and(|v| !v.is_empty());
    let s3_config = aws_sdk_s3::config::Builder::from(config)
        .force_path_style(wants_path_style(custom_endpoint, settings.s3_path_style))
        .build();
    aws_sdk_s3::Client::from_conf(s3_config)
}

/// [`s3_client_with`] for the edge binaries (CLI, local stack, benchmarks), which read
/// `SHOTLABEL_S3_PATH_STYLE` here rather than through a function's settings.
pub fn s3_client(config: &SdkConfig) -> aws_sdk_s3::Client {
    let s3_path_style = std::env::var("SHOTLABEL_S3_PATH_STYLE").ok().and_then(|v| {
        match v.trim().to_ascii_lowercase().as_str() {
            "1" | "true" | "yes" | "on" => Some(true),
            "0" | "false" | "no" | "off" => Some(false),
            _ => None,
        }
    });
    s3_client_with(config, &S3Settings { s3_path_style })
}

pub fn sqs_client(config: &SdkConfig) -> aws_sdk_sqs::Client {
    aws_sdk_sqs::Client::new(config)
}

/// [`ObjectStore`] on S3.
#[derive(Debug, Clone)]
pub struct S3Store {
    client: aws_sdk_s3::Client,
}

impl S3Store {
    pub fn new(client: aws_sdk_s3::Client) -> Self {
        Self { client }
    }
}

fn strip_quotes(etag: &str) -> String {
    etag.trim_matches('"').to_owned()
}

fn http_status<E, R: HttpStatus>(error: &SdkError<E, R>) -> Option<u16> {
    error.raw_response().map(HttpStatus::status_code)
}

/// The HTTP status of a raw SDK response, whatever its type.
trait HttpStatus {
    fn status_code(&self) -> u16;
}

impl HttpStatus for aws_sdk_s3::config::http::HttpResponse {
    fn status_code(&self) -> u16 {
        self.status().as_u16()
    }
}

impl ObjectStore for S3Store {
    async fn get(&self, bucket: &str, key: &str) -> Result<StoredObject, StoreError> {
        let output = self
            .client
            .get_object()
            .bucket(bucket)
            .key(key)
            .send()
            .await;
        match output {
            Ok(object) => {
                let etag = object
                    .e_tag
                    .as_deref()
                    .map(strip_quotes)
                    .unwrap_or_default();
                let body =
                    object.body.collect().await.map_err(|e| {
                        StoreError::Other(format!("reading s3://{bucket}/{key}: {e}"))
                    })?;
                Ok(StoredObject {
                    body: body.into_bytes().to_vec(),
                    etag,
                })
            }
            Err(e) if e.as_service_error().is_some_and(|s| s.is_no_such_key()) => {
                Err(StoreError::NotFound {
                    bucket: bucket.into(),
                    key: key.into(),
                })
            }
            Err(e) => Err(StoreError::Other(format!(
                "reading s3://{bucket}/{key}: {}",
                DisplayErrorContext(&e)
            ))),
        }
    }

    async fn get_range(
        &self,
        bucket: &str,
        key: &str,
        start: u64,
        end: u64,
    ) -> Result<Vec<u8>, StoreError> {
        if end <= start {
            return Ok(Vec::new());
        }
        // HTTP ranges are inclusive.
        let output = self
            .client
            .get_object()
            .bucket(bucket)
            .key(key)
            .range(format!("bytes={start}-{}", end - 1))
            .send()
            .await;
        match output {
            Ok(object) => {
                let body =
                    object.body.collect().await.map_err(|e| {
                        StoreError::Other(format!("reading s3://{bucket}/{key}: {e}"))
                    })?;
                Ok(body.into_bytes().to_vec())
            }
            Err(e) if e.as_service_error().is_some_and(|s| s.is_no_such_key()) => {
                Err(StoreError::NotFound {
                    bucket: bucket.into(),
                    key: key.into(),
                })
            }
            Err(e) => Err(StoreError::Other(format!(
                "reading bytes {start}..{end} of s3://{bucket}/{key}: {}",
                DisplayErrorContext(&e)
            ))),
        }
    }

    async fn put_file(
        &self,
        bucket: &str,
        key: &str,
        path: &std::path::Path,
        content_type: &str,
    ) -> Result<String, StoreError> {
        // Streamed from disk: a batch's output can be hundreds of megabytes.
        let body = aws_sdk_s3::primitives::ByteStream::from_path(path)
            .await
            .map_err(|e| StoreError::Other(format!("reading {}: {e}", path.display())))?;
        let output = self
            .client
            .put_object()
            .bucket(bucket)
            .key(key)
            .content_type(content_type)
            .body(body)
            .send()
            .await
            .map_err(|e| {
                StoreError::Other(format!(
                    "writing s3://{bucket}/{key}: {}",
                    DisplayErrorContext(&e)
                ))
            })?;
        Ok(output
            .e_tag
            .as_deref()
            .map(strip_quotes)
            .unwrap_or_default())
    }

    async fn head(&self, bucket: &str, key: &str) -> Result<Option<ObjectInfo>, StoreError> {
        match self
            .client
            .head_object()
            .bucket(bucket)
            .key(key)
            .send()
            .await
        {
            Ok(head) => Ok(Some(ObjectInfo {
                size: head.content_length.unwrap_or(0).max(0) as u64,
                etag: head.e_tag.as_deref().map(strip_quotes).unwrap_or_default(),
            })),
            Err(e) if e.as_service_error().is_some_and(|s| s.is_not_found()) => Ok(None),
            Err(e) if http_status(&e) == Some(404) => Ok(None),
            Err(e) => Err(StoreError::Other(format!(
                "looking up s3://{bucket}/{key}: {}",
                DisplayErrorContext(&e)
            ))),
        }
    }

    async fn put(
        &self,
        bucket: &str,
        key: &str,
        body: Vec<u8>,
        content_type: &str,
        condition: WriteCondition,
    ) -> Result<String, StoreError> {
        let mut request = self
            .client
            .put_object()
            .bucket(bucket)
            .key(key)
            .content_type(content_type)
            .body(aws_sdk_s3::primitives::ByteStream::from(body));
        let expects_object = matches!(condition, WriteCondition::IfMatch(_));
        request = match condition {
            WriteCondition::Overwrite => request,
            WriteCondition::IfAbsent => request.if_none_match("*"),
            WriteCondition::IfMatch(etag) => request.if_match(format!("\"{etag}\"")),
        };
        match request.send().await {
            Ok(output) => Ok(output
                .e_tag
                .as_deref()
                .map(strip_quotes)
                .unwrap_or_default()),
            // 412 Precondition Failed, or 409 when a concurrent conditional write won.
            // 404 when an If-Match write finds the object gone: the condition failed too.
            Err(e)
                if matches!(http_status(&e), Some(412 | 409))
                    || (expects_object && http_status(&e) == Some(404)) =>
            {
                Err(StoreError::ConditionFailed {
                    bucket: bucket.into(),
                    key: key.into(),
                })
            }
            Err(e) => Err(StoreError::Other(format!(
                "writing s3://{bucket}/{key}: {}",
                DisplayErrorContext(&e)
            ))),
        }
    }

    async fn delete(&self, bucket: &str, key: &str) -> Result<(), StoreError> {
        self.client
            .delete_object()
            .bucket(bucket)
            .key(key)
            .send()
            .await
            .map(|_| ())
            .map_err(|e| {
                StoreError::Other(format!(
                    "deleting s3://{bucket}/{key}: {}",
                    DisplayErrorContext(&e)
                ))
            })
    }

    async fn list(&self, bucket: &str, prefix: &str) -> Result<Vec<String>, StoreError> {
        let mut keys = Vec::new();
        // Keys come back URL-encoded: a key may hold characters XML 1.0 cannot carry
        // (ESC, most other control characters) or that XML parsers rewrite (`\r`), and one
        // such key would otherwise break the whole listing.
        let mut pages = self
            .client
            .list_objects_v2()
            .bucket(bucket)
            .prefix(prefix)
            .encoding_type(aws_sdk_s3::types::EncodingType::Url)
            .into_paginator()
            .send();
        while let Some(page) = pages.next().await {
            let page = page.map_err(|e| {
                StoreError::Other(format!(
                    "listing s3://{bucket}/{prefix}: {}",
                    DisplayErrorContext(&e)
                ))
            })?;
            for key in page
                .contents
                .unwrap_or_default()
                .into_iter()
                .filter_map(|o| o.key)
            {
                keys.push(shotlabel_core::s3_key::decode_event_key(&key).map_err(|e| {
                    StoreError::Other(format!("listing s3://{bucket}/{prefix}: {e}"))
                })?);
            }
        }
        Ok(keys)
    }
}

/// [`Queue`] on SQS.
#[derive(Debug, Clone)]
pub struct SqsQueue {
    client: aws_sdk_sqs::Client,
}

impl SqsQueue {
    pub fn new(client: aws_sdk_sqs::Client) -> Self {
        Self { client }
    }
}

fn queue_error(action: &str, error: impl std::error::Error) -> QueueError {
    QueueError::Other(format!("{action}: {}", DisplayErrorContext(&error)))
}

impl Queue for SqsQueue {
    async fn send_batch(
        &self,
        queue_url: &str,
        messages: &[OutgoingMessage],
    ) -> Result<Vec<String>, QueueError> {
        if messages.is_empty() {
            return Ok(Vec::new());
        }
        let mut request = self.client.send_message_batch().queue_url(queue_url);
        for message in messages {
            let entry = SendMessageBatchRequestEntry::builder()
                .id(&message.id)
                .message_body(&message.body)
                .build()
                .map_err(|e| queue_error("building a message", e))?;
            request = request.entries(entry);
        }
        let output = request
            .send()
            .await
            .map_err(|e| queue_error("sending messages", e))?;
        Ok(output.failed.into_iter().map(|f| f.id).collect())
    }

    async fn receive(
        &self,
        queue_url: &str,
        max: u32,
        visibility_timeout: Duration,
        wait: Duration,
    ) -> Result<Vec<ReceivedMessage>, QueueError> {
        let output = self
            .client
            .receive_message()
            .queue_url(queue_url)
            .max_number_of_messages(max.clamp(1, 10) as i32)
            .visibility_timeout(visibility_timeout.as_secs().min(43_200) as i32)
            .wait_time_seconds(wait.as_secs().min(20) as i32)
            .message_system_attribute_names(MessageSystemAttributeName::ApproximateReceiveCount)
            .send()
            .await
            .map_err(|e| queue_error("receiving messages", e))?;
        Ok(output
            .messages
            .unwrap_or_default()
            .into_iter()
            .map(|m| {
                let receive_count = m
                    .attributes
                    .as_ref()
                    .and_then(|a| a.get(&MessageSystemAttributeName::ApproximateReceiveCount))
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(1);
                ReceivedMessage {
                    message_id: m.message_id.unwrap_or_default(),
                    receipt_handle: m.receipt_handle.unwrap_or_default(),
                    body: m.body.unwrap_or_default(),
                    receive_count,
                }
            })
            .collect())
    }

    async fn depth(&self, queue_url: &str) -> Result<QueueDepth, QueueError> {
        let output = self
            .client
            .get_queue_attributes()
            .queue_url(queue_url)
            .attribute_names(QueueAttributeName::ApproximateNumberOfMessages)
            .attribute_names(QueueAttributeName::ApproximateNumberOfMessagesNotVisible)
            .send()
            .await
            .map_err(|e| queue_error("reading the queue's depth", e))?;
        let count = |name: QueueAttributeName| {
            output
                .attributes
                .as_ref()
                .and_then(|a| a.get(&name))
                .and_then(|v| v.parse().ok())
                .unwrap_or(0)
        };
        Ok(QueueDepth {
            visible: count(QueueAttributeName::ApproximateNumberOfMessages),
            in_flight: count(QueueAttributeName::ApproximateNumberOfMessagesNotVisible),
        })
    }

    async fn delete_batch(
        &self,
        queue_url: &str,
        receipt_handles: &[String],
    ) -> Result<Vec<String>, QueueError> {
        if receipt_handles.is_empty() {
            return Ok(Vec::new());
        }
        let mut request = self.client.delete_message_batch().queue_url(queue_url);
        for (i, handle) in receipt_handles.iter().enumerate() {
            let entry = DeleteMessageBatchRequestEntry::builder()
                .id(i.to_string())
                .receipt_handle(handle)
                .build()
                .map_err(|e| queue_error("building a delete", e))?;
            request = request.entries(entry);
        }
        let output = request
            .send()
            .await
            .map_err(|e| queue_error("deleting messages", e))?;
        Ok(output
            .failed
            .into_iter()
            .filter_map(|f| f.id.parse::<usize>().ok())
            .filter_map(|i| receipt_handles.get(i).cloned())
            .collect())
    }
}

/// Why a secret setting could not be read. Never carries the secret itself.
#[derive(Debug, thiserror::Error)]
pub enum SecretSettingError {
    #[error("{name} must be set ({what}), or {name}_SECRET_ARN to read it from Secrets Manager")]
    Missing {
        name: &'static str,
        what: &'static str,
    },
    #[error("reading {name} from Secrets Manager ({arn}): {detail}")]
    Read {
        name: &'static str,
        arn: String,
        detail: String,
    },
}

/// A secret setting's value: read from Secrets Manager when its ARN is given (on AWS, once
/// at cold start), else the value given directly (local runs), else `None`.
pub async fn resolve_secret(
    sdk: &SdkConfig,
    name: &'static str,
    value: Option<&SecretString>,
    arn: Option<&str>,
) -> Result<Option<SecretString>, SecretSettingError> {
    if let Some(arn) = arn.filter(|v| !v.trim().is_empty()) {
        let client = aws_sdk_secretsmanager::Client::new(sdk);
        let read = |detail: String| SecretSettingError::Read {
            name,
            arn: arn.to_owned(),
            detail,
        };
        let output = client
            .get_secret_value()
            .secret_id(arn)
            .send()
            .await
            .map_err(|e| read(DisplayErrorContext(&e).to_string()))?;
        let value = output
            .secret_string
            .ok_or_else(|| read("the secret has no string value".into()))?;
        return Ok(Some(SecretString::from(value.trim().to_owned())));
    }
    Ok(value
        .filter(|v| !v.expose_secret().trim().is_empty())
        .cloned())
}

/// A setting that holds a secret, looked up by name: `<NAME>_SECRET_ARN` names a Secrets
/// Manager secret, `<NAME>` holds the value itself ([`resolve_secret`]). `env` looks
/// variables up. The functions read theirs through their settings type instead.
pub async fn secret_setting(
    sdk: &SdkConfig,
    name: &'static str,
    env: impl Fn(&str) -> Option<String>,
) -> Result<Option<SecretString>, SecretSettingError> {
    let arn = env(&format!("{name}_SECRET_ARN"));
    let value = env(name).map(SecretString::from);
    resolve_secret(sdk, name, value.as_ref(), arn.as_deref()).await
}

/// Like [`secret_setting`], for a secret that must be there.
pub async fn required_secret(
    sdk: &SdkConfig,
    name: &'static str,
    what: &'static str,
    env: impl Fn(&str) -> Option<String>,
) -> Result<SecretString, SecretSettingError> {
    secret_setting(sdk, name, env)
        .await?
        .ok_or(SecretSettingError::Missing { name, what })
}

/// The process environment, for [`secret_setting`].
pub fn process_env(name: &str) -> Option<String> {
    std::env::var(name).ok()
}

/// Why the provider's client could not be made.
#[derive(Debug, thiserror::Error)]
pub enum ProviderClientError {
    #[error(transparent)]
    Settings(#[from] SettingsError),
    #[error(transparent)]
    Secret(#[from] SecretSettingError),
    #[error(transparent)]
    Client(#[from] shotlabel_core::batch_api::BatchApiError),
}

/// The provider's client from a function's settings: the URL, and the API key from
/// Secrets Manager (by ARN) or given directly.
pub async fn batch_client(
    sdk: &SdkConfig,
    settings: &ProviderSettings,
) -> Result<shotlabel_batch_client::BatchClient, ProviderClientError> {
    let api_key = resolve_secret(
        sdk,
        "SHOTLABEL_API_KEY",
        settings.api_key.as_ref(),
        settings.api_key_secret_arn.as_deref(),
    )
    .await?
    .ok_or(SecretSettingError::Missing {
        name: "SHOTLABEL_API_KEY",
        what: "the provider's API key",
    })?;
    let mut config = shotlabel_batch_client::BatchApiConfig::new(&settings.provider_url, api_key)?;
    config.file_ready_timeout = settings.provider.defaults().file_ready_wait;
    Ok(shotlabel_batch_client::BatchClient::new(config)?)
}

/// The provider's client from the process environment (`SHOTLABEL_PROVIDER_URL`, and
/// `SHOTLABEL_API_KEY_SECRET_ARN` or `SHOTLABEL_API_KEY`), for callers without a
/// settings type.
pub async fn batch_client_from_env(
    sdk: &SdkConfig,
    env: impl Fn(&str) -> Option<String>,
) -> Result<shotlabel_batch_client::BatchClient, ProviderClientError> {
    let provider_url = env("SHOTLABEL_PROVIDER_URL")
        .filter(|v| !v.trim().is_empty())
        .ok_or(SettingsError::Missing {
            name: "SHOTLABEL_PROVIDER_URL".into(),
            what: "the provider's Batch API root, e.g. https://api.openai.com/v1".into(),
        })?;
    let provider = ProviderProfile::from_setting(env("SHOTLABEL_PROVIDER").as_deref())?;
    let settings = ProviderSettings {
        provider,
        delete_provider_files: None,
        provider_url,
        api_key: env("SHOTLABEL_API_KEY").map(SecretString::from),
        api_key_secret_arn: env("SHOTLABEL_API_KEY_SECRET_ARN"),
    };
    batch_client(sdk, &settings).await
}

#[cfg(test)]
mod tests {
    use super::wants_path_style;

    #[test]
    fn path_style_follows_the_endpoint_unless_told_otherwise() {
        assert!(!wants_path_style(false, None));
        assert!(wants_path_style(true, None));
        assert!(wants_path_style(false, Some(true)));
        assert!(!wants_path_style(true, Some(false)));
    }
}
