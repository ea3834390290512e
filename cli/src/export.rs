//! `shotlabel export`: the labels as a dataset.
//!
//! `--format jsonl` writes `DIR/labels.jsonl`, one line per label record: the label's
//! fields flattened, plus `key`, `etag`, `task_version`, `model` and `batch_id`.
//! `--format imagefolder` writes that file too, and a Hugging Face imagefolder beside it:
//! each labelled image at `DIR/<its key below the input prefix>` and `DIR/metadata.jsonl`
//! with `file_name` and the label's fields as columns (nested values as JSON strings), which
//! `datasets.load_dataset("imagefolder", data_dir=DIR)` loads.
//!
//! Object keys are untrusted: a key whose path would leave DIR (`..` segments, absolute,
//! backslashes, control characters, names over 255 bytes) or collide with the dataset's
//! own files is refused with a warning, and nothing is ever written outside DIR. Images
//! are read at the etag their label was made for, so an image replaced since is not
//! paired with a stale label.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, anyhow};
use futures_util::{StreamExt, TryStreamExt};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde_json::{Map, Value};
use shotlabel_core::records::LabelRecord;

use crate::stack::{Aws, Lister, StackArgs, Subject, one_line, printable, resolve};
use crate::task_cmd::load_task;

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

const LABELS_PREFIX: &str = "labels/";
const LABELS_FILE: &str = "labels.jsonl";
const METADATA_FILE: &str = "metadata.jsonl";
/// Provenance columns every row carries.
const PROVENANCE: [&str; 5] = ["key", "etag", "task_version", "model", "batch_id"];

#[derive(Debug, Default, serde::Serialize)]
struct Summary {
    out: String,
    format: &'static str,
    /// `null` with `--include-stale`.
    task_version: Option<String>,
    /// Rows in labels.jsonl.
    labels: u64,
    /// Images written (imagefolder).
    images: u64,
    /// Labels of another task version, left out.
    stale: u64,
    /// Keys refused for the imagefolder (their path would leave DIR or clash).
    refused: u64,
    /// Labelled images that are gone or changed since they were labelled.
    missing_images: u64,
    /// Label objects that are not label records.
    unreadable: u64,
}

pub fn run(args: ExportArgs) -> anyhow::Result<ExitCode> {
    crate::stack::runtime()?.block_on(export(args))
}

/// What became of one label object.
#[derive(Debug)]
enum Outcome {
    Unreadable(String),
    Stale,
    Exported {
        row: Map<String, Value>,
        /// The image's path below DIR, when written.
        file_name: Option<String>,
        /// Why the image was not written.
        problem: Option<Problem>,
    },
}

#[derive(Debug)]
enum Problem {
    Refused(String),
    Missing(String),
}

async fn export(args: ExportArgs) -> anyhow::Result<ExitCode> {
    let version = match (&args.task_version, args.include_stale) {
        (_, true) => None,
        (Some(version), false) => Some(version.clone()),
        (None, false) => Some(load_task(args.task.as_deref())?.version().to_owned()),
    };
    let aws = Aws::connect().await?;
    let stack = resolve(&args.stack, &aws).await?;
    let bucket = stack.bucket()?.to_owned();
    let images = args.format == Format::Imagefolder;

    let out = args.out.clone();
    std::fs::create_dir_all(&out).with_context(|| format!("cannot create {}", out.display()))?;
    if args.format == Format::Parquet {
        let task = load_task(args.task.as_deref())?;
        let prefix = match &version {
            Some(version) => shotlabel_core::dataset::version_prefix(task.name(), version),
            None => shotlabel_core::dataset::task_prefix(task.name()),
        };
        let mut summary =
            crate::export_parquet::export(&aws, &bucket, &prefix, &out, args.parts).await?;
        summary.task_version = version.clone();
        if args.json {
            println!("{}", serde_json::to_string(&summary)?);
        } else {
            let target = if args.parts {
                out.display().to_string()
            } else {
                out.join(crate::export_parquet::PARQUET_FILE)
                    .display()
                    .to_string()
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
    let mut labels_file = JsonlFile::create(&out, LABELS_FILE)?;
    let mut metadata_file = if images {
        Some(JsonlFile::create(&out, METADATA_FILE)?)
    } else {
        None
    };

    let progress = ProgressBar::with_draw_target(Some(0), ProgressDrawTarget::stderr());
    progress.set_style(
        ProgressStyle::with_template("{spinner} {pos}/{len} labels [{elapsed_precise}] {wide_msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let mut summary = Summary {
        out: out.display().to_string(),
        format: if images { "imagefolder" } else { "jsonl" },
        task_version: version.clone(),
        ..Summary::default()
    };
    let mut lister = Lister::new(&aws, &bucket, LABELS_PREFIX);
    while let Some(page) = lister.next_page().await? {
        let keys: Vec<String> = page
            .into_iter()
            .map(|o| o.key)
            .filter(|k| k.ends_with(".json"))
            .collect();
        progress.inc_length(keys.len() as u64);
        let mut outcomes = futures_util::stream::iter(keys)
            .map(|key| {
                let (aws, bucket, out, version) = (&aws, &bucket, &out, version.as_deref());
                async move {
                    let outcome =
                        export_one(aws, bucket, &key, version, images.then_some(out)).await;
                    outcome.map(|o| (key, o))
                }
            })
            .buffered(usize::from(args.concurrency));
        while let Some((key, outcome)) = outcomes.try_next().await? {
            progress.inc(1);
            match outcome {
                Outcome::Stale => summary.stale += 1,
                Outcome::Unreadable(why) => {
                    summary.unreadable += 1;
                    progress.suspend(|| {
                        eprintln!(
                            "shotlabel: warning: skipped {}: not a label record ({})",
                            printable(&key),
                            one_line(&why)
                        );
                    });
                }
                Outcome::Exported {
                    row,
                    file_name,
                    problem,
                } => {
                    let row_key = row.get("key").and_then(Value::as_str).map(str::to_owned);
                    labels_file.write(&Value::Object(row.clone()))?;
                    summary.labels += 1;
                    if let (Some(metadata), Some(file_name)) = (&mut metadata_file, file_name) {
                        metadata.write(&Value::Object(metadata_row(row, file_name)))?;
                        summary.images += 1;
                    }
                    if let Some(problem) = problem {
                        let image_key = row_key.unwrap_or(key);
                        let (count, text) = match problem {
                            Problem::Refused(why) => (&mut summary.refused, why),
                            Problem::Missing(why) => (&mut summary.missing_images, why),
                        };
                        *count += 1;
                        progress.suspend(|| {
                            eprintln!(
                                "shotlabel: warning: image {} not exported: {text}",
                                printable(&image_key)
                            );
                        });
                    }
                }
            }
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
            "exported {} label(s) (task version {version}) to {}",
            summary.labels,
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
                summary.stale,
                "of other task versions (--include-stale exports them)",
            ),
            (
                summary.refused,
                "refused: their key would leave the folder or clash",
            ),
            (
                summary.missing_images,
                "whose image is gone or changed since labelling",
            ),
            (summary.unreadable, "unreadable label objects"),
        ];
        for (count, what) in skipped {
            if count > 0 {
                println!("skipped {count} {what}");
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Reads one label object and, for an imagefolder (`image_dir`), writes its image.
async fn export_one(
    aws: &Aws,
    bucket: &str,
    label_key: &str,
    version: Option<&str>,
    image_dir: Option<&PathBuf>,
) -> anyhow::Result<Outcome> {
    let Some(body) = get_object(aws, bucket, label_key, None).await? else {
        // Deleted between the listing and now.
        return Ok(Outcome::Unreadable(
            "it was deleted during the export".into(),
        ));
    };
    let record: LabelRecord = match serde_json::from_slice(&body) {
        Ok(record) => record,
        Err(e) => return Ok(Outcome::Unreadable(e.to_string())),
    };
    if version.is_some_and(|v| v != record.task.version) {
        return Ok(Outcome::Stale);
    }
    let row = flat_row(&record);
    let Some(dir) = image_dir else {
        return Ok(Outcome::Exported {
            row,
            file_name: None,
            problem: None,
        });
    };
    // The image's place mirrors its label's: labels/<relative>.json.
    let relative = label_key
        .strip_prefix(LABELS_PREFIX)
        .and_then(|r| r.strip_suffix(".json"))
        .unwrap_or_default();
    if let Err(why) = check_relative(relative) {
        return Ok(Outcome::Exported {
            row,
            file_name: None,
            problem: Some(Problem::Refused(why)),
        });
    }
    let source = &record.source;
    let image = get_object(aws, &source.bucket, &source.key, Some(source)).await;
    let bytes = match image {
        Ok(Some(bytes)) => bytes,
        Ok(None) => {
            return Ok(Outcome::Exported {
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
            return Ok(Outcome::Exported {
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
    let relative_owned = relative.to_owned();
    tokio::task::spawn_blocking(move || write_below(&dir, &relative_owned, &bytes))
        .await
        .map_err(|e| anyhow!("writing an image: {e}"))??;
    Ok(Outcome::Exported {
        row,
        file_name: Some(relative.to_owned()),
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

/// The longest file or folder name most file systems accept (ext4, APFS, NTFS), in bytes.
/// S3 keys may hold longer segments; writing one would fail the whole export.
const MAX_NAME_BYTES: usize = 255;

/// Why a key's path below DIR is refused, if it is.
fn check_relative(relative: &str) -> Result<(), String> {
    if relative.is_empty() {
        return Err("its path is empty".into());
    }
    if relative.starts_with('/') {
        return Err("its path is absolute".into());
    }
    if relative.contains('\\') {
        return Err("its path contains a backslash".into());
    }
    if relative.chars().any(char::is_control) {
        return Err("its path contains a control character".into());
    }
    if relative.contains("://") {
        return Err("its path looks like a URL".into());
    }
    let segments: Vec<&str> = relative.split('/').collect();
    for segment in &segments {
        match *segment {
            "" => return Err("its path has an empty segment".into()),
            "." | ".." => return Err(format!("its path has a `{segment}` segment")),
            _ if segment.len() > MAX_NAME_BYTES => {
                return Err(format!(
                    "its path has a name longer than {MAX_NAME_BYTES} bytes"
                ));
            }
            _ => {}
        }
    }
    let last = segments.last().copied().unwrap_or_default();
    let metadata_like = last
        .strip_prefix("metadata.")
        .is_some_and(|ext| matches!(ext, "jsonl" | "json" | "csv" | "parquet"));
    if metadata_like || (segments.len() == 1 && last == LABELS_FILE) {
        return Err(format!("its name {last} is one of the dataset's own files"));
    }
    Ok(())
}

/// Writes `bytes` to `dir/relative` (already checked) and nowhere else: every folder on
/// the way is created here or must be a real folder (never a symlink), and the file is
/// renamed into place, which replaces a symlink rather than following it.
fn write_below(dir: &Path, relative: &str, bytes: &[u8]) -> anyhow::Result<()> {
    let mut parent = dir.to_path_buf();
    let segments: Vec<&str> = relative.split('/').collect();
    let (file_name, folders) = segments.split_last().ok_or_else(|| anyhow!("empty path"))?;
    for folder in folders {
        parent.push(folder);
        match std::fs::symlink_metadata(&parent) {
            Ok(meta) if meta.is_dir() => {}
            Ok(_) => {
                return Err(anyhow!(
                    "{} is in the way (not a folder; symlinks are not followed)",
                    printable(&parent.display().to_string())
                ));
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                std::fs::create_dir(&parent).with_context(|| {
                    format!("cannot create {}", printable(&parent.display().to_string()))
                })?;
            }
            Err(e) => {
                return Err(anyhow!(
                    "cannot inspect {}: {e}",
                    printable(&parent.display().to_string())
                ));
            }
        }
    }
    let target = parent.join(file_name);
    let mut temp = tempfile::Builder::new()
        .prefix(".shotlabel-")
        .tempfile_in(&parent)
        .with_context(|| format!("cannot write in {}", parent.display()))?;
    temp.write_all(bytes)
        .and_then(|()| temp.flush())
        .with_context(|| format!("cannot write {}", printable(&target.display().to_string())))?;
    temp.persist(&target).map_err(|e| {
        anyhow!(
            "cannot write {}: {}",
            printable(&target.display().to_string()),
            e.error
        )
    })?;
    Ok(())
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
    for (name, value) in PROVENANCE.into_iter().zip(provenance) {
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

/// A JSONL file written to a temporary name in its folder and renamed into place when
/// complete, so a failed export leaves no half file (and a symlink there is replaced, not
/// followed).
struct JsonlFile {
    path: PathBuf,
    writer: std::io::BufWriter<tempfile::NamedTempFile>,
}

impl std::fmt::Debug for JsonlFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JsonlFile")
            .field("path", &self.path)
            .finish()
    }
}

impl JsonlFile {
    fn create(dir: &Path, name: &str) -> anyhow::Result<Self> {
        let temp = tempfile::Builder::new()
            .prefix(".shotlabel-")
            .tempfile_in(dir)
            .with_context(|| format!("cannot write in {}", dir.display()))?;
        Ok(Self {
            path: dir.join(name),
            writer: std::io::BufWriter::new(temp),
        })
    }

    fn write(&mut self, row: &Value) -> anyhow::Result<()> {
        serde_json::to_writer(&mut self.writer, row)?;
        self.writer
            .write_all(b"\n")
            .with_context(|| format!("cannot write {}", self.path.display()))
    }

    fn finish(self) -> anyhow::Result<()> {
        let path = self.path;
        let temp = self
            .writer
            .into_inner()
            .map_err(|e| anyhow!("cannot write {}: {}", path.display(), e.error()))?;
        temp.persist(&path)
            .map_err(|e| anyhow!("cannot write {}: {}", path.display(), e.error))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_that_would_leave_the_folder_are_refused() {
        for bad in [
            "../escape.png",
            "a/../../x.png",
            "a/./x.png",
            "/etc/passwd",
            "a//b.png",
            "a\\..\\b.png",
            "a\u{0}b.png",
            "a\nb.png",
            "x/",
            "",
            "..",
            "metadata.jsonl",
            "sub/metadata.csv",
            "labels.jsonl",
            "file://etc/passwd",
            "n".repeat(256).as_str(),
            format!("sub/{}.png", "n".repeat(300)).as_str(),
        ] {
            assert!(check_relative(bad).is_err(), "{bad:?} should be refused");
        }
        for good in [
            "a.png",
            "2024/01/shot 1.png",
            "..hidden.png",
            "a..b/c.png",
            "sub/labels.jsonl",
        ] {
            assert!(check_relative(good).is_ok(), "{good:?} should be accepted");
        }
    }

    #[test]
    fn writes_stay_below_the_folder_and_do_not_follow_symlinks() -> anyhow::Result<()> {
        let root = tempfile::tempdir()?;
        let dir = root.path().join("out");
        std::fs::create_dir(&dir)?;
        write_below(&dir, "a/b/c.png", b"png")?;
        assert_eq!(std::fs::read(dir.join("a/b/c.png"))?, b"png");

        let elsewhere = root.path().join("elsewhere");
        std::fs::create_dir(&elsewhere)?;
        #[cfg(unix)]
        {
            std::os::unix::fs::symlink(&elsewhere, dir.join("link"))?;
            assert!(write_below(&dir, "link/x.png", b"png").is_err());
            std::os::unix::fs::symlink(elsewhere.join("target.png"), dir.join("file.png"))?;
            write_below(&dir, "file.png", b"new")?;
            assert!(!elsewhere.join("target.png").exists());
            assert!(
                !std::fs::symlink_metadata(dir.join("file.png"))?
                    .file_type()
                    .is_symlink()
            );
        }
        assert_eq!(std::fs::read_dir(&elsewhere)?.count(), 0);
        Ok(())
    }

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
