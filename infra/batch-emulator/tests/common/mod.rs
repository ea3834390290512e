//! Shared helpers for the emulator's integration tests: a small hand-written
//! client (no OpenAI SDK on the Rust side) and request builders.
#![allow(dead_code)]

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use base64::Engine as _;
use batch_emulator::{EmulatorConfig, RunningEmulator};
use serde_json::{Value, json};

pub const KEY: &str = "sk-test-key-123";
pub const MODEL: &str = "google/gemma-3-27b-instruct/bf-16";
pub const ENDPOINT: &str = "/v1/chat/completions";

/// Fast delays so a whole batch takes well under a second.
pub fn fast_config() -> EmulatorConfig {
    let mut config = EmulatorConfig::new(KEY).with_delays(10, 30, 10);
    config.webhook_backoff = Duration::from_millis(10);
    config.webhook_timeout = Duration::from_secs(2);
    config
}

pub async fn start(config: EmulatorConfig) -> anyhow::Result<(RunningEmulator, Api)> {
    let emulator = batch_emulator::spawn(config).await?;
    let api = Api::new(&emulator.root_url(), KEY);
    Ok((emulator, api))
}

pub fn landing_schema() -> Value {
    json!({"type":"object","additionalProperties":false,"required":["landing_page","aesthetic"],
        "properties":{"landing_page":{"type":"boolean"},"aesthetic":{"type":"integer","enum":[1,2,3,4,5]}}})
}

pub fn caption_schema() -> Value {
    json!({"type":"object","additionalProperties":false,"required":["caption","tags"],
        "properties":{"caption":{"type":"string","minLength":1},
        "tags":{"type":"array","minItems":1,"maxItems":8,"items":{"type":"string","minLength":1}}}})
}

pub fn data_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/data")
}

pub fn screenshots() -> anyhow::Result<Vec<(String, Vec<u8>)>> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(data_dir().join("screenshots"))? {
        let path = entry?.path();
        if path.extension().and_then(|e| e.to_str()) == Some("png") {
            let name = path
                .file_stem()
                .and_then(|s| s.to_str())
                .context("file name")?
                .to_owned();
            out.push((name, std::fs::read(&path)?));
        }
    }
    out.sort();
    Ok(out)
}

/// A small solid-colour PNG; different colours give different bytes.
pub fn tiny_png(r: u8, g: u8, b: u8) -> Vec<u8> {
    let img = image::RgbImage::from_pixel(4, 3, image::Rgb([r, g, b]));
    let mut out = std::io::Cursor::new(Vec::new());
    img.write_to(&mut out, image::ImageFormat::Png)
        .expect("encode png");
    out.into_inner()
}

pub fn data_uri(mime: &str, bytes: &[u8]) -> String {
    format!(
        "data:{mime};base64,{}",
        base64::engine::general_purpose::STANDARD.encode(bytes)
    )
}

/// One batch input line asking about one image under a strict schema.
pub fn request_line(custom_id: &str, model: &str, image_uri: &str, schema: &Value) -> Value {
    json!({
        "custom_id": custom_id,
        "method": "POST",
        "url": ENDPOINT,
        "body": {
            "model": model,
            "messages": [{"role": "user", "content": [
                {"type": "text", "text": "Label this screenshot."},
                {"type": "image_url", "image_url": {"url": image_uri}}
            ]}],
            "response_format": {"type": "json_schema",
                "json_schema": {"name": "labels", "strict": true, "schema": schema}}
        }
    })
}

pub fn jsonl(lines: &[Value]) -> Vec<u8> {
    let mut out = String::new();
    for line in lines {
        out.push_str(&line.to_string());
        out.push('\n');
    }
    out.into_bytes()
}

/// `n` requests over distinct tiny images.
pub fn tiny_requests(n: usize, schema: &Value) -> Vec<Value> {
    (0..n)
        .map(|i| {
            let png = tiny_png(i as u8, (i * 7) as u8, 200);
            request_line(
                &format!("req-{i}"),
                MODEL,
                &data_uri("image/png", &png),
                schema,
            )
        })
        .collect()
}

pub fn parse_lines(text: &str) -> anyhow::Result<Vec<Value>> {
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).context("output line is JSON"))
        .collect()
}

/// The assistant content of an output line.
pub fn content_of(line: &Value) -> anyhow::Result<&str> {
    line.pointer("/response/body/choices/0/message/content")
        .and_then(Value::as_str)
        .context("output line has content")
}

#[derive(Debug, Clone)]
pub struct Api {
    pub root: String,
    pub key: String,
    pub http: reqwest::Client,
}

impl Api {
    pub fn new(root: &str, key: &str) -> Self {
        Self {
            root: root.to_owned(),
            key: key.to_owned(),
            http: reqwest::Client::new(),
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.root)
    }

    pub async fn get(&self, path: &str) -> anyhow::Result<reqwest::Response> {
        Ok(self
            .http
            .get(self.url(path))
            .bearer_auth(&self.key)
            .send()
            .await?)
    }

    pub async fn post_json(&self, path: &str, body: &Value) -> anyhow::Result<reqwest::Response> {
        Ok(self
            .http
            .post(self.url(path))
            .bearer_auth(&self.key)
            .json(body)
            .send()
            .await?)
    }

    async fn ok_json(response: reqwest::Response) -> anyhow::Result<Value> {
        let status = response.status();
        let body: Value = response.json().await?;
        if !status.is_success() {
            bail!("HTTP {status}: {body}");
        }
        Ok(body)
    }

    pub async fn upload(&self, data: Vec<u8>) -> anyhow::Result<String> {
        let form = reqwest::multipart::Form::new()
            .text("purpose", "batch")
            .part(
                "file",
                reqwest::multipart::Part::bytes(data).file_name("input.jsonl"),
            );
        let response = self
            .http
            .post(self.url("/v1/files"))
            .bearer_auth(&self.key)
            .multipart(form)
            .send()
            .await?;
        let file = Self::ok_json(response).await?;
        Ok(file["id"].as_str().context("file id")?.to_owned())
    }

    pub async fn create_batch(&self, file_id: &str, extra: Value) -> anyhow::Result<Value> {
        let mut body = json!({
            "input_file_id": file_id,
            "endpoint": ENDPOINT,
            "completion_window": "24h",
            "metadata": {"job": "test"},
        });
        if let (Some(map), Value::Object(extra)) = (body.as_object_mut(), extra) {
            map.extend(extra);
        }
        Self::ok_json(self.post_json("/v1/batches", &body).await?).await
    }

    pub async fn batch(&self, id: &str) -> anyhow::Result<Value> {
        Self::ok_json(self.get(&format!("/v1/batches/{id}")).await?).await
    }

    pub async fn cancel(&self, id: &str) -> anyhow::Result<Value> {
        Self::ok_json(
            self.post_json(&format!("/v1/batches/{id}/cancel"), &json!({}))
                .await?,
        )
        .await
    }

    /// Polls until the batch reaches a terminal status.
    pub async fn wait(&self, id: &str) -> anyhow::Result<Value> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let batch = self.batch(id).await?;
            let status = batch["status"].as_str().unwrap_or_default();
            if matches!(status, "completed" | "failed" | "expired" | "cancelled") {
                return Ok(batch);
            }
            if Instant::now() > deadline {
                bail!("batch {id} stuck in {status}");
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    pub async fn content(&self, file_id: &str) -> anyhow::Result<String> {
        let response = self.get(&format!("/v1/files/{file_id}/content")).await?;
        if !response.status().is_success() {
            bail!("HTTP {}", response.status());
        }
        Ok(response.text().await?)
    }

    /// Output and error lines of a finished batch (empty when a file is null).
    pub async fn results(&self, batch: &Value) -> anyhow::Result<(Vec<Value>, Vec<Value>)> {
        let mut sets = Vec::new();
        for key in ["output_file_id", "error_file_id"] {
            sets.push(match batch[key].as_str() {
                Some(id) => parse_lines(&self.content(id).await?)?,
                None => Vec::new(),
            });
        }
        let errors = sets.pop().unwrap_or_default();
        let outputs = sets.pop().unwrap_or_default();
        Ok((outputs, errors))
    }

    /// Upload, create, wait: the finished batch object.
    pub async fn run_batch(&self, lines: &[Value]) -> anyhow::Result<Value> {
        let file_id = self.upload(jsonl(lines)).await?;
        let batch = self.create_batch(&file_id, json!({})).await?;
        self.wait(batch["id"].as_str().context("batch id")?).await
    }
}
