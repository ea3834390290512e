//! Fault injection for the local pipeline, for the chaos soak (`tests/tests/chaos.rs`):
//! the functions crash at random steps (an error returned half-way, or the process
//! killed), SQS delivers messages again, S3 delivers an event twice.
//!
//! Off unless [`crate::pipeline::PipelineOptions::chaos`] is set. The functions' code
//! knows nothing of it: crashes are injected at the ports (`ObjectStore`, `Queue`,
//! `BatchProvider`) the pipeline's logic is written against, by [`Chaotic`], and the rest
//! by the runners that stand in for Lambda's triggers.
//!
//! Each handler call the runners make is one *invocation* ([`Chaos::run`]). When it
//! starts, the step it will crash at (the n-th port call it makes) is drawn, with a
//! hazard of [`ChaosOptions::crash_per_call`] at each call, so that a long run is more
//! likely to crash than a short one, and at any of its steps; so is the way it dies. At
//! that step the call
//!
//! - fails before it is made ([`CrashKind::ErrorBefore`]): the function sees an error and
//!   carries on as its code says (an error returned half-way);
//! - is made, but its answer is lost ([`CrashKind::ErrorAfter`]): the function sees an
//!   error, though the call took effect (a timeout after the write landed);
//! - never happens, because the process is killed first ([`CrashKind::KillBefore`]), or
//!   happens and then the process is killed ([`CrashKind::KillAfter`]). A kill drops the
//!   invocation's future where it stands, with whatever else it had in flight: what an
//!   in-process test can do that a killed Lambda does.
//!
//! Time is compressed: what an invocation leaves on a queue (messages it took and did
//! not delete: it crashed, or deferred them) reappears after
//! [`ChaosOptions::release_after`] instead of the queue's visibility timeout. Nobody
//! holds those messages any more, so this only shortens the wait.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::future::Future;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use shotlabel_core::batch_api::{Batch, BatchApiError, CreateBatchRequest, FileObject};
use shotlabel_core::ports::{
    BatchProvider, LineReader, ObjectInfo, ObjectStore, OutgoingMessage, Queue, QueueDepth,
    QueueError, ReceivedMessage, StoreError, StoredObject, WriteCondition,
};
use tokio::sync::Notify;

/// What to inject, and how often.
#[derive(Debug, Clone, PartialEq)]
pub struct ChaosOptions {
    /// Seeds every draw. Which call a draw lands on still depends on timing.
    pub seed: u64,
    /// The probability that an invocation crashes at any one of its port calls (it
    /// crashes once at most).
    pub crash_per_call: f64,
    /// The share of crashes that kill the process; the others return an error.
    pub kill_share: f64,
    /// The probability that a received message becomes visible again at once, so that
    /// it is received a second time while the first receiver still holds it.
    pub redeliver: f64,
    /// The probability that an S3 event notification is delivered twice.
    pub duplicate_event: f64,
    /// How long what an invocation left on a queue stays hidden.
    pub release_after: Duration,
}

impl ChaosOptions {
    /// Every kind of fault, often enough that a soak of a few thousand images sees each
    /// many times.
    pub fn new(seed: u64) -> Self {
        Self {
            seed,
            crash_per_call: 1.0 / 150.0,
            kill_share: 0.5,
            redeliver: 0.03,
            duplicate_event: 0.1,
            release_after: Duration::from_secs(1),
        }
    }
}

/// The function an invocation runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Function {
    Enqueue,
    Submit,
    /// The webhook binary on the harvest queue.
    Harvest,
}

impl Function {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Enqueue => "enqueue",
            Self::Submit => "submit",
            Self::Harvest => "harvest",
        }
    }
}

/// How a doomed invocation dies (see the module's documentation).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CrashKind {
    ErrorBefore,
    ErrorAfter,
    KillBefore,
    KillAfter,
}

impl CrashKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::ErrorBefore => "error before the call",
            Self::ErrorAfter => "error after the call (answer lost)",
            Self::KillBefore => "killed before the call",
            Self::KillAfter => "killed after the call",
        }
    }

    fn is_kill(self) -> bool {
        matches!(self, Self::KillBefore | Self::KillAfter)
    }

    fn call_is_made(self) -> bool {
        matches!(self, Self::ErrorAfter | Self::KillAfter)
    }
}

/// What was injected so far.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ChaosStats {
    /// Invocations run, by function.
    pub invocations: BTreeMap<&'static str, u64>,
    /// Crashes, by function and kind.
    pub crashes: BTreeMap<(&'static str, &'static str), u64>,
    /// Crashes, by the port call they hit (`store.put`, `provider.create`, …).
    pub crash_steps: BTreeMap<&'static str, u64>,
    /// Received messages made visible again at once.
    pub redelivered: u64,
    /// S3 event notifications delivered a second time.
    pub duplicate_events: u64,
    /// Ids of messages an injected fault touched: redelivered, or held by an invocation
    /// that crashed. A message in a dead-letter queue is explained only if it is here.
    pub touched_messages: BTreeSet<String>,
}

impl ChaosStats {
    /// All crashes injected.
    pub fn crash_count(&self) -> u64 {
        self.crashes.values().sum()
    }

    /// Crashes of one kind, over all functions.
    pub fn crashes_of(&self, kind: CrashKind) -> u64 {
        self.crashes
            .iter()
            .filter(|((_, k), _)| *k == kind.as_str())
            .map(|(_, n)| n)
            .sum()
    }
}

/// The fault injector one pipeline shares between its runners.
#[derive(Debug)]
pub struct Chaos {
    options: ChaosOptions,
    rng: Mutex<StdRng>,
    stats: Mutex<ChaosStats>,
    sqs: aws_sdk_sqs::Client,
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Chaos {
    pub fn new(options: ChaosOptions, sqs: aws_sdk_sqs::Client) -> Arc<Self> {
        Arc::new(Self {
            rng: Mutex::new(StdRng::seed_from_u64(options.seed)),
            options,
            stats: Mutex::new(ChaosStats::default()),
            sqs,
        })
    }

    pub fn options(&self) -> &ChaosOptions {
        &self.options
    }

    pub fn stats(&self) -> ChaosStats {
        lock(&self.stats).clone()
    }

    fn chance(&self, p: f64) -> bool {
        p > 0.0 && lock(&self.rng).random::<f64>() < p
    }

    /// Runs one invocation of `function`. `None` when the process was killed: the future
    /// was dropped at the step it died on.
    pub async fn run<F: Future>(
        self: &Arc<Self>,
        function: Function,
        invocation: F,
    ) -> (Option<F::Output>, Arc<Invocation>) {
        let hazard = self.options.crash_per_call;
        let crash = if hazard > 0.0 {
            let mut rng = lock(&self.rng);
            // The first call to crash, when each crashes with probability `hazard`.
            let survive: f64 = 1.0 - rng.random::<f64>();
            let step = if hazard >= 1.0 {
                0.0
            } else {
                (survive.ln() / (1.0 - hazard).ln()).floor()
            };
            let step = if step.is_finite() {
                step.min(f64::from(u32::MAX)) as u32
            } else {
                u32::MAX
            };
            let kill = rng.random::<f64>() < self.options.kill_share;
            let after = rng.random::<bool>();
            Some((
                step,
                match (kill, after) {
                    (false, false) => CrashKind::ErrorBefore,
                    (false, true) => CrashKind::ErrorAfter,
                    (true, false) => CrashKind::KillBefore,
                    (true, true) => CrashKind::KillAfter,
                },
            ))
        } else {
            None
        };
        *lock(&self.stats)
            .invocations
            .entry(function.as_str())
            .or_default() += 1;
        let current = Arc::new(Invocation {
            chaos: self.clone(),
            function,
            crash,
            calls: AtomicU32::new(0),
            crashed: AtomicBool::new(false),
            killed: Notify::new(),
            held: Mutex::new(HashMap::new()),
        });
        let output = INVOCATION
            .scope(current.clone(), async {
                tokio::select! {
                    biased;
                    () = current.killed.notified() => None,
                    output = invocation => Some(output),
                }
            })
            .await;
        (output, current)
    }

    /// Makes some of these just-received messages visible again at once, as SQS may
    /// deliver a message again while its first receiver still works on it.
    pub async fn redeliver(&self, queue_url: &str, messages: &[(String, String)]) {
        for (message_id, handle) in messages {
            if !self.chance(self.options.redeliver) {
                continue;
            }
            let changed = self
                .sqs
                .change_message_visibility()
                .queue_url(queue_url)
                .receipt_handle(handle)
                .visibility_timeout(0)
                .send()
                .await;
            if changed.is_ok() {
                let mut stats = lock(&self.stats);
                stats.redelivered += 1;
                stats.touched_messages.insert(message_id.clone());
            }
        }
    }

    /// Whether to deliver an S3 event notification a second time.
    pub fn duplicate_event(&self) -> bool {
        let duplicate = self.chance(self.options.duplicate_event);
        if duplicate {
            lock(&self.stats).duplicate_events += 1;
        }
        duplicate
    }

    /// Lets messages an invocation left behind come back after
    /// [`ChaosOptions::release_after`] (time compressed; see the module's documentation).
    /// `touched` records them as touched by a fault.
    pub async fn release(&self, queue_url: &str, messages: &[(String, String)], touched: bool) {
        if touched {
            lock(&self.stats)
                .touched_messages
                .extend(messages.iter().map(|(id, _)| id.clone()));
        }
        let seconds = i32::try_from(self.options.release_after.as_secs()).unwrap_or(i32::MAX);
        for (_, handle) in messages {
            // A message deleted meanwhile (through another receipt) has nothing to release.
            let _ = self
                .sqs
                .change_message_visibility()
                .queue_url(queue_url)
                .receipt_handle(handle)
                .visibility_timeout(seconds)
                .send()
                .await;
        }
    }

    fn record_crash(&self, function: Function, kind: CrashKind, op: &'static str) {
        let mut stats = lock(&self.stats);
        *stats
            .crashes
            .entry((function.as_str(), kind.as_str()))
            .or_default() += 1;
        *stats.crash_steps.entry(op).or_default() += 1;
    }
}

tokio::task_local! {
    static INVOCATION: Arc<Invocation>;
}

/// One handler call under [`Chaos::run`].
#[derive(Debug)]
pub struct Invocation {
    chaos: Arc<Chaos>,
    function: Function,
    /// The step it crashes at, and how.
    crash: Option<(u32, CrashKind)>,
    calls: AtomicU32,
    crashed: AtomicBool,
    killed: Notify,
    /// Messages it received through the `Queue` port and has not deleted, by receipt
    /// handle: (queue URL, message id).
    held: Mutex<HashMap<String, (String, String)>>,
}

impl Invocation {
    pub fn function(&self) -> Function {
        self.function
    }

    /// True when a crash was injected into it.
    pub fn crashed(&self) -> bool {
        self.crashed.load(Ordering::Relaxed)
    }

    /// Messages of `queue_url` it received through the `Queue` port and did not delete:
    /// (message id, receipt handle).
    pub fn held(&self, queue_url: &str) -> Vec<(String, String)> {
        lock(&self.held)
            .iter()
            .filter(|(_, (url, _))| url == queue_url)
            .map(|(handle, (_, id))| (id.clone(), handle.clone()))
            .collect()
    }

    /// The crash to inject at this call, if this is the step.
    fn crash_here(&self, op: &'static str) -> Option<CrashKind> {
        let step = self.calls.fetch_add(1, Ordering::Relaxed);
        let (at, kind) = self.crash?;
        if step != at {
            return None;
        }
        self.crashed.store(true, Ordering::Relaxed);
        self.chaos.record_crash(self.function, kind, op);
        tracing::info!(
            function = self.function.as_str(),
            op,
            kind = kind.as_str(),
            "chaos: crash injected"
        );
        Some(kind)
    }
}

fn current() -> Option<Arc<Invocation>> {
    INVOCATION.try_with(Arc::clone).ok()
}

/// One port call, with the crash its invocation is doomed to if this is the step.
async fn step<R, E>(
    op: &'static str,
    call: impl Future<Output = Result<R, E>>,
    injected: impl FnOnce(String) -> E,
) -> Result<R, E> {
    let Some(invocation) = current() else {
        return call.await;
    };
    let Some(kind) = invocation.crash_here(op) else {
        return call.await;
    };
    if kind.call_is_made() {
        drop(call.await);
    }
    if kind.is_kill() {
        invocation.killed.notify_one();
        // Never resumed: the invocation's future is dropped from here.
        std::future::pending::<()>().await;
    }
    Err(injected(format!(
        "injected fault ({}) at {op}",
        kind.as_str()
    )))
}

/// A port wrapped for fault injection. Outside an invocation of [`Chaos::run`] it only
/// passes calls through.
#[derive(Debug, Clone)]
pub struct Chaotic<T>(pub T);

impl<T: ObjectStore> ObjectStore for Chaotic<T> {
    async fn get(&self, bucket: &str, key: &str) -> Result<StoredObject, StoreError> {
        step("store.get", self.0.get(bucket, key), StoreError::Other).await
    }

    async fn head(&self, bucket: &str, key: &str) -> Result<Option<ObjectInfo>, StoreError> {
        step("store.head", self.0.head(bucket, key), StoreError::Other).await
    }

    async fn put(
        &self,
        bucket: &str,
        key: &str,
        body: Vec<u8>,
        content_type: &str,
        condition: WriteCondition,
    ) -> Result<String, StoreError> {
        step(
            "store.put",
            self.0.put(bucket, key, body, content_type, condition),
            StoreError::Other,
        )
        .await
    }

    async fn delete(&self, bucket: &str, key: &str) -> Result<(), StoreError> {
        step(
            "store.delete",
            self.0.delete(bucket, key),
            StoreError::Other,
        )
        .await
    }

    async fn list(&self, bucket: &str, prefix: &str) -> Result<Vec<String>, StoreError> {
        step("store.list", self.0.list(bucket, prefix), StoreError::Other).await
    }

    async fn get_range(
        &self,
        bucket: &str,
        key: &str,
        start: u64,
        end: u64,
    ) -> Result<Vec<u8>, StoreError> {
        step(
            "store.get_range",
            self.0.get_range(bucket, key, start, end),
            StoreError::Other,
        )
        .await
    }

    async fn put_file(
        &self,
        bucket: &str,
        key: &str,
        path: &Path,
        content_type: &str,
    ) -> Result<String, StoreError> {
        step(
            "store.put_file",
            self.0.put_file(bucket, key, path, content_type),
            StoreError::Other,
        )
        .await
    }
}

impl<T: Queue> Queue for Chaotic<T> {
    async fn send_batch(
        &self,
        queue_url: &str,
        messages: &[OutgoingMessage],
    ) -> Result<Vec<String>, QueueError> {
        step(
            "queue.send",
            self.0.send_batch(queue_url, messages),
            QueueError::Other,
        )
        .await
    }

    async fn receive(
        &self,
        queue_url: &str,
        max: u32,
        visibility_timeout: Duration,
        wait: Duration,
    ) -> Result<Vec<ReceivedMessage>, QueueError> {
        // What is received is held from then on, even if the answer is then lost.
        let receive = async {
            let received = self
                .0
                .receive(queue_url, max, visibility_timeout, wait)
                .await?;
            if let Some(invocation) = current() {
                let mut held = lock(&invocation.held);
                for m in &received {
                    held.insert(
                        m.receipt_handle.clone(),
                        (queue_url.to_owned(), m.message_id.clone()),
                    );
                }
            }
            Ok(received)
        };
        let received = step("queue.receive", receive, QueueError::Other).await?;
        if let Some(invocation) = current() {
            let taken: Vec<(String, String)> = received
                .iter()
                .map(|m| (m.message_id.clone(), m.receipt_handle.clone()))
                .collect();
            invocation.chaos.redeliver(queue_url, &taken).await;
        }
        Ok(received)
    }

    async fn depth(&self, queue_url: &str) -> Result<QueueDepth, QueueError> {
        step("queue.depth", self.0.depth(queue_url), QueueError::Other).await
    }

    async fn delete_batch(
        &self,
        queue_url: &str,
        receipt_handles: &[String],
    ) -> Result<Vec<String>, QueueError> {
        let failed = step(
            "queue.delete",
            self.0.delete_batch(queue_url, receipt_handles),
            QueueError::Other,
        )
        .await?;
        if let Some(invocation) = current() {
            let mut held = lock(&invocation.held);
            for handle in receipt_handles.iter().filter(|h| !failed.contains(h)) {
                held.remove(handle);
            }
        }
        Ok(failed)
    }
}

fn provider_error(operation: &'static str) -> impl FnOnce(String) -> BatchApiError {
    move |detail| BatchApiError::Transport { operation, detail }
}

impl<T: BatchProvider> BatchProvider for Chaotic<T> {
    async fn upload(&self, path: &Path) -> Result<FileObject, BatchApiError> {
        step(
            "provider.upload",
            self.0.upload(path),
            provider_error("uploading a file"),
        )
        .await
    }

    async fn create(&self, request: &CreateBatchRequest) -> Result<Batch, BatchApiError> {
        step(
            "provider.create",
            self.0.create(request),
            provider_error("creating a batch"),
        )
        .await
    }

    async fn retrieve(&self, batch_id: &str) -> Result<Batch, BatchApiError> {
        step(
            "provider.retrieve",
            self.0.retrieve(batch_id),
            provider_error("retrieving a batch"),
        )
        .await
    }

    async fn open_file(&self, file_id: &str) -> Result<LineReader, BatchApiError> {
        step(
            "provider.open_file",
            self.0.open_file(file_id),
            provider_error("reading a file"),
        )
        .await
    }

    async fn delete_file(&self, file_id: &str) -> Result<(), BatchApiError> {
        step(
            "provider.delete_file",
            self.0.delete_file(file_id),
            provider_error("deleting a file"),
        )
        .await
    }
}
