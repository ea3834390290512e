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
