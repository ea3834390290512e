//! `shotlabel`: the operator CLI.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod backfill;
mod dataset_cmd;
mod eval;
mod export;
mod local;
mod prep;
mod redrive;
mod report;
mod stack;
mod status;
mod task_cmd;

#[derive(Debug, Parser)]
#[command(
    name = "shotlabel",
    version,
    about = "Label images at scale with vision LLMs through Batch APIs."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Queue objects already in the bucket (no S3 event fired for them), skipping what is
    /// labelled already under the current task version.
    Backfill(backfill::BackfillArgs),
    /// Queue depths, open batches, labelled and failed counts, tokens used.
    Status(status::StatusArgs),
    /// Move dead-letter messages back to the pending (or, with --harvest, harvest) queue.
    Redrive(redrive::RedriveArgs),
    /// Write the labels as JSONL, Parquet, or a Hugging Face imagefolder with the images,
    /// from the dataset's Parquet parts.
    Export(export::ExportArgs),
    /// Compare exported labels with a hand-labelled gold set: accuracy, kappa, MAE and
    /// quadratic-weighted kappa per field, confusion matrices and every disagreement.
    Eval(eval::EvalArgs),
    /// The dataset's Parquet parts: rebuild those of labels that have none.
    #[command(subcommand)]
    Dataset(dataset_cmd::DatasetCommand),
    /// Write one self-contained HTML page about the labels: counts, a chart per label
    /// field, thumbnails grouped by label, and every failure with its reasons.
    Report {
        #[command(flatten)]
        stack: stack::StackArgs,
        /// Where to write the HTML page.
        #[arg(long, value_name = "FILE")]
        out: PathBuf,
        /// The most thumbnails in the gallery; the rest are counted and left out.
        #[arg(long, value_name = "N", default_value_t = report::DEFAULT_MAX_THUMBNAILS)]
        max_thumbnails: usize,
        /// The task file the labels were made with, for its field values (the built-in
        /// website judgement is always known).
        #[arg(long, env = "SHOTLABEL_TASK")]
        task: Option<PathBuf>,
    },
    /// Inspect and check task files.
    #[command(subcommand)]
    Task(task_cmd::TaskCommand),
    /// Prepare local images and write the request lines the submitter would send.
    Prep {
        /// Image files or folders (searched recursively).
        #[arg(required = true)]
        inputs: Vec<PathBuf>,
        /// Where to write the JSONL request lines.
        #[arg(long)]
        out: PathBuf,
        /// A task file; the built-in website judgement when absent.
        #[arg(long, env = "SHOTLABEL_TASK")]
        task: Option<PathBuf>,
    },
    /// Run the local stack (moto + the batch emulator) on a folder of images.
    Local {
        /// Images to upload to the local bucket.
        #[arg(long, default_value = "tests/data/screenshots")]
        images: PathBuf,
        /// A task file; the built-in website judgement when absent.
        #[arg(long, env = "SHOTLABEL_TASK")]
        task: Option<PathBuf>,
        /// Stay up until interrupted, so more images can be dropped in.
        #[arg(long)]
        keep_running: bool,
        /// Give up when images have no terminal record after this many seconds.
        #[arg(long, default_value_t = 600)]
        timeout: u64,
        /// Where to write the HTML report of the run.
        #[arg(long, default_value = "shotlabel-report.html")]
        report: PathBuf,
    },
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let outcome = match cli.command {
        Command::Backfill(args) => backfill::run(args),
        Command::Status(args) => status::run(args),
        Command::Redrive(args) => redrive::run(args),
        Command::Export(args) => export::run(args),
        Command::Eval(args) => eval::run(args),
        Command::Dataset(command) => dataset_cmd::run(command),
        Command::Report {
            stack,
            out,
            max_thumbnails,
            task,
        } => run_report(&stack, &out, max_thumbnails, task.as_deref()),
        Command::Task(command) => task_cmd::run(command),
        Command::Prep { inputs, out, task } => {
            task_cmd::load_task(task.as_deref()).and_then(|task| prep::run(&inputs, &out, &task))
        }
        Command::Local {
            images,
            task,
            keep_running,
            timeout,
            report,
        } => local::run(local::LocalArgs {
            images: &images,
            task: task.as_deref(),
            keep_running,
            timeout: std::time::Duration::from_secs(timeout),
            report: Some(&report),
        }),
    };
    match outcome {
        Ok(code) => code,
        Err(error) => {
            // One line a person can act on; the chain says why.
            eprintln!("shotlabel: {error:#}");
            ExitCode::FAILURE
        }
    }
}

/// `shotlabel report`: the bucket and input prefix from the stack configuration.
fn run_report(
    stack_args: &stack::StackArgs,
    out: &std::path::Path,
    max_thumbnails: usize,
    task: Option<&std::path::Path>,
) -> anyhow::Result<ExitCode> {
    let mut options = report::ReportOptions {
        max_thumbnails,
        ..report::ReportOptions::default()
    };
    if task.is_some() {
        options.tasks.push(task_cmd::load_task(task)?);
    }
    stack::runtime()?.block_on(async {
        let aws = stack::Aws::connect().await?;
        let config = stack::resolve(stack_args, &aws).await?;
        let bucket = config.bucket()?;
        // A missing bucket or denied access, worded like the other commands.
        stack::Lister::new(&aws, bucket, &config.input_prefix)
            .next_page()
            .await?;
        let store = shotlabel_aws::S3Store::new(aws.s3.clone());
        let summary =
            report::write_report_with(&store, bucket, &config.input_prefix, out, &options)
                .await
                .map_err(|e| {
                    anyhow::anyhow!(
                        "{}",
                        stack::adapter_error(&std::io::Error::other(format!("{e:#}")))
                    )
                })?;
        println!("wrote {}", out.display());
        println!("{summary}");
        Ok(ExitCode::SUCCESS)
    })
}
