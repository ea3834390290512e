//! Where the stack is, for the operator commands (`backfill`, `status`, `redrive`,
//! `export`): the bucket, the input prefix and the queues, resolved from flags, the
//! environment, or a CloudFormation stack's outputs; and the AWS clients and error wording
//! those commands share.
//!
//! Each value is taken from (highest first) its flag, its environment variable, and the
//! outputs of `--stack NAME`. The AWS endpoint, region and credentials come from the
//! standard SDK configuration (`AWS_ENDPOINT_URL`, `AWS_PROFILE`, …), so the same commands
//! work against the local stack and real AWS.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use anyhow::anyhow;
use aws_config::SdkConfig;
use aws_credential_types::provider::error::CredentialsError;
use aws_sdk_s3::config::ProvideCredentials;
use aws_sdk_s3::config::http::HttpResponse;
use aws_sdk_s3::error::{ProvideErrorMetadata, SdkError};
use shotlabel_core::records::Layout;

/// The CloudFormation outputs `--stack` reads; the SAM template declares outputs with
/// exactly these names.
pub const OUTPUT_BUCKET: &str = "BucketName";
pub const OUTPUT_PENDING_QUEUE_URL: &str = "PendingQueueUrl";
pub const OUTPUT_PENDING_DEAD_LETTER_QUEUE_URL: &str = "PendingDeadLetterQueueUrl";
pub const OUTPUT_HARVEST_QUEUE_URL: &str = "HarvestQueueUrl";
pub const OUTPUT_HARVEST_DEAD_LETTER_QUEUE_URL: &str = "HarvestDeadLetterQueueUrl";
/// Every output `--stack` reads.
pub const STACK_OUTPUTS: [&str; 5] = [
    OUTPUT_BUCKET,
    OUTPUT_PENDING_QUEUE_URL,
    OUTPUT_PENDING_DEAD_LETTER_QUEUE_URL,
    OUTPUT_HARVEST_QUEUE_URL,
    OUTPUT_HARVEST_DEAD_LETTER_QUEUE_URL,
];

/// The environment variables the commands read.
pub const ENV_BUCKET: &str = "SHOTLABEL_BUCKET";
pub const ENV_INPUT_PREFIX: &str = "SHOTLABEL_INPUT_PREFIX";
pub const ENV_PENDING_QUEUE_URL: &str = "SHOTLABEL_PENDING_QUEUE_URL";
pub const ENV_PENDING_DLQ_URL: &str = "SHOTLABEL_PENDING_DLQ_URL";
pub const ENV_HARVEST_QUEUE_URL: &str = "SHOTLABEL_HARVEST_QUEUE_URL";
pub const ENV_HARVEST_DLQ_URL: &str = "SHOTLABEL_HARVEST_DLQ_URL";
pub const ENV_STACK: &str = "SHOTLABEL_STACK";

/// The input prefix when nothing sets one (the pipeline's default too).
pub const DEFAULT_INPUT_PREFIX: &str = "incoming/";

/// Where the stack is: flags shared by every operator command.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct StackArgs {
    /// The bucket [env: SHOTLABEL_BUCKET; stack output BucketName]
    #[arg(long, value_name = "NAME")]
    pub bucket: Option<String>,
    /// Objects under this prefix are the inputs [env: SHOTLABEL_INPUT_PREFIX; default incoming/]
    #[arg(long, value_name = "PREFIX")]
    pub input_prefix: Option<String>,
    /// The pending SQS queue [env: SHOTLABEL_PENDING_QUEUE_URL; stack output PendingQueueUrl]
    #[arg(long, value_name = "URL")]
    pub pending_queue_url: Option<String>,
    /// The pending queue's dead-letter queue [env: SHOTLABEL_PENDING_DLQ_URL; stack output PendingDeadLetterQueueUrl]
    #[arg(long = "pending-dlq-url", value_name = "URL")]
    pub pending_dlq_url: Option<String>,
    /// The harvest SQS queue [env: SHOTLABEL_HARVEST_QUEUE_URL; stack output HarvestQueueUrl]
    #[arg(long, value_name = "URL")]
    pub harvest_queue_url: Option<String>,
    /// The harvest queue's dead-letter queue [env: SHOTLABEL_HARVEST_DLQ_URL; stack output HarvestDeadLetterQueueUrl]
    #[arg(long = "harvest-dlq-url", value_name = "URL")]
    pub harvest_dlq_url: Option<String>,
    /// A deployed CloudFormation (SAM) stack whose outputs fill in whatever the flags and
    /// the environment leave unset [env: SHOTLABEL_STACK]
    #[arg(long, value_name = "NAME")]
    pub stack: Option<String>,
}

/// The resolved configuration: what the commands work on.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct StackConfig {
    pub bucket: Option<String>,
    /// Always ends in `/`.
    pub input_prefix: String,
    pub pending_queue_url: Option<String>,
    pub pending_dead_letter_queue_url: Option<String>,
    pub harvest_queue_url: Option<String>,
    pub harvest_dead_letter_queue_url: Option<String>,
}

const HOW_TO_CONFIGURE: &str = "or pass --stack NAME (a deployed stack)";

impl StackConfig {
    /// The local stack's resources (what `shotlabel local` brings up).
    pub fn from_local(
        resources: &shotlabel_localstack::LocalResources,
        input_prefix: &str,
    ) -> Self {
        Self {
            bucket: Some(resources.bucket.clone()),
            input_prefix: normalize_prefix(Some(input_prefix)),
            pending_queue_url: Some(resources.pending_queue_url.clone()),
            pending_dead_letter_queue_url: Some(resources.pending_dead_letter_queue_url.clone()),
            harvest_queue_url: Some(resources.harvest_queue_url.clone()),
            harvest_dead_letter_queue_url: Some(resources.harvest_dead_letter_queue_url.clone()),
        }
    }

    pub fn layout(&self) -> Layout {
        Layout::new(&self.input_prefix)
    }

    pub fn bucket(&self) -> anyhow::Result<&str> {
        self.bucket.as_deref().ok_or_else(|| {
            anyhow!("no bucket configured: set {ENV_BUCKET} or pass --bucket or --stack NAME")
        })
    }

    pub fn pending_queue_url(&self) -> anyhow::Result<&str> {
        need(
            &self.pending_queue_url,
            "pending queue",
            ENV_PENDING_QUEUE_URL,
            "--pending-queue-url",
        )
    }

    pub fn pending_dead_letter_queue_url(&self) -> anyhow::Result<&str> {
        need(
            &self.pending_dead_letter_queue_url,
            "pending dead-letter queue",
            ENV_PENDING_DLQ_URL,
            "--pending-dlq-url",
        )
    }

    pub fn harvest_queue_url(&self) -> anyhow::Result<&str> {
        need(
            &self.harvest_queue_url,
            "harvest queue",
            ENV_HARVEST_QUEUE_URL,
            "--harvest-queue-url",
        )
    }

    pub fn harvest_dead_letter_queue_url(&self) -> anyhow::Result<&str> {
        need(
            &self.harvest_dead_letter_queue_url,
            "harvest dead-letter queue",
            ENV_HARVEST_DLQ_URL,
            "--harvest-dlq-url",
        )
    }

    /// `export SHOTLABEL_…=…` lines for a POSIX shell, one per value that is set, so a
    /// person can point the operator commands at this stack.
    pub fn env_lines(&self) -> String {
        let mut out = String::new();
        let values = [
            (ENV_BUCKET, self.bucket.as_deref()),
            (ENV_INPUT_PREFIX, Some(self.input_prefix.as_str())),
            (ENV_PENDING_QUEUE_URL, self.pending_queue_url.as_deref()),
            (
                ENV_PENDING_DLQ_URL,
                self.pending_dead_letter_queue_url.as_deref(),
            ),
            (ENV_HARVEST_QUEUE_URL, self.harvest_queue_url.as_deref()),
            (
                ENV_HARVEST_DLQ_URL,
                self.harvest_dead_letter_queue_url.as_deref(),
            ),
        ];
        for (name, value) in values {
            if let Some(value) = value {
                let _ = writeln!(out, "export {name}={}", shell_quote(value));
            }
        }
        out
    }
}

fn need<'a>(
    value: &'a Option<String>,
    what: &str,
    env: &str,
    flag: &str,
) -> anyhow::Result<&'a str> {
    value
        .as_deref()
        .ok_or_else(|| anyhow!("no {what} configured: set {env} or pass {flag} {HOW_TO_CONFIGURE}"))
}

/// Quotes a value for a POSIX shell unless it is plainly safe as it is.
fn shell_quote(value: &str) -> String {
    let safe = !value.is_empty()
        && value
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./:=@%+,".contains(c));
    if safe {
        value.to_owned()
    } else {
        format!("'{}'", value.replace('\'', r"'\''"))
    }
}

fn normalize_prefix(prefix: Option<&str>) -> String {
    match prefix.map(str::trim).filter(|p| !p.is_empty()) {
        None => DEFAULT_INPUT_PREFIX.to_owned(),
        Some(p) if p.ends_with('/') => p.to_owned(),
        Some(p) => format!("{p}/"),
    }
}

/// Merges flags, environment (`env` looks a variable up) and stack outputs, highest first.
/// Returns the configuration and a warning for each value the environment set that
/// differs from the named stack's output (an `export` left over from another stack).
pub fn merge(
    args: &StackArgs,
    env: impl Fn(&str) -> Option<String>,
    outputs: Option<&BTreeMap<String, String>>,
) -> (StackConfig, Vec<String>) {
    let env = |name: &str| env(name).filter(|v| !v.trim().is_empty());
    let mut warnings = Vec::new();
    let mut pick = |flag: &Option<String>, env_name: &str, output: &str| -> Option<String> {
        let flag = flag.clone().filter(|v| !v.trim().is_empty());
        let from_env = env(env_name);
        let from_stack = outputs.and_then(|o| o.get(output)).cloned();
        if flag.is_none()
            && let (Some(e), Some(s)) = (&from_env, &from_stack)
            && e != s
        {
            warnings.push(format!(
                "{env_name} overrides the stack's {output} output ({e} instead of {s})"
            ));
        }
        flag.or(from_env).or(from_stack)
    };
    let config = StackConfig {
        bucket: pick(&args.bucket, ENV_BUCKET, OUTPUT_BUCKET),
        pending_queue_url: pick(
            &args.pending_queue_url,
            ENV_PENDING_QUEUE_URL,
            OUTPUT_PENDING_QUEUE_URL,
        ),
        pending_dead_letter_queue_url: pick(
            &args.pending_dlq_url,
            ENV_PENDING_DLQ_URL,
            OUTPUT_PENDING_DEAD_LETTER_QUEUE_URL,
        ),
        harvest_queue_url: pick(
            &args.harvest_queue_url,
            ENV_HARVEST_QUEUE_URL,
            OUTPUT_HARVEST_QUEUE_URL,
        ),
        harvest_dead_letter_queue_url: pick(
            &args.harvest_dlq_url,
            ENV_HARVEST_DLQ_URL,
            OUTPUT_HARVEST_DEAD_LETTER_QUEUE_URL,
        ),
        input_prefix: normalize_prefix(
            args.input_prefix
                .clone()
                .filter(|v| !v.trim().is_empty())
                .or_else(|| env(ENV_INPUT_PREFIX))
                .as_deref(),
        ),
    };
    (config, warnings)
}

/// Resolves the configuration, reading the stack's outputs when `--stack` (or
/// `SHOTLABEL_STACK`) names one.
pub async fn resolve(args: &StackArgs, aws: &Aws) -> anyhow::Result<StackConfig> {
    let env = |name: &str| std::env::var(name).ok();
    let stack = args
        .stack
        .clone()
        .filter(|s| !s.trim().is_empty())
        .or_else(|| env(ENV_STACK).filter(|s| !s.trim().is_empty()));
    let outputs = match &stack {
        Some(name) => Some(stack_outputs(aws, name).await?),
        None => None,
    };
    let (config, warnings) = merge(args, env, outputs.as_ref());
    for warning in warnings {
        eprintln!("shotlabel: warning: {}", one_line(&warning));
    }
    Ok(config)
}

/// The outputs of a CloudFormation stack, by output name.
async fn stack_outputs(aws: &Aws, name: &str) -> anyhow::Result<BTreeMap<String, String>> {
    let cfn = aws_sdk_cloudformation::Client::new(&aws.sdk);
    let described = cfn
        .describe_stacks()
        .stack_name(name)
        .send()
        .await
        .map_err(|e| aws.error("reading the stack's outputs", Subject::Stack(name), e))?;
    let stack = described
        .stacks
        .unwrap_or_default()
        .into_iter()
        .next()
        .ok_or_else(|| anyhow!("no CloudFormation stack named {name} ({})", aws.location()))?;
    let outputs: BTreeMap<String, String> = stack
        .outputs
        .unwrap_or_default()
        .into_iter()
        .filter_map(|o| Some((o.output_key?, o.output_value?)))
        .collect();
    if !STACK_OUTPUTS.iter().any(|o| outputs.contains_key(*o)) {
        return Err(anyhow!(
            "stack {name} has none of the outputs shotlabel reads ({}); is it a shotlabel stack?",
            STACK_OUTPUTS.join(", ")
        ));
    }
    Ok(outputs)
}

/// The AWS clients the commands use, from the standard SDK configuration.
#[derive(Debug, Clone)]
pub struct Aws {
    pub sdk: SdkConfig,
    pub s3: aws_sdk_s3::Client,
    pub sqs: aws_sdk_sqs::Client,
}

impl Aws {
    /// Loads the standard configuration and checks, before any call, that it has a region
    /// and credentials, so that their absence is said plainly.
    pub async fn connect() -> anyhow::Result<Self> {
        let sdk = shotlabel_aws::load_sdk_config().await;
        if sdk.region().is_none() {
            return Err(anyhow!(
                "no AWS region configured: set AWS_REGION (or a region in your AWS profile)"
            ));
        }
        let Some(provider) = sdk.credentials_provider() else {
            return Err(no_credentials());
        };
        match provider.provide_credentials().await {
            Ok(_) => {}
            Err(CredentialsError::CredentialsNotLoaded(_)) => return Err(no_credentials()),
            Err(e) => {
                return Err(anyhow!(
                    "cannot load AWS credentials: {}",
                    one_line(&error_chain(&e))
                ));
            }
        }
        Ok(Self {
            s3: shotlabel_aws::s3_client(&sdk),
            sqs: shotlabel_aws::sqs_client(&sdk),
            sdk,
        })
    }

    /// Where requests go, for messages: the custom endpoint, or AWS and the region.
    pub fn location(&self) -> String {
        let region = self.sdk.region().map(|r| r.to_string()).unwrap_or_default();
        match self.sdk.endpoint_url() {
            Some(endpoint) => format!("endpoint {endpoint}"),
            None => format!("AWS region {region}"),
        }
    }

    /// One line a person can act on for a failed AWS call.
    pub fn error<E>(
        &self,
        action: &str,
        subject: Subject<'_>,
        error: SdkError<E, HttpResponse>,
    ) -> anyhow::Error
    where
        E: ProvideErrorMetadata + std::error::Error + 'static,
    {
        anyhow!(
            "{}",
            one_line(&describe_sdk_error(
                action,
                subject,
                &error,
                &self.location()
            ))
        )
    }
}

/// What a failed call was about, so the message can name it.
#[derive(Debug, Clone, Copy)]
pub enum Subject<'a> {
    Bucket(&'a str),
    Queue(&'a str),
    Stack(&'a str),
}

fn no_credentials() -> anyhow::Error {
    anyhow!(
        "no AWS credentials found: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or AWS_PROFILE (after `aws sso login` if it uses SSO)"
    )
}

/// An error and its sources, joined with `: `.
pub fn error_chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(inner) = source {
        let inner_text = inner.to_string();
        if !text.contains(&inner_text) {
            text.push_str(": ");
            text.push_str(&inner_text);
        }
        source = inner.source();
    }
    text
}

/// The innermost cause of an error (for a refused connection: the OS's words).
fn root_cause(error: &(dyn std::error::Error + 'static)) -> String {
    let mut current = error;
    while let Some(inner) = current.source() {
        current = inner;
    }
    current.to_string()
}

const CREDENTIAL_CODES: &[&str] = &[
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "ExpiredToken",
    "ExpiredTokenException",
    "InvalidClientTokenId",
    "UnrecognizedClientException",
    "InvalidToken",
    "AuthFailure",
    "InvalidSecurity",
];

fn describe_sdk_error<E>(
    action: &str,
    subject: Subject<'_>,
    error: &SdkError<E, HttpResponse>,
    location: &str,
) -> String
where
    E: ProvideErrorMetadata + std::error::Error + 'static,
{
    let chain = error_chain(error);
    match error {
        SdkError::DispatchFailure(failure) => {
            if chain.to_ascii_lowercase().contains("credential") {
                return format!("{action}: cannot load AWS credentials: {chain}");
            }
            let what = if failure.is_timeout() {
                "timed out".to_owned()
            } else {
                root_cause(error)
            };
            return format!("cannot reach {location} ({action}): {what}");
        }
        SdkError::TimeoutError(_) => {
            return format!("cannot reach {location} ({action}): timed out");
        }
        _ => {}
    }
    let code = error.code().unwrap_or_default();
    let message = error.message().unwrap_or_default();
    let status = error.raw_response().map(|r| r.status().as_u16());
    if CREDENTIAL_CODES.contains(&code) {
        return format!(
            "AWS rejected the credentials ({code}) while {action}: check AWS_PROFILE or AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY"
        );
    }
    if code.starts_with("AccessDenied") || (code.is_empty() && status == Some(403)) {
        let detail = if message.is_empty() { "" } else { message };
        return format!("access denied while {action} ({location}) {detail}")
            .trim_end()
            .to_owned();
    }
    match subject {
        Subject::Bucket(bucket)
            if code == "NoSuchBucket" || (code.is_empty() && status == Some(404)) =>
        {
            return format!("bucket {bucket} does not exist ({location})");
        }
        Subject::Queue(url)
            if code.contains("NonExistentQueue")
                || code.contains("QueueDoesNotExist")
                || (code.is_empty() && status == Some(404)) =>
        {
            return format!("queue {url} does not exist ({location})");
        }
        Subject::Stack(name) if code == "ValidationError" && message.contains("does not exist") => {
            return format!("no CloudFormation stack named {name} ({location})");
        }
        _ => {}
    }
    match (code.is_empty(), message.is_empty()) {
        (false, false) => format!("{action} failed: {code}: {message}"),
        (false, true) => format!("{action} failed: {code}"),
        _ => match status {
            Some(status) => format!("{action} failed: HTTP {status} ({location})"),
            None => format!("{action} failed: {chain}"),
        },
    }
}

/// Text as one line: line breaks, tabs and other control characters become spaces; the
/// source-snippet lines some parsers add (`  |`, `3 | …`, `   ^`) are dropped.
pub fn one_line(text: &str) -> String {
    let lines: Vec<&str> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .filter(|l| {
            let snippet_marker = l.starts_with('|')
                || l.chars()
                    .all(|c| c == '^' || c == ' ' || c == '-' || c == '~')
                || l.split_once(" |")
                    .is_some_and(|(n, _)| n.chars().all(|c| c.is_ascii_digit()));
            !snippet_marker
        })
        .collect();
    lines
        .join("; ")
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect()
}

/// The shared adapters word SDK errors with `DisplayErrorContext`, which appends the
/// error's `Debug` form in parentheses; a person needs only the words before it.
fn strip_debug(text: &str) -> String {
    const DEBUG_STARTS: [&str; 5] = [
        " (DispatchFailure(",
        " (ServiceError(",
        " (ResponseError(",
        " (TimeoutError(",
        " (ConstructionFailure(",
    ];
    let cut = DEBUG_STARTS
        .iter()
        .filter_map(|start| text.find(start))
        .min()
        .unwrap_or(text.len());
    text[..cut].to_owned()
}

/// An error from the shared adapters (`S3Store`, `SqsQueue`) as one line.
pub fn adapter_error(error: &dyn std::error::Error) -> String {
    one_line(&strip_debug(&error.to_string()))
}

/// A key or path as it may be printed: control characters escaped.
pub fn printable(text: &str) -> String {
    if text.chars().any(char::is_control) {
        format!("{text:?}")
    } else {
        text.to_owned()
    }
}

/// An object as listed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listed {
    pub key: String,
    pub size: u64,
    /// Without S3's quotes.
    pub etag: String,
}

/// `ListObjectsV2`, one page (up to 1000 keys) at a time, with errors worded for a person.
#[derive(Debug)]
pub struct Lister<'a> {
    aws: &'a Aws,
    bucket: String,
    prefix: String,
    start_after: Option<String>,
    token: Option<String>,
    done: bool,
}

impl<'a> Lister<'a> {
    pub fn new(aws: &'a Aws, bucket: &str, prefix: &str) -> Self {
        Self {
            aws,
            bucket: bucket.to_owned(),
            prefix: prefix.to_owned(),
            start_after: None,
            token: None,
            done: false,
        }
    }

    /// Lists only keys after `key` (in S3's UTF-8 byte order), so a listing can start in
    /// the middle of a prefix: how a backfill lists parts of one prefix in parallel.
    pub fn start_after(mut self, key: Option<String>) -> Self {
        self.start_after = key;
        self
    }

    /// The next page, or `None` after the last.
    pub async fn next_page(&mut self) -> anyhow::Result<Option<Vec<Listed>>> {
        if self.done {
            return Ok(None);
        }
        let page = self
            .aws
            .s3
            .list_objects_v2()
            .bucket(&self.bucket)
            .prefix(&self.prefix)
            // Only the first request: the continuation token carries the position after it.
            .set_start_after(self.start_after.take())
            .set_continuation_token(self.token.take())
            // Keys URL-encoded: one key with a character XML cannot carry (ESC, most
            // control characters) would otherwise break the whole listing.
            .encoding_type(aws_sdk_s3::types::EncodingType::Url)
            .send()
            .await
            .map_err(|e| {
                self.aws.error(
                    &format!("listing s3://{}/{}", self.bucket, self.prefix),
                    Subject::Bucket(&self.bucket),
                    e,
                )
            })?;
        self.token = page
            .next_continuation_token
            .filter(|_| page.is_truncated.unwrap_or(false));
        self.done = self.token.is_none();
        Ok(Some(
            page.contents
                .unwrap_or_default()
                .into_iter()
                .filter_map(|o| {
                    Some(Listed {
                        size: o.size.unwrap_or(0).max(0) as u64,
                        etag: o
                            .e_tag
                            .as_deref()
                            .unwrap_or_default()
                            .trim_matches('"')
                            .to_owned(),
                        key: shotlabel_core::s3_key::decode_event_key(&o.key?).ok()?,
                    })
                })
                .collect(),
        ))
    }

    /// Counts the keys that `keep` accepts, page by page.
    pub async fn count(mut self, keep: impl Fn(&str) -> bool) -> anyhow::Result<u64> {
        let mut count = 0;
        while let Some(page) = self.next_page().await? {
            count += page.iter().filter(|o| keep(&o.key)).count() as u64;
        }
        Ok(count)
    }
}

/// A current-thread-free runtime for one command.
pub fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| anyhow!("cannot start the async runtime: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env_of(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: BTreeMap<String, String> = pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        move |name| map.get(name).cloned()
    }

    #[test]
    fn flags_beat_environment_which_beats_stack_outputs() {
        let args = StackArgs {
            bucket: Some("from-flag".into()),
            ..StackArgs::default()
        };
        let outputs: BTreeMap<String, String> = [
            (OUTPUT_BUCKET, "from-stack"),
            (OUTPUT_PENDING_QUEUE_URL, "https://sqs/stack-pending"),
            (OUTPUT_HARVEST_QUEUE_URL, "https://sqs/stack-harvest"),
        ]
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
        let env = env_of(&[
            (ENV_BUCKET, "from-env"),
            (ENV_PENDING_QUEUE_URL, "https://sqs/env-pending"),
        ]);
        let (config, warnings) = merge(&args, env, Some(&outputs));
        assert_eq!(config.bucket.as_deref(), Some("from-flag"));
        assert_eq!(
            config.pending_queue_url.as_deref(),
            Some("https://sqs/env-pending")
        );
        assert_eq!(
            config.harvest_queue_url.as_deref(),
            Some("https://sqs/stack-harvest")
        );
        assert_eq!(config.pending_dead_letter_queue_url, None);
        assert_eq!(config.input_prefix, "incoming/");
        // The environment overriding a named stack is worth a warning; a flag is not.
        assert_eq!(warnings.len(), 1, "{warnings:?}");
        assert!(warnings[0].contains(ENV_PENDING_QUEUE_URL));
    }

    #[test]
    fn missing_values_say_how_to_set_them() {
        let (config, _) = merge(&StackArgs::default(), env_of(&[]), None);
        let error = config.bucket().map(|_| ()).err().map(|e| e.to_string());
        assert_eq!(
            error.as_deref(),
            Some("no bucket configured: set SHOTLABEL_BUCKET or pass --bucket or --stack NAME")
        );
        let error = config
            .pending_queue_url()
            .map(|_| ())
            .err()
            .map(|e| e.to_string());
        assert!(error.is_some_and(|e| e.contains(ENV_PENDING_QUEUE_URL)));
    }

    #[test]
    fn input_prefix_always_ends_in_a_slash() {
        let env = env_of(&[(ENV_INPUT_PREFIX, "shots")]);
        let (config, _) = merge(&StackArgs::default(), env, None);
        assert_eq!(config.input_prefix, "shots/");
        let env = env_of(&[(ENV_INPUT_PREFIX, "  ")]);
        let (config, _) = merge(&StackArgs::default(), env, None);
        assert_eq!(config.input_prefix, "incoming/");
    }

    #[test]
    fn env_lines_are_shell_safe() {
        let config = StackConfig {
            bucket: Some("my-bucket".into()),
            input_prefix: "in coming/".into(),
            pending_queue_url: Some("http://127.0.0.1:5000/123456789012/q".into()),
            pending_dead_letter_queue_url: None,
            harvest_queue_url: Some("it's".into()),
            harvest_dead_letter_queue_url: None,
        };
        assert_eq!(
            config.env_lines(),
            "export SHOTLABEL_BUCKET=my-bucket\n\
             export SHOTLABEL_INPUT_PREFIX='in coming/'\n\
             export SHOTLABEL_PENDING_QUEUE_URL=http://127.0.0.1:5000/123456789012/q\n\
             export SHOTLABEL_HARVEST_QUEUE_URL='it'\\''s'\n"
        );
    }

    #[test]
    fn one_line_drops_snippets_and_control_characters() {
        let toml_error = "TOML parse error at line 3, column 7\n  |\n3 | model = \n  |       ^\nstring values must be quoted\n";
        assert_eq!(
            one_line(toml_error),
            "TOML parse error at line 3, column 7; string values must be quoted"
        );
        assert_eq!(one_line("a\tb\u{1b}[31m"), "a b [31m");
        assert_eq!(printable("incoming/\u{7}x"), "\"incoming/\\u{7}x\"");
    }

    #[test]
    fn sdk_debug_output_is_cut() {
        assert_eq!(
            strip_debug(
                "sending messages: dispatch failure: io error (DispatchFailure(DispatchFailure { source: ... }))"
            ),
            "sending messages: dispatch failure: io error"
        );
        assert_eq!(strip_debug("plain"), "plain");
    }
}
