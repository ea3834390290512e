//! The small interfaces the pipeline's logic needs from the outside world. AWS adapters
//! (`crate::aws`) implement them on S3 and SQS; tests can implement them on anything.

use std::future::Future;
use std::path::Path;
use std::time::Duration;

use crate::batch_api::{Batch, BatchApiError, CreateBatchRequest, FileObject};

/// What is known about a stored object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectInfo {
    pub size: u64,
    /// Without the surrounding quotes S3 puts on it.
    pub etag: String,
}

/// An object's content with the etag it was read at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredObject {
    pub body: Vec<u8>,
    /// Without the surrounding quotes S3 puts on it.
    pub etag: String,
}

/// How a write treats an object that already exists.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WriteCondition {
    Overwrite,
    /// Only if nothing is there yet (`If-None-Match: *`).
    IfAbsent,
    /// Only if the object is still at this etag (`If-Match`).
    IfMatch(String),
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("s3://{bucket}/{key} does not exist")]
    NotFound { bucket: String, key: String },
    #[error("s3://{bucket}/{key} was not written: it exists already or changed")]
    ConditionFailed { bucket: String, key: String },
    #[error("object store: {0}")]
    Other(String),
}

/// An object store (S3).
pub trait ObjectStore: Send + Sync {
    fn get(
        &self,
        bucket: &str,
        key: &str,
    ) -> impl Future<Output = Result<StoredObject, StoreError>> + Send;

    /// `None` when there is no such object.
    fn head(
        &self,
        bucket: &str,
        key: &str,
    ) -> impl Future<Output = Result<Option<ObjectInfo>, StoreError>> + Send;

    /// Writes an object and returns its new etag.
    fn put(
        &self,
        bucket: &str,
        key: &str,
        body: Vec<u8>,
        content_type: &str,
        condition: WriteCondition,
    ) -> impl Future<Output = Result<String, StoreError>> + Send;

    /// Deletes an object; deleting what is not there is not an error.
    fn delete(
        &self,
        bucket: &str,
        key: &str,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Bytes `start..end` of an object (a ranged GET). The default reads the whole
    /// object; stores that can ask for a range do.
    fn get_range(
        &self,
        bucket: &str,
        key: &str,
        start: u64,
        end: u64,
    ) -> impl Future<Output = Result<Vec<u8>, StoreError>> + Send {
        async move {
            let object = self.get(bucket, key).await?;
            let len = object.body.len() as u64;
            let (start, end) = (start.min(len) as usize, end.min(len) as usize);
            Ok(object.body[start..end.max(start)].to_vec())
        }
    }

    /// Writes a file's content as an object, overwriting (a streamed PUT where the store
    /// can stream). The default reads the file into memory.
    fn put_file(
        &self,
        bucket: &str,
        key: &str,
        path: &Path,
        content_type: &str,
    ) -> impl Future<Output = Result<String, StoreError>> + Send {
        async move {
            let body = tokio::fs::read(path)
                .await
                .map_err(|e| StoreError::Other(format!("reading {}: {e}", path.display())))?;
            self.put(bucket, key, body, content_type, WriteCondition::Overwrite)
                .await
        }
    }

    /// Every key under `prefix`, in key order.
    fn list(
        &self,
        bucket: &str,
        prefix: &str,
    ) -> impl Future<Output = Result<Vec<String>, StoreError>> + Send;
}

/// A message to send; `id` is unique within one batch call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutgoingMessage {
    pub id: String,
    pub body: String,
}

/// A message as received, with what is needed to delete it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReceivedMessage {
    pub message_id: String,
    pub receipt_handle: String,
    pub body: String,
    /// How many times it has been received, this time included.
    pub receive_count: u32,
}

#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    #[error("queue: {0}")]
    Other(String),
}

/// How many messages a queue holds, by SQS's approximate counts.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct QueueDepth {
    /// Waiting to be received (`ApproximateNumberOfMessages`).
    pub visible: u64,
    /// Received and not yet deleted (`ApproximateNumberOfMessagesNotVisible`).
    pub in_flight: u64,
}

/// The most messages one batch call may carry (SQS's limit).
pub const MAX_BATCH_MESSAGES: usize = 10;

/// A message queue (SQS).
pub trait Queue: Send + Sync {
    /// Sends up to [`MAX_BATCH_MESSAGES`] messages; returns the ids the queue refused.
    fn send_batch(
        &self,
        queue_url: &str,
        messages: &[OutgoingMessage],
    ) -> impl Future<Output = Result<Vec<String>, QueueError>> + Send;

    /// Receives up to `max` messages, hiding them for `visibility_timeout`.
    fn receive(
        &self,
        queue_url: &str,
        max: u32,
        visibility_timeout: Duration,
        wait: Duration,
    ) -> impl Future<Output = Result<Vec<ReceivedMessage>, QueueError>> + Send;

    /// Deletes up to [`MAX_BATCH_MESSAGES`] messages; returns the receipt handles that failed.
    fn delete_batch(
        &self,
        queue_url: &str,
        receipt_handles: &[String],
    ) -> impl Future<Output = Result<Vec<String>, QueueError>> + Send;

    /// The queue's approximate depth (one `GetQueueAttributes` call). Queues that cannot
    /// tell say so; the dispatcher then starts no workers.
    fn depth(
        &self,
        queue_url: &str,
    ) -> impl Future<Output = Result<QueueDepth, QueueError>> + Send {
        let queue_url = queue_url.to_owned();
        async move {
            Err(QueueError::Other(format!(
                "{queue_url}: this queue cannot report its depth"
            )))
        }
    }
}

/// A provider's output or error file, read line by line.
pub type LineReader = std::pin::Pin<Box<dyn tokio::io::AsyncBufRead + Send>>;

/// An OpenAI-compatible Batch API. `shotlabel_batch_client::BatchClient` implements it over HTTP.
pub trait BatchProvider: Send + Sync {
    /// Uploads a JSONL input file.
    fn upload(&self, path: &Path)
    -> impl Future<Output = Result<FileObject, BatchApiError>> + Send;

    fn create(
        &self,
        request: &CreateBatchRequest,
    ) -> impl Future<Output = Result<Batch, BatchApiError>> + Send;

    fn retrieve(&self, batch_id: &str)
    -> impl Future<Output = Result<Batch, BatchApiError>> + Send;

    /// Opens a file's content for streaming.
    fn open_file(
        &self,
        file_id: &str,
    ) -> impl Future<Output = Result<LineReader, BatchApiError>> + Send;

    /// Deletes a file; deleting one that is already gone is not an error.
    fn delete_file(&self, file_id: &str) -> impl Future<Output = Result<(), BatchApiError>> + Send;
}
