//! `shotlabel eval`: labels compared with a hand-labelled gold set
//! ([`shotlabel_core::eval`] does the pairing and the metrics; this reads the gold set and
//! the labels, from an export's labels.jsonl or from the bucket's dataset parts as
//! `export` reads them, and prints the report).

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, anyhow};
use shotlabel_core::eval;

use crate::stack::{Aws, StackArgs, one_line, printable, resolve};
use crate::task_cmd::load_task;

#[derive(Debug, clap::Args)]
pub struct EvalArgs {
    /// The gold set: a JSON object of image name → expected answer (like
    /// tests/data/screenshots/labels.json), or JSON Lines with `key` or `file_name` and
    /// the answer's fields on each line.
    #[arg(long, value_name = "FILE")]
    pub gold: PathBuf,
    /// The labels: an export's labels.jsonl (`shotlabel export --format jsonl`); without
    /// it, the task's current labels are read from the bucket's dataset parts. A gold name
    /// matches a label whose key equals it or ends with "/" + the name.
    #[arg(long, value_name = "FILE")]
    pub labels: Option<PathBuf>,
    #[command(flatten)]
    pub stack: StackArgs,
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
    let labels = match &args.labels {
        Some(path) => {
            let labels_text = read(path, "labels")?;
            eval::parse_labels_jsonl(&labels_text)
                .map_err(|e| anyhow!("labels {}: {e}", path.display()))?
        }
        None => crate::stack::runtime()?.block_on(labels_in_bucket(&args.stack, &task))?,
    };

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

/// The task's current labels from the bucket's dataset parts (one LIST page per 1,000
/// parts and one GET per part, as `export` reads them; never a `labels/` listing).
async fn labels_in_bucket(
    stack: &StackArgs,
    task: &shotlabel_core::task::Task,
) -> anyhow::Result<eval::LabelsFile> {
    let aws = Aws::connect().await?;
    let stack = resolve(stack, &aws).await?;
    let bucket = stack.bucket()?.to_owned();
    let prefix = shotlabel_core::dataset::version_prefix(task.name(), task.version());
    let read = crate::export::parts::read_rows(&aws, &bucket, &prefix, task).await?;
    for (key, why) in &read.unreadable {
        eprintln!(
            "shotlabel: warning: skipped dataset part {}: {}",
            printable(key),
            one_line(why)
        );
    }
    let mut file = eval::LabelsFile::default();
    for record in read.rows {
        file.task_versions.insert(record.task.version.clone());
        file.labels.insert(record.source.key, record.label);
    }
    Ok(file)
}

fn read(path: &Path, what: &str) -> anyhow::Result<String> {
    std::fs::read_to_string(path).with_context(|| format!("cannot read {what} {}", path.display()))
}
