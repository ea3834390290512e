//! `shotlabel`: the operator CLI.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod local;
mod prep;
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
        Command::Task(command) => task_cmd::run(command),
        Command::Prep { inputs, out, task } => {
            task_cmd::load_task(task.as_deref()).and_then(|task| prep::run(&inputs, &out, &task))
        }
        Command::Local {
            images,
            task,
            keep_running,
        } => local::run(&images, task.as_deref(), keep_running),
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
