//! Reading a gold set and an export's `labels.jsonl`.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use serde_json::{Map, Value};

use super::EvalError;

/// A labels file as read: answers by object key, and the task versions they were made
/// under (a file of mixed versions compares answers to different prompts).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct LabelsFile {
    pub labels: BTreeMap<String, Value>,
    pub task_versions: BTreeSet<String>,
}

/// Reads a gold set: a JSON object mapping image name → expected answer object, or JSON
/// Lines with one object per line holding `key` (or `file_name`) and the answer's fields.
/// Export columns (`etag`, `task_version`, `model`, `batch_id`) are dropped, so an edited
/// export can serve as a gold set.
pub fn parse_gold(text: &str) -> Result<BTreeMap<String, Value>, EvalError> {
    if text.trim().is_empty() {
        return Err(EvalError::EmptyGold);
    }
    let gold = match serde_json::from_str::<Value>(text) {
        // One line of JSON Lines parses as a whole object too; its key field tells them apart.
        Ok(Value::Object(map)) if !is_record(&map) => {
            let mut gold = BTreeMap::new();
            for (key, answer) in map {
                if !answer.is_object() {
                    return Err(EvalError::NotAnObject { key });
                }
                gold.insert(key, answer);
            }
            gold
        }
        Ok(Value::Object(_)) | Err(_) => parse_jsonl(text, &["key", "file_name"])?.0,
        Ok(_) => return Err(EvalError::UnknownShape),
    };
    if gold.is_empty() {
        return Err(EvalError::EmptyGold);
    }
    Ok(gold)
}

/// Reads an export's `labels.jsonl`: one object per line, the answer's fields flattened
/// beside `key`, `etag`, `task_version`, `model` and `batch_id`. Two lines for one key
/// (an export with `--include-stale`) are an error, not a silent choice.
pub fn parse_labels_jsonl(text: &str) -> Result<LabelsFile, EvalError> {
    let (labels, task_versions) = parse_jsonl(text, &["key"])?;
    Ok(LabelsFile {
        labels,
        task_versions,
    })
}

fn is_record(map: &Map<String, Value>) -> bool {
    ["key", "file_name"]
        .iter()
        .any(|k| map.get(*k).is_some_and(Value::is_string))
}

type Rows = (BTreeMap<String, Value>, BTreeSet<String>);

/// JSON Lines → answers by the first of `key_fields` each line has; blank lines skipped.
fn parse_jsonl(text: &str, key_fields: &[&'static str]) -> Result<Rows, EvalError> {
    let mut answers = BTreeMap::new();
    let mut versions = BTreeSet::new();
    let mut first_line: HashMap<String, usize> = HashMap::new();
    for (index, raw) in text.lines().enumerate() {
        let line = index + 1;
        if raw.trim().is_empty() {
            continue;
        }
        let row = match serde_json::from_str::<Value>(raw) {
            Ok(Value::Object(row)) => row,
            Ok(_) => {
                return Err(EvalError::Line {
                    line,
                    detail: "not a JSON object".into(),
                });
            }
            Err(e) => {
                return Err(EvalError::Line {
                    line,
                    detail: format!("not JSON: {e}"),
                });
            }
        };
        let Some(key) = key_fields
            .iter()
            .find_map(|k| row.get(*k).and_then(Value::as_str))
            .map(str::to_owned)
        else {
            return Err(EvalError::NoKey {
                line,
                wanted: if key_fields.len() > 1 {
                    "\"key\" or \"file_name\""
                } else {
                    "\"key\""
                },
            });
        };
        if let Some(version) = row.get("task_version").and_then(Value::as_str) {
            versions.insert(version.to_owned());
        }
        if let Some(&first) = first_line.get(&key) {
            return Err(EvalError::Duplicate { line, first, key });
        }
        first_line.insert(key.clone(), line);
        answers.insert(key, Value::Object(answer_of_row(row)));
    }
    Ok((answers, versions))
}

/// A row without the export's columns, with clashing answer fields (`label_key`…) renamed
/// back to their own names.
fn answer_of_row(mut row: Map<String, Value>) -> Map<String, Value> {
    row.remove("file_name");
    for name in crate::dataset::EXPORT_PROVENANCE {
        row.remove(name);
        if let Some(value) = row.remove(&format!("label_{name}")) {
            row.insert(name.to_owned(), value);
        }
    }
    row
}
