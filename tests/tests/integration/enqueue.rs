//! The enqueue function's handler against moto: S3 events in, pending messages and failed
//! records out, with dedupe and queue refusals.

use std::sync::Mutex;
use std::time::Duration;

use aws_lambda_events::event::s3::S3Event;
use aws_sdk_s3::primitives::ByteStream;
use enqueue::{Handler, handle};
use serde_json::json;
use shotlabel_aws::{S3Store, SqsQueue};
use shotlabel_core::enqueue::{EnqueueConfig, EnqueueError, NewObject, enqueue_objects};
use shotlabel_core::ports::{OutgoingMessage, Queue, QueueError, ReceivedMessage};
use shotlabel_core::records::RecordStatus;
use shotlabel_core::records::{FailedRecord, Layout, PendingItem, TaskRef};
use shotlabel_core::task::Task;
use shotlabel_core::terminal::RecordError;
use shotlabel_localstack::{LocalResources, MotoServer, create_resources, s3_client, sqs_client};

struct Stack {
    _moto: MotoServer,
    s3: aws_sdk_s3::Client,
    sqs: aws_sdk_sqs::Client,
    resources: LocalResources,
}

async fn stack() -> anyhow::Result<Stack> {
    let moto = MotoServer::start().await?;
    let config = moto.sdk_config().await;
    let resources = create_resources(&config, "enqueue-test").await?;
    Ok(Stack {
        s3: s3_client(&config),
        sqs: sqs_client(&config),
        resources,
        _moto: moto,
    })
}

fn config(stack: &Stack) -> anyhow::Result<EnqueueConfig> {
    let task = Task::default_task()?;
    Ok(EnqueueConfig {
        layout: Layout::new("incoming/"),
        pending_queue_url: stack.resources.pending_queue_url.clone(),
        max_object_bytes: 500_000,
        force_relabel: false,
        task: TaskRef {
            name: task.name().into(),
            version: task.version().into(),
        },
    })
}

/// Puts an object and returns the S3 event record moto-style (encoded key, real etag).
async fn put(stack: &Stack, key: &str, body: Vec<u8>) -> anyhow::Result<serde_json::Value> {
    let size = body.len();
    let out = stack
        .s3
        .put_object()
        .bucket(&stack.resources.bucket)
        .key(key)
        .body(ByteStream::from(body))
        .send()
        .await?;
    let encoded: String = key
        .split('/')
        .map(|part| {
            part.bytes()
                .map(|b| match b {
                    b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'-' | b'_' | b'.' => {
                        (b as char).to_string()
                    }
                    b' ' => "+".into(),
                    other => format!("%{other:02X}"),
                })
                .collect::<String>()
        })
        .collect::<Vec<_>>()
        .join("%2F");
    // A real moto event record as the template, with this object's details.
    let fixture = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../functions/enqueue/tests/fixtures/s3-put-moto.json"
    );
    let mut record: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(fixture)?)?;
    let mut record = record["Records"][0].take();
    record["s3"]["bucket"]["name"] = json!(stack.resources.bucket);
    record["s3"]["object"]["key"] = json!(encoded);
    record["s3"]["object"]["size"] = json!(size);
    record["s3"]["object"]["eTag"] = json!(out.e_tag.unwrap_or_default());
    Ok(record)
}

async fn drain(stack: &Stack) -> anyhow::Result<Vec<PendingItem>> {
    let mut items = Vec::new();
    loop {
        let messages = stack
            .sqs
            .receive_message()
            .queue_url(&stack.resources.pending_queue_url)
            .max_number_of_messages(10)
            .wait_time_seconds(0)
            .send()
            .await?
            .messages
            .unwrap_or_default();
        if messages.is_empty() {
            return Ok(items);
        }
        for m in messages {
            items.push(serde_json::from_str(m.body.as_deref().unwrap_or("{}"))?);
        }
    }
}

async fn read_json<T: serde::de::DeserializeOwned>(stack: &Stack, key: &str) -> anyhow::Result<T> {
    let object = stack
        .s3
        .get_object()
        .bucket(&stack.resources.bucket)
        .key(key)
        .send()
        .await?;
    Ok(serde_json::from_slice(
        &object.body.collect().await?.into_bytes(),
    )?)
}

fn screenshot(name: &str) -> anyhow::Result<Vec<u8>> {
    Ok(std::fs::read(format!(
        "{}/data/screenshots/{name}",
        env!("CARGO_MANIFEST_DIR")
    ))?)
}

#[tokio::test]
async fn s3_events_become_pending_messages_and_failed_records() -> anyhow::Result<()> {
    let stack = stack().await?;
    let records = vec![
        put(
            &stack,
            "incoming/blog article (1).png",
            screenshot("blog-article.png")?,
        )
        .await?,
        put(
            &stack,
            "incoming/deep/ünïcode+plus.png",
            screenshot("login-modal.png")?,
        )
        .await?,
        put(&stack, "incoming/empty.png", Vec::new()).await?,
        put(
            &stack,
            "incoming/huge.png",
            screenshot("ebike-landing-full.png")?,
        )
        .await?,
        put(&stack, "incoming/folder/", Vec::new()).await?,
        put(
            &stack,
            "elsewhere/not-input.png",
            screenshot("docs-page.png")?,
        )
        .await?,
    ];
    let event: S3Event = serde_json::from_value(json!({ "Records": records }))?;
    let handler = Handler {
        store: S3Store::new(stack.s3.clone()),
        queue: SqsQueue::new(stack.sqs.clone()),
        config: config(&stack)?,
    };
    let report = handle(&handler, event)
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    assert_eq!(
        (report.queued, report.failed, report.ignored),
        (2, 2, 2),
        "{report:?}"
    );

    let mut items = drain(&stack).await?;
    items.sort_by(|a, b| a.key.cmp(&b.key));
    assert_eq!(items.len(), 2);
    assert_eq!(items[0].key, "incoming/blog article (1).png");
    assert_eq!(items[1].key, "incoming/deep/ünïcode+plus.png");
    for item in &items {
        assert_eq!(item.bucket, stack.resources.bucket);
        assert_eq!(item.attempt, 0);
        assert!(!item.etag.is_empty() && !item.etag.contains('"'));
        let head = stack
            .s3
            .head_object()
            .bucket(&item.bucket)
            .key(&item.key)
            .send()
            .await?;
        assert_eq!(Some(item.size as i64), head.content_length);
    }

    let empty: FailedRecord = read_json(&stack, "failed/empty.png.json").await?;
    assert_eq!(empty.status, RecordStatus::Failed);
    assert_eq!(empty.source.key, "incoming/empty.png");
    assert_eq!(empty.task.version, Task::default_task()?.version());
    assert!(
        empty.reasons[0].reason.contains("empty"),
        "{:?}",
        empty.reasons
    );
    let huge: FailedRecord = read_json(&stack, "failed/huge.png.json").await?;
    assert!(
        huge.reasons[0]
            .reason
            .contains("over the 500000-byte limit"),
        "{:?}",
        huge.reasons
    );
    Ok(())
}

#[tokio::test]
async fn labelled_images_are_not_queued_again_unless_forced() -> anyhow::Result<()> {
    let stack = stack().await?;
    let mut config = config(&stack)?;
    let record = put(&stack, "incoming/shot.png", screenshot("docs-page.png")?).await?;
    let etag = record["s3"]["object"]["eTag"]
        .as_str()
        .unwrap_or_default()
        .trim_matches('"')
        .to_owned();
    let object = NewObject {
        bucket: stack.resources.bucket.clone(),
        key: "incoming/shot.png".into(),
        size: 10,
        etag: etag.clone(),
        version_id: None,
    };
    let store = S3Store::new(stack.s3.clone());
    let queue = SqsQueue::new(stack.sqs.clone());
    let write_label = |etag: String, version: String| {
        let body = json!({"label": {}, "source": {"etag": etag}, "task": {"version": version}});
        stack
            .s3
            .put_object()
            .bucket(&stack.resources.bucket)
            .key("labels/shot.png.json")
            .body(ByteStream::from(body.to_string().into_bytes()))
            .send()
    };

    // Labelled for this content and task version: skipped.
    write_label(etag.clone(), config.task.version.clone()).await?;
    let report = enqueue_objects(&store, &queue, &config, vec![object.clone()]).await?;
    assert_eq!((report.queued, report.already_labelled), (0, 1));
    assert!(drain(&stack).await?.is_empty());

    // Forced: queued anyway.
    config.force_relabel = true;
    let report = enqueue_objects(&store, &queue, &config, vec![object.clone()]).await?;
    assert_eq!(report.queued, 1);
    assert_eq!(drain(&stack).await?.len(), 1);
    config.force_relabel = false;

    // Labelled under another task version, or for other content: queued.
    write_label(etag.clone(), "0000000000000000".into()).await?;
    assert_eq!(
        enqueue_objects(&store, &queue, &config, vec![object.clone()])
            .await?
            .queued,
        1
    );
    write_label("other-etag".into(), config.task.version.clone()).await?;
    assert_eq!(
        enqueue_objects(&store, &queue, &config, vec![object])
            .await?
            .queued,
        1
    );
    assert_eq!(drain(&stack).await?.len(), 2);
    Ok(())
}

/// A queue that refuses chosen entries a number of times before accepting them.
struct RefusingQueue {
    refusals_left: Mutex<u32>,
    sent: Mutex<Vec<String>>,
}

impl Queue for RefusingQueue {
    async fn send_batch(
        &self,
        _: &str,
        messages: &[OutgoingMessage],
    ) -> Result<Vec<String>, QueueError> {
        let mut left = self
            .refusals_left
            .lock()
            .map_err(|e| QueueError::Other(e.to_string()))?;
        let mut sent = self
            .sent
            .lock()
            .map_err(|e| QueueError::Other(e.to_string()))?;
        let mut refused = Vec::new();
        for m in messages {
            // The first entry of every call is refused while refusals last.
            if *left > 0 && refused.is_empty() {
                *left -= 1;
                refused.push(m.id.clone());
            } else {
                sent.push(m.body.clone());
            }
        }
        Ok(refused)
    }
    async fn receive(
        &self,
        _: &str,
        _: u32,
        _: Duration,
        _: Duration,
    ) -> Result<Vec<ReceivedMessage>, QueueError> {
        Ok(Vec::new())
    }
    async fn delete_batch(&self, _: &str, _: &[String]) -> Result<Vec<String>, QueueError> {
        Ok(Vec::new())
    }
}

#[tokio::test]
async fn refused_entries_are_resent_and_persistent_refusal_fails_the_call() -> anyhow::Result<()> {
    let stack = stack().await?;
    let config = config(&stack)?;
    let store = S3Store::new(stack.s3.clone());
    let objects: Vec<NewObject> = (0..12)
        .map(|i| NewObject {
            bucket: stack.resources.bucket.clone(),
            key: format!("incoming/{i}.png"),
            size: 100,
            etag: format!("e{i}"),
            version_id: None,
        })
        .collect();

    let queue = RefusingQueue {
        refusals_left: Mutex::new(2),
        sent: Mutex::new(Vec::new()),
    };
    let report = enqueue_objects(&store, &queue, &config, objects.clone()).await?;
    assert_eq!(report.queued, 12);
    let sent = queue
        .sent
        .lock()
        .map_err(|e| anyhow::anyhow!("{e}"))?
        .clone();
    assert_eq!(sent.len(), 12, "every message sent exactly once in the end");

    let queue = RefusingQueue {
        refusals_left: Mutex::new(1000),
        sent: Mutex::new(Vec::new()),
    };
    let err = enqueue_objects(&store, &queue, &config, objects)
        .await
        .expect_err("always refused");
    assert!(
        matches!(err, EnqueueError(RecordError::Refused { count: 1 })),
        "{err:?}"
    );
    Ok(())
}
