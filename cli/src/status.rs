//! `shotlabel status`: what the pipeline is doing. Queue depths (pending, harvest and
//! their dead-letter queues), open batches with their status and age, how many images are
//! labelled and failed, and the tokens the harvested batches used.
//!
//! Open batches are the `state/open/` markers; their details come from the state records
//! (`state/batches/<id>.json`). With `SHOTLABEL_PROVIDER_URL` and `SHOTLABEL_API_KEY` set,
//! each open batch's status is asked of the provider; otherwise the recorded one is shown.

use std::collections::BTreeMap;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::anyhow;
use aws_sdk_sqs::types::QueueAttributeName;
use futures_util::{StreamExt, TryStreamExt};
use secrecy::SecretString;
use serde::Serialize;
use shotlabel_aws::S3Store;
use shotlabel_batch_client::{BatchApiConfig, BatchClient, RetryPolicy};
use shotlabel_core::ports::ObjectStore;
use shotlabel_core::records::{BatchPhase, BatchRecord, state_keys, unix_now};

use crate::stack::{Aws, Lister, StackArgs, Subject, adapter_error, one_line, resolve};

#[derive(Debug, clap::Args)]
pub struct StatusArgs {
    #[command(flatten)]
    pub stack: StackArgs,
    /// Print the status as one JSON object.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Serialize)]
struct QueueDepth {
    url: String,
    /// Waiting to be received.
    visible: u64,
    /// Received and not yet deleted.
    in_flight: u64,
    delayed: u64,
}

#[derive(Debug, Serialize)]
struct Queues {
    pending: Option<QueueDepth>,
    pending_dead_letter: Option<QueueDepth>,
    harvest: Option<QueueDepth>,
    harvest_dead_letter: Option<QueueDepth>,
}

#[derive(Debug, Serialize)]
struct OpenBatch {
    batch_id: String,
    status: Option<String>,
    /// `provider` when asked just now, `recorded` when read from the state record.
    status_source: &'static str,
    submitted_at: Option<u64>,
    age_seconds: Option<u64>,
    requests: Option<u64>,
    model: Option<String>,
    task_version: Option<String>,
    /// Anything odd: a missing state record, a provider error.
    #[serde(skip_serializing_if = "Option::is_none")]
    note: Option<String>,
}

#[derive(Debug, Default, Serialize)]
struct BatchTotals {
    total: u64,
    open: u64,
    harvested: u64,
    /// State records that could not be read.
    unreadable: u64,
}

#[derive(Debug, Default, Serialize)]
struct Tokens {
    prompt: u64,
    completion: u64,
    total: u64,
}

#[derive(Debug, Serialize)]
struct Status {
    bucket: String,
    input_prefix: String,
    queues: Queues,
    open_batches: Vec<OpenBatch>,
    labelled: u64,
    failed: u64,
    batches: BatchTotals,
    tokens: Tokens,
}

pub fn run(args: StatusArgs) -> anyhow::Result<ExitCode> {
    crate::stack::runtime()?.block_on(status(args))
}

async fn status(args: StatusArgs) -> anyhow::Result<ExitCode> {
    let aws = Aws::connect().await?;
    let stack = resolve(&args.stack, &aws).await?;
    let bucket = stack.bucket()?.to_owned();

    let labelled = Lister::new(&aws, &bucket, "labels/")
        .count(|k| k.ends_with(".json"))
        .await?;
    let failed = Lister::new(&aws, &bucket, "failed/")
        .count(|k| k.ends_with(".json"))
        .await?;
    let queues = Queues {
        pending: depth(&aws, stack.pending_queue_url.as_deref()).await?,
        pending_dead_letter: depth(&aws, stack.pending_dead_letter_queue_url.as_deref()).await?,
        harvest: depth(&aws, stack.harvest_queue_url.as_deref()).await?,
        harvest_dead_letter: depth(&aws, stack.harvest_dead_letter_queue_url.as_deref()).await?,
    };

    let (records, unreadable) = batch_records(&aws, &bucket).await?;
    let mut batches = BatchTotals {
        unreadable,
        ..BatchTotals::default()
    };
    let mut tokens = Tokens::default();
    for record in records.values() {
        batches.total += 1;
        match record.phase {
            BatchPhase::Open => batches.open += 1,
            BatchPhase::Harvested => batches.harvested += 1,
        }
        if let Some(harvest) = &record.harvest {
            tokens.prompt += harvest.prompt_tokens;
            tokens.completion += harvest.completion_tokens;
        }
    }
    tokens.total = tokens.prompt + tokens.completion;

    let now = unix_now();
    let mut open_batches = Vec::new();
    let mut markers = Lister::new(&aws, &bucket, state_keys::OPEN_PREFIX);
    while let Some(page) = markers.next_page().await? {
        for marker in page {
            let Some(batch_id) = state_keys::batch_id_of_marker(&marker.key) else {
                continue;
            };
            let record = records.get(&batch_id);
            open_batches.push(OpenBatch {
                status: record.and_then(|r| r.provider_status.clone()),
                status_source: "recorded",
                submitted_at: record.map(|r| r.submitted_at),
                age_seconds: record.map(|r| now.saturating_sub(r.submitted_at)),
                requests: record.map(|r| r.requests),
                model: record.map(|r| r.model.clone()),
                task_version: record.map(|r| r.task.version.clone()),
                note: record.is_none().then(|| "no state record".to_owned()),
                batch_id,
            });
        }
    }
    let provider_error = ask_provider(&mut open_batches).await;

    let report = Status {
        bucket,
        input_prefix: stack.input_prefix.clone(),
        queues,
        open_batches,
        labelled,
        failed,
        batches,
        tokens,
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", table(&report));
    }
    match provider_error {
        // The report is still worth having; the exit code and one line say what failed.
        Some(error) => Err(error),
        None => Ok(ExitCode::SUCCESS),
    }
}

async fn depth(aws: &Aws, url: Option<&str>) -> anyhow::Result<Option<QueueDepth>> {
    let Some(url) = url else {
        return Ok(None);
    };
    let attributes = aws
        .sqs
        .get_queue_attributes()
        .queue_url(url)
        .attribute_names(QueueAttributeName::ApproximateNumberOfMessages)
        .attribute_names(QueueAttributeName::ApproximateNumberOfMessagesNotVisible)
        .attribute_names(QueueAttributeName::ApproximateNumberOfMessagesDelayed)
        .send()
        .await
        .map_err(|e| aws.error("reading the queue's depth", Subject::Queue(url), e))?
        .attributes
        .unwrap_or_default();
    let count = |name: QueueAttributeName| -> u64 {
        attributes
            .get(&name)
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    Ok(Some(QueueDepth {
        url: url.to_owned(),
        visible: count(QueueAttributeName::ApproximateNumberOfMessages),
        in_flight: count(QueueAttributeName::ApproximateNumberOfMessagesNotVisible),
        delayed: count(QueueAttributeName::ApproximateNumberOfMessagesDelayed),
    }))
}

/// Every readable state record by batch id, and how many could not be read.
async fn batch_records(
    aws: &Aws,
    bucket: &str,
) -> anyhow::Result<(BTreeMap<String, BatchRecord>, u64)> {
    let store = S3Store::new(aws.s3.clone());
    let mut records = BTreeMap::new();
    let mut unreadable = 0;
    let mut lister = Lister::new(aws, bucket, "state/batches/");
    while let Some(page) = lister.next_page().await? {
        let keys = page
            .into_iter()
            .map(|o| o.key)
            .filter(|k| k.ends_with(".json"));
        let mut reads = futures_util::stream::iter(keys)
            .map(|key| {
                let store = &store;
                async move {
                    store
                        .get(bucket, &key)
                        .await
                        .map(|object| serde_json::from_slice::<BatchRecord>(&object.body).ok())
                        .map_err(|e| anyhow!("{}", adapter_error(&e)))
                }
            })
            .buffer_unordered(16);
        while let Some(record) = reads.try_next().await? {
            match record {
                Some(record) => {
                    records.insert(record.batch_id.clone(), record);
                }
                None => unreadable += 1,
            }
        }
    }
    Ok((records, unreadable))
}

/// Asks the provider for each open batch's status when one is configured. Returns the
/// first failure, worded for a person; the batches it could not ask keep their recorded
/// status and a note.
async fn ask_provider(open_batches: &mut [OpenBatch]) -> Option<anyhow::Error> {
    let set = |name: &str| std::env::var(name).ok().filter(|v| !v.trim().is_empty());
    let url = set("SHOTLABEL_PROVIDER_URL")?;
    let key = set("SHOTLABEL_API_KEY")?;
    if open_batches.is_empty() {
        return None;
    }
    let mut config = match BatchApiConfig::new(&url, SecretString::from(key)) {
        Ok(config) => config,
        Err(e) => {
            return Some(anyhow!(
                "SHOTLABEL_PROVIDER_URL: {}",
                one_line(&e.to_string())
            ));
        }
    };
    // A status check answers at once rather than wait out a backoff (whose retries would
    // also log a warning each).
    config.retry = RetryPolicy::none();
    config.connect_timeout = Duration::from_secs(5);
    config.read_timeout = Duration::from_secs(30);
    let client = match BatchClient::new(config) {
        Ok(client) => client,
        Err(e) => return Some(anyhow!("{}", one_line(&e.to_string()))),
    };
    let answers: Vec<_> = futures_util::stream::iter(open_batches.iter())
        .map(|batch| client.retrieve_batch(&batch.batch_id))
        .buffered(8)
        .collect()
        .await;
    let mut first_error = None;
    for (batch, answer) in open_batches.iter_mut().zip(answers) {
        match answer {
            Ok(remote) => {
                batch.status = Some(remote.status.as_str().to_owned());
                batch.status_source = "provider";
            }
            Err(e) => {
                let text = one_line(&e.to_string());
                batch.note = Some(format!("provider: {text}"));
                first_error.get_or_insert_with(|| {
                    anyhow!(
                        "asking the provider at {} about batch {}: {text}",
                        client.base_url(),
                        batch.batch_id
                    )
                });
            }
        }
    }
    first_error
}

/// `12m 3s`, `5h 12m`, `3d 4h`.
fn age(seconds: u64) -> String {
    let (d, h, m, s) = (
        seconds / 86_400,
        seconds / 3_600 % 24,
        seconds / 60 % 60,
        seconds % 60,
    );
    if d > 0 {
        format!("{d}d {h}h")
    } else if h > 0 {
        format!("{h}h {m}m")
    } else if m > 0 {
        format!("{m}m {s}s")
    } else {
        format!("{s}s")
    }
}

fn table(status: &Status) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "bucket     {} (inputs under {})",
        status.bucket, status.input_prefix
    );
    let _ = writeln!(out);
    let _ = writeln!(
        out,
        "{:<21}{:>9}{:>11}{:>9}",
        "queue", "waiting", "in flight", "delayed"
    );
    let rows = [
        ("pending", &status.queues.pending),
        ("pending dead-letter", &status.queues.pending_dead_letter),
        ("harvest", &status.queues.harvest),
        ("harvest dead-letter", &status.queues.harvest_dead_letter),
    ];
    for (name, depth) in rows {
        match depth {
            Some(d) => {
                let _ = writeln!(
                    out,
                    "{name:<21}{:>9}{:>11}{:>9}",
                    d.visible, d.in_flight, d.delayed
                );
            }
            None => {
                let _ = writeln!(out, "{name:<21}{:>9}  (not configured)", "-");
            }
        }
    }
    let _ = writeln!(out);
    let _ = writeln!(out, "open batches {}", status.open_batches.len());
    if !status.open_batches.is_empty() {
        let id_width = status
            .open_batches
            .iter()
            .map(|b| b.batch_id.chars().count())
            .max()
            .unwrap_or(8)
            .max(8);
        let _ = writeln!(
            out,
            "  {:<id_width$}  {:<24} {:>8} {:>9}  model",
            "batch id", "status", "age", "requests"
        );
        for batch in &status.open_batches {
            let shown_status = match (&batch.status, batch.status_source) {
                (Some(s), "provider") => s.clone(),
                (Some(s), _) => format!("{s} (recorded)"),
                (None, _) => "-".to_owned(),
            };
            let _ = writeln!(
                out,
                "  {:<id_width$}  {:<24} {:>8} {:>9}  {}{}",
                crate::stack::printable(&batch.batch_id),
                shown_status,
                batch.age_seconds.map(age).unwrap_or_else(|| "-".into()),
                batch
                    .requests
                    .map(|r| r.to_string())
                    .unwrap_or_else(|| "-".into()),
                batch.model.as_deref().unwrap_or("-"),
                batch
                    .note
                    .as_deref()
                    .map(|n| format!("  ({n})"))
                    .unwrap_or_default(),
            );
        }
    }
    let _ = writeln!(out);
    let _ = writeln!(out, "labelled     {}", status.labelled);
    let _ = writeln!(out, "failed       {}", status.failed);
    let _ = write!(
        out,
        "batches      {} ({} open, {} harvested",
        status.batches.total, status.batches.open, status.batches.harvested
    );
    if status.batches.unreadable > 0 {
        let _ = write!(out, ", {} unreadable", status.batches.unreadable);
    }
    let _ = writeln!(out, ")");
    let _ = writeln!(
        out,
        "tokens       {} (prompt {}, completion {})",
        status.tokens.total, status.tokens.prompt, status.tokens.completion
    );
    out
}

#[cfg(test)]
mod tests {
    use super::age;

    #[test]
    fn ages_read_at_a_glance() {
        assert_eq!(age(45), "45s");
        assert_eq!(age(723), "12m 3s");
        assert_eq!(age(5 * 3600 + 12 * 60 + 9), "5h 12m");
        assert_eq!(age(3 * 86_400 + 4 * 3600 + 5), "3d 4h");
    }
}
