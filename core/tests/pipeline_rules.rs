//! The submit and harvest rules of ARCHITECTURE.md ("Crash safety") on the in-memory
//! ports: the behaviour `tests/tests/{submit,harvest}.rs` checks against moto and the batch
//! emulator, here in milliseconds, with crashes injected through the ports' fault hooks.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail, ensure};
use serde::de::DeserializeOwned;
use serde_json::{Value, json};
use shotlabel_core::batch_api::{BatchError, BatchStatus};
use shotlabel_core::enqueue::{EnqueueConfig, EnqueueReport, NewObject, enqueue_objects};
use shotlabel_core::harvest::{HarvestConfig, HarvestOutcome, ShardConfig, harvest, reconcile};
use shotlabel_core::memory::{
    KeyMatch, MEMORY_MODEL, MemoryProvider, MemoryQueue, MemoryStore, ProviderOp, QueueOp,
    REPLY_PROMPT_TOKENS, Reply, StoreFault, StoreOp, sample_png,
};
use shotlabel_core::prepare::DecodeLimits;
use shotlabel_core::records::{
    BatchPhase, BatchRecord, FailedRecord, HarvestCounts, HarvestRequest, LabelRecord, Layout,
    Manifest, PendingItem, TaskRef, state_keys,
};
use shotlabel_core::records::{RecordStatus, Stage};
use shotlabel_core::request::BatchLimits;
use shotlabel_core::submit::{METADATA_MANIFEST, SubmitConfig, SubmitReport, run_submit};
use shotlabel_core::task::Task;

const BUCKET: &str = "bucket";
const INPUT: &str = "incoming/";
const PENDING_QUEUE: &str = "memory://queue/pending";
const MAX_RETRIES: u32 = 3;
/// How long a submit run hides the messages it takes (as in `tests/tests/common`).
const VISIBILITY: Duration = Duration::from_secs(300);

/// The three ports and the configuration of one pipeline.
struct Pipeline {
    store: MemoryStore,
    queue: MemoryQueue,
    provider: MemoryProvider,
    task: Arc<Task>,
    work_dir: tempfile::TempDir,
}

impl Pipeline {
    fn new() -> anyhow::Result<Self> {
        Ok(Self {
            store: MemoryStore::default(),
            queue: MemoryQueue::default(),
            provider: MemoryProvider::default(),
            task: Arc::new(Task::default_task()?),
            work_dir: tempfile::tempdir()?,
        })
    }

    fn task_ref(&self) -> TaskRef {
        TaskRef {
            name: self.task.name().to_owned(),
            version: self.task.version().to_owned(),
        }
    }

    /// Puts a small distinct PNG per name under the input prefix, and reports each as an
    /// S3 event would.
    fn put_images(&self, names: &[&str]) -> anyhow::Result<Vec<NewObject>> {
        let mut objects = Vec::new();
        for (i, name) in names.iter().enumerate() {
            let key = format!("{INPUT}{name}");
            objects.push(self.store.put_new_object(BUCKET, &key, sample_png(i)?));
        }
        Ok(objects)
    }

    async fn enqueue(&self, objects: Vec<NewObject>) -> anyhow::Result<EnqueueReport> {
        self.enqueue_with(objects, false).await
    }

    /// Enqueues as the enqueue function does; `force_relabel` as `shotlabel backfill
    /// --force` asks.
    async fn enqueue_with(
        &self,
        objects: Vec<NewObject>,
        force_relabel: bool,
    ) -> anyhow::Result<EnqueueReport> {
        let config = EnqueueConfig {
            layout: Layout::new(INPUT),
            pending_queue_url: PENDING_QUEUE.to_owned(),
            max_object_bytes: 50 * 1024 * 1024,
            force_relabel,
            task: self.task_ref(),
        };
        Ok(enqueue_objects(&self.store, &self.queue, &config, objects).await?)
    }

    fn submit_config(&self, limits: BatchLimits) -> SubmitConfig {
        SubmitConfig {
            bucket: BUCKET.to_owned(),
            layout: Layout::new(INPUT),
            pending_queue_url: PENDING_QUEUE.to_owned(),
            task: self.task.clone(),
            limits,
            max_request_bytes: None,
            decode_limits: DecodeLimits::default(),
            time_budget: Duration::from_secs(60),
            visibility_timeout: VISIBILITY,
            receive_wait: Duration::ZERO,
            max_images: 0,
            concurrency: 2,
            work_dir: self.work_dir.path().to_owned(),
            completion_window: "24h".into(),
            per_batch_webhook: None,
            provider_limits: Default::default(),
            slot_lease: std::time::Duration::from_secs(900),
            max_requeues: 10,
            pending_max_receives: 5,
        }
    }

    async fn submit_with(&self, limits: BatchLimits) -> anyhow::Result<SubmitReport> {
        let config = self.submit_config(limits);
        Ok(run_submit(&self.store, &self.queue, &self.provider, &config).await?)
    }

    async fn submit(&self) -> anyhow::Result<SubmitReport> {
        self.submit_with(BatchLimits::default()).await
    }

    /// Submits and expects exactly one batch; returns its id.
    async fn submit_one(&self) -> anyhow::Result<String> {
        let report = self.submit().await?;
        ensure!(report.errors.is_empty(), "{:?}", report.errors);
        match report.batches.as_slice() {
            [batch] => Ok(batch.batch_id.clone()),
            other => bail!("one batch expected, got {other:?}"),
        }
    }

    fn harvest_config(&self) -> HarvestConfig {
        HarvestConfig {
            bucket: BUCKET.to_owned(),
            layout: Layout::new(INPUT),
            pending_queue_url: PENDING_QUEUE.to_owned(),
            task: self.task.clone(),
            max_retries: MAX_RETRIES,
            max_requeues: 10,
            shards: None,
            delete_provider_files: false,
        }
    }

    async fn harvest(&self, batch_id: &str) -> anyhow::Result<HarvestOutcome> {
        let request = HarvestRequest {
            batch_id: Some(batch_id.to_owned()),
            manifest: None,
            origin: "test".into(),
            shard: None,
            delivery: None,
        };
        Ok(harvest(
            &self.store,
            &self.queue,
            &self.provider,
            &self.harvest_config(),
            &request,
        )
        .await?)
    }

    /// Harvests a batch that must be harvested now; returns its counts.
    async fn harvest_counts(&self, batch_id: &str) -> anyhow::Result<HarvestCounts> {
        match self.harvest(batch_id).await? {
            HarvestOutcome::Harvested { counts, .. } => Ok(counts),
            other => bail!("{batch_id} was not harvested: {other:?}"),
        }
    }

    fn read<T: DeserializeOwned>(&self, key: &str) -> anyhow::Result<T> {
        let object = self
            .store
            .object(BUCKET, key)
            .with_context(|| format!("no object {key}"))?;
        serde_json::from_slice(&object.body).with_context(|| format!("reading {key}"))
    }

    fn read_all<T: DeserializeOwned>(&self, prefix: &str) -> anyhow::Result<Vec<T>> {
        self.store
            .keys(BUCKET, prefix)
            .iter()
            .map(|key| self.read(key))
            .collect()
    }

    fn label(&self, name: &str) -> anyhow::Result<LabelRecord> {
        self.read(&format!("labels/{name}.json"))
    }

    /// Every label's key and etag: a rewritten label shows as a changed etag.
    fn label_etags(&self) -> BTreeMap<String, String> {
        self.store
            .keys(BUCKET, "labels/")
            .into_iter()
            .filter_map(|key| {
                let etag = self.store.object(BUCKET, &key)?.etag;
                Some((key, etag))
            })
            .collect()
    }

    /// The manifest a batch was created for.
    fn manifest_of(&self, batch_id: &str) -> anyhow::Result<Manifest> {
        let batch = self
            .provider
            .batch(batch_id)
            .with_context(|| format!("no batch {batch_id}"))?;
        let name = batch
            .metadata
            .get(METADATA_MANIFEST)
            .context("the batch names no manifest")?;
        self.read(&state_keys::manifest(name))
    }

    /// The custom id a batch's manifest gave an image.
    fn custom_id_of(&self, batch_id: &str, name: &str) -> anyhow::Result<String> {
        let key = format!("{INPUT}{name}");
        self.manifest_of(batch_id)?
            .items
            .into_iter()
            .find(|(_, item)| item.key == key)
            .map(|(custom_id, _)| custom_id)
            .with_context(|| format!("{name} is not in batch {batch_id}"))
    }

    /// The items waiting on the pending queue.
    fn pending(&self) -> anyhow::Result<Vec<PendingItem>> {
        self.queue
            .bodies(PENDING_QUEUE)
            .iter()
            .map(|body| Ok(serde_json::from_str(body)?))
            .collect()
    }

    fn manifests(&self) -> anyhow::Result<Vec<Manifest>> {
        self.read_all("state/manifests/")
    }
}

/// A schema-valid answer that differs between custom ids, so a label holding another
/// request's answer shows.
fn answer_for(custom_id: &str) -> Value {
    let sum: usize = custom_id.bytes().map(usize::from).sum();
    json!({ "landing_page": sum.is_multiple_of(2), "aesthetic": sum % 5 + 1 })
}

/// A provider's batch-level error for a rejected input file.
fn file_error(code: &str, message: &str) -> Vec<BatchError> {
    vec![BatchError {
        code: Some(code.into()),
        message: Some(message.into()),
        param: None,
        line: None,
    }]
}

/// How many manifests each image key appears in.
fn appearances(manifests: &[Manifest]) -> BTreeMap<String, usize> {
    let mut seen = BTreeMap::new();
    for manifest in manifests {
        for item in manifest.items.values() {
            *seen.entry(item.key.clone()).or_default() += 1;
        }
    }
    seen
}

fn keys_of(objects: &[NewObject]) -> BTreeSet<String> {
    objects.iter().map(|o| o.key.clone()).collect()
}

#[tokio::test]
async fn a_completed_batch_gives_each_image_one_valid_label_with_provenance() -> anyhow::Result<()>
{
    let p = Pipeline::new()?;
    let names = ["a.png", "b.png", "c.png", "deep/d.png"];
    let objects = p.put_images(&names)?;
    assert_eq!(p.enqueue(objects.clone()).await?.queued, 4);
    let batch_id = p.submit_one().await?;
    assert_eq!(
        p.queue.depth(PENDING_QUEUE),
        0,
        "submitted messages are deleted"
    );

    // Before the batch finishes, a harvest does nothing.
    let early = p.harvest(&batch_id).await?;
    assert!(
        matches!(early, HarvestOutcome::NotFinished { .. }),
        "{early:?}"
    );
    assert!(p.store.keys(BUCKET, "labels/").is_empty());

    p.provider.complete(&batch_id, answer_for)?;
    let counts = p.harvest_counts(&batch_id).await?;
    assert_eq!(
        (
            counts.labelled,
            counts.retried,
            counts.failed,
            counts.duplicates
        ),
        (4, 0, 0, 0)
    );
    assert_eq!(counts.prompt_tokens, 4 * REPLY_PROMPT_TOKENS);

    let manifest = p.manifest_of(&batch_id)?;
    for (object, name) in objects.iter().zip(names) {
        let label = p.label(name)?;
        assert_eq!(label.status, RecordStatus::Labelled);
        assert_eq!(
            (&label.source.key, &label.source.etag),
            (&object.key, &object.etag)
        );
        assert_eq!(label.task, p.task_ref());
        assert_eq!(label.model, MEMORY_MODEL);
        assert_eq!(label.attempt, 0);
        assert_eq!(label.provenance.batch_id, batch_id);
        let asked = manifest
            .items
            .get(&label.provenance.custom_id)
            .context("the provenance names a request of the manifest")?;
        assert_eq!(asked.key, object.key);
        assert!(label.provenance.request_id.is_some());
        assert_eq!(label.provenance.finish_reason.as_deref(), Some("stop"));
        assert!(label.provenance.usage.is_some_and(|u| u.total_tokens > 0));
        assert_eq!(label.label, answer_for(&label.provenance.custom_id));
        p.task
            .validate_answer(&label.label)
            .map_err(|e| anyhow::anyhow!("{e:?}"))?;
    }
    assert_eq!(p.store.keys(BUCKET, "labels/").len(), 4);
    let results = p
        .store
        .object(BUCKET, &state_keys::results(&batch_id))
        .context("no results file")?;
    assert_eq!(String::from_utf8(results.body)?.lines().count(), 4);
    let record: BatchRecord = p.read(&state_keys::batch(&batch_id))?;
    assert_eq!(record.phase, BatchPhase::Harvested);
    assert_eq!(record.provider_status.as_deref(), Some("completed"));
    assert_eq!(record.harvest.map(|c| c.labelled), Some(4));
    assert!(p.store.keys(BUCKET, state_keys::OPEN_PREFIX).is_empty());

    // A duplicate webhook: nothing changes.
    let before = p.label_etags();
    let again = p.harvest(&batch_id).await?;
    assert!(
        matches!(again, HarvestOutcome::AlreadyHarvested { .. }),
        "{again:?}"
    );
    assert_eq!(p.label_etags(), before);
    assert_eq!(
        p.queue.sent().len(),
        4,
        "only the enqueued messages, nothing requeued"
    );
    Ok(())
}

#[tokio::test]
async fn two_batches_answering_the_same_images_leave_one_label_and_count_duplicates()
-> anyhow::Result<()> {
    let p = Pipeline::new()?;
    let objects = p.put_images(&["a.png", "b.png", "c.png"])?;
    // The same S3 events twice, each drained by its own submit run.
    p.enqueue(objects.clone()).await?;
    let first = p.submit_one().await?;
    p.enqueue(objects).await?;
    let second = p.submit_one().await?;
    p.provider.complete(&first, answer_for)?;
    p.provider.complete(&second, answer_for)?;

    // The second batch's webhook arrives first.
    let later = p.harvest_counts(&second).await?;
    let labelled = p.label_etags();
    let earlier = p.harvest_counts(&first).await?;
    assert_eq!((later.labelled, later.duplicates), (3, 0));
    assert_eq!((earlier.labelled, earlier.duplicates), (0, 3));
    assert_eq!((earlier.retried, earlier.failed), (0, 0));
    let labels: Vec<LabelRecord> = p.read_all("labels/")?;
    assert_eq!(labels.len(), 3);
    assert!(labels.iter().all(|l| l.provenance.batch_id == second));
    assert_eq!(p.label_etags(), labelled, "the duplicates wrote nothing");
    assert_eq!(
        p.queue.depth(PENDING_QUEUE),
        0,
        "no duplicate goes round again"
    );
    // The dataset: the labelling batch's part holds the three rows; the duplicates' batch
    // wrote none.
    let parts = p
        .store
        .keys(BUCKET, shotlabel_core::dataset::DATASET_PREFIX);
    assert_eq!(
        parts,
        [shotlabel_core::dataset::part_key(
            p.task.name(),
            p.task.version(),
            &second,
            0
        )]
    );
    let part = p.store.object(BUCKET, &parts[0]).context("the part")?;
    let rows = shotlabel_core::dataset::read_part(part.body)?;
    let mut keys: Vec<&str> = rows
        .iter()
        .filter_map(|row| row.get("source_key")?.as_str())
        .collect();
    keys.sort_unstable();
    assert_eq!(keys, ["incoming/a.png", "incoming/b.png", "incoming/c.png"]);
    Ok(())
}

/// Forced relabelling carries the etag of the label it may replace and writes with
/// `If-Match` on it: of two relabels of one image, exactly one new label wins.
#[tokio::test]
async fn of_two_forced_relabels_of_one_image_exactly_one_replaces_the_label() -> anyhow::Result<()>
{
    let p = Pipeline::new()?;
    let objects = p.put_images(&["a.png"])?;
    p.enqueue(objects.clone()).await?;
    let original = p.submit_one().await?;
    p.provider.complete(&original, answer_for)?;
    p.harvest_counts(&original).await?;
    let labelled = p.label_etags();

    // Two relabel requests while the label is unchanged: both carry its etag.
    assert_eq!(p.enqueue(objects.clone()).await?.already_labelled, 1);
    assert_eq!(p.enqueue_with(objects.clone(), true).await?.queued, 1);
    let first = p.submit_one().await?;
    assert_eq!(p.enqueue_with(objects, true).await?.queued, 1);
    let second = p.submit_one().await?;
    for batch_id in [&first, &second] {
        let manifest = p.manifest_of(batch_id)?;
        let carried: Vec<Option<&String>> = manifest
            .items
            .values()
            .map(|item| item.replace_label.as_ref())
            .collect();
        assert_eq!(carried, [labelled.get("labels/a.png.json")]);
    }
    p.provider.complete(&first, answer_for)?;
    p.provider.complete(&second, answer_for)?;

    let replaced = p.harvest_counts(&first).await?;
    assert_eq!((replaced.labelled, replaced.duplicates), (1, 0));
    let relabelled = p.label_etags();
    assert_ne!(relabelled, labelled, "the label was replaced");
    let late = p.harvest_counts(&second).await?;
    assert_eq!((late.labelled, late.duplicates), (0, 1));
    assert_eq!(
        p.label_etags(),
        relabelled,
        "the second relabel wrote nothing"
    );
    let label = p.label("a.png")?;
    assert_eq!(label.provenance.batch_id, first);
    assert_eq!(label.label, answer_for(&label.provenance.custom_id));
    Ok(())
}

#[tokio::test]
async fn a_harvest_repeated_after_a_crash_finds_its_own_labels_and_requeues_nothing_twice()
-> anyhow::Result<()> {
    let p = Pipeline::new()?;
    let names = ["a.png", "b.png", "c.png", "d.png"];
    p.enqueue(p.put_images(&names)?).await?;
    let batch_id = p.submit_one().await?;
    let bad = p.custom_id_of(&batch_id, "d.png")?;
    p.provider
        .finish(&batch_id, BatchStatus::Completed, |request| {
            if request.custom_id == bad {
                Reply::Text("a landing page, I would say".into())
            } else {
                Reply::Json(answer_for(&request.custom_id))
            }
        })?;

    // The process dies writing b's label: some labels are written, nothing is requeued.
    p.store.fail_once(StoreOp::Put, "labels/b.png.json");
    assert!(p.harvest(&batch_id).await.is_err());
    assert_eq!(p.store.fired_faults().len(), 1);
    let after_first_crash = p.label_etags();
    assert!(!after_first_crash.contains_key("labels/b.png.json"));
    assert_eq!(p.queue.depth(PENDING_QUEUE), 0);

    // Again, and it dies writing the batch's state record, after the retry went out.
    p.store.fail_once_under(StoreOp::Put, "state/batches/");
    assert!(p.harvest(&batch_id).await.is_err());
    assert_eq!(p.store.fired_faults().len(), 2);
    assert_eq!(p.queue.depth(PENDING_QUEUE), 1);
    let labelled = p.label_etags();
    assert_eq!(labelled.len(), 3);
    for (key, etag) in &after_first_crash {
        assert_eq!(labelled.get(key), Some(etag), "{key} was rewritten");
    }

    // The third time it finishes: its own earlier labels count as written.
    let counts = p.harvest_counts(&batch_id).await?;
    assert_eq!(
        (
            counts.labelled,
            counts.retried,
            counts.failed,
            counts.duplicates
        ),
        (3, 1, 0, 0)
    );
    assert_eq!(p.label_etags(), labelled, "no label rewritten");
    assert_eq!(p.queue.depth(PENDING_QUEUE), 1, "nothing requeued twice");
    let record: BatchRecord = p.read(&state_keys::batch(&batch_id))?;
    assert_eq!(record.phase, BatchPhase::Harvested);
    assert!(matches!(
        p.harvest(&batch_id).await?,
        HarvestOutcome::AlreadyHarvested { .. }
    ));
    Ok(())
}

#[tokio::test]
async fn bad_answers_go_round_again_with_the_next_attempt_then_fail_with_every_reason()
-> anyhow::Result<()> {
    let p = Pipeline::new()?;
    let objects = p.put_images(&["bad.png", "good.png"])?;
    p.enqueue(objects.clone()).await?;

    // One bad answer per round, of every kind; the good image is labelled in the first.
    let bad_replies = [
        Reply::Text("It looks like a landing page.".into()),
        Reply::Json(json!({ "landing_page": true, "aesthetic": 9 })),
        Reply::CutOff,
        Reply::Error {
            code: "server_error".into(),
            message: "the model is overloaded".into(),
        },
    ];
    assert_eq!(bad_replies.len() as u32, MAX_RETRIES + 1);
    for (round, bad_reply) in bad_replies.iter().enumerate() {
        let batch_id = p.submit_one().await?;
        let manifest = p.manifest_of(&batch_id)?;
        let bad = p.custom_id_of(&batch_id, "bad.png")?;
        let item = &manifest.items[&bad];
        assert_eq!(
            item.attempt as usize, round,
            "the retry carries its attempt"
        );
        assert_eq!(item.reasons.len(), round);
        p.provider
            .finish(&batch_id, BatchStatus::Completed, |request| {
                if request.custom_id == bad {
                    bad_reply.clone()
                } else {
                    Reply::Json(answer_for(&request.custom_id))
                }
            })?;
        let counts = p.harvest_counts(&batch_id).await?;
        let last = round as u32 == MAX_RETRIES;
        assert_eq!(
            (counts.retried, counts.failed),
            if last { (0, 1) } else { (1, 0) },
            "round {round}: {counts:?}"
        );
        if !last {
            let [retry] = p
                .pending()?
                .try_into()
                .map_err(|pending: Vec<PendingItem>| {
                    anyhow::anyhow!("one retry expected: {pending:?}")
                })?;
            assert_eq!(retry.key, format!("{INPUT}bad.png"));
            assert_eq!(retry.attempt as usize, round + 1);
        }
    }

    assert_eq!(p.queue.depth(PENDING_QUEUE), 0, "never retried forever");
    assert!(p.store.object(BUCKET, "labels/bad.png.json").is_none());
    assert_eq!(p.label("good.png")?.attempt, 0);
    let record: FailedRecord = p.read("failed/bad.png.json")?;
    assert_eq!(record.status, RecordStatus::Failed);
    assert_eq!(record.source.etag, objects[0].etag);
    assert_eq!(record.task, p.task_ref());
    let attempts: Vec<u32> = record.reasons.iter().map(|r| r.attempt).collect();
    assert_eq!(attempts, [0, 1, 2, 3]);
    let stages: Vec<&str> = record.reasons.iter().map(|r| r.stage.as_str()).collect();
    assert_eq!(stages, ["validate", "validate", "validate", "provider"]);
    for (reason, expected) in record.reasons.iter().zip([
        "cannot be read as JSON",
        "breaks the",
        "max_tokens",
        "overloaded",
    ]) {
        assert!(reason.reason.contains(expected), "{reason:?}");
    }
    assert_eq!(p.store.keys(BUCKET, "failed/").len(), 1);
    Ok(())
}

#[tokio::test]
async fn an_expired_batch_keeps_what_finished_and_requeues_the_rest() -> anyhow::Result<()> {
    let p = Pipeline::new()?;
    let names = ["a.png", "b.png", "c.png", "d.png"];
    p.enqueue(p.put_images(&names)?).await?;
    let batch_id = p.submit_one().await?;
    let finished: BTreeSet<String> = ["a.png", "c.png"]
        .iter()
        .map(|name| p.custom_id_of(&batch_id, name))
        .collect::<anyhow::Result<_>>()?;
    let batch = p
        .provider
        .finish(&batch_id, BatchStatus::Expired, |request| {
            if finished.contains(&request.custom_id) {
                Reply::Json(answer_for(&request.custom_id))
            } else {
                Reply::Missing
            }
        })?;
    assert_eq!(batch.status, BatchStatus::Expired);

    let counts = p.harvest_counts(&batch_id).await?;
    assert_eq!((counts.labelled, counts.retried), (2, 2), "{counts:?}");
    assert_eq!(
        p.store.keys(BUCKET, "labels/"),
        ["labels/a.png.json", "labels/c.png.json"]
    );
    let requeued: BTreeSet<String> = p.pending()?.into_iter().map(|i| i.key).collect();
    assert_eq!(
        requeued,
        BTreeSet::from([format!("{INPUT}b.png"), format!("{INPUT}d.png")])
    );
    // The batch expired, not the images: their attempts are not spent.
    for item in p.pending()? {
        assert_eq!((item.attempt, item.requeues), (0, 1));
        assert_eq!(item.reasons[0].stage, Stage::Batch);
        assert!(item.reasons[0].reason.contains("expired"), "{item:?}");
    }
    let record: BatchRecord = p.read(&state_keys::batch(&batch_id))?;
    assert_eq!(record.provider_status.as_deref(), Some("expired"));

    // The requeued images go out again and are labelled.
    let retry = p.submit_one().await?;
    p.provider.complete(&retry, answer_for)?;
    assert_eq!(p.harvest_counts(&retry).await?.labelled, 2);
    assert_eq!(p.label("d.png")?.attempt, 0, "an expiry spends no attempt");
    assert_eq!(p.store.keys(BUCKET, "labels/").len(), 4);
    Ok(())
}

#[tokio::test]
async fn submit_splits_request_files_by_request_count_and_by_bytes() -> anyhow::Result<()> {
    let names = [
        "1.png", "2.png", "3.png", "4.png", "5.png", "6.png", "7.png",
    ];
    let p = Pipeline::new()?;
    let objects = p.put_images(&names)?;
    p.enqueue(objects.clone()).await?;
    let by_count = BatchLimits {
        max_requests: 3,
        max_bytes: 200_000_000,
    };
    let report = p.submit_with(by_count).await?;
    let sizes: Vec<u64> = report.batches.iter().map(|b| b.requests).collect();
    assert_eq!(sizes, [3, 3, 1], "{report:?}");
    assert_eq!(report.prepared, 7);
    let seen = appearances(&p.manifests()?);
    assert_eq!(
        seen.keys().cloned().collect::<BTreeSet<_>>(),
        keys_of(&objects)
    );
    assert!(seen.values().all(|&n| n == 1), "{seen:?}");
    for submitted in &report.batches {
        let batch = p
            .provider
            .batch(&submitted.batch_id)
            .context("the provider has the batch")?;
        assert_eq!(
            batch.metadata.get(METADATA_MANIFEST),
            Some(&submitted.manifest)
        );
        assert_eq!(
            p.provider.requests(&submitted.batch_id).len() as u64,
            submitted.requests
        );
        let record: BatchRecord = p.read(&state_keys::batch(&submitted.batch_id))?;
        assert_eq!(
            (record.phase, record.requests),
            (BatchPhase::Open, submitted.requests)
        );
    }
    assert_eq!(p.store.keys(BUCKET, state_keys::OPEN_PREFIX).len(), 3);
    assert_eq!(p.queue.depth(PENDING_QUEUE), 0);

    // The same images in a fresh pipeline, split by bytes: at most two lines per file.
    let largest_line = report
        .batches
        .iter()
        .map(|b| b.bytes.div_ceil(b.requests))
        .max()
        .unwrap_or_default();
    let by_bytes = BatchLimits {
        max_requests: 1000,
        max_bytes: largest_line * 5 / 2,
    };
    let p = Pipeline::new()?;
    p.enqueue(p.put_images(&names)?).await?;
    let report = p.submit_with(by_bytes).await?;
    assert_eq!(report.prepared, 7);
    assert!(report.batches.len() >= 4, "{:?}", report.batches);
    assert_eq!(report.batches.iter().map(|b| b.requests).sum::<u64>(), 7);
    for batch in p.provider.batches() {
        let input = batch.input_file_id.context("an input file")?;
        let uploaded = p.provider.file(&input).context("the input file is kept")?;
        assert!(uploaded.len() as u64 <= by_bytes.max_bytes);
        assert_eq!(
            batch.status,
            BatchStatus::Validating,
            "the provider took it"
        );
    }
    Ok(())
}

#[tokio::test(start_paused = true)]
async fn a_submit_crash_between_create_and_delete_makes_a_second_batch_whose_answers_are_duplicates()
-> anyhow::Result<()> {
    let p = Pipeline::new()?;
    let objects = p.put_images(&["a.png", "b.png", "c.png"])?;
    p.enqueue(objects.clone()).await?;

    // The batch is created, then the process dies: its messages are never deleted.
    p.queue.fail_next(QueueOp::Delete, 1);
    let first = p.submit().await?;
    assert_eq!(first.batches.len(), 1);
    assert!(!first.errors.is_empty(), "the failed delete is reported");
    assert_eq!(p.queue.calls(QueueOp::Delete), 1);
    assert_eq!(
        (
            p.queue.depth(PENDING_QUEUE),
            p.queue.in_flight(PENDING_QUEUE)
        ),
        (3, 3),
        "every message survives, hidden"
    );

    // While their visibility timeout runs, the messages stay hidden from the next run.
    let hidden = p.submit().await?;
    assert_eq!((hidden.received, hidden.batches.len()), (0, 0));

    // Then they come back, and go out in a second batch.
    tokio::time::advance(VISIBILITY).await;
    let second = p.submit().await?;
    assert_eq!(second.received, 3);
    assert_eq!(second.batches.len(), 1);
    assert!(second.errors.is_empty(), "{:?}", second.errors);
    assert_eq!(p.queue.depth(PENDING_QUEUE), 0);
    let seen = appearances(&p.manifests()?);
    assert_eq!(
        seen.keys().cloned().collect::<BTreeSet<_>>(),
        keys_of(&objects)
    );
    assert!(seen.values().all(|&n| n == 2), "{seen:?}");

    let (a, b) = (&first.batches[0].batch_id, &second.batches[0].batch_id);
    p.provider.complete(a, answer_for)?;
    p.provider.complete(b, answer_for)?;
    let earlier = p.harvest_counts(a).await?;
    let later = p.harvest_counts(b).await?;
    assert_eq!((earlier.labelled, earlier.duplicates), (3, 0));
    assert_eq!((later.labelled, later.duplicates), (0, 3));
    let labels: Vec<LabelRecord> = p.read_all("labels/")?;
    assert_eq!(labels.len(), 3);
    assert!(labels.iter().all(|l| &l.provenance.batch_id == a));
    assert_eq!(
        p.queue.depth(PENDING_QUEUE),
        0,
        "no duplicate goes round again"
    );
    Ok(())
}

#[tokio::test]
async fn reconciliation_harvests_a_batch_whose_webhook_never_came() -> anyhow::Result<()> {
    let p = Pipeline::new()?;
    p.enqueue(p.put_images(&["a.png", "b.png"])?).await?;
    let batch_id = p.submit_one().await?;
    let config = p.harvest_config();
    let reconcile_now = |min_age| reconcile(&p.store, &p.queue, &p.provider, &config, min_age);

    let young = reconcile_now(Duration::from_secs(3600)).await?;
    assert_eq!(
        (young.open, young.skipped_young, young.harvested),
        (1, 1, 0)
    );
    let running = reconcile_now(Duration::ZERO).await?;
    assert_eq!((running.open, running.still_running), (1, 1));

    p.provider.complete(&batch_id, answer_for)?;
    let done = reconcile_now(Duration::ZERO).await?;
    assert_eq!((done.open, done.harvested), (1, 1), "{done:?}");
    assert_eq!(done.counts.labelled, 2);
    assert!(done.errors.is_empty(), "{:?}", done.errors);
    assert_eq!(p.store.keys(BUCKET, "labels/").len(), 2);
    assert_eq!(reconcile_now(Duration::ZERO).await?.open, 0);
    Ok(())
}

/// The submitter dies writing the batch's state record and the webhook is lost: the open
/// marker, written first, still brings the batch to reconciliation.
#[tokio::test]
async fn a_submit_that_dies_writing_the_batch_record_leaves_it_to_reconciliation()
-> anyhow::Result<()> {
    let p = Pipeline::new()?;
    p.enqueue(p.put_images(&["a.png", "b.png", "c.png"])?)
        .await?;
    p.store.fail_once_under(StoreOp::Put, "state/batches/");
    let report = p.submit().await?;
    assert!(report.batches.is_empty(), "{report:?}");
    assert!(!report.errors.is_empty(), "the crash is reported");
    assert_eq!(p.store.fired_faults().len(), 1);
    let markers = p.store.keys(BUCKET, state_keys::OPEN_PREFIX);
    let [marker] = markers.as_slice() else {
        bail!("one open marker expected, found {markers:?}");
    };
    let batch_id = state_keys::batch_id_of_marker(marker).context("the marker names a batch")?;
    p.provider.complete(&batch_id, answer_for)?;

    let config = p.harvest_config();
    let done = reconcile(&p.store, &p.queue, &p.provider, &config, Duration::ZERO).await?;
    assert_eq!((done.open, done.harvested), (1, 1), "{done:?}");
    assert_eq!(done.counts.labelled, 3);
    let record: BatchRecord = p.read(&state_keys::batch(&batch_id))?;
    assert_eq!(record.phase, BatchPhase::Harvested);
    assert!(p.store.keys(BUCKET, state_keys::OPEN_PREFIX).is_empty());
    Ok(())
}

#[tokio::test]
async fn a_batch_the_provider_failed_is_retried_or_failed_by_its_cause() -> anyhow::Result<()> {
    let p = Pipeline::new()?;
    p.enqueue(p.put_images(&["a.png", "b.png"])?).await?;
    // Too large a file: the same items in smaller files can pass, so they go round again.
    let too_large = p.submit_one().await?;
    p.provider.fail(
        &too_large,
        file_error("file_too_large", "the file is over the limit"),
    )?;
    let counts = p.harvest_counts(&too_large).await?;
    assert_eq!((counts.retried, counts.failed), (2, 0));
    assert_eq!(p.queue.depth(PENDING_QUEUE), 2);

    // A file rejected for its content: retrying cannot help, so the items fail.
    let rejected = p.submit_one().await?;
    p.provider.fail(
        &rejected,
        vec![BatchError {
            code: Some("invalid_json_line".into()),
            message: Some("line 1 is not JSON".into()),
            param: None,
            line: Some(1),
        }],
    )?;
    let counts = p.harvest_counts(&rejected).await?;
    assert_eq!((counts.retried, counts.failed), (0, 2));
    assert_eq!(p.queue.depth(PENDING_QUEUE), 0);
    for name in ["a.png", "b.png"] {
        let record: FailedRecord = p.read(&format!("failed/{name}.json"))?;
        let stages: Vec<&str> = record.reasons.iter().map(|r| r.stage.as_str()).collect();
        assert_eq!(stages, ["batch", "provider"]);
        assert!(
            record.reasons[1].reason.contains("invalid_json_line"),
            "{record:?}"
        );
    }
    Ok(())
}

/// Failures of the batch, not the image (the enqueued limit, expiry), send the items round
/// again without spending their retries; only past their own, looser bound do they fail,
/// with every reason on the record.
#[tokio::test]
async fn batch_failures_do_not_spend_an_images_retries() -> anyhow::Result<()> {
    let p = Pipeline::new()?;
    let max_requeues = p.harvest_config().max_requeues;
    p.enqueue(p.put_images(&["a.png"])?).await?;
    for round in 0..=max_requeues {
        let batch = p.submit_one().await?;
        p.provider.fail(
            &batch,
            file_error("token_limit_exceeded", "Enqueued token limit reached"),
        )?;
        let counts = p.harvest_counts(&batch).await?;
        if round < max_requeues {
            assert_eq!((counts.retried, counts.failed), (1, 0), "round {round}");
            let items = p.pending()?;
            assert_eq!(items.len(), 1);
            // More rounds than max_retries allows attempts, and not one attempt spent.
            assert_eq!((items[0].attempt, items[0].requeues), (0, round + 1));
        } else {
            assert_eq!((counts.retried, counts.failed), (0, 1), "round {round}");
        }
    }
    assert!(max_requeues > MAX_RETRIES);
    let record: FailedRecord = p.read("failed/a.png.json")?;
    assert_eq!(record.reasons.len(), max_requeues as usize + 1);
    assert!(
        record
            .reasons
            .iter()
            .all(|r| r.stage == Stage::Batch && r.reason.contains("token_limit_exceeded")),
        "{record:?}"
    );
    Ok(())
}

/// A batch the provider will not create sends its images back to the queue as new
/// messages (so a refusal never walks a healthy image to the dead-letter queue), counting
/// a requeue and not an attempt; past the bound they get failed records with every reason.
#[tokio::test]
async fn a_refused_creation_sends_the_images_back_without_spending_an_attempt() -> anyhow::Result<()>
{
    let p = Pipeline::new()?;
    p.enqueue(p.put_images(&["a.png", "b.png"])?).await?;
    p.provider.fail_next(ProviderOp::Create, 1);
    let report = p.submit().await?;
    assert!(report.batches.is_empty());
    assert_eq!((report.sent_back, report.unsubmitted), (2, 2));
    assert!(
        !report.errors.is_empty(),
        "a refusal is an error of the run"
    );
    let items = p.pending()?;
    assert_eq!(items.len(), 2, "the originals are replaced, not kept");
    for item in &items {
        assert_eq!((item.attempt, item.requeues), (0, 1));
        assert_eq!(item.reasons[0].stage, Stage::Batch);
    }
    // The next run submits them.
    p.submit_one().await?;
    assert_eq!(p.queue.depth(PENDING_QUEUE), 0);

    // A provider that refuses every time: the bound, then failed records.
    let p = Pipeline::new()?;
    p.enqueue(p.put_images(&["c.png"])?).await?;
    p.provider.fail_next(ProviderOp::Create, 1_000);
    let max_requeues = p.submit_config(BatchLimits::default()).max_requeues;
    for _ in 0..=max_requeues {
        p.submit().await?;
    }
    assert_eq!(p.queue.depth(PENDING_QUEUE), 0);
    let record: FailedRecord = p.read("failed/c.png.json")?;
    assert_eq!(record.reasons.len(), max_requeues as usize + 1);
    assert!(record.reasons.iter().all(|r| r.stage == Stage::Batch));
    Ok(())
}

/// A store error at any read or write of a terminal record, in either order of two
/// batches for the same images (one the provider failed for good, one answered), fails
/// that harvest, which is retried as the harvest queue would; every image still ends with
/// exactly one terminal record, its label. A store error is never read as "no label".
#[tokio::test]
async fn a_store_error_at_each_terminal_record_step_still_leaves_one_record_per_image()
-> anyhow::Result<()> {
    let names = ["a.png", "b.png", "c.png"];
    let steps = [
        (StoreOp::Get, "labels/"),
        (StoreOp::Put, "labels/"),
        (StoreOp::Get, "failed/"),
        (StoreOp::Put, "failed/"),
        (StoreOp::Delete, "failed/"),
    ];
    let mut fired: BTreeSet<String> = BTreeSet::new();
    // Twice in a row reaches the check after a failed record's write as well as the one
    // before it.
    let cases = steps
        .into_iter()
        .flat_map(|step| [(step, false, 1), (step, true, 1), (step, false, 2)]);
    for ((op, prefix), takes_effect, times) in cases {
        {
            for failed_first in [true, false] {
                let case = format!(
                    "{op:?} {prefix} x{times} (takes effect: {takes_effect}, failed batch first: {failed_first})"
                );
                let p = Pipeline::new()?;
                let objects = p.put_images(&names)?;
                p.enqueue(objects.clone()).await?;
                let failed_batch = p.submit_one().await?;
                // A duplicate S3 event: the same images again, in a second batch.
                p.enqueue(objects).await?;
                let answered_batch = p.submit_one().await?;
                p.provider.fail(
                    &failed_batch,
                    file_error("invalid_request", "the file was rejected"),
                )?;
                p.provider.complete(&answered_batch, answer_for)?;

                p.store.inject(StoreFault {
                    op,
                    keys: KeyMatch::Prefix(prefix.into()),
                    times: Some(times),
                    takes_effect,
                });
                let order = if failed_first {
                    [&failed_batch, &answered_batch]
                } else {
                    [&answered_batch, &failed_batch]
                };
                for batch_id in order {
                    // Redelivered until it goes through, as the harvest queue does.
                    let mut attempts = 0;
                    while let Err(e) = p.harvest(batch_id).await {
                        attempts += 1;
                        ensure!(attempts < 6, "{case}: {batch_id} keeps failing: {e:#}");
                    }
                }
                if !p.store.fired_faults().is_empty() {
                    fired.insert(format!("{op:?} {prefix}"));
                }
                for name in names {
                    let label = p.store.object(BUCKET, &format!("labels/{name}.json"));
                    let failed = p.store.object(BUCKET, &format!("failed/{name}.json"));
                    ensure!(
                        label.is_some() && failed.is_none(),
                        "{case}: {name} has a label: {}, a failed record: {}",
                        label.is_some(),
                        failed.is_some()
                    );
                }
            }
        }
    }
    // Every step was reached by some case, so each was really tested.
    assert_eq!(fired.len(), steps.len(), "reached: {fired:?}");
    Ok(())
}

/// Enqueue and submit write failed records through the same owner: a store error there
/// leaves the event or message to come back, and the retry writes the one record.
#[tokio::test]
async fn a_store_error_writing_a_refusal_leaves_it_to_the_retry() -> anyhow::Result<()> {
    let p = Pipeline::new()?;
    // An empty object is refused at enqueue.
    let empty = p
        .store
        .put_new_object(BUCKET, &format!("{INPUT}empty.png"), Vec::new());
    p.store.fail_once_under(StoreOp::Put, "failed/");
    assert!(p.enqueue(vec![empty.clone()]).await.is_err());
    assert!(p.store.keys(BUCKET, "failed/").is_empty());
    let report = p.enqueue(vec![empty]).await?;
    assert_eq!(report.failed, 1);
    let record: FailedRecord = p.read("failed/empty.png.json")?;
    assert_eq!(record.reasons[0].stage, Stage::Enqueue);

    // Bytes that are no image are refused at submit; the message stays until written.
    let junk = p.store.put_new_object(
        BUCKET,
        &format!("{INPUT}junk.png"),
        b"not an image".to_vec(),
    );
    p.enqueue(vec![junk]).await?;
    p.store.fail_once_under(StoreOp::Put, "failed/");
    let first = p.submit().await?;
    assert_eq!((first.failed, first.deferred), (0, 1), "{first:?}");
    assert!(p.store.object(BUCKET, "failed/junk.png.json").is_none());
    p.queue.release_all(PENDING_QUEUE);
    let second = p.submit().await?;
    assert_eq!(second.failed, 1, "{second:?}");
    let record: FailedRecord = p.read("failed/junk.png.json")?;
    assert_eq!(record.reasons[0].stage, Stage::Prepare);
    assert_eq!(p.queue.depth(PENDING_QUEUE), 0);
    Ok(())
}

/// An image whose object cannot be read for now is left to come back after the visibility
/// timeout; near the pending queue's receive limit it goes round again as a new message
/// (a requeue, its attempts untouched), and past `max_requeues` it gets a failed record
/// with the reasons. It never reaches the dead-letter queue without a terminal record: the
/// chaos soak found one that did, its receives spent by deferrals under load.
#[tokio::test]
async fn an_image_that_cannot_be_read_goes_round_again_before_its_receives_run_out()
-> anyhow::Result<()> {
    let p = Pipeline::new()?;
    p.enqueue(p.put_images(&["stuck.png"])?).await?;
    p.store
        .fail_always_under(StoreOp::Get, &format!("{INPUT}stuck.png"));
    let mut config = p.submit_config(BatchLimits::default());
    config.pending_max_receives = 5;
    config.max_requeues = 1;
    // One message per run, so that a message sent round is not taken again by its run.
    config.max_images = 1;
    let mut runs = Vec::new();
    // Receives 1 and 2 leave the message to come back; the third sends it round again.
    for _ in 0..3 {
        runs.push(run_submit(&p.store, &p.queue, &p.provider, &config).await?);
        p.queue.release_all(PENDING_QUEUE);
    }
    assert!(
        runs.iter().all(|r| r.deferred == 1 && r.batches.is_empty()),
        "{runs:?}"
    );
    assert_eq!(
        runs.iter().map(|r| r.sent_back).collect::<Vec<_>>(),
        [0, 0, 1]
    );
    let bodies = p.queue.bodies(PENDING_QUEUE);
    assert_eq!(bodies.len(), 1, "the old message is deleted: {bodies:?}");
    let item: PendingItem = serde_json::from_str(&bodies[0])?;
    assert_eq!((item.attempt, item.requeues), (0, 1), "{item:?}");
    assert_eq!(item.reasons[0].stage, Stage::Prepare);
    assert!(
        item.reasons[0].reason.contains("could not be read"),
        "{item:?}"
    );

    // Three more receives of the new message; the second requeue is past the bound.
    let mut runs = Vec::new();
    for _ in 0..3 {
        runs.push(run_submit(&p.store, &p.queue, &p.provider, &config).await?);
        p.queue.release_all(PENDING_QUEUE);
    }
    assert_eq!(
        runs.iter()
            .map(|r| (r.sent_back, r.failed))
            .collect::<Vec<_>>(),
        [(0, 0), (0, 0), (0, 1)]
    );
    assert_eq!(p.queue.depth(PENDING_QUEUE), 0);
    let record: FailedRecord = p.read("failed/stuck.png.json")?;
    assert_eq!(record.reasons.len(), 2, "{record:?}");
    assert!(p.store.object(BUCKET, "labels/stuck.png.json").is_none());

    // Once the object can be read, an image sent round is labelled as usual.
    p.store.clear_faults();
    p.enqueue(p.put_images(&["late.png"])?).await?;
    p.store
        .fail_always_under(StoreOp::Get, &format!("{INPUT}late.png"));
    for _ in 0..3 {
        run_submit(&p.store, &p.queue, &p.provider, &config).await?;
        p.queue.release_all(PENDING_QUEUE);
    }
    p.store.clear_faults();
    let report = run_submit(&p.store, &p.queue, &p.provider, &config).await?;
    assert_eq!(
        (report.prepared, report.batches.len()),
        (1, 1),
        "{report:?}"
    );
    Ok(())
}

/// A shard whose message is gone (its retries ran out into the dead-letter queue) must
/// not leave its batch open for good: the next harvest request for the batch (a
/// reconciliation) queues the shards not done again once `resend_after` has passed, and
/// not before. The chaos soak found this: a shard message dead-lettered by injected
/// faults, and the batch open until the old fixed two hours were up.
#[tokio::test]
async fn shards_whose_messages_were_lost_are_queued_again_after_resend_after() -> anyhow::Result<()>
{
    use shotlabel_core::ports::Queue;
    const HARVEST_QUEUE: &str = "harvest";
    let p = Pipeline::new()?;
    p.enqueue(p.put_images(&["a.png", "b.png", "c.png", "d.png"])?)
        .await?;
    let batch_id = p.submit_one().await?;
    p.provider.complete(&batch_id, answer_for)?;
    let request = HarvestRequest {
        batch_id: Some(batch_id.clone()),
        manifest: None,
        origin: "test".into(),
        shard: None,
        delivery: None,
    };
    let sharded = |resend_after: Duration| {
        let mut config = p.harvest_config();
        config.shards = Some(ShardConfig {
            queue_url: HARVEST_QUEUE.into(),
            requests_per_shard: 2,
            resend_after,
        });
        config
    };
    let queued = |outcome: HarvestOutcome| match outcome {
        HarvestOutcome::Sharded { shards, queued, .. } => Ok((shards, queued)),
        other => bail!("a sharded outcome expected, got {other:?}"),
    };
    let patient = sharded(Duration::from_secs(3600));
    let first = harvest(&p.store, &p.queue, &p.provider, &patient, &request).await?;
    assert_eq!(queued(first)?, (2, 2));
    assert_eq!(p.queue.depth(HARVEST_QUEUE), 2);
    // Both shard messages are lost.
    let lost = p
        .queue
        .receive(HARVEST_QUEUE, 10, Duration::from_secs(3600), Duration::ZERO)
        .await?;
    let handles: Vec<String> = lost.iter().map(|m| m.receipt_handle.clone()).collect();
    p.queue.delete_batch(HARVEST_QUEUE, &handles).await?;
    assert_eq!(p.queue.depth(HARVEST_QUEUE), 0);

    // Within resend_after: the queue is trusted with its own messages.
    let again = harvest(&p.store, &p.queue, &p.provider, &patient, &request).await?;
    assert_eq!(queued(again)?, (2, 0));
    assert_eq!(p.queue.depth(HARVEST_QUEUE), 0);

    // Past it: both are queued again, and they finish the batch.
    let eager = sharded(Duration::ZERO);
    let resent = harvest(&p.store, &p.queue, &p.provider, &eager, &request).await?;
    assert_eq!(queued(resent)?, (2, 2));
    let mut finished = 0;
    for message in p
        .queue
        .receive(HARVEST_QUEUE, 10, Duration::from_secs(60), Duration::ZERO)
        .await?
    {
        let shard_request: HarvestRequest = serde_json::from_str(&message.body)?;
        if let HarvestOutcome::ShardHarvested { finished: true, .. } =
            harvest(&p.store, &p.queue, &p.provider, &eager, &shard_request).await?
        {
            finished += 1;
        }
    }
    assert_eq!(finished, 1, "one shard finishes the batch");
    assert_eq!(p.store.keys(BUCKET, "labels/").len(), 4);
    Ok(())
}

/// A per-batch webhook that comes before the provider shows the batch finished (a body
/// with no status, so every delivery for the batch has the same dedupe key) must not use
/// up its delivery: the harvest that finds the batch still running releases the marker,
/// and the provider's next delivery is queued and harvests the batch.
#[tokio::test]
async fn a_webhook_before_the_batch_finishes_does_not_use_up_the_next_delivery()
-> anyhow::Result<()> {
    use shotlabel_core::webhook::{WebhookConfig, WebhookRequest, receive};
    const HARVEST_QUEUE: &str = "memory://queue/harvest";
    const SECRET: &str = "a per-batch secret of some length";
    let p = Pipeline::new()?;
    p.enqueue(p.put_images(&["a.png", "b.png"])?).await?;
    let batch_id = p.submit_one().await?;
    let manifest = p
        .provider
        .batch(&batch_id)
        .and_then(|b| b.metadata.get(METADATA_MANIFEST).cloned())
        .context("the batch names its manifest")?;
    let mut config = WebhookConfig::new(BUCKET, HARVEST_QUEUE);
    config.per_batch_secret = Some(SECRET.to_owned().into());
    let query = url::form_urlencoded::Serializer::new(String::new())
        .append_pair("manifest", &manifest)
        .append_pair(
            "token",
            &shotlabel_core::batch_token::token(SECRET.as_bytes(), &manifest),
        )
        .finish();
    let delivery = WebhookRequest {
        method: "POST".into(),
        headers: Vec::new(),
        query,
        body: Vec::new(),
    };
    let harvest_next = || async {
        use shotlabel_core::ports::Queue;
        let messages = p
            .queue
            .receive(HARVEST_QUEUE, 10, Duration::from_secs(60), Duration::ZERO)
            .await?;
        let [message] = messages.as_slice() else {
            bail!("one harvest request expected, found {}", messages.len());
        };
        let request: HarvestRequest = serde_json::from_str(&message.body)?;
        let outcome = harvest(
            &p.store,
            &p.queue,
            &p.provider,
            &p.harvest_config(),
            &request,
        )
        .await?;
        p.queue
            .delete_batch(HARVEST_QUEUE, std::slice::from_ref(&message.receipt_handle))
            .await?;
        anyhow::Ok(outcome)
    };

    // Early: queued, harvested as not finished, and the marker released.
    let response = receive(&p.store, &p.queue, &config, &delivery, 0).await;
    assert_eq!(response.status, 200, "{}", response.body);
    assert_eq!(p.store.keys(BUCKET, "state/deliveries/").len(), 1);
    let early = harvest_next().await?;
    assert!(
        matches!(early, HarvestOutcome::NotFinished { .. }),
        "{early:?}"
    );
    assert!(p.store.keys(BUCKET, "state/deliveries/").is_empty());

    // The provider's next delivery, identical: acted on, and this time it harvests.
    p.provider.complete(&batch_id, answer_for)?;
    let response = receive(&p.store, &p.queue, &config, &delivery, 0).await;
    assert_eq!(response.status, 200, "{}", response.body);
    assert!(!response.body.contains("duplicate"), "{}", response.body);
    let later = harvest_next().await?;
    assert!(
        matches!(later, HarvestOutcome::Harvested { .. }),
        "{later:?}"
    );
    // Its marker stays: a repeat of this delivery is a duplicate.
    let repeat = receive(&p.store, &p.queue, &config, &delivery, 0).await;
    assert!(repeat.body.contains("duplicate"), "{}", repeat.body);
    Ok(())
}
