//! The submitter's memory: one run over N queued images, in a child process of its own
//! so that its peak RSS (VmHWM) is the submitter's and nothing else's.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use secrecy::SecretString;
use serde::{Deserialize, Serialize};
use shotlabel_aws::{S3Store, SqsQueue};
use shotlabel_batch_client::{BatchApiConfig, BatchClient};
use shotlabel_core::enqueue::{EnqueueConfig, enqueue_objects};
use shotlabel_core::prepare::DecodeLimits;
use shotlabel_core::records::{Layout, TaskRef};
use shotlabel_core::request::BatchLimits;
use shotlabel_core::submit::{SubmitConfig, run_submit};
use shotlabel_core::task::Task;
use shotlabel_localstack::{local_sdk_config, s3_client, sqs_client};

use crate::common::{header, load, mib, peak_rss_kib, rss_kib};
use crate::stack::{EMULATOR_KEY, INPUT, Stack, emulator, upload_variants};

#[derive(Debug, clap::Args)]
pub struct SubmitArgs {
    /// How many distinct images to queue for the one run.
    #[arg(long, default_value_t = 500)]
    images: usize,
    /// Images prepared at once (the submitter's default is the number of cores).
    #[arg(long, default_value_t = 2)]
    concurrency: usize,
}

/// What the child reports on its last stdout line.
#[derive(Debug, Serialize, Deserialize)]
pub struct SubmitChildReport {
    pub seconds: f64,
    pub received: usize,
    pub prepared: usize,
    pub failed: usize,
    pub batches: usize,
    pub request_bytes: u64,
    pub errors: Vec<String>,
    pub rss_start_kib: u64,
    pub peak_rss_kib: u64,
    /// The largest RSS sampled in each tenth of the run.
    pub rss_by_tenth_kib: Vec<u64>,
}

#[derive(Debug, clap::Args)]
pub struct SubmitChildArgs {
    #[arg(long)]
    endpoint: String,
    #[arg(long)]
    bucket: String,
    #[arg(long)]
    pending_queue_url: String,
    #[arg(long)]
    provider_url: String,
    #[arg(long)]
    concurrency: usize,
    #[arg(long)]
    work_dir: PathBuf,
}

pub async fn submit_memory(args: &SubmitArgs) -> anyhow::Result<()> {
    header(&format!(
        "submitter memory: one run over {} images",
        args.images
    ));
    let stack = Stack::start("bench-submit").await?;
    let emulator = emulator((50, 200, 50)).await?;
    let bucket = stack.resources.bucket.clone();
    let objects = upload_variants(
        &stack.store,
        &bucket,
        &format!("{INPUT}submit/"),
        args.images,
        16,
    )
    .await?;
    let task = Task::default_task()?;
    let started = Instant::now();
    let enqueued = enqueue_objects(
        &stack.store,
        &stack.queue,
        &EnqueueConfig {
            layout: Layout::new(INPUT),
            pending_queue_url: stack.resources.pending_queue_url.clone(),
            max_object_bytes: DecodeLimits::default().max_bytes,
            force_relabel: false,
            task: TaskRef {
                name: task.name().to_owned(),
                version: task.version().to_owned(),
            },
        },
        objects,
    )
    .await?;
    println!(
        "enqueued {} in {:.1} s",
        enqueued.queued,
        started.elapsed().as_secs_f64()
    );
    anyhow::ensure!(enqueued.queued == args.images, "{enqueued:?}");

    let work_dir = tempfile::tempdir()?;
    let load_before = load();
    let mut command = tokio::process::Command::new(std::env::current_exe()?);
    command
        .arg("submit-child")
        .args(["--endpoint", stack.moto.endpoint()])
        .args(["--bucket", &bucket])
        .args(["--pending-queue-url", &stack.resources.pending_queue_url])
        .args(["--provider-url", &emulator.base_url()])
        .args(["--concurrency", &args.concurrency.to_string()])
        .arg("--work-dir")
        .arg(work_dir.path());
    let report: SubmitChildReport = crate::common::run_child(command, "submitter").await?;
    anyhow::ensure!(
        report.prepared == args.images && report.errors.is_empty(),
        "the run did not prepare every image: {report:?}"
    );
    println!();
    println!(
        "| images | batches | request bytes | seconds | images/s | RSS at start | peak RSS (VmHWM) | load before → after |"
    );
    println!("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |");
    println!(
        "| {} | {} | {:.0} MB | {:.1} | {:.1} | {:.1} MiB | {:.1} MiB | {load_before} → {} |",
        report.prepared,
        report.batches,
        report.request_bytes as f64 / 1e6,
        report.seconds,
        report.prepared as f64 / report.seconds,
        mib(report.rss_start_kib),
        mib(report.peak_rss_kib),
        load()
    );
    println!(
        "RSS peak per tenth of the run (MiB): {}",
        report
            .rss_by_tenth_kib
            .iter()
            .map(|k| format!("{:.0}", mib(*k)))
            .collect::<Vec<_>>()
            .join(" ")
    );
    Ok(())
}

pub async fn submit_child(args: &SubmitChildArgs) -> anyhow::Result<()> {
    let sdk = local_sdk_config(&args.endpoint).await;
    let store = S3Store::new(s3_client(&sdk));
    let queue = SqsQueue::new(sqs_client(&sdk));
    let provider = BatchClient::new(BatchApiConfig::new(
        &args.provider_url,
        SecretString::from(EMULATOR_KEY),
    )?)?;
    let config = SubmitConfig {
        bucket: args.bucket.clone(),
        layout: Layout::new(INPUT),
        pending_queue_url: args.pending_queue_url.clone(),
        task: Arc::new(Task::default_task()?),
        limits: BatchLimits::default(),
        max_request_bytes: None,
        decode_limits: DecodeLimits::default(),
        time_budget: Duration::from_secs(3600),
        visibility_timeout: Duration::from_secs(3700),
        receive_wait: Duration::ZERO,
        max_images: 0,
        concurrency: args.concurrency,
        work_dir: args.work_dir.clone(),
        completion_window: "24h".into(),
        per_batch_webhook: None,
        provider_limits: Default::default(),
        slot_lease: std::time::Duration::from_secs(900),
        max_requeues: 10,
        pending_max_receives: 5,
    };
    let rss_start_kib = rss_kib();
    // Sample RSS every 50 ms, to show whether it climbs as the run goes on.
    let samples = Arc::new(std::sync::Mutex::new(Vec::<(f64, u64)>::new()));
    let running = Arc::new(AtomicU64::new(1));
    let started = Instant::now();
    let sampler = {
        let (samples, running) = (samples.clone(), running.clone());
        std::thread::spawn(move || {
            while running.load(Ordering::Relaxed) == 1 {
                if let Ok(mut s) = samples.lock() {
                    s.push((started.elapsed().as_secs_f64(), rss_kib()));
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        })
    };
    let report = run_submit(&store, &queue, &provider, &config).await?;
    let seconds = started.elapsed().as_secs_f64();
    running.store(0, Ordering::Relaxed);
    let _ = sampler.join();
    let mut tenths = vec![0u64; 10];
    if let Ok(samples) = samples.lock() {
        for (at, rss) in samples.iter() {
            let tenth = ((at / seconds * 10.0) as usize).min(9);
            tenths[tenth] = tenths[tenth].max(*rss);
        }
    }
    let out = SubmitChildReport {
        seconds,
        received: report.received,
        prepared: report.prepared,
        failed: report.failed,
        batches: report.batches.len(),
        request_bytes: report.batches.iter().map(|b| b.bytes).sum(),
        errors: report.errors,
        rss_start_kib,
        peak_rss_kib: peak_rss_kib(),
        rss_by_tenth_kib: tenths,
    };
    println!("{}", serde_json::to_string(&out)?);
    Ok(())
}
