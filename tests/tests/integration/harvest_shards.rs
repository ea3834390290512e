//! A sharded harvest against moto and the emulator: a large batch read by five shards,
//! four at a time, one of them killed half-way and redone.
//!
//! `SHOTLABEL_SHARD_TEST_REQUESTS` sets the batch's size; it is always cut into five
//! shards. `make test` runs 10,000 requests (moto writes about 300 labels a second here,
//! so the providers' 50,000 takes five minutes); the 50,000-request run is
//! `SHOTLABEL_SHARD_TEST_REQUESTS=50000 cargo test --workspace --test integration harvest_shards::`
//! (its figures are in docs/scale.md).

use std::collections::{BTreeMap, HashSet};
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, ensure};
use batch_emulator::{EmulatorConfig, FaultSettings};
use futures_util::{StreamExt, stream};
use shotlabel_aws::S3Store;
use shotlabel_core::batch_api::CreateBatchRequest;
use shotlabel_core::harvest::shards::ShardPlan;
use shotlabel_core::harvest::{HarvestOutcome, ShardConfig, harvest};
use shotlabel_core::ports::{
    BatchProvider, ObjectInfo, ObjectStore, StoreError, StoredObject, WriteCondition,
};
use shotlabel_core::records::{
    BatchPhase, BatchRecord, HarvestRequest, Manifest, PendingItem, state_keys, unix_now,
};
use shotlabel_core::request::{custom_id, request_line};
use shotlabel_core::submit::{METADATA_MANIFEST, METADATA_TASK_VERSION};
use shotlabel_core::task::Task;
use tokio::sync::Notify;

use crate::common::*;

const SHARDS: usize = 5;
/// The shard that is killed half-way through its label writes, then redone.
const KILLED: u32 = 2;

/// The store, watched: label writes are counted (and the killed shard's run stopped after
/// half of its share), and every write of the batch's state record is kept.
struct Watched {
    inner: S3Store,
    label_puts: AtomicUsize,
    kill_after: Option<usize>,
    kill: Arc<Notify>,
    record_writes: Mutex<Vec<String>>,
}

impl Watched {
    fn new(inner: S3Store, kill_after: Option<usize>) -> Self {
        Self {
            inner,
            label_puts: AtomicUsize::new(0),
            kill_after,
            kill: Arc::new(Notify::new()),
            record_writes: Mutex::new(Vec::new()),
        }
    }
}

impl ObjectStore for Watched {
    async fn get(&self, bucket: &str, key: &str) -> Result<StoredObject, StoreError> {
        self.inner.get(bucket, key).await
    }

    async fn head(&self, bucket: &str, key: &str) -> Result<Option<ObjectInfo>, StoreError> {
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
        let text = key
            .starts_with("state/batches/")
            .then(|| String::from_utf8_lossy(&body).into_owned());
        let written = self
            .inner
            .put(bucket, key, body, content_type, condition)
            .await?;
        if let Some(text) = text
            && let Ok(mut writes) = self.record_writes.lock()
        {
            writes.push(text);
        }
        if key.starts_with("labels/") {
            let n = self.label_puts.fetch_add(1, Ordering::SeqCst) + 1;
            if self.kill_after.is_some_and(|at| n >= at) {
                self.kill.notify_one();
                // Killed: nothing after this write happens.
                std::future::pending::<()>().await;
            }
        }
        Ok(written)
    }

    async fn delete(&self, bucket: &str, key: &str) -> Result<(), StoreError> {
        self.inner.delete(bucket, key).await
    }

    async fn list(&self, bucket: &str, prefix: &str) -> Result<Vec<String>, StoreError> {
        self.inner.list(bucket, prefix).await
    }

    async fn get_range(
        &self,
        bucket: &str,
        key: &str,
        start: u64,
        end: u64,
    ) -> Result<Vec<u8>, StoreError> {
        self.inner.get_range(bucket, key, start, end).await
    }

    async fn put_file(
        &self,
        bucket: &str,
        key: &str,
        path: &Path,
        content_type: &str,
    ) -> Result<String, StoreError> {
        self.inner.put_file(bucket, key, path, content_type).await
    }
}

/// A small JPEG as a data URI, the same for every request (the emulator's answers do not
/// depend on the image).
fn data_uri() -> anyhow::Result<String> {
    let picture =
        image::RgbImage::from_fn(16, 16, |x, y| image::Rgb([x as u8 * 16, y as u8 * 16, 90]));
    let mut jpeg = Vec::new();
    picture.write_to(
        &mut std::io::Cursor::new(&mut jpeg),
        image::ImageFormat::Jpeg,
    )?;
    Ok(shotlabel_core::prepare::data_uri(&jpeg))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_batch_is_harvested_by_shards_with_one_label_per_request() -> anyhow::Result<()> {
    let requests: usize = std::env::var("SHOTLABEL_SHARD_TEST_REQUESTS")
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(10_000);
    let started = Instant::now();
    let stack = stack("harvest-shards").await?;
    let mut config = EmulatorConfig::new(KEY)
        .with_delays(10, 200, 10)
        .with_faults(FaultSettings::default());
    config.listen = "127.0.0.1:0".parse()?;
    let emulator = batch_emulator::spawn(config).await?;
    let client = client(&emulator, quick_retries(3))?;
    let task = Task::default_task()?;

    // The batch: one request per image, its manifest written first, as a submitter does.
    let name = "sharded-0";
    let mut items = BTreeMap::new();
    let uri = data_uri()?;
    let file = stack.work_dir.path().join("requests.jsonl");
    let mut lines = Vec::new();
    for i in 0..requests {
        let id = custom_id("sharded", i);
        lines.extend_from_slice(&request_line(&id, &task, &uri));
        lines.push(b'\n');
        items.insert(
            id,
            PendingItem {
                bucket: stack.resources.bucket.clone(),
                key: format!("{INPUT}shards/{:02}/{i:06}.png", i % 50),
                size: 100,
                etag: format!("etag{i}"),
                version_id: None,
                attempt: 0,
                reasons: Vec::new(),
                requeues: 0,
                replace_label: None,
            },
        );
    }
    std::fs::write(&file, &lines)?;
    let manifest = Manifest {
        name: name.into(),
        submission_id: "sharded".into(),
        task: task_ref(&task),
        model: task.model().into(),
        created_at: unix_now(),
        items,
        slot: None,
    };
    stack
        .store
        .put(
            &stack.resources.bucket,
            &state_keys::manifest(name),
            serde_json::to_vec(&manifest)?,
            "application/json",
            WriteCondition::Overwrite,
        )
        .await?;
    let uploaded = client.upload(&file).await?;
    let mut create = CreateBatchRequest::chat_completions(uploaded.id);
    create.metadata = BTreeMap::from([
        (METADATA_MANIFEST.to_owned(), name.to_owned()),
        (METADATA_TASK_VERSION.to_owned(), task.version().to_owned()),
    ]);
    let batch = client.create(&create).await?;
    let batch = wait_terminal(&client, &batch.id).await?;
    ensure!(batch.output_file_id.is_some(), "{batch:?}");
    let prepared = started.elapsed();

    // The harvest that finds the batch finished plans the shards and queues them.
    let mut config = harvest_config(&stack)?;
    config.shards = Some(ShardConfig {
        queue_url: stack.resources.harvest_queue_url.clone(),
        requests_per_shard: requests.div_ceil(SHARDS),
        resend_after: Duration::from_secs(7_200),
    });
    let watched = Watched::new(stack.store.clone(), None);
    let request = HarvestRequest {
        batch_id: Some(batch.id.clone()),
        manifest: None,
        origin: "test".into(),
        shard: None,
        delivery: None,
    };
    let outcome = harvest(&watched, &stack.queue, &client, &config, &request).await?;
    ensure!(
        outcome
            == HarvestOutcome::Sharded {
                batch_id: batch.id.clone(),
                shards: SHARDS,
                queued: SHARDS
            },
        "{outcome:?}"
    );
    let plan: ShardPlan = read_json(&stack, &state_keys::shard_plan(&batch.id)).await?;
    ensure!(plan.shards.len() >= 4);
    // Each shard's range is whole lines of the copied output.
    for range in &plan.shards {
        let bytes = stack
            .store
            .get_range(
                &stack.resources.bucket,
                &plan.files[range.file].key,
                range.start,
                range.end,
            )
            .await?;
        ensure!(bytes.ends_with(b"\n") && bytes.first() == Some(&b'{'));
    }

    // The shard requests, as the harvest queue holds them.
    let mut shard_requests = Vec::new();
    while shard_requests.len() < SHARDS {
        let received = stack
            .sqs
            .receive_message()
            .queue_url(&stack.resources.harvest_queue_url)
            .max_number_of_messages(10)
            .wait_time_seconds(1)
            .send()
            .await?
            .messages
            .unwrap_or_default();
        for message in received {
            let request: HarvestRequest =
                serde_json::from_str(message.body.as_deref().unwrap_or_default())?;
            shard_requests.push(request);
        }
        ensure!(started.elapsed() < Duration::from_secs(600));
    }
    let mut shards: Vec<u32> = shard_requests.iter().filter_map(|r| r.shard).collect();
    shards.sort_unstable();
    ensure!(
        shards == (0..SHARDS as u32).collect::<Vec<_>>(),
        "{shards:?}"
    );

    // The killed shard: its run stops for good after half its share of label writes.
    let per_shard = requests.div_ceil(SHARDS);
    let doomed = Watched::new(stack.store.clone(), Some(per_shard / 2));
    let killed = {
        let request = shard_requests
            .iter()
            .find(|r| r.shard == Some(KILLED))
            .context("the killed shard's request")?;
        let run = harvest(&doomed, &stack.queue, &client, &config, request);
        tokio::select! {
            result = run => anyhow::bail!("the doomed shard finished: {result:?}"),
            () = doomed.kill.notified() => doomed.label_puts.load(Ordering::SeqCst),
        }
    };
    ensure!(killed >= per_shard / 2);

    // The others, four at a time, then the killed one again (its message's retry).
    let spans: Mutex<Vec<(Instant, Instant)>> = Mutex::new(Vec::new());
    let others: Vec<&HarvestRequest> = shard_requests
        .iter()
        .filter(|r| r.shard != Some(KILLED))
        .collect();
    let outcomes: Vec<anyhow::Result<HarvestOutcome>> = stream::iter(others)
        .map(|request| {
            let (watched, config, client, spans) = (&watched, &config, &client, &spans);
            let queue = &stack.queue;
            async move {
                let begun = Instant::now();
                let outcome = harvest(watched, queue, client, config, request).await?;
                if let Ok(mut spans) = spans.lock() {
                    spans.push((begun, Instant::now()));
                }
                Ok(outcome)
            }
        })
        .buffer_unordered(4)
        .collect()
        .await;
    for outcome in outcomes {
        let outcome = outcome?;
        ensure!(
            matches!(
                outcome,
                HarvestOutcome::ShardHarvested {
                    finished: false,
                    ..
                }
            ),
            "no shard but the killed one's redo may finish the batch: {outcome:?}"
        );
    }
    let redo = shard_requests
        .iter()
        .find(|r| r.shard == Some(KILLED))
        .context("the killed shard's request")?;
    let outcome = harvest(&watched, &stack.queue, &client, &config, redo).await?;
    let HarvestOutcome::ShardHarvested {
        counts, finished, ..
    } = outcome
    else {
        anyhow::bail!("{outcome:?}");
    };
    ensure!(finished, "the last shard finishes the batch");
    ensure!(
        counts.labelled as usize == per_shard && counts.duplicates == 0,
        "the redone shard counts its own earlier labels as written, once: {counts:?}"
    );
    let spans = spans.lock().map(|s| s.clone()).unwrap_or_default();
    let overlapped = spans
        .iter()
        .any(|a| spans.iter().any(|b| a != b && b.0 < a.1 && a.0 < b.1));
    ensure!(overlapped, "the shards never ran at once: {spans:?}");

    // Exactly one label per request, nothing failed or sent round again.
    let labels: HashSet<String> = list(&stack, "labels/").await?.into_iter().collect();
    let layout = shotlabel_core::records::Layout::new(INPUT);
    ensure!(
        labels.len() == requests,
        "{} labels for {requests} requests",
        labels.len()
    );
    for item in manifest.items.values() {
        let key = layout.label_key(layout.relative_or_key(&item.key));
        ensure!(labels.contains(&key), "no label {key}");
    }
    ensure!(list(&stack, "failed/").await?.is_empty());
    ensure!(queue_depth(&stack, &stack.resources.pending_queue_url).await? == 0);

    // One dataset part per shard, every request in exactly one of them.
    let parts = list(&stack, shotlabel_core::dataset::DATASET_PREFIX).await?;
    ensure!(
        parts.len() == plan.shards.len(),
        "{} parts for {} shards",
        parts.len(),
        plan.shards.len()
    );
    let mut in_parts = HashSet::new();
    for part in &parts {
        let body =
            shotlabel_core::ports::ObjectStore::get(&stack.store, &stack.resources.bucket, part)
                .await?
                .body;
        for row in shotlabel_core::dataset::read_part(body)? {
            let key = row
                .get("source_key")
                .and_then(|k| k.as_str())
                .context("a source key")?
                .to_owned();
            ensure!(in_parts.insert(key.clone()), "{key} is in two parts");
        }
    }
    ensure!(
        in_parts.len() == requests,
        "{} rows in the parts",
        in_parts.len()
    );

    // Marked harvested once, after every shard, with every request counted once.
    let record: BatchRecord = read_json(&stack, &state_keys::batch(&batch.id)).await?;
    ensure!(record.phase == BatchPhase::Harvested);
    let total = record.harvest.context("the record's counts")?;
    ensure!(
        total.labelled as usize == requests && total.duplicates == 0 && total.retried == 0,
        "{total:?}"
    );
    let harvested_writes = watched
        .record_writes
        .lock()
        .map(|w| w.iter().filter(|t| t.contains("\"harvested\"")).count())
        .unwrap_or_default();
    ensure!(harvested_writes == 1, "{harvested_writes} harvested writes");

    // Asked again (a late webhook, a reconciliation): nothing more happens.
    let again = harvest(&watched, &stack.queue, &client, &config, &request).await?;
    ensure!(
        matches!(again, HarvestOutcome::AlreadyHarvested { .. }),
        "{again:?}"
    );
    eprintln!(
        "{requests} requests in {} shards: batch ready in {:.1} s, harvested by {:.1} s",
        plan.shards.len(),
        prepared.as_secs_f64(),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}
