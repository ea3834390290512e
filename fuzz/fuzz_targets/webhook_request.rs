//! Fuzzes the webhook receiver: method, query, headers and body.
//! What it checks: `shotlabel_fuzz::webhook_request`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    shotlabel_fuzz::webhook_request(data);
});
