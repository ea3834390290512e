//! Request counting on the ports: [`Metered`] wraps any [`ObjectStore`], [`Queue`] or
//! [`BatchProvider`], forwards every call to it unchanged, and counts the call by kind in
//! a [`RequestCounts`] that many wrappers can share. The local pipeline wraps its ports
//! with it so that a run can say how many billable AWS and provider requests it made per
//! image (`docs/scale.md`).
//!
//! What is counted is **port calls**, each made whether or not it succeeds (S3 and SQS
//! bill refused and failed requests too). Two differences from a bill remain:
//! - [`ObjectStore::list`] returns every key under a prefix and may issue several
//!   `ListObjectsV2` requests to do so, one per 1,000 keys; it is counted once per call.
//!   The pipeline lists only small prefixes (state markers), so the two rarely differ.
//! - Retries inside an adapter (the AWS SDK's, `BatchClient`'s backoff) are not seen here:
//!   one port call is one count, however many HTTP attempts it took.
//!
//! `get` and `get_range` are counted apart (both are billed as S3 GETs): ranged reads
//! are what sharded harvest adds, and keeping them apart shows it. `put` and `put_file`
//! are both counted as PUT.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::batch_api::{Batch, BatchApiError, CreateBatchRequest, FileObject};
use crate::ports::{
    BatchProvider, LineReader, ObjectInfo, ObjectStore, OutgoingMessage, Queue, QueueDepth,
    QueueError, ReceivedMessage, StoreError, StoredObject, WriteCondition,
};

/// The kinds of call counted, in the order [`RequestSnapshot::rows`] lists them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    S3Get,
    S3GetRange,
    S3Put,
    S3Head,
    S3Delete,
    S3List,
    SqsSend,
    SqsReceive,
    SqsDelete,
    SqsDepth,
    ProviderUpload,
    ProviderCreate,
    ProviderRetrieve,
    ProviderOpenFile,
    ProviderDeleteFile,
}

const KINDS: usize = 15;

/// Counts of port calls by kind, shared by every clone (cheap: one `Arc`). Not to be
/// confused with [`crate::batch_api::RequestCounts`], a batch's progress as the provider
/// reports it.
#[derive(Debug, Clone, Default)]
pub struct RequestCounts(Arc<[AtomicU64; KINDS]>);

impl RequestCounts {
    pub fn new() -> Self {
        Self::default()
    }

    fn add(&self, kind: Kind) {
        self.0[kind as usize].fetch_add(1, Ordering::Relaxed);
    }

    fn get(&self, kind: Kind) -> u64 {
        self.0[kind as usize].load(Ordering::Relaxed)
    }

    /// The counts so far.
    pub fn snapshot(&self) -> RequestSnapshot {
        RequestSnapshot {
            s3_get: self.get(Kind::S3Get),
            s3_get_range: self.get(Kind::S3GetRange),
            s3_put: self.get(Kind::S3Put),
            s3_head: self.get(Kind::S3Head),
            s3_delete: self.get(Kind::S3Delete),
            s3_list: self.get(Kind::S3List),
            sqs_send: self.get(Kind::SqsSend),
            sqs_receive: self.get(Kind::SqsReceive),
            sqs_delete: self.get(Kind::SqsDelete),
            sqs_depth: self.get(Kind::SqsDepth),
            provider_upload: self.get(Kind::ProviderUpload),
            provider_create: self.get(Kind::ProviderCreate),
            provider_retrieve: self.get(Kind::ProviderRetrieve),
            provider_open_file: self.get(Kind::ProviderOpenFile),
            provider_delete_file: self.get(Kind::ProviderDeleteFile),
        }
    }
}

/// Port calls by kind at one moment.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RequestSnapshot {
    /// `GetObject` of a whole object.
    pub s3_get: u64,
    /// `GetObject` with a `Range` (billed as a GET).
    pub s3_get_range: u64,
    /// `PutObject`, from `put` and `put_file`.
    pub s3_put: u64,
    pub s3_head: u64,
    pub s3_delete: u64,
    /// `list` calls; each may be several `ListObjectsV2` requests (one per 1,000 keys).
    pub s3_list: u64,
    /// `SendMessageBatch` (up to 10 messages each).
    pub sqs_send: u64,
    pub sqs_receive: u64,
    /// `DeleteMessageBatch` (up to 10 messages each).
    pub sqs_delete: u64,
    /// `GetQueueAttributes` (the queue's depth).
    pub sqs_depth: u64,
    pub provider_upload: u64,
    pub provider_create: u64,
    pub provider_retrieve: u64,
    pub provider_open_file: u64,
    /// `DELETE /files/{id}`, after a harvest.
    #[serde(default)]
    pub provider_delete_file: u64,
}

impl RequestSnapshot {
    /// Every kind with its count, named as the AWS and Batch API requests they stand for.
    pub fn rows(&self) -> [(&'static str, u64); KINDS] {
        [
            ("S3 GET", self.s3_get),
            ("S3 GET (range)", self.s3_get_range),
            ("S3 PUT", self.s3_put),
            ("S3 HEAD", self.s3_head),
            ("S3 DELETE", self.s3_delete),
            ("S3 LIST", self.s3_list),
            ("SQS SendMessageBatch", self.sqs_send),
            ("SQS ReceiveMessage", self.sqs_receive),
            ("SQS DeleteMessageBatch", self.sqs_delete),
            ("SQS GetQueueAttributes", self.sqs_depth),
            ("provider upload", self.provider_upload),
            ("provider create", self.provider_create),
            ("provider retrieve", self.provider_retrieve),
            ("provider file content", self.provider_open_file),
            ("provider file delete", self.provider_delete_file),
        ]
    }

    /// The requests made since `earlier`, kind by kind (what one stretch of a run cost).
    pub fn since(&self, earlier: &Self) -> Self {
        self.zip(earlier, u64::saturating_sub)
    }

    /// Both counts added, kind by kind (several functions' requests together).
    pub fn plus(&self, other: &Self) -> Self {
        self.zip(other, u64::saturating_add)
    }

    fn zip(&self, other: &Self, f: impl Fn(u64, u64) -> u64) -> Self {
        Self {
            s3_get: f(self.s3_get, other.s3_get),
            s3_get_range: f(self.s3_get_range, other.s3_get_range),
            s3_put: f(self.s3_put, other.s3_put),
            s3_head: f(self.s3_head, other.s3_head),
            s3_delete: f(self.s3_delete, other.s3_delete),
            s3_list: f(self.s3_list, other.s3_list),
            sqs_send: f(self.sqs_send, other.sqs_send),
            sqs_receive: f(self.sqs_receive, other.sqs_receive),
            sqs_delete: f(self.sqs_delete, other.sqs_delete),
            sqs_depth: f(self.sqs_depth, other.sqs_depth),
            provider_upload: f(self.provider_upload, other.provider_upload),
            provider_create: f(self.provider_create, other.provider_create),
            provider_retrieve: f(self.provider_retrieve, other.provider_retrieve),
            provider_open_file: f(self.provider_open_file, other.provider_open_file),
            provider_delete_file: f(self.provider_delete_file, other.provider_delete_file),
        }
    }

    /// S3 requests billed at the GET rate (GET, ranged GET, HEAD).
    pub fn s3_get_class(&self) -> u64 {
        self.s3_get + self.s3_get_range + self.s3_head
    }

    /// S3 requests billed at the PUT rate (PUT, LIST). DELETE is free and left out.
    pub fn s3_put_class(&self) -> u64 {
        self.s3_put + self.s3_list
    }

    /// Every SQS request.
    pub fn sqs(&self) -> u64 {
        self.sqs_send + self.sqs_receive + self.sqs_delete + self.sqs_depth
    }

    /// Every provider call.
    pub fn provider(&self) -> u64 {
        self.provider_upload
            + self.provider_create
            + self.provider_retrieve
            + self.provider_open_file
            + self.provider_delete_file
    }
}

/// A port that counts its calls in a shared [`RequestCounts`] and otherwise is `T`.
#[derive(Debug, Clone)]
pub struct Metered<T> {
    inner: T,
    counts: RequestCounts,
}

impl<T> Metered<T> {
    pub fn new(inner: T, counts: RequestCounts) -> Self {
        Self { inner, counts }
    }

    pub fn inner(&self) -> &T {
        &self.inner
    }

    pub fn counts(&self) -> &RequestCounts {
        &self.counts
    }
}

// Every method is forwarded explicitly, the default-implemented ones too, so that the
// inner port's own `get_range`, `put_file` and `depth` run (a ranged GET, a streamed PUT,
// a real depth), not the trait's fallbacks.
impl<T: ObjectStore> ObjectStore for Metered<T> {
    async fn get(&self, bucket: &str, key: &str) -> Result<StoredObject, StoreError> {
        self.counts.add(Kind::S3Get);
        self.inner.get(bucket, key).await
    }

    async fn head(&self, bucket: &str, key: &str) -> Result<Option<ObjectInfo>, StoreError> {
        self.counts.add(Kind::S3Head);
        self.inner.head(bucket, key).await
    }

    async fn put(
        &self,
        bucket: &str,
        key: &str,
        body: Vec<u8>,
        content_type: &str,
        condition: WriteCondition,
    ) -> Result<String, StoreError> {
        self.counts.add(Kind::S3Put);
        self.inner
            .put(bucket, key, body, content_type, condition)
            .await
    }

    async fn delete(&self, bucket: &str, key: &str) -> Result<(), StoreError> {
        self.counts.add(Kind::S3Delete);
        self.inner.delete(bucket, key).await
    }

    async fn get_range(
        &self,
        bucket: &str,
        key: &str,
        start: u64,
        end: u64,
    ) -> Result<Vec<u8>, StoreError> {
        self.counts.add(Kind::S3GetRange);
        self.inner.get_range(bucket, key, start, end).await
    }

    async fn put_file(
        &self,
        bucket: &str,
        key: &str,
        path: &Path,
        content_type: &str,
    ) -> Result<String, StoreError> {
        self.counts.add(Kind::S3Put);
        self.inner.put_file(bucket, key, path, content_type).await
    }

    async fn list(&self, bucket: &str, prefix: &str) -> Result<Vec<String>, StoreError> {
        self.counts.add(Kind::S3List);
        self.inner.list(bucket, prefix).await
    }
}

impl<T: Queue> Queue for Metered<T> {
    async fn send_batch(
        &self,
        queue_url: &str,
        messages: &[OutgoingMessage],
    ) -> Result<Vec<String>, QueueError> {
        self.counts.add(Kind::SqsSend);
        self.inner.send_batch(queue_url, messages).await
    }

    async fn receive(
        &self,
        queue_url: &str,
        max: u32,
        visibility_timeout: Duration,
        wait: Duration,
    ) -> Result<Vec<ReceivedMessage>, QueueError> {
        self.counts.add(Kind::SqsReceive);
        self.inner
            .receive(queue_url, max, visibility_timeout, wait)
            .await
    }

    async fn delete_batch(
        &self,
        queue_url: &str,
        receipt_handles: &[String],
    ) -> Result<Vec<String>, QueueError> {
        self.counts.add(Kind::SqsDelete);
        self.inner.delete_batch(queue_url, receipt_handles).await
    }

    async fn depth(&self, queue_url: &str) -> Result<QueueDepth, QueueError> {
        self.counts.add(Kind::SqsDepth);
        self.inner.depth(queue_url).await
    }
}

impl<T: BatchProvider> BatchProvider for Metered<T> {
    async fn upload(&self, path: &Path) -> Result<FileObject, BatchApiError> {
        self.counts.add(Kind::ProviderUpload);
        self.inner.upload(path).await
    }

    async fn create(&self, request: &CreateBatchRequest) -> Result<Batch, BatchApiError> {
        self.counts.add(Kind::ProviderCreate);
        self.inner.create(request).await
    }

    async fn retrieve(&self, batch_id: &str) -> Result<Batch, BatchApiError> {
        self.counts.add(Kind::ProviderRetrieve);
        self.inner.retrieve(batch_id).await
    }

    async fn open_file(&self, file_id: &str) -> Result<LineReader, BatchApiError> {
        self.counts.add(Kind::ProviderOpenFile);
        self.inner.open_file(file_id).await
    }

    async fn delete_file(&self, file_id: &str) -> Result<(), BatchApiError> {
        self.counts.add(Kind::ProviderDeleteFile);
        self.inner.delete_file(file_id).await
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::AsyncBufReadExt;

    use super::*;
    use crate::memory::{MemoryProvider, MemoryQueue, MemoryStore, StoreOp};

    const BUCKET: &str = "bucket";
    const QUEUE: &str = "https://sqs.local/queue";

    #[tokio::test]
    async fn each_store_call_is_forwarded_and_counted_by_kind() -> anyhow::Result<()> {
        let counts = RequestCounts::new();
        let store = Metered::new(MemoryStore::default(), counts.clone());

        let etag = store
            .put(
                BUCKET,
                "a/1",
                b"hello".to_vec(),
                "text/plain",
                WriteCondition::IfAbsent,
            )
            .await?;
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("file");
        std::fs::write(&path, b"from a file")?;
        store.put_file(BUCKET, "a/2", &path, "text/plain").await?;
        assert_eq!(store.get(BUCKET, "a/1").await?.body, b"hello");
        assert_eq!(store.get_range(BUCKET, "a/2", 5, 9).await?, b"a fi");
        let head = store.head(BUCKET, "a/1").await?;
        assert_eq!(head.map(|h| h.etag), Some(etag));
        assert_eq!(store.list(BUCKET, "a/").await?, ["a/1", "a/2"]);
        store.delete(BUCKET, "a/1").await?;
        assert_eq!(store.inner().keys(BUCKET, "a/"), ["a/2"]);

        let counts = counts.snapshot();
        assert_eq!(
            counts,
            RequestSnapshot {
                s3_get: 1,
                s3_get_range: 1,
                s3_put: 2,
                s3_head: 1,
                s3_delete: 1,
                s3_list: 1,
                ..RequestSnapshot::default()
            }
        );
        assert_eq!(counts.s3_get_class(), 3);
        assert_eq!(counts.s3_put_class(), 3);
        Ok(())
    }

    #[tokio::test]
    async fn failed_calls_are_counted_and_their_errors_passed_on() -> anyhow::Result<()> {
        let counts = RequestCounts::new();
        let store = Metered::new(MemoryStore::default(), counts.clone());
        let missing = store.get(BUCKET, "nothing").await;
        assert!(matches!(missing, Err(StoreError::NotFound { .. })));
        store.inner().fail_once(StoreOp::Head, "k");
        assert!(matches!(
            store.head(BUCKET, "k").await,
            Err(StoreError::Other(_))
        ));
        assert_eq!(counts.snapshot().s3_get, 1);
        assert_eq!(counts.snapshot().s3_head, 1);
        Ok(())
    }

    /// A `Metered` inside a `Metered`: the inner one overrides the defaulted methods, so
    /// its counts show whether the outer one called them or the trait's fallbacks (a
    /// fallback `get_range` would arrive as a whole GET, `put_file` as a `put`, and
    /// `depth` would fail).
    #[tokio::test]
    async fn defaulted_methods_reach_the_inner_implementation() -> anyhow::Result<()> {
        let inner_counts = RequestCounts::new();
        let outer_counts = RequestCounts::new();
        let store = Metered::new(
            Metered::new(MemoryStore::default(), inner_counts.clone()),
            outer_counts.clone(),
        );
        let queue = Metered::new(
            Metered::new(MemoryQueue::default(), inner_counts.clone()),
            outer_counts.clone(),
        );
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("file");
        std::fs::write(&path, b"0123456789")?;
        store
            .put_file(BUCKET, "f", &path, "application/octet-stream")
            .await?;
        assert_eq!(store.get_range(BUCKET, "f", 2, 4).await?, b"23");
        queue
            .send_batch(
                QUEUE,
                &[OutgoingMessage {
                    id: "1".into(),
                    body: "{}".into(),
                }],
            )
            .await?;
        let depth = queue.depth(QUEUE).await?;
        assert_eq!(depth.visible + depth.in_flight, 1);

        for counts in [inner_counts.snapshot(), outer_counts.snapshot()] {
            assert_eq!(
                counts,
                RequestSnapshot {
                    s3_get_range: 1,
                    s3_put: 1,
                    sqs_send: 1,
                    sqs_depth: 1,
                    ..RequestSnapshot::default()
                }
            );
        }
        Ok(())
    }

    #[tokio::test]
    async fn queue_calls_are_counted_per_call_not_per_message() -> anyhow::Result<()> {
        let counts = RequestCounts::new();
        let queue = Metered::new(MemoryQueue::default(), counts.clone());
        let messages: Vec<OutgoingMessage> = (0..10)
            .map(|i| OutgoingMessage {
                id: i.to_string(),
                body: format!("message {i}"),
            })
            .collect();
        assert!(queue.send_batch(QUEUE, &messages).await?.is_empty());
        let received = queue
            .receive(QUEUE, 10, Duration::from_secs(30), Duration::ZERO)
            .await?;
        assert_eq!(received.len(), 10);
        let handles: Vec<String> = received.into_iter().map(|m| m.receipt_handle).collect();
        assert!(queue.delete_batch(QUEUE, &handles).await?.is_empty());
        assert_eq!(queue.inner().depth(QUEUE), 0);
        assert_eq!(
            counts.snapshot(),
            RequestSnapshot {
                sqs_send: 1,
                sqs_receive: 1,
                sqs_delete: 1,
                ..RequestSnapshot::default()
            }
        );
        assert_eq!(counts.snapshot().sqs(), 3);
        Ok(())
    }

    #[tokio::test]
    async fn provider_calls_are_counted() -> anyhow::Result<()> {
        let counts = RequestCounts::new();
        let provider = Metered::new(MemoryProvider::default(), counts.clone());
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("requests.jsonl");
        let line = serde_json::json!({
            "custom_id": "r1",
            "method": "POST",
            "url": crate::request::CHAT_COMPLETIONS,
            "body": {"model": "m", "messages": []},
        });
        std::fs::write(&path, format!("{line}\n"))?;
        let file = provider.upload(&path).await?;
        let batch = provider
            .create(&CreateBatchRequest::chat_completions(&file.id))
            .await?;
        assert_eq!(provider.retrieve(&batch.id).await?.id, batch.id);
        let mut lines = provider.open_file(&file.id).await?.lines();
        assert_eq!(lines.next_line().await?, Some(line.to_string()));
        assert_eq!(
            counts.snapshot(),
            RequestSnapshot {
                provider_upload: 1,
                provider_create: 1,
                provider_retrieve: 1,
                provider_open_file: 1,
                ..RequestSnapshot::default()
            }
        );
        assert_eq!(counts.snapshot().provider(), 4);
        Ok(())
    }

    #[tokio::test]
    async fn ports_share_one_count_and_a_snapshot_serializes_by_name() -> anyhow::Result<()> {
        let counts = RequestCounts::new();
        let a = Metered::new(MemoryStore::default(), counts.clone());
        let b = Metered::new(MemoryStore::default(), a.counts().clone());
        let other = Metered::new(MemoryQueue::default(), counts.clone());
        a.head(BUCKET, "x").await?;
        b.head(BUCKET, "y").await?;
        other.depth(QUEUE).await?;
        let snapshot = counts.snapshot();
        assert_eq!((snapshot.s3_head, snapshot.sqs_depth), (2, 1));
        let json = serde_json::to_value(snapshot)?;
        assert_eq!(json["s3_head"], 2);
        assert_eq!(json["sqs_depth"], 1);
        assert_eq!(serde_json::from_value::<RequestSnapshot>(json)?, snapshot);
        let rows = snapshot.rows();
        assert!(rows.contains(&("S3 HEAD", 2)));
        assert_eq!(rows.iter().map(|(_, n)| n).sum::<u64>(), 3);
        Ok(())
    }

    #[tokio::test]
    async fn since_and_plus_take_and_add_stretches_of_calls() -> anyhow::Result<()> {
        let counts = RequestCounts::new();
        let store = Metered::new(MemoryStore::default(), counts.clone());
        store.head(BUCKET, "x").await?;
        let before = counts.snapshot();
        store.head(BUCKET, "x").await?;
        store.list(BUCKET, "").await?;
        let stretch = counts.snapshot().since(&before);
        assert_eq!(
            stretch,
            RequestSnapshot {
                s3_head: 1,
                s3_list: 1,
                ..RequestSnapshot::default()
            }
        );
        // Never negative, whichever way round.
        assert_eq!(before.since(&counts.snapshot()), RequestSnapshot::default());
        assert_eq!(before.plus(&stretch), counts.snapshot());
        Ok(())
    }
}
