//! `shotlabel backfill`: queue objects already in the bucket, for which no S3 event ever
//! fired (uploaded before the stack existed, or while its notification was off).
//!
//! The objects come from one of two sources, each producing pages of objects:
//! - `listing.rs`: the bucket listed under the prefix, the keyspace cut into ranges that
//!   are listed in parallel;
//! - `inventory.rs` (`--inventory`): an S3 Inventory report's data files, CSV or Parquet,
//!   which cost no LIST request at all.
//!
//! Either way the objects are handed, ten at a time (one `SendMessageBatch`) and many calls
//! in flight, to the same `enqueue_objects` the enqueue function uses, so size limits,
//! failed records and the dedupe (an object already labelled for its etag under the
//! current task version is skipped) work exactly alike, and a rerun queues only what is
//! not labelled yet.

mod inventory;
mod listing;

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::anyhow;
use futures_util::{Stream, StreamExt, TryStreamExt};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use shotlabel_aws::{S3Store, SqsQueue};
use shotlabel_core::enqueue::{EnqueueConfig, EnqueueReport, NewObject, enqueue_objects};
use shotlabel_core::ports::MAX_BATCH_MESSAGES;
use shotlabel_core::records::TaskRef;

use crate::stack::{Aws, Listed, StackArgs, Subject, adapter_error, resolve};
use crate::task_cmd::load_task;

/// The enqueue function's default limit, so a backfill refuses what an event would.
const DEFAULT_MAX_OBJECT_BYTES: u64 = 50 * 1024 * 1024;

#[derive(Debug, clap::Args)]
pub struct BackfillArgs {
    #[command(flatten)]
    pub stack: StackArgs,
    /// Only objects under this prefix, taken below the input prefix: `2024/` and
    /// `incoming/2024/` both mean `incoming/2024/`. Default: the whole input prefix.
    #[arg(long, value_name = "P")]
    pub prefix: Option<String>,
    /// Read the objects from this S3 Inventory report (its manifest.json, as
    /// s3://BUCKET/KEY/manifest.json; CSV or Parquet) instead of listing the bucket.
    #[arg(long, value_name = "MANIFEST_URI")]
    pub inventory: Option<String>,
    /// The task file the pipeline runs (its version decides what counts as labelled);
    /// the built-in website judgement when absent.
    #[arg(long, env = "SHOTLABEL_TASK")]
    pub task: Option<PathBuf>,
    /// Larger objects get a failed record instead of a message.
    #[arg(long, env = "SHOTLABEL_MAX_OBJECT_BYTES", default_value_t = DEFAULT_MAX_OBJECT_BYTES)]
    pub max_object_bytes: u64,
    /// Queue objects even when they are labelled already under this task version.
    #[arg(long)]
    pub force_relabel: bool,
    /// Calls in flight at once, each for ten objects (their label look-ups, then one
    /// SendMessageBatch); also how many key ranges are listed at once.
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u16).range(1..=256))]
    pub concurrency: u16,
    /// Print the summary as JSON.
    #[arg(long)]
    pub json: bool,
}

/// What a backfill did.
#[derive(Debug, Default, serde::Serialize)]
struct Summary {
    bucket: String,
    prefix: String,
    task_version: String,
    /// `listing` or `inventory`.
    source: &'static str,
    /// The report's manifest, for an inventory backfill.
    #[serde(skip_serializing_if = "Option::is_none")]
    inventory: Option<String>,
    /// The report's data files read.
    #[serde(skip_serializing_if = "Option::is_none")]
    inventory_files: Option<usize>,
    /// Objects under the prefix, handed to enqueue.
    listed: usize,
    /// Inventory rows not for this backfill: outside the prefix, another bucket, delete
    /// markers and older versions.
    skipped: u64,
    #[serde(flatten)]
    report: EnqueueReport,
}

/// Objects as a source reads them: a listing page, or a run of inventory rows.
#[derive(Debug, Default)]
pub(crate) struct Page {
    pub objects: Vec<Listed>,
    /// Rows read that are not for this backfill (see [`Summary::skipped`]).
    pub skipped: u64,
}

pub fn run(args: BackfillArgs) -> anyhow::Result<ExitCode> {
    crate::stack::runtime()?.block_on(backfill(args))
}

/// The key prefix to list: `prefix` below the input prefix, unless it already starts there.
fn list_prefix(input_prefix: &str, prefix: Option<&str>) -> String {
    match prefix.filter(|p| !p.is_empty()) {
        None => input_prefix.to_owned(),
        Some(p) if p.starts_with(input_prefix) => p.to_owned(),
        Some(p) => format!("{input_prefix}{}", p.trim_start_matches('/')),
    }
}

async fn backfill(args: BackfillArgs) -> anyhow::Result<ExitCode> {
    let task = load_task(args.task.as_deref())?;
    let aws = Aws::connect().await?;
    let stack = resolve(&args.stack, &aws).await?;
    let bucket = stack.bucket()?.to_owned();
    let queue_url = stack.pending_queue_url()?.to_owned();
    // The manifest first: a wrong URI or an unreadable report fails before anything else.
    let report = match &args.inventory {
        Some(uri) => Some(inventory::Inventory::open(&aws, uri, &bucket).await?),
        None => None,
    };
    check_queue(&aws, &queue_url).await?;

    let config = EnqueueConfig {
        layout: stack.layout(),
        pending_queue_url: queue_url,
        max_object_bytes: args.max_object_bytes,
        force_relabel: args.force_relabel,
        task: TaskRef {
            name: task.name().to_owned(),
            version: task.version().to_owned(),
        },
    };
    let prefix = list_prefix(&stack.input_prefix, args.prefix.as_deref());
    let concurrency = usize::from(args.concurrency);

    let progress = ProgressBar::with_draw_target(Some(0), ProgressDrawTarget::stderr());
    progress.set_style(
        ProgressStyle::with_template(
            "{spinner} {prefix}{pos}/{len} objects [{elapsed_precise}] {wide_msg}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let mut summary = Summary {
        bucket: bucket.clone(),
        prefix: prefix.clone(),
        task_version: config.task.version.clone(),
        ..Summary::default()
    };
    let sink = Sink {
        store: S3Store::new(aws.s3.clone()),
        queue: SqsQueue::new(aws.sqs.clone()),
        config: &config,
        bucket: &bucket,
        concurrency,
        progress: &progress,
    };
    match report {
        Some(report) => {
            summary.source = "inventory";
            summary.inventory = Some(report.uri());
            summary.inventory_files = Some(report.file_count());
            let scope = inventory::Scope {
                bucket: bucket.clone(),
                prefix: prefix.clone(),
            };
            let pages = report.pages(aws.clone(), scope, progress.clone());
            sink.queue_all(pages, &mut summary).await?;
        }
        None => {
            summary.source = "listing";
            let pages = listing::pages(&aws, &bucket, &prefix, concurrency);
            sink.queue_all(pages, &mut summary).await?;
        }
    }
    progress.finish_and_clear();

    if args.json {
        println!("{}", serde_json::to_string(&summary)?);
    } else {
        let from = match &summary.inventory {
            Some(uri) => format!(
                "read {} inventory files of {uri} ({} rows skipped: another prefix, delete markers, older versions); ",
                summary.inventory_files.unwrap_or(0),
                summary.skipped
            ),
            None => String::new(),
        };
        println!(
            "{from}listed {} under s3://{}/{}: queued {}, already labelled {} (task version {}), failed {}, ignored {}",
            summary.listed,
            summary.bucket,
            summary.prefix,
            summary.report.queued,
            summary.report.already_labelled,
            summary.task_version,
            summary.report.failed,
            summary.report.ignored
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// Where the objects go: `enqueue_objects`, one SQS batch per call, many calls in flight.
struct Sink<'a> {
    store: S3Store,
    queue: SqsQueue,
    config: &'a EnqueueConfig,
    bucket: &'a str,
    concurrency: usize,
    progress: &'a ProgressBar,
}

/// One `enqueue_objects` call's objects, and what its page counted beside them.
struct Chunk {
    objects: Vec<NewObject>,
    skipped: u64,
}

impl Sink<'_> {
    async fn queue_all(
        &self,
        pages: impl Stream<Item = anyhow::Result<Page>>,
        summary: &mut Summary,
    ) -> anyhow::Result<()> {
        let reports = pages
            .map_ok(|page| {
                self.progress.inc_length(page.objects.len() as u64);
                futures_util::stream::iter(self.chunks(page)).map(Ok)
            })
            .try_flatten()
            .map_ok(|chunk| self.enqueue(chunk))
            .try_buffer_unordered(self.concurrency);
        let mut reports = std::pin::pin!(reports);
        while let Some((count, skipped, report)) = reports.try_next().await? {
            summary.listed += count;
            summary.skipped += skipped;
            summary.report.queued += report.queued;
            summary.report.already_labelled += report.already_labelled;
            summary.report.failed += report.failed;
            summary.report.ignored += report.ignored;
            self.progress.inc(count as u64);
            self.progress.set_message(format!(
                "queued {}, already labelled {}, failed {}",
                summary.report.queued, summary.report.already_labelled, summary.report.failed
            ));
        }
        Ok(())
    }

    /// A page cut into SQS-batch-sized chunks; the first carries the page's skipped count
    /// (a page of skipped rows alone becomes one empty chunk).
    fn chunks(&self, page: Page) -> Vec<Chunk> {
        let objects: Vec<NewObject> = page
            .objects
            .into_iter()
            .map(|o| NewObject {
                bucket: self.bucket.to_owned(),
                key: o.key,
                size: o.size,
                etag: o.etag,
                // As an S3 event without versioning: the current object, found by its key.
                version_id: None,
            })
            .collect();
        let mut chunks: Vec<Chunk> = objects
            .chunks(MAX_BATCH_MESSAGES)
            .map(|c| Chunk {
                objects: c.to_vec(),
                skipped: 0,
            })
            .collect();
        match chunks.first_mut() {
            Some(first) => first.skipped = page.skipped,
            None if page.skipped > 0 => chunks.push(Chunk {
                objects: Vec::new(),
                skipped: page.skipped,
            }),
            None => {}
        }
        chunks
    }

    /// Queues a chunk; returns how many objects it had, its skipped rows and the report.
    async fn enqueue(&self, chunk: Chunk) -> anyhow::Result<(usize, u64, EnqueueReport)> {
        let count = chunk.objects.len();
        if count == 0 {
            return Ok((0, chunk.skipped, EnqueueReport::default()));
        }
        let report = enqueue_objects(&self.store, &self.queue, self.config, chunk.objects)
            .await
            .map_err(|e| anyhow!("queueing objects: {}", adapter_error(&e)))?;
        Ok((count, chunk.skipped, report))
    }
}

/// Fails with a clear line when the queue is not there, before anything is sent.
pub async fn check_queue(aws: &Aws, queue_url: &str) -> anyhow::Result<()> {
    aws.sqs
        .get_queue_attributes()
        .queue_url(queue_url)
        .attribute_names(aws_sdk_sqs::types::QueueAttributeName::QueueArn)
        .send()
        .await
        .map_err(|e| aws.error("looking up the queue", Subject::Queue(queue_url), e))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_prefix_is_taken_below_the_input_prefix() {
        assert_eq!(list_prefix("incoming/", None), "incoming/");
        assert_eq!(list_prefix("incoming/", Some("")), "incoming/");
        assert_eq!(list_prefix("incoming/", Some("2024/")), "incoming/2024/");
        assert_eq!(list_prefix("incoming/", Some("/2024/")), "incoming/2024/");
        assert_eq!(
            list_prefix("incoming/", Some("incoming/2024/")),
            "incoming/2024/"
        );
    }
}
