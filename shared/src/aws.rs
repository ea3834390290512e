//! AWS SDK clients built from standard configuration.
//!
//! The endpoint comes from the SDK's own settings (`AWS_ENDPOINT_URL`,
//! `AWS_ENDPOINT_URL_S3`, profiles), so the same binary talks to AWS or to moto server.
//! This is an adapter module: the domain modules never import it.

use std::time::Duration;

use aws_config::{BehaviorVersion, SdkConfig};
use aws_sdk_s3::error::{DisplayErrorContext, SdkError};
use aws_sdk_sqs::types::{
    DeleteMessageBatchRequestEntry, MessageSystemAttributeName, SendMessageBatchRequestEntry,
};
use secrecy::SecretString;

use crate::ports::{
    ObjectInfo, ObjectStore, OutgoingMessage, Queue, QueueError, ReceivedMessage, StoreError,
    StoredObject, WriteCondition,
};

/// Loads the SDK configuration the standard way (environment, profile, instance role).
pub async fn load_sdk_config() -> SdkConfig {
    aws_config::defaults(BehaviorVersion::latest()).load().await
}

/// Whether S3 must be addressed path-style (`http://host/bucket/key`): always for a custom
/// endpoint such as moto, which serves no bucket subdomains, or when
/// `SHOTLABEL_S3_PATH_STYLE` says so.
pub fn wants_path_style(custom_endpoint: bool, setting: Option<&str>) -> bool {
    match setting.map(|s| s.trim().to_ascii_lowercase()) {
        Some(s) if matches!(s.as_str(), "1" | "true" | "yes") => true,
        Some(s) if matches!(s.as_str(), "0" | "false" | "no") => false,
        _ => custom_endpoint,
    }
}

/// An S3 client for `config`, path-style where [`wants_path_style`] says so.
pub fn s3_client(config: &SdkConfig) -> aws_sdk_s3::Client {
    let custom_endpoint = config.endpoint_url().is_some()
        || std::env::var_os("AWS_ENDPOINT_URL_S3").is_some_and(|v| !v.is_empty());
    let setting = std::env::var("SHOTLABEL_S3_PATH_STYLE").ok();
    let s3_config = aws_sdk_s3::config::Builder::from(config)
        .force_path_style(wants_path_style(custom_endpoint, setting.as_deref()))
        .build();
    aws_sdk_s3::Client::from_conf(s3_config)
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
                keys.push(crate::s3_key::decode_event_key(&key).map_err(|e| {
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

/// A setting that holds a secret. On AWS, `<NAME>_SECRET_ARN` names a Secrets Manager
/// secret, read once at cold start; locally, `<NAME>` holds the value itself. `env`
/// looks variables up (the process environment in the functions).
pub async fn secret_setting(
    sdk: &SdkConfig,
    name: &'static str,
    env: impl Fn(&str) -> Option<String>,
) -> Result<Option<SecretString>, SecretSettingError> {
    let arn_name = format!("{name}_SECRET_ARN");
    if let Some(arn) = env(&arn_name).filter(|v| !v.trim().is_empty()) {
        let client = aws_sdk_secretsmanager::Client::new(sdk);
        let read = |detail: String| SecretSettingError::Read {
            name,
            arn: arn.clone(),
            detail,
        };
        let output = client
            .get_secret_value()
            .secret_id(&arn)
            .send()
            .await
            .map_err(|e| read(DisplayErrorContext(&e).to_string()))?;
        let value = output
            .secret_string
            .ok_or_else(|| read("the secret has no string value".into()))?;
        return Ok(Some(SecretString::from(value.trim().to_owned())));
    }
    Ok(env(name)
        .filter(|v| !v.trim().is_empty())
        .map(SecretString::from))
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

/// The provider's client: `SHOTLABEL_PROVIDER_URL`, and the API key from
/// `SHOTLABEL_API_KEY_SECRET_ARN` (Secrets Manager) or `SHOTLABEL_API_KEY`.
pub async fn batch_client_from_env(
    sdk: &SdkConfig,
    env: impl Fn(&str) -> Option<String>,
) -> Result<crate::batch_api::BatchClient, Box<dyn std::error::Error + Send + Sync>> {
    let base_url = env("SHOTLABEL_PROVIDER_URL")
        .filter(|v| !v.trim().is_empty())
        .ok_or(crate::settings::SettingsError::Missing {
            name: "SHOTLABEL_PROVIDER_URL",
            what: "the provider's Batch API root, e.g. https://api.openai.com/v1",
        })?;
    let api_key = required_secret(sdk, "SHOTLABEL_API_KEY", "the provider's API key", &env).await?;
    let config = crate::batch_api::BatchApiConfig::new(&base_url, api_key)?;
    Ok(crate::batch_api::BatchClient::new(config)?)
}

#[cfg(test)]
mod tests {
    use super::wants_path_style;

    #[test]
    fn path_style_follows_the_endpoint_unless_told_otherwise() {
        assert!(!wants_path_style(false, None));
        assert!(wants_path_style(true, None));
        assert!(wants_path_style(false, Some("true")));
        assert!(!wants_path_style(true, Some("0")));
        assert!(wants_path_style(true, Some("maybe")));
    }
}
