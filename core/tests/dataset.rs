//! Dataset parts in memory: rows typed from the task's schema, written and read back to
//! the same label records, the same bytes whatever order the labels came in, and schemas
//! whose shapes have no column type kept as JSON text.

use serde_json::{Value, json};
use shotlabel_core::answer::Usage;
use shotlabel_core::dataset::{self, DatasetSchemaError, glue_columns};
use shotlabel_core::records::{LabelRecord, Provenance, RecordStatus, SourceRef, TaskRef};
use shotlabel_core::task::Task;

fn task_with_schema(schema: Value) -> anyhow::Result<Task> {
    let mut spec = Task::default_task()?.spec().clone();
    spec.name = "shapes".into();
    spec.response_schema.schema = schema;
    Ok(Task::new(spec)?)
}

fn record(task: &Task, i: u64, label: Value, usage: bool) -> LabelRecord {
    LabelRecord {
        status: RecordStatus::Labelled,
        label,
        source: SourceRef {
            bucket: "bucket".into(),
            key: format!("incoming/{i}.png"),
            etag: format!("etag{i}"),
            size: 1000 + i,
            version_id: None,
        },
        task: TaskRef {
            name: task.name().into(),
            version: task.version().into(),
        },
        model: "model-a".into(),
        provenance: Provenance {
            batch_id: "batch_1".into(),
            custom_id: format!("c{i:03}"),
            request_id: None,
            finish_reason: None,
            usage: usage.then_some(Usage {
                prompt_tokens: 700 + i,
                completion_tokens: 14,
                total_tokens: 714 + i,
            }),
        },
        attempt: (i % 3) as u32,
        labelled_at: 1_767_225_600 + i,
    }
}

/// Writes, reads back and compares every record; returns the part's bytes.
fn round_trip(task: &Task, records: &[LabelRecord]) -> anyhow::Result<Vec<u8>> {
    let bytes = dataset::write_part(task, records)?;
    let rows = dataset::read_part(bytes.clone())?;
    assert_eq!(rows.len(), records.len());
    let mut expected: Vec<&LabelRecord> = records.iter().collect();
    expected.sort_by(|a, b| a.provenance.custom_id.cmp(&b.provenance.custom_id));
    for (row, want) in rows.into_iter().zip(expected) {
        let got = dataset::record_of_row(row, task.name(), Some(task))
            .ok_or_else(|| anyhow::anyhow!("a row without provenance"))?;
        assert_eq!(&got, want);
    }
    Ok(bytes)
}

#[test]
fn the_default_task_round_trips_in_custom_id_order_and_to_the_same_bytes() -> anyhow::Result<()> {
    let task = Task::default_task()?;
    let records: Vec<LabelRecord> = (0..40)
        .map(|i| {
            record(
                &task,
                i,
                json!({"landing_page": i.is_multiple_of(2), "aesthetic": 1 + i % 5}),
                !i.is_multiple_of(7),
            )
        })
        .collect();
    let first = round_trip(&task, &records)?;
    let mut reversed = records.clone();
    reversed.reverse();
    assert_eq!(dataset::write_part(&task, &reversed)?, first);
    Ok(())
}

#[test]
fn lists_structs_numbers_and_untyped_shapes_round_trip() -> anyhow::Result<()> {
    let task = task_with_schema(json!({
        "type": "object",
        "additionalProperties": false,
        "required": ["tags", "box", "score", "anything", "maybe"],
        "properties": {
            "tags": {"type": "array", "items": {"type": "string"}},
            "box": {"type": "object", "additionalProperties": false, "required": ["x", "flags"],
                "properties": {"x": {"type": "integer"},
                    "flags": {"type": "array", "items": {"type": "boolean"}}}},
            "score": {"type": "number"},
            "anything": {"anyOf": [{"type": "string"}, {"type": "integer"}]},
            "maybe": {"type": ["string", "null"]}
        }
    }))?;
    let columns = glue_columns(&task)?;
    let types: Vec<&str> = columns.iter().map(|(_, t)| t.as_str()).collect();
    assert_eq!(
        &types[..5],
        // The answer's fields in name order (how the schema's properties are held).
        [
            "string",
            "struct<flags:array<boolean>,x:bigint>",
            "string",
            "double",
            "array<string>"
        ],
        "{columns:?}"
    );
    let labels = [
        json!({"tags": ["a", "b"], "box": {"x": 3, "flags": [true, false]}, "score": 0.25,
            "anything": "text", "maybe": null}),
        json!({"tags": [], "box": {"x": -1, "flags": []}, "score": 2.0,
            "anything": 7, "maybe": "yes"}),
    ];
    let records: Vec<LabelRecord> = labels
        .into_iter()
        .enumerate()
        .map(|(i, label)| record(&task, i as u64, label, true))
        .collect();
    round_trip(&task, &records)?;
    Ok(())
}

#[test]
fn an_answer_field_named_like_a_dataset_column_is_refused() -> anyhow::Result<()> {
    for name in ["batch_id", "version"] {
        let task = task_with_schema(json!({
            "type": "object", "additionalProperties": false, "required": [name],
            "properties": {name: {"type": "string"}}
        }))?;
        assert_eq!(
            dataset::arrow_schema(&task).err(),
            Some(DatasetSchemaError::Reserved(name.into()))
        );
    }
    Ok(())
}
