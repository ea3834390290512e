//! `shotlabel-bench`: the benchmarks behind docs/benchmarks.md and docs/scale.md. Each subcommand prints
//! its figures as Markdown table rows, with the machine and its load.
//!
//! Run them from a release build:
//! `cargo build --release -p shotlabel-cli -p shotlabel-bench`, then
//! `target/release/shotlabel-bench <command>` (`make bench` runs the quick versions).

mod common;
mod e2e;
mod export;
mod harvest;
mod prep;
mod scale;
mod scale_harvest;
mod stack;
mod submit;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "shotlabel-bench",
    about = "shotlabel's benchmarks (docs/benchmarks.md)"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// `shotlabel prep` vs the original notebook's PIL path vs decode only, on the same
    /// screenshots in the same run; bytes per request line.
    PrepVsNotebook(prep::PrepArgs),
    /// Where preparation's time goes, stage by stage, before and after the optimisations.
    ProfilePrep(prep::ProfileArgs),
    /// PSNR of the JPEG the model is sent against an exact 896-px resize.
    Psnr(prep::PsnrArgs),
    /// Peak RSS of one submitter run over N queued images (moto + the emulator).
    SubmitMemory(submit::SubmitArgs),
    /// Harvest of an N-line output file: parse + validate alone, then end to end against
    /// moto with the label writes.
    Harvest(harvest::HarvestArgs),
    /// N screenshots through the whole local pipeline, upload to labels, with where the
    /// time goes.
    E2e(e2e::E2eArgs),
    /// N generated images through the local pipeline with 1, 2, … submit workers: images/s,
    /// images per worker-second, requests per image by kind, busy seconds per function.
    ScaleSubmit(scale::ScaleSubmitArgs),
    /// One batch of N answers harvested whole, then by 2 and 4 shards at once (moto).
    ScaleHarvest(scale_harvest::ScaleHarvestArgs),
    /// `shotlabel export` of N labels from the dataset parts, against a build from before
    /// the dataset (which listed `labels/`): wall time and requests by kind.
    Export(export::ExportArgs),
    /// The submitter run `submit-memory` measures (internal).
    #[command(hide = true)]
    SubmitChild(submit::SubmitChildArgs),
    /// The harvest `harvest` measures end to end (internal).
    #[command(hide = true)]
    HarvestChild(harvest::HarvestChildArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match &cli.command {
        Command::PrepVsNotebook(args) => prep::prep_vs_notebook(args),
        Command::ProfilePrep(args) => prep::profile(args),
        Command::Psnr(args) => prep::psnr_report(args),
        command => tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .map_err(anyhow::Error::from)
            .and_then(|runtime| {
                runtime.block_on(async {
                    match command {
                        Command::SubmitMemory(args) => submit::submit_memory(args).await,
                        Command::SubmitChild(args) => submit::submit_child(args).await,
                        Command::Harvest(args) => harvest::harvest_bench(args).await,
                        Command::HarvestChild(args) => harvest::harvest_child(args).await,
                        Command::E2e(args) => e2e::e2e(args).await,
                        Command::ScaleSubmit(args) => scale::scale_submit(args).await,
                        Command::ScaleHarvest(args) => scale_harvest::scale_harvest(args).await,
                        Command::Export(args) => export::export_bench(args).await,
                        _ => Ok(()),
                    }
                })
            }),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("shotlabel-bench: {e:#}");
            ExitCode::FAILURE
        }
    }
}
