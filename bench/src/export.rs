//! `shotlabel-bench export`: `shotlabel export --format jsonl` of N labels from the dataset
//! parts, against the same command of a build from before the dataset (which listed
//! `labels/` and read one object per label), interleaved, on one moto bucket that holds
//! both the label objects and the parts, as the harvest writes them. Reports the median
//! wall time of each and the requests moto received, by kind.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{Context, ensure};
use futures_util::StreamExt;
use shotlabel_core::answer::Usage;
use shotlabel_core::dataset;
use shotlabel_core::ports::{ObjectStore, WriteCondition};
use shotlabel_core::records::{LabelRecord, Layout, Provenance, RecordStatus, SourceRef, TaskRef};
use shotlabel_core::task::Task;

use crate::stack::{INPUT, Stack};

#[derive(Debug, clap::Args)]
pub struct ExportArgs {
    /// Labels in the bucket.
    #[arg(long, default_value_t = 10_000)]
    pub labels: usize,
    /// Labels per part (a harvest's batch).
    #[arg(long, default_value_t = 10_000)]
    pub labels_per_part: usize,
    /// Runs of each export.
    #[arg(long, default_value_t = 3)]
    pub runs: usize,
    /// The `shotlabel` binary that exports from the parts.
    #[arg(long)]
    pub shotlabel: PathBuf,
    /// A `shotlabel` binary from before the dataset (it lists `labels/`), to compare with.
    #[arg(long)]
    pub baseline: Option<PathBuf>,
}

pub async fn export_bench(args: &ExportArgs) -> anyhow::Result<()> {
    let stack = Stack::start("bench-export").await?;
    let bucket = stack.resources.bucket.clone();
    let task = Task::default_task()?;
    let layout = Layout::new(INPUT);
    let records: Vec<LabelRecord> = (0..args.labels)
        .map(|i| record(&task, &bucket, i))
        .collect();
    let started = Instant::now();
    let store = &stack.store;
    let mut puts = futures_util::stream::iter(&records)
        .map(|record| {
            let key = layout.label_key(layout.relative_or_key(&record.source.key));
            let (bucket, body) = (&bucket, serde_json::to_vec_pretty(record));
            async move {
                store
                    .put(
                        bucket,
                        &key,
                        body?,
                        "application/json",
                        WriteCondition::Overwrite,
                    )
                    .await?;
                anyhow::Ok(())
            }
        })
        .buffer_unordered(32);
    while let Some(put) = puts.next().await {
        put?;
    }
    let mut part_bytes = 0usize;
    for (part, chunk) in records.chunks(args.labels_per_part.max(1)).enumerate() {
        let batch_id = format!("batch_bench_{part}");
        let chunk: Vec<LabelRecord> = chunk
            .iter()
            .cloned()
            .map(|mut r| {
                r.provenance.batch_id.clone_from(&batch_id);
                r
            })
            .collect();
        let key = dataset::part_key(task.name(), task.version(), &batch_id, 0);
        let body = dataset::write_part(&task, &chunk)?;
        part_bytes += body.len();
        store
            .put(
                &bucket,
                &key,
                body,
                dataset::PARQUET_CONTENT_TYPE,
                WriteCondition::Overwrite,
            )
            .await?;
    }
    eprintln!(
        "{} label objects and {} part(s) written in {:.1} s",
        records.len(),
        records.len().div_ceil(args.labels_per_part.max(1)),
        started.elapsed().as_secs_f64()
    );
    println!(
        "parts: {part_bytes} bytes for {} rows, {:.1} bytes a row (Snappy; synthetic keys, etags and ids)",
        records.len(),
        part_bytes as f64 / records.len().max(1) as f64
    );

    let mut exports = vec![("parts (this build)", args.shotlabel.clone())];
    if let Some(baseline) = &args.baseline {
        exports.push(("labels/ walk (before)", baseline.clone()));
    }
    let mut times: Vec<Vec<f64>> = vec![Vec::new(); exports.len()];
    let mut calls = vec![(0usize, 0usize, 0usize); exports.len()];
    let work = tempfile::tempdir()?;
    for run in 0..args.runs {
        for (index, (name, binary)) in exports.iter().enumerate() {
            let out = work.path().join(format!("{index}-{run}"));
            stack.moto.start_recording().await?;
            let started = Instant::now();
            let output = shotlabel(&stack, binary, &out)?;
            let seconds = started.elapsed().as_secs_f64();
            let requests = stack.moto.stop_recording().await?;
            ensure!(
                output.status.success(),
                "{name}: {}",
                String::from_utf8_lossy(&output.stderr)
            );
            let rows = std::fs::read_to_string(out.join("labels.jsonl"))?
                .lines()
                .count();
            ensure!(rows == args.labels, "{name} exported {rows} rows");
            times[index].push(seconds);
            let lists = requests
                .iter()
                .filter(|(m, u)| m == "GET" && u.contains("list-type=2"))
                .count();
            let labels_listed = requests
                .iter()
                .filter(|(m, u)| {
                    m == "GET" && u.contains("list-type=2") && u.contains("prefix=labels")
                })
                .count();
            let gets = requests
                .iter()
                .filter(|(m, u)| m == "GET" && !u.contains("list-type=2"))
                .count();
            calls[index] = (lists, labels_listed, gets);
        }
    }
    println!(
        "shotlabel export --format jsonl of {} labels ({} per part), {} runs each, interleaved, on moto",
        args.labels, args.labels_per_part, args.runs
    );
    println!("| export | median s | vs parts | LIST calls | of them labels/ | GET calls |");
    println!("| --- | ---: | ---: | ---: | ---: | ---: |");
    let base = median(&mut times[0].clone());
    for (index, (name, _)) in exports.iter().enumerate() {
        let m = median(&mut times[index]);
        let (lists, labels_listed, gets) = calls[index];
        println!(
            "| {name} | {m:.2} | {:.1}× | {lists} | {labels_listed} | {gets} |",
            m / base
        );
    }
    Ok(())
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    values.get(values.len() / 2).copied().unwrap_or(f64::NAN)
}

/// Runs `binary export --format jsonl --out out` against the bench's moto bucket.
fn shotlabel(stack: &Stack, binary: &Path, out: &Path) -> anyhow::Result<std::process::Output> {
    Command::new(binary)
        .args(["export", "--format", "jsonl", "--json", "--out"])
        .arg(out)
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("HOME", out.parent().unwrap_or(out))
        .env("AWS_ENDPOINT_URL", stack.moto.endpoint())
        .env("AWS_ACCESS_KEY_ID", "testing")
        .env("AWS_SECRET_ACCESS_KEY", "testing")
        .env("AWS_REGION", "us-east-1")
        .env("AWS_EC2_METADATA_DISABLED", "true")
        .env("SHOTLABEL_BUCKET", &stack.resources.bucket)
        .output()
        .with_context(|| format!("running {}", binary.display()))
}

fn record(task: &Task, bucket: &str, i: usize) -> LabelRecord {
    let i = i as u64;
    LabelRecord {
        status: RecordStatus::Labelled,
        label: serde_json::json!({"landing_page": i.is_multiple_of(3), "aesthetic": 1 + i % 5}),
        source: SourceRef {
            bucket: bucket.to_owned(),
            key: format!("{INPUT}shots/{i:06}.png"),
            etag: format!("{i:032x}"),
            size: 50_000 + i,
            version_id: None,
        },
        task: TaskRef {
            name: task.name().to_owned(),
            version: task.version().to_owned(),
        },
        model: "a-model".into(),
        provenance: Provenance {
            batch_id: String::new(),
            custom_id: format!("r{i:06}"),
            request_id: None,
            finish_reason: Some("stop".into()),
            usage: Some(Usage {
                prompt_tokens: 731,
                completion_tokens: 14,
                total_tokens: 745,
            }),
        },
        attempt: 0,
        labelled_at: 1_767_225_600 + i,
    }
}
