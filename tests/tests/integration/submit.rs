//! The submitter against moto and the batch emulator: fixture screenshots into batches,
//! splitting, awkward inputs, a crash before messages are deleted, provider errors.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::common::*;
use batch_emulator::FaultSettings;
use shotlabel_batch_client::BatchClient;
use shotlabel_core::batch_api::BatchStatus;
use shotlabel_core::ports::{OutgoingMessage, Queue, QueueError, ReceivedMessage};
use shotlabel_core::records::{BatchPhase, BatchRecord, FailedRecord, Manifest, state_keys};
use shotlabel_core::records::{RecordStatus, Stage};
use shotlabel_core::request::BatchLimits;
use shotlabel_core::submit::{METADATA_MANIFEST, SubmitReport, run_submit};
use tokio::io::AsyncBufReadExt;

async fn manifests(stack: &Stack) -> anyhow::Result<Vec<Manifest>> {
    let mut out = Vec::new();
    for key in list(stack, "state/manifests/").await? {
        out.push(read_json(stack, &key).await?);
    }
    Ok(out)
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

fn input_keys(objects: &[shotlabel_core::enqueue::NewObject]) -> BTreeSet<String> {
    objects.iter().map(|o| o.key.clone()).collect()
}

async fn wait_completed(client: &BatchClient, batch_id: &str) -> anyhow::Result<()> {
    let start = Instant::now();
    loop {
        let batch = client.retrieve_batch(batch_id).await?;
        if batch.status == BatchStatus::Completed {
            return Ok(());
        }
        anyhow::ensure!(
            !batch.status.is_terminal() && start.elapsed() < Duration::from_secs(60),
            "batch {batch_id} ended {} or took too long",
            batch.status
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn output_custom_ids(client: &BatchClient, batch_id: &str) -> anyhow::Result<Vec<String>> {
    let batch = client.retrieve_batch(batch_id).await?;
    let file = batch
        .output_file_id
        .ok_or_else(|| anyhow::anyhow!("no output file"))?;
    let mut lines = client.file_reader(&file).await?.lines();
    let mut ids = Vec::new();
    while let Some(line) = lines.next_line().await? {
        let value: serde_json::Value = serde_json::from_str(&line)?;
        ids.push(value["custom_id"].as_str().unwrap_or_default().to_owned());
    }
    Ok(ids)
}

#[tokio::test]
async fn fixture_screenshots_each_land_in_exactly_one_batch_that_completes() -> anyhow::Result<()> {
    let stack = stack("submit-fixtures").await?;
    let emulator = emulator(FaultSettings::default()).await?;
    let client = client(&emulator, quick_retries(3))?;
    let objects = put_files(&stack, &files("screenshots")?).await?;
    assert_eq!(objects.len(), 12, "the project ships 12 sample screenshots");
    let keys = input_keys(&objects);
    assert_eq!(enqueue(&stack, objects).await?.queued, 12);

    let config = submit_config(&stack, BatchLimits::default())?;
    let report = run_submit(&stack.store, &stack.queue, &client, &config).await?;
    assert_eq!(report.received, 12);
    assert_eq!(report.prepared, 12, "{report:?}");
    assert_eq!((report.failed, report.unsubmitted), (0, 0), "{report:?}");
    assert!(report.errors.is_empty(), "{:?}", report.errors);
    assert_eq!(report.batches.len(), 1);

    let manifests = manifests(&stack).await?;
    assert_eq!(manifests.len(), 1);
    let seen = appearances(&manifests);
    assert_eq!(seen.keys().cloned().collect::<BTreeSet<_>>(), keys);
    assert!(seen.values().all(|&n| n == 1), "{seen:?}");
    let manifest = &manifests[0];
    assert_eq!(manifest.model, config.task.model());
    assert_eq!(manifest.task.version, config.task.version());
    assert!(
        manifest
            .items
            .values()
            .all(|i| i.attempt == 0 && !i.etag.is_empty())
    );
    assert!(
        manifest.items.keys().all(|id| id.len() <= 24),
        "custom ids stay short"
    );

    let batch = &report.batches[0];
    let record: BatchRecord = read_json(&stack, &state_keys::batch(&batch.batch_id)).await?;
    assert_eq!(record.phase, BatchPhase::Open);
    assert_eq!(record.manifest, manifest.name);
    assert_eq!(record.requests, 12);
    assert!(
        list(&stack, state_keys::OPEN_PREFIX)
            .await?
            .contains(&state_keys::open_marker(&batch.batch_id))
    );
    let created = client.retrieve_batch(&batch.batch_id).await?;
    assert_eq!(
        created.metadata.get(METADATA_MANIFEST),
        Some(&manifest.name)
    );

    wait_completed(&client, &batch.batch_id).await?;
    let answered: BTreeSet<String> = output_custom_ids(&client, &batch.batch_id)
        .await?
        .into_iter()
        .collect();
    let asked: BTreeSet<String> = manifest.items.keys().cloned().collect();
    assert_eq!(
        answered, asked,
        "the emulator answered every request in the manifest"
    );
    assert_eq!(
        queue_depth(&stack, &stack.resources.pending_queue_url).await?,
        0
    );
    assert!(list(&stack, "failed/").await?.is_empty());
    Ok(())
}

#[tokio::test]
async fn batches_split_by_request_count_and_by_bytes() -> anyhow::Result<()> {
    let stack = stack("submit-split").await?;
    let emulator = emulator(FaultSettings::default()).await?;
    let client = client(&emulator, quick_retries(3))?;
    let objects = put_files(&stack, &files("screenshots")?).await?;
    let keys = input_keys(&objects);
    enqueue(&stack, objects.clone()).await?;

    let by_count = BatchLimits {
        max_requests: 5,
        max_bytes: 200_000_000,
    };
    let report = run_submit(
        &stack.store,
        &stack.queue,
        &client,
        &submit_config(&stack, by_count)?,
    )
    .await?;
    let sizes: Vec<u64> = report.batches.iter().map(|b| b.requests).collect();
    assert_eq!(sizes, vec![5, 5, 2], "{report:?}");
    let seen = appearances(&manifests(&stack).await?);
    assert_eq!(seen.keys().cloned().collect::<BTreeSet<_>>(), keys);
    assert!(seen.values().all(|&n| n == 1));

    // Same images again, now split by bytes: no file may pass the byte limit.
    let mut relabel = enqueue_config(&stack)?;
    relabel.force_relabel = true;
    shotlabel_core::enqueue::enqueue_objects(&stack.store, &stack.queue, &relabel, objects).await?;
    let largest = report
        .batches
        .iter()
        .map(|b| b.bytes / b.requests)
        .max()
        .unwrap_or(0);
    let by_bytes = BatchLimits {
        max_requests: 1000,
        max_bytes: largest * 3,
    };
    let report = run_submit(
        &stack.store,
        &stack.queue,
        &client,
        &submit_config(&stack, by_bytes)?,
    )
    .await?;
    assert_eq!(report.prepared, 12, "{report:?}");
    assert!(report.batches.len() >= 4, "{:?}", report.batches);
    assert!(report.batches.iter().all(|b| b.bytes <= by_bytes.max_bytes));
    assert_eq!(report.batches.iter().map(|b| b.requests).sum::<u64>(), 12);
    for batch in &report.batches {
        wait_completed(&client, &batch.batch_id).await?;
        let uploaded = client.retrieve_batch(&batch.batch_id).await?;
        assert_eq!(
            uploaded.request_counts.map(|c| c.total),
            Some(batch.requests)
        );
    }
    Ok(())
}

#[tokio::test]
async fn awkward_files_are_prepared_or_failed_with_a_reason() -> anyhow::Result<()> {
    let stack = stack("submit-awkward").await?;
    let emulator = emulator(FaultSettings::default()).await?;
    let client = client(&emulator, quick_retries(3))?;
    let paths = files("awkward")?;
    let objects = put_files(&stack, &paths).await?;
    let enqueued = enqueue(&stack, objects.clone()).await?;
    assert_eq!(enqueued.failed, 1, "the empty file is refused at enqueue");

    let report = run_submit(
        &stack.store,
        &stack.queue,
        &client,
        &submit_config(&stack, BatchLimits::default())?,
    )
    .await?;
    assert!(report.errors.is_empty(), "{:?}", report.errors);
    let submitted = appearances(&manifests(&stack).await?);
    let mut failed = BTreeMap::new();
    for key in list(&stack, "failed/").await? {
        let record: FailedRecord = read_json(&stack, &key).await?;
        failed.insert(record.source.key.clone(), record);
    }
    for object in &objects {
        let in_batch = submitted.contains_key(&object.key);
        let record = failed.get(&object.key);
        assert!(
            in_batch != record.is_some(),
            "{} must be in a batch or failed, not both or neither",
            object.key
        );
        if let Some(record) = record {
            let reason = &record
                .reasons
                .last()
                .ok_or_else(|| anyhow::anyhow!("no reason"))?;
            assert!(!reason.reason.is_empty());
            assert_eq!(record.status, RecordStatus::Failed);
        }
    }
    let reason_of = |name: &str| {
        failed
            .get(&format!("{INPUT}{name}"))
            .and_then(|r| r.reasons.last())
            .map(|r| (r.stage, r.reason.clone()))
    };
    let (stage, reason) =
        reason_of("empty.png").ok_or_else(|| anyhow::anyhow!("empty.png not failed"))?;
    assert_eq!(stage, Stage::Enqueue);
    assert!(reason.contains("empty"), "{reason}");
    let (stage, reason) = reason_of("not-an-image.png")
        .ok_or_else(|| anyhow::anyhow!("not-an-image.png not failed"))?;
    assert_eq!(stage, Stage::Prepare);
    assert!(reason.contains("not a supported image"), "{reason}");
    for good in [
        "screenshot.jpg",
        "screenshot.webp",
        "rotated-exif.jpg",
        "transparent.png",
        "cmyk.jpg",
        "gray16.png",
        "interlaced.png",
        "animated.gif",
        "pixel.png",
    ] {
        assert!(
            submitted.contains_key(&format!("{INPUT}{good}")),
            "{good} should be prepared: {:?}",
            reason_of(good)
        );
    }
    assert_eq!(
        report.prepared + report.failed + enqueued.failed,
        paths.len()
    );
    assert_eq!(
        queue_depth(&stack, &stack.resources.pending_queue_url).await?,
        0,
        "nothing left to retry forever"
    );
    Ok(())
}

/// A queue whose deletes all fail: the submitter "crashes" after creating its batches and
/// before deleting their messages. It remembers the receipt handles it gave out.
struct CrashBeforeDelete<'a> {
    inner: &'a shotlabel_aws::SqsQueue,
    handles: Mutex<Vec<String>>,
}

impl Queue for CrashBeforeDelete<'_> {
    async fn send_batch(
        &self,
        url: &str,
        messages: &[OutgoingMessage],
    ) -> Result<Vec<String>, QueueError> {
        self.inner.send_batch(url, messages).await
    }

    async fn receive(
        &self,
        url: &str,
        max: u32,
        visibility: Duration,
        wait: Duration,
    ) -> Result<Vec<ReceivedMessage>, QueueError> {
        let messages = self.inner.receive(url, max, visibility, wait).await?;
        if let Ok(mut handles) = self.handles.lock() {
            handles.extend(messages.iter().map(|m| m.receipt_handle.clone()));
        }
        Ok(messages)
    }

    async fn delete_batch(
        &self,
        _url: &str,
        _handles: &[String],
    ) -> Result<Vec<String>, QueueError> {
        Err(QueueError::Other("the process died here".into()))
    }
}

#[tokio::test]
async fn a_crash_between_batch_creation_and_message_deletion_loses_nothing() -> anyhow::Result<()> {
    let stack = stack("submit-crash").await?;
    let emulator = emulator(FaultSettings::default()).await?;
    let client = client(&emulator, quick_retries(3))?;
    let objects = put_files(&stack, &files("screenshots")?).await?;
    let keys = input_keys(&objects);
    enqueue(&stack, objects).await?;
    let config = submit_config(&stack, BatchLimits::default())?;

    let crashing = CrashBeforeDelete {
        inner: &stack.queue,
        handles: Mutex::new(Vec::new()),
    };
    let first = run_submit(&stack.store, &crashing, &client, &config).await?;
    assert_eq!(first.batches.len(), 1);
    assert!(!first.errors.is_empty(), "the failed deletes are reported");
    assert_eq!(
        queue_depth(&stack, &stack.resources.pending_queue_url).await?,
        12,
        "every message survives"
    );

    // The visibility timeout passes: the messages come back, and go out again.
    let handles = crashing
        .handles
        .lock()
        .map(|h| h.clone())
        .unwrap_or_default();
    release(&stack, &stack.resources.pending_queue_url, &handles).await?;
    let second: SubmitReport = run_submit(&stack.store, &stack.queue, &client, &config).await?;
    assert_eq!(second.prepared, 12);
    assert!(second.errors.is_empty(), "{:?}", second.errors);
    assert_eq!(
        queue_depth(&stack, &stack.resources.pending_queue_url).await?,
        0
    );

    // Each image is in both batches, and harvesting both leaves one label per image.
    let seen = appearances(&manifests(&stack).await?);
    assert_eq!(seen.keys().cloned().collect::<BTreeSet<_>>(), keys);
    assert!(seen.values().all(|&n| n == 2), "{seen:?}");
    let harvest_config = harvest_config(&stack)?;
    let mut labelled = 0;
    let mut duplicates = 0;
    for batch in first.batches.iter().chain(&second.batches) {
        wait_terminal(&client, &batch.batch_id).await?;
        let request = shotlabel_core::records::HarvestRequest {
            batch_id: Some(batch.batch_id.clone()),
            ..Default::default()
        };
        let outcome = shotlabel_core::harvest::harvest(
            &stack.store,
            &stack.queue,
            &client,
            &harvest_config,
            &request,
        )
        .await?;
        if let shotlabel_core::harvest::HarvestOutcome::Harvested { counts, .. } = outcome {
            labelled += counts.labelled;
            duplicates += counts.duplicates;
        }
    }
    assert_eq!((labelled, duplicates), (12, 12));
    assert_eq!(list(&stack, "labels/").await?.len(), 12);
    assert_eq!(
        queue_depth(&stack, &stack.resources.pending_queue_url).await?,
        0,
        "no duplicate went round again"
    );
    Ok(())
}

#[tokio::test]
async fn provider_429_and_500_are_retried_and_a_dead_provider_loses_nothing() -> anyhow::Result<()>
{
    let stack = stack("submit-provider-errors").await?;
    let emulator = emulator(FaultSettings {
        http_500: 1.0,
        ..FaultSettings::default()
    })
    .await?;
    let objects = put_files(&stack, &files("screenshots")?[..4]).await?;
    enqueue(&stack, objects).await?;
    let config = submit_config(&stack, BatchLimits::default())?;

    // A provider that always fails: nothing is created, and the images go back onto the
    // queue as new messages (a requeue, not an attempt), their originals deleted.
    let failed = run_submit(
        &stack.store,
        &stack.queue,
        &client(&emulator, quick_retries(3))?,
        &config,
    )
    .await?;
    assert!(failed.batches.is_empty());
    assert_eq!((failed.unsubmitted, failed.sent_back), (4, 4));
    assert!(
        // The emulator answers 500 before reading the upload, so the client may see the
        // status or a closed connection; either way the upload is what failed.
        failed.errors.iter().any(|e| e.contains("upload file")),
        "{:?}",
        failed.errors
    );
    assert_eq!(
        queue_depth(&stack, &stack.resources.pending_queue_url).await?,
        4
    );
    assert!(
        emulator
            .stats()
            .faults
            .get("http_500")
            .copied()
            .unwrap_or(0)
            >= 3
    );

    // A flaky provider: every call may be refused with 429 or 500; retries get through.
    emulator.set_faults(FaultSettings {
        http_429: 0.6,
        http_500: 0.6,
        ..FaultSettings::default()
    })?;
    let report = run_submit(
        &stack.store,
        &stack.queue,
        &client(&emulator, quick_retries(40))?,
        &config,
    )
    .await?;
    assert_eq!(report.batches.len(), 1, "{report:?}");
    assert!(report.errors.is_empty(), "{:?}", report.errors);
    let stats = emulator.stats();
    assert!(
        stats.faults.get("http_429").copied().unwrap_or(0) >= 1,
        "{stats:?}"
    );
    assert_eq!(
        queue_depth(&stack, &stack.resources.pending_queue_url).await?,
        0
    );
    Ok(())
}

#[tokio::test]
async fn the_scheduled_handler_reconciles_open_batches_then_submits() -> anyhow::Result<()> {
    let stack = stack("submit-handler").await?;
    let emulator = emulator(FaultSettings::default()).await?;
    let paths = files("screenshots")?;
    enqueue(&stack, put_files(&stack, &paths[..3]).await?).await?;
    let handler = submit::Handler {
        store: stack.store.clone(),
        queue: stack.queue.clone(),
        provider: client(&emulator, quick_retries(3))?,
        config: submit_config(&stack, BatchLimits::default())?,
        harvest: harvest_config(&stack)?,
        reconcile_min_age: Duration::ZERO,
        dispatch: None,
    };
    let fixture = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../functions/submit/tests/fixtures/scheduled-event.json"
    );
    let event: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(fixture)?)?;

    let first = submit::handle(&handler, event.clone())
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    assert_eq!(first.reconcile.open, 0);
    assert_eq!(first.submit.batches.len(), 1);
    wait_terminal(&handler.provider, &first.submit.batches[0].batch_id).await?;

    // No webhook came: the next scheduled run harvests the batch, and submits new images.
    enqueue(&stack, put_files(&stack, &paths[3..5]).await?).await?;
    let second = submit::handle(&handler, event)
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    assert_eq!((second.reconcile.open, second.reconcile.harvested), (1, 1));
    assert_eq!(second.submit.prepared, 2);
    assert_eq!(list(&stack, "labels/").await?.len(), 3);
    Ok(())
}

#[tokio::test]
async fn creations_whose_answers_are_lost_make_one_batch_each() -> anyhow::Result<()> {
    let stack = stack("submit-lost-answers").await?;
    // Every creation makes its batch and answers 500; every upload is processed late.
    let emulator = emulator(FaultSettings {
        create_lost_answer: 1.0,
        file_processing_ms: 300,
        ..FaultSettings::default()
    })
    .await?;
    let objects = put_files(&stack, &files("screenshots")?[..6]).await?;
    enqueue(&stack, objects.clone()).await?;
    let limits = BatchLimits {
        max_requests: 2,
        ..BatchLimits::default()
    };
    let config = submit_config(&stack, limits)?;
    let report = run_submit(
        &stack.store,
        &stack.queue,
        &client(&emulator, quick_retries(3))?,
        &config,
    )
    .await?;
    assert!(report.errors.is_empty(), "{:?}", report.errors);
    assert_eq!(report.batches.len(), 3, "{report:?}");
    let stats = emulator.stats();
    assert_eq!(stats.faults.get("create_lost_answer").copied(), Some(3));
    assert_eq!(
        stats.faults.get("file_not_processed").copied(),
        Some(0),
        "a batch was created before its file was processed"
    );
    assert_eq!(
        stats.batches.values().sum::<u64>(),
        3,
        "a lost answer made a second batch: {:?}",
        stats.batches
    );
    // Each manifest names the batch the provider made from it, and each image is in one.
    let manifests = manifests(&stack).await?;
    assert_eq!(manifests.len(), 3);
    for manifest in &manifests {
        let link = stack
            .s3
            .get_object()
            .bucket(&stack.resources.bucket)
            .key(state_keys::manifest_batch(&manifest.name))
            .send()
            .await?;
        let batch_id = String::from_utf8(link.body.collect().await?.into_bytes().to_vec())?;
        assert!(
            report.batches.iter().any(|b| b.batch_id == batch_id),
            "{} names {batch_id}",
            manifest.name
        );
    }
    assert!(appearances(&manifests).values().all(|n| *n == 1));
    assert_eq!(appearances(&manifests).len(), objects.len());
    assert_eq!(
        queue_depth(&stack, &stack.resources.pending_queue_url).await?,
        0
    );
    Ok(())
}

#[tokio::test]
async fn a_request_over_the_providers_limit_gets_a_failed_record_before_upload()
-> anyhow::Result<()> {
    let stack = stack("submit-request-limit").await?;
    let emulator = emulator(FaultSettings::default()).await?;
    let objects = put_files(&stack, &files("screenshots")?[..3]).await?;
    enqueue(&stack, objects.clone()).await?;
    let mut config = submit_config(&stack, BatchLimits::default())?;
    // Smaller than any screenshot's line, larger than none of them.
    config.max_request_bytes = Some(2_000);
    let report = run_submit(
        &stack.store,
        &stack.queue,
        &client(&emulator, quick_retries(3))?,
        &config,
    )
    .await?;
    assert!(report.batches.is_empty(), "{report:?}");
    assert_eq!(emulator.stats().files_uploaded, 0, "nothing was uploaded");
    let mut failed = Vec::new();
    for key in list(&stack, "failed/").await? {
        failed.push(read_json::<FailedRecord>(&stack, &key).await?);
    }
    assert_eq!(failed.len(), objects.len());
    for record in &failed {
        let reason = record
            .reasons
            .last()
            .map(|r| r.reason.as_str())
            .unwrap_or("");
        assert!(
            reason.contains("over the provider's 2000-byte limit for one request"),
            "{reason}"
        );
    }
    assert_eq!(
        queue_depth(&stack, &stack.resources.pending_queue_url).await?,
        0
    );
    Ok(())
}
