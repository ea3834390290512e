//! Wire types of the OpenAI-compatible Batch API, parsed tolerantly: providers differ in
//! id formats, timestamp units and which fields they send, so ids accept any scalar,
//! timestamps accept seconds or milliseconds, absent fields default, and unknown fields
//! are ignored.

use std::collections::BTreeMap;
use std::fmt;

use serde::de::{self, Deserializer};
use serde::{Deserialize, Serialize, Serializer};
use serde_json::Value;

/// An instant from a provider, normalised to milliseconds since the Unix epoch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Timestamp {
    millis: i64,
}

/// Values above this are taken as milliseconds: as seconds it would be past the year 5000,
/// as milliseconds it is 1973.
const MILLIS_THRESHOLD: f64 = 1e11;

impl Timestamp {
    pub fn from_millis(millis: i64) -> Self {
        Self { millis }
    }

    pub fn from_secs(secs: i64) -> Self {
        Self {
            millis: secs.saturating_mul(1000),
        }
    }

    /// Reads a provider's number, deciding between seconds and milliseconds by magnitude.
    pub fn from_provider_number(value: f64) -> Option<Self> {
        if !value.is_finite() || value < 0.0 {
            return None;
        }
        let millis = if value >= MILLIS_THRESHOLD {
            value
        } else {
            value * 1000.0
        };
        Some(Self {
            millis: millis.round() as i64,
        })
    }

    pub fn as_millis(self) -> i64 {
        self.millis
    }

    pub fn as_secs(self) -> i64 {
        self.millis.div_euclid(1000)
    }
}

impl Serialize for Timestamp {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_i64(self.as_secs())
    }
}

/// Deserialises an optional timestamp from an integer, a float, a numeric string or null.
/// Anything else is treated as absent rather than failing the whole object.
fn de_timestamp<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Timestamp>, D::Error> {
    let value = Option::<Value>::deserialize(d)?;
    Ok(match value {
        Some(Value::Number(n)) => n.as_f64().and_then(Timestamp::from_provider_number),
        Some(Value::String(s)) => s
            .trim()
            .parse::<f64>()
            .ok()
            .and_then(Timestamp::from_provider_number),
        _ => None,
    })
}

/// Deserialises an id that may be a string or a number.
fn de_id<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    match Value::deserialize(d)? {
        Value::String(s) => Ok(s),
        Value::Number(n) => Ok(n.to_string()),
        other => Err(de::Error::custom(format!(
            "expected an id (string or number), found {other}"
        ))),
    }
}

/// Like [`de_id`] for optional ids; an empty string counts as absent.
fn de_opt_id<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    Ok(match Option::<Value>::deserialize(d)? {
        Some(Value::String(s)) if !s.is_empty() => Some(s),
        Some(Value::Number(n)) => Some(n.to_string()),
        _ => None,
    })
}

/// Deserialises a count that may be missing, null, a number or a numeric string.
fn de_count<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    Ok(match Option::<Value>::deserialize(d)? {
        Some(Value::Number(n)) => n
            .as_u64()
            .or_else(|| n.as_f64().map(|f| f.max(0.0) as u64))
            .unwrap_or(0),
        Some(Value::String(s)) => s.trim().parse().unwrap_or(0),
        _ => 0,
    })
}

/// Metadata values are strings in the spec; keep other scalars as their JSON text.
fn de_metadata<'de, D: Deserializer<'de>>(d: D) -> Result<BTreeMap<String, String>, D::Error> {
    Ok(match Option::<Value>::deserialize(d)? {
        Some(Value::Object(map)) => map
            .into_iter()
            .filter(|(_, v)| !v.is_null())
            .map(|(k, v)| match v {
                Value::String(s) => (k, s),
                other => (k, other.to_string()),
            })
            .collect(),
        _ => BTreeMap::new(),
    })
}

/// An uploaded file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FileObject {
    #[serde(deserialize_with = "de_id")]
    pub id: String,
    #[serde(default, deserialize_with = "de_count")]
    pub bytes: u64,
    #[serde(default, deserialize_with = "de_timestamp")]
    pub created_at: Option<Timestamp>,
    #[serde(default)]
    pub filename: Option<String>,
    #[serde(default, deserialize_with = "de_opt_text")]
    pub purpose: Option<String>,
    /// OpenAI's `uploaded`, `processed` or `error` (deprecated there, still sent); absent
    /// where a provider does not report it.
    #[serde(default, deserialize_with = "de_opt_text")]
    pub status: Option<String>,
    /// Why validation failed, when `status` is `error`.
    #[serde(default, deserialize_with = "de_opt_text")]
    pub status_details: Option<String>,
}

/// Where an upload stands before a batch may be created from it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileReadiness {
    /// `processed`, or no status reported: a batch may be created from it.
    Ready,
    /// `uploaded` (or `pending`, `validating`): the provider is still reading it.
    Processing,
    /// `error` (or `failed`): the provider refused the file.
    Refused,
}

impl FileObject {
    pub fn readiness(&self) -> FileReadiness {
        match self
            .status
            .as_deref()
            .map(str::to_ascii_lowercase)
            .as_deref()
        {
            Some("uploaded" | "pending" | "validating" | "processing") => FileReadiness::Processing,
            Some("error" | "failed") => FileReadiness::Refused,
            _ => FileReadiness::Ready,
        }
    }
}

/// One page of `GET /batches` (newest first at OpenAI).
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct BatchPage {
    /// Entries that do not parse as batches are skipped, not fatal.
    #[serde(default, deserialize_with = "de_batches")]
    pub data: Vec<Batch>,
    #[serde(default)]
    pub has_more: bool,
    #[serde(default, deserialize_with = "de_opt_id")]
    pub last_id: Option<String>,
}

fn de_batches<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<Batch>, D::Error> {
    Ok(match Option::<Value>::deserialize(d)? {
        Some(Value::Array(items)) => items
            .into_iter()
            .filter_map(|item| serde_json::from_value(item).ok())
            .collect(),
        _ => Vec::new(),
    })
}

/// Where a batch is in its life.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum BatchStatus {
    Validating,
    Failed,
    InProgress,
    Finalizing,
    Completed,
    Expired,
    Cancelling,
    Cancelled,
    /// A status this client does not know; kept verbatim and treated as still running.
    Other(String),
}

impl BatchStatus {
    pub fn as_str(&self) -> &str {
        match self {
            Self::Validating => "validating",
            Self::Failed => "failed",
            Self::InProgress => "in_progress",
            Self::Finalizing => "finalizing",
            Self::Completed => "completed",
            Self::Expired => "expired",
            Self::Cancelling => "cancelling",
            Self::Cancelled => "cancelled",
            Self::Other(s) => s,
        }
    }

    /// True once the provider will do nothing more with the batch.
    pub fn is_terminal(&self) -> bool {
        matches!(
            self,
            Self::Failed | Self::Completed | Self::Expired | Self::Cancelled
        )
    }
}

impl From<&str> for BatchStatus {
    fn from(s: &str) -> Self {
        match s.trim().to_ascii_lowercase().as_str() {
            "validating" | "queued" | "pending" => Self::Validating,
            "failed" => Self::Failed,
            "in_progress" | "in-progress" | "running" | "processing" => Self::InProgress,
            "finalizing" => Self::Finalizing,
            "completed" | "succeeded" => Self::Completed,
            "expired" => Self::Expired,
            "cancelling" | "canceling" => Self::Cancelling,
            "cancelled" | "canceled" => Self::Cancelled,
            _ => Self::Other(s.to_owned()),
        }
    }
}

impl fmt::Display for BatchStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Serialize for BatchStatus {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for BatchStatus {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        match Value::deserialize(d)? {
            Value::Null => Err(de::Error::custom("a batch status is null")),
            // An unknown status, of whatever type, is kept and treated as still running.
            other => Ok(Self::from(text_of(other).as_str())),
        }
    }
}

/// How many of a batch's requests have finished.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RequestCounts {
    #[serde(default, deserialize_with = "de_count")]
    pub total: u64,
    #[serde(default, deserialize_with = "de_count")]
    pub completed: u64,
    #[serde(default, deserialize_with = "de_count")]
    pub failed: u64,
}

/// One reason a provider gave for rejecting a batch's input file. Every field is read
/// whatever its JSON type: a numeric `code` keeps its digits, a `line` given as a string
/// its number.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BatchError {
    #[serde(default, deserialize_with = "de_opt_text")]
    pub code: Option<String>,
    #[serde(default, deserialize_with = "de_opt_text")]
    pub message: Option<String>,
    #[serde(default, deserialize_with = "de_opt_text")]
    pub param: Option<String>,
    #[serde(default, deserialize_with = "de_opt_count")]
    pub line: Option<u64>,
}

impl BatchError {
    /// An error from any JSON value: an object's fields, or a bare string as its message.
    fn from_value(value: Value) -> Option<Self> {
        match value {
            Value::Object(_) => serde_json::from_value(value).ok(),
            Value::Null => None,
            other => Some(Self {
                code: None,
                message: Some(text_of(other)),
                param: None,
                line: None,
            }),
        }
    }
}

/// A batch's `errors`. OpenAI sends `{"object": "list", "data": [...]}` with `data` that
/// may be null (the SDK types it `Optional[List[BatchError]]`); some compatible providers
/// send the list bare; many send nothing.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct BatchErrors {
    pub data: Vec<BatchError>,
}

impl<'de> Deserialize<'de> for BatchErrors {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let list = match Value::deserialize(d)? {
            Value::Array(items) => items,
            Value::Object(mut object) => match object.remove("data") {
                Some(Value::Array(items)) => items,
                Some(Value::Null) | None => Vec::new(),
                Some(one) => vec![one],
            },
            Value::Null => Vec::new(),
            one => vec![one],
        };
        Ok(Self {
            data: list
                .into_iter()
                .filter_map(BatchError::from_value)
                .collect(),
        })
    }
}

/// A JSON scalar as text: strings as they are, anything else as its JSON.
fn text_of(value: Value) -> String {
    match value {
        Value::String(s) => s,
        other => other.to_string(),
    }
}

/// An optional text field of any JSON type; null is absent.
fn de_opt_text<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    Ok(match Option::<Value>::deserialize(d)? {
        None | Some(Value::Null) => None,
        Some(other) => Some(text_of(other)),
    })
}

/// An optional count: a number or a numeric string; anything else is absent.
fn de_opt_count<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    Ok(match Option::<Value>::deserialize(d)? {
        Some(Value::Number(n)) => n
            .as_u64()
            .or_else(|| n.as_f64().filter(|f| *f >= 0.0).map(|f| f as u64)),
        Some(Value::String(s)) => s.trim().parse().ok(),
        _ => None,
    })
}

/// Any value of a field whose shape a provider may get wrong: parsed when it can be,
/// absent otherwise, never failing the batch.
fn de_lenient<'de, D: Deserializer<'de>, T: serde::de::DeserializeOwned>(
    d: D,
) -> Result<Option<T>, D::Error> {
    Ok(Option::<Value>::deserialize(d)?.and_then(|value| serde_json::from_value(value).ok()))
}

/// A batch as the provider reports it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Batch {
    #[serde(deserialize_with = "de_id")]
    pub id: String,
    pub status: BatchStatus,
    #[serde(default, deserialize_with = "de_opt_text")]
    pub endpoint: Option<String>,
    #[serde(default, deserialize_with = "de_opt_id")]
    pub input_file_id: Option<String>,
    #[serde(default, deserialize_with = "de_opt_id")]
    pub output_file_id: Option<String>,
    #[serde(default, deserialize_with = "de_opt_id")]
    pub error_file_id: Option<String>,
    #[serde(default, deserialize_with = "de_opt_text")]
    pub completion_window: Option<String>,
    #[serde(default, deserialize_with = "de_lenient")]
    pub errors: Option<BatchErrors>,
    #[serde(default, deserialize_with = "de_lenient")]
    pub request_counts: Option<RequestCounts>,
    #[serde(default, deserialize_with = "de_metadata")]
    pub metadata: BTreeMap<String, String>,
    #[serde(default, deserialize_with = "de_timestamp")]
    pub created_at: Option<Timestamp>,
    #[serde(default, deserialize_with = "de_timestamp")]
    pub in_progress_at: Option<Timestamp>,
    #[serde(default, deserialize_with = "de_timestamp")]
    pub expires_at: Option<Timestamp>,
    #[serde(default, deserialize_with = "de_timestamp")]
    pub finalizing_at: Option<Timestamp>,
    #[serde(default, deserialize_with = "de_timestamp")]
    pub completed_at: Option<Timestamp>,
    #[serde(default, deserialize_with = "de_timestamp")]
    pub failed_at: Option<Timestamp>,
    #[serde(default, deserialize_with = "de_timestamp")]
    pub expired_at: Option<Timestamp>,
    #[serde(default, deserialize_with = "de_timestamp")]
    pub cancelling_at: Option<Timestamp>,
    #[serde(default, deserialize_with = "de_timestamp")]
    pub cancelled_at: Option<Timestamp>,
}

impl Batch {
    /// Every reason the provider gave for rejecting the input, one per line.
    pub fn error_summary(&self) -> Option<String> {
        let errors = self.errors.as_ref()?;
        if errors.data.is_empty() {
            return None;
        }
        let lines: Vec<String> = errors
            .data
            .iter()
            .map(|e| {
                let mut s = e.code.clone().unwrap_or_else(|| "error".into());
                if let Some(m) = &e.message {
                    s.push_str(": ");
                    s.push_str(m);
                }
                if let Some(l) = e.line {
                    s.push_str(&format!(" (line {l})"));
                }
                s
            })
            .collect();
        Some(lines.join("\n"))
    }
}

/// The body of `POST /batches`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CreateBatchRequest {
    pub input_file_id: String,
    pub endpoint: String,
    pub completion_window: String,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub metadata: BTreeMap<String, String>,
    /// Inference.net's per-batch completion callback; other providers ignore it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub webhook_url: Option<String>,
}

impl CreateBatchRequest {
    /// A chat-completions batch with the usual 24-hour window.
    pub fn chat_completions(input_file_id: impl Into<String>) -> Self {
        Self {
            input_file_id: input_file_id.into(),
            endpoint: "/v1/chat/completions".into(),
            completion_window: "24h".into(),
            metadata: BTreeMap::new(),
            webhook_url: None,
        }
    }
}

/// The `response` half of an output line.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OutputResponse {
    #[serde(default, deserialize_with = "de_count")]
    pub status_code: u64,
    #[serde(default, deserialize_with = "de_opt_id")]
    pub request_id: Option<String>,
    #[serde(default)]
    pub body: Value,
}

/// The `error` half of an output or error line.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OutputError {
    #[serde(default)]
    pub code: Option<String>,
    #[serde(default)]
    pub message: Option<String>,
}

/// One line of a batch's output or error file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OutputLine {
    #[serde(default, deserialize_with = "de_opt_id")]
    pub id: Option<String>,
    #[serde(deserialize_with = "de_id")]
    pub custom_id: String,
    #[serde(default)]
    pub response: Option<OutputResponse>,
    #[serde(default)]
    pub error: Option<OutputError>,
}
