//! Line-by-line uploads (NDJSON recipients, suppression imports): a streamed request body split
//! into lines without buffering it whole, and the one reader both uploads use. It skips blank
//! lines, strips a CR before the LF, refuses lines that are too long or not UTF-8 on their own,
//! counts rows against a limit, and hands each line to the upload's [`Rows`]. The splitter is
//! pure code; the reader awaits the body and the rows' spool writes.

use std::future::Future;
use std::time::Duration;

use axum::body::Body;
use axum::http::StatusCode;
use futures_util::StreamExt;

use super::ApiError;
use super::idempotency::{Fingerprint, Fingerprinter};

/// What an upload does with its lines.
pub(super) trait Rows {
    /// Takes one non-blank line (`line` numbered from 0), already known to be UTF-8 text.
    fn row(&mut self, text: &str, line: u64) -> impl Future<Output = Result<(), ApiError>> + Send;
    /// Refuses one line on its own, for `error`; the rest go on.
    fn refuse(&mut self, line: u64, error: String);
}

/// The limits of a line-by-line upload.
pub(super) struct LineLimits {
    pub max_line_bytes: usize,
    /// Most rows (non-blank lines); past it the upload fails with `too_many`.
    pub max_rows: u64,
    pub too_many: fn(u64) -> ApiError,
    /// Longest wait for the next piece of the body.
    pub piece_timeout: Duration,
}

/// How a line-by-line upload ended, when it did not end well.
pub(super) enum ReadError {
    /// The body broke off or stalled after the lines before it were handed over; the caller
    /// says whether those stand.
    Body(ApiError),
    /// The rows refused the upload as a whole (or there were too many).
    Rows(ApiError),
}

/// Reads `body` line by line into `rows` (see the module documentation), feeding every byte to
/// `fingerprint` if given.
pub(super) async fn read_lines(
    body: Body,
    limits: &LineLimits,
    rows: &mut impl Rows,
    mut fingerprint: Option<&mut Fingerprinter>,
) -> Result<(), ReadError> {
    let mut seen = 0u64;
    let mut stream = body.into_data_stream();
    let mut split = LineSplitter::new(limits.max_line_bytes);
    while let Some(chunk) = next_chunk(&mut stream, limits.piece_timeout)
        .await
        .map_err(ReadError::Body)?
    {
        if let Some(f) = fingerprint.as_deref_mut() {
            f.update(&chunk);
        }
        let mut pos = 0;
        while let Some(p) = split.next_piece(&chunk, &mut pos) {
            take(p, limits, &mut seen, rows).await?;
        }
    }
    if let Some(p) = split.finish() {
        take(p, limits, &mut seen, rows).await?;
    }
    Ok(())
}

/// Reads `body` whole into `fingerprint` without keeping it (a retried upload, to compare with
/// the one its key answered).
pub(super) async fn fingerprint_body(
    body: Body,
    piece_timeout: Duration,
    mut fingerprint: Fingerprinter,
) -> Result<Fingerprint, ApiError> {
    let mut stream = body.into_data_stream();
    while let Some(chunk) = next_chunk(&mut stream, piece_timeout).await? {
        fingerprint.update(&chunk);
    }
    Ok(fingerprint.finish())
}

/// The next piece of a body (`None` at its end), waiting `piece_timeout` at most.
async fn next_chunk(
    stream: &mut axum::body::BodyDataStream,
    piece_timeout: Duration,
) -> Result<Option<axum::body::Bytes>, ApiError> {
    match tokio::time::timeout(piece_timeout, stream.next()).await {
        Err(_) => Err(super::body_timeout()),
        Ok(None) => Ok(None),
        Ok(Some(Ok(c))) => Ok(Some(c)),
        Ok(Some(Err(e))) => Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "body_read_error",
            format!("reading the body failed: {e}"),
        )),
    }
}

async fn take(
    piece: Piece<'_>,
    limits: &LineLimits,
    seen: &mut u64,
    rows: &mut impl Rows,
) -> Result<(), ReadError> {
    let (n, raw) = match piece {
        Piece::Line(n, raw) => {
            let raw = raw.strip_suffix(b"\r").unwrap_or(raw);
            if raw.iter().all(u8::is_ascii_whitespace) {
                return Ok(());
            }
            (n, Some(raw))
        }
        Piece::TooLong(n) => (n, None),
    };
    *seen += 1;
    if *seen > limits.max_rows {
        return Err(ReadError::Rows((limits.too_many)(limits.max_rows)));
    }
    match raw.map(std::str::from_utf8) {
        None => rows.refuse(
            n,
            format!("line is longer than {} bytes", limits.max_line_bytes),
        ),
        Some(Err(_)) => rows.refuse(n, "line is not valid UTF-8".into()),
        Some(Ok(text)) => rows.row(text, n).await.map_err(ReadError::Rows)?,
    }
    Ok(())
}

/// One line of the body, without its LF (a CR before it is left for the caller), numbered from 0.
pub(super) enum Piece<'a> {
    Line(u64, &'a [u8]),
    /// A line longer than the limit; its bytes were dropped.
    TooLong(u64),
}

/// Carries a partial line from one body chunk to the next, up to `max` bytes.
pub(super) struct LineSplitter {
    carry: Vec<u8>,
    /// `carry` held the last line handed out; clear it before the next.
    carry_used: bool,
    /// Dropping the rest of a line that is already too long.
    skipping: bool,
    max: usize,
    line_no: u64,
}

impl LineSplitter {
    pub(super) fn new(max: usize) -> LineSplitter {
        LineSplitter {
            carry: Vec::new(),
            carry_used: false,
            skipping: false,
            max,
            line_no: 0,
        }
    }

    /// The next complete line of `chunk` from `*pos`, advancing `*pos`; `None` once the chunk is
    /// used up (its unfinished tail is kept for the next chunk).
    pub(super) fn next_piece<'a>(
        &'a mut self,
        chunk: &'a [u8],
        pos: &mut usize,
    ) -> Option<Piece<'a>> {
        if self.carry_used {
            self.carry.clear();
            self.carry_used = false;
        }
        let rest = chunk.get(*pos..).unwrap_or_default();
        let Some(i) = memchr::memchr(b'\n', rest) else {
            *pos = chunk.len();
            if !self.skipping {
                if self.carry.len() + rest.len() > self.max {
                    self.skipping = true;
                    self.carry.clear();
                } else {
                    self.carry.extend_from_slice(rest);
                }
            }
            return None;
        };
        *pos += i + 1;
        let n = self.line_no;
        self.line_no += 1;
        let piece = &rest[..i];
        if std::mem::take(&mut self.skipping) || self.carry.len() + piece.len() > self.max {
            self.carry.clear();
            return Some(Piece::TooLong(n));
        }
        if self.carry.is_empty() {
            return Some(Piece::Line(n, piece));
        }
        self.carry.extend_from_slice(piece);
        self.carry_used = true;
        Some(Piece::Line(n, &self.carry))
    }

    /// The last line, when the body did not end with LF.
    pub(super) fn finish(&mut self) -> Option<Piece<'_>> {
        if self.carry_used {
            self.carry.clear();
        }
        if self.skipping {
            Some(Piece::TooLong(self.line_no))
        } else if self.carry.is_empty() {
            None
        } else {
            Some(Piece::Line(self.line_no, &self.carry))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn split(chunks: &[&str], max: usize) -> Vec<String> {
        let mut s = LineSplitter::new(max);
        let mut out = Vec::new();
        let show = |p: Piece| match p {
            Piece::Line(n, l) => format!("{n}:{}", String::from_utf8_lossy(l)),
            Piece::TooLong(n) => format!("{n}:too long"),
        };
        for c in chunks {
            let mut pos = 0;
            while let Some(p) = s.next_piece(c.as_bytes(), &mut pos) {
                out.push(show(p));
            }
        }
        if let Some(p) = s.finish() {
            out.push(show(p));
        }
        out
    }

    #[test]
    fn lines_span_chunks_and_long_ones_are_named() {
        assert_eq!(split(&["a\nb", "c\n", "d"], 10), ["0:a", "1:bc", "2:d"]);
        assert_eq!(
            split(&["0123", "456789ab", "c\nok\n", "xxxxxxxxxxxx\n"], 10),
            ["0:too long", "1:ok", "2:too long"]
        );
        assert_eq!(split(&["a\n", "0123456789abc"], 10), ["0:a", "1:too long"]);
        assert_eq!(split(&["\n\n"], 10), ["0:", "1:"]);
    }
}
