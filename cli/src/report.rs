//! `shotlabel report`: one self-contained HTML page about what a bucket holds.
//!
//! Reads every label (`labels/`), failed record (`failed/`) and batch state record
//! (`state/batches/`), and writes a single HTML file that references nothing outside
//! itself: the counts, one bar chart per scalar label field (inline SVG drawn here, no
//! JavaScript), a gallery of thumbnails (JPEG `data:` URIs) grouped by label, and the
//! failures with every attempt's reason.
//!
//! Nothing here knows a particular task: which fields are charted and how the gallery is
//! grouped follows from the label values (and the task's schema when the task is known).
//! Everything that came from the bucket (keys, reasons, label values, even field names)
//! is untrusted and escaped before it reaches the page.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt::{self, Display, Write as _};
use std::io::Cursor;
use std::path::Path;

use anyhow::Context;
use base64::Engine;
use futures_util::stream::{self, StreamExt};
use image::codecs::jpeg::JpegEncoder;
use image::{DynamicImage, ExtendedColorType, ImageDecoder, ImageReader, Limits, RgbImage};
use serde_json::Value;
use shotlabel_shared::ports::{ObjectStore, StoreError};
use shotlabel_shared::records::{BatchRecord, FailedRecord, LabelRecord, Layout};
use shotlabel_shared::task::Task;

/// The `model` the bundled batch emulator writes into its answers
/// (`batch_emulator::EMULATOR_MODEL`).
pub const EMULATOR_MODEL: &str = "shotlabel-batch-emulator";

/// How many thumbnails a report shows unless told otherwise.
pub const DEFAULT_MAX_THUMBNAILS: usize = 500;

/// The longest side of a thumbnail, in pixels.
const THUMBNAIL_SIDE: u32 = 240;
/// Taller pages are cut to their top (height at most 5/4 of the width) before shrinking,
/// so a full-page capture shows as its first screen rather than a sliver.
const TALLEST_ASPECT: (u32, u32) = (5, 4);
const THUMBNAIL_JPEG_QUALITY: u8 = 75;
/// A source image larger than this is not fetched into a thumbnail.
const MAX_SOURCE_BYTES: u64 = 50 * 1024 * 1024;
/// Nor one that would decode to more pixels than this.
const MAX_SOURCE_PIXELS: u64 = 64 * 1024 * 1024;

/// Objects read at once.
const CONCURRENCY: usize = 16;
/// More distinct values than this and a field is not charted.
const MAX_CATEGORIES: usize = 24;
/// A string longer than this is free text, not a category.
const MAX_CATEGORY_CHARS: usize = 40;
/// A caption value is cut after this many characters.
const MAX_CAPTION_CHARS: usize = 240;
/// At most this many failed records and batches are listed (all are counted).
const MAX_FAILED_ROWS: usize = 2000;
const MAX_BATCH_ROWS: usize = 500;

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
    /// Records under `labels/`, `failed/` or `state/batches/` that could not be read.
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
    let data = gather(store, bucket, input_prefix).await?;
    let tasks = analyse_tasks(&data.labels, &options.tasks);
    let chosen = choose_thumbnails(&tasks, options.max_thumbnails);
    let thumbnails = fetch_thumbnails(store, &data.labels, &chosen).await;

    let mut summary = data.summary();
    summary.images_shown = thumbnails
        .values()
        .filter(|t| matches!(t, Thumb::Image { .. }))
        .count();
    summary.placeholders = thumbnails.len() - summary.images_shown;
    summary.left_out = data.labels.len() - thumbnails.len();

    let mut html = String::with_capacity(64 * 1024 + thumbnails.len() * 16 * 1024);
    let page = Page {
        bucket,
        input_prefix,
        data: &data,
        tasks: &tasks,
        thumbnails: &thumbnails,
        summary: &summary,
        max_thumbnails: options.max_thumbnails,
    };
    page.render(&mut html).context("cannot format the report")?;
    tokio::fs::write(out, html)
        .await
        .with_context(|| format!("cannot write {}", out.display()))?;
    Ok(summary)
}

// ---------------------------------------------------------------------------------------
// Reading the bucket

/// Everything read from the bucket.
#[derive(Debug, Default)]
struct BucketData {
    /// Keys of the objects under the input prefix.
    inputs: Vec<String>,
    /// Label records with the key they were read from, in key order.
    labels: Vec<(String, LabelRecord)>,
    failed: Vec<(String, FailedRecord)>,
    batches: Vec<(String, BatchRecord)>,
    /// Records that could not be read or parsed: key and why.
    unreadable: Vec<(String, String)>,
    in_progress: usize,
}

impl BucketData {
    fn summary(&self) -> ReportSummary {
        let harvests = self.batches.iter().filter_map(|(_, b)| b.harvest);
        let (mut retried, mut duplicates, mut prompt, mut completion) = (0, 0, 0, 0);
        for h in harvests {
            retried += h.retried;
            duplicates += h.duplicates;
            prompt += h.prompt_tokens;
            completion += h.completion_tokens;
        }
        if prompt + completion == 0 {
            // No harvest counted tokens (or no batch records): what the labels say.
            for usage in self
                .labels
                .iter()
                .filter_map(|(_, l)| l.provenance.usage.as_ref())
            {
                prompt += usage.prompt_tokens;
                completion += usage.completion_tokens;
            }
        }
        ReportSummary {
            images: self.inputs.len(),
            labelled: self.labels.len(),
            failed: self.failed.len(),
            in_progress: self.in_progress,
            batches: self.batches.len(),
            retried,
            duplicates,
            prompt_tokens: prompt,
            completion_tokens: completion,
            emulator_labels: self
                .labels
                .iter()
                .filter(|(_, l)| l.model == EMULATOR_MODEL)
                .count(),
            unreadable_records: self.unreadable.len(),
            ..ReportSummary::default()
        }
    }
}

const OUTPUT_PREFIXES: [&str; 4] = ["labels/", "failed/", "state/", "results/"];

async fn gather<S: ObjectStore>(
    store: &S,
    bucket: &str,
    input_prefix: &str,
) -> anyhow::Result<BucketData> {
    let list = |prefix: &'static str| async move {
        store
            .list(bucket, prefix)
            .await
            .with_context(|| format!("cannot list s3://{bucket}/{prefix}"))
    };
    let inputs: Vec<String> = store
        .list(bucket, input_prefix)
        .await
        .with_context(|| format!("cannot list s3://{bucket}/{input_prefix}"))?
        .into_iter()
        .filter(|k| !k.ends_with('/'))
        // With an empty input prefix the listing holds the pipeline's own outputs too.
        .filter(|k| !input_prefix.is_empty() || !OUTPUT_PREFIXES.iter().any(|p| k.starts_with(p)))
        .collect();
    let json_keys = |keys: Vec<String>| -> Vec<String> {
        keys.into_iter().filter(|k| k.ends_with(".json")).collect()
    };
    let label_keys = json_keys(list("labels/").await?);
    let failed_keys = json_keys(list("failed/").await?);
    let batch_keys = json_keys(list("state/batches/").await?);

    let mut data = BucketData {
        inputs,
        ..BucketData::default()
    };
    data.labels = read_records(
        store,
        bucket,
        label_keys,
        |b| serde_json::from_slice::<LabelRecord>(b),
        &mut data.unreadable,
    )
    .await;
    data.failed = read_records(
        store,
        bucket,
        failed_keys,
        |b| serde_json::from_slice::<FailedRecord>(b),
        &mut data.unreadable,
    )
    .await;
    data.batches = read_records(
        store,
        bucket,
        batch_keys,
        |b| serde_json::from_slice::<BatchRecord>(b),
        &mut data.unreadable,
    )
    .await;

    // Inputs that have no terminal record yet. Their record keys come from the layout,
    // which shortens keys that would be over S3's limit.
    let terminal: HashSet<&str> = data
        .labels
        .iter()
        .map(|(k, _)| k.as_str())
        .chain(data.failed.iter().map(|(k, _)| k.as_str()))
        .collect();
    let layout = Layout::new(input_prefix);
    data.in_progress = data
        .inputs
        .iter()
        .filter(|k| {
            let relative = layout.relative_or_key(k);
            !terminal.contains(layout.label_key(relative).as_str())
                && !terminal.contains(layout.failed_key(relative).as_str())
        })
        .count();
    Ok(data)
}

/// Reads and parses records, in key order; what cannot be read goes to `unreadable`.
async fn read_records<S: ObjectStore, T>(
    store: &S,
    bucket: &str,
    keys: Vec<String>,
    parse: fn(&[u8]) -> serde_json::Result<T>,
    unreadable: &mut Vec<(String, String)>,
) -> Vec<(String, T)> {
    let results: Vec<(String, Result<T, String>)> = stream::iter(keys)
        .map(|key| async move {
            let result = match store.get(bucket, &key).await {
                Ok(object) => parse(&object.body).map_err(|e| format!("not a valid record: {e}")),
                Err(StoreError::NotFound { .. }) => Err("deleted while the report was read".into()),
                Err(e) => Err(e.to_string()),
            };
            (key, result)
        })
        .buffered(CONCURRENCY)
        .collect()
        .await;
    let mut records = Vec::with_capacity(results.len());
    for (key, result) in results {
        match result {
            Ok(record) => records.push((key, record)),
            Err(reason) => unreadable.push((key, reason)),
        }
    }
    records
}

// ---------------------------------------------------------------------------------------
// What the labels look like

/// How a label field is shown.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum FieldKind {
    Bool,
    Integer,
    /// Short strings from a small set.
    Category,
    /// Free text, arrays, objects, fractions, or too many distinct values: shown in
    /// captions, not charted.
    Caption,
}

#[derive(Debug, Clone)]
struct Category {
    /// The value as JSON text (unique per value), or [`MISSING`].
    key: String,
    display: String,
    count: usize,
}

const MISSING: &str = "\u{0}missing";

#[derive(Debug, Clone)]
struct Field {
    name: String,
    kind: FieldKind,
    /// Why a field is not charted, for the page.
    note: Option<&'static str>,
    /// In display order; empty for captions.
    categories: Vec<Category>,
}

impl Field {
    fn charted(&self) -> bool {
        self.kind != FieldKind::Caption
    }
}

/// The labels of one task, and how they are shown.
#[derive(Debug)]
struct TaskView {
    name: String,
    /// Index into the label list, in key order.
    labels: Vec<usize>,
    versions: BTreeMap<String, usize>,
    models: BTreeMap<String, usize>,
    fields: Vec<Field>,
    /// The field the gallery is grouped by, and the one each group is split by.
    primary: Option<usize>,
    secondary: Option<usize>,
    /// Gallery groups: (primary category, secondary category, label indices).
    groups: Vec<Group>,
}

#[derive(Debug)]
struct Group {
    primary: Option<usize>,
    secondary: Option<usize>,
    labels: Vec<usize>,
}

/// The category key a label falls into for a field.
fn category_key(label: &Value, field: &str) -> String {
    match label.get(field) {
        None | Some(Value::Null) => MISSING.to_owned(),
        Some(v) => v.to_string(),
    }
}

fn display_value(value: &Value) -> String {
    match value {
        Value::Bool(true) => "yes".into(),
        Value::Bool(false) => "no".into(),
        Value::String(s) => s.clone(),
        Value::Null => "(missing)".into(),
        Value::Array(items) if items.iter().all(Value::is_string) => items
            .iter()
            .filter_map(Value::as_str)
            .collect::<Vec<_>>()
            .join(", "),
        other => other.to_string(),
    }
}

fn category(value: &Value, count: usize) -> Category {
    Category {
        key: value.to_string(),
        display: display_value(value),
        count,
    }
}

fn analyse_tasks(labels: &[(String, LabelRecord)], known: &[Task]) -> Vec<TaskView> {
    let mut by_task: BTreeMap<&str, Vec<usize>> = BTreeMap::new();
    for (i, (_, label)) in labels.iter().enumerate() {
        by_task.entry(label.task.name.as_str()).or_default().push(i);
    }
    let mut views: Vec<TaskView> = by_task
        .into_iter()
        .map(|(name, indices)| {
            let schema = known
                .iter()
                .find(|t| t.name() == name)
                .map(|t| &t.spec().response_schema.schema);
            analyse_task(name, indices, labels, schema)
        })
        .collect();
    // The task with the most labels first.
    views.sort_by(|a, b| {
        b.labels
            .len()
            .cmp(&a.labels.len())
            .then(a.name.cmp(&b.name))
    });
    views
}

fn analyse_task(
    name: &str,
    indices: Vec<usize>,
    labels: &[(String, LabelRecord)],
    schema: Option<&Value>,
) -> TaskView {
    let mut versions = BTreeMap::new();
    let mut models = BTreeMap::new();
    for &i in &indices {
        let label = &labels[i].1;
        *versions.entry(label.task.version.clone()).or_insert(0) += 1;
        *models.entry(label.model.clone()).or_insert(0) += 1;
    }

    // Field order: the schema's `required`, its other properties, then anything seen.
    let mut names: Vec<String> = Vec::new();
    let mut push = |n: &str| {
        if !names.iter().any(|have| have == n) {
            names.push(n.to_owned());
        }
    };
    if let Some(schema) = schema {
        for n in schema
            .get("required")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
        {
            push(n);
        }
        for n in schema
            .get("properties")
            .and_then(Value::as_object)
            .into_iter()
            .flat_map(|p| p.keys())
        {
            push(n);
        }
    }
    for &i in &indices {
        if let Some(object) = labels[i].1.label.as_object() {
            for n in object.keys() {
                push(n);
            }
        }
    }

    let fields: Vec<Field> = names
        .into_iter()
        .map(|field| {
            let property = schema
                .and_then(|s| s.get("properties"))
                .and_then(|p| p.get(&field));
            let values: Vec<&Value> = indices
                .iter()
                .map(|&i| labels[i].1.label.get(&field).unwrap_or(&Value::Null))
                .collect();
            analyse_field(field, &values, property)
        })
        .collect();

    let primary = fields
        .iter()
        .position(|f| matches!(f.kind, FieldKind::Integer | FieldKind::Category))
        .or_else(|| fields.iter().position(|f| f.kind == FieldKind::Bool));
    let secondary = primary.and_then(|p| {
        fields
            .iter()
            .enumerate()
            .find(|(i, f)| *i != p && f.charted() && f.categories.len() <= 6)
            .map(|(i, _)| i)
    });

    // Gallery groups, in category order, each label in exactly one.
    let position = |field: Option<usize>, label: &Value| -> Option<usize> {
        let f = &fields[field?];
        let key = category_key(label, &f.name);
        f.categories.iter().position(|c| c.key == key)
    };
    let mut buckets: BTreeMap<(Option<usize>, Option<usize>), Vec<usize>> = BTreeMap::new();
    for &i in &indices {
        let label = &labels[i].1.label;
        buckets
            .entry((position(primary, label), position(secondary, label)))
            .or_default()
            .push(i);
    }
    let groups = buckets
        .into_iter()
        .map(|((primary, secondary), labels)| Group {
            primary,
            secondary,
            labels,
        })
        .collect();

    TaskView {
        name: name.to_owned(),
        labels: indices,
        versions,
        models,
        fields,
        primary,
        secondary,
        groups,
    }
}

fn analyse_field(name: String, values: &[&Value], property: Option<&Value>) -> Field {
    let present: Vec<&Value> = values.iter().copied().filter(|v| !v.is_null()).collect();
    let missing = values.len() - present.len();
    let schema_enum: Vec<Value> = property
        .and_then(|p| p.get("enum"))
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    let schema_type = property.and_then(|p| p.get("type")).and_then(Value::as_str);
    let mut counts: HashMap<String, usize> = HashMap::new();
    for v in &present {
        *counts.entry(v.to_string()).or_insert(0) += 1;
    }
    let count_of = |v: &Value| counts.get(&v.to_string()).copied().unwrap_or(0);
    let caption = |note: &'static str| Field {
        name: name.clone(),
        kind: FieldKind::Caption,
        note: Some(note),
        categories: Vec::new(),
    };

    let all = |test: fn(&Value) -> bool| !present.is_empty() && present.iter().all(|v| test(v));
    let is_int = |v: &Value| v.is_i64() || v.is_u64();

    let (kind, mut categories) = if all(Value::is_boolean)
        || (present.is_empty() && schema_type == Some("boolean"))
    {
        let cats: Vec<Category> = [Value::Bool(true), Value::Bool(false)]
            .iter()
            .map(|v| category(v, count_of(v)))
            .collect();
        (FieldKind::Bool, cats)
    } else if all(is_int) || (present.is_empty() && schema_type == Some("integer")) {
        let mut domain: Vec<Value> = schema_enum.iter().filter(|v| is_int(v)).cloned().collect();
        if domain.is_empty() {
            let bound = |k: &str| property.and_then(|p| p.get(k)).and_then(Value::as_i64);
            if let (Some(lo), Some(hi)) = (bound("minimum"), bound("maximum"))
                && hi >= lo
                && hi - lo < MAX_CATEGORIES as i64
            {
                domain = (lo..=hi).map(Value::from).collect();
            }
        }
        for v in &present {
            if !domain.contains(v) {
                domain.push((*v).clone());
            }
        }
        if domain.len() > MAX_CATEGORIES {
            return caption("too many distinct values to chart");
        }
        domain.sort_by_key(|v| v.as_i64().unwrap_or(i64::MAX));
        let cats: Vec<Category> = domain.iter().map(|v| category(v, count_of(v))).collect();
        (FieldKind::Integer, cats)
    } else if all(Value::is_string) || (present.is_empty() && !schema_enum.is_empty()) {
        let mut domain: Vec<Value> = schema_enum
            .iter()
            .filter(|v| v.is_string())
            .cloned()
            .collect();
        if domain.is_empty() {
            // No enum: a category only if the values are short and repeat.
            let distinct = counts.len();
            let short = present
                .iter()
                .filter_map(|v| v.as_str())
                .all(|s| s.chars().count() <= MAX_CATEGORY_CHARS);
            if !short || distinct > MAX_CATEGORIES || distinct * 2 > present.len() {
                return caption("free text");
            }
            let mut observed: Vec<&Value> = Vec::new();
            for v in &present {
                if !observed.contains(v) {
                    observed.push(v);
                }
            }
            observed.sort_by(|a, b| {
                count_of(b)
                    .cmp(&count_of(a))
                    .then(a.to_string().cmp(&b.to_string()))
            });
            domain = observed.into_iter().cloned().collect();
        } else {
            for v in &present {
                if !domain.contains(v) {
                    domain.push((*v).clone());
                }
            }
        }
        if domain.len() > MAX_CATEGORIES {
            return caption("too many distinct values to chart");
        }
        let cats: Vec<Category> = domain.iter().map(|v| category(v, count_of(v))).collect();
        (FieldKind::Category, cats)
    } else if present.is_empty() {
        return caption("no values");
    } else if present.iter().all(|v| v.is_array()) {
        return caption("a list");
    } else if present.iter().all(|v| v.is_number()) {
        return caption("fractional numbers");
    } else {
        return caption("not a scalar");
    };
    if missing > 0 {
        categories.push(Category {
            key: MISSING.to_owned(),
            display: "(missing)".into(),
            count: missing,
        });
    }
    Field {
        name,
        kind,
        note: None,
        categories,
    }
}

/// Which labels get a thumbnail: the cap shared round-robin between the gallery's
/// groups (across tasks), so every group shows some.
fn choose_thumbnails(tasks: &[TaskView], cap: usize) -> Vec<usize> {
    let groups: Vec<&[usize]> = tasks
        .iter()
        .flat_map(|t| t.groups.iter().map(|g| g.labels.as_slice()))
        .collect();
    let mut chosen = Vec::new();
    let mut round = 0;
    while chosen.len() < cap {
        let mut any = false;
        for group in &groups {
            if let Some(&i) = group.get(round) {
                any = true;
                if chosen.len() < cap {
                    chosen.push(i);
                }
            }
        }
        if !any {
            break;
        }
        round += 1;
    }
    chosen
}

// ---------------------------------------------------------------------------------------
// Thumbnails

#[derive(Debug, Clone)]
enum Thumb {
    Image {
        data_uri: String,
        width: u32,
        height: u32,
        /// The source's size when only its top is shown.
        cropped_from: Option<(u32, u32)>,
        /// The source changed after it was labelled.
        changed: bool,
    },
    Placeholder {
        reason: String,
    },
}

async fn fetch_thumbnails<S: ObjectStore>(
    store: &S,
    labels: &[(String, LabelRecord)],
    chosen: &[usize],
) -> HashMap<usize, Thumb> {
    stream::iter(chosen.iter().copied())
        .map(|i| async move {
            let source = &labels[i].1.source;
            let thumb = match store.get(&source.bucket, &source.key).await {
                Ok(object) => {
                    let changed = !source.etag.is_empty() && object.etag != source.etag;
                    let made = tokio::task::spawn_blocking(move || {
                        make_thumbnail(&object.body, THUMBNAIL_SIDE)
                    })
                    .await;
                    match made {
                        Ok(Ok(t)) => Thumb::Image {
                            data_uri: t.data_uri,
                            width: t.width,
                            height: t.height,
                            cropped_from: t.cropped_from,
                            changed,
                        },
                        Ok(Err(reason)) => Thumb::Placeholder { reason },
                        Err(e) => Thumb::Placeholder {
                            reason: format!("the thumbnail could not be made: {e}"),
                        },
                    }
                }
                Err(StoreError::NotFound { .. }) => Thumb::Placeholder {
                    reason: "the source image is no longer in the bucket".into(),
                },
                Err(e) => Thumb::Placeholder {
                    reason: e.to_string(),
                },
            };
            (i, thumb)
        })
        .buffer_unordered(CONCURRENCY / 2)
        .collect()
        .await
}

#[derive(Debug)]
struct Thumbnail {
    data_uri: String,
    width: u32,
    height: u32,
    cropped_from: Option<(u32, u32)>,
}

/// Decodes an image with bounded cost, keeps the top of a tall page, shrinks it to fit
/// `side` (never enlarging), flattens transparency onto white, and returns a JPEG data URI.
fn make_thumbnail(bytes: &[u8], side: u32) -> Result<Thumbnail, String> {
    if bytes.is_empty() {
        return Err("the file is empty".into());
    }
    if bytes.len() as u64 > MAX_SOURCE_BYTES {
        return Err(format!(
            "the file is {} bytes, too large for a thumbnail",
            bytes.len()
        ));
    }
    let format = image::guess_format(bytes)
        .map_err(|_| "not an image: its first bytes match no known image format".to_owned())?;
    let not_decodable = |e: image::ImageError| format!("the image cannot be decoded: {e}");
    let mut reader = ImageReader::with_format(Cursor::new(bytes), format);
    let mut limits = Limits::default();
    limits.max_alloc = Some(MAX_SOURCE_PIXELS * 8 + (64 << 20));
    reader.limits(limits);
    let mut decoder = reader.into_decoder().map_err(not_decodable)?;
    let (width, height) = decoder.dimensions();
    if width == 0 || height == 0 {
        return Err("the image has no pixels".into());
    }
    if u64::from(width) * u64::from(height) > MAX_SOURCE_PIXELS {
        return Err(format!(
            "the image is {width}x{height} pixels, too large for a thumbnail"
        ));
    }
    let orientation = decoder.orientation().map_err(not_decodable)?;
    let mut image = DynamicImage::from_decoder(decoder).map_err(not_decodable)?;
    image.apply_orientation(orientation);

    let (width, height) = (image.width(), image.height());
    let tallest = (u64::from(width) * u64::from(TALLEST_ASPECT.0) / u64::from(TALLEST_ASPECT.1))
        .clamp(1, u64::from(u32::MAX)) as u32;
    let cropped_from = (height > tallest).then_some((width, height));
    if cropped_from.is_some() {
        image = image.crop_imm(0, 0, width, tallest);
    }
    if image.width().max(image.height()) > side {
        image = image.thumbnail(side, side);
    }
    let rgb = flatten_onto_white(image);

    let mut jpeg = Vec::new();
    JpegEncoder::new_with_quality(&mut jpeg, THUMBNAIL_JPEG_QUALITY)
        .encode(
            rgb.as_raw(),
            rgb.width(),
            rgb.height(),
            ExtendedColorType::Rgb8,
        )
        .map_err(|e| format!("the thumbnail cannot be encoded: {e}"))?;
    let mut data_uri = String::from("data:image/jpeg;base64,");
    base64::engine::general_purpose::STANDARD.encode_string(&jpeg, &mut data_uri);
    Ok(Thumbnail {
        data_uri,
        width: rgb.width(),
        height: rgb.height(),
        cropped_from,
    })
}

fn flatten_onto_white(image: DynamicImage) -> RgbImage {
    if !image.color().has_alpha() {
        return image.into_rgb8();
    }
    let rgba = image.into_rgba8();
    let mut rgb = RgbImage::new(rgba.width(), rgba.height());
    for (out, px) in rgb.pixels_mut().zip(rgba.pixels()) {
        let alpha = u32::from(px[3]);
        for c in 0..3 {
            let v = u32::from(px[c]) * alpha + 255 * (255 - alpha);
            out[c] = ((v + 127) / 255) as u8;
        }
    }
    rgb
}

// ---------------------------------------------------------------------------------------
// The page

/// Text escaped for HTML content and (quoted) attribute values.
struct Esc<'a>(&'a str);

impl Display for Esc<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut rest = self.0;
        while let Some(at) = rest.find(['&', '<', '>', '"', '\'']) {
            f.write_str(&rest[..at])?;
            f.write_str(match rest.as_bytes()[at] {
                b'&' => "&amp;",
                b'<' => "&lt;",
                b'>' => "&gt;",
                b'"' => "&quot;",
                _ => "&#39;",
            })?;
            rest = &rest[at + 1..];
        }
        f.write_str(rest)
    }
}

/// At most `max` characters, with an ellipsis when cut.
fn clip(text: &str, max: usize) -> String {
    match text.char_indices().nth(max) {
        Some((at, _)) => format!("{}…", &text[..at]),
        None => text.to_owned(),
    }
}

/// 1234567 → "1,234,567".
fn thousands(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

fn plural(n: usize, one: &str, many: &str) -> String {
    format!(
        "{} {}",
        thousands(n as u64),
        if n == 1 { one } else { many }
    )
}

/// Unix seconds as `YYYY-MM-DD HH:MM UTC`.
fn utc(seconds: u64) -> String {
    let days = (seconds / 86_400) as i64;
    let rem = seconds % 86_400;
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02} UTC",
        rem / 3600,
        rem % 3600 / 60
    )
}

const STYLE: &str = r#"
:root { color-scheme: light; --ink: #1d2330; --muted: #5b6475; --line: #d9dee7; --bg: #f6f7fa; --bar: #3f6fd8; --warn-bg: #fff4d6; --warn: #8a5a00; --bad: #a32020; }
* { box-sizing: border-box; }
body { margin: 0; font: 15px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, Helvetica, Arial, sans-serif; color: var(--ink); background: var(--bg); }
main { max-width: 1200px; margin: 0 auto; padding: 24px 28px 64px; }
h1 { font-size: 26px; margin: 0 0 4px; }
h2 { font-size: 20px; margin: 36px 0 12px; padding-bottom: 6px; border-bottom: 1px solid var(--line); }
h3 { font-size: 17px; margin: 24px 0 10px; }
h4 { font-size: 16px; margin: 20px 0 8px; }
h5 { font-size: 14px; margin: 12px 0 6px; color: var(--muted); }
.n { font-weight: normal; color: var(--muted); font-size: 0.9em; }
code { font: 13px/1.3 ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; overflow-wrap: anywhere; }
.meta { color: var(--muted); margin: 0; }
.warning { margin: 18px 0; padding: 14px 18px; background: var(--warn-bg); border: 2px solid #e0a800; border-radius: 8px; color: var(--warn); font-size: 16px; }
.warning strong { display: block; font-size: 18px; margin-bottom: 2px; }
.problems { border-color: var(--bad); color: var(--bad); background: #fdeaea; }
.counts { display: grid; grid-template-columns: repeat(auto-fill, minmax(150px, 1fr)); gap: 12px; margin: 0; }
.counts div { background: #fff; border: 1px solid var(--line); border-radius: 8px; padding: 10px 14px; }
.counts dt { color: var(--muted); font-size: 13px; }
.counts dd { margin: 2px 0 0; font-size: 24px; font-weight: 600; }
.counts small { display: block; color: var(--muted); font-size: 12px; font-weight: normal; }
.charts { display: flex; flex-wrap: wrap; align-items: flex-start; gap: 16px; margin-bottom: 16px; }
.chart { margin: 0; background: #fff; border: 1px solid var(--line); border-radius: 8px; padding: 10px 14px; }
.chart figcaption { font-weight: 600; margin-bottom: 4px; }
.chart svg text { font: 13px system-ui, sans-serif; fill: var(--ink); }
.chart .track { fill: #edf0f5; }
.chart .bar { fill: var(--bar); }
.uncharted { color: var(--muted); font-size: 14px; }
.thumbs { display: flex; flex-wrap: wrap; gap: 12px; align-items: flex-start; }
.thumb { margin: 0; width: 244px; background: #fff; border: 1px solid var(--line); border-radius: 6px; padding: 2px; }
.thumb img { display: block; max-width: 240px; height: auto; margin: 0 auto; }
.thumb figcaption { padding: 4px 6px 6px; font-size: 12px; color: var(--muted); overflow-wrap: anywhere; }
.thumb figcaption code { font-size: 11.5px; color: var(--ink); }
.thumb figcaption span { display: block; }
.placeholder { width: 240px; height: 150px; display: flex; flex-direction: column; justify-content: center; gap: 4px; padding: 10px; background: repeating-linear-gradient(45deg, #eef0f4, #eef0f4 10px, #e4e7ed 10px, #e4e7ed 20px); color: var(--bad); font-size: 12px; overflow: hidden; overflow-wrap: anywhere; }
.placeholder b { font-size: 13px; }
.more, .empty { color: var(--muted); font-style: italic; margin: 6px 0; }
table { border-collapse: collapse; width: 100%; background: #fff; font-size: 13.5px; }
th, td { border: 1px solid var(--line); padding: 5px 8px; text-align: left; vertical-align: top; overflow-wrap: anywhere; }
th { background: #eef1f6; }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; }
footer { margin-top: 48px; color: var(--muted); font-size: 12px; }
"#;

struct Page<'a> {
    bucket: &'a str,
    input_prefix: &'a str,
    data: &'a BucketData,
    tasks: &'a [TaskView],
    thumbnails: &'a HashMap<usize, Thumb>,
    summary: &'a ReportSummary,
    max_thumbnails: usize,
}

impl Page<'_> {
    fn render(&self, h: &mut String) -> fmt::Result {
        let s = self.summary;
        let synthetic = s.emulator_labels > 0;
        writeln!(
            h,
            "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n\
             <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n\
             <title>shotlabel report: {}{}</title>\n<style>{STYLE}</style>\n</head>\n<body>\n<main>",
            Esc(self.bucket),
            if synthetic {
                " (synthetic emulator labels)"
            } else {
                ""
            }
        )?;
        writeln!(
            h,
            "<header>\n<h1>shotlabel report</h1>\n<p class=\"meta\">Bucket <code>{}</code>, \
             inputs under <code>{}</code>, generated {}.</p>\n</header>",
            Esc(self.bucket),
            Esc(self.input_prefix),
            utc(shotlabel_shared::records::unix_now())
        )?;
        if synthetic {
            self.emulator_warning(h)?;
        }
        if !self.data.unreadable.is_empty() {
            self.problems(h)?;
        }
        self.counts(h)?;
        for (t, task) in self.tasks.iter().enumerate() {
            self.task(h, t, task)?;
        }
        if self.tasks.is_empty() {
            h.push_str("<h2>Labels</h2>\n<p class=\"empty\">No labels yet.</p>\n");
        }
        self.failures(h)?;
        self.batches(h)?;
        h.push_str(
            "<footer>Written by <code>shotlabel report</code>. Self-contained: every chart and \
             thumbnail is inside this file.</footer>\n</main>\n</body>\n</html>\n",
        );
        Ok(())
    }

    fn emulator_warning(&self, h: &mut String) -> fmt::Result {
        let s = self.summary;
        let which = if s.emulator_labels == s.labelled {
            format!(
                "All {} in this report",
                plural(s.labelled, "label", "labels")
            )
        } else {
            format!(
                "{} of the {} labels in this report",
                thousands(s.emulator_labels as u64),
                thousands(s.labelled as u64)
            )
        };
        writeln!(
            h,
            "<div class=\"warning\" id=\"emulator-warning\" role=\"alert\">\
             <strong>Synthetic labels: emulator output, not a model&#39;s judgement.</strong>\
             {which} came from <code>{EMULATOR_MODEL}</code>, the bundled batch emulator. \
             Its answers are derived from the image bytes to exercise the pipeline; they say \
             nothing about the images. Do not use them as data.</div>"
        )
    }

    fn problems(&self, h: &mut String) -> fmt::Result {
        let unreadable = &self.data.unreadable;
        write!(
            h,
            "<div class=\"warning problems\" id=\"unreadable\"><strong>{} could not be read \
             and {} not counted.</strong><ul>",
            plural(unreadable.len(), "record", "records"),
            if unreadable.len() == 1 { "is" } else { "are" }
        )?;
        for (key, reason) in unreadable.iter().take(MAX_FAILED_ROWS) {
            write!(
                h,
                "<li><code>{}</code>: {}</li>",
                Esc(key),
                Esc(&clip(reason, 500))
            )?;
        }
        h.push_str("</ul></div>\n");
        Ok(())
    }

    fn counts(&self, h: &mut String) -> fmt::Result {
        let s = self.summary;
        h.push_str("<section id=\"counts\">\n<h2>Counts</h2>\n<dl class=\"counts\">\n");
        let mut stat = |id: &str, name: &str, value: u64, note: Option<String>| {
            writeln!(
                h,
                "<div><dt>{name}</dt><dd id=\"count-{id}\">{}</dd>{}</div>",
                thousands(value),
                note.map(|n| format!("<small>{}</small>", Esc(&n)))
                    .unwrap_or_default()
            )
        };
        stat(
            "images",
            "Images",
            s.images as u64,
            Some(format!("under {}", self.input_prefix)),
        )?;
        stat("labelled", "Labelled", s.labelled as u64, None)?;
        stat("failed", "Failed", s.failed as u64, None)?;
        stat(
            "in-progress",
            "In progress",
            s.in_progress as u64,
            Some("no terminal record yet".into()),
        )?;
        stat("batches", "Batches", s.batches as u64, None)?;
        stat(
            "retried",
            "Retried",
            s.retried,
            Some("items sent round again".into()),
        )?;
        stat(
            "tokens",
            "Tokens",
            s.prompt_tokens + s.completion_tokens,
            Some(format!(
                "{} prompt, {} completion",
                thousands(s.prompt_tokens),
                thousands(s.completion_tokens)
            )),
        )?;
        if s.duplicates > 0 {
            stat(
                "duplicates",
                "Duplicates",
                s.duplicates,
                Some("answers not written".into()),
            )?;
        }
        h.push_str("</dl>\n</section>\n");
        Ok(())
    }

    fn task(&self, h: &mut String, t: usize, task: &TaskView) -> fmt::Result {
        let list = |map: &BTreeMap<String, usize>| {
            map.iter()
                .map(|(k, n)| format!("<code>{}</code> ({})", Esc(k), thousands(*n as u64)))
                .collect::<Vec<_>>()
                .join(", ")
        };
        writeln!(
            h,
            "<section class=\"task\" id=\"task-{t}\">\n<h2>Task <code>{}</code> \
             <span class=\"n\">{}</span></h2>\n<p class=\"meta\">Versions: {}. Models: {}.</p>",
            Esc(&task.name),
            plural(task.labels.len(), "label", "labels"),
            list(&task.versions),
            list(&task.models)
        )?;

        h.push_str("<h3>Label distribution</h3>\n<div class=\"charts\">\n");
        for field in task.fields.iter().filter(|f| f.charted()) {
            bar_chart(h, field)?;
        }
        h.push_str("</div>\n");
        let uncharted: Vec<String> = task
            .fields
            .iter()
            .filter(|f| !f.charted())
            .map(|f| format!("<code>{}</code> ({})", Esc(&f.name), f.note.unwrap_or("")))
            .collect();
        if !uncharted.is_empty() {
            writeln!(
                h,
                "<p class=\"uncharted\">Not charted, shown under each thumbnail: {}.</p>",
                uncharted.join(", ")
            )?;
        }
        self.gallery(h, t, task)?;
        h.push_str("</section>\n");
        Ok(())
    }

    fn gallery(&self, h: &mut String, t: usize, task: &TaskView) -> fmt::Result {
        let shown = task
            .labels
            .iter()
            .filter(|i| self.thumbnails.contains_key(i))
            .count();
        let left_out = task.labels.len() - shown;
        writeln!(h, "<h3 id=\"gallery-{t}\">Gallery</h3>")?;
        if left_out > 0 {
            writeln!(
                h,
                "<p class=\"more\" id=\"left-out-{t}\">Showing {} of {} labelled images: {} left \
                 out by the thumbnail cap of {} (<code>--max-thumbnails</code>).</p>",
                thousands(shown as u64),
                thousands(task.labels.len() as u64),
                thousands(left_out as u64),
                thousands(self.max_thumbnails as u64)
            )?;
        }
        let primary = task.primary.map(|p| &task.fields[p]);
        let secondary = task.secondary.map(|s| &task.fields[s]);
        let Some(primary) = primary else {
            h.push_str("<section class=\"group\">\n<h4>All labelled images</h4>\n");
            for group in &task.groups {
                self.thumbs(h, task, &group.labels)?;
            }
            h.push_str("</section>\n");
            return Ok(());
        };
        for (c, cat) in primary.categories.iter().enumerate() {
            writeln!(
                h,
                "<section class=\"group\" data-field=\"{}\" data-value=\"{}\" data-count=\"{}\">\n\
                 <h4>{}: {} <span class=\"n\">{}</span></h4>",
                Esc(&primary.name),
                Esc(&cat.display),
                cat.count,
                Esc(&primary.name),
                Esc(&cat.display),
                plural(cat.count, "image", "images")
            )?;
            let groups: Vec<&Group> = task
                .groups
                .iter()
                .filter(|g| g.primary == Some(c))
                .collect();
            if groups.is_empty() {
                h.push_str("<p class=\"empty\">No images.</p>\n");
            }
            for group in groups {
                if let (Some(field), Some(s)) = (secondary, group.secondary) {
                    let sub = &field.categories[s];
                    writeln!(
                        h,
                        "<h5>{}: {} <span class=\"n\">{}</span></h5>",
                        Esc(&field.name),
                        Esc(&sub.display),
                        plural(group.labels.len(), "image", "images")
                    )?;
                }
                self.thumbs(h, task, &group.labels)?;
            }
            h.push_str("</section>\n");
        }
        // Labels outside every category (not expected: the categories cover what was seen).
        let strays: Vec<usize> = task
            .groups
            .iter()
            .filter(|g| g.primary.is_none())
            .flat_map(|g| g.labels.iter().copied())
            .collect();
        if !strays.is_empty() {
            writeln!(
                h,
                "<section class=\"group\">\n<h4>Other values <span class=\"n\">{}</span></h4>",
                plural(strays.len(), "image", "images")
            )?;
            self.thumbs(h, task, &strays)?;
            h.push_str("</section>\n");
        }
        Ok(())
    }

    fn thumbs(&self, h: &mut String, task: &TaskView, labels: &[usize]) -> fmt::Result {
        h.push_str("<div class=\"thumbs\">\n");
        let mut hidden = 0;
        for &i in labels {
            let Some(thumb) = self.thumbnails.get(&i) else {
                hidden += 1;
                continue;
            };
            let record = &self.data.labels[i].1;
            let key = &record.source.key;
            h.push_str("<figure class=\"thumb\">");
            let mut notes = Vec::new();
            match thumb {
                Thumb::Image {
                    data_uri,
                    width,
                    height,
                    cropped_from,
                    changed,
                } => {
                    write!(
                        h,
                        "<img src=\"{data_uri}\" width=\"{width}\" height=\"{height}\" alt=\"{}\">",
                        Esc(key)
                    )?;
                    if let Some((w, hgt)) = cropped_from {
                        notes.push(format!("top of a {w}×{hgt} image"));
                    }
                    if *changed {
                        notes.push("the image changed after it was labelled".to_owned());
                    }
                }
                Thumb::Placeholder { reason } => {
                    write!(
                        h,
                        "<div class=\"placeholder\" role=\"img\" aria-label=\"no thumbnail\">\
                         <b>No thumbnail</b><code>{}</code><span>{}</span></div>",
                        Esc(key),
                        Esc(&clip(reason, 300))
                    )?;
                }
            }
            write!(h, "<figcaption><code>{}</code>", Esc(key))?;
            for (f, field) in task.fields.iter().enumerate() {
                if Some(f) == task.primary || Some(f) == task.secondary {
                    continue;
                }
                let value = record.label.get(&field.name).unwrap_or(&Value::Null);
                write!(
                    h,
                    "<span>{}: {}</span>",
                    Esc(&field.name),
                    Esc(&clip(&display_value(value), MAX_CAPTION_CHARS))
                )?;
            }
            if record.attempt > 0 {
                write!(h, "<span>labelled at attempt {}</span>", record.attempt + 1)?;
            }
            for note in notes {
                write!(h, "<span>{}</span>", Esc(&note))?;
            }
            h.push_str("</figcaption></figure>\n");
        }
        h.push_str("</div>\n");
        if hidden > 0 {
            writeln!(
                h,
                "<p class=\"more\">{} more {} not shown.</p>",
                thousands(hidden as u64),
                if hidden == 1 { "image" } else { "images" }
            )?;
        }
        Ok(())
    }

    fn failures(&self, h: &mut String) -> fmt::Result {
        let failed = &self.data.failed;
        writeln!(
            h,
            "<section id=\"failed\">\n<h2>Failed <span class=\"n\">{}</span></h2>",
            plural(failed.len(), "image", "images")
        )?;
        if failed.is_empty() {
            h.push_str("<p class=\"empty\">Nothing failed.</p>\n</section>\n");
            return Ok(());
        }
        // Where the last attempt failed.
        let mut stages: BTreeMap<String, usize> = BTreeMap::new();
        for (_, record) in failed {
            let stage = record
                .reasons
                .last()
                .map_or("(no reason recorded)", |r| r.stage.as_str());
            *stages.entry(stage.to_owned()).or_insert(0) += 1;
        }
        let mut by_stage: Vec<Category> = stages
            .into_iter()
            .map(|(stage, count)| Category {
                key: stage.clone(),
                display: stage,
                count,
            })
            .collect();
        by_stage.sort_by_key(|c| std::cmp::Reverse(c.count));
        h.push_str("<div class=\"charts\">\n");
        bar_chart(
            h,
            &Field {
                name: "stage of the last attempt".into(),
                kind: FieldKind::Category,
                note: None,
                categories: by_stage,
            },
        )?;
        h.push_str("</div>\n");

        h.push_str(
            "<table id=\"failed-table\">\n<thead><tr><th>Key</th><th class=\"num\">Attempt</th>\
             <th>Stage</th><th>Reason</th></tr></thead>\n<tbody>\n",
        );
        for (_, record) in failed.iter().take(MAX_FAILED_ROWS) {
            let rows = record.reasons.len().max(1);
            write!(
                h,
                "<tr><td rowspan=\"{rows}\"><code>{}</code></td>",
                Esc(&record.source.key)
            )?;
            if record.reasons.is_empty() {
                h.push_str("<td></td><td></td><td>(no reason recorded)</td></tr>\n");
            }
            for (r, reason) in record.reasons.iter().enumerate() {
                if r > 0 {
                    h.push_str("<tr>");
                }
                writeln!(
                    h,
                    "<td class=\"num\">{}</td><td>{}</td><td>{}</td></tr>",
                    reason.attempt + 1,
                    Esc(&reason.stage),
                    Esc(&clip(&reason.reason, 2000))
                )?;
            }
        }
        h.push_str("</tbody>\n</table>\n");
        if failed.len() > MAX_FAILED_ROWS {
            writeln!(
                h,
                "<p class=\"more\">{} more failed images not listed.</p>",
                thousands((failed.len() - MAX_FAILED_ROWS) as u64)
            )?;
        }
        h.push_str("</section>\n");
        Ok(())
    }

    fn batches(&self, h: &mut String) -> fmt::Result {
        let mut batches: Vec<&BatchRecord> = self.data.batches.iter().map(|(_, b)| b).collect();
        writeln!(
            h,
            "<section id=\"batches\">\n<h2>Batches <span class=\"n\">{}</span></h2>",
            thousands(batches.len() as u64)
        )?;
        if batches.is_empty() {
            h.push_str("<p class=\"empty\">No batch records.</p>\n</section>\n");
            return Ok(());
        }
        batches.sort_by_key(|b| std::cmp::Reverse(b.submitted_at));
        h.push_str(
            "<table id=\"batch-table\">\n<thead><tr><th>Batch</th><th>Submitted</th><th>Phase</th>\
             <th>Provider status</th><th class=\"num\">Requests</th><th class=\"num\">Labelled</th>\
             <th class=\"num\">Retried</th><th class=\"num\">Failed</th>\
             <th class=\"num\">Duplicates</th><th class=\"num\">Tokens</th></tr></thead>\n<tbody>\n",
        );
        for b in batches.iter().take(MAX_BATCH_ROWS) {
            let phase = match b.phase {
                shotlabel_shared::records::BatchPhase::Open => "open",
                shotlabel_shared::records::BatchPhase::Harvested => "harvested",
            };
            let n = |v: Option<u64>| v.map(thousands).unwrap_or_default();
            let hv = b.harvest;
            writeln!(
                h,
                "<tr><td><code>{}</code></td><td>{}</td><td>{phase}</td><td>{}</td>\
                 <td class=\"num\">{}</td><td class=\"num\">{}</td><td class=\"num\">{}</td>\
                 <td class=\"num\">{}</td><td class=\"num\">{}</td><td class=\"num\">{}</td></tr>",
                Esc(&b.batch_id),
                utc(b.submitted_at),
                Esc(b.provider_status.as_deref().unwrap_or("")),
                thousands(b.requests),
                n(hv.map(|x| x.labelled)),
                n(hv.map(|x| x.retried)),
                n(hv.map(|x| x.failed)),
                n(hv.map(|x| x.duplicates)),
                n(hv.map(|x| x.prompt_tokens + x.completion_tokens)),
            )?;
        }
        h.push_str("</tbody>\n</table>\n");
        if batches.len() > MAX_BATCH_ROWS {
            writeln!(
                h,
                "<p class=\"more\">{} older batches not listed.</p>",
                thousands((batches.len() - MAX_BATCH_ROWS) as u64)
            )?;
        }
        h.push_str("</section>\n");
        Ok(())
    }
}

/// A horizontal bar chart of a field's categories, as inline SVG.
fn bar_chart(h: &mut String, field: &Field) -> fmt::Result {
    const LABEL_W: usize = 150;
    const BAR_W: usize = 280;
    const VALUE_W: usize = 100;
    const ROW_H: usize = 26;
    let total: usize = field.categories.iter().map(|c| c.count).sum();
    let most = field
        .categories
        .iter()
        .map(|c| c.count)
        .max()
        .unwrap_or(0)
        .max(1);
    let width = LABEL_W + BAR_W + VALUE_W;
    let height = field.categories.len() * ROW_H + 4;
    write!(
        h,
        "<figure class=\"chart\" data-field=\"{name}\"><figcaption>{name}</figcaption>\
         <svg width=\"{width}\" height=\"{height}\" viewBox=\"0 0 {width} {height}\" role=\"img\" \
         aria-label=\"distribution of {name}\"><title>distribution of {name}</title>",
        name = Esc(&field.name)
    )?;
    for (i, cat) in field.categories.iter().enumerate() {
        let y = 2 + i * ROW_H;
        let bar = (cat.count * BAR_W).div_ceil(most).min(BAR_W);
        let percent = if total == 0 {
            0.0
        } else {
            cat.count as f64 * 100.0 / total as f64
        };
        write!(
            h,
            "<g class=\"row\" data-value=\"{value}\" data-count=\"{count}\">\
             <text x=\"{lx}\" y=\"{ty}\" text-anchor=\"end\">{label}</text>\
             <rect class=\"track\" x=\"{LABEL_W}\" y=\"{by}\" width=\"{BAR_W}\" height=\"{bh}\" rx=\"3\"/>\
             <rect class=\"bar\" x=\"{LABEL_W}\" y=\"{by}\" width=\"{bar}\" height=\"{bh}\" rx=\"3\"/>\
             <text x=\"{vx}\" y=\"{ty}\">{count} ({percent:.0}%)</text></g>",
            value = Esc(&cat.display),
            count = cat.count,
            lx = LABEL_W - 8,
            ty = y + 17,
            label = Esc(&clip(&cat.display, 20)),
            by = y + 4,
            bh = ROW_H - 8,
            vx = LABEL_W + BAR_W + 8,
        )?;
    }
    h.push_str("</svg></figure>\n");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_everything_that_could_open_markup() {
        assert_eq!(
            Esc("<script>alert('x')</script> & \"q\"").to_string(),
            "&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt; &amp; &quot;q&quot;"
        );
        assert_eq!(Esc("plain").to_string(), "plain");
    }

    #[test]
    fn formats_numbers_dates_and_clips() {
        assert_eq!(thousands(0), "0");
        assert_eq!(thousands(1234567), "1,234,567");
        assert_eq!(utc(0), "1970-01-01 00:00 UTC");
        assert_eq!(utc(1_700_000_000), "2023-11-14 22:13 UTC");
        assert_eq!(clip("abcdef", 3), "abc…");
        assert_eq!(clip("abc", 3), "abc");
    }

    #[test]
    fn long_text_is_a_caption_and_short_repeating_text_a_category() {
        let captions = [
            Value::from("A pricing page with three plans side by side and a toggle."),
            Value::from("A blog article about sourdough baking with a large photo."),
        ];
        let refs: Vec<&Value> = captions.iter().collect();
        assert_eq!(
            analyse_field("caption".into(), &refs, None).kind,
            FieldKind::Caption
        );
        let kinds = [
            Value::from("shop"),
            Value::from("blog"),
            Value::from("shop"),
            Value::from("shop"),
        ];
        let refs: Vec<&Value> = kinds.iter().collect();
        let field = analyse_field("kind".into(), &refs, None);
        assert_eq!(field.kind, FieldKind::Category);
        assert_eq!(field.categories[0].display, "shop");
        assert_eq!(field.categories[0].count, 3);
    }

    #[test]
    fn schema_enum_gives_every_value_a_bar() {
        let schema = serde_json::json!({"type": "integer", "enum": [1, 2, 3, 4, 5]});
        let values = [Value::from(4), Value::from(4), Value::from(1)];
        let refs: Vec<&Value> = values.iter().collect();
        let field = analyse_field("aesthetic".into(), &refs, Some(&schema));
        let shown: Vec<(String, usize)> = field
            .categories
            .iter()
            .map(|c| (c.display.clone(), c.count))
            .collect();
        assert_eq!(
            shown,
            [("1", 1), ("2", 0), ("3", 0), ("4", 2), ("5", 0)].map(|(d, n)| (d.to_owned(), n))
        );
    }

    #[test]
    fn the_thumbnail_cap_is_shared_between_groups() {
        let view = |groups: Vec<Vec<usize>>| TaskView {
            name: "t".into(),
            labels: groups.iter().flatten().copied().collect(),
            versions: BTreeMap::new(),
            models: BTreeMap::new(),
            fields: Vec::new(),
            primary: None,
            secondary: None,
            groups: groups
                .into_iter()
                .map(|labels| Group {
                    primary: None,
                    secondary: None,
                    labels,
                })
                .collect(),
        };
        let tasks = [view(vec![vec![0, 1, 2, 3], vec![4], vec![5, 6]])];
        assert_eq!(choose_thumbnails(&tasks, 4), [0, 4, 5, 1]);
        assert_eq!(choose_thumbnails(&tasks, 100).len(), 7);
        assert!(choose_thumbnails(&tasks, 0).is_empty());
    }

    #[test]
    fn a_tall_page_keeps_its_top_and_a_non_image_is_a_reason() -> anyhow::Result<()> {
        let mut png = Vec::new();
        DynamicImage::new_rgba8(100, 1000)
            .write_to(&mut Cursor::new(&mut png), image::ImageFormat::Png)?;
        let thumb = make_thumbnail(&png, 240).map_err(anyhow::Error::msg)?;
        assert_eq!((thumb.width, thumb.height), (100, 125));
        assert_eq!(thumb.cropped_from, Some((100, 1000)));
        assert!(thumb.data_uri.starts_with("data:image/jpeg;base64,"));
        let err = make_thumbnail(b"hello, not a picture", 240)
            .err()
            .unwrap_or_default();
        assert!(err.contains("not an image"), "{err}");
        Ok(())
    }
}
