//! What every benchmark needs: the fixture screenshots and distinct variants of them,
//! the machine and its load, peak memory, and simple statistics.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;

/// The workspace root (the bench crate's parent).
pub fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The fixture screenshots, `tests/data/screenshots/*.png`, sorted.
pub fn screenshots() -> anyhow::Result<Vec<PathBuf>> {
    let dir = workspace().join("tests/data/screenshots");
    let mut paths: Vec<PathBuf> = std::fs::read_dir(&dir)
        .with_context(|| format!("cannot read {}", dir.display()))?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "png"))
        .collect();
    paths.sort();
    anyhow::ensure!(!paths.is_empty(), "no screenshots in {}", dir.display());
    Ok(paths)
}

/// The fixture screenshots' bytes, with their file names.
pub fn screenshot_bytes() -> anyhow::Result<Vec<(String, Vec<u8>)>> {
    screenshots()?
        .into_iter()
        .map(|path| {
            let name = path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            Ok((name, std::fs::read(&path)?))
        })
        .collect()
}

/// A PNG with the same pixels and different bytes: a `tEXt` chunk carrying `serial` goes
/// in right after `IHDR`, so every variant has its own etag (and its own S3 object)
/// without the cost of re-encoding pixels.
pub fn png_variant(png: &[u8], serial: u64) -> anyhow::Result<Vec<u8>> {
    const SIGNATURE: &[u8] = b"\x89PNG\r\n\x1a\n";
    anyhow::ensure!(png.starts_with(SIGNATURE), "not a PNG");
    // Signature (8), then IHDR: length (4), type (4), 13 bytes of data, CRC (4).
    let after_ihdr = 8 + 4 + 4 + 13 + 4;
    anyhow::ensure!(
        png.len() > after_ihdr && &png[12..16] == b"IHDR",
        "no IHDR chunk"
    );
    let mut data = b"shotlabel-bench\0".to_vec();
    data.extend_from_slice(serial.to_string().as_bytes());
    let mut chunk = b"tEXt".to_vec();
    chunk.extend_from_slice(&data);
    let mut out = Vec::with_capacity(png.len() + data.len() + 12);
    out.extend_from_slice(&png[..after_ihdr]);
    out.extend_from_slice(&(data.len() as u32).to_be_bytes());
    out.extend_from_slice(&chunk);
    out.extend_from_slice(&crc32(&chunk).to_be_bytes());
    out.extend_from_slice(&png[after_ihdr..]);
    Ok(out)
}

fn crc32(bytes: &[u8]) -> u32 {
    let mut crc = 0xFFFF_FFFFu32;
    for &b in bytes {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0xEDB8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

/// The 1, 5 and 15 minute load averages, as /proc/loadavg has them.
pub fn load() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|| "unknown".into())
}

/// CPU model and count, for the report header.
pub fn machine() -> String {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .map(|l| l.trim_start_matches([' ', '\t', ':']).trim().to_owned())
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    format!("{cores} cores, {model}")
}

/// This process's peak resident set size (VmHWM), in KiB.
pub fn peak_rss_kib() -> u64 {
    status_field("VmHWM:")
}

/// This process's current resident set size (VmRSS), in KiB.
pub fn rss_kib() -> u64 {
    status_field("VmRSS:")
}

fn status_field(name: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|v| v.split_whitespace().next())
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

/// The median of some durations (the upper one of an even count).
pub fn median(values: &[Duration]) -> Duration {
    let mut sorted = values.to_vec();
    sorted.sort();
    sorted.get(sorted.len() / 2).copied().unwrap_or_default()
}

pub fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

/// Prints the header every benchmark starts with.
pub fn header(what: &str) {
    println!("== {what}");
    println!("machine: {}", machine());
    println!("load before: {}", load());
}

/// Runs this binary's hidden child subcommand (its own process, so that its peak RSS is
/// its own) and reads the JSON report it prints as its last line.
pub async fn run_child<T: serde::de::DeserializeOwned>(
    mut command: tokio::process::Command,
    what: &str,
) -> anyhow::Result<T> {
    let output = command
        .stderr(std::process::Stdio::inherit())
        .output()
        .await?;
    anyhow::ensure!(output.status.success(), "the {what} child failed");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let last = stdout
        .lines()
        .last()
        .with_context(|| format!("the {what} child printed nothing"))?;
    Ok(serde_json::from_str(last)?)
}
