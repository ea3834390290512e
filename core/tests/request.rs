//! Request lines and splitting input files by the provider's limits.

use std::collections::HashSet;

use shotlabel_core::request::{
    BatchFileWriter, BatchLimits, CHAT_COMPLETIONS, RequestFileError, custom_id, request_line,
};
use shotlabel_core::task::Task;

#[test]
fn custom_ids_are_short_and_unique() {
    let ids: HashSet<String> = (0..100_000).map(|i| custom_id("s7k2m9qa", i)).collect();
    assert_eq!(ids.len(), 100_000);
    assert_eq!(custom_id("s", 0), "s-0");
    assert_eq!(custom_id("s", 35), "s-z");
    assert_eq!(custom_id("s", 36), "s-10");
    assert!(ids.iter().all(|id| id.len() <= 64));
}

#[test]
fn a_request_line_is_one_json_object_for_chat_completions() -> anyhow::Result<()> {
    let task = Task::default_task()?;
    let line = request_line("s-0", &task, "data:image/jpeg;base64,AAAA");
    assert!(!line.contains(&b'\n'));
    let value: serde_json::Value = serde_json::from_slice(&line)?;
    assert_eq!(value["custom_id"], "s-0");
    assert_eq!(value["method"], "POST");
    assert_eq!(value["url"], CHAT_COMPLETIONS);
    assert_eq!(
        value["body"],
        task.chat_completion_body("data:image/jpeg;base64,AAAA")
    );
    Ok(())
}

fn read_ids(path: &std::path::Path) -> anyhow::Result<Vec<String>> {
    let text = std::fs::read_to_string(path)?;
    text.lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l)?;
            Ok(v["custom_id"].as_str().unwrap_or_default().to_owned())
        })
        .collect()
}

#[test]
fn files_split_by_request_count() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let limits = BatchLimits {
        max_requests: 3,
        max_bytes: 1 << 20,
    };
    let mut writer = BatchFileWriter::new(dir.path(), "sub", limits)?;
    let task = Task::default_task()?;
    for i in 0..8 {
        let id = custom_id("sub", i);
        writer.push(
            &id,
            &request_line(&id, &task, "data:image/jpeg;base64,AAAA"),
        )?;
    }
    let files = writer.finish()?;
    assert_eq!(
        files.iter().map(|f| f.requests).collect::<Vec<_>>(),
        vec![3, 3, 2]
    );
    let mut all = Vec::new();
    for file in &files {
        let ids = read_ids(&file.path)?;
        assert_eq!(ids, file.custom_ids);
        assert_eq!(std::fs::metadata(&file.path)?.len(), file.bytes);
        all.extend(ids);
    }
    assert_eq!(all, (0..8).map(|i| custom_id("sub", i)).collect::<Vec<_>>());
    Ok(())
}

#[test]
fn files_split_by_bytes() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let limits = BatchLimits {
        max_requests: 1000,
        max_bytes: 250,
    };
    let mut writer = BatchFileWriter::new(dir.path(), "b", limits)?;
    // 99 bytes + newline = 100 per line: two fit in 250, a third does not.
    for i in 0..5 {
        let line = format!("{{\"custom_id\":\"{i}\",\"pad\":\"{}\"}}", "x".repeat(73));
        assert_eq!(line.len(), 99);
        writer.push(&i.to_string(), line.as_bytes())?;
    }
    let files = writer.finish()?;
    assert_eq!(
        files.iter().map(|f| f.requests).collect::<Vec<_>>(),
        vec![2, 2, 1]
    );
    for file in &files {
        assert!(file.bytes <= 250);
        assert_eq!(std::fs::metadata(&file.path)?.len(), file.bytes);
    }
    Ok(())
}

#[test]
fn a_line_larger_than_a_file_is_refused() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let mut writer = BatchFileWriter::new(
        dir.path(),
        "b",
        BatchLimits {
            max_requests: 10,
            max_bytes: 50,
        },
    )?;
    let err = writer.push("x", &[b'a'; 60]).expect_err("too big");
    assert!(matches!(
        err,
        RequestFileError::LineTooLarge {
            bytes: 61,
            limit: 50
        }
    ));
    // The writer is still usable and wrote nothing for the refused line.
    writer.push("y", b"{}")?;
    let files = writer.finish()?;
    assert_eq!(files.len(), 1);
    assert_eq!(files[0].custom_ids, vec!["y".to_owned()]);
    assert!(
        BatchFileWriter::new(
            dir.path(),
            "b",
            BatchLimits {
                max_requests: 0,
                max_bytes: 1
            }
        )
        .is_err()
    );
    Ok(())
}

#[test]
fn no_lines_no_files() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let files = BatchFileWriter::new(dir.path(), "b", BatchLimits::default())?.finish()?;
    assert!(files.is_empty());
    Ok(())
}
