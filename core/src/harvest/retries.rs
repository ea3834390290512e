//! A batch's retries, planned once in the bucket before they are sent, so a repeated
//! harvest sends nothing twice.

use serde::{Deserialize, Serialize};

use crate::ports::{ObjectStore, Queue, StoreError, WriteCondition};
use crate::records::PendingItem;
use crate::terminal::{FailedWrite, TerminalRecords, send_pending};

use super::state::read_json;
use super::{HarvestConfig, HarvestError};

/// A retry decided during a harvest: the item one attempt later.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct RetryPlan {
    items: Vec<PendingItem>,
    sent: bool,
}

/// Requeues the retries of a batch exactly once: the plan is written to S3 before it is
/// sent and marked sent after, so a second harvest reuses the first one's decision.
/// Returns (requeued, failed).
pub(super) async fn requeue<S: ObjectStore, Q: Queue>(
    store: &S,
    queue: &Q,
    config: &HarvestConfig,
    records: TerminalRecords<'_, S>,
    batch_id: &str,
    plan_key: &str,
    retries: Vec<PendingItem>,
) -> Result<(u64, u64), HarvestError> {
    let (requeue, exhausted): (Vec<_>, Vec<_>) = retries.into_iter().partition(|item| {
        item.attempt <= config.max_retries && item.requeues <= config.max_requeues
    });
    let mut failed = 0;
    for item in exhausted {
        if records.write_failed(item.source(), item.reasons).await? == FailedWrite::Written {
            failed += 1;
        }
    }
    if requeue.is_empty() {
        return Ok((0, failed));
    }
    let key = plan_key;
    let plan = RetryPlan {
        items: requeue,
        sent: false,
    };
    let (plan, etag) = match store
        .put(
            &config.bucket,
            key,
            serde_json::to_vec(&plan)?,
            "application/json",
            WriteCondition::IfAbsent,
        )
        .await
    {
        Ok(etag) => (plan, etag),
        Err(StoreError::ConditionFailed { .. }) => {
            let Some((earlier, etag)) =
                read_json::<S, RetryPlan>(store, &config.bucket, key).await?
            else {
                return Err(HarvestError::InProgress {
                    batch_id: batch_id.to_owned(),
                });
            };
            if earlier.sent {
                return Ok((earlier.items.len() as u64, failed));
            }
            (earlier, etag)
        }
        Err(e) => return Err(e.into()),
    };
    send_pending(queue, &config.pending_queue_url, &plan.items).await?;
    let sent = RetryPlan {
        items: plan.items,
        sent: true,
    };
    let count = sent.items.len() as u64;
    match store
        .put(
            &config.bucket,
            key,
            serde_json::to_vec(&sent)?,
            "application/json",
            WriteCondition::IfMatch(etag),
        )
        .await
    {
        Ok(_) | Err(StoreError::ConditionFailed { .. }) => {}
        Err(e) => return Err(e.into()),
    }
    Ok((count, failed))
}
