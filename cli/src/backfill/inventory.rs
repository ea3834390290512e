//! `backfill --inventory`: the objects an S3 Inventory report lists, read from its data
//! files instead of listing the bucket (no LIST request at all, however many objects).
//!
//! A report is a `manifest.json` (`sourceBucket`, `fileFormat`, `fileSchema`, and `files`,
//! each with its `key` and `size` in the bucket the manifest is in) and its data files:
//! - CSV: gzip-compressed, no header row, columns in the order `fileSchema` names them
//!   (`Bucket, Key, Size, …`), keys URL-encoded (a space as `+`);
//! - Parquet: columns named in snake case (`bucket`, `key`, `size`, `e_tag`,
//!   `is_latest`, `is_delete_marker`), keys as they are.
//!
//! ORC reports are refused. Each data file is downloaded to an anonymous temporary file
//! (they can be gigabytes), then parsed on a blocking thread that hands pages of rows to
//! the queueing side through a bounded channel, so memory stays flat.

use std::fs::File;
use std::io::{BufReader, Seek};

use anyhow::{Context, anyhow};
use aws_sdk_s3::operation::get_object::GetObjectError;
use futures_util::{Stream, StreamExt, TryStreamExt};
use indicatif::ProgressBar;
use tokio::io::AsyncWriteExt;
use tokio::sync::mpsc;

use super::Page;
use crate::stack::{Aws, Listed, Subject, one_line, printable};

/// Rows per page handed to the queueing side.
const PAGE_ROWS: usize = 1000;
/// Pages parsed ahead of the queueing side.
const PAGES_AHEAD: usize = 4;
/// Data files looked up at once when the manifest is checked.
const CHECKS_IN_FLIGHT: usize = 16;

/// `manifest.json`, the fields a backfill reads.
#[derive(Debug, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
struct Manifest {
    source_bucket: String,
    file_format: String,
    #[serde(default)]
    file_schema: String,
    files: Vec<DataFile>,
}

#[derive(Debug, Clone, serde::Deserialize)]
struct DataFile {
    key: String,
    /// Bytes, as written: a shorter download is a report still being written or replaced.
    size: u64,
}

/// How the data files are laid out.
#[derive(Debug, Clone)]
enum Format {
    Csv(CsvColumns),
    Parquet,
}

/// The positions of the columns a backfill reads, from the CSV `fileSchema`.
#[derive(Debug, Clone, PartialEq, Eq)]
struct CsvColumns {
    bucket: usize,
    key: usize,
    size: usize,
    etag: usize,
    /// Only in reports of all versions.
    is_latest: Option<usize>,
    is_delete_marker: Option<usize>,
}

/// What this backfill takes from the report: rows for the stack's bucket under the prefix.
#[derive(Debug, Clone)]
pub(crate) struct Scope {
    pub bucket: String,
    pub prefix: String,
}

/// One row, the fields a backfill reads.
#[derive(Debug, Default)]
struct Row {
    bucket: String,
    key: String,
    size: Option<u64>,
    etag: Option<String>,
    is_latest: Option<bool>,
    is_delete_marker: Option<bool>,
}

impl Scope {
    /// The row as an object to queue, or `None` when it is not for this backfill: another
    /// bucket, outside the prefix, a delete marker or an older version (the pipeline
    /// labels what a key holds now).
    fn take(&self, row: Row) -> anyhow::Result<Option<Listed>> {
        if row.bucket != self.bucket
            || !row.key.starts_with(&self.prefix)
            || row.is_delete_marker == Some(true)
            || row.is_latest == Some(false)
        {
            return Ok(None);
        }
        let size = row
            .size
            .ok_or_else(|| anyhow!("{} has no size", printable(&row.key)))?;
        let etag = row
            .etag
            .filter(|e| !e.is_empty())
            .ok_or_else(|| anyhow!("{} has no ETag", printable(&row.key)))?;
        Ok(Some(Listed {
            key: row.key,
            size,
            etag: etag.trim_matches('"').to_owned(),
        }))
    }
}

/// An opened report: its manifest read and checked.
#[derive(Debug)]
pub(crate) struct Inventory {
    bucket: String,
    manifest_key: String,
    files: Vec<DataFile>,
    format: Format,
}

impl Inventory {
    /// Reads the manifest at `uri` (`s3://BUCKET/KEY`; a key ending in `/` means its
    /// `manifest.json`) and checks that the report is of `stack_bucket` and readable.
    pub async fn open(aws: &Aws, uri: &str, stack_bucket: &str) -> anyhow::Result<Self> {
        let (bucket, manifest_key) = parse_uri(uri)?;
        let place = format!("s3://{bucket}/{manifest_key}");
        let object = aws
            .s3
            .get_object()
            .bucket(&bucket)
            .key(&manifest_key)
            .send()
            .await
            .map_err(|e| {
                if is_no_such_key(&e) {
                    anyhow!(
                        "no inventory manifest at {place}: pass the manifest.json of a delivered report (…/<source bucket>/<config id>/<YYYY-MM-DDTHH-MMZ>/manifest.json)"
                    )
                } else {
                    aws.error(
                        &format!("reading the inventory manifest {place}"),
                        Subject::Bucket(&bucket),
                        e,
                    )
                }
            })?;
        let bytes = object
            .body
            .collect()
            .await
            .map_err(|e| anyhow!("reading the inventory manifest {place}: {e}"))?
            .into_bytes();
        let manifest: Manifest = serde_json::from_slice(&bytes).map_err(|e| {
            anyhow!(
                "{place} is not an S3 Inventory manifest: {}",
                one_line(&e.to_string())
            )
        })?;
        let format = format_of(&manifest).map_err(|e| anyhow!("{place}: {e}"))?;
        if manifest.source_bucket != stack_bucket {
            return Err(anyhow!(
                "{place} is an inventory of bucket {}, not of the stack's bucket {stack_bucket}",
                manifest.source_bucket
            ));
        }
        check_files(aws, &bucket, &manifest.files).await?;
        Ok(Self {
            bucket,
            manifest_key,
            files: manifest.files,
            format,
        })
    }

    pub fn uri(&self) -> String {
        format!("s3://{}/{}", self.bucket, self.manifest_key)
    }

    pub fn file_count(&self) -> usize {
        self.files.len()
    }

    /// Every row of every data file, in pages; rows not in `scope` are counted, not kept.
    /// The files are read one after another by a task of their own.
    pub fn pages(
        self,
        aws: Aws,
        scope: Scope,
        progress: ProgressBar,
    ) -> impl Stream<Item = anyhow::Result<Page>> {
        let (tx, rx) = mpsc::channel(PAGES_AHEAD);
        tokio::spawn(async move {
            if let Err(error) = self.read_all(&aws, &scope, &progress, &tx).await {
                // The receiver may be gone already (the queueing side failed first).
                let _ = tx.send(Err(error)).await;
            }
        });
        futures_util::stream::unfold(rx, |mut rx| async move {
            rx.recv().await.map(|page| (page, rx))
        })
    }

    async fn read_all(
        &self,
        aws: &Aws,
        scope: &Scope,
        progress: &ProgressBar,
        tx: &mpsc::Sender<anyhow::Result<Page>>,
    ) -> anyhow::Result<()> {
        let total = self.files.len();
        for (i, data) in self.files.iter().enumerate() {
            progress.set_prefix(format!("inventory file {}/{total}: ", i + 1));
            let place = format!("s3://{}/{}", self.bucket, data.key);
            let file = download(aws, &self.bucket, data, &place).await?;
            let (format, scope, tx, name) = (
                self.format.clone(),
                scope.clone(),
                tx.clone(),
                place.clone(),
            );
            tokio::task::spawn_blocking(move || match format {
                Format::Csv(columns) => read_csv(file, &columns, &scope, &tx),
                Format::Parquet => read_parquet(file, &scope, &tx),
            })
            .await
            .map_err(|e| anyhow!("reading {name}: {e}"))?
            .with_context(|| format!("reading inventory file {place}"))
            .map_err(|e| anyhow!("{}", one_line(&format!("{e:#}"))))?;
        }
        Ok(())
    }
}

/// `s3://BUCKET/KEY` as bucket and key.
fn parse_uri(uri: &str) -> anyhow::Result<(String, String)> {
    let usage = || {
        anyhow!(
            "--inventory takes the report's manifest as s3://BUCKET/KEY/manifest.json, not {}",
            printable(uri)
        )
    };
    let rest = uri.strip_prefix("s3://").ok_or_else(usage)?;
    let (bucket, key) = rest
        .split_once('/')
        .filter(|(b, k)| !b.is_empty() && !k.is_empty())
        .ok_or_else(usage)?;
    let key = if key.ends_with('/') {
        format!("{key}manifest.json")
    } else {
        key.to_owned()
    };
    Ok((bucket.to_owned(), key))
}

/// The data files' format, refusing what cannot be read.
fn format_of(manifest: &Manifest) -> anyhow::Result<Format> {
    match manifest.file_format.to_ascii_lowercase().as_str() {
        "csv" => Ok(Format::Csv(csv_columns(&manifest.file_schema)?)),
        "parquet" => Ok(Format::Parquet),
        "orc" => Err(anyhow!(
            "the report is in ORC format, which shotlabel does not read: set the inventory configuration's output format to CSV or Apache Parquet and use a report delivered after that"
        )),
        other => Err(anyhow!(
            "unknown inventory fileFormat {other:?}: shotlabel reads CSV and Apache Parquet reports"
        )),
    }
}

/// Where each column a backfill needs is in a CSV row.
fn csv_columns(schema: &str) -> anyhow::Result<CsvColumns> {
    let names: Vec<&str> = schema.split(',').map(str::trim).collect();
    let find = |name: &str| names.iter().position(|n| n.eq_ignore_ascii_case(name));
    let need = |name: &str| {
        find(name).ok_or_else(|| {
            anyhow!(
                "the report has no {name} column (fileSchema {schema:?}): a backfill needs Size and ETag, so add them to the inventory configuration's additional metadata fields"
            )
        })
    };
    Ok(CsvColumns {
        bucket: need("Bucket")?,
        key: need("Key")?,
        size: need("Size")?,
        etag: need("ETag")?,
        is_latest: find("IsLatest"),
        is_delete_marker: find("IsDeleteMarker"),
    })
}

/// Checks that every data file is there, at its size, before anything is queued: a report
/// that is half gone would otherwise queue its first files and fail on a later one.
async fn check_files(aws: &Aws, bucket: &str, files: &[DataFile]) -> anyhow::Result<()> {
    futures_util::stream::iter(files)
        .map(|data| async move {
            let place = format!("s3://{bucket}/{}", data.key);
            let head = aws
                .s3
                .head_object()
                .bucket(bucket)
                .key(&data.key)
                .send()
                .await
                .map_err(|e| {
                    if e.as_service_error().is_some_and(|e| e.is_not_found()) {
                        missing(&place)
                    } else {
                        aws.error(
                            &format!("looking up inventory file {place}"),
                            Subject::Bucket(bucket),
                            e,
                        )
                    }
                })?;
            let size = head.content_length.and_then(|n| u64::try_from(n).ok());
            if size != Some(data.size) {
                return Err(wrong_size(&place, size.unwrap_or(0), data.size));
            }
            anyhow::Ok(())
        })
        .buffer_unordered(CHECKS_IN_FLIGHT)
        .try_collect::<Vec<()>>()
        .await?;
    Ok(())
}

fn missing(place: &str) -> anyhow::Error {
    anyhow!(
        "the manifest lists {place}, but it is missing: the report was deleted or is incomplete; use the manifest.json of a complete report"
    )
}

fn wrong_size(place: &str, actual: u64, listed: u64) -> anyhow::Error {
    anyhow!(
        "{place} is {actual} bytes, but the manifest says {listed}: the report is incomplete or was replaced"
    )
}

fn is_no_such_key<R>(error: &aws_sdk_s3::error::SdkError<GetObjectError, R>) -> bool {
    error.as_service_error().is_some_and(|e| e.is_no_such_key())
}

/// Streams a data file into an anonymous temporary file and checks its size.
async fn download(aws: &Aws, bucket: &str, data: &DataFile, place: &str) -> anyhow::Result<File> {
    let object = aws
        .s3
        .get_object()
        .bucket(bucket)
        .key(&data.key)
        .send()
        .await
        .map_err(|e| {
            if is_no_such_key(&e) {
                missing(place)
            } else {
                aws.error(
                    &format!("reading inventory file {place}"),
                    Subject::Bucket(bucket),
                    e,
                )
            }
        })?;
    let temp = tempfile::tempfile().map_err(|e| anyhow!("cannot create a temporary file: {e}"))?;
    let mut out = tokio::fs::File::from_std(temp);
    let mut body = object.body;
    let mut written = 0u64;
    while let Some(chunk) = body
        .try_next()
        .await
        .map_err(|e| anyhow!("downloading {place}: {e}"))?
    {
        out.write_all(&chunk)
            .await
            .map_err(|e| anyhow!("writing {place} to a temporary file: {e}"))?;
        written += chunk.len() as u64;
    }
    out.flush()
        .await
        .map_err(|e| anyhow!("writing {place} to a temporary file: {e}"))?;
    if written != data.size {
        return Err(wrong_size(place, written, data.size));
    }
    let mut file = out.into_std().await;
    file.rewind()
        .map_err(|e| anyhow!("rereading {place} from a temporary file: {e}"))?;
    Ok(file)
}

/// Collects rows into pages and sends each when full. `Ok(false)` when the queueing side
/// has stopped (its own error is the one reported).
#[derive(Debug, Default)]
struct Pager {
    page: Page,
    rows: usize,
}

impl Pager {
    fn push(&mut self, object: Option<Listed>, tx: &mpsc::Sender<anyhow::Result<Page>>) -> bool {
        match object {
            Some(object) => self.page.objects.push(object),
            None => self.page.skipped += 1,
        }
        self.rows += 1;
        if self.rows < PAGE_ROWS {
            return true;
        }
        self.flush(tx)
    }

    fn flush(&mut self, tx: &mpsc::Sender<anyhow::Result<Page>>) -> bool {
        self.rows = 0;
        let page = std::mem::take(&mut self.page);
        if page.objects.is_empty() && page.skipped == 0 {
            return true;
        }
        tx.blocking_send(Ok(page)).is_ok()
    }
}

/// A gzip-compressed CSV data file (no header row; keys URL-encoded).
fn read_csv(
    file: File,
    columns: &CsvColumns,
    scope: &Scope,
    tx: &mpsc::Sender<anyhow::Result<Page>>,
) -> anyhow::Result<()> {
    let gunzip = flate2::read::MultiGzDecoder::new(BufReader::new(file));
    let mut reader = csv::ReaderBuilder::new()
        .has_headers(false)
        .flexible(true)
        .from_reader(gunzip);
    let mut pager = Pager::default();
    let mut record = csv::StringRecord::new();
    let mut line = 0u64;
    while reader
        .read_record(&mut record)
        .map_err(|e| anyhow!("line {}: {e}", line + 1))?
    {
        line += 1;
        let row = csv_row(&record, columns).map_err(|e| anyhow!("line {line}: {e}"))?;
        let object = scope.take(row).map_err(|e| anyhow!("line {line}: {e}"))?;
        if !pager.push(object, tx) {
            return Ok(());
        }
    }
    pager.flush(tx);
    Ok(())
}

fn csv_row(record: &csv::StringRecord, columns: &CsvColumns) -> anyhow::Result<Row> {
    let field = |i: usize| {
        record.get(i).ok_or_else(|| {
            anyhow!(
                "{} fields, but the fileSchema has a column at position {}",
                record.len(),
                i + 1
            )
        })
    };
    let flag = |i: Option<usize>| -> anyhow::Result<Option<bool>> {
        i.map(|i| field(i).map(|v| v.eq_ignore_ascii_case("true")))
            .transpose()
    };
    let raw_key = field(columns.key)?;
    let key = shotlabel_core::s3_key::decode_event_key(raw_key)
        .map_err(|e| anyhow!("key {}: {e}", printable(raw_key)))?;
    let size = field(columns.size)?;
    let size = if size.is_empty() {
        None
    } else {
        Some(
            size.parse::<u64>()
                .map_err(|_| anyhow!("size {size:?} of {} is not a number", printable(&key)))?,
        )
    };
    let etag = field(columns.etag)?;
    Ok(Row {
        bucket: field(columns.bucket)?.to_owned(),
        size,
        etag: (!etag.is_empty()).then(|| etag.to_owned()),
        is_latest: flag(columns.is_latest)?,
        is_delete_marker: flag(columns.is_delete_marker)?,
        key,
    })
}

/// The Parquet columns a backfill reads; the first four must be there.
const PARQUET_COLUMNS: [&str; 6] = [
    "bucket",
    "key",
    "size",
    "e_tag",
    "is_latest",
    "is_delete_marker",
];

/// A Parquet data file, read row by row with only the columns a backfill needs.
fn read_parquet(
    file: File,
    scope: &Scope,
    tx: &mpsc::Sender<anyhow::Result<Page>>,
) -> anyhow::Result<()> {
    use parquet::file::reader::{FileReader, SerializedFileReader};
    use parquet::schema::types::Type;

    let reader = SerializedFileReader::new(file).map_err(|e| anyhow!("{e}"))?;
    let root = reader
        .metadata()
        .file_metadata()
        .schema_descr()
        .root_schema();
    let fields: Vec<_> = root
        .get_fields()
        .iter()
        .filter(|f| PARQUET_COLUMNS.contains(&f.name()))
        .cloned()
        .collect();
    for needed in &PARQUET_COLUMNS[..4] {
        if !fields.iter().any(|f| f.name() == *needed) {
            return Err(anyhow!(
                "no {needed} column: a backfill needs the size and e_tag columns, so add Size and ETag to the inventory configuration's additional metadata fields"
            ));
        }
    }
    let projection = Type::group_type_builder(root.name())
        .with_fields(fields)
        .build()
        .map_err(|e| anyhow!("{e}"))?;
    let rows = reader
        .get_row_iter(Some(projection))
        .map_err(|e| anyhow!("{e}"))?;
    let mut pager = Pager::default();
    for (i, row) in rows.enumerate() {
        let row = row
            .map_err(|e| anyhow!("row {}: {e}", i + 1))
            .and_then(parquet_row)
            .map_err(|e| anyhow!("row {}: {e}", i + 1))?;
        let object = scope.take(row).map_err(|e| anyhow!("row {}: {e}", i + 1))?;
        if !pager.push(object, tx) {
            return Ok(());
        }
    }
    pager.flush(tx);
    Ok(())
}

fn parquet_row(row: parquet::record::Row) -> anyhow::Result<Row> {
    use parquet::record::Field;

    let text = |name: &str, field: Field| -> anyhow::Result<Option<String>> {
        match field {
            Field::Null => Ok(None),
            Field::Str(s) => Ok(Some(s)),
            Field::Bytes(b) => String::from_utf8(b.data().to_vec())
                .map(Some)
                .map_err(|_| anyhow!("{name} is not UTF-8")),
            other => Err(anyhow!("{name} is {other}, not text")),
        }
    };
    let flag = |name: &str, field: Field| -> anyhow::Result<Option<bool>> {
        match field {
            Field::Null => Ok(None),
            Field::Bool(b) => Ok(Some(b)),
            other => Err(anyhow!("{name} is {other}, not a boolean")),
        }
    };
    let mut out = Row::default();
    for (name, field) in row.into_columns() {
        match name.as_str() {
            "bucket" => out.bucket = text(&name, field)?.unwrap_or_default(),
            "key" => out.key = text(&name, field)?.unwrap_or_default(),
            "e_tag" => out.etag = text(&name, field)?,
            "size" => {
                out.size = match field {
                    Field::Null => None,
                    Field::Long(n) => Some(u64::try_from(n).unwrap_or(0)),
                    Field::Int(n) => Some(u64::try_from(n).unwrap_or(0)),
                    other => return Err(anyhow!("size is {other}, not a number")),
                }
            }
            "is_latest" => out.is_latest = flag(&name, field)?,
            "is_delete_marker" => out.is_delete_marker = flag(&name, field)?,
            _ => {}
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn manifest(format: &str, schema: &str) -> Manifest {
        Manifest {
            source_bucket: "b".into(),
            file_format: format.into(),
            file_schema: schema.into(),
            files: Vec::new(),
        }
    }

    #[test]
    fn csv_columns_follow_the_file_schema() -> anyhow::Result<()> {
        let columns = csv_columns(
            "Bucket, Key, VersionId, IsLatest, IsDeleteMarker, Size, LastModifiedDate, ETag, StorageClass",
        )?;
        assert_eq!(
            columns,
            CsvColumns {
                bucket: 0,
                key: 1,
                size: 5,
                etag: 7,
                is_latest: Some(3),
                is_delete_marker: Some(4),
            }
        );
        let columns = csv_columns("Bucket, Key, ETag, Size")?;
        assert_eq!(
            (columns.size, columns.etag, columns.is_latest),
            (3, 2, None)
        );
        let error = csv_columns("Bucket, Key, Size")
            .err()
            .map(|e| e.to_string());
        assert!(error.is_some_and(|e| e.contains("no ETag column")));
        Ok(())
    }

    #[test]
    fn orc_and_unknown_formats_are_refused_plainly() {
        let orc = format_of(&manifest("ORC", "struct<bucket:string>"))
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(
            orc.contains("ORC") && orc.contains("CSV or Apache Parquet"),
            "{orc}"
        );
        assert!(format_of(&manifest("Avro", "")).is_err());
        assert!(matches!(
            format_of(&manifest("Parquet", "message s3.inventory {}")),
            Ok(Format::Parquet)
        ));
    }

    #[test]
    fn csv_keys_are_url_decoded() -> anyhow::Result<()> {
        let columns = csv_columns("Bucket, Key, Size, ETag")?;
        let record = csv::StringRecord::from(vec![
            "b",
            "incoming/a+b%2Bc%2F%E5%86%99.png",
            "12",
            "\"abc\"",
        ]);
        let row = csv_row(&record, &columns)?;
        assert_eq!(row.key, "incoming/a b+c/写.png");
        let scope = Scope {
            bucket: "b".into(),
            prefix: "incoming/".into(),
        };
        let listed = scope.take(row)?;
        assert_eq!(
            listed,
            Some(Listed {
                key: "incoming/a b+c/写.png".into(),
                size: 12,
                etag: "abc".into(),
            })
        );
        Ok(())
    }

    #[test]
    fn the_scope_keeps_current_objects_under_the_prefix() -> anyhow::Result<()> {
        let scope = Scope {
            bucket: "b".into(),
            prefix: "incoming/".into(),
        };
        let row = |bucket: &str, key: &str, latest: Option<bool>, deleted: Option<bool>| Row {
            bucket: bucket.into(),
            key: key.into(),
            size: Some(1),
            etag: Some("e".into()),
            is_latest: latest,
            is_delete_marker: deleted,
        };
        assert!(scope.take(row("b", "incoming/x", None, None))?.is_some());
        assert!(
            scope
                .take(row("b", "incoming/x", Some(true), Some(false)))?
                .is_some()
        );
        assert!(
            scope
                .take(row("other", "incoming/x", None, None))?
                .is_none()
        );
        assert!(scope.take(row("b", "labels/x.json", None, None))?.is_none());
        assert!(
            scope
                .take(row("b", "incoming/x", Some(false), None))?
                .is_none()
        );
        assert!(
            scope
                .take(row("b", "incoming/x", Some(true), Some(true)))?
                .is_none()
        );
        Ok(())
    }

    #[test]
    fn uris_name_a_manifest() -> anyhow::Result<()> {
        assert_eq!(
            parse_uri("s3://inv/reports/b/cfg/2026-01-01T00-00Z/manifest.json")?,
            (
                "inv".to_owned(),
                "reports/b/cfg/2026-01-01T00-00Z/manifest.json".to_owned()
            )
        );
        assert_eq!(parse_uri("s3://inv/r/2026/")?.1, "r/2026/manifest.json");
        for bad in ["inv/manifest.json", "s3://inv", "s3:///k", "https://x/y"] {
            assert!(parse_uri(bad).is_err(), "{bad}");
        }
        Ok(())
    }
}
