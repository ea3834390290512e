//! `batch-emulator`: run the emulator as a process. The first stdout line is
//! `listening on http://ADDR` so a test harness can find the port.

use std::io::Write as _;
use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context as _;
use batch_emulator::{EmulatorConfig, ErrorsShape, FaultSettings, IdStyle};
use clap::Parser;

/// A local OpenAI-compatible Batch API provider. Its answers are synthetic,
/// never a model's labels.
#[derive(Parser)]
#[command(name = "batch-emulator", version)]
struct Args {
    /// Address to listen on (port 0 picks a free one).
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: SocketAddr,
    /// Bearer key clients must send.
    #[arg(long, env = "BATCH_EMULATOR_API_KEY", hide_env_values = true)]
    api_key: String,
    /// Largest accepted upload in bytes.
    #[arg(long, default_value_t = 200 * 1024 * 1024)]
    max_file_bytes: u64,
    /// Most requests per batch input file.
    #[arg(long, default_value_t = 50_000)]
    max_requests: usize,
    /// Time a batch spends in `validating`.
    #[arg(long, default_value_t = 200)]
    validating_ms: u64,
    /// Time in `in_progress`; requests finish evenly across it.
    #[arg(long, default_value_t = 500)]
    in_progress_ms: u64,
    /// Time in `finalizing` (and in `cancelling`).
    #[arg(long, default_value_t = 200)]
    finalizing_ms: u64,
    /// `openai` (batch_…, file-…) or `plain` (uuid-like and numeric ids).
    #[arg(long, default_value = "openai")]
    id_style: IdStyle,
    /// Batch and file timestamps in milliseconds (Inference.net style).
    #[arg(long)]
    millis_timestamps: bool,
    /// How batch objects write `errors`: `openai`, `null-data`, `bare` or `loose`.
    #[arg(long, default_value = "openai")]
    errors_shape: ErrorsShape,
    /// Refuse batch creations with arguments OpenAI does not define (`webhook_url`), 400.
    #[arg(long)]
    strict_arguments: bool,
    /// Seeds answers, output order, ids and fault draws.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Project-level Standard Webhooks endpoint.
    #[arg(long)]
    webhook_url: Option<String>,
    /// `whsec_<base64>` signing secret; repeat to sign with several (rotation).
    #[arg(
        long,
        env = "BATCH_EMULATOR_WEBHOOK_SECRET",
        hide_env_values = true,
        value_delimiter = ' '
    )]
    webhook_secret: Vec<String>,
    /// Per-attempt webhook timeout.
    #[arg(long, default_value_t = 30_000)]
    webhook_timeout_ms: u64,
    /// Retries after the first webhook attempt.
    #[arg(long, default_value_t = 3)]
    webhook_retries: u32,
    /// First retry delay (doubles each retry).
    #[arg(long, default_value_t = 1_000)]
    webhook_backoff_ms: u64,
    /// `retry-after-ms` on injected 429s.
    #[arg(long, default_value_t = 20)]
    retry_after_ms: u64,
    /// Fraction of requests answered as `inference_failed` error lines.
    #[arg(long, default_value_t = 0.0)]
    fault_error_line: f64,
    /// Fraction of requests answered 200 with content that is not JSON.
    #[arg(long, default_value_t = 0.0)]
    fault_non_json: f64,
    /// Fraction of requests answered with JSON that breaks the request's schema.
    #[arg(long, default_value_t = 0.0)]
    fault_schema_break: f64,
    /// Fraction of requests cut off with `finish_reason: "length"`.
    #[arg(long, default_value_t = 0.0)]
    fault_length: f64,
    /// Fraction of /v1 calls answered 429 (with Retry-After, retry-after-ms).
    #[arg(long, default_value_t = 0.0)]
    fault_http_429: f64,
    /// Fraction of /v1 calls answered 500.
    #[arg(long, default_value_t = 0.0)]
    fault_http_500: f64,
    /// Fraction of batches that expire with half their requests done.
    #[arg(long, default_value_t = 0.0)]
    fault_expire: f64,
    /// Fraction of batches failed whole with `token_limit_exceeded` (the enqueued limit).
    #[arg(long, default_value_t = 0.0)]
    fault_enqueued_limit: f64,
    /// Shortest time between two uploads; sooner ones get 429 with Retry-After (0: none).
    #[arg(long, default_value_t = 0)]
    fault_upload_interval_ms: u64,
    /// How long an upload stays `uploaded` (not yet `processed`); creating a batch from it
    /// sooner gets 400 "Cannot find file".
    #[arg(long, default_value_t = 0)]
    fault_file_processing_ms: u64,
    /// Fraction of batch creations that create the batch, then answer 500.
    #[arg(long, default_value_t = 0.0)]
    fault_create_lost_answer: f64,
    /// Fraction of webhook deliveries silently dropped.
    #[arg(long, default_value_t = 0.0)]
    fault_webhook_drop: f64,
    /// Fraction of webhook deliveries sent twice (same delivery id).
    #[arg(long, default_value_t = 0.0)]
    fault_webhook_duplicate: f64,
    /// Extra delay before every webhook delivery.
    #[arg(long, default_value_t = 0)]
    fault_webhook_delay_ms: u64,
    /// Random extra delay per delivery, so deliveries arrive out of order.
    #[arg(long)]
    fault_webhook_reorder: bool,
}

impl Args {
    fn into_config(self) -> EmulatorConfig {
        EmulatorConfig {
            listen: self.listen,
            api_key: self.api_key,
            max_file_bytes: self.max_file_bytes,
            max_requests: self.max_requests,
            validating: Duration::from_millis(self.validating_ms),
            in_progress: Duration::from_millis(self.in_progress_ms),
            finalizing: Duration::from_millis(self.finalizing_ms),
            id_style: self.id_style,
            millis_timestamps: self.millis_timestamps,
            errors_shape: self.errors_shape,
            strict_arguments: self.strict_arguments,
            seed: self.seed,
            webhook_url: self.webhook_url,
            webhook_secrets: self
                .webhook_secret
                .into_iter()
                .filter(|s| !s.is_empty())
                .collect(),
            webhook_timeout: Duration::from_millis(self.webhook_timeout_ms),
            webhook_retries: self.webhook_retries,
            webhook_backoff: Duration::from_millis(self.webhook_backoff_ms),
            retry_after_ms: self.retry_after_ms,
            faults: FaultSettings {
                error_line: self.fault_error_line,
                non_json: self.fault_non_json,
                schema_break: self.fault_schema_break,
                length: self.fault_length,
                http_429: self.fault_http_429,
                http_500: self.fault_http_500,
                expire: self.fault_expire,
                enqueued_limit: self.fault_enqueued_limit,
                upload_interval_ms: self.fault_upload_interval_ms,
                file_processing_ms: self.fault_file_processing_ms,
                create_lost_answer: self.fault_create_lost_answer,
                webhook_drop: self.fault_webhook_drop,
                webhook_duplicate: self.fault_webhook_duplicate,
                webhook_delay_ms: self.fault_webhook_delay_ms,
                webhook_reorder: self.fault_webhook_reorder,
            },
        }
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    // Logs go to stderr: stdout carries only the address line.
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();

    let config = Args::parse().into_config();
    tracing::info!(?config, "starting");
    let mut emulator = batch_emulator::spawn(config)
        .await
        .context("starting the batch emulator")?;

    let mut stdout = std::io::stdout().lock();
    writeln!(stdout, "listening on http://{}", emulator.addr())?;
    stdout.flush()?;
    drop(stdout);

    shutdown_signal().await;
    tracing::info!("shutting down");
    emulator.stop();
    emulator.wait().await;
    Ok(())
}

async fn shutdown_signal() {
    #[cfg(unix)]
    {
        let mut term = match tokio::signal::unix::signal(
            tokio::signal::unix::SignalKind::terminate(),
        ) {
            Ok(term) => term,
            Err(e) => {
                tracing::warn!(error = %e, "cannot listen for SIGTERM; only Ctrl-C stops the emulator");
                let _ = tokio::signal::ctrl_c().await;
                return;
            }
        };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
