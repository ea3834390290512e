//! The HTTP API: OpenAI-compatible `/v1` routes plus `/admin`.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;

use axum::Json;
use axum::Router;
use axum::extract::multipart::{Multipart, MultipartError, MultipartRejection};
use axum::extract::{DefaultBodyLimit, Path, Query, Request, State};
use axum::http::{Method, StatusCode, Uri, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use bytes::Bytes;
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::batch;
use crate::config::{EmulatorConfig, FaultSettings};
use crate::error::{ApiError, Error};
use crate::prng::{Prng, draw};
use crate::state::{AppState, BatchRecord, Counters, RequestCounts, Stats, Status, lock};
use crate::webhook;

type Shared = Arc<AppState>;
type ApiResult = Result<Response, ApiError>;

/// A running emulator. Dropping it stops the server and every batch task.
#[derive(Debug)]
pub struct RunningEmulator {
    addr: SocketAddr,
    state: Shared,
    server: Option<JoinHandle<std::io::Result<()>>>,
}

impl RunningEmulator {
    /// The bound address (the real port when the config asked for port 0).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://addr/v1`, the base URL an OpenAI client wants.
    pub fn base_url(&self) -> String {
        format!("http://{}/v1", self.addr)
    }

    /// `http://addr`, for `/admin` routes.
    pub fn root_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn api_key(&self) -> &str {
        &self.state.cfg.api_key
    }

    pub fn faults(&self) -> FaultSettings {
        self.state.faults()
    }

    /// Replaces the fault settings (as `PUT /admin/faults` does).
    pub fn set_faults(&self, faults: FaultSettings) -> Result<(), Error> {
        faults.validate()?;
        self.state.set_faults(faults);
        Ok(())
    }

    pub fn stats(&self) -> Stats {
        self.state.stats()
    }

    pub fn reset_stats(&self) {
        self.state.counters.reset();
    }

    /// Stops the server and waits for it to close.
    pub async fn shutdown(mut self) {
        self.state.token.cancel();
        if let Some(server) = self.server.take()
            && let Err(e) = server.await
        {
            tracing::warn!(error = %e, "server task ended abnormally");
        }
    }

    /// Waits until the server stops (after [`RunningEmulator::stop`] or a fatal error).
    pub async fn wait(&mut self) {
        if let Some(server) = self.server.take() {
            match server.await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => tracing::error!(error = %e, "server failed"),
                Err(e) => tracing::error!(error = %e, "server task ended abnormally"),
            }
        }
    }

    /// Asks the server and all batch tasks to stop, without waiting.
    pub fn stop(&self) {
        self.state.token.cancel();
    }
}

impl Drop for RunningEmulator {
    fn drop(&mut self) {
        self.state.token.cancel();
    }
}

/// Binds and starts the emulator on the current tokio runtime.
pub async fn spawn(config: EmulatorConfig) -> Result<RunningEmulator, Error> {
    config.validate()?;
    let webhook_keys = config
        .webhook_secrets
        .iter()
        .map(|s| webhook::decode_secret(s))
        .collect::<Result<Vec<_>, _>>()?;
    let http = reqwest::Client::builder()
        // A redirect is a failed delivery (Standard Webhooks), not something to follow.
        .redirect(reqwest::redirect::Policy::none())
        .build()?;
    let listener = TcpListener::bind(config.listen)
        .await
        .map_err(|source| Error::Bind {
            addr: config.listen,
            source,
        })?;
    let addr = listener.local_addr().map_err(|source| Error::Bind {
        addr: config.listen,
        source,
    })?;
    let body_limit = usize::try_from(config.max_file_bytes)
        .unwrap_or(usize::MAX)
        // Room for the multipart envelope around a file right at the limit.
        .saturating_add(1024 * 1024);
    let state = Arc::new(AppState {
        faults: std::sync::RwLock::new(config.faults.clone()),
        files: std::sync::Mutex::new(HashMap::new()),
        batches: std::sync::Mutex::new(HashMap::new()),
        rng: std::sync::Mutex::new(Prng::from_parts(&[b"state", &config.seed.to_le_bytes()])),
        next_seq: AtomicU64::new(0),
        counters: Counters::default(),
        http,
        token: CancellationToken::new(),
        webhook_keys,
        last_upload: std::sync::Mutex::new(None),
        cfg: config,
    });
    let app = router(Arc::clone(&state), body_limit);
    let token = state.token.clone();
    let server = tokio::spawn(async move {
        axum::serve(listener, app)
            .with_graceful_shutdown(token.cancelled_owned())
            .await
    });
    tracing::info!(%addr, "batch emulator listening");
    Ok(RunningEmulator {
        addr,
        state,
        server: Some(server),
    })
}

fn router(state: Shared, body_limit: usize) -> Router {
    let v1 = Router::new()
        .route("/files", post(upload_file).get(list_files))
        .route("/files/{id}", get(get_file).delete(delete_file))
        .route("/files/{id}/content", get(file_content))
        .route("/batches", post(create_batch).get(list_batches))
        .route("/batches/{id}", get(get_batch))
        .route("/batches/{id}/cancel", post(cancel_batch))
        .layer(middleware::from_fn_with_state(
            Arc::clone(&state),
            api_faults,
        ))
        .layer(middleware::from_fn_with_state(Arc::clone(&state), auth));
    let admin = Router::new()
        .route("/faults", get(get_faults).put(put_faults))
        .route("/stats", get(get_stats))
        .route("/reset-stats", post(reset_stats))
        .layer(middleware::from_fn_with_state(Arc::clone(&state), auth));
    Router::new()
        .nest("/v1", v1)
        .nest("/admin", admin)
        .fallback(not_found)
        .layer(DefaultBodyLimit::max(body_limit))
        .with_state(state)
}

/// Length-checked, then compared without early exit.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

async fn auth(State(state): State<Shared>, request: Request, next: Next) -> Response {
    let presented = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    match presented {
        Some(key) if constant_time_eq(key.as_bytes(), state.cfg.api_key.as_bytes()) => {
            next.run(request).await
        }
        Some(_) => {
            tracing::info!(path = %request.uri().path(), "rejected a call with a wrong API key");
            ApiError::new(
                StatusCode::UNAUTHORIZED,
                "invalid_request_error",
                Some("invalid_api_key"),
                "Incorrect API key provided.",
            )
            .into_response()
        }
        None => ApiError::new(
            StatusCode::UNAUTHORIZED,
            "invalid_request_error",
            Some("missing_api_key"),
            "You didn't provide an API key. Send it as a Bearer token in the Authorization header.",
        )
        .into_response(),
    }
}

/// Injected 429s and 500s for `/v1` calls (never `/admin`).
async fn api_faults(State(state): State<Shared>, request: Request, next: Next) -> Response {
    let counters = &state.counters;
    Counters::add(&counters.api_calls, 1);
    let faults = state.faults();
    if faults.http_429 > 0.0 && state.draw() < faults.http_429 {
        counters.fault("http_429");
        tracing::info!(path = %request.uri().path(), "injected 429");
        let mut error = ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            "rate_limit_error",
            Some("rate_limit_exceeded"),
            "Rate limit reached (injected by the batch emulator). Retry after the given delay.",
        );
        error.retry_after_ms = Some(state.cfg.retry_after_ms);
        return error.into_response();
    }
    if faults.http_500 > 0.0 && state.draw() < faults.http_500 {
        counters.fault("http_500");
        tracing::info!(path = %request.uri().path(), "injected 500");
        return ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "server_error",
            Some("internal_error"),
            "The server had an error while processing your request (injected by the batch emulator).",
        )
        .into_response();
    }
    next.run(request).await
}

async fn not_found(method: Method, uri: Uri) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "invalid_request_error",
        Some("unknown_url"),
        format!("Invalid URL ({method} {})", uri.path()),
    )
}

fn json_ok(value: Value) -> ApiResult {
    Ok(Json(value).into_response())
}

const PURPOSES: [&str; 8] = [
    "batch",
    "batch_output",
    "fine-tune",
    "assistants",
    "vision",
    "user_data",
    "evals",
    "user",
];

fn multipart_error(e: &MultipartError, limit: u64) -> ApiError {
    if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
        too_large(limit)
    } else {
        ApiError::invalid(
            "invalid_multipart",
            format!("could not read the multipart body: {e}"),
        )
    }
}

fn too_large(limit: u64) -> ApiError {
    ApiError::new(
        StatusCode::PAYLOAD_TOO_LARGE,
        "invalid_request_error",
        Some("file_too_large"),
        format!("The file exceeds the maximum size of {limit} bytes."),
    )
}

/// The upload rate limit: one upload per `upload_interval_ms`, a sooner one refused with
/// 429 and the wait in `Retry-After`.
fn upload_turn(state: &AppState) -> Result<(), ApiError> {
    let interval = std::time::Duration::from_millis(state.faults().upload_interval_ms);
    if interval.is_zero() {
        return Ok(());
    }
    let mut last = lock(&state.last_upload);
    let now = std::time::Instant::now();
    if let Some(at) = *last {
        let next = at + interval;
        if now < next {
            state.counters.fault("upload_429");
            let mut error = ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limit_error",
                Some("rate_limit_exceeded"),
                "Batch file uploads are limited; retry after the given delay (the batch emulator's upload limit).",
            );
            // The wait left, in `retry-after-ms` and (whole seconds) `Retry-After`.
            error.retry_after_ms = Some((next - now).as_millis() as u64 + 1);
            return Err(error);
        }
    }
    *last = Some(now);
    Ok(())
}

async fn upload_file(
    State(state): State<Shared>,
    multipart: Result<Multipart, MultipartRejection>,
) -> ApiResult {
    upload_turn(&state)?;
    let limit = state.cfg.max_file_bytes;
    let mut multipart = multipart.map_err(|e| {
        ApiError::invalid(
            "invalid_multipart",
            format!("expected a multipart/form-data body: {e}"),
        )
    })?;
    let mut purpose = None;
    let mut file = None;
    while let Some(mut field) = multipart
        .next_field()
        .await
        .map_err(|e| multipart_error(&e, limit))?
    {
        match field.name() {
            Some("purpose") => {
                purpose = Some(field.text().await.map_err(|e| multipart_error(&e, limit))?);
            }
            Some("file") => {
                let filename = field.file_name().unwrap_or("upload.jsonl").to_owned();
                let mut data = Vec::new();
                while let Some(chunk) = field
                    .chunk()
                    .await
                    .map_err(|e| multipart_error(&e, limit))?
                {
                    if (data.len() + chunk.len()) as u64 > limit {
                        return Err(too_large(limit));
                    }
                    data.extend_from_slice(&chunk);
                }
                file = Some((filename, data));
            }
            _ => {}
        }
    }
    let purpose = purpose.ok_or_else(|| {
        ApiError::invalid("missing_required_parameter", "Missing purpose.").with_param("purpose")
    })?;
    if !PURPOSES.contains(&purpose.as_str()) {
        return Err(
            ApiError::invalid("invalid_value", format!("Unknown purpose {purpose:?}."))
                .with_param("purpose"),
        );
    }
    let (filename, data) = file.ok_or_else(|| {
        ApiError::invalid("missing_required_parameter", "Missing file.").with_param("file")
    })?;
    let stored = state.store_file(filename, &purpose, Bytes::from(data));
    Counters::add(&state.counters.files_uploaded, 1);
    tracing::info!(file_id = %stored.id, bytes = stored.data.len(), %purpose, "file uploaded");
    json_ok(stored.to_json())
}

async fn get_file(State(state): State<Shared>, Path(id): Path<String>) -> ApiResult {
    let files = lock(&state.files);
    let file = files
        .get(&id)
        .ok_or_else(|| ApiError::not_found("File", &id))?;
    json_ok(file.to_json())
}

async fn delete_file(State(state): State<Shared>, Path(id): Path<String>) -> ApiResult {
    lock(&state.files)
        .remove(&id)
        .ok_or_else(|| ApiError::not_found("File", &id))?;
    json_ok(json!({ "id": id, "object": "file", "deleted": true }))
}

async fn list_files(State(state): State<Shared>) -> ApiResult {
    let files = lock(&state.files);
    let mut list: Vec<_> = files.values().collect();
    list.sort_by(|a, b| {
        b.created_at
            .cmp(&a.created_at)
            .then_with(|| a.id.cmp(&b.id))
    });
    let data: Vec<Value> = list.iter().map(|f| f.to_json()).collect();
    json_ok(json!({ "object": "list", "data": data, "has_more": false }))
}

async fn file_content(State(state): State<Shared>, Path(id): Path<String>) -> ApiResult {
    let data = lock(&state.files)
        .get(&id)
        .map(|f| f.data.clone())
        .ok_or_else(|| ApiError::not_found("File", &id))?;
    Ok(([(header::CONTENT_TYPE, "application/octet-stream")], data).into_response())
}

fn field_str<'a>(body: &'a Value, name: &'static str) -> Result<&'a str, ApiError> {
    body.get(name).and_then(Value::as_str).ok_or_else(|| {
        ApiError::invalid(
            "missing_required_parameter",
            format!("Missing required parameter: '{name}'."),
        )
        .with_param(name)
    })
}

/// OpenAI's metadata limits: 16 pairs, keys up to 64 chars, string values up to 512.
fn check_metadata(metadata: Option<&Value>) -> Result<Option<Value>, ApiError> {
    let bad = |message: &str| ApiError::invalid("invalid_metadata", message).with_param("metadata");
    match metadata {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Object(map)) => {
            if map.len() > 16 {
                return Err(bad("Metadata may have at most 16 pairs."));
            }
            for (key, value) in map {
                if key.chars().count() > 64 {
                    return Err(bad("Metadata keys may be at most 64 characters."));
                }
                match value {
                    Value::String(s) if s.chars().count() <= 512 => {}
                    Value::String(_) => {
                        return Err(bad("Metadata values may be at most 512 characters."));
                    }
                    _ => return Err(bad("Metadata values must be strings.")),
                }
            }
            Ok(Some(Value::Object(map.clone())))
        }
        Some(_) => Err(bad("Metadata must be an object of string pairs.")),
    }
}

/// The arguments of `POST /batches` in OpenAI's OpenAPI spec (`CreateBatchRequest`).
const OPENAI_CREATE_ARGUMENTS: [&str; 5] = [
    "input_file_id",
    "endpoint",
    "completion_window",
    "metadata",
    "output_expires_after",
];

async fn create_batch(State(state): State<Shared>, body: Bytes) -> ApiResult {
    let body: Value = serde_json::from_slice(&body).map_err(|e| {
        ApiError::invalid("invalid_json", format!("The body is not valid JSON: {e}"))
    })?;
    if state.cfg.strict_arguments
        && let Some(unknown) = body.as_object().and_then(|fields| {
            fields
                .keys()
                .find(|name| !OPENAI_CREATE_ARGUMENTS.contains(&name.as_str()))
        })
    {
        // OpenAI's answer to an unknown argument: 400 with no code.
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            None,
            format!("Unrecognized request argument supplied: {unknown}"),
        ));
    }
    let input_file_id = field_str(&body, "input_file_id")?;
    let endpoint = field_str(&body, "endpoint")?;
    let completion_window = field_str(&body, "completion_window")?;
    if endpoint != "/v1/chat/completions" {
        return Err(ApiError::invalid(
            "invalid_value",
            format!(
                "Unsupported endpoint {endpoint:?}; this emulator answers /v1/chat/completions."
            ),
        )
        .with_param("endpoint"));
    }
    if completion_window != "24h" {
        return Err(
            ApiError::invalid("invalid_value", "completion_window must be \"24h\".")
                .with_param("completion_window"),
        );
    }
    let metadata = check_metadata(body.get("metadata"))?;
    let webhook_url = match body.get("webhook_url") {
        None | Some(Value::Null) => None,
        Some(Value::String(url)) => {
            webhook::check_url(url).map_err(|message| {
                ApiError::invalid("invalid_value", message).with_param("webhook_url")
            })?;
            Some(url.clone())
        }
        Some(_) => {
            return Err(
                ApiError::invalid("invalid_value", "webhook_url must be a string.")
                    .with_param("webhook_url"),
            );
        }
    };
    let input = {
        let files = lock(&state.files);
        let file = files.get(input_file_id).ok_or_else(|| {
            ApiError::not_found("File", input_file_id).with_param("input_file_id")
        })?;
        if file.purpose != "batch" {
            return Err(ApiError::invalid(
                "invalid_value",
                format!(
                    "The input file has purpose {:?}; batches need purpose \"batch\".",
                    file.purpose
                ),
            )
            .with_param("input_file_id"));
        }
        if !file.is_processed() {
            state.counters.fault("file_not_processed");
            return Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                "invalid_request_error",
                None,
                format!(
                    "Cannot find file {input_file_id}: it has not been processed yet \
                     (the batch emulator's file-processing delay)."
                ),
            )
            .with_param("input_file_id"));
        }
        file.data.clone()
    };

    let id = state.new_batch_id();
    let seq = state
        .next_seq
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let created_at = state.timestamp();
    let cancel = Arc::new(Notify::new());
    let record = BatchRecord {
        id: id.clone(),
        seq,
        endpoint: endpoint.to_owned(),
        input_file_id: input_file_id.to_owned(),
        completion_window: completion_window.to_owned(),
        metadata,
        webhook_url,
        model: None,
        status: Status::Validating,
        errors: None,
        output_file_id: None,
        error_file_id: None,
        created_at,
        in_progress_at: None,
        expires_at: created_at + state.day(),
        finalizing_at: None,
        completed_at: None,
        failed_at: None,
        expired_at: None,
        cancelling_at: None,
        cancelled_at: None,
        counts: RequestCounts::default(),
        progress: None,
        cancel: Arc::clone(&cancel),
    };
    let response = record.to_json(state.cfg.errors_shape);
    lock(&state.batches).insert(id.clone(), record);
    tracing::info!(batch_id = %id, %input_file_id, "batch created");
    batch::start(&state, id, seq, input, endpoint.to_owned(), cancel);
    let lose = state.faults().create_lost_answer;
    // Drawn by batch number, so one seed loses the same creations on every run.
    if lose > 0.0
        && draw(&[
            b"create_lost_answer",
            &state.cfg.seed.to_le_bytes(),
            &seq.to_le_bytes(),
        ]) < lose
    {
        state.counters.fault("create_lost_answer");
        tracing::info!("batch created; its answer is replaced by a 500");
        return Err(ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "server_error",
            None,
            "The server had an error while processing your request (injected by the batch \
             emulator after creating the batch).",
        ));
    }
    json_ok(response)
}

async fn get_batch(State(state): State<Shared>, Path(id): Path<String>) -> ApiResult {
    let batches = lock(&state.batches);
    let batch = batches
        .get(&id)
        .ok_or_else(|| ApiError::not_found("Batch", &id))?;
    json_ok(batch.to_json(state.cfg.errors_shape))
}

async fn cancel_batch(State(state): State<Shared>, Path(id): Path<String>) -> ApiResult {
    let now = state.timestamp();
    let mut batches = lock(&state.batches);
    let batch = batches
        .get_mut(&id)
        .ok_or_else(|| ApiError::not_found("Batch", &id))?;
    match batch.status {
        Status::Validating | Status::InProgress => {
            batch.status = Status::Cancelling;
            batch.cancelling_at = Some(now);
            batch.cancel.notify_one();
            tracing::info!(batch_id = %id, "batch cancelling");
        }
        Status::Cancelling | Status::Cancelled => {}
        other => {
            return Err(ApiError::new(
                StatusCode::CONFLICT,
                "invalid_request_error",
                Some("invalid_state"),
                format!("Cannot cancel a batch with status {:?}.", other.as_str()),
            ));
        }
    }
    json_ok(batch.to_json(state.cfg.errors_shape))
}

#[derive(Debug, Deserialize)]
struct ListQuery {
    limit: Option<usize>,
    after: Option<String>,
}

async fn list_batches(State(state): State<Shared>, Query(query): Query<ListQuery>) -> ApiResult {
    let limit = query.limit.unwrap_or(20).clamp(1, 100);
    let batches = lock(&state.batches);
    let mut all: Vec<&BatchRecord> = batches.values().collect();
    // Newest first, like OpenAI.
    all.sort_by_key(|b| std::cmp::Reverse(b.seq));
    let start = match &query.after {
        Some(after) => all
            .iter()
            .position(|b| &b.id == after)
            .map_or(all.len(), |i| i + 1),
        None => 0,
    };
    let page: Vec<Value> = all
        .iter()
        .skip(start)
        .take(limit)
        .map(|b| b.to_json(state.cfg.errors_shape))
        .collect();
    let has_more = all.len() > start + page.len();
    json_ok(json!({
        "object": "list",
        "data": page,
        "first_id": page.first().and_then(|b| b.get("id")).cloned(),
        "last_id": page.last().and_then(|b| b.get("id")).cloned(),
        "has_more": has_more,
    }))
}

async fn get_faults(State(state): State<Shared>) -> ApiResult {
    json_ok(json!(state.faults()))
}

/// Merges the given fields into the current settings, so a test can change
/// one fault without restating the rest.
async fn put_faults(State(state): State<Shared>, body: Bytes) -> ApiResult {
    let patch: Value = serde_json::from_slice(&body).map_err(|e| {
        ApiError::invalid("invalid_json", format!("The body is not valid JSON: {e}"))
    })?;
    let Value::Object(patch) = patch else {
        return Err(ApiError::invalid(
            "invalid_value",
            "Send a JSON object of fault settings.",
        ));
    };
    let mut current = json!(state.faults());
    if let Value::Object(map) = &mut current {
        map.extend(patch);
    }
    let faults: FaultSettings = serde_json::from_value(current)
        .map_err(|e| ApiError::invalid("invalid_value", format!("Bad fault settings: {e}")))?;
    faults
        .validate()
        .map_err(|e| ApiError::invalid("invalid_value", e.to_string()))?;
    tracing::info!(?faults, "fault settings changed");
    state.set_faults(faults.clone());
    json_ok(json!(faults))
}

async fn get_stats(State(state): State<Shared>) -> ApiResult {
    json_ok(json!(state.stats()))
}

async fn reset_stats(State(state): State<Shared>) -> ApiResult {
    state.counters.reset();
    json_ok(json!(state.stats()))
}

#[cfg(test)]
mod tests {
    use super::constant_time_eq;

    #[test]
    fn key_comparison() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"ab"));
    }
}
