//! `shotlabel task …`: show and check task files.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::Subcommand;
use shotlabel_core::task::Task;

#[derive(Debug, Subcommand)]
pub enum TaskCommand {
    /// Print a task (the built-in default when no file is given) with its version hash.
    Show {
        /// A task file (.toml or .json).
        #[arg(long, env = "SHOTLABEL_TASK")]
        task: Option<PathBuf>,
        /// Print the request body one image would be sent with, instead of a summary.
        #[arg(long)]
        request: bool,
    },
    /// Validate task files; exits non-zero if any is invalid.
    Check {
        #[arg(required = true)]
        files: Vec<PathBuf>,
    },
}

/// Loads `path`, or the built-in default task when there is none.
pub fn load_task(path: Option<&Path>) -> anyhow::Result<Task> {
    Ok(match path {
        Some(path) => Task::from_path(path)?,
        None => Task::default_task()?,
    })
}

pub fn run(command: TaskCommand) -> anyhow::Result<ExitCode> {
    match command {
        TaskCommand::Show { task, request } => {
            let task = load_task(task.as_deref())?;
            if request {
                let body = task.chat_completion_body("data:image/jpeg;base64,<image>");
                println!("{}", serde_json::to_string_pretty(&body)?);
                return Ok(ExitCode::SUCCESS);
            }
            let spec = task.spec();
            println!("task:        {}", task.name());
            println!("version:     {}", task.version());
            if let Some(description) = &spec.description {
                println!("description: {description}");
            }
            println!("model:       {}", spec.model);
            println!(
                "sampling:    temperature {}, max_tokens {}",
                spec.temperature, spec.max_tokens
            );
            println!(
                "images:      longest side {} px, JPEG quality {}",
                spec.image.max_side, spec.image.jpeg_quality
            );
            println!("user text:   {}", spec.user_text);
            println!(
                "schema ({}):\n{}",
                spec.response_schema.name,
                serde_json::to_string_pretty(&spec.response_schema.schema)?
            );
            Ok(ExitCode::SUCCESS)
        }
        TaskCommand::Check { files } => {
            let mut failed = 0;
            for file in &files {
                match Task::from_path(file) {
                    Ok(task) => println!(
                        "ok      {}  {} (version {})",
                        file.display(),
                        task.name(),
                        task.version()
                    ),
                    Err(e) => {
                        failed += 1;
                        println!("invalid {}  {e}", file.display());
                    }
                }
            }
            Ok(if failed == 0 {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
    }
}
