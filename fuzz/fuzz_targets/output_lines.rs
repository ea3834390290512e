//! Fuzzes a batch's output file: line parsing, answer validation and the whole harvest.
//! What it checks: `shotlabel_fuzz::output_lines`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    shotlabel_fuzz::output_lines(data);
});
