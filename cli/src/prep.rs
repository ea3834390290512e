//! `shotlabel prep`: prepare local images and write the request lines the submitter
//! would send, to preview size and cost (and to measure preparation speed).

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;
use std::time::Instant;

use anyhow::Context;
use shotlabel_core::prepare::{DecodeLimits, prepare_jpeg};
use shotlabel_core::request::{custom_id, request_line_with_jpeg};
use shotlabel_core::task::Task;

/// The submission id prep's lines carry; the submitter uses a fresh one per submission.
const PREP_SUBMISSION: &str = "prep";

/// Every file under the given folders (recursively) and the given files, sorted.
fn collect_inputs(inputs: &[PathBuf]) -> anyhow::Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    let mut stack: Vec<PathBuf> = Vec::new();
    for input in inputs {
        let meta =
            std::fs::metadata(input).with_context(|| format!("cannot read {}", input.display()))?;
        if meta.is_dir() {
            stack.push(input.clone());
        } else {
            files.push(input.clone());
        }
    }
    while let Some(dir) = stack.pop() {
        for entry in
            std::fs::read_dir(&dir).with_context(|| format!("cannot read {}", dir.display()))?
        {
            let path = entry?.path();
            if path.is_dir() {
                stack.push(path);
            } else if path.is_file() {
                files.push(path);
            }
        }
    }
    files.sort();
    anyhow::ensure!(!files.is_empty(), "no files to prepare");
    Ok(files)
}

/// What preparing one input gave: its request line, or why there is none.
type Outcome = Result<Vec<u8>, String>;

pub fn run(inputs: &[PathBuf], out: &Path, task: &Task) -> anyhow::Result<ExitCode> {
    let started = Instant::now();
    let files = collect_inputs(inputs)?;
    let output =
        std::fs::File::create(out).with_context(|| format!("cannot create {}", out.display()))?;
    let mut output = std::io::BufWriter::with_capacity(1 << 20, output);
    let workers = std::thread::available_parallelism().map_or(2, |n| n.get());
    let limits = DecodeLimits::default();
    let next = AtomicUsize::new(0);
    // Bounded, so finished lines wait for the writer instead of piling up in memory.
    let (sender, receiver) = mpsc::sync_channel::<(usize, Outcome)>(workers * 2);

    let mut lines = 0usize;
    let mut bytes = 0u64;
    let mut failed = 0usize;
    std::thread::scope(|scope| -> anyhow::Result<()> {
        for _ in 0..workers {
            let sender = sender.clone();
            let (files, next, limits) = (&files, &next, &limits);
            scope.spawn(move || {
                loop {
                    let index = next.fetch_add(1, Ordering::Relaxed);
                    let Some(path) = files.get(index) else { break };
                    let outcome = std::fs::read(path)
                        .map_err(|e| format!("cannot read: {e}"))
                        .and_then(|data| {
                            prepare_jpeg(&data, task.image(), limits).map_err(|e| e.to_string())
                        })
                        .map(|prepared| {
                            request_line_with_jpeg(
                                &custom_id(PREP_SUBMISSION, index),
                                task,
                                &prepared.jpeg,
                            )
                        });
                    if sender.send((index, outcome)).is_err() {
                        break;
                    }
                }
            });
        }
        drop(sender);
        // Lines are written in input order, whatever order the workers finish in.
        let mut pending: BTreeMap<usize, Outcome> = BTreeMap::new();
        let mut next_to_write = 0;
        for (index, outcome) in receiver {
            pending.insert(index, outcome);
            while let Some(outcome) = pending.remove(&next_to_write) {
                match outcome {
                    Ok(line) => {
                        output.write_all(&line)?;
                        output.write_all(b"\n")?;
                        lines += 1;
                        bytes += line.len() as u64 + 1;
                    }
                    Err(reason) => {
                        failed += 1;
                        eprintln!("failed {}: {reason}", files[next_to_write].display());
                    }
                }
                next_to_write += 1;
            }
        }
        Ok(())
    })?;
    output
        .flush()
        .with_context(|| format!("cannot write {}", out.display()))?;
    println!(
        "images {} lines {lines} bytes {bytes} failed {failed} seconds {:.3}",
        files.len(),
        started.elapsed().as_secs_f64()
    );
    Ok(ExitCode::SUCCESS)
}
