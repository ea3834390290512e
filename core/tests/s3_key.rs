//! Decoding keys from S3 event notifications (AWS and moto encodings).

use shotlabel_core::s3_key::{KeyError, decode_event_key};

#[test]
fn decodes_what_s3_and_moto_send() -> anyhow::Result<()> {
    for (raw, key) in [
        ("incoming/plain.png", "incoming/plain.png"),
        ("incoming/with+space.png", "incoming/with space.png"),
        ("incoming/a%2Bb.png", "incoming/a+b.png"),
        ("incoming%2Fnested%2Fdeep.png", "incoming/nested/deep.png"),
        (
            "incoming/%C3%BCn%C3%AFcode+%E2%9C%93.png",
            "incoming/ünïcode ✓.png",
        ),
        ("incoming/100%25.png", "incoming/100%.png"),
        ("incoming/%2B%2B+%2B.png", "incoming/++ +.png"),
        // A stray % that is not an escape stays as it is.
        ("incoming/50%off.png", "incoming/50%off.png"),
    ] {
        assert_eq!(decode_event_key(raw)?, key, "{raw}");
    }
    Ok(())
}

#[test]
fn refuses_empty_and_non_utf8_keys() {
    assert_eq!(decode_event_key(""), Err(KeyError::Empty));
    let err = decode_event_key("incoming/%FF%FE.png").expect_err("not UTF-8");
    assert!(err.to_string().contains("%FF%FE"), "{err}");
}
