//! The dataset's columns, typed from the task's answer schema: one column per answer
//! field, then the provenance. The same mapping gives the Arrow schema the parts are
//! written with and the Glue column types `template.yaml` declares.

use std::sync::Arc;

use arrow_schema::{DataType, Field, Fields, Schema, TimeUnit};
use serde_json::Value;

use crate::task::Task;

/// The provenance columns, after the answer's, in order.
pub const PROVENANCE_COLUMNS: [&str; 12] = [
    "source_bucket",
    "source_key",
    "source_etag",
    "source_size",
    "custom_id",
    "batch_id",
    "model",
    "task_version",
    "prompt_tokens",
    "completion_tokens",
    "attempt",
    "labelled_at",
];

/// Names an answer field may not take: the provenance columns, and the Hive partition
/// keys of the parts' paths (readers that use the paths add those as columns).
pub const RESERVED_COLUMNS: [&str; 3] = ["task", "version", "batch"];

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DatasetSchemaError {
    #[error("the task's answer schema is not an object with properties")]
    NotAnObject,
    #[error("the answer field {0:?} has the name of a dataset column the pipeline adds; rename it")]
    Reserved(String),
}

/// The Arrow schema of the task's dataset parts.
pub fn arrow_schema(task: &Task) -> Result<Schema, DatasetSchemaError> {
    let mut fields = answer_fields(&task.spec().response_schema.schema)?;
    for name in PROVENANCE_COLUMNS {
        fields.push(provenance_field(name));
    }
    Ok(Schema::new(fields))
}

/// One Arrow field per property of the answer object, in the schema's order.
fn answer_fields(schema: &Value) -> Result<Vec<Field>, DatasetSchemaError> {
    let properties = schema
        .get("properties")
        .and_then(Value::as_object)
        .ok_or(DatasetSchemaError::NotAnObject)?;
    let mut fields = Vec::with_capacity(properties.len());
    for (name, property) in properties {
        if PROVENANCE_COLUMNS.contains(&name.as_str()) || RESERVED_COLUMNS.contains(&name.as_str())
        {
            return Err(DatasetSchemaError::Reserved(name.clone()));
        }
        // Nullable: a schema may leave a field out of `required`, and an older part may
        // lack a field a later version adds.
        fields.push(Field::new(name, data_type(property), true));
    }
    Ok(fields)
}

/// A JSON Schema type as an Arrow type: boolean → Boolean, integer → Int64, number →
/// Float64, string (enums of strings included) → Utf8, array → List of its items, object
/// with properties → Struct. Anything else (no type, several types, `anyOf`, an object
/// without properties) is kept as its JSON text in a Utf8 column, so no answer is lost.
pub fn data_type(schema: &Value) -> DataType {
    match json_type(schema) {
        Some("boolean") => DataType::Boolean,
        Some("integer") => DataType::Int64,
        Some("number") => DataType::Float64,
        Some("string") => DataType::Utf8,
        Some("array") => {
            let items = schema.get("items").map_or(DataType::Utf8, data_type);
            DataType::List(Arc::new(Field::new("item", items, true)))
        }
        Some("object") => match answer_fields(schema) {
            Ok(fields) if !fields.is_empty() => DataType::Struct(Fields::from(fields)),
            _ => DataType::Utf8,
        },
        _ => match schema.get("enum").and_then(Value::as_array) {
            // An enum without a type: typed by its values when they agree.
            Some(values) if !values.is_empty() => {
                if values.iter().all(Value::is_boolean) {
                    DataType::Boolean
                } else if values.iter().all(|v| v.is_i64() || v.is_u64()) {
                    DataType::Int64
                } else if values.iter().all(Value::is_number) {
                    DataType::Float64
                } else {
                    DataType::Utf8
                }
            }
            _ => DataType::Utf8,
        },
    }
}

/// The one JSON type a schema allows, `["T", "null"]` counting as `T`.
fn json_type(schema: &Value) -> Option<&str> {
    match schema.get("type")? {
        Value::String(t) => Some(t),
        Value::Array(types) => {
            let mut not_null = types
                .iter()
                .filter_map(Value::as_str)
                .filter(|t| *t != "null");
            let first = not_null.next()?;
            not_null.next().is_none().then_some(first)
        }
        _ => None,
    }
}

/// True when values of this Arrow type are written as the answer's JSON text.
pub fn is_json_text(schema: &Value) -> bool {
    data_type(schema) == DataType::Utf8 && json_type(schema) != Some("string") && {
        // An enum of strings is a string column, not JSON text.
        !schema
            .get("enum")
            .and_then(Value::as_array)
            .is_some_and(|values| values.iter().all(Value::is_string))
    }
}

fn provenance_field(name: &str) -> Field {
    match name {
        "source_size" | "attempt" => Field::new(name, DataType::Int64, false),
        // A provider may report no usage.
        "prompt_tokens" | "completion_tokens" => Field::new(name, DataType::Int64, true),
        "labelled_at" => Field::new(name, labelled_at_type(), false),
        _ => Field::new(name, DataType::Utf8, false),
    }
}

/// `labelled_at`: milliseconds, UTC. Spelt as an offset because Arrow parses named time
/// zones only with chrono-tz; the Parquet file says "adjusted to UTC" either way, and
/// readers show it as UTC.
pub fn labelled_at_type() -> DataType {
    DataType::Timestamp(TimeUnit::Millisecond, Some("+00:00".into()))
}

/// The Glue (Hive DDL) type of an Arrow type, as `template.yaml` declares its columns.
pub fn glue_type(data_type: &DataType) -> String {
    match data_type {
        DataType::Boolean => "boolean".into(),
        DataType::Int64 => "bigint".into(),
        DataType::Float64 => "double".into(),
        DataType::Timestamp(..) => "timestamp".into(),
        DataType::List(item) => format!("array<{}>", glue_type(item.data_type())),
        DataType::Struct(fields) => {
            let inner: Vec<String> = fields
                .iter()
                .map(|f| format!("{}:{}", f.name(), glue_type(f.data_type())))
                .collect();
            format!("struct<{}>", inner.join(","))
        }
        _ => "string".into(),
    }
}

/// The Glue columns of the task's table: (name, type) in the parts' order.
pub fn glue_columns(task: &Task) -> Result<Vec<(String, String)>, DatasetSchemaError> {
    Ok(arrow_schema(task)?
        .fields()
        .iter()
        .map(|f| (f.name().clone(), glue_type(f.data_type())))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn json_schema_types_map_to_arrow_types() {
        let cases = [
            (json!({"type": "boolean"}), "boolean"),
            (json!({"type": "integer", "enum": [1, 2]}), "bigint"),
            (json!({"type": ["number", "null"]}), "double"),
            (json!({"type": "string", "enum": ["a", "b"]}), "string"),
            (json!({"enum": [1, 2, 3]}), "bigint"),
            (
                json!({"type": "array", "items": {"type": "string"}}),
                "array<string>",
            ),
            (
                json!({"type": "object", "properties": {"x": {"type": "integer"},
                    "tags": {"type": "array", "items": {"type": "boolean"}}}}),
                // Fields in name order, as the schema's properties are held.
                "struct<tags:array<boolean>,x:bigint>",
            ),
            (
                json!({"anyOf": [{"type": "string"}, {"type": "integer"}]}),
                "string",
            ),
            (json!({"type": ["string", "integer"]}), "string"),
        ];
        for (schema, glue) in cases {
            assert_eq!(glue_type(&data_type(&schema)), glue, "{schema}");
        }
    }

    #[test]
    fn only_untyped_shapes_are_kept_as_json_text() {
        assert!(!is_json_text(&json!({"type": "string"})));
        assert!(!is_json_text(&json!({"enum": ["a", "b"]})));
        assert!(!is_json_text(&json!({"type": "integer"})));
        assert!(is_json_text(
            &json!({"anyOf": [{"type": "string"}, {"type": "integer"}]})
        ));
        assert!(is_json_text(&json!({"type": "object"})));
    }
}
