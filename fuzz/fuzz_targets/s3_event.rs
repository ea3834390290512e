//! Fuzzes S3 event notifications: parsing, key decoding and enqueueing.
//! What it checks: `shotlabel_fuzz::s3_event`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = shotlabel_fuzz::s3_event(data);
});
