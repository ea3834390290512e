//! Submit: drain the pending queue, prepare each image, write request files within the
//! provider's limits, and submit each file as a batch.
//!
//! Per file, in this order: manifest to S3, upload, create the batch, open marker, state
//! record, and only then delete the items' messages. A crash anywhere before the
//! delete brings the messages back and the items go out again in a second batch; harvest
//! recognises the second answer for an image as a duplicate (ARCHITECTURE.md, invariants).

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use secrecy::{ExposeSecret, SecretString};
use serde::Serialize;
use tokio::sync::Semaphore;
use tokio::time::Instant;
use url::Url;

use crate::backpressure::{
    HeldSlot, ProviderLimits, claim_slot, release_slot, repoint_slot, take_upload_turn,
};
use crate::batch_api::CreateBatchRequest;
use crate::batch_token;
use crate::ports::{
    BatchProvider, MAX_BATCH_MESSAGES, ObjectStore, Queue, ReceivedMessage, StoreError,
    WriteCondition,
};
use crate::prepare::{DecodeLimits, prepare_jpeg};
use crate::records::{
    BatchPhase, BatchRecord, Layout, Manifest, PendingItem, Stage, TaskRef, state_keys, unix_now,
};
use crate::request::{BatchFile, BatchFileWriter, BatchLimits, RequestFileError, custom_id};
use crate::task::Task;
use crate::terminal::{FailedWrite, RecordError, TerminalRecords, send_pending};

/// Batch metadata keys the submitter sets; harvest reads them back.
pub const METADATA_MANIFEST: &str = "shotlabel_manifest";
pub const METADATA_SUBMISSION: &str = "shotlabel_submission";
pub const METADATA_TASK_VERSION: &str = "shotlabel_task_version";

/// Per-batch webhook URLs (Inference.net style): each batch is created with its own URL
/// carrying a token only the webhook secret can make.
#[derive(Debug, Clone)]
pub struct PerBatchWebhook {
    pub base_url: Url,
    pub secret: SecretString,
}

#[derive(Debug, Clone)]
pub struct SubmitConfig {
    /// The bucket that holds manifests and state (the pipeline's own bucket).
    pub bucket: String,
    pub layout: Layout,
    pub pending_queue_url: String,
    pub task: Arc<Task>,
    pub limits: BatchLimits,
    /// The provider's largest request line; a larger one gets a failed record before
    /// upload (`None`: only the file limit applies).
    pub max_request_bytes: Option<u64>,
    pub decode_limits: DecodeLimits,
    /// Stop taking new messages after this long.
    pub time_budget: Duration,
    /// How long received messages stay hidden; must outlast the run.
    pub visibility_timeout: Duration,
    /// Long-poll wait of each receive; an empty receive ends the drain.
    pub receive_wait: Duration,
    /// The most images one run takes (0: no limit but the time budget).
    pub max_images: usize,
    /// Images prepared at once (CPU-bound); fetches run up to twice as many.
    pub concurrency: usize,
    /// Where request files are written before upload.
    pub work_dir: PathBuf,
    pub completion_window: String,
    pub per_batch_webhook: Option<PerBatchWebhook>,
    /// What the provider takes at once, shared by every worker through the bucket.
    pub provider_limits: ProviderLimits,
    /// How long a slot claim with no batch yet may stand before another worker takes it
    /// over: it covers a run's drain (claimed ahead) or one file's upload and create
    /// (re-pointed at its manifest). A worker that crashed holds its slot this long.
    pub slot_lease: Duration,
    /// How often an image may be sent back because its batch could not be created
    /// (the harvest's bound for failed batches); then it gets a failed record.
    pub max_requeues: u32,
    /// The pending queue's `maxReceiveCount` (0: no dead-letter queue). An image whose
    /// object cannot be read for now is left to come back after the visibility timeout,
    /// which spends one of these receives; before they run out it is sent back as a new
    /// message (a requeue), so that a long outage ends in a failed record, not in the
    /// dead-letter queue with no terminal record.
    pub pending_max_receives: u32,
}

/// Receives a deferred message keeps in reserve for what else can make it come back
/// (a worker that crashes, a batch record that cannot be written).
const SPARE_RECEIVES: u32 = 2;

impl SubmitConfig {
    /// Checks what would make a run unsafe, before it takes any message.
    pub fn check(&self) -> Result<(), SubmitError> {
        // Submitting the last file can take a while after the drain ends: keep a margin.
        if self.visibility_timeout < self.time_budget + Duration::from_secs(60) {
            return Err(SubmitError::Config(format!(
                "the visibility timeout ({} s) must exceed the time budget ({} s) by at least 60 s, \
                 or messages would reappear while their batch is being submitted",
                self.visibility_timeout.as_secs(),
                self.time_budget.as_secs()
            )));
        }
        if self.concurrency == 0 {
            return Err(SubmitError::Config("concurrency must be at least 1".into()));
        }
        if self
            .provider_limits
            .slots(self.limits.max_requests)
            .is_some()
            && self.slot_lease <= self.time_budget
        {
            return Err(SubmitError::Config(format!(
                "the slot lease ({} s) must exceed the time budget ({} s), or a slot claimed \
                 for a run's drain could be taken over while the run still fills its file",
                self.slot_lease.as_secs(),
                self.time_budget.as_secs()
            )));
        }
        Ok(())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SubmitError {
    #[error("submit configuration: {0}")]
    Config(String),
    #[error(transparent)]
    RequestFile(#[from] RequestFileError),
    #[error("work directory {path}: {source}")]
    WorkDir {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

/// Why a request file did not become a batch.
#[derive(Debug)]
enum Unsubmitted {
    /// The provider's limits: no slot or upload turn came in time.
    Waiting(String),
    /// Creating it failed (the store, the upload, the provider's answer).
    Refused(String),
    /// The batch was created, but recording it failed.
    Created(String),
}

/// One batch this run created.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SubmittedBatch {
    pub batch_id: String,
    pub manifest: String,
    pub requests: u64,
    pub bytes: u64,
}

/// What one run did.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct SubmitReport {
    pub submission_id: String,
    /// Messages taken from the queue.
    pub received: usize,
    /// Messages for an image already taken in this run (a duplicate S3 event).
    pub duplicate_messages: usize,
    /// Messages whose body is not a pending item; left for the dead-letter queue.
    pub unreadable_messages: usize,
    pub prepared: usize,
    /// Images that cannot be prepared: failed records written, messages deleted.
    pub failed: usize,
    /// Images overwritten or deleted since they were queued: messages deleted (a newer
    /// object has its own event).
    pub superseded: usize,
    /// Images left on the queue after a transient error; they come back.
    pub deferred: usize,
    pub batches: Vec<SubmittedBatch>,
    /// Prepared images whose batch could not be submitted; their messages come back.
    pub unsubmitted: usize,
    /// The run stopped taking messages because the provider's open-batch limit was
    /// reached and no slot came free in time: waiting, not failing.
    pub held_back: bool,
    /// Prepared images sent back to the pending queue as new messages because their batch
    /// could not be created (waiting for the provider, or refused by it).
    pub sent_back: usize,
    pub errors: Vec<String>,
}

/// One run of the submitter.
pub async fn run_submit<S, Q, P>(
    store: &S,
    queue: &Q,
    provider: &P,
    config: &SubmitConfig,
) -> Result<SubmitReport, SubmitError>
where
    S: ObjectStore,
    Q: Queue,
    P: BatchProvider,
{
    config.check()?;
    let submission_id = new_submission_id();
    let work_dir = config.work_dir.join(&submission_id);
    std::fs::create_dir_all(&work_dir).map_err(|source| SubmitError::WorkDir {
        path: work_dir.display().to_string(),
        source,
    })?;
    tracing::debug!(submission = %submission_id, "submit run started");
    let mut run = Run {
        store,
        queue,
        provider,
        config,
        writer: BatchFileWriter::new(&work_dir, &submission_id, config.limits)?,
        items: HashMap::new(),
        handles: HashMap::new(),
        receive_counts: HashMap::new(),
        slots: Vec::new(),
        started: Instant::now(),
        report: SubmitReport {
            submission_id: submission_id.clone(),
            ..SubmitReport::default()
        },
        submission_id,
    };
    let result = run.drain_and_submit().await;
    if let Err(e) = std::fs::remove_dir_all(&work_dir) {
        tracing::warn!(dir = %work_dir.display(), error = %e, "cannot remove the work directory");
    }
    result?;
    Ok(run.report)
}

/// A time-ordered id, unique enough that two runs never share one: base-36 seconds and
/// six random base-36 digits.
fn new_submission_id() -> String {
    use rand::Rng;
    let mut rng = rand::rng();
    let random: String = (0..6)
        .map(|_| char::from_digit(rng.random_range(0..36), 36).unwrap_or('0'))
        .collect();
    let seconds = custom_id("", unix_now() as usize);
    format!("s{}{random}", seconds.trim_start_matches('-'))
}

/// The content an item is about; two messages with the same one are the same work.
type ContentKey = (String, String, String);

fn content_key(item: &PendingItem) -> ContentKey {
    let (bucket, key, etag) = item.content_key();
    (bucket.to_owned(), key.to_owned(), etag.to_owned())
}

/// What preparing one image came to.
enum Prepared {
    Line(Vec<u8>),
    /// The image can never be prepared: record why.
    Failed(String),
    /// The object was replaced or deleted after it was queued.
    Superseded,
    /// A transient error: leave the message to come back.
    Deferred(String),
}

struct Run<'a, S, Q, P> {
    store: &'a S,
    queue: &'a Q,
    provider: &'a P,
    config: &'a SubmitConfig,
    submission_id: String,
    writer: BatchFileWriter,
    /// custom_id → the item it asks about, for items written to a file not yet submitted.
    items: HashMap<String, PendingItem>,
    /// Receipt handles of every message taken for a content key.
    handles: HashMap<ContentKey, Vec<String>>,
    /// The most times any of a content key's messages has been received.
    receive_counts: HashMap<ContentKey, u32>,
    /// Open-batch slots claimed and not yet given to a batch.
    slots: Vec<HeldSlot>,
    started: Instant,
    report: SubmitReport,
}

impl<S, Q, P> Run<'_, S, Q, P>
where
    S: ObjectStore,
    Q: Queue,
    P: BatchProvider,
{
    async fn drain_and_submit(&mut self) -> Result<(), SubmitError> {
        let deadline = Instant::now() + self.config.time_budget;
        let cpu = Arc::new(Semaphore::new(self.config.concurrency));
        let window = self.config.concurrency * 2;
        let mut next_index = 0usize;
        let mut drained = false;
        let mut in_flight = FuturesUnordered::new();
        loop {
            while !drained && in_flight.len() < window {
                let room = self.room_left();
                if room == 0 || Instant::now() >= deadline {
                    drained = true;
                    break;
                }
                // Take no message the provider cannot take yet: with a slot in hand, the
                // file these messages go into can be submitted.
                if !self.slot_ahead(deadline).await {
                    drained = true;
                    break;
                }
                let messages = match self
                    .queue
                    .receive(
                        &self.config.pending_queue_url,
                        room.min(MAX_BATCH_MESSAGES) as u32,
                        self.config.visibility_timeout,
                        self.config.receive_wait,
                    )
                    .await
                {
                    Ok(messages) => messages,
                    Err(e) => {
                        self.error(format!("receiving pending messages: {e}"));
                        drained = true;
                        break;
                    }
                };
                if messages.is_empty() {
                    drained = true;
                    break;
                }
                for message in messages {
                    if let Some(item) = self.take(message) {
                        let id = custom_id(&self.submission_id, next_index);
                        next_index += 1;
                        in_flight.push(prepare_one(self.store, self.config, cpu.clone(), id, item));
                    }
                }
            }
            let Some((id, item, prepared)) = in_flight.next().await else {
                if drained {
                    break;
                }
                continue;
            };
            self.settle(id, item, prepared).await?;
            for file in self.writer.take_finished() {
                self.submit_file(file).await;
            }
        }
        self.writer.close()?;
        for file in self.writer.take_finished() {
            self.submit_file(file).await;
        }
        for slot in std::mem::take(&mut self.slots) {
            if let Err(e) =
                release_slot(self.store, &self.config.bucket, slot.index, &slot.manifest).await
            {
                // Taken over once its lease ends.
                tracing::warn!(slot = slot.index, error = %e, "cannot give back an unused slot");
            }
        }
        Ok(())
    }

    /// The open-batch slots, when the provider's limits are set.
    fn slot_count(&self) -> Option<u32> {
        self.config
            .provider_limits
            .slots(self.config.limits.max_requests)
    }

    fn slot_lease(&self) -> Duration {
        self.config.slot_lease
    }

    /// The latest a file may wait for a slot or an upload turn: its messages stay hidden
    /// until the visibility timeout, which must not run out before the batch exists.
    fn wait_deadline(&self) -> Instant {
        let spare = self
            .config
            .visibility_timeout
            .saturating_sub(self.config.time_budget + Duration::from_secs(60))
            .min(Duration::from_secs(120));
        self.started + self.config.time_budget + spare
    }

    /// Makes sure a slot is in hand before more messages are taken. `false` when the
    /// provider is full and no slot came free soon: the run stops taking messages.
    async fn slot_ahead(&mut self, deadline: Instant) -> bool {
        let Some(slots) = self.slot_count() else {
            return true;
        };
        if !self.slots.is_empty() {
            return true;
        }
        // Wait a little, not the whole budget: an idle worker costs Lambda time, and the
        // next scheduled run dispatches again.
        let until = deadline.min(Instant::now() + self.config.provider_limits.poll_interval * 10);
        let placeholder = format!("{}-next", self.submission_id);
        match claim_slot(
            self.store,
            &self.config.bucket,
            slots,
            &placeholder,
            self.slot_lease(),
            self.config.provider_limits.poll_interval,
            until,
        )
        .await
        {
            Ok(Some(slot)) => {
                self.slots.push(slot);
                true
            }
            Ok(None) => {
                self.report.held_back = true;
                tracing::info!(
                    slots,
                    "the provider's open-batch limit is reached; taking no more messages"
                );
                false
            }
            Err(e) => {
                self.error(format!("claiming an open-batch slot: {e}"));
                false
            }
        }
    }

    /// The slot for the file about to be submitted, claimed now if none is in hand, and
    /// pointed at its manifest. `Ok(None)`: no limits.
    async fn slot_for(&mut self, manifest: &str) -> Result<Option<HeldSlot>, String> {
        let Some(slots) = self.slot_count() else {
            return Ok(None);
        };
        loop {
            let slot = match self.slots.pop() {
                Some(slot) => slot,
                None => claim_slot(
                    self.store,
                    &self.config.bucket,
                    slots,
                    manifest,
                    self.slot_lease(),
                    self.config.provider_limits.poll_interval,
                    self.wait_deadline(),
                )
                .await
                .map_err(|e| e.to_string())?
                .ok_or_else(|| {
                    self.report.held_back = true;
                    format!("the provider's limit of {slots} open batches was reached and no slot came free in time")
                })?,
            };
            if slot.manifest == manifest {
                return Ok(Some(slot));
            }
            // A slot claimed ahead is re-pointed at this file's manifest, only if the claim
            // is still this worker's (see `repoint_slot`).
            match repoint_slot(self.store, &self.config.bucket, &slot, manifest).await {
                Ok(Some(slot)) => return Ok(Some(slot)),
                Ok(None) => {
                    tracing::warn!(
                        slot = slot.index,
                        manifest,
                        "a slot claimed ahead was taken over while held; claiming another"
                    );
                }
                Err(e) => return Err(e.to_string()),
            }
        }
    }

    /// How many more messages this run may take.
    fn room_left(&self) -> usize {
        if self.config.max_images == 0 {
            usize::MAX
        } else {
            self.config.max_images.saturating_sub(self.report.received)
        }
    }

    /// Accounts for a received message; returns the item when it is new work.
    fn take(&mut self, message: ReceivedMessage) -> Option<PendingItem> {
        self.report.received += 1;
        let item: PendingItem = match serde_json::from_str(&message.body) {
            Ok(item) => item,
            Err(e) => {
                // Not ours to guess at: after the queue's receive limit it moves to the
                // dead-letter queue, where `shotlabel status` shows it.
                self.report.unreadable_messages += 1;
                tracing::error!(message_id = %message.message_id, error = %e,
                    "a pending message is not a pending item; leaving it for the dead-letter queue");
                return None;
            }
        };
        let key = content_key(&item);
        let receives = self.receive_counts.entry(key.clone()).or_default();
        *receives = (*receives).max(message.receive_count);
        let handles = self.handles.entry(key).or_default();
        handles.push(message.receipt_handle);
        if handles.len() > 1 {
            self.report.duplicate_messages += 1;
            return None;
        }
        Some(item)
    }

    async fn settle(
        &mut self,
        id: String,
        item: PendingItem,
        prepared: Prepared,
    ) -> Result<(), SubmitError> {
        match prepared {
            Prepared::Line(line)
                if self
                    .config
                    .max_request_bytes
                    .is_some_and(|limit| line.len() as u64 > limit) =>
            {
                let reason = format!(
                    "its request line is {} bytes, over the provider's {}-byte limit for one request",
                    line.len(),
                    self.config.max_request_bytes.unwrap_or_default()
                );
                self.fail(item, reason).await;
            }
            Prepared::Line(line) => match self.writer.push(&id, &line) {
                Ok(_) => {
                    self.report.prepared += 1;
                    self.items.insert(id, item);
                }
                Err(RequestFileError::LineTooLarge { bytes, limit }) => {
                    let reason = format!(
                        "its request line is {bytes} bytes, over the {limit}-byte batch file limit"
                    );
                    self.fail(item, reason).await;
                }
                Err(e) => return Err(e.into()),
            },
            Prepared::Failed(reason) => self.fail(item, reason).await,
            Prepared::Superseded => {
                self.report.superseded += 1;
                self.delete_messages(&[content_key(&item)]).await;
            }
            Prepared::Deferred(reason) => self.defer(item, reason).await,
        }
        Ok(())
    }

    /// An image that cannot be prepared for now. Its message is left to come back after
    /// the visibility timeout (the delay a transient fault needs), unless it has come back
    /// so often that it is near the dead-letter queue: then it goes round again as a new
    /// message, counting a requeue, and past `max_requeues` it gets a failed record.
    async fn defer(&mut self, item: PendingItem, reason: String) {
        self.report.deferred += 1;
        let key = content_key(&item);
        let receives = self.receive_counts.get(&key).copied().unwrap_or(0);
        let max = self.config.pending_max_receives;
        if max == 0 || receives + SPARE_RECEIVES < max {
            tracing::warn!(key = %item.key, %reason, receives, "image deferred; its message will come back");
            self.handles.remove(&key);
            return;
        }
        tracing::warn!(key = %item.key, %reason, receives,
            "image deferred near its queue's receive limit; sending it back as a new message");
        let reason = format!("its image could not be read: {reason}");
        if let Err(e) = self
            .requeue_or_fail(vec![item], Stage::Prepare, &reason)
            .await
        {
            self.error(format!("sending back a deferred image: {e}"));
        }
    }

    /// Writes a failed record for an image that can never be prepared, then deletes its
    /// messages. If the record cannot be written, the message stays and comes back.
    async fn fail(&mut self, item: PendingItem, reason: String) {
        let key = content_key(&item);
        let next = item.next_attempt(Stage::Prepare, reason);
        let task = self.task_ref();
        let written = TerminalRecords::new(self.store, &self.config.layout, &task)
            .write_failed(item.source(), next.reasons)
            .await;
        match written {
            Ok(outcome) => {
                // A label of the same content (another copy's) is a terminal record too.
                if outcome == FailedWrite::Written {
                    self.report.failed += 1;
                }
                self.delete_messages(&[key]).await;
            }
            Err(e) => {
                self.report.deferred += 1;
                self.handles.remove(&key);
                self.error(format!("writing the failed record for {}: {e}", item.key));
            }
        }
    }

    fn task_ref(&self) -> TaskRef {
        TaskRef {
            name: self.config.task.name().to_owned(),
            version: self.config.task.version().to_owned(),
        }
    }

    /// Manifest, upload, create, state record, and only then the messages are deleted.
    async fn submit_file(&mut self, file: BatchFile) {
        let name = file
            .path
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        let mut items = BTreeMap::new();
        for id in &file.custom_ids {
            if let Some(item) = self.items.remove(id) {
                items.insert(id.clone(), item);
            }
        }
        let keys: Vec<ContentKey> = items.values().map(content_key).collect();
        tracing::debug!(manifest = %name, requests = file.requests, bytes = file.bytes,
            "request file ready");
        let created = match self.slot_for(&name).await {
            Ok(slot) => {
                let index = slot.as_ref().map(|s| s.index);
                let created = self.create_batch(&name, &file, &items, index).await;
                // A batch that exists keeps its slot until it is harvested.
                if matches!(
                    created,
                    Err(Unsubmitted::Waiting(_) | Unsubmitted::Refused(_))
                ) && let Some(slot) = slot
                    && let Err(e) =
                        release_slot(self.store, &self.config.bucket, slot.index, &name).await
                {
                    tracing::warn!(slot = slot.index, error = %e, "cannot give back a slot");
                }
                created
            }
            Err(e) => Err(Unsubmitted::Waiting(e)),
        };
        match created {
            Ok(batch) => {
                tracing::info!(batch_id = %batch.batch_id, manifest = %name,
                    requests = file.requests, bytes = file.bytes, "batch submitted");
                self.report.batches.push(batch);
                self.delete_messages(&keys).await;
            }
            Err(why) => {
                self.report.unsubmitted += file.requests;
                self.send_back(&name, items, why).await;
            }
        }
        if let Err(e) = std::fs::remove_file(&file.path) {
            tracing::warn!(path = %file.path.display(), error = %e, "cannot remove a request file");
        }
    }

    /// Sends the items of a file that could not become a batch back to the pending queue
    /// as new messages, then deletes the ones they came in: a message that merely comes
    /// back after its visibility timeout counts a receive each time, and enough of those
    /// would move a healthy image to the dead-letter queue. Waiting for the provider
    /// spends nothing; a refused creation counts a requeue (not an attempt), and past
    /// `max_requeues` the image gets a failed record with every reason.
    async fn send_back(
        &mut self,
        name: &str,
        items: BTreeMap<String, PendingItem>,
        why: Unsubmitted,
    ) {
        let (reason, refused) = match why {
            Unsubmitted::Waiting(reason) => (reason, false),
            Unsubmitted::Refused(reason) => (reason, true),
            Unsubmitted::Created(reason) => {
                // The batch exists and may yet be harvested: sending its images again
                // would only make duplicates. Their messages come back if it never is.
                for item in items.values() {
                    self.handles.remove(&content_key(item));
                }
                self.error(format!(
                    "recording the batch of {name} ({} requests; their messages will come back): {reason}",
                    items.len()
                ));
                return;
            }
        };
        let count = items.len();
        let sent = if refused {
            let reason = format!("its batch could not be created: {reason}");
            self.requeue_or_fail(items.into_values().collect(), Stage::Batch, &reason)
                .await
        } else {
            self.send_again(items.into_values().collect(), Vec::new())
                .await
        };
        if let Err(e) = sent {
            self.error(format!("sending back the items of {name}: {e}"));
        }
        if refused {
            self.error(format!(
                "submitting {name} ({count} requests; sent back to the queue): {reason}"
            ));
        } else {
            self.report.held_back = true;
            tracing::info!(manifest = %name, requests = count, %reason,
                "waiting for the provider; the file's images are back on the queue");
        }
    }

    /// Sends items back counting a requeue; those past `max_requeues` get a failed record
    /// with every reason instead. An item whose record cannot be written keeps its message,
    /// which comes back.
    async fn requeue_or_fail(
        &mut self,
        items: Vec<PendingItem>,
        stage: Stage,
        reason: &str,
    ) -> Result<(), RecordError> {
        let mut again = Vec::new();
        let mut done_keys = Vec::new();
        for item in items {
            let key = content_key(&item);
            let next = item.requeued_at(stage, reason.to_owned());
            if next.requeues <= self.config.max_requeues {
                again.push(next);
                continue;
            }
            let task = self.task_ref();
            match TerminalRecords::new(self.store, &self.config.layout, &task)
                .write_failed(next.source(), next.reasons)
                .await
            {
                Ok(written) => {
                    if written == FailedWrite::Written {
                        self.report.failed += 1;
                    }
                    done_keys.push(key);
                }
                // Its message stays and comes back.
                Err(e) => {
                    self.handles.remove(&key);
                    self.error(format!("writing the failed record for {}: {e}", next.key));
                }
            }
        }
        self.send_again(again, done_keys).await
    }

    /// Sends items to the pending queue as new messages, then deletes the messages they
    /// came in along with those of `done_keys`. If sending fails, the originals stay and
    /// come back after their visibility timeout.
    async fn send_again(
        &mut self,
        items: Vec<PendingItem>,
        mut done_keys: Vec<ContentKey>,
    ) -> Result<(), RecordError> {
        let sent = send_pending(self.queue, &self.config.pending_queue_url, &items).await;
        match &sent {
            Ok(()) => {
                self.report.sent_back += items.len();
                done_keys.extend(items.iter().map(content_key));
            }
            Err(_) => {
                for item in &items {
                    self.handles.remove(&content_key(item));
                }
            }
        }
        self.delete_messages(&done_keys).await;
        sent
    }

    async fn create_batch(
        &self,
        name: &str,
        file: &BatchFile,
        items: &BTreeMap<String, PendingItem>,
        slot: Option<u32>,
    ) -> Result<SubmittedBatch, Unsubmitted> {
        let bucket = &self.config.bucket;
        let manifest_key = state_keys::manifest(name);
        let manifest = Manifest {
            name: name.to_owned(),
            submission_id: self.submission_id.clone(),
            task: self.task_ref(),
            model: self.config.task.model().to_owned(),
            created_at: unix_now(),
            items: items.clone(),
            slot,
        };
        let refused = |e: &dyn std::fmt::Display| Unsubmitted::Refused(e.to_string());
        let body = serde_json::to_vec(&manifest).map_err(|e| refused(&e))?;
        self.store
            .put(
                bucket,
                &manifest_key,
                body,
                "application/json",
                WriteCondition::Overwrite,
            )
            .await
            .map_err(|e| refused(&e))?;

        let interval = self.config.provider_limits.upload_interval;
        let turn = take_upload_turn(self.store, bucket, interval, self.wait_deadline())
            .await
            .map_err(|e| refused(&e))?;
        if !turn {
            return Err(Unsubmitted::Waiting(format!(
                "no upload turn came in time (one upload every {} s)",
                interval.as_secs_f64()
            )));
        }
        let uploaded = self
            .provider
            .upload(&file.path)
            .await
            .map_err(|e| refused(&e))?;
        let mut request = CreateBatchRequest::chat_completions(uploaded.id.clone());
        request.completion_window = self.config.completion_window.clone();
        request.metadata = BTreeMap::from([
            (METADATA_MANIFEST.to_owned(), name.to_owned()),
            (METADATA_SUBMISSION.to_owned(), self.submission_id.clone()),
            (
                METADATA_TASK_VERSION.to_owned(),
                self.config.task.version().to_owned(),
            ),
        ]);
        if let Some(hook) = &self.config.per_batch_webhook {
            request.webhook_url = Some(batch_token::webhook_url(
                &hook.base_url,
                hook.secret.expose_secret().as_bytes(),
                name,
            ));
        }
        let batch = self
            .provider
            .create(&request)
            .await
            .map_err(|e| refused(&e))?;
        // From here on the batch exists: a failure leaves its messages to come back.
        let created = |e: &dyn std::fmt::Display| Unsubmitted::Created(e.to_string());

        let record = BatchRecord {
            batch_id: batch.id.clone(),
            manifest: name.to_owned(),
            submission_id: self.submission_id.clone(),
            input_file_id: uploaded.id,
            requests: file.requests as u64,
            bytes: file.bytes,
            task: self.task_ref(),
            model: self.config.task.model().to_owned(),
            phase: BatchPhase::Open,
            submitted_at: unix_now(),
            provider_status: Some(batch.status.to_string()),
            harvest: None,
            harvested_at: None,
        };
        let body = serde_json::to_vec_pretty(&record).map_err(|e| created(&e))?;
        // The batch exists now. The open marker goes first: it is what reconciliation
        // lists, so once it is written a crash and a lost webhook together still cannot
        // orphan the batch (harvest writes the state record if it is missing). Written
        // after the record, a crash between the two left a record nobody looked at.
        put_state(
            self.store,
            bucket,
            &state_keys::open_marker(&batch.id),
            Vec::new(),
        )
        .await
        .map_err(|e| created(&e))?;
        put_state(
            self.store,
            bucket,
            &state_keys::manifest_batch(name),
            batch.id.clone().into_bytes(),
        )
        .await
        .map_err(|e| created(&e))?;
        // Only if absent: a quick batch can be harvested before this line, and its
        // harvested record must not go back to open.
        match self
            .store
            .put(
                bucket,
                &state_keys::batch(&batch.id),
                body,
                "application/json",
                WriteCondition::IfAbsent,
            )
            .await
        {
            Ok(_) | Err(StoreError::ConditionFailed { .. }) => {}
            Err(e) => return Err(created(&e)),
        }
        Ok(SubmittedBatch {
            batch_id: batch.id,
            manifest: name.to_owned(),
            requests: file.requests as u64,
            bytes: file.bytes,
        })
    }

    /// Deletes every message taken for these images. A delete that fails only means the
    /// message comes back and the image is sent again; harvest drops the duplicate.
    async fn delete_messages(&mut self, keys: &[ContentKey]) {
        let handles: Vec<String> = keys
            .iter()
            .filter_map(|k| self.handles.remove(k))
            .flatten()
            .collect();
        for chunk in handles.chunks(MAX_BATCH_MESSAGES) {
            match self
                .queue
                .delete_batch(&self.config.pending_queue_url, chunk)
                .await
            {
                Ok(failed) if failed.is_empty() => {}
                Ok(failed) => tracing::warn!(
                    count = failed.len(),
                    "some pending messages were not deleted; they will come back"
                ),
                Err(e) => self.error(format!("deleting pending messages: {e}")),
            }
        }
    }

    fn error(&mut self, message: String) {
        tracing::error!(%message, "submit");
        self.report.errors.push(message);
    }
}

async fn put_state<S: ObjectStore>(
    store: &S,
    bucket: &str,
    key: &str,
    body: Vec<u8>,
) -> Result<(), String> {
    store
        .put(
            bucket,
            key,
            body,
            "application/json",
            WriteCondition::Overwrite,
        )
        .await
        .map(|_| ())
        .map_err(|e| e.to_string())
}

/// Fetches and prepares one image; never fails the run.
async fn prepare_one<S: ObjectStore>(
    store: &S,
    config: &SubmitConfig,
    cpu: Arc<Semaphore>,
    id: String,
    item: PendingItem,
) -> (String, PendingItem, Prepared) {
    let object = match store.get(&item.bucket, &item.key).await {
        Ok(object) => object,
        Err(StoreError::NotFound { .. }) => return (id, item, Prepared::Superseded),
        Err(e) => {
            let reason = e.to_string();
            return (id, item, Prepared::Deferred(reason));
        }
    };
    if object.etag != item.etag {
        return (id, item, Prepared::Superseded);
    }
    let Ok(_permit) = cpu.acquire_owned().await else {
        return (id, item, Prepared::Deferred("the run is closing".into()));
    };
    let task = config.task.clone();
    let limits = config.decode_limits;
    let line_id = id.clone();
    let work = tokio::task::spawn_blocking(move || {
        prepare_jpeg(&object.body, task.image(), &limits)
            .map(|image| crate::request::request_line_with_jpeg(&line_id, &task, &image.jpeg))
    });
    let prepared = match work.await {
        Ok(Ok(line)) => Prepared::Line(line),
        Ok(Err(e)) => Prepared::Failed(e.to_string()),
        // A panic while decoding is a property of this image: record it, don't retry.
        Err(e) if e.is_panic() => Prepared::Failed(format!("the image crashed the decoder: {e}")),
        Err(e) => Prepared::Deferred(e.to_string()),
    };
    (id, item, prepared)
}

#[cfg(test)]
mod tests {
    use super::new_submission_id;

    #[test]
    fn submission_ids_are_short_and_distinct() {
        let a = new_submission_id();
        let b = new_submission_id();
        assert_ne!(a, b);
        assert!(a.starts_with('s') && a.len() <= 16, "{a}");
        assert!(a.chars().all(|c| c.is_ascii_alphanumeric()), "{a}");
    }
}
