//! Reading the bucket: the input keys, every label (from the dataset's Parquet parts, one
//! GET per part rather than one per label), and every failed and batch record.

use anyhow::Context;
use futures_util::stream::{self, StreamExt};
use shotlabel_core::dataset;
use shotlabel_core::ports::{ObjectStore, StoreError};
use shotlabel_core::records::{BatchRecord, FailedRecord, LabelRecord};
use shotlabel_core::task::Task;

/// Records read at once.
const CONCURRENT_READS: usize = 16;

/// Where the pipeline writes; with an empty input prefix these are not inputs.
const OUTPUT_PREFIXES: [&str; 6] = [
    "labels/",
    "failed/",
    "state/",
    "results/",
    "dataset/",
    "athena-results/",
];

/// Everything read from the bucket.
#[derive(Debug, Default)]
pub(super) struct BucketData {
    /// Keys of the objects under the input prefix.
    pub inputs: Vec<String>,
    /// Label records with the key of the part they were read from, in the images' key
    /// order; the latest row of an image relabelled in a later batch.
    pub labels: Vec<(String, LabelRecord)>,
    pub failed: Vec<(String, FailedRecord)>,
    pub batches: Vec<(String, BatchRecord)>,
    /// Records that could not be read or parsed: key and why.
    pub unreadable: Vec<(String, String)>,
}

/// Lists the inputs and reads every record. Only a listing that fails is an error; a
/// record that cannot be read is kept in [`BucketData::unreadable`].
pub(super) async fn gather<S: ObjectStore>(
    store: &S,
    bucket: &str,
    input_prefix: &str,
    tasks: &[Task],
) -> anyhow::Result<BucketData> {
    let list = |prefix: &str| {
        let prefix = prefix.to_owned();
        async move {
            store
                .list(bucket, &prefix)
                .await
                .with_context(|| format!("cannot list s3://{bucket}/{prefix}"))
        }
    };
    let inputs: Vec<String> = list(input_prefix)
        .await?
        .into_iter()
        .filter(|k| !k.ends_with('/'))
        // With an empty input prefix the listing holds the pipeline's own outputs too.
        .filter(|k| !input_prefix.is_empty() || !OUTPUT_PREFIXES.iter().any(|p| k.starts_with(p)))
        .collect();
    let json_keys = |keys: Vec<String>| -> Vec<String> {
        keys.into_iter().filter(|k| k.ends_with(".json")).collect()
    };
    let part_keys: Vec<String> = list(dataset::DATASET_PREFIX)
        .await?
        .into_iter()
        .filter(|k| k.ends_with(".parquet"))
        .collect();
    let failed_keys = json_keys(list("failed/").await?);
    let batch_keys = json_keys(list("state/batches/").await?);

    let mut unreadable = Vec::new();
    let labels = read_parts(store, bucket, part_keys, tasks, &mut unreadable).await;
    let failed = read_records::<_, FailedRecord>(store, bucket, failed_keys, &mut unreadable).await;
    let batches = read_records::<_, BatchRecord>(store, bucket, batch_keys, &mut unreadable).await;
    Ok(BucketData {
        inputs,
        labels,
        failed,
        batches,
        unreadable,
    })
}

/// Reads every part's rows as label records, the latest per image and task version; what
/// cannot be read goes to `unreadable`.
async fn read_parts<S: ObjectStore>(
    store: &S,
    bucket: &str,
    keys: Vec<String>,
    tasks: &[Task],
    unreadable: &mut Vec<(String, String)>,
) -> Vec<(String, LabelRecord)> {
    let results: Vec<(String, Result<Vec<_>, String>)> = stream::iter(keys)
        .map(|key| async move {
            let result = match store.get(bucket, &key).await {
                Ok(object) => tokio::task::spawn_blocking(move || dataset::read_part(object.body))
                    .await
                    .map_err(|e| e.to_string())
                    .and_then(|rows| rows.map_err(|e| format!("not a readable part: {e}"))),
                Err(StoreError::NotFound { .. }) => Err("deleted while the report was read".into()),
                Err(e) => Err(e.to_string()),
            };
            (key, result)
        })
        .buffered(CONCURRENT_READS)
        .collect()
        .await;
    let mut latest = dataset::LatestLabels::default();
    for (key, result) in results {
        let rows = match result {
            Ok(rows) => rows,
            Err(reason) => {
                unreadable.push((key, reason));
                continue;
            }
        };
        let Some(task_name) = dataset::task_of_key(&key).map(str::to_owned) else {
            unreadable.push((key, "not below dataset/task=<name>/".into()));
            continue;
        };
        let task = tasks.iter().find(|t| t.name() == task_name);
        for row in rows {
            match dataset::record_of_row(row, &task_name, task) {
                Some(record) => latest.add(key.clone(), record),
                None => unreadable.push((key.clone(), "a row lacks its provenance".into())),
            }
        }
    }
    let mut labels = latest.into_rows();
    // In the images' key order, as the label objects used to be listed.
    labels.sort_by(|(_, a), (_, b)| {
        (&a.source.key, &a.task.version).cmp(&(&b.source.key, &b.task.version))
    });
    labels
}

/// Reads and parses records, in key order; what cannot be read goes to `unreadable`.
async fn read_records<S: ObjectStore, T: serde::de::DeserializeOwned>(
    store: &S,
    bucket: &str,
    keys: Vec<String>,
    unreadable: &mut Vec<(String, String)>,
) -> Vec<(String, T)> {
    let results: Vec<(String, Result<T, String>)> = stream::iter(keys)
        .map(|key| async move {
            let result = match store.get(bucket, &key).await {
                Ok(object) => serde_json::from_slice::<T>(&object.body)
                    .map_err(|e| format!("not a valid record: {e}")),
                Err(StoreError::NotFound { .. }) => Err("deleted while the report was read".into()),
                Err(e) => Err(e.to_string()),
            };
            (key, result)
        })
        .buffered(CONCURRENT_READS)
        .collect()
        .await;
    let mut records = Vec::with_capacity(results.len());
    for (key, result) in results {
        match result {
            Ok(record) => records.push((key, record)),
            Err(reason) => unreadable.push((key, reason)),
        }
    }
    records
}
