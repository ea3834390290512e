//! Preparation: `shotlabel prep` against the original notebook's Python path and against
//! the time it takes just to decode the same images; where the time goes per stage; and
//! what the JPEG costs in fidelity (PSNR).

use std::io::Cursor;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use image::codecs::jpeg::JpegEncoder;
use image::imageops::FilterType;
use image::{DynamicImage, ExtendedColorType, RgbImage};
use shotlabel_core::prepare::{
    DecodeLimits, JpegSettings, data_uri, decode, encode_jpeg, encode_jpeg_with, fit_within,
    flatten_to_rgb, prepare_jpeg,
};
use shotlabel_core::request::{request_line, request_line_with_jpeg};
use shotlabel_core::task::Task;

use crate::common::{header, load, median, screenshots, workspace};

/// The placeholder URL the notebook script fills in.
const PLACEHOLDER: &str = "__IMAGE_DATA_URI__";

#[derive(Debug, clap::Args)]
pub struct PrepArgs {
    /// How many copies of the 12 fixture screenshots make the corpus.
    #[arg(long, default_value_t = 4)]
    repeat: usize,
    /// Timed runs of `shotlabel prep`, the decode floor and the two-process notebook path
    /// (interleaved; the median is reported).
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Timed runs of the single-process notebook path (0 skips it).
    #[arg(long, default_value_t = 1)]
    single_runs: usize,
    /// The `shotlabel` binary (default: next to this one).
    #[arg(long)]
    shotlabel: Option<PathBuf>,
    /// The Python with the pinned Pillow (default: the project's .venv).
    #[arg(long)]
    python: Option<PathBuf>,
}

/// One summary line: `images N lines N bytes N failed N seconds S`.
#[derive(Debug, Clone, Copy, Default)]
struct Summary {
    images: u64,
    lines: u64,
    bytes: u64,
    failed: u64,
    seconds: f64,
}

impl Summary {
    fn parse(stdout: &str) -> anyhow::Result<Self> {
        let line = stdout
            .lines()
            .rev()
            .find(|l| l.starts_with("images "))
            .with_context(|| format!("no summary line in {stdout:?}"))?;
        let words: Vec<&str> = line.split_whitespace().collect();
        let field = |name: &str| -> anyhow::Result<&str> {
            words
                .iter()
                .position(|w| *w == name)
                .and_then(|i| words.get(i + 1))
                .copied()
                .with_context(|| format!("no {name} in {line:?}"))
        };
        Ok(Self {
            images: field("images")?.parse()?,
            lines: field("lines")?.parse()?,
            bytes: field("bytes")?.parse()?,
            failed: field("failed")?.parse()?,
            seconds: field("seconds")?.parse()?,
        })
    }

    fn per_second(&self) -> f64 {
        self.images as f64 / self.seconds
    }

    fn bytes_per_line(&self) -> f64 {
        self.bytes as f64 / self.lines.max(1) as f64
    }
}

fn run_summary(command: &mut Command) -> anyhow::Result<Summary> {
    let output = command
        .output()
        .with_context(|| format!("cannot run {command:?}"))?;
    anyhow::ensure!(
        output.status.success(),
        "{command:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let summary = Summary::parse(&String::from_utf8_lossy(&output.stdout))?;
    anyhow::ensure!(summary.failed == 0, "{command:?}: {summary:?}");
    Ok(summary)
}

/// The corpus: `repeat` copies of the fixture screenshots in a fresh folder.
fn corpus(dir: &Path, repeat: usize) -> anyhow::Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    for round in 0..repeat {
        for path in screenshots()? {
            let name = path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            let copy = dir.join(format!("{round:03}-{name}"));
            std::fs::copy(&path, &copy)?;
            files.push(copy);
        }
    }
    files.sort();
    Ok(files)
}

/// Reads and decodes every file with the preparation's own decoder, on `threads` threads:
/// the floor, since every pixel must be read once.
fn decode_floor(files: &[PathBuf], threads: usize) -> anyhow::Result<Duration> {
    let limits = DecodeLimits::default();
    let next = AtomicUsize::new(0);
    let started = Instant::now();
    std::thread::scope(|scope| -> anyhow::Result<()> {
        let workers: Vec<_> = (0..threads)
            .map(|_| {
                scope.spawn(|| -> anyhow::Result<u64> {
                    let mut pixels = 0u64;
                    while let Some(path) = files.get(next.fetch_add(1, Ordering::Relaxed)) {
                        let bytes = std::fs::read(path)?;
                        let decoded = decode(&bytes, &limits)?;
                        pixels += u64::from(decoded.image.width() * decoded.image.height());
                    }
                    Ok(pixels)
                })
            })
            .collect();
        for worker in workers {
            std::hint::black_box(
                worker
                    .join()
                    .map_err(|_| anyhow::anyhow!("a decode thread panicked"))??,
            );
        }
        Ok(())
    })?;
    Ok(started.elapsed())
}

fn sibling_binary(name: &str) -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let path = exe.with_file_name(name);
    anyhow::ensure!(
        path.is_file(),
        "{} is missing: build it first (cargo build --release -p shotlabel-cli)",
        path.display()
    );
    Ok(path)
}

pub fn prep_vs_notebook(args: &PrepArgs) -> anyhow::Result<()> {
    header("preparation: shotlabel prep vs the notebook's Python path vs decode only");
    let shotlabel = match &args.shotlabel {
        Some(path) => path.clone(),
        None => sibling_binary("shotlabel")?,
    };
    let python = args
        .python
        .clone()
        .unwrap_or_else(|| workspace().join(".venv/bin/python"));
    let script = workspace().join("bench/notebook_path.py");
    let threads = std::thread::available_parallelism().map_or(2, |n| n.get());

    let dir = tempfile::tempdir()?;
    let images = dir.path().join("images");
    std::fs::create_dir(&images)?;
    let files = corpus(&images, args.repeat)?;
    let task = Task::default_task()?;
    let template: serde_json::Value =
        serde_json::from_slice(&request_line("notebook-0", &task, PLACEHOLDER))?;
    let template_path = dir.path().join("template.json");
    std::fs::write(&template_path, serde_json::to_vec(&template)?)?;
    let rust_out = dir.path().join("rust.jsonl");
    let python_out = dir.path().join("python.jsonl");
    println!(
        "corpus: {} images ({} copies of the {} fixture screenshots), {} threads",
        files.len(),
        args.repeat,
        files.len() / args.repeat.max(1),
        threads
    );
    // Warm the page cache so no one pays for the first read.
    decode_floor(&files, threads)?;

    let python_cmd = |processes: usize| {
        let mut command = Command::new(&python);
        command
            .arg(&script)
            .arg("--template")
            .arg(&template_path)
            .arg("--out")
            .arg(&python_out)
            .arg("--processes")
            .arg(processes.to_string())
            .args(&files);
        command
    };
    let mut floor = Vec::new();
    let mut rust = Vec::new();
    let mut python2 = Vec::new();
    let mut loads = Vec::new();
    for run in 0..args.runs.max(1) {
        loads.push(load());
        floor.push(decode_floor(&files, threads)?);
        let summary = run_summary(
            Command::new(&shotlabel)
                .arg("prep")
                .arg(&images)
                .arg("--out")
                .arg(&rust_out),
        )?;
        rust.push(summary);
        python2.push(run_summary(&mut python_cmd(threads))?);
        println!(
            "run {}: decode {:.3} s, shotlabel prep {:.3} s, notebook x{threads} {:.3} s (load {})",
            run + 1,
            floor[run].as_secs_f64(),
            rust[run].seconds,
            python2[run].seconds,
            loads[run]
        );
    }
    let mut python1 = Vec::new();
    for _ in 0..args.single_runs {
        let summary = run_summary(&mut python_cmd(1))?;
        println!("notebook x1 {:.3} s (load {})", summary.seconds, load());
        python1.push(summary);
    }

    let pick = |runs: &[Summary]| -> Summary {
        let mut sorted = runs.to_vec();
        sorted.sort_by(|a, b| a.seconds.total_cmp(&b.seconds));
        sorted.get(sorted.len() / 2).copied().unwrap_or_default()
    };
    let rust = pick(&rust);
    let python2 = pick(&python2);
    let floor = median(&floor).as_secs_f64();
    let n = files.len() as f64;
    println!();
    println!("| path | seconds (median) | images/s | bytes/line |");
    println!("| --- | ---: | ---: | ---: |");
    println!(
        "| decode only (Rust, {threads} threads) | {floor:.3} | {:.1} | |",
        n / floor
    );
    println!(
        "| `shotlabel prep` ({threads} threads) | {:.3} | {:.1} | {:.0} |",
        rust.seconds,
        rust.per_second(),
        rust.bytes_per_line()
    );
    println!(
        "| notebook path, {threads} processes | {:.3} | {:.2} | {:.0} |",
        python2.seconds,
        python2.per_second(),
        python2.bytes_per_line()
    );
    if !python1.is_empty() {
        let python1 = pick(&python1);
        println!(
            "| notebook path, 1 process (as it ran) | {:.3} | {:.2} | {:.0} |",
            python1.seconds,
            python1.per_second(),
            python1.bytes_per_line()
        );
        println!();
        println!(
            "throughput vs the notebook as it ran (1 process): {:.1}x",
            rust.per_second() / python1.per_second()
        );
    }
    println!(
        "throughput vs the notebook on the same {threads} cores: {:.1}x (goal >= 20x)",
        rust.per_second() / python2.per_second()
    );
    println!(
        "prep time / decode-only time: {:.2} (goal <= 1.5)",
        rust.seconds / floor
    );
    println!(
        "bytes per line: notebook / shotlabel = {:.1}x smaller (goal >= 10x)",
        python2.bytes_per_line() / rust.bytes_per_line()
    );
    println!("load after: {}", load());
    Ok(())
}

#[derive(Debug, clap::Args)]
pub struct ProfileArgs {
    /// How many copies of the fixture screenshots to run through.
    #[arg(long, default_value_t = 4)]
    repeat: usize,
}

/// Per-stage totals over the corpus.
#[derive(Debug, Default, Clone, Copy)]
struct Stages {
    read: Duration,
    decode: Duration,
    flatten: Duration,
    resize: Duration,
    encode: Duration,
    line: Duration,
    line_bytes: usize,
}

impl Stages {
    fn total(&self) -> Duration {
        self.read + self.decode + self.flatten + self.resize + self.encode + self.line
    }
}

fn time<T>(total: &mut Duration, f: impl FnOnce() -> T) -> T {
    let started = Instant::now();
    let out = f();
    *total += started.elapsed();
    out
}

/// The preparation before this benchmark's optimisations, kept here as the "before":
/// the image crate's CatmullRom resize and JPEG encoder, and the request line as a JSON
/// tree serialised per image around a data URI string.
fn baseline_resize(image: RgbImage, max_side: u32) -> RgbImage {
    let (width, height) = image.dimensions();
    let longest = width.max(height);
    if longest <= max_side {
        return image;
    }
    let scale = f64::from(max_side) / f64::from(longest);
    let new_width = ((f64::from(width) * scale).round() as u32).clamp(1, max_side);
    let new_height = ((f64::from(height) * scale).round() as u32).clamp(1, max_side);
    DynamicImage::ImageRgb8(image)
        .resize_exact(new_width, new_height, FilterType::CatmullRom)
        .into_rgb8()
}

fn baseline_encode(rgb: &RgbImage, quality: u8) -> anyhow::Result<Vec<u8>> {
    let mut jpeg = Vec::with_capacity(rgb.as_raw().len() / 8);
    JpegEncoder::new_with_quality(&mut jpeg, quality).encode(
        rgb.as_raw(),
        rgb.width(),
        rgb.height(),
        ExtendedColorType::Rgb8,
    )?;
    Ok(jpeg)
}

fn baseline_line(custom_id: &str, task: &Task, jpeg: &[u8]) -> Vec<u8> {
    let uri = data_uri(jpeg);
    serde_json::json!({
        "custom_id": custom_id,
        "method": "POST",
        "url": shotlabel_core::request::CHAT_COMPLETIONS,
        "body": task.chat_completion_body(&uri),
    })
    .to_string()
    .into_bytes()
}

pub fn profile(args: &ProfileArgs) -> anyhow::Result<()> {
    header("preparation stages, one thread");
    let task = Task::default_task()?;
    let settings = task.image().clone();
    let limits = DecodeLimits::default();
    let files: Vec<PathBuf> = (0..args.repeat.max(1))
        .flat_map(|_| screenshots().unwrap_or_default())
        .collect();
    let mut current = Stages::default();
    let mut baseline = Stages::default();
    for (i, path) in files.iter().enumerate() {
        let id = format!("p-{i}");
        for (stages, is_baseline) in [(&mut current, false), (&mut baseline, true)] {
            let bytes = time(&mut stages.read, || std::fs::read(path))?;
            let decoded = time(&mut stages.decode, || decode(&bytes, &limits))?;
            let rgb = time(&mut stages.flatten, || flatten_to_rgb(decoded.image));
            let line = if is_baseline {
                let small = time(&mut stages.resize, || {
                    baseline_resize(rgb, settings.max_side)
                });
                let jpeg = time(&mut stages.encode, || {
                    baseline_encode(&small, settings.jpeg_quality)
                })?;
                time(&mut stages.line, || baseline_line(&id, &task, &jpeg))
            } else {
                let small = time(&mut stages.resize, || fit_within(rgb, settings.max_side));
                let jpeg = time(&mut stages.encode, || {
                    encode_jpeg(&small, settings.jpeg_quality)
                })?;
                time(&mut stages.line, || {
                    request_line_with_jpeg(&id, &task, &jpeg)
                })
            };
            stages.line_bytes += line.len() + 1;
        }
    }
    let n = files.len() as f64;
    let ms = |d: Duration| d.as_secs_f64() * 1000.0 / n;
    println!(
        "{} images ({} copies of the fixture screenshots); milliseconds per image",
        files.len(),
        args.repeat
    );
    println!();
    println!("| stage | before | now |");
    println!("| --- | ---: | ---: |");
    for (name, pick) in [
        (
            "read file",
            (|s: &Stages| s.read) as fn(&Stages) -> Duration,
        ),
        ("decode (PNG)", |s| s.decode),
        ("flatten to RGB", |s| s.flatten),
        ("resize to 896", |s| s.resize),
        ("JPEG q85", |s| s.encode),
        ("base64 + JSON line", |s| s.line),
        ("total", Stages::total),
    ] {
        println!(
            "| {name} | {:.2} | {:.2} |",
            ms(pick(&baseline)),
            ms(pick(&current))
        );
    }
    println!(
        "| bytes per line | {:.0} | {:.0} |",
        baseline.line_bytes as f64 / n,
        current.line_bytes as f64 / n
    );
    println!("load after: {}", load());
    Ok(())
}

/// Peak signal-to-noise ratio of two same-sized RGB images, in dB.
fn psnr(a: &RgbImage, b: &RgbImage) -> f64 {
    let sum: f64 = a
        .as_raw()
        .iter()
        .zip(b.as_raw())
        .map(|(x, y)| {
            let d = f64::from(*x) - f64::from(*y);
            d * d
        })
        .sum();
    let mse = sum / a.as_raw().len() as f64;
    if mse == 0.0 {
        f64::INFINITY
    } else {
        10.0 * (255.0 * 255.0 / mse).log10()
    }
}

#[derive(Debug, clap::Args)]
pub struct PsnrArgs {
    /// Also sweep JPEG quality and chroma subsampling: bytes against PSNR, to choose a
    /// task's `jpeg_quality` (the task file decides; this only measures).
    #[arg(long)]
    sweep: bool,
    /// Write the sweep's JPEGs and the references to this folder, to check them with
    /// another decoder.
    #[arg(long)]
    dump: Option<PathBuf>,
}

pub fn psnr_report(args: &PsnrArgs) -> anyhow::Result<()> {
    header("fidelity: the 896-px JPEG against an exact 896-px resize");
    println!(
        "reference: the decoded screenshot resized with the image crate's Lanczos3 \
         (f32, independent of the preparation's resizer), as the model would resize the \
         notebook's lossless full-size PNG"
    );
    let task = Task::default_task()?;
    let settings = task.image().clone();
    let limits = DecodeLimits::default();
    println!();
    println!(
        "| screenshot | source | sent | JPEG bytes | line bytes | PSNR resize only (dB) | PSNR sent JPEG (dB) | PSNR before (dB) |"
    );
    println!("| --- | --- | --- | ---: | ---: | ---: | ---: | ---: |");
    let mut sent_all = Vec::new();
    let mut before_all = Vec::new();
    for path in screenshots()? {
        let bytes = std::fs::read(&path)?;
        let rgb = flatten_to_rgb(decode(&bytes, &limits)?.image);
        let (source_w, source_h) = rgb.dimensions();
        let prepared = prepare_jpeg(&bytes, &settings, &limits)?;
        let (w, h) = (prepared.width, prepared.height);
        let reference = image::imageops::resize(&rgb, w, h, FilterType::Lanczos3);
        let resized = fit_within(rgb.clone(), settings.max_side);
        let sent = image::load_from_memory_with_format(&prepared.jpeg, image::ImageFormat::Jpeg)?
            .into_rgb8();
        let before_jpeg = baseline_encode(
            &baseline_resize(rgb, settings.max_side),
            settings.jpeg_quality,
        )?;
        let before =
            image::ImageReader::with_format(Cursor::new(&before_jpeg), image::ImageFormat::Jpeg)
                .decode()?
                .into_rgb8();
        let line = request_line_with_jpeg("s-0", &task, &prepared.jpeg);
        let (p_resize, p_sent, p_before) = (
            psnr(&resized, &reference),
            psnr(&sent, &reference),
            psnr(&before, &reference),
        );
        sent_all.push(p_sent);
        before_all.push(p_before);
        println!(
            "| {} | {source_w}x{source_h} | {w}x{h} | {} | {} | {p_resize:.2} | {p_sent:.2} | {p_before:.2} |",
            path.file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default(),
            prepared.jpeg.len(),
            line.len() + 1,
        );
    }
    let stats = |v: &[f64]| {
        let min = v.iter().copied().fold(f64::INFINITY, f64::min);
        let mean = v.iter().sum::<f64>() / v.len().max(1) as f64;
        (min, mean)
    };
    let (min, mean) = stats(&sent_all);
    let (before_min, before_mean) = stats(&before_all);
    println!();
    println!("sent JPEG: min {min:.2} dB, mean {mean:.2} dB (goal >= 35 dB)");
    println!(
        "before (image crate resize + encoder): min {before_min:.2} dB, mean {before_mean:.2} dB"
    );
    if args.sweep {
        sweep(&task, args.dump.as_deref())?;
    }
    Ok(())
}

/// JPEG settings against bytes and PSNR, over the fixture screenshots.
fn sweep(task: &Task, dump: Option<&Path>) -> anyhow::Result<()> {
    let settings = task.image();
    let limits = DecodeLimits::default();
    let mut images = Vec::new();
    for path in screenshots()? {
        let rgb = flatten_to_rgb(decode(&std::fs::read(&path)?, &limits)?.image);
        let resized = fit_within(rgb.clone(), settings.max_side);
        let reference = image::imageops::resize(
            &rgb,
            resized.width(),
            resized.height(),
            FilterType::Lanczos3,
        );
        images.push((resized, reference));
    }
    println!();
    println!(
        "| JPEG settings | mean JPEG bytes | mean line bytes | PSNR min (dB) | PSNR mean (dB) | encode ms/image |"
    );
    println!("| --- | ---: | ---: | ---: | ---: | ---: |");
    for quality in [60u8, 70, 75, 80, 85, 90] {
        // (settings, name, jpeg-encoder instead of the encoder the submitter uses)
        let full = JpegSettings::sent(quality);
        let half = JpegSettings {
            full_chroma: false,
            ..full
        };
        let variants: Vec<(JpegSettings, &str, bool)> = if quality == settings.jpeg_quality {
            vec![
                (full, "4:4:4", false),
                (
                    JpegSettings {
                        optimize_huffman: true,
                        ..full
                    },
                    "4:4:4 optimised Huffman tables",
                    false,
                ),
                (half, "4:2:0", false),
                (full, "4:4:4 jpeg-encoder (pure Rust, before)", true),
            ]
        } else {
            vec![(full, "4:4:4", false), (half, "4:2:0", false)]
        };
        for (jpeg_settings, name, pure_rust) in variants {
            let mut bytes = 0usize;
            let mut line_bytes = 0usize;
            let mut psnrs = Vec::new();
            let mut encode = Duration::ZERO;
            for (resized, reference) in &images {
                let started = Instant::now();
                let jpeg = if pure_rust {
                    encode_pure_rust(resized, quality)?
                } else {
                    encode_jpeg_with(resized, &jpeg_settings)?
                };
                encode += started.elapsed();
                let sent = image::load_from_memory_with_format(&jpeg, image::ImageFormat::Jpeg)?
                    .into_rgb8();
                psnrs.push(psnr(&sent, reference));
                if let Some(dir) = dump {
                    let name = format!(
                        "q{quality}-{}-{}.jpg",
                        name.replace([' ', ':'], "_"),
                        psnrs.len()
                    );
                    std::fs::write(dir.join(name), &jpeg)?;
                    reference.save(dir.join(format!("reference-{}.png", psnrs.len())))?;
                }
                line_bytes += request_line_with_jpeg("s-0", task, &jpeg).len() + 1;
                bytes += jpeg.len();
            }
            let n = images.len();
            let marker = if quality == settings.jpeg_quality && name == "4:4:4" {
                " (the task's, as sent)"
            } else {
                ""
            };
            println!(
                "| q{quality} {name}{marker} | {} | {} | {:.2} | {:.2} | {:.2} |",
                bytes / n,
                line_bytes / n,
                psnrs.iter().copied().fold(f64::INFINITY, f64::min),
                psnrs.iter().sum::<f64>() / n as f64,
                encode.as_secs_f64() * 1000.0 / n as f64
            );
        }
    }
    Ok(())
}

/// The JPEG encoder the submitter used before mozjpeg (jpeg-encoder, AVX2), with the same
/// settings as [`JpegSettings::sent`], for comparison.
fn encode_pure_rust(rgb: &RgbImage, quality: u8) -> anyhow::Result<Vec<u8>> {
    let mut jpeg = Vec::new();
    let mut encoder = jpeg_encoder::Encoder::new(&mut jpeg, quality);
    encoder.set_sampling_factor(jpeg_encoder::SamplingFactor::F_1_1);
    encoder.set_optimized_huffman_tables(false);
    encoder.encode(
        rgb.as_raw(),
        u16::try_from(rgb.width())?,
        u16::try_from(rgb.height())?,
        jpeg_encoder::ColorType::Rgb,
    )?;
    Ok(jpeg)
}
