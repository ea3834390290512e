//! Scale-out benchmarks (docs/scale.md): the whole local pipeline (moto, the batch
//! emulator, the real handlers; [`LocalPipeline`]) over N images generated in-process,
//! with what each run cost in port requests per image and handler time per function.
//!
//! Each command here is a loop of [`Run`]s, one fresh pipeline per run, and reports them
//! with the helpers below ([`put_images`], [`wait_terminal`], [`Usage`]); `scale-submit`
//! varies the submit workers.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use futures_util::StreamExt;
use shotlabel_core::metered::RequestSnapshot;
use shotlabel_core::ports::{ObjectStore, WriteCondition};
use shotlabel_core::records::Layout;
use shotlabel_core::request::BatchLimits;
use shotlabel_core::task::Task;
use shotlabel_localstack::pipeline::{LocalPipeline, PipelineOptions, WorkerRun};

use crate::common::{header, load};

const INPUT: &str = "incoming/";

#[derive(Debug, clap::Args)]
pub struct ScaleSubmitArgs {
    /// Images per run (small PNGs and JPEGs, made in-process, each distinct).
    #[arg(long, default_value_t = 2000)]
    images: usize,
    /// The submit worker counts to compare (`MaxSubmitWorkers`).
    #[arg(long, value_delimiter = ',', default_value = "1,2")]
    workers: Vec<usize>,
    /// Rounds; each round runs every worker count once, in turn, so that the machine's
    /// drift falls on all of them alike.
    #[arg(long, default_value_t = 1)]
    repeats: usize,
    /// Requests per batch, which is also the backlog one worker is started for.
    #[arg(long, default_value_t = 250)]
    batch_requests: usize,
    /// How often the scheduled submit runs, in ms. Short (the default), workers are
    /// started as the uploads arrive, in proportion to the backlog each run finds; longer
    /// than the uploads take (e.g. 25000), the backlog is all there when the second
    /// scheduled run dispatches, as in a backfill.
    #[arg(long, default_value_t = 2000)]
    submit_every_ms: u64,
    /// The emulator's validating, in-progress and finalizing delays, in ms.
    #[arg(
        long,
        default_value = "100,500,100",
        value_delimiter = ',',
        num_args = 3
    )]
    delays_ms: Vec<u64>,
    /// After the last terminal record, count the requests the idle pipeline makes for
    /// this long (the schedule's polling, which does not grow with the images).
    #[arg(long, default_value_t = 10)]
    idle_seconds: u64,
    /// Give up on a run after this many seconds.
    #[arg(long, default_value_t = 900)]
    timeout: u64,
}

/// Side of the generated images, in pixels: small, so that the run measures the
/// pipeline's requests and hand-offs rather than image decoding.
const WIDTH: u32 = 256;
const HEIGHT: u32 = 160;

/// A small image whose pixels depend on `index`: a PNG for even indices, a JPEG for odd.
fn generated_image(index: usize) -> anyhow::Result<(String, &'static str, Vec<u8>)> {
    let seed = (index as u32).wrapping_mul(2_654_435_761);
    let picture = image::RgbImage::from_fn(WIDTH, HEIGHT, |x, y| {
        let v = seed ^ (x * 31 + y * 17);
        image::Rgb([v as u8, (v >> 8) as u8, (v >> 16) as u8 ^ (x as u8)])
    });
    let (ext, content_type, format) = if index.is_multiple_of(2) {
        ("png", "image/png", image::ImageFormat::Png)
    } else {
        ("jpg", "image/jpeg", image::ImageFormat::Jpeg)
    };
    let mut bytes = Vec::new();
    picture.write_to(&mut std::io::Cursor::new(&mut bytes), format)?;
    Ok((format!("{index:06}.{ext}"), content_type, bytes))
}

fn generated_images(count: usize) -> anyhow::Result<Vec<(String, &'static str, Vec<u8>)>> {
    (0..count).map(generated_image).collect()
}

/// Puts the images under `incoming/<dir>/`, eight at a time, as a user's upload would
/// (not through the pipeline's metered ports); returns their keys.
async fn put_images(
    pipeline: &LocalPipeline,
    dir: &str,
    images: &Arc<Vec<(String, &'static str, Vec<u8>)>>,
) -> anyhow::Result<Vec<String>> {
    let store = pipeline.store();
    let bucket = pipeline.resources.bucket.as_str();
    let mut puts = futures_util::stream::iter(0..images.len())
        .map(|i| {
            let (store, images) = (&store, images.clone());
            async move {
                let (name, content_type, body) = &images[i];
                let key = format!("{INPUT}{dir}/{name}");
                store
                    .put(
                        bucket,
                        &key,
                        body.clone(),
                        content_type,
                        WriteCondition::Overwrite,
                    )
                    .await
                    .with_context(|| format!("uploading {key}"))?;
                anyhow::Ok(key)
            }
        })
        .buffer_unordered(8);
    let mut keys = Vec::with_capacity(images.len());
    while let Some(key) = puts.next().await {
        keys.push(key?);
    }
    Ok(keys)
}

/// Polls until every key has a terminal record; returns when that was first seen.
async fn wait_terminal(
    pipeline: &LocalPipeline,
    keys: &[String],
    timeout: Duration,
) -> anyhow::Result<Instant> {
    let layout = Layout::new(INPUT);
    let deadline = Instant::now() + timeout;
    loop {
        let done = pipeline.terminal_count(&layout, keys).await?;
        if done >= keys.len() {
            return Ok(Instant::now());
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "only {done} of {} images finished within {} s",
            keys.len(),
            timeout.as_secs()
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Where a run that did not finish stands: the keys without a terminal record, and how
/// far the functions got (S3 events handled, messages sent and received).
async fn unfinished(pipeline: &LocalPipeline, keys: &[String]) -> String {
    let layout = Layout::new(INPUT);
    let store = pipeline.store();
    let bucket = &pipeline.resources.bucket;
    let (labels, failed) = match (
        store.list(bucket, "labels/").await,
        store.list(bucket, "failed/").await,
    ) {
        (Ok(labels), Ok(failed)) => (labels, failed),
        _ => return "the bucket could not be listed".to_owned(),
    };
    let missing: Vec<&String> = keys
        .iter()
        .filter(|key| {
            let relative = layout.relative_or_key(key);
            !labels.contains(&layout.label_key(relative))
                && !failed.contains(&layout.failed_key(relative))
        })
        .collect();
    let by_function = pipeline.request_counts_by_function();
    let sent = |f: usize| by_function.get(f).map_or(0, |(_, r)| r.sqs_send);
    format!(
        "{} without a terminal record (first: {:?}); S3 events handled {} (unreadable {}); \
         SendMessageBatch by enqueue {}; ReceiveMessage by submit {}; queues: {}",
        missing.len(),
        missing.iter().take(5).collect::<Vec<_>>(),
        pipeline.stats.events.load(Ordering::Relaxed),
        pipeline.stats.unreadable_events.load(Ordering::Relaxed),
        sent(0),
        by_function.get(1).map_or(0, |(_, r)| r.sqs_receive),
        pipeline.queue_depths().await,
    )
}

/// What one run cost: port requests and handler time.
#[derive(Debug, Clone)]
struct Usage {
    requests: RequestSnapshot,
    by_function: [(&'static str, RequestSnapshot); 4],
    /// (function, invocations, busy time), as `RunnerStats::busy` lists them.
    busy: Vec<(&'static str, u64, Duration)>,
}

impl Usage {
    fn of(pipeline: &LocalPipeline) -> Self {
        Self {
            requests: pipeline.request_counts(),
            by_function: pipeline.request_counts_by_function(),
            busy: pipeline.stats.busy.rows().to_vec(),
        }
    }
}

/// One run of the pipeline over the images.
#[derive(Debug)]
struct Run {
    workers: usize,
    images: usize,
    /// First upload to the last terminal record.
    wall: Duration,
    uploads: Duration,
    labels: usize,
    failed: usize,
    worker_runs: Vec<WorkerRun>,
    usage: Usage,
    /// Bytes of the functions' JSON log lines, first upload to last record.
    logged: u64,
    /// Requests the pipeline made while idle after the run, and for how long.
    idle: (RequestSnapshot, Duration),
    load: (String, String),
}

impl Run {
    fn images_per_second(&self) -> f64 {
        self.images as f64 / self.wall.as_secs_f64().max(1e-9)
    }

    fn prepared(&self) -> usize {
        self.worker_runs.iter().map(|r| r.prepared).sum()
    }

    /// Summed wall time of every worker invocation, idle ones too (they are billed).
    fn worker_seconds(&self) -> f64 {
        self.worker_runs
            .iter()
            .map(|r| r.ended.saturating_duration_since(r.started).as_secs_f64())
            .sum()
    }

    /// Images prepared per worker-second.
    fn per_worker(&self) -> f64 {
        self.prepared() as f64 / self.worker_seconds().max(1e-9)
    }

    /// How long at least one worker was running: the union of their runs, so that a
    /// wait between two scheduled runs is not counted as submit time.
    fn submit_busy(&self) -> Duration {
        let mut runs: Vec<(Instant, Instant)> = self
            .worker_runs
            .iter()
            .map(|r| (r.started, r.ended))
            .collect();
        runs.sort();
        let mut total = Duration::ZERO;
        let mut current: Option<(Instant, Instant)> = None;
        for (start, end) in runs {
            current = match current {
                Some((s, e)) if start <= e => Some((s, e.max(end))),
                Some((s, e)) => {
                    total += e.saturating_duration_since(s);
                    Some((start, end))
                }
                None => Some((start, end)),
            };
        }
        if let Some((s, e)) = current {
            total += e.saturating_duration_since(s);
        }
        total
    }

    /// Images prepared per second of [`Self::submit_busy`]: the submit stage's own rate.
    fn submit_rate(&self) -> f64 {
        self.prepared() as f64 / self.submit_busy().as_secs_f64().max(1e-9)
    }

    /// The most worker invocations that took work and ran at the same moment.
    fn most_at_once(&self) -> usize {
        let busy: Vec<&WorkerRun> = self.worker_runs.iter().filter(|r| r.received > 0).collect();
        busy.iter()
            .map(|run| {
                busy.iter()
                    .filter(|o| o.started <= run.started && run.started < o.ended)
                    .count()
            })
            .max()
            .unwrap_or(0)
    }
}

fn delays(ms: &[u64]) -> (u64, u64, u64) {
    match ms {
        [a, b, c] => (*a, *b, *c),
        _ => (100, 500, 100),
    }
}

async fn submit_run(
    args: &ScaleSubmitArgs,
    images: &Arc<Vec<(String, &'static str, Vec<u8>)>>,
    workers: usize,
    round: usize,
    log_bytes: &AtomicU64,
) -> anyhow::Result<Run> {
    let mut options = PipelineOptions::new(Task::default_task()?);
    options.stack_name = format!("bench-scale-submit-{workers}w-{round}");
    options.limits = BatchLimits {
        max_requests: args.batch_requests,
        ..BatchLimits::default()
    };
    options.submit_workers = workers;
    options.submit_every = Duration::from_millis(args.submit_every_ms);
    options.emulator_delays_ms = delays(&args.delays_ms);
    options.harvest_concurrency = 2;
    let pipeline = LocalPipeline::start(options).await?;

    let load_before = load();
    let t0 = Instant::now();
    let logged_before = log_bytes.load(Ordering::Relaxed);
    let keys = put_images(&pipeline, "scale", images).await?;
    let uploads = t0.elapsed();
    let done = match wait_terminal(&pipeline, &keys, Duration::from_secs(args.timeout)).await {
        Ok(done) => done,
        Err(e) => return Err(e.context(unfinished(&pipeline, &keys).await)),
    };
    let usage = Usage::of(&pipeline);
    let logged = log_bytes
        .load(Ordering::Relaxed)
        .saturating_sub(logged_before);
    let worker_runs = pipeline.stats.worker_runs();
    let load_after = load();

    let idle_for = Duration::from_secs(args.idle_seconds);
    tokio::time::sleep(idle_for).await;
    let after = pipeline.request_counts();
    let idle = after.since(&usage.requests);

    let store = pipeline.store();
    let bucket = &pipeline.resources.bucket;
    let labels = store.list(bucket, "labels/scale/").await?.len();
    let failed = store.list(bucket, "failed/scale/").await?.len();
    Ok(Run {
        workers,
        images: keys.len(),
        wall: done.saturating_duration_since(t0),
        uploads,
        labels,
        failed,
        worker_runs,
        usage,
        logged,
        idle: (idle, idle_for),
        load: (load_before, load_after),
    })
}

/// Bytes the functions would log: their INFO events as JSON lines, the format and level
/// the deployed functions log at (CloudWatch Logs bills ingestion by the byte). Warnings
/// still go to stderr.
fn count_log_bytes() -> Arc<AtomicU64> {
    use tracing_subscriber::Layer;
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;

    let bytes = Arc::new(AtomicU64::new(0));
    let sink = bytes.clone();
    // The local stand-ins (runners, emulator, this bench) log nothing on AWS.
    let functions = tracing_subscriber::filter::filter_fn(|meta| {
        *meta.level() <= tracing::Level::INFO
            && !["batch_emulator", "shotlabel_localstack", "shotlabel_bench"]
                .iter()
                .any(|local| meta.target().starts_with(local))
    });
    let counted = tracing_subscriber::fmt::layer()
        .json()
        .with_writer(move || ByteCount(sink.clone()))
        .with_filter(functions);
    let warnings = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_filter(tracing_subscriber::filter::LevelFilter::WARN);
    tracing_subscriber::registry()
        .with(counted)
        .with(warnings)
        .init();
    bytes
}

/// A writer that only counts what it is given.
struct ByteCount(Arc<AtomicU64>);

impl std::io::Write for ByteCount {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.fetch_add(buf.len() as u64, Ordering::Relaxed);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The median of some figures (the upper one of an even count).
fn median(values: impl IntoIterator<Item = f64>) -> f64 {
    let mut sorted: Vec<f64> = values.into_iter().collect();
    sorted.sort_by(f64::total_cmp);
    sorted.get(sorted.len() / 2).copied().unwrap_or(f64::NAN)
}

pub async fn scale_submit(args: &ScaleSubmitArgs) -> anyhow::Result<()> {
    let log_bytes = count_log_bytes();
    anyhow::ensure!(
        !args.workers.is_empty() && args.workers.iter().all(|&w| w > 0),
        "--workers takes one or more counts above 0"
    );
    header(&format!(
        "submit scale-out: {} generated images, {:?} workers, {} round(s)",
        args.images, args.workers, args.repeats
    ));
    let (v, r, f) = delays(&args.delays_ms);
    println!(
        "images: {WIDTH}×{HEIGHT}, PNG and JPEG alternately; {} requests per batch; submit every {} ms; emulator delays {v}/{r}/{f} ms",
        args.batch_requests, args.submit_every_ms
    );
    let images = Arc::new(generated_images(args.images)?);
    let bytes: usize = images.iter().map(|(_, _, b)| b.len()).sum();
    println!("{} images, {:.1} MB", images.len(), bytes as f64 / 1e6);

    let mut runs: Vec<Run> = Vec::new();
    let mut failures: Vec<String> = Vec::new();
    println!();
    println!(
        "| round | workers | wall s (upload → last record) | images/s | uploads s | submit busy s | submit images/s | worker runs (took work) | most at once | prepared | worker-s | images/worker-s | labels | failed | load before → after |"
    );
    println!(
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |"
    );
    for round in 0..args.repeats.max(1) {
        for &workers in &args.workers {
            let run = match submit_run(args, &images, workers, round, &log_bytes).await {
                Ok(run) => run,
                // Reported, and the rounds go on: one run's failure is a finding, and the
                // other runs' figures are still good.
                Err(e) => {
                    println!("| {round} | {workers} | did not finish: {e:#} |");
                    failures.push(format!("round {round}, {workers} worker(s): {e:#}"));
                    continue;
                }
            };
            println!(
                "| {round} | {workers} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} | {} ({}) | {} | {} | {:.1} | {:.1} | {} | {} | {} → {} |",
                run.wall.as_secs_f64(),
                run.images_per_second(),
                run.uploads.as_secs_f64(),
                run.submit_busy().as_secs_f64(),
                run.submit_rate(),
                run.worker_runs.len(),
                run.worker_runs.iter().filter(|r| r.received > 0).count(),
                run.most_at_once(),
                run.prepared(),
                run.worker_seconds(),
                run.per_worker(),
                run.labels,
                run.failed,
                run.load.0,
                run.load.1,
            );
            if run.labels + run.failed != run.images {
                failures.push(format!(
                    "round {round}, {workers} worker(s): {} labels and {} failed records for {} images",
                    run.labels, run.failed, run.images
                ));
            }
            runs.push(run);
        }
    }

    report_medians(&args.workers, &runs);
    report_usage(&args.workers, &runs);
    anyhow::ensure!(
        failures.is_empty(),
        "{} run(s) failed: {}",
        failures.len(),
        failures.join("; ")
    );
    Ok(())
}

/// Medians per worker count, and each count against the first.
fn report_medians(workers: &[usize], runs: &[Run]) {
    let of = |w: usize| runs.iter().filter(move |r| r.workers == w);
    let Some(&base) = workers.first() else {
        return;
    };
    let base_rate = median(of(base).map(Run::images_per_second));
    let base_per_worker = median(of(base).map(Run::per_worker));
    let base_submit = median(of(base).map(Run::submit_rate));
    println!();
    println!(
        "| workers | runs | images/s (median) | × {base} worker(s) | submit images/s (median) | × {base} worker(s) | images/worker-s (median) | × {base} worker(s) |"
    );
    println!("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |");
    for &w in workers {
        let rate = median(of(w).map(Run::images_per_second));
        let per_worker = median(of(w).map(Run::per_worker));
        let submit = median(of(w).map(Run::submit_rate));
        println!(
            "| {w} | {} | {rate:.1} | {:.2} | {submit:.1} | {:.2} | {per_worker:.1} | {:.2} |",
            of(w).count(),
            rate / base_rate,
            submit / base_submit,
            per_worker / base_per_worker,
        );
    }
}

/// Requests per image by kind and busy seconds per function, medians per worker count.
fn report_usage(workers: &[usize], runs: &[Run]) {
    let of = |w: usize| runs.iter().filter(move |r| r.workers == w);
    println!();
    print!("| requests per image (median) |");
    for w in workers {
        print!(" {w} worker(s) |");
    }
    print!(" idle, per minute |");
    println!();
    println!("| --- |{}", " ---: |".repeat(workers.len() + 1));
    let kinds = RequestSnapshot::default().rows().len();
    for k in 0..kinds {
        let name = RequestSnapshot::default().rows()[k].0;
        print!("| {name} |");
        for &w in workers {
            let per_image =
                median(of(w).map(|r| r.usage.requests.rows()[k].1 as f64 / r.images as f64));
            print!(" {per_image:.4} |");
        }
        let idle = median(
            runs.iter()
                .map(|r| r.idle.0.rows()[k].1 as f64 * 60.0 / r.idle.1.as_secs_f64().max(1e-9)),
        );
        println!(" {idle:.1} |");
    }

    println!();
    print!("| requests per image by function (median of all runs) |");
    let functions = runs.first().map_or(&[][..], |r| &r.usage.by_function[..]);
    for (function, _) in functions {
        print!(" {function} |");
    }
    println!();
    println!("| --- |{}", " ---: |".repeat(functions.len()));
    for k in 0..kinds {
        let name = RequestSnapshot::default().rows()[k].0;
        let cells: Vec<f64> = (0..functions.len())
            .map(|f| {
                median(
                    runs.iter()
                        .map(|r| r.usage.by_function[f].1.rows()[k].1 as f64 / r.images as f64),
                )
            })
            .collect();
        if cells.iter().all(|&c| c == 0.0) {
            continue;
        }
        print!("| {name} |");
        for cell in cells {
            print!(" {cell:.4} |");
        }
        println!();
    }

    println!();
    print!("| function: busy s per 1,000 images (invocations) |");
    for w in workers {
        print!(" {w} worker(s) |");
    }
    println!();
    println!("| --- |{}", " ---: |".repeat(workers.len()));
    let functions = runs.first().map_or(0, |r| r.usage.busy.len());
    for f in 0..functions {
        let name = runs.first().map_or("", |r| r.usage.busy[f].0);
        print!("| {name} |");
        for &w in workers {
            let busy =
                median(of(w).map(|r| r.usage.busy[f].2.as_secs_f64() * 1000.0 / r.images as f64));
            let invocations = median(of(w).map(|r| r.usage.busy[f].1 as f64));
            print!(" {busy:.2} ({invocations:.0}) |");
        }
        println!();
    }
    print!("| log bytes per image (JSON, INFO) |");
    for &w in workers {
        let bytes = median(of(w).map(|r| r.logged as f64 / r.images as f64));
        print!(" {bytes:.0} |");
    }
    println!();
}
