//! The scheduled run's fan-out: how many submit workers the backlog needs, and one work
//! ticket on the work queue for each worker to start.
//!
//! A ticket carries nothing but its own id: every worker drains the same pending queue
//! (receives hide each message from the others), so workers need no partition of their
//! own and a lost or repeated ticket costs one idle run at most. The work queue's event
//! source caps how many workers run at once (`MaxSubmitWorkers`); the dispatcher counts
//! the tickets still waiting or running, so a slow backlog does not pile tickets up.

use serde::{Deserialize, Serialize};

use crate::ports::{MAX_BATCH_MESSAGES, OutgoingMessage, Queue, QueueError};
use crate::records::unix_now;

#[derive(Debug, Clone)]
pub struct DispatchConfig {
    pub pending_queue_url: String,
    pub work_queue_url: String,
    /// The most workers at once.
    pub max_workers: usize,
    /// The backlog one worker is started for: the images of one batch.
    pub images_per_worker: usize,
}

/// The body of one work ticket.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkTicket {
    /// Unix seconds when the scheduled run asked for the worker.
    pub dispatched_at: u64,
    /// Which of the run's workers this is (for logs).
    pub worker: usize,
}

/// What one dispatch saw and did.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct DispatchReport {
    /// Images waiting on the pending queue.
    pub pending: u64,
    /// Workers the backlog calls for, up to the cap.
    pub wanted: usize,
    /// Tickets still waiting or being worked on from earlier runs.
    pub already_running: u64,
    /// Tickets sent by this run.
    pub started: usize,
}

/// Workers for a backlog: one per `per_worker` images (rounded up), at most `max`.
pub fn workers_wanted(pending: u64, per_worker: usize, max: usize) -> usize {
    let per_worker = per_worker.max(1) as u64;
    let wanted = pending.div_ceil(per_worker);
    usize::try_from(wanted).unwrap_or(usize::MAX).min(max)
}

/// Reads the backlog and sends a ticket for each worker it needs beyond those already
/// running or waiting.
pub async fn dispatch<Q: Queue>(
    queue: &Q,
    config: &DispatchConfig,
) -> Result<DispatchReport, QueueError> {
    let pending = queue.depth(&config.pending_queue_url).await?;
    let tickets = queue.depth(&config.work_queue_url).await?;
    let wanted = workers_wanted(
        pending.visible,
        config.images_per_worker,
        config.max_workers,
    );
    let already_running = tickets.visible + tickets.in_flight;
    let to_start = wanted.saturating_sub(usize::try_from(already_running).unwrap_or(usize::MAX));
    let now = unix_now();
    let messages: Vec<OutgoingMessage> = (0..to_start)
        .map(|worker| OutgoingMessage {
            id: format!("w{worker}"),
            body: serde_json::to_string(&WorkTicket {
                dispatched_at: now,
                worker,
            })
            .unwrap_or_default(),
        })
        .collect();
    let mut started = 0;
    for chunk in messages.chunks(MAX_BATCH_MESSAGES) {
        let refused = queue.send_batch(&config.work_queue_url, chunk).await?;
        started += chunk.len() - refused.len();
    }
    tracing::info!(
        pending = pending.visible,
        wanted,
        already_running,
        started,
        "submit workers dispatched"
    );
    Ok(DispatchReport {
        pending: pending.visible,
        wanted,
        already_running,
        started,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn workers_follow_the_backlog_up_to_the_cap() {
        assert_eq!(workers_wanted(0, 10_000, 10), 0);
        assert_eq!(workers_wanted(1, 10_000, 10), 1);
        assert_eq!(workers_wanted(10_000, 10_000, 10), 1);
        assert_eq!(workers_wanted(10_001, 10_000, 10), 2);
        assert_eq!(workers_wanted(5_000_000, 10_000, 10), 10);
        assert_eq!(workers_wanted(7, 0, 3), 3);
    }
}
