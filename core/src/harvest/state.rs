//! A batch's state in the bucket: which batch a request means, the state record, the open
//! marker.

use crate::batch_api::Batch;
use crate::ports::{ObjectStore, StoreError, WriteCondition};
use crate::records::{
    BatchPhase, BatchRecord, HarvestCounts, HarvestRequest, Manifest, state_keys, unix_now,
};

use super::{HarvestConfig, HarvestError};

pub(super) async fn resolve_batch_id<S: ObjectStore>(
    store: &S,
    bucket: &str,
    request: &HarvestRequest,
) -> Result<String, HarvestError> {
    if let Some(id) = request.batch_id.as_deref().filter(|id| !id.is_empty()) {
        return Ok(id.to_owned());
    }
    let Some(manifest) = request.manifest.as_deref() else {
        return Err(HarvestError::Unresolvable);
    };
    match store
        .get(bucket, &state_keys::manifest_batch(manifest))
        .await
    {
        Ok(object) => String::from_utf8(object.body)
            .ok()
            .filter(|id| !id.is_empty())
            .ok_or(HarvestError::Unresolvable),
        Err(StoreError::NotFound { .. }) => Err(HarvestError::Unresolvable),
        Err(e) => Err(e.into()),
    }
}

/// A JSON object and its etag, or `None` when absent.
pub(super) async fn read_json<S: ObjectStore, T: serde::de::DeserializeOwned>(
    store: &S,
    bucket: &str,
    key: &str,
) -> Result<Option<(T, String)>, HarvestError> {
    match store.get(bucket, key).await {
        Ok(object) => Ok(Some((serde_json::from_slice(&object.body)?, object.etag))),
        Err(StoreError::NotFound { .. }) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

pub(super) async fn remove_open_marker<S: ObjectStore>(store: &S, bucket: &str, batch_id: &str) {
    if let Err(e) = store
        .delete(bucket, &state_keys::open_marker(batch_id))
        .await
    {
        // Reconciliation will find the batch harvested and try again.
        tracing::warn!(%batch_id, error = %e, "cannot remove the open marker");
    }
}

/// Moves the state record to harvested, creating it if the submitter crashed before
/// writing it. A lost race means another harvest finished the same batch: fine. `true`
/// when this call moved it.
pub(super) async fn finish_record<S: ObjectStore>(
    store: &S,
    config: &HarvestConfig,
    batch: &Batch,
    manifest: &Manifest,
    record: Option<(BatchRecord, String)>,
    counts: HarvestCounts,
) -> Result<bool, HarvestError> {
    let (mut next, condition) = match record {
        Some((record, etag)) => (record, WriteCondition::IfMatch(etag)),
        None => (
            BatchRecord {
                batch_id: batch.id.clone(),
                manifest: manifest.name.clone(),
                submission_id: manifest.submission_id.clone(),
                input_file_id: batch.input_file_id.clone().unwrap_or_default(),
                requests: manifest.items.len() as u64,
                bytes: 0,
                task: manifest.task.clone(),
                model: manifest.model.clone(),
                phase: BatchPhase::Open,
                submitted_at: manifest.created_at,
                provider_status: None,
                harvest: None,
                harvested_at: None,
            },
            WriteCondition::IfAbsent,
        ),
    };
    next.phase = BatchPhase::Harvested;
    next.provider_status = Some(batch.status.to_string());
    next.harvest = Some(counts);
    next.harvested_at = Some(unix_now());
    let body = serde_json::to_vec_pretty(&next)?;
    match store
        .put(
            &config.bucket,
            &state_keys::batch(&batch.id),
            body,
            "application/json",
            condition,
        )
        .await
    {
        Ok(_) => Ok(true),
        Err(StoreError::ConditionFailed { .. }) => Ok(false),
        Err(e) => Err(e.into()),
    }
}
