//! Secrets come from Secrets Manager when `<NAME>_SECRET_ARN` is set (on AWS), from the
//! variable itself otherwise; errors never contain them.

use std::collections::HashMap;

use crate::common::*;
use batch_emulator::FaultSettings;
use shotlabel_aws::{batch_client_from_env, required_secret, secret_setting};
use shotlabel_core::ExposeSecret;

fn env(vars: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> + use<> {
    let map: HashMap<String, String> = vars
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
    move |name| map.get(name).cloned()
}

#[tokio::test]
async fn secrets_are_read_from_secrets_manager_or_the_environment() -> anyhow::Result<()> {
    let stack = stack("secrets").await?;
    let sdk = stack.moto.sdk_config().await;
    let manager = aws_sdk_secretsmanager::Client::new(&sdk);
    let created = manager
        .create_secret()
        .name("shotlabel/provider-api-key")
        .secret_string(KEY)
        .send()
        .await?;
    let arn = created.arn.unwrap_or_default();

    let from_manager = secret_setting(
        &sdk,
        "SHOTLABEL_API_KEY",
        env(&[
            ("SHOTLABEL_API_KEY_SECRET_ARN", &arn),
            ("SHOTLABEL_API_KEY", "ignored"),
        ]),
    )
    .await?;
    assert_eq!(from_manager.as_ref().map(|s| s.expose_secret()), Some(KEY));
    let from_env = secret_setting(
        &sdk,
        "SHOTLABEL_API_KEY",
        env(&[("SHOTLABEL_API_KEY", "plain-value")]),
    )
    .await?;
    assert_eq!(
        from_env.as_ref().map(|s| s.expose_secret()),
        Some("plain-value")
    );
    assert!(
        secret_setting(&sdk, "SHOTLABEL_API_KEY", env(&[]))
            .await?
            .is_none()
    );

    let missing = required_secret(
        &sdk,
        "SHOTLABEL_API_KEY",
        "the provider's API key",
        env(&[]),
    )
    .await;
    let message = missing.err().map(|e| e.to_string()).unwrap_or_default();
    assert!(
        message.contains("SHOTLABEL_API_KEY_SECRET_ARN"),
        "{message}"
    );
    let wrong_arn = "arn:aws:secretsmanager:us-east-1:123456789012:secret:nope";
    let unreadable = secret_setting(
        &sdk,
        "SHOTLABEL_API_KEY",
        env(&[("SHOTLABEL_API_KEY_SECRET_ARN", wrong_arn)]),
    )
    .await;
    let message = unreadable.err().map(|e| e.to_string()).unwrap_or_default();
    assert!(
        message.contains("SHOTLABEL_API_KEY") && message.contains(wrong_arn),
        "{message}"
    );

    // The client built from the secret authenticates: the emulator refuses any other key.
    let emulator = emulator(FaultSettings::default()).await?;
    let client = batch_client_from_env(
        &sdk,
        env(&[
            ("SHOTLABEL_PROVIDER_URL", &emulator.base_url()),
            ("SHOTLABEL_API_KEY_SECRET_ARN", &arn),
        ]),
    )
    .await
    .map_err(|e| anyhow::anyhow!("{e}"))?;
    let path = stack.work_dir.path().join("one.jsonl");
    std::fs::write(&path, "{}\n")?;
    client.upload_file(&path).await?;
    let wrong = batch_client_from_env(
        &sdk,
        env(&[
            ("SHOTLABEL_PROVIDER_URL", &emulator.base_url()),
            ("SHOTLABEL_API_KEY", "sk-wrong-key-123"),
        ]),
    )
    .await
    .map_err(|e| anyhow::anyhow!("{e}"))?;
    let refused = wrong
        .upload_file(&path)
        .await
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(refused.contains("401"), "{refused}");
    assert!(
        !refused.contains("sk-wrong-key-123"),
        "the key never shows: {refused}"
    );
    Ok(())
}
