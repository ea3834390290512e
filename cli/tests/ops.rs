//! The operator commands (`backfill`, `status`, `redrive`, `export`) as a person runs
//! them: the built `shotlabel` binary against moto server, configured only through the
//! environment and flags, exactly as against AWS.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

use aws_sdk_s3::primitives::ByteStream;
use serde_json::{Value, json};
use shotlabel_core::records::RecordStatus;
use shotlabel_core::records::{
    BatchPhase, BatchRecord, HarvestCounts, LabelRecord, Layout, Provenance, SourceRef, TaskRef,
    state_keys,
};
use shotlabel_core::task::Task;
use shotlabel_localstack::{LocalResources, MotoServer, create_resources, s3_client, sqs_client};

const INPUT: &str = "incoming/";

struct Stack {
    moto: MotoServer,
    s3: aws_sdk_s3::Client,
    sqs: aws_sdk_sqs::Client,
    resources: LocalResources,
    home: tempfile::TempDir,
}

async fn stack(name: &str) -> anyhow::Result<Stack> {
    let moto = MotoServer::start().await?;
    let config = moto.sdk_config().await;
    let resources = create_resources(&config, name).await?;
    Ok(Stack {
        s3: s3_client(&config),
        sqs: sqs_client(&config),
        resources,
        moto,
        home: tempfile::tempdir()?,
    })
}

/// The environment a person would have after `export`ing the local stack's lines.
fn stack_env(stack: &Stack) -> Vec<(String, String)> {
    let r = &stack.resources;
    let mut env = aws_env(stack.moto.endpoint(), stack.home.path());
    env.extend(
        [
            ("SHOTLABEL_BUCKET", r.bucket.as_str()),
            ("SHOTLABEL_PENDING_QUEUE_URL", &r.pending_queue_url),
            (
                "SHOTLABEL_PENDING_DLQ_URL",
                &r.pending_dead_letter_queue_url,
            ),
            ("SHOTLABEL_HARVEST_QUEUE_URL", &r.harvest_queue_url),
            (
                "SHOTLABEL_HARVEST_DLQ_URL",
                &r.harvest_dead_letter_queue_url,
            ),
        ]
        .map(|(k, v)| (k.to_owned(), v.to_owned())),
    );
    env
}

/// Throwaway credentials and a local endpoint; no profile, no instance metadata.
fn aws_env(endpoint: &str, home: &Path) -> Vec<(String, String)> {
    [
        ("AWS_ENDPOINT_URL", endpoint),
        ("AWS_ACCESS_KEY_ID", "testing"),
        ("AWS_SECRET_ACCESS_KEY", "testing"),
        ("AWS_REGION", "us-east-1"),
        ("AWS_EC2_METADATA_DISABLED", "true"),
        ("HOME", &home.to_string_lossy()),
    ]
    .iter()
    .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
    .collect()
}

/// Runs the binary with exactly this environment (nothing inherited).
fn shotlabel(env: &[(String, String)], args: &[&str]) -> anyhow::Result<Output> {
    Ok(Command::new(env!("CARGO_BIN_EXE_shotlabel"))
        .args(args)
        .current_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
        .env_clear()
        .envs(env.iter().map(|(k, v)| (k, v)))
        .output()?)
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Runs a command that must succeed and returns its stdout as JSON.
fn json_of(env: &[(String, String)], args: &[&str]) -> anyhow::Result<Value> {
    let out = shotlabel(env, args)?;
    anyhow::ensure!(
        out.status.success(),
        "{args:?} failed: {}{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    Ok(serde_json::from_slice(&out.stdout)?)
}

/// A failure a person can act on: non-zero, one line on stderr, no panic.
fn one_line_failure(out: &Output) -> String {
    let stderr = text(&out.stderr);
    assert!(!out.status.success(), "should have failed: {stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(!stderr.contains("backtrace"), "{stderr}");
    assert_eq!(stderr.trim_end().lines().count(), 1, "one line: {stderr:?}");
    assert!(stderr.starts_with("shotlabel: "), "{stderr}");
    stderr.trim_end().to_owned()
}

fn screenshot(name: &str) -> anyhow::Result<Vec<u8>> {
    Ok(std::fs::read(
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../tests/data/screenshots")
            .join(name),
    )?)
}

/// Puts an object and returns its etag (without quotes).
async fn put(stack: &Stack, key: &str, body: Vec<u8>) -> anyhow::Result<String> {
    let out = stack
        .s3
        .put_object()
        .bucket(&stack.resources.bucket)
        .key(key)
        .body(ByteStream::from(body))
        .send()
        .await?;
    Ok(out.e_tag.unwrap_or_default().trim_matches('"').to_owned())
}

async fn put_json(stack: &Stack, key: &str, value: &impl serde::Serialize) -> anyhow::Result<()> {
    put(stack, key, serde_json::to_vec(value)?).await?;
    Ok(())
}

fn task_ref() -> anyhow::Result<TaskRef> {
    let task = Task::default_task()?;
    Ok(TaskRef {
        name: task.name().into(),
        version: task.version().into(),
    })
}

/// A label record as the harvest writes it.
fn label(stack: &Stack, key: &str, etag: &str, task: TaskRef, answer: Value) -> LabelRecord {
    LabelRecord {
        status: RecordStatus::Labelled,
        label: answer,
        source: SourceRef {
            bucket: stack.resources.bucket.clone(),
            key: key.into(),
            etag: etag.into(),
            size: 1,
            version_id: None,
        },
        task,
        model: "test-model".into(),
        provenance: Provenance {
            batch_id: "batch_test".into(),
            custom_id: format!("c-{key}"),
            request_id: None,
            finish_reason: Some("stop".into()),
            usage: None,
        },
        attempt: 0,
        labelled_at: 1,
    }
}

/// Writes the label for an input key where the harvest would.
async fn put_label(stack: &Stack, record: &LabelRecord) -> anyhow::Result<()> {
    let layout = Layout::new(INPUT);
    let key = layout.label_key(layout.relative_or_key(&record.source.key));
    put_json(stack, &key, record).await
}

/// Receives everything a queue holds (bodies), hiding each for a minute.
async fn drain(stack: &Stack, queue_url: &str) -> anyhow::Result<Vec<String>> {
    let mut bodies = Vec::new();
    loop {
        let out = stack
            .sqs
            .receive_message()
            .queue_url(queue_url)
            .max_number_of_messages(10)
            .visibility_timeout(60)
            .wait_time_seconds(1)
            .send()
            .await?;
        let messages = out.messages.unwrap_or_default();
        if messages.is_empty() {
            return Ok(bodies);
        }
        bodies.extend(messages.into_iter().filter_map(|m| m.body));
    }
}

async fn send(stack: &Stack, queue_url: &str, body: &str) -> anyhow::Result<()> {
    stack
        .sqs
        .send_message()
        .queue_url(queue_url)
        .message_body(body)
        .send()
        .await?;
    Ok(())
}

async fn keys_under(stack: &Stack, prefix: &str) -> anyhow::Result<Vec<String>> {
    let out = stack
        .s3
        .list_objects_v2()
        .bucket(&stack.resources.bucket)
        .prefix(prefix)
        .send()
        .await?;
    Ok(out
        .contents
        .unwrap_or_default()
        .into_iter()
        .filter_map(|o| o.key)
        .collect())
}

#[tokio::test(flavor = "multi_thread")]
async fn backfill_queues_each_unlabelled_object_once() -> anyhow::Result<()> {
    let stack = stack("ops-backfill").await?;
    let png = screenshot("saas-landing.png")?;
    let labelled_etag = put(&stack, "incoming/a.png", png.clone()).await?;
    put(&stack, "incoming/b.png", screenshot("blog-article.png")?).await?;
    put(&stack, "incoming/sub/c.png", screenshot("docs-page.png")?).await?;
    put(&stack, "incoming/empty.png", Vec::new()).await?;
    put(&stack, "elsewhere/d.png", png.clone()).await?;
    // a.png is labelled for its content under the current task version: skipped.
    let current = task_ref()?;
    put_label(
        &stack,
        &label(
            &stack,
            "incoming/a.png",
            &labelled_etag,
            current.clone(),
            json!({}),
        ),
    )
    .await?;
    // b.png's label is from an older task version: queued again.
    let b_etag = put(&stack, "incoming/b.png", screenshot("blog-article.png")?).await?;
    let old = TaskRef {
        name: current.name.clone(),
        version: "an-older-version".into(),
    };
    put_label(
        &stack,
        &label(&stack, "incoming/b.png", &b_etag, old, json!({})),
    )
    .await?;

    let env = stack_env(&stack);
    let summary = json_of(&env, &["backfill", "--json"])?;
    assert_eq!(summary["listed"], 4, "{summary}");
    assert_eq!(summary["queued"], 2, "{summary}");
    assert_eq!(summary["already_labelled"], 1, "{summary}");
    assert_eq!(summary["failed"], 1, "{summary}");
    assert_eq!(summary["task_version"], current.version.as_str());

    let bodies = drain(&stack, &stack.resources.pending_queue_url).await?;
    let mut keys: Vec<String> = bodies
        .iter()
        .map(|b| {
            serde_json::from_str::<Value>(b).map(|v| v["key"].as_str().unwrap_or("").to_owned())
        })
        .collect::<Result<_, _>>()?;
    keys.sort();
    assert_eq!(keys, ["incoming/b.png", "incoming/sub/c.png"]);
    let item: Value = serde_json::from_str(&bodies[0])?;
    assert_eq!(item["bucket"], stack.resources.bucket.as_str());
    assert!(
        item["etag"]
            .as_str()
            .is_some_and(|e| !e.is_empty() && !e.contains('"'))
    );
    assert_eq!(
        keys_under(&stack, "failed/").await?,
        ["failed/empty.png.json"]
    );

    // A narrower prefix, given below the input prefix, queues only what is under it.
    let summary = json_of(&env, &["backfill", "--json", "--prefix", "sub/"])?;
    assert_eq!(summary["prefix"], "incoming/sub/");
    assert_eq!(summary["queued"], 1, "{summary}");
    let bodies = drain(&stack, &stack.resources.pending_queue_url).await?;
    assert_eq!(bodies.len(), 1);
    assert!(bodies[0].contains("incoming/sub/c.png"));

    // The human summary says what happened.
    let out = shotlabel(&env, &["backfill", "--prefix", "sub/"])?;
    assert!(out.status.success());
    assert!(
        text(&out.stdout).contains("queued 1"),
        "{}",
        text(&out.stdout)
    );
    Ok(())
}

fn batch_record(id: &str, phase: BatchPhase, tokens: (u64, u64)) -> anyhow::Result<BatchRecord> {
    Ok(BatchRecord {
        batch_id: id.into(),
        manifest: format!("manifest-{id}"),
        submission_id: "sub".into(),
        input_file_id: "file-1".into(),
        requests: 7,
        bytes: 1000,
        task: task_ref()?,
        model: "test-model".into(),
        phase,
        submitted_at: shotlabel_core::records::unix_now() - 125,
        provider_status: Some("in_progress".into()),
        harvest: (phase == BatchPhase::Harvested).then_some(HarvestCounts {
            labelled: 7,
            prompt_tokens: tokens.0,
            completion_tokens: tokens.1,
            ..HarvestCounts::default()
        }),
        harvested_at: None,
    })
}

#[tokio::test(flavor = "multi_thread")]
async fn status_reports_depths_batches_counts_and_tokens() -> anyhow::Result<()> {
    let stack = stack("ops-status").await?;
    let r = stack.resources.clone();
    send(&stack, &r.pending_queue_url, "{}").await?;
    send(&stack, &r.pending_queue_url, "{}").await?;
    send(&stack, &r.pending_dead_letter_queue_url, "{}").await?;
    send(&stack, &r.harvest_dead_letter_queue_url, "{}").await?;
    put(&stack, "labels/a.png.json", b"{}".to_vec()).await?;
    put(&stack, "labels/sub/b.png.json", b"{}".to_vec()).await?;
    put(&stack, "failed/c.png.json", b"{}".to_vec()).await?;
    for (id, phase, tokens) in [
        ("batch_done1", BatchPhase::Harvested, (100, 20)),
        ("batch_done2", BatchPhase::Harvested, (50, 5)),
        ("batch_open", BatchPhase::Open, (0, 0)),
    ] {
        put_json(
            &stack,
            &state_keys::batch(id),
            &batch_record(id, phase, tokens)?,
        )
        .await?;
    }
    put(&stack, &state_keys::open_marker("batch_open"), Vec::new()).await?;

    let env = stack_env(&stack);
    let status = json_of(&env, &["status", "--json"])?;
    assert_eq!(status["queues"]["pending"]["visible"], 2, "{status}");
    assert_eq!(status["queues"]["pending_dead_letter"]["visible"], 1);
    assert_eq!(status["queues"]["harvest"]["visible"], 0);
    assert_eq!(status["queues"]["harvest_dead_letter"]["visible"], 1);
    assert_eq!(status["labelled"], 2);
    assert_eq!(status["failed"], 1);
    assert_eq!(status["batches"]["total"], 3);
    assert_eq!(status["batches"]["open"], 1);
    assert_eq!(status["tokens"]["prompt"], 150);
    assert_eq!(status["tokens"]["completion"], 25);
    assert_eq!(status["tokens"]["total"], 175);
    let open = status["open_batches"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    assert_eq!(open.len(), 1, "{status}");
    assert_eq!(open[0]["batch_id"], "batch_open");
    assert_eq!(open[0]["status"], "in_progress");
    assert_eq!(open[0]["status_source"], "recorded");
    assert_eq!(open[0]["requests"], 7);
    assert!(open[0]["age_seconds"].as_u64().is_some_and(|a| a >= 125));

    let out = shotlabel(&env, &["status"])?;
    let table = text(&out.stdout);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(table.contains("pending dead-letter"), "{table}");
    assert!(table.contains("open batches 1"), "{table}");
    assert!(table.contains("batch_open"), "{table}");
    assert!(table.contains("tokens       175"), "{table}");

    // Without the harvest queues configured, status still reports the rest.
    let partial: Vec<(String, String)> = env
        .iter()
        .filter(|(k, _)| !k.starts_with("SHOTLABEL_HARVEST"))
        .cloned()
        .collect();
    let status = json_of(&partial, &["status", "--json"])?;
    assert!(status["queues"]["harvest"].is_null());
    assert_eq!(status["labelled"], 2);

    // An unreachable provider: the report still prints, then one line and a failure. The
    // API key is never shown.
    let mut with_provider = env.clone();
    with_provider.push((
        "SHOTLABEL_PROVIDER_URL".into(),
        "http://127.0.0.1:9/v1".into(),
    ));
    with_provider.push(("SHOTLABEL_API_KEY".into(), "sk-very-secret-key".into()));
    let out = shotlabel(&with_provider, &["status"])?;
    let line = one_line_failure(&out);
    assert!(
        line.contains("provider") && line.contains("127.0.0.1:9"),
        "{line}"
    );
    assert!(text(&out.stdout).contains("open batches 1"));
    assert!(!text(&out.stdout).contains("sk-very-secret-key"));
    assert!(!line.contains("sk-very-secret-key"));
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn status_asks_the_provider_about_open_batches() -> anyhow::Result<()> {
    use base64::Engine;
    use shotlabel_batch_client::{BatchApiConfig, BatchClient};
    use shotlabel_core::batch_api::CreateBatchRequest;

    const KEY: &str = "sk-ops-test";
    let stack = stack("ops-provider").await?;
    let mut config = batch_emulator::EmulatorConfig::new(KEY).with_delays(10, 20, 10);
    config.listen = "127.0.0.1:0".parse()?;
    let emulator = batch_emulator::spawn(config).await?;
    let client = BatchClient::new(BatchApiConfig::new(
        &emulator.base_url(),
        secrecy::SecretString::from(KEY),
    )?)?;
    let dir = tempfile::tempdir()?;
    let input = dir.path().join("input.jsonl");
    let uri = format!(
        "data:image/png;base64,{}",
        base64::engine::general_purpose::STANDARD.encode(screenshot("saas-landing.png")?)
    );
    let mut line = shotlabel_core::request::request_line("c-1", &Task::default_task()?, &uri);
    line.push(b'\n');
    std::fs::write(&input, line)?;
    let file = client.upload_file(&input).await?;
    let batch = client
        .create_batch(&CreateBatchRequest::chat_completions(file.id))
        .await?;
    let started = std::time::Instant::now();
    while !client.retrieve_batch(&batch.id).await?.status.is_terminal() {
        anyhow::ensure!(
            started.elapsed() < Duration::from_secs(60),
            "batch took too long"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    put_json(
        &stack,
        &state_keys::batch(&batch.id),
        &batch_record(&batch.id, BatchPhase::Open, (0, 0))?,
    )
    .await?;
    put(&stack, &state_keys::open_marker(&batch.id), Vec::new()).await?;

    let mut env = stack_env(&stack);
    env.push(("SHOTLABEL_PROVIDER_URL".into(), emulator.base_url()));
    env.push(("SHOTLABEL_API_KEY".into(), KEY.into()));
    let status = json_of(&env, &["status", "--json"])?;
    let open = &status["open_batches"][0];
    assert_eq!(open["batch_id"], batch.id.as_str(), "{status}");
    assert_eq!(open["status"], "completed", "{status}");
    assert_eq!(open["status_source"], "provider");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn redrive_moves_dead_letters_back_and_loses_none() -> anyhow::Result<()> {
    let stack = stack("ops-redrive").await?;
    let r = stack.resources.clone();
    for i in 0..13 {
        send(
            &stack,
            &r.pending_dead_letter_queue_url,
            &format!(r#"{{"n":{i}}}"#),
        )
        .await?;
    }
    send(
        &stack,
        &r.harvest_dead_letter_queue_url,
        r#"{"batch_id":"b1"}"#,
    )
    .await?;
    let env = stack_env(&stack);

    let summary = json_of(&env, &["redrive", "--json"])?;
    assert_eq!(summary["moved"], 13, "{summary}");
    let mut moved = drain(&stack, &r.pending_queue_url).await?;
    moved.sort();
    let mut expected: Vec<String> = (0..13).map(|i| format!(r#"{{"n":{i}}}"#)).collect();
    expected.sort();
    assert_eq!(moved, expected);
    assert!(
        drain(&stack, &r.pending_dead_letter_queue_url)
            .await?
            .is_empty()
    );
    // The harvest dead-letter queue was left alone.
    assert!(drain(&stack, &r.harvest_queue_url).await?.is_empty());

    let out = shotlabel(&env, &["redrive", "--harvest"])?;
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        text(&out.stdout).starts_with("moved 1 message(s)"),
        "{}",
        text(&out.stdout)
    );
    assert_eq!(
        drain(&stack, &r.harvest_queue_url).await?,
        [r#"{"batch_id":"b1"}"#]
    );

    // Nothing left: nothing moved.
    let summary = json_of(&env, &["redrive", "--json"])?;
    assert_eq!(summary["moved"], 0);
    Ok(())
}

/// Every file below `dir`, relative, sorted.
fn files_below(dir: &Path) -> anyhow::Result<Vec<String>> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(current) = stack.pop() {
        for entry in std::fs::read_dir(&current)? {
            let path = entry?.path();
            if path.is_dir() {
                stack.push(path);
            } else {
                out.push(path.strip_prefix(dir)?.to_string_lossy().into_owned());
            }
        }
    }
    out.sort();
    Ok(out)
}

fn read_jsonl(path: &Path) -> anyhow::Result<Vec<Value>> {
    std::fs::read_to_string(path)?
        .lines()
        .map(|l| Ok(serde_json::from_str(l)?))
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn export_writes_jsonl_and_an_imagefolder_and_refuses_hostile_keys() -> anyhow::Result<()> {
    let stack = stack("ops-export").await?;
    let current = task_ref()?;
    let mut images = BTreeMap::new();
    for (key, file, answer) in [
        (
            "incoming/a.png",
            "saas-landing.png",
            json!({"landing_page": true, "aesthetic": 5}),
        ),
        (
            "incoming/sub/b.png",
            "blog-article.png",
            json!({"landing_page": false, "aesthetic": 3}),
        ),
        (
            "incoming/../escape.png",
            "docs-page.png",
            json!({"landing_page": false, "aesthetic": 2}),
        ),
        (
            "incoming/a/../../x.png",
            "docs-page.png",
            json!({"landing_page": true, "aesthetic": 1}),
        ),
    ] {
        let bytes = screenshot(file)?;
        let etag = put(&stack, key, bytes.clone()).await?;
        put_label(&stack, &label(&stack, key, &etag, current.clone(), answer)).await?;
        images.insert(key, bytes);
    }
    // The hostile keys really are stored as such.
    let stored = keys_under(&stack, "incoming/").await?;
    assert!(
        stored.contains(&"incoming/../escape.png".to_owned()),
        "{stored:?}"
    );
    assert!(
        stored.contains(&"incoming/a/../../x.png".to_owned()),
        "{stored:?}"
    );
    // A label from an older task version, one whose image changed since, and junk.
    let etag = put(&stack, "incoming/old.png", screenshot("login-modal.png")?).await?;
    let old = TaskRef {
        name: current.name.clone(),
        version: "older".into(),
    };
    let old_label = label(
        &stack,
        "incoming/old.png",
        &etag,
        old,
        json!({"landing_page": true, "aesthetic": 4}),
    );
    put_label(&stack, &old_label).await?;
    let etag = put(
        &stack,
        "incoming/changed.png",
        screenshot("pricing-table.png")?,
    )
    .await?;
    put_label(
        &stack,
        &label(
            &stack,
            "incoming/changed.png",
            &etag,
            current.clone(),
            json!({"landing_page": false, "aesthetic": 4}),
        ),
    )
    .await?;
    put(
        &stack,
        "incoming/changed.png",
        screenshot("geocities-home.png")?,
    )
    .await?;
    put(&stack, "labels/junk.json", b"not a label".to_vec()).await?;

    // The labels' dataset parts, as for labels harvested before the harvest wrote parts:
    // `dataset rebuild` writes the current version's; the older version's part is put as
    // its harvest would have written it.
    let env = stack_env(&stack);
    let rebuilt = json_of(&env, &["dataset", "rebuild", "--json"])?;
    assert_eq!(
        (
            &rebuilt["labels"],
            &rebuilt["skipped"],
            &rebuilt["parts_written"]
        ),
        (&json!(5), &json!(2), &json!(1)),
        "{rebuilt}"
    );
    let again = json_of(&env, &["dataset", "rebuild", "--json"])?;
    assert_eq!(
        again["parts_written"], 0,
        "a batch with a part is left alone: {again}"
    );
    let task = Task::default_task()?;
    put(
        &stack,
        &shotlabel_core::dataset::part_key(task.name(), "older", "batch_old", 0),
        shotlabel_core::dataset::write_part(&task, &[old_label])?,
    )
    .await?;
    let root = tempfile::tempdir()?;

    // JSONL: every current label, flattened, with its provenance.
    let jsonl_dir = root.path().join("jsonl");
    let jsonl_dir_arg = jsonl_dir.to_string_lossy().into_owned();
    let summary = json_of(&env, &["export", "--out", &jsonl_dir_arg, "--json"])?;
    assert_eq!(summary["labels"], 5, "{summary}");
    assert_eq!(
        summary["parts"], 1,
        "only the current version's part is read"
    );
    assert_eq!(summary["unreadable"], 0);
    assert_eq!(files_below(&jsonl_dir)?, ["labels.jsonl"]);
    let rows = read_jsonl(&jsonl_dir.join("labels.jsonl"))?;
    let by_key: BTreeMap<String, &Value> = rows
        .iter()
        .map(|r| (r["key"].as_str().unwrap_or_default().to_owned(), r))
        .collect();
    let a = by_key
        .get("incoming/a.png")
        .copied()
        .cloned()
        .unwrap_or_default();
    assert_eq!(a["landing_page"], true);
    assert_eq!(a["aesthetic"], 5);
    assert_eq!(a["task_version"], current.version.as_str());
    assert_eq!(a["model"], "test-model");
    assert_eq!(a["batch_id"], "batch_test");
    assert!(a["etag"].as_str().is_some_and(|e| !e.is_empty()));
    assert!(by_key.contains_key("incoming/../escape.png"));
    // --include-stale brings the older version in.
    let summary = json_of(
        &env,
        &[
            "export",
            "--out",
            &jsonl_dir_arg,
            "--json",
            "--include-stale",
        ],
    )?;
    assert_eq!(summary["labels"], 6, "{summary}");

    // Imagefolder: the images below DIR, metadata.jsonl, hostile keys refused.
    let dataset = root.path().join("nested").join("dataset");
    let dataset_arg = dataset.to_string_lossy().into_owned();
    let out = shotlabel(
        &env,
        &[
            "export",
            "--out",
            &dataset_arg,
            "--format",
            "imagefolder",
            "--json",
        ],
    )?;
    assert!(out.status.success(), "{}", text(&out.stderr));
    let summary: Value = serde_json::from_slice(&out.stdout)?;
    assert_eq!(summary["images"], 2, "{summary}");
    assert_eq!(summary["refused"], 2, "{summary}");
    assert_eq!(summary["missing_images"], 1, "{summary}");
    let warnings = text(&out.stderr);
    assert!(warnings.contains("incoming/../escape.png"), "{warnings}");
    assert!(warnings.contains("incoming/a/../../x.png"), "{warnings}");
    assert!(warnings.contains("changed since"), "{warnings}");
    assert_eq!(
        files_below(&dataset)?,
        ["a.png", "labels.jsonl", "metadata.jsonl", "sub/b.png"]
    );
    // Nothing anywhere else below the temporary root.
    let everything: BTreeSet<String> = files_below(root.path())?.into_iter().collect();
    let expected: BTreeSet<String> = [
        "jsonl/labels.jsonl",
        "nested/dataset/a.png",
        "nested/dataset/labels.jsonl",
        "nested/dataset/metadata.jsonl",
        "nested/dataset/sub/b.png",
    ]
    .iter()
    .map(|s| (*s).to_owned())
    .collect();
    assert_eq!(everything, expected);
    assert_eq!(
        std::fs::read(dataset.join("a.png"))?,
        images["incoming/a.png"]
    );
    assert_eq!(
        std::fs::read(dataset.join("sub/b.png"))?,
        images["incoming/sub/b.png"]
    );
    let metadata = read_jsonl(&dataset.join("metadata.jsonl"))?;
    let names: Vec<&str> = metadata
        .iter()
        .map(|m| m["file_name"].as_str().unwrap_or_default())
        .collect();
    assert_eq!(names, ["a.png", "sub/b.png"]);
    assert_eq!(metadata[1]["aesthetic"], 3);
    assert_eq!(metadata[1]["landing_page"], false);
    assert_eq!(metadata[1]["key"], "incoming/sub/b.png");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn the_stack_outputs_configure_the_commands() -> anyhow::Result<()> {
    let stack = stack("ops-cfn").await?;
    let config = stack.moto.sdk_config().await;
    let cfn = aws_sdk_cloudformation::Client::new(&config);
    // A stack whose outputs name the resources (as the SAM template's do).
    let template = json!({
        "AWSTemplateFormatVersion": "2010-09-09",
        "Resources": {
            "Bucket": {"Type": "AWS::S3::Bucket", "Properties": {"BucketName": "cfn-made-bucket"}},
            "PendingQueue": {"Type": "AWS::SQS::Queue", "Properties": {"QueueName": "cfn-pending"}}
        },
        "Outputs": {
            "BucketName": {"Value": {"Ref": "Bucket"}},
            "PendingQueueUrl": {"Value": {"Ref": "PendingQueue"}},
            "PendingDeadLetterQueueUrl": {"Value": stack.resources.pending_dead_letter_queue_url},
            "HarvestQueueUrl": {"Value": stack.resources.harvest_queue_url},
            "HarvestDeadLetterQueueUrl": {"Value": stack.resources.harvest_dead_letter_queue_url}
        }
    });
    cfn.create_stack()
        .stack_name("shotlabel-ops")
        .template_body(template.to_string())
        .send()
        .await?;
    let mut env = aws_env(stack.moto.endpoint(), stack.home.path());
    let status = json_of(&env, &["status", "--json", "--stack", "shotlabel-ops"])?;
    assert_eq!(status["bucket"], "cfn-made-bucket", "{status}");
    assert!(
        status["queues"]["pending"]["url"]
            .as_str()
            .is_some_and(|u| u.ends_with("/cfn-pending")),
        "{status}"
    );
    // A flag beats the stack's output.
    let status = json_of(
        &env,
        &[
            "status",
            "--json",
            "--stack",
            "shotlabel-ops",
            "--bucket",
            &stack.resources.bucket,
        ],
    )?;
    assert_eq!(status["bucket"], stack.resources.bucket.as_str());
    // A stack that is not there is one clear line.
    env.push(("SHOTLABEL_STACK".into(), "no-such-stack".into()));
    let line = one_line_failure(&shotlabel(&env, &["status"])?);
    assert!(
        line.contains("no CloudFormation stack named no-such-stack"),
        "{line}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn errors_a_person_can_act_on_are_one_line() -> anyhow::Result<()> {
    let home = tempfile::tempdir()?;
    // No bucket configured (nothing needs to be listening for this one).
    let env = aws_env("http://127.0.0.1:9", home.path());
    let line = one_line_failure(&shotlabel(&env, &["status"])?);
    assert_eq!(
        line,
        "shotlabel: no bucket configured: set SHOTLABEL_BUCKET or pass --bucket or --stack NAME"
    );
    let line = one_line_failure(&shotlabel(&env, &["redrive", "--bucket", "b"])?);
    assert!(line.contains("SHOTLABEL_PENDING_DLQ_URL"), "{line}");

    // An endpoint nobody listens on.
    let line = one_line_failure(&shotlabel(&env, &["status", "--bucket", "b"])?);
    assert!(
        line.contains("cannot reach endpoint http://127.0.0.1:9"),
        "{line}"
    );
    let line = one_line_failure(&shotlabel(
        &env,
        &[
            "export",
            "--bucket",
            "b",
            "--out",
            &home.path().join("x").to_string_lossy(),
        ],
    )?);
    assert!(line.contains("cannot reach"), "{line}");

    // No credentials anywhere.
    let bare: Vec<(String, String)> = env
        .iter()
        .filter(|(k, _)| !k.starts_with("AWS_ACCESS") && !k.starts_with("AWS_SECRET"))
        .cloned()
        .collect();
    let line = one_line_failure(&shotlabel(&bare, &["status", "--bucket", "b"])?);
    assert!(line.contains("no AWS credentials found"), "{line}");

    // A bad task file.
    let bad = home.path().join("bad.toml");
    std::fs::write(&bad, "name = \"broken\"\nmodel = \n")?;
    let bad_arg = bad.to_string_lossy().into_owned();
    let line = one_line_failure(&shotlabel(
        &env,
        &[
            "export", "--bucket", "b", "--out", "unused", "--task", &bad_arg,
        ],
    )?);
    assert!(line.contains("bad.toml"), "{line}");
    let line = one_line_failure(&shotlabel(
        &env,
        &["backfill", "--bucket", "b", "--task", &bad_arg],
    )?);
    assert!(line.contains("bad.toml"), "{line}");

    // A bucket that does not exist.
    let stack = stack("ops-errors").await?;
    let mut env = stack_env(&stack);
    env.retain(|(k, _)| k != "SHOTLABEL_BUCKET");
    for command in ["status", "backfill", "export"] {
        let mut args = vec![command, "--bucket", "no-such-bucket"];
        let out_dir = home.path().join("out").to_string_lossy().into_owned();
        if command == "export" {
            args.extend(["--out", out_dir.as_str()]);
        }
        let line = one_line_failure(&shotlabel(&env, &args)?);
        assert!(
            line.contains("bucket no-such-bucket does not exist"),
            "{command}: {line}"
        );
    }
    // A queue that does not exist.
    let line = one_line_failure(&shotlabel(
        &env,
        &[
            "redrive",
            "--pending-dlq-url",
            &format!("{}/123456789012/nope", stack.moto.endpoint()),
        ],
    )?);
    assert!(line.contains("does not exist"), "{line}");
    assert!(!Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../unused")).exists());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eval_reads_the_labels_from_the_buckets_dataset_parts() -> anyhow::Result<()> {
    let stack = stack("ops-eval").await?;
    let current = task_ref()?;
    // Three labelled images; the gold set disagrees with one aesthetic (4 against 5) and
    // names a fourth image that has no label.
    for (key, file, answer) in [
        (
            "incoming/saas-landing.png",
            "saas-landing.png",
            json!({"landing_page": true, "aesthetic": 4}),
        ),
        (
            "incoming/blog-article.png",
            "blog-article.png",
            json!({"landing_page": false, "aesthetic": 3}),
        ),
        (
            "incoming/docs-page.png",
            "docs-page.png",
            json!({"landing_page": false, "aesthetic": 2}),
        ),
    ] {
        let etag = put(&stack, key, screenshot(file)?).await?;
        put_label(&stack, &label(&stack, key, &etag, current.clone(), answer)).await?;
    }
    let env = stack_env(&stack);
    let rebuilt = json_of(&env, &["dataset", "rebuild", "--json"])?;
    assert_eq!(rebuilt["parts_written"], 1, "{rebuilt}");
    let dir = tempfile::tempdir()?;
    let gold = dir.path().join("gold.json");
    std::fs::write(
        &gold,
        json!({
            "saas-landing.png": {"landing_page": true, "aesthetic": 5},
            "blog-article.png": {"landing_page": false, "aesthetic": 3},
            "docs-page.png": {"landing_page": false, "aesthetic": 2},
            "never-labelled.png": {"landing_page": true, "aesthetic": 1},
        })
        .to_string(),
    )?;
    let gold_arg = gold.to_string_lossy().into_owned();
    let report = json_of(&env, &["eval", "--gold", &gold_arg, "--json"])?;
    assert_eq!(report["counts"]["gold_images"], 4, "{report}");
    assert_eq!(report["counts"]["labels"], 3, "{report}");
    assert_eq!(report["counts"]["matched"], 3, "{report}");
    assert_eq!(report["gold_without_label"], json!(["never-labelled.png"]));
    assert_eq!(report["all_fields"]["agreed"], 2, "{report}");
    let field = |name: &str| {
        report["fields"]
            .as_array()
            .and_then(|fields| fields.iter().find(|f| f["field"] == name))
            .cloned()
            .unwrap_or_default()
    };
    assert_eq!(field("landing_page")["agreed"], 3);
    assert_eq!(field("aesthetic")["agreed"], 2);
    // One of three off by one.
    let mae = field("aesthetic")["mean_absolute_error"]
        .as_f64()
        .unwrap_or(f64::NAN);
    assert!((mae - 1.0 / 3.0).abs() < 1e-9, "{mae}");
    assert_eq!(report["disagreements"].as_array().map(Vec::len), Some(1));
    Ok(())
}
