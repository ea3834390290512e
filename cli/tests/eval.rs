//! `shotlabel eval` as a person runs it: a gold file and an export's labels.jsonl in a
//! temporary folder, the report read back as text and as JSON.

use std::path::Path;
use std::process::Command;

use serde_json::{Value, json};

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

/// Gold: a (T, 5), b (F, 3), c (T, 2), d (F, 4). Labels as the export writes them:
/// incoming/a.png (T, 4), incoming/b.png (F, 3), incoming/c.png (F, 2), incoming/e.png.
///
/// Matched a, b, c; d has no label; e has no gold.
/// landing_page: (T,T) (F,F) (T,F): accuracy 2/3. Rows gold (F, T): [[1, 0], [1, 1]],
///   rows (1, 2), columns (2, 1): p_o = 2/3, p_e = (1·2 + 2·1)/9 = 4/9,
///   kappa = (6/9 - 4/9) / (5/9) = 0.4.
/// aesthetic: (5,4) (3,3) (2,2): accuracy 2/3, MAE 1/3. Indices 0..4 for 1..5:
///   observed Σ(i-j)²O = 1 (4→3); rows at 4, 2, 1 and columns at 3, 2, 1, one each:
///   Σ(i-j)² r_i c_j = (1+4+9) + (1+0+1) + (4+1+0) = 21; QWK = 1 - 3·1/21 = 6/7.
/// Both fields agree for b only: 1 of 3.
fn write_files(dir: &Path) -> anyhow::Result<(String, String)> {
    let gold = dir.join("gold.json");
    std::fs::write(
        &gold,
        serde_json::to_string_pretty(&json!({
            "a.png": {"landing_page": true, "aesthetic": 5},
            "b.png": {"landing_page": false, "aesthetic": 3},
            "c.png": {"landing_page": true, "aesthetic": 2},
            "d.png": {"landing_page": false, "aesthetic": 4},
        }))?,
    )?;
    let version = shotlabel_core::task::Task::default_task()?
        .version()
        .to_owned();
    let row = |key: &str, landing_page: bool, aesthetic: u8| {
        json!({
            "landing_page": landing_page,
            "aesthetic": aesthetic,
            "key": key,
            "etag": "\"0123\"",
            "task_version": version,
            "model": "google/gemma-3-27b-instruct/bf-16",
            "batch_id": "batch_1",
        })
        .to_string()
    };
    let labels = dir.join("labels.jsonl");
    std::fs::write(
        &labels,
        [
            row("incoming/a.png", true, 4),
            row("incoming/b.png", false, 3),
            row("incoming/c.png", false, 2),
            row("incoming/e.png", true, 1),
        ]
        .join("\n")
            + "\n",
    )?;
    Ok((
        gold.to_string_lossy().into_owned(),
        labels.to_string_lossy().into_owned(),
    ))
}

fn words_of_line(text: &str, start: &str) -> Vec<String> {
    text.lines()
        .find(|l| l.starts_with(start))
        .map(|l| l.split_whitespace().map(str::to_owned).collect())
        .unwrap_or_default()
}

#[test]
fn eval_prints_counts_metrics_matrices_and_disagreements() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let (gold, labels) = write_files(dir.path())?;
    let (ok, out, err) = shotlabel(&["eval", "--gold", &gold, "--labels", &labels])?;
    assert!(ok, "{err}");
    assert!(err.is_empty(), "{err}");
    for (start, words) in [
        ("gold images", vec!["gold", "images", "4"]),
        ("labels ", vec!["labels", "4"]),
        ("matched", vec!["matched", "3"]),
        (
            "gold without a label ",
            vec!["gold", "without", "a", "label", "1"],
        ),
        (
            "labels without gold",
            vec!["labels", "without", "gold", "1"],
        ),
        (
            "landing_page ",
            vec![
                "landing_page",
                "categorical",
                "3",
                "2",
                "0.667",
                "0.400",
                "-",
                "-",
            ],
        ),
        (
            "aesthetic ",
            vec![
                "aesthetic",
                "ordinal",
                "3",
                "2",
                "0.667",
                "-",
                "0.333",
                "0.857",
            ],
        ),
    ] {
        assert_eq!(words_of_line(&out, start), words, "{out}");
    }
    assert!(
        out.contains("all fields agree: 1 of 3 images (0.333)"),
        "{out}"
    );
    assert!(out.contains("gold without a label (1)\n  d.png\n"), "{out}");
    // landing_page's matrix: gold false → [1, 0], gold true → [1, 1].
    assert_eq!(
        words_of_line(&out, "gold \\ label  false"),
        ["gold", "\\", "label", "false", "true"]
    );
    assert_eq!(words_of_line(&out, "false "), ["false", "1", "0"], "{out}");
    assert_eq!(words_of_line(&out, "true "), ["true", "1", "1"], "{out}");
    assert!(out.contains("disagreements (2)"), "{out}");
    assert_eq!(
        words_of_line(&out, "a.png"),
        ["a.png", "aesthetic", "5", "4"],
        "{out}"
    );
    assert_eq!(
        words_of_line(&out, "c.png"),
        ["c.png", "landing_page", "true", "false"],
        "{out}"
    );
    Ok(())
}

#[test]
fn eval_json_has_the_same_numbers() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let (gold, labels) = write_files(dir.path())?;
    let (ok, out, err) = shotlabel(&["eval", "--gold", &gold, "--labels", &labels, "--json"])?;
    assert!(ok, "{err}");
    let report: Value = serde_json::from_str(&out)?;
    assert_eq!(
        report["counts"],
        json!({"gold_images": 4, "labels": 4, "matched": 3, "gold_without_label": 1,
               "ambiguous": 0, "labels_without_gold": 1})
    );
    let close =
        |value: &Value, expected: f64| value.as_f64().is_some_and(|v| (v - expected).abs() < 1e-12);
    let fields = report["fields"].as_array().cloned().unwrap_or_default();
    let field = |name: &str| {
        fields
            .iter()
            .find(|f| f["field"] == name)
            .cloned()
            .unwrap_or_default()
    };
    let lp = field("landing_page");
    assert_eq!(lp["kind"], "categorical");
    assert!(close(&lp["accuracy"], 2.0 / 3.0), "{lp}");
    assert!(close(&lp["kappa"], 0.4), "{lp}");
    assert_eq!(lp["confusion"]["counts"], json!([[1, 0], [1, 1]]));
    let aesthetic = field("aesthetic");
    assert_eq!(aesthetic["kind"], "ordinal");
    assert!(
        close(&aesthetic["mean_absolute_error"], 1.0 / 3.0),
        "{aesthetic}"
    );
    assert!(
        close(&aesthetic["quadratic_weighted_kappa"], 6.0 / 7.0),
        "{aesthetic}"
    );
    assert!(close(&report["all_fields"]["accuracy"], 1.0 / 3.0));
    assert_eq!(report["disagreements"].as_array().map(Vec::len), Some(2));
    assert_eq!(report["disagreements"][0]["label_key"], "incoming/a.png");
    Ok(())
}

#[test]
fn eval_unreadable_files_are_one_clear_line() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let (gold, labels) = write_files(dir.path())?;
    let missing = dir.path().join("nope.json").to_string_lossy().into_owned();

    let (ok, out, err) = shotlabel(&["eval", "--gold", &missing, "--labels", &labels])?;
    assert!(!ok);
    assert!(out.is_empty(), "{out}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(
        err.contains("cannot read gold set") && err.contains("nope.json"),
        "{err}"
    );

    let broken = dir.path().join("broken.jsonl");
    std::fs::write(&broken, "{\"key\": \"incoming/a.png\"}\n{not json\n")?;
    let broken = broken.to_string_lossy().into_owned();
    let (ok, _, err) = shotlabel(&["eval", "--gold", &gold, "--labels", &broken])?;
    assert!(!ok);
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(err.contains("broken.jsonl: line 2: not JSON"), "{err}");
    Ok(())
}
