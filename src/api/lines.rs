//! Splitting a streamed request body into lines without buffering it whole (NDJSON uploads,
//! suppression imports). Pure code.

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
