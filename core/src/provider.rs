//! Provider profiles: what each Batch API documents about its limits and quirks, as the
//! defaults `SHOTLABEL_PROVIDER` selects. Every value and its source is in
//! docs/providers.md; explicit settings override them, within the provider's limits.

use std::time::Duration;

use crate::request::BatchLimits;
use crate::task::TokenLimitField;

/// Which provider the pipeline talks to.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum ProviderProfile {
    /// Inference.net's Batch API (`https://batch.inference.net/v1`).
    InferenceNet,
    /// OpenAI's Batch API (`https://api.openai.com/v1`).
    #[value(name = "openai")]
    OpenAi,
    /// Any other OpenAI-compatible Batch API: OpenAI's published file limits, nothing
    /// assumed beyond them.
    #[default]
    Generic,
}

/// What a provider documents, as defaults.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProviderDefaults {
    /// The most requests and bytes in one input file.
    pub file_limits: BatchLimits,
    /// The largest request line the provider takes; a larger one gets a failed record
    /// before upload. `None`: only the file limit applies.
    pub max_request_bytes: Option<u64>,
    /// Whether `webhook_url` may be sent with a batch creation (OpenAI refuses unknown
    /// arguments with 400; its webhooks are configured per project).
    pub accepts_webhook_url: bool,
    /// The field the completion-token limit goes in, unless the task names one.
    pub token_field: TokenLimitField,
    /// The shortest time between two uploads (and so between two creations).
    pub upload_interval: Duration,
    /// The most batches open at once (0: no limit documented).
    pub max_open_batches: u32,
    /// The most requests in open batches at once (0: no limit documented).
    pub max_enqueued_requests: u64,
    /// How long to wait for an upload to be `processed` before creating from it; `None`
    /// where the provider reports no file status worth waiting for.
    pub file_ready_wait: Option<Duration>,
    /// Delete a batch's input, output and error files once it is harvested.
    pub delete_files_after_harvest: bool,
}

/// OpenAI's per-file limits: 50,000 requests and "200 MB" (taken as 200,000,000 bytes,
/// which is within the 209,715,200 an OpenAI error message has quoted).
const OPENAI_FILE_LIMITS: BatchLimits = BatchLimits {
    max_requests: 50_000,
    max_bytes: 200_000_000,
};

/// One image per request and OpenAI takes up to 20 MB per image: 20,000,000 bytes are
/// 26,666,668 in base64, and the prompt and schema fit in the rest.
const OPENAI_MAX_REQUEST_BYTES: u64 = 27_000_000;

impl std::str::FromStr for ProviderProfile {
    type Err = String;

    fn from_str(name: &str) -> Result<Self, String> {
        [Self::InferenceNet, Self::OpenAi, Self::Generic]
            .into_iter()
            .find(|profile| profile.name().eq_ignore_ascii_case(name))
            .ok_or_else(|| "inference-net, openai or generic".to_owned())
    }
}

impl ProviderProfile {
    /// `SHOTLABEL_PROVIDER` as read outside the clap settings (the CLI's local runs, the
    /// provider client from a bare environment): unset or blank is the default.
    pub fn from_setting(value: Option<&str>) -> Result<Self, crate::settings::SettingsError> {
        match value.map(str::trim).filter(|v| !v.is_empty()) {
            None => Ok(Self::default()),
            Some(name) => name
                .parse()
                .map_err(|what| crate::settings::SettingsError::Invalid {
                    name: "SHOTLABEL_PROVIDER".into(),
                    value: name.to_owned(),
                    what,
                }),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::InferenceNet => "inference-net",
            Self::OpenAi => "openai",
            Self::Generic => "generic",
        }
    }

    pub fn defaults(self) -> ProviderDefaults {
        match self {
            Self::OpenAi => ProviderDefaults {
                file_limits: OPENAI_FILE_LIMITS,
                max_request_bytes: Some(OPENAI_MAX_REQUEST_BYTES),
                accepts_webhook_url: false,
                token_field: TokenLimitField::MaxCompletionTokens,
                // At most 2,000 batch creations an hour: one every 1.8 s.
                upload_interval: Duration::from_millis(1_800),
                max_open_batches: 0,
                // The enqueued-token limit depends on the model and the account's tier;
                // the deployment sets it (SHOTLABEL_MAX_ENQUEUED_REQUESTS).
                max_enqueued_requests: 0,
                file_ready_wait: Some(Duration::from_secs(60)),
                delete_files_after_harvest: true,
            },
            Self::InferenceNet => ProviderDefaults {
                // Not documented by Inference.net; OpenAI's, which its API mirrors.
                file_limits: OPENAI_FILE_LIMITS,
                max_request_bytes: None,
                accepts_webhook_url: true,
                token_field: TokenLimitField::MaxTokens,
                // "Batch file upload: 1 per minute".
                upload_interval: Duration::from_secs(60),
                max_open_batches: 0,
                max_enqueued_requests: 0,
                // Its own sample creates the batch straight after the upload.
                file_ready_wait: None,
                delete_files_after_harvest: true,
            },
            Self::Generic => ProviderDefaults {
                file_limits: OPENAI_FILE_LIMITS,
                max_request_bytes: None,
                accepts_webhook_url: true,
                token_field: TokenLimitField::MaxTokens,
                upload_interval: Duration::ZERO,
                max_open_batches: 0,
                max_enqueued_requests: 0,
                // Waits only if the provider says the file is still `uploaded`.
                file_ready_wait: Some(Duration::from_secs(60)),
                // Unknown whether it deletes, or keeps files for later inspection.
                delete_files_after_harvest: false,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_openai_refuses_per_batch_webhooks_and_max_tokens() {
        for profile in [ProviderProfile::InferenceNet, ProviderProfile::Generic] {
            let defaults = profile.defaults();
            assert!(defaults.accepts_webhook_url, "{profile:?}");
            assert_eq!(defaults.token_field, TokenLimitField::MaxTokens);
        }
        let openai = ProviderProfile::OpenAi.defaults();
        assert!(!openai.accepts_webhook_url);
        assert_eq!(openai.token_field, TokenLimitField::MaxCompletionTokens);
        // A request line must fit in a file.
        for profile in [
            ProviderProfile::OpenAi,
            ProviderProfile::InferenceNet,
            ProviderProfile::Generic,
        ] {
            let defaults = profile.defaults();
            assert!(
                defaults
                    .max_request_bytes
                    .is_none_or(|line| line <= defaults.file_limits.max_bytes)
            );
        }
    }
}
