//! The whole local pipeline, from upload to labels: N distinct screenshots go into
//! `incoming/`, and the clock stops when every one has a label or a failed record.
//!
//! Where the time goes comes from the pipeline's own log events, caught in-process with
//! millisecond timestamps: enqueue, the submitter's run start and request-file-ready
//! markers, the emulator's batch status changes, the webhook, and the harvest.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use shotlabel_core::ports::ObjectStore;
use shotlabel_core::records::Layout;
use shotlabel_core::task::Task;
use shotlabel_localstack::pipeline::{LocalPipeline, PipelineOptions};
use tracing_subscriber::Layer;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

use crate::common::{header, load};
use crate::stack::upload_variants;

#[derive(Debug, clap::Args)]
pub struct E2eArgs {
    #[arg(long, default_value_t = 1000)]
    images: usize,
    /// The emulator's validating, in-progress and finalizing delays, in ms.
    #[arg(
        long,
        default_value = "100,500,100",
        value_delimiter = ',',
        num_args = 3
    )]
    delays_ms: Vec<u64>,
    /// How often the scheduled submit runs, in ms.
    #[arg(long, default_value_t = 2000)]
    submit_every_ms: u64,
    /// Give up after this many seconds.
    #[arg(long, default_value_t = 900)]
    timeout: u64,
}

/// One log event the benchmark cares about.
#[derive(Debug, Clone)]
struct Mark {
    at: Duration,
    message: String,
    fields: BTreeMap<String, String>,
}

impl Mark {
    fn field(&self, name: &str) -> &str {
        self.fields.get(name).map_or("", String::as_str)
    }
}

const MARKS: [&str; 12] = [
    "enqueued",
    "submit run started",
    "request file ready",
    "batch submitted",
    "file uploaded",
    "batch created",
    "batch in progress",
    "batch completed",
    "webhook accepted; harvest queued",
    "harvest started",
    "batch harvested",
    "scheduled run finished",
];

#[derive(Clone)]
struct Capture {
    t0: Instant,
    marks: Arc<Mutex<Vec<Mark>>>,
}

#[derive(Default)]
struct Fields(BTreeMap<String, String>);

impl tracing::field::Visit for Fields {
    fn record_str(&mut self, field: &tracing::field::Field, value: &str) {
        self.0.insert(field.name().to_owned(), value.to_owned());
    }

    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn fmt::Debug) {
        self.0.insert(field.name().to_owned(), format!("{value:?}"));
    }
}

impl<S: tracing::Subscriber> Layer<S> for Capture {
    fn on_event(
        &self,
        event: &tracing::Event<'_>,
        _ctx: tracing_subscriber::layer::Context<'_, S>,
    ) {
        let mut fields = Fields::default();
        event.record(&mut fields);
        let Some(message) = fields.0.remove("message") else {
            return;
        };
        if !MARKS.contains(&message.as_str()) {
            return;
        }
        if let Ok(mut marks) = self.marks.lock() {
            marks.push(Mark {
                at: self.t0.elapsed(),
                message,
                fields: fields.0,
            });
        }
    }
}

fn interesting(meta: &tracing::Metadata<'_>) -> bool {
    let target = meta.target();
    *meta.level() <= tracing::Level::DEBUG
        && [
            "shotlabel_core",
            "batch_emulator",
            "enqueue",
            "submit",
            "webhook",
        ]
        .iter()
        .any(|t| target.starts_with(t))
}

fn secs(d: Duration) -> String {
    format!("{:.2}", d.as_secs_f64())
}

pub async fn e2e(args: &E2eArgs) -> anyhow::Result<()> {
    let t0 = Instant::now();
    let capture = Capture {
        t0,
        marks: Arc::new(Mutex::new(Vec::new())),
    };
    tracing_subscriber::registry()
        .with(
            capture
                .clone()
                .with_filter(tracing_subscriber::filter::filter_fn(interesting)),
        )
        .with(
            tracing_subscriber::fmt::layer()
                .with_writer(std::io::stderr)
                .with_filter(tracing_subscriber::filter::LevelFilter::WARN),
        )
        .init();

    header(&format!(
        "end to end: {} screenshots on the local stack",
        args.images
    ));
    let delays = match args.delays_ms.as_slice() {
        [a, b, c] => (*a, *b, *c),
        _ => (100, 500, 100),
    };
    println!(
        "emulator delays (validating, in progress, finalizing): {} ms, {} ms, {} ms; submit every {} ms",
        delays.0, delays.1, delays.2, args.submit_every_ms
    );
    let task = Task::default_task()?;
    let mut options = PipelineOptions::new(task);
    options.stack_name = "bench-e2e".into();
    options.emulator_delays_ms = delays;
    options.submit_every = Duration::from_millis(args.submit_every_ms);
    let pipeline = LocalPipeline::start(options).await?;
    let layout = Layout::new("incoming/");
    let ready = t0.elapsed();
    println!("stack up in {} s (not counted)", secs(ready));

    let start = t0.elapsed();
    let load_before = load();
    let objects = upload_variants(
        &pipeline.store(),
        &pipeline.resources.bucket,
        "incoming/e2e/",
        args.images,
        16,
    )
    .await?;
    let uploaded = t0.elapsed();
    let keys: Vec<String> = objects.into_iter().map(|o| o.key).collect();
    let deadline = Instant::now() + Duration::from_secs(args.timeout);
    let done = loop {
        let terminal = pipeline.terminal_count(&layout, &keys).await?;
        if terminal >= keys.len() {
            break t0.elapsed();
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "only {terminal} of {} images finished within {} s",
            keys.len(),
            args.timeout
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    let load_after = load();
    let store = pipeline.store();
    let bucket = &pipeline.resources.bucket;
    let labels = store.list(bucket, "labels/e2e/").await?.len();
    let failed = store.list(bucket, "failed/e2e/").await?.len();
    let marks = capture.marks.lock().map(|m| m.clone()).unwrap_or_default();
    drop(pipeline);

    // Milestones.
    let rel = |d: Duration| d.saturating_sub(start);
    let mut queued = 0usize;
    let mut all_enqueued = None;
    for mark in marks.iter().filter(|m| m.message == "enqueued") {
        queued += mark.field("queued").parse::<usize>().unwrap_or(0);
        if queued >= args.images && all_enqueued.is_none() {
            all_enqueued = Some(mark.at);
        }
    }
    let first = |message: &str, pred: &dyn Fn(&Mark) -> bool| {
        marks
            .iter()
            .find(|m| m.message == message && pred(m))
            .map(|m| m.at)
    };
    println!();
    println!(
        "wall time, upload start to the last label: {} s",
        secs(done - start)
    );
    println!(
        "labels {}, failed records {}; load {load_before} → {load_after}",
        labels, failed
    );
    println!();
    println!("| milestone | seconds after the first upload |");
    println!("| --- | ---: |");
    println!(
        "| all {} uploads done | {} |",
        args.images,
        secs(rel(uploaded))
    );
    if let Some(at) = all_enqueued {
        println!("| all enqueued (pending queue) | {} |", secs(rel(at)));
    }
    if let Some(at) = first("batch submitted", &|_| true) {
        println!("| first batch submitted | {} |", secs(rel(at)));
    }
    if let Some(at) = marks
        .iter()
        .filter(|m| m.message == "batch submitted")
        .map(|m| m.at)
        .max()
    {
        println!("| last batch submitted | {} |", secs(rel(at)));
    }
    println!("| every image labelled | {} |", secs(rel(done)));

    // Per batch: run start → file ready → submitted → completed → webhook → harvest.
    println!();
    println!(
        "| batch | images | prepare (run start → file ready) | submit (manifest, upload, create) | provider (submitted → completed) | webhook | harvest queue | harvest (labels) | done at |"
    );
    println!("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |");
    let mut totals = [Duration::ZERO; 6];
    for submitted in marks.iter().filter(|m| m.message == "batch submitted") {
        let batch = submitted.field("batch_id").to_owned();
        let manifest = submitted.field("manifest").to_owned();
        let submission = manifest
            .rsplit_once('-')
            .map(|(s, _)| s.to_owned())
            .unwrap_or_default();
        let ready = first("request file ready", &|m| m.field("manifest") == manifest);
        // A run's first file starts at the run's start; a later file where the one
        // before it was handed over.
        let run_start = first("submit run started", &|m| {
            m.field("submission") == submission
        });
        let previous_ready = marks
            .iter()
            .filter(|m| {
                m.message == "request file ready"
                    && m.field("manifest").starts_with(&format!("{submission}-"))
                    && ready.is_some_and(|r| m.at < r)
            })
            .map(|m| m.at)
            .max();
        let prepare_from = previous_ready.or(run_start);
        let completed = first("batch completed", &|m| m.field("batch_id") == batch);
        let accepted = first("webhook accepted; harvest queued", &|m| {
            m.field("batch_id") == batch
        });
        let harvest_start = first("harvest started", &|m| {
            m.field("batch_id") == batch && accepted.is_none_or(|a| m.at >= a)
        });
        let harvested = first("batch harvested", &|m| m.field("batch_id") == batch);
        let span = |a: Option<Duration>, b: Option<Duration>| match (a, b) {
            (Some(a), Some(b)) => Some(b.saturating_sub(a)),
            _ => None,
        };
        let stages = [
            span(prepare_from, ready),
            span(ready, Some(submitted.at)),
            span(Some(submitted.at), completed),
            span(completed, accepted),
            span(accepted, harvest_start),
            span(harvest_start, harvested),
        ];
        for (total, stage) in totals.iter_mut().zip(stages) {
            *total += stage.unwrap_or_default();
        }
        let show = |d: Option<Duration>| d.map_or_else(|| "?".to_owned(), secs);
        println!(
            "| {batch} | {} | {} | {} | {} | {} | {} | {} | {} |",
            submitted.field("requests"),
            show(stages[0]),
            show(stages[1]),
            show(stages[2]),
            show(stages[3]),
            show(stages[4]),
            show(stages[5]),
            show(harvested.map(rel)),
        );
    }
    println!(
        "| all batches (busy time, summed; stages of different batches overlap) | {} | {} | {} | {} | {} | {} | {} | |",
        args.images,
        secs(totals[0]),
        secs(totals[1]),
        secs(totals[2]),
        secs(totals[3]),
        secs(totals[4]),
        secs(totals[5]),
    );
    anyhow::ensure!(
        labels + failed == args.images,
        "{labels} labels and {failed} failed records for {} images",
        args.images
    );
    Ok(())
}
