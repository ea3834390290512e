//! The `shotlabel` binary as a person runs it.

use std::process::Command;

fn shotlabel(args: &[&str]) -> anyhow::Result<(bool, String, String)> {
    let output = Command::new(env!("CARGO_BIN_EXE_shotlabel"))
        .args(args)
        .current_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
        .env_remove("SHOTLABEL_TASK")
        .output()?;
    Ok((
        output.status.success(),
        String::from_utf8(output.stdout)?,
        String::from_utf8(output.stderr)?,
    ))
}

#[test]
fn task_show_prints_the_default_task_and_its_version() -> anyhow::Result<()> {
    let (ok, out, _) = shotlabel(&["task", "show"])?;
    assert!(ok);
    assert!(out.contains("website-judgement"), "{out}");
    assert!(out.contains("google/gemma-3-27b-instruct/bf-16"), "{out}");
    let version = shotlabel_core::task::Task::default_task()?
        .version()
        .to_owned();
    assert!(out.contains(&version), "{out}");
    Ok(())
}

#[test]
fn task_show_request_prints_a_strict_json_schema_body() -> anyhow::Result<()> {
    let (ok, out, _) = shotlabel(&["task", "show", "--task", "tasks/caption.toml", "--request"])?;
    assert!(ok);
    let body: serde_json::Value = serde_json::from_str(&out)?;
    assert_eq!(body["response_format"]["json_schema"]["name"], "caption");
    assert_eq!(body["response_format"]["json_schema"]["strict"], true);
    Ok(())
}

#[test]
fn task_check_passes_good_files_and_names_the_bad_one() -> anyhow::Result<()> {
    let (ok, out, _) = shotlabel(&[
        "task",
        "check",
        "tasks/website-judgement.toml",
        "tasks/caption.toml",
    ])?;
    assert!(ok, "{out}");
    assert_eq!(
        out.lines().filter(|l| l.starts_with("ok")).count(),
        2,
        "{out}"
    );

    let dir = tempfile::tempdir()?;
    let bad = dir.path().join("bad.toml");
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../tasks/caption.toml"
    ))?
    .replace(
        "type = \"string\"\nminLength = 1",
        "type = \"text\"\nminLength = 1",
    );
    std::fs::write(&bad, text)?;
    let bad_path = bad.to_string_lossy().into_owned();
    let (ok, out, _) = shotlabel(&["task", "check", "tasks/caption.toml", &bad_path])?;
    assert!(!ok);
    let complaint = out
        .lines()
        .find(|l| l.starts_with("invalid"))
        .unwrap_or_default();
    assert!(
        complaint.contains("bad.toml") && complaint.contains("not a valid JSON Schema"),
        "{out}"
    );
    Ok(())
}

#[test]
fn a_missing_task_file_is_one_clear_line_and_a_failure() -> anyhow::Result<()> {
    let (ok, _, err) = shotlabel(&["task", "show", "--task", "no/such/task.toml"])?;
    assert!(!ok);
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(err.contains("no/such/task.toml"), "{err}");
    Ok(())
}

#[test]
fn local_refuses_a_folder_without_images() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    std::fs::write(dir.path().join("notes.txt"), "no images here")?;
    let path = dir.path().to_string_lossy().into_owned();
    let (ok, _, err) = shotlabel(&["local", "--images", &path])?;
    assert!(!ok);
    assert!(err.contains("no images"), "{err}");
    Ok(())
}

#[test]
fn prep_writes_one_line_per_image_and_records_failures() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let out = dir.path().join("requests.jsonl");
    let out_path = out.to_string_lossy().into_owned();
    let (ok, stdout, stderr) = shotlabel(&[
        "prep",
        "tests/data/screenshots",
        "tests/data/awkward",
        "--out",
        &out_path,
    ])?;
    assert!(ok, "{stderr}");
    // 12 screenshots + labels.json + 12 awkward files; the empty, text and truncated
    // files and labels.json fail.
    let summary = stdout.trim();
    assert!(summary.starts_with("images 25 lines 21 "), "{summary}");
    assert!(summary.contains(" failed 4 "), "{summary}");
    for name in [
        "empty.png",
        "not-an-image.png",
        "truncated.png",
        "labels.json",
    ] {
        assert!(
            stderr
                .lines()
                .any(|l| l.starts_with("failed") && l.contains(name)),
            "{stderr}"
        );
    }
    let text = std::fs::read_to_string(&out)?;
    let lines: Vec<serde_json::Value> = text
        .lines()
        .map(serde_json::from_str)
        .collect::<Result<_, _>>()?;
    assert_eq!(lines.len(), 21);
    let bytes: usize = text.len();
    assert!(summary.contains(&format!(" bytes {bytes} ")), "{summary}");
    let ids: std::collections::HashSet<&str> = lines
        .iter()
        .filter_map(|l| l["custom_id"].as_str())
        .collect();
    assert_eq!(ids.len(), 21, "custom ids are unique");
    for line in &lines {
        let url = line["body"]["messages"][1]["content"][1]["image_url"]["url"]
            .as_str()
            .unwrap_or_default();
        assert!(url.starts_with("data:image/jpeg;base64,"));
        assert_eq!(
            line["body"]["response_format"]["json_schema"]["strict"],
            true
        );
    }
    Ok(())
}
