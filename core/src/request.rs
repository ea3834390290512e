//! Batch input files: one JSONL request line per prepared image, split into files that
//! each respect the provider's limits on request count and bytes.
//!
//! Lines are streamed to disk as they are made, so a 200 MB batch is never held in memory.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use base64::Engine;
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
    /// OpenAI's published limits ("200 MB" taken as 200,000,000 bytes), which the
    /// other profiles assume too (`crate::provider`).
    fn default() -> Self {
        Self {
            max_requests: 50_000,
            max_bytes: 200_000_000,
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
    match task.line_template() {
        Some(template) => template.render(custom_id, image_data_uri.len() + 2, |out| {
            write_json_string(out, image_data_uri)
        }),
        None => tree_line(custom_id, task, image_data_uri),
    }
}

/// The same line as [`request_line`] for the data URI of this JPEG
/// ([`crate::prepare::data_uri`]), with the base64 written straight into the line.
pub fn request_line_with_jpeg(custom_id: &str, task: &Task, jpeg: &[u8]) -> Vec<u8> {
    let Some(template) = task.line_template() else {
        return tree_line(custom_id, task, &crate::prepare::data_uri(jpeg));
    };
    let prefix = crate::prepare::JPEG_DATA_URI_PREFIX.as_bytes();
    let encoded = base64::encoded_len(jpeg.len(), true).unwrap_or(0);
    template.render(custom_id, prefix.len() + encoded + 2, |out| {
        out.push(b'"');
        out.extend_from_slice(prefix);
        let start = out.len();
        out.resize(start + encoded, 0);
        // The size is computed above, so the slice is exactly large enough.
        let written = base64::engine::general_purpose::STANDARD
            .encode_slice(jpeg, &mut out[start..])
            .unwrap_or(0);
        out.truncate(start + written);
        out.push(b'"');
    })
}

/// The line as a JSON tree serialised per image: the reference the template must match.
fn tree_line(custom_id: &str, task: &Task, image_data_uri: &str) -> Vec<u8> {
    let line = json!({
        "custom_id": custom_id,
        "method": "POST",
        "url": CHAT_COMPLETIONS,
        "body": task.chat_completion_body(image_data_uri),
    });
    line.to_string().into_bytes()
}

/// A JSON string token, escaped exactly as serde_json escapes it. Base64 data URIs need
/// no escaping, so the common case is one copy.
fn write_json_string(out: &mut Vec<u8>, text: &str) {
    if text.bytes().any(|b| b == b'"' || b == b'\\' || b < 0x20) {
        // Writing JSON into a Vec cannot fail.
        let _ = serde_json::to_writer(&mut *out, text);
    } else {
        out.push(b'"');
        out.extend_from_slice(text.as_bytes());
        out.push(b'"');
    }
}

/// Placeholders that no task can produce in its serialised body: the control characters
/// are written as `\u0001`, and a task whose text holds that exact sequence falls back to
/// the tree ([`LineTemplate::new`] checks that each placeholder occurs once).
const ID_MARK: &str = "\u{1}shotlabel-custom-id\u{1}";
const IMAGE_MARK: &str = "\u{1}shotlabel-image-url\u{1}";

#[derive(Debug, Clone, PartialEq, Eq)]
enum Piece {
    Text(Vec<u8>),
    CustomId,
    Image,
}

/// A task's request line as JSON text with holes for the custom id and the image URL,
/// made once per task: a line is then a few copies and a base64 encode instead of a JSON
/// tree built, cloned and serialised per image. The text is what serialising the tree
/// gives, so the lines are byte for byte the same.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LineTemplate {
    pieces: Vec<Piece>,
    fixed_len: usize,
}

impl LineTemplate {
    /// `None` when the task's own text contains a placeholder.
    pub fn new(task: &Task) -> Option<Self> {
        let text = tree_line(ID_MARK, task, IMAGE_MARK);
        let id_token = serde_json::to_vec(ID_MARK).ok()?;
        let image_token = serde_json::to_vec(IMAGE_MARK).ok()?;
        let find = |needle: &[u8]| -> Vec<usize> {
            text.windows(needle.len())
                .enumerate()
                .filter(|(_, w)| *w == needle)
                .map(|(i, _)| i)
                .collect()
        };
        let (ids, images) = (find(&id_token), find(&image_token));
        let ([id_at], [image_at]) = (ids.as_slice(), images.as_slice()) else {
            return None;
        };
        let mut holes = [
            (*id_at, id_token.len(), Piece::CustomId),
            (*image_at, image_token.len(), Piece::Image),
        ];
        holes.sort_by_key(|(at, _, _)| *at);
        let mut pieces = Vec::new();
        let mut from = 0;
        for (at, len, piece) in holes {
            pieces.push(Piece::Text(text[from..at].to_vec()));
            pieces.push(piece);
            from = at + len;
        }
        pieces.push(Piece::Text(text[from..].to_vec()));
        let fixed_len = pieces
            .iter()
            .map(|p| match p {
                Piece::Text(t) => t.len(),
                _ => 0,
            })
            .sum();
        Some(Self { pieces, fixed_len })
    }

    /// The line, with `image` writing the image URL's JSON string token (quotes
    /// included) of about `image_len` bytes.
    fn render(
        &self,
        custom_id: &str,
        image_len: usize,
        image: impl FnOnce(&mut Vec<u8>),
    ) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.fixed_len + custom_id.len() + 2 + image_len);
        let mut image = Some(image);
        for piece in &self.pieces {
            match piece {
                Piece::Text(text) => out.extend_from_slice(text),
                Piece::CustomId => write_json_string(&mut out, custom_id),
                Piece::Image => {
                    if let Some(write) = image.take() {
                        write(&mut out);
                    }
                }
            }
        }
        out
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_template_gives_the_tree_s_bytes() -> Result<(), crate::task::TaskError> {
        let task = Task::default_task()?;
        assert!(task.line_template().is_some());
        for (id, uri) in [
            ("s-0", "data:image/jpeg;base64,AAAA"),
            ("odd \"id\"\\\n", "data:image/jpeg;base64,/+8="),
            ("s-1", "a \"quoted\" url with \\ and \u{7} and ü"),
            ("", ""),
        ] {
            assert_eq!(
                String::from_utf8_lossy(&request_line(id, &task, uri)),
                String::from_utf8_lossy(&tree_line(id, &task, uri)),
                "{id:?} {uri:?}"
            );
        }
        let jpeg: Vec<u8> = (0..=255u8).cycle().take(1000).collect();
        for len in [0, 1, 2, 3, 4, 1000] {
            let uri = crate::prepare::data_uri(&jpeg[..len]);
            assert_eq!(
                request_line_with_jpeg("s-2", &task, &jpeg[..len]),
                tree_line("s-2", &task, &uri)
            );
        }
        Ok(())
    }

    #[test]
    fn a_task_whose_text_holds_a_placeholder_falls_back_to_the_tree()
    -> Result<(), crate::task::TaskError> {
        // Inside longer text the placeholder is no JSON string token of its own, so the
        // template still holds; as the whole text, it is a second hole and must not.
        let mut spec = Task::default_task()?.spec().clone();
        spec.user_text = format!("look {IMAGE_MARK}");
        let embedded = Task::new(spec.clone())?;
        assert!(embedded.line_template().is_some());
        assert_eq!(
            request_line("s-0", &embedded, "data:image/jpeg;base64,AAAA"),
            tree_line("s-0", &embedded, "data:image/jpeg;base64,AAAA")
        );
        spec.user_text = IMAGE_MARK.to_owned();
        let task = Task::new(spec)?;
        assert!(task.line_template().is_none());
        let line = request_line("s-0", &task, "data:image/jpeg;base64,AAAA");
        assert_eq!(line, tree_line("s-0", &task, "data:image/jpeg;base64,AAAA"));
        assert_eq!(
            request_line_with_jpeg("s-0", &task, b"abc"),
            tree_line("s-0", &task, &crate::prepare::data_uri(b"abc"))
        );
        Ok(())
    }
}
