//! `shotlabel local`: the whole pipeline on one machine.
//!
//! moto stands in for S3 and SQS, the bundled batch emulator (or a real provider from
//! the environment) for the Batch API, and `shotlabel_localstack::pipeline` wires the
//! three functions' real handlers the way AWS does. This uploads a folder of images,
//! waits until every one has a terminal record, and summarises what came back.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::Context;
use aws_sdk_s3::primitives::ByteStream;
use indicatif::{ProgressBar, ProgressStyle};
use secrecy::SecretString;
use serde_json::Value;
use shotlabel_core::metered::RequestSnapshot;
use shotlabel_core::ports::ObjectStore;
use shotlabel_core::provider::ProviderProfile;
use shotlabel_core::records::{BatchRecord, FailedRecord, LabelRecord, Layout};
use shotlabel_localstack::pipeline::{LocalPipeline, PipelineOptions, ProviderChoice};
use shotlabel_localstack::s3_client;

use crate::task_cmd::load_task;

const INPUT_PREFIX: &str = "incoming/";

pub struct LocalArgs<'a> {
    pub images: &'a Path,
    pub task: Option<&'a Path>,
    pub keep_running: bool,
    pub timeout: Duration,
    pub report: Option<&'a Path>,
}

pub fn run(args: LocalArgs<'_>) -> anyhow::Result<ExitCode> {
    let runtime = tokio::runtime::Runtime::new().context("cannot start the async runtime")?;
    runtime.block_on(async {
        // A stop signal drops the run, and with it the local stack: moto server is a child
        // started with kill-on-drop, the emulator and functions are tasks of this runtime.
        // Without this, SIGTERM (`kill`, systemd, a container runtime) or SIGHUP (a closed
        // terminal) ended the process and left moto running, orphaned.
        tokio::select! {
            result = run_local(args) => result,
            signal = stop_signal() => {
                let (name, number) = signal?;
                eprintln!("shotlabel: {name}: stopping the local stack");
                Ok(ExitCode::from(128 + number))
            }
        }
    })
}

/// The first of SIGINT, SIGTERM and SIGHUP: its name and number.
#[cfg(unix)]
async fn stop_signal() -> anyhow::Result<(&'static str, u8)> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut terminate = signal(SignalKind::terminate())?;
    let mut hangup = signal(SignalKind::hangup())?;
    let mut interrupt = signal(SignalKind::interrupt())?;
    Ok(tokio::select! {
        _ = interrupt.recv() => ("SIGINT", 2),
        _ = terminate.recv() => ("SIGTERM", 15),
        _ = hangup.recv() => ("SIGHUP", 1),
    })
}

#[cfg(not(unix))]
async fn stop_signal() -> anyhow::Result<(&'static str, u8)> {
    tokio::signal::ctrl_c().await?;
    Ok(("Ctrl-C", 2))
}

/// A real provider when both variables are set (its profile from `SHOTLABEL_PROVIDER`);
/// otherwise the bundled emulator.
fn provider_from_env() -> anyhow::Result<ProviderChoice> {
    let url = std::env::var("SHOTLABEL_PROVIDER_URL")
        .ok()
        .filter(|u| !u.is_empty());
    let key = std::env::var("SHOTLABEL_API_KEY")
        .ok()
        .filter(|k| !k.is_empty());
    let profile =
        ProviderProfile::from_setting(std::env::var("SHOTLABEL_PROVIDER").ok().as_deref())?;
    Ok(match (url, key) {
        (Some(base_url), Some(key)) => ProviderChoice::Remote {
            base_url,
            api_key: SecretString::from(key),
            profile,
        },
        _ => ProviderChoice::Emulator {
            faults: Default::default(),
            seed: 0,
        },
    })
}

/// The images in `dir` that a provider accepts, by extension, sorted by name.
fn list_images(dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let entries = std::fs::read_dir(dir)
        .with_context(|| format!("cannot read the image folder {}", dir.display()))?;
    let mut images: Vec<PathBuf> = entries
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.is_file() && is_image(p))
        .collect();
    images.sort();
    anyhow::ensure!(
        !images.is_empty(),
        "no images (.png, .jpg, .jpeg, .webp, .gif) in {}",
        dir.display()
    );
    Ok(images)
}

fn is_image(path: &Path) -> bool {
    path.extension()
        .and_then(|e| e.to_str())
        .map(|e| e.to_ascii_lowercase())
        .is_some_and(|e| matches!(e.as_str(), "png" | "jpg" | "jpeg" | "webp" | "gif"))
}

fn bar(len: u64, message: &'static str) -> ProgressBar {
    let bar = ProgressBar::new(len);
    bar.set_style(
        ProgressStyle::with_template("  {msg:<10} [{bar:30}] {pos}/{len} {elapsed}")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    bar.set_message(message);
    bar
}

async fn run_local(args: LocalArgs<'_>) -> anyhow::Result<ExitCode> {
    let started = Instant::now();
    let task = load_task(args.task)?;
    let images = list_images(args.images)?;
    let provider = provider_from_env()?;
    let emulated = matches!(provider, ProviderChoice::Emulator { .. });

    println!(
        "shotlabel local: task {} (version {})",
        task.name(),
        task.version()
    );
    let mut options = PipelineOptions::new(task);
    options.input_prefix = INPUT_PREFIX.into();
    options.provider = provider;
    let pipeline = LocalPipeline::start(options)
        .await
        .context("cannot start the local stack")?;
    println!("  S3 endpoint:   {}", pipeline.endpoint());
    println!("  bucket:        {}", pipeline.resources.bucket);
    println!("  input prefix:  {INPUT_PREFIX}");
    println!("  webhook URL:   {}", pipeline.webhook_url);
    if emulated {
        println!(
            "  provider:      {} (the bundled batch emulator: its answers are synthetic, not a model's)",
            pipeline.provider_url
        );
    } else {
        println!(
            "  provider:      {} (it cannot reach this machine's webhook; each submit run reconciles)",
            pipeline.provider_url
        );
    }

    let s3 = s3_client(&pipeline.sdk);
    let uploading = bar(images.len() as u64, "uploaded");
    let mut keys = Vec::new();
    for image in &images {
        let name = image
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let key = format!("{INPUT_PREFIX}{name}");
        let body = ByteStream::from_path(image)
            .await
            .with_context(|| format!("cannot read {}", image.display()))?;
        s3.put_object()
            .bucket(&pipeline.resources.bucket)
            .key(&key)
            .body(body)
            .send()
            .await
            .with_context(|| format!("cannot upload {name} to the local bucket"))?;
        keys.push(key);
        uploading.inc(1);
    }
    uploading.finish();

    let layout = Layout::new(INPUT_PREFIX);
    let done = bar(keys.len() as u64, "finished");
    let deadline = Instant::now() + args.timeout;
    loop {
        let finished = pipeline.terminal_count(&layout, &keys).await?;
        done.set_position(finished as u64);
        if finished == keys.len() {
            break;
        }
        if Instant::now() > deadline {
            done.abandon();
            anyhow::bail!(
                "{} of {} images have no label or failed record after {} s",
                keys.len() - finished,
                keys.len(),
                args.timeout.as_secs()
            );
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    done.finish();
    // Taken now: the scheduled runs go on polling while the summary is read.
    let usage = Usage {
        requests: pipeline.request_counts(),
        busy: pipeline.stats.busy.rows(),
    };

    let summary = Summary::gather(&pipeline, &layout, &keys).await?;
    summary.print(started.elapsed());
    usage.print(keys.len());
    if let Some(path) = args.report {
        crate::report::write_report(
            &pipeline.store(),
            &pipeline.resources.bucket,
            INPUT_PREFIX,
            path,
        )
        .await
        .with_context(|| format!("cannot write the report to {}", path.display()))?;
        println!("  report:          {}", path.display());
    }
    if emulated {
        println!();
        println!("These labels came from the batch emulator: synthetic values derived from the");
        println!("image bytes, not a model's judgement. Set SHOTLABEL_PROVIDER_URL and");
        println!("SHOTLABEL_API_KEY to label the same images with a real provider.");
    }

    if args.keep_running {
        println!();
        println!("Staying up until Ctrl-C. Drop more images in and watch them come back:");
        println!(
            "  export AWS_ENDPOINT_URL={} AWS_ACCESS_KEY_ID=local AWS_SECRET_ACCESS_KEY=local AWS_DEFAULT_REGION=us-east-1",
            pipeline.endpoint()
        );
        print!(
            "{}",
            crate::stack::StackConfig::from_local(&pipeline.resources, INPUT_PREFIX).env_lines()
        );
        println!(
            "  aws s3 cp my-screenshot.png s3://{}/{INPUT_PREFIX}",
            pipeline.resources.bucket
        );
        println!("  shotlabel status");
        // Until a stop signal ends the run (see `run`).
        std::future::pending::<()>().await;
    }
    Ok(if summary.labelled == keys.len() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// What the run produced, read back from the bucket.
#[derive(Default)]
struct Summary {
    images: usize,
    labelled: usize,
    failed: Vec<FailedRecord>,
    batches: usize,
    retried: u64,
    duplicates: u64,
    tokens: u64,
    models: BTreeMap<String, usize>,
    distribution: BTreeMap<String, BTreeMap<String, usize>>,
}

impl Summary {
    async fn gather(
        pipeline: &LocalPipeline,
        layout: &Layout,
        keys: &[String],
    ) -> anyhow::Result<Self> {
        let store = pipeline.store();
        let bucket = &pipeline.resources.bucket;
        let mut summary = Summary {
            images: keys.len(),
            ..Summary::default()
        };
        for key in keys {
            let relative = layout.relative_or_key(key);
            if let Ok(object) = store.get(bucket, &layout.label_key(relative)).await {
                let label: LabelRecord = serde_json::from_slice(&object.body)?;
                summary.add_label(&label);
            } else if let Ok(object) = store.get(bucket, &layout.failed_key(relative)).await {
                summary.failed.push(serde_json::from_slice(&object.body)?);
            }
        }
        for key in store.list(bucket, "state/batches/").await? {
            let record: BatchRecord = serde_json::from_slice(&store.get(bucket, &key).await?.body)?;
            summary.batches += 1;
            if let Some(counts) = record.harvest {
                summary.retried += counts.retried;
                summary.duplicates += counts.duplicates;
                // The provider's word: saturate rather than overflow.
                summary.tokens = summary
                    .tokens
                    .saturating_add(counts.prompt_tokens)
                    .saturating_add(counts.completion_tokens);
            }
        }
        Ok(summary)
    }

    fn add_label(&mut self, label: &LabelRecord) {
        self.labelled += 1;
        *self.models.entry(label.model.clone()).or_default() += 1;
        let Some(fields) = label.label.as_object() else {
            return;
        };
        for (field, value) in fields {
            // Free text and lists make no useful histogram.
            if value.is_array() || value.is_object() || value.as_str().is_some_and(|s| s.len() > 24)
            {
                continue;
            }
            let shown = match value {
                Value::String(s) => s.clone(),
                other => other.to_string(),
            };
            *self
                .distribution
                .entry(field.clone())
                .or_default()
                .entry(shown)
                .or_default() += 1;
        }
    }

    fn print(&self, elapsed: Duration) {
        println!();
        println!("Summary");
        println!("  images:          {}", self.images);
        println!("  batches:         {}", self.batches);
        println!("  labelled:        {}", self.labelled);
        println!("  retried:         {}", self.retried);
        println!("  failed:          {}", self.failed.len());
        if self.duplicates > 0 {
            println!(
                "  duplicates:      {} (answers for images already labelled)",
                self.duplicates
            );
        }
        println!("  tokens:          {}", self.tokens);
        for (model, n) in &self.models {
            println!("  model:           {model} ({n} labels)");
        }
        for (field, counts) in &self.distribution {
            let parts: Vec<String> = counts.iter().map(|(v, n)| format!("{v}: {n}")).collect();
            println!("  {field}: {}", parts.join(", "));
        }
        for record in &self.failed {
            let reason = record
                .reasons
                .last()
                .map(|r| format!("{} ({})", r.reason, r.stage))
                .unwrap_or_default();
            println!("  failed {}: {reason}", record.source.key);
        }
        println!("  elapsed:         {:.1} s", elapsed.as_secs_f64());
    }
}

/// What the run cost in requests and handler time (`docs/scale.md` prices them).
struct Usage {
    requests: RequestSnapshot,
    busy: [(&'static str, u64, Duration); 5],
}

impl Usage {
    fn print(&self, images: usize) {
        let per_image = |n: u64| n as f64 / images.max(1) as f64;
        let requests: Vec<String> = self
            .requests
            .rows()
            .iter()
            .filter(|(_, n)| *n > 0)
            .map(|(kind, n)| format!("{kind} {:.2}", per_image(*n)))
            .collect();
        println!("  requests/image:  {}", requests.join(", "));
        let busy: Vec<String> = self
            .busy
            .iter()
            .filter(|(_, runs, _)| *runs > 0)
            .map(|(function, runs, busy)| format!("{function} {:.1} s/{runs}", busy.as_secs_f64()))
            .collect();
        println!("  busy (s/runs):   {}", busy.join(", "));
    }
}
