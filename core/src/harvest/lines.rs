//! Reading a provider's output and error files: bounded lines, parsed tolerantly.

use tokio::io::AsyncBufReadExt;

use crate::batch_api::OutputLine;

/// The longest output or error line read. An answer line is a few kilobytes; a longer
/// line is junk and is skipped without being held in memory (its item goes round again).
pub const MAX_LINE_BYTES: usize = 8 * 1024 * 1024;

/// One line of a provider's file, read as bytes.
pub(super) enum RawLine {
    Line(Vec<u8>),
    /// Over [`MAX_LINE_BYTES`]: this many bytes, dropped as they were read.
    TooLong(usize),
}

/// Reads the next line (without its `\n`), holding at most `max` bytes of it. A file
/// that ends without a newline still yields its last line. `None` at the end.
pub(super) async fn read_raw_line<R: tokio::io::AsyncBufRead + Unpin>(
    reader: &mut R,
    max: usize,
) -> std::io::Result<Option<RawLine>> {
    let mut line = Vec::new();
    let mut total = 0usize;
    let mut started = false;
    loop {
        let available = reader.fill_buf().await?;
        if available.is_empty() {
            if !started {
                return Ok(None);
            }
            break;
        }
        started = true;
        let newline = available.iter().position(|b| *b == b'\n');
        let chunk = &available[..newline.unwrap_or(available.len())];
        total = total.saturating_add(chunk.len());
        if total <= max {
            line.extend_from_slice(chunk);
        } else if !line.is_empty() {
            line = Vec::new();
        }
        let used = newline.map_or(available.len(), |i| i + 1);
        reader.consume(used);
        if newline.is_some() {
            break;
        }
    }
    Ok(Some(if total > max {
        RawLine::TooLong(total)
    } else {
        RawLine::Line(line)
    }))
}

/// One line of an output or error file, as [`harvest`] reads it: the bytes between two
/// newlines (a trailing `\r` is whitespace). `None` for a blank line, which is skipped;
/// otherwise the parsed line, or why it is not one (not UTF-8, not JSON, or no
/// `custom_id`), in which case the line is skipped and its item goes round again.
pub fn parse_output_line(line: &[u8]) -> Option<Result<OutputLine, serde_json::Error>> {
    if line.trim_ascii().is_empty() {
        return None;
    }
    Some(serde_json::from_slice(line))
}
