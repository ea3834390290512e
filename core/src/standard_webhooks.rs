//! Verifying [Standard Webhooks](https://www.standardwebhooks.com/) signatures, the
//! scheme OpenAI (and Gemini) use for batch completion webhooks.
//!
//! A sender signs `"{webhook-id}.{webhook-timestamp}.{raw body}"` with HMAC-SHA256 under
//! the base64-decoded part of a `whsec_<base64>` secret and sends
//! `webhook-signature: v1,<base64> [v1,<base64> …]` (several entries while secrets
//! rotate). The receiver checks the timestamp is within a tolerance of now, recomputes
//! the MAC and compares it in constant time with every `v1` entry; entries of other
//! versions are ignored, as the Standard Webhooks specification says.
//!
//! Everything here is pure: the caller passes the clock and a header lookup, so the
//! webhook Lambda can run [`verify`] over the raw body before it parses anything.
//!
//! Work is bounded whatever the headers hold: header lengths are capped, at most
//! [`MAX_SIGNATURE_ENTRIES`] entries are examined, and the body is hashed once per
//! configured secret.

use std::fmt;

use base64::Engine;
use base64::engine::DecodePaddingMode;
use base64::engine::general_purpose::{GeneralPurpose, GeneralPurposeConfig, STANDARD};
use hmac::{Hmac, Mac};
use secrecy::{ExposeSecret, SecretSlice};
use sha2::Sha256;

type HmacSha256 = Hmac<Sha256>;

/// How far (either way) a `webhook-timestamp` may be from now, as the spec and OpenAI's
/// SDK have it.
pub const DEFAULT_TOLERANCE_SECS: i64 = 300;

/// The header carrying the message id (stable across retries: deduplicate on it).
pub const HEADER_ID: &str = "webhook-id";
/// The header carrying the send time in unix seconds.
pub const HEADER_TIMESTAMP: &str = "webhook-timestamp";
/// The header carrying the space-separated `v1,<base64>` signatures.
pub const HEADER_SIGNATURE: &str = "webhook-signature";

/// At most this many entries of `webhook-signature` are examined; the rest are ignored.
pub const MAX_SIGNATURE_ENTRIES: usize = 16;
/// Longest accepted `webhook-id`, in bytes.
pub const MAX_ID_LEN: usize = 256;
/// Longest accepted `webhook-timestamp`, in bytes.
pub const MAX_TIMESTAMP_LEN: usize = 32;
/// Longest accepted `webhook-signature`, in bytes.
pub const MAX_SIGNATURE_HEADER_LEN: usize = 4096;

/// At most this many secrets may be configured at once (rotation needs two).
pub const MAX_SECRETS: usize = 8;
/// Shortest accepted key, in decoded bytes. Standard Webhooks generates 24 to 64 bytes;
/// anything much shorter is a misconfiguration (a password, a placeholder).
pub const MIN_KEY_LEN: usize = 16;

/// The prefix Standard Webhooks secrets are shown with.
const SECRET_PREFIX: &str = "whsec_";
/// Bytes in an HMAC-SHA256 tag.
const TAG_LEN: usize = 32;
/// Base64 characters of a padded 32-byte tag.
const TAG_B64_LEN: usize = 44;

/// Standard base64, padding optional: secrets are pasted by people.
const LENIENT_STANDARD: GeneralPurpose = GeneralPurpose::new(
    &base64::alphabet::STANDARD,
    GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
);

/// The verification keys, as configured: one `whsec_<base64>` secret (the prefix is
/// optional), or several separated by whitespace or commas while a secret rotates.
///
/// Holds the decoded key bytes (zeroed on drop); `Debug` never shows them.
pub struct WebhookSecrets {
    keys: Vec<SecretSlice<u8>>,
}

/// Why a configured secret was refused. Never contains any of the secret's text.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SecretError {
    /// Nothing but separators was configured.
    #[error("no webhook secret is configured")]
    Empty,
    /// More than [`MAX_SECRETS`] secrets.
    #[error("too many webhook secrets (at most {MAX_SECRETS})")]
    TooMany,
    /// A secret (1-based position in the list) is not base64 after `whsec_`.
    #[error("webhook secret #{position} is not valid base64 (after the optional whsec_ prefix)")]
    NotBase64 {
        /// 1-based position in the configured list.
        position: usize,
    },
    /// A secret decodes to fewer than [`MIN_KEY_LEN`] bytes.
    #[error("webhook secret #{position} is too short (decodes to fewer than {MIN_KEY_LEN} bytes)")]
    TooShort {
        /// 1-based position in the configured list.
        position: usize,
    },
}

impl WebhookSecrets {
    /// Parses the configured value: `whsec_<base64>`, several of them separated by
    /// whitespace or commas for rotation. A secret without the prefix is taken both as
    /// base64 and as its own bytes (see below).
    pub fn parse(configured: &str) -> Result<Self, SecretError> {
        let mut keys = Vec::new();
        for (index, secret) in configured
            .split(|c: char| c == ',' || c.is_ascii_whitespace())
            .filter(|part| !part.is_empty())
            .enumerate()
        {
            let position = index + 1;
            if position > MAX_SECRETS {
                return Err(SecretError::TooMany);
            }
            let Some(encoded) = secret.strip_prefix(SECRET_PREFIX) else {
                // Without the prefix the two official implementations disagree: the
                // `standardwebhooks` package base64-decodes the secret anyway, the `openai`
                // SDK (`lib/_webhooks.py`) uses its UTF-8 bytes as the key. Both keys are
                // kept, so a signature either of them makes is accepted.
                let raw = secret.as_bytes().to_vec();
                let decoded = LENIENT_STANDARD
                    .decode(secret)
                    .ok()
                    .filter(|key| key.len() >= MIN_KEY_LEN);
                if raw.len() < MIN_KEY_LEN && decoded.is_none() {
                    return Err(SecretError::TooShort { position });
                }
                if raw.len() >= MIN_KEY_LEN {
                    keys.push(SecretSlice::from(raw));
                }
                keys.extend(decoded.map(SecretSlice::from));
                continue;
            };
            // The decoder's own error names the offending byte; it is dropped on purpose.
            let key = LENIENT_STANDARD
                .decode(encoded)
                .map_err(|_| SecretError::NotBase64 { position })?;
            let key = SecretSlice::from(key);
            if key.expose_secret().len() < MIN_KEY_LEN {
                return Err(SecretError::TooShort { position });
            }
            keys.push(key);
        }
        if keys.is_empty() {
            return Err(SecretError::Empty);
        }
        Ok(Self { keys })
    }

    /// How many keys are configured (an unprefixed secret can give two).
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    /// Always false: parsing refuses an empty list.
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }
}

impl fmt::Debug for WebhookSecrets {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WebhookSecrets")
            .field("count", &self.keys.len())
            .field("keys", &format_args!("[redacted]"))
            .finish()
    }
}

/// What a successful verification vouches for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verified {
    /// The `webhook-id` (the same on every retry of one message).
    pub webhook_id: String,
    /// The `webhook-timestamp`, unix seconds.
    pub timestamp: i64,
}

/// Why a webhook was refused. Messages name what is wrong and never include a secret or
/// a signature.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum VerifyError {
    /// A header is absent, empty, or not readable as text.
    #[error("missing {0} header")]
    MissingHeader(&'static str),
    /// A header is longer than this verifier accepts.
    #[error("{0} header is too long")]
    HeaderTooLong(&'static str),
    /// `webhook-timestamp` is not a non-negative integer number of seconds.
    #[error("webhook-timestamp is not an integer number of unix seconds")]
    BadTimestamp,
    /// The timestamp is further in the past than the tolerance.
    #[error("webhook-timestamp is too old")]
    TooOld,
    /// The timestamp is further in the future than the tolerance.
    #[error("webhook-timestamp is too far in the future")]
    TooNew,
    /// `webhook-signature` holds no `v1` entry among those examined.
    #[error("webhook-signature has no v1 signature")]
    NoV1Signature,
    /// No `v1` entry matches the body under any configured secret.
    #[error("no webhook signature matches")]
    NoMatchingSignature,
}

/// Verifies a Standard Webhooks delivery over its raw `body`.
///
/// `header` looks a header up by its lower-case name (`webhook-id`, …) and returns its
/// value, e.g. `|name| headers.get(name).and_then(|v| v.to_str().ok())` for an
/// `http::HeaderMap`. `now_unix` is the current time in unix seconds; `tolerance_secs`
/// is how far the timestamp may be from it either way (normally
/// [`DEFAULT_TOLERANCE_SECS`]; a negative value counts as zero).
///
/// Checks, cheapest first: the headers are present and not too long, the timestamp is an
/// integer within the tolerance, then any of the first [`MAX_SIGNATURE_ENTRIES`] `v1`
/// entries matches under any configured secret (compared in constant time). Entries of
/// other versions, and malformed entries, are skipped.
pub fn verify<'h>(
    secrets: &WebhookSecrets,
    header: impl Fn(&str) -> Option<&'h str>,
    body: &[u8],
    now_unix: i64,
    tolerance_secs: i64,
) -> Result<Verified, VerifyError> {
    let id = required(&header, HEADER_ID, MAX_ID_LEN)?;
    let raw_timestamp = required(&header, HEADER_TIMESTAMP, MAX_TIMESTAMP_LEN)?;
    let signatures = required(&header, HEADER_SIGNATURE, MAX_SIGNATURE_HEADER_LEN)?;

    let timestamp = parse_timestamp(raw_timestamp)?;
    let tolerance = i128::from(tolerance_secs.max(0));
    let age = i128::from(now_unix) - i128::from(timestamp);
    if age > tolerance {
        return Err(VerifyError::TooOld);
    }
    if -age > tolerance {
        return Err(VerifyError::TooNew);
    }

    let mut any_v1 = false;
    let mut candidates: Vec<[u8; TAG_LEN]> = Vec::new();
    for entry in signatures
        .split_ascii_whitespace()
        .take(MAX_SIGNATURE_ENTRIES)
    {
        let Some((version, encoded)) = entry.split_once(',') else {
            continue;
        };
        if version != "v1" {
            continue;
        }
        any_v1 = true;
        // A malformed entry is skipped; it must not stop the others being tried.
        if let Some(tag) = decode_tag(encoded) {
            candidates.push(tag);
        }
    }
    if !any_v1 {
        return Err(VerifyError::NoV1Signature);
    }

    for key in &secrets.keys {
        let mac = signed_content_mac(key.expose_secret(), id, timestamp, body);
        for candidate in &candidates {
            // `verify_slice` compares in constant time.
            if mac.clone().verify_slice(candidate).is_ok() {
                return Ok(Verified {
                    webhook_id: id.to_owned(),
                    timestamp,
                });
            }
        }
    }
    Err(VerifyError::NoMatchingSignature)
}

/// Signs like a sender does: returns the `v1,<base64>` entry for `webhook-signature`.
/// `key` is the decoded key (the bytes after `whsec_`, base64-decoded). Used by tests and
/// the local stack.
pub fn sign(key: &[u8], webhook_id: &str, timestamp: i64, body: &[u8]) -> String {
    let tag = signed_content_mac(key, webhook_id, timestamp, body).finalize();
    format!("v1,{}", STANDARD.encode(tag.into_bytes()))
}

/// The header's value if present, non-empty and at most `max_len` bytes.
fn required<'h>(
    header: &impl Fn(&str) -> Option<&'h str>,
    name: &'static str,
    max_len: usize,
) -> Result<&'h str, VerifyError> {
    match header(name) {
        None | Some("") => Err(VerifyError::MissingHeader(name)),
        Some(value) if value.len() > max_len => Err(VerifyError::HeaderTooLong(name)),
        Some(value) => Ok(value),
    }
}

/// Unix seconds as ASCII digits (surrounding whitespace tolerated), no sign, no fraction.
fn parse_timestamp(raw: &str) -> Result<i64, VerifyError> {
    let digits = raw.trim_ascii();
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return Err(VerifyError::BadTimestamp);
    }
    digits.parse().map_err(|_| VerifyError::BadTimestamp)
}

/// A `v1` entry's tag, if it is exactly a base64-encoded 32-byte value.
fn decode_tag(encoded: &str) -> Option<[u8; TAG_LEN]> {
    if encoded.len() != TAG_B64_LEN {
        return None;
    }
    let decoded = STANDARD.decode(encoded).ok()?;
    decoded.try_into().ok()
}

/// HMAC-SHA256 under `key` over `"{id}.{timestamp}.{body}"`, not yet finalised.
fn signed_content_mac(key: &[u8], id: &str, timestamp: i64, body: &[u8]) -> HmacSha256 {
    // HMAC is defined for keys of every length: this never fails.
    let mut mac = HmacSha256::new_from_slice(key).expect("HMAC accepts keys of any length");
    mac.update(id.as_bytes());
    mac.update(b".");
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    mac
}
