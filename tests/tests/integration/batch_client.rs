//! The shared batch-API client against the batch emulator: whole batches, the emulator's
//! injected 429/500, Inference.net-style ids and millisecond timestamps.

use std::io::Write;
use std::path::Path;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::Engine;
use batch_emulator::{EMULATOR_MODEL, EmulatorConfig, FaultSettings, IdStyle, RunningEmulator};
use secrecy::SecretString;
use shotlabel_batch_client::{BatchApiConfig, BatchClient, RetryPolicy};
use shotlabel_core::batch_api::{Batch, BatchStatus, CreateBatchRequest, OutputLine};
use shotlabel_core::task::Task;
use tokio::io::AsyncBufReadExt;

const KEY: &str = "emulator-test-key";

fn screenshots() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("data/screenshots")
}

async fn emulator(config: EmulatorConfig) -> anyhow::Result<RunningEmulator> {
    let mut config = config.with_delays(20, 50, 20);
    config.api_key = KEY.into();
    config.listen = "127.0.0.1:0".parse()?;
    Ok(batch_emulator::spawn(config).await?)
}

fn client_for(emulator: &RunningEmulator, retry: RetryPolicy) -> anyhow::Result<BatchClient> {
    let mut config = BatchApiConfig::new(&emulator.base_url(), SecretString::from(KEY))?;
    config.retry = retry;
    Ok(BatchClient::new(config)?)
}

fn quick_retries(max_attempts: u32) -> RetryPolicy {
    RetryPolicy {
        max_attempts,
        initial_backoff: Duration::from_millis(5),
        max_backoff: Duration::from_millis(50),
        max_retry_after: Duration::from_millis(200),
    }
}

/// Writes one request line per screenshot (the raw PNG as a data URI) and returns the
/// file and the custom ids in order.
fn write_requests(
    dir: &Path,
    task: &Task,
    count: usize,
) -> anyhow::Result<(std::path::PathBuf, Vec<String>)> {
    let mut images: Vec<_> = std::fs::read_dir(screenshots())?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "png"))
        .collect();
    images.sort();
    let path = dir.join("requests.jsonl");
    let mut file = std::io::BufWriter::new(std::fs::File::create(&path)?);
    let mut ids = Vec::new();
    for (i, image) in images.iter().take(count).enumerate() {
        let data = base64::engine::general_purpose::STANDARD.encode(std::fs::read(image)?);
        let custom_id = format!("img-{i}");
        let line = serde_json::json!({
            "custom_id": custom_id,
            "method": "POST",
            "url": "/v1/chat/completions",
            "body": task.chat_completion_body(&format!("data:image/png;base64,{data}")),
        });
        serde_json::to_writer(&mut file, &line)?;
        file.write_all(b"\n")?;
        ids.push(custom_id);
    }
    file.flush()?;
    Ok((path, ids))
}

async fn wait_terminal(client: &BatchClient, id: &str) -> anyhow::Result<Batch> {
    let started = Instant::now();
    loop {
        let batch = client.retrieve_batch(id).await?;
        if batch.status.is_terminal() {
            return Ok(batch);
        }
        anyhow::ensure!(
            started.elapsed() < Duration::from_secs(60),
            "batch {id} never finished"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

async fn read_lines(client: &BatchClient, file_id: &str) -> anyhow::Result<Vec<OutputLine>> {
    let mut lines = client.file_reader(file_id).await?.lines();
    let mut parsed = Vec::new();
    while let Some(line) = lines.next_line().await? {
        if !line.trim().is_empty() {
            parsed.push(serde_json::from_str(&line)?);
        }
    }
    Ok(parsed)
}

/// Runs one batch from upload to output and checks every answer against the task.
async fn run_batch(client: &BatchClient, task: &Task, count: usize) -> anyhow::Result<Batch> {
    let dir = tempfile::tempdir()?;
    let (path, ids) = write_requests(dir.path(), task, count)?;
    let file = client.upload_file(&path).await?;
    let mut request = CreateBatchRequest::chat_completions(&file.id);
    request.metadata.insert("submission".into(), "sub-1".into());
    let created = client.create_batch(&request).await?;
    assert_eq!(created.input_file_id.as_deref(), Some(file.id.as_str()));
    let batch = wait_terminal(client, &created.id).await?;
    assert_eq!(batch.status, BatchStatus::Completed);
    assert_eq!(
        batch.metadata.get("submission").map(String::as_str),
        Some("sub-1")
    );
    let counts = batch.request_counts.unwrap_or_default();
    assert_eq!(counts.total, ids.len() as u64);
    assert_eq!(counts.completed, ids.len() as u64);

    let output_id = batch
        .output_file_id
        .clone()
        .ok_or_else(|| anyhow::anyhow!("no output file"))?;
    let lines = read_lines(client, &output_id).await?;
    let mut answered: Vec<String> = lines.iter().map(|l| l.custom_id.clone()).collect();
    answered.sort();
    let mut expected = ids.clone();
    expected.sort();
    assert_eq!(answered, expected, "every request answered exactly once");
    for line in lines {
        let response = line
            .response
            .ok_or_else(|| anyhow::anyhow!("no response"))?;
        assert_eq!(response.status_code, 200);
        assert_eq!(
            response.body["model"], EMULATOR_MODEL,
            "answers name the emulator"
        );
        let content = response.body["choices"][0]["message"]["content"]
            .as_str()
            .ok_or_else(|| anyhow::anyhow!("no content"))?;
        let answer: serde_json::Value = serde_json::from_str(content)?;
        if let Err(problems) = task.validate_answer(&answer) {
            anyhow::bail!(
                "{}: {answer} breaks the schema: {problems:?}",
                line.custom_id
            );
        }
    }
    Ok(batch)
}

#[tokio::test]
async fn a_batch_goes_from_upload_to_validated_answers() -> anyhow::Result<()> {
    let emulator = emulator(EmulatorConfig::default()).await?;
    let client = client_for(&emulator, quick_retries(3))?;
    run_batch(&client, &Task::default_task()?, 12).await?;
    let caption =
        Task::from_path(&Path::new(env!("CARGO_MANIFEST_DIR")).join("../tasks/caption.toml"))?;
    run_batch(&client, &caption, 3).await?;
    Ok(())
}

#[tokio::test]
async fn injected_429_and_500_are_retried_through() -> anyhow::Result<()> {
    let faults = FaultSettings {
        http_429: 0.3,
        http_500: 0.3,
        ..FaultSettings::default()
    };
    let emulator = emulator(EmulatorConfig::default().with_seed(7).with_faults(faults)).await?;
    let client = client_for(&emulator, quick_retries(30))?;
    run_batch(&client, &Task::default_task()?, 4).await?;
    let stats = emulator.stats();
    let injected = |kind: &str| stats.faults.get(kind).copied().unwrap_or(0);
    assert!(injected("http_429") > 0, "{:?}", stats.faults);
    assert!(injected("http_500") > 0, "{:?}", stats.faults);
    Ok(())
}

#[tokio::test]
async fn persistent_429_surfaces_after_the_retry_budget() -> anyhow::Result<()> {
    let faults = FaultSettings {
        http_429: 1.0,
        ..FaultSettings::default()
    };
    let emulator = emulator(EmulatorConfig::default().with_faults(faults)).await?;
    let client = client_for(&emulator, quick_retries(3))?;
    let err = client
        .retrieve_batch("batch_missing")
        .await
        .expect_err("always 429");
    assert_eq!(err.status(), Some(429));
    assert!(!err.to_string().contains(KEY));
    assert_eq!(emulator.stats().faults.get("http_429").copied(), Some(3));
    Ok(())
}

#[tokio::test]
async fn a_404_is_not_retried_even_when_faults_are_on() -> anyhow::Result<()> {
    let emulator = emulator(EmulatorConfig::default()).await?;
    let client = client_for(&emulator, quick_retries(5))?;
    let err = client
        .retrieve_batch("batch_nope")
        .await
        .expect_err("unknown batch");
    assert_eq!(err.status(), Some(404));
    assert_eq!(emulator.stats().api_calls, 1);
    Ok(())
}

#[tokio::test]
async fn plain_ids_and_millisecond_timestamps_parse() -> anyhow::Result<()> {
    let config = EmulatorConfig {
        id_style: IdStyle::Plain,
        millis_timestamps: true,
        ..EmulatorConfig::default()
    };
    let emulator = emulator(config).await?;
    let client = client_for(&emulator, quick_retries(3))?;
    let batch = run_batch(&client, &Task::default_task()?, 2).await?;
    assert!(!batch.id.starts_with("batch_"), "{}", batch.id);
    let now = SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs() as i64;
    let created = batch
        .created_at
        .ok_or_else(|| anyhow::anyhow!("no created_at"))?;
    assert!(
        (created.as_secs() - now).abs() < 120,
        "created_at {} vs now {now}",
        created.as_secs()
    );
    let completed = batch
        .completed_at
        .ok_or_else(|| anyhow::anyhow!("no completed_at"))?;
    assert!(completed >= created);
    Ok(())
}

#[tokio::test]
async fn a_rejected_input_file_fails_the_batch_with_reasons() -> anyhow::Result<()> {
    let emulator = emulator(EmulatorConfig::default()).await?;
    let client = client_for(&emulator, quick_retries(3))?;
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("dupes.jsonl");
    let line = serde_json::json!({
        "custom_id": "same", "method": "POST", "url": "/v1/chat/completions",
        "body": {"model": "m", "messages": []}
    });
    std::fs::write(&path, format!("{line}\n{line}\n"))?;
    let file = client.upload_file(&path).await?;
    let created = client
        .create_batch(&CreateBatchRequest::chat_completions(&file.id))
        .await?;
    let batch = wait_terminal(&client, &created.id).await?;
    assert_eq!(batch.status, BatchStatus::Failed);
    let summary = batch.error_summary().unwrap_or_default();
    assert!(summary.contains("same"), "{summary}");
    assert!(summary.contains("line 2"), "{summary}");
    Ok(())
}

#[tokio::test]
async fn cancel_keeps_the_batch_retrievable() -> anyhow::Result<()> {
    // Slow enough that the cancel lands while the batch is still running.
    let config = EmulatorConfig {
        listen: "127.0.0.1:0".parse()?,
        ..EmulatorConfig::new(KEY)
    }
    .with_delays(50, 5_000, 50);
    let emulator = batch_emulator::spawn(config).await?;
    let client = client_for(&emulator, quick_retries(3))?;
    let dir = tempfile::tempdir()?;
    let (path, _) = write_requests(dir.path(), &Task::default_task()?, 2)?;
    let file = client.upload_file(&path).await?;
    let created = client
        .create_batch(&CreateBatchRequest::chat_completions(&file.id))
        .await?;
    let cancelling = client.cancel_batch(&created.id).await?;
    assert!(
        matches!(
            cancelling.status,
            BatchStatus::Cancelling | BatchStatus::Cancelled
        ),
        "{}",
        cancelling.status
    );
    let batch = wait_terminal(&client, &created.id).await?;
    assert_eq!(batch.status, BatchStatus::Cancelled);
    Ok(())
}

/// `errors` in every shape the emulator can write (OpenAI's list, `data: null`, a bare
/// list, numeric codes with string lines): the client parses each batch, completed or
/// failed, and a failed batch's summary keeps the provider's reason and line.
#[tokio::test]
async fn batches_parse_whatever_shape_their_errors_take() -> anyhow::Result<()> {
    use batch_emulator::ErrorsShape;
    for shape in [
        ErrorsShape::OpenAi,
        ErrorsShape::NullData,
        ErrorsShape::Bare,
        ErrorsShape::Loose,
    ] {
        let emulator = emulator(EmulatorConfig {
            errors_shape: shape,
            ..EmulatorConfig::default()
        })
        .await?;
        let client = client_for(&emulator, quick_retries(3))?;
        let completed = run_batch(&client, &Task::default_task()?, 2).await?;
        assert_eq!(completed.error_summary(), None, "{shape:?}");

        let dir = tempfile::tempdir()?;
        let path = dir.path().join("broken.jsonl");
        std::fs::write(&path, "this line is not JSON\n")?;
        let file = client.upload_file(&path).await?;
        let created = client
            .create_batch(&CreateBatchRequest::chat_completions(&file.id))
            .await?;
        let failed = wait_terminal(&client, &created.id).await?;
        assert_eq!(failed.status, BatchStatus::Failed, "{shape:?}");
        let summary = failed.error_summary().unwrap_or_default();
        assert!(
            summary.contains("invalid_json_line") && summary.contains("(line 1)"),
            "{shape:?}: {summary}"
        );
    }
    Ok(())
}

#[tokio::test]
async fn a_batch_is_created_only_once_its_file_is_processed() -> anyhow::Result<()> {
    let faults = FaultSettings {
        file_processing_ms: 400,
        ..FaultSettings::default()
    };
    let emulator = emulator(EmulatorConfig::default().with_faults(faults)).await?;
    let task = Task::default_task()?;
    let dir = tempfile::tempdir()?;
    let (path, _) = write_requests(dir.path(), &task, 2)?;

    // Without the wait, the provider refuses the creation (OpenAI's "Cannot find file").
    let mut impatient = BatchApiConfig::new(&emulator.base_url(), SecretString::from(KEY))?;
    impatient.file_ready_timeout = Some(Duration::ZERO);
    let impatient = BatchClient::new(impatient)?;
    let err = impatient
        .upload_file(&path)
        .await
        .expect_err("the file is still being processed");
    let shotlabel_core::batch_api::BatchApiError::FileNotReady {
        file_id, status, ..
    } = &err
    else {
        anyhow::bail!("expected FileNotReady, got {err}");
    };
    assert_eq!(status, "uploaded");
    let refused = impatient
        .create_batch(&CreateBatchRequest::chat_completions(file_id))
        .await
        .expect_err("created from a file not yet processed");
    assert_eq!(refused.status(), Some(400), "{refused}");
    assert!(
        refused.to_string().contains("Cannot find file"),
        "{refused}"
    );

    // The client waits for `processed`, then creates.
    let mut patient = BatchApiConfig::new(&emulator.base_url(), SecretString::from(KEY))?;
    patient.file_poll_interval = Duration::from_millis(50);
    let patient = BatchClient::new(patient)?;
    let started = Instant::now();
    let file = patient.upload_file(&path).await?;
    assert_eq!(file.status.as_deref(), Some("processed"));
    assert!(started.elapsed() >= Duration::from_millis(400));
    let batch = patient
        .create_batch(&CreateBatchRequest::chat_completions(&file.id))
        .await?;
    assert_eq!(
        wait_terminal(&patient, &batch.id).await?.status,
        BatchStatus::Completed
    );
    let stats = emulator.stats();
    assert_eq!(stats.faults.get("file_not_processed").copied(), Some(1));
    Ok(())
}

#[tokio::test]
async fn a_creation_whose_answer_is_lost_is_found_not_made_twice() -> anyhow::Result<()> {
    let emulator = emulator(EmulatorConfig::default()).await?;
    let client = client_for(&emulator, quick_retries(4))?;
    let task = Task::default_task()?;
    let dir = tempfile::tempdir()?;
    let (path, _) = write_requests(dir.path(), &task, 2)?;

    // Other batches first, so the lookup has to tell them apart.
    let mut others = Vec::new();
    for _ in 0..3 {
        let file = client.upload_file(&path).await?;
        let mut request = CreateBatchRequest::chat_completions(&file.id);
        request.metadata.insert("manifest".into(), "other".into());
        others.push(client.create_batch(&request).await?.id);
    }
    emulator.set_faults(faults_lost())?;
    let file = client.upload_file(&path).await?;
    let mut request = CreateBatchRequest::chat_completions(&file.id);
    request.metadata.insert("manifest".into(), "m-1".into());
    let batch = client.create_batch(&request).await?;

    assert!(!others.contains(&batch.id));
    assert_eq!(batch.input_file_id.as_deref(), Some(file.id.as_str()));
    assert_eq!(
        batch.metadata.get("manifest").map(String::as_str),
        Some("m-1")
    );
    let stats = emulator.stats();
    assert_eq!(stats.faults.get("create_lost_answer").copied(), Some(1));
    assert_eq!(
        stats.batches.values().sum::<u64>(),
        4,
        "one batch for the lost answer, none made twice: {:?}",
        stats.batches
    );
    Ok(())
}

fn faults_lost() -> FaultSettings {
    FaultSettings {
        create_lost_answer: 1.0,
        ..FaultSettings::default()
    }
}

#[tokio::test]
async fn a_provider_that_refuses_unknown_arguments_refuses_webhook_url() -> anyhow::Result<()> {
    // OpenAI's behaviour, which is why the openai profile refuses per-batch webhooks at
    // start-up instead of failing every batch creation.
    let config = EmulatorConfig {
        strict_arguments: true,
        ..EmulatorConfig::default()
    };
    let emulator = emulator(config).await?;
    let client = client_for(&emulator, quick_retries(3))?;
    let task = Task::default_task()?;
    let dir = tempfile::tempdir()?;
    let (path, _) = write_requests(dir.path(), &task, 1)?;
    let file = client.upload_file(&path).await?;
    let mut request = CreateBatchRequest::chat_completions(&file.id);
    request.webhook_url = Some("https://hooks.example/batch/x".into());
    let refused = client
        .create_batch(&request)
        .await
        .expect_err("webhook_url is not an OpenAI argument");
    assert_eq!(refused.status(), Some(400));
    assert!(
        refused
            .to_string()
            .contains("Unrecognized request argument supplied: webhook_url"),
        "{refused}"
    );
    request.webhook_url = None;
    client.create_batch(&request).await?;
    Ok(())
}
