//! `shotlabel local`: the local stack on one machine.
//!
//! Today (the foundation) it brings up moto server and the batch emulator, creates the
//! template's resources, uploads the images, and sends them straight to the provider with
//! the batch client, because enqueue, submit and webhook are not built yet. It says so.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::Context;
use aws_sdk_s3::primitives::ByteStream;
use base64::Engine;
use batch_emulator::{EmulatorConfig, RunningEmulator};
use secrecy::SecretString;
use serde_json::Value;
use shotlabel_localstack::{MotoServer, create_resources, s3_client};
use shotlabel_shared::batch_api::{BatchApiConfig, BatchClient, CreateBatchRequest, OutputLine};
use shotlabel_shared::task::Task;
use tokio::io::AsyncBufReadExt;

use crate::task_cmd::load_task;

const INPUT_PREFIX: &str = "incoming/";
const STACK_NAME: &str = "shotlabel-local";

pub fn run(images: &Path, task: Option<&Path>, keep_running: bool) -> anyhow::Result<ExitCode> {
    let runtime = tokio::runtime::Runtime::new().context("cannot start the async runtime")?;
    runtime.block_on(run_local(images, task, keep_running))
}

/// Where requests go: a real provider from the environment, or the bundled emulator.
struct Provider {
    base_url: String,
    api_key: SecretString,
    /// Kept alive for as long as the run needs it.
    emulator: Option<RunningEmulator>,
}

async fn start_provider() -> anyhow::Result<Provider> {
    let url = std::env::var("SHOTLABEL_PROVIDER_URL")
        .ok()
        .filter(|u| !u.is_empty());
    let key = std::env::var("SHOTLABEL_API_KEY")
        .ok()
        .filter(|k| !k.is_empty());
    if let (Some(base_url), Some(key)) = (url, key) {
        return Ok(Provider {
            base_url,
            api_key: SecretString::from(key),
            emulator: None,
        });
    }
    // A fresh key per run: the emulator is only reachable on loopback anyway.
    let key = format!("local-{:016x}", rand_key());
    let mut config = EmulatorConfig::new(key.clone()).with_delays(300, 1500, 300);
    config.listen = "127.0.0.1:0".parse()?;
    let emulator = batch_emulator::spawn(config)
        .await
        .context("cannot start the batch emulator")?;
    Ok(Provider {
        base_url: emulator.base_url(),
        api_key: SecretString::from(key),
        emulator: Some(emulator),
    })
}

fn rand_key() -> u64 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or_default();
    (nanos as u64) ^ u64::from(std::process::id()).rotate_left(32)
}

/// The images in `dir` that a provider accepts, by extension, sorted by name.
fn list_images(dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let entries = std::fs::read_dir(dir)
        .with_context(|| format!("cannot read the image folder {}", dir.display()))?;
    let mut images: Vec<PathBuf> = entries
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.is_file() && mime_type(p).is_some())
        .collect();
    images.sort();
    anyhow::ensure!(
        !images.is_empty(),
        "no images (.png, .jpg, .jpeg, .webp, .gif) in {}",
        dir.display()
    );
    Ok(images)
}

fn mime_type(path: &Path) -> Option<&'static str> {
    let ext = path.extension()?.to_str()?.to_ascii_lowercase();
    Some(match ext.as_str() {
        "png" => "image/png",
        "jpg" | "jpeg" => "image/jpeg",
        "webp" => "image/webp",
        "gif" => "image/gif",
        _ => return None,
    })
}

async fn run_local(
    images_dir: &Path,
    task: Option<&Path>,
    keep_running: bool,
) -> anyhow::Result<ExitCode> {
    let started = Instant::now();
    let task = load_task(task)?;
    let images = list_images(images_dir)?;

    println!(
        "shotlabel local: task {} (version {})",
        task.name(),
        task.version()
    );
    let moto = MotoServer::start()
        .await
        .context("cannot start moto server (S3 and SQS)")?;
    let sdk = moto.sdk_config().await;
    let resources = create_resources(&sdk, STACK_NAME).await?;
    let provider = start_provider().await?;
    println!("  S3 endpoint:   {}", moto.endpoint());
    println!("  bucket:        {}", resources.bucket);
    println!("  input prefix:  {INPUT_PREFIX}");
    println!("  pending queue: {}", resources.pending_queue_url);
    match &provider.emulator {
        Some(_) => println!(
            "  provider:      {} (the bundled batch emulator: its answers are synthetic, not a model's)",
            provider.base_url
        ),
        None => println!("  provider:      {}", provider.base_url),
    }
    println!("  webhook URL:   not built yet (issue 4)");

    let s3 = s3_client(&sdk);
    for image in &images {
        let name = image
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let body = ByteStream::from_path(image)
            .await
            .with_context(|| format!("cannot read {}", image.display()))?;
        s3.put_object()
            .bucket(&resources.bucket)
            .key(format!("{INPUT_PREFIX}{name}"))
            .body(body)
            .send()
            .await
            .with_context(|| format!("cannot upload {name} to the local bucket"))?;
    }
    println!(
        "Uploaded {} images to s3://{}/{INPUT_PREFIX}",
        images.len(),
        resources.bucket
    );
    println!();
    println!("Not built yet: enqueue and submit (issue 3), webhook and harvest (issue 4).");
    println!("Until then the images go straight from the bucket to the provider as one batch,");
    println!("unresized (image preparation is issue 3), and no labels are written back.");
    println!();

    let mut config = BatchApiConfig::new(&provider.base_url, provider.api_key.clone())?;
    config.read_timeout = Duration::from_secs(60);
    let client = BatchClient::new(config)?;
    let dir = tempfile::tempdir().context("cannot create a temporary folder")?;
    let requests = dir.path().join("requests.jsonl");
    let mut keys = BTreeMap::new();
    {
        let mut out = std::io::BufWriter::new(std::fs::File::create(&requests)?);
        for (i, image) in images.iter().enumerate() {
            let name = image
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            let key = format!("{INPUT_PREFIX}{name}");
            let object = s3
                .get_object()
                .bucket(&resources.bucket)
                .key(&key)
                .send()
                .await?;
            let bytes = object.body.collect().await?.into_bytes();
            let mime = mime_type(image).unwrap_or("image/png");
            let data_uri = format!(
                "data:{mime};base64,{}",
                base64::engine::general_purpose::STANDARD.encode(&bytes)
            );
            let custom_id = format!("r{i}");
            let line = serde_json::json!({
                "custom_id": custom_id,
                "method": "POST",
                "url": "/v1/chat/completions",
                "body": task.chat_completion_body(&data_uri),
            });
            serde_json::to_writer(&mut out, &line)?;
            out.write_all(b"\n")?;
            keys.insert(custom_id, key);
        }
        out.flush()?;
    }
    let file = client.upload_file(&requests).await?;
    let mut request = CreateBatchRequest::chat_completions(&file.id);
    request
        .metadata
        .insert("source".into(), "shotlabel local".into());
    request
        .metadata
        .insert("task_version".into(), task.version().into());
    let mut batch = client.create_batch(&request).await?;
    println!("Batch {} created ({} requests)", batch.id, keys.len());
    let mut last_status = batch.status.clone();
    println!("  status: {last_status}");
    while !batch.status.is_terminal() {
        tokio::time::sleep(Duration::from_millis(250)).await;
        batch = client.retrieve_batch(&batch.id).await?;
        if batch.status != last_status {
            last_status = batch.status.clone();
            println!("  status: {last_status}");
        }
    }

    let mut summary = Summary::default();
    if let Some(output) = &batch.output_file_id {
        for line in read_lines(&client, output).await? {
            summary.add(&task, line);
        }
    }
    if let Some(errors) = &batch.error_file_id {
        for line in read_lines(&client, errors).await? {
            summary.add(&task, line);
        }
    }
    if let Some(reasons) = batch.error_summary() {
        println!("The provider rejected the batch:\n{reasons}");
    }
    summary.print(keys.len(), started.elapsed());
    if provider.emulator.is_some() {
        println!();
        println!("These answers came from the batch emulator: synthetic values derived from the");
        println!(
            "image bytes, not a model's labels. Set SHOTLABEL_PROVIDER_URL and SHOTLABEL_API_KEY"
        );
        println!("to send the same batch to a real provider.");
    }

    if keep_running {
        println!();
        println!(
            "Staying up (Ctrl-C to stop). S3: {}  bucket: {}",
            moto.endpoint(),
            resources.bucket
        );
        tokio::signal::ctrl_c().await?;
    }
    Ok(if batch.status.as_str() == "completed" {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

async fn read_lines(client: &BatchClient, file_id: &str) -> anyhow::Result<Vec<OutputLine>> {
    let mut lines = client.file_reader(file_id).await?.lines();
    let mut parsed = Vec::new();
    while let Some(line) = lines.next_line().await? {
        if line.trim().is_empty() {
            continue;
        }
        parsed.push(serde_json::from_str(&line).context("the provider sent an unreadable line")?);
    }
    Ok(parsed)
}

/// Counts of what came back, and the distribution of each answered field.
#[derive(Default)]
struct Summary {
    valid: usize,
    invalid: usize,
    errors: usize,
    tokens: u64,
    distribution: BTreeMap<String, BTreeMap<String, usize>>,
}

impl Summary {
    fn add(&mut self, task: &Task, line: OutputLine) {
        let Some(response) = line.response.filter(|r| r.status_code == 200) else {
            self.errors += 1;
            return;
        };
        self.tokens += response.body["usage"]["total_tokens"].as_u64().unwrap_or(0);
        let content = response.body["choices"][0]["message"]["content"]
            .as_str()
            .unwrap_or("");
        let answer: Option<Value> = serde_json::from_str(content).ok();
        match answer {
            Some(answer) if task.validate_answer(&answer).is_ok() => {
                self.valid += 1;
                if let Some(fields) = answer.as_object() {
                    for (field, value) in fields {
                        if value.is_array() || value.as_str().is_some_and(|s| s.len() > 24) {
                            continue; // free text and lists make no useful histogram
                        }
                        *self
                            .distribution
                            .entry(field.clone())
                            .or_default()
                            .entry(value.to_string())
                            .or_default() += 1;
                    }
                }
            }
            _ => self.invalid += 1,
        }
    }

    fn print(&self, images: usize, elapsed: Duration) {
        println!();
        println!("Summary");
        println!("  images:                   {images}");
        println!("  answers valid:            {}", self.valid);
        println!("  answers breaking schema:  {}", self.invalid);
        println!("  request errors:           {}", self.errors);
        println!("  tokens:                   {}", self.tokens);
        for (field, counts) in &self.distribution {
            let parts: Vec<String> = counts.iter().map(|(v, n)| format!("{v}: {n}")).collect();
            println!("  {field}: {}", parts.join(", "));
        }
        println!("  elapsed:                  {:.1} s", elapsed.as_secs_f64());
    }
}
