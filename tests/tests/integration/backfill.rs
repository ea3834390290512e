//! `shotlabel backfill` against moto, run as the built binary the way a person runs it:
//! from an S3 Inventory report (`--inventory`, CSV and Parquet, generated here the way S3
//! writes them) and from the parallel listing. Every input is queued exactly once, a rerun
//! after labelling queues nothing more, and a report it cannot read is refused plainly.

use std::collections::BTreeMap;
use std::io::Write as _;
use std::path::PathBuf;
use std::process::{Command, Output};
use std::sync::{Arc, OnceLock};

use anyhow::Context as _;
use aws_sdk_s3::primitives::ByteStream;
use futures_util::{StreamExt, TryStreamExt};
use serde_json::{Value, json};
use shotlabel_core::records::{
    LabelRecord, Layout, PendingItem, Provenance, RecordStatus, SourceRef,
};
use shotlabel_core::task::Task;

use crate::common::{INPUT, Stack, stack, task_ref};

/// Inputs whose keys a CSV report must URL-encode: spaces, `+`, `%`, commas, quotes,
/// non-ASCII.
const AWKWARD_KEYS: [&str; 7] = [
    "incoming/with space.png",
    "incoming/c++ & co/x+y=z.png",
    "incoming/ünïcødé/写真 2024.jpg",
    "incoming/100%/a,b;c.png",
    "incoming/quote\"d'.png",
    "incoming/tilde~*(1).png",
    "incoming/emoji 📷.webp",
];

/// Objects in the bucket that are not inputs: outside the input prefix (one only looks
/// like it), or the pipeline's own output and state.
const NOT_INPUTS: [&str; 6] = [
    "elsewhere/a.png",
    "incomingx/b.png",
    "labels/old.png.json",
    "failed/broken.png.json",
    "state/batches/batch_1.json",
    "inventory/old-report/data/0.csv.gz",
];

/// An object as a report lists it.
#[derive(Debug, Clone)]
struct Entry {
    key: String,
    version_id: &'static str,
    is_latest: bool,
    is_delete_marker: bool,
    /// `None` for a delete marker.
    size: Option<u64>,
    etag: Option<String>,
}

/// Puts an object and returns its report entry.
async fn put(stack: &Stack, key: &str, body: Vec<u8>) -> anyhow::Result<Entry> {
    let size = body.len() as u64;
    let out = stack
        .s3
        .put_object()
        .bucket(&stack.resources.bucket)
        .key(key)
        .body(ByteStream::from(body))
        .send()
        .await?;
    Ok(Entry {
        key: key.to_owned(),
        version_id: "",
        is_latest: true,
        is_delete_marker: false,
        size: Some(size),
        etag: Some(out.e_tag.unwrap_or_default().trim_matches('"').to_owned()),
    })
}

/// Each object's own bytes, so that every etag differs.
fn body(key: &str) -> Vec<u8> {
    format!("not really an image: {key}").into_bytes()
}

/// The bucket as an inventory would see it: the inputs (what must be queued, key →
/// etag), and every entry of the report, which also has objects that are not inputs, a
/// folder marker, an older version and a delete marker.
async fn populate(stack: &Stack) -> anyhow::Result<(BTreeMap<String, String>, Vec<Entry>)> {
    let mut inputs = BTreeMap::new();
    let mut entries = Vec::new();
    let plain = (0..25).map(|i| format!("{INPUT}batch/{i:03}.png"));
    for key in AWKWARD_KEYS.iter().map(|k| (*k).to_owned()).chain(plain) {
        let entry = put(stack, &key, body(&key)).await?;
        inputs.insert(key, entry.etag.clone().unwrap_or_default());
        entries.push(entry);
    }
    for key in NOT_INPUTS {
        entries.push(put(stack, key, body(key)).await?);
    }
    // A folder marker: listed, not an image (enqueue ignores it).
    entries.push(put(stack, &format!("{INPUT}folder/"), Vec::new()).await?);
    // What a report of all versions also holds: an older version of an input, and a
    // delete marker over an object that is gone. Neither may be queued.
    entries.push(Entry {
        version_id: "older-version",
        is_latest: false,
        etag: Some("0123456789abcdef0123456789abcdef".into()),
        ..entries[0].clone()
    });
    entries.push(Entry {
        key: format!("{INPUT}deleted.png"),
        version_id: "delete-marker",
        is_latest: true,
        is_delete_marker: true,
        size: None,
        etag: None,
    });
    // The report lists in key order, whatever order the objects were written in.
    entries.sort_by(|a, b| a.key.cmp(&b.key));
    Ok((inputs, entries))
}

/// The columns of both reports, in S3's order (a report of all versions, with size and
/// ETag among the additional fields).
const CSV_SCHEMA: &str =
    "Bucket, Key, VersionId, IsLatest, IsDeleteMarker, Size, LastModifiedDate, ETag, StorageClass";
const PARQUET_SCHEMA: &str = "message s3.inventory { required binary bucket (UTF8); required binary key (UTF8); optional binary version_id (UTF8); optional boolean is_latest; optional boolean is_delete_marker; optional int64 size; optional int64 last_modified_date (TIMESTAMP_MILLIS); optional binary e_tag (UTF8); optional binary storage_class (UTF8);}";

/// A key as a CSV report writes it: URL-encoded, a space as `+`.
fn url_encoded(key: &str) -> String {
    url::form_urlencoded::byte_serialize(key.as_bytes()).collect()
}

/// One gzip'd CSV data file: no header, every field quoted.
fn csv_gz(bucket: &str, entries: &[Entry]) -> anyhow::Result<Vec<u8>> {
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    for e in entries {
        let size = e.size.map(|s| s.to_string()).unwrap_or_default();
        let fields = [
            bucket,
            &url_encoded(&e.key),
            e.version_id,
            if e.is_latest { "true" } else { "false" },
            if e.is_delete_marker { "true" } else { "false" },
            &size,
            "2026-01-01T00:00:00.000Z",
            e.etag.as_deref().unwrap_or_default(),
            "STANDARD",
        ];
        let line: Vec<String> = fields.iter().map(|f| format!("\"{f}\"")).collect();
        writeln!(gz, "{}", line.join(","))?;
    }
    Ok(gz.finish()?)
}

/// One Parquet data file, Snappy-compressed, one row group per slice of entries.
fn parquet_file(bucket: &str, row_groups: &[&[Entry]]) -> anyhow::Result<Vec<u8>> {
    use parquet::basic::Compression;
    use parquet::data_type::{BoolType, ByteArray, ByteArrayType, Int64Type};
    use parquet::file::properties::WriterProperties;
    use parquet::file::writer::{SerializedColumnWriter, SerializedFileWriter};
    use parquet::schema::parser::parse_message_type;

    /// Writes an optional column: the values present, and a definition level per row.
    fn optional<T, V>(
        column: &mut SerializedColumnWriter<'_>,
        values: impl Iterator<Item = Option<V>>,
        convert: impl Fn(V) -> T::T,
    ) -> anyhow::Result<()>
    where
        T: parquet::data_type::DataType,
    {
        let mut present = Vec::new();
        let mut levels = Vec::new();
        for value in values {
            levels.push(i16::from(value.is_some()));
            present.extend(value.map(&convert));
        }
        column
            .typed::<T>()
            .write_batch(&present, Some(&levels), None)?;
        Ok(())
    }
    let text = |s: &str| ByteArray::from(s.as_bytes().to_vec());

    let schema = Arc::new(parse_message_type(PARQUET_SCHEMA)?);
    let properties = Arc::new(
        WriterProperties::builder()
            .set_compression(Compression::SNAPPY)
            .build(),
    );
    let mut writer = SerializedFileWriter::new(Vec::new(), schema, properties)?;
    for entries in row_groups {
        let mut group = writer.next_row_group()?;
        let mut index = 0;
        while let Some(mut column) = group.next_column()? {
            let rows = entries.iter();
            match index {
                0 => {
                    let values: Vec<ByteArray> = rows.map(|_| text(bucket)).collect();
                    column
                        .typed::<ByteArrayType>()
                        .write_batch(&values, None, None)?;
                }
                1 => {
                    let values: Vec<ByteArray> = rows.map(|e| text(&e.key)).collect();
                    column
                        .typed::<ByteArrayType>()
                        .write_batch(&values, None, None)?;
                }
                2 => optional::<ByteArrayType, _>(
                    &mut column,
                    rows.map(|e| Some(e.version_id).filter(|v| !v.is_empty())),
                    text,
                )?,
                3 => optional::<BoolType, _>(&mut column, rows.map(|e| Some(e.is_latest)), |b| b)?,
                4 => optional::<BoolType, _>(
                    &mut column,
                    rows.map(|e| Some(e.is_delete_marker)),
                    |b| b,
                )?,
                5 => optional::<Int64Type, _>(
                    &mut column,
                    rows.map(|e| e.size.map(|s| s as i64)),
                    |s| s,
                )?,
                6 => optional::<Int64Type, _>(
                    &mut column,
                    rows.map(|_| Some(1_767_225_600_000_i64)),
                    |t| t,
                )?,
                7 => optional::<ByteArrayType, _>(
                    &mut column,
                    rows.map(|e| e.etag.as_deref()),
                    text,
                )?,
                8 => optional::<ByteArrayType, _>(
                    &mut column,
                    rows.map(|e| (!e.is_delete_marker).then_some("STANDARD")),
                    text,
                )?,
                other => anyhow::bail!("the schema has an unexpected column {other}"),
            }
            column.close()?;
            index += 1;
        }
        group.close()?;
    }
    Ok(writer.into_inner()?)
}

/// A report's format, as `manifest.json` names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Format {
    Csv,
    Parquet,
}

/// Writes a report where S3 would deliver it (below `inventory/<bucket>/<config>/`) and
/// returns its manifest's URI: the data files split in two, written first, as S3 does.
async fn write_report(stack: &Stack, format: Format, entries: &[Entry]) -> anyhow::Result<String> {
    let bucket = &stack.resources.bucket;
    let config = match format {
        Format::Csv => "daily-csv",
        Format::Parquet => "daily-parquet",
    };
    let base = format!("inventory/{bucket}/{config}");
    let (first, second) = entries.split_at(entries.len() / 2);
    let data: Vec<(String, Vec<u8>)> = match format {
        Format::Csv => vec![
            (format!("{base}/data/part-0.csv.gz"), csv_gz(bucket, first)?),
            (
                format!("{base}/data/part-1.csv.gz"),
                csv_gz(bucket, second)?,
            ),
        ],
        // One file with two row groups: what a large report's file has.
        Format::Parquet => vec![(
            format!("{base}/data/part-0.parquet"),
            parquet_file(bucket, &[first, second])?,
        )],
    };
    let mut files = Vec::new();
    for (key, bytes) in data {
        let size = bytes.len();
        let entry = put(stack, &key, bytes).await?;
        files.push(json!({"key": key, "size": size, "MD5checksum": entry.etag}));
    }
    let (file_format, file_schema) = match format {
        Format::Csv => ("CSV", CSV_SCHEMA),
        Format::Parquet => ("Parquet", PARQUET_SCHEMA),
    };
    let manifest = json!({
        "sourceBucket": bucket,
        "destinationBucket": format!("arn:aws:s3:::{bucket}"),
        "version": "2016-11-30",
        "creationTimestamp": "1767225600000",
        "fileFormat": file_format,
        "fileSchema": file_schema,
        "files": files,
    });
    let manifest_key = format!("{base}/2026-01-01T00-00Z/manifest.json");
    put(stack, &manifest_key, serde_json::to_vec_pretty(&manifest)?).await?;
    Ok(format!("s3://{bucket}/{manifest_key}"))
}

/// The `shotlabel` binary. This test binary lives in another package, so cargo gives it no
/// `CARGO_BIN_EXE_shotlabel`: it is built here (with the same workspace-wide features as
/// this binary, so normally nothing is compiled), or taken from `SHOTLABEL_BIN`.
pub(crate) fn shotlabel_bin() -> anyhow::Result<PathBuf> {
    static BIN: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    if let Some(path) = std::env::var_os("SHOTLABEL_BIN") {
        return Ok(path.into());
    }
    BIN.get_or_init(|| build_shotlabel().map_err(|e| format!("{e:#}")))
        .clone()
        .map_err(anyhow::Error::msg)
}

fn build_shotlabel() -> anyhow::Result<PathBuf> {
    let workspace = concat!(env!("CARGO_MANIFEST_DIR"), "/..");
    let out = Command::new(env!("CARGO"))
        .args([
            "build",
            "--workspace",
            "--bin",
            "shotlabel",
            "--test",
            "integration",
            "--message-format=json-render-diagnostics",
        ])
        .current_dir(workspace)
        .output()
        .context("running cargo build")?;
    anyhow::ensure!(
        out.status.success(),
        "cargo build of shotlabel failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|line| serde_json::from_str::<Value>(line).ok())
        .filter(|m| m["reason"] == "compiler-artifact" && m["target"]["name"] == "shotlabel")
        .find_map(|m| m["executable"].as_str().map(PathBuf::from))
        .context("cargo built no shotlabel executable")
}

/// Runs the binary against the stack with exactly this environment (nothing inherited).
pub(crate) fn shotlabel(stack: &Stack, args: &[&str]) -> anyhow::Result<Output> {
    let home = stack.work_dir.path().to_string_lossy().into_owned();
    let env = [
        ("AWS_ENDPOINT_URL", stack.moto.endpoint()),
        ("AWS_ACCESS_KEY_ID", "testing"),
        ("AWS_SECRET_ACCESS_KEY", "testing"),
        ("AWS_REGION", "us-east-1"),
        ("AWS_EC2_METADATA_DISABLED", "true"),
        ("HOME", &home),
        ("SHOTLABEL_BUCKET", &stack.resources.bucket),
        (
            "SHOTLABEL_PENDING_QUEUE_URL",
            &stack.resources.pending_queue_url,
        ),
    ];
    Ok(Command::new(shotlabel_bin()?)
        .args(args)
        .env_clear()
        .envs(env)
        .output()?)
}

/// Runs a backfill that must succeed and returns its JSON summary.
fn backfill(stack: &Stack, args: &[&str]) -> anyhow::Result<Value> {
    let mut all = vec!["backfill", "--json"];
    all.extend_from_slice(args);
    let out = shotlabel(stack, &all)?;
    anyhow::ensure!(
        out.status.success(),
        "{all:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(serde_json::from_slice(&out.stdout)?)
}

/// A failure a person can act on: non-zero, one line on stderr, no panic.
fn one_line_failure(out: &Output) -> String {
    let stderr = String::from_utf8_lossy(&out.stderr).trim_end().to_owned();
    assert!(!out.status.success(), "should have failed: {stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "one line: {stderr:?}");
    stderr
}

/// Everything on the pending queue, as (key, etag), sorted; a key queued twice is there
/// twice.
async fn drain_pending(stack: &Stack) -> anyhow::Result<Vec<(String, String)>> {
    let mut items = Vec::new();
    loop {
        let out = stack
            .sqs
            .receive_message()
            .queue_url(&stack.resources.pending_queue_url)
            .max_number_of_messages(10)
            .visibility_timeout(600)
            .wait_time_seconds(1)
            .send()
            .await?;
        let messages = out.messages.unwrap_or_default();
        if messages.is_empty() {
            items.sort();
            return Ok(items);
        }
        for message in messages {
            let item: PendingItem = serde_json::from_str(message.body().unwrap_or_default())?;
            items.push((item.key, item.etag));
        }
    }
}

/// Writes labels for these inputs under the current task version, where harvest would.
async fn label(stack: &Stack, inputs: &[(&String, &String)]) -> anyhow::Result<()> {
    let layout = Layout::new(INPUT);
    let task = task_ref(&Task::default_task()?);
    futures_util::stream::iter(inputs)
        .map(|(key, etag)| {
            let record = LabelRecord {
                status: RecordStatus::Labelled,
                label: json!({}),
                source: SourceRef {
                    bucket: stack.resources.bucket.clone(),
                    key: (*key).clone(),
                    etag: (*etag).clone(),
                    size: 1,
                    version_id: None,
                },
                task: task.clone(),
                model: "test-model".into(),
                provenance: Provenance {
                    batch_id: "batch_test".into(),
                    custom_id: format!("c-{key}"),
                    request_id: None,
                    finish_reason: Some("stop".into()),
                    usage: None,
                },
                attempt: 0,
                labelled_at: 1,
            };
            let label_key = layout.label_key(layout.relative_or_key(key));
            async move {
                stack
                    .s3
                    .put_object()
                    .bucket(&stack.resources.bucket)
                    .key(label_key)
                    .body(ByteStream::from(serde_json::to_vec(&record)?))
                    .send()
                    .await?;
                anyhow::Ok(())
            }
        })
        .buffer_unordered(8)
        .try_collect::<Vec<()>>()
        .await?;
    Ok(())
}

/// The whole round for one format: every input queued once; a rerun after most are
/// labelled queues only the rest; once all are labelled, nothing.
async fn inventory_round(format: Format, name: &str) -> anyhow::Result<()> {
    let stack = stack(name).await?;
    let (inputs, entries) = populate(&stack).await?;
    let uri = write_report(&stack, format, &entries).await?;
    let expected: Vec<(String, String)> = inputs.clone().into_iter().collect();

    let summary = backfill(&stack, &["--inventory", &uri])?;
    assert_eq!(summary["source"], "inventory", "{summary}");
    assert_eq!(summary["inventory"], uri.as_str(), "{summary}");
    // The inputs and the folder marker are under the prefix; the rest is skipped.
    assert_eq!(summary["listed"], inputs.len() + 1, "{summary}");
    assert_eq!(summary["skipped"], NOT_INPUTS.len() + 2, "{summary}");
    assert_eq!(summary["queued"], inputs.len(), "{summary}");
    assert_eq!(summary["ignored"], 1, "{summary}");
    assert_eq!(summary["already_labelled"], 0, "{summary}");
    assert_eq!(summary["failed"], 0, "{summary}");
    // Exactly the inputs, each once, with the etag of its current content: the keys
    // came back from their URL encoding intact.
    assert_eq!(drain_pending(&stack).await?, expected);

    // Most are labelled now; a rerun queues the two that are not, and nothing twice.
    let (unlabelled, labelled) = expected.split_at(2);
    let labelled: Vec<(&String, &String)> = labelled.iter().map(|(k, e)| (k, e)).collect();
    label(&stack, &labelled).await?;
    let summary = backfill(&stack, &["--inventory", &uri])?;
    assert_eq!(summary["queued"], 2, "{summary}");
    assert_eq!(summary["already_labelled"], labelled.len(), "{summary}");
    assert_eq!(drain_pending(&stack).await?, unlabelled);

    // All labelled: a rerun queues nothing.
    let rest: Vec<(&String, &String)> = unlabelled.iter().map(|(k, e)| (k, e)).collect();
    label(&stack, &rest).await?;
    let summary = backfill(&stack, &["--inventory", &uri])?;
    assert_eq!(summary["queued"], 0, "{summary}");
    assert_eq!(summary["already_labelled"], inputs.len(), "{summary}");
    assert!(drain_pending(&stack).await?.is_empty());

    // A narrower prefix takes only the report's rows under it.
    let summary = backfill(
        &stack,
        &["--inventory", &uri, "--prefix", "batch/", "--force-relabel"],
    )?;
    assert_eq!(summary["prefix"], "incoming/batch/", "{summary}");
    assert_eq!(summary["listed"], 25, "{summary}");
    assert_eq!(summary["queued"], 25, "{summary}");
    assert_eq!(drain_pending(&stack).await?.len(), 25);
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_csv_inventory_queues_every_input_once() -> anyhow::Result<()> {
    inventory_round(Format::Csv, "backfill-csv").await
}

#[tokio::test(flavor = "multi_thread")]
async fn a_parquet_inventory_queues_every_input_once() -> anyhow::Result<()> {
    inventory_round(Format::Parquet, "backfill-parquet").await
}

#[tokio::test(flavor = "multi_thread")]
async fn reports_it_cannot_read_are_refused_plainly() -> anyhow::Result<()> {
    let stack = stack("backfill-bad-reports").await?;
    let (_, entries) = populate(&stack).await?;
    let uri = write_report(&stack, Format::Csv, &entries).await?;
    let bucket = &stack.resources.bucket;
    let manifest_key = uri.trim_start_matches(&format!("s3://{bucket}/"));
    let manifest: Value = serde_json::from_slice(
        &stack
            .s3
            .get_object()
            .bucket(bucket)
            .key(manifest_key)
            .send()
            .await?
            .body
            .collect()
            .await?
            .into_bytes(),
    )?;
    let write = |key: &'static str, manifest: Value| {
        let stack = &stack;
        async move {
            put(stack, key, serde_json::to_vec(&manifest)?).await?;
            anyhow::Ok(format!("s3://{}/{key}", stack.resources.bucket))
        }
    };

    // ORC: refused, saying which formats to choose.
    let mut orc = manifest.clone();
    orc["fileFormat"] = json!("ORC");
    orc["fileSchema"] = json!("struct<bucket:string,key:string,size:bigint,e_tag:string>");
    let orc_uri = write("inventory/orc/manifest.json", orc).await?;
    let error = one_line_failure(&shotlabel(&stack, &["backfill", "--inventory", &orc_uri])?);
    assert!(
        error.contains("ORC") && error.contains("CSV or Apache Parquet"),
        "{error}"
    );

    // A data file the manifest lists but the bucket no longer has.
    let mut missing = manifest.clone();
    missing["files"][1]["key"] = json!("inventory/gone/data/part-9.csv.gz");
    let missing_uri = write("inventory/missing/manifest.json", missing).await?;
    let error = one_line_failure(&shotlabel(
        &stack,
        &["backfill", "--inventory", &missing_uri],
    )?);
    assert!(
        error.contains("inventory/gone/data/part-9.csv.gz") && error.contains("missing"),
        "{error}"
    );

    // A report without the ETag column cannot tell what is labelled already.
    let mut no_etag = manifest.clone();
    no_etag["fileSchema"] = json!("Bucket, Key, Size");
    let no_etag_uri = write("inventory/no-etag/manifest.json", no_etag).await?;
    let error = one_line_failure(&shotlabel(
        &stack,
        &["backfill", "--inventory", &no_etag_uri],
    )?);
    assert!(error.contains("ETag"), "{error}");

    // Data files that are not what the manifest says they are.
    for (format, key) in [
        ("CSV", "inventory/corrupt/data/part-0.csv.gz"),
        ("Parquet", "inventory/corrupt/data/part-0.parquet"),
    ] {
        let bytes = b"neither gzip nor Parquet".to_vec();
        let size = bytes.len();
        put(&stack, key, bytes).await?;
        let mut corrupt = manifest.clone();
        corrupt["fileFormat"] = json!(format);
        corrupt["files"] = json!([{"key": key, "size": size, "MD5checksum": ""}]);
        let corrupt_uri = write("inventory/corrupt/manifest.json", corrupt).await?;
        let error = one_line_failure(&shotlabel(
            &stack,
            &["backfill", "--inventory", &corrupt_uri],
        )?);
        assert!(
            error.contains(&format!("reading inventory file s3://{bucket}/{key}")),
            "{error}"
        );
    }

    // Another bucket's report, no manifest at all, and not an S3 URI.
    let mut other = manifest.clone();
    other["sourceBucket"] = json!("someone-elses-bucket");
    let other_uri = write("inventory/other/manifest.json", other).await?;
    let error = one_line_failure(&shotlabel(
        &stack,
        &["backfill", "--inventory", &other_uri],
    )?);
    assert!(error.contains("someone-elses-bucket"), "{error}");
    let nowhere = format!("s3://{bucket}/inventory/nowhere/manifest.json");
    let error = one_line_failure(&shotlabel(&stack, &["backfill", "--inventory", &nowhere])?);
    assert!(error.contains("no inventory manifest"), "{error}");
    let error = one_line_failure(&shotlabel(
        &stack,
        &["backfill", "--inventory", "manifest.json"],
    )?);
    assert!(error.contains("s3://BUCKET/KEY/manifest.json"), "{error}");

    // Every report was refused before anything was queued (the data files are looked up
    // before the first is read).
    assert!(drain_pending(&stack).await?.is_empty());
    Ok(())
}

/// Keys on and around the listing's cut points, and more than one page in one range.
#[tokio::test(flavor = "multi_thread")]
async fn the_parallel_listing_queues_every_input_once() -> anyhow::Result<()> {
    let stack = stack("backfill-listing").await?;
    let edge_keys = [
        "incoming/ leading space.png",
        "incoming/!bang.png",
        "incoming/0",
        "incoming/0.png",
        "incoming/9/nine.png",
        "incoming/A",
        "incoming/Z.png",
        "incoming/_under.png",
        "incoming/a",
        "incoming/a/b/c.png",
        "incoming/z",
        "incoming/zz.png",
        "incoming/~tilde.png",
        "incoming/é.png",
        "incoming/写真.png",
    ];
    // 1,050 keys in the range after `incoming/m`: two listing pages there.
    let many = (0..1050).map(|i| format!("{INPUT}m/{i:04}.png"));
    let keys: Vec<String> = edge_keys
        .iter()
        .map(|k| (*k).to_owned())
        .chain(many)
        .chain(AWKWARD_KEYS.iter().map(|k| (*k).to_owned()))
        .collect();
    let stack_ref = &stack;
    let mut expected: Vec<(String, String)> = futures_util::stream::iter(keys)
        .map(|key| async move {
            let entry = put(stack_ref, &key, body(&key)).await?;
            anyhow::Ok((key, entry.etag.unwrap_or_default()))
        })
        .buffer_unordered(16)
        .try_collect()
        .await?;
    expected.sort();
    for key in NOT_INPUTS {
        put(&stack, key, body(key)).await?;
    }

    let summary = backfill(&stack, &["--concurrency", "32"])?;
    assert_eq!(summary["source"], "listing", "{summary}");
    assert_eq!(summary["listed"], expected.len(), "{summary}");
    assert_eq!(summary["queued"], expected.len(), "{summary}");
    assert_eq!(drain_pending(&stack).await?, expected);
    Ok(())
}
