//! The labels as a dataset: each harvest (or harvest shard) writes the labels it made as
//! one Parquet file,
//! `dataset/task=<task name>/version=<task version>/batch=<batch id>/part-<n>.parquet`,
//! typed from the task's answer schema ([`schema`]). Athena, Spark, DuckDB, pyarrow and
//! Hugging Face `datasets` read these directly; `shotlabel export` and the report read them
//! instead of listing one `labels/` object per image.
//!
//! A part holds the labels its harvest wrote or found it had written before (a repeated
//! harvest), sorted by custom id, each with the label object's own `labelled_at`: writing
//! it again gives the same bytes under the same name. Answers recognised as duplicates of
//! another batch's label are not in it.

use std::sync::Arc;

use arrow_array::{Array, ArrayRef, Int64Array, RecordBatch, TimestampMillisecondArray};
use arrow_json::ReaderBuilder;
use arrow_schema::{ArrowError, SchemaRef};
use parquet::arrow::ArrowWriter;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use parquet::arrow::arrow_writer::ArrowWriterOptions;
use parquet::basic::Compression;
use parquet::errors::ParquetError;
use parquet::file::properties::WriterProperties;
use serde_json::{Map, Value};

use crate::records::{LabelRecord, Provenance, RecordStatus, SourceRef, TaskRef};
use crate::task::Task;

pub mod schema;

pub use schema::{DatasetSchemaError, arrow_schema, glue_columns};

/// Where the parts live in the bucket.
pub const DATASET_PREFIX: &str = "dataset/";

/// The media type parts are written with.
pub const PARQUET_CONTENT_TYPE: &str = "application/vnd.apache.parquet";

/// The provenance columns every row of an export's `labels.jsonl` carries beside the
/// answer's fields (an answer field of the same name is written as `label_<name>`); the
/// export writes them and `eval` reads them back.
pub const EXPORT_PROVENANCE: [&str; 5] = ["key", "etag", "task_version", "model", "batch_id"];

/// Rows decoded into one Arrow batch at a time.
const ROWS_PER_BATCH: usize = 8_192;

#[derive(Debug, thiserror::Error)]
pub enum DatasetError {
    #[error(transparent)]
    Schema(#[from] DatasetSchemaError),
    #[error("arrow: {0}")]
    Arrow(#[from] ArrowError),
    #[error("parquet: {0}")]
    Parquet(#[from] ParquetError),
    #[error("json: {0}")]
    Json(#[from] serde_json::Error),
}

/// `dataset/task=<name>/version=<version>/`: every part of one task version.
pub fn version_prefix(task_name: &str, version: &str) -> String {
    format!("{DATASET_PREFIX}task={task_name}/version={version}/")
}

/// `dataset/task=<name>/`: every version's parts.
pub fn task_prefix(task_name: &str) -> String {
    format!("{DATASET_PREFIX}task={task_name}/")
}

/// The key of one harvest's part; `part` is the shard (0 for a harvest in one run).
pub fn part_key(task_name: &str, version: &str, batch_id: &str, part: u32) -> String {
    format!(
        "{}batch={batch_id}/part-{part}.parquet",
        version_prefix(task_name, version)
    )
}

/// The task version a part key was written under, from its `version=` segment.
pub fn version_of_key(key: &str) -> Option<&str> {
    key.split('/')
        .find_map(|segment| segment.strip_prefix("version="))
}

/// One row as written: the answer's fields typed for their columns (untyped shapes as
/// their JSON text), then the provenance.
pub fn row(task: &Task, record: &LabelRecord) -> Value {
    let schema = &task.spec().response_schema.schema;
    let mut row = Map::new();
    if let Some(properties) = schema.get("properties").and_then(Value::as_object) {
        for (name, property) in properties {
            let value = record.label.get(name).unwrap_or(&Value::Null);
            row.insert(name.clone(), column_value(property, value));
        }
    }
    let usage = record.provenance.usage;
    let provenance = [
        ("source_bucket", Value::from(record.source.bucket.as_str())),
        ("source_key", Value::from(record.source.key.as_str())),
        ("source_etag", Value::from(record.source.etag.as_str())),
        (
            "source_size",
            Value::from(i64::try_from(record.source.size).unwrap_or(i64::MAX)),
        ),
        (
            "custom_id",
            Value::from(record.provenance.custom_id.as_str()),
        ),
        ("batch_id", Value::from(record.provenance.batch_id.as_str())),
        ("model", Value::from(record.model.as_str())),
        ("task_version", Value::from(record.task.version.as_str())),
        ("prompt_tokens", tokens(usage.map(|u| u.prompt_tokens))),
        (
            "completion_tokens",
            tokens(usage.map(|u| u.completion_tokens)),
        ),
        ("attempt", Value::from(record.attempt)),
        (
            "labelled_at",
            Value::from(i64::try_from(record.labelled_at.saturating_mul(1000)).unwrap_or(i64::MAX)),
        ),
    ];
    for (name, value) in provenance {
        row.insert(name.to_owned(), value);
    }
    Value::Object(row)
}

fn tokens(count: Option<u64>) -> Value {
    count.map_or(Value::Null, |c| {
        Value::from(i64::try_from(c).unwrap_or(i64::MAX))
    })
}

/// A value as its column holds it: nested objects and arrays typed field by field, and
/// the shapes kept as JSON text turned into that text.
fn column_value(schema: &Value, value: &Value) -> Value {
    if value.is_null() {
        return Value::Null;
    }
    if schema::is_json_text(schema) {
        return Value::String(value.to_string());
    }
    match (schema::data_type(schema), value) {
        (arrow_schema::DataType::Struct(_), Value::Object(object)) => {
            let properties = schema.get("properties").and_then(Value::as_object);
            let mut out = Map::new();
            for (name, property) in properties.into_iter().flatten() {
                let inner = object.get(name).unwrap_or(&Value::Null);
                out.insert(name.clone(), column_value(property, inner));
            }
            Value::Object(out)
        }
        (arrow_schema::DataType::List(_), Value::Array(items)) => {
            let item_schema = schema.get("items").cloned().unwrap_or(Value::Null);
            Value::Array(
                items
                    .iter()
                    .map(|item| column_value(&item_schema, item))
                    .collect(),
            )
        }
        _ => value.clone(),
    }
}

/// The Parquet bytes of one part: `records` sorted by custom id, Snappy-compressed.
pub fn write_part(task: &Task, records: &[LabelRecord]) -> Result<Vec<u8>, DatasetError> {
    let schema: SchemaRef = Arc::new(arrow_schema(task)?);
    let mut sorted: Vec<&LabelRecord> = records.iter().collect();
    sorted.sort_by(|a, b| a.provenance.custom_id.cmp(&b.provenance.custom_id));
    let properties = WriterProperties::builder()
        .set_compression(Compression::SNAPPY)
        .build();
    // Only Parquet's own types in the file (no embedded Arrow schema): what Athena, Spark
    // and DuckDB read anyway, and pyarrow then reads `labelled_at` as UTC by name.
    let options = ArrowWriterOptions::new()
        .with_properties(properties)
        .with_skip_arrow_metadata(true);
    let mut writer = ArrowWriter::try_new_with_options(Vec::new(), schema.clone(), options)?;
    for chunk in sorted.chunks(ROWS_PER_BATCH) {
        let rows: Vec<Value> = chunk.iter().map(|record| row(task, record)).collect();
        let mut decoder = ReaderBuilder::new(schema.clone()).build_decoder()?;
        decoder.serialize(&rows)?;
        if let Some(batch) = decoder.flush()? {
            writer.write(&batch)?;
        }
    }
    Ok(writer.into_inner()?)
}

/// The rows of one part as JSON objects, column by column as written (JSON-text columns
/// still text), with `labelled_at` as Unix milliseconds.
pub fn read_part(bytes: Vec<u8>) -> Result<Vec<Map<String, Value>>, DatasetError> {
    let reader = ParquetRecordBatchReaderBuilder::try_new(bytes::Bytes::from(bytes))?.build()?;
    let mut rows = Vec::new();
    for batch in reader {
        rows.extend(batch_rows(&batch?)?);
    }
    Ok(rows)
}

fn batch_rows(batch: &RecordBatch) -> Result<Vec<Map<String, Value>>, DatasetError> {
    let batch = &timestamps_as_millis(batch)?;
    let mut writer = arrow_json::WriterBuilder::new()
        .with_explicit_nulls(true)
        .build::<_, arrow_json::writer::JsonArray>(Vec::new());
    writer.write(batch)?;
    writer.finish()?;
    let rows: Vec<Map<String, Value>> = serde_json::from_slice(&writer.into_inner())?;
    Ok(rows)
}

/// The batch with its millisecond timestamps as plain Unix milliseconds: exact, ordered,
/// and no time zone to name (Parquet's "adjusted to UTC" reads back as the zone `UTC`,
/// which Arrow formats only with chrono-tz).
fn timestamps_as_millis(batch: &RecordBatch) -> Result<RecordBatch, DatasetError> {
    let mut fields = Vec::with_capacity(batch.num_columns());
    let mut columns = Vec::with_capacity(batch.num_columns());
    for (field, column) in batch.schema().fields().iter().zip(batch.columns()) {
        match column.as_any().downcast_ref::<TimestampMillisecondArray>() {
            Some(timestamps) => {
                let millis =
                    Int64Array::new(timestamps.values().clone(), timestamps.nulls().cloned());
                fields.push(
                    field
                        .as_ref()
                        .clone()
                        .with_data_type(arrow_schema::DataType::Int64),
                );
                columns.push(Arc::new(millis) as ArrayRef);
            }
            None => {
                fields.push(field.as_ref().clone());
                columns.push(column.clone());
            }
        }
    }
    Ok(RecordBatch::try_new(
        Arc::new(arrow_schema::Schema::new(fields)),
        columns,
    )?)
}

/// The task name a part key was written under, from its `task=` segment.
pub fn task_of_key(key: &str) -> Option<&str> {
    key.split('/')
        .find_map(|segment| segment.strip_prefix("task="))
}

/// A row read back as the label record it was written from, for `task_name` (the part's
/// `task=`). With `task` of the row's version, JSON-text columns are parsed back; for
/// another version the answer is its columns as they are. What a part does not hold is
/// left out: the provider's request id and finish reason, the object's version id.
pub fn record_of_row(
    mut row: Map<String, Value>,
    task_name: &str,
    task: Option<&Task>,
) -> Option<LabelRecord> {
    let text = |row: &Map<String, Value>, name: &str| row.get(name)?.as_str().map(str::to_owned);
    let number = |row: &Map<String, Value>, name: &str| row.get(name)?.as_u64();
    let version = text(&row, "task_version")?;
    let source = SourceRef {
        bucket: text(&row, "source_bucket")?,
        key: text(&row, "source_key")?,
        etag: text(&row, "source_etag")?,
        size: number(&row, "source_size")?,
        version_id: None,
    };
    let usage = match (
        number(&row, "prompt_tokens"),
        number(&row, "completion_tokens"),
    ) {
        (Some(prompt_tokens), Some(completion_tokens)) => Some(crate::answer::Usage {
            prompt_tokens,
            completion_tokens,
            total_tokens: prompt_tokens.saturating_add(completion_tokens),
        }),
        _ => None,
    };
    let provenance = Provenance {
        batch_id: text(&row, "batch_id")?,
        custom_id: text(&row, "custom_id")?,
        request_id: None,
        finish_reason: None,
        usage,
    };
    let model = text(&row, "model")?;
    let attempt = u32::try_from(number(&row, "attempt")?).ok()?;
    let labelled_at = number(&row, "labelled_at")? / 1000;
    let label = match task.filter(|t| t.version() == version && t.name() == task_name) {
        Some(task) => answer_of(task, &row),
        None => {
            for name in schema::PROVENANCE_COLUMNS {
                row.remove(name);
            }
            row
        }
    };
    Some(LabelRecord {
        status: RecordStatus::Labelled,
        label: Value::Object(label),
        source,
        task: TaskRef {
            name: task_name.to_owned(),
            version,
        },
        model,
        provenance,
        attempt,
        labelled_at,
    })
}

/// Rows gathered from many parts, one per image and task version: an image relabelled in
/// a later batch (a forced relabel) has a row in each batch's part, and the latest
/// `labelled_at` wins. `T` is whatever the reader keeps beside each record.
#[derive(Debug)]
pub struct LatestLabels<T> {
    rows: Vec<(T, LabelRecord)>,
    index: std::collections::HashMap<(String, String, String), usize>,
    replaced: u64,
}

impl<T> Default for LatestLabels<T> {
    fn default() -> Self {
        Self {
            rows: Vec::new(),
            index: std::collections::HashMap::new(),
            replaced: 0,
        }
    }
}

impl<T> LatestLabels<T> {
    /// Adds a row, keeping the later of two for the same image and task version.
    pub fn add(&mut self, extra: T, record: LabelRecord) {
        let id = (
            record.source.bucket.clone(),
            record.source.key.clone(),
            record.task.version.clone(),
        );
        match self.index.get(&id) {
            Some(&at) => {
                self.replaced += 1;
                if record.labelled_at > self.rows[at].1.labelled_at {
                    self.rows[at] = (extra, record);
                }
            }
            None => {
                self.index.insert(id, self.rows.len());
                self.rows.push((extra, record));
            }
        }
    }

    /// Rows left out because a later row of the same image was kept.
    pub fn replaced(&self) -> u64 {
        self.replaced
    }

    /// The kept rows, in the order their images were first seen.
    pub fn into_rows(self) -> Vec<(T, LabelRecord)> {
        self.rows
    }
}

/// The task's answer as it was given, from a row read back: JSON-text columns parsed.
pub fn answer_of(task: &Task, row: &Map<String, Value>) -> Map<String, Value> {
    let schema = &task.spec().response_schema.schema;
    let mut answer = Map::new();
    if let Some(properties) = schema.get("properties").and_then(Value::as_object) {
        for (name, property) in properties {
            let value = row.get(name).cloned().unwrap_or(Value::Null);
            answer.insert(name.clone(), from_column(property, value));
        }
    }
    answer
}

fn from_column(schema: &Value, value: Value) -> Value {
    if schema::is_json_text(schema) {
        return match value {
            Value::String(text) => serde_json::from_str(&text).unwrap_or(Value::String(text)),
            other => other,
        };
    }
    match value {
        Value::Object(object) => {
            let properties = schema.get("properties").and_then(Value::as_object);
            let mut out = Map::new();
            for (name, inner) in object {
                let inner_schema = properties
                    .and_then(|p| p.get(&name))
                    .unwrap_or(&Value::Null);
                out.insert(name, from_column(inner_schema, inner));
            }
            Value::Object(out)
        }
        Value::Array(items) => {
            let item_schema = schema.get("items").cloned().unwrap_or(Value::Null);
            Value::Array(
                items
                    .into_iter()
                    .map(|item| from_column(&item_schema, item))
                    .collect(),
            )
        }
        other => other,
    }
}
