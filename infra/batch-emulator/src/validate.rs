//! Input file validation, done the way a provider does it before running a
//! batch: any problem fails the whole batch with per-line errors.

use std::collections::HashSet;

use serde::Serialize;
use serde_json::Value;

/// One entry of a failed batch's `errors.data`.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct BatchErrorEntry {
    pub code: &'static str,
    pub message: String,
    pub param: Option<&'static str>,
    /// 1-based line number, when the error belongs to a line.
    pub line: Option<usize>,
}

impl BatchErrorEntry {
    fn at(line: usize, code: &'static str, param: Option<&'static str>, message: String) -> Self {
        Self {
            code,
            message,
            param,
            line: Some(line),
        }
    }

    fn file(code: &'static str, message: String) -> Self {
        Self {
            code,
            message,
            param: None,
            line: None,
        }
    }
}

/// A request line that passed validation.
#[derive(Debug, Clone)]
pub struct ValidRequest {
    pub custom_id: String,
    pub body: Value,
}

#[derive(Debug)]
pub struct Validated {
    pub requests: Vec<ValidRequest>,
    pub model: String,
}

/// More than this many line errors are not worth listing.
const MAX_ERRORS: usize = 100;

/// Checks every line of a batch input file.
pub fn validate_input(
    data: &[u8],
    endpoint: &str,
    max_requests: usize,
    max_bytes: u64,
) -> Result<Validated, Vec<BatchErrorEntry>> {
    if data.len() as u64 > max_bytes {
        return Err(vec![BatchErrorEntry::file(
            "file_too_large",
            format!(
                "The input file is {} bytes; the limit is {max_bytes} bytes.",
                data.len()
            ),
        )]);
    }
    let Ok(text) = std::str::from_utf8(data) else {
        return Err(vec![BatchErrorEntry::file(
            "invalid_file_format",
            "The input file is not UTF-8 text.".into(),
        )]);
    };
    // A trailing newline ends the last line; it does not start an empty one.
    let text = text.strip_suffix('\n').unwrap_or(text);
    if text.trim().is_empty() {
        return Err(vec![BatchErrorEntry::file(
            "empty_file",
            "The input file has no requests.".into(),
        )]);
    }
    let lines: Vec<&str> = text.split('\n').collect();
    if lines.len() > max_requests {
        return Err(vec![BatchErrorEntry::file(
            "too_many_requests",
            format!(
                "The input file has {} requests; the limit is {max_requests} per batch.",
                lines.len()
            ),
        )]);
    }

    let mut errors = Vec::new();
    let mut requests = Vec::with_capacity(lines.len());
    let mut seen = HashSet::new();
    let mut model: Option<String> = None;
    for (index, raw) in lines.iter().enumerate() {
        if errors.len() >= MAX_ERRORS {
            break;
        }
        let n = index + 1;
        let raw = raw.strip_suffix('\r').unwrap_or(raw);
        let value: Value = match serde_json::from_str(raw) {
            Ok(v) => v,
            Err(e) => {
                errors.push(BatchErrorEntry::at(
                    n,
                    "invalid_json_line",
                    None,
                    format!("This line is not parseable as valid JSON: {e}"),
                ));
                continue;
            }
        };
        let Value::Object(mut obj) = value else {
            errors.push(BatchErrorEntry::at(
                n,
                "invalid_json_line",
                None,
                "This line is not a JSON object.".into(),
            ));
            continue;
        };
        let before = errors.len();
        let custom_id = match obj.get("custom_id") {
            Some(Value::String(id)) if !id.is_empty() => {
                if !seen.insert(id.clone()) {
                    errors.push(BatchErrorEntry::at(
                        n,
                        "duplicate_custom_id",
                        Some("custom_id"),
                        format!("The custom_id {id:?} is used more than once in this file."),
                    ));
                }
                id.clone()
            }
            _ => {
                errors.push(BatchErrorEntry::at(
                    n,
                    "missing_custom_id",
                    Some("custom_id"),
                    "Each line needs a non-empty string custom_id.".into(),
                ));
                String::new()
            }
        };
        if obj.get("method").and_then(Value::as_str) != Some("POST") {
            errors.push(BatchErrorEntry::at(
                n,
                "invalid_method",
                Some("method"),
                "The method must be POST.".into(),
            ));
        }
        let url = obj.get("url").and_then(Value::as_str).unwrap_or_default();
        if url != endpoint {
            errors.push(BatchErrorEntry::at(
                n,
                "url_mismatch",
                Some("url"),
                format!("The url {url:?} does not match the batch endpoint {endpoint:?}."),
            ));
        }
        let body = obj.remove("body").unwrap_or(Value::Null);
        if !body.is_object() {
            errors.push(BatchErrorEntry::at(
                n,
                "missing_body",
                Some("body"),
                "Each line needs a JSON object body.".into(),
            ));
        } else {
            match body.get("model").and_then(Value::as_str) {
                Some(m) if !m.is_empty() => match &model {
                    None => model = Some(m.to_owned()),
                    Some(first) if first != m => errors.push(BatchErrorEntry::at(
                        n,
                        "model_mismatch",
                        Some("body.model"),
                        format!(
                            "The model {m:?} differs from the file's model {first:?}; use one model per batch."
                        ),
                    )),
                    Some(_) => {}
                },
                _ => errors.push(BatchErrorEntry::at(
                    n,
                    "missing_model",
                    Some("body.model"),
                    "Each request body needs a model.".into(),
                )),
            }
        }
        if errors.len() == before {
            requests.push(ValidRequest { custom_id, body });
        }
    }
    if !errors.is_empty() {
        return Err(errors);
    }
    Ok(Validated {
        requests,
        model: model.unwrap_or_default(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const EP: &str = "/v1/chat/completions";

    fn line(id: &str, model: &str) -> String {
        format!(
            r#"{{"custom_id":"{id}","method":"POST","url":"{EP}","body":{{"model":"{model}","messages":[]}}}}"#
        )
    }

    #[test]
    fn accepts_good_file_with_trailing_newline() {
        let file = format!("{}\n{}\n", line("a", "m"), line("b", "m"));
        let v = validate_input(file.as_bytes(), EP, 10, 1 << 20).expect("valid");
        assert_eq!(v.requests.len(), 2);
        assert_eq!(v.model, "m");
    }

    #[test]
    fn reports_line_numbers() {
        let file = format!(
            "{}\nnot json\n{}\n{}",
            line("a", "m"),
            line("a", "m"),
            line("c", "x")
        );
        let errors = validate_input(file.as_bytes(), EP, 10, 1 << 20).expect_err("invalid");
        let got: Vec<_> = errors.iter().map(|e| (e.code, e.line)).collect();
        assert_eq!(
            got,
            vec![
                ("invalid_json_line", Some(2)),
                ("duplicate_custom_id", Some(3)),
                ("model_mismatch", Some(4))
            ]
        );
    }
}
