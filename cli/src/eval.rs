//! `shotlabel eval`: an export's labels compared with a hand-labelled gold set
//! ([`shotlabel_core::eval`] does the pairing and the metrics; this reads the files and
//! prints the report).

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, anyhow};
use shotlabel_core::eval;

use crate::task_cmd::load_task;

#[derive(Debug, clap::Args)]
pub struct EvalArgs {
    /// The gold set: a JSON object of image name → expected answer (like
    /// tests/data/screenshots/labels.json), or JSON Lines with `key` or `file_name` and
    /// the answer's fields on each line.
    #[arg(long, value_name = "FILE")]
    pub gold: PathBuf,
    /// The labels: an export's labels.jsonl (`shotlabel export --format jsonl`). A gold
    /// name matches a label whose key equals it or ends with "/" + the name.
    #[arg(long, value_name = "FILE")]
    pub labels: PathBuf,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
    /// The task the labels were made with, for its answer fields; the built-in website
    /// judgement when absent.
    #[arg(long, env = "SHOTLABEL_TASK")]
    pub task: Option<PathBuf>,
}

pub fn run(args: EvalArgs) -> anyhow::Result<ExitCode> {
    let task = load_task(args.task.as_deref())?;
    let gold_text = read(&args.gold, "gold set")?;
    let gold = eval::parse_gold(&gold_text)
        .map_err(|e| anyhow!("gold set {}: {e}", args.gold.display()))?;
    let labels_text = read(&args.labels, "labels")?;
    let labels = eval::parse_labels_jsonl(&labels_text)
        .map_err(|e| anyhow!("labels {}: {e}", args.labels.display()))?;

    // Warnings, not errors: comparing an older version's labels can be the point.
    let versions: Vec<&str> = labels.task_versions.iter().map(String::as_str).collect();
    match versions.as_slice() {
        [] => {}
        [one] if *one == task.version() => {}
        [one] => eprintln!(
            "shotlabel: warning: the labels were made under task version {one}; task {} is at {}",
            task.name(),
            task.version()
        ),
        many => eprintln!(
            "shotlabel: warning: the labels mix task versions {}",
            many.join(", ")
        ),
    }

    let report = eval::evaluate(&task, &gold, &labels.labels);
    if report.counts.matched == 0 && report.counts.labels > 0 {
        eprintln!(
            "shotlabel: warning: no gold image matched a label (a gold name matches a label key equal to it or ending in \"/<name>\")"
        );
    }
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", report.to_text());
    }
    Ok(ExitCode::SUCCESS)
}

fn read(path: &Path, what: &str) -> anyhow::Result<String> {
    std::fs::read_to_string(path).with_context(|| format!("cannot read {what} {}", path.display()))
}
