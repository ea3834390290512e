//! `shotlabel redrive`: move dead-letter messages back to their queue (the pending queue,
//! or with `--harvest` the harvest queue), once whatever made them fail is fixed.
//!
//! Each message is sent to the queue first and deleted from the dead-letter queue only
//! after the send succeeded, so nothing is lost: a crash in between leaves a copy in both,
//! and the pipeline recognises duplicates (see ARCHITECTURE.md).

use std::process::ExitCode;
use std::time::Duration;

use anyhow::anyhow;
use shotlabel_aws::SqsQueue;
use shotlabel_core::ports::{MAX_BATCH_MESSAGES, OutgoingMessage, Queue};

use crate::backfill::check_queue;
use crate::stack::{Aws, StackArgs, adapter_error, resolve};

#[derive(Debug, clap::Args)]
pub struct RedriveArgs {
    #[command(flatten)]
    pub stack: StackArgs,
    /// Redrive the harvest dead-letter queue into the harvest queue instead.
    #[arg(long)]
    pub harvest: bool,
    /// Move at most this many messages (all by default).
    #[arg(long, value_name = "N")]
    pub max: Option<u64>,
    /// Print the summary as JSON.
    #[arg(long)]
    pub json: bool,
}

/// How long a received dead-letter message stays hidden while it is being moved; one that
/// could not be sent reappears in the dead-letter queue after this.
const MOVE_VISIBILITY: Duration = Duration::from_secs(120);
/// Long polling, so an empty answer means the queue is empty rather than a sampled miss.
const RECEIVE_WAIT: Duration = Duration::from_secs(1);

#[derive(Debug, Default, serde::Serialize)]
struct Summary {
    from: String,
    to: String,
    moved: u64,
    /// Sent, but their dead-letter copy could not be deleted (they may be moved twice).
    not_deleted: u64,
    /// Refused by the queue; they stay in the dead-letter queue.
    not_sent: u64,
}

pub fn run(args: RedriveArgs) -> anyhow::Result<ExitCode> {
    crate::stack::runtime()?.block_on(redrive(args))
}

async fn redrive(args: RedriveArgs) -> anyhow::Result<ExitCode> {
    let aws = Aws::connect().await?;
    let stack = resolve(&args.stack, &aws).await?;
    let (from, to) = if args.harvest {
        (
            stack.harvest_dead_letter_queue_url()?,
            stack.harvest_queue_url()?,
        )
    } else {
        (
            stack.pending_dead_letter_queue_url()?,
            stack.pending_queue_url()?,
        )
    };
    if from == to {
        return Err(anyhow!(
            "the dead-letter queue and the queue are the same ({from}); nothing to move"
        ));
    }
    check_queue(&aws, from).await?;
    check_queue(&aws, to).await?;

    let queue = SqsQueue::new(aws.sqs.clone());
    let mut summary = Summary {
        from: from.to_owned(),
        to: to.to_owned(),
        ..Summary::default()
    };
    let limit = args.max.unwrap_or(u64::MAX);
    let mut handled = 0u64;
    while handled < limit {
        let want = (limit - handled).min(MAX_BATCH_MESSAGES as u64) as u32;
        let received = queue
            .receive(from, want, MOVE_VISIBILITY, RECEIVE_WAIT)
            .await
            .map_err(|e| anyhow!("{}", adapter_error(&e)))?;
        if received.is_empty() {
            break;
        }
        handled += received.len() as u64;
        let messages: Vec<OutgoingMessage> = received
            .iter()
            .enumerate()
            .map(|(i, m)| OutgoingMessage {
                id: i.to_string(),
                body: m.body.clone(),
            })
            .collect();
        let refused = queue
            .send_batch(to, &messages)
            .await
            .map_err(|e| anyhow!("{} (nothing was deleted)", adapter_error(&e)))?;
        let sent: Vec<String> = received
            .iter()
            .enumerate()
            .filter(|(i, _)| !refused.contains(&i.to_string()))
            .map(|(_, m)| m.receipt_handle.clone())
            .collect();
        summary.not_sent += refused.len() as u64;
        let failed = queue.delete_batch(from, &sent).await.map_err(|e| {
            anyhow!(
                "{} ({} message(s) were sent but are still in the dead-letter queue)",
                adapter_error(&e),
                sent.len()
            )
        })?;
        summary.not_deleted += failed.len() as u64;
        summary.moved += (sent.len() - failed.len()) as u64;
    }

    if args.json {
        println!("{}", serde_json::to_string(&summary)?);
    } else {
        println!("moved {} message(s) from {} to {}", summary.moved, from, to);
        if summary.not_sent > 0 {
            println!(
                "{} message(s) were refused by the queue and stay in the dead-letter queue",
                summary.not_sent
            );
        }
        if summary.not_deleted > 0 {
            println!(
                "{} message(s) were sent but could not be deleted from the dead-letter queue",
                summary.not_deleted
            );
        }
    }
    Ok(if summary.not_sent + summary.not_deleted > 0 {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}
