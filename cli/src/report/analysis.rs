//! What the records say: the counts and tokens, each task's label fields and their
//! distributions, the gallery's groups, and which labels get a thumbnail.

use std::collections::{BTreeMap, HashMap, HashSet};

use serde_json::Value;
use shotlabel_core::records::{FailedRecord, LabelRecord, Layout};
use shotlabel_core::task::Task;

use super::gather::BucketData;
use super::{EMULATOR_MODEL, ReportSummary};

/// More distinct values than this and a field is not charted.
const MAX_CATEGORIES: usize = 24;
/// A string longer than this is free text, not a category.
const MAX_CATEGORY_CHARS: usize = 40;
/// The most categories a field may have to split the gallery's groups.
const MAX_SECONDARY_CATEGORIES: usize = 6;

/// The counts of a report, except the gallery's (which depend on the thumbnails).
pub(super) fn summarise(data: &BucketData, input_prefix: &str) -> ReportSummary {
    let (mut retried, mut duplicates, mut prompt, mut completion) = (0, 0, 0, 0);
    for harvest in data.batches.iter().filter_map(|(_, b)| b.harvest) {
        retried += harvest.retried;
        duplicates += harvest.duplicates;
        prompt += harvest.prompt_tokens;
        completion += harvest.completion_tokens;
    }
    if prompt + completion == 0 {
        // No harvest counted tokens (or no batch records): what the labels say.
        for usage in data
            .labels
            .iter()
            .filter_map(|(_, l)| l.provenance.usage.as_ref())
        {
            prompt += usage.prompt_tokens;
            completion += usage.completion_tokens;
        }
    }
    ReportSummary {
        images: data.inputs.len(),
        labelled: data.labels.len(),
        failed: data.failed.len(),
        in_progress: in_progress(data, input_prefix),
        batches: data.batches.len(),
        retried,
        duplicates,
        prompt_tokens: prompt,
        completion_tokens: completion,
        emulator_labels: data
            .labels
            .iter()
            .filter(|(_, l)| l.model == EMULATOR_MODEL)
            .count(),
        unreadable_records: data.unreadable.len(),
        ..ReportSummary::default()
    }
}

/// Inputs that have no terminal record yet: no label row names them as its source, and
/// no failed record is at their key (from the layout, which shortens keys that would be
/// over S3's limit).
fn in_progress(data: &BucketData, input_prefix: &str) -> usize {
    let labelled: HashSet<&str> = data
        .labels
        .iter()
        .map(|(_, label)| label.source.key.as_str())
        .collect();
    let failed: HashSet<&str> = data.failed.iter().map(|(k, _)| k.as_str()).collect();
    let layout = Layout::new(input_prefix);
    data.inputs
        .iter()
        .filter(|k| {
            let relative = layout.relative_or_key(k);
            !labelled.contains(k.as_str()) && !failed.contains(layout.failed_key(relative).as_str())
        })
        .count()
}

/// How a label field is shown.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum FieldKind {
    Bool,
    Integer,
    /// Short strings from a small set.
    Category,
    /// Free text, arrays, objects, fractions, or too many distinct values: shown in
    /// captions, not charted.
    Caption,
}

/// One value of a field and how many labels have it.
#[derive(Debug, Clone)]
pub(super) struct Category {
    /// The value as JSON text (unique per value), or [`MISSING`].
    pub key: String,
    pub display: String,
    pub count: usize,
}

/// The category key of an absent or null value; no JSON text starts with NUL.
const MISSING: &str = "\u{0}missing";

/// A label field (or any counted property, such as the stage a failure stopped at).
#[derive(Debug, Clone)]
pub(super) struct Field {
    pub name: String,
    pub kind: FieldKind,
    /// Why a field is not charted, for the page.
    pub note: Option<&'static str>,
    /// In display order; empty for captions.
    pub categories: Vec<Category>,
}

impl Field {
    pub(super) fn charted(&self) -> bool {
        self.kind != FieldKind::Caption
    }
}

/// The labels of one task, and how they are shown.
#[derive(Debug)]
pub(super) struct TaskView {
    pub name: String,
    /// Index into the label list, in key order.
    pub labels: Vec<usize>,
    pub versions: BTreeMap<String, usize>,
    pub models: BTreeMap<String, usize>,
    pub fields: Vec<Field>,
    /// The field the gallery is grouped by, and the one each group is split by.
    pub primary: Option<usize>,
    pub secondary: Option<usize>,
    /// Gallery groups, each label in exactly one.
    pub groups: Vec<Group>,
}

/// The labels that share a primary (and secondary) category.
#[derive(Debug)]
pub(super) struct Group {
    /// Index into the primary field's categories.
    pub primary: Option<usize>,
    /// Index into the secondary field's categories.
    pub secondary: Option<usize>,
    /// Index into the label list.
    pub labels: Vec<usize>,
}

/// The category key a label falls into for a field.
fn category_key(label: &Value, field: &str) -> String {
    match label.get(field) {
        None | Some(Value::Null) => MISSING.to_owned(),
        Some(v) => v.to_string(),
    }
}

/// A label value as a person reads it: yes/no, bare strings, lists joined.
pub(super) fn display_value(value: &Value) -> String {
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

/// One view per task name, the task with the most labels first.
pub(super) fn analyse_tasks(labels: &[(String, LabelRecord)], known: &[Task]) -> Vec<TaskView> {
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

    let fields: Vec<Field> = field_names(&indices, labels, schema)
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
            .find(|(i, f)| *i != p && f.charted() && f.categories.len() <= MAX_SECONDARY_CATEGORIES)
            .map(|(i, _)| i)
    });
    let groups = group_labels(&indices, labels, &fields, primary, secondary);

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

/// Field order: the schema's `required`, its other properties, then anything seen.
fn field_names(
    indices: &[usize],
    labels: &[(String, LabelRecord)],
    schema: Option<&Value>,
) -> Vec<String> {
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
    for &i in indices {
        if let Some(object) = labels[i].1.label.as_object() {
            for n in object.keys() {
                push(n);
            }
        }
    }
    names
}

/// The gallery's groups, in category order, each label in exactly one.
fn group_labels(
    indices: &[usize],
    labels: &[(String, LabelRecord)],
    fields: &[Field],
    primary: Option<usize>,
    secondary: Option<usize>,
) -> Vec<Group> {
    let position = |field: Option<usize>, label: &Value| -> Option<usize> {
        let f = &fields[field?];
        let key = category_key(label, &f.name);
        f.categories.iter().position(|c| c.key == key)
    };
    let mut buckets: BTreeMap<(Option<usize>, Option<usize>), Vec<usize>> = BTreeMap::new();
    for &i in indices {
        let label = &labels[i].1.label;
        buckets
            .entry((position(primary, label), position(secondary, label)))
            .or_default()
            .push(i);
    }
    buckets
        .into_iter()
        .map(|((primary, secondary), labels)| Group {
            primary,
            secondary,
            labels,
        })
        .collect()
}

/// How a field's values are shown: charted with every category (the schema's, when it
/// has an enum or a small integer range, so an unused value still gets its bar), or
/// captioned with the reason why not.
pub(super) fn analyse_field(name: String, values: &[&Value], property: Option<&Value>) -> Field {
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

/// The stage each failed image's last attempt failed at, most common first, charted
/// like a label field.
pub(super) fn failure_stages(failed: &[(String, FailedRecord)]) -> Field {
    let mut stages: BTreeMap<String, usize> = BTreeMap::new();
    for (_, record) in failed {
        let stage = record
            .reasons
            .last()
            .map_or("(no reason recorded)", |r| r.stage.as_str());
        *stages.entry(stage.to_owned()).or_insert(0) += 1;
    }
    let mut categories: Vec<Category> = stages
        .into_iter()
        .map(|(stage, count)| Category {
            key: stage.clone(),
            display: stage,
            count,
        })
        .collect();
    categories.sort_by_key(|c| std::cmp::Reverse(c.count));
    Field {
        name: "stage of the last attempt".into(),
        kind: FieldKind::Category,
        note: None,
        categories,
    }
}

/// Which labels get a thumbnail: the cap shared round-robin between the gallery's
/// groups (across tasks), so every group shows some.
pub(super) fn choose_thumbnails(tasks: &[TaskView], cap: usize) -> Vec<usize> {
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

#[cfg(test)]
mod tests {
    use super::*;

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
}
