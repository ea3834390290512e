//! The chaos soak: a few thousand images through the local stack (moto, the batch
//! emulator, the functions' real handlers wired as AWS wires them) while everything that
//! can go wrong goes wrong at once:
//!
//! - every fault the emulator injects: error lines, answers that are not JSON, that break
//!   the schema or are cut off, 429s and 500s on API calls, batches that expire half done,
//!   batches failed whole for the enqueued limit, uploads refused by a rate limit,
//!   webhooks dropped, sent twice, delayed and out of order;
//! - several submit workers at once, dispatched through the work queue, under a limit of
//!   open batches, and batches harvested in shards, several at once;
//! - S3 event notifications delivered twice;
//! - SQS redelivery: messages made visible again while their receiver still works on them,
//!   and messages a crashed invocation left behind coming back when it is gone;
//! - the submitter, the harvest and enqueue crashing at a random step, either returning an
//!   error half-way or killed outright (the invocation's future dropped where it stands),
//!   before or after the call at that step took effect.
//!
//! At the end, once nothing moves any more, it checks that every input object has exactly
//! one terminal record (a label for its content, or a failed record with its reasons), that
//! there is no record for anything that was not put in, that nothing is left in flight
//! (queues empty, no open batch left unharvested, no batch still running at the emulator),
//! that whatever sits in a dead-letter queue was put there by an injected fault, and that
//! at least 99.5 % of the decodable images end labelled (failed batches do not spend an
//! image's retries). It
//! prints what was injected and what came of it (`--nocapture` shows it).
//!
//! ```text
//! cargo test -p shotlabel-integration --test chaos -- --nocapture
//! SHOTLABEL_SOAK_IMAGES=20000 cargo test -p shotlabel-integration --test chaos -- --nocapture
//! ```
//!
//! `SHOTLABEL_SOAK_IMAGES` sets the number of images (default 2,000, as issue 8 asks: the
//! 12 fixture screenshots, the 12 awkward files and generated variants of the
//! screenshots). On a 2-core machine in the debug test profile, with other builds running,
//! 2,000 took about five minutes and 1,000 under three: moto, one Python process, is the
//! bottleneck (about ten requests per image). Larger sizes are opt-in.
//! `SHOTLABEL_SOAK_SEED` sets the seed of every fault draw (default 8), and
//! `SHOTLABEL_SOAK_TIMEOUT_SECONDS` how long it may take before it fails (default: 600 s,
//! or 0.3 s per image if that is more). Figures from runs are in `docs/reliability.md`.

mod common;

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, ensure};
use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_sqs::types::QueueAttributeName;
use batch_emulator::FaultSettings;
use futures_util::{StreamExt, stream};
use shotlabel_core::ports::ObjectStore;
use shotlabel_core::prepare::{DecodeLimits, decode, encode_jpeg, flatten_to_rgb};
use shotlabel_core::records::Stage;
use shotlabel_core::records::{
    BatchPhase, BatchRecord, FailedRecord, HarvestCounts, LabelRecord, Layout, state_keys,
};
use shotlabel_core::request::BatchLimits;
use shotlabel_core::task::Task;
use shotlabel_localstack::chaos::{ChaosOptions, ChaosStats, CrashKind};
use shotlabel_localstack::pipeline::{LocalPipeline, PipelineOptions, ProviderChoice, WebhookMode};

const DEFAULT_IMAGES: usize = 2_000;
const DEFAULT_SEED: u64 = 8;
/// Three retries, the deployed default. With about 18 % of answers broken on purpose,
/// some images still run out of attempts, so failed records are written while other
/// copies of the same images are still on their way (the race the soak found).
const MAX_RETRIES: u32 = 3;
/// Batch-level failures (expired, the enqueued limit) do not spend retries: their own bound.
const MAX_REQUEUES: usize = 10;
/// Submit workers at once, and the provider's limits the workers keep to.
const SUBMIT_WORKERS: usize = 3;
const MAX_OPEN_BATCHES: u32 = 8;
/// The least share of decodable images (screenshots and variants) that must end labelled.
const MIN_LABELLED: f64 = 0.995;
const STACK: &str = "chaos-soak";
/// How long everything must stay still before the end state is checked: longer than the
/// emulator's webhook retries and the runners' release delay.
const QUIET: Duration = Duration::from_secs(8);
/// Images put in at a time, and the most S3 events and pending messages waiting before
/// more are put in.
const UPLOAD_CHUNK: usize = 25;
const MAX_BACKLOG: u64 = 100;
/// At most this many labels are read back and checked one by one (evenly spread); every
/// label is listed and counted.
const LABELS_READ: usize = 500;

fn env_number(name: &str, default: u64) -> anyhow::Result<u64> {
    match std::env::var(name) {
        Ok(value) if !value.trim().is_empty() => value
            .trim()
            .parse()
            .with_context(|| format!("{name}={value:?} is not a number")),
        _ => Ok(default),
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Kind {
    Screenshot,
    Variant,
    Awkward,
}

struct Input {
    key: String,
    body: Vec<u8>,
    kind: Kind,
}

fn file_name(path: &std::path::Path) -> String {
    path.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// The fixture screenshots, the awkward files, and variants of the screenshots up to
/// `total`.
fn inputs(total: usize) -> anyhow::Result<Vec<Input>> {
    let mut inputs = Vec::new();
    let mut screens = Vec::new();
    for path in common::files("screenshots")? {
        let body = std::fs::read(&path)?;
        let name = file_name(&path);
        screens.push((name.trim_end_matches(".png").to_owned(), body.clone()));
        inputs.push(Input {
            key: format!("incoming/screenshots/{name}"),
            body,
            kind: Kind::Screenshot,
        });
    }
    for path in common::files("awkward")? {
        inputs.push(Input {
            key: format!("incoming/awkward/{}", file_name(&path)),
            body: std::fs::read(&path)?,
            kind: Kind::Awkward,
        });
    }
    let count = total.saturating_sub(inputs.len());
    inputs.extend(variants(&screens, count)?);
    let mut seen = HashSet::new();
    for input in &inputs {
        ensure!(seen.insert(&input.key), "two inputs share {}", input.key);
    }
    Ok(inputs)
}

/// `count` variants of the screenshots, each with bytes of its own: a screenshot made
/// small (a longest side of 256, 320 or 400 px) and re-encoded as JPEG, with a comment
/// segment naming the variant. Deterministic, and fast even in a debug build: 36 small
/// encodes, then only bytes are copied. Small variants also keep the pipeline's own
/// preparation (debug-built, like the test) from dominating the soak.
fn variants(screens: &[(String, Vec<u8>)], count: usize) -> anyhow::Result<Vec<Input>> {
    ensure!(!screens.is_empty(), "no fixture screenshots");
    let mut seeds = Vec::new();
    for (stem, bytes) in screens {
        let decoded =
            decode(bytes, &DecodeLimits::default()).map_err(|e| anyhow!("{stem}: {e}"))?;
        for side in [400, 320, 256] {
            // `thumbnail` runs in the (optimised) image crate.
            let small = flatten_to_rgb(decoded.image.thumbnail(side, side));
            let jpeg = encode_jpeg(&small, 85).map_err(|e| anyhow!("{stem}: {e}"))?;
            seeds.push((stem.as_str(), jpeg_insertion_point(&jpeg)?, jpeg));
        }
    }
    let mut variants = Vec::with_capacity(count);
    for i in 0..count {
        let (stem, at, seed) = &seeds[i % seeds.len()];
        let comment = format!("shotlabel chaos soak variant {i}");
        let length = u16::try_from(comment.len() + 2)?;
        let mut body = Vec::with_capacity(seed.len() + comment.len() + 4);
        body.extend_from_slice(&seed[..*at]);
        body.extend_from_slice(&[0xFF, 0xFE]);
        body.extend_from_slice(&length.to_be_bytes());
        body.extend_from_slice(comment.as_bytes());
        body.extend_from_slice(&seed[*at..]);
        // Some keys that S3 events must encode: spaces, '+', non-ASCII.
        let key = if i % 100 == 7 {
            format!("incoming/variants/odd names/{stem} + {i} ü.jpg")
        } else {
            format!("incoming/variants/{stem}/{i:05}.jpg")
        };
        variants.push(Input {
            key,
            body,
            kind: Kind::Variant,
        });
    }
    Ok(variants)
}

/// Where a comment segment can go in a JPEG: after SOI and the JFIF APP0 segment.
fn jpeg_insertion_point(jpeg: &[u8]) -> anyhow::Result<usize> {
    ensure!(jpeg.starts_with(&[0xFF, 0xD8]), "not a JPEG");
    if jpeg.get(2..4) == Some(&[0xFF, 0xE0]) {
        let length = jpeg
            .get(4..6)
            .map(|l| usize::from(u16::from_be_bytes([l[0], l[1]])))
            .ok_or_else(|| anyhow!("a truncated JPEG"))?;
        return Ok(4 + length);
    }
    Ok(2)
}

fn options(task: Task, seed: u64) -> PipelineOptions {
    let mut options = PipelineOptions::new(task);
    options.stack_name = STACK.into();
    options.webhook_mode = WebhookMode::Standard;
    options.submit_every = Duration::from_millis(500);
    options.emulator_delays_ms = (50, 300, 50);
    // Small batches: more batches, so more submits and harvests to crash.
    options.limits = BatchLimits {
        max_requests: 25,
        max_bytes: 200_000_000,
    };
    options.max_retries = MAX_RETRIES;
    // Dropped webhooks are found by reconciliation.
    options.reconcile_min_age = Duration::from_secs(3);
    options.harvest_concurrency = 3;
    options.submit_workers = SUBMIT_WORKERS;
    options.max_open_batches = MAX_OPEN_BATCHES;
    // Paced far closer than the provider allows (20 ms against its 400 ms), so that its
    // 429s are met on every seed: at 40 ms two uploads rarely came close enough.
    options.upload_interval = Duration::from_millis(20);
    // Batches over 10 requests are harvested in shards through the harvest queue.
    options.harvest_shard_requests = Some(10);
    options.provider = ProviderChoice::Emulator {
        faults: FaultSettings {
            error_line: 0.06,
            non_json: 0.04,
            schema_break: 0.04,
            length: 0.04,
            http_429: 0.03,
            http_500: 0.03,
            expire: 0.1,
            enqueued_limit: 0.05,
            upload_interval_ms: 400,
            file_processing_ms: 50,
            create_lost_answer: 0.05,
            webhook_drop: 0.2,
            webhook_duplicate: 0.2,
            webhook_delay_ms: 20,
            webhook_reorder: true,
        },
        seed,
    };
    options.chaos = Some(ChaosOptions::new(seed));
    options
}

async fn queue_depth(sqs: &aws_sdk_sqs::Client, url: &str) -> anyhow::Result<u64> {
    let attributes = sqs
        .get_queue_attributes()
        .queue_url(url)
        .attribute_names(QueueAttributeName::ApproximateNumberOfMessages)
        .attribute_names(QueueAttributeName::ApproximateNumberOfMessagesNotVisible)
        .attribute_names(QueueAttributeName::ApproximateNumberOfMessagesDelayed)
        .send()
        .await?
        .attributes
        .unwrap_or_default();
    Ok(attributes
        .values()
        .filter_map(|v| v.parse::<u64>().ok())
        .sum())
}

/// Every message of a (dead-letter) queue: (message id, body).
async fn drain(sqs: &aws_sdk_sqs::Client, url: &str) -> anyhow::Result<Vec<(String, String)>> {
    let mut messages = Vec::new();
    loop {
        let received = sqs
            .receive_message()
            .queue_url(url)
            .max_number_of_messages(10)
            .visibility_timeout(600)
            .send()
            .await?
            .messages
            .unwrap_or_default();
        if received.is_empty() {
            return Ok(messages);
        }
        messages.extend(
            received
                .into_iter()
                .map(|m| (m.message_id.unwrap_or_default(), m.body.unwrap_or_default())),
        );
    }
}

/// Where the pipeline stands.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Progress {
    /// Images with a terminal record; only counted once everything else is still (listing
    /// thousands of keys is slow on moto).
    terminal: Option<usize>,
    pending: u64,
    harvest: u64,
    events: u64,
    open_batches: usize,
    /// Batches the emulator has not finished.
    running_batches: u64,
    /// Runner activity, to tell a still pipeline from a busy one.
    activity: u64,
}

impl Progress {
    /// Nothing queued, nothing open, nothing running.
    fn still(&self) -> bool {
        self.pending == 0
            && self.harvest == 0
            && self.events == 0
            && self.open_batches == 0
            && self.running_batches == 0
    }

    fn settled(&self, images: usize) -> bool {
        self.still() && self.terminal == Some(images)
    }
}

async fn progress(
    pipeline: &LocalPipeline,
    sqs: &aws_sdk_sqs::Client,
    layout: &Layout,
    keys: &[String],
) -> anyhow::Result<Progress> {
    let store = pipeline.store();
    let resources = &pipeline.resources;
    let emulator = pipeline
        .emulator()
        .ok_or_else(|| anyhow!("the soak runs against the emulator"))?
        .stats();
    let running_batches = ["validating", "in_progress", "finalizing", "cancelling"]
        .iter()
        .map(|s| emulator.batches.get(*s).copied().unwrap_or(0))
        .sum();
    let stats = &pipeline.stats;
    let mut progress = Progress {
        terminal: None,
        pending: queue_depth(sqs, &resources.pending_queue_url).await?,
        harvest: queue_depth(sqs, &resources.harvest_queue_url).await?,
        events: queue_depth(sqs, &pipeline.events_queue_url).await?,
        open_batches: store
            .list(&resources.bucket, state_keys::OPEN_PREFIX)
            .await?
            .len(),
        running_batches,
        activity: stats.events.load(Ordering::Relaxed)
            + stats.webhook_requests.load(Ordering::Relaxed)
            + stats.harvest_messages.load(Ordering::Relaxed)
            + emulator.webhooks.attempts,
    };
    if progress.still() {
        progress.terminal = Some(pipeline.terminal_count(layout, keys).await?);
    }
    Ok(progress)
}

/// For images without a terminal record: the manifests (and their batches' records) and
/// retry plans that name them, and whether a dead-letter queue holds them.
async fn trace_unfinished(
    pipeline: &LocalPipeline,
    sqs: &aws_sdk_sqs::Client,
    layout: &Layout,
    keys: &[String],
) -> anyhow::Result<Vec<String>> {
    let store = pipeline.store();
    let bucket = &pipeline.resources.bucket;
    let labels: BTreeSet<String> = store.list(bucket, "labels/").await?.into_iter().collect();
    let failed: BTreeSet<String> = store.list(bucket, "failed/").await?.into_iter().collect();
    let unfinished: Vec<&String> = keys
        .iter()
        .filter(|k| {
            let relative = layout.relative_or_key(k);
            !labels.contains(&layout.label_key(relative))
                && !failed.contains(&layout.failed_key(relative))
        })
        .take(5)
        .collect();
    let mut found: BTreeMap<&String, Vec<String>> = BTreeMap::new();
    let prefixes = ["state/manifests/", "state/retries/", "state/shards/"];
    for prefix in prefixes {
        for (key, body) in read_all(pipeline, store.list(bucket, prefix).await?).await? {
            let text = String::from_utf8_lossy(&body);
            for image in &unfinished {
                if text.contains(image.as_str()) {
                    found.entry(*image).or_default().push(key.clone());
                }
            }
        }
    }
    let mut dead = Vec::new();
    for url in [
        &pipeline.resources.pending_dead_letter_queue_url,
        &pipeline.resources.harvest_dead_letter_queue_url,
    ] {
        for (id, body) in drain(sqs, url).await? {
            let short: String = body.chars().take(400).collect();
            dead.push(format!("dead letter {id}: {short}"));
            for image in &unfinished {
                if body.contains(image.as_str()) {
                    found
                        .entry(*image)
                        .or_default()
                        .push(format!("dead letter {id}"));
                }
            }
        }
    }
    let mut lines: Vec<String> = unfinished
        .iter()
        .map(|image| format!("{image}: {:?}", found.get(*image)))
        .collect();
    lines.extend(dead);
    for (key, body) in read_all(pipeline, store.list(bucket, "state/open/").await?).await? {
        lines.push(format!(
            "open marker {key}: {}",
            String::from_utf8_lossy(&body)
        ));
    }
    Ok(lines)
}

/// Reads every object under these keys, a few at a time.
async fn read_all(
    pipeline: &LocalPipeline,
    keys: impl IntoIterator<Item = String>,
) -> anyhow::Result<Vec<(String, Vec<u8>)>> {
    let store = pipeline.store();
    let bucket = pipeline.resources.bucket.clone();
    let results: Vec<anyhow::Result<(String, Vec<u8>)>> = stream::iter(keys)
        .map(|key| {
            let (store, bucket) = (store.clone(), bucket.clone());
            async move {
                let object = store.get(&bucket, &key).await?;
                Ok((key, object.body))
            }
        })
        .buffer_unordered(16)
        .collect()
        .await;
    results.into_iter().collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_image_ends_with_one_terminal_record_through_chaos() -> anyhow::Result<()> {
    // `SHOTLABEL_SOAK_LOG=warn` (any tracing filter) shows the functions' own log lines.
    if let Ok(filter) = std::env::var("SHOTLABEL_SOAK_LOG") {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
            .with_writer(std::io::stderr)
            .try_init();
    }
    let started = Instant::now();
    let images = env_number("SHOTLABEL_SOAK_IMAGES", DEFAULT_IMAGES as u64)? as usize;
    let seed = env_number("SHOTLABEL_SOAK_SEED", DEFAULT_SEED)?;
    let timeout = Duration::from_secs(env_number(
        "SHOTLABEL_SOAK_TIMEOUT_SECONDS",
        600.max(images as u64 * 3 / 10),
    )?);
    let inputs = tokio::task::spawn_blocking(move || inputs(images)).await??;
    let generated = started.elapsed();
    let images = inputs.len();
    let kinds: BTreeMap<Kind, usize> = inputs.iter().fold(BTreeMap::new(), |mut m, i| {
        *m.entry(i.kind).or_default() += 1;
        m
    });

    let task = Task::default_task()?;
    let pipeline = LocalPipeline::start(options(task.clone(), seed)).await?;
    let s3 = shotlabel_localstack::s3_client(&pipeline.sdk);
    let sqs = shotlabel_localstack::sqs_client(&pipeline.sdk);
    let bucket = pipeline.resources.bucket.clone();
    let layout = Layout::new("incoming/");

    // Put everything in while the pipeline works, a few at a time and paced: moto's SQS
    // slows down with every message a queue holds (deletes scan the queue), and a backlog
    // of thousands of S3 events would make the local stack, not the pipeline, the subject.
    let mut etags = HashMap::new();
    let mut kind_of = HashMap::new();
    let mut rest = inputs.into_iter();
    let mut last_report = Instant::now();
    loop {
        let chunk: Vec<Input> = rest.by_ref().take(UPLOAD_CHUNK).collect();
        if chunk.is_empty() {
            break;
        }
        loop {
            let backlog = queue_depth(&sqs, &pipeline.events_queue_url).await?
                + queue_depth(&sqs, &pipeline.resources.pending_queue_url).await?;
            if backlog <= MAX_BACKLOG {
                break;
            }
            ensure!(
                started.elapsed() < timeout,
                "the soak did not put its images in within {} s: a backlog of {backlog}",
                timeout.as_secs()
            );
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        let uploaded: Vec<anyhow::Result<(String, String, Kind)>> = stream::iter(chunk)
            .map(|input| {
                let (s3, bucket) = (s3.clone(), bucket.clone());
                async move {
                    let out = s3
                        .put_object()
                        .bucket(&bucket)
                        .key(&input.key)
                        .body(ByteStream::from(input.body))
                        .send()
                        .await
                        .with_context(|| format!("putting {}", input.key))?;
                    let etag = out.e_tag.unwrap_or_default().trim_matches('"').to_owned();
                    Ok((input.key, etag, input.kind))
                }
            })
            .buffer_unordered(8)
            .collect()
            .await;
        for result in uploaded {
            let (key, etag, kind) = result?;
            kind_of.insert(key.clone(), kind);
            etags.insert(key, etag);
        }
        if last_report.elapsed() >= Duration::from_secs(10) {
            eprintln!(
                "chaos soak: {:>4} s  {}/{images} put in",
                started.elapsed().as_secs(),
                etags.len()
            );
            last_report = Instant::now();
        }
    }
    let mut keys: Vec<String> = etags.keys().cloned().collect();
    keys.sort();
    let put_in = started.elapsed();
    eprintln!(
        "chaos soak: {images} images generated in {:.1} s, put in by {:.1} s",
        generated.as_secs_f64(),
        put_in.as_secs_f64()
    );

    // Wait until every image has a terminal record and nothing moves any more.
    let mut still_since: Option<(Instant, u64)> = None;
    let last = loop {
        let now = progress(&pipeline, &sqs, &layout, &keys).await?;
        if now.settled(images) {
            match still_since {
                Some((since, activity)) if activity == now.activity => {
                    if since.elapsed() >= QUIET {
                        break now;
                    }
                }
                _ => still_since = Some((Instant::now(), now.activity)),
            }
        } else {
            still_since = None;
        }
        if started.elapsed() >= timeout {
            let traces = trace_unfinished(&pipeline, &sqs, &layout, &keys).await?;
            anyhow::bail!(
                "the soak did not settle within {} s (SHOTLABEL_SOAK_TIMEOUT_SECONDS): {now:?} \
                 of {images} images; where the unfinished ones were last seen:\n  {}\n\
                 unreadable notifications {}; queues: {}",
                timeout.as_secs(),
                traces.join("\n  "),
                pipeline.stats.unreadable_events.load(Ordering::Relaxed),
                pipeline.queue_depths().await
            );
        }
        if last_report.elapsed() >= Duration::from_secs(10) {
            eprintln!(
                "chaos soak: {:>4} s  terminal {:?}/{images}, pending {}, harvest {}, events {}, open batches {}",
                started.elapsed().as_secs(),
                now.terminal,
                now.pending,
                now.harvest,
                now.events,
                now.open_batches
            );
            last_report = Instant::now();
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
    };
    let settled = started.elapsed();

    // What is there at the end.
    let store = pipeline.store();
    let mut problems: Vec<String> = Vec::new();
    let labels: BTreeSet<String> = store.list(&bucket, "labels/").await?.into_iter().collect();
    let failed: BTreeSet<String> = store.list(&bucket, "failed/").await?.into_iter().collect();
    let mut expected_label = HashMap::new();
    let mut expected_failed = HashMap::new();
    for key in &keys {
        let relative = layout.relative_or_key(key);
        let (label_key, failed_key) = (layout.label_key(relative), layout.failed_key(relative));
        match (labels.contains(&label_key), failed.contains(&failed_key)) {
            (true, false) | (false, true) => {}
            (true, true) => problems.push(format!("{key}: both a label and a failed record")),
            (false, false) => problems.push(format!("{key}: no terminal record")),
        }
        expected_label.insert(label_key, key.clone());
        expected_failed.insert(failed_key, key.clone());
    }
    for label in labels.iter().filter(|k| !expected_label.contains_key(*k)) {
        problems.push(format!("{label}: a label for nothing that was put in"));
    }
    for record in failed.iter().filter(|k| !expected_failed.contains_key(*k)) {
        problems.push(format!(
            "{record}: a failed record for nothing that was put in"
        ));
    }

    // Labels are for the content that was put in, under this task, schema-valid (a sample:
    // reading thousands back one by one is slow on moto).
    let mut labels_read_after_retry = 0;
    let every = labels.len().div_ceil(LABELS_READ).max(1);
    let sample = labels.iter().step_by(every).cloned();
    let mut labels_read = 0;
    for (label_key, body) in read_all(&pipeline, sample).await? {
        labels_read += 1;
        let Some(key) = expected_label.get(&label_key) else {
            continue;
        };
        let label: LabelRecord = match serde_json::from_slice(&body) {
            Ok(label) => label,
            Err(e) => {
                problems.push(format!("{label_key}: not a label record: {e}"));
                continue;
            }
        };
        if &label.source.key != key || Some(&label.source.etag) != etags.get(key) {
            problems.push(format!(
                "{label_key}: labels {} at {}, not what was put in",
                label.source.key, label.source.etag
            ));
        }
        if label.task.version != task.version() {
            problems.push(format!("{label_key}: task version {}", label.task.version));
        }
        if let Err(e) = task.validate_answer(&label.label) {
            problems.push(format!("{label_key}: the label breaks the schema: {e:?}"));
        }
        if label.attempt > 0 {
            labels_read_after_retry += 1;
        }
    }
    // Each failed record gives its reasons; a screenshot or a variant (all decodable)
    // fails only after every attempt came back broken, which only injected faults do.
    let mut failed_by_stage: BTreeMap<String, usize> = BTreeMap::new();
    for (failed_key, body) in read_all(&pipeline, failed.iter().cloned()).await? {
        let Some(key) = expected_failed.get(&failed_key) else {
            continue;
        };
        let record: FailedRecord = match serde_json::from_slice(&body) {
            Ok(record) => record,
            Err(e) => {
                problems.push(format!("{failed_key}: not a failed record: {e}"));
                continue;
            }
        };
        if &record.source.key != key || Some(&record.source.etag) != etags.get(key) {
            problems.push(format!(
                "{failed_key}: about {} at {}, not what was put in",
                record.source.key, record.source.etag
            ));
        }
        let Some(last_reason) = record.reasons.last() else {
            problems.push(format!("{failed_key}: a failed record without reasons"));
            continue;
        };
        *failed_by_stage
            .entry(last_reason.stage.to_string())
            .or_default() += 1;
        if kind_of.get(key) != Some(&Kind::Awkward) {
            // Out of attempts on broken answers, or out of requeues on failed batches.
            let (batch, answers): (Vec<_>, Vec<_>) =
                record.reasons.iter().partition(|r| r.stage == Stage::Batch);
            let by_faults = answers.len() == MAX_RETRIES as usize + 1
                && answers
                    .iter()
                    .all(|r| r.stage == Stage::Provider || r.stage == Stage::Validate)
                || batch.len() == MAX_REQUEUES + 1;
            if !by_faults {
                problems.push(format!(
                    "{failed_key}: a decodable image failed for reasons no injected fault explains: {:?}",
                    record.reasons
                ));
            }
        }
    }

    // Nothing in flight: settled() held for QUIET; the batches' records agree.
    let mut harvested = HarvestCounts::default();
    let batch_keys = store.list(&bucket, "state/batches/").await?;
    let mut batches_by_phase: BTreeMap<String, usize> = BTreeMap::new();
    for (key, body) in read_all(&pipeline, batch_keys).await? {
        let record: BatchRecord =
            serde_json::from_slice(&body).with_context(|| format!("reading {key}"))?;
        *batches_by_phase
            .entry(format!("{:?}", record.phase).to_lowercase())
            .or_default() += 1;
        if record.phase == BatchPhase::Harvested {
            if let Some(counts) = &record.harvest {
                harvested.add(counts);
            }
        } else {
            problems.push(format!(
                "batch {} is {:?} and has no open marker: never harvested",
                record.batch_id, record.phase
            ));
        }
    }

    // The dead-letter queues: only messages an injected fault touched.
    let chaos = pipeline.chaos_stats().unwrap_or_default();
    let mut dead_letters = Vec::new();
    for url in [
        &pipeline.resources.pending_dead_letter_queue_url,
        &pipeline.resources.harvest_dead_letter_queue_url,
    ] {
        for (id, body) in drain(&sqs, url).await? {
            if !chaos.touched_messages.contains(&id) {
                problems.push(format!(
                    "dead-letter message {id} no injected fault explains: {body}"
                ));
            }
            dead_letters.push((id, body));
        }
    }

    let emulator = pipeline
        .emulator()
        .ok_or_else(|| anyhow!("no emulator"))?
        .stats();
    let stats = &pipeline.stats;
    eprintln!(
        "{}",
        summary(&Summary {
            images,
            kinds: &kinds,
            seed,
            labels: labels.len(),
            labels_read,
            labels_read_after_retry,
            failed: failed.len(),
            failed_by_stage: &failed_by_stage,
            harvested: &harvested,
            batches_by_phase: &batches_by_phase,
            emulator: &emulator,
            chaos: &chaos,
            dead_letters: dead_letters.len(),
            runners: [
                ("submit runs", stats.submit_runs.load(Ordering::Relaxed)),
                ("S3 events handled", stats.events.load(Ordering::Relaxed)),
                (
                    "webhook requests",
                    stats.webhook_requests.load(Ordering::Relaxed)
                ),
                (
                    "harvest messages",
                    stats.harvest_messages.load(Ordering::Relaxed)
                ),
                (
                    "handler errors",
                    stats.handler_errors.load(Ordering::Relaxed)
                ),
            ],
            timings: [
                ("generated", generated),
                ("put in", put_in),
                ("settled", settled),
                ("checked", started.elapsed()),
            ],
        })
    );
    drop(pipeline);
    let _ = std::fs::remove_dir_all(std::env::temp_dir().join(format!("{STACK}-work")));

    // Broken answers spend retries; failed batches do not: nearly every decodable image
    // ends labelled.
    let decodable: Vec<&String> = keys
        .iter()
        .filter(|k| kind_of.get(*k) != Some(&Kind::Awkward))
        .collect();
    let decodable_labelled = decodable
        .iter()
        .filter(|k| labels.contains(&layout.label_key(layout.relative_or_key(k))))
        .count();
    let share = decodable_labelled as f64 / decodable.len().max(1) as f64;
    eprintln!(
        "  decodable labelled:   {decodable_labelled} of {} ({:.2} %)",
        decodable.len(),
        share * 100.0
    );
    if share < MIN_LABELLED {
        problems.push(format!(
            "only {:.2} % of the decodable images ended labelled (at least {:.1} % expected)",
            share * 100.0,
            MIN_LABELLED * 100.0
        ));
    }
    ensure!(
        problems.is_empty(),
        "{} problem(s) after the soak ({last:?}):\n  {}",
        problems.len(),
        problems.join("\n  ")
    );
    // A soak that injected nothing proves nothing: at the default size, every kind of
    // fault must have happened.
    if images >= 1_000 {
        // `file_not_processed` counts creations the emulator refused because their file
        // was still being processed: the client waits for `processed`, so it stays 0.
        ensure!(
            emulator.faults.get("file_not_processed").copied() == Some(0),
            "a batch was created before its file was processed: {:?}",
            emulator.faults
        );
        let mut missing: Vec<String> = emulator
            .faults
            .iter()
            .filter(|(kind, n)| **n == 0 && kind.as_str() != "file_not_processed")
            .map(|(kind, _)| kind.clone())
            .collect();
        for kind in [
            CrashKind::ErrorBefore,
            CrashKind::ErrorAfter,
            CrashKind::KillBefore,
            CrashKind::KillAfter,
        ] {
            if chaos.crashes_of(kind) == 0 {
                missing.push(kind.as_str().into());
            }
        }
        if chaos.redelivered == 0 {
            missing.push("SQS redelivery".into());
        }
        if chaos.duplicate_events == 0 {
            missing.push("duplicate S3 events".into());
        }
        ensure!(missing.is_empty(), "faults never injected: {missing:?}");
    }
    Ok(())
}

struct Summary<'a> {
    images: usize,
    kinds: &'a BTreeMap<Kind, usize>,
    seed: u64,
    labels: usize,
    labels_read: usize,
    labels_read_after_retry: usize,
    failed: usize,
    failed_by_stage: &'a BTreeMap<String, usize>,
    harvested: &'a HarvestCounts,
    batches_by_phase: &'a BTreeMap<String, usize>,
    emulator: &'a batch_emulator::Stats,
    chaos: &'a ChaosStats,
    dead_letters: usize,
    runners: [(&'static str, u64); 5],
    timings: [(&'static str, Duration); 4],
}

fn summary(s: &Summary<'_>) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let kinds: Vec<String> = s
        .kinds
        .iter()
        .map(|(k, n)| format!("{k:?} {n}").to_lowercase())
        .collect();
    let _ = writeln!(out, "Chaos soak summary (seed {})", s.seed);
    let _ = writeln!(
        out,
        "  images:               {} ({})",
        s.images,
        kinds.join(", ")
    );
    let _ = writeln!(
        out,
        "  labelled:             {} ({} read back and checked, {} of them after a retry)",
        s.labels, s.labels_read, s.labels_read_after_retry
    );
    let _ = writeln!(
        out,
        "  failed:               {} (last stage: {:?})",
        s.failed, s.failed_by_stage
    );
    let _ = writeln!(
        out,
        "  harvests:             labelled {}, retried {}, failed {}, duplicates suppressed {}",
        s.harvested.labelled, s.harvested.retried, s.harvested.failed, s.harvested.duplicates
    );
    let _ = writeln!(out, "  batches (ours):       {:?}", s.batches_by_phase);
    let provider: BTreeMap<&String, &u64> =
        s.emulator.batches.iter().filter(|(_, n)| **n > 0).collect();
    let _ = writeln!(out, "  batches (provider):   {provider:?}");
    let _ = writeln!(
        out,
        "  provider:             {} API calls, {} answers, {} error lines",
        s.emulator.api_calls, s.emulator.requests_answered, s.emulator.requests_failed
    );
    let _ = writeln!(out, "  provider faults:      {:?}", s.emulator.faults);
    let w = &s.emulator.webhooks;
    let _ = writeln!(
        out,
        "  webhooks:             {} sent, {} dropped, {} duplicated, {} retried, {} given up",
        w.sent, w.dropped, w.duplicated, w.retries, w.failed
    );
    let crashes: Vec<String> = s
        .chaos
        .crashes
        .iter()
        .map(|((function, kind), n)| format!("{function} {kind}: {n}"))
        .collect();
    let _ = writeln!(
        out,
        "  crashes injected:     {} of {} invocations {:?}",
        s.chaos.crash_count(),
        s.chaos.invocations.values().sum::<u64>(),
        s.chaos.invocations
    );
    for line in crashes {
        let _ = writeln!(out, "    {line}");
    }
    let _ = writeln!(out, "  crash steps:          {:?}", s.chaos.crash_steps);
    let _ = writeln!(
        out,
        "  SQS redeliveries:     {}; duplicate S3 events: {}",
        s.chaos.redelivered, s.chaos.duplicate_events
    );
    let _ = writeln!(
        out,
        "  dead letters:         {} (each touched by an injected fault)",
        s.dead_letters
    );
    let runners: Vec<String> = s.runners.iter().map(|(k, n)| format!("{k} {n}")).collect();
    let _ = writeln!(out, "  runners:              {}", runners.join(", "));
    let timings: Vec<String> = s
        .timings
        .iter()
        .map(|(k, d)| format!("{k} {:.1} s", d.as_secs_f64()))
        .collect();
    let _ = write!(out, "  elapsed:              {}", timings.join(", "));
    out
}
