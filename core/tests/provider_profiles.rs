//! `SHOTLABEL_PROVIDER`: each provider's documented limits and quirks as the submitter's
//! and the harvest's defaults, explicit settings within them, and the combinations a
//! provider refuses stopped at start-up.

use std::time::Duration;

use shotlabel_core::SecretString;
use shotlabel_core::request::request_line;
use shotlabel_core::settings::{FunctionSettings, HarvestSettings, SubmitSettings};
use shotlabel_core::task::{Task, TokenLimitField};

const BASE: [(&str, &str); 3] = [
    ("SHOTLABEL_BUCKET", "bucket"),
    ("SHOTLABEL_PENDING_QUEUE_URL", "https://sqs.local/pending"),
    ("SHOTLABEL_PROVIDER_URL", "https://provider.local/v1"),
];

fn submit(extra: &[(&str, &str)]) -> anyhow::Result<SubmitSettings> {
    Ok(SubmitSettings::from_vars(
        BASE.iter().chain(extra.iter()).copied(),
    )?)
}

fn secret() -> Option<SecretString> {
    Some(SecretString::from(
        "a-per-batch-secret-of-enough-bytes-0123456789",
    ))
}

#[test]
fn openai_refuses_per_batch_webhooks_at_start_up() -> anyhow::Result<()> {
    let settings = submit(&[
        ("SHOTLABEL_PROVIDER", "openai"),
        ("SHOTLABEL_WEBHOOK_MODE", "per-batch"),
        ("SHOTLABEL_WEBHOOK_URL", "https://hooks.local/"),
    ])?;
    let error = settings.config(secret()).expect_err("refused").to_string();
    assert!(error.contains("SHOTLABEL_WEBHOOK_MODE"), "{error}");
    assert!(error.contains("openai"), "{error}");
    assert!(error.contains("standard"), "{error}");
    assert_eq!(error.lines().count(), 1, "one clear line: {error}");

    // The same with Inference.net is what it is for.
    let settings = submit(&[
        ("SHOTLABEL_PROVIDER", "inference-net"),
        ("SHOTLABEL_WEBHOOK_MODE", "per-batch"),
        ("SHOTLABEL_WEBHOOK_URL", "https://hooks.local/"),
    ])?;
    assert!(settings.config(secret())?.per_batch_webhook.is_some());
    Ok(())
}

#[test]
fn each_profile_sets_its_documented_defaults() -> anyhow::Result<()> {
    let openai = submit(&[("SHOTLABEL_PROVIDER", "openai")])?.config(None)?;
    assert_eq!(openai.limits.max_requests, 50_000);
    assert_eq!(openai.limits.max_bytes, 200_000_000);
    assert_eq!(openai.max_request_bytes, Some(27_000_000));
    assert_eq!(
        openai.provider_limits.upload_interval,
        Duration::from_millis(1_800)
    );
    assert_eq!(
        openai.task.token_field(),
        TokenLimitField::MaxCompletionTokens
    );
    let line: serde_json::Value = serde_json::from_slice(&request_line(
        "id-1",
        &openai.task,
        "data:image/png;base64,AA",
    ))?;
    assert_eq!(line["body"]["max_completion_tokens"], 300);
    assert!(line["body"].get("max_tokens").is_none(), "{line}");

    let inference = submit(&[("SHOTLABEL_PROVIDER", "inference-net")])?.config(None)?;
    assert_eq!(
        inference.provider_limits.upload_interval,
        Duration::from_secs(60)
    );
    assert_eq!(inference.max_request_bytes, None);
    let line: serde_json::Value = serde_json::from_slice(&request_line(
        "id-1",
        &inference.task,
        "data:image/png;base64,AA",
    ))?;
    assert_eq!(line["body"]["max_tokens"], 300);
    assert!(line["body"].get("max_completion_tokens").is_none());

    // Unset is generic: no pacing, OpenAI's file limits.
    let generic = submit(&[])?.config(None)?;
    assert_eq!(generic.provider_limits.upload_interval, Duration::ZERO);
    assert_eq!(generic.limits.max_requests, 50_000);
    // The task's version does not depend on the field's name.
    assert_eq!(openai.task.version(), generic.task.version());
    Ok(())
}

#[test]
fn explicit_settings_override_within_the_providers_limits() -> anyhow::Result<()> {
    let paced = submit(&[
        ("SHOTLABEL_PROVIDER", "inference-net"),
        ("SHOTLABEL_UPLOAD_INTERVAL_SECONDS", "0"),
        ("SHOTLABEL_MAX_BATCH_REQUESTS", "5000"),
        ("SHOTLABEL_MAX_OPEN_BATCHES", "3"),
    ])?
    .config(None)?;
    assert_eq!(paced.provider_limits.upload_interval, Duration::ZERO);
    assert_eq!(paced.limits.max_requests, 5_000);
    assert_eq!(paced.provider_limits.max_open_batches, 3);

    for (name, value) in [
        ("SHOTLABEL_MAX_BATCH_BYTES", "209715200"),
        ("SHOTLABEL_MAX_BATCH_REQUESTS", "50001"),
        ("SHOTLABEL_MAX_REQUEST_BYTES", "30000000"),
    ] {
        let error = submit(&[("SHOTLABEL_PROVIDER", "openai"), (name, value)])?
            .config(None)
            .expect_err("over the provider's limit")
            .to_string();
        assert!(error.contains(name), "{error}");
        assert!(error.contains("openai"), "{error}");
    }
    Ok(())
}

#[test]
fn a_task_that_names_its_token_field_keeps_it() -> anyhow::Result<()> {
    let mut spec = Task::default_task()?.spec().clone();
    spec.max_tokens_field = Some(TokenLimitField::MaxTokens);
    let task = Task::new(spec)?.with_provider_token_field(TokenLimitField::MaxCompletionTokens);
    assert_eq!(task.token_field(), TokenLimitField::MaxTokens);
    let body = task.chat_completion_body("data:image/png;base64,AA");
    assert!(body.get("max_tokens").is_some() && body.get("max_completion_tokens").is_none());
    Ok(())
}

#[test]
fn harvests_delete_provider_files_where_the_profile_says() -> anyhow::Result<()> {
    let harvest = |extra: &[(&str, &str)]| -> anyhow::Result<bool> {
        let settings = HarvestSettings::from_vars(BASE.iter().chain(extra.iter()).copied())?;
        Ok(settings
            .provider
            .harvest_config(&settings.harvest)?
            .delete_provider_files)
    };
    assert!(harvest(&[("SHOTLABEL_PROVIDER", "openai")])?);
    assert!(harvest(&[("SHOTLABEL_PROVIDER", "inference-net")])?);
    assert!(!harvest(&[])?);
    assert!(!harvest(&[
        ("SHOTLABEL_PROVIDER", "openai"),
        ("SHOTLABEL_DELETE_PROVIDER_FILES", "false")
    ])?);
    Ok(())
}
