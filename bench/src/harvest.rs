//! Harvest throughput: a synthetic batch output file of N lines, read as the harvester
//! reads it. First parse + validate alone (one thread, no I/O); then the whole harvest
//! against moto with its label writes, in a child process so its peak RSS is its own.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use serde::{Deserialize, Serialize};
use serde_json::json;
use shotlabel_aws::{S3Store, SqsQueue};
use shotlabel_core::answer::{LineOutcome, interpret_line};
use shotlabel_core::batch_api::{Batch, BatchApiError, CreateBatchRequest, FileObject, OutputLine};
use shotlabel_core::harvest::{HarvestConfig, HarvestOutcome, harvest};
use shotlabel_core::ports::{BatchProvider, LineReader, ObjectStore, WriteCondition};
use shotlabel_core::records::{
    HarvestCounts, HarvestRequest, Layout, Manifest, PendingItem, TaskRef, state_keys, unix_now,
};
use shotlabel_core::request::custom_id;
use shotlabel_core::submit::METADATA_MANIFEST;
use shotlabel_core::task::Task;
use shotlabel_localstack::{local_sdk_config, s3_client, sqs_client};

use crate::common::{header, load, median, mib, peak_rss_kib};
use crate::stack::{INPUT, Stack};

const SUBMISSION: &str = "sbench";
pub(crate) const BATCH_ID: &str = "batch_bench";
const OUTPUT_FILE: &str = "file-bench-output";

#[derive(Debug, clap::Args)]
pub struct HarvestArgs {
    /// Lines in the output file (one per image).
    #[arg(long, default_value_t = 50_000)]
    lines: usize,
    /// Timed passes of parse + validate (the median is reported).
    #[arg(long, default_value_t = 5)]
    runs: usize,
    /// Only parse + validate; no moto, no label writes.
    #[arg(long)]
    parse_only: bool,
}

/// What the child reports on its last stdout line.
#[derive(Debug, Serialize, Deserialize)]
pub struct HarvestChildReport {
    pub seconds: f64,
    pub counts: HarvestCounts,
    pub peak_rss_kib: u64,
}

#[derive(Debug, clap::Args)]
pub struct HarvestChildArgs {
    #[arg(long)]
    endpoint: String,
    #[arg(long)]
    bucket: String,
    #[arg(long)]
    pending_queue_url: String,
    #[arg(long)]
    manifest: String,
    #[arg(long)]
    output: PathBuf,
}

/// A small deterministic generator, so every run sees the same file.
struct Lcg(u64);

impl Lcg {
    fn next(&mut self) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        self.0 >> 33
    }
}

/// One output line as OpenAI writes it. Most answers are plain schema-valid JSON; one in
/// 200 each is a fenced block, an answer that breaks the schema, an answer cut off at
/// max_tokens, and a provider error, so every path of the interpreter is exercised.
fn output_line(i: usize, custom_id: &str, rng: &mut Lcg) -> String {
    let landing = rng.next().is_multiple_of(3);
    let aesthetic = 1 + rng.next() % 5;
    if i % 200 == 3 {
        return json!({
            "id": format!("batch_req_{i:08x}"),
            "custom_id": custom_id,
            "response": null,
            "error": {"code": "inference_failed", "message": "Maximum retries reached"},
        })
        .to_string();
    }
    let (content, finish) = match i % 200 {
        0 => (
            format!("```json\n{{\"landing_page\": {landing}, \"aesthetic\": {aesthetic}}}\n```"),
            "stop",
        ),
        1 => (
            format!("{{\"landing_page\": \"{landing}\", \"aesthetic\": 9}}"),
            "stop",
        ),
        2 => ("{\"landing_page\": tr".to_owned(), "length"),
        _ => (
            format!("{{\"landing_page\": {landing}, \"aesthetic\": {aesthetic}}}"),
            "stop",
        ),
    };
    json!({
        "id": format!("batch_req_{i:08x}"),
        "custom_id": custom_id,
        "response": {
            "status_code": 200,
            "request_id": format!("req_{:016x}{:016x}", rng.next(), rng.next()),
            "body": {
                "id": format!("chatcmpl-{:016x}", rng.next()),
                "object": "chat.completion",
                "created": 1_753_904_469u64,
                "model": "google/gemma-3-27b-instruct/bf-16",
                "choices": [{
                    "index": 0,
                    "message": {"role": "assistant", "content": content, "refusal": null},
                    "logprobs": null,
                    "finish_reason": finish,
                }],
                "usage": {"prompt_tokens": 1536 + rng.next() % 64, "completion_tokens": 14, "total_tokens": 1560},
                "system_fingerprint": "fp_bench",
            }
        },
        "error": null,
    })
    .to_string()
}

/// The manifest and the output file (in the provider's shuffled order) for `n` images.
pub(crate) fn synthesize(n: usize, bucket: &str, task: &Task) -> (Manifest, Vec<String>) {
    let mut rng = Lcg(42);
    let mut items = BTreeMap::new();
    let mut lines = Vec::with_capacity(n);
    for i in 0..n {
        let id = custom_id(SUBMISSION, i);
        items.insert(
            id.clone(),
            PendingItem {
                bucket: bucket.to_owned(),
                key: format!("{INPUT}harvest/{i:06}.png"),
                size: 150_000 + rng.next() % 100_000,
                etag: format!("{:016x}{:016x}", rng.next(), rng.next()),
                version_id: None,
                attempt: 0,
                reasons: Vec::new(),
                requeues: 0,
                replace_label: None,
            },
        );
        lines.push(output_line(i, &id, &mut rng));
    }
    // Providers do not keep input order.
    for i in (1..lines.len()).rev() {
        let j = (rng.next() as usize) % (i + 1);
        lines.swap(i, j);
    }
    let manifest = Manifest {
        name: format!("{SUBMISSION}-0"),
        submission_id: SUBMISSION.to_owned(),
        task: TaskRef {
            name: task.name().to_owned(),
            version: task.version().to_owned(),
        },
        model: task.model().to_owned(),
        created_at: unix_now(),
        items,
        slot: None,
    };
    (manifest, lines)
}

pub async fn harvest_bench(args: &HarvestArgs) -> anyhow::Result<()> {
    header(&format!("harvest: an output file of {} lines", args.lines));
    let task = Task::default_task()?;
    let (manifest, lines) = synthesize(args.lines, "bench-bucket", &task);
    let bytes: usize = lines.iter().map(|l| l.len() + 1).sum();
    println!(
        "output file: {} lines, {:.1} MB",
        lines.len(),
        bytes as f64 / 1e6
    );

    // Parse + validate alone, as the harvester does per line.
    let mut times = Vec::new();
    let mut answers = 0;
    for _ in 0..args.runs.max(1) {
        let started = Instant::now();
        answers = 0;
        for line in &lines {
            let parsed: OutputLine = serde_json::from_str(line)?;
            if let LineOutcome::Answer(_) = std::hint::black_box(interpret_line(&parsed, &task)) {
                answers += 1;
            }
        }
        times.push(started.elapsed());
    }
    let parse = median(&times);
    println!();
    println!("| measure | lines | seconds | lines/s | load |");
    println!("| --- | ---: | ---: | ---: | --- |");
    println!(
        "| parse + validate, 1 thread (median of {}) | {} | {:.3} | {:.0} | {} |",
        times.len(),
        lines.len(),
        parse.as_secs_f64(),
        lines.len() as f64 / parse.as_secs_f64(),
        load()
    );
    println!("  ({answers} answers, {} retries)", lines.len() - answers);
    if args.parse_only {
        return Ok(());
    }

    // The whole harvest against moto: labels, retries, results, the state record.
    let stack = Stack::start("bench-harvest").await?;
    let bucket = stack.resources.bucket.clone();
    let (manifest, lines) = {
        let (mut manifest, lines) = (manifest, lines);
        for item in manifest.items.values_mut() {
            item.bucket = bucket.clone();
        }
        (manifest, lines)
    };
    stack
        .store
        .put(
            &bucket,
            &state_keys::manifest(&manifest.name),
            serde_json::to_vec(&manifest)?,
            "application/json",
            WriteCondition::Overwrite,
        )
        .await?;
    let dir = tempfile::tempdir()?;
    let output = dir.path().join("output.jsonl");
    {
        let mut file = std::io::BufWriter::new(std::fs::File::create(&output)?);
        for line in &lines {
            file.write_all(line.as_bytes())?;
            file.write_all(b"\n")?;
        }
        file.flush()?;
    }
    drop(lines);
    let load_before = load();
    let mut command = tokio::process::Command::new(std::env::current_exe()?);
    command
        .arg("harvest-child")
        .args(["--endpoint", stack.moto.endpoint()])
        .args(["--bucket", &bucket])
        .args(["--pending-queue-url", &stack.resources.pending_queue_url])
        .args(["--manifest", &manifest.name])
        .arg("--output")
        .arg(&output);
    let report: HarvestChildReport = crate::common::run_child(command, "harvest").await?;
    let labels = stack.store.list(&bucket, "labels/harvest/").await?.len();
    anyhow::ensure!(
        labels as u64 == report.counts.labelled,
        "{labels} labels in S3, the harvest counted {}",
        report.counts.labelled
    );
    println!(
        "| harvest end to end against moto (labels written: {}, retried: {}) | {} | {:.1} | {:.0} | {load_before} → {} |",
        report.counts.labelled,
        report.counts.retried,
        args.lines,
        report.seconds,
        args.lines as f64 / report.seconds,
        load()
    );
    println!(
        "harvest peak RSS (VmHWM): {:.1} MiB",
        mib(report.peak_rss_kib)
    );
    Ok(())
}

/// A provider whose one batch is finished and whose output file is on local disk.
pub(crate) struct LocalFileProvider {
    pub(crate) manifest: String,
    pub(crate) output: PathBuf,
}

impl BatchProvider for LocalFileProvider {
    async fn upload(&self, _path: &Path) -> Result<FileObject, BatchApiError> {
        Err(BatchApiError::Config(
            "the benchmark provider takes no uploads".into(),
        ))
    }

    async fn create(&self, _request: &CreateBatchRequest) -> Result<Batch, BatchApiError> {
        Err(BatchApiError::Config(
            "the benchmark provider creates no batches".into(),
        ))
    }

    async fn retrieve(&self, batch_id: &str) -> Result<Batch, BatchApiError> {
        serde_json::from_value(json!({
            "id": batch_id,
            "object": "batch",
            "status": "completed",
            "endpoint": "/v1/chat/completions",
            "input_file_id": "file-bench-input",
            "output_file_id": OUTPUT_FILE,
            "error_file_id": null,
            "metadata": {METADATA_MANIFEST: self.manifest},
        }))
        .map_err(|e| BatchApiError::Config(e.to_string()))
    }

    async fn delete_file(&self, _file_id: &str) -> Result<(), BatchApiError> {
        Err(BatchApiError::Config(
            "the benchmark provider deletes no files".into(),
        ))
    }

    async fn open_file(&self, file_id: &str) -> Result<LineReader, BatchApiError> {
        if file_id != OUTPUT_FILE {
            return Err(BatchApiError::Config(format!("no file {file_id}")));
        }
        let file = tokio::fs::File::open(&self.output)
            .await
            .map_err(|e| BatchApiError::File {
                operation: "open output file",
                path: self.output.display().to_string(),
                detail: e.to_string(),
            })?;
        Ok(Box::pin(tokio::io::BufReader::with_capacity(1 << 16, file)))
    }
}

pub async fn harvest_child(args: &HarvestChildArgs) -> anyhow::Result<()> {
    let sdk = local_sdk_config(&args.endpoint).await;
    let store = S3Store::new(s3_client(&sdk));
    let queue = SqsQueue::new(sqs_client(&sdk));
    let provider = LocalFileProvider {
        manifest: args.manifest.clone(),
        output: args.output.clone(),
    };
    let config = HarvestConfig {
        bucket: args.bucket.clone(),
        layout: Layout::new(INPUT),
        pending_queue_url: args.pending_queue_url.clone(),
        task: Arc::new(Task::default_task()?),
        max_retries: 3,
        max_requeues: 10,
        shards: None,
        delete_provider_files: false,
    };
    let request = HarvestRequest {
        batch_id: Some(BATCH_ID.to_owned()),
        manifest: None,
        origin: "bench".into(),
        shard: None,
        delivery: None,
    };
    let started = Instant::now();
    let outcome = harvest(&store, &queue, &provider, &config, &request).await?;
    let seconds = started.elapsed().as_secs_f64();
    let HarvestOutcome::Harvested { counts, .. } = outcome else {
        anyhow::bail!("the batch was not harvested: {outcome:?}");
    };
    let report = HarvestChildReport {
        seconds,
        counts,
        peak_rss_kib: peak_rss_kib(),
    };
    println!("{}", serde_json::to_string(&report)?);
    Ok(())
}
