//! The server side of SMTP, shared by the two listeners that take mail in: the submission
//! listener ([`crate::intake::submission`]) and the bounce listener
//! ([`crate::feedback::listener`]).
//!
//! Pure parts: [`Command::parse`] reads one command line (fuzzed on its own), [`params`] the
//! `KEY=value` parameters after a path, [`xtext_decode`] RFC 3461's encoding. I/O parts over any
//! buffered stream: bounded line reads ([`read_line`]), the DATA phase with dot-unstuffing
//! ([`read_data`]), BDAT chunks ([`read_chunk`]), replies, and the per-address connection limits
//! ([`Limits`]). Nothing here knows what a message is for.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::Duration;

use tokio::io::{AsyncBufRead, AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};

/// RFC 5321 §4.5.3.1.4 allows 512 octets for a command line; a little more is tolerated (AUTH
/// with an initial response is longer).
pub const MAX_COMMAND_LINE: usize = 2048;
/// RFC 5321 §4.5.3.2.7: a server waits at least 5 minutes for the next command.
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(300);
/// A whole DATA phase or BDAT chunk.
pub const DATA_TIMEOUT: Duration = Duration::from_secs(600);

/// Connections at once, overall and per client address.
pub struct Limits {
    total: tokio::sync::Semaphore,
    per_ip: Mutex<HashMap<IpAddr, usize>>,
    max_per_ip: usize,
}

/// Held for a connection's life; gives its places back on drop.
pub struct Slot<'a> {
    limits: &'a Limits,
    ip: IpAddr,
    _permit: tokio::sync::SemaphorePermit<'a>,
}

impl Limits {
    pub fn new(total: usize, per_ip: usize) -> Limits {
        Limits {
            total: tokio::sync::Semaphore::new(total),
            per_ip: Mutex::new(HashMap::new()),
            max_per_ip: per_ip,
        }
    }

    /// A place for a connection from `ip`, or `None` when either limit is reached.
    pub fn enter(&self, ip: IpAddr) -> Option<Slot<'_>> {
        let permit = self.total.try_acquire().ok()?;
        let mut map = self.per_ip.lock().expect("per-ip lock");
        let n = map.entry(ip).or_insert(0);
        if *n >= self.max_per_ip {
            return None;
        }
        *n += 1;
        Some(Slot {
            limits: self,
            ip,
            _permit: permit,
        })
    }
}

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        let mut map = self.limits.per_ip.lock().expect("per-ip lock");
        if let Some(n) = map.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                map.remove(&self.ip);
            }
        }
    }
}

/// One line, or the news that it was longer than allowed (the rest of it was consumed).
pub enum Line {
    Data(Vec<u8>),
    TooLong,
    Eof,
}

/// Reads up to and including LF, keeping at most `max` bytes; never buffers more than that.
pub async fn read_line<R: AsyncBufRead + Unpin>(r: &mut R, max: usize) -> std::io::Result<Line> {
    let mut out = Vec::new();
    let mut too_long = false;
    loop {
        let buf = r.fill_buf().await?;
        if buf.is_empty() {
            return Ok(if out.is_empty() && !too_long {
                Line::Eof
            } else if too_long {
                Line::TooLong
            } else {
                Line::Data(out)
            });
        }
        let (chunk, done) = match memchr::memchr(b'\n', buf) {
            Some(i) => (&buf[..=i], true),
            None => (buf, false),
        };
        let n = chunk.len();
        if !too_long {
            if out.len() + n > max {
                too_long = true;
                out = Vec::new();
            } else {
                out.extend_from_slice(chunk);
            }
        }
        r.consume(n);
        if done {
            return Ok(if too_long {
                Line::TooLong
            } else {
                Line::Data(out)
            });
        }
    }
}

pub fn trim_crlf(line: &[u8]) -> &[u8] {
    let line = line.strip_suffix(b"\n").unwrap_or(line);
    line.strip_suffix(b"\r").unwrap_or(line)
}

/// What [`next_command`] read.
pub enum Next {
    /// A command line, without its CRLF (invalid UTF-8 replaced).
    Command(String),
    /// A line over [`MAX_COMMAND_LINE`], answered with 500 and dropped.
    TooLong,
    /// The client left, or was idle past [`COMMAND_TIMEOUT`] (and was told so with 421).
    Closed,
}

/// Reads the next command line of a dialogue, answering what needs an answer here.
pub async fn next_command<R: AsyncBufRead + Unpin, W: AsyncWriteExt + Unpin>(
    rd: &mut R,
    wr: &mut W,
) -> std::io::Result<Next> {
    let line = match tokio::time::timeout(COMMAND_TIMEOUT, read_line(rd, MAX_COMMAND_LINE)).await {
        Err(_) => {
            reply(wr, "421 4.4.2 idle too long, closing").await?;
            return Ok(Next::Closed);
        }
        Ok(r) => r?,
    };
    Ok(match line {
        Line::Eof => Next::Closed,
        Line::TooLong => {
            reply(
                wr,
                &format!("500 5.5.2 line longer than {MAX_COMMAND_LINE} octets"),
            )
            .await?;
            Next::TooLong
        }
        Line::Data(l) => Next::Command(String::from_utf8_lossy(trim_crlf(&l)).into_owned()),
    })
}

/// Writes one reply (which may hold several lines joined by CRLF) and flushes: one write, so
/// one segment on the wire.
pub async fn reply<W: AsyncWriteExt + Unpin>(w: &mut W, text: &str) -> std::io::Result<()> {
    queue_reply(w, text).await?;
    w.flush().await
}

/// Writes one reply without flushing: behind a buffered writer, the replies to pipelined
/// commands then leave together (RFC 2920 §3.2), flushed once the client's input is used up.
pub async fn queue_reply<W: AsyncWriteExt + Unpin>(w: &mut W, text: &str) -> std::io::Result<()> {
    let mut line = Vec::with_capacity(text.len() + 2);
    line.extend_from_slice(text.as_bytes());
    line.extend_from_slice(b"\r\n");
    w.write_all(&line).await
}

/// What the DATA phase read.
pub enum Data {
    Message(Vec<u8>),
    TooBig,
    /// A line longer than the limit given.
    LineTooLong,
    /// A line that ended in a bare LF, or held a bare CR (refused in strict mode only).
    BareLineEnding,
    Eof,
}

/// Reads the message up to the lone dot, undoing dot-stuffing, with lines of at most `max_line`
/// octets. With `strict`, every line must end in CRLF and hold no other CR (RFC 5321 §2.3.8);
/// without, a bare LF ends a line as well (what arrives from the world's MTAs). Past a limit the
/// rest is read and dropped so the session stays in step.
pub async fn read_data<R: AsyncBufRead + Unpin>(
    r: &mut R,
    max: usize,
    max_line: usize,
    strict: bool,
) -> std::io::Result<Data> {
    let mut st = DataState {
        msg: Vec::with_capacity(16 * 1024),
        max,
        max_line,
        strict,
        too_big: false,
        too_long: false,
        bare: false,
    };
    // A line that a read cut in two: its first part (bounded), or `None` past the line limit.
    let mut partial: Option<Vec<u8>> = Some(Vec::new());
    loop {
        let buf = r.fill_buf().await?;
        if buf.is_empty() {
            return Ok(Data::Eof);
        }
        // Whole lines are taken straight from the reader's buffer.
        let mut at = 0;
        let mut ended = false;
        while let Some(i) = memchr::memchr(b'\n', &buf[at..]) {
            let end = at + i + 1;
            let last = match &mut partial {
                Some(p) if p.is_empty() => st.line(&buf[at..end]),
                Some(p) => {
                    p.extend_from_slice(&buf[at..end]);
                    let last = if p.len() > max_line + 2 {
                        st.too_long = true;
                        false
                    } else {
                        st.line(p)
                    };
                    p.clear();
                    last
                }
                None => {
                    st.too_long = true;
                    partial = Some(Vec::new());
                    false
                }
            };
            at = end;
            if last {
                ended = true;
                break;
            }
        }
        if !ended {
            let rest = &buf[at..];
            if let Some(p) = &mut partial {
                if p.len() + rest.len() > max_line + 2 {
                    partial = None;
                } else {
                    p.extend_from_slice(rest);
                }
            }
            at = buf.len();
        }
        r.consume(at);
        if ended {
            break;
        }
    }
    Ok(if st.too_big {
        Data::TooBig
    } else if st.too_long {
        Data::LineTooLong
    } else if st.bare {
        Data::BareLineEnding
    } else {
        Data::Message(st.msg)
    })
}

/// What [`read_data`] has read so far.
struct DataState {
    msg: Vec<u8>,
    max: usize,
    max_line: usize,
    strict: bool,
    too_big: bool,
    too_long: bool,
    bare: bool,
}

impl DataState {
    /// Takes one line, LF included; true when it is the lone dot that ends the message.
    fn line(&mut self, line: &[u8]) -> bool {
        let body = trim_crlf(line);
        if body == b"." {
            return true;
        }
        if self.strict && (!line.ends_with(b"\r\n") || memchr::memchr(b'\r', body).is_some()) {
            self.bare = true;
        }
        if body.len() > self.max_line {
            self.too_long = true;
        }
        let body = body.strip_prefix(b".").unwrap_or(body);
        if !self.too_big && !self.too_long && !self.bare {
            if self.msg.len() + body.len() + 2 > self.max {
                self.too_big = true;
                self.msg = Vec::new();
            } else {
                self.msg.extend_from_slice(body);
                self.msg.extend_from_slice(b"\r\n");
            }
        }
        false
    }
}

/// Reads a BDAT chunk of exactly `size` octets, appending it to `into` unless that would pass
/// `max` (then the chunk is read and dropped, and `false` says so). A client that sends fewer
/// octets than it announced leaves the reader waiting, as RFC 3030 intends; the caller's timeout
/// ends that.
pub async fn read_chunk<R: AsyncBufRead + Unpin>(
    r: &mut R,
    size: u64,
    into: &mut Vec<u8>,
    max: usize,
) -> std::io::Result<bool> {
    let fits = (into.len() as u64).saturating_add(size) <= max as u64;
    if fits {
        let start = into.len();
        into.resize(start + size as usize, 0);
        r.read_exact(&mut into[start..]).await?;
    } else {
        let copied = tokio::io::copy(&mut r.take(size), &mut tokio::io::sink()).await?;
        if copied < size {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
    }
    Ok(fits)
}

/// `<addr> PARAM=…` after `MAIL FROM:` / `RCPT TO:` → the address and the parameters.
pub fn path_and_params(arg: &str) -> Option<(&str, &str)> {
    let arg = arg.trim_start();
    let rest = arg.strip_prefix('<')?;
    let end = rest.find('>')?;
    Some((&rest[..end], rest[end + 1..].trim()))
}

/// The `KEY[=value]` parameters of a MAIL or RCPT command, keys as given.
pub fn params(text: &str) -> impl Iterator<Item = (&str, Option<&str>)> {
    text.split_ascii_whitespace()
        .map(|p| match p.split_once('=') {
            Some((k, v)) => (k, Some(v)),
            None => (p, None),
        })
}

/// RFC 3461 §4 xtext: `+XX` stands for the octet XX (hex). `None` when malformed.
pub fn xtext_decode(text: &str) -> Option<String> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        if b == b'+' {
            let hex = text.get(i + 1..i + 3)?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else if (b'!'..=b'~').contains(&b) && b != b'=' {
            out.push(b);
            i += 1;
        } else {
            return None;
        }
    }
    String::from_utf8(out).ok()
}

/// One command line of an inbound dialogue (without its CRLF), parsed. What it means depends on
/// the session's state, which the dialogue keeps; this part is pure, so it is fuzzed on its own.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command<'a> {
    Ehlo,
    Helo,
    /// `MAIL FROM:<path> [SIZE=n …]`; `None` when the path is malformed.
    Mail(Option<MailFrom<'a>>),
    /// `RCPT TO:<path> […]`; `None` when the path is malformed.
    Rcpt(Option<RcptTo<'a>>),
    Data,
    /// `BDAT <size> [LAST]`; `None` when the arguments are malformed.
    Bdat(Option<Bdat>),
    /// `AUTH <mechanism> [initial-response]`.
    Auth {
        mechanism: &'a str,
        initial: Option<&'a str>,
    },
    Rset,
    Noop,
    Vrfy,
    Help,
    Quit,
    /// `STARTTLS`; `params` when anything followed it (which is a syntax error).
    StartTls {
        params: bool,
    },
    /// Anything else, including `MAIL` without `FROM:` and `RCPT` without `TO:`.
    Unknown,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MailFrom<'a> {
    pub path: &'a str,
    /// The `SIZE=` parameter, when present and a number.
    pub size: Option<u64>,
    /// Everything after the path (see [`params`]).
    pub params: &'a str,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RcptTo<'a> {
    pub path: &'a str,
    /// Everything after the path (see [`params`]).
    pub params: &'a str,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bdat {
    pub size: u64,
    pub last: bool,
}

impl<'a> Command<'a> {
    pub fn parse(text: &'a str) -> Command<'a> {
        let mut words = text.split_ascii_whitespace();
        let verb = words.next().unwrap_or("");
        let has_prefix = |p: &str| {
            text.get(..p.len())
                .is_some_and(|head| head.eq_ignore_ascii_case(p))
        };
        match verb.to_ascii_uppercase().as_str() {
            "EHLO" => Command::Ehlo,
            "HELO" => Command::Helo,
            "MAIL" if has_prefix("MAIL FROM:") => {
                Command::Mail(path_and_params(&text[10..]).map(|(path, rest)| MailFrom {
                    path,
                    size: params(rest).find_map(|(k, v)| {
                        k.eq_ignore_ascii_case("SIZE")
                            .then(|| v.and_then(|v| v.parse().ok()))
                            .flatten()
                    }),
                    params: rest,
                }))
            }
            "RCPT" if has_prefix("RCPT TO:") => Command::Rcpt(
                path_and_params(&text[8..]).map(|(path, params)| RcptTo { path, params }),
            ),
            "DATA" => Command::Data,
            "BDAT" => {
                let size = words.next().and_then(|s| {
                    (!s.is_empty() && s.len() <= 19 && s.bytes().all(|b| b.is_ascii_digit()))
                        .then(|| s.parse().ok())
                        .flatten()
                });
                let last = match words.next() {
                    None => Some(false),
                    Some(w) if w.eq_ignore_ascii_case("LAST") => Some(true),
                    Some(_) => None,
                };
                Command::Bdat(match (size, last, words.next()) {
                    (Some(size), Some(last), None) => Some(Bdat { size, last }),
                    _ => None,
                })
            }
            "AUTH" => match words.next() {
                Some(mechanism) => Command::Auth {
                    mechanism,
                    initial: words.next(),
                },
                None => Command::Unknown,
            },
            "RSET" => Command::Rset,
            "NOOP" => Command::Noop,
            "VRFY" => Command::Vrfy,
            "HELP" => Command::Help,
            "QUIT" => Command::Quit,
            "STARTTLS" => Command::StartTls {
                params: !text.trim().eq_ignore_ascii_case("STARTTLS"),
            },
            _ => Command::Unknown,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::BufReader;

    #[test]
    fn commands_parse_case_insensitively_with_their_paths() {
        assert_eq!(Command::parse("ehlo client.test"), Command::Ehlo);
        assert_eq!(
            Command::parse("mail from:<a@b.test> SIZE=1200 BODY=8BITMIME"),
            Command::Mail(Some(MailFrom {
                path: "a@b.test",
                size: Some(1200),
                params: "SIZE=1200 BODY=8BITMIME",
            }))
        );
        assert_eq!(
            Command::parse("MAIL FROM: <> size=x"),
            Command::Mail(Some(MailFrom {
                path: "",
                size: None,
                params: "size=x",
            }))
        );
        assert_eq!(Command::parse("MAIL FROM:a@b.test"), Command::Mail(None));
        assert_eq!(Command::parse("MAIL a@b.test"), Command::Unknown);
        assert_eq!(
            Command::parse("RCPT TO:<x@y.test> NOTIFY=NEVER"),
            Command::Rcpt(Some(RcptTo {
                path: "x@y.test",
                params: "NOTIFY=NEVER"
            }))
        );
        assert_eq!(Command::parse("RCPT TO:<x@y.test"), Command::Rcpt(None));
        assert_eq!(
            Command::parse("starttls"),
            Command::StartTls { params: false }
        );
        assert_eq!(
            Command::parse("STARTTLS now"),
            Command::StartTls { params: true }
        );
        // Multi-byte text where the verb's prefix would end mid-character.
        assert_eq!(Command::parse("MAIL\u{e9}FROM:<a>"), Command::Unknown);
        assert_eq!(Command::parse("RCPT TO\u{e9}"), Command::Unknown);
        assert_eq!(Command::parse(""), Command::Unknown);
    }

    #[test]
    fn bdat_and_auth_arguments_are_checked() {
        assert_eq!(
            Command::parse("BDAT 1000 LAST"),
            Command::Bdat(Some(Bdat {
                size: 1000,
                last: true
            }))
        );
        assert_eq!(
            Command::parse("bdat 0"),
            Command::Bdat(Some(Bdat {
                size: 0,
                last: false
            }))
        );
        for bad in [
            "BDAT",
            "BDAT -1",
            "BDAT +5",
            "BDAT 10 FIRST",
            "BDAT 10 LAST x",
            "BDAT 99999999999999999999",
        ] {
            assert_eq!(Command::parse(bad), Command::Bdat(None), "{bad}");
        }
        assert_eq!(
            Command::parse("AUTH PLAIN AGZvbwBiYXI="),
            Command::Auth {
                mechanism: "PLAIN",
                initial: Some("AGZvbwBiYXI=")
            }
        );
        assert_eq!(
            Command::parse("auth login"),
            Command::Auth {
                mechanism: "login",
                initial: None
            }
        );
        assert_eq!(Command::parse("AUTH"), Command::Unknown);
    }

    #[test]
    fn parameters_and_xtext() {
        let p: Vec<_> = params("RET=HDRS ENVID=a+2Bb SMTPUTF8").collect();
        assert_eq!(
            p,
            vec![
                ("RET", Some("HDRS")),
                ("ENVID", Some("a+2Bb")),
                ("SMTPUTF8", None)
            ]
        );
        assert_eq!(xtext_decode("a+2Bb").as_deref(), Some("a+b"));
        assert_eq!(
            xtext_decode("rfc822;x+40y.test").as_deref(),
            Some("rfc822;x@y.test")
        );
        assert_eq!(xtext_decode("bad+2"), None);
        assert_eq!(xtext_decode("bad+zz"), None);
        assert_eq!(xtext_decode("a=b"), None);
        assert_eq!(xtext_decode("a b"), None);
    }

    #[tokio::test]
    async fn lines_are_bounded() {
        let input = format!("short\r\n{}\r\nnext\r\n", "x".repeat(100_000));
        let mut r = BufReader::with_capacity(64, input.as_bytes());
        assert!(
            matches!(read_line(&mut r, 100).await.unwrap(), Line::Data(l) if l == b"short\r\n")
        );
        assert!(matches!(
            read_line(&mut r, 100).await.unwrap(),
            Line::TooLong
        ));
        assert!(matches!(read_line(&mut r, 100).await.unwrap(), Line::Data(l) if l == b"next\r\n"));
        assert!(matches!(read_line(&mut r, 100).await.unwrap(), Line::Eof));
    }

    #[tokio::test]
    async fn data_is_unstuffed_and_limited() {
        let mut r = BufReader::new(&b"a\r\n..b\r\n.\r\nQUIT\r\n"[..]);
        assert!(
            matches!(read_data(&mut r, 100, 998, true).await.unwrap(), Data::Message(m) if m == b"a\r\n.b\r\n")
        );
        let big = format!("{}\r\n.\r\nNOOP\r\n", "y".repeat(200));
        let mut r = BufReader::new(big.as_bytes());
        assert!(matches!(
            read_data(&mut r, 100, 998, false).await.unwrap(),
            Data::TooBig
        ));
        let mut line = String::new();
        r.read_line(&mut line).await.unwrap();
        assert_eq!(line, "NOOP\r\n", "the session stays in step");
        assert_eq!(
            path_and_params(" <a+b@c.d> SIZE=10"),
            Some(("a+b@c.d", "SIZE=10"))
        );
        assert_eq!(path_and_params("a@b"), None);
    }

    #[tokio::test]
    async fn data_lines_cut_by_small_reads_are_joined() {
        let text = format!(
            "From: a@b.test\r\n\r\n..x\r\n{}\r\nend\r\n.\r\nNOOP\r\n",
            "w".repeat(50)
        );
        for capacity in [1, 3, 7, 64] {
            let mut r = BufReader::with_capacity(capacity, text.as_bytes());
            let Data::Message(m) = read_data(&mut r, 1000, 60, true).await.unwrap() else {
                panic!("capacity {capacity}");
            };
            assert_eq!(
                m,
                format!("From: a@b.test\r\n\r\n.x\r\n{}\r\nend\r\n", "w".repeat(50)).as_bytes()
            );
            let mut line = String::new();
            r.read_line(&mut line).await.unwrap();
            assert_eq!(line, "NOOP\r\n", "capacity {capacity}");
            let mut r = BufReader::with_capacity(capacity, text.as_bytes());
            assert!(
                matches!(
                    read_data(&mut r, 1000, 40, true).await.unwrap(),
                    Data::LineTooLong
                ),
                "capacity {capacity}"
            );
            let mut line = String::new();
            r.read_line(&mut line).await.unwrap();
            assert_eq!(line, "NOOP\r\n", "capacity {capacity}");
        }
    }

    #[tokio::test]
    async fn strict_data_refuses_bare_line_endings_and_long_lines() {
        for input in [&b"a\nb\r\n.\r\nNOOP\r\n"[..], b"a\rb\r\n.\r\nNOOP\r\n"] {
            let mut r = BufReader::new(input);
            assert!(matches!(
                read_data(&mut r, 1000, 998, true).await.unwrap(),
                Data::BareLineEnding
            ));
            let mut line = String::new();
            r.read_line(&mut line).await.unwrap();
            assert_eq!(line, "NOOP\r\n");
        }
        let mut r = BufReader::new(&b"a\nb\r\n.\r\n"[..]);
        assert!(
            matches!(read_data(&mut r, 1000, 998, false).await.unwrap(), Data::Message(m) if m == b"a\r\nb\r\n")
        );
        let long = format!("{}\r\n.\r\nNOOP\r\n", "z".repeat(999));
        let mut r = BufReader::new(long.as_bytes());
        assert!(matches!(
            read_data(&mut r, 100_000, 998, true).await.unwrap(),
            Data::LineTooLong
        ));
        let mut line = String::new();
        r.read_line(&mut line).await.unwrap();
        assert_eq!(line, "NOOP\r\n");
    }

    #[tokio::test]
    async fn chunks_are_read_exactly_or_dropped_past_the_limit() {
        let mut r = BufReader::new(&b"hello worldNOOP\r\n"[..]);
        let mut into = Vec::new();
        assert!(read_chunk(&mut r, 5, &mut into, 100).await.unwrap());
        assert!(!read_chunk(&mut r, 6, &mut into, 8).await.unwrap());
        assert_eq!(into, b"hello");
        let mut line = String::new();
        r.read_line(&mut line).await.unwrap();
        assert_eq!(line, "NOOP\r\n");
        let mut r = BufReader::new(&b"abc"[..]);
        assert!(read_chunk(&mut r, 10, &mut Vec::new(), 100).await.is_err());
        assert!(read_chunk(&mut r, 10, &mut Vec::new(), 1).await.is_err());
    }
}
