//! One background task per batch walks it through the status timeline, so
//! terminal webhooks fire without anyone polling.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use serde_json::Value;
use tokio::sync::Notify;

use crate::answer::{AnswerContext, Outcome, answer_request, error_line};
use crate::prng::{Prng, draw};
use crate::state::{AppState, Counters, Progress, Status, lock, unix_now};
use crate::validate::{BatchErrorEntry, validate_input};
use crate::webhook;

/// Starts the timeline task for a freshly created batch.
pub fn start(
    state: &Arc<AppState>,
    batch_id: String,
    seq: u64,
    input: Bytes,
    endpoint: String,
    cancel: Arc<Notify>,
) {
    let task_state = Arc::clone(state);
    state.spawn(async move {
        run(task_state, batch_id, seq, input, endpoint, cancel).await;
    });
}

/// Sleeps for `duration`; true if a cancel arrived first.
async fn wait_or_cancel(duration: Duration, cancel: &Notify) -> bool {
    tokio::select! {
        () = tokio::time::sleep(duration) => false,
        () = cancel.notified() => true,
    }
}

/// Moves `from` → `to` under the lock; false if the batch moved elsewhere
/// meanwhile (it is being cancelled).
fn transition(
    state: &AppState,
    batch_id: &str,
    from: Status,
    to: Status,
    update: impl FnOnce(&mut crate::state::BatchRecord, i64),
) -> bool {
    let now = state.timestamp();
    let mut batches = lock(&state.batches);
    match batches.get_mut(batch_id) {
        Some(batch) if batch.status == from => {
            batch.status = to;
            update(batch, now);
            true
        }
        _ => false,
    }
}

async fn run(
    state: Arc<AppState>,
    batch_id: String,
    seq: u64,
    input: Bytes,
    endpoint: String,
    cancel: Arc<Notify>,
) {
    let cfg = &state.cfg;
    if wait_or_cancel(cfg.validating, &cancel).await {
        finish_cancelled(&state, &batch_id, &[]).await;
        return;
    }
    let (max_requests, max_bytes) = (cfg.max_requests, cfg.max_file_bytes);
    let enqueued_limit = state.faults().enqueued_limit;
    let refused = enqueued_limit > 0.0
        && draw(&[b"enqueued", &cfg.seed.to_le_bytes(), &seq.to_le_bytes()]) < enqueued_limit;
    let validated = if refused {
        state.counters.fault("enqueued_limit");
        Ok(Err(vec![BatchErrorEntry {
            code: "token_limit_exceeded",
            message: "Enqueued token limit reached for the model in this organization. \
                      Please try again once some in_progress batches have been completed \
                      (injected by the batch emulator)."
                .to_owned(),
            param: None,
            line: None,
        }]))
    } else {
        tokio::task::spawn_blocking(move || {
            validate_input(&input, &endpoint, max_requests, max_bytes)
        })
        .await
    };
    let validated = match validated {
        Ok(Ok(v)) => v,
        Ok(Err(errors)) => {
            tracing::info!(%batch_id, errors = errors.len(), "batch failed validation");
            if transition(
                &state,
                &batch_id,
                Status::Validating,
                Status::Failed,
                |b, now| {
                    b.failed_at = Some(now);
                    b.errors = Some(errors);
                },
            ) {
                webhook::dispatch(
                    &state,
                    &batch_id,
                    Status::Failed,
                    webhook_url(&state, &batch_id),
                );
            } else {
                finish_cancelled(&state, &batch_id, &[]).await;
            }
            return;
        }
        Err(join_error) => {
            tracing::error!(%batch_id, %join_error, "validation task died");
            return;
        }
    };

    let total = validated.requests.len();
    let model = validated.model.clone();
    if !transition(
        &state,
        &batch_id,
        Status::Validating,
        Status::InProgress,
        |b, now| {
            b.in_progress_at = Some(now);
            b.counts.total = total;
            b.model = Some(model);
        },
    ) {
        finish_cancelled(&state, &batch_id, &[]).await;
        return;
    }
    tracing::info!(%batch_id, total, "batch in progress");

    // Answers are worked out up front; the in-progress delay then decides
    // how many of them count as finished at any moment.
    let started = Instant::now();
    let faults = state.faults();
    let seed = cfg.seed;
    let task_faults = faults.clone();
    let computed = tokio::task::spawn_blocking(move || {
        let ctx = AnswerContext {
            seed,
            batch_seq: seq,
            faults: &task_faults,
            created: unix_now().as_secs() as i64,
        };
        let mut results: Vec<Outcome> = validated
            .requests
            .iter()
            .map(|r| answer_request(&r.custom_id, &r.body, &ctx))
            .collect();
        // Providers finish requests in no particular order.
        Prng::from_parts(&[b"order", &seed.to_le_bytes(), &seq.to_le_bytes()])
            .shuffle(&mut results);
        results
    })
    .await;
    let results = match computed {
        Ok(results) => Arc::new(results),
        Err(join_error) => {
            tracing::error!(%batch_id, %join_error, "answer task died");
            return;
        }
    };
    let progress = Progress {
        started,
        duration: cfg.in_progress,
        results: Arc::clone(&results),
    };
    if let Some(batch) = lock(&state.batches).get_mut(&batch_id) {
        batch.progress = Some(progress.clone());
    }

    let remaining = cfg.in_progress.saturating_sub(started.elapsed());
    if wait_or_cancel(remaining, &cancel).await {
        let finished = progress.finished();
        finish_cancelled(&state, &batch_id, &results[..finished]).await;
        return;
    }

    let expires = faults.expire > 0.0
        && draw(&[b"expire", &seed.to_le_bytes(), &seq.to_le_bytes()]) < faults.expire;
    if expires {
        // Half the work got done before the window closed.
        let done = results.len() / 2;
        let expired_lines: Vec<Value> = results[done..]
            .iter()
            .map(|o| {
                error_line(
                    &state.new_token("batch_req_"),
                    &o.custom_id,
                    "batch_expired",
                    "This request could not be executed before the completion window expired.",
                )
            })
            .collect();
        let files = write_files(&state, &batch_id, &results[..done], expired_lines);
        if transition(
            &state,
            &batch_id,
            Status::InProgress,
            Status::Expired,
            |b, now| {
                b.expired_at = Some(now);
                files.apply(b);
            },
        ) {
            state.counters.fault("expire");
            files.count(&state);
            tracing::info!(%batch_id, done, "batch expired (fault)");
            webhook::dispatch(
                &state,
                &batch_id,
                Status::Expired,
                webhook_url(&state, &batch_id),
            );
        } else {
            finish_cancelled(&state, &batch_id, &results[..progress.finished()]).await;
        }
        return;
    }

    if !transition(
        &state,
        &batch_id,
        Status::InProgress,
        Status::Finalizing,
        |b, now| {
            b.finalizing_at = Some(now);
            b.progress = None;
            b.counts.completed = results.iter().filter(|o| o.success).count();
            b.counts.failed = results.len() - b.counts.completed;
        },
    ) {
        finish_cancelled(&state, &batch_id, &results).await;
        return;
    }
    tokio::time::sleep(cfg.finalizing).await;
    let files = write_files(&state, &batch_id, &results, Vec::new());
    if transition(
        &state,
        &batch_id,
        Status::Finalizing,
        Status::Completed,
        |b, now| {
            b.completed_at = Some(now);
            files.apply(b);
        },
    ) {
        files.count(&state);
        tracing::info!(%batch_id, "batch completed");
        webhook::dispatch(
            &state,
            &batch_id,
            Status::Completed,
            webhook_url(&state, &batch_id),
        );
    }
}

fn webhook_url(state: &AppState, batch_id: &str) -> Option<String> {
    lock(&state.batches)
        .get(batch_id)
        .and_then(|b| b.webhook_url.clone())
}

/// Output and error files written for a batch's finished part.
struct Files {
    output_file_id: Option<String>,
    error_file_id: Option<String>,
    completed: usize,
    failed: usize,
    faults: Vec<&'static str>,
}

impl Files {
    fn apply(&self, batch: &mut crate::state::BatchRecord) {
        batch.progress = None;
        batch.output_file_id.clone_from(&self.output_file_id);
        batch.error_file_id.clone_from(&self.error_file_id);
        batch.counts.completed = self.completed;
        batch.counts.failed = self.failed;
    }

    fn count(&self, state: &AppState) {
        let counters = &state.counters;
        Counters::add(&counters.requests_answered, self.completed as u64);
        Counters::add(&counters.requests_failed, self.failed as u64);
        for kind in &self.faults {
            counters.fault(kind);
        }
    }
}

fn write_files(
    state: &AppState,
    batch_id: &str,
    done: &[Outcome],
    extra_errors: Vec<Value>,
) -> Files {
    let mut output = String::new();
    let mut errors = String::new();
    let mut completed = 0;
    let mut failed = 0;
    for outcome in done {
        let (buffer, n) = if outcome.success {
            (&mut output, &mut completed)
        } else {
            (&mut errors, &mut failed)
        };
        buffer.push_str(&outcome.line.to_string());
        buffer.push('\n');
        *n += 1;
    }
    for line in extra_errors {
        errors.push_str(&line.to_string());
        errors.push('\n');
        failed += 1;
    }
    let store = |text: String, suffix: &str, purpose: &str| {
        (!text.is_empty()).then(|| {
            state
                .store_file(
                    format!("{batch_id}_{suffix}.jsonl"),
                    purpose,
                    Bytes::from(text),
                )
                .id
        })
    };
    Files {
        output_file_id: store(output, "output", "batch_output"),
        error_file_id: store(errors, "error", "batch_output"),
        completed,
        failed,
        faults: done
            .iter()
            .filter_map(|o| o.fault.map(|f| f.as_str()))
            .collect(),
    }
}

/// Cancelling takes as long as finalizing; what finished is kept, the rest
/// is dropped (it appears in neither file).
async fn finish_cancelled(state: &Arc<AppState>, batch_id: &str, done: &[Outcome]) {
    tokio::time::sleep(state.cfg.finalizing).await;
    let files = write_files(state, batch_id, done, Vec::new());
    if transition(
        state,
        batch_id,
        Status::Cancelling,
        Status::Cancelled,
        |b, now| {
            b.cancelled_at = Some(now);
            files.apply(b);
        },
    ) {
        files.count(state);
        tracing::info!(%batch_id, finished = done.len(), "batch cancelled");
        webhook::dispatch(
            state,
            batch_id,
            Status::Cancelled,
            webhook_url(state, batch_id),
        );
    }
}
