//! The OpenAI-compatible surface: auth, files, batches, answers, validation.

mod common;

use std::collections::{HashMap, HashSet};

use anyhow::Context as _;
use batch_emulator::IdStyle;
use common::*;
use serde_json::{Value, json};

#[tokio::test]
async fn rejects_missing_and_wrong_keys_without_echoing_them() -> anyhow::Result<()> {
    let (_emulator, api) = start(fast_config()).await?;
    for path in ["/v1/batches", "/v1/files/file-x", "/admin/stats"] {
        let response = api.http.get(api.url(path)).send().await?;
        assert_eq!(response.status(), 401, "{path} without a key");
        let body: Value = response.json().await?;
        assert!(body["error"]["message"].is_string());
        assert!(body["error"]["type"].is_string());
    }
    let wrong = "sk-wrong-secret-value";
    let response = api
        .http
        .get(api.url("/v1/batches/batch_x"))
        .bearer_auth(wrong)
        .send()
        .await?;
    assert_eq!(response.status(), 401);
    let text = response.text().await?;
    assert!(!text.contains(wrong), "the key is echoed: {text}");
    assert!(!text.contains(KEY));
    let body: Value = serde_json::from_str(&text)?;
    assert_eq!(body["error"]["code"], "invalid_api_key");
    Ok(())
}

#[tokio::test]
async fn unknown_ids_are_404_in_openai_shape() -> anyhow::Result<()> {
    let (_emulator, api) = start(fast_config()).await?;
    for path in [
        "/v1/batches/batch_nope",
        "/v1/files/file-nope",
        "/v1/files/file-nope/content",
    ] {
        let response = api.get(path).await?;
        assert_eq!(response.status(), 404, "{path}");
        let body: Value = response.json().await?;
        assert!(body["error"]["message"].as_str().is_some());
        assert_eq!(body["error"]["type"], "invalid_request_error");
    }
    let response = api
        .post_json(
            "/v1/batches",
            &json!({"input_file_id":"file-nope","endpoint":ENDPOINT,"completion_window":"24h"}),
        )
        .await?;
    assert_eq!(response.status(), 404);
    Ok(())
}

#[tokio::test]
async fn batch_runs_to_completed_with_correct_counts() -> anyhow::Result<()> {
    // A longer in_progress so polling sees it even on a busy machine.
    let (_emulator, api) = start(fast_config().with_delays(10, 150, 10)).await?;
    let lines = tiny_requests(7, &landing_schema());
    let file_id = api.upload(jsonl(&lines)).await?;
    let file: Value = api
        .get(&format!("/v1/files/{file_id}"))
        .await?
        .json()
        .await?;
    assert_eq!(file["object"], "file");
    assert_eq!(file["purpose"], "batch");
    assert!(file_id.starts_with("file-"));

    let created = api.create_batch(&file_id, json!({})).await?;
    assert_eq!(created["object"], "batch");
    assert_eq!(created["status"], "validating");
    assert_eq!(created["metadata"]["job"], "test");
    let id = created["id"].as_str().context("id")?;
    assert!(id.starts_with("batch_"));
    let created_at = created["created_at"].as_i64().context("created_at")?;
    assert_eq!(created["expires_at"].as_i64(), Some(created_at + 86_400));

    let mut seen = HashSet::new();
    let batch = loop {
        let batch = api.batch(id).await?;
        let status = batch["status"].as_str().unwrap_or_default().to_owned();
        seen.insert(status.clone());
        if status == "completed" {
            break batch;
        }
        tokio::time::sleep(std::time::Duration::from_millis(3)).await;
    };
    assert!(seen.contains("in_progress"), "saw {seen:?}");
    assert_eq!(
        batch["request_counts"],
        json!({"total":7,"completed":7,"failed":0})
    );
    for key in ["in_progress_at", "finalizing_at", "completed_at"] {
        let at = batch[key].as_i64().context(key)?;
        assert!(at >= created_at && at < created_at + 10, "{key} = {at}");
    }
    assert!(batch["error_file_id"].is_null());
    assert_eq!(batch["model"], MODEL);

    let (outputs, errors) = api.results(&batch).await?;
    assert!(errors.is_empty());
    assert_eq!(outputs.len(), 7);
    let ids: HashSet<_> = outputs
        .iter()
        .filter_map(|l| l["custom_id"].as_str())
        .collect();
    assert_eq!(ids.len(), 7);
    for line in &outputs {
        assert!(
            line["id"]
                .as_str()
                .is_some_and(|s| s.starts_with("batch_req_"))
        );
        assert!(line["error"].is_null());
        assert_eq!(line["response"]["status_code"], 200);
        let body = &line["response"]["body"];
        assert_eq!(body["object"], "chat.completion");
        assert_eq!(body["model"], batch_emulator::EMULATOR_MODEL);
        assert_eq!(body["choices"][0]["finish_reason"], "stop");
        let usage = &body["usage"];
        let prompt = usage["prompt_tokens"].as_u64().context("prompt_tokens")?;
        let completion = usage["completion_tokens"]
            .as_u64()
            .context("completion_tokens")?;
        assert!(prompt >= 256);
        assert_eq!(usage["total_tokens"].as_u64(), Some(prompt + completion));
    }
    // Output order is shuffled, not input order.
    let order: Vec<_> = outputs
        .iter()
        .filter_map(|l| l["custom_id"].as_str())
        .collect();
    let sorted: Vec<String> = (0..7).map(|i| format!("req-{i}")).collect();
    assert_ne!(order, sorted.iter().map(String::as_str).collect::<Vec<_>>());

    let list: Value = api.get("/v1/batches?limit=5").await?.json().await?;
    assert_eq!(list["object"], "list");
    assert_eq!(list["data"][0]["id"], id);
    Ok(())
}

#[tokio::test]
async fn answers_satisfy_each_requests_own_schema() -> anyhow::Result<()> {
    let (_emulator, api) = start(fast_config()).await?;
    let shots = screenshots()?;
    assert!(shots.len() >= 10, "expected the screenshot set");
    let schemas = [("landing", landing_schema()), ("caption", caption_schema())];
    let mut lines = Vec::new();
    for (task, schema) in &schemas {
        for (name, png) in &shots {
            lines.push(request_line(
                &format!("{task}/{name}"),
                MODEL,
                &data_uri("image/png", png),
                schema,
            ));
        }
    }
    let batch = api.run_batch(&lines).await?;
    assert_eq!(batch["status"], "completed");
    let (outputs, errors) = api.results(&batch).await?;
    assert!(errors.is_empty(), "{errors:?}");
    assert_eq!(outputs.len(), lines.len());
    let validators: HashMap<&str, jsonschema::Validator> = schemas
        .iter()
        .map(|(task, schema)| Ok((*task, jsonschema::validator_for(schema)?)))
        .collect::<anyhow::Result<_>>()?;
    let mut captions = HashSet::new();
    for line in &outputs {
        let custom_id = line["custom_id"].as_str().context("custom_id")?;
        let task = custom_id.split('/').next().context("task")?;
        let answer: Value = serde_json::from_str(content_of(line)?)?;
        let validator = validators.get(task).context("validator")?;
        let problems: Vec<String> = validator
            .iter_errors(&answer)
            .map(|e| e.to_string())
            .collect();
        assert!(
            problems.is_empty(),
            "{custom_id}: {answer} breaks its schema: {problems:?}"
        );
        if task == "caption" {
            captions.insert(answer["caption"].to_string());
        }
    }
    assert!(captions.len() > 1, "captions should vary by image");
    Ok(())
}

#[tokio::test]
async fn answers_are_deterministic_per_image_and_seed() -> anyhow::Result<()> {
    let images: Vec<Vec<u8>> = (0..8).map(|i| tiny_png(10 * i, 3, 77)).collect();
    let schema = caption_schema();
    // Same image under two custom ids in one batch, plus distinct images.
    let mut lines: Vec<Value> = images
        .iter()
        .enumerate()
        .map(|(i, png)| {
            request_line(
                &format!("img-{i}"),
                MODEL,
                &data_uri("image/png", png),
                &schema,
            )
        })
        .collect();
    lines.push(request_line(
        "img-0-again",
        MODEL,
        &data_uri("image/png", &images[0]),
        &schema,
    ));

    let answers = |outputs: Vec<Value>| -> anyhow::Result<HashMap<String, String>> {
        outputs
            .iter()
            .map(|l| {
                Ok((
                    l["custom_id"].as_str().context("custom_id")?.to_owned(),
                    content_of(l)?.to_owned(),
                ))
            })
            .collect()
    };
    let run = |seed: u64| {
        let lines = lines.clone();
        async move {
            let (_emulator, api) = start(fast_config().with_seed(seed)).await?;
            let batch = api.run_batch(&lines).await?;
            let (outputs, _) = api.results(&batch).await?;
            anyhow::Ok(outputs)
        }
    };
    let first = answers(run(1).await?)?;
    let again = answers(run(1).await?)?;
    let other_seed = answers(run(2).await?)?;
    assert_eq!(first, again, "same seed, same images: same answers");
    assert_eq!(
        first["img-0"], first["img-0-again"],
        "same image: same answer"
    );
    let distinct: HashSet<_> = (0..8).map(|i| &first[&format!("img-{i}")]).collect();
    assert!(distinct.len() > 1, "different images should differ");
    let changed = (0..8)
        .filter(|i| first[&format!("img-{i}")] != other_seed[&format!("img-{i}")])
        .count();
    assert!(changed > 0, "a different seed should change answers");
    Ok(())
}

#[tokio::test]
async fn undecodable_images_become_error_lines() -> anyhow::Result<()> {
    let (_emulator, api) = start(fast_config()).await?;
    let awkward = data_dir().join("awkward");
    let not_image = std::fs::read(awkward.join("not-an-image.png"))?;
    let truncated = std::fs::read(awkward.join("truncated.png"))?;
    let good = tiny_png(1, 2, 3);
    let schema = landing_schema();
    let lines = vec![
        request_line("good", MODEL, &data_uri("image/png", &good), &schema),
        request_line(
            "not-an-image",
            MODEL,
            &data_uri("image/png", &not_image),
            &schema,
        ),
        request_line(
            "truncated",
            MODEL,
            &data_uri("image/png", &truncated),
            &schema,
        ),
        request_line("empty", MODEL, &data_uri("image/png", b""), &schema),
        request_line(
            "bad-base64",
            MODEL,
            "data:image/png;base64,@@@not base64@@@",
            &schema,
        ),
        request_line("remote", MODEL, "https://example.com/a.png", &schema),
    ];
    let batch = api.run_batch(&lines).await?;
    assert_eq!(batch["status"], "completed");
    assert_eq!(
        batch["request_counts"],
        json!({"total":6,"completed":1,"failed":5})
    );
    let (outputs, errors) = api.results(&batch).await?;
    assert_eq!(outputs.len(), 1);
    assert_eq!(outputs[0]["custom_id"], "good");
    let failed: HashSet<_> = errors
        .iter()
        .filter_map(|l| l["custom_id"].as_str())
        .collect();
    assert_eq!(
        failed,
        HashSet::from(["not-an-image", "truncated", "empty", "bad-base64", "remote"])
    );
    for line in &errors {
        assert!(line["response"].is_null());
        assert_eq!(line["error"]["code"], "invalid_image");
        assert!(
            line["error"]["message"]
                .as_str()
                .is_some_and(|m| !m.is_empty())
        );
    }
    Ok(())
}

#[tokio::test]
async fn every_awkward_but_valid_image_is_answered() -> anyhow::Result<()> {
    let (_emulator, api) = start(fast_config()).await?;
    let awkward = data_dir().join("awkward");
    let cases = [
        ("animated.gif", "image/gif"),
        ("cmyk.jpg", "image/jpeg"),
        ("gray16.png", "image/png"),
        ("interlaced.png", "image/png"),
        ("pixel.png", "image/png"),
        ("rotated-exif.jpg", "image/jpeg"),
        ("screenshot.jpg", "image/jpeg"),
        ("screenshot.webp", "image/webp"),
        ("transparent.png", "image/png"),
    ];
    let mut lines = Vec::new();
    for (name, mime) in cases {
        let bytes = std::fs::read(awkward.join(name))?;
        lines.push(request_line(
            name,
            MODEL,
            &data_uri(mime, &bytes),
            &landing_schema(),
        ));
    }
    let batch = api.run_batch(&lines).await?;
    let (outputs, errors) = api.results(&batch).await?;
    assert!(errors.is_empty(), "{errors:?}");
    assert_eq!(outputs.len(), cases.len());
    Ok(())
}

async fn failed_with(api: &Api, data: Vec<u8>) -> anyhow::Result<Vec<Value>> {
    let file_id = api.upload(data).await?;
    let batch = api.create_batch(&file_id, json!({})).await?;
    let batch = api.wait(batch["id"].as_str().context("id")?).await?;
    assert_eq!(batch["status"], "failed", "{batch}");
    assert!(batch["failed_at"].as_i64().is_some());
    assert!(batch["output_file_id"].is_null());
    assert_eq!(batch["errors"]["object"], "list");
    Ok(batch["errors"]["data"]
        .as_array()
        .context("errors.data")?
        .clone())
}

#[tokio::test]
async fn invalid_input_files_fail_the_batch_with_line_errors() -> anyhow::Result<()> {
    let mut config = fast_config();
    config.max_requests = 3;
    let (_emulator, api) = start(config).await?;
    let schema = landing_schema();
    let lines = tiny_requests(3, &schema);

    // Duplicate custom_id on line 3.
    let mut dup = lines.clone();
    dup[2]["custom_id"] = json!("req-0");
    let errors = failed_with(&api, jsonl(&dup)).await?;
    assert_eq!(errors.len(), 1);
    assert_eq!(errors[0]["code"], "duplicate_custom_id");
    assert_eq!(errors[0]["line"], 3);
    assert_eq!(errors[0]["param"], "custom_id");
    assert!(errors[0]["message"].as_str().is_some());

    // Wrong url on line 2.
    let mut wrong_url = lines.clone();
    wrong_url[1]["url"] = json!("/v1/embeddings");
    let errors = failed_with(&api, jsonl(&wrong_url)).await?;
    assert_eq!(errors[0]["code"], "url_mismatch");
    assert_eq!(errors[0]["line"], 2);

    // Mixed models.
    let mut mixed = lines.clone();
    mixed[1]["body"]["model"] = json!("another/model");
    let errors = failed_with(&api, jsonl(&mixed)).await?;
    assert_eq!(errors[0]["code"], "model_mismatch");
    assert_eq!(errors[0]["line"], 2);

    // Too many requests for the configured limit.
    let errors = failed_with(&api, jsonl(&tiny_requests(4, &schema))).await?;
    assert_eq!(errors[0]["code"], "too_many_requests");

    // Not JSON, wrong method, missing custom_id and model.
    let mut other = lines.clone();
    other[0]["method"] = json!("GET");
    other[1]
        .as_object_mut()
        .context("object")?
        .remove("custom_id");
    other[2]["body"]
        .as_object_mut()
        .context("object")?
        .remove("model");
    let mut data = jsonl(&other);
    data.extend_from_slice(b"{not json\n");
    let mut config_big = fast_config();
    config_big.max_requests = 10;
    let (_emulator2, api2) = start(config_big).await?;
    let errors = failed_with(&api2, data).await?;
    let codes: Vec<_> = errors
        .iter()
        .map(|e| {
            (
                e["code"].as_str().unwrap_or_default(),
                e["line"].as_u64().unwrap_or(0),
            )
        })
        .collect();
    assert_eq!(
        codes,
        vec![
            ("invalid_method", 1),
            ("missing_custom_id", 2),
            ("missing_model", 3),
            ("invalid_json_line", 4)
        ]
    );
    Ok(())
}

#[tokio::test]
async fn create_rejects_bad_parameters() -> anyhow::Result<()> {
    let (_emulator, api) = start(fast_config()).await?;
    let file_id = api
        .upload(jsonl(&tiny_requests(1, &landing_schema())))
        .await?;
    let cases = [
        json!({"input_file_id": file_id, "endpoint": ENDPOINT, "completion_window": "48h"}),
        json!({"input_file_id": file_id, "endpoint": "/v1/nope", "completion_window": "24h"}),
        json!({"endpoint": ENDPOINT, "completion_window": "24h"}),
        json!({"input_file_id": file_id, "endpoint": ENDPOINT, "completion_window": "24h", "webhook_url": "ftp://x"}),
        json!({"input_file_id": file_id, "endpoint": ENDPOINT, "completion_window": "24h", "metadata": {"k": 1}}),
    ];
    for body in cases {
        let response = api.post_json("/v1/batches", &body).await?;
        assert_eq!(response.status(), 400, "{body}");
        let error: Value = response.json().await?;
        assert!(error["error"]["message"].is_string());
    }
    Ok(())
}

#[tokio::test]
async fn uploads_over_the_limit_are_refused() -> anyhow::Result<()> {
    let mut config = fast_config();
    config.max_file_bytes = 1000;
    let (_emulator, api) = start(config).await?;
    let form = reqwest::multipart::Form::new()
        .text("purpose", "batch")
        .part(
            "file",
            reqwest::multipart::Part::bytes(vec![b'x'; 5000]).file_name("big.jsonl"),
        );
    let response = api
        .http
        .post(api.url("/v1/files"))
        .bearer_auth(KEY)
        .multipart(form)
        .send()
        .await?;
    assert_eq!(response.status(), 413);
    let body: Value = response.json().await?;
    assert_eq!(body["error"]["code"], "file_too_large");
    Ok(())
}

#[tokio::test]
async fn millisecond_timestamps_and_plain_ids() -> anyhow::Result<()> {
    let mut config = fast_config();
    config.millis_timestamps = true;
    config.id_style = IdStyle::Plain;
    let (_emulator, api) = start(config).await?;
    let file_id = api
        .upload(jsonl(&tiny_requests(2, &landing_schema())))
        .await?;
    assert!(!file_id.starts_with("file-"));
    let created = api.create_batch(&file_id, json!({})).await?;
    let id = created["id"].as_str().context("id")?;
    assert!(!id.starts_with("batch_"), "{id}");
    let batch = api.wait(id).await?;
    assert_eq!(batch["status"], "completed");
    let created_at = batch["created_at"].as_i64().context("created_at")?;
    // Milliseconds since 1970 are past 10^12; seconds will not be for millennia.
    assert!(created_at > 1_000_000_000_000, "{created_at}");
    assert_eq!(batch["expires_at"].as_i64(), Some(created_at + 86_400_000));
    let completed_at = batch["completed_at"].as_i64().context("completed_at")?;
    assert!(completed_at >= created_at && completed_at - created_at < 10_000);
    Ok(())
}

#[tokio::test]
async fn cancel_keeps_the_finished_part() -> anyhow::Result<()> {
    let mut config = fast_config().with_delays(10, 1000, 10);
    config.seed = 3;
    let (_emulator, api) = start(config).await?;
    let file_id = api
        .upload(jsonl(&tiny_requests(20, &landing_schema())))
        .await?;
    let created = api.create_batch(&file_id, json!({})).await?;
    let id = created["id"].as_str().context("id")?;
    // Cancel halfway through in_progress.
    loop {
        if api.batch(id).await?["status"] == "in_progress" {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    let cancelling = api.cancel(id).await?;
    assert_eq!(cancelling["status"], "cancelling");
    assert!(cancelling["cancelling_at"].as_i64().is_some());
    let batch = api.wait(id).await?;
    assert_eq!(batch["status"], "cancelled");
    assert!(batch["cancelled_at"].as_i64().is_some());
    let (outputs, _) = api.results(&batch).await?;
    assert!(
        !outputs.is_empty() && outputs.len() < 20,
        "finished {}",
        outputs.len()
    );
    assert_eq!(batch["request_counts"]["completed"], outputs.len());
    assert_eq!(batch["request_counts"]["total"], 20);

    // A finished batch cannot be cancelled.
    let response = api
        .post_json(&format!("/v1/batches/{id}/cancel"), &json!({}))
        .await?;
    assert_eq!(
        response.status(),
        200,
        "cancelling a cancelled batch is a no-op"
    );
    let done = api.run_batch(&tiny_requests(1, &landing_schema())).await?;
    let response = api
        .post_json(
            &format!(
                "/v1/batches/{}/cancel",
                done["id"].as_str().unwrap_or_default()
            ),
            &json!({}),
        )
        .await?;
    assert_eq!(response.status(), 409);
    Ok(())
}

#[tokio::test]
async fn requests_without_a_schema_get_a_json_object() -> anyhow::Result<()> {
    let (_emulator, api) = start(fast_config()).await?;
    let mut line = tiny_requests(1, &landing_schema()).remove(0);
    line["body"]
        .as_object_mut()
        .context("object")?
        .remove("response_format");
    let batch = api.run_batch(&[line]).await?;
    let (outputs, _) = api.results(&batch).await?;
    let answer: Value = serde_json::from_str(content_of(&outputs[0])?)?;
    assert!(answer.is_object());
    Ok(())
}
