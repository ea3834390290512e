//! Tolerant parsing of provider objects: what OpenAI sends, what Inference.net sends, and
//! what a sloppy provider might send.

use serde_json::json;
use shotlabel_core::batch_api::{Batch, BatchStatus, FileObject, OutputLine, Timestamp};

#[test]
fn openai_batch_object_parses() -> anyhow::Result<()> {
    let batch: Batch = serde_json::from_value(json!({
        "id": "batch_abc123",
        "object": "batch",
        "endpoint": "/v1/chat/completions",
        "errors": null,
        "input_file_id": "file-abc123",
        "completion_window": "24h",
        "status": "completed",
        "output_file_id": "file-cvaTdG",
        "error_file_id": "file-HOWS94",
        "created_at": 1711471533,
        "in_progress_at": 1711471538,
        "expires_at": 1711557933,
        "finalizing_at": 1711493133,
        "completed_at": 1711493163,
        "failed_at": null,
        "expired_at": null,
        "cancelling_at": null,
        "cancelled_at": null,
        "request_counts": {"total": 100, "completed": 95, "failed": 5},
        "metadata": {"customer_id": "user_123456789", "batch_description": "Nightly eval job"}
    }))?;
    assert_eq!(batch.id, "batch_abc123");
    assert_eq!(batch.status, BatchStatus::Completed);
    assert!(batch.status.is_terminal());
    assert_eq!(batch.output_file_id.as_deref(), Some("file-cvaTdG"));
    assert_eq!(batch.created_at, Some(Timestamp::from_secs(1711471533)));
    assert_eq!(batch.failed_at, None);
    let counts = batch.request_counts.unwrap_or_default();
    assert_eq!(
        (counts.total, counts.completed, counts.failed),
        (100, 95, 5)
    );
    assert_eq!(batch.metadata["customer_id"], "user_123456789");
    Ok(())
}

#[test]
fn inference_net_style_millisecond_timestamps_and_odd_ids() -> anyhow::Result<()> {
    let batch: Batch = serde_json::from_value(json!({
        "id": "kJ9x2mQ7vR",
        "status": "in_progress",
        "input_file_id": 48213,
        "created_at": 1753904469972_u64,
        "in_progress_at": "1753904470972",
        "expires_at": 1753990869.972,
        "request_counts": {"total": "10", "completed": 3},
        "some_future_field": {"nested": [1, 2, 3]},
    }))?;
    assert_eq!(batch.id, "kJ9x2mQ7vR");
    assert_eq!(batch.input_file_id.as_deref(), Some("48213"));
    assert_eq!(batch.status, BatchStatus::InProgress);
    assert!(!batch.status.is_terminal());
    let created = batch.created_at.expect("created_at");
    assert_eq!(created.as_millis(), 1753904469972);
    assert_eq!(created.as_secs(), 1753904469);
    assert_eq!(
        batch.in_progress_at.map(Timestamp::as_millis),
        Some(1753904470972)
    );
    // A fractional value in seconds is read as seconds.
    assert_eq!(
        batch.expires_at.map(Timestamp::as_millis),
        Some(1753990869972)
    );
    let counts = batch.request_counts.unwrap_or_default();
    assert_eq!((counts.total, counts.completed, counts.failed), (10, 3, 0));
    assert!(batch.metadata.is_empty());
    assert_eq!(batch.output_file_id, None);
    Ok(())
}

#[test]
fn minimal_batch_with_absent_fields_parses() -> anyhow::Result<()> {
    let batch: Batch = serde_json::from_str(r#"{"id": 7, "status": "validating"}"#)?;
    assert_eq!(batch.id, "7");
    assert_eq!(batch.status, BatchStatus::Validating);
    assert_eq!(batch.request_counts, None);
    assert_eq!(batch.error_summary(), None);
    Ok(())
}

#[test]
fn unknown_statuses_are_kept_and_not_terminal() -> anyhow::Result<()> {
    let batch: Batch = serde_json::from_str(r#"{"id": "b", "status": "warming_up"}"#)?;
    assert_eq!(batch.status, BatchStatus::Other("warming_up".into()));
    assert!(!batch.status.is_terminal());
    assert_eq!(batch.status.to_string(), "warming_up");
    for (text, status) in [
        ("canceled", BatchStatus::Cancelled),
        ("CANCELLED", BatchStatus::Cancelled),
        ("expired", BatchStatus::Expired),
        ("failed", BatchStatus::Failed),
        ("finalizing", BatchStatus::Finalizing),
        ("cancelling", BatchStatus::Cancelling),
    ] {
        assert_eq!(BatchStatus::from(text), status);
    }
    Ok(())
}

#[test]
fn failed_batch_errors_are_summarised() -> anyhow::Result<()> {
    let batch: Batch = serde_json::from_value(json!({
        "id": "batch_x",
        "status": "failed",
        "errors": {"object": "list", "data": [
            {"code": "duplicate_custom_id", "message": "The custom_id 'a' is duplicated.", "param": "custom_id", "line": 2},
            {"code": "invalid_url", "message": "Bad url", "line": null}
        ]}
    }))?;
    let summary = batch.error_summary().expect("errors");
    assert!(summary.contains("duplicate_custom_id: The custom_id 'a' is duplicated. (line 2)"));
    assert!(summary.contains("invalid_url: Bad url"));
    Ok(())
}

#[test]
fn garbage_timestamps_are_absent_not_fatal() -> anyhow::Result<()> {
    let batch: Batch = serde_json::from_value(json!({
        "id": "b", "status": "completed",
        "created_at": "yesterday", "completed_at": -5, "failed_at": {"x": 1},
        "metadata": {"n": 3, "s": "v", "gone": null}
    }))?;
    assert_eq!(batch.created_at, None);
    assert_eq!(batch.completed_at, None);
    assert_eq!(batch.failed_at, None);
    assert_eq!(batch.metadata.get("n").map(String::as_str), Some("3"));
    assert_eq!(batch.metadata.get("s").map(String::as_str), Some("v"));
    assert!(!batch.metadata.contains_key("gone"));
    Ok(())
}

#[test]
fn a_batch_without_an_id_is_an_error() {
    assert!(serde_json::from_str::<Batch>(r#"{"status": "completed"}"#).is_err());
    assert!(serde_json::from_str::<Batch>(r#"{"id": null, "status": "completed"}"#).is_err());
}

#[test]
fn file_objects_parse_with_and_without_optional_fields() -> anyhow::Result<()> {
    let file: FileObject = serde_json::from_value(json!({
        "id": "file-abc123", "object": "file", "bytes": 120000,
        "created_at": 1677610602, "filename": "batch.jsonl", "purpose": "batch"
    }))?;
    assert_eq!(file.id, "file-abc123");
    assert_eq!(file.bytes, 120000);
    let bare: FileObject = serde_json::from_str(r#"{"id": 99}"#)?;
    assert_eq!(bare.id, "99");
    assert_eq!(bare.bytes, 0);
    assert_eq!(bare.filename, None);
    Ok(())
}

#[test]
fn output_and_error_lines_parse() -> anyhow::Result<()> {
    let ok: OutputLine = serde_json::from_str(
        r#"{"id":"batch_req_1","custom_id":"c1","response":{"status_code":200,"request_id":"req_1","body":{"choices":[{"message":{"content":"{}"},"finish_reason":"stop"}]}},"error":null}"#,
    )?;
    assert_eq!(ok.custom_id, "c1");
    let response = ok.response.expect("response");
    assert_eq!(response.status_code, 200);
    assert_eq!(response.request_id.as_deref(), Some("req_1"));
    assert_eq!(response.body["choices"][0]["finish_reason"], "stop");
    assert_eq!(ok.error, None);

    let failed: OutputLine = serde_json::from_str(
        r#"{"id":"batch_req_2","custom_id":"c2","response":null,"error":{"code":"inference_failed","message":"Maximum retries reached"}}"#,
    )?;
    assert_eq!(failed.response, None);
    let error = failed.error.expect("error");
    assert_eq!(error.code.as_deref(), Some("inference_failed"));
    assert_eq!(error.message.as_deref(), Some("Maximum retries reached"));
    Ok(())
}

/// `errors` as providers send it: OpenAI's list object with `data` null (the SDK types
/// it `Optional[List[BatchError]]`), a bare list, absent, a lone string; codes that are
/// numbers and lines that are strings. None of them fails the batch, and a numeric code
/// keeps its reason.
#[test]
fn every_shape_of_errors_parses_and_keeps_its_reasons() -> anyhow::Result<()> {
    let cases = [
        (json!({"object": "list", "data": null}), None),
        (json!({"object": "list"}), None),
        (json!(null), None),
        (json!([]), None),
        (
            json!([{"code": "invalid_json_line", "message": "Line 3 is not JSON", "line": 3}]),
            Some("invalid_json_line: Line 3 is not JSON (line 3)"),
        ),
        (
            json!({"object": "list", "data": [{"code": 400, "message": "bad model", "line": "7", "param": null}]}),
            Some("400: bad model (line 7)"),
        ),
        (
            json!({"data": [{"code": null, "message": "no code", "line": "not a number"}]}),
            Some("error: no code"),
        ),
        (
            json!("the input file was rejected"),
            Some("error: the input file was rejected"),
        ),
        (
            json!(["first", {"message": "second"}]),
            Some("error: first\nerror: second"),
        ),
        (json!(42), Some("error: 42")),
    ];
    for (errors, summary) in cases {
        let batch: Batch = serde_json::from_value(json!({
            "id": "batch_1", "status": "failed", "errors": errors.clone()
        }))?;
        assert_eq!(batch.error_summary().as_deref(), summary, "{errors}");
    }
    Ok(())
}

/// No well-formed batch object with an id and a status fails to parse, whatever its other
/// fields hold: a batch that cannot be parsed can never be harvested. Every known field
/// gets values of every JSON type, drawn at random.
#[test]
fn any_batch_with_an_id_and_a_status_parses() -> anyhow::Result<()> {
    use rand::{Rng, SeedableRng};
    const FIELDS: [&str; 18] = [
        "object",
        "endpoint",
        "input_file_id",
        "output_file_id",
        "error_file_id",
        "completion_window",
        "errors",
        "request_counts",
        "metadata",
        "created_at",
        "in_progress_at",
        "expires_at",
        "finalizing_at",
        "completed_at",
        "failed_at",
        "expired_at",
        "cancelling_at",
        "cancelled_at",
    ];
    let mut rng = rand::rngs::StdRng::seed_from_u64(17);
    fn value(rng: &mut rand::rngs::StdRng, depth: u32) -> serde_json::Value {
        match rng.random_range(0..if depth > 2 { 5 } else { 7 }) {
            0 => json!(null),
            1 => json!(rng.random_bool(0.5)),
            2 => json!(rng.random_range(-5_i64..2_000_000_000_000)),
            3 => json!(rng.random_range(-1.0e3..1.0e13)),
            4 => json!(["", "x", "123", "file-1", "in_progress"][rng.random_range(0..5)]),
            5 => serde_json::Value::Array(
                (0..rng.random_range(0..3))
                    .map(|_| value(rng, depth + 1))
                    .collect(),
            ),
            _ => {
                let keys = [
                    "data",
                    "code",
                    "line",
                    "message",
                    "total",
                    "completed",
                    "failed",
                    "k",
                ];
                serde_json::Value::Object(
                    (0..rng.random_range(0..4))
                        .map(|_| {
                            (
                                keys[rng.random_range(0..keys.len())].to_owned(),
                                value(rng, depth + 1),
                            )
                        })
                        .collect(),
                )
            }
        }
    }
    for round in 0..3_000 {
        let mut object = serde_json::Map::new();
        object.insert("id".into(), json!(format!("batch_{round}")));
        let status = [
            json!("completed"),
            json!("failed"),
            json!("weird"),
            json!(3),
        ];
        object.insert("status".into(), status[round % status.len()].clone());
        for field in FIELDS {
            if rng.random_bool(0.7) {
                object.insert(field.into(), value(&mut rng, 0));
            }
        }
        let object = serde_json::Value::Object(object);
        let parsed: Result<Batch, _> = serde_json::from_value(object.clone());
        assert!(parsed.is_ok(), "{object}: {:?}", parsed.err());
    }
    Ok(())
}
