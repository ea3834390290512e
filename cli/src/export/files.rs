//! Writing below the export folder: untrusted object keys checked before they become
//! paths, files renamed into place (never through a symlink), JSONL written whole or not
//! at all.

use std::io::Write as _;
use std::path::{Path, PathBuf};

use anyhow::{Context, anyhow};
use serde_json::Value;

use crate::stack::printable;

use super::LABELS_FILE;

/// The longest file or folder name most file systems accept (ext4, APFS, NTFS), in bytes.
/// S3 keys may hold longer segments; writing one would fail the whole export.
const MAX_NAME_BYTES: usize = 255;

/// Why a key's path below DIR is refused, if it is.
pub(super) fn check_relative(relative: &str) -> Result<(), String> {
    if relative.is_empty() {
        return Err("its path is empty".into());
    }
    if relative.starts_with('/') {
        return Err("its path is absolute".into());
    }
    if relative.contains('\\') {
        return Err("its path contains a backslash".into());
    }
    if relative.chars().any(char::is_control) {
        return Err("its path contains a control character".into());
    }
    if relative.contains("://") {
        return Err("its path looks like a URL".into());
    }
    let segments: Vec<&str> = relative.split('/').collect();
    for segment in &segments {
        match *segment {
            "" => return Err("its path has an empty segment".into()),
            "." | ".." => return Err(format!("its path has a `{segment}` segment")),
            _ if segment.len() > MAX_NAME_BYTES => {
                return Err(format!(
                    "its path has a name longer than {MAX_NAME_BYTES} bytes"
                ));
            }
            _ => {}
        }
    }
    let last = segments.last().copied().unwrap_or_default();
    let metadata_like = last
        .strip_prefix("metadata.")
        .is_some_and(|ext| matches!(ext, "jsonl" | "json" | "csv" | "parquet"));
    if metadata_like || (segments.len() == 1 && last == LABELS_FILE) {
        return Err(format!("its name {last} is one of the dataset's own files"));
    }
    Ok(())
}

/// Writes `bytes` to `dir/relative` (already checked) and nowhere else: every folder on
/// the way is created here or must be a real folder (never a symlink), and the file is
/// renamed into place, which replaces a symlink rather than following it.
pub(super) fn write_below(dir: &Path, relative: &str, bytes: &[u8]) -> anyhow::Result<()> {
    let mut parent = dir.to_path_buf();
    let segments: Vec<&str> = relative.split('/').collect();
    let (file_name, folders) = segments.split_last().ok_or_else(|| anyhow!("empty path"))?;
    for folder in folders {
        parent.push(folder);
        match std::fs::symlink_metadata(&parent) {
            Ok(meta) if meta.is_dir() => {}
            Ok(_) => {
                return Err(anyhow!(
                    "{} is in the way (not a folder; symlinks are not followed)",
                    printable(&parent.display().to_string())
                ));
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                std::fs::create_dir(&parent).with_context(|| {
                    format!("cannot create {}", printable(&parent.display().to_string()))
                })?;
            }
            Err(e) => {
                return Err(anyhow!(
                    "cannot inspect {}: {e}",
                    printable(&parent.display().to_string())
                ));
            }
        }
    }
    let target = parent.join(file_name);
    let mut temp = tempfile::Builder::new()
        .prefix(".shotlabel-")
        .tempfile_in(&parent)
        .with_context(|| format!("cannot write in {}", parent.display()))?;
    temp.write_all(bytes)
        .and_then(|()| temp.flush())
        .with_context(|| format!("cannot write {}", printable(&target.display().to_string())))?;
    temp.persist(&target).map_err(|e| {
        anyhow!(
            "cannot write {}: {}",
            printable(&target.display().to_string()),
            e.error
        )
    })?;
    Ok(())
}

/// A JSONL file written to a temporary name in its folder and renamed into place when
/// complete, so a failed export leaves no half file (and a symlink there is replaced, not
/// followed).
pub(super) struct JsonlFile {
    path: PathBuf,
    writer: std::io::BufWriter<tempfile::NamedTempFile>,
}

impl std::fmt::Debug for JsonlFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JsonlFile")
            .field("path", &self.path)
            .finish()
    }
}

impl JsonlFile {
    pub(super) fn create(dir: &Path, name: &str) -> anyhow::Result<Self> {
        let temp = tempfile::Builder::new()
            .prefix(".shotlabel-")
            .tempfile_in(dir)
            .with_context(|| format!("cannot write in {}", dir.display()))?;
        Ok(Self {
            path: dir.join(name),
            writer: std::io::BufWriter::new(temp),
        })
    }

    pub(super) fn write(&mut self, row: &Value) -> anyhow::Result<()> {
        serde_json::to_writer(&mut self.writer, row)?;
        self.writer
            .write_all(b"\n")
            .with_context(|| format!("cannot write {}", self.path.display()))
    }

    pub(super) fn finish(self) -> anyhow::Result<()> {
        let path = self.path;
        let temp = self
            .writer
            .into_inner()
            .map_err(|e| anyhow!("cannot write {}: {}", path.display(), e.error()))?;
        temp.persist(&path)
            .map_err(|e| anyhow!("cannot write {}: {}", path.display(), e.error))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_that_would_leave_the_folder_are_refused() {
        for bad in [
            "../escape.png",
            "a/../../x.png",
            "a/./x.png",
            "/etc/passwd",
            "a//b.png",
            "a\\..\\b.png",
            "a\u{0}b.png",
            "a\nb.png",
            "x/",
            "",
            "..",
            "metadata.jsonl",
            "sub/metadata.csv",
            "labels.jsonl",
            "file://etc/passwd",
            "n".repeat(256).as_str(),
            format!("sub/{}.png", "n".repeat(300)).as_str(),
        ] {
            assert!(check_relative(bad).is_err(), "{bad:?} should be refused");
        }
        for good in [
            "a.png",
            "2024/01/shot 1.png",
            "..hidden.png",
            "a..b/c.png",
            "sub/labels.jsonl",
        ] {
            assert!(check_relative(good).is_ok(), "{good:?} should be accepted");
        }
    }

    #[test]
    fn writes_stay_below_the_folder_and_do_not_follow_symlinks() -> anyhow::Result<()> {
        let root = tempfile::tempdir()?;
        let dir = root.path().join("out");
        std::fs::create_dir(&dir)?;
        write_below(&dir, "a/b/c.png", b"png")?;
        assert_eq!(std::fs::read(dir.join("a/b/c.png"))?, b"png");

        let elsewhere = root.path().join("elsewhere");
        std::fs::create_dir(&elsewhere)?;
        #[cfg(unix)]
        {
            std::os::unix::fs::symlink(&elsewhere, dir.join("link"))?;
            assert!(write_below(&dir, "link/x.png", b"png").is_err());
            std::os::unix::fs::symlink(elsewhere.join("target.png"), dir.join("file.png"))?;
            write_below(&dir, "file.png", b"new")?;
            assert!(!elsewhere.join("target.png").exists());
            assert!(
                !std::fs::symlink_metadata(dir.join("file.png"))?
                    .file_type()
                    .is_symlink()
            );
        }
        assert_eq!(std::fs::read_dir(&elsewhere)?.count(), 0);
        Ok(())
    }
}
