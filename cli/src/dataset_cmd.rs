//! `shotlabel dataset rebuild`: writes the Parquet parts of labels that have none, from the
//! label objects: labels harvested before the harvest wrote parts, or whose parts were
//! deleted. It lists `labels/` once (one LIST page per 1,000 labels and one GET per label,
//! the cost the parts exist to avoid afterwards) and writes one part per batch that has
//! none, `part-0.parquet`, with the same rows and bytes a harvest of that batch writes.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use futures_util::{StreamExt, TryStreamExt};
use shotlabel_core::dataset;
use shotlabel_core::records::LabelRecord;

use crate::stack::{Aws, Lister, StackArgs, Subject, one_line, printable, resolve};
use crate::task_cmd::load_task;

#[derive(Debug, clap::Subcommand)]
pub enum DatasetCommand {
    /// Write the dataset parts of label objects that have none (labels harvested before
    /// parts were written).
    Rebuild(RebuildArgs),
}

#[derive(Debug, clap::Args)]
pub struct RebuildArgs {
    #[command(flatten)]
    pub stack: StackArgs,
    /// The task whose current version's labels are rebuilt; the built-in website
    /// judgement when absent.
    #[arg(long, env = "SHOTLABEL_TASK")]
    pub task: Option<PathBuf>,
    /// Label objects read at once.
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u16).range(1..=256))]
    pub concurrency: u16,
    /// Print the summary as JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Default, serde::Serialize)]
struct RebuildSummary {
    /// Labels of the task version read.
    labels: u64,
    /// Labels of other task versions, or not label records, left alone.
    skipped: u64,
    /// Batches that had a part already.
    batches_with_parts: u64,
    /// Parts written, and the rows in them.
    parts_written: u64,
    rows_written: u64,
}

pub fn run(command: DatasetCommand) -> anyhow::Result<ExitCode> {
    match command {
        DatasetCommand::Rebuild(args) => crate::stack::runtime()?.block_on(rebuild(args)),
    }
}

async fn rebuild(args: RebuildArgs) -> anyhow::Result<ExitCode> {
    let task = load_task(args.task.as_deref())?;
    let aws = Aws::connect().await?;
    let stack = resolve(&args.stack, &aws).await?;
    let bucket = stack.bucket()?.to_owned();

    // Batches that have a part already (any part: a sharded harvest writes several).
    let mut with_parts = BTreeSet::new();
    let mut lister = Lister::new(
        &aws,
        &bucket,
        &dataset::version_prefix(task.name(), task.version()),
    );
    while let Some(page) = lister.next_page().await? {
        for listed in page {
            if let Some(batch) = listed
                .key
                .split('/')
                .find_map(|segment| segment.strip_prefix("batch="))
            {
                with_parts.insert(batch.to_owned());
            }
        }
    }

    let mut summary = RebuildSummary::default();
    let mut by_batch: BTreeMap<String, Vec<LabelRecord>> = BTreeMap::new();
    let mut lister = Lister::new(&aws, &bucket, "labels/");
    while let Some(page) = lister.next_page().await? {
        let keys: Vec<String> = page
            .into_iter()
            .map(|o| o.key)
            .filter(|k| k.ends_with(".json"))
            .collect();
        let mut records = futures_util::stream::iter(keys)
            .map(|key| {
                let (aws, bucket) = (&aws, &bucket);
                async move { read_label(aws, bucket, &key).await }
            })
            .buffered(usize::from(args.concurrency));
        while let Some(record) = records.try_next().await? {
            match record {
                Some(record) if record.task.version == task.version() => {
                    summary.labels += 1;
                    by_batch
                        .entry(record.provenance.batch_id.clone())
                        .or_default()
                        .push(record);
                }
                _ => summary.skipped += 1,
            }
        }
    }
    for (batch_id, records) in by_batch {
        if with_parts.contains(&batch_id) {
            summary.batches_with_parts += 1;
            continue;
        }
        let key = dataset::part_key(task.name(), task.version(), &batch_id, 0);
        let body = dataset::write_part(&task, &records)?;
        aws.s3
            .put_object()
            .bucket(&bucket)
            .key(&key)
            .content_type(dataset::PARQUET_CONTENT_TYPE)
            .body(body.into())
            .send()
            .await
            .map_err(|e| {
                aws.error(
                    &format!("writing s3://{bucket}/{}", printable(&key)),
                    Subject::Bucket(&bucket),
                    e,
                )
            })?;
        summary.parts_written += 1;
        summary.rows_written += records.len() as u64;
    }
    if args.json {
        println!("{}", serde_json::to_string(&summary)?);
    } else {
        println!(
            "wrote {} part(s) with {} row(s) for task version {}; {} batch(es) had parts already; \
             {} label object(s) of other versions left alone",
            summary.parts_written,
            summary.rows_written,
            task.version(),
            summary.batches_with_parts,
            summary.skipped
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// A label object, `None` when it is gone or not a label record (warned about).
async fn read_label(aws: &Aws, bucket: &str, key: &str) -> anyhow::Result<Option<LabelRecord>> {
    let object = match aws.s3.get_object().bucket(bucket).key(key).send().await {
        Ok(object) => object,
        Err(e) if e.as_service_error().is_some_and(|s| s.is_no_such_key()) => return Ok(None),
        Err(e) => {
            return Err(aws.error(
                &format!("reading s3://{bucket}/{}", printable(key)),
                Subject::Bucket(bucket),
                e,
            ));
        }
    };
    let bytes = object
        .body
        .collect()
        .await
        .with_context(|| format!("reading s3://{bucket}/{}", printable(key)))?;
    match serde_json::from_slice(&bytes.into_bytes()) {
        Ok(record) => Ok(Some(record)),
        Err(e) => {
            eprintln!(
                "shotlabel: warning: skipped {}: not a label record ({})",
                printable(key),
                one_line(&e.to_string())
            );
            Ok(None)
        }
    }
}
