//! The local stack the integration tests share: moto, the batch emulator, and the
//! pipeline's configuration pointed at them.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use aws_sdk_s3::primitives::ByteStream;
use batch_emulator::{EmulatorConfig, FaultSettings, RunningEmulator};
use secrecy::SecretString;
use shotlabel_aws::{S3Store, SqsQueue};
use shotlabel_batch_client::{BatchApiConfig, BatchClient, RetryPolicy};
use shotlabel_core::enqueue::{EnqueueConfig, EnqueueReport, NewObject, enqueue_objects};
use shotlabel_core::prepare::DecodeLimits;
use shotlabel_core::records::{Layout, TaskRef};
use shotlabel_core::request::BatchLimits;
use shotlabel_core::submit::SubmitConfig;
use shotlabel_core::task::Task;
use shotlabel_localstack::{LocalResources, MotoServer, create_resources, s3_client, sqs_client};

pub const KEY: &str = "integration-test-key";
pub const INPUT: &str = "incoming/";

pub struct Stack {
    pub moto: MotoServer,
    pub s3: aws_sdk_s3::Client,
    pub sqs: aws_sdk_sqs::Client,
    pub store: S3Store,
    pub queue: SqsQueue,
    pub resources: LocalResources,
    pub work_dir: tempfile::TempDir,
}

pub async fn stack(name: &str) -> anyhow::Result<Stack> {
    let moto = MotoServer::start().await?;
    let config = moto.sdk_config().await;
    let resources = create_resources(&config, name).await?;
    Ok(Stack {
        s3: s3_client(&config),
        sqs: sqs_client(&config),
        store: S3Store::new(s3_client(&config)),
        queue: SqsQueue::new(sqs_client(&config)),
        resources,
        moto,
        work_dir: tempfile::tempdir()?,
    })
}

pub fn data(dir: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("data").join(dir)
}

/// The files in a test-data folder, sorted, without the labels file.
pub fn files(dir: &str) -> anyhow::Result<Vec<PathBuf>> {
    let mut paths: Vec<PathBuf> = std::fs::read_dir(data(dir))?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.is_file() && p.extension().is_none_or(|e| e != "json"))
        .collect();
    paths.sort();
    Ok(paths)
}

pub async fn emulator(faults: FaultSettings) -> anyhow::Result<RunningEmulator> {
    let mut config = EmulatorConfig::new(KEY)
        .with_delays(20, 50, 20)
        .with_faults(faults);
    config.listen = "127.0.0.1:0".parse()?;
    Ok(batch_emulator::spawn(config).await?)
}

pub fn quick_retries(max_attempts: u32) -> RetryPolicy {
    RetryPolicy {
        max_attempts,
        initial_backoff: Duration::from_millis(5),
        max_backoff: Duration::from_millis(50),
        max_retry_after: Duration::from_millis(200),
    }
}

pub fn client(emulator: &RunningEmulator, retry: RetryPolicy) -> anyhow::Result<BatchClient> {
    let mut config = BatchApiConfig::new(&emulator.base_url(), SecretString::from(KEY))?;
    config.retry = retry;
    Ok(BatchClient::new(config)?)
}

pub fn task_ref(task: &Task) -> TaskRef {
    TaskRef {
        name: task.name().into(),
        version: task.version().into(),
    }
}

/// Puts an object and returns it as an S3 event would report it.
pub async fn put(stack: &Stack, key: &str, body: Vec<u8>) -> anyhow::Result<NewObject> {
    let size = body.len() as u64;
    let out = stack
        .s3
        .put_object()
        .bucket(&stack.resources.bucket)
        .key(key)
        .body(ByteStream::from(body))
        .send()
        .await?;
    Ok(NewObject {
        bucket: stack.resources.bucket.clone(),
        key: key.to_owned(),
        size,
        etag: out.e_tag.unwrap_or_default().trim_matches('"').to_owned(),
        version_id: None,
    })
}

/// Uploads files under the input prefix, keyed by file name.
pub async fn put_files(stack: &Stack, paths: &[PathBuf]) -> anyhow::Result<Vec<NewObject>> {
    let mut objects = Vec::new();
    for path in paths {
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        objects.push(put(stack, &format!("{INPUT}{name}"), std::fs::read(path)?).await?);
    }
    Ok(objects)
}

pub fn enqueue_config(stack: &Stack) -> anyhow::Result<EnqueueConfig> {
    Ok(EnqueueConfig {
        layout: Layout::new(INPUT),
        pending_queue_url: stack.resources.pending_queue_url.clone(),
        max_object_bytes: 50 * 1024 * 1024,
        force_relabel: false,
        task: task_ref(&Task::default_task()?),
    })
}

pub async fn enqueue(stack: &Stack, objects: Vec<NewObject>) -> anyhow::Result<EnqueueReport> {
    Ok(enqueue_objects(&stack.store, &stack.queue, &enqueue_config(stack)?, objects).await?)
}

pub fn submit_config(stack: &Stack, limits: BatchLimits) -> anyhow::Result<SubmitConfig> {
    Ok(SubmitConfig {
        bucket: stack.resources.bucket.clone(),
        layout: Layout::new(INPUT),
        pending_queue_url: stack.resources.pending_queue_url.clone(),
        task: Arc::new(Task::default_task()?),
        limits,
        max_request_bytes: None,
        decode_limits: DecodeLimits::default(),
        time_budget: Duration::from_secs(60),
        visibility_timeout: Duration::from_secs(300),
        receive_wait: Duration::from_secs(0),
        max_images: 0,
        concurrency: 2,
        work_dir: stack.work_dir.path().to_owned(),
        completion_window: "24h".into(),
        per_batch_webhook: None,
        provider_limits: Default::default(),
        slot_lease: std::time::Duration::from_secs(900),
        max_requeues: 10,
        pending_max_receives: 5,
    })
}

pub async fn read_json<T: serde::de::DeserializeOwned>(
    stack: &Stack,
    key: &str,
) -> anyhow::Result<T> {
    let object = stack
        .s3
        .get_object()
        .bucket(&stack.resources.bucket)
        .key(key)
        .send()
        .await?;
    let bytes = object.body.collect().await?.into_bytes();
    Ok(serde_json::from_slice(&bytes)?)
}

pub async fn list(stack: &Stack, prefix: &str) -> anyhow::Result<Vec<String>> {
    use shotlabel_core::ports::ObjectStore;
    Ok(stack.store.list(&stack.resources.bucket, prefix).await?)
}

/// How many messages a queue holds, visible or not.
pub async fn queue_depth(stack: &Stack, queue_url: &str) -> anyhow::Result<u64> {
    use aws_sdk_sqs::types::QueueAttributeName as A;
    let attrs = stack
        .sqs
        .get_queue_attributes()
        .queue_url(queue_url)
        .attribute_names(A::ApproximateNumberOfMessages)
        .attribute_names(A::ApproximateNumberOfMessagesNotVisible)
        .send()
        .await?
        .attributes
        .unwrap_or_default();
    let count = |name: &A| -> u64 { attrs.get(name).and_then(|v| v.parse().ok()).unwrap_or(0) };
    Ok(count(&A::ApproximateNumberOfMessages) + count(&A::ApproximateNumberOfMessagesNotVisible))
}

/// Makes these in-flight messages visible again, as if their visibility timeout had
/// passed (what a crashed run leaves behind).
pub async fn release(
    stack: &Stack,
    queue_url: &str,
    receipt_handles: &[String],
) -> anyhow::Result<()> {
    for handle in receipt_handles {
        stack
            .sqs
            .change_message_visibility()
            .queue_url(queue_url)
            .receipt_handle(handle)
            .visibility_timeout(0)
            .send()
            .await?;
    }
    Ok(())
}

pub fn harvest_config(stack: &Stack) -> anyhow::Result<shotlabel_core::harvest::HarvestConfig> {
    Ok(shotlabel_core::harvest::HarvestConfig {
        bucket: stack.resources.bucket.clone(),
        layout: Layout::new(INPUT),
        pending_queue_url: stack.resources.pending_queue_url.clone(),
        task: Arc::new(Task::default_task()?),
        max_retries: 3,
        max_requeues: 10,
        shards: None,
        delete_provider_files: false,
    })
}

/// Waits until the provider says the batch is finished, whatever the outcome.
pub async fn wait_terminal(
    client: &BatchClient,
    batch_id: &str,
) -> anyhow::Result<shotlabel_core::batch_api::Batch> {
    let start = std::time::Instant::now();
    loop {
        let batch = client.retrieve_batch(batch_id).await?;
        if batch.status.is_terminal() {
            return Ok(batch);
        }
        anyhow::ensure!(
            start.elapsed() < Duration::from_secs(60),
            "batch {batch_id} took too long"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Every object under a prefix, parsed.
pub async fn read_all<T: serde::de::DeserializeOwned>(
    stack: &Stack,
    prefix: &str,
) -> anyhow::Result<Vec<T>> {
    let mut out = Vec::new();
    for key in list(stack, prefix).await? {
        out.push(read_json(stack, &key).await?);
    }
    Ok(out)
}

/// An object store that fails writes to batch state records while `crash` is set: a
/// harvest that dies after its labels and retries, before it records the batch done.
pub struct CrashBeforeRecord<'a> {
    pub inner: &'a S3Store,
    pub crash: std::sync::atomic::AtomicBool,
}

impl shotlabel_core::ports::ObjectStore for CrashBeforeRecord<'_> {
    async fn get(
        &self,
        bucket: &str,
        key: &str,
    ) -> Result<shotlabel_core::ports::StoredObject, shotlabel_core::ports::StoreError> {
        self.inner.get(bucket, key).await
    }
    async fn head(
        &self,
        bucket: &str,
        key: &str,
    ) -> Result<Option<shotlabel_core::ports::ObjectInfo>, shotlabel_core::ports::StoreError> {
        self.inner.head(bucket, key).await
    }
    async fn put(
        &self,
        bucket: &str,
        key: &str,
        body: Vec<u8>,
        content_type: &str,
        condition: shotlabel_core::ports::WriteCondition,
    ) -> Result<String, shotlabel_core::ports::StoreError> {
        if self.crash.load(std::sync::atomic::Ordering::SeqCst) && key.starts_with("state/batches/")
        {
            return Err(shotlabel_core::ports::StoreError::Other(
                "the process died here".into(),
            ));
        }
        self.inner
            .put(bucket, key, body, content_type, condition)
            .await
    }
    async fn delete(
        &self,
        bucket: &str,
        key: &str,
    ) -> Result<(), shotlabel_core::ports::StoreError> {
        self.inner.delete(bucket, key).await
    }
    async fn list(
        &self,
        bucket: &str,
        prefix: &str,
    ) -> Result<Vec<String>, shotlabel_core::ports::StoreError> {
        self.inner.list(bucket, prefix).await
    }
}
