//! The local stack: moto server standing in for S3 and SQS, and the resources that
//! `template.yaml` declares, created on it the same way.
//!
//! Tests and `shotlabel local` use this; nothing here runs on AWS.

pub mod chaos;
pub mod pipeline;

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use aws_config::{BehaviorVersion, Region, SdkConfig};
use aws_sdk_s3::config::Credentials;
use aws_sdk_sqs::types::QueueAttributeName;
use tokio::process::{Child, Command};

/// What can go wrong bringing the local stack up.
#[derive(Debug, thiserror::Error)]
pub enum LocalStackError {
    #[error(
        "moto server was not found (looked for {looked_in}); run `make venv` to install the pinned Python tools"
    )]
    MotoMissing { looked_in: String },
    #[error("cannot start moto server: {0}")]
    Spawn(std::io::Error),
    #[error("moto server did not become ready on {endpoint} within {seconds} s")]
    NotReady { endpoint: String, seconds: u64 },
    #[error("cannot find a free local port: {0}")]
    Port(std::io::Error),
    #[error("creating {resource} on the local stack failed: {detail}")]
    Create { resource: String, detail: String },
    #[error("moto's request recorder: {0}")]
    Recorder(String),
}

/// A running moto server on 127.0.0.1 and a free port; stopped when dropped.
#[derive(Debug)]
pub struct MotoServer {
    child: Child,
    endpoint: String,
}

/// Credentials moto accepts; they grant nothing anywhere else.
const LOCAL_ACCESS_KEY: &str = "shotlabel-local";
const LOCAL_SECRET_KEY: &str = "shotlabel-local-secret";
/// The region the local stack pretends to be in.
pub const LOCAL_REGION: &str = "us-east-1";

impl MotoServer {
    /// Starts moto server from the project's virtualenv (or `SHOTLABEL_MOTO_SERVER`) and
    /// waits until it answers S3 calls.
    pub async fn start() -> Result<Self, LocalStackError> {
        let program = find_moto_server()?;
        // Another process can take the port between our probe and moto's bind; try again.
        let mut last_error = None;
        for _ in 0..3 {
            let port = free_port()?;
            let endpoint = format!("http://127.0.0.1:{port}");
            // Requests are recorded only when asked (`/moto-api/recorder/start-recording`),
            // and then to a file of this server's own, not one in the working directory.
            let recording = std::env::temp_dir().join(format!("shotlabel-moto-{port}.jsonl"));
            let child = moto_command(&program)
                .args(["-H", "127.0.0.1", "-p", &port.to_string()])
                .env("MOTO_RECORDER_FILEPATH", &recording)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .kill_on_drop(true)
                .spawn()
                .map_err(LocalStackError::Spawn)?;
            let mut server = Self { child, endpoint };
            match server.wait_ready(Duration::from_secs(60)).await {
                Ok(()) => return Ok(server),
                Err(e) => last_error = Some(e),
            }
        }
        Err(last_error.unwrap_or_else(|| LocalStackError::NotReady {
            endpoint: "127.0.0.1".into(),
            seconds: 60,
        }))
    }

    /// The base URL S3 and SQS clients should use, e.g. `http://127.0.0.1:41234`.
    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    /// Starts recording every request this server receives, forgetting earlier ones
    /// (moto's recorder): how tests and benchmarks count the calls a command makes.
    pub async fn start_recording(&self) -> Result<(), LocalStackError> {
        for step in ["reset-recording", "start-recording"] {
            self.recorder(step, reqwest::Method::POST).await?;
        }
        Ok(())
    }

    /// Stops recording and returns what was recorded: (method, path and query) per request.
    pub async fn stop_recording(&self) -> Result<Vec<(String, String)>, LocalStackError> {
        self.recorder("stop-recording", reqwest::Method::POST)
            .await?;
        let recording = self
            .recorder("download-recording", reqwest::Method::GET)
            .await?;
        Ok(recording
            .lines()
            .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
            .map(|entry| {
                let text = |name: &str| entry[name].as_str().unwrap_or_default().to_owned();
                (text("method"), text("url"))
            })
            .collect())
    }

    async fn recorder(
        &self,
        step: &str,
        method: reqwest::Method,
    ) -> Result<String, LocalStackError> {
        let url = format!("{}/moto-api/recorder/{step}", self.endpoint);
        let recorder_error = |e: reqwest::Error| LocalStackError::Recorder(e.to_string());
        reqwest::Client::new()
            .request(method, url)
            .send()
            .await
            .and_then(reqwest::Response::error_for_status)
            .map_err(recorder_error)?
            .text()
            .await
            .map_err(recorder_error)
    }

    /// SDK configuration that points every AWS client at this server.
    pub async fn sdk_config(&self) -> SdkConfig {
        local_sdk_config(&self.endpoint).await
    }

    async fn wait_ready(&mut self, within: Duration) -> Result<(), LocalStackError> {
        let s3 = s3_client(&self.sdk_config().await);
        let started = Instant::now();
        loop {
            if let Ok(Some(_)) = self.child.try_wait() {
                // Exited: most likely the port was taken.
                break;
            }
            if s3.list_buckets().send().await.is_ok() {
                return Ok(());
            }
            if started.elapsed() > within {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let _ = self.child.start_kill();
        Err(LocalStackError::NotReady {
            endpoint: self.endpoint.clone(),
            seconds: within.as_secs(),
        })
    }
}

/// SDK configuration for a local endpoint with throwaway credentials.
pub async fn local_sdk_config(endpoint: &str) -> SdkConfig {
    aws_config::defaults(BehaviorVersion::latest())
        .region(Region::new(LOCAL_REGION))
        .endpoint_url(endpoint)
        .credentials_provider(Credentials::new(
            LOCAL_ACCESS_KEY,
            LOCAL_SECRET_KEY,
            None,
            None,
            "shotlabel-localstack",
        ))
        .load()
        .await
}

/// The functions' own client constructors: with the local endpoint set, S3 is path-style.
pub use shotlabel_aws::{s3_client, sqs_client};

fn free_port() -> Result<u16, LocalStackError> {
    let listener = TcpListener::bind("127.0.0.1:0").map_err(LocalStackError::Port)?;
    Ok(listener.local_addr().map_err(LocalStackError::Port)?.port())
}

/// moto_server through `moto_server.py` (cheaper per request on long runs, same answers) when the
/// interpreter of its virtualenv is beside it; as it is otherwise, and always when
/// `SHOTLABEL_MOTO_SERVER` names it.
fn moto_command(program: &Path) -> Command {
    let python = program.with_file_name("python");
    if std::env::var_os("SHOTLABEL_MOTO_SERVER").is_none() && python.is_file() {
        let mut command = Command::new(python);
        command.arg("-c").arg(include_str!("../moto_server.py"));
        command
    } else {
        Command::new(program)
    }
}

/// `SHOTLABEL_MOTO_SERVER`, else `.venv/bin/moto_server` in the current directory or the
/// workspace, else `moto_server` on `PATH`.
fn find_moto_server() -> Result<PathBuf, LocalStackError> {
    if let Some(explicit) = std::env::var_os("SHOTLABEL_MOTO_SERVER") {
        return Ok(PathBuf::from(explicit));
    }
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let mut candidates = vec![
        PathBuf::from(".venv/bin/moto_server"),
        workspace.join(".venv/bin/moto_server"),
    ];
    if let Some(path) = std::env::var_os("PATH") {
        candidates.extend(std::env::split_paths(&path).map(|dir| dir.join("moto_server")));
    }
    candidates
        .iter()
        .find(|c| c.is_file())
        .cloned()
        .ok_or_else(|| LocalStackError::MotoMissing {
            looked_in: "SHOTLABEL_MOTO_SERVER, .venv/bin and PATH".into(),
        })
}

/// One SQS queue with its dead-letter queue, as declared in `template.yaml`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueueSpec {
    /// The template's logical id.
    pub logical_id: &'static str,
    pub dead_letter_logical_id: &'static str,
    /// Seconds; sized to outlast the consuming function's run.
    pub visibility_timeout: u32,
    /// Receives before a message moves to the dead-letter queue.
    pub max_receive_count: u32,
}

/// The queues `template.yaml` declares. A test holds the template to this list.
pub const QUEUES: [QueueSpec; 3] = [
    QueueSpec {
        logical_id: "PendingQueue",
        dead_letter_logical_id: "PendingDeadLetterQueue",
        // Longer than the submit function's 900 s timeout.
        visibility_timeout: 960,
        max_receive_count: 5,
    },
    QueueSpec {
        logical_id: "HarvestQueue",
        dead_letter_logical_id: "HarvestDeadLetterQueue",
        // Six times the harvest function's 900 s timeout, as AWS recommends for queues
        // consumed by a Lambda event source mapping.
        visibility_timeout: 5400,
        max_receive_count: 5,
    },
    QueueSpec {
        logical_id: "SubmitWorkQueue",
        dead_letter_logical_id: "SubmitWorkDeadLetterQueue",
        // Six times the submit function's 900 s timeout (an event source mapping). A
        // ticket carries no data: one that fails twice is dropped to its dead-letter
        // queue, and the next scheduled run dispatches again.
        visibility_timeout: 5400,
        max_receive_count: 2,
    },
];

/// The bucket's logical id in `template.yaml`.
pub const BUCKET_LOGICAL_ID: &str = "Bucket";

/// Dead-letter queues keep messages for the SQS maximum, 14 days.
const DEAD_LETTER_RETENTION_SECONDS: u32 = 1_209_600;

/// Names and URLs of the resources created on the local stack.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalResources {
    pub bucket: String,
    pub pending_queue_url: String,
    pub pending_dead_letter_queue_url: String,
    pub harvest_queue_url: String,
    pub harvest_dead_letter_queue_url: String,
    /// Work tickets for the submit workers.
    pub submit_work_queue_url: String,
    pub submit_work_dead_letter_queue_url: String,
}

/// Creates the template's bucket and queues (each with its dead-letter queue and redrive
/// policy), with names derived from `stack_name`. Creating them again is harmless.
pub async fn create_resources(
    config: &SdkConfig,
    stack_name: &str,
) -> Result<LocalResources, LocalStackError> {
    let s3 = s3_client(config);
    let sqs = sqs_client(config);
    let bucket = format!("{stack_name}-bucket");
    let created = s3.create_bucket().bucket(&bucket).send().await;
    if let Err(e) = created {
        let already = e
            .as_service_error()
            .is_some_and(|s| s.is_bucket_already_owned_by_you());
        if !already {
            return Err(create_error(&bucket, e));
        }
    }
    let mut urls = Vec::new();
    for spec in QUEUES {
        let dlq_name = format!("{stack_name}-{}", spec.dead_letter_logical_id);
        let dlq_url = sqs
            .create_queue()
            .queue_name(&dlq_name)
            .attributes(
                QueueAttributeName::MessageRetentionPeriod,
                DEAD_LETTER_RETENTION_SECONDS.to_string(),
            )
            .send()
            .await
            .map_err(|e| create_error(&dlq_name, e))?
            .queue_url
            .unwrap_or_default();
        let dlq_arn = sqs
            .get_queue_attributes()
            .queue_url(&dlq_url)
            .attribute_names(QueueAttributeName::QueueArn)
            .send()
            .await
            .map_err(|e| create_error(&dlq_name, e))?
            .attributes
            .and_then(|a| a.get(&QueueAttributeName::QueueArn).cloned())
            .unwrap_or_default();
        let redrive = format!(
            r#"{{"deadLetterTargetArn":"{dlq_arn}","maxReceiveCount":{}}}"#,
            spec.max_receive_count
        );
        let name = format!("{stack_name}-{}", spec.logical_id);
        let url = sqs
            .create_queue()
            .queue_name(&name)
            .attributes(
                QueueAttributeName::VisibilityTimeout,
                spec.visibility_timeout.to_string(),
            )
            .attributes(QueueAttributeName::RedrivePolicy, redrive)
            .send()
            .await
            .map_err(|e| create_error(&name, e))?
            .queue_url
            .unwrap_or_default();
        urls.push((url, dlq_url));
    }
    let mut urls = urls.into_iter();
    let (pending_queue_url, pending_dead_letter_queue_url) = urls.next().unwrap_or_default();
    let (harvest_queue_url, harvest_dead_letter_queue_url) = urls.next().unwrap_or_default();
    let (submit_work_queue_url, submit_work_dead_letter_queue_url) =
        urls.next().unwrap_or_default();
    Ok(LocalResources {
        bucket,
        pending_queue_url,
        pending_dead_letter_queue_url,
        harvest_queue_url,
        harvest_dead_letter_queue_url,
        submit_work_queue_url,
        submit_work_dead_letter_queue_url,
    })
}

fn create_error(resource: &str, error: impl std::error::Error) -> LocalStackError {
    let mut detail = error.to_string();
    let mut source = error.source();
    while let Some(inner) = source {
        detail.push_str(": ");
        detail.push_str(&inner.to_string());
        source = inner.source();
    }
    LocalStackError::Create {
        resource: resource.to_owned(),
        detail,
    }
}

/// Routes the bucket's `ObjectCreated` events under `prefix` to a new SQS queue and
/// returns its URL. On AWS, S3 invokes the enqueue function directly; locally, a runner
/// reads this queue and hands each event, exactly as S3 wrote it, to the same handler.
pub async fn route_object_events(
    config: &SdkConfig,
    resources: &LocalResources,
    stack_name: &str,
    prefix: &str,
) -> Result<String, LocalStackError> {
    use aws_sdk_s3::types::{
        Event, FilterRule, FilterRuleName, NotificationConfiguration,
        NotificationConfigurationFilter, QueueConfiguration, S3KeyFilter,
    };
    let s3 = s3_client(config);
    let sqs = sqs_client(config);
    let name = format!("{stack_name}-object-events");
    let url = sqs
        .create_queue()
        .queue_name(&name)
        .send()
        .await
        .map_err(|e| create_error(&name, e))?
        .queue_url
        .unwrap_or_default();
    let arn = sqs
        .get_queue_attributes()
        .queue_url(&url)
        .attribute_names(QueueAttributeName::QueueArn)
        .send()
        .await
        .map_err(|e| create_error(&name, e))?
        .attributes
        .and_then(|a| a.get(&QueueAttributeName::QueueArn).cloned())
        .unwrap_or_default();
    let filter = NotificationConfigurationFilter::builder()
        .key(
            S3KeyFilter::builder()
                .filter_rules(
                    FilterRule::builder()
                        .name(FilterRuleName::Prefix)
                        .value(prefix)
                        .build(),
                )
                .build(),
        )
        .build();
    let queue = QueueConfiguration::builder()
        .queue_arn(arn)
        .events(Event::S3ObjectCreated)
        .filter(filter)
        .build()
        .map_err(|e| create_error(&name, e))?;
    s3.put_bucket_notification_configuration()
        .bucket(&resources.bucket)
        .notification_configuration(
            NotificationConfiguration::builder()
                .queue_configurations(queue)
                .build(),
        )
        .send()
        .await
        .map_err(|e| create_error(&resources.bucket, e))?;
    Ok(url)
}

/// An S3 event notification as moto writes it, with the fields AWS always sends and moto
/// leaves out (`userIdentity`, `requestParameters`) filled in empty, so it deserializes
/// as the Lambda event it stands for. `None` for S3's `s3:TestEvent` and non-events.
pub fn lambda_s3_event(body: &str) -> Option<serde_json::Value> {
    let mut event: serde_json::Value = serde_json::from_str(body).ok()?;
    let records = event.get_mut("Records")?.as_array_mut()?;
    for record in records.iter_mut() {
        let record = record.as_object_mut()?;
        for field in ["userIdentity", "requestParameters"] {
            record
                .entry(field)
                .or_insert_with(|| serde_json::Value::Object(Default::default()));
        }
    }
    Some(event)
}
