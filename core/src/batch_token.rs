//! Per-batch webhook URLs: providers such as Inference.net call a URL given when the batch
//! is created and sign nothing, so the URL itself carries an unguessable token — an HMAC
//! of the batch's manifest name under the webhook secret.

use hmac::{Hmac, Mac};
use sha2::Sha256;
use url::Url;

type HmacSha256 = Hmac<Sha256>;

/// The query parameters of a per-batch webhook URL.
pub const MANIFEST_PARAM: &str = "manifest";
pub const TOKEN_PARAM: &str = "token";

/// 128 bits of the HMAC, as 32 hex digits: unguessable and short enough for any URL.
const TOKEN_BYTES: usize = 16;

fn mac(secret: &[u8], manifest: &str) -> HmacSha256 {
    // HMAC accepts keys of any length, so this cannot fail.
    let mut mac = <HmacSha256 as Mac>::new_from_slice(secret)
        .unwrap_or_else(|_| unreachable!("HMAC takes keys of any length"));
    mac.update(b"shotlabel batch webhook v1\n");
    mac.update(manifest.as_bytes());
    mac
}

/// The token for one batch's webhook URL.
pub fn token(secret: &[u8], manifest: &str) -> String {
    let tag = mac(secret, manifest).finalize().into_bytes();
    hex::encode(&tag[..TOKEN_BYTES])
}

/// Checks a token in constant time.
pub fn verify(secret: &[u8], manifest: &str, token: &str) -> bool {
    if token.len() != TOKEN_BYTES * 2 {
        return false;
    }
    let Ok(tag) = hex::decode(token) else {
        return false;
    };
    mac(secret, manifest).verify_truncated_left(&tag).is_ok()
}

/// `base` with the manifest name and its token added to the query.
pub fn webhook_url(base: &Url, secret: &[u8], manifest: &str) -> String {
    let mut url = base.clone();
    url.query_pairs_mut()
        .append_pair(MANIFEST_PARAM, manifest)
        .append_pair(TOKEN_PARAM, &token(secret, manifest));
    url.into()
}

/// The manifest name and token in a request's query string, if both are there.
pub fn from_query(query: &str) -> Option<(String, String)> {
    let mut manifest = None;
    let mut token = None;
    for (name, value) in url::form_urlencoded::parse(query.as_bytes()) {
        match name.as_ref() {
            MANIFEST_PARAM => manifest = Some(value.into_owned()),
            TOKEN_PARAM => token = Some(value.into_owned()),
            _ => {}
        }
    }
    Some((manifest?, token?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_verifies_only_for_its_manifest_and_secret() {
        let t = token(b"secret-one", "s1-0");
        assert_eq!(t.len(), 32);
        assert!(verify(b"secret-one", "s1-0", &t));
        assert!(!verify(b"secret-one", "s1-1", &t));
        assert!(!verify(b"secret-two", "s1-0", &t));
        assert!(!verify(b"secret-one", "s1-0", &t[..31]));
        assert!(!verify(b"secret-one", "s1-0", "zz"));
    }

    #[test]
    fn the_url_round_trips_through_the_query() {
        let base = Url::parse("https://example.invalid/hook?x=1").expect("url");
        let url = Url::parse(&webhook_url(&base, b"k", "s 1&-0")).expect("url");
        let (manifest, token) = from_query(url.query().unwrap_or_default()).expect("params");
        assert_eq!(manifest, "s 1&-0");
        assert!(verify(b"k", &manifest, &token));
    }
}
