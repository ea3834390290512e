//! In-memory implementations of the three [`ports`](crate::ports), for tests that should
//! run in milliseconds without moto or the batch emulator: [`MemoryStore`] (S3),
//! [`MemoryQueue`] (SQS) and [`MemoryProvider`] (an OpenAI-compatible Batch API).
//!
//! Each keeps the semantics the pipeline's logic relies on, and is stricter where the
//! real service is loose, so that a test passing here does not lean on luck: every write
//! gets a new etag, a receipt handle goes stale once its message is received again, and
//! the provider validates input files the way OpenAI does. Each also has fault hooks, so a
//! test can make one chosen call fail and check that nothing is lost.
//!
//! Compiled for this crate's own tests and, elsewhere, with the `memory` feature.

use std::collections::{BTreeMap, HashSet};
use std::path::Path;
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use serde_json::{Value, json};
use tokio::sync::Notify;
use tokio::time::Instant;

use crate::batch_api::{
    Batch, BatchApiError, BatchError, BatchErrors, BatchStatus, CreateBatchRequest, FileObject,
    RequestCounts, Timestamp,
};
use crate::ports::{
    BatchProvider, LineReader, MAX_BATCH_MESSAGES, ObjectInfo, ObjectStore, OutgoingMessage, Queue,
    QueueDepth, QueueError, ReceivedMessage, StoreError, StoredObject, WriteCondition,
};
use crate::records::{MAX_KEY_BYTES, unix_now};
use crate::request::CHAT_COMPLETIONS;

/// A lock that survives a test thread's panic: the data is still what the other threads
/// need to report on.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// A small PNG (24×16) that differs for each `index`, for tests that need real images.
pub fn sample_png(index: usize) -> Result<Vec<u8>, image::ImageError> {
    let shade = (index * 40 % 256) as u8;
    let image = image::RgbImage::from_fn(24, 16, |x, y| {
        image::Rgb([shade, (x * 10) as u8, (y * 15) as u8])
    });
    let mut png = Vec::new();
    image.write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)?;
    Ok(png)
}

// ---------------------------------------------------------------------------------------
// Object store
// ---------------------------------------------------------------------------------------

/// An [`ObjectStore`] operation, as fault hooks and the call log name it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum StoreOp {
    Get,
    Head,
    Put,
    Delete,
    List,
}

/// Which keys a fault applies to. For [`StoreOp::List`] the "key" is the listed prefix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyMatch {
    /// This key only.
    Exact(String),
    /// Every key that starts with this; `""` matches every key.
    Prefix(String),
}

impl KeyMatch {
    fn matches(&self, key: &str) -> bool {
        match self {
            Self::Exact(exact) => key == exact,
            Self::Prefix(prefix) => key.starts_with(prefix.as_str()),
        }
    }
}

/// A failure [`MemoryStore`] injects: calls of `op` on matching keys (in any bucket)
/// return [`StoreError::Other`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreFault {
    pub op: StoreOp,
    pub keys: KeyMatch,
    /// How many matching calls fail; `None` until [`MemoryStore::clear_faults`].
    pub times: Option<u32>,
    /// `false`: the call fails before it has any effect (the request never arrived, or
    /// the process died first). `true`: a write or delete takes effect and only its reply
    /// is lost, as when S3 commits and the connection drops.
    pub takes_effect: bool,
}

/// One call the store received, in the order it arrived.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreCall {
    pub op: StoreOp,
    pub bucket: String,
    /// The key, or the prefix of a [`StoreOp::List`].
    pub key: String,
}

#[derive(Debug)]
struct StoredEntry {
    body: Vec<u8>,
    etag: String,
}

#[derive(Debug, Default)]
struct StoreState {
    /// (bucket, key) → object; a `BTreeMap` lists in S3's order (UTF-8 bytes).
    objects: BTreeMap<(String, String), StoredEntry>,
    writes: u64,
    faults: Vec<StoreFault>,
    calls: Vec<StoreCall>,
    fired: Vec<StoreCall>,
}

impl StoreState {
    fn new_etag(&mut self) -> String {
        self.writes += 1;
        // The shape of an S3 etag (32 hex digits), but a counter, not an MD5.
        format!("{:032x}", self.writes)
    }

    /// Logs the call and decides its fault: `None` when it runs normally, otherwise
    /// whether it takes effect before failing.
    fn admit(&mut self, op: StoreOp, bucket: &str, key: &str) -> Option<bool> {
        let call = StoreCall {
            op,
            bucket: bucket.to_owned(),
            key: key.to_owned(),
        };
        self.calls.push(call.clone());
        let index = self
            .faults
            .iter()
            .position(|f| f.op == op && f.keys.matches(key))?;
        let fault = &mut self.faults[index];
        let takes_effect = fault.takes_effect;
        if let Some(times) = &mut fault.times {
            *times = times.saturating_sub(1);
            if *times == 0 {
                self.faults.remove(index);
            }
        }
        self.fired.push(call);
        Some(takes_effect)
    }
}

fn injected(op: StoreOp, bucket: &str, key: &str) -> StoreError {
    StoreError::Other(format!("injected {op:?} failure on s3://{bucket}/{key}"))
}

/// An [`ObjectStore`] in memory, modelling S3 as the pipeline uses it.
///
/// Modelled: objects per bucket and key; a new etag on every write (S3's etag is an MD5
/// of the content, so rewriting the same bytes keeps it there: nothing may rely on that,
/// and here it changes); `If-None-Match: *` and `If-Match` writes that fail with
/// [`StoreError::ConditionFailed`] (an `If-Match` on a missing object too, as the S3
/// adapter maps S3's 404); `get` of a missing key is [`StoreError::NotFound`], `head`
/// gives `None`, deleting a missing key succeeds; listing in key order; keys S3 refuses
/// (empty, over [`MAX_KEY_BYTES`]) are refused.
///
/// Left out: content types and other metadata, versioning, multipart uploads, pagination,
/// S3's 409 for concurrent conditional writes (one lock serialises every call here), and
/// bucket creation (any bucket exists).
///
/// Fault hooks ([`Self::fail_once`], [`Self::inject`]) make chosen calls fail with
/// [`StoreError::Other`]; [`Self::calls`] logs every call, so a test can find the write
/// points of a run and fail each in turn.
#[derive(Debug, Default)]
pub struct MemoryStore {
    state: Mutex<StoreState>,
}

impl MemoryStore {
    /// Stores an object and reports it as an S3 event would (`NewObject`).
    pub fn put_new_object(
        &self,
        bucket: &str,
        key: &str,
        body: Vec<u8>,
    ) -> crate::enqueue::NewObject {
        let size = body.len() as u64;
        let etag = self.insert(bucket, key, body);
        crate::enqueue::NewObject {
            bucket: bucket.to_owned(),
            key: key.to_owned(),
            size,
            etag,
            version_id: None,
        }
    }

    /// Writes an object as a test's setup would, outside the call log and fault hooks;
    /// returns its etag.
    pub fn insert(&self, bucket: &str, key: &str, body: Vec<u8>) -> String {
        let mut state = lock(&self.state);
        let etag = state.new_etag();
        state.objects.insert(
            (bucket.to_owned(), key.to_owned()),
            StoredEntry {
                body,
                etag: etag.clone(),
            },
        );
        etag
    }

    /// An object's content and etag, read outside the call log and fault hooks.
    pub fn object(&self, bucket: &str, key: &str) -> Option<StoredObject> {
        lock(&self.state)
            .objects
            .get(&(bucket.to_owned(), key.to_owned()))
            .map(|entry| StoredObject {
                body: entry.body.clone(),
                etag: entry.etag.clone(),
            })
    }

    /// The keys under `prefix` in `bucket`, in key order.
    pub fn keys(&self, bucket: &str, prefix: &str) -> Vec<String> {
        lock(&self.state)
            .objects
            .keys()
            .filter(|(b, key)| b == bucket && key.starts_with(prefix))
            .map(|(_, key)| key.clone())
            .collect()
    }

    /// Every (bucket, key), in order.
    pub fn all_keys(&self) -> Vec<(String, String)> {
        lock(&self.state).objects.keys().cloned().collect()
    }

    /// The next call of `op` on exactly this key (in any bucket) fails, once.
    pub fn fail_once(&self, op: StoreOp, key: &str) {
        self.inject(StoreFault {
            op,
            keys: KeyMatch::Exact(key.to_owned()),
            times: Some(1),
            takes_effect: false,
        });
    }

    /// The next call of `op` on a key under `prefix` fails, once.
    pub fn fail_once_under(&self, op: StoreOp, prefix: &str) {
        self.inject(StoreFault {
            op,
            keys: KeyMatch::Prefix(prefix.to_owned()),
            times: Some(1),
            takes_effect: false,
        });
    }

    /// Every call of `op` on a key under `prefix` fails until [`Self::clear_faults`].
    pub fn fail_always_under(&self, op: StoreOp, prefix: &str) {
        self.inject(StoreFault {
            op,
            keys: KeyMatch::Prefix(prefix.to_owned()),
            times: None,
            takes_effect: false,
        });
    }

    /// Adds a fault. When several match a call, the first added decides.
    pub fn inject(&self, fault: StoreFault) {
        if fault.times != Some(0) {
            lock(&self.state).faults.push(fault);
        }
    }

    /// Removes every fault not yet used up.
    pub fn clear_faults(&self) {
        lock(&self.state).faults.clear();
    }

    /// The calls a fault made fail, in order: a test checks its fault was reached.
    pub fn fired_faults(&self) -> Vec<StoreCall> {
        lock(&self.state).fired.clone()
    }

    /// Every call through the [`ObjectStore`] trait so far, in order.
    pub fn calls(&self) -> Vec<StoreCall> {
        lock(&self.state).calls.clone()
    }
}

fn check_key(bucket: &str, key: &str) -> Result<(), StoreError> {
    if key.is_empty() || key.len() > MAX_KEY_BYTES {
        return Err(StoreError::Other(format!(
            "s3://{bucket}/…: S3 refuses a key of {} bytes",
            key.len()
        )));
    }
    Ok(())
}

impl ObjectStore for MemoryStore {
    async fn get(&self, bucket: &str, key: &str) -> Result<StoredObject, StoreError> {
        let mut state = lock(&self.state);
        if state.admit(StoreOp::Get, bucket, key).is_some() {
            return Err(injected(StoreOp::Get, bucket, key));
        }
        state
            .objects
            .get(&(bucket.to_owned(), key.to_owned()))
            .map(|entry| StoredObject {
                body: entry.body.clone(),
                etag: entry.etag.clone(),
            })
            .ok_or_else(|| StoreError::NotFound {
                bucket: bucket.to_owned(),
                key: key.to_owned(),
            })
    }

    async fn head(&self, bucket: &str, key: &str) -> Result<Option<ObjectInfo>, StoreError> {
        let mut state = lock(&self.state);
        if state.admit(StoreOp::Head, bucket, key).is_some() {
            return Err(injected(StoreOp::Head, bucket, key));
        }
        Ok(state
            .objects
            .get(&(bucket.to_owned(), key.to_owned()))
            .map(|entry| ObjectInfo {
                size: entry.body.len() as u64,
                etag: entry.etag.clone(),
            }))
    }

    async fn put(
        &self,
        bucket: &str,
        key: &str,
        body: Vec<u8>,
        _content_type: &str,
        condition: WriteCondition,
    ) -> Result<String, StoreError> {
        let mut state = lock(&self.state);
        let fault = state.admit(StoreOp::Put, bucket, key);
        if fault == Some(false) {
            return Err(injected(StoreOp::Put, bucket, key));
        }
        check_key(bucket, key)?;
        let id = (bucket.to_owned(), key.to_owned());
        let current = state.objects.get(&id).map(|entry| entry.etag.as_str());
        let allowed = match &condition {
            WriteCondition::Overwrite => true,
            WriteCondition::IfAbsent => current.is_none(),
            WriteCondition::IfMatch(expected) => current == Some(expected.as_str()),
        };
        if !allowed {
            return Err(StoreError::ConditionFailed {
                bucket: bucket.to_owned(),
                key: key.to_owned(),
            });
        }
        let etag = state.new_etag();
        state.objects.insert(
            id,
            StoredEntry {
                body,
                etag: etag.clone(),
            },
        );
        if fault == Some(true) {
            return Err(injected(StoreOp::Put, bucket, key));
        }
        Ok(etag)
    }

    async fn delete(&self, bucket: &str, key: &str) -> Result<(), StoreError> {
        let mut state = lock(&self.state);
        let fault = state.admit(StoreOp::Delete, bucket, key);
        if fault == Some(false) {
            return Err(injected(StoreOp::Delete, bucket, key));
        }
        state.objects.remove(&(bucket.to_owned(), key.to_owned()));
        if fault == Some(true) {
            return Err(injected(StoreOp::Delete, bucket, key));
        }
        Ok(())
    }

    async fn list(&self, bucket: &str, prefix: &str) -> Result<Vec<String>, StoreError> {
        let mut state = lock(&self.state);
        if state.admit(StoreOp::List, bucket, prefix).is_some() {
            return Err(injected(StoreOp::List, bucket, prefix));
        }
        Ok(state
            .objects
            .keys()
            .filter(|(b, key)| b == bucket && key.starts_with(prefix))
            .map(|(_, key)| key.clone())
            .collect())
    }
}

// ---------------------------------------------------------------------------------------
// Queue
// ---------------------------------------------------------------------------------------

/// A [`Queue`] operation, as fault hooks and call counts name it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum QueueOp {
    Send,
    Receive,
    Delete,
}

impl QueueOp {
    fn index(self) -> usize {
        match self {
            Self::Send => 0,
            Self::Receive => 1,
            Self::Delete => 2,
        }
    }
}

/// SQS's longest visibility timeout, to which the adapter clamps.
const MAX_VISIBILITY: Duration = Duration::from_secs(12 * 60 * 60);
/// SQS's longest long-poll wait, to which the adapter clamps.
const MAX_WAIT: Duration = Duration::from_secs(20);

#[derive(Debug)]
struct QueuedMessage {
    id: String,
    body: String,
    receive_count: u32,
    /// Hidden until then; `None` when never received or made visible again.
    hidden_until: Option<Instant>,
    /// The handle of the latest receive: the one that deletes the message.
    receipt_handle: Option<String>,
}

impl QueuedMessage {
    fn visible(&self, now: Instant) -> bool {
        self.hidden_until.is_none_or(|until| until <= now)
    }
}

#[derive(Debug, Default)]
struct QueueState {
    /// Queue URL → its messages, oldest first.
    queues: BTreeMap<String, Vec<QueuedMessage>>,
    next_id: u64,
    /// Every receipt handle given out, to tell a stale handle from an invalid one.
    issued: HashSet<String>,
    sent: Vec<(String, String)>,
    calls: [u32; 3],
    failures_left: [u32; 3],
    refusals_left: u32,
}

impl QueueState {
    /// Counts the call; `true` when an injected failure takes it.
    fn admit(&mut self, op: QueueOp) -> bool {
        self.calls[op.index()] += 1;
        let left = &mut self.failures_left[op.index()];
        if *left > 0 {
            *left -= 1;
            return true;
        }
        false
    }
}

/// A [`Queue`] in memory, modelling a standard SQS queue as the pipeline uses it.
///
/// Modelled: one queue per URL (created on first use); batches of at most
/// [`MAX_BATCH_MESSAGES`] entries with distinct ids; a received message hidden for its
/// visibility timeout (clamped to SQS's 12 hours), then visible again with its receive
/// count one higher and a new receipt handle; deletion by receipt handle, where a handle
/// that is no longer the latest (its message was received again) is accepted but
/// deletes nothing, a handle never issued is reported failed, and deleting twice is
/// harmless; long polling up to `wait` (clamped to 20 s). Time is
/// [`tokio::time::Instant`], so tests with paused time (`tokio::time::pause`,
/// `advance`) move visibility timeouts deterministically.
///
/// Left out: dead-letter queues and `maxReceiveCount`, message retention, delays, FIFO
/// queues, body size limits, and SQS's occasional duplicate delivery (messages come back
/// in the order they were sent, once per visibility timeout).
///
/// Fault hooks: [`Self::fail_next`] fails whole calls with [`QueueError::Other`];
/// [`Self::refuse_next_sends`] makes sends report every entry refused.
#[derive(Debug, Default)]
pub struct MemoryQueue {
    state: Mutex<QueueState>,
    /// Wakes long polls when a message arrives.
    arrived: Notify,
}

impl MemoryQueue {
    /// The next `calls` calls of `op` fail with [`QueueError::Other`] (replacing any count
    /// left; 0 clears it). A failure is decided before a refusal.
    pub fn fail_next(&self, op: QueueOp, calls: u32) {
        lock(&self.state).failures_left[op.index()] = calls;
    }

    /// The next `calls` sends take no entry and report every one refused (replacing any
    /// count left; 0 clears it).
    pub fn refuse_next_sends(&self, calls: u32) {
        lock(&self.state).refusals_left = calls;
    }

    /// How many calls of `op` the queue has had, failed ones included.
    pub fn calls(&self, op: QueueOp) -> u32 {
        lock(&self.state).calls[op.index()]
    }

    /// Every message the queue took, as (queue URL, body), in order, whatever became of
    /// it since.
    pub fn sent(&self) -> Vec<(String, String)> {
        lock(&self.state).sent.clone()
    }

    /// The bodies of the messages still on the queue (visible or not), oldest first.
    pub fn bodies(&self, queue_url: &str) -> Vec<String> {
        lock(&self.state)
            .queues
            .get(queue_url)
            .map(|messages| messages.iter().map(|m| m.body.clone()).collect())
            .unwrap_or_default()
    }

    /// How many messages are on the queue, visible or not (SQS's two approximate counts
    /// added up).
    pub fn depth(&self, queue_url: &str) -> usize {
        lock(&self.state).queues.get(queue_url).map_or(0, Vec::len)
    }

    /// How many messages are received and still hidden.
    pub fn in_flight(&self, queue_url: &str) -> usize {
        let now = Instant::now();
        lock(&self.state)
            .queues
            .get(queue_url)
            .map_or(0, |messages| {
                messages.iter().filter(|m| !m.visible(now)).count()
            })
    }

    /// Makes every hidden message visible now, as `ChangeMessageVisibility` to 0 would
    /// (what a crashed consumer's messages come to when their timeout ends).
    pub fn release_all(&self, queue_url: &str) {
        if let Some(messages) = lock(&self.state).queues.get_mut(queue_url) {
            for message in messages {
                message.hidden_until = None;
            }
        }
        self.arrived.notify_waiters();
    }

    /// Takes up to `max` visible messages, or says when the next hidden one reappears.
    fn take_visible(
        &self,
        queue_url: &str,
        max: usize,
        visibility_timeout: Duration,
    ) -> (Vec<ReceivedMessage>, Option<Instant>) {
        let now = Instant::now();
        let mut guard = lock(&self.state);
        let state = &mut *guard;
        let messages = state.queues.entry(queue_url.to_owned()).or_default();
        let mut received = Vec::new();
        for message in messages.iter_mut().filter(|m| m.visible(now)).take(max) {
            message.receive_count += 1;
            message.hidden_until = Some(now + visibility_timeout);
            let handle = format!("{}#{}", message.id, message.receive_count);
            message.receipt_handle = Some(handle.clone());
            state.issued.insert(handle.clone());
            received.push(ReceivedMessage {
                message_id: message.id.clone(),
                receipt_handle: handle,
                body: message.body.clone(),
                receive_count: message.receive_count,
            });
        }
        let next_visible = messages.iter().filter_map(|m| m.hidden_until).min();
        (received, next_visible)
    }
}

impl Queue for MemoryQueue {
    async fn send_batch(
        &self,
        queue_url: &str,
        messages: &[OutgoingMessage],
    ) -> Result<Vec<String>, QueueError> {
        {
            let mut guard = lock(&self.state);
            let state = &mut *guard;
            if state.admit(QueueOp::Send) {
                return Err(QueueError::Other(format!(
                    "injected send failure on {queue_url}"
                )));
            }
            if messages.len() > MAX_BATCH_MESSAGES {
                return Err(QueueError::Other(format!(
                    "{} entries in one batch; SQS takes at most {MAX_BATCH_MESSAGES}",
                    messages.len()
                )));
            }
            let ids: HashSet<&str> = messages.iter().map(|m| m.id.as_str()).collect();
            if ids.len() < messages.len() {
                return Err(QueueError::Other(
                    "batch entry ids are not distinct".to_owned(),
                ));
            }
            if state.refusals_left > 0 {
                state.refusals_left -= 1;
                return Ok(messages.iter().map(|m| m.id.clone()).collect());
            }
            for message in messages {
                state.next_id += 1;
                let id = format!("msg-{}", state.next_id);
                state
                    .queues
                    .entry(queue_url.to_owned())
                    .or_default()
                    .push(QueuedMessage {
                        id,
                        body: message.body.clone(),
                        receive_count: 0,
                        hidden_until: None,
                        receipt_handle: None,
                    });
                state
                    .sent
                    .push((queue_url.to_owned(), message.body.clone()));
            }
        }
        self.arrived.notify_waiters();
        Ok(Vec::new())
    }

    async fn receive(
        &self,
        queue_url: &str,
        max: u32,
        visibility_timeout: Duration,
        wait: Duration,
    ) -> Result<Vec<ReceivedMessage>, QueueError> {
        if lock(&self.state).admit(QueueOp::Receive) {
            return Err(QueueError::Other(format!(
                "injected receive failure on {queue_url}"
            )));
        }
        let max = max.clamp(1, MAX_BATCH_MESSAGES as u32) as usize;
        let visibility_timeout = visibility_timeout.min(MAX_VISIBILITY);
        let deadline = Instant::now() + wait.min(MAX_WAIT);
        loop {
            // Registered before looking, so a send between the look and the wait wakes it.
            let mut arrived = std::pin::pin!(self.arrived.notified());
            arrived.as_mut().enable();
            let (received, next_visible) = self.take_visible(queue_url, max, visibility_timeout);
            if !received.is_empty() || Instant::now() >= deadline {
                return Ok(received);
            }
            let wake = next_visible.map_or(deadline, |at| at.min(deadline));
            tokio::select! {
                () = &mut arrived => {}
                () = tokio::time::sleep_until(wake) => {}
            }
        }
    }

    async fn depth(&self, queue_url: &str) -> Result<QueueDepth, QueueError> {
        let now = Instant::now();
        let state = lock(&self.state);
        let messages = state.queues.get(queue_url).map_or(&[][..], Vec::as_slice);
        let visible = messages.iter().filter(|m| m.visible(now)).count() as u64;
        Ok(QueueDepth {
            visible,
            in_flight: messages.len() as u64 - visible,
        })
    }

    async fn delete_batch(
        &self,
        queue_url: &str,
        receipt_handles: &[String],
    ) -> Result<Vec<String>, QueueError> {
        let mut guard = lock(&self.state);
        let state = &mut *guard;
        if state.admit(QueueOp::Delete) {
            return Err(QueueError::Other(format!(
                "injected delete failure on {queue_url}"
            )));
        }
        if receipt_handles.len() > MAX_BATCH_MESSAGES {
            return Err(QueueError::Other(format!(
                "{} entries in one batch; SQS takes at most {MAX_BATCH_MESSAGES}",
                receipt_handles.len()
            )));
        }
        let mut failed = Vec::new();
        let messages = state.queues.entry(queue_url.to_owned()).or_default();
        for handle in receipt_handles {
            if let Some(at) = messages
                .iter()
                .position(|m| m.receipt_handle.as_ref() == Some(handle))
            {
                messages.remove(at);
            } else if !state.issued.contains(handle) {
                failed.push(handle.clone());
            }
            // Otherwise stale or already deleted: SQS accepts it, and nothing changes.
        }
        Ok(failed)
    }
}

// ---------------------------------------------------------------------------------------
// Batch provider
// ---------------------------------------------------------------------------------------

/// The model [`MemoryProvider`]'s completions name: labels it produced are recognisably
/// synthetic, never a model's.
pub const MEMORY_MODEL: &str = "shotlabel-memory-provider";
/// Token counts of each completion [`MemoryProvider`] writes.
pub const REPLY_PROMPT_TOKENS: u64 = 100;
pub const REPLY_COMPLETION_TOKENS: u64 = 10;

/// A [`BatchProvider`] operation, as fault hooks and call counts name it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ProviderOp {
    Upload,
    Create,
    Retrieve,
    OpenFile,
    DeleteFile,
}

impl ProviderOp {
    fn index(self) -> usize {
        match self {
            Self::Upload => 0,
            Self::Create => 1,
            Self::Retrieve => 2,
            Self::OpenFile => 3,
            Self::DeleteFile => 4,
        }
    }

    fn operation(self) -> &'static str {
        match self {
            Self::Upload => "upload file",
            Self::Create => "create batch",
            Self::Retrieve => "retrieve batch",
            Self::OpenFile => "open file",
            Self::DeleteFile => "delete file",
        }
    }
}

/// One request line of a batch's input file, as the provider read it.
#[derive(Debug, Clone, PartialEq)]
pub struct ProviderRequest {
    pub custom_id: String,
    /// The chat-completion request body (model, messages with the image, schema…).
    pub body: Value,
}

/// How the provider answers one request when a test finishes its batch.
#[derive(Debug, Clone, PartialEq)]
pub enum Reply {
    /// A 200 chat completion whose message content is this JSON, serialised.
    Json(Value),
    /// A 200 chat completion whose message content is this text, as is.
    Text(String),
    /// A 200 chat completion cut off at `max_tokens` (`finish_reason: "length"`).
    CutOff,
    /// An error-file line with this error object and no response (how OpenAI reports a
    /// request it never ran, e.g. `batch_expired`).
    Error { code: String, message: String },
    /// An error-file line whose response has this non-2xx HTTP status.
    Status(u16),
    /// This exact line in the output file (its custom id is the test's business).
    Raw(String),
    /// No line at all: the request is in neither file.
    Missing,
}

#[derive(Debug)]
struct StoredFile {
    content: Vec<u8>,
    purpose: String,
    created_at: Timestamp,
}

#[derive(Debug)]
struct ProviderBatch {
    /// Creation order.
    sequence: u64,
    batch: Batch,
    requests: Vec<ProviderRequest>,
}

#[derive(Debug, Default)]
struct ProviderState {
    next_id: u64,
    files: BTreeMap<String, StoredFile>,
    batches: BTreeMap<String, ProviderBatch>,
    created: Vec<CreateBatchRequest>,
    calls: [u32; 5],
    failures_left: [u32; 5],
}

impl ProviderState {
    fn next(&mut self) -> u64 {
        self.next_id += 1;
        self.next_id
    }

    fn add_file(&mut self, content: Vec<u8>, purpose: &str) -> String {
        let id = format!("file-{}", self.next());
        self.files.insert(
            id.clone(),
            StoredFile {
                content,
                purpose: purpose.to_owned(),
                created_at: now(),
            },
        );
        id
    }

    fn admit(&mut self, op: ProviderOp) -> Result<(), BatchApiError> {
        self.calls[op.index()] += 1;
        let left = &mut self.failures_left[op.index()];
        if *left > 0 {
            *left -= 1;
            return Err(BatchApiError::Status {
                operation: op.operation(),
                status: 503,
                message: "injected failure: the memory provider is unavailable".to_owned(),
            });
        }
        Ok(())
    }

    fn batch_mut(
        &mut self,
        operation: &'static str,
        batch_id: &str,
    ) -> Result<&mut ProviderBatch, BatchApiError> {
        self.batches
            .get_mut(batch_id)
            .ok_or_else(|| not_found(operation, "batch", batch_id))
    }
}

fn not_found(operation: &'static str, what: &str, id: &str) -> BatchApiError {
    BatchApiError::Status {
        operation,
        status: 404,
        message: format!("no {what} {id}"),
    }
}

fn now() -> Timestamp {
    Timestamp::from_secs(i64::try_from(unix_now()).unwrap_or(i64::MAX))
}

/// A batch's input file read as OpenAI reads it: its requests, or every reason it is
/// rejected (codes as in OpenAI's batch `errors`).
fn read_input(content: &[u8], endpoint: &str) -> Result<Vec<ProviderRequest>, Vec<BatchError>> {
    let mut requests = Vec::new();
    let mut errors = Vec::new();
    let mut seen = HashSet::new();
    let mut model: Option<String> = None;
    let reject = |code: &str, message: String, line: usize| BatchError {
        code: Some(code.to_owned()),
        message: Some(message),
        param: None,
        line: Some(line as u64),
    };
    for (index, raw) in content.split(|&b| b == b'\n').enumerate() {
        let line = index + 1;
        if raw.trim_ascii().is_empty() {
            continue;
        }
        let Ok(value) = serde_json::from_slice::<Value>(raw) else {
            errors.push(reject(
                "invalid_json_line",
                "the line is not valid JSON".into(),
                line,
            ));
            continue;
        };
        let Some(custom_id) = value["custom_id"].as_str().filter(|id| !id.is_empty()) else {
            errors.push(reject(
                "missing_custom_id",
                "the line has no custom_id".into(),
                line,
            ));
            continue;
        };
        if !seen.insert(custom_id.to_owned()) {
            errors.push(reject(
                "duplicate_custom_id",
                format!("custom_id {custom_id:?} is used twice"),
                line,
            ));
        }
        if value["method"].as_str() != Some("POST") {
            errors.push(reject(
                "invalid_method",
                "the method must be POST".into(),
                line,
            ));
        }
        if value["url"].as_str() != Some(endpoint) {
            errors.push(reject(
                "url_mismatch",
                format!("the url must be the batch's endpoint {endpoint}"),
                line,
            ));
        }
        let body = &value["body"];
        if !body.is_object() {
            errors.push(reject("missing_body", "the line has no body".into(), line));
            continue;
        }
        match (body["model"].as_str(), &model) {
            (None, _) => errors.push(reject(
                "missing_model",
                "the body names no model".into(),
                line,
            )),
            (Some(this), Some(first)) if this != first => errors.push(reject(
                "model_mismatch",
                format!("the body names model {this:?}, an earlier line {first:?}"),
                line,
            )),
            (Some(this), _) => model = Some(this.to_owned()),
        }
        requests.push(ProviderRequest {
            custom_id: custom_id.to_owned(),
            body: body.clone(),
        });
    }
    if requests.is_empty() && errors.is_empty() {
        errors.push(BatchError {
            code: Some("empty_file".to_owned()),
            message: Some("the input file has no requests".to_owned()),
            param: None,
            line: None,
        });
    }
    if errors.is_empty() {
        Ok(requests)
    } else {
        Err(errors)
    }
}

/// A chat completion answering with `content`.
fn completion(number: u64, content: &str, finish_reason: &str) -> Value {
    json!({
        "id": format!("chatcmpl-{number}"),
        "object": "chat.completion",
        "created": unix_now(),
        "model": MEMORY_MODEL,
        "choices": [{
            "index": 0,
            "message": { "role": "assistant", "content": content, "refusal": null },
            "finish_reason": finish_reason,
        }],
        "usage": {
            "prompt_tokens": REPLY_PROMPT_TOKENS,
            "completion_tokens": REPLY_COMPLETION_TOKENS,
            "total_tokens": REPLY_PROMPT_TOKENS + REPLY_COMPLETION_TOKENS,
        },
    })
}

/// An OpenAI-compatible Batch API in memory, whose batches a test finishes by hand.
///
/// Modelled: uploads kept as files (`file-<n>`); batch creation from an uploaded file
/// (`batch_<n>`, status `validating`, the request's metadata kept), with the input read
/// as OpenAI reads it: a file with a line that is not JSON, has no or a repeated
/// `custom_id`, another method or URL, no body or model, or mixed models makes a `failed`
/// batch whose `errors` carry OpenAI's codes and line numbers; unknown ids answered 404;
/// output and error files read as lines. A test then moves a batch on with
/// [`Self::set_status`] and ends it with [`Self::finish`], [`Self::complete`] or
/// [`Self::fail`], scripting a [`Reply`] per request. Completions name [`MEMORY_MODEL`].
///
/// Left out: progress on its own (nothing happens until the test says), completion
/// windows, cancellation by the client, file and request-count limits, and webhooks.
///
/// Fault hooks: [`Self::fail_next`] answers chosen calls with a 503.
#[derive(Debug, Default)]
pub struct MemoryProvider {
    state: Mutex<ProviderState>,
}

impl MemoryProvider {
    /// The next `calls` calls of `op` are answered 503 (replacing any count left; 0
    /// clears it).
    pub fn fail_next(&self, op: ProviderOp, calls: u32) {
        lock(&self.state).failures_left[op.index()] = calls;
    }

    /// How many calls of `op` the provider has had, failed ones included.
    pub fn calls(&self, op: ProviderOp) -> u32 {
        lock(&self.state).calls[op.index()]
    }

    /// Every batch, in creation order.
    pub fn batches(&self) -> Vec<Batch> {
        let state = lock(&self.state);
        let mut batches: Vec<&ProviderBatch> = state.batches.values().collect();
        batches.sort_by_key(|b| b.sequence);
        batches.iter().map(|b| b.batch.clone()).collect()
    }

    /// A batch as [`BatchProvider::retrieve`] would report it.
    pub fn batch(&self, batch_id: &str) -> Option<Batch> {
        lock(&self.state)
            .batches
            .get(batch_id)
            .map(|b| b.batch.clone())
    }

    /// The requests of a batch's input file, in file order.
    pub fn requests(&self, batch_id: &str) -> Vec<ProviderRequest> {
        lock(&self.state)
            .batches
            .get(batch_id)
            .map(|b| b.requests.clone())
            .unwrap_or_default()
    }

    /// Every batch creation request the provider accepted, in order.
    pub fn create_requests(&self) -> Vec<CreateBatchRequest> {
        lock(&self.state).created.clone()
    }

    /// A file's content.
    pub fn file(&self, file_id: &str) -> Option<Vec<u8>> {
        lock(&self.state)
            .files
            .get(file_id)
            .map(|f| f.content.clone())
    }

    /// Adds a file as if the provider had written it (an output file made elsewhere);
    /// returns its id.
    pub fn add_file(&self, content: Vec<u8>) -> String {
        lock(&self.state).add_file(content, "batch_output")
    }

    /// Adds a batch as given, replacing one with the same id: a batch the provider holds
    /// that no test created through it.
    pub fn insert_batch(&self, batch: Batch) {
        let mut state = lock(&self.state);
        let sequence = state.next();
        state.batches.insert(
            batch.id.clone(),
            ProviderBatch {
                sequence,
                batch,
                requests: Vec::new(),
            },
        );
    }

    /// Moves a batch to a status without finishing it (`in_progress`, `finalizing`…).
    pub fn set_status(&self, batch_id: &str, status: BatchStatus) -> Result<(), BatchApiError> {
        let mut state = lock(&self.state);
        let entry = state.batch_mut("set status", batch_id)?;
        if entry.batch.status.is_terminal() {
            return Err(BatchApiError::Config(format!(
                "batch {batch_id} has already ended {}",
                entry.batch.status
            )));
        }
        if status == BatchStatus::InProgress {
            entry.batch.in_progress_at = Some(now());
        }
        entry.batch.status = status;
        Ok(())
    }

    /// Ends a batch as `completed`, answering every request with the JSON `answer` makes
    /// of its custom id.
    pub fn complete(
        &self,
        batch_id: &str,
        mut answer: impl FnMut(&str) -> Value,
    ) -> Result<Batch, BatchApiError> {
        self.finish(batch_id, BatchStatus::Completed, |request| {
            Reply::Json(answer(&request.custom_id))
        })
    }

    /// Ends a batch with `status` (`completed`, `expired` or `cancelled`), writing each
    /// request's [`Reply`] to the output or error file. A file with no line is not
    /// written, as providers leave its id empty. Returns the batch as it now is.
    pub fn finish(
        &self,
        batch_id: &str,
        status: BatchStatus,
        mut reply: impl FnMut(&ProviderRequest) -> Reply,
    ) -> Result<Batch, BatchApiError> {
        if !matches!(
            status,
            BatchStatus::Completed | BatchStatus::Expired | BatchStatus::Cancelled
        ) {
            return Err(BatchApiError::Config(format!(
                "finish ends a batch completed, expired or cancelled, not {status}; \
                 see set_status and fail"
            )));
        }
        let requests = {
            let mut state = lock(&self.state);
            let entry = state.batch_mut("finish batch", batch_id)?;
            if entry.batch.status.is_terminal() {
                return Err(BatchApiError::Config(format!(
                    "batch {batch_id} has already ended {}",
                    entry.batch.status
                )));
            }
            entry.requests.clone()
        };
        // The test's closure runs without the lock, so it may look at the provider.
        let replies: Vec<(String, Reply)> = requests
            .iter()
            .map(|request| (request.custom_id.clone(), reply(request)))
            .collect();

        let mut state = lock(&self.state);
        let (mut output, mut errors) = (Vec::new(), Vec::new());
        let (mut completed, mut failed) = (0, 0);
        for (custom_id, reply) in replies {
            let number = state.next();
            let line_id = format!("batch_req_{number}");
            let request_id = format!("req_{number}");
            let ok = |body: Value| {
                json!({
                    "id": line_id,
                    "custom_id": custom_id,
                    "response": { "status_code": 200, "request_id": request_id, "body": body },
                    "error": null,
                })
            };
            let (line, to_output) = match reply {
                Reply::Json(answer) => (ok(completion(number, &answer.to_string(), "stop")), true),
                Reply::Text(text) => (ok(completion(number, &text, "stop")), true),
                // The start of a JSON object, as an answer cut off at max_tokens looks.
                Reply::CutOff => (ok(completion(number, "{\"answer\": \"th", "length")), true),
                Reply::Error { code, message } => (
                    json!({
                        "id": line_id,
                        "custom_id": custom_id,
                        "response": null,
                        "error": { "code": code, "message": message },
                    }),
                    false,
                ),
                Reply::Status(status) => (
                    json!({
                        "id": line_id,
                        "custom_id": custom_id,
                        "response": {
                            "status_code": status,
                            "request_id": request_id,
                            "body": { "error": {
                                "message": format!("the memory provider answered {status}"),
                                "type": "server_error",
                            } },
                        },
                        "error": null,
                    }),
                    false,
                ),
                Reply::Raw(raw) => {
                    output.extend_from_slice(raw.as_bytes());
                    output.push(b'\n');
                    completed += 1;
                    continue;
                }
                Reply::Missing => continue,
            };
            let file = if to_output {
                completed += 1;
                &mut output
            } else {
                failed += 1;
                &mut errors
            };
            file.extend_from_slice(line.to_string().as_bytes());
            file.push(b'\n');
        }
        let output_file_id = (!output.is_empty()).then(|| state.add_file(output, "batch_output"));
        let error_file_id = (!errors.is_empty()).then(|| state.add_file(errors, "batch_output"));
        let entry = state.batch_mut("finish batch", batch_id)?;
        let batch = &mut entry.batch;
        let at = Some(now());
        match status {
            BatchStatus::Completed => batch.completed_at = at,
            BatchStatus::Expired => batch.expired_at = at,
            _ => batch.cancelled_at = at,
        }
        batch.status = status;
        batch.output_file_id = output_file_id;
        batch.error_file_id = error_file_id;
        batch.request_counts = Some(RequestCounts {
            total: entry.requests.len() as u64,
            completed,
            failed,
        });
        Ok(batch.clone())
    }

    /// Ends a batch as `failed` with these errors and no files, as a provider fails a
    /// batch whose input it rejected.
    pub fn fail(&self, batch_id: &str, errors: Vec<BatchError>) -> Result<Batch, BatchApiError> {
        let mut state = lock(&self.state);
        let entry = state.batch_mut("fail batch", batch_id)?;
        if entry.batch.status.is_terminal() {
            return Err(BatchApiError::Config(format!(
                "batch {batch_id} has already ended {}",
                entry.batch.status
            )));
        }
        entry.batch.status = BatchStatus::Failed;
        entry.batch.failed_at = Some(now());
        entry.batch.errors = Some(BatchErrors { data: errors });
        Ok(entry.batch.clone())
    }
}

impl BatchProvider for MemoryProvider {
    async fn upload(&self, path: &Path) -> Result<FileObject, BatchApiError> {
        lock(&self.state).admit(ProviderOp::Upload)?;
        let content = tokio::fs::read(path)
            .await
            .map_err(|e| BatchApiError::File {
                operation: ProviderOp::Upload.operation(),
                path: path.display().to_string(),
                detail: e.to_string(),
            })?;
        let bytes = content.len() as u64;
        let filename = path.file_name().map(|n| n.to_string_lossy().into_owned());
        let mut state = lock(&self.state);
        let id = state.add_file(content, "batch");
        let created_at = state.files.get(&id).map(|f| f.created_at);
        Ok(FileObject {
            id,
            bytes,
            created_at,
            filename,
            purpose: Some("batch".to_owned()),
            status: Some("processed".to_owned()),
            status_details: None,
        })
    }

    async fn create(&self, request: &CreateBatchRequest) -> Result<Batch, BatchApiError> {
        let operation = ProviderOp::Create.operation();
        let mut state = lock(&self.state);
        state.admit(ProviderOp::Create)?;
        let Some(input) = state.files.get(&request.input_file_id) else {
            return Err(not_found(operation, "file", &request.input_file_id));
        };
        if input.purpose != "batch" {
            return Err(BatchApiError::Status {
                operation,
                status: 400,
                message: format!(
                    "file {} was not uploaded for batches",
                    request.input_file_id
                ),
            });
        }
        if request.endpoint != CHAT_COMPLETIONS {
            return Err(BatchApiError::Status {
                operation,
                status: 400,
                message: format!("unsupported endpoint {}", request.endpoint),
            });
        }
        let read = read_input(&input.content, &request.endpoint);
        let sequence = state.next();
        let id = format!("batch_{sequence}");
        let created_at = now();
        let (status, requests, errors, failed_at) = match read {
            Ok(requests) => (BatchStatus::Validating, requests, None, None),
            Err(data) => (
                BatchStatus::Failed,
                Vec::new(),
                Some(BatchErrors { data }),
                Some(created_at),
            ),
        };
        let batch = Batch {
            id: id.clone(),
            status,
            endpoint: Some(request.endpoint.clone()),
            input_file_id: Some(request.input_file_id.clone()),
            output_file_id: None,
            error_file_id: None,
            completion_window: Some(request.completion_window.clone()),
            errors,
            request_counts: Some(RequestCounts {
                total: requests.len() as u64,
                completed: 0,
                failed: 0,
            }),
            metadata: request.metadata.clone(),
            created_at: Some(created_at),
            in_progress_at: None,
            expires_at: Some(Timestamp::from_secs(created_at.as_secs() + 24 * 60 * 60)),
            finalizing_at: None,
            completed_at: None,
            failed_at,
            expired_at: None,
            cancelling_at: None,
            cancelled_at: None,
        };
        state.created.push(request.clone());
        state.batches.insert(
            id,
            ProviderBatch {
                sequence,
                batch: batch.clone(),
                requests,
            },
        );
        Ok(batch)
    }

    async fn retrieve(&self, batch_id: &str) -> Result<Batch, BatchApiError> {
        let mut state = lock(&self.state);
        state.admit(ProviderOp::Retrieve)?;
        state
            .batches
            .get(batch_id)
            .map(|b| b.batch.clone())
            .ok_or_else(|| not_found(ProviderOp::Retrieve.operation(), "batch", batch_id))
    }

    async fn open_file(&self, file_id: &str) -> Result<LineReader, BatchApiError> {
        let mut state = lock(&self.state);
        state.admit(ProviderOp::OpenFile)?;
        let file = state
            .files
            .get(file_id)
            .ok_or_else(|| not_found(ProviderOp::OpenFile.operation(), "file", file_id))?;
        Ok(Box::pin(std::io::Cursor::new(file.content.clone())))
    }

    async fn delete_file(&self, file_id: &str) -> Result<(), BatchApiError> {
        let mut state = lock(&self.state);
        state.admit(ProviderOp::DeleteFile)?;
        state.files.remove(file_id);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use serde_json::json;

    use super::*;
    use crate::answer::{LineOutcome, interpret_line};
    use crate::batch_api::OutputLine;
    use crate::records::Stage;
    use crate::task::Task;

    const BUCKET: &str = "bucket";
    const URL: &str = "memory://queue";

    async fn put(
        store: &MemoryStore,
        key: &str,
        body: &[u8],
        condition: WriteCondition,
    ) -> Result<String, StoreError> {
        store
            .put(BUCKET, key, body.to_vec(), "text/plain", condition)
            .await
    }

    #[tokio::test]
    async fn every_write_gets_a_new_etag_and_conditional_writes_hold() -> anyhow::Result<()> {
        let store = MemoryStore::default();
        let first = put(&store, "k", b"same", WriteCondition::IfAbsent).await?;
        let second = put(&store, "k", b"same", WriteCondition::Overwrite).await?;
        assert_ne!(
            first, second,
            "the same bytes rewritten still get a new etag"
        );
        assert!(matches!(
            put(&store, "k", b"x", WriteCondition::IfAbsent).await,
            Err(StoreError::ConditionFailed { .. })
        ));
        assert!(matches!(
            put(&store, "k", b"x", WriteCondition::IfMatch(first)).await,
            Err(StoreError::ConditionFailed { .. })
        ));
        let third = put(&store, "k", b"new", WriteCondition::IfMatch(second)).await?;
        assert_eq!(
            store.get(BUCKET, "k").await?,
            StoredObject {
                body: b"new".to_vec(),
                etag: third.clone(),
            }
        );
        assert_eq!(
            store.head(BUCKET, "k").await?,
            Some(ObjectInfo {
                size: 3,
                etag: third.clone(),
            })
        );
        // If-Match on a missing object fails its condition, as the S3 adapter reports it.
        assert!(matches!(
            put(&store, "gone", b"x", WriteCondition::IfMatch(third)).await,
            Err(StoreError::ConditionFailed { .. })
        ));
        assert!(matches!(
            store.get(BUCKET, "gone").await,
            Err(StoreError::NotFound { .. })
        ));
        assert_eq!(store.head(BUCKET, "gone").await?, None);
        store.delete(BUCKET, "gone").await?;
        assert!(matches!(
            store.get("another-bucket", "k").await,
            Err(StoreError::NotFound { .. })
        ));
        Ok(())
    }

    #[tokio::test]
    async fn listing_is_in_key_order_within_one_bucket() -> anyhow::Result<()> {
        let store = MemoryStore::default();
        for key in ["b/2", "a", "b/10", "b/1"] {
            store.insert(BUCKET, key, Vec::new());
        }
        store.insert("another-bucket", "b/3", Vec::new());
        assert_eq!(store.list(BUCKET, "b/").await?, ["b/1", "b/10", "b/2"]);
        assert_eq!(store.keys(BUCKET, ""), ["a", "b/1", "b/10", "b/2"]);
        assert_eq!(store.all_keys().len(), 5);
        Ok(())
    }

    #[tokio::test]
    async fn keys_s3_refuses_are_refused() -> anyhow::Result<()> {
        let store = MemoryStore::default();
        for key in [String::new(), "k".repeat(MAX_KEY_BYTES + 1)] {
            assert!(matches!(
                put(&store, &key, b"x", WriteCondition::Overwrite).await,
                Err(StoreError::Other(_))
            ));
        }
        put(
            &store,
            &"k".repeat(MAX_KEY_BYTES),
            b"x",
            WriteCondition::Overwrite,
        )
        .await?;
        Ok(())
    }

    #[tokio::test]
    async fn a_fault_fails_the_chosen_call_once_and_nothing_else() -> anyhow::Result<()> {
        let store = MemoryStore::default();
        store.fail_once(StoreOp::Put, "state/open/batch_1");
        // Another key with that prefix, and another operation on the key, are untouched.
        put(
            &store,
            "state/open/batch_10",
            b"",
            WriteCondition::Overwrite,
        )
        .await?;
        assert!(matches!(
            store.get(BUCKET, "state/open/batch_1").await,
            Err(StoreError::NotFound { .. })
        ));
        let failed = put(&store, "state/open/batch_1", b"", WriteCondition::Overwrite).await;
        assert!(
            matches!(&failed, Err(StoreError::Other(m)) if m.contains("injected")),
            "{failed:?}"
        );
        assert!(
            store.object(BUCKET, "state/open/batch_1").is_none(),
            "no effect"
        );
        put(&store, "state/open/batch_1", b"", WriteCondition::Overwrite).await?;
        assert_eq!(
            store.fired_faults(),
            [StoreCall {
                op: StoreOp::Put,
                bucket: BUCKET.into(),
                key: "state/open/batch_1".into(),
            }]
        );
        assert_eq!(store.calls().len(), 4);
        Ok(())
    }

    #[tokio::test]
    async fn a_fault_can_lose_the_reply_of_a_write_that_landed() -> anyhow::Result<()> {
        let store = MemoryStore::default();
        store.inject(StoreFault {
            op: StoreOp::Put,
            keys: KeyMatch::Prefix("labels/".into()),
            times: Some(1),
            takes_effect: true,
        });
        assert!(
            put(&store, "labels/a.json", b"1", WriteCondition::IfAbsent)
                .await
                .is_err()
        );
        assert!(store.object(BUCKET, "labels/a.json").is_some(), "it landed");
        assert!(matches!(
            put(&store, "labels/a.json", b"2", WriteCondition::IfAbsent).await,
            Err(StoreError::ConditionFailed { .. })
        ));

        store.fail_always_under(StoreOp::Delete, "");
        assert!(store.delete(BUCKET, "labels/a.json").await.is_err());
        assert!(store.delete(BUCKET, "labels/a.json").await.is_err());
        store.clear_faults();
        store.delete(BUCKET, "labels/a.json").await?;
        assert!(store.object(BUCKET, "labels/a.json").is_none());
        Ok(())
    }

    fn messages(bodies: &[&str]) -> Vec<OutgoingMessage> {
        bodies
            .iter()
            .enumerate()
            .map(|(i, body)| OutgoingMessage {
                id: i.to_string(),
                body: (*body).to_owned(),
            })
            .collect()
    }

    #[tokio::test(start_paused = true)]
    async fn received_messages_hide_for_their_visibility_timeout_then_come_back()
    -> anyhow::Result<()> {
        let queue = MemoryQueue::default();
        let hide = Duration::from_secs(30);
        queue.send_batch(URL, &messages(&["a", "b"])).await?;
        let first = queue.receive(URL, 1, hide, Duration::ZERO).await?;
        let second = queue.receive(URL, 10, hide, Duration::ZERO).await?;
        let bodies = |received: &[ReceivedMessage]| -> Vec<String> {
            received.iter().map(|m| m.body.clone()).collect()
        };
        assert_eq!(
            (bodies(&first), bodies(&second)),
            (vec!["a".into()], vec!["b".into()])
        );
        assert_eq!(first[0].receive_count, 1);
        assert!(
            queue
                .receive(URL, 10, hide, Duration::ZERO)
                .await?
                .is_empty()
        );
        assert_eq!((queue.depth(URL), queue.in_flight(URL)), (2, 2));

        tokio::time::advance(hide - Duration::from_secs(1)).await;
        assert!(
            queue
                .receive(URL, 10, hide, Duration::ZERO)
                .await?
                .is_empty()
        );
        tokio::time::advance(Duration::from_secs(1)).await;
        let again = queue.receive(URL, 10, hide, Duration::ZERO).await?;
        assert_eq!(bodies(&again), ["a", "b"]);
        assert!(again.iter().all(|m| m.receive_count == 2));
        assert_ne!(again[0].receipt_handle, first[0].receipt_handle);

        // The first receive's handle is stale now: accepted, and nothing is deleted.
        let stale = queue
            .delete_batch(URL, &[first[0].receipt_handle.clone()])
            .await?;
        assert!(stale.is_empty());
        assert_eq!(queue.depth(URL), 2);
        let bogus = "msg-0#1".to_owned();
        let failed = queue
            .delete_batch(URL, &[again[0].receipt_handle.clone(), bogus.clone()])
            .await?;
        assert_eq!(failed, [bogus]);
        assert_eq!(queue.bodies(URL), ["b"]);
        // Deleting twice is harmless.
        assert!(
            queue
                .delete_batch(URL, &[again[0].receipt_handle.clone()])
                .await?
                .is_empty()
        );
        queue.release_all(URL);
        assert_eq!(queue.in_flight(URL), 0);
        Ok(())
    }

    #[tokio::test(start_paused = true)]
    async fn a_long_poll_waits_for_a_message_up_to_twenty_seconds() -> anyhow::Result<()> {
        let queue = MemoryQueue::default();
        let start = Instant::now();
        let nothing = queue
            .receive(URL, 10, Duration::from_secs(30), Duration::from_secs(60))
            .await?;
        assert!(nothing.is_empty());
        assert_eq!(start.elapsed(), MAX_WAIT, "SQS waits at most 20 s");

        let start = Instant::now();
        let (received, sent) = tokio::join!(
            queue.receive(URL, 10, Duration::from_secs(30), Duration::from_secs(20)),
            async {
                tokio::time::sleep(Duration::from_secs(5)).await;
                queue.send_batch(URL, &messages(&["late"])).await
            }
        );
        sent?;
        assert_eq!(received?.len(), 1);
        assert_eq!(start.elapsed(), Duration::from_secs(5));
        Ok(())
    }

    #[tokio::test]
    async fn calls_can_be_failed_or_refused_and_batches_are_bounded() -> anyhow::Result<()> {
        let queue = MemoryQueue::default();
        queue.fail_next(QueueOp::Send, 1);
        queue.refuse_next_sends(1);
        let batch = messages(&["a", "b"]);
        assert!(queue.send_batch(URL, &batch).await.is_err());
        assert_eq!(queue.send_batch(URL, &batch).await?, ["0", "1"]);
        assert!(queue.send_batch(URL, &batch).await?.is_empty());
        assert_eq!(queue.calls(QueueOp::Send), 3);
        assert_eq!(queue.sent().len(), 2, "only the accepted send counts");

        let eleven: Vec<&str> = vec!["m"; MAX_BATCH_MESSAGES + 1];
        assert!(queue.send_batch(URL, &messages(&eleven)).await.is_err());
        let mut twins = messages(&["a", "b"]);
        twins[1].id = twins[0].id.clone();
        assert!(queue.send_batch(URL, &twins).await.is_err());

        queue.fail_next(QueueOp::Receive, 1);
        assert!(
            queue
                .receive(URL, 10, Duration::ZERO, Duration::ZERO)
                .await
                .is_err()
        );
        let received = queue
            .receive(URL, 10, Duration::from_secs(30), Duration::ZERO)
            .await?;
        queue.fail_next(QueueOp::Delete, 1);
        let handles: Vec<String> = received.iter().map(|m| m.receipt_handle.clone()).collect();
        assert!(queue.delete_batch(URL, &handles).await.is_err());
        assert_eq!(queue.depth(URL), 2);
        queue.delete_batch(URL, &handles).await?;
        assert_eq!(queue.depth(URL), 0);
        Ok(())
    }

    /// Writes request lines to a file and creates a batch from it.
    async fn batch_of(
        provider: &MemoryProvider,
        lines: &[Value],
    ) -> anyhow::Result<(tempfile::TempDir, Batch)> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("input.jsonl");
        let text: String = lines.iter().map(|l| format!("{l}\n")).collect();
        std::fs::write(&path, text)?;
        let file = provider.upload(&path).await?;
        let mut request = CreateBatchRequest::chat_completions(file.id);
        request.metadata.insert("note".into(), "kept".into());
        let batch = provider.create(&request).await?;
        Ok((dir, batch))
    }

    fn request_line(custom_id: &str) -> Value {
        json!({
            "custom_id": custom_id,
            "method": "POST",
            "url": CHAT_COMPLETIONS,
            "body": { "model": "m", "messages": [] },
        })
    }

    async fn read_lines(
        provider: &MemoryProvider,
        file_id: &str,
    ) -> anyhow::Result<Vec<OutputLine>> {
        use tokio::io::AsyncBufReadExt;
        let mut lines = provider.open_file(file_id).await?.lines();
        let mut out = Vec::new();
        while let Some(line) = lines.next_line().await? {
            out.push(serde_json::from_str(&line)?);
        }
        Ok(out)
    }

    #[tokio::test]
    async fn a_test_finishes_a_batch_with_a_scripted_reply_per_request() -> anyhow::Result<()> {
        let provider = MemoryProvider::default();
        let lines = [request_line("a"), request_line("b"), request_line("c")];
        let (_dir, batch) = batch_of(&provider, &lines).await?;
        assert_eq!(batch.status, BatchStatus::Validating);
        assert_eq!(batch.metadata.get("note").map(String::as_str), Some("kept"));
        let ids: Vec<String> = provider
            .requests(&batch.id)
            .into_iter()
            .map(|r| r.custom_id)
            .collect();
        assert_eq!(ids, ["a", "b", "c"]);
        provider.set_status(&batch.id, BatchStatus::InProgress)?;
        assert_eq!(
            provider.retrieve(&batch.id).await?.status,
            BatchStatus::InProgress
        );

        let answer = json!({ "landing_page": true, "aesthetic": 4 });
        let finished = provider.finish(&batch.id, BatchStatus::Expired, |request| match request
            .custom_id
            .as_str()
        {
            "a" => Reply::Json(answer.clone()),
            "b" => Reply::Error {
                code: "batch_expired".into(),
                message: "not run in time".into(),
            },
            _ => Reply::Missing,
        })?;
        assert_eq!(finished.status, BatchStatus::Expired);
        assert_eq!(
            finished.request_counts,
            Some(RequestCounts {
                total: 3,
                completed: 1,
                failed: 1,
            })
        );
        let task = Task::default_task()?;
        let output = finished.output_file_id.clone().unwrap_or_default();
        let [answered] = read_lines(&provider, &output).await?.try_into().map_err(
            |lines: Vec<OutputLine>| anyhow::anyhow!("one output line expected: {lines:?}"),
        )?;
        let LineOutcome::Answer(read) = interpret_line(&answered, &task) else {
            anyhow::bail!("not an answer: {answered:?}");
        };
        assert_eq!(read.label, answer);
        assert_eq!(read.model.as_deref(), Some(MEMORY_MODEL));
        assert_eq!(
            read.usage.map(|u| u.total_tokens),
            Some(REPLY_PROMPT_TOKENS + REPLY_COMPLETION_TOKENS)
        );
        let errors = finished.error_file_id.clone().unwrap_or_default();
        let [error] = read_lines(&provider, &errors).await?.try_into().map_err(
            |lines: Vec<OutputLine>| anyhow::anyhow!("one error line expected: {lines:?}"),
        )?;
        assert_eq!(error.custom_id, "b");
        let LineOutcome::Retry(retry) = interpret_line(&error, &task) else {
            anyhow::bail!("an error line is not an answer");
        };
        assert_eq!(retry.stage, Stage::Provider);

        assert!(
            provider
                .finish(&batch.id, BatchStatus::Completed, |_| Reply::Missing)
                .is_err()
        );
        assert!(matches!(
            provider.retrieve("batch_none").await,
            Err(BatchApiError::Status { status: 404, .. })
        ));
        Ok(())
    }

    #[tokio::test]
    async fn an_input_file_openai_would_reject_makes_a_failed_batch() -> anyhow::Result<()> {
        let provider = MemoryProvider::default();
        let mut other_model = request_line("d");
        other_model["body"]["model"] = json!("n");
        let mut other_url = request_line("e");
        other_url["url"] = json!("/v1/embeddings");
        let lines = [
            request_line("a"),
            json!("not an object"),
            request_line("a"),
            other_model,
            other_url,
        ];
        let (_dir, batch) = batch_of(&provider, &lines).await?;
        assert_eq!(batch.status, BatchStatus::Failed);
        let codes: Vec<(Option<String>, Option<u64>)> = batch
            .errors
            .iter()
            .flat_map(|e| &e.data)
            .map(|e| (e.code.clone(), e.line))
            .collect();
        assert_eq!(
            codes,
            [
                (Some("missing_custom_id".into()), Some(2)),
                (Some("duplicate_custom_id".into()), Some(3)),
                (Some("model_mismatch".into()), Some(4)),
                (Some("url_mismatch".into()), Some(5)),
            ]
        );
        let (_dir, empty) = batch_of(&provider, &[]).await?;
        assert_eq!(
            empty.errors.map(|e| e.data[0].code.clone()),
            Some(Some("empty_file".into()))
        );
        assert!(matches!(
            provider
                .create(&CreateBatchRequest::chat_completions("file-none"))
                .await,
            Err(BatchApiError::Status { status: 404, .. })
        ));
        Ok(())
    }

    #[tokio::test]
    async fn chosen_provider_calls_are_answered_503() -> anyhow::Result<()> {
        let provider = MemoryProvider::default();
        provider.fail_next(ProviderOp::Create, 1);
        let refused = batch_of(&provider, &[request_line("a")]).await;
        assert!(
            refused
                .as_ref()
                .is_err_and(|e| e.to_string().contains("503")),
            "{refused:?}"
        );
        let (_dir, batch) = batch_of(&provider, &[request_line("a")]).await?;
        assert_eq!(provider.calls(ProviderOp::Create), 2);
        assert_eq!(provider.batches(), [batch]);
        Ok(())
    }
}
