//! `shotlabel export`: the labels as a dataset, read from the dataset's Parquet parts
//! (`dataset/task=…/version=…/batch=…/part-n.parquet`, [`parts`]), never by listing
//! `labels/`.
//!
//! `--format jsonl` writes `DIR/labels.jsonl`, one line per labelled image: the label's
//! fields flattened, plus `key`, `etag`, `task_version`, `model` and `batch_id`.
//! `--format imagefolder` writes that file too, and a Hugging Face imagefolder beside it:
//! each labelled image at `DIR/<its key below the input prefix>` and `DIR/metadata.jsonl`
//! with `file_name` and the label's fields as columns (nested values as JSON strings), which
//! `datasets.load_dataset("imagefolder", data_dir=DIR)` loads. `--format parquet` writes
//! `DIR/labels.parquet` (or, with `--parts`, the parts themselves; [`parquet`]).
//!
//! Object keys are untrusted: a key whose path would leave DIR (`..` segments, absolute,
//! backslashes, control characters, names over 255 bytes) or collide with the dataset's
//! own files is refused with a warning, and nothing is ever written outside DIR. Images
//! are read at the etag their label was made for, so an image replaced since is not
//! paired with a stale label.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, anyhow};
use futures_util::{StreamExt, TryStreamExt};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde_json::{Map, Value};
use shotlabel_core::dataset;
use shotlabel_core::records::{LabelRecord, Layout};

use crate::stack::{Aws, StackArgs, Subject, one_line, printable, resolve};
use crate::task_cmd::load_task;

mod files;
pub mod parts;
pub mod to_parquet;

use files::{JsonlFile, check_relative, write_below};

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// DIR/labels.jsonl
    Jsonl,
    /// DIR/labels.jsonl, the images, and DIR/metadata.jsonl (Hugging Face imagefolder)
    Imagefolder,
    /// DIR/labels.parquet, from the dataset parts (with --parts: the parts themselves)
    Parquet,
}

#[derive(Debug, clap::Args)]
pub struct ExportArgs {
    #[command(flatten)]
    pub stack: StackArgs,
    /// The folder to write; created if missing.
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,
    #[arg(long, value_enum, default_value_t = Format::Jsonl)]
    pub format: Format,
    /// The task whose current version is exported; the built-in website judgement when
    /// absent.
    #[arg(long, env = "SHOTLABEL_TASK")]
    pub task: Option<PathBuf>,
    /// Export labels made under this task version instead of the task's current one.
    #[arg(long, value_name = "HASH", conflicts_with = "include_stale")]
    pub task_version: Option<String>,
    /// Export labels of every task version.
    #[arg(long)]
    pub include_stale: bool,
    /// Downloads in flight at once.
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u16).range(1..=256))]
    pub concurrency: u16,
    /// With --format parquet: copy the dataset's parts below DIR (task=…/version=…/batch=…/)
    /// instead of writing one file.
    #[arg(long)]
    pub parts: bool,
    /// Print the summary as JSON.
    #[arg(long)]
    pub json: bool,
}

const LABELS_FILE: &str = "labels.jsonl";
const METADATA_FILE: &str = "metadata.jsonl";

#[derive(Debug, Default, serde::Serialize)]
struct Summary {
    out: String,
    format: &'static str,
    /// `null` with `--include-stale`.
    task_version: Option<String>,
    /// Dataset parts read.
    parts: u64,
    /// Rows in labels.jsonl.
    labels: u64,
    /// Images written (imagefolder).
    images: u64,
    /// Older rows of images relabelled in a later batch, left out.
    replaced: u64,
    /// Keys refused for the imagefolder (their path would leave DIR or clash).
    refused: u64,
    /// Labelled images that are gone or changed since they were labelled.
    missing_images: u64,
    /// Parts that could not be read.
    unreadable: u64,
}

pub fn run(args: ExportArgs) -> anyhow::Result<ExitCode> {
    crate::stack::runtime()?.block_on(export(args))
}

/// What became of one row.
#[derive(Debug)]
struct Exported {
    row: Map<String, Value>,
    /// The image's path below DIR, when written.
    file_name: Option<String>,
    /// Why the image was not written.
    problem: Option<Problem>,
}

#[derive(Debug)]
enum Problem {
    Refused(String),
    Missing(String),
}

async fn export(args: ExportArgs) -> anyhow::Result<ExitCode> {
    let task = load_task(args.task.as_deref())?;
    let version = match (&args.task_version, args.include_stale) {
        (_, true) => None,
        (Some(version), false) => Some(version.clone()),
        (None, false) => Some(task.version().to_owned()),
    };
    let prefix = match &version {
        Some(version) => dataset::version_prefix(task.name(), version),
        None => dataset::task_prefix(task.name()),
    };
    let aws = Aws::connect().await?;
    let stack = resolve(&args.stack, &aws).await?;
    let bucket = stack.bucket()?.to_owned();
    let layout = stack.layout();
    let images = args.format == Format::Imagefolder;

    let out = args.out.clone();
    std::fs::create_dir_all(&out).with_context(|| format!("cannot create {}", out.display()))?;
    if args.format == Format::Parquet {
        let mut summary = to_parquet::export(&aws, &bucket, &prefix, &out, args.parts).await?;
        summary.task_version = version.clone();
        if args.json {
            println!("{}", serde_json::to_string(&summary)?);
        } else {
            let target = if args.parts {
                out.display().to_string()
            } else {
                out.join(to_parquet::PARQUET_FILE).display().to_string()
            };
            println!(
                "exported {} label(s) from {} dataset part(s) (task version {}) to {target}",
                summary.labels,
                summary.parts,
                version.as_deref().unwrap_or("any")
            );
        }
        return Ok(ExitCode::SUCCESS);
    }

    let read = parts::read_rows(&aws, &bucket, &prefix, &task).await?;
    for (key, why) in &read.unreadable {
        eprintln!(
            "shotlabel: warning: skipped dataset part {}: {}",
            printable(key),
            one_line(why)
        );
    }
    let mut labels_file = JsonlFile::create(&out, LABELS_FILE)?;
    let mut metadata_file = if images {
        Some(JsonlFile::create(&out, METADATA_FILE)?)
    } else {
        None
    };
    let progress =
        ProgressBar::with_draw_target(Some(read.rows.len() as u64), ProgressDrawTarget::stderr());
    progress.set_style(
        ProgressStyle::with_template("{spinner} {pos}/{len} labels [{elapsed_precise}] {wide_msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let mut summary = Summary {
        out: out.display().to_string(),
        format: if images { "imagefolder" } else { "jsonl" },
        task_version: version.clone(),
        parts: read.parts,
        replaced: read.replaced,
        unreadable: read.unreadable.len() as u64,
        ..Summary::default()
    };
    let mut outcomes = futures_util::stream::iter(read.rows)
        .map(|row| {
            let (aws, out, layout) = (&aws, &out, &layout);
            async move { export_row(aws, row, layout, images.then_some(out)).await }
        })
        .buffered(usize::from(args.concurrency));
    while let Some(exported) = outcomes.try_next().await? {
        progress.inc(1);
        let Exported {
            row,
            file_name,
            problem,
        } = exported;
        let row_key = row
            .get("key")
            .and_then(Value::as_str)
            .map(str::to_owned)
            .unwrap_or_default();
        labels_file.write(&Value::Object(row.clone()))?;
        summary.labels += 1;
        if let (Some(metadata), Some(file_name)) = (&mut metadata_file, file_name) {
            metadata.write(&Value::Object(metadata_row(row, file_name)))?;
            summary.images += 1;
        }
        if let Some(problem) = problem {
            let (count, text) = match problem {
                Problem::Refused(why) => (&mut summary.refused, why),
                Problem::Missing(why) => (&mut summary.missing_images, why),
            };
            *count += 1;
            progress.suspend(|| {
                eprintln!(
                    "shotlabel: warning: image {} not exported: {text}",
                    printable(&row_key)
                );
            });
        }
    }
    progress.finish_and_clear();
    labels_file.finish()?;
    if let Some(metadata) = metadata_file {
        metadata.finish()?;
    }

    if args.json {
        println!("{}", serde_json::to_string(&summary)?);
    } else {
        let version = version.as_deref().unwrap_or("any");
        let mut line = format!(
            "exported {} label(s) (task version {version}) from {} dataset part(s) to {}",
            summary.labels,
            summary.parts,
            out.join(LABELS_FILE).display()
        );
        if images {
            line.push_str(&format!(
                ", {} image(s) with {}",
                summary.images,
                out.join(METADATA_FILE).display()
            ));
        }
        println!("{line}");
        let skipped = [
            (
                summary.replaced,
                "older rows of images relabelled in a later batch",
            ),
            (
                summary.refused,
                "refused: their key would leave the folder or clash",
            ),
            (
                summary.missing_images,
                "whose image is gone or changed since labelling",
            ),
            (summary.unreadable, "unreadable dataset parts"),
        ];
        for (count, what) in skipped {
            if count > 0 {
                println!("skipped {count} {what}");
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// One row for labels.jsonl and, for an imagefolder (`image_dir`), its image written.
async fn export_row(
    aws: &Aws,
    record: LabelRecord,
    layout: &Layout,
    image_dir: Option<&PathBuf>,
) -> anyhow::Result<Exported> {
    let row = flat_row(&record);
    let Some(dir) = image_dir else {
        return Ok(Exported {
            row,
            file_name: None,
            problem: None,
        });
    };
    // The image's place mirrors its key below the input prefix.
    let source = &record.source;
    let relative = layout.relative_or_key(&source.key).to_owned();
    if let Err(why) = check_relative(&relative) {
        return Ok(Exported {
            row,
            file_name: None,
            problem: Some(Problem::Refused(why)),
        });
    }
    let image = get_object(aws, &source.bucket, &source.key, Some(source)).await;
    let bytes = match image {
        Ok(Some(bytes)) => bytes,
        Ok(None) => {
            return Ok(Exported {
                row,
                file_name: None,
                problem: Some(Problem::Missing(format!(
                    "s3://{}/{} is gone",
                    source.bucket,
                    printable(&source.key)
                ))),
            });
        }
        Err(GetError::Changed) => {
            return Ok(Exported {
                row,
                file_name: None,
                problem: Some(Problem::Missing(format!(
                    "s3://{}/{} changed since it was labelled",
                    source.bucket,
                    printable(&source.key)
                ))),
            });
        }
        Err(GetError::Other(e)) => return Err(e),
    };
    let dir = dir.clone();
    let relative_owned = relative.clone();
    tokio::task::spawn_blocking(move || write_below(&dir, &relative_owned, &bytes))
        .await
        .map_err(|e| anyhow!("writing an image: {e}"))??;
    Ok(Exported {
        row,
        file_name: Some(relative),
        problem: None,
    })
}

#[derive(Debug)]
enum GetError {
    /// The object is no longer at the etag asked for.
    Changed,
    Other(anyhow::Error),
}

impl From<anyhow::Error> for GetError {
    fn from(error: anyhow::Error) -> Self {
        Self::Other(error)
    }
}

impl From<GetError> for anyhow::Error {
    fn from(error: GetError) -> Self {
        match error {
            GetError::Changed => anyhow!("the object changed"),
            GetError::Other(e) => e,
        }
    }
}

/// An object's bytes, `None` when there is no such key. With `at`, only the content of
/// that etag (and version).
async fn get_object(
    aws: &Aws,
    bucket: &str,
    key: &str,
    at: Option<&shotlabel_core::records::SourceRef>,
) -> Result<Option<Vec<u8>>, GetError> {
    let mut request = aws.s3.get_object().bucket(bucket).key(key);
    if let Some(source) = at {
        if !source.etag.is_empty() {
            request = request.if_match(format!("\"{}\"", source.etag));
        }
        request = request.set_version_id(source.version_id.clone());
    }
    match request.send().await {
        Ok(object) => {
            let bytes = object.body.collect().await.map_err(|e| {
                anyhow!(
                    "reading s3://{bucket}/{}: {}",
                    printable(key),
                    one_line(&e.to_string())
                )
            })?;
            Ok(Some(bytes.into_bytes().to_vec()))
        }
        Err(e) if e.as_service_error().is_some_and(|s| s.is_no_such_key()) => Ok(None),
        Err(e) if e.raw_response().map(|r| r.status().as_u16()) == Some(412) => {
            Err(GetError::Changed)
        }
        Err(e) => Err(GetError::Other(aws.error(
            &format!("reading s3://{bucket}/{}", printable(key)),
            Subject::Bucket(bucket),
            e,
        ))),
    }
}

/// A labels.jsonl row: the label's fields, then the provenance columns. A label field
/// that shares a provenance column's name is kept as `label_<name>`.
fn flat_row(record: &LabelRecord) -> Map<String, Value> {
    let mut row = match &record.label {
        Value::Object(fields) => fields.clone(),
        other => Map::from_iter([("label".to_owned(), other.clone())]),
    };
    let provenance = [
        record.source.key.clone(),
        record.source.etag.clone(),
        record.task.version.clone(),
        record.model.clone(),
        record.provenance.batch_id.clone(),
    ];
    for (name, value) in dataset::EXPORT_PROVENANCE.into_iter().zip(provenance) {
        if let Some(clash) = row.remove(name) {
            row.insert(format!("label_{name}"), clash);
        }
        row.insert(name.to_owned(), Value::String(value));
    }
    row
}

/// A metadata.jsonl row: `file_name`, scalar columns as they are, nested values as JSON
/// strings. Columns the imagefolder loader would take for file references (`file_name`,
/// `*_file_name`, `*_file_names`) are renamed with a `_value` suffix.
fn metadata_row(row: Map<String, Value>, file_name: String) -> Map<String, Value> {
    let mut out = Map::new();
    out.insert("file_name".to_owned(), Value::String(file_name));
    for (name, value) in row {
        let value = match value {
            Value::Array(_) | Value::Object(_) => Value::String(value.to_string()),
            scalar => scalar,
        };
        let name = if name.ends_with("file_name") || name.ends_with("file_names") {
            format!("{name}_value")
        } else {
            name
        };
        out.insert(name, value);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_flatten_the_label_and_keep_provenance() {
        let record: LabelRecord = serde_json::from_value(serde_json::json!({
            "status": "labelled",
            "label": {"landing_page": true, "aesthetic": 4, "tags": ["a", "b"], "model": "mine", "hero_file_name": "x"},
            "source": {"bucket": "b", "key": "incoming/a.png", "etag": "e1", "size": 3},
            "task": {"name": "t", "version": "v1"},
            "model": "m",
            "provenance": {"batch_id": "batch_1", "custom_id": "c"},
            "attempt": 0,
            "labelled_at": 1
        }))
        .unwrap_or_else(|e| panic!("{e}"));
        let row = flat_row(&record);
        assert_eq!(row["landing_page"], true);
        assert_eq!(row["model"], "m");
        assert_eq!(row["label_model"], "mine");
        assert_eq!(row["key"], "incoming/a.png");
        assert_eq!(row["batch_id"], "batch_1");
        let meta = metadata_row(row, "a.png".into());
        assert_eq!(meta["file_name"], "a.png");
        assert_eq!(meta["tags"], r#"["a","b"]"#);
        assert_eq!(meta["aesthetic"], 4);
        assert_eq!(meta["hero_file_name_value"], "x");
        assert!(!meta.contains_key("hero_file_name"));
    }
}
