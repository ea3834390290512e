//! Provider backpressure shared by every submit worker: open-batch slots and the upload
//! clock, both kept in the bucket with conditional writes, so that any number of workers
//! (Lambdas or local tasks) start no more work than the provider takes, and wait rather
//! than fail.
//!
//! - **Slots.** `state/slots/<n>`, `n < slots`, each held by one manifest from before its
//!   messages are taken until its batch is harvested. A claim is a write with
//!   `If-None-Match: *`, so two workers never hold one slot. A worker that crashed with a
//!   slot leaves a claim whose batch either does not exist (after the lease it is taken
//!   over) or is harvested (taken over at once); see [`claim_slot`].
//! - **Upload clock.** `state/provider/upload-clock` holds the time of the last upload; a
//!   worker takes its turn by advancing it with `If-Match`, so uploads are at least
//!   `upload_interval` apart across all workers.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::time::Instant;

use crate::ports::{ObjectStore, StoreError, WriteCondition};
use crate::records::{BatchPhase, BatchRecord, state_keys, unix_now};

/// What the provider takes at once. Zero means no limit.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ProviderLimits {
    /// The most batches open (submitted, not yet harvested) at once.
    pub max_open_batches: u32,
    /// The most requests in open batches at once (OpenAI's enqueued limit is in tokens;
    /// requests × the task's tokens per request is the conversion).
    pub max_enqueued_requests: u64,
    /// The shortest time between two file uploads (Inference.net: one a minute).
    pub upload_interval: Duration,
    /// How often a waiting worker looks again.
    pub poll_interval: Duration,
}

impl ProviderLimits {
    /// Open-batch slots: the tighter of the two limits, counting every batch as full
    /// (`batch_requests` each), which is exact for the enqueued limit's worst case.
    /// `None`: no limit.
    pub fn slots(&self, batch_requests: usize) -> Option<u32> {
        let by_requests = (self.max_enqueued_requests > 0).then(|| {
            let per_batch = batch_requests.max(1) as u64;
            u32::try_from(self.max_enqueued_requests / per_batch)
                .unwrap_or(u32::MAX)
                .max(1)
        });
        let by_batches = (self.max_open_batches > 0).then_some(self.max_open_batches);
        match (by_batches, by_requests) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }
}

/// One slot's claim.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SlotClaim {
    /// The manifest the slot is for (named before the batch exists).
    pub manifest: String,
    /// Unix seconds.
    pub claimed_at: u64,
}

/// A slot held by this worker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeldSlot {
    pub index: u32,
    pub manifest: String,
    /// The etag of this worker's claim: re-pointing it is conditional on it, so a claim
    /// taken over while this worker was slow is noticed, not overwritten.
    pub etag: String,
}

/// Claims one of `slots` slots for `manifest`, looking again every `poll` until `until`.
/// `None` when none came free in time. A slot whose batch is harvested, or whose claim
/// is older than `lease` with no batch created for it, is taken over.
pub async fn claim_slot<S: ObjectStore>(
    store: &S,
    bucket: &str,
    slots: u32,
    manifest: &str,
    lease: Duration,
    poll: Duration,
    until: Instant,
) -> Result<Option<HeldSlot>, StoreError> {
    // Start at a random slot, so that many workers do not all race for slot 0.
    let start = rand::random_range(0..slots.max(1));
    loop {
        let claim = SlotClaim {
            manifest: manifest.to_owned(),
            claimed_at: unix_now(),
        };
        let body = serde_json::to_vec(&claim).map_err(|e| StoreError::Other(e.to_string()))?;
        for offset in 0..slots {
            let index = (start + offset) % slots;
            let key = state_keys::slot(index);
            match store
                .put(
                    bucket,
                    &key,
                    body.clone(),
                    "application/json",
                    WriteCondition::IfAbsent,
                )
                .await
            {
                Ok(etag) => {
                    return Ok(Some(HeldSlot {
                        index,
                        manifest: manifest.to_owned(),
                        etag,
                    }));
                }
                Err(StoreError::ConditionFailed { .. }) => {}
                Err(e) => return Err(e),
            }
        }
        // Every slot is claimed: take over one whose holder is done with it.
        for offset in 0..slots {
            let index = (start + offset) % slots;
            let key = state_keys::slot(index);
            let object = match store.get(bucket, &key).await {
                Ok(object) => object,
                Err(StoreError::NotFound { .. }) => continue,
                Err(e) => return Err(e),
            };
            let Ok(held) = serde_json::from_slice::<SlotClaim>(&object.body) else {
                continue;
            };
            if !stale(store, bucket, &held, lease).await? {
                continue;
            }
            match store
                .put(
                    bucket,
                    &key,
                    body.clone(),
                    "application/json",
                    WriteCondition::IfMatch(object.etag),
                )
                .await
            {
                Ok(etag) => {
                    tracing::info!(slot = index, from = %held.manifest, "took over a stale slot");
                    return Ok(Some(HeldSlot {
                        index,
                        manifest: manifest.to_owned(),
                        etag,
                    }));
                }
                Err(StoreError::ConditionFailed { .. }) => {}
                Err(e) => return Err(e),
            }
        }
        let now = Instant::now();
        if now >= until {
            return Ok(None);
        }
        // Jittered, so waiting workers do not poll in step.
        let wait = poll.mul_f64(rand::random_range(0.5..1.5));
        tokio::time::sleep(wait.min(until - now)).await;
    }
}

/// Points a held slot's claim at `manifest` (a slot claimed ahead, now for a file about
/// to be submitted), with a fresh claim time. Conditional on the claim being this
/// worker's still: `None` when it was taken over meanwhile (held past the lease, as a slow
/// drain under load can), so that the caller claims another rather than overwrite the
/// new holder's claim and open one batch too many.
pub async fn repoint_slot<S: ObjectStore>(
    store: &S,
    bucket: &str,
    slot: &HeldSlot,
    manifest: &str,
) -> Result<Option<HeldSlot>, StoreError> {
    let claim = SlotClaim {
        manifest: manifest.to_owned(),
        claimed_at: unix_now(),
    };
    let body = serde_json::to_vec(&claim).map_err(|e| StoreError::Other(e.to_string()))?;
    match store
        .put(
            bucket,
            &state_keys::slot(slot.index),
            body,
            "application/json",
            WriteCondition::IfMatch(slot.etag.clone()),
        )
        .await
    {
        Ok(etag) => Ok(Some(HeldSlot {
            index: slot.index,
            manifest: manifest.to_owned(),
            etag,
        })),
        Err(StoreError::ConditionFailed { .. }) => Ok(None),
        Err(e) => Err(e),
    }
}

/// True when the claim's holder no longer needs the slot: its batch is harvested, or no
/// batch was created for it within the lease (the worker crashed or gave up).
async fn stale<S: ObjectStore>(
    store: &S,
    bucket: &str,
    claim: &SlotClaim,
    lease: Duration,
) -> Result<bool, StoreError> {
    let batch_id = match store
        .get(bucket, &state_keys::manifest_batch(&claim.manifest))
        .await
    {
        Ok(object) => String::from_utf8_lossy(&object.body).into_owned(),
        Err(StoreError::NotFound { .. }) => {
            return Ok(unix_now().saturating_sub(claim.claimed_at) > lease.as_secs());
        }
        Err(e) => return Err(e),
    };
    match store.get(bucket, &state_keys::batch(&batch_id)).await {
        Ok(object) => Ok(serde_json::from_slice::<BatchRecord>(&object.body)
            .is_ok_and(|record| record.phase == BatchPhase::Harvested)),
        Err(StoreError::NotFound { .. }) => Ok(false),
        Err(e) => Err(e),
    }
}

/// Gives a slot back, if `manifest` still holds it. Called when a batch is harvested, or
/// was never created. (Between the read and the delete another worker can only have
/// taken the slot over if this claim was stale, which a live holder's is not.)
pub async fn release_slot<S: ObjectStore>(
    store: &S,
    bucket: &str,
    index: u32,
    manifest: &str,
) -> Result<(), StoreError> {
    let key = state_keys::slot(index);
    let object = match store.get(bucket, &key).await {
        Ok(object) => object,
        Err(StoreError::NotFound { .. }) => return Ok(()),
        Err(e) => return Err(e),
    };
    let ours = serde_json::from_slice::<SlotClaim>(&object.body)
        .is_ok_and(|claim| claim.manifest == manifest);
    if ours {
        store.delete(bucket, &key).await?;
    }
    Ok(())
}

/// The upload clock's content.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
struct UploadClock {
    /// Unix milliseconds of the latest upload turn taken.
    last_upload_ms: u64,
}

fn unix_now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Waits until an upload is allowed (at least `interval` after the last one any worker
/// took) and takes the turn. `false` when the turn did not come before `until`.
pub async fn take_upload_turn<S: ObjectStore>(
    store: &S,
    bucket: &str,
    interval: Duration,
    until: Instant,
) -> Result<bool, StoreError> {
    if interval.is_zero() {
        return Ok(true);
    }
    let key = state_keys::UPLOAD_CLOCK;
    loop {
        let (last, condition) = match store.get(bucket, key).await {
            Ok(object) => (
                serde_json::from_slice::<UploadClock>(&object.body).map_or(0, |c| c.last_upload_ms),
                WriteCondition::IfMatch(object.etag),
            ),
            Err(StoreError::NotFound { .. }) => (0, WriteCondition::IfAbsent),
            Err(e) => return Err(e),
        };
        let now = unix_now_ms();
        let next = last.saturating_add(interval.as_millis() as u64);
        if now >= next {
            let body = serde_json::to_vec(&UploadClock {
                last_upload_ms: now,
            })
            .map_err(|e| StoreError::Other(e.to_string()))?;
            match store
                .put(bucket, key, body, "application/json", condition)
                .await
            {
                Ok(_) => return Ok(true),
                // Another worker took this turn: wait for the next.
                Err(StoreError::ConditionFailed { .. }) => continue,
                Err(e) => return Err(e),
            }
        }
        let wait = Duration::from_millis(next - now);
        let left = until.saturating_duration_since(Instant::now());
        if wait > left {
            return Ok(false);
        }
        tokio::time::sleep(wait).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_take_the_tighter_limit() {
        let none = ProviderLimits::default();
        assert_eq!(none.slots(10_000), None);
        let open = ProviderLimits {
            max_open_batches: 4,
            ..ProviderLimits::default()
        };
        assert_eq!(open.slots(10_000), Some(4));
        let enqueued = ProviderLimits {
            max_enqueued_requests: 25_000,
            ..ProviderLimits::default()
        };
        assert_eq!(enqueued.slots(10_000), Some(2));
        // Never zero: one batch always fits, even if larger than the limit.
        assert_eq!(enqueued.slots(50_000), Some(1));
        let both = ProviderLimits {
            max_open_batches: 4,
            max_enqueued_requests: 25_000,
            ..ProviderLimits::default()
        };
        assert_eq!(both.slots(1_000), Some(4));
        assert_eq!(both.slots(10_000), Some(2));
    }

    /// A worker that held a slot past the lease (a slow drain) finds, when it re-points
    /// its claim, that the slot was taken over: the write conditional on its claim's etag
    /// fails instead of overwriting the new holder's (which once let a third batch open
    /// under a limit of two, on a loaded machine).
    #[tokio::test]
    async fn a_claim_taken_over_cannot_be_overwritten_by_its_old_holder() {
        use crate::memory::MemoryStore;
        let store = MemoryStore::default();
        let until = || Instant::now() + Duration::from_secs(5);
        let poll = Duration::from_millis(10);
        let slow = claim_slot(&store, "b", 1, "manifest-a", Duration::ZERO, poll, until())
            .await
            .ok()
            .flatten()
            .expect("a free slot");
        // Older than a zero lease, and no batch was created for it.
        tokio::time::sleep(Duration::from_millis(1_100)).await;
        let taker = claim_slot(&store, "b", 1, "manifest-b", Duration::ZERO, poll, until())
            .await
            .ok()
            .flatten()
            .expect("the stale slot taken over");
        assert_eq!(taker.index, slow.index);
        let lost = repoint_slot(&store, "b", &slow, "manifest-a2").await;
        assert!(matches!(lost, Ok(None)), "{lost:?}");
        // The new holder's claim stands, and it can re-point its own.
        let claim: SlotClaim = serde_json::from_slice(
            &store
                .get("b", &state_keys::slot(0))
                .await
                .expect("claim")
                .body,
        )
        .expect("a claim");
        assert_eq!(claim.manifest, "manifest-b");
        let moved = repoint_slot(&store, "b", &taker, "manifest-b2")
            .await
            .expect("no store error")
            .expect("still the taker's");
        assert_eq!(moved.manifest, "manifest-b2");
        // And again with the etag of the re-pointed claim, not the first one.
        assert!(matches!(
            repoint_slot(&store, "b", &taker, "manifest-b3").await,
            Ok(None)
        ));
        assert!(
            repoint_slot(&store, "b", &moved, "manifest-b3")
                .await
                .is_ok_and(|s| s.is_some())
        );
    }
}
