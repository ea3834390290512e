//! Labels compared with a hand-labelled gold set (`shotlabel eval`).
//!
//! The gold set maps image names to expected answers; the labels map object keys to the
//! model's answers (an export's `labels.jsonl`). [`evaluate`] pairs them and scores each
//! field of the task's answer schema by its kind:
//!
//! - **categorical** (booleans, enums of strings): accuracy, Cohen's kappa, confusion matrix;
//! - **ordinal** (integers with an `enum`, or with both `minimum` and `maximum`, at most
//!   [`MAX_ORDINAL_CATEGORIES`] values; like `aesthetic` 1..5): accuracy, mean absolute
//!   error, quadratic-weighted kappa, confusion matrix;
//! - **other** (free strings, arrays, objects, numbers): exact-match accuracy only.
//!
//! **Matching.** A gold key matches a label key when they are equal or the label key ends
//! with `"/" + gold key`: the gold set names files (`saas-landing.png`), labels carry
//! their S3 key (`incoming/saas-landing.png`), and a gold key with folders
//! (`2024/a.png`) matches only keys ending in those folders. A gold key that matches
//! several labels, or whose one label another gold key also matches, is reported as
//! ambiguous and left out: guessing could score an image against another's label.
//!
//! Numbers are compared by value (`5` equals `5.0`). A field the gold answer leaves out is
//! not scored for that image (a gold set may rate only some fields); a field the label
//! lacks counts as `null`.

mod input;
pub mod metrics;
mod text;

pub use input::{LabelsFile, parse_gold, parse_labels_jsonl};

use std::collections::{BTreeMap, BTreeSet, HashMap};

use arrow_schema::DataType;
use serde::Serialize;
use serde_json::{Map, Value};

use crate::dataset::schema::data_type;
use crate::task::Task;

/// The most values an integer field may have to be scored as ordinal (a rating scale);
/// a wider range would make a confusion matrix no one can read.
pub const MAX_ORDINAL_CATEGORIES: i64 = 100;

/// Why a gold or labels file could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EvalError {
    #[error("the gold set has no images")]
    EmptyGold,
    #[error(
        "expected a JSON object mapping image names to answers, or JSON Lines with a \"key\" or \"file_name\" per line"
    )]
    UnknownShape,
    #[error("image {key:?}: the expected answer is not a JSON object")]
    NotAnObject { key: String },
    #[error("line {line}: {detail}")]
    Line { line: usize, detail: String },
    #[error("line {line}: no {wanted} string")]
    NoKey { line: usize, wanted: &'static str },
    #[error("line {line}: {key:?} again (first on line {first})")]
    Duplicate {
        line: usize,
        first: usize,
        key: String,
    },
}

/// How a field is scored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FieldKind {
    Categorical,
    Ordinal,
    Other,
}

impl FieldKind {
    fn as_str(self) -> &'static str {
        match self {
            Self::Categorical => "categorical",
            Self::Ordinal => "ordinal",
            Self::Other => "other",
        }
    }
}

/// Everything `shotlabel eval` reports.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct EvalReport {
    pub task: String,
    pub task_version: String,
    pub counts: Counts,
    /// Matched images whose every gold field agrees with the label.
    pub all_fields: ExactMatch,
    /// One per property of the task's answer schema, in the schema's order.
    pub fields: Vec<FieldReport>,
    /// Gold keys no label matches.
    pub gold_without_label: Vec<String>,
    pub ambiguous: Vec<AmbiguousMatch>,
    /// Fields of gold answers the task's schema does not have (typos, another task's).
    pub unknown_gold_fields: Vec<String>,
    /// Gold values of categorical and ordinal fields the schema does not allow.
    pub unexpected_gold_values: Vec<GoldValue>,
    /// Every scored (image, field) where gold and label differ, by gold key then field.
    pub disagreements: Vec<Disagreement>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Counts {
    pub gold_images: u64,
    pub labels: u64,
    /// Gold images paired with exactly one label.
    pub matched: u64,
    pub gold_without_label: u64,
    /// Gold images left out because their match is ambiguous.
    pub ambiguous: u64,
    /// Labels no gold key matches.
    pub labels_without_gold: u64,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct ExactMatch {
    /// Matched images whose gold answer has at least one of the task's fields.
    pub compared: u64,
    pub agreed: u64,
    pub accuracy: Option<f64>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct FieldReport {
    pub field: String,
    /// Matched images whose gold answer has this field.
    pub compared: u64,
    pub agreed: u64,
    pub accuracy: Option<f64>,
    /// Matched images whose gold answer leaves this field out (not scored).
    pub gold_missing: u64,
    #[serde(flatten)]
    pub metrics: FieldMetrics,
}

impl FieldReport {
    pub fn kind(&self) -> FieldKind {
        match self.metrics {
            FieldMetrics::Categorical { .. } => FieldKind::Categorical,
            FieldMetrics::Ordinal { .. } => FieldKind::Ordinal,
            FieldMetrics::Other => FieldKind::Other,
        }
    }
}

/// The metrics a field's kind gets; `None` where a metric is undefined (see [`metrics`]).
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum FieldMetrics {
    Categorical {
        kappa: Option<f64>,
        confusion: Option<ConfusionMatrix>,
    },
    Ordinal {
        mean_absolute_error: Option<f64>,
        quadratic_weighted_kappa: Option<f64>,
        confusion: Option<ConfusionMatrix>,
        /// Compared pairs left out of MAE, QWK and the matrix: a value is not an integer.
        unscored: u64,
    },
    Other,
}

/// Rows: gold values; columns: label values; both over `categories`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ConfusionMatrix {
    pub categories: Vec<Value>,
    pub counts: Vec<Vec<u64>>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct AmbiguousMatch {
    pub gold_key: String,
    /// Every label key the gold key matches.
    pub label_keys: Vec<String>,
    /// Other gold keys that match one of those labels.
    pub shared_with: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct GoldValue {
    pub key: String,
    pub field: String,
    pub value: Value,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Disagreement {
    /// The gold key.
    pub key: String,
    pub label_key: String,
    pub field: String,
    pub gold: Value,
    pub label: Value,
}

/// A field's kind and its declared values, from its JSON Schema.
#[derive(Debug, Clone, PartialEq)]
enum Scale {
    Categorical(Vec<Value>),
    Ordinal(Vec<i64>),
    Other,
}

fn scale_of(schema: &Value) -> Scale {
    let declared: Vec<Value> = schema
        .get("enum")
        .and_then(Value::as_array)
        .map(|values| {
            values
                .iter()
                .filter(|v| !v.is_null())
                .map(normalize)
                .collect()
        })
        .unwrap_or_default();
    match data_type(schema) {
        DataType::Boolean => Scale::Categorical(vec![Value::Bool(false), Value::Bool(true)]),
        DataType::Utf8 if !declared.is_empty() && declared.iter().all(Value::is_string) => {
            Scale::Categorical(declared)
        }
        DataType::Int64 => {
            let mut values: Vec<i64> = if declared.is_empty() {
                let bound = |name| schema.get(name).map(normalize).and_then(|v| v.as_i64());
                match (bound("minimum"), bound("maximum")) {
                    (Some(min), Some(max))
                        if min <= max && max.saturating_sub(min) < MAX_ORDINAL_CATEGORIES =>
                    {
                        (min..=max).collect()
                    }
                    _ => return Scale::Other,
                }
            } else {
                declared.iter().filter_map(Value::as_i64).collect()
            };
            values.sort_unstable();
            values.dedup();
            if values.is_empty() || values.len() as i64 > MAX_ORDINAL_CATEGORIES {
                Scale::Other
            } else {
                Scale::Ordinal(values)
            }
        }
        _ => Scale::Other,
    }
}

/// Numbers with no fractional part as integers, so that `5.0` equals `5`.
fn normalize(value: &Value) -> Value {
    match value {
        Value::Number(n) if n.as_i64().is_none() && n.as_u64().is_none() => match n.as_f64() {
            Some(f) if f.fract() == 0.0 && f >= i64::MIN as f64 && f < i64::MAX as f64 => {
                Value::from(f as i64)
            }
            _ => value.clone(),
        },
        Value::Array(items) => Value::Array(items.iter().map(normalize).collect()),
        Value::Object(map) => {
            Value::Object(map.iter().map(|(k, v)| (k.clone(), normalize(v))).collect())
        }
        _ => value.clone(),
    }
}

/// Gold keys paired with labels by the rule in the module's documentation.
struct Matching<'a> {
    matched: Vec<(&'a str, &'a str)>,
    gold_without_label: Vec<String>,
    ambiguous: Vec<AmbiguousMatch>,
    labels_without_gold: u64,
}

fn match_keys<'a>(
    gold: &'a BTreeMap<String, Value>,
    labels: &'a BTreeMap<String, Value>,
) -> Matching<'a> {
    let mut candidates: BTreeMap<&str, Vec<&str>> =
        gold.keys().map(|k| (k.as_str(), Vec::new())).collect();
    // Gold keys that match each label, found by looking up the label's suffixes (after each
    // '/') rather than testing every gold key against every label.
    let mut claims: HashMap<&str, Vec<&str>> = HashMap::new();
    for label in labels.keys() {
        let suffixes = std::iter::once(label.as_str())
            .chain(label.match_indices('/').map(|(i, _)| &label[i + 1..]));
        for suffix in suffixes {
            if let Some((&gold_key, _)) = candidates.get_key_value(suffix) {
                claims.entry(label.as_str()).or_default().push(gold_key);
                // Labels come in key order, so each list stays sorted.
                if let Some(list) = candidates.get_mut(gold_key) {
                    list.push(label.as_str());
                }
            }
        }
    }
    let mut matching = Matching {
        matched: Vec::new(),
        gold_without_label: Vec::new(),
        ambiguous: Vec::new(),
        labels_without_gold: labels
            .keys()
            .filter(|l| !claims.contains_key(l.as_str()))
            .count() as u64,
    };
    for (gold_key, found) in candidates {
        let mut shared_with: Vec<String> = found
            .iter()
            .flat_map(|label| claims.get(*label).into_iter().flatten())
            .filter(|other| **other != gold_key)
            .map(|other| (*other).to_owned())
            .collect();
        shared_with.sort_unstable();
        shared_with.dedup();
        match found.as_slice() {
            [] => matching.gold_without_label.push(gold_key.to_owned()),
            [label] if shared_with.is_empty() => matching.matched.push((gold_key, label)),
            _ => matching.ambiguous.push(AmbiguousMatch {
                gold_key: gold_key.to_owned(),
                label_keys: found.iter().map(|l| (*l).to_owned()).collect(),
                shared_with,
            }),
        }
    }
    matching
}

/// Compares `labels` (by object key) with `gold` (by image name) on every field of the
/// task's answer schema. See the module's documentation for the matching rule and the
/// metrics each kind of field gets.
pub fn evaluate(
    task: &Task,
    gold: &BTreeMap<String, Value>,
    labels: &BTreeMap<String, Value>,
) -> EvalReport {
    let empty = Map::new();
    let properties = task
        .spec()
        .response_schema
        .schema
        .get("properties")
        .and_then(Value::as_object)
        .unwrap_or(&empty);
    let matching = match_keys(gold, labels);

    let mut unknown_gold_fields: BTreeSet<String> = BTreeSet::new();
    for answer in gold.values() {
        if let Some(answer) = answer.as_object() {
            unknown_gold_fields.extend(
                answer
                    .keys()
                    .filter(|k| !properties.contains_key(*k))
                    .cloned(),
            );
        }
    }

    // (gold key, label key, gold answer, label answer), normalised once.
    let pairs: Vec<(&str, &str, Value, Value)> = matching
        .matched
        .iter()
        .map(|&(gold_key, label_key)| {
            let gold_answer = gold.get(gold_key).map(normalize).unwrap_or(Value::Null);
            let label_answer = labels.get(label_key).map(normalize).unwrap_or(Value::Null);
            (gold_key, label_key, gold_answer, label_answer)
        })
        .collect();

    let mut fields = Vec::with_capacity(properties.len());
    let mut disagreements = Vec::new();
    let mut unexpected_gold_values = Vec::new();
    // Per matched image: (has a gold field, every gold field agrees).
    let mut per_image = vec![(false, true); pairs.len()];
    for (field, schema) in properties {
        let scale = scale_of(schema);
        let mut values: Vec<(Value, Value)> = Vec::new();
        let mut gold_missing = 0;
        for (i, (gold_key, label_key, gold_answer, label_answer)) in pairs.iter().enumerate() {
            let Some(gold_value) = gold_answer.get(field) else {
                gold_missing += 1;
                continue;
            };
            let label_value = label_answer.get(field).cloned().unwrap_or(Value::Null);
            let declared = match &scale {
                Scale::Categorical(allowed) => allowed.contains(gold_value),
                Scale::Ordinal(allowed) => {
                    gold_value.as_i64().is_some_and(|v| allowed.contains(&v))
                }
                Scale::Other => true,
            };
            if !declared {
                unexpected_gold_values.push(GoldValue {
                    key: (*gold_key).to_owned(),
                    field: field.clone(),
                    value: gold_value.clone(),
                });
            }
            per_image[i].0 = true;
            if *gold_value != label_value {
                per_image[i].1 = false;
                disagreements.push(Disagreement {
                    key: (*gold_key).to_owned(),
                    label_key: (*label_key).to_owned(),
                    field: field.clone(),
                    gold: gold_value.clone(),
                    label: label_value.clone(),
                });
            }
            values.push((gold_value.clone(), label_value));
        }
        let compared = values.len() as u64;
        let agreed = values.iter().filter(|(g, l)| g == l).count() as u64;
        let metrics = match scale {
            Scale::Categorical(declared) => categorical_metrics(declared, &values),
            Scale::Ordinal(declared) => ordinal_metrics(declared, &values),
            Scale::Other => FieldMetrics::Other,
        };
        fields.push(FieldReport {
            field: field.clone(),
            compared,
            agreed,
            accuracy: metrics::accuracy(&values),
            gold_missing,
            metrics,
        });
    }
    disagreements.sort_by(|a, b| (&a.key, &a.field).cmp(&(&b.key, &b.field)));

    let compared = per_image.iter().filter(|(scored, _)| *scored).count() as u64;
    let agreed = per_image
        .iter()
        .filter(|(scored, all)| *scored && *all)
        .count() as u64;
    EvalReport {
        task: task.name().to_owned(),
        task_version: task.version().to_owned(),
        counts: Counts {
            gold_images: gold.len() as u64,
            labels: labels.len() as u64,
            matched: matching.matched.len() as u64,
            gold_without_label: matching.gold_without_label.len() as u64,
            ambiguous: matching.ambiguous.len() as u64,
            labels_without_gold: matching.labels_without_gold,
        },
        all_fields: ExactMatch {
            compared,
            agreed,
            accuracy: (compared > 0).then(|| agreed as f64 / compared as f64),
        },
        fields,
        gold_without_label: matching.gold_without_label,
        ambiguous: matching.ambiguous,
        unknown_gold_fields: unknown_gold_fields.into_iter().collect(),
        unexpected_gold_values,
        disagreements,
    }
}

/// The declared categories, then any other value seen (out-of-schema gold values, a
/// missing label's `null`) in a stable order, so the matrix accounts for every pair.
fn categorical_metrics(mut categories: Vec<Value>, values: &[(Value, Value)]) -> FieldMetrics {
    let mut extra: Vec<&Value> = values
        .iter()
        .flat_map(|(g, l)| [g, l])
        .filter(|v| !categories.contains(v))
        .collect();
    extra.sort_by_key(|v| v.to_string());
    extra.dedup();
    categories.extend(extra.into_iter().cloned());
    let confusion = metrics::confusion_matrix(&categories, values)
        .ok()
        .map(|counts| ConfusionMatrix { categories, counts });
    FieldMetrics::Categorical {
        kappa: confusion
            .as_ref()
            .and_then(|m| metrics::cohen_kappa(&m.counts)),
        confusion,
    }
}

/// Integer pairs only; the declared values plus any other integer seen, in order. The
/// weights of QWK are by position in that list (Cohen 1968's categories).
fn ordinal_metrics(mut categories: Vec<i64>, values: &[(Value, Value)]) -> FieldMetrics {
    let integers: Vec<(i64, i64)> = values
        .iter()
        .filter_map(|(g, l)| Some((g.as_i64()?, l.as_i64()?)))
        .collect();
    categories.extend(integers.iter().flat_map(|&(g, l)| [g, l]));
    categories.sort_unstable();
    categories.dedup();
    let counts = metrics::confusion_matrix(&categories, &integers).ok();
    FieldMetrics::Ordinal {
        mean_absolute_error: metrics::mean_absolute_error(&integers),
        quadratic_weighted_kappa: counts
            .as_ref()
            .and_then(|c| metrics::quadratic_weighted_kappa(c)),
        confusion: counts.map(|counts| ConfusionMatrix {
            categories: categories.into_iter().map(Value::from).collect(),
            counts,
        }),
        unscored: (values.len() - integers.len()) as u64,
    }
}
