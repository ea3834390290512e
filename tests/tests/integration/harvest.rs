//! Harvest and reconciliation against moto and the batch emulator: labels with
//! provenance, duplicates recognised, retries up to the limit, expired batches, and a
//! harvest repeated after a crash.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use crate::common::*;
use batch_emulator::{EMULATOR_MODEL, FaultSettings};
use shotlabel_core::harvest::{HarvestOutcome, harvest, reconcile};
use shotlabel_core::ports::ObjectStore;
use shotlabel_core::records::Stage;
use shotlabel_core::records::{
    BatchPhase, BatchRecord, FailedRecord, HarvestRequest, LabelRecord, state_keys,
};
use shotlabel_core::request::BatchLimits;
use shotlabel_core::submit::run_submit;
use shotlabel_core::task::Task;

fn request(batch_id: &str) -> HarvestRequest {
    HarvestRequest {
        batch_id: Some(batch_id.to_owned()),
        manifest: None,
        origin: "test".into(),
        shard: None,
        delivery: None,
    }
}

/// Puts the first `count` fixture screenshots in and queues them as enqueue would.
async fn enqueue_screenshots(stack: &Stack, count: usize) -> anyhow::Result<()> {
    enqueue(
        stack,
        put_files(stack, &files("screenshots")?[..count]).await?,
    )
    .await?;
    Ok(())
}

#[tokio::test]
async fn every_screenshot_gets_one_valid_label_with_provenance() -> anyhow::Result<()> {
    let stack = stack("harvest-labels").await?;
    let emulator = emulator(FaultSettings::default()).await?;
    let client = client(&emulator, quick_retries(3))?;
    let objects = put_files(&stack, &files("screenshots")?).await?;
    enqueue(&stack, objects.clone()).await?;
    let submitted = run_submit(
        &stack.store,
        &stack.queue,
        &client,
        &submit_config(&stack, BatchLimits::default())?,
    )
    .await?;
    let batch_id = submitted.batches[0].batch_id.clone();
    let config = harvest_config(&stack)?;

    // Before the batch finishes, a harvest does nothing.
    let early = harvest(
        &stack.store,
        &stack.queue,
        &client,
        &config,
        &request(&batch_id),
    )
    .await?;
    assert!(
        matches!(early, HarvestOutcome::NotFinished { .. }),
        "{early:?}"
    );
    assert!(list(&stack, "labels/").await?.is_empty());

    wait_terminal(&client, &batch_id).await?;
    let outcome = harvest(
        &stack.store,
        &stack.queue,
        &client,
        &config,
        &request(&batch_id),
    )
    .await?;
    let HarvestOutcome::Harvested { counts, .. } = outcome else {
        anyhow::bail!("not harvested: {outcome:?}");
    };
    assert_eq!(
        (
            counts.labelled,
            counts.retried,
            counts.failed,
            counts.duplicates
        ),
        (12, 0, 0, 0)
    );
    assert!(counts.prompt_tokens > 0);

    let task = Task::default_task()?;
    let labels: Vec<LabelRecord> = read_all(&stack, "labels/").await?;
    assert_eq!(labels.len(), 12);
    for object in &objects {
        let relative = object.key.trim_start_matches(INPUT);
        let label: LabelRecord = read_json(&stack, &format!("labels/{relative}.json")).await?;
        assert_eq!(label.source.key, object.key);
        assert_eq!(label.source.etag, object.etag);
        assert_eq!(label.task.version, task.version());
        assert_eq!(label.provenance.batch_id, batch_id);
        assert!(label.provenance.request_id.is_some());
        assert!(label.provenance.usage.is_some_and(|u| u.total_tokens > 0));
        // The emulator's answers say where they came from; they are never a model's.
        assert_eq!(label.model, EMULATOR_MODEL);
        task.validate_answer(&label.label)
            .map_err(|e| anyhow::anyhow!("{e:?}"))?;
    }
    let results = stack
        .s3
        .get_object()
        .bucket(&stack.resources.bucket)
        .key(state_keys::results(&batch_id))
        .send()
        .await?;
    let results = String::from_utf8(results.body.collect().await?.into_bytes().to_vec())?;
    assert_eq!(results.lines().count(), 12);
    let record: BatchRecord = read_json(&stack, &state_keys::batch(&batch_id)).await?;
    assert_eq!(record.phase, BatchPhase::Harvested);
    assert_eq!(record.harvest.map(|c| c.labelled), Some(12));
    assert!(list(&stack, state_keys::OPEN_PREFIX).await?.is_empty());

    // A duplicate webhook: nothing changes.
    let before = label_etags(&stack).await?;
    let again = harvest(
        &stack.store,
        &stack.queue,
        &client,
        &config,
        &request(&batch_id),
    )
    .await?;
    assert!(
        matches!(again, HarvestOutcome::AlreadyHarvested { .. }),
        "{again:?}"
    );
    assert_eq!(label_etags(&stack).await?, before);
    assert_eq!(
        queue_depth(&stack, &stack.resources.pending_queue_url).await?,
        0
    );
    Ok(())
}

async fn label_etags(stack: &Stack) -> anyhow::Result<BTreeMap<String, String>> {
    let mut etags = BTreeMap::new();
    for key in list(stack, "labels/").await? {
        if let Some(info) = stack.store.head(&stack.resources.bucket, &key).await? {
            etags.insert(key, info.etag);
        }
    }
    Ok(etags)
}

#[tokio::test]
async fn two_batches_for_the_same_images_end_with_one_label_each() -> anyhow::Result<()> {
    let stack = stack("harvest-duplicates").await?;
    let emulator = emulator(FaultSettings::default()).await?;
    let client = client(&emulator, quick_retries(3))?;
    let objects = put_files(&stack, &files("screenshots")?[..6]).await?;
    // The same S3 events delivered twice, in two submit runs: as after a submitter crash
    // between batch creation and message deletion (see the submit tests for the crash).
    enqueue(&stack, objects.clone()).await?;
    let config = submit_config(&stack, BatchLimits::default())?;
    let first = run_submit(&stack.store, &stack.queue, &client, &config).await?;
    enqueue(&stack, objects).await?;
    let second = run_submit(&stack.store, &stack.queue, &client, &config).await?;
    let (a, b) = (
        first.batches[0].batch_id.clone(),
        second.batches[0].batch_id.clone(),
    );
    wait_terminal(&client, &a).await?;
    wait_terminal(&client, &b).await?;

    let harvest_config = harvest_config(&stack)?;
    // The second batch's webhook arrives first.
    let HarvestOutcome::Harvested { counts: later, .. } = harvest(
        &stack.store,
        &stack.queue,
        &client,
        &harvest_config,
        &request(&b),
    )
    .await?
    else {
        anyhow::bail!("not harvested");
    };
    let HarvestOutcome::Harvested {
        counts: earlier, ..
    } = harvest(
        &stack.store,
        &stack.queue,
        &client,
        &harvest_config,
        &request(&a),
    )
    .await?
    else {
        anyhow::bail!("not harvested");
    };
    assert_eq!((later.labelled, later.duplicates), (6, 0));
    assert_eq!((earlier.labelled, earlier.duplicates), (0, 6));
    let labels: Vec<LabelRecord> = read_all(&stack, "labels/").await?;
    assert_eq!(labels.len(), 6);
    assert!(labels.iter().all(|l| l.provenance.batch_id == b));
    Ok(())
}

/// Found by the chaos soak: two copies of an image (here a late duplicate S3 event, after
/// its first copy had been failed) ended with both a failed record and a label. A label
/// supersedes a failed record of the same content.
#[tokio::test]
async fn a_label_supersedes_a_failed_record_of_the_same_content() -> anyhow::Result<()> {
    let stack = stack("harvest-label-supersedes").await?;
    let emulator = emulator(FaultSettings {
        error_line: 1.0,
        ..FaultSettings::default()
    })
    .await?;
    let client = client(&emulator, quick_retries(3))?;
    let objects = put_files(&stack, &files("screenshots")?[..3]).await?;
    let submit = submit_config(&stack, BatchLimits::default())?;
    let mut config = harvest_config(&stack)?;
    config.max_retries = 0;

    // The first copies come back as error lines, with no retry left: failed records.
    enqueue(&stack, objects.clone()).await?;
    let first = run_submit(&stack.store, &stack.queue, &client, &submit).await?;
    wait_terminal(&client, &first.batches[0].batch_id).await?;
    let HarvestOutcome::Harvested { counts, .. } = harvest(
        &stack.store,
        &stack.queue,
        &client,
        &config,
        &request(&first.batches[0].batch_id),
    )
    .await?
    else {
        anyhow::bail!("not harvested");
    };
    assert_eq!(counts.failed, 3);
    assert_eq!(list(&stack, "failed/").await?.len(), 3);

    // The same S3 events again, later; this time the answers are good.
    emulator.set_faults(FaultSettings::default())?;
    enqueue(&stack, objects).await?;
    let second = run_submit(&stack.store, &stack.queue, &client, &submit).await?;
    wait_terminal(&client, &second.batches[0].batch_id).await?;
    let HarvestOutcome::Harvested { counts, .. } = harvest(
        &stack.store,
        &stack.queue,
        &client,
        &config,
        &request(&second.batches[0].batch_id),
    )
    .await?
    else {
        anyhow::bail!("not harvested");
    };
    assert_eq!(counts.labelled, 3);
    assert_eq!(list(&stack, "labels/").await?.len(), 3);
    assert!(
        list(&stack, "failed/").await?.is_empty(),
        "one terminal record per image: the labels replace the failed records"
    );
    Ok(())
}

#[tokio::test]
async fn bad_answers_go_round_again_until_the_retry_limit() -> anyhow::Result<()> {
    let stack = stack("harvest-retries").await?;
    let faults = FaultSettings {
        error_line: 0.25,
        non_json: 0.15,
        schema_break: 0.15,
        length: 0.1,
        ..FaultSettings::default()
    };
    let emulator = emulator(faults).await?;
    let client = client(&emulator, quick_retries(3))?;
    let objects = put_files(&stack, &files("screenshots")?).await?;
    enqueue(&stack, objects.clone()).await?;
    let submit = submit_config(&stack, BatchLimits::default())?;
    let config = harvest_config(&stack)?;

    let mut rounds = 0;
    let mut retried = 0;
    while queue_depth(&stack, &stack.resources.pending_queue_url).await? > 0 {
        rounds += 1;
        anyhow::ensure!(
            rounds <= config.max_retries + 1,
            "still retrying after {rounds} rounds"
        );
        let report = run_submit(&stack.store, &stack.queue, &client, &submit).await?;
        for batch in &report.batches {
            wait_terminal(&client, &batch.batch_id).await?;
            if let HarvestOutcome::Harvested { counts, .. } = harvest(
                &stack.store,
                &stack.queue,
                &client,
                &config,
                &request(&batch.batch_id),
            )
            .await?
            {
                retried += counts.retried;
            }
        }
    }
    assert!(retried > 0, "the faults caused retries");
    let labels: Vec<LabelRecord> = read_all(&stack, "labels/").await?;
    let failed: Vec<FailedRecord> = read_all(&stack, "failed/").await?;
    assert_eq!(
        labels.len() + failed.len(),
        objects.len(),
        "one terminal record per image"
    );
    for object in &objects {
        let labelled = labels.iter().any(|l| l.source.key == object.key);
        let failed_record = failed.iter().find(|f| f.source.key == object.key);
        assert!(labelled != failed_record.is_some(), "{}", object.key);
        if let Some(record) = failed_record {
            assert_eq!(
                record.reasons.len() as u32,
                config.max_retries + 1,
                "{record:?}"
            );
            assert!(
                record
                    .reasons
                    .iter()
                    .all(|r| matches!(r.stage.as_str(), "provider" | "validate"))
            );
        }
    }
    assert!(
        labels.iter().any(|l| l.attempt > 0),
        "some images were labelled on a retry"
    );
    let stats = emulator.stats();
    assert!(
        stats.faults.get("error_line").copied().unwrap_or(0) > 0,
        "{stats:?}"
    );
    Ok(())
}

#[tokio::test]
async fn an_expired_batch_keeps_what_finished_and_requeues_the_rest() -> anyhow::Result<()> {
    let stack = stack("harvest-expired").await?;
    let emulator = emulator(FaultSettings {
        expire: 1.0,
        ..FaultSettings::default()
    })
    .await?;
    let client = client(&emulator, quick_retries(3))?;
    enqueue(&stack, put_files(&stack, &files("screenshots")?).await?).await?;
    let report = run_submit(
        &stack.store,
        &stack.queue,
        &client,
        &submit_config(&stack, BatchLimits::default())?,
    )
    .await?;
    let batch_id = report.batches[0].batch_id.clone();
    let batch = wait_terminal(&client, &batch_id).await?;
    assert_eq!(batch.status.as_str(), "expired");
    let HarvestOutcome::Harvested { counts, .. } = harvest(
        &stack.store,
        &stack.queue,
        &client,
        &harvest_config(&stack)?,
        &request(&batch_id),
    )
    .await?
    else {
        anyhow::bail!("not harvested");
    };
    assert_eq!(counts.labelled + counts.retried, 12, "{counts:?}");
    assert!(counts.retried > 0, "{counts:?}");
    assert_eq!(list(&stack, "labels/").await?.len() as u64, counts.labelled);
    assert_eq!(
        queue_depth(&stack, &stack.resources.pending_queue_url).await?,
        counts.retried
    );
    Ok(())
}

#[tokio::test]
async fn reconciliation_harvests_a_batch_whose_webhook_never_came() -> anyhow::Result<()> {
    let stack = stack("harvest-reconcile").await?;
    let emulator = emulator(FaultSettings::default()).await?;
    let client = client(&emulator, quick_retries(3))?;
    enqueue_screenshots(&stack, 3).await?;
    let report = run_submit(
        &stack.store,
        &stack.queue,
        &client,
        &submit_config(&stack, BatchLimits::default())?,
    )
    .await?;
    let config = harvest_config(&stack)?;

    let young = reconcile(
        &stack.store,
        &stack.queue,
        &client,
        &config,
        Duration::from_secs(3600),
    )
    .await?;
    assert_eq!(
        (young.open, young.skipped_young, young.harvested),
        (1, 1, 0)
    );
    wait_terminal(&client, &report.batches[0].batch_id).await?;
    let done = reconcile(&stack.store, &stack.queue, &client, &config, Duration::ZERO).await?;
    assert_eq!((done.open, done.harvested), (1, 1), "{done:?}");
    assert_eq!(list(&stack, "labels/").await?.len(), 3);
    let after = reconcile(&stack.store, &stack.queue, &client, &config, Duration::ZERO).await?;
    assert_eq!(after.open, 0);
    Ok(())
}

#[tokio::test]
async fn a_harvest_repeated_after_a_crash_writes_and_requeues_nothing_twice() -> anyhow::Result<()>
{
    let stack = stack("harvest-crash").await?;
    let emulator = emulator(FaultSettings {
        error_line: 0.4,
        ..FaultSettings::default()
    })
    .await?;
    let client = client(&emulator, quick_retries(3))?;
    enqueue(&stack, put_files(&stack, &files("screenshots")?).await?).await?;
    let report = run_submit(
        &stack.store,
        &stack.queue,
        &client,
        &submit_config(&stack, BatchLimits::default())?,
    )
    .await?;
    let batch_id = report.batches[0].batch_id.clone();
    wait_terminal(&client, &batch_id).await?;
    let config = harvest_config(&stack)?;

    let crashing = CrashBeforeRecord {
        inner: &stack.store,
        crash: AtomicBool::new(true),
    };
    let crashed = harvest(
        &crashing,
        &stack.queue,
        &client,
        &config,
        &request(&batch_id),
    )
    .await;
    assert!(crashed.is_err());
    let requeued = queue_depth(&stack, &stack.resources.pending_queue_url).await?;
    let labelled = label_etags(&stack).await?;
    assert!(
        requeued > 0 && !labelled.is_empty(),
        "requeued {requeued}, labelled {}",
        labelled.len()
    );

    crashing.crash.store(false, Ordering::SeqCst);
    let HarvestOutcome::Harvested { counts, .. } = harvest(
        &crashing,
        &stack.queue,
        &client,
        &config,
        &request(&batch_id),
    )
    .await?
    else {
        anyhow::bail!("not harvested");
    };
    assert_eq!(
        queue_depth(&stack, &stack.resources.pending_queue_url).await?,
        requeued,
        "nothing requeued twice"
    );
    assert_eq!(label_etags(&stack).await?, labelled, "no label rewritten");
    assert_eq!(counts.labelled as usize, labelled.len());
    assert_eq!(counts.retried, requeued);
    Ok(())
}

/// The submitter dies writing a batch's state record, and the batch's webhook is lost:
/// the open marker, written first, still brings the batch to reconciliation. (The chaos
/// soak found the record-before-marker order losing a batch this way.)
#[tokio::test]
async fn a_submit_that_dies_writing_the_batch_record_leaves_it_to_reconciliation()
-> anyhow::Result<()> {
    let stack = stack("harvest-submit-crash").await?;
    let emulator = emulator(FaultSettings::default()).await?;
    let client = client(&emulator, quick_retries(3))?;
    enqueue_screenshots(&stack, 3).await?;
    let crashing = CrashBeforeRecord {
        inner: &stack.store,
        crash: AtomicBool::new(true),
    };
    let report = run_submit(
        &crashing,
        &stack.queue,
        &client,
        &submit_config(&stack, BatchLimits::default())?,
    )
    .await?;
    assert!(report.batches.is_empty(), "{report:?}");
    assert!(!report.errors.is_empty(), "the crash is reported");
    assert!(list(&stack, "state/batches/").await?.is_empty());
    let markers = list(&stack, state_keys::OPEN_PREFIX).await?;
    let [marker] = markers.as_slice() else {
        anyhow::bail!("one open marker expected, found {markers:?}");
    };
    let batch_id = state_keys::batch_id_of_marker(marker)
        .ok_or_else(|| anyhow::anyhow!("{marker} names no batch"))?;
    wait_terminal(&client, &batch_id).await?;

    let config = harvest_config(&stack)?;
    let done = reconcile(&stack.store, &stack.queue, &client, &config, Duration::ZERO).await?;
    assert_eq!((done.open, done.harvested), (1, 1), "{done:?}");
    assert_eq!(done.counts.labelled, 3, "{done:?}");
    assert_eq!(list(&stack, "labels/").await?.len(), 3);
    let record: BatchRecord = read_json(&stack, &state_keys::batch(&batch_id)).await?;
    assert_eq!(record.phase, BatchPhase::Harvested);
    assert!(list(&stack, state_keys::OPEN_PREFIX).await?.is_empty());
    Ok(())
}

#[tokio::test]
async fn a_batch_the_provider_failed_is_retried_or_failed_by_its_cause() -> anyhow::Result<()> {
    use shotlabel_core::batch_api::CreateBatchRequest;
    use shotlabel_core::records::{Manifest, PendingItem};
    use shotlabel_core::submit::METADATA_MANIFEST;

    let stack = stack("harvest-failed-batch").await?;
    // A provider that takes at most 2 requests per file: a 3-request batch fails as a
    // whole, and the same items in smaller files could pass, so they go round again.
    let mut config = batch_emulator::EmulatorConfig::new(KEY).with_delays(20, 50, 20);
    config.listen = "127.0.0.1:0".parse()?;
    config.max_requests = 2;
    let emulator = batch_emulator::spawn(config).await?;
    let client = client(&emulator, quick_retries(3))?;
    enqueue_screenshots(&stack, 3).await?;
    let report = run_submit(
        &stack.store,
        &stack.queue,
        &client,
        &submit_config(&stack, BatchLimits::default())?,
    )
    .await?;
    let batch_id = report.batches[0].batch_id.clone();
    assert_eq!(
        wait_terminal(&client, &batch_id).await?.status.as_str(),
        "failed"
    );
    let harvest_config = harvest_config(&stack)?;
    let HarvestOutcome::Harvested { counts, .. } = harvest(
        &stack.store,
        &stack.queue,
        &client,
        &harvest_config,
        &request(&batch_id),
    )
    .await?
    else {
        anyhow::bail!("not harvested");
    };
    assert_eq!((counts.retried, counts.failed), (3, 0));
    assert_eq!(
        queue_depth(&stack, &stack.resources.pending_queue_url).await?,
        3
    );

    // A file the provider rejects for its content: retrying cannot help, so the items fail.
    let objects = put_files(&stack, &files("screenshots")?[3..5]).await?;
    let task = Task::default_task()?;
    let items: std::collections::BTreeMap<String, PendingItem> = objects
        .iter()
        .enumerate()
        .map(|(i, o)| {
            (
                format!("bad-{i}"),
                PendingItem {
                    bucket: o.bucket.clone(),
                    key: o.key.clone(),
                    size: o.size,
                    etag: o.etag.clone(),
                    version_id: None,
                    attempt: 0,
                    reasons: Vec::new(),
                    requeues: 0,
                    replace_label: None,
                },
            )
        })
        .collect();
    let manifest = Manifest {
        name: "bad-file".into(),
        submission_id: "bad".into(),
        task: task_ref(&task),
        model: task.model().into(),
        created_at: 0,
        items,
        slot: None,
    };
    stack
        .s3
        .put_object()
        .bucket(&stack.resources.bucket)
        .key(state_keys::manifest("bad-file"))
        .body(serde_json::to_vec(&manifest)?.into())
        .send()
        .await?;
    let path = stack.work_dir.path().join("bad.jsonl");
    std::fs::write(&path, "this is not json\n{\"custom_id\": \"bad-1\"}\n")?;
    let file = client.upload_file(&path).await?;
    let mut create = CreateBatchRequest::chat_completions(file.id);
    create
        .metadata
        .insert(METADATA_MANIFEST.into(), "bad-file".into());
    let batch = client.create_batch(&create).await?;
    assert_eq!(
        wait_terminal(&client, &batch.id).await?.status.as_str(),
        "failed"
    );
    let HarvestOutcome::Harvested { counts, .. } = harvest(
        &stack.store,
        &stack.queue,
        &client,
        &harvest_config,
        &request(&batch.id),
    )
    .await?
    else {
        anyhow::bail!("not harvested");
    };
    assert_eq!((counts.retried, counts.failed), (0, 2));
    for object in &objects {
        let record: FailedRecord = read_json(
            &stack,
            &format!("failed/{}.json", object.key.trim_start_matches(INPUT)),
        )
        .await?;
        let reason = &record.reasons[0];
        assert_eq!(reason.stage, Stage::Provider);
        assert!(
            reason.reason.contains("invalid_json_line"),
            "{}",
            reason.reason
        );
    }
    Ok(())
}

#[tokio::test]
async fn a_harvested_batchs_files_are_deleted_at_the_provider_when_configured() -> anyhow::Result<()>
{
    let stack = stack("harvest-delete-files").await?;
    // Some error lines, so the batch has an error file as well as an output file.
    let emulator = emulator(FaultSettings {
        error_line: 0.4,
        ..FaultSettings::default()
    })
    .await?;
    let client = client(&emulator, quick_retries(3))?;
    let screenshots = files("screenshots")?;
    let (first, second) = screenshots.split_at(screenshots.len() / 2);
    let mut config = harvest_config(&stack)?;
    let mut kept = None;
    for (delete, images) in [(false, first), (true, second)] {
        enqueue(&stack, put_files(&stack, images).await?).await?;
        let submitted = run_submit(
            &stack.store,
            &stack.queue,
            &client,
            &submit_config(&stack, BatchLimits::default())?,
        )
        .await?;
        let batch_id = submitted.batches[0].batch_id.clone();
        let batch = wait_terminal(&client, &batch_id).await?;
        let files: Vec<String> = [
            batch.input_file_id.clone(),
            batch.output_file_id.clone(),
            batch.error_file_id.clone(),
        ]
        .into_iter()
        .flatten()
        .collect();
        assert!(files.len() >= 2, "an input and an output file: {batch:?}");
        config.delete_provider_files = delete;
        let outcome = harvest(
            &stack.store,
            &stack.queue,
            &client,
            &config,
            &request(&batch_id),
        )
        .await?;
        assert!(
            matches!(outcome, HarvestOutcome::Harvested { .. }),
            "{outcome:?}"
        );
        for file in &files {
            let found = client.retrieve_file(file).await;
            if delete {
                let err = found.expect_err("deleted after the harvest");
                assert_eq!(err.status(), Some(404), "{err}");
            } else {
                found?;
            }
        }
        // A repeated harvest stops at the record and does not need the files.
        let again = harvest(
            &stack.store,
            &stack.queue,
            &client,
            &config,
            &request(&batch_id),
        )
        .await?;
        assert!(
            matches!(again, HarvestOutcome::AlreadyHarvested { .. }),
            "{again:?}"
        );
        if !delete {
            kept = Some(files);
        }
    }
    assert!(kept.is_some());
    Ok(())
}
