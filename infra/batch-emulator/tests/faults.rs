//! Fault injection: each kind shows up when set to 1.0, admin endpoints
//! change them at runtime, and admin routes are never faulted themselves.

mod common;

use anyhow::Context as _;
use batch_emulator::FaultSettings;
use common::*;
use serde_json::{Value, json};

async fn run_with(
    faults: FaultSettings,
    n: usize,
) -> anyhow::Result<(Value, Vec<Value>, Vec<Value>, batch_emulator::Stats)> {
    let (emulator, api) = start(fast_config().with_faults(faults)).await?;
    let batch = api.run_batch(&tiny_requests(n, &landing_schema())).await?;
    let (outputs, errors) = api.results(&batch).await?;
    Ok((batch, outputs, errors, emulator.stats()))
}

#[tokio::test]
async fn error_line_fault() -> anyhow::Result<()> {
    let (batch, outputs, errors, stats) = run_with(
        FaultSettings {
            error_line: 1.0,
            ..Default::default()
        },
        6,
    )
    .await?;
    assert_eq!(batch["status"], "completed");
    assert!(batch["output_file_id"].is_null(), "nothing succeeded");
    assert!(outputs.is_empty());
    assert_eq!(errors.len(), 6);
    for line in &errors {
        assert_eq!(line["error"]["code"], "inference_failed");
        assert_eq!(line["error"]["message"], "Maximum retries reached");
    }
    assert_eq!(
        batch["request_counts"],
        json!({"total":6,"completed":0,"failed":6})
    );
    assert_eq!(stats.faults["error_line"], 6);
    assert_eq!(stats.requests_failed, 6);
    Ok(())
}

#[tokio::test]
async fn non_json_fault() -> anyhow::Result<()> {
    let (_, outputs, _, stats) = run_with(
        FaultSettings {
            non_json: 1.0,
            ..Default::default()
        },
        6,
    )
    .await?;
    assert_eq!(outputs.len(), 6);
    for line in &outputs {
        assert!(serde_json::from_str::<Value>(content_of(line)?).is_err());
        assert_eq!(line["response"]["status_code"], 200);
    }
    assert_eq!(stats.faults["non_json"], 6);
    Ok(())
}

#[tokio::test]
async fn schema_break_fault() -> anyhow::Result<()> {
    let validator = jsonschema::validator_for(&landing_schema())?;
    let (_, outputs, _, stats) = run_with(
        FaultSettings {
            schema_break: 1.0,
            ..Default::default()
        },
        6,
    )
    .await?;
    assert_eq!(outputs.len(), 6);
    for line in &outputs {
        let answer: Value = serde_json::from_str(content_of(line)?).context("still valid JSON")?;
        assert!(
            !validator.is_valid(&answer),
            "{answer} should break the schema"
        );
    }
    assert_eq!(stats.faults["schema_break"], 6);

    // The caption schema breaks too.
    let validator = jsonschema::validator_for(&caption_schema())?;
    let (_emulator, api) = start(fast_config().with_faults(FaultSettings {
        schema_break: 1.0,
        ..Default::default()
    }))
    .await?;
    let batch = api.run_batch(&tiny_requests(3, &caption_schema())).await?;
    let (outputs, _) = api.results(&batch).await?;
    for line in &outputs {
        let answer: Value = serde_json::from_str(content_of(line)?)?;
        assert!(!validator.is_valid(&answer), "{answer}");
    }
    Ok(())
}

#[tokio::test]
async fn length_fault() -> anyhow::Result<()> {
    let (_, outputs, _, stats) = run_with(
        FaultSettings {
            length: 1.0,
            ..Default::default()
        },
        6,
    )
    .await?;
    assert_eq!(outputs.len(), 6);
    for line in &outputs {
        assert_eq!(
            line["response"]["body"]["choices"][0]["finish_reason"],
            "length"
        );
        let content = content_of(line)?;
        assert!(!content.is_empty());
        assert!(
            serde_json::from_str::<Value>(content).is_err(),
            "{content} should be cut off"
        );
    }
    assert_eq!(stats.faults["length"], 6);
    Ok(())
}

#[tokio::test]
async fn fractional_faults_are_reproducible_from_the_seed() -> anyhow::Result<()> {
    let faults = FaultSettings {
        error_line: 0.5,
        ..Default::default()
    };
    let failed_ids = |errors: Vec<Value>| {
        let mut ids: Vec<String> = errors
            .iter()
            .filter_map(|l| l["custom_id"].as_str().map(str::to_owned))
            .collect();
        ids.sort();
        ids
    };
    let (_, _, a, _) = run_with(faults.clone(), 40).await?;
    let (_, _, b, _) = run_with(faults, 40).await?;
    let (a, b) = (failed_ids(a), failed_ids(b));
    assert_eq!(a, b);
    assert!(
        a.len() > 5 && a.len() < 35,
        "about half fail, got {}",
        a.len()
    );
    Ok(())
}

#[tokio::test]
async fn http_429_and_500_injection() -> anyhow::Result<()> {
    let (emulator, api) = start(fast_config().with_faults(FaultSettings {
        http_429: 1.0,
        ..Default::default()
    }))
    .await?;
    let response = api.get("/v1/batches").await?;
    assert_eq!(response.status(), 429);
    let headers = response.headers();
    assert_eq!(
        headers.get("retry-after").and_then(|v| v.to_str().ok()),
        Some("0")
    );
    assert_eq!(
        headers.get("retry-after-ms").and_then(|v| v.to_str().ok()),
        Some("20")
    );
    let body: Value = response.json().await?;
    assert_eq!(body["error"]["code"], "rate_limit_exceeded");

    // Admin routes are never faulted; switch to 500s at runtime.
    let response = api
        .http
        .put(api.url("/admin/faults"))
        .bearer_auth(KEY)
        .json(&json!({"http_429": 0.0, "http_500": 1.0}))
        .send()
        .await?;
    assert_eq!(response.status(), 200);
    let faults: Value = response.json().await?;
    assert_eq!(faults["http_500"], 1.0);
    assert_eq!(faults["http_429"], 0.0);

    let response = api.get("/v1/files/file-x").await?;
    assert_eq!(response.status(), 500);
    let body: Value = response.json().await?;
    assert_eq!(body["error"]["type"], "server_error");

    // Auth comes before fault injection.
    let response = api.http.get(api.url("/v1/batches")).send().await?;
    assert_eq!(response.status(), 401);

    let stats: Value = api.get("/admin/stats").await?.json().await?;
    assert_eq!(stats["faults"]["http_429"], 1);
    assert_eq!(stats["faults"]["http_500"], 1);
    assert_eq!(stats["api_calls"], 2);

    // Bad settings are refused and change nothing.
    let response = api
        .http
        .put(api.url("/admin/faults"))
        .bearer_auth(KEY)
        .json(&json!({"error_line": 1.5}))
        .send()
        .await?;
    assert_eq!(response.status(), 400);
    assert_eq!(emulator.faults().http_500, 1.0);

    let response = api
        .http
        .post(api.url("/admin/reset-stats"))
        .bearer_auth(KEY)
        .send()
        .await?;
    assert_eq!(response.status(), 200);
    assert_eq!(emulator.stats().api_calls, 0);
    Ok(())
}

#[tokio::test]
async fn expiry_keeps_partial_output() -> anyhow::Result<()> {
    let (batch, outputs, errors, stats) = run_with(
        FaultSettings {
            expire: 1.0,
            ..Default::default()
        },
        10,
    )
    .await?;
    assert_eq!(batch["status"], "expired");
    assert!(batch["expired_at"].as_i64().is_some());
    assert_eq!(outputs.len(), 5);
    assert_eq!(errors.len(), 5);
    for line in &errors {
        assert_eq!(line["error"]["code"], "batch_expired");
    }
    let mut all: Vec<_> = outputs
        .iter()
        .chain(&errors)
        .filter_map(|l| l["custom_id"].as_str())
        .collect();
    all.sort_unstable();
    all.dedup();
    assert_eq!(all.len(), 10, "every request is accounted for exactly once");
    assert_eq!(
        batch["request_counts"],
        json!({"total":10,"completed":5,"failed":5})
    );
    assert_eq!(stats.faults["expire"], 1);
    assert_eq!(stats.batches["expired"], 1);
    Ok(())
}
