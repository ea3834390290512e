//! `shotlabel export --format parquet`: the dataset parts of one task version (or of every
//! version, `--include-stale`), read from `dataset/` and not from `labels/`: one listing
//! page per 1,000 parts (a part holds a harvest's labels, up to 50,000), one GET per part.
//!
//! Writes `DIR/labels.parquet`, one file with every row, or with `--parts` a copy of the
//! parts below `DIR/` as they are laid out in the bucket (`task=…/version=…/batch=…/`),
//! which Hive-partitioned readers take as they are.

use std::path::{Path, PathBuf};

use anyhow::{Context, anyhow, bail};
use parquet::arrow::ArrowWriter;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use parquet::basic::Compression;
use parquet::file::properties::WriterProperties;
use shotlabel_core::dataset;

use crate::stack::{Aws, Lister, printable};

pub const PARQUET_FILE: &str = "labels.parquet";

/// What the export wrote.
#[derive(Debug, Default, serde::Serialize)]
pub struct ParquetSummary {
    pub out: String,
    pub format: &'static str,
    pub task_version: Option<String>,
    /// Parts read.
    pub parts: u64,
    /// Rows written.
    pub labels: u64,
}

/// Exports the parts under `prefix` (a task version's, or a task's).
pub async fn export(
    aws: &Aws,
    bucket: &str,
    prefix: &str,
    out: &Path,
    keep_parts: bool,
) -> anyhow::Result<ParquetSummary> {
    let mut keys = Vec::new();
    let mut lister = Lister::new(aws, bucket, prefix);
    while let Some(page) = lister.next_page().await? {
        keys.extend(
            page.into_iter()
                .map(|o| o.key)
                .filter(|k| k.ends_with(".parquet")),
        );
    }
    let mut summary = ParquetSummary {
        out: out.display().to_string(),
        format: if keep_parts {
            "parquet-parts"
        } else {
            "parquet"
        },
        ..ParquetSummary::default()
    };
    if keep_parts {
        for key in &keys {
            let bytes = get(aws, bucket, key).await?;
            summary.labels += rows_in(&bytes, key)?;
            let relative = key
                .strip_prefix(dataset::DATASET_PREFIX)
                .ok_or_else(|| anyhow!("{key} is not below {}", dataset::DATASET_PREFIX))?;
            write_file(out, relative, &bytes)?;
            summary.parts += 1;
        }
        return Ok(summary);
    }

    let target = out.join(PARQUET_FILE);
    let temp = tempfile::Builder::new()
        .prefix(".shotlabel-")
        .tempfile_in(out)
        .with_context(|| format!("cannot write in {}", out.display()))?;
    let mut writer: Option<ArrowWriter<std::fs::File>> = None;
    let mut first_schema = None;
    for key in &keys {
        let bytes = get(aws, bucket, key).await?;
        let reader = ParquetRecordBatchReaderBuilder::try_new(bytes::Bytes::from(bytes))
            .with_context(|| format!("reading {}", printable(key)))?;
        let schema = reader.schema().clone();
        match &first_schema {
            None => first_schema = Some((schema.clone(), key.clone())),
            Some((first, first_key)) if first != &schema => bail!(
                "{} and {} have different columns (task versions with different answer schemas); \
                 export one version at a time (--task-version) or keep the parts (--parts)",
                printable(first_key),
                printable(key)
            ),
            Some(_) => {}
        }
        if writer.is_none() {
            let properties = WriterProperties::builder()
                .set_compression(Compression::SNAPPY)
                .build();
            writer = Some(ArrowWriter::try_new(
                temp.as_file().try_clone()?,
                schema,
                Some(properties),
            )?);
        }
        let Some(writer) = writer.as_mut() else {
            continue;
        };
        for batch in reader.build()? {
            let batch = batch.with_context(|| format!("reading {}", printable(key)))?;
            summary.labels += batch.num_rows() as u64;
            writer.write(&batch)?;
        }
        summary.parts += 1;
    }
    match writer {
        Some(writer) => {
            writer.close()?;
        }
        None => {
            // No parts: an empty file with the task's columns would need the task; say so.
            bail!(
                "no dataset parts under s3://{bucket}/{prefix}: nothing has been harvested \
                 under this task version yet"
            );
        }
    }
    temp.persist(&target)
        .map_err(|e| anyhow!("cannot write {}: {}", target.display(), e.error))?;
    Ok(summary)
}

fn rows_in(bytes: &[u8], key: &str) -> anyhow::Result<u64> {
    let reader = ParquetRecordBatchReaderBuilder::try_new(bytes::Bytes::copy_from_slice(bytes))
        .with_context(|| format!("reading {}", printable(key)))?;
    Ok(u64::try_from(reader.metadata().file_metadata().num_rows()).unwrap_or(0))
}

pub(super) async fn get(aws: &Aws, bucket: &str, key: &str) -> anyhow::Result<Vec<u8>> {
    super::get_object(aws, bucket, key, None)
        .await?
        .ok_or_else(|| {
            anyhow!(
                "s3://{bucket}/{} was deleted during the export",
                printable(key)
            )
        })
}

/// Writes a part below `out`; its path comes from our own key layout, checked anyway.
fn write_file(out: &Path, relative: &str, bytes: &[u8]) -> anyhow::Result<()> {
    let safe = relative
        .split('/')
        .all(|s| !s.is_empty() && s != "." && s != ".." && !s.contains('\\'));
    if !safe {
        bail!("refusing the part path {}", printable(relative));
    }
    let path: PathBuf = out.join(relative);
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)
            .with_context(|| format!("cannot create {}", parent.display()))?;
    }
    std::fs::write(&path, bytes).with_context(|| format!("cannot write {}", path.display()))
}
