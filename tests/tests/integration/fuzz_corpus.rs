//! Replays the fuzz corpus and every saved crash through the fuzz targets' own code, so
//! `make test` holds them without cargo-fuzz or a nightly compiler.
//!
//! The targets' bodies live in `fuzz/src/lib.rs`, included here as a module: each runs the
//! production code on one input and panics when something that must hold does not. Every
//! file under `fuzz/corpus/<target>/` and `fuzz/regressions/<target>/` goes through its
//! target; a few named inputs also have their outcome checked, so that a target that
//! silently stopped reaching the code it is meant to fuzz fails here.

#[path = "../../../fuzz/src/lib.rs"]
#[allow(dead_code)]
mod fuzz_entry;

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};

use anyhow::{Context, bail, ensure};
use fuzz_entry::TARGETS;
use shotlabel_core::prepare::PrepareError;

fn fuzz_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz")
}

/// Every file of `fuzz/<kind>/<target>/`, sorted; none when the folder does not exist.
fn inputs(kind: &str, target: &str) -> anyhow::Result<Vec<PathBuf>> {
    let dir = fuzz_dir().join(kind).join(target);
    if !dir.exists() {
        return Ok(Vec::new());
    }
    let mut files = Vec::new();
    for entry in std::fs::read_dir(&dir).with_context(|| format!("{}", dir.display()))? {
        let path = entry?.path();
        if path.is_file() {
            files.push(path);
        }
    }
    files.sort();
    Ok(files)
}

/// Runs one input through its target; `Err` with the panic's message if it panicked.
fn run(target: &str, data: &[u8]) -> Result<String, String> {
    let outcome = catch_unwind(AssertUnwindSafe(|| match target {
        "prepare_image" => format!(
            "{:?}",
            fuzz_entry::prepare(data).map(|p| (p.width, p.height))
        ),
        "output_lines" => format!("{:?}", fuzz_entry::output_lines(data)),
        "webhook_request" => format!("{:?}", fuzz_entry::webhook_request(data)),
        "s3_event" => format!("{:?}", fuzz_entry::s3_event(data)),
        other => panic!("no fuzz target {other}"),
    }));
    outcome.map_err(|panic| {
        panic
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| panic.downcast_ref::<&str>().map(|s| (*s).to_owned()))
            .unwrap_or_else(|| "a panic without a message".to_owned())
    })
}

#[test]
fn every_corpus_and_regression_input_passes_its_target() -> anyhow::Result<()> {
    let mut failures = Vec::new();
    for target in TARGETS {
        let corpus = inputs("corpus", target)?;
        ensure!(!corpus.is_empty(), "fuzz/corpus/{target}/ has no seeds");
        for path in corpus.iter().chain(&inputs("regressions", target)?) {
            let data = std::fs::read(path)?;
            if let Err(panic) = run(target, &data) {
                failures.push(format!("{target}: {}: {panic}", path.display()));
            }
        }
    }
    if !failures.is_empty() {
        bail!(
            "{} input(s) failed:\n{}",
            failures.len(),
            failures.join("\n")
        );
    }
    Ok(())
}

/// No folder of inputs names a target that does not exist (a typo would skip its inputs).
#[test]
fn input_folders_name_real_targets() -> anyhow::Result<()> {
    for kind in ["corpus", "regressions"] {
        let dir = fuzz_dir().join(kind);
        if !dir.exists() {
            continue;
        }
        for entry in std::fs::read_dir(&dir)? {
            let name = entry?.file_name().to_string_lossy().into_owned();
            ensure!(
                TARGETS.contains(&name.as_str()),
                "fuzz/{kind}/{name} is not a target"
            );
        }
    }
    Ok(())
}

fn read(kind: &str, target: &str, name: &str) -> anyhow::Result<Vec<u8>> {
    let path = fuzz_dir().join(kind).join(target).join(name);
    std::fs::read(&path).with_context(|| format!("{}", path.display()))
}

#[test]
fn prepare_seeds_reach_decoding_and_its_refusals() -> anyhow::Result<()> {
    for name in [
        "animated.gif",
        "cmyk.jpg",
        "docs-page.png",
        "geocities-home.gif",
        "gray16.png",
        "interlaced.png",
        "pixel.png",
        "saas-landing.png",
        "screenshot-lossless.webp",
        "screenshot.jpg",
        "screenshot.webp",
        "transparent.png",
    ] {
        let prepared = fuzz_entry::prepare(&read("corpus", "prepare_image", name)?);
        ensure!(prepared.is_ok(), "{name}: {prepared:?}");
    }
    // EXIF orientation 6 on a 48x77 JPEG: upright it is 77x48.
    let rotated = fuzz_entry::prepare(&read("corpus", "prepare_image", "rotated-exif.jpg")?)?;
    assert_eq!((rotated.source_width, rotated.source_height), (77, 48));
    // 8x1200 is over the task's 896-pixel side: downscaled.
    let tall = fuzz_entry::prepare(&read("corpus", "prepare_image", "tall-strip.png")?)?;
    assert_eq!((tall.width, tall.height), (6, 896));

    let refused = |name: &str| -> anyhow::Result<PrepareError> {
        match fuzz_entry::prepare(&read("corpus", "prepare_image", name)?) {
            Ok(prepared) => bail!("{name} was prepared: {prepared:?}"),
            Err(e) => Ok(e),
        }
    };
    assert_eq!(refused("empty.png")?, PrepareError::Empty);
    assert!(matches!(
        refused("not-an-image.png")?,
        PrepareError::UnsupportedFormat { .. }
    ));
    assert!(matches!(
        refused("truncated.png")?,
        PrepareError::Decode { format: "png", .. }
    ));
    Ok(())
}

#[test]
fn output_line_seeds_label_retry_and_fail() -> anyhow::Result<()> {
    // The emulator's output: 6 answers, 1 prose answer and 2 cut off at max_tokens.
    let output =
        fuzz_entry::output_lines(&read("corpus", "output_lines", "emulator-output.jsonl")?);
    assert_eq!((output.parsed, output.answers, output.retries), (9, 6, 3));
    assert_eq!(output.counts.labelled, 6);
    // The 3 retries and the item the file never names went round again or failed.
    assert_eq!(output.counts.retried + output.counts.failed, 4);
    assert!(output.counts.failed > 0 && output.counts.retried > 0);

    let errors =
        fuzz_entry::output_lines(&read("corpus", "output_lines", "emulator-errors.jsonl")?);
    assert_eq!((errors.parsed, errors.answers), (3, 0));
    assert_eq!(errors.counts.labelled, 0);

    let mixed =
        fuzz_entry::output_lines(&read("corpus", "output_lines", "mixed-crlf-blank.jsonl")?);
    assert_eq!((mixed.parsed, mixed.unparsed, mixed.answers), (3, 1, 1));
    Ok(())
}

/// A line that is not UTF-8 used to fail the whole harvest (tokio's `lines()` refuses it),
/// at every attempt, so the batch was never harvested. Now only its item goes round again.
#[test]
fn a_line_that_is_not_utf8_costs_only_its_item() -> anyhow::Result<()> {
    let outcome =
        fuzz_entry::output_lines(&read("regressions", "output_lines", "non-utf8-line.jsonl")?);
    assert_eq!((outcome.parsed, outcome.unparsed), (2, 1), "{outcome:?}");
    assert_eq!(outcome.counts.labelled, 2, "{outcome:?}");
    // The harness gives items only to lines it can read, so the one item left is the
    // never-answered one, which goes round again.
    assert_eq!(outcome.counts.retried + outcome.counts.failed, 1);
    Ok(())
}

/// Two answers reporting u64::MAX prompt tokens each used to overflow the harvest's
/// counts (a panic in debug builds, a wrapped count in release). Now they saturate.
#[test]
fn absurd_token_counts_saturate() -> anyhow::Result<()> {
    let outcome = fuzz_entry::output_lines(&read(
        "regressions",
        "output_lines",
        "token-count-overflow.jsonl",
    )?);
    assert_eq!(outcome.counts.labelled, 2);
    assert_eq!(outcome.counts.prompt_tokens, u64::MAX);
    assert_eq!(outcome.counts.completion_tokens, u64::MAX);
    Ok(())
}

#[test]
fn webhook_seeds_reach_every_answer() -> anyhow::Result<()> {
    for (name, status, body_part) in [
        ("standard-fixture.txt", 200, r#""accepted":true"#),
        ("standard-signed-failed.txt", 200, r#""accepted":true"#),
        ("standard-signed-numeric-id.txt", 200, r#""accepted":true"#),
        ("standard-rotated.txt", 200, r#""accepted":true"#),
        (
            "standard-signed-ignored-type.txt",
            200,
            r#""accepted":false"#,
        ),
        ("standard-signed-no-data-id.txt", 400, "data.id"),
        ("standard-signed-not-json.txt", 400, "not valid JSON"),
        ("standard-too-old.txt", 401, "unauthorized"),
        ("standard-bad-signature.txt", 401, "unauthorized"),
        ("per-batch-fixture.txt", 200, r#""accepted":true"#),
        ("per-batch-signed-empty-body.txt", 200, r#""accepted":true"#),
        (
            "per-batch-signed-batch-object.txt",
            200,
            r#""accepted":true"#,
        ),
        ("per-batch-bad-token.txt", 401, "unauthorized"),
        ("options-probe.txt", 200, ""),
        ("get.txt", 405, "method not allowed"),
    ] {
        let response = fuzz_entry::webhook_request(&read("corpus", "webhook_request", name)?);
        assert_eq!(response.status, status, "{name}: {response:?}");
        assert!(response.body.contains(body_part), "{name}: {response:?}");
    }
    Ok(())
}

#[test]
fn s3_event_seeds_queue_fail_and_skip() -> anyhow::Result<()> {
    let outcome = |name: &str| -> anyhow::Result<fuzz_entry::S3Outcome> {
        fuzz_entry::s3_event(&read("corpus", "s3_event", name)?)
            .with_context(|| format!("{name} is not an S3 event"))
    };
    // Three created objects (one with `+` for spaces, one in UTF-8, one with `%2B`) and
    // a deletion, which is no new object.
    let put = outcome("s3-put.json")?;
    assert_eq!((put.records, put.objects, put.report.queued), (4, 3, 3));
    let moto = outcome("s3-put-moto.json")?;
    assert_eq!(moto.report.queued, 1);
    let sizes = outcome("sizes.json")?;
    assert_eq!((sizes.report.failed, sizes.report.queued), (3, 1));
    let labelled = outcome("already-labelled.json")?;
    assert_eq!(
        (labelled.report.already_labelled, labelled.report.queued),
        (1, 1)
    );
    assert_eq!(labelled.relabel.queued, 2);
    // Keys outside the prefix, folder markers and keys that cannot be decoded are not
    // queued; `%2` (no escape), `../` and control characters are queued as they decode.
    let awkward = outcome("awkward-keys.json")?;
    assert_eq!(awkward.report.queued, 3, "{awkward:?}");
    assert!(awkward.objects < awkward.records);
    ensure!(fuzz_entry::s3_event(b"{\"Records\": 7}").is_none());
    Ok(())
}
