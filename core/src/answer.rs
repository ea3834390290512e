//! Reading one line of a batch's output or error file: either a label that passed the
//! task's schema, or the reason the image should go round again.
//!
//! A provider can report success (HTTP 200) for an answer that is useless: cut off at
//! `max_tokens`, a refusal, prose instead of JSON, or JSON that breaks the schema. All of
//! those are retries here, with a short human-readable reason that ends up in the image's
//! failed record if it never succeeds. Reasons are bounded in length and quote at most a
//! short excerpt of what the model wrote, never the whole body.
//!
//! Everything is tolerant of missing or oddly typed fields and never panics.

use crate::records::Stage;
use std::fmt;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::batch_api::OutputLine;
use crate::task::Task;

/// The most characters of model or provider text quoted in a reason.
pub const MAX_EXCERPT_CHARS: usize = 200;
/// The most characters a whole reason may have.
pub const MAX_REASON_CHARS: usize = 1000;
/// The most schema violations listed in a reason; the rest are counted.
const MAX_VIOLATIONS: usize = 5;

/// Token counts a completion reported. Missing counts are 0; a missing total is the sum.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Usage {
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub total_tokens: u64,
}

impl Usage {
    /// Reads a chat completion's `usage` object; `None` when there is none or it holds
    /// none of the three counts.
    pub fn from_value(usage: &Value) -> Option<Self> {
        let obj = usage.as_object()?;
        let prompt = obj.get("prompt_tokens").and_then(count);
        let completion = obj.get("completion_tokens").and_then(count);
        let total = obj.get("total_tokens").and_then(count);
        if prompt.is_none() && completion.is_none() && total.is_none() {
            return None;
        }
        let prompt_tokens = prompt.unwrap_or(0);
        let completion_tokens = completion.unwrap_or(0);
        Some(Self {
            prompt_tokens,
            completion_tokens,
            total_tokens: total.unwrap_or_else(|| prompt_tokens.saturating_add(completion_tokens)),
        })
    }
}

/// A count given as an integer, a float or a numeric string.
fn count(value: &Value) -> Option<u64> {
    match value {
        Value::Number(n) => n.as_u64().or_else(|| {
            n.as_f64()
                .filter(|f| f.is_finite())
                .map(|f| f.max(0.0) as u64)
        }),
        Value::String(s) => s.trim().parse().ok(),
        _ => None,
    }
}

/// A label that parsed and passed the task's schema, with its provenance.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Answer {
    /// The model's JSON answer, schema-checked.
    pub label: Value,
    /// The provider's request id (`response.request_id`).
    pub request_id: Option<String>,
    /// The model that answered, as the completion names it.
    pub model: Option<String>,
    pub finish_reason: Option<String>,
    pub usage: Option<Usage>,
}

/// Why a line is not a usable label.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RetryReason {
    /// [`Stage::Provider`] for failures the provider reported (error-file lines, non-2xx
    /// responses, missing bodies or completions); [`Stage::Validate`] for answers that
    /// arrived but are not a usable label.
    pub stage: Stage,
    /// Human-readable, at most [`MAX_REASON_CHARS`] characters.
    pub reason: String,
    /// What the failed attempt cost, when the provider said.
    pub usage: Option<Usage>,
}

impl RetryReason {
    fn provider(reason: String, usage: Option<Usage>) -> Self {
        Self {
            stage: Stage::Provider,
            reason: truncate(&reason, MAX_REASON_CHARS),
            usage,
        }
    }

    fn validate(reason: String, usage: Option<Usage>) -> Self {
        Self {
            stage: Stage::Validate,
            reason: truncate(&reason, MAX_REASON_CHARS),
            usage,
        }
    }
}

impl fmt::Display for RetryReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.stage, self.reason)
    }
}

/// What the harvester should do with one output or error line.
#[derive(Debug, Clone, PartialEq)]
pub enum LineOutcome {
    /// A valid, schema-checked label.
    Answer(Answer),
    /// Not usable: the image should go round again.
    Retry(RetryReason),
}

impl LineOutcome {
    /// The tokens the attempt used, whatever its outcome, when the provider said.
    pub fn usage(&self) -> Option<&Usage> {
        match self {
            Self::Answer(answer) => answer.usage.as_ref(),
            Self::Retry(retry) => retry.usage.as_ref(),
        }
    }
}

/// Turns one line of a batch's output or error file into a label or a retry.
///
/// In order: an error object with a code or message is a provider retry; a line with
/// no response, a non-2xx status (a missing status is read as unknown, not as failure),
/// a body that is not a JSON object, or a body without a first choice is a provider
/// retry; then `finish_reason` `length` or `content_filter`, empty content (quoting any
/// refusal), content that is not JSON and JSON that breaks the task's schema are
/// validation retries. Everything else is an [`Answer`].
pub fn interpret_line(line: &OutputLine, task: &Task) -> LineOutcome {
    match interpret(line, task) {
        Ok(answer) => LineOutcome::Answer(answer),
        Err(retry) => LineOutcome::Retry(retry),
    }
}

fn interpret(line: &OutputLine, task: &Task) -> Result<Answer, RetryReason> {
    if let Some(error) = &line.error {
        let code = non_empty(error.code.as_deref());
        let message = non_empty(error.message.as_deref());
        // An empty error object next to a response carries nothing: read the response.
        if code.is_some() || message.is_some() || line.response.is_none() {
            return Err(RetryReason::provider(
                describe_error("the provider reported an error", code, message),
                None,
            ));
        }
    }
    let Some(response) = line.response.as_ref() else {
        return Err(RetryReason::provider(
            "the line has neither a response nor an error".to_owned(),
            None,
        ));
    };

    // Some providers double-encode the body as a JSON string.
    let parsed_body;
    let body = match &response.body {
        Value::String(text) => match serde_json::from_str::<Value>(text) {
            Ok(value) => {
                parsed_body = value;
                &parsed_body
            }
            Err(_) => &response.body,
        },
        other => other,
    };
    let usage = body.get("usage").and_then(Usage::from_value);
    let status = response.status_code;

    if status != 0 && !(200..300).contains(&status) {
        let (code, message) = body_error(body);
        return Err(RetryReason::provider(
            describe_error(
                &format!("the provider answered HTTP {status}"),
                code,
                message,
            ),
            usage,
        ));
    }
    if !body.is_object() {
        let what = if body.is_null() {
            "the response has no body".to_owned()
        } else {
            format!(
                "the response body is not a JSON object: {}",
                excerpt(&body.to_string())
            )
        };
        return Err(RetryReason::provider(what, usage));
    }
    let Some(choice) = body
        .get("choices")
        .and_then(Value::as_array)
        .and_then(|choices| choices.first())
    else {
        let (code, message) = body_error(body);
        let reason = if code.is_some() || message.is_some() {
            describe_error(
                "the response has no choices; the provider said",
                code,
                message,
            )
        } else {
            "the response has no choices".to_owned()
        };
        return Err(RetryReason::provider(reason, usage));
    };

    let finish_reason = choice
        .get("finish_reason")
        .and_then(Value::as_str)
        .map(str::to_owned);
    match finish_reason.as_deref() {
        Some("length") => {
            let tokens = usage
                .map(|u| format!(" after {} completion tokens", u.completion_tokens))
                .unwrap_or_default();
            return Err(RetryReason::validate(
                format!("the answer was cut off at max_tokens (finish_reason \"length\"{tokens})"),
                usage,
            ));
        }
        Some("content_filter") => {
            return Err(RetryReason::validate(
                "the provider's content filter stopped the answer (finish_reason \"content_filter\")"
                    .to_owned(),
                usage,
            ));
        }
        _ => {}
    }

    let message = choice.get("message");
    let content = message
        .and_then(|m| m.get("content"))
        .or_else(|| choice.get("text"))
        .map(content_text)
        .unwrap_or_default();
    if content.trim().is_empty() {
        let refusal = message
            .and_then(|m| m.get("refusal"))
            .and_then(Value::as_str)
            .filter(|r| !r.trim().is_empty());
        let reason = match refusal {
            Some(refusal) => format!("the model refused: {}", excerpt(refusal.trim())),
            None => "the answer is empty".to_owned(),
        };
        return Err(RetryReason::validate(reason, usage));
    }

    let label = match extract_json(&content) {
        Ok(label) => label,
        Err(problem) => {
            return Err(RetryReason::validate(
                format!(
                    "the answer cannot be read as JSON ({problem}); it begins {}",
                    excerpt(content.trim())
                ),
                usage,
            ));
        }
    };
    if let Err(violations) = task.validate_answer(&label) {
        return Err(RetryReason::validate(
            format!(
                "the answer breaks the {:?} schema: {}",
                task.name(),
                list_violations(&violations)
            ),
            usage,
        ));
    }

    Ok(Answer {
        label,
        request_id: non_empty(response.request_id.as_deref()).map(str::to_owned),
        model: body
            .get("model")
            .and_then(Value::as_str)
            .and_then(|m| non_empty(Some(m)))
            .map(str::to_owned),
        finish_reason,
        usage,
    })
}

/// A message's content as text: a string, or the text parts of a content-part array
/// joined together.
fn content_text(content: &Value) -> String {
    match content {
        Value::String(text) => text.clone(),
        Value::Array(parts) => parts
            .iter()
            .filter_map(|part| match part {
                Value::String(text) => Some(text.as_str()),
                Value::Object(obj) => {
                    let kind = obj.get("type").and_then(Value::as_str);
                    if matches!(kind, None | Some("text") | Some("output_text")) {
                        obj.get("text").and_then(Value::as_str)
                    } else {
                        None
                    }
                }
                _ => None,
            })
            .collect(),
        _ => String::new(),
    }
}

/// The code and message of a body's `error`, which may be an object or a string.
fn body_error(body: &Value) -> (Option<&str>, Option<&str>) {
    match body.get("error") {
        Some(Value::String(message)) => (None, non_empty(Some(message))),
        Some(Value::Object(error)) => {
            let code = error
                .get("code")
                .and_then(Value::as_str)
                .or_else(|| error.get("type").and_then(Value::as_str));
            let message = error.get("message").and_then(Value::as_str);
            (non_empty(code), non_empty(message))
        }
        _ => (
            None,
            body.get("message")
                .and_then(Value::as_str)
                .and_then(|m| non_empty(Some(m))),
        ),
    }
}

fn describe_error(prefix: &str, code: Option<&str>, message: Option<&str>) -> String {
    let code = code.map(|c| truncate(c, MAX_EXCERPT_CHARS));
    let message = message.map(|m| truncate(m, MAX_EXCERPT_CHARS));
    match (code, message) {
        (Some(code), Some(message)) => format!("{prefix} ({code}): {message}"),
        (Some(code), None) => format!("{prefix} ({code}) without a message"),
        (None, Some(message)) => format!("{prefix}: {message}"),
        (None, None) => format!("{prefix} without a code or message"),
    }
}

fn list_violations(violations: &[String]) -> String {
    let mut listed: Vec<String> = violations
        .iter()
        .take(MAX_VIOLATIONS)
        .map(|v| truncate(v, MAX_EXCERPT_CHARS))
        .collect();
    if violations.len() > MAX_VIOLATIONS {
        listed.push(format!("and {} more", violations.len() - MAX_VIOLATIONS));
    }
    listed.join("; ")
}

fn non_empty(s: Option<&str>) -> Option<&str> {
    s.map(str::trim).filter(|s| !s.is_empty())
}

/// At most `max` characters of `s`, with an ellipsis when something was cut.
fn truncate(s: &str, max: usize) -> String {
    match s.char_indices().nth(max) {
        None => s.to_owned(),
        Some((end, _)) => format!("{}…", &s[..end]),
    }
}

/// A short quoted excerpt, with newlines and quotes escaped.
fn excerpt(s: &str) -> String {
    format!("{:?}", truncate(s, MAX_EXCERPT_CHARS))
}

/// The JSON a model put in its message, tolerating a ```json fenced block (or ```
/// without a language), leading/trailing whitespace, and prose around a single fenced
/// block. Without a fence, prose around a single bare JSON object is tolerated too (the
/// text from the first `{` to the last `}`).
pub fn extract_json(content: &str) -> Result<Value, String> {
    let text = content.trim_start_matches('\u{feff}').trim();
    if text.is_empty() {
        return Err("the answer is empty".to_owned());
    }
    let whole_error = match serde_json::from_str::<Value>(text) {
        Ok(value) => return Ok(value),
        Err(e) => e,
    };

    if let Some(open) = text.find("```") {
        let after_open = &text[open + 3..];
        let inner_start = skip_info_string(after_open);
        let inner_text = &after_open[inner_start..];
        let inner = match inner_text.find("```") {
            Some(close) => {
                if inner_text[close + 3..].contains("```") {
                    return Err("the answer has more than one fenced block".to_owned());
                }
                &inner_text[..close]
            }
            // An unclosed fence: take the rest.
            None => inner_text,
        };
        let inner = inner.trim();
        if inner.is_empty() {
            return Err("the fenced block is empty".to_owned());
        }
        return serde_json::from_str(inner)
            .map_err(|e| format!("the fenced block is not valid JSON: {e}"));
    }

    if let (Some(start), Some(end)) = (text.find('{'), text.rfind('}'))
        && start < end
        && let Ok(value) = serde_json::from_str::<Value>(&text[start..=end])
    {
        return Ok(value);
    }
    Err(format!("not valid JSON: {whole_error}"))
}

/// Where a fenced block's content starts after its opening fence: past a language tag
/// such as `json` when one is followed by whitespace or the start of the JSON.
fn skip_info_string(after_open: &str) -> usize {
    let tag_len = after_open
        .find(|c: char| !(c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '+' | '.')))
        .unwrap_or(after_open.len());
    if tag_len == 0 {
        return 0;
    }
    match after_open[tag_len..].chars().next() {
        Some(c) if c.is_whitespace() || c == '{' || c == '[' => tag_len,
        _ => 0,
    }
}
