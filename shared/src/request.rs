//! Batch input files: one JSONL request line per prepared image, split into files that
//! each respect the provider's limits on request count and bytes.
//!
//! Lines are streamed to disk as they are made, so a 200 MB batch is never held in memory.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use serde_json::json;

use crate::task::Task;

/// The endpoint every request line targets.
pub const CHAT_COMPLETIONS: &str = "/v1/chat/completions";

/// Provider limits on one input file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchLimits {
    pub max_requests: usize,
    pub max_bytes: u64,
}

impl Default for BatchLimits {
    /// OpenAI's published limits, which Inference.net follows.
    fn default() -> Self {
        Self {
            max_requests: 50_000,
            max_bytes: 200 * 1024 * 1024,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RequestFileError {
    #[error("a request line of {bytes} bytes cannot fit in a batch file of at most {limit} bytes")]
    LineTooLarge { bytes: u64, limit: u64 },
    #[error("batch limits must allow at least one request and one byte")]
    BadLimits,
    #[error("writing batch file {path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

/// A short id, unique within a submission: the submission id and the item's index in
/// base 36. Short ids keep lines small and fit providers that cap ids at 64 characters.
pub fn custom_id(submission_id: &str, index: usize) -> String {
    let mut digits = Vec::new();
    let mut n = index;
    loop {
        let d = (n % 36) as u8;
        digits.push(if d < 10 { b'0' + d } else { b'a' + d - 10 });
        n /= 36;
        if n == 0 {
            break;
        }
    }
    digits.reverse();
    format!("{submission_id}-{}", String::from_utf8_lossy(&digits))
}

/// One JSONL line (without the newline) asking the task's question about one image.
pub fn request_line(custom_id: &str, task: &Task, image_data_uri: &str) -> Vec<u8> {
    let line = json!({
        "custom_id": custom_id,
        "method": "POST",
        "url": CHAT_COMPLETIONS,
        "body": task.chat_completion_body(image_data_uri),
    });
    line.to_string().into_bytes()
}

/// A finished input file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BatchFile {
    pub path: PathBuf,
    pub requests: usize,
    pub bytes: u64,
    /// The custom ids in the file, in order.
    pub custom_ids: Vec<String>,
}

struct OpenFile {
    writer: BufWriter<File>,
    file: BatchFile,
}

/// Writes request lines into as many files as the limits require.
pub struct BatchFileWriter {
    dir: PathBuf,
    prefix: String,
    limits: BatchLimits,
    current: Option<OpenFile>,
    finished: Vec<BatchFile>,
    /// Files already returned by `take_finished`; keeps file names and indices unique.
    handed_over: usize,
}

impl std::fmt::Debug for BatchFileWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BatchFileWriter")
            .field("dir", &self.dir)
            .field("limits", &self.limits)
            .field("finished", &self.finished.len())
            .finish_non_exhaustive()
    }
}

impl BatchFileWriter {
    /// Files are created in `dir` as `<prefix>-<n>.jsonl`.
    pub fn new(dir: &Path, prefix: &str, limits: BatchLimits) -> Result<Self, RequestFileError> {
        if limits.max_requests == 0 || limits.max_bytes == 0 {
            return Err(RequestFileError::BadLimits);
        }
        Ok(Self {
            dir: dir.to_owned(),
            prefix: prefix.to_owned(),
            limits,
            current: None,
            finished: Vec::new(),
            handed_over: 0,
        })
    }

    /// Appends one line, starting a new file first when this one would break a limit.
    /// Returns the index of the file the line went into.
    pub fn push(&mut self, custom_id: &str, line: &[u8]) -> Result<usize, RequestFileError> {
        let line_bytes = line.len() as u64 + 1;
        if line_bytes > self.limits.max_bytes {
            return Err(RequestFileError::LineTooLarge {
                bytes: line_bytes,
                limit: self.limits.max_bytes,
            });
        }
        let full = self.current.as_ref().is_some_and(|open| {
            open.file.requests >= self.limits.max_requests
                || open.file.bytes + line_bytes > self.limits.max_bytes
        });
        if full {
            self.close_current()?;
        }
        if self.current.is_none() {
            self.open_next()?;
        }
        let index = self.handed_over + self.finished.len();
        let Some(open) = self.current.as_mut() else {
            return Err(RequestFileError::BadLimits);
        };
        let path = open.file.path.display().to_string();
        let io = |source| RequestFileError::Io {
            path: path.clone(),
            source,
        };
        open.writer.write_all(line).map_err(io)?;
        open.writer.write_all(b"\n").map_err(io)?;
        open.file.requests += 1;
        open.file.bytes += line_bytes;
        open.file.custom_ids.push(custom_id.to_owned());
        Ok(index)
    }

    /// The files completed so far (a later line did not fit), handed over once each, so
    /// a caller can submit a full file while the next one is being written.
    pub fn take_finished(&mut self) -> Vec<BatchFile> {
        self.handed_over += self.finished.len();
        std::mem::take(&mut self.finished)
    }

    /// Flushes and returns every file not yet handed over, in order.
    pub fn finish(mut self) -> Result<Vec<BatchFile>, RequestFileError> {
        self.close_current()?;
        Ok(self.finished)
    }

    /// Ends the file being written, so that `take_finished` hands it over too.
    pub fn close(&mut self) -> Result<(), RequestFileError> {
        self.close_current()
    }

    fn open_next(&mut self) -> Result<(), RequestFileError> {
        let path = self.dir.join(format!(
            "{}-{}.jsonl",
            self.prefix,
            self.handed_over + self.finished.len()
        ));
        let file = File::create(&path).map_err(|source| RequestFileError::Io {
            path: path.display().to_string(),
            source,
        })?;
        self.current = Some(OpenFile {
            writer: BufWriter::with_capacity(1 << 20, file),
            file: BatchFile {
                path,
                requests: 0,
                bytes: 0,
                custom_ids: Vec::new(),
            },
        });
        Ok(())
    }

    fn close_current(&mut self) -> Result<(), RequestFileError> {
        if let Some(mut open) = self.current.take() {
            open.writer.flush().map_err(|source| RequestFileError::Io {
                path: open.file.path.display().to_string(),
                source,
            })?;
            self.finished.push(open.file);
        }
        Ok(())
    }
}
