//! What the pipeline writes: pending-queue messages, failed records, and where outputs go.

use serde::{Deserialize, Serialize};

/// One image waiting to be labelled: the body of a pending-queue message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PendingItem {
    pub bucket: String,
    pub key: String,
    pub size: u64,
    pub etag: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version_id: Option<String>,
    /// 0 for the first try; each retry adds one.
    #[serde(default)]
    pub attempt: u32,
    /// Why earlier attempts failed, oldest first.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub reasons: Vec<AttemptReason>,
}

/// Why one attempt at an image failed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AttemptReason {
    pub attempt: u32,
    /// The stage that failed: `enqueue`, `prepare`, `provider`, `validate`.
    pub stage: String,
    pub reason: String,
}

/// The source image a record is about.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SourceRef {
    pub bucket: String,
    pub key: String,
    pub etag: String,
    pub size: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version_id: Option<String>,
}

/// The task a record was made under.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskRef {
    pub name: String,
    pub version: String,
}

/// The terminal record of an image that could not be labelled.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FailedRecord {
    pub status: String,
    pub source: SourceRef,
    pub task: TaskRef,
    /// Every attempt's reason, oldest first.
    pub reasons: Vec<AttemptReason>,
    /// Unix seconds.
    pub recorded_at: u64,
}

impl FailedRecord {
    pub fn new(source: SourceRef, task: TaskRef, reasons: Vec<AttemptReason>) -> Self {
        Self {
            status: "failed".into(),
            source,
            task,
            reasons,
            recorded_at: unix_now(),
        }
    }
}

/// Seconds since the Unix epoch (0 if the clock is before it).
pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Where outputs for an input key go. Outputs mirror the input's path below the input
/// prefix, so `incoming/a/b.png` is labelled at `labels/a/b.png.json`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layout {
    input_prefix: String,
}

impl Layout {
    pub fn new(input_prefix: &str) -> Self {
        Self {
            input_prefix: input_prefix.to_owned(),
        }
    }

    pub fn input_prefix(&self) -> &str {
        &self.input_prefix
    }

    /// The key below the input prefix, or `None` when the key is not an input.
    pub fn relative<'k>(&self, key: &'k str) -> Option<&'k str> {
        key.strip_prefix(&self.input_prefix)
            .filter(|r| !r.is_empty())
    }

    pub fn label_key(&self, relative: &str) -> String {
        format!("labels/{relative}.json")
    }

    pub fn failed_key(&self, relative: &str) -> String {
        format!("failed/{relative}.json")
    }
}
