//! The HTML page, from `maud` templates: every value is escaped unless marked
//! `PreEscaped`, which only the style sheet is. Charts are inline SVG drawn here.

use std::collections::{BTreeMap, HashMap};

use maud::{DOCTYPE, Markup, PreEscaped, html};
use serde_json::Value;
use shotlabel_core::records::{
    BatchPhase, BatchRecord, FailedRecord, HarvestCounts, LabelRecord, unix_now,
};

use super::analysis::{Field, TaskView, display_value, failure_stages};
use super::gather::BucketData;
use super::thumbnails::{Thumb, Thumbnail};
use super::{EMULATOR_MODEL, ReportSummary};

/// A caption value is cut after this many characters.
const MAX_CAPTION_CHARS: usize = 240;
/// At most this many failed records (and unreadable ones) and batches are listed; all
/// are counted.
const MAX_FAILED_ROWS: usize = 2000;
const MAX_BATCH_ROWS: usize = 500;

const STYLE: &str = include_str!("style.css");

/// Everything the page shows.
#[derive(Debug)]
pub(super) struct Page<'a> {
    pub bucket: &'a str,
    pub input_prefix: &'a str,
    pub data: &'a BucketData,
    pub tasks: &'a [TaskView],
    /// By index into `data.labels`; a label without one is left out of the gallery.
    pub thumbnails: &'a HashMap<usize, Thumb>,
    pub summary: &'a ReportSummary,
    pub max_thumbnails: usize,
}

impl Page<'_> {
    /// The whole page as one HTML document.
    pub(super) fn render(&self) -> String {
        let synthetic = self.summary.emulator_labels > 0;
        html! {
            (DOCTYPE)
            html lang="en" {
                head {
                    meta charset="utf-8";
                    meta name="viewport" content="width=device-width, initial-scale=1";
                    title {
                        "shotlabel report: " (self.bucket)
                        @if synthetic { " (synthetic emulator labels)" }
                    }
                    // Not escaped: the style sheet is this crate's own constant, and a
                    // <style> element does not decode entities, so escaping its quotes
                    // would break it.
                    style { (PreEscaped(STYLE)) }
                }
                body {
                    main {
                        header {
                            h1 { "shotlabel report" }
                            p.meta {
                                "Bucket " code { (self.bucket) }
                                ", inputs under " code { (self.input_prefix) }
                                ", generated " (utc(unix_now())) "."
                            }
                        }
                        @if synthetic { (self.emulator_warning()) }
                        @if !self.data.unreadable.is_empty() { (self.problems()) }
                        (self.counts())
                        @for (t, task) in self.tasks.iter().enumerate() {
                            (self.task(t, task))
                        }
                        @if self.tasks.is_empty() {
                            h2 { "Labels" }
                            p.empty { "No labels yet." }
                        }
                        (self.failures())
                        (self.batches())
                        footer {
                            "Written by " code { "shotlabel report" } ". Self-contained: every \
                             chart and thumbnail is inside this file."
                        }
                    }
                }
            }
        }
        .into_string()
    }

    fn emulator_warning(&self) -> Markup {
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
        html! {
            div.warning #emulator-warning role="alert" {
                strong { "Synthetic labels: emulator output, not a model's judgement." }
                (which) " came from " code { (EMULATOR_MODEL) } ", the bundled batch emulator. \
                Its answers are derived from the image bytes to exercise the pipeline; they say \
                nothing about the images. Do not use them as data."
            }
        }
    }

    fn problems(&self) -> Markup {
        let unreadable = &self.data.unreadable;
        html! {
            div.warning.problems #unreadable {
                strong {
                    (plural(unreadable.len(), "record", "records")) " could not be read and "
                    (if unreadable.len() == 1 { "is" } else { "are" }) " not counted."
                }
                ul {
                    @for (key, reason) in unreadable.iter().take(MAX_FAILED_ROWS) {
                        li { code { (key) } ": " (clip(reason, 500)) }
                    }
                }
            }
        }
    }

    fn counts(&self) -> Markup {
        let s = self.summary;
        let stat = |id: &str, name: &str, value: u64, note: Option<String>| {
            html! {
                div {
                    dt { (name) }
                    dd id=(format!("count-{id}")) { (thousands(value)) }
                    @if let Some(note) = note { small { (note) } }
                }
            }
        };
        let tokens = format!(
            "{} prompt, {} completion",
            thousands(s.prompt_tokens),
            thousands(s.completion_tokens)
        );
        html! {
            section #counts {
                h2 { "Counts" }
                dl.counts {
                    (stat("images", "Images", s.images as u64,
                        Some(format!("under {}", self.input_prefix))))
                    (stat("labelled", "Labelled", s.labelled as u64, None))
                    (stat("failed", "Failed", s.failed as u64, None))
                    (stat("in-progress", "In progress", s.in_progress as u64,
                        Some("no terminal record yet".into())))
                    (stat("batches", "Batches", s.batches as u64, None))
                    (stat("retried", "Retried", s.retried, Some("items sent round again".into())))
                    (stat("tokens", "Tokens", s.prompt_tokens + s.completion_tokens, Some(tokens)))
                    @if s.duplicates > 0 {
                        (stat("duplicates", "Duplicates", s.duplicates,
                            Some("answers not written".into())))
                    }
                }
            }
        }
    }

    fn task(&self, t: usize, task: &TaskView) -> Markup {
        let uncharted: Vec<&Field> = task.fields.iter().filter(|f| !f.charted()).collect();
        html! {
            section.task id=(format!("task-{t}")) {
                h2 {
                    "Task " code { (task.name) } " "
                    span.n { (plural(task.labels.len(), "label", "labels")) }
                }
                p.meta {
                    "Versions: " (counted_list(&task.versions))
                    ". Models: " (counted_list(&task.models)) "."
                }
                h3 { "Label distribution" }
                div.charts {
                    @for field in task.fields.iter().filter(|f| f.charted()) {
                        (bar_chart(field))
                    }
                }
                @if !uncharted.is_empty() {
                    p.uncharted {
                        "Not charted, shown under each thumbnail: "
                        @for (i, field) in uncharted.iter().enumerate() {
                            @if i > 0 { ", " }
                            code { (field.name) } " (" (field.note.unwrap_or("")) ")"
                        }
                        "."
                    }
                }
                (self.gallery(t, task))
            }
        }
    }

    fn gallery(&self, t: usize, task: &TaskView) -> Markup {
        let shown = task
            .labels
            .iter()
            .filter(|i| self.thumbnails.contains_key(i))
            .count();
        let left_out = task.labels.len() - shown;
        html! {
            h3 id=(format!("gallery-{t}")) { "Gallery" }
            @if left_out > 0 {
                p.more id=(format!("left-out-{t}")) {
                    "Showing " (thousands(shown as u64)) " of "
                    (thousands(task.labels.len() as u64)) " labelled images: "
                    (thousands(left_out as u64)) " left out by the thumbnail cap of "
                    (thousands(self.max_thumbnails as u64)) " (" code { "--max-thumbnails" } ")."
                }
            }
            @match task.primary {
                Some(primary) => { (self.groups(task, &task.fields[primary])) }
                None => {
                    section.group {
                        h4 { "All labelled images" }
                        @for group in &task.groups { (self.thumbs(task, &group.labels)) }
                    }
                }
            }
        }
    }

    /// One section per category of the primary field, split by the secondary field.
    fn groups(&self, task: &TaskView, primary: &Field) -> Markup {
        let secondary = task.secondary.map(|s| &task.fields[s]);
        // Labels outside every category (not expected: the categories cover what was seen).
        let strays: Vec<usize> = task
            .groups
            .iter()
            .filter(|g| g.primary.is_none())
            .flat_map(|g| g.labels.iter().copied())
            .collect();
        html! {
            @for (c, category) in primary.categories.iter().enumerate() {
                section.group data-field=(primary.name) data-value=(category.display)
                    data-count=(category.count) {
                    h4 {
                        (primary.name) ": " (category.display) " "
                        span.n { (plural(category.count, "image", "images")) }
                    }
                    @let groups: Vec<_> = task.groups.iter().filter(|g| g.primary == Some(c)).collect();
                    @if groups.is_empty() { p.empty { "No images." } }
                    @for group in groups {
                        @if let (Some(field), Some(s)) = (secondary, group.secondary) {
                            h5 {
                                (field.name) ": " (field.categories[s].display) " "
                                span.n { (plural(group.labels.len(), "image", "images")) }
                            }
                        }
                        (self.thumbs(task, &group.labels))
                    }
                }
            }
            @if !strays.is_empty() {
                section.group {
                    h4 { "Other values " span.n { (plural(strays.len(), "image", "images")) } }
                    (self.thumbs(task, &strays))
                }
            }
        }
    }

    /// The thumbnails of some labels, and how many of them the cap left out.
    fn thumbs(&self, task: &TaskView, labels: &[usize]) -> Markup {
        let hidden = labels
            .iter()
            .filter(|i| !self.thumbnails.contains_key(i))
            .count();
        html! {
            div.thumbs {
                @for &i in labels {
                    @if let Some(thumb) = self.thumbnails.get(&i) {
                        (thumb_figure(task, &self.data.labels[i].1, thumb))
                    }
                }
            }
            @if hidden > 0 {
                p.more {
                    (thousands(hidden as u64)) " more "
                    (if hidden == 1 { "image" } else { "images" }) " not shown."
                }
            }
        }
    }

    fn failures(&self) -> Markup {
        let failed = &self.data.failed;
        html! {
            section #failed {
                h2 { "Failed " span.n { (plural(failed.len(), "image", "images")) } }
                @if failed.is_empty() {
                    p.empty { "Nothing failed." }
                } @else {
                    div.charts { (bar_chart(&failure_stages(failed))) }
                    table #failed-table {
                        thead {
                            tr { th { "Key" } th.num { "Attempt" } th { "Stage" } th { "Reason" } }
                        }
                        tbody {
                            @for (_, record) in failed.iter().take(MAX_FAILED_ROWS) {
                                (failed_rows(record))
                            }
                        }
                    }
                    @if failed.len() > MAX_FAILED_ROWS {
                        p.more {
                            (thousands((failed.len() - MAX_FAILED_ROWS) as u64))
                            " more failed images not listed."
                        }
                    }
                }
            }
        }
    }

    fn batches(&self) -> Markup {
        let mut batches: Vec<&BatchRecord> = self.data.batches.iter().map(|(_, b)| b).collect();
        batches.sort_by_key(|b| std::cmp::Reverse(b.submitted_at));
        html! {
            section #batches {
                h2 { "Batches " span.n { (thousands(batches.len() as u64)) } }
                @if batches.is_empty() {
                    p.empty { "No batch records." }
                } @else {
                    table #batch-table {
                        thead {
                            tr {
                                th { "Batch" } th { "Submitted" } th { "Phase" }
                                th { "Provider status" } th.num { "Requests" }
                                th.num { "Labelled" } th.num { "Retried" } th.num { "Failed" }
                                th.num { "Duplicates" } th.num { "Tokens" }
                            }
                        }
                        tbody {
                            @for batch in batches.iter().take(MAX_BATCH_ROWS) {
                                (batch_row(batch))
                            }
                        }
                    }
                    @if batches.len() > MAX_BATCH_ROWS {
                        p.more {
                            (thousands((batches.len() - MAX_BATCH_ROWS) as u64))
                            " older batches not listed."
                        }
                    }
                }
            }
        }
    }
}

/// `<code>a</code> (3), <code>b</code> (1)`.
fn counted_list(counts: &BTreeMap<String, usize>) -> Markup {
    html! {
        @for (i, (name, n)) in counts.iter().enumerate() {
            @if i > 0 { ", " }
            code { (name) } " (" (thousands(*n as u64)) ")"
        }
    }
}

/// One gallery entry: the thumbnail (or a box saying why there is none) and a caption
/// with the key, the fields the gallery is not grouped by, and notes.
fn thumb_figure(task: &TaskView, record: &LabelRecord, thumb: &Thumb) -> Markup {
    let key = &record.source.key;
    let mut notes = Vec::new();
    if let Thumb::Image { thumbnail, changed } = thumb {
        if let Some((width, height)) = thumbnail.cropped_from {
            notes.push(format!("top of a {width}×{height} image"));
        }
        if *changed {
            notes.push("the image changed after it was labelled".to_owned());
        }
    }
    let captioned = task
        .fields
        .iter()
        .enumerate()
        .filter(|(f, _)| Some(*f) != task.primary && Some(*f) != task.secondary)
        .map(|(_, field)| field);
    html! {
        figure.thumb {
            @match thumb {
                Thumb::Image { thumbnail: Thumbnail { data_uri, width, height, .. }, .. } => {
                    img src=(data_uri) width=(width) height=(height) alt=(key);
                }
                Thumb::Placeholder { reason } => {
                    div.placeholder role="img" aria-label="no thumbnail" {
                        b { "No thumbnail" } code { (key) } span { (clip(reason, 300)) }
                    }
                }
            }
            figcaption {
                code { (key) }
                @for field in captioned {
                    span {
                        (field.name) ": "
                        (clip(&display_value(record.label.get(&field.name).unwrap_or(&Value::Null)),
                            MAX_CAPTION_CHARS))
                    }
                }
                @if record.attempt > 0 { span { "labelled at attempt " (record.attempt + 1) } }
                @for note in notes { span { (note) } }
            }
        }
    }
}

/// A failed image's rows: one per attempt, the key spanning them all.
fn failed_rows(record: &FailedRecord) -> Markup {
    let key_cell = html! {
        td rowspan=(record.reasons.len().max(1)) { code { (record.source.key) } }
    };
    if record.reasons.is_empty() {
        return html! { tr { (key_cell) td {} td {} td { "(no reason recorded)" } } };
    }
    html! {
        @for (r, reason) in record.reasons.iter().enumerate() {
            tr {
                @if r == 0 { (key_cell) }
                td.num { (reason.attempt + 1) }
                td { (reason.stage) }
                td { (clip(&reason.reason, 2000)) }
            }
        }
    }
}

fn batch_row(batch: &BatchRecord) -> Markup {
    let phase = match batch.phase {
        BatchPhase::Open => "open",
        BatchPhase::Harvested => "harvested",
    };
    let harvest = batch.harvest;
    let counted = |count: fn(&HarvestCounts) -> u64| {
        harvest
            .as_ref()
            .map(count)
            .map(thousands)
            .unwrap_or_default()
    };
    html! {
        tr {
            td { code { (batch.batch_id) } }
            td { (utc(batch.submitted_at)) }
            td { (phase) }
            td { (batch.provider_status.as_deref().unwrap_or("")) }
            td.num { (thousands(batch.requests)) }
            td.num { (counted(|h| h.labelled)) }
            td.num { (counted(|h| h.retried)) }
            td.num { (counted(|h| h.failed)) }
            td.num { (counted(|h| h.duplicates)) }
            td.num { (counted(|h| h.prompt_tokens + h.completion_tokens)) }
        }
    }
}

/// A horizontal bar chart of a field's categories, as inline SVG.
fn bar_chart(field: &Field) -> Markup {
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
    let name = &field.name;
    // Every element is closed explicitly (`{}`): inside <svg> the HTML parser nests an
    // unclosed <rect> and hides whatever follows it.
    html! {
        figure.chart data-field=(name) {
            figcaption { (name) }
            svg width=(width) height=(height) viewBox=(format!("0 0 {width} {height}"))
                role="img" aria-label=(format!("distribution of {name}")) {
                title { "distribution of " (name) }
                @for (i, category) in field.categories.iter().enumerate() {
                    @let y = 2 + i * ROW_H;
                    @let bar = (category.count * BAR_W).div_ceil(most).min(BAR_W);
                    @let percent = if total == 0 {
                        0.0
                    } else {
                        category.count as f64 * 100.0 / total as f64
                    };
                    g.row data-value=(category.display) data-count=(category.count) {
                        text x=(LABEL_W - 8) y=(y + 17) text-anchor="end" {
                            (clip(&category.display, 20))
                        }
                        rect.track x=(LABEL_W) y=(y + 4) width=(BAR_W) height=(ROW_H - 8) rx="3" {}
                        rect.bar x=(LABEL_W) y=(y + 4) width=(bar) height=(ROW_H - 8) rx="3" {}
                        text x=(LABEL_W + BAR_W + 8) y=(y + 17) {
                            (category.count) " (" (format!("{percent:.0}")) "%)"
                        }
                    }
                }
            }
        }
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

/// "1 image", "1,024 images".
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

#[cfg(test)]
mod tests {
    use super::super::analysis::{Category, FieldKind};
    use super::*;

    #[test]
    fn formats_numbers_dates_and_clips() {
        assert_eq!(thousands(0), "0");
        assert_eq!(thousands(1234567), "1,234,567");
        assert_eq!(utc(0), "1970-01-01 00:00 UTC");
        assert_eq!(utc(1_700_000_000), "2023-11-14 22:13 UTC");
        assert_eq!(clip("abcdef", 3), "abc…");
        assert_eq!(clip("abc", 3), "abc");
        assert_eq!(plural(1, "image", "images"), "1 image");
        assert_eq!(plural(1024, "image", "images"), "1,024 images");
    }

    #[test]
    fn a_chart_escapes_what_came_from_the_bucket_and_closes_its_shapes() {
        let hostile = "<script>alert('x')</script> & \"q\"";
        let chart = bar_chart(&Field {
            name: hostile.into(),
            kind: FieldKind::Category,
            note: None,
            categories: vec![Category {
                key: "\"v\"".into(),
                display: hostile.into(),
                count: 3,
            }],
        })
        .into_string();
        assert!(!chart.contains("<script"), "{chart}");
        assert!(chart.contains(
            "data-field=\"&lt;script&gt;alert('x')&lt;/script&gt; &amp; &quot;q&quot;\""
        ));
        assert_eq!(
            chart.matches("<rect").count(),
            chart.matches("</rect>").count()
        );
        assert!(chart.contains("3 (100%)"), "{chart}");
    }
}
