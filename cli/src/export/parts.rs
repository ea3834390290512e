//! The rows of the dataset parts below a prefix, one per image: what `export --format
//! jsonl|imagefolder` and the report read instead of one `labels/` object per image.
//!
//! Cost at scale: one LIST page per 1,000 parts and one GET per part, where a part holds up
//! to a harvest's 50,000 labels; a billion labels are about 20,000 parts, so 20 LIST calls
//! and 20,000 GETs instead of a million LIST pages and a billion GETs. The rows are held in
//! memory (a few hundred bytes each) to keep the latest of an image relabelled in a later
//! batch; exports of hundreds of millions of rows belong in Athena or DuckDB.

use anyhow::Context;
use futures_util::{StreamExt, TryStreamExt};
use shotlabel_core::dataset;
use shotlabel_core::records::LabelRecord;
use shotlabel_core::task::Task;

use crate::stack::{Aws, Lister};

/// Parts fetched at once.
const PARTS_IN_FLIGHT: usize = 8;

/// What reading the parts came to.
#[derive(Debug, Default)]
pub struct PartRows {
    /// One label per image and task version, as its part holds it.
    pub rows: Vec<LabelRecord>,
    /// Parts read.
    pub parts: u64,
    /// Parts (or rows) that could not be read, with why.
    pub unreadable: Vec<(String, String)>,
    /// Older rows of images relabelled in a later batch, left out.
    pub replaced: u64,
    /// LIST calls made (one per page of parts).
    pub list_calls: u64,
}

/// Every part's rows below `prefix`, the latest row per image and task version. `task`
/// (the one the export was asked for) parses its own version's JSON-text columns back.
pub async fn read_rows(
    aws: &Aws,
    bucket: &str,
    prefix: &str,
    task: &Task,
) -> anyhow::Result<PartRows> {
    let mut keys = Vec::new();
    let mut result = PartRows::default();
    let mut lister = Lister::new(aws, bucket, prefix);
    while let Some(page) = lister.next_page().await? {
        result.list_calls += 1;
        keys.extend(
            page.into_iter()
                .map(|o| o.key)
                .filter(|k| k.ends_with(".parquet")),
        );
    }
    let mut parts = futures_util::stream::iter(keys)
        .map(|key| async move {
            let bytes = super::to_parquet::get(aws, bucket, &key).await?;
            let rows = tokio::task::spawn_blocking(move || dataset::read_part(bytes))
                .await
                .context("reading a part")?;
            anyhow::Ok((key, rows))
        })
        .buffered(PARTS_IN_FLIGHT);
    let mut latest = dataset::LatestLabels::default();
    while let Some((key, rows)) = parts.try_next().await? {
        let rows = match rows {
            Ok(rows) => rows,
            Err(e) => {
                result.unreadable.push((key, e.to_string()));
                continue;
            }
        };
        result.parts += 1;
        let task_name = dataset::task_of_key(&key).unwrap_or(task.name()).to_owned();
        for row in rows {
            match dataset::record_of_row(row, &task_name, Some(task)) {
                Some(record) => latest.add((), record),
                None => result
                    .unreadable
                    .push((key.clone(), "a row lacks its provenance".into())),
            }
        }
    }
    result.replaced = latest.replaced();
    result.rows = latest
        .into_rows()
        .into_iter()
        .map(|(_, record)| record)
        .collect();
    Ok(result)
}
