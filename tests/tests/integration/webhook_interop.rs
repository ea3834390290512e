//! The receiver against signatures made by the official Python `standardwebhooks`
//! package (from the project's `.venv`): accepted when genuine, 401 when stale, bare or
//! forged, and a replay of an accepted delivery queues nothing.

use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Stdio};

use crate::common::*;
use base64::Engine;
use shotlabel_core::records::unix_now;
use shotlabel_core::standard_webhooks::WebhookSecrets;
use shotlabel_core::webhook::{WebhookConfig, WebhookRequest, receive};

const SIGN: &str = r#"
import json, sys
from datetime import datetime, timezone
from standardwebhooks import Webhook
secret, msg_id, age = sys.argv[1], sys.argv[2], int(sys.argv[3])
body = sys.stdin.read()
when = datetime.fromtimestamp(int(datetime.now(tz=timezone.utc).timestamp()) - age, tz=timezone.utc)
print(json.dumps({"timestamp": str(int(when.timestamp())), "signature": Webhook(secret).sign(msg_id, when, body)}))
"#;

fn python() -> anyhow::Result<PathBuf> {
    let path = std::env::var_os("SHOTLABEL_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../.venv/bin/python"))
        });
    anyhow::ensure!(
        path.is_file(),
        "no Python at {} (run `make venv`)",
        path.display()
    );
    Ok(path)
}

/// Headers the Python package makes for this body, signed `age` seconds ago.
fn python_signed(
    secret: &str,
    id: &str,
    age: i64,
    body: &str,
) -> anyhow::Result<Vec<(String, String)>> {
    let mut child = Command::new(python()?)
        .args(["-c", SIGN, secret, id, &age.to_string()])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    child
        .stdin
        .take()
        .ok_or_else(|| anyhow::anyhow!("no stdin"))?
        .write_all(body.as_bytes())?;
    let output = child.wait_with_output()?;
    anyhow::ensure!(
        output.status.success(),
        "python: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let signed: serde_json::Value = serde_json::from_slice(&output.stdout)?;
    Ok(vec![
        ("webhook-id".into(), id.into()),
        (
            "webhook-timestamp".into(),
            signed["timestamp"].as_str().unwrap_or_default().into(),
        ),
        (
            "webhook-signature".into(),
            signed["signature"].as_str().unwrap_or_default().into(),
        ),
    ])
}

fn post(headers: Vec<(String, String)>, body: &str) -> WebhookRequest {
    WebhookRequest {
        method: "POST".into(),
        headers,
        query: String::new(),
        body: body.as_bytes().to_vec(),
    }
}

#[tokio::test]
async fn python_standardwebhooks_signatures_are_accepted_and_bad_ones_refused() -> anyhow::Result<()>
{
    let stack = stack("webhook-interop").await?;
    let secret = format!(
        "whsec_{}",
        base64::engine::general_purpose::STANDARD.encode(b"interop key of thirty-two bytes!")
    );
    let mut config =
        WebhookConfig::new(&stack.resources.bucket, &stack.resources.harvest_queue_url);
    config.standard = Some(WebhookSecrets::parse(&secret)?);
    let body = r#"{"id":"evt_1","object":"event","created_at":1,"type":"batch.completed","data":{"id":"batch_interop"}}"#;
    let now = unix_now() as i64;
    let harvest_depth = || queue_depth(&stack, &stack.resources.harvest_queue_url);

    let genuine = post(python_signed(&secret, "msg_genuine", 0, body)?, body);
    let response = receive(&stack.store, &stack.queue, &config, &genuine, now).await;
    assert_eq!(response.status, 200, "{}", response.body);
    assert_eq!(harvest_depth().await?, 1);

    // The same delivery again (a replay within the window): acknowledged, not queued.
    let replay = receive(&stack.store, &stack.queue, &config, &genuine, now).await;
    assert_eq!(replay.status, 200);
    assert_eq!(harvest_depth().await?, 1);

    let stale = post(python_signed(&secret, "msg_stale", 400, body)?, body);
    assert_eq!(
        receive(&stack.store, &stack.queue, &config, &stale, now)
            .await
            .status,
        401
    );

    let mut bare = python_signed(&secret, "msg_bare", 0, body)?;
    bare[2].1 = "v1,".into();
    assert_eq!(
        receive(&stack.store, &stack.queue, &config, &post(bare, body), now)
            .await
            .status,
        401
    );

    let other = format!(
        "whsec_{}",
        base64::engine::general_purpose::STANDARD.encode(b"some other key of 32 bytes long!")
    );
    let forged = post(python_signed(&other, "msg_forged", 0, body)?, body);
    assert_eq!(
        receive(&stack.store, &stack.queue, &config, &forged, now)
            .await
            .status,
        401
    );

    let tampered = post(
        python_signed(&secret, "msg_tampered", 0, body)?,
        &body.replace("batch_interop", "batch_other"),
    );
    assert_eq!(
        receive(&stack.store, &stack.queue, &config, &tampered, now)
            .await
            .status,
        401
    );

    let unsigned = post(Vec::new(), body);
    let response = receive(&stack.store, &stack.queue, &config, &unsigned, now).await;
    assert_eq!(response.status, 401);
    assert!(
        !response.body.contains("signature"),
        "no detail: {}",
        response.body
    );
    assert_eq!(
        harvest_depth().await?,
        1,
        "nothing but the genuine delivery was queued"
    );
    Ok(())
}

/// Verifies with the official `openai` SDK: exit 0 when `verify_signature` accepts.
const VERIFY_OPENAI: &str = r#"
import json, sys
from openai import OpenAI
secret, headers = sys.argv[1], json.loads(sys.argv[2])
body = sys.stdin.read()
OpenAI(api_key="unused", webhook_secret=secret).webhooks.verify_signature(body, headers)
"#;

/// A secret configured without `whsec_`: the `standardwebhooks` package base64-decodes it,
/// the `openai` SDK uses its bytes. Ours accepts what the first signs, and what the second
/// accepts, and still refuses a signature made with another key.
#[tokio::test]
async fn unprefixed_secrets_work_as_both_official_packages_use_them() -> anyhow::Result<()> {
    use shotlabel_core::standard_webhooks::sign;
    let stack = stack("webhook-interop-unprefixed").await?;
    let secret =
        base64::engine::general_purpose::STANDARD.encode(b"an unprefixed key of 32 bytes!!!");
    let mut config =
        WebhookConfig::new(&stack.resources.bucket, &stack.resources.harvest_queue_url);
    config.standard = Some(WebhookSecrets::parse(&secret)?);
    let body = r#"{"id":"evt_2","object":"event","created_at":1,"type":"batch.completed","data":{"id":"batch_unprefixed"}}"#;
    let now = unix_now() as i64;

    // Signed by the standardwebhooks package with the unprefixed secret.
    let by_package = post(python_signed(&secret, "msg_package", 0, body)?, body);
    let response = receive(&stack.store, &stack.queue, &config, &by_package, now).await;
    assert_eq!(response.status, 200, "{}", response.body);

    // Signed with the secret's bytes, as the openai SDK verifies: the SDK accepts it, and
    // so do we.
    let headers = vec![
        ("webhook-id".to_owned(), "msg_sdk".to_owned()),
        ("webhook-timestamp".to_owned(), now.to_string()),
        (
            "webhook-signature".to_owned(),
            sign(secret.as_bytes(), "msg_sdk", now, body.as_bytes()),
        ),
    ];
    let header_map: serde_json::Map<String, serde_json::Value> = headers
        .iter()
        .map(|(k, v)| (k.clone(), serde_json::Value::String(v.clone())))
        .collect();
    let mut sdk = Command::new(python()?)
        .args([
            "-c",
            VERIFY_OPENAI,
            &secret,
            &serde_json::Value::Object(header_map).to_string(),
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    sdk.stdin
        .take()
        .ok_or_else(|| anyhow::anyhow!("no stdin"))?
        .write_all(body.as_bytes())?;
    let verified = sdk.wait_with_output()?;
    assert!(
        verified.status.success(),
        "the openai SDK refused it: {}",
        String::from_utf8_lossy(&verified.stderr)
    );
    let response = receive(
        &stack.store,
        &stack.queue,
        &config,
        &post(headers, body),
        now,
    )
    .await;
    assert_eq!(response.status, 200, "{}", response.body);
    assert_eq!(
        queue_depth(&stack, &stack.resources.harvest_queue_url).await?,
        2
    );

    // Another key's signature is still refused.
    let other = post(
        vec![
            ("webhook-id".to_owned(), "msg_other".to_owned()),
            ("webhook-timestamp".to_owned(), now.to_string()),
            (
                "webhook-signature".to_owned(),
                sign(
                    b"another key, not the configured",
                    "msg_other",
                    now,
                    body.as_bytes(),
                ),
            ),
        ],
        body,
    );
    assert_eq!(
        receive(&stack.store, &stack.queue, &config, &other, now)
            .await
            .status,
        401
    );
    Ok(())
}
