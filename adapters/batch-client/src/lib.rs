//! The HTTP client for an OpenAI-compatible Batch API.

use std::path::Path;
use std::pin::Pin;
use std::time::Duration;

use bytes::Bytes;
use futures_util::{Stream, TryStreamExt};
use reqwest::header::{HeaderMap, RETRY_AFTER};
use reqwest::{Method, RequestBuilder, Response, StatusCode};
use secrecy::{ExposeSecret, SecretString};
use tokio::io::AsyncBufRead;
use tokio_util::io::{ReaderStream, StreamReader};
use url::Url;

use shotlabel_core::batch_api::{
    Batch, BatchApiError, BatchPage, CreateBatchRequest, FileObject, FileReadiness,
};
use shotlabel_core::ports::{BatchProvider, LineReader};

/// Where the provider is and how to talk to it.
#[derive(Debug, Clone)]
pub struct BatchApiConfig {
    /// The API root including its version segment, e.g. `https://api.openai.com/v1` or
    /// `https://batch.inference.net/v1`; calls go to `<base_url>/files`, `<base_url>/batches`.
    pub base_url: Url,
    pub api_key: SecretString,
    pub retry: RetryPolicy,
    /// Longest wait for a connection to open.
    pub connect_timeout: Duration,
    /// Longest silence while reading a response or sending a body; large uploads and
    /// downloads are bounded by progress, not by a total time.
    pub read_timeout: Duration,
    /// Longest wait, after an upload, for the provider to report the file `processed`
    /// (OpenAI has refused a batch created at once from a file it was still reading).
    /// `None`: the file's status is not looked at (a provider that reports none).
    pub file_ready_timeout: Option<Duration>,
    /// How often the file's status is asked for meanwhile.
    pub file_poll_interval: Duration,
}

impl BatchApiConfig {
    pub fn new(base_url: &str, api_key: SecretString) -> Result<Self, BatchApiError> {
        let mut base_url = Url::parse(base_url).map_err(|e| {
            BatchApiError::Config(format!("provider base URL {base_url:?} is not a URL: {e}"))
        })?;
        if !matches!(base_url.scheme(), "http" | "https") {
            return Err(BatchApiError::Config(format!(
                "provider base URL must be http or https, not {}",
                base_url.scheme()
            )));
        }
        // Url::join replaces the last segment unless the path ends in '/'.
        if !base_url.path().ends_with('/') {
            let path = format!("{}/", base_url.path());
            base_url.set_path(&path);
        }
        Ok(Self {
            base_url,
            api_key,
            retry: RetryPolicy::default(),
            connect_timeout: Duration::from_secs(10),
            read_timeout: Duration::from_secs(120),
            file_ready_timeout: Some(Duration::from_secs(60)),
            file_poll_interval: Duration::from_secs(1),
        })
    }
}

/// Retries with exponential backoff and full jitter, for 429, 5xx and transport errors.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RetryPolicy {
    /// Attempts in all, the first included.
    pub max_attempts: u32,
    pub initial_backoff: Duration,
    pub max_backoff: Duration,
    /// The longest `Retry-After` honoured; a provider asking for longer gets this.
    pub max_retry_after: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            max_attempts: 6,
            initial_backoff: Duration::from_millis(500),
            max_backoff: Duration::from_secs(30),
            max_retry_after: Duration::from_secs(120),
        }
    }
}

impl RetryPolicy {
    /// No retries at all.
    pub fn none() -> Self {
        Self {
            max_attempts: 1,
            ..Self::default()
        }
    }

    /// The wait before retry number `retry` (1-based): uniform in [0, min(max, initial * 2^(retry-1))].
    fn backoff(&self, retry: u32) -> Duration {
        let exp = self
            .initial_backoff
            .saturating_mul(1u32 << retry.saturating_sub(1).min(20));
        let cap = exp.min(self.max_backoff);
        let millis = u64::try_from(cap.as_millis()).unwrap_or(u64::MAX);
        Duration::from_millis(rand::random_range(0..=millis))
    }
}

/// A stream of a file's bytes as they arrive.
pub type ByteStream = Pin<Box<dyn Stream<Item = std::io::Result<Bytes>> + Send>>;

/// Talks to one provider. Cheap to clone: the connection pool is shared.
#[derive(Clone)]
pub struct BatchClient {
    http: reqwest::Client,
    base_url: Url,
    api_key: SecretString,
    retry: RetryPolicy,
    file_ready_timeout: Option<Duration>,
    file_poll_interval: Duration,
}

/// Whether a call may simply be sent again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Resend {
    /// Reads, uploads and cancels: a repeat does no harm (a repeated upload leaves an
    /// unused file, not a billed batch).
    Always,
    /// Batch creation: only what cannot have reached the provider is sent again (429, a
    /// connection that never opened); anything else may have created the batch.
    IfNotReceived,
}

/// Batches looked through, newest first, for one whose creation's answer was lost.
const LOOKUP_PAGE: usize = 100;
const LOOKUP_PAGES: usize = 10;

impl std::fmt::Debug for BatchClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BatchClient")
            .field("base_url", &self.base_url.as_str())
            .field("api_key", &"[redacted]")
            .field("retry", &self.retry)
            .finish()
    }
}

impl BatchClient {
    pub fn new(config: BatchApiConfig) -> Result<Self, BatchApiError> {
        let http = reqwest::Client::builder()
            .connect_timeout(config.connect_timeout)
            .read_timeout(config.read_timeout)
            .user_agent(concat!("shotlabel/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| BatchApiError::Config(format!("cannot build the HTTP client: {e}")))?;
        Ok(Self {
            http,
            base_url: config.base_url,
            api_key: config.api_key,
            retry: config.retry,
            file_ready_timeout: config.file_ready_timeout,
            file_poll_interval: config.file_poll_interval,
        })
    }

    pub fn base_url(&self) -> &Url {
        &self.base_url
    }

    /// Uploads a JSONL file for a batch (`purpose=batch`), streaming it from disk.
    pub async fn upload_file(&self, path: &Path) -> Result<FileObject, BatchApiError> {
        const OP: &str = "upload file";
        let filename = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "batch.jsonl".into());
        let file_error = |e: std::io::Error| BatchApiError::File {
            operation: OP,
            path: path.display().to_string(),
            detail: e.to_string(),
        };
        let response = self
            .send(OP, Resend::Always, || async {
                // Reopened on every attempt: a body stream cannot be replayed.
                let file = tokio::fs::File::open(path).await.map_err(file_error)?;
                let length = file.metadata().await.map_err(file_error)?.len();
                let body = reqwest::Body::wrap_stream(ReaderStream::with_capacity(file, 1 << 16));
                let part = reqwest::multipart::Part::stream_with_length(body, length)
                    .file_name(filename.clone())
                    .mime_str("application/jsonl")
                    .map_err(|e| BatchApiError::Config(e.to_string()))?;
                let form = reqwest::multipart::Form::new()
                    .text("purpose", "batch")
                    .part("file", part);
                Ok(self.request(Method::POST, "files")?.multipart(form))
            })
            .await?;
        let file: FileObject = self.json(OP, response).await?;
        match self.file_ready_timeout {
            Some(timeout) => self.wait_until_processed(file, timeout).await,
            None => Ok(file),
        }
    }

    /// Waits, within `timeout`, until the provider has read an upload. A
    /// provider that reports no status is taken at its word that the file is usable.
    async fn wait_until_processed(
        &self,
        mut file: FileObject,
        timeout: Duration,
    ) -> Result<FileObject, BatchApiError> {
        let started = std::time::Instant::now();
        loop {
            match file.readiness() {
                FileReadiness::Ready => return Ok(file),
                FileReadiness::Refused => {
                    return Err(BatchApiError::FileRefused {
                        detail: file
                            .status_details
                            .clone()
                            .unwrap_or_else(|| "no reason given".into()),
                        file_id: file.id,
                    });
                }
                FileReadiness::Processing => {}
            }
            if started.elapsed() >= timeout {
                return Err(BatchApiError::FileNotReady {
                    status: file.status.unwrap_or_default(),
                    waited_secs: started.elapsed().as_secs(),
                    file_id: file.id,
                });
            }
            tokio::time::sleep(self.file_poll_interval).await;
            file = self.retrieve_file(&file.id).await?;
        }
    }

    pub async fn retrieve_file(&self, file_id: &str) -> Result<FileObject, BatchApiError> {
        const OP: &str = "retrieve file";
        let path = format!("files/{}", encode_segment(file_id));
        let response = self
            .send(OP, Resend::Always, || async {
                self.request(Method::GET, &path)
            })
            .await?;
        self.json(OP, response).await
    }

    /// Deletes a file. One already gone (404) counts as deleted.
    pub async fn delete_file(&self, file_id: &str) -> Result<(), BatchApiError> {
        const OP: &str = "delete file";
        let path = format!("files/{}", encode_segment(file_id));
        match self
            .send(OP, Resend::Always, || async {
                self.request(Method::DELETE, &path)
            })
            .await
        {
            Ok(_) => Ok(()),
            Err(e) if e.status() == Some(404) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// One page of the provider's batches, newest first.
    pub async fn list_batches(
        &self,
        after: Option<&str>,
        limit: usize,
    ) -> Result<BatchPage, BatchApiError> {
        const OP: &str = "list batches";
        let mut url = self.url("batches")?;
        url.query_pairs_mut()
            .append_pair("limit", &limit.to_string());
        if let Some(after) = after {
            url.query_pairs_mut().append_pair("after", after);
        }
        let response = self
            .send(OP, Resend::Always, || async {
                Ok(self.authorised(Method::GET, url.clone()))
            })
            .await?;
        self.json(OP, response).await
    }

    /// Creates a batch from an uploaded input file. A creation whose answer is lost (a
    /// 5xx, a timeout, an unreadable body) may still have made the batch, so before it is
    /// sent again the provider's newest batches are searched for the one made from this
    /// input file (and, where the provider keeps metadata, this manifest): a second,
    /// billed batch is made only if the first is not found. See ARCHITECTURE.md for the
    /// window that remains.
    pub async fn create_batch(&self, request: &CreateBatchRequest) -> Result<Batch, BatchApiError> {
        const OP: &str = "create batch";
        let mut attempt = 1;
        loop {
            let outcome = match self
                .send(OP, Resend::IfNotReceived, || async {
                    Ok(self.request(Method::POST, "batches")?.json(request))
                })
                .await
            {
                Ok(response) => self.json::<Batch>(OP, response).await,
                Err(e) => Err(e),
            };
            let error = match outcome {
                Ok(batch) => return Ok(batch),
                Err(e) if creation_may_have_happened(&e) => e,
                Err(e) => return Err(e),
            };
            match self.find_created(request).await {
                Ok(Some(batch)) => {
                    tracing::warn!(batch_id = %batch.id, error = %error,
                        "batch creation answered with an error, but the batch exists; using it");
                    return Ok(batch);
                }
                Ok(None) => {}
                Err(lookup) => {
                    // Not knowing whether it exists, a second creation could bill twice.
                    tracing::warn!(error = %lookup, "cannot look for a batch whose creation failed");
                    return Err(error);
                }
            }
            if attempt >= self.retry.max_attempts {
                return Err(error);
            }
            let wait = self.retry.backoff(attempt);
            tracing::warn!(attempt, error = %error,
                wait_ms = u64::try_from(wait.as_millis()).unwrap_or(u64::MAX),
                "batch creation failed and no batch was made from the file; creating it again");
            tokio::time::sleep(wait).await;
            attempt += 1;
        }
    }

    /// The batch made from this request's input file, among the newest
    /// `LOOKUP_PAGES × LOOKUP_PAGE` batches. Its metadata, where the provider keeps it,
    /// must hold the request's.
    async fn find_created(
        &self,
        request: &CreateBatchRequest,
    ) -> Result<Option<Batch>, BatchApiError> {
        let mut after: Option<String> = None;
        for _ in 0..LOOKUP_PAGES {
            let page = self.list_batches(after.as_deref(), LOOKUP_PAGE).await?;
            if let Some(batch) = page.data.iter().find(|b| made_from(b, request)) {
                return Ok(Some(batch.clone()));
            }
            let next = page
                .last_id
                .clone()
                .or_else(|| page.data.last().map(|b| b.id.clone()));
            match next {
                Some(next) if page.has_more && !page.data.is_empty() => after = Some(next),
                _ => break,
            }
        }
        Ok(None)
    }

    pub async fn retrieve_batch(&self, batch_id: &str) -> Result<Batch, BatchApiError> {
        const OP: &str = "retrieve batch";
        let path = format!("batches/{}", encode_segment(batch_id));
        let response = self
            .send(OP, Resend::Always, || async {
                self.request(Method::GET, &path)
            })
            .await?;
        self.json(OP, response).await
    }

    pub async fn cancel_batch(&self, batch_id: &str) -> Result<Batch, BatchApiError> {
        const OP: &str = "cancel batch";
        let path = format!("batches/{}/cancel", encode_segment(batch_id));
        let response = self
            .send(OP, Resend::Always, || async {
                self.request(Method::POST, &path)
            })
            .await?;
        self.json(OP, response).await
    }

    /// Streams a file's content (an output or error file) without holding it in memory.
    pub async fn file_content(&self, file_id: &str) -> Result<ByteStream, BatchApiError> {
        const OP: &str = "download file";
        let path = format!("files/{}/content", encode_segment(file_id));
        let response = self
            .send(OP, Resend::Always, || async {
                self.request(Method::GET, &path)
            })
            .await?;
        let stream = response
            .bytes_stream()
            .map_err(|e| std::io::Error::other(format!("{OP}: {}", without_url(&e))));
        Ok(Box::pin(stream))
    }

    /// A file's content as a buffered reader, for reading it line by line.
    pub async fn file_reader(
        &self,
        file_id: &str,
    ) -> Result<impl AsyncBufRead + Send + Unpin + use<>, BatchApiError> {
        Ok(StreamReader::new(self.file_content(file_id).await?))
    }

    fn url(&self, path: &str) -> Result<Url, BatchApiError> {
        self.base_url
            .join(path)
            .map_err(|e| BatchApiError::Config(format!("cannot build a URL for {path:?}: {e}")))
    }

    fn authorised(&self, method: Method, url: Url) -> RequestBuilder {
        self.http
            .request(method, url)
            .bearer_auth(self.api_key.expose_secret())
    }

    fn request(&self, method: Method, path: &str) -> Result<RequestBuilder, BatchApiError> {
        Ok(self.authorised(method, self.url(path)?))
    }

    /// Sends a request built by `build` (called anew for each attempt), retrying 429, 5xx
    /// and transport failures. Any other status is returned as an error at once.
    async fn send<F, Fut>(
        &self,
        operation: &'static str,
        resend: Resend,
        build: F,
    ) -> Result<Response, BatchApiError>
    where
        F: Fn() -> Fut,
        Fut: std::future::Future<Output = Result<RequestBuilder, BatchApiError>>,
    {
        let mut attempt = 1;
        loop {
            let outcome = build().await?.send().await;
            let (error, retry_after) = match outcome {
                Ok(response) if response.status().is_success() => return Ok(response),
                Ok(response) => {
                    let status = response.status();
                    let retry_after = retry_after(response.headers());
                    // Redacted before it is cut short: a cut through the key would leave
                    // a piece of it that no longer matches.
                    let message = error_message(response, |text| self.redact(text)).await;
                    let error = BatchApiError::Status {
                        operation,
                        status: status.as_u16(),
                        message,
                    };
                    let resendable = match resend {
                        Resend::Always => is_retryable_status(status),
                        Resend::IfNotReceived => status == StatusCode::TOO_MANY_REQUESTS,
                    };
                    if !resendable {
                        return Err(error);
                    }
                    (error, retry_after)
                }
                Err(e) => {
                    let never_sent = e.is_connect();
                    let error = BatchApiError::Transport {
                        operation,
                        detail: self.redact(&without_url(&e)),
                    };
                    if resend == Resend::IfNotReceived && !never_sent {
                        return Err(error);
                    }
                    (error, None)
                }
            };
            if attempt >= self.retry.max_attempts {
                return Err(error);
            }
            let wait = match retry_after {
                Some(asked) => asked.min(self.retry.max_retry_after),
                None => self.retry.backoff(attempt),
            };
            tracing::warn!(
                operation,
                attempt,
                wait_ms = u64::try_from(wait.as_millis()).unwrap_or(u64::MAX),
                error = %error,
                "batch API call failed; retrying"
            );
            tokio::time::sleep(wait).await;
            attempt += 1;
        }
    }

    async fn json<T: serde::de::DeserializeOwned>(
        &self,
        operation: &'static str,
        response: Response,
    ) -> Result<T, BatchApiError> {
        let body = response
            .bytes()
            .await
            .map_err(|e| BatchApiError::Transport {
                operation,
                detail: self.redact(&without_url(&e)),
            })?;
        serde_json::from_slice(&body).map_err(|e| BatchApiError::Decode {
            operation,
            detail: format!(
                "{e}; body starts {:?}",
                snippet(self.redact(&String::from_utf8_lossy(&body)).as_bytes())
            ),
        })
    }

    /// Removes the API key from text that came from elsewhere (a provider's error body
    /// may echo it back).
    fn redact(&self, text: &str) -> String {
        let key = self.api_key.expose_secret();
        if key.len() >= 4 && text.contains(key) {
            text.replace(key, "[redacted]")
        } else {
            text.to_owned()
        }
    }
}

/// After this, the provider may have created the batch: it answered 5xx or 408, the
/// answer never came back whole, or it came back unreadable.
fn creation_may_have_happened(error: &BatchApiError) -> bool {
    match error {
        BatchApiError::Status { status, .. } => *status >= 500 || *status == 408,
        BatchApiError::Transport { .. } | BatchApiError::Decode { .. } => true,
        _ => false,
    }
}

/// Whether `batch` was made by `request`: the same input file (each upload has its own
/// id) and, when the provider echoes metadata, the same metadata.
fn made_from(batch: &Batch, request: &CreateBatchRequest) -> bool {
    batch.input_file_id.as_deref() == Some(request.input_file_id.as_str())
        && (batch.metadata.is_empty()
            || request
                .metadata
                .iter()
                .all(|(k, v)| batch.metadata.get(k) == Some(v)))
}

fn is_retryable_status(status: StatusCode) -> bool {
    status == StatusCode::TOO_MANY_REQUESTS || status.is_server_error()
}

/// `retry-after-ms` (OpenAI's), else `Retry-After` in seconds or as an HTTP date.
fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    if let Some(ms) = headers
        .get("retry-after-ms")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<f64>().ok())
        .filter(|ms| ms.is_finite() && *ms >= 0.0)
    {
        return Some(Duration::from_secs_f64(ms / 1000.0));
    }
    let value = headers.get(RETRY_AFTER)?.to_str().ok()?.trim();
    if let Ok(secs) = value.parse::<f64>() {
        return (secs.is_finite() && secs >= 0.0).then(|| Duration::from_secs_f64(secs));
    }
    let when = httpdate::parse_http_date(value).ok()?;
    Some(
        when.duration_since(std::time::SystemTime::now())
            .unwrap_or(Duration::ZERO),
    )
}

/// The provider's `error.message` when the body is OpenAI-style JSON, else a snippet;
/// `redact` is applied to the whole text before it is shortened.
async fn error_message(response: Response, redact: impl Fn(&str) -> String) -> String {
    let body = match response.bytes().await {
        Ok(body) => body,
        Err(_) => return "(no body)".into(),
    };
    let body = redact(&String::from_utf8_lossy(&body)).into_bytes();
    if let Ok(value) = serde_json::from_slice::<serde_json::Value>(&body) {
        let message = value
            .pointer("/error/message")
            .or_else(|| value.get("message"))
            .or_else(|| value.get("detail"))
            .or_else(|| value.get("error"))
            .and_then(|m| m.as_str());
        if let Some(message) = message {
            // Again after parsing: JSON escapes can spell the key so that the raw body
            // did not show it.
            return redact(message).chars().take(500).collect();
        }
    }
    if body.is_empty() {
        "(no body)".into()
    } else {
        snippet(&body)
    }
}

fn snippet(body: &[u8]) -> String {
    String::from_utf8_lossy(&body[..body.len().min(300)]).into_owned()
}

/// A reqwest error's kind and causes, without the URL it names (which says nothing the
/// operation name does not).
fn without_url(error: &reqwest::Error) -> String {
    let mut text = if error.is_timeout() {
        "timed out"
    } else if error.is_connect() {
        "connection failed"
    } else if error.is_body() || error.is_decode() {
        "reading the body failed"
    } else {
        "request failed"
    }
    .to_owned();
    let mut source = std::error::Error::source(error);
    while let Some(inner) = source {
        text.push_str(": ");
        text.push_str(&inner.to_string());
        source = inner.source();
    }
    text
}

/// Percent-encodes an id for use as one path segment (ids are opaque and may hold '/').
fn encode_segment(id: &str) -> String {
    url::form_urlencoded::byte_serialize(id.as_bytes())
        .collect::<String>()
        .replace('+', "%20")
}

impl BatchProvider for BatchClient {
    async fn upload(&self, path: &Path) -> Result<FileObject, BatchApiError> {
        self.upload_file(path).await
    }

    async fn create(&self, request: &CreateBatchRequest) -> Result<Batch, BatchApiError> {
        self.create_batch(request).await
    }

    async fn retrieve(&self, batch_id: &str) -> Result<Batch, BatchApiError> {
        self.retrieve_batch(batch_id).await
    }

    async fn open_file(&self, file_id: &str) -> Result<LineReader, BatchApiError> {
        Ok(Box::pin(self.file_reader(file_id).await?))
    }

    async fn delete_file(&self, file_id: &str) -> Result<(), BatchApiError> {
        BatchClient::delete_file(self, file_id).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use reqwest::header::HeaderValue;

    #[test]
    fn retry_after_reads_seconds_ms_and_dates() {
        let mut h = HeaderMap::new();
        h.insert(RETRY_AFTER, HeaderValue::from_static("2"));
        assert_eq!(retry_after(&h), Some(Duration::from_secs(2)));
        h.insert("retry-after-ms", HeaderValue::from_static("250"));
        assert_eq!(retry_after(&h), Some(Duration::from_millis(250)));
        let mut h = HeaderMap::new();
        h.insert(
            RETRY_AFTER,
            HeaderValue::from_static("Wed, 21 Oct 2015 07:28:00 GMT"),
        );
        assert_eq!(
            retry_after(&h),
            Some(Duration::ZERO),
            "a past date means now"
        );
        h.insert(RETRY_AFTER, HeaderValue::from_static("soon"));
        assert_eq!(retry_after(&h), None);
    }

    #[test]
    fn backoff_is_bounded_and_grows() {
        let policy = RetryPolicy {
            max_attempts: 10,
            initial_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_millis(1000),
            max_retry_after: Duration::from_secs(5),
        };
        let mut largest_seen = Vec::new();
        for retry in 1..=12 {
            let cap = Duration::from_millis((100u64 << (retry - 1).min(20)).min(1000));
            let draws: Vec<Duration> = (0..200).map(|_| policy.backoff(retry)).collect();
            assert!(
                draws.iter().all(|d| *d <= cap),
                "retry {retry} over {cap:?}"
            );
            // Full jitter is uniform in [0, cap]: of 200 draws one falls in the top half
            // but with probability 2^-200.
            let largest = draws.into_iter().max().unwrap_or_default();
            assert!(
                largest > cap / 2,
                "retry {retry}: at most {largest:?} of {cap:?}"
            );
            largest_seen.push(largest);
        }
        // It grows: the third retry waits longer than the first may (100 ms → 400 ms), and
        // from the fifth on it stays at the 1 s ceiling.
        assert!(largest_seen[2] > Duration::from_millis(100));
        assert!(largest_seen[11] > Duration::from_millis(500));
    }

    #[test]
    fn ids_are_encoded_as_one_segment() {
        assert_eq!(encode_segment("batch_abc"), "batch_abc");
        assert_eq!(encode_segment("a/b c"), "a%2Fb%20c");
    }

    #[test]
    fn base_url_keeps_its_version_segment() -> anyhow::Result<()> {
        let config = BatchApiConfig::new("http://127.0.0.1:9/v1", SecretString::from("k"))?;
        assert_eq!(
            config.base_url.join("files")?.as_str(),
            "http://127.0.0.1:9/v1/files"
        );
        assert!(BatchApiConfig::new("ftp://x/v1", SecretString::from("k")).is_err());
        Ok(())
    }
}
