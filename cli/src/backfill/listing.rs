//! The bucket listed under the prefix, many LIST requests in flight.
//!
//! One `ListObjectsV2` listing is a chain of pages (each needs the previous page's token),
//! so a single listing of a billion keys is a million requests in a row. The keyspace below
//! the prefix is therefore cut into ranges at each digit and ASCII letter, and the ranges
//! are listed concurrently: each starts with `StartAfter` at its lower bound and stops at
//! the first key past its upper bound. The ranges cover every key exactly once, whatever
//! the keys look like; keys that start with other characters fall into a neighbouring
//! range. This does not depend on `/` in the keys: a flat keyspace of hashed names splits
//! as well as a tree of folders.

use futures_util::{Stream, StreamExt};

use super::Page;
use crate::stack::{Aws, Lister};

/// Where the keyspace below the prefix is cut: before each of these characters.
const CUTS: &[u8] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";

/// Keys under the prefix that are greater than `after` (when set) and at most `until`
/// (when set), in S3's order (UTF-8 bytes, which is how Rust compares strings).
#[derive(Debug, Clone, PartialEq, Eq)]
struct KeyRange {
    after: Option<String>,
    until: Option<String>,
}

impl KeyRange {
    fn holds(&self, key: &str) -> bool {
        self.after.as_deref().is_none_or(|a| key > a)
            && self.until.as_deref().is_none_or(|u| key <= u)
    }
}

/// The ranges that together hold every key under `prefix`, each key in exactly one.
fn ranges(prefix: &str) -> Vec<KeyRange> {
    let mut out = Vec::with_capacity(CUTS.len() + 1);
    let mut after = None;
    for cut in CUTS {
        let bound = format!("{prefix}{}", char::from(*cut));
        out.push(KeyRange {
            after: after.replace(bound.clone()),
            until: Some(bound),
        });
    }
    out.push(KeyRange { after, until: None });
    out
}

/// Every object under `prefix`, a page at a time, with up to `concurrency` ranges being
/// listed at once.
pub(crate) fn pages<'a>(
    aws: &'a Aws,
    bucket: &'a str,
    prefix: &'a str,
    concurrency: usize,
) -> impl Stream<Item = anyhow::Result<Page>> + 'a {
    futures_util::stream::iter(ranges(prefix))
        .map(move |range| Box::pin(range_pages(aws, bucket, prefix, range)))
        .flatten_unordered(concurrency)
}

/// One range's pages: listed from its lower bound, until a key passes its upper bound.
fn range_pages<'a>(
    aws: &'a Aws,
    bucket: &'a str,
    prefix: &'a str,
    range: KeyRange,
) -> impl Stream<Item = anyhow::Result<Page>> + 'a {
    let lister = Lister::new(aws, bucket, prefix).start_after(range.after.clone());
    futures_util::stream::try_unfold(
        (lister, range, false),
        |(mut lister, range, past_end)| async move {
            if past_end {
                return Ok(None);
            }
            let Some(listed) = lister.next_page().await? else {
                return Ok(None);
            };
            let before = listed.len();
            let objects: Vec<_> = listed
                .into_iter()
                .take_while(|o| range.holds(&o.key))
                .collect();
            let past_end = objects.len() < before;
            Ok(Some((
                Page {
                    objects,
                    skipped: 0,
                },
                (lister, range, past_end),
            )))
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_key_falls_in_exactly_one_range() {
        let ranges = ranges("incoming/");
        assert_eq!(ranges.len(), CUTS.len() + 1);
        assert_eq!(ranges[0].after, None);
        assert_eq!(ranges[0].until.as_deref(), Some("incoming/0"));
        assert_eq!(ranges[CUTS.len()].until, None);
        let keys = [
            "incoming/",
            "incoming/ space.png",
            "incoming/!",
            "incoming/0",
            "incoming/0a",
            "incoming/9/x.png",
            "incoming/:",
            "incoming/A",
            "incoming/Zz",
            "incoming/_under.png",
            "incoming/a",
            "incoming/a\u{0}",
            "incoming/m/2024/01/shot.png",
            "incoming/z",
            "incoming/zzzz",
            "incoming/~tilde",
            "incoming/é.png",
            "incoming/写真.png",
            "incoming/\u{10FFFF}",
        ];
        for key in keys {
            let holding = ranges.iter().filter(|r| r.holds(key)).count();
            assert_eq!(holding, 1, "{key:?} is in {holding} ranges");
        }
    }
}
