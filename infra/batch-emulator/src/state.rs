//! In-memory store of files and batches, counters, ids and clocks.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::answer::Outcome;
use crate::config::{EmulatorConfig, ErrorsShape, FaultSettings, IdStyle};
use crate::prng::Prng;
use crate::validate::BatchErrorEntry;

/// Locks, recovering from poisoning: a panicked handler must not wedge the
/// whole emulator, and every critical section leaves the data consistent.
pub fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

pub fn unix_now() -> Duration {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    Validating,
    Failed,
    InProgress,
    Finalizing,
    Completed,
    Expired,
    Cancelling,
    Cancelled,
}

impl Status {
    pub const ALL: [Status; 8] = [
        Self::Validating,
        Self::Failed,
        Self::InProgress,
        Self::Finalizing,
        Self::Completed,
        Self::Expired,
        Self::Cancelling,
        Self::Cancelled,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Validating => "validating",
            Self::Failed => "failed",
            Self::InProgress => "in_progress",
            Self::Finalizing => "finalizing",
            Self::Completed => "completed",
            Self::Expired => "expired",
            Self::Cancelling => "cancelling",
            Self::Cancelled => "cancelled",
        }
    }
}

#[derive(Debug, Clone)]
pub struct StoredFile {
    pub id: String,
    pub filename: String,
    pub purpose: String,
    pub created_at: i64,
    pub data: Bytes,
    /// Until then the file is `uploaded`, not `processed` (the file-processing fault).
    pub processed_at: Option<std::time::Instant>,
}

impl StoredFile {
    pub fn is_processed(&self) -> bool {
        self.processed_at
            .is_none_or(|at| std::time::Instant::now() >= at)
    }

    pub fn to_json(&self) -> Value {
        let status = if self.is_processed() {
            "processed"
        } else {
            "uploaded"
        };
        json!({
            "id": self.id,
            "object": "file",
            "bytes": self.data.len(),
            "created_at": self.created_at,
            "filename": self.filename,
            "purpose": self.purpose,
            "status": status,
            "status_details": null,
        })
    }
}

/// Results being worked through while `in_progress`; requests finish evenly
/// across the configured duration, in (shuffled) output order.
#[derive(Debug, Clone)]
pub struct Progress {
    pub started: Instant,
    pub duration: Duration,
    pub results: Arc<Vec<Outcome>>,
}

impl Progress {
    /// How many results are finished by now.
    pub fn finished(&self) -> usize {
        let n = self.results.len();
        if self.duration.is_zero() {
            return n;
        }
        let fraction = self.started.elapsed().as_secs_f64() / self.duration.as_secs_f64();
        ((n as f64 * fraction.min(1.0)).floor() as usize).min(n)
    }
}

#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct RequestCounts {
    pub total: usize,
    pub completed: usize,
    pub failed: usize,
}

#[derive(Debug)]
pub struct BatchRecord {
    pub id: String,
    pub seq: u64,
    pub endpoint: String,
    pub input_file_id: String,
    pub completion_window: String,
    pub metadata: Option<Value>,
    pub webhook_url: Option<String>,
    pub model: Option<String>,
    pub status: Status,
    pub errors: Option<Vec<BatchErrorEntry>>,
    pub output_file_id: Option<String>,
    pub error_file_id: Option<String>,
    pub created_at: i64,
    pub in_progress_at: Option<i64>,
    pub expires_at: i64,
    pub finalizing_at: Option<i64>,
    pub completed_at: Option<i64>,
    pub failed_at: Option<i64>,
    pub expired_at: Option<i64>,
    pub cancelling_at: Option<i64>,
    pub cancelled_at: Option<i64>,
    pub counts: RequestCounts,
    pub progress: Option<Progress>,
    /// Wakes the batch's task when someone cancels.
    pub cancel: Arc<Notify>,
}

impl BatchRecord {
    pub fn to_json(&self, shape: ErrorsShape) -> Value {
        let mut counts = self.counts;
        // Show requests finishing while in progress, as providers do.
        if self.status == Status::InProgress
            && let Some(progress) = &self.progress
        {
            let done = &progress.results[..progress.finished()];
            counts.completed = done.iter().filter(|o| o.success).count();
            counts.failed = done.len() - counts.completed;
        }
        let errors = match (shape, &self.errors) {
            (ErrorsShape::OpenAi, None) => Value::Null,
            (ErrorsShape::OpenAi | ErrorsShape::NullData, Some(data)) => {
                json!({ "object": "list", "data": data })
            }
            (ErrorsShape::NullData | ErrorsShape::Loose, None) => {
                json!({ "object": "list", "data": null })
            }
            (ErrorsShape::Bare, data) => json!(data.as_deref().unwrap_or_default()),
            (ErrorsShape::Loose, Some(data)) => {
                let loose: Vec<Value> = data
                    .iter()
                    .map(|e| {
                        json!({
                            "code": 400,
                            "message": format!("{}: {}", e.code, e.message),
                            "param": e.param,
                            "line": e.line.map(|l| l.to_string()),
                        })
                    })
                    .collect();
                json!({ "object": "list", "data": loose })
            }
        };
        json!({
            "id": self.id,
            "object": "batch",
            "endpoint": self.endpoint,
            "model": self.model,
            "errors": errors,
            "input_file_id": self.input_file_id,
            "completion_window": self.completion_window,
            "status": self.status.as_str(),
            "output_file_id": self.output_file_id,
            "error_file_id": self.error_file_id,
            "created_at": self.created_at,
            "in_progress_at": self.in_progress_at,
            "expires_at": self.expires_at,
            "finalizing_at": self.finalizing_at,
            "completed_at": self.completed_at,
            "failed_at": self.failed_at,
            "expired_at": self.expired_at,
            "cancelling_at": self.cancelling_at,
            "cancelled_at": self.cancelled_at,
            "request_counts": counts,
            "metadata": self.metadata,
        })
    }
}

/// Counters behind `GET /admin/stats`.
#[derive(Debug, Default)]
pub struct Counters {
    pub api_calls: AtomicU64,
    pub files_uploaded: AtomicU64,
    pub requests_answered: AtomicU64,
    pub requests_failed: AtomicU64,
    pub faults: Mutex<BTreeMap<String, u64>>,
    pub webhooks_sent: AtomicU64,
    pub webhooks_failed: AtomicU64,
    pub webhooks_dropped: AtomicU64,
    pub webhooks_duplicated: AtomicU64,
    pub webhook_attempts: AtomicU64,
    pub webhook_retries: AtomicU64,
}

/// Every fault kind, so stats list zeros too.
pub const FAULT_KINDS: [&str; 15] = [
    "error_line",
    "non_json",
    "schema_break",
    "length",
    "http_429",
    "http_500",
    "expire",
    "enqueued_limit",
    "upload_429",
    "file_not_processed",
    "create_lost_answer",
    "webhook_drop",
    "webhook_duplicate",
    "webhook_delay",
    "webhook_reorder",
];

impl Counters {
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    pub fn fault(&self, kind: &str) {
        *lock(&self.faults).entry(kind.to_owned()).or_default() += 1;
    }

    pub fn reset(&self) {
        for c in [
            &self.api_calls,
            &self.files_uploaded,
            &self.requests_answered,
            &self.requests_failed,
            &self.webhooks_sent,
            &self.webhooks_failed,
            &self.webhooks_dropped,
            &self.webhooks_duplicated,
            &self.webhook_attempts,
            &self.webhook_retries,
        ] {
            c.store(0, Ordering::Relaxed);
        }
        lock(&self.faults).clear();
    }
}

/// Webhook delivery counts.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct WebhookStats {
    /// Deliveries acknowledged with 2xx (duplicates count again).
    pub sent: u64,
    /// Deliveries given up on (4xx, 3xx, or retries exhausted).
    pub failed: u64,
    pub dropped: u64,
    pub duplicated: u64,
    /// HTTP requests made, OPTIONS probes included.
    pub attempts: u64,
    pub retries: u64,
}

/// A snapshot of what the emulator has done.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Stats {
    /// Current batches by status.
    pub batches: BTreeMap<String, u64>,
    pub api_calls: u64,
    pub files_uploaded: u64,
    /// Lines written to output files.
    pub requests_answered: u64,
    /// Lines written to error files.
    pub requests_failed: u64,
    /// Faults injected, by kind.
    pub faults: BTreeMap<String, u64>,
    pub webhooks: WebhookStats,
}

pub struct AppState {
    pub cfg: EmulatorConfig,
    pub faults: RwLock<FaultSettings>,
    pub files: Mutex<HashMap<String, StoredFile>>,
    pub batches: Mutex<HashMap<String, BatchRecord>>,
    /// Ids, API fault draws and webhook fault draws, in call order.
    pub rng: Mutex<Prng>,
    pub next_seq: AtomicU64,
    pub counters: Counters,
    pub http: reqwest::Client,
    pub token: CancellationToken,
    /// Decoded webhook signing keys.
    pub webhook_keys: Vec<Vec<u8>>,
    /// When the latest upload was accepted (the upload rate limit).
    pub last_upload: Mutex<Option<std::time::Instant>>,
}

impl std::fmt::Debug for AppState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AppState")
            .field("cfg", &self.cfg)
            .finish_non_exhaustive()
    }
}

impl AppState {
    pub fn faults(&self) -> FaultSettings {
        self.faults
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    pub fn set_faults(&self, faults: FaultSettings) {
        *self
            .faults
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = faults;
    }

    /// A timestamp for batch and file objects, in the configured unit.
    pub fn timestamp(&self) -> i64 {
        let now = unix_now();
        if self.cfg.millis_timestamps {
            now.as_millis() as i64
        } else {
            now.as_secs() as i64
        }
    }

    /// 24 hours in the configured unit.
    pub fn day(&self) -> i64 {
        if self.cfg.millis_timestamps {
            86_400_000
        } else {
            86_400
        }
    }

    pub fn draw(&self) -> f64 {
        lock(&self.rng).unit()
    }

    pub fn new_batch_id(&self) -> String {
        let mut rng = lock(&self.rng);
        match self.cfg.id_style {
            IdStyle::OpenAi => format!("batch_{}", rng.hex(32)),
            IdStyle::Plain => rng.uuid(),
        }
    }

    pub fn new_file_id(&self) -> String {
        let mut rng = lock(&self.rng);
        match self.cfg.id_style {
            IdStyle::OpenAi => format!("file-{}", rng.alnum(24)),
            IdStyle::Plain => format!(
                "{}",
                1_000_000_000_000_000 + rng.next_u64() % 9_000_000_000_000_000
            ),
        }
    }

    pub fn new_token(&self, prefix: &str) -> String {
        format!("{prefix}{}", lock(&self.rng).hex(32))
    }

    pub fn store_file(&self, filename: String, purpose: &str, data: Bytes) -> StoredFile {
        let file = StoredFile {
            id: self.new_file_id(),
            filename,
            purpose: purpose.to_owned(),
            created_at: self.timestamp(),
            data,
            processed_at: match self.faults().file_processing_ms {
                0 => None,
                ms => Some(std::time::Instant::now() + std::time::Duration::from_millis(ms)),
            },
        };
        lock(&self.files).insert(file.id.clone(), file.clone());
        file
    }

    pub fn stats(&self) -> Stats {
        let mut batches: BTreeMap<String, u64> = Status::ALL
            .iter()
            .map(|s| (s.as_str().to_owned(), 0))
            .collect();
        for batch in lock(&self.batches).values() {
            *batches.entry(batch.status.as_str().to_owned()).or_default() += 1;
        }
        let mut faults: BTreeMap<String, u64> =
            FAULT_KINDS.iter().map(|k| ((*k).to_owned(), 0)).collect();
        for (kind, n) in lock(&self.counters.faults).iter() {
            faults.insert(kind.clone(), *n);
        }
        let c = &self.counters;
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        Stats {
            batches,
            api_calls: get(&c.api_calls),
            files_uploaded: get(&c.files_uploaded),
            requests_answered: get(&c.requests_answered),
            requests_failed: get(&c.requests_failed),
            faults,
            webhooks: WebhookStats {
                sent: get(&c.webhooks_sent),
                failed: get(&c.webhooks_failed),
                dropped: get(&c.webhooks_dropped),
                duplicated: get(&c.webhooks_duplicated),
                attempts: get(&c.webhook_attempts),
                retries: get(&c.webhook_retries),
            },
        }
    }

    /// Runs `fut` until it ends or the emulator shuts down.
    pub fn spawn<F>(self: &Arc<Self>, fut: F)
    where
        F: std::future::Future<Output = ()> + Send + 'static,
    {
        let token = self.token.clone();
        tokio::spawn(async move {
            tokio::select! {
                () = token.cancelled() => {}
                () = fut => {}
            }
        });
    }
}
