//! Secrets never logged (issue 8): with a distinctive API key and webhook secrets, every
//! failing path runs while ALL tracing output (TRACE, the AWS SDK's and the HTTP stack's
//! included, `log` records too) is captured in memory; neither the logs, nor any error's
//! `Display` or `Debug`, nor a real binary's stdout and stderr may contain the secrets,
//! whole or in part, plain, base64 or hex.
//!
//! Run: `cargo test -p shotlabel-integration --test secrets_never_logged`
//!
//! On failure the assertions say where a canary was found, never the text around it.

mod common;

use std::collections::HashMap;
use std::io::Write;
use std::sync::{Arc, Mutex, OnceLock};

use axum::extract::Request;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use common::*;
use secrecy::SecretString;
use shotlabel_aws::{batch_client_from_env, required_secret, secret_setting};
use shotlabel_batch_client::{BatchApiConfig, BatchClient};
use shotlabel_core::batch_api::CreateBatchRequest;
use shotlabel_core::batch_token;
use shotlabel_core::ports::BatchProvider;
use shotlabel_core::records::unix_now;
use shotlabel_core::settings::{
    FunctionSettings, ReceiverSettings, WebhookMode, apply_webhook_auth,
};
use shotlabel_core::standard_webhooks::{WebhookSecrets, sign};
use shotlabel_core::webhook::{WebhookConfig, WebhookRequest, receive};

/// The API key: distinctive, so that any piece of it found anywhere is a leak.
const API_KEY: &str = "sk-SECRET-canary-7f3a9c1e5b2d4086aa11";
/// The Standard Webhooks key bytes (32): the secret is `whsec_` + their base64.
const WHSEC_KEY: &[u8] = b"WHSEC-canary-key-0123456789abcde";
/// The per-batch webhook secret.
const PER_BATCH_SECRET: &str = "per-batch-hush-value-5e8d2c7b9f014a63";

fn whsec() -> String {
    format!("whsec_{}", STANDARD.encode(WHSEC_KEY))
}

/// Every form a secret could leak in: plain, base64, hex, and any 12-character piece
/// of each (a secret cut short is still a leak).
fn canaries() -> Vec<(String, String)> {
    let forms = [
        ("the API key", API_KEY.to_owned()),
        ("the API key (base64)", STANDARD.encode(API_KEY)),
        ("the API key (hex)", hex(API_KEY.as_bytes())),
        ("the webhook secret", whsec()),
        (
            "the webhook key (text)",
            String::from_utf8_lossy(WHSEC_KEY).into_owned(),
        ),
        ("the webhook key (hex)", hex(WHSEC_KEY)),
        ("the per-batch secret", PER_BATCH_SECRET.to_owned()),
        (
            "the per-batch secret (base64)",
            STANDARD.encode(PER_BATCH_SECRET),
        ),
        (
            "the per-batch secret (hex)",
            hex(PER_BATCH_SECRET.as_bytes()),
        ),
    ];
    let mut out = Vec::new();
    for (what, text) in forms {
        let chars: Vec<char> = text.chars().collect();
        for window in chars.windows(12.min(chars.len())) {
            out.push((what.to_owned(), window.iter().collect()));
        }
    }
    out
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Asserts no canary in `text`; the message names only where it was found.
fn assert_clean(where_: &str, text: &str) {
    for (what, piece) in canaries() {
        assert!(
            !text.contains(&piece),
            "canary found in {where_}: a piece of {what}"
        );
    }
}

/// Everything every subscriber saw, from the start of the test binary.
fn captured() -> &'static Arc<Mutex<Vec<u8>>> {
    static LOGS: OnceLock<Arc<Mutex<Vec<u8>>>> = OnceLock::new();
    LOGS.get_or_init(|| {
        let buffer = Arc::new(Mutex::new(Vec::new()));
        let sink = Arc::clone(&buffer);
        let subscriber = tracing_subscriber::fmt()
            .with_max_level(tracing::Level::TRACE)
            .with_span_events(tracing_subscriber::fmt::format::FmtSpan::FULL)
            .with_ansi(false)
            .with_writer(move || Sink(Arc::clone(&sink)));
        // Also routes `log` records (the HTTP client's) into the same subscriber.
        if let Err(e) = subscriber.try_init() {
            eprintln!("could not install the capturing subscriber: {e}");
        }
        buffer
    })
}

struct Sink(Arc<Mutex<Vec<u8>>>);

impl Write for Sink {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if let Ok(mut logs) = self.0.lock() {
            logs.extend_from_slice(buf);
        }
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn logs_text() -> String {
    captured()
        .lock()
        .map(|l| String::from_utf8_lossy(&l).into_owned())
        .unwrap_or_default()
}

/// Every error met, as `Display` and `Debug` (alternate too), by where it came from.
#[derive(Default)]
struct Errors(Vec<(String, String)>);

impl Errors {
    fn add<E: std::fmt::Display + std::fmt::Debug>(&mut self, where_: &str, error: &E) {
        self.0
            .push((where_.to_owned(), format!("{error}\n{error:?}\n{error:#?}")));
    }

    /// Records the error a result must hold.
    fn expect_err<T: std::fmt::Debug, E: std::fmt::Display + std::fmt::Debug>(
        &mut self,
        where_: &str,
        result: Result<T, E>,
    ) {
        match result {
            Ok(value) => panic!("{where_}: expected a failure, got {value:?}"),
            Err(e) => self.add(where_, &e),
        }
    }
}

/// A provider that answers every call with an error that echoes the `Authorization`
/// header back, in the ways real servers do: inside a JSON message, in plain text, and
/// JSON-escaped; placed so that the client's cuts (500 characters of a message, 300
/// bytes of a body) fall inside the key.
async fn echoing_provider() -> anyhow::Result<String> {
    async fn answer(request: Request) -> Response {
        let auth = request
            .headers()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned();
        let key = auth.trim_start_matches("Bearer ").to_owned();
        let escaped: String = key
            .chars()
            .map(|c| format!("\\u{:04x}", c as u32))
            .collect();
        match request.uri().path() {
            p if p.contains("/json/") => (
                StatusCode::UNAUTHORIZED,
                format!(
                    r#"{{"error":{{"message":"{}Incorrect API key provided: {key}"}}}}"#,
                    "x".repeat(455)
                ),
            )
                .into_response(),
            p if p.contains("/plain/") => {
                (StatusCode::FORBIDDEN, format!("{}{auth}", "y".repeat(280))).into_response()
            }
            p if p.contains("/escaped/") => (
                StatusCode::BAD_REQUEST,
                format!(r#"{{"error":{{"message":"bad key {escaped}"}}}}"#),
            )
                .into_response(),
            p if p.contains("/garbage/") => {
                (StatusCode::OK, format!("{}{key}<html>", "z".repeat(280))).into_response()
            }
            _ => (
                StatusCode::INTERNAL_SERVER_ERROR,
                format!(r#"{{"message":"upstream said {auth}"}}"#),
            )
                .into_response(),
        }
    }
    let app = axum::Router::new().fallback(answer);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            eprintln!("the echoing provider stopped: {e}");
        }
    });
    Ok(format!("http://{addr}/v1"))
}

fn client_at(base_url: &str) -> anyhow::Result<BatchClient> {
    let mut config = BatchApiConfig::new(base_url, SecretString::from(API_KEY))?;
    config.retry = quick_retries(2);
    config.connect_timeout = std::time::Duration::from_secs(2);
    Ok(BatchClient::new(config)?)
}

/// A webhook request to try: what it is, its headers, its query and its body.
type Forged = (&'static str, Vec<(String, String)>, String, Vec<u8>);

fn env(vars: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> + use<> {
    let map: HashMap<String, String> = vars
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
    move |name| map.get(name).cloned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secrets_never_reach_logs_or_errors_whatever_fails() -> anyhow::Result<()> {
    captured();
    tracing::info!("capture started");
    let mut errors = Errors::default();

    // The provider unreachable (nothing listens on the discard port).
    let nowhere = client_at("http://127.0.0.1:9/v1")?;
    errors.expect_err(
        "unreachable: retrieve",
        nowhere.retrieve_batch("batch_1").await,
    );
    errors.expect_err(
        "unreachable: create",
        nowhere
            .create_batch(&CreateBatchRequest::chat_completions("file-1"))
            .await,
    );
    let path = std::env::temp_dir().join(format!("secrets-never-logged-{}.jsonl", unix_now()));
    std::fs::write(&path, "{}\n")?;
    errors.expect_err("unreachable: upload", nowhere.upload_file(&path).await);
    errors.expect_err(
        "unreachable: open a file",
        nowhere.open_file("file-1").await.map(|_| ()),
    );

    // The provider refusing the key, failing, and echoing it back.
    let echo = echoing_provider().await?;
    for (what, base) in [
        ("a JSON 401", format!("{echo}/json")),
        ("a plain-text 403", format!("{echo}/plain")),
        ("a JSON-escaped 400", format!("{echo}/escaped")),
        ("a 500, retried", format!("{echo}/fail")),
        ("garbage with HTTP 200", format!("{echo}/garbage")),
    ] {
        let client = client_at(&base)?;
        errors.expect_err(what, client.retrieve_batch("batch_1").await);
        errors.expect_err(what, client.upload_file(&path).await);
        if !base.ends_with("/garbage") {
            // (A 200 for a file is a file, whatever it holds.)
            errors.expect_err(what, client.open_file("file-1").await.map(|_| ()));
        }
    }
    let _ = std::fs::remove_file(&path);
    // The client itself, printed.
    let client = client_at(&echo)?;
    errors
        .0
        .push(("a client's Debug".into(), format!("{client:?} {client:#?}")));

    // Bad webhooks against a receiver that holds both secrets.
    let stack = stack("secrets-never-logged").await?;
    let mut config = WebhookConfig::new(
        stack.resources.bucket.clone(),
        stack.resources.harvest_queue_url.clone(),
    );
    config.standard = Some(WebhookSecrets::parse(&whsec())?);
    config.per_batch_secret = Some(SecretString::from(PER_BATCH_SECRET));
    errors.0.push((
        "the receiver's Debug".into(),
        format!("{config:?} {config:#?}"),
    ));
    let now = i64::try_from(unix_now())?;
    let body = br#"{"type":"batch.completed","data":{"id":"batch_1"}}"#.to_vec();
    let good_signature = sign(WHSEC_KEY, "msg_1", now, &body);
    let signed = |signature: String, timestamp: i64| {
        vec![
            ("webhook-id".to_owned(), "msg_1".to_owned()),
            ("webhook-timestamp".to_owned(), timestamp.to_string()),
            ("webhook-signature".to_owned(), signature),
        ]
    };
    let token = batch_token::token(PER_BATCH_SECRET.as_bytes(), "s1-0");
    let requests: Vec<Forged> = vec![
        (
            "a wrong signature",
            signed(
                sign(b"another key, thirty-two bytes...", "msg_1", now, &body),
                now,
            ),
            String::new(),
            body.clone(),
        ),
        ("no signature", Vec::new(), String::new(), body.clone()),
        (
            "a stale signature",
            signed(sign(WHSEC_KEY, "msg_1", now - 3600, &body), now - 3600),
            String::new(),
            body.clone(),
        ),
        (
            "the secret itself as the signature",
            signed(format!("v1,{}", whsec()), now),
            String::new(),
            body.clone(),
        ),
        (
            "a signed body that is not JSON",
            signed(sign(WHSEC_KEY, "msg_2", now, b"{not json"), now)
                .into_iter()
                .map(|(k, v)| (k, v.replace("msg_1", "msg_2")))
                .collect(),
            String::new(),
            b"{not json".to_vec(),
        ),
        (
            "a signed body without a type",
            signed(sign(WHSEC_KEY, "msg_3", now, b"{}"), now)
                .into_iter()
                .map(|(k, v)| (k, v.replace("msg_1", "msg_3")))
                .collect(),
            String::new(),
            b"{}".to_vec(),
        ),
        (
            "a per-batch URL with a wrong token",
            Vec::new(),
            "manifest=s1-0&token=0000".to_owned(),
            body.clone(),
        ),
        (
            "a per-batch URL with the secret as its token",
            Vec::new(),
            format!("manifest=s1-0&token={PER_BATCH_SECRET}"),
            body.clone(),
        ),
        // Not refused (the URL authenticates it and the body is only a hint), but its
        // answer and log lines are checked all the same.
        (
            "a per-batch URL with a good token and a malformed body",
            Vec::new(),
            format!("manifest=s1-0&token={token}"),
            b"\xff\xfe not json".to_vec(),
        ),
    ];
    for (what, headers, query, body) in requests {
        let request = WebhookRequest {
            method: "POST".into(),
            headers,
            query,
            body,
        };
        errors.0.push((
            format!("{what}: the request's Debug"),
            format!("{request:?}"),
        ));
        let response = receive(&stack.store, &stack.queue, &config, &request, now).await;
        let expected = if what.contains("good token") {
            200..201
        } else {
            400..500
        };
        assert!(
            expected.contains(&response.status),
            "{what}: HTTP {}",
            response.status
        );
        errors
            .0
            .push((format!("{what}: the answer"), format!("{response:?}")));
    }
    // The genuine signature is accepted (so the refusals above are not a broken setup).
    let genuine = WebhookRequest {
        method: "POST".into(),
        headers: signed(good_signature, now),
        query: String::new(),
        body: body.clone(),
    };
    let response = receive(&stack.store, &stack.queue, &config, &genuine, now).await;
    assert_eq!(response.status, 200);

    // Secrets Manager: a missing secret, then a real one read at TRACE level.
    let sdk = stack.moto.sdk_config().await;
    let missing_arn = "arn:aws:secretsmanager:us-east-1:123456789012:secret:shotlabel-nope";
    errors.expect_err(
        "a missing secret ARN",
        secret_setting(
            &sdk,
            "SHOTLABEL_API_KEY",
            env(&[("SHOTLABEL_API_KEY_SECRET_ARN", missing_arn)]),
        )
        .await,
    );
    let manager = aws_sdk_secretsmanager::Client::new(&sdk);
    let created = manager
        .create_secret()
        .name("shotlabel/canary-api-key")
        .secret_string(API_KEY)
        .send()
        .await?;
    let arn = created.arn.unwrap_or_default();
    let read = required_secret(
        &sdk,
        "SHOTLABEL_API_KEY",
        "the provider's API key",
        env(&[("SHOTLABEL_API_KEY_SECRET_ARN", &arn)]),
    )
    .await?;
    errors
        .0
        .push(("a secret read, printed".into(), format!("{read:?}")));
    let from_manager = batch_client_from_env(
        &sdk,
        env(&[
            ("SHOTLABEL_PROVIDER_URL", &format!("{echo}/json")),
            ("SHOTLABEL_API_KEY_SECRET_ARN", &arn),
        ]),
    )
    .await
    .map_err(|e| anyhow::anyhow!("{e}"))?;
    errors.expect_err(
        "a key from Secrets Manager, refused",
        from_manager.retrieve_batch("batch_1").await,
    );

    // Bad configuration around the secrets.
    errors.expect_err(
        "a provider URL that is not a URL",
        batch_client_from_env(
            &sdk,
            env(&[
                ("SHOTLABEL_PROVIDER_URL", "not a url"),
                ("SHOTLABEL_API_KEY", API_KEY),
            ]),
        )
        .await,
    );
    errors.expect_err(
        "no provider URL",
        batch_client_from_env(&sdk, env(&[("SHOTLABEL_API_KEY", API_KEY)])).await,
    );
    for secret in [
        format!("whsec_{API_KEY}!"),
        // Too short as bytes and as base64 (a longer unprefixed secret is a key, as the
        // openai SDK takes it).
        PER_BATCH_SECRET[..10].to_owned(),
        format!("{} {}", whsec(), "whsec_AAAA"),
        format!("whsec_{}", STANDARD.encode(&WHSEC_KEY[..8])),
    ] {
        errors.expect_err(
            "a webhook secret that is not one",
            WebhookSecrets::parse(&secret),
        );
        let mut config = WebhookConfig::new("bucket", "queue");
        errors.expect_err(
            "standard mode with a bad secret",
            apply_webhook_auth(
                &mut config,
                WebhookMode::Standard,
                Some(SecretString::from(secret.clone())),
            ),
        );
    }
    let mut config = WebhookConfig::new("bucket", "queue");
    errors.expect_err(
        "an unknown webhook mode",
        ReceiverSettings::from_vars([
            ("SHOTLABEL_BUCKET", "bucket"),
            ("SHOTLABEL_HARVEST_QUEUE_URL", "queue"),
            ("SHOTLABEL_WEBHOOK_MODE", "standardish"),
            ("SHOTLABEL_WEBHOOK_SECRET", whsec().as_str()),
        ]),
    );
    errors.expect_err(
        "a per-batch secret too short",
        apply_webhook_auth(
            &mut config,
            WebhookMode::PerBatch,
            Some(SecretString::from("perbatch-SEC")),
        ),
    );
    errors.0.push((
        "the parsed secrets, printed".into(),
        format!("{:?}", WebhookSecrets::parse(&whsec())?),
    ));

    // Nothing anywhere.
    tracing::info!("capture ended");
    let logs = logs_text();
    assert!(
        logs.contains("capture started") && logs.contains("capture ended"),
        "the subscriber captured the test's own events"
    );
    assert!(
        logs.contains("aws_smithy") || logs.contains("aws_sdk"),
        "the AWS SDK's TRACE output was captured too"
    );
    assert!(errors.0.len() > 40, "{} errors collected", errors.0.len());
    for (where_, text) in &errors.0 {
        assert_clean(&format!("an error or value printed ({where_})"), text);
    }
    assert_clean("the captured logs", &logs);
    eprintln!(
        "secrets never logged: {} error texts and {} bytes of TRACE logs checked for {} canary pieces",
        errors.0.len(),
        logs.len(),
        canaries().len()
    );
    Ok(())
}

/// The Lambda binaries started with bad configuration that carries the secrets:
/// it must fail, and say why, without printing them.
#[test]
fn a_binary_with_bad_configuration_does_not_print_its_secrets() -> anyhow::Result<()> {
    let binaries = build_binaries(&["webhook", "submit", "harvest"])?;
    for binary in binaries {
        let name = binary
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        for (what, vars) in [
            (
                "a webhook secret that is not base64",
                vec![
                    ("SHOTLABEL_WEBHOOK_MODE", "standard".to_owned()),
                    ("SHOTLABEL_WEBHOOK_SECRET", format!("whsec_{API_KEY}!")),
                    ("SHOTLABEL_API_KEY", API_KEY.to_owned()),
                ],
            ),
            (
                "a provider URL that is not a URL",
                vec![
                    ("SHOTLABEL_WEBHOOK_SECRET", whsec()),
                    ("SHOTLABEL_API_KEY", API_KEY.to_owned()),
                    ("SHOTLABEL_PROVIDER_URL", "::not a url::".to_owned()),
                ],
            ),
            (
                "an unknown mode",
                vec![
                    ("SHOTLABEL_WEBHOOK_MODE", "per_batch".to_owned()),
                    ("SHOTLABEL_WEBHOOK_SECRET", PER_BATCH_SECRET.to_owned()),
                    ("SHOTLABEL_API_KEY", API_KEY.to_owned()),
                ],
            ),
        ] {
            let mut command = std::process::Command::new(&binary);
            command
                .env_clear()
                .env("PATH", std::env::var("PATH").unwrap_or_default())
                .env("RUST_LOG", "trace")
                .env("AWS_REGION", "us-east-1")
                .env("AWS_ACCESS_KEY_ID", "testing")
                .env("AWS_SECRET_ACCESS_KEY", "testing")
                .env("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
                .env("SHOTLABEL_BUCKET", "bucket")
                .env(
                    "SHOTLABEL_HARVEST_QUEUE_URL",
                    "http://127.0.0.1:9/queue/harvest",
                )
                .env(
                    "SHOTLABEL_PENDING_QUEUE_URL",
                    "http://127.0.0.1:9/queue/pending",
                )
                .env("SHOTLABEL_PROVIDER_URL", "http://127.0.0.1:9/v1");
            for (name, value) in &vars {
                command.env(name, value);
            }
            let output = command.output()?;
            let stdout = String::from_utf8_lossy(&output.stdout);
            let stderr = String::from_utf8_lossy(&output.stderr);
            assert!(!output.status.success(), "{name} with {what} started");
            assert!(
                !stdout.trim().is_empty() || !stderr.trim().is_empty(),
                "{name} with {what} said nothing"
            );
            assert_clean(&format!("{name}'s stdout ({what})"), &stdout);
            assert_clean(&format!("{name}'s stderr ({what})"), &stderr);
        }
    }
    Ok(())
}

/// Builds the functions' binaries (a no-op when they are up to date) and returns their
/// paths in this target folder.
fn build_binaries(names: &[&str]) -> anyhow::Result<Vec<std::path::PathBuf>> {
    // target/debug/deps/<this test> → target/debug
    let exe = std::env::current_exe()?;
    let dir = exe
        .parent()
        .and_then(|deps| deps.parent())
        .ok_or_else(|| anyhow::anyhow!("cannot find the target folder"))?
        .to_owned();
    let mut command = std::process::Command::new(env!("CARGO"));
    command
        .current_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
        .args(["build", "--quiet"]);
    for name in names {
        command.args(["-p", name, "--bin", name]);
    }
    let status = command.status()?;
    anyhow::ensure!(status.success(), "building {names:?} failed");
    Ok(names.iter().map(|n| dir.join(n)).collect())
}
