//! The three Lambda binaries under cargo-lambda's Lambda runtime emulator
//! (`cargo lambda watch`), each invoked with a real event payload against moto and the
//! batch emulator, exactly as Lambda would hand it over:
//!
//! 1. `enqueue` gets an S3 put event for an object the test uploaded, and queues one
//!    pending message;
//! 2. `submit` gets a scheduled event, and turns the message into a batch at the emulator
//!    with its manifest in `state/manifests/`;
//! 3. `webhook` gets a Function URL request carrying a signed Standard Webhooks
//!    `batch.completed` delivery, and queues one harvest request;
//! 4. `harvest` gets that harvest request as an SQS event, and writes the label.
//!
//! This checks what the in-process tests cannot: each `main.rs` (settings read from the
//! environment at cold start, clients built from standard AWS SDK settings, the runtime
//! loop) and the event payloads as the runtime delivers them.
//!
//! It needs `cargo-lambda`: `make deploy-venv` installs it into `.venv-deploy/bin`
//! (`SHOTLABEL_CARGO_LAMBDA` may name another). The emulator builds the function binaries
//! with `cargo run` into the workspace's shared target dir (the dev profile, like the
//! other tests), so only the first run compiles them.

mod common;

use std::net::TcpListener;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context;
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use batch_emulator::{FaultSettings, RunningEmulator};
use common::*;
use serde_json::{Value, json};
use shotlabel_core::batch_api::BatchStatus;
use shotlabel_core::ports::Queue;
use shotlabel_core::records::{
    BatchPhase, BatchRecord, HarvestRequest, LabelRecord, Manifest, PendingItem, state_keys,
    unix_now,
};
use shotlabel_core::standard_webhooks::sign;
use shotlabel_core::task::Task;

/// The image the test uploads, and the key it gets (a space and parentheses, so the S3
/// event carries it encoded as S3 encodes keys).
const IMAGE: &str = "minimal-portfolio.png";
const OBJECT_KEY: &str = "incoming/lambda runtime/minimal portfolio (1).png";
const LABEL_KEY: &str = "labels/lambda runtime/minimal portfolio (1).png.json";

/// The Standard Webhooks signing key of this test (32 bytes).
const WEBHOOK_KEY: &[u8] = b"lambda runtime test webhook key!";

/// How long one invocation may take once its function is built.
const INVOKE_TIMEOUT: Duration = Duration::from_secs(120);
/// The first invocation of a function waits for `cargo run` to build it; on a cold
/// target dir (2 cores) that is minutes.
const FIRST_INVOKE_TIMEOUT: Duration = Duration::from_secs(1500);

fn workspace() -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    dir.canonicalize().unwrap_or(dir)
}

/// `SHOTLABEL_CARGO_LAMBDA`, else `.venv-deploy/bin/cargo-lambda` in the workspace, else
/// `cargo-lambda` on `PATH`.
fn find_cargo_lambda() -> anyhow::Result<PathBuf> {
    if let Some(explicit) = std::env::var_os("SHOTLABEL_CARGO_LAMBDA").filter(|v| !v.is_empty()) {
        return Ok(PathBuf::from(explicit));
    }
    let mut candidates = vec![workspace().join(".venv-deploy/bin/cargo-lambda")];
    if let Some(path) = std::env::var_os("PATH") {
        candidates.extend(std::env::split_paths(&path).map(|dir| dir.join("cargo-lambda")));
    }
    candidates.into_iter().find(|c| c.is_file()).ok_or_else(|| {
        anyhow::anyhow!(
            "cargo-lambda was not found (looked for SHOTLABEL_CARGO_LAMBDA, \
             .venv-deploy/bin/cargo-lambda and PATH): run `make deploy-venv` to install the \
             pinned deploy tools"
        )
    })
}

fn free_port() -> anyhow::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// Sends `signal` to each target: a pid, or a process group as `-<pgid>`.
fn signal(signal: &str, targets: &[String]) {
    if targets.is_empty() {
        return;
    }
    let _ = Command::new("kill")
        .arg(format!("-{signal}"))
        .arg("--")
        .args(targets)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

/// The processes below `root` (children, their children, ...), read from `/proc`.
fn descendants(root: u32) -> Vec<u32> {
    let mut parent_of = Vec::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        // `pid (comm) state ppid ...`, where comm may hold spaces and parentheses.
        let ppid = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().nth(1))
            .and_then(|p| p.parse::<u32>().ok());
        if let Some(ppid) = ppid {
            parent_of.push((pid, ppid));
        }
    }
    let mut found = vec![root];
    let mut next = 0;
    while let Some(&parent) = found.get(next) {
        found.extend(
            parent_of
                .iter()
                .filter(|(_, ppid)| *ppid == parent)
                .map(|(pid, _)| *pid),
        );
        next += 1;
    }
    found.split_off(1)
}

/// A running `cargo lambda watch` in a process group of its own, with its output (and that
/// of `cargo run` and the functions) in a file. Dropping it stops it and everything it
/// started.
struct Watch {
    child: Child,
    port: u16,
    log: PathBuf,
    http: reqwest::Client,
    /// The functions invoked at least once (and so built and running).
    started: Vec<String>,
}

impl Watch {
    /// Starts the emulator on a free loopback port and waits until it accepts
    /// connections. `dir` is its working directory (and what it would watch for changes:
    /// an empty directory, so it does not walk the workspace); the workspace is named by
    /// `--manifest-path`.
    async fn start(cargo_lambda: &Path, dir: &Path, env_file: &Path) -> anyhow::Result<Self> {
        let mut last_error = None;
        // Another process can take the port between the probe and the bind; try again.
        for attempt in 0..3 {
            let port = free_port()?;
            let log = dir.join(format!("watch-{attempt}.log"));
            let out = std::fs::File::create(&log)?;
            let mut command = Command::new(cargo_lambda);
            command
                .args(["lambda", "watch", "--invoke-address", "127.0.0.1"])
                .args(["--invoke-port", &port.to_string()])
                // Build and start each function at its first invocation, and never
                // restart it when someone edits the tree meanwhile.
                .args(["--wait", "--ignore-changes"])
                .args(["--timeout", &FIRST_INVOKE_TIMEOUT.as_secs().to_string()])
                .arg("--env-file")
                .arg(env_file)
                .arg("--manifest-path")
                .arg(workspace().join("Cargo.toml"))
                .current_dir(dir)
                .env("CARGO_TERM_COLOR", "never")
                .env("NO_COLOR", "1")
                .stdin(Stdio::null())
                .stdout(out.try_clone()?)
                .stderr(out)
                .process_group(0);
            // The functions get exactly the environment file's AWS and shotlabel settings,
            // never the caller's.
            for (name, _) in std::env::vars_os() {
                let text = name.to_string_lossy();
                if text.starts_with("AWS_") || text.starts_with("SHOTLABEL_") {
                    command.env_remove(&name);
                }
            }
            let child = command.spawn().context("starting cargo lambda watch")?;
            let mut watch = Self {
                child,
                port,
                log,
                http: reqwest::Client::new(),
                started: Vec::new(),
            };
            match watch.wait_ready(Duration::from_secs(60)).await {
                Ok(()) => return Ok(watch),
                Err(e) => last_error = Some(e.context(watch.log_tail(40))),
            }
        }
        Err(last_error.unwrap_or_else(|| anyhow::anyhow!("cargo lambda watch did not start")))
    }

    async fn wait_ready(&mut self, within: Duration) -> anyhow::Result<()> {
        let start = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait()? {
                anyhow::bail!("cargo lambda watch exited early ({status})");
            }
            if tokio::net::TcpStream::connect(("127.0.0.1", self.port))
                .await
                .is_ok()
            {
                return Ok(());
            }
            anyhow::ensure!(
                start.elapsed() < within,
                "cargo lambda watch did not listen on 127.0.0.1:{} within {} s",
                self.port,
                within.as_secs()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The last `lines` lines of the emulator's output (cargo's and the functions' too).
    fn log_tail(&self, lines: usize) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        let tail = all[all.len().saturating_sub(lines)..].join("\n");
        format!(
            "--- cargo lambda watch output (last {lines} lines of {}) ---\n{tail}",
            self.log.display()
        )
    }

    /// Invokes `function` through the emulator's Lambda Invoke API and returns what the
    /// handler returned; a function error is an error.
    async fn invoke(&mut self, function: &str, event: &Value) -> anyhow::Result<Value> {
        let first = !self.started.iter().any(|f| f == function);
        let timeout = if first {
            FIRST_INVOKE_TIMEOUT
        } else {
            INVOKE_TIMEOUT
        };
        let url = format!(
            "http://127.0.0.1:{}/2015-03-31/functions/{function}/invocations",
            self.port
        );
        let started = Instant::now();
        let response = self
            .http
            .post(&url)
            .json(event)
            .timeout(timeout)
            .send()
            .await
            .with_context(|| format!("invoking {function}"))?;
        if first {
            self.started.push(function.to_owned());
            eprintln!(
                "{function}: first invocation (build and cold start) took {:.1} s",
                started.elapsed().as_secs_f64()
            );
        }
        let status = response.status();
        let function_error = response
            .headers()
            .get("x-amz-function-error")
            .map(|v| v.to_str().unwrap_or_default().to_owned());
        let body = response.text().await?;
        anyhow::ensure!(
            status.is_success() && function_error.is_none(),
            "{function} failed: HTTP {status}, function error {function_error:?}: {body}"
        );
        serde_json::from_str(&body).with_context(|| format!("{function} answered {body:?}"))
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        // SIGTERM first, so that the emulator stops its functions, then SIGKILL whatever
        // is left: its process group, and each process that was below it (watchexec
        // starts each `cargo run` in a process group of its own).
        let pid = self.child.id();
        let below = descendants(pid);
        signal("TERM", &[format!("-{pid}")]);
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if matches!(self.child.try_wait(), Ok(Some(_))) {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let mut targets = vec![format!("-{pid}")];
        targets.extend(below.iter().map(u32::to_string));
        signal("KILL", &targets);
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A JSON fixture of one of the functions (`functions/<function>/tests/fixtures/<name>`).
fn fixture(function: &str, name: &str) -> anyhow::Result<Value> {
    let path = workspace()
        .join("functions")
        .join(function)
        .join("tests/fixtures")
        .join(name);
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    Ok(serde_json::from_str(&text)?)
}

/// A key as S3 event notifications carry it: form-encoded, `/` kept, space as `+`.
fn s3_event_key(key: &str) -> String {
    let mut out = String::new();
    for byte in key.bytes() {
        match byte {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' | b'/' => {
                out.push(char::from(byte));
            }
            b' ' => out.push('+'),
            _ => out.push_str(&format!("%{byte:02X}")),
        }
    }
    out
}

/// Sets the value at a JSON pointer that exists in the fixture.
fn set(event: &mut Value, pointer: &str, value: Value) -> anyhow::Result<()> {
    *event
        .pointer_mut(pointer)
        .with_context(|| format!("the fixture has no {pointer}"))? = value;
    Ok(())
}

/// The functions' configuration, as the template gives it on AWS (secrets in plain
/// variables, as locally).
fn env_file(
    stack: &Stack,
    emulator: &RunningEmulator,
    work_dir: &Path,
    webhook_secret: &str,
) -> String {
    let vars = [
        ("AWS_ENDPOINT_URL", stack.moto.endpoint().to_owned()),
        ("AWS_ACCESS_KEY_ID", "shotlabel-local".into()),
        ("AWS_SECRET_ACCESS_KEY", "shotlabel-local-secret".into()),
        ("AWS_REGION", shotlabel_localstack::LOCAL_REGION.into()),
        (
            "AWS_DEFAULT_REGION",
            shotlabel_localstack::LOCAL_REGION.into(),
        ),
        ("AWS_EC2_METADATA_DISABLED", "true".into()),
        // No profile or credentials file of the machine's applies.
        (
            "AWS_CONFIG_FILE",
            work_dir.join("aws-config").display().to_string(),
        ),
        (
            "AWS_SHARED_CREDENTIALS_FILE",
            work_dir.join("aws-credentials").display().to_string(),
        ),
        ("SHOTLABEL_BUCKET", stack.resources.bucket.clone()),
        ("SHOTLABEL_INPUT_PREFIX", INPUT.into()),
        (
            "SHOTLABEL_PENDING_QUEUE_URL",
            stack.resources.pending_queue_url.clone(),
        ),
        (
            "SHOTLABEL_HARVEST_QUEUE_URL",
            stack.resources.harvest_queue_url.clone(),
        ),
        ("SHOTLABEL_PROVIDER_URL", emulator.base_url()),
        ("SHOTLABEL_API_KEY", KEY.into()),
        ("SHOTLABEL_WEBHOOK_MODE", "standard".into()),
        ("SHOTLABEL_WEBHOOK_SECRET", webhook_secret.into()),
        ("SHOTLABEL_WORK_DIR", work_dir.display().to_string()),
        ("SHOTLABEL_RECEIVE_WAIT_SECONDS", "0".into()),
        ("SHOTLABEL_SUBMIT_BUDGET_SECONDS", "60".into()),
        ("SHOTLABEL_SUBMIT_VISIBILITY_SECONDS", "300".into()),
        ("SHOTLABEL_CONCURRENCY", "2".into()),
        ("RUST_LOG", "info".into()),
    ];
    // Quoted: cargo-lambda's parser refuses an unquoted `=` in a value (base64 padding).
    vars.iter()
        .map(|(k, v)| format!("{k}=\"{}\"\n", v.replace('\\', "\\\\").replace('"', "\\\"")))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_function_handles_its_events_under_the_lambda_runtime_emulator() -> anyhow::Result<()>
{
    let started = Instant::now();
    let cargo_lambda = find_cargo_lambda()?;
    let stack = stack("lambda-runtime").await?;
    let emulator = emulator(FaultSettings::default()).await?;
    let webhook_secret = format!("whsec_{}", STANDARD.encode(WEBHOOK_KEY));

    // The emulator runs in an empty directory of its own: it watches that for changes.
    let dir = tempfile::tempdir()?;
    let work_dir = dir.path().join("work");
    std::fs::create_dir_all(&work_dir)?;
    let env_path = dir.path().join("functions.env");
    std::fs::write(
        &env_path,
        env_file(&stack, &emulator, &work_dir, &webhook_secret),
    )?;
    let mut watch = Watch::start(&cargo_lambda, dir.path(), &env_path).await?;

    let outcome = run_pipeline(&stack, &emulator, &mut watch).await;
    eprintln!(
        "lambda runtime test took {:.1} s",
        started.elapsed().as_secs_f64()
    );
    outcome.map_err(|e| anyhow::anyhow!("{e:#}\n\n{}", watch.log_tail(150)))
}

async fn run_pipeline(
    stack: &Stack,
    emulator: &RunningEmulator,
    watch: &mut Watch,
) -> anyhow::Result<()> {
    let task = Task::default_task()?;
    let bucket = &stack.resources.bucket;

    // 1. enqueue: an S3 put event for an object that is really there.
    let object = put(
        stack,
        OBJECT_KEY,
        std::fs::read(data("screenshots").join(IMAGE))?,
    )
    .await?;
    let mut event = fixture("enqueue", "s3-put-moto.json")?;
    set(&mut event, "/Records/0/s3/bucket/name", json!(bucket))?;
    set(
        &mut event,
        "/Records/0/s3/bucket/arn",
        json!(format!("arn:aws:s3:::{bucket}")),
    )?;
    set(
        &mut event,
        "/Records/0/s3/object/key",
        json!(s3_event_key(OBJECT_KEY)),
    )?;
    set(&mut event, "/Records/0/s3/object/size", json!(object.size))?;
    set(&mut event, "/Records/0/s3/object/eTag", json!(object.etag))?;
    let report = watch.invoke("enqueue", &event).await?;
    anyhow::ensure!(
        report["queued"] == json!(1),
        "enqueue reported {report}, expected one queued"
    );
    // Received with no visibility timeout: the message stays there for submit.
    let pending = stack
        .queue
        .receive(
            &stack.resources.pending_queue_url,
            10,
            Duration::ZERO,
            Duration::from_secs(1),
        )
        .await?;
    anyhow::ensure!(pending.len() == 1, "{} pending messages", pending.len());
    let item: PendingItem = serde_json::from_str(&pending[0].body)?;
    anyhow::ensure!(
        item.key == OBJECT_KEY && item.etag == object.etag && item.bucket == *bucket,
        "the pending message is for {item:?}"
    );

    // 2. submit: a scheduled event drains the queue into one batch at the emulator.
    let report = watch
        .invoke("submit", &fixture("submit", "scheduled-event.json")?)
        .await?;
    anyhow::ensure!(
        report["submit"]["prepared"] == json!(1)
            && report["submit"]["batches"].as_array().map(Vec::len) == Some(1),
        "submit reported {report}, expected one image in one batch"
    );
    let manifests = list(stack, "state/manifests/").await?;
    anyhow::ensure!(manifests.len() == 1, "manifests: {manifests:?}");
    let manifest: Manifest = read_json(stack, &manifests[0]).await?;
    anyhow::ensure!(
        manifest.task.version == task.version()
            && manifest.items.values().any(|i| i.key == OBJECT_KEY),
        "the manifest is {manifest:?}"
    );
    let records = list(stack, "state/batches/").await?;
    anyhow::ensure!(records.len() == 1, "batch records: {records:?}");
    let record: BatchRecord = read_json(stack, &records[0]).await?;
    let batch_id = record.batch_id.clone();
    anyhow::ensure!(record.phase == BatchPhase::Open, "{record:?}");
    anyhow::ensure!(
        queue_depth(stack, &stack.resources.pending_queue_url).await? == 0,
        "submit left messages on the pending queue"
    );
    // The batch is real at the provider; let it finish.
    let client = client(emulator, quick_retries(3))?;
    let batch = wait_terminal(&client, &batch_id).await?;
    anyhow::ensure!(
        batch.status == BatchStatus::Completed,
        "batch {batch_id} ended {:?}",
        batch.status
    );

    // 3. webhook behind the Function URL: a signed `batch.completed` delivery.
    let now = i64::try_from(unix_now())?;
    let webhook_id = format!("wh_lambda_runtime_{now}");
    let body = json!({
        "id": format!("evt_lambda_runtime_{now}"),
        "object": "event",
        "created_at": now,
        "type": "batch.completed",
        "data": { "id": batch_id },
    })
    .to_string();
    let mut event = fixture("webhook", "function-url-post.json")?;
    set(&mut event, "/headers/webhook-id", json!(webhook_id))?;
    set(
        &mut event,
        "/headers/webhook-timestamp",
        json!(now.to_string()),
    )?;
    set(
        &mut event,
        "/headers/webhook-signature",
        json!(sign(WEBHOOK_KEY, &webhook_id, now, body.as_bytes())),
    )?;
    set(
        &mut event,
        "/headers/content-length",
        json!(body.len().to_string()),
    )?;
    set(&mut event, "/requestContext/timeEpoch", json!(now * 1000))?;
    set(&mut event, "/body", json!(body))?;
    let response = watch.invoke("webhook", &event).await?;
    anyhow::ensure!(
        response["statusCode"] == json!(200),
        "the webhook answered {response}"
    );
    let answer: Value =
        serde_json::from_str(response["body"].as_str().unwrap_or_default()).unwrap_or_default();
    anyhow::ensure!(
        answer["accepted"] == json!(true),
        "the webhook answered {response}"
    );
    let harvest = stack
        .queue
        .receive(
            &stack.resources.harvest_queue_url,
            10,
            Duration::from_secs(300),
            Duration::from_secs(1),
        )
        .await?;
    anyhow::ensure!(
        harvest.len() == 1,
        "{} harvest requests queued",
        harvest.len()
    );
    let request: HarvestRequest = serde_json::from_str(&harvest[0].body)?;
    anyhow::ensure!(
        request.batch_id.as_deref() == Some(batch_id.as_str()) && request.origin == "webhook",
        "the harvest request is {request:?}"
    );

    // 4. harvest on the harvest queue: the message above as an SQS event.
    let mut event = fixture("harvest", "sqs-harvest.json")?;
    let mut record = event
        .pointer("/Records/0")
        .cloned()
        .context("the fixture has no record")?;
    let queue_name = stack
        .resources
        .harvest_queue_url
        .rsplit('/')
        .next()
        .unwrap_or_default()
        .to_owned();
    set(&mut record, "/messageId", json!(harvest[0].message_id))?;
    set(
        &mut record,
        "/receiptHandle",
        json!(harvest[0].receipt_handle),
    )?;
    set(&mut record, "/body", json!(harvest[0].body))?;
    set(
        &mut record,
        "/eventSourceARN",
        json!(format!("arn:aws:sqs:us-east-1:123456789012:{queue_name}")),
    )?;
    set(&mut event, "/Records", json!([record]))?;
    let response = watch.invoke("harvest", &event).await?;
    anyhow::ensure!(
        response["batchItemFailures"]
            .as_array()
            .is_some_and(Vec::is_empty),
        "the harvest answered {response}"
    );
    let label: LabelRecord = read_json(stack, LABEL_KEY)
        .await
        .with_context(|| format!("reading the label {LABEL_KEY}"))?;
    anyhow::ensure!(
        label.source.key == OBJECT_KEY
            && label.source.etag == object.etag
            && label.provenance.batch_id == batch_id
            && label.task.version == task.version(),
        "the label is {label:?}"
    );
    let record: BatchRecord = read_json(stack, &state_keys::batch(&batch_id)).await?;
    anyhow::ensure!(
        record.phase == BatchPhase::Harvested,
        "the batch record is {record:?}"
    );
    Ok(())
}
