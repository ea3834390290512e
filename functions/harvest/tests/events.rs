//! The harvest function's handling of harvest-queue SQS events, on the in-memory ports
//! (`shotlabel_core::memory`): failed harvests and unreadable messages are batch item
//! failures, a record without an id fails the invocation, and a finished batch is
//! harvested and not reported.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail, ensure};
use aws_lambda_events::event::sqs::SqsEvent;
use harvest::{Handler, handle};
use serde_json::{Value, json};
use shotlabel_core::enqueue::{EnqueueConfig, enqueue_objects};
use shotlabel_core::harvest::HarvestConfig;
use shotlabel_core::memory::{MemoryProvider, MemoryQueue, MemoryStore, ProviderOp, sample_png};
use shotlabel_core::prepare::DecodeLimits;
use shotlabel_core::records::{LabelRecord, Layout, RecordStatus, TaskRef};
use shotlabel_core::request::BatchLimits;
use shotlabel_core::submit::{SubmitConfig, run_submit};
use shotlabel_core::task::Task;

const BUCKET: &str = "bucket";
const INPUT: &str = "incoming/";
const PENDING_QUEUE: &str = "memory://queue/pending";
/// The ids of the fixture's two records: a harvest request, then a body that is not one.
const FIXTURE_HARVEST_ID: &str = "059f36b4-87a3-44ab-83d2-661975830a7d";
const FIXTURE_UNREADABLE_ID: &str = "2e1424d4-f796-459a-8184-9c92662be6da";

type MemoryHandler = Handler<MemoryStore, MemoryQueue, MemoryProvider>;

fn load(name: &str) -> anyhow::Result<Value> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name);
    Ok(serde_json::from_str(&std::fs::read_to_string(path)?)?)
}

fn handler() -> anyhow::Result<MemoryHandler> {
    Ok(Handler {
        store: MemoryStore::default(),
        queue: MemoryQueue::default(),
        provider: MemoryProvider::default(),
        harvest: HarvestConfig {
            bucket: BUCKET.into(),
            layout: Layout::new(INPUT),
            pending_queue_url: PENDING_QUEUE.into(),
            task: Arc::new(Task::default_task()?),
            max_retries: 3,
            max_requeues: 10,
            shards: None,
            delete_provider_files: false,
        },
    })
}

/// [`handle`] on an event, its response as the JSON Lambda would return.
async fn call(h: &MemoryHandler, event: Value) -> anyhow::Result<Value> {
    let event: SqsEvent = serde_json::from_value(event)?;
    let response = handle(h, event).await.map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok(serde_json::to_value(response)?)
}

#[tokio::test]
async fn failed_harvests_and_unreadable_messages_are_batch_item_failures() -> anyhow::Result<()> {
    // The provider is down and the store holds no state, so the harvest of the first
    // record fails however far it gets; the second record is not a harvest request.
    let h = handler()?;
    h.provider.fail_next(ProviderOp::Retrieve, 1);
    let response = call(&h, load("sqs-harvest.json")?).await?;
    assert_eq!(
        response,
        json!({
            "batchItemFailures": [
                { "itemIdentifier": FIXTURE_HARVEST_ID },
                { "itemIdentifier": FIXTURE_UNREADABLE_ID },
            ]
        })
    );
    assert_eq!(
        h.provider.calls(ProviderOp::Retrieve),
        1,
        "only the harvest request reached the provider"
    );
    assert!(h.queue.sent().is_empty(), "a failed harvest queues nothing");
    assert!(h.store.all_keys().is_empty(), "and writes nothing");
    Ok(())
}

#[tokio::test]
async fn a_record_without_a_message_id_fails_the_invocation() -> anyhow::Result<()> {
    let h = handler()?;
    let mut event = load("sqs-harvest.json")?;
    if let Some(record) = event["Records"][0].as_object_mut() {
        record.remove("messageId");
    }
    let failed = call(&h, event).await;
    assert!(
        failed
            .as_ref()
            .is_err_and(|e| e.to_string().contains("messageId")),
        "{failed:?}"
    );
    assert_eq!(
        h.provider.calls(ProviderOp::Retrieve),
        0,
        "nothing harvested"
    );
    Ok(())
}

/// Puts a small distinct PNG per name under the input prefix, enqueues them, submits
/// them as one batch and completes it; returns the batch id.
async fn completed_batch(h: &MemoryHandler, names: &[&str]) -> anyhow::Result<String> {
    let task = &h.harvest.task;
    let mut objects = Vec::new();
    for (i, name) in names.iter().enumerate() {
        let key = format!("{INPUT}{name}");
        objects.push(h.store.put_new_object(BUCKET, &key, sample_png(i)?));
    }
    let enqueue = EnqueueConfig {
        layout: Layout::new(INPUT),
        pending_queue_url: PENDING_QUEUE.into(),
        max_object_bytes: 50 * 1024 * 1024,
        force_relabel: false,
        task: TaskRef {
            name: task.name().to_owned(),
            version: task.version().to_owned(),
        },
    };
    let queued = enqueue_objects(&h.store, &h.queue, &enqueue, objects).await?;
    ensure!(queued.queued == names.len(), "{queued:?}");

    let work_dir = tempfile::tempdir()?;
    let submit = SubmitConfig {
        bucket: BUCKET.into(),
        layout: Layout::new(INPUT),
        pending_queue_url: PENDING_QUEUE.into(),
        task: task.clone(),
        limits: BatchLimits::default(),
        max_request_bytes: None,
        decode_limits: DecodeLimits::default(),
        time_budget: Duration::from_secs(60),
        visibility_timeout: Duration::from_secs(300),
        receive_wait: Duration::ZERO,
        max_images: 0,
        concurrency: 2,
        work_dir: work_dir.path().to_owned(),
        completion_window: "24h".into(),
        per_batch_webhook: None,
        provider_limits: Default::default(),
        slot_lease: std::time::Duration::from_secs(900),
        max_requeues: 10,
        pending_max_receives: 5,
    };
    let report = run_submit(&h.store, &h.queue, &h.provider, &submit).await?;
    ensure!(report.errors.is_empty(), "{:?}", report.errors);
    let batch_id = match report.batches.as_slice() {
        [batch] => batch.batch_id.clone(),
        other => bail!("one batch expected, got {other:?}"),
    };
    h.provider.complete(
        &batch_id,
        |_| json!({ "landing_page": true, "aesthetic": 4 }),
    )?;
    Ok(batch_id)
}

#[tokio::test]
async fn a_harvested_batch_is_not_a_batch_item_failure_and_its_labels_exist() -> anyhow::Result<()>
{
    let h = handler()?;
    let names = ["a.png", "b.png", "deep/c.png"];
    let batch_id = completed_batch(&h, &names).await?;
    assert!(h.store.keys(BUCKET, "labels/").is_empty());

    let mut event = load("sqs-harvest.json")?;
    let records = event["Records"]
        .as_array_mut()
        .context("the fixture has records")?;
    records.truncate(1);
    records[0]["body"] =
        Value::String(json!({ "batch_id": batch_id, "origin": "webhook" }).to_string());
    let response = call(&h, event).await?;
    assert_eq!(response, json!({ "batchItemFailures": [] }));

    let layout = Layout::new(INPUT);
    let mut expected: Vec<String> = names.iter().map(|name| layout.label_key(name)).collect();
    expected.sort();
    assert_eq!(h.store.keys(BUCKET, "labels/"), expected);
    for key in &expected {
        let object = h.store.object(BUCKET, key).context("the label was read")?;
        let label: LabelRecord = serde_json::from_slice(&object.body)?;
        assert_eq!(label.status, RecordStatus::Labelled, "{key}");
        assert_eq!(label.provenance.batch_id, batch_id, "{key}");
    }
    assert_eq!(
        h.queue.depth(PENDING_QUEUE),
        0,
        "nothing is requeued: every image was labelled"
    );
    Ok(())
}
