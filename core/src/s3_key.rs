//! Object keys as S3 event notifications carry them.
//!
//! S3 URL-encodes keys in events: `+` stands for a space and everything else is
//! percent-encoded (moto also encodes `/` as `%2F`). So `+` is turned into a space first,
//! and only then are `%XX` sequences decoded, which keeps a literal `+` (sent as `%2B`).

use std::borrow::Cow;

/// Why an event's key could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    #[error("the object key {raw:?} does not decode to UTF-8")]
    NotUtf8 { raw: String },
    #[error("the object key is empty")]
    Empty,
}

/// Decodes a key from an S3 event notification into the object's real key.
pub fn decode_event_key(raw: &str) -> Result<String, KeyError> {
    if raw.is_empty() {
        return Err(KeyError::Empty);
    }
    let spaced: Cow<'_, str> = if raw.contains('+') {
        Cow::Owned(raw.replace('+', " "))
    } else {
        Cow::Borrowed(raw)
    };
    percent_encoding::percent_decode_str(&spaced)
        .decode_utf8()
        .map(Cow::into_owned)
        .map_err(|_| KeyError::NotUtf8 {
            raw: raw.to_owned(),
        })
}
