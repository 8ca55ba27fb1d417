//! SMTP replies as typed data (RFC 5321 §4.2, enhanced status codes per RFC 3463).
//!
//! Pure parsing, no I/O: the client feeds it lines. Hostile servers are expected, so line length,
//! line count and code consistency are all bounded and checked; a violation is a protocol error,
//! never a panic.

use std::fmt;

use serde::{Deserialize, Serialize};

/// Longest reply line accepted (RFC 5321 allows 512; real servers are sloppier).
pub const MAX_REPLY_LINE: usize = 4096;
/// Most lines in one multi-line reply.
pub const MAX_REPLY_LINES: usize = 128;

/// The command a reply answers, kept with it for logs and classification.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Command {
    Connect,
    Ehlo,
    Helo,
    StartTls,
    Mail,
    Rcpt,
    Data,
    /// The reply to the message content's final dot.
    Dot,
    Rset,
    Quit,
    /// The reply to `BDAT … LAST` and its chunk (RFC 3030), in place of DATA and the dot.
    Bdat,
}

impl fmt::Display for Command {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = match self {
            Command::Connect => "CONNECT",
            Command::Ehlo => "EHLO",
            Command::Helo => "HELO",
            Command::StartTls => "STARTTLS",
            Command::Mail => "MAIL",
            Command::Rcpt => "RCPT",
            Command::Data => "DATA",
            Command::Dot => "DATA-END",
            Command::Rset => "RSET",
            Command::Quit => "QUIT",
            Command::Bdat => "BDAT",
        };
        f.write_str(s)
    }
}

/// An enhanced status code `class.subject.detail` (RFC 3463).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct EnhancedCode(pub u8, pub u16, pub u16);

impl fmt::Display for EnhancedCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}.{}", self.0, self.1, self.2)
    }
}

impl EnhancedCode {
    /// Parses `x.y.z` at the start of `text`, followed by a space or the end.
    pub fn parse_prefix(text: &str) -> Option<(EnhancedCode, &str)> {
        let end = text.find(' ').unwrap_or(text.len());
        let mut parts = text[..end].split('.');
        let class: u8 = parts.next()?.parse().ok()?;
        let subject_s = parts.next()?;
        let detail_s = parts.next()?;
        if parts.next().is_some()
            || !matches!(class, 2 | 4 | 5)
            || subject_s.len() > 3
            || detail_s.len() > 3
        {
            return None;
        }
        let subject = subject_s.parse().ok()?;
        let detail = detail_s.parse().ok()?;
        Some((
            EnhancedCode(class, subject, detail),
            text[end..].trim_start(),
        ))
    }
}

/// A complete reply.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reply {
    pub code: u16,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub enhanced: Option<EnhancedCode>,
    /// The text of all lines, joined with "\n", without codes.
    pub text: String,
    pub command: Command,
}

impl Reply {
    pub fn is_positive(&self) -> bool {
        (200..400).contains(&self.code)
    }
    pub fn is_transient(&self) -> bool {
        (400..500).contains(&self.code)
    }
    pub fn is_permanent(&self) -> bool {
        self.code >= 500
    }
    /// The lines of the text (EHLO keywords, for example).
    pub fn lines(&self) -> impl Iterator<Item = &str> {
        self.text.split('\n')
    }
    /// One line for logs: `550 5.1.1 no such user`.
    pub fn summary(&self) -> String {
        let first = self.text.split('\n').next().unwrap_or("");
        match self.enhanced {
            Some(e) => format!("{} {} {}", self.code, e, first),
            None => format!("{} {}", self.code, first),
        }
    }
}

impl fmt::Display for Reply {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.summary())
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReplyError {
    #[error("reply line longer than {MAX_REPLY_LINE} bytes")]
    LineTooLong,
    #[error("reply has more than {MAX_REPLY_LINES} lines")]
    TooManyLines,
    #[error("malformed reply line: {0:?}")]
    Malformed(String),
    #[error("reply lines disagree on the code ({0} then {1})")]
    CodeMismatch(u16, u16),
}

/// Accumulates the lines of one reply.
#[derive(Debug, Default)]
pub struct ReplyBuilder {
    code: Option<u16>,
    lines: Vec<String>,
}

impl ReplyBuilder {
    /// Feeds one line (without CRLF). Returns the reply when this line was the last.
    pub fn push(&mut self, line: &[u8], command: Command) -> Result<Option<Reply>, ReplyError> {
        if line.len() > MAX_REPLY_LINE {
            return Err(ReplyError::LineTooLong);
        }
        if self.lines.len() >= MAX_REPLY_LINES {
            return Err(ReplyError::TooManyLines);
        }
        let malformed = || {
            ReplyError::Malformed(String::from_utf8_lossy(&line[..line.len().min(80)]).into_owned())
        };
        if line.len() < 3 || !line[..3].iter().all(u8::is_ascii_digit) {
            return Err(malformed());
        }
        let code = u16::from(line[0] - b'0') * 100
            + u16::from(line[1] - b'0') * 10
            + u16::from(line[2] - b'0');
        if !(200..=599).contains(&code) && !(100..200).contains(&code) {
            return Err(malformed());
        }
        if let Some(first) = self.code
            && first != code
        {
            return Err(ReplyError::CodeMismatch(first, code));
        }
        self.code = Some(code);
        // "250-text" continues, "250 text" and a bare "250" end the reply.
        let (last, text) = match line.get(3) {
            None => (true, &[][..]),
            Some(b' ') => (true, &line[4..]),
            Some(b'-') => (false, &line[4..]),
            Some(_) => return Err(malformed()),
        };
        self.lines
            .push(String::from_utf8_lossy(text).trim_end().to_owned());
        if !last {
            return Ok(None);
        }
        let lines = std::mem::take(&mut self.lines);
        self.code = None;
        Ok(Some(finish(code, lines, command)))
    }
}

fn finish(code: u16, mut lines: Vec<String>, command: Command) -> Reply {
    let class = (code / 100) as u8;
    let mut enhanced = None;
    // The enhanced code is repeated on every line; strip it everywhere, keep the first.
    for line in lines.iter_mut() {
        if let Some((e, rest)) = EnhancedCode::parse_prefix(line)
            && e.0 == class
        {
            enhanced.get_or_insert(e);
            *line = rest.to_owned();
        }
    }
    Reply {
        code,
        enhanced,
        text: lines.join("\n"),
        command,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(lines: &[&str]) -> Result<Reply, ReplyError> {
        let mut b = ReplyBuilder::default();
        for (i, l) in lines.iter().enumerate() {
            let r = b.push(l.as_bytes(), Command::Ehlo)?;
            if i + 1 == lines.len() {
                return Ok(r.expect("last line completes the reply"));
            }
            assert!(r.is_none(), "line {i} completed the reply early");
        }
        unreachable!("no lines")
    }

    #[test]
    fn single_and_multi_line() {
        let r = parse(&["250 2.1.0 Ok"]).unwrap();
        assert_eq!(
            (r.code, r.enhanced, r.text.as_str()),
            (250, Some(EnhancedCode(2, 1, 0)), "Ok")
        );
        let r = parse(&[
            "250-mx.example.com",
            "250-PIPELINING",
            "250-SIZE 10240000",
            "250 8BITMIME",
        ])
        .unwrap();
        assert_eq!(
            r.lines().collect::<Vec<_>>(),
            vec!["mx.example.com", "PIPELINING", "SIZE 10240000", "8BITMIME"]
        );
        assert!(r.is_positive());
    }

    #[test]
    fn bare_code_ends_the_reply() {
        // smtp-sink ends its EHLO reply with a bare "250 " line; some servers send just "250".
        let r = parse(&["250-sink", "250-PIPELINING", "250 "]).unwrap();
        assert_eq!(r.lines().last(), Some(""));
        let r = parse(&["250-sink", "250"]).unwrap();
        assert_eq!(r.code, 250);
    }

    #[test]
    fn enhanced_codes_must_match_the_class() {
        let r = parse(&[
            "550-5.1.1 The email account does not exist.",
            "550 5.1.1 https://support.example/answer",
        ])
        .unwrap();
        assert_eq!(r.enhanced, Some(EnhancedCode(5, 1, 1)));
        assert_eq!(r.summary(), "550 5.1.1 The email account does not exist.");
        let r = parse(&["451 5.1.1 odd"]).unwrap();
        assert_eq!(
            r.enhanced, None,
            "a 5.x.x code on a 4xx reply is not an enhanced code"
        );
        let r = parse(&["250 1.2.3.4 is your IP"]).unwrap();
        assert_eq!(r.enhanced, None);
        assert!(r.is_positive());
    }

    #[test]
    fn hostile_replies_are_errors() {
        assert!(matches!(parse(&["hello"]), Err(ReplyError::Malformed(_))));
        assert!(matches!(parse(&["25"]), Err(ReplyError::Malformed(_))));
        assert!(matches!(parse(&["250x"]), Err(ReplyError::Malformed(_))));
        assert!(matches!(
            parse(&["999 what"]),
            Err(ReplyError::Malformed(_))
        ));
        assert_eq!(
            parse(&["250-a", "550 b"]),
            Err(ReplyError::CodeMismatch(250, 550))
        );
        let long = format!("250 {}", "x".repeat(MAX_REPLY_LINE));
        assert_eq!(parse(&[&long]), Err(ReplyError::LineTooLong));
        let mut b = ReplyBuilder::default();
        for _ in 0..MAX_REPLY_LINES {
            assert_eq!(b.push(b"250-x", Command::Ehlo), Ok(None));
        }
        assert_eq!(
            b.push(b"250 x", Command::Ehlo),
            Err(ReplyError::TooManyLines)
        );
        // Non-UTF-8 text is kept lossily, not refused.
        let mut b = ReplyBuilder::default();
        assert!(b.push(b"550 caf\xe9", Command::Rcpt).unwrap().is_some());
    }
}
