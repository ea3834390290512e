//! Settings from environment variables, read once at cold start. Each error names the
//! variable and what it should hold.

use std::path::Path;

use crate::task::{Task, TaskError};

#[derive(Debug, thiserror::Error)]
pub enum SettingsError {
    #[error("{name} must be set ({what})")]
    Missing {
        name: &'static str,
        what: &'static str,
    },
    #[error("{name}={value:?} is not valid: expected {what}")]
    Invalid {
        name: &'static str,
        value: String,
        what: &'static str,
    },
    #[error(transparent)]
    Task(#[from] TaskError),
}

/// A variable's value, or `None` when unset or empty.
pub fn optional(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.trim().is_empty())
}

pub fn required(name: &'static str, what: &'static str) -> Result<String, SettingsError> {
    optional(name).ok_or(SettingsError::Missing { name, what })
}

pub fn number_or(name: &'static str, default: u64) -> Result<u64, SettingsError> {
    match optional(name) {
        None => Ok(default),
        Some(value) => value.trim().parse().map_err(|_| SettingsError::Invalid {
            name,
            value,
            what: "a whole number",
        }),
    }
}

/// A count that must fit in a `u32` (a retry limit, say).
pub fn small_number(name: &'static str, default: u32) -> Result<u32, SettingsError> {
    let value = number_or(name, u64::from(default))?;
    u32::try_from(value).map_err(|_| SettingsError::Invalid {
        name,
        value: value.to_string(),
        what: "a whole number below 4294967296",
    })
}

pub fn flag(name: &'static str) -> Result<bool, SettingsError> {
    match optional(name).map(|v| v.trim().to_ascii_lowercase()) {
        None => Ok(false),
        Some(v) if matches!(v.as_str(), "1" | "true" | "yes") => Ok(true),
        Some(v) if matches!(v.as_str(), "0" | "false" | "no") => Ok(false),
        Some(value) => Err(SettingsError::Invalid {
            name,
            value,
            what: "true or false",
        }),
    }
}

/// The task named by `SHOTLABEL_TASK` (a file path), else the built-in default.
pub fn task() -> Result<Task, SettingsError> {
    Ok(match optional("SHOTLABEL_TASK") {
        Some(path) => Task::from_path(Path::new(&path))?,
        None => Task::default_task()?,
    })
}

/// The input prefix (`SHOTLABEL_INPUT_PREFIX`, default `incoming/`), always ending in `/`.
pub fn input_prefix() -> String {
    let prefix = optional("SHOTLABEL_INPUT_PREFIX").unwrap_or_else(|| "incoming/".into());
    if prefix.ends_with('/') {
        prefix
    } else {
        format!("{prefix}/")
    }
}

/// The harvest's settings, shared by the webhook's harvest handler and the submitter's
/// reconciliation: `SHOTLABEL_BUCKET`, `SHOTLABEL_PENDING_QUEUE_URL`,
/// `SHOTLABEL_MAX_RETRIES` (default 3), the task and the input prefix.
pub fn harvest_config() -> Result<crate::harvest::HarvestConfig, SettingsError> {
    Ok(crate::harvest::HarvestConfig {
        bucket: required("SHOTLABEL_BUCKET", "the bucket shotlabel works in")?,
        layout: crate::records::Layout::new(&input_prefix()),
        pending_queue_url: required(
            "SHOTLABEL_PENDING_QUEUE_URL",
            "the URL of the pending SQS queue",
        )?,
        task: std::sync::Arc::new(task()?),
        max_retries: small_number("SHOTLABEL_MAX_RETRIES", 3)?,
    })
}
