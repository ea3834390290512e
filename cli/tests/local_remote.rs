//! `shotlabel local` against a provider of its own (SHOTLABEL_PROVIDER_URL and
//! SHOTLABEL_API_KEY), with the `openai` profile: here the batch emulator, answering as
//! OpenAI does where that matters (unknown creation arguments refused with 400, uploads
//! processed only after a while).

use std::process::Command;

use batch_emulator::{EmulatorConfig, FaultSettings};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_local_run_against_an_openai_like_provider_labels_every_image() -> anyhow::Result<()> {
    let mut config = EmulatorConfig::new("remote-test-key")
        .with_delays(20, 100, 20)
        .with_faults(FaultSettings {
            file_processing_ms: 300,
            ..FaultSettings::default()
        });
    config.strict_arguments = true;
    config.listen = "127.0.0.1:0".parse()?;
    let emulator = batch_emulator::spawn(config).await?;
    let out_dir = tempfile::tempdir()?;
    let report = out_dir.path().join("report.html");
    let base_url = emulator.base_url();
    let report_arg = report.to_string_lossy().into_owned();
    let output = tokio::task::spawn_blocking(move || {
        Command::new(env!("CARGO_BIN_EXE_shotlabel"))
            .args([
                "local",
                "--images",
                "tests/data/screenshots",
                "--timeout",
                "300",
                "--report",
                &report_arg,
            ])
            .current_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
            .env("SHOTLABEL_PROVIDER_URL", base_url)
            .env("SHOTLABEL_API_KEY", "remote-test-key")
            .env("SHOTLABEL_PROVIDER", "openai")
            .output()
    })
    .await??;
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stdout}\n{stderr}");
    assert!(
        stdout.lines().any(|l| l.trim() == "labelled:        12"),
        "{stdout}"
    );
    // The openai profile deletes a harvested batch's files at the provider (generic
    // would keep them).
    let client =
        shotlabel_batch_client::BatchClient::new(shotlabel_batch_client::BatchApiConfig::new(
            &emulator.base_url(),
            secrecy::SecretString::from("remote-test-key"),
        )?)?;
    let batches = client.list_batches(None, 100).await?.data;
    assert!(!batches.is_empty());
    for batch in &batches {
        for file in [&batch.input_file_id, &batch.output_file_id]
            .into_iter()
            .flatten()
        {
            let gone = client.retrieve_file(file).await;
            assert_eq!(
                gone.as_ref().err().and_then(|e| e.status()),
                Some(404),
                "{file} of {} is still there: {gone:?}",
                batch.id
            );
        }
    }
    let stats = emulator.stats();
    // Created once each, from processed files, with only OpenAI's arguments.
    assert_eq!(stats.faults.get("file_not_processed").copied(), Some(0));
    assert!(stats.batches.get("completed").copied().unwrap_or(0) >= 1);
    assert_eq!(stats.batches.get("failed").copied(), Some(0));
    Ok(())
}
