//! `shotlabel backfill`: queue objects already in the bucket, for which no S3 event ever
//! fired (uploaded before the stack existed, or while its notification was off).
//!
//! Objects are listed a page at a time and handed to the same `enqueue_objects` the
//! enqueue function uses, so size limits, failed records and the dedupe (an object already
//! labelled for its etag under the current task version is skipped) work exactly alike.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::anyhow;
use futures_util::{StreamExt, TryStreamExt};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use shotlabel_aws::{S3Store, SqsQueue};
use shotlabel_core::enqueue::{EnqueueConfig, EnqueueReport, NewObject, enqueue_objects};
use shotlabel_core::ports::MAX_BATCH_MESSAGES;
use shotlabel_core::records::TaskRef;

use crate::stack::{Aws, Lister, StackArgs, Subject, adapter_error, resolve};
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
    /// Label look-ups and sends in flight at once.
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
    listed: usize,
    #[serde(flatten)]
    report: EnqueueReport,
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
    let store = S3Store::new(aws.s3.clone());
    let queue = SqsQueue::new(aws.sqs.clone());

    let progress = ProgressBar::with_draw_target(Some(0), ProgressDrawTarget::stderr());
    progress.set_style(
        ProgressStyle::with_template(
            "{spinner} {pos}/{len} objects [{elapsed_precise}] {wide_msg}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let mut summary = Summary {
        bucket: bucket.clone(),
        prefix: prefix.clone(),
        task_version: config.task.version.clone(),
        ..Summary::default()
    };
    let mut lister = Lister::new(&aws, &bucket, &prefix);
    while let Some(page) = lister.next_page().await? {
        summary.listed += page.len();
        progress.inc_length(page.len() as u64);
        let objects: Vec<NewObject> = page
            .into_iter()
            .map(|o| NewObject {
                bucket: bucket.clone(),
                key: o.key,
                size: o.size,
                etag: o.etag,
                version_id: None,
            })
            .collect();
        // One enqueue call per SQS batch; several in flight.
        let chunks: Vec<Vec<NewObject>> = objects
            .chunks(MAX_BATCH_MESSAGES)
            .map(<[NewObject]>::to_vec)
            .collect();
        let mut reports = futures_util::stream::iter(chunks)
            .map(|chunk| {
                let count = chunk.len() as u64;
                let (store, queue, config) = (&store, &queue, &config);
                async move {
                    enqueue_objects(store, queue, config, chunk)
                        .await
                        .map(|report| (report, count))
                        .map_err(|e| anyhow!("queueing objects: {}", adapter_error(&e)))
                }
            })
            .buffer_unordered(usize::from(args.concurrency));
        while let Some((report, count)) = reports.try_next().await? {
            summary.report.queued += report.queued;
            summary.report.already_labelled += report.already_labelled;
            summary.report.failed += report.failed;
            summary.report.ignored += report.ignored;
            progress.inc(count);
            progress.set_message(format!(
                "queued {}, already labelled {}, failed {}",
                summary.report.queued, summary.report.already_labelled, summary.report.failed
            ));
        }
    }
    progress.finish_and_clear();

    if args.json {
        println!("{}", serde_json::to_string(&summary)?);
    } else {
        println!(
            "listed {} under s3://{}/{}: queued {}, already labelled {} (task version {}), failed {}, ignored {}",
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
