//! Scale-out on the local stack: several submit workers dispatched through the work queue,
//! and the provider's open-batch limit kept across all of them.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, ensure};
use aws_sdk_s3::primitives::ByteStream;
use futures_util::{StreamExt, stream};
use shotlabel_core::ports::ObjectStore;
use shotlabel_core::records::{BatchRecord, Layout, Manifest, state_keys};
use shotlabel_core::request::BatchLimits;
use shotlabel_core::task::Task;
use shotlabel_localstack::pipeline::{LocalPipeline, PipelineOptions, WebhookMode};

/// A small PNG with content of its own: the index is written into its pixels.
fn image(index: usize) -> anyhow::Result<Vec<u8>> {
    let bytes = (index as u32).to_le_bytes();
    let picture = image::RgbImage::from_fn(32, 20, |x, y| {
        image::Rgb([bytes[(x as usize) % 4], (x * 7) as u8, (y * 11) as u8])
    });
    let mut png = Vec::new();
    picture.write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)?;
    Ok(png)
}

fn options(stack: &str, workers: usize, limits: BatchLimits) -> anyhow::Result<PipelineOptions> {
    let mut options = PipelineOptions::new(Task::default_task()?);
    options.stack_name = stack.into();
    options.webhook_mode = WebhookMode::Standard;
    options.submit_every = Duration::from_millis(500);
    options.limits = limits;
    options.submit_workers = workers;
    options.harvest_concurrency = 2;
    options.reconcile_min_age = Duration::from_secs(5);
    Ok(options)
}

/// Puts `count` images in, eight at a time; returns their keys.
async fn put_images(pipeline: &LocalPipeline, count: usize) -> anyhow::Result<Vec<String>> {
    let s3 = shotlabel_localstack::s3_client(&pipeline.sdk);
    let bucket = pipeline.resources.bucket.clone();
    let put: Vec<anyhow::Result<String>> = stream::iter(0..count)
        .map(|i| {
            let (s3, bucket) = (s3.clone(), bucket.clone());
            async move {
                let key = format!("incoming/scale/{:02}/{i:05}.png", i % 16);
                s3.put_object()
                    .bucket(&bucket)
                    .key(&key)
                    .body(ByteStream::from(image(i)?))
                    .send()
                    .await
                    .with_context(|| format!("putting {key}"))?;
                Ok(key)
            }
        })
        .buffer_unordered(8)
        .collect()
        .await;
    put.into_iter().collect()
}

/// How long the images may take. A run takes one to two minutes on a quiet machine; a
/// message a worker defers (a transient S3 error under load) stays hidden for the local
/// 300 s visibility timeout before another worker takes it, so a loaded machine needs
/// more than two such rounds.
const TERMINAL_WITHIN: Duration = Duration::from_secs(900);

/// Waits until every key has a terminal record.
async fn wait_terminal(
    pipeline: &LocalPipeline,
    keys: &[String],
    timeout: Duration,
) -> anyhow::Result<()> {
    let layout = Layout::new("incoming/");
    let started = Instant::now();
    loop {
        let done = pipeline.terminal_count(&layout, keys).await?;
        if done == keys.len() {
            return Ok(());
        }
        if started.elapsed() >= timeout {
            // Say where the rest are: an image whose message a worker left (a transient
            // error defers it) is hidden for the visibility timeout, not lost.
            let store = pipeline.store();
            let bucket = &pipeline.resources.bucket;
            let labels: HashSet<String> =
                store.list(bucket, "labels/").await?.into_iter().collect();
            let failed: HashSet<String> =
                store.list(bucket, "failed/").await?.into_iter().collect();
            let missing: Vec<&String> = keys
                .iter()
                .filter(|key| {
                    let relative = layout.relative_or_key(key);
                    !labels.contains(&layout.label_key(relative))
                        && !failed.contains(&layout.failed_key(relative))
                })
                .take(5)
                .collect();
            // Where the missing ones got to: a manifest (and its batch), a results line.
            let mut traces = Vec::new();
            for key in &missing {
                let mut seen = Vec::new();
                for manifest_key in store.list(bucket, "state/manifests/").await? {
                    let body = store.get(bucket, &manifest_key).await?.body;
                    if String::from_utf8_lossy(&body).contains(key.as_str()) {
                        seen.push(manifest_key);
                    }
                }
                for results_key in store.list(bucket, "results/").await? {
                    let body = store.get(bucket, &results_key).await?.body;
                    for line in String::from_utf8_lossy(&body).lines() {
                        if line.contains(key.as_str()) {
                            seen.push(format!("{results_key}: {line}"));
                        }
                    }
                }
                traces.push(format!("{key} in {seen:?}"));
            }
            let runs = pipeline.stats.worker_runs();
            let superseded: usize = runs.iter().map(|r| r.superseded).sum();
            let duplicates: usize = runs.iter().map(|r| r.duplicate_messages).sum();
            let load =
                |n: &std::sync::atomic::AtomicU64| n.load(std::sync::atomic::Ordering::Relaxed);
            anyhow::bail!(
                "{done} of {} images have a terminal record after {} s; first without one: \
                 {missing:?}; traces: {traces:?}; S3 events handled {}; pending messages \
                 queued {} (already labelled {}); workers' superseded {superseded}, \
                 duplicate messages {duplicates}; open markers {}; handler errors {}; \
                 queues: {}",
                keys.len(),
                timeout.as_secs(),
                load(&pipeline.stats.events),
                load(&pipeline.stats.queued),
                load(&pipeline.stats.already_labelled),
                store.list(bucket, "state/open/").await?.len(),
                pipeline
                    .stats
                    .handler_errors
                    .load(std::sync::atomic::Ordering::Relaxed),
                pipeline.queue_depths().await
            );
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// Every manifest whose batch was created, with the batch's record.
async fn created_batches(
    pipeline: &LocalPipeline,
) -> anyhow::Result<Vec<(Manifest, Option<BatchRecord>)>> {
    let store = pipeline.store();
    let bucket = &pipeline.resources.bucket;
    let mut batches = Vec::new();
    for key in store.list(bucket, "state/manifests/").await? {
        let manifest: Manifest = serde_json::from_slice(&store.get(bucket, &key).await?.body)?;
        let Ok(link) = store
            .get(bucket, &state_keys::manifest_batch(&manifest.name))
            .await
        else {
            continue;
        };
        let batch_id = String::from_utf8(link.body)?;
        let record = match store.get(bucket, &state_keys::batch(&batch_id)).await {
            Ok(object) => Some(serde_json::from_slice(&object.body)?),
            Err(_) => None,
        };
        batches.push((manifest, record));
    }
    Ok(batches)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn four_workers_share_two_thousand_images_without_overlap() -> anyhow::Result<()> {
    const IMAGES: usize = 2_000;
    let limits = BatchLimits {
        max_requests: 100,
        max_bytes: 4 * 1024 * 1024,
    };
    let mut options = options("scale-four-workers", 4, limits)?;
    // A backlog builds up between two scheduled runs, as it does in a deployment between
    // two periods: the run that finds it dispatches all four workers.
    options.submit_every = Duration::from_secs(15);
    let pipeline = LocalPipeline::start(options).await?;
    let keys = put_images(&pipeline, IMAGES).await?;
    wait_terminal(&pipeline, &keys, TERMINAL_WITHIN).await?;

    // Exactly one terminal record each.
    let store = pipeline.store();
    let bucket = &pipeline.resources.bucket;
    let layout = Layout::new("incoming/");
    let labels: HashSet<String> = store.list(bucket, "labels/").await?.into_iter().collect();
    let failed: HashSet<String> = store.list(bucket, "failed/").await?.into_iter().collect();
    for key in &keys {
        let relative = layout.relative_or_key(key);
        let labelled = labels.contains(&layout.label_key(relative));
        let is_failed = failed.contains(&layout.failed_key(relative));
        ensure!(
            labelled != is_failed,
            "{key}: label {labelled}, failed record {is_failed}"
        );
    }
    ensure!(labels.len() + failed.len() == IMAGES);

    // No image in two batches, and every request file within the limits. An image whose
    // S3 event was handled twice (SQS delivers at least once: a delete of the event that
    // failed under load brings it back) has two pending messages, and two workers may
    // each take one: that is the duplicate the harvest recognises, not an overlap of the
    // workers, so there may be as many images in two batches as events handled twice.
    let events = pipeline
        .stats
        .events
        .load(std::sync::atomic::Ordering::Relaxed);
    let inputs_twice = usize::try_from(events)?.saturating_sub(IMAGES);
    let batches = created_batches(&pipeline).await?;
    let mut in_two: Vec<String> = Vec::new();
    let mut batch_of: HashMap<(String, String), String> = HashMap::new();
    for (manifest, record) in &batches {
        ensure!(
            manifest.items.len() <= limits.max_requests,
            "{} holds {} requests, over {}",
            manifest.name,
            manifest.items.len(),
            limits.max_requests
        );
        if let Some(record) = record {
            ensure!(
                record.bytes <= limits.max_bytes,
                "{}: {} bytes, over {}",
                record.batch_id,
                record.bytes,
                limits.max_bytes
            );
        }
        for item in manifest.items.values() {
            let content = (item.key.clone(), item.etag.clone());
            if let Some(other) = batch_of.insert(content, manifest.name.clone()) {
                in_two.push(format!("{} is in {other} and {}", item.key, manifest.name));
            }
        }
    }
    ensure!(
        in_two.len() <= inputs_twice,
        "{} images are in two batches, {inputs_twice} S3 events were handled twice \
         ({events} events for {IMAGES} images; handler errors {}): {:?}",
        in_two.len(),
        pipeline
            .stats
            .handler_errors
            .load(std::sync::atomic::Ordering::Relaxed),
        in_two.iter().take(5).collect::<Vec<_>>()
    );
    if !in_two.is_empty() {
        eprintln!(
            "{} images in two batches, each from an S3 event handled twice ({events} events)",
            in_two.len()
        );
    }
    ensure!(
        batch_of.len() == IMAGES,
        "{} of {IMAGES} images were in a batch",
        batch_of.len()
    );

    // The workers really ran at once: two runs that each took messages overlapped.
    let runs: Vec<_> = pipeline
        .stats
        .worker_runs()
        .into_iter()
        .filter(|r| r.received > 0)
        .collect();
    let mut most_at_once = 0;
    for run in &runs {
        let at_once = runs
            .iter()
            .filter(|other| other.started <= run.started && run.started < other.ended)
            .count();
        most_at_once = most_at_once.max(at_once);
    }
    let submissions: HashSet<&str> = batches
        .iter()
        .map(|(m, _)| m.submission_id.as_str())
        .collect();
    eprintln!(
        "{} worker runs took messages, {} batches from {} submissions, up to {most_at_once} at once",
        runs.len(),
        batches.len(),
        submissions.len()
    );
    ensure!(
        most_at_once >= 2,
        "the workers never overlapped: {:?}",
        runs.iter()
            .map(|r| (r.started, r.ended, r.received))
            .collect::<Vec<_>>()
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn never_more_than_two_batches_open_at_the_provider() -> anyhow::Result<()> {
    const IMAGES: usize = 300;
    const MAX_OPEN: u64 = 2;
    let limits = BatchLimits {
        max_requests: 20,
        max_bytes: 4 * 1024 * 1024,
    };
    let mut options = options("scale-open-limit", 4, limits)?;
    options.max_open_batches = MAX_OPEN as u32;
    // Batches that take a while, so that the limit is what holds the workers back.
    options.emulator_delays_ms = (100, 1_000, 100);
    let pipeline = Arc::new(LocalPipeline::start(options).await?);

    // Watch the provider throughout the run.
    let most_open = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let watcher = {
        let (pipeline, most_open, stop) = (pipeline.clone(), most_open.clone(), stop.clone());
        tokio::spawn(async move {
            let mut samples = 0u64;
            while !stop.load(Ordering::Relaxed) {
                if let Some(emulator) = pipeline.emulator() {
                    let batches = emulator.stats().batches;
                    let open: u64 = ["validating", "in_progress", "finalizing", "cancelling"]
                        .iter()
                        .map(|s| batches.get(*s).copied().unwrap_or(0))
                        .sum();
                    most_open.fetch_max(open, Ordering::Relaxed);
                    samples += 1;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            samples
        })
    };
    let keys = put_images(&pipeline, IMAGES).await?;
    wait_terminal(&pipeline, &keys, TERMINAL_WITHIN).await?;
    stop.store(true, Ordering::Relaxed);
    let samples = watcher.await?;

    let most = most_open.load(Ordering::Relaxed);
    let by_status: BTreeMap<String, u64> = pipeline
        .emulator()
        .map(|e| e.stats().batches)
        .unwrap_or_default();
    eprintln!("at most {most} batches open over {samples} samples; at the end {by_status:?}");
    ensure!(
        most <= MAX_OPEN,
        "{most} batches were open at once, over the limit of {MAX_OPEN}"
    );
    ensure!(
        most == MAX_OPEN,
        "never {MAX_OPEN} open at once: the limit was not what held the workers back"
    );
    let completed = by_status.get("completed").copied().unwrap_or(0);
    ensure!(
        completed as usize >= IMAGES / limits.max_requests,
        "{completed} batches completed"
    );
    // Every image labelled (the emulator injects no faults here).
    let layout = Layout::new("incoming/");
    let store = pipeline.store();
    let labels: HashSet<String> = store
        .list(&pipeline.resources.bucket, "labels/")
        .await?
        .into_iter()
        .collect();
    for key in &keys {
        ensure!(
            labels.contains(&layout.label_key(layout.relative_or_key(key))),
            "{key} is not labelled"
        );
    }
    // Every slot given back once its batch was harvested (a worker that found the queue
    // empty gives back the slot it claimed on its way out).
    let started = Instant::now();
    loop {
        let slots = store
            .list(&pipeline.resources.bucket, state_keys::SLOTS_PREFIX)
            .await?;
        if slots.is_empty() {
            return Ok(());
        }
        ensure!(
            started.elapsed() < Duration::from_secs(30),
            "slots still held: {slots:?}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}
