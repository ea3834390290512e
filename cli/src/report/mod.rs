//! `shotlabel report`: one self-contained HTML page about what a bucket holds.
//!
//! Reads every label from the dataset's Parquet parts (`dataset/`, one GET per harvest
//! rather than one per label), every failed record (`failed/`) and batch state record
//! (`state/batches/`), and writes a single HTML file that references nothing outside
//! itself: the counts, one bar chart per scalar label field (inline SVG, no JavaScript),
//! a gallery of thumbnails (JPEG `data:` URIs) grouped by label, and the failures with
//! every attempt's reason.
//!
//! Nothing here knows a particular task: which fields are charted and how the gallery is
//! grouped follows from the label values (and the task's schema when the task is known).
//! Everything that came from the bucket (keys, reasons, label values, even field names)
//! is untrusted; the page template escapes it.
//!
//! The steps, one file each: [`gather`] reads the bucket, [`analysis`] counts and
//! groups, [`thumbnails`] makes the gallery's images through
//! [`shotlabel_core::prepare`], and [`page`] renders the HTML.

mod analysis;
mod gather;
mod page;
mod thumbnails;

use std::fmt::{self, Display};
use std::path::Path;

use anyhow::Context;
use shotlabel_core::ports::ObjectStore;
use shotlabel_core::task::Task;

/// The `model` the bundled batch emulator writes into its answers
/// (`batch_emulator::EMULATOR_MODEL`).
pub const EMULATOR_MODEL: &str = "shotlabel-batch-emulator";

/// How many thumbnails a report shows unless told otherwise.
pub const DEFAULT_MAX_THUMBNAILS: usize = 500;

/// What a report shows and how much.
#[derive(Debug, Clone)]
pub struct ReportOptions {
    /// The most thumbnails in the gallery; the rest are counted and left out.
    pub max_thumbnails: usize,
    /// Tasks whose schemas say which values a field can take (e.g. aesthetic 1 to 5, so
    /// an empty score still gets its bar), matched to labels by task name.
    pub tasks: Vec<Task>,
}

impl Default for ReportOptions {
    fn default() -> Self {
        Self {
            max_thumbnails: DEFAULT_MAX_THUMBNAILS,
            tasks: Task::default_task().into_iter().collect(),
        }
    }
}

/// What a report counted.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReportSummary {
    /// Objects under the input prefix.
    pub images: usize,
    pub labelled: usize,
    pub failed: usize,
    /// Inputs with neither a label nor a failed record yet.
    pub in_progress: usize,
    pub batches: usize,
    /// Items sent round again, summed over harvested batches.
    pub retried: u64,
    pub duplicates: u64,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    /// Labels written by the batch emulator (synthetic values).
    pub emulator_labels: usize,
    /// Thumbnails shown as images.
    pub images_shown: usize,
    /// Gallery entries whose source could not be read or decoded (shown as a box).
    pub placeholders: usize,
    /// Labelled images left out of the gallery by the thumbnail cap.
    pub left_out: usize,
    /// Parts under `dataset/`, or records under `failed/` or `state/batches/`, that could
    /// not be read.
    pub unreadable_records: usize,
}

impl Display for ReportSummary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} images, {} labelled, {} failed, {} in progress; {} batches, {} retried, \
             {} duplicates, {} prompt + {} completion tokens; gallery: {} thumbnails, {} without \
             one, {} left out",
            self.images,
            self.labelled,
            self.failed,
            self.in_progress,
            self.batches,
            self.retried,
            self.duplicates,
            self.prompt_tokens,
            self.completion_tokens,
            self.images_shown,
            self.placeholders,
            self.left_out
        )?;
        if self.emulator_labels > 0 {
            write!(f, "; {} synthetic emulator labels", self.emulator_labels)?;
        }
        if self.unreadable_records > 0 {
            write!(f, "; {} unreadable records", self.unreadable_records)?;
        }
        Ok(())
    }
}

/// Writes one self-contained HTML page about the labels in a bucket and returns what it
/// counted.
pub async fn write_report<S: ObjectStore>(
    store: &S,
    bucket: &str,
    input_prefix: &str,
    out: &Path,
) -> anyhow::Result<ReportSummary> {
    write_report_with(store, bucket, input_prefix, out, &ReportOptions::default()).await
}

/// [`write_report`] with explicit options.
pub async fn write_report_with<S: ObjectStore>(
    store: &S,
    bucket: &str,
    input_prefix: &str,
    out: &Path,
    options: &ReportOptions,
) -> anyhow::Result<ReportSummary> {
    let data = gather::gather(store, bucket, input_prefix, &options.tasks).await?;
    let tasks = analysis::analyse_tasks(&data.labels, &options.tasks);
    let chosen = analysis::choose_thumbnails(&tasks, options.max_thumbnails);
    let thumbnails = thumbnails::fetch_thumbnails(store, &data.labels, &chosen).await;

    let mut summary = analysis::summarise(&data, input_prefix);
    summary.images_shown = thumbnails.values().filter(|t| t.is_image()).count();
    summary.placeholders = thumbnails.len() - summary.images_shown;
    summary.left_out = data.labels.len() - thumbnails.len();

    let html = page::Page {
        bucket,
        input_prefix,
        data: &data,
        tasks: &tasks,
        thumbnails: &thumbnails,
        summary: &summary,
        max_thumbnails: options.max_thumbnails,
    }
    .render();
    tokio::fs::write(out, html)
        .await
        .with_context(|| format!("cannot write {}", out.display()))?;
    Ok(summary)
}
