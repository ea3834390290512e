//! Fuzzes image preparation (decode limits, orientation, flattening, downscaling, JPEG).
//! What it checks: `shotlabel_fuzz::prepare`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = shotlabel_fuzz::prepare(data);
});
