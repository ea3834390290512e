//! The dataset parts a harvest writes, against moto and the batch emulator, read back with
//! the tools data teams use: `tests/python/dataset_check.py` opens them with pyarrow and
//! DuckDB (from the project's venv) and holds every column's type and every value to the
//! label objects the same harvest wrote. For the default task and for the caption task
//! (a LIST column), after a harvest repeated from a crash.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::{Context, ensure};
use batch_emulator::FaultSettings;
use shotlabel_core::dataset;
use shotlabel_core::enqueue::enqueue_objects;
use shotlabel_core::harvest::{HarvestOutcome, harvest};
use shotlabel_core::records::{HarvestRequest, LabelRecord};
use shotlabel_core::request::BatchLimits;
use shotlabel_core::submit::run_submit;
use shotlabel_core::task::Task;

use crate::common::*;

async fn object_bytes(stack: &Stack, key: &str) -> anyhow::Result<Vec<u8>> {
    use shotlabel_core::ports::ObjectStore;
    Ok(stack.store.get(&stack.resources.bucket, key).await?.body)
}

fn caption_task() -> anyhow::Result<Task> {
    Ok(Task::from_path(
        &Path::new(env!("CARGO_MANIFEST_DIR")).join("../tasks/caption.toml"),
    )?)
}

/// The venv's Python, as `make venv` installs it.
fn venv_python() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../.venv/bin/python")
}

/// Labels the fixture screenshots under `task` with one batch, harvests it once with a
/// crash before the batch is recorded done and once more, and checks the part with
/// pyarrow and DuckDB.
async fn labelled_dataset(name: &str, task: Task) -> anyhow::Result<()> {
    let stack = stack(name).await?;
    let emulator = emulator(FaultSettings {
        // Some answers go round again: they must not be in the part.
        error_line: 0.2,
        ..FaultSettings::default()
    })
    .await?;
    let client = client(&emulator, quick_retries(3))?;
    let task = Arc::new(task);
    let objects = put_files(&stack, &files("screenshots")?).await?;
    let mut enqueue_config = enqueue_config(&stack)?;
    enqueue_config.task = task_ref(&task);
    enqueue_objects(&stack.store, &stack.queue, &enqueue_config, objects).await?;
    let mut submit = submit_config(&stack, BatchLimits::default())?;
    submit.task = task.clone();
    let report = run_submit(&stack.store, &stack.queue, &client, &submit).await?;
    let batch_id = report.batches[0].batch_id.clone();
    wait_terminal(&client, &batch_id).await?;
    let mut config = harvest_config(&stack)?;
    config.task = task.clone();
    let request = HarvestRequest {
        batch_id: Some(batch_id.clone()),
        manifest: None,
        origin: "test".into(),
        shard: None,
        delivery: None,
    };

    let crashing = CrashBeforeRecord {
        inner: &stack.store,
        crash: AtomicBool::new(true),
    };
    let crashed = harvest(&crashing, &stack.queue, &client, &config, &request).await;
    match &crashed {
        Err(e) => ensure!(
            e.to_string().contains("died"),
            "the harvest failed before the crash: {e}"
        ),
        Ok(outcome) => anyhow::bail!("the harvest was to crash: {outcome:?}"),
    }
    let part_key = dataset::part_key(task.name(), task.version(), &batch_id, 0);
    let first = object_bytes(&stack, &part_key).await?;

    // A second harvest finds its own labels and writes the same part again.
    tokio::time::sleep(std::time::Duration::from_millis(1_100)).await;
    crashing.crash.store(false, Ordering::SeqCst);
    let outcome = harvest(&crashing, &stack.queue, &client, &config, &request).await?;
    let HarvestOutcome::Harvested { counts, .. } = outcome else {
        anyhow::bail!("not harvested: {outcome:?}");
    };
    ensure!(
        counts.labelled > 0 && counts.retried > 0,
        "some labelled, some retried: {counts:?}"
    );
    let parts = list(&stack, dataset::DATASET_PREFIX).await?;
    ensure!(parts == [part_key.clone()], "one part: {parts:?}");
    let again = object_bytes(&stack, &part_key).await?;
    ensure!(first == again, "the repeated harvest wrote other bytes");

    // The part and the label objects, side by side on disk for the Python readers.
    let dir = tempfile::tempdir()?;
    let part_path = dir.path().join(&part_key);
    std::fs::create_dir_all(part_path.parent().context("a parent")?)?;
    std::fs::write(&part_path, &again)?;
    let labels: Vec<LabelRecord> = read_all(&stack, "labels/").await?;
    ensure!(
        labels.len() as u64 == counts.labelled,
        "{} labels",
        labels.len()
    );
    let mut lines = String::new();
    for label in &labels {
        lines.push_str(&serde_json::to_string(label)?);
        lines.push('\n');
    }
    std::fs::write(dir.path().join("labels.jsonl"), lines)?;

    check_with_python(&[dir.path().to_str().context("a UTF-8 path")?, task.name()])?;

    // `shotlabel export --format parquet` reads the parts (not labels/) into one file,
    // which Hugging Face `datasets` loads.
    let export_dir = dir.path().join("export");
    let out = export_dir.to_str().context("a UTF-8 path")?;
    let mut args = vec!["export", "--format", "parquet", "--out", out];
    let task_file = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tasks/caption.toml");
    let task_file = task_file.to_str().context("a UTF-8 path")?;
    if task.name() == "caption" {
        args.extend(["--task", task_file]);
    }
    let exported = crate::backfill::shotlabel(&stack, &args)?;
    ensure!(
        exported.status.success(),
        "export failed: {}",
        String::from_utf8_lossy(&exported.stderr)
    );
    check_with_python(&[
        "export",
        dir.path().to_str().context("a UTF-8 path")?,
        task.name(),
    ])?;
    Ok(())
}

/// Runs `tests/python/dataset_check.py` with the venv's Python.
fn check_with_python(args: &[&str]) -> anyhow::Result<()> {
    let output = std::process::Command::new(venv_python())
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("python/dataset_check.py"))
        .args(args)
        .output()
        .context("running the venv's Python (make venv)")?;
    ensure!(
        output.status.success(),
        "dataset_check.py failed:\n{}\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    Ok(())
}

#[tokio::test]
async fn default_task_parts_hold_every_label_with_its_types() -> anyhow::Result<()> {
    labelled_dataset("dataset-default", Task::default_task()?).await
}

#[tokio::test]
async fn caption_task_parts_hold_tags_as_a_list() -> anyhow::Result<()> {
    labelled_dataset("dataset-caption", caption_task()?).await
}

/// `shotlabel export` of 10,000 labels (one harvest's part) lists the part's prefix once
/// and reads one object: no `labels/` listing, no GET per label.
#[tokio::test]
async fn an_export_of_ten_thousand_labels_reads_one_part_and_lists_no_labels() -> anyhow::Result<()>
{
    use shotlabel_core::answer::Usage;
    use shotlabel_core::ports::{ObjectStore, WriteCondition};
    use shotlabel_core::records::{Provenance, RecordStatus, SourceRef};

    const LABELS: u64 = 10_000;
    let stack = stack("dataset-export-calls").await?;
    let task = Task::default_task()?;
    let bucket = stack.resources.bucket.clone();
    let records: Vec<LabelRecord> = (0..LABELS)
        .map(|i| LabelRecord {
            status: RecordStatus::Labelled,
            label: serde_json::json!({"landing_page": i.is_multiple_of(3), "aesthetic": 1 + i % 5}),
            source: SourceRef {
                bucket: bucket.clone(),
                key: format!("{INPUT}shots/{i:05}.png"),
                etag: format!("{i:032x}"),
                size: 50_000 + i,
                version_id: None,
            },
            task: task_ref(&task),
            model: "a-model".into(),
            provenance: Provenance {
                batch_id: "batch_big".into(),
                custom_id: format!("r{i:05}"),
                request_id: None,
                finish_reason: None,
                usage: Some(Usage {
                    prompt_tokens: 731,
                    completion_tokens: 14,
                    total_tokens: 745,
                }),
            },
            attempt: 0,
            labelled_at: 1_767_225_600 + i,
        })
        .collect();
    let part = dataset::part_key(task.name(), task.version(), "batch_big", 0);
    stack
        .store
        .put(
            &bucket,
            &part,
            dataset::write_part(&task, &records)?,
            dataset::PARQUET_CONTENT_TYPE,
            WriteCondition::Overwrite,
        )
        .await?;

    let out = tempfile::tempdir()?;
    let out_arg = out.path().to_str().context("a UTF-8 path")?.to_owned();
    stack.moto.start_recording().await?;
    let exported = crate::backfill::shotlabel(
        &stack,
        &["export", "--format", "jsonl", "--out", &out_arg, "--json"],
    )?;
    let requests = stack.moto.stop_recording().await?;
    ensure!(
        exported.status.success(),
        "export failed: {}",
        String::from_utf8_lossy(&exported.stderr)
    );

    let lists: Vec<&(String, String)> = requests
        .iter()
        .filter(|(method, url)| method == "GET" && url.contains("list-type=2"))
        .collect();
    let gets: Vec<&(String, String)> = requests
        .iter()
        .filter(|(method, url)| method == "GET" && !url.contains("list-type=2"))
        .collect();
    ensure!(
        lists.len() == 1
            && lists[0]
                .1
                .contains("prefix=dataset%2Ftask%3Dwebsite-judgement"),
        "one listing, of the task version's parts: {lists:?}"
    );
    ensure!(
        !requests
            .iter()
            .any(|(_, url)| url.contains("prefix=labels")),
        "labels/ was listed"
    );
    ensure!(
        gets.len() == 1 && gets[0].1.contains("part-0.parquet"),
        "one GET, of the part: {gets:?}"
    );
    let lines = std::fs::read_to_string(out.path().join("labels.jsonl"))?;
    let rows: Vec<serde_json::Value> = lines
        .lines()
        .map(serde_json::from_str)
        .collect::<Result<_, _>>()?;
    ensure!(rows.len() as u64 == LABELS, "{} rows", rows.len());
    for (row, record) in rows.iter().zip(&records) {
        ensure!(
            row["key"] == record.source.key.as_str()
                && row["landing_page"] == record.label["landing_page"]
                && row["aesthetic"] == record.label["aesthetic"],
            "{row} for {}",
            record.source.key
        );
    }
    Ok(())
}
