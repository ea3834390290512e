//! `shotlabel report`: a bucket on moto, with real screenshots, labels, a failure and
//! batch records, reported into one HTML file and rendered by headless Chromium.
//!
//! Chromium (the Debian package `chromium`) is required: without it these tests fail,
//! they do not skip.

// The report module is compiled into this test as well as into the binary, so the test
// needs no library target; it uses part of the module's API.
#[allow(dead_code)]
#[path = "../src/report/mod.rs"]
mod report;

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use serde_json::{Value, json};
use shotlabel_aws::S3Store;
use shotlabel_core::answer::Usage;
use shotlabel_core::dataset;
use shotlabel_core::memory::MemoryStore;
use shotlabel_core::ports::{ObjectStore, WriteCondition};
use shotlabel_core::records::{
    AttemptReason, BatchPhase, BatchRecord, FailedRecord, HarvestCounts, LabelRecord, Layout,
    Provenance, RecordStatus, SourceRef, Stage, TaskRef, state_keys, unix_now,
};
use shotlabel_core::task::Task;
use shotlabel_localstack::{MotoServer, create_resources, s3_client};

const INPUT: &str = "incoming/";
const SCRIPT_KEY: &str = "incoming/<script>document.title='pwned'</script>.png";
const INJECTED_REASON: &str =
    "the answer was not JSON: <img src=x onerror=\"document.title='pwned'\">";

fn screenshot(name: &str) -> anyhow::Result<Vec<u8>> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/data/screenshots")
        .join(name);
    std::fs::read(&path).with_context(|| format!("cannot read {}", path.display()))
}

fn task_ref(task: &Task) -> TaskRef {
    TaskRef {
        name: task.name().into(),
        version: task.version().into(),
    }
}

/// Puts an input, its label record (built with the real struct) and, as the harvest does,
/// a dataset part holding it: the report reads the parts.
async fn put_labelled<S: ObjectStore>(
    store: &S,
    bucket: &str,
    key: &str,
    body: Vec<u8>,
    task: &Task,
    model: &str,
    label: Value,
) -> anyhow::Result<()> {
    let size = body.len() as u64;
    let etag = store
        .put(bucket, key, body, "image/png", WriteCondition::Overwrite)
        .await?;
    let record = LabelRecord {
        status: RecordStatus::Labelled,
        label,
        source: SourceRef {
            bucket: bucket.into(),
            key: key.into(),
            etag,
            size,
            version_id: None,
        },
        task: task_ref(task),
        model: model.into(),
        provenance: Provenance {
            batch_id: "batch_report_1".into(),
            custom_id: format!("req-{size}"),
            request_id: None,
            finish_reason: Some("stop".into()),
            usage: Some(Usage {
                prompt_tokens: 1000,
                completion_tokens: 20,
                total_tokens: 1020,
            }),
        },
        attempt: 0,
        labelled_at: unix_now(),
    };
    let layout = Layout::new(INPUT);
    let label_key = layout.label_key(layout.relative_or_key(key));
    store
        .put(
            bucket,
            &label_key,
            serde_json::to_vec(&record)?,
            "application/json",
            WriteCondition::Overwrite,
        )
        .await?;
    let part = dataset::part_key(
        task.name(),
        task.version(),
        &record.provenance.batch_id,
        u32::try_from(size)?,
    );
    store
        .put(
            bucket,
            &part,
            dataset::write_part(task, &[record])?,
            dataset::PARQUET_CONTENT_TYPE,
            WriteCondition::Overwrite,
        )
        .await?;
    Ok(())
}

fn batch_record(id: &str, task: &TaskRef, harvest: Option<HarvestCounts>) -> BatchRecord {
    BatchRecord {
        batch_id: id.into(),
        manifest: format!("manifest-{id}"),
        submission_id: "sub-1".into(),
        input_file_id: format!("file-{id}"),
        requests: 10,
        bytes: 123_456,
        task: task.clone(),
        model: report::EMULATOR_MODEL.into(),
        phase: if harvest.is_some() {
            BatchPhase::Harvested
        } else {
            BatchPhase::Open
        },
        submitted_at: 1_700_000_000,
        provider_status: Some(
            if harvest.is_some() {
                "completed"
            } else {
                "in_progress"
            }
            .into(),
        ),
        harvest,
        harvested_at: harvest.map(|_| 1_700_000_600),
    }
}

// ---------------------------------------------------------------------------------------
// Chromium

/// The Chromium binary: `SHOTLABEL_CHROMIUM`, or `chromium` / `chromium-browser` /
/// `google-chrome` on the PATH. Missing Chromium is a test failure, never a skip.
fn chromium() -> PathBuf {
    if let Some(path) = std::env::var_os("SHOTLABEL_CHROMIUM").filter(|p| !p.is_empty()) {
        return PathBuf::from(path);
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    for dir in std::env::split_paths(&path).chain([PathBuf::from("/usr/bin")]) {
        for name in ["chromium", "chromium-browser", "google-chrome"] {
            let candidate = dir.join(name);
            if candidate.is_file() {
                return candidate;
            }
        }
    }
    panic!(
        "headless Chromium is required to render the report but was not found on the PATH \
         (install the Debian package: apt-get install -y chromium; or set SHOTLABEL_CHROMIUM)"
    );
}

/// Runs headless Chromium on a page with extra arguments; returns its stdout.
async fn run_chromium(page: &Path, args: &[String]) -> anyhow::Result<String> {
    let profile = tempfile::tempdir()?;
    let mut command = tokio::process::Command::new(chromium());
    command
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--no-first-run",
            "--no-default-browser-check",
            "--hide-scrollbars",
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .args(args)
        .arg(format!("file://{}", page.display()))
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true);
    let output = tokio::time::timeout(Duration::from_secs(120), command.output())
        .await
        .context("chromium did not finish within 120 s")?
        .context("cannot run chromium")?;
    anyhow::ensure!(
        output.status.success(),
        "chromium failed ({}): {}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    Ok(String::from_utf8(output.stdout)?)
}

/// The start tags of a serialised DOM: (lowercase name, the tag's text). Attribute values
/// are skipped over as quoted strings, so markup inside them opens no tag.
fn start_tags(dom: &str) -> Vec<(String, String)> {
    let bytes = dom.as_bytes();
    let mut tags = Vec::new();
    let mut i = 0;
    while let Some(offset) = dom[i..].find('<') {
        let start = i + offset + 1;
        if dom[start..].starts_with("!--") {
            i = dom[start..]
                .find("-->")
                .map_or(dom.len(), |e| start + e + 3);
            continue;
        }
        let mut end = start;
        let mut quoted = false;
        while end < bytes.len() && (quoted || bytes[end] != b'>') {
            if bytes[end] == b'"' {
                quoted = !quoted;
            }
            end += 1;
        }
        let inner = &dom[start..end.min(dom.len())];
        let name: String = inner
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '-')
            .collect::<String>()
            .to_ascii_lowercase();
        if !name.is_empty() {
            tags.push((name, inner.to_owned()));
        }
        i = end + 1;
        if i >= dom.len() {
            break;
        }
    }
    tags
}

fn attribute<'t>(tag: &'t str, name: &str) -> Option<&'t str> {
    let needle = format!(" {name}=\"");
    let at = tag.find(&needle)? + needle.len();
    tag[at..].find('"').map(|end| &tag[at..at + end])
}

/// The text of the element with this id, up to its first child tag.
fn text_of<'d>(dom: &'d str, id: &str) -> Option<&'d str> {
    let needle = format!("id=\"{id}\">");
    let at = dom.find(&needle)? + needle.len();
    dom[at..].find('<').map(|end| &dom[at..at + end])
}

// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_report_renders_counts_charts_thumbnails_and_failures() -> anyhow::Result<()> {
    let chromium_binary = chromium(); // fail first, and clearly, without Chromium

    let moto = MotoServer::start().await?;
    let config = moto.sdk_config().await;
    let resources = create_resources(&config, "report-test").await?;
    let bucket = resources.bucket.as_str();
    let store = S3Store::new(s3_client(&config));
    let default_task = Task::default_task()?;
    let task = &default_task;
    let emulator = report::EMULATOR_MODEL;

    // Known labels: aesthetic 1:1, 2:1, 3:1, 4:4, 5:2; landing page yes:4, no:5.
    let labelled: [(&str, &str, bool, i64); 8] = [
        ("incoming/saas-landing.png", "saas-landing.png", true, 5),
        (
            "incoming/minimal-portfolio.png",
            "minimal-portfolio.png",
            true,
            5,
        ),
        ("incoming/geocities-home.png", "geocities-home.png", true, 1),
        ("incoming/blog-article.png", "blog-article.png", false, 3),
        ("incoming/pricing-table.png", "pricing-table.png", false, 4),
        ("incoming/sub/docs-page.png", "docs-page.png", false, 4),
        (
            "incoming/ebike-landing-full.png",
            "ebike-landing-full.png",
            true,
            4,
        ),
        (SCRIPT_KEY, "login-modal.png", false, 4),
    ];
    for (key, file, landing_page, aesthetic) in labelled {
        let label = json!({"landing_page": landing_page, "aesthetic": aesthetic});
        put_labelled(
            &store,
            bucket,
            key,
            screenshot(file)?,
            task,
            emulator,
            label,
        )
        .await?;
    }
    // Labelled, but its source is not an image: a placeholder, not a failed report.
    put_labelled(
        &store,
        bucket,
        "incoming/notes.png",
        b"these are notes, not a picture".to_vec(),
        task,
        emulator,
        json!({"landing_page": false, "aesthetic": 2}),
    )
    .await?;

    // A failed image with two attempts, one reason carrying markup.
    let broken = store
        .put(
            bucket,
            "incoming/broken.png",
            b"\x89PNG\r\n\x1a\ntruncated".to_vec(),
            "image/png",
            WriteCondition::Overwrite,
        )
        .await?;
    let failed = FailedRecord::new(
        SourceRef {
            bucket: bucket.into(),
            key: "incoming/broken.png".into(),
            etag: broken,
            size: 17,
            version_id: None,
        },
        task_ref(task),
        vec![
            AttemptReason {
                attempt: 0,
                stage: Stage::Provider,
                reason: "inference_failed: Maximum retries reached".into(),
            },
            AttemptReason {
                attempt: 1,
                stage: Stage::Validate,
                reason: INJECTED_REASON.into(),
            },
        ],
    );
    store
        .put(
            bucket,
            "failed/broken.png.json",
            serde_json::to_vec(&failed)?,
            "application/json",
            WriteCondition::Overwrite,
        )
        .await?;
    // An input still in flight, and a dataset part nobody can read.
    let garbage_part = dataset::part_key(task.name(), task.version(), "batch_garbage", 0);
    store
        .put(
            bucket,
            "incoming/waiting.png",
            screenshot("admin-dashboard.png")?,
            "image/png",
            WriteCondition::Overwrite,
        )
        .await?;
    store
        .put(
            bucket,
            &garbage_part,
            b"PAR1 not parquet".to_vec(),
            dataset::PARQUET_CONTENT_TYPE,
            WriteCondition::Overwrite,
        )
        .await?;
    // Batches: one harvested (2 retried, 9,180 tokens), one still open.
    let harvest = HarvestCounts {
        labelled: 9,
        retried: 2,
        failed: 1,
        duplicates: 0,
        prompt_tokens: 9_000,
        completion_tokens: 180,
    };
    for record in [
        batch_record("batch_report_1", &task_ref(task), Some(harvest)),
        batch_record("batch_report_2", &task_ref(task), None),
    ] {
        store
            .put(
                bucket,
                &state_keys::batch(&record.batch_id),
                serde_json::to_vec(&record)?,
                "application/json",
                WriteCondition::Overwrite,
            )
            .await?;
    }

    let dir = tempfile::tempdir()?;
    let page = dir.path().join("report.html");
    let summary = report::write_report(&store, bucket, INPUT, &page).await?;
    assert_eq!(
        summary,
        report::ReportSummary {
            images: 11,
            labelled: 9,
            failed: 1,
            in_progress: 1,
            batches: 2,
            retried: 2,
            duplicates: 0,
            prompt_tokens: 9_000,
            completion_tokens: 180,
            emulator_labels: 9,
            images_shown: 8,
            placeholders: 1,
            left_out: 0,
            unreadable_records: 1,
        }
    );

    // The file itself: self-contained, and no markup from the bucket survives unescaped.
    let html = std::fs::read_to_string(&page)?;
    assert!(
        !html.contains("http://") && !html.contains("https://"),
        "external URL in the page"
    );
    assert!(
        !html.to_ascii_lowercase().contains("<script"),
        "a script element in the page"
    );
    assert!(
        !html.contains("<img src=x"),
        "the failed reason's markup was not escaped"
    );

    // What a browser makes of it.
    let dom = run_chromium(&page, &["--dump-dom".into()]).await?;
    assert!(dom.contains("</html>"), "no DOM from chromium: {dom}");
    let tags = start_tags(&dom);
    assert!(
        !tags.iter().any(|(name, _)| name == "script"),
        "a script element was injected"
    );
    assert!(!dom.contains("<title>pwned"), "an injected script ran");
    assert!(dom.contains(
        "<title>shotlabel report: report-test-bucket (synthetic emulator labels)</title>"
    ));

    for (id, value) in [
        ("count-images", "11"),
        ("count-labelled", "9"),
        ("count-failed", "1"),
        ("count-in-progress", "1"),
        ("count-batches", "2"),
        ("count-retried", "2"),
        ("count-tokens", "9,180"),
    ] {
        assert_eq!(text_of(&dom, id), Some(value), "{id}");
    }

    // One <img> per decodable labelled image, each a JPEG data: URI; the rest placeholders.
    let images: Vec<&String> = tags
        .iter()
        .filter(|(name, _)| name == "img")
        .map(|(_, tag)| tag)
        .collect();
    assert_eq!(images.len(), 8, "{images:?}");
    let mut alts = HashSet::new();
    for tag in &images {
        let src = attribute(tag, "src").unwrap_or_default();
        assert!(
            src.starts_with("data:image/jpeg;base64,"),
            "{}",
            &tag[..tag.len().min(120)]
        );
        assert!(src.len() > 1000, "a thumbnail this small is empty");
        alts.insert(attribute(tag, "alt").unwrap_or_default().to_owned());
    }
    assert!(alts.contains("incoming/saas-landing.png"), "{alts:?}");
    assert!(
        dom.contains("<b>No thumbnail</b><code>incoming/notes.png</code>"),
        "no placeholder for the file that is not an image"
    );
    assert!(dom.contains("not an image"));
    assert!(dom.contains("top of a 1280×5200 image"));

    // The gallery's groups, with their counts, and the landing page split inside them.
    for (value, count) in [
        (1, "1 image"),
        (2, "1 image"),
        (3, "1 image"),
        (4, "4 images"),
        (5, "2 images"),
    ] {
        let heading = format!("aesthetic: {value} <span class=\"n\">{count}</span>");
        assert!(dom.contains(&heading), "missing heading {heading}");
        let section = format!("data-field=\"aesthetic\" data-value=\"{value}\"");
        assert!(dom.contains(&section), "missing section {section}");
    }
    // (aesthetic 4: three inner pages and one landing page; 5: two landing pages.)
    assert!(dom.contains("landing_page: no <span class=\"n\">3 images</span>"));
    assert!(dom.contains("landing_page: yes <span class=\"n\">1 image</span>"));
    assert!(dom.contains("landing_page: yes <span class=\"n\">2 images</span>"));
    // The charts: one per scalar field, every enum value with its bar.
    assert!(dom.contains("<figure class=\"chart\" data-field=\"aesthetic\">"));
    assert!(dom.contains("<figure class=\"chart\" data-field=\"landing_page\">"));
    assert!(dom.contains("data-value=\"yes\" data-count=\"4\""));
    assert!(dom.contains("data-value=\"no\" data-count=\"5\""));
    assert!(dom.contains("data-value=\"2\" data-count=\"1\""));

    // The failed item with each attempt's stage and reason, the markup shown as text.
    assert!(dom.contains("<code>incoming/broken.png</code>"));
    assert!(dom.contains("inference_failed: Maximum retries reached"));
    assert!(dom.contains("<td>validate</td>"));
    assert!(dom.contains("the answer was not JSON: &lt;img src=x onerror="));
    assert!(
        dom.contains(garbage_part.as_str()),
        "the unreadable part is not named"
    );

    // The emulator warning, and the hostile key shown as text.
    assert!(dom.contains("id=\"emulator-warning\""));
    assert!(dom.contains("Synthetic labels: emulator output, not a model's judgement."));
    assert!(dom.contains("All 9 labels in this report came from"));
    assert!(dom.contains("&lt;script&gt;document.title='pwned'&lt;/script&gt;.png"));

    // And it draws: a screenshot that decodes and is not one flat colour.
    let shot = dir.path().join("report.png");
    run_chromium(
        &page,
        &[
            "--window-size=1280,2400".into(),
            format!("--screenshot={}", shot.display()),
        ],
    )
    .await?;
    let picture = image::open(&shot)
        .with_context(|| format!("the screenshot {} does not decode", shot.display()))?
        .into_rgb8();
    assert!(picture.width() >= 1000 && picture.height() >= 1000);
    let colours: HashSet<[u8; 3]> = picture.pixels().map(|p| p.0).collect();
    assert!(
        colours.len() > 100,
        "the screenshot is nearly flat: {} colours",
        colours.len()
    );
    // To look at the page: SHOTLABEL_KEEP_REPORT=/some/dir cargo test -p shotlabel-cli --test report
    if let Some(keep) = std::env::var_os("SHOTLABEL_KEEP_REPORT").filter(|d| !d.is_empty()) {
        let keep = PathBuf::from(keep);
        std::fs::create_dir_all(&keep)?;
        std::fs::copy(&page, keep.join("report.html"))?;
        std::fs::copy(&shot, keep.join("report.png"))?;
    }
    drop(chromium_binary);
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Any task, any store: the report is generic.

#[tokio::test]
async fn free_text_is_captioned_not_charted_and_the_gallery_cap_is_reported() -> anyhow::Result<()>
{
    let store = MemoryStore::default();
    // The caption task with one more field, a short repeating one.
    let mut spec =
        Task::from_path(&Path::new(env!("CARGO_MANIFEST_DIR")).join("../tasks/caption.toml"))?
            .spec()
            .clone();
    spec.response_schema.schema["properties"]["kind"] = json!({"type": "string"});
    spec.response_schema.schema["required"] = json!(["caption", "tags", "kind"]);
    let caption_task = Task::new(spec)?;
    let task = &caption_task;
    let model = "google/gemma-3-27b-instruct/bf-16";
    let items = [
        (
            "saas-landing.png",
            "web page",
            "A SaaS landing page with a bold headline and a sign-up button.",
        ),
        (
            "blog-article.png",
            "web page",
            "A long blog article about baking bread, with a photo at the top.",
        ),
        (
            "pricing-table.png",
            "web page",
            "A pricing page with three plans side by side and a monthly toggle.",
        ),
        (
            "docs-page.png",
            "document",
            "A documentation page with a sidebar of sections and code samples.",
        ),
        (
            "login-modal.png",
            "document",
            "A login dialog over a dimmed page asking for email and password.",
        ),
    ];
    for (file, kind, caption) in items {
        let label = json!({"caption": caption, "tags": ["web", kind], "kind": kind});
        let key = format!("incoming/{file}");
        put_labelled(&store, "b", &key, screenshot(file)?, task, model, label).await?;
    }

    let dir = tempfile::tempdir()?;
    let page = dir.path().join("report.html");
    let options = report::ReportOptions {
        max_thumbnails: 2,
        tasks: vec![caption_task],
    };
    let summary = report::write_report_with(&store, "b", INPUT, &page, &options).await?;
    assert_eq!(
        (summary.labelled, summary.images_shown, summary.left_out),
        (5, 2, 3)
    );
    assert_eq!((summary.emulator_labels, summary.placeholders), (0, 0));
    assert_eq!(
        (summary.batches, summary.prompt_tokens),
        (0, 5_000),
        "tokens from the labels"
    );

    let html = std::fs::read_to_string(&page)?;
    assert!(
        !html.contains("emulator-warning"),
        "a real model's labels are not synthetic"
    );
    // The short repeating field is charted and groups the gallery; the rest are captions.
    assert!(html.contains("<figure class=\"chart\" data-field=\"kind\">"));
    assert!(!html.contains("data-field=\"caption\""));
    assert!(!html.contains("data-field=\"tags\""));
    assert!(html.contains("<code>caption</code> (free text)"), "{html}");
    assert!(html.contains("<code>tags</code> (a list)"));
    assert!(html.contains("kind: web page <span class=\"n\">3 images</span>"));
    assert!(html.contains("kind: document <span class=\"n\">2 images</span>"));
    assert!(html.contains("<span>tags: web, document</span>"));
    assert!(
        html.contains("<span>caption: A documentation page with a sidebar"),
        "{html}"
    );
    // The cap is shared between the groups and says what it left out.
    assert_eq!(
        html.matches("<img src=\"data:image/jpeg;base64,").count(),
        2
    );
    assert!(html.contains("Showing 2 of 5 labelled images: 3 left out by the thumbnail cap of 2"));
    assert!(html.contains("2 more images not shown."));
    assert!(html.contains("1 more image not shown."));
    Ok(())
}
