//! The inbound SMTP listener on `[bounce] listen`: receives DSNs, ARF complaint reports and
//! `unsubscribe_mailto` mail for the bounce domain, and nothing else.
//!
//! It accepts a recipient only when it is a VERP address whose token authenticates, an
//! unsubscribe address whose token authenticates, or one of `bounce.feedback_addresses`; anything
//! else gets 550 5.7.1 and nothing is ever relayed. Limits: connections overall and per client
//! address, command and text line length, message size (SIZE and counted), recipients per
//! transaction, bad commands per session, idle time. A message is processed ([`crate::feedback`])
//! before the reply to its final dot, so a 250 means the effect is on disk; a report that cannot
//! be read gets 554 5.6.0 with the reason. Plain socket I/O on tokio; spool work goes through the
//! feedback module.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, LazyLock, Mutex};
use std::time::Duration;

use prometheus::{IntCounterVec, register_int_counter_vec};
use tokio::io::{AsyncBufRead, AsyncBufReadExt, AsyncRead, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::node::Node;
use crate::outbound::tokens::{NodeTag, Owner, Purpose};
use crate::store::spool::JobId;

/// RFC 5321 §4.5.3.1.4 allows 512 octets for a command line; a little more is tolerated.
const MAX_COMMAND_LINE: usize = 2048;
/// RFC 5322 limits text lines to 998 octets; real DSNs keep to it, generous slack for the rest.
const MAX_TEXT_LINE: usize = 16 * 1024;
const MAX_RECIPIENTS: usize = 100;
const MAX_BAD_COMMANDS: usize = 20;
/// RFC 5321 §4.5.3.2.7: a server waits at least 5 minutes for the next command.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(300);
/// Whole DATA phase.
const DATA_TIMEOUT: Duration = Duration::from_secs(600);

static SESSIONS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register_int_counter_vec!(
        "sluice_inbound_connections_total",
        "Connections to the bounce listener by result (served, over_limit). over_limit means max_connections or max_connections_per_ip turned a client away.",
        &["result"]
    )
    .expect("metric registers once")
});

static REFUSED: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register_int_counter_vec!(
        "sluice_inbound_refused_total",
        "What the bounce listener refused, by reason (relay, size, line, unparseable, syntax). relay counts attempts to use it for other addresses.",
        &["reason"]
    )
    .expect("metric registers once")
});

/// What an accepted recipient is for.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Mailbox {
    /// A VERP return path: DSNs (and complaints some providers send to the return path), of
    /// this node's mail or (cluster mode) another node's.
    Verp,
    /// `unsubscribe_mailto` with the job's token: the message itself is the request.
    Unsubscribe(JobId),
    /// The same for another node's job (cluster mode): handed to that node.
    UnsubscribeElsewhere(NodeTag, String),
    /// A configured feedback-loop address.
    Feedback,
}

/// Binds `addr` and serves until `stop`.
pub async fn serve(
    node: Arc<Node>,
    addr: SocketAddr,
    stop: CancellationToken,
    tasks: TaskTracker,
) -> std::io::Result<SocketAddr> {
    let tls = match (&node.config.bounce.tls_cert, &node.config.bounce.tls_key) {
        (Some(cert), Some(key)) => {
            let (cert, key) = (cert.clone(), key.clone());
            let loaded =
                tokio::task::spawn_blocking(move || crate::tls::acceptor(&cert, &key, &[]))
                    .await
                    .map_err(std::io::Error::other)?;
            Some(loaded.map_err(|e| std::io::Error::other(format!("bounce.tls_cert: {e}")))?)
        }
        _ => None,
    };
    let listener = TcpListener::bind(addr).await?;
    let local = listener.local_addr()?;
    let limits = Arc::new(Limits {
        total: tokio::sync::Semaphore::new(node.config.bounce.max_connections),
        per_ip: Mutex::new(HashMap::new()),
    });
    let t = tasks.clone();
    tasks.spawn(async move {
        loop {
            let (stream, peer) = tokio::select! {
                _ = stop.cancelled() => break,
                r = listener.accept() => match r {
                    Ok(x) => x,
                    Err(e) => {
                        tracing::warn!(error = %e, "bounce listener accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                },
            };
            let node = Arc::clone(&node);
            let limits = Arc::clone(&limits);
            let stop = stop.clone();
            let tls = tls.clone();
            t.spawn(async move {
                let Some(_slot) =
                    limits.enter(peer.ip(), node.config.bounce.max_connections_per_ip)
                else {
                    SESSIONS.with_label_values(&["over_limit"]).inc();
                    let mut stream = stream;
                    let _ = stream
                        .write_all(b"421 4.7.0 too many connections, try again later\r\n")
                        .await;
                    return;
                };
                SESSIONS.with_label_values(&["served"]).inc();
                tokio::select! {
                    _ = stop.cancelled() => {}
                    r = session(&node, stream, tls.as_ref()) => {
                        if let Err(e) = r {
                            tracing::debug!(%peer, error = %e, "bounce listener session ended");
                        }
                    }
                }
            });
        }
    });
    Ok(local)
}

struct Limits {
    total: tokio::sync::Semaphore,
    per_ip: Mutex<HashMap<IpAddr, usize>>,
}

/// Held for a connection's life; gives its places back on drop.
struct Slot<'a> {
    limits: &'a Limits,
    ip: IpAddr,
    _permit: tokio::sync::SemaphorePermit<'a>,
}

impl Limits {
    fn enter(&self, ip: IpAddr, per_ip: usize) -> Option<Slot<'_>> {
        let permit = self.total.try_acquire().ok()?;
        let mut map = self.per_ip.lock().expect("per-ip lock");
        let n = map.entry(ip).or_insert(0);
        if *n >= per_ip {
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
enum Line {
    Data(Vec<u8>),
    TooLong,
    Eof,
}

/// Reads up to and including LF, keeping at most `max` bytes; never buffers more than that.
async fn read_line<R: AsyncBufRead + Unpin>(r: &mut R, max: usize) -> std::io::Result<Line> {
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

fn trim_crlf(line: &[u8]) -> &[u8] {
    let line = line.strip_suffix(b"\n").unwrap_or(line);
    line.strip_suffix(b"\r").unwrap_or(line)
}

/// `<addr> PARAM=…` after `MAIL FROM:` / `RCPT TO:` → the address and the parameters.
fn path_and_params(arg: &str) -> Option<(&str, &str)> {
    let arg = arg.trim_start();
    let rest = arg.strip_prefix('<')?;
    let end = rest.find('>')?;
    Some((&rest[..end], rest[end + 1..].trim()))
}

/// One command line of the inbound dialogue (without its CRLF), parsed. What it means depends on
/// the session's state, which the dialogue keeps; this part is pure, so it is fuzzed on its own.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command<'a> {
    Ehlo,
    Helo,
    /// `MAIL FROM:<path> [SIZE=n …]`; `None` when the path is malformed.
    Mail(Option<MailFrom<'a>>),
    /// `RCPT TO:<path> […]`; `None` when the path is malformed.
    Rcpt(Option<&'a str>),
    Data,
    Rset,
    Noop,
    Vrfy,
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
}

impl<'a> Command<'a> {
    pub fn parse(text: &'a str) -> Command<'a> {
        let verb = text.split_whitespace().next().unwrap_or("");
        let has_prefix = |p: &str| {
            text.get(..p.len())
                .is_some_and(|head| head.eq_ignore_ascii_case(p))
        };
        match verb.to_ascii_uppercase().as_str() {
            "EHLO" => Command::Ehlo,
            "HELO" => Command::Helo,
            "MAIL" if has_prefix("MAIL FROM:") => {
                Command::Mail(path_and_params(&text[10..]).map(|(path, params)| MailFrom {
                    path,
                    size: params.split_whitespace().find_map(|p| {
                        p.get(..5)
                            .filter(|k| k.eq_ignore_ascii_case("SIZE="))
                            .and_then(|_| p[5..].parse().ok())
                    }),
                }))
            }
            "RCPT" if has_prefix("RCPT TO:") => {
                Command::Rcpt(path_and_params(&text[8..]).map(|(path, _)| path))
            }
            "DATA" => Command::Data,
            "RSET" => Command::Rset,
            "NOOP" => Command::Noop,
            "VRFY" => Command::Vrfy,
            "QUIT" => Command::Quit,
            "STARTTLS" => Command::StartTls {
                params: !text.trim().eq_ignore_ascii_case("STARTTLS"),
            },
            _ => Command::Unknown,
        }
    }
}

struct Transaction {
    mail_from: Option<String>,
    rcpts: Vec<(String, Mailbox)>,
}

/// A connection: the greeting, the dialogue, and after STARTTLS the dialogue again over TLS.
async fn session(
    node: &Arc<Node>,
    mut stream: TcpStream,
    tls: Option<&TlsAcceptor>,
) -> std::io::Result<()> {
    let host = &node.config.delivery.ehlo_name;
    if !node.is_ready() || node.is_draining() {
        return reply(&mut stream, "421 4.3.2 not ready, try again later").await;
    }
    stream
        .write_all(format!("220 {host} ESMTP Sluice bounce and feedback receiver\r\n").as_bytes())
        .await?;
    let Some(acceptor) = tls else {
        return dialogue(node, stream, false).await.map(drop);
    };
    let Some(plain) = dialogue(node, stream, true).await? else {
        return Ok(());
    };
    match tokio::time::timeout(COMMAND_TIMEOUT, acceptor.accept(plain)).await {
        // RFC 3207 §4.2: the client starts again with EHLO; nothing from before counts.
        Ok(Ok(secure)) => dialogue(node, secure, false).await.map(drop),
        Ok(Err(e)) => {
            REFUSED.with_label_values(&["tls"]).inc();
            tracing::debug!(error = %e, "STARTTLS handshake on the bounce listener failed");
            Ok(())
        }
        Err(_) => Ok(()),
    }
}

/// Commands until QUIT, an error limit, or STARTTLS (when `offer_tls`): then the stream is
/// handed back for the handshake.
async fn dialogue<S: AsyncRead + AsyncWrite + Unpin>(
    node: &Arc<Node>,
    stream: S,
    offer_tls: bool,
) -> std::io::Result<Option<S>> {
    let (rd, mut wr) = tokio::io::split(stream);
    let mut rd = BufReader::with_capacity(16 * 1024, rd);
    let host = &node.config.delivery.ehlo_name;
    let max_size = node.config.bounce.max_message_bytes;
    let starttls = if offer_tls { "250-STARTTLS\r\n" } else { "" };
    let mut tx = Transaction {
        mail_from: None,
        rcpts: Vec::new(),
    };
    let mut bad = 0usize;
    loop {
        let line = match tokio::time::timeout(COMMAND_TIMEOUT, read_line(&mut rd, MAX_COMMAND_LINE))
            .await
        {
            Err(_) => {
                wr.write_all(b"421 4.4.2 idle too long, closing\r\n")
                    .await?;
                return Ok(None);
            }
            Ok(r) => r?,
        };
        let line = match line {
            Line::Eof => return Ok(None),
            Line::TooLong => {
                REFUSED.with_label_values(&["line"]).inc();
                bad += 1;
                reply(
                    &mut wr,
                    &format!("500 5.5.2 line longer than {MAX_COMMAND_LINE} octets"),
                )
                .await?;
                if bad >= MAX_BAD_COMMANDS {
                    break;
                }
                continue;
            }
            Line::Data(l) => l,
        };
        let text = String::from_utf8_lossy(trim_crlf(&line)).into_owned();
        let answer: String = match Command::parse(&text) {
            Command::Ehlo => {
                tx = Transaction {
                    mail_from: None,
                    rcpts: Vec::new(),
                };
                format!(
                    "250-{host}\r\n250-PIPELINING\r\n250-SIZE {max_size}\r\n250-8BITMIME\r\n{starttls}250-ENHANCEDSTATUSCODES\r\n250 SMTPUTF8"
                )
            }
            Command::Helo => {
                tx = Transaction {
                    mail_from: None,
                    rcpts: Vec::new(),
                };
                format!("250 {host}")
            }
            Command::Mail(mail) => {
                if tx.mail_from.is_some() {
                    "503 5.5.1 nested MAIL command".into()
                } else {
                    match mail {
                        None => "501 5.5.4 syntax: MAIL FROM:<address>".into(),
                        Some(MailFrom { path, size }) => {
                            if size.is_some_and(|s| s > max_size as u64) {
                                REFUSED.with_label_values(&["size"]).inc();
                                format!("552 5.3.4 message size exceeds {max_size} octets")
                            } else {
                                tx.mail_from = Some(path.to_owned());
                                "250 2.1.0 ok".into()
                            }
                        }
                    }
                }
            }
            Command::Rcpt(rcpt) => {
                if tx.mail_from.is_none() {
                    "503 5.5.1 MAIL first".into()
                } else if tx.rcpts.len() >= MAX_RECIPIENTS {
                    "452 4.5.3 too many recipients".into()
                } else {
                    match rcpt {
                        None => "501 5.5.4 syntax: RCPT TO:<address>".into(),
                        Some(to) => match mailbox(node, to) {
                            Some(m) => {
                                tx.rcpts.push((to.to_owned(), m));
                                "250 2.1.5 ok".into()
                            }
                            None => {
                                REFUSED.with_label_values(&["relay"]).inc();
                                format!(
                                    "550 5.7.1 <{to}>: relay access denied; this server takes only bounces and feedback reports for addresses it issued"
                                )
                            }
                        },
                    }
                }
            }
            Command::Data => {
                if tx.rcpts.is_empty() {
                    "503 5.5.1 RCPT first".into()
                } else {
                    reply(&mut wr, "354 end data with <CR><LF>.<CR><LF>").await?;
                    let r = match tokio::time::timeout(DATA_TIMEOUT, read_data(&mut rd, max_size))
                        .await
                    {
                        Err(_) => {
                            wr.write_all(b"421 4.4.2 data timeout, closing\r\n").await?;
                            return Ok(None);
                        }
                        Ok(r) => r?,
                    };
                    let answer = match r {
                        Data::Eof => return Ok(None),
                        Data::TooBig => {
                            REFUSED.with_label_values(&["size"]).inc();
                            format!("552 5.3.4 message size exceeds {max_size} octets")
                        }
                        Data::LineTooLong => {
                            REFUSED.with_label_values(&["line"]).inc();
                            format!(
                                "554 5.6.0 message has a line longer than {MAX_TEXT_LINE} octets"
                            )
                        }
                        Data::Message(m) => deliver(node, &tx, &m).await,
                    };
                    tx = Transaction {
                        mail_from: None,
                        rcpts: Vec::new(),
                    };
                    answer
                }
            }
            Command::Rset => {
                tx = Transaction {
                    mail_from: None,
                    rcpts: Vec::new(),
                };
                "250 2.0.0 ok".into()
            }
            Command::Noop => "250 2.0.0 ok".into(),
            Command::Vrfy => "252 2.5.0 cannot verify".into(),
            Command::Quit => {
                reply(&mut wr, "221 2.0.0 bye").await?;
                return Ok(None);
            }
            Command::StartTls { params } if offer_tls => {
                if params {
                    "501 5.5.4 STARTTLS takes no parameters".into()
                } else {
                    reply(&mut wr, "220 2.0.0 ready to start TLS").await?;
                    // Commands sent after STARTTLS in the clear would be taken as if they came
                    // over TLS (the CVE-2011-0411 class): such a client is dropped.
                    if !rd.buffer().is_empty() {
                        REFUSED.with_label_values(&["tls"]).inc();
                        return Ok(None);
                    }
                    return Ok(Some(rd.into_inner().unsplit(wr)));
                }
            }
            _ => {
                bad += 1;
                REFUSED.with_label_values(&["syntax"]).inc();
                "502 5.5.2 command not recognised".into()
            }
        };
        reply(&mut wr, &answer).await?;
        if bad >= MAX_BAD_COMMANDS {
            break;
        }
    }
    reply(&mut wr, "421 4.7.0 too many errors, closing").await?;
    Ok(None)
}

async fn reply<W: AsyncWriteExt + Unpin>(w: &mut W, text: &str) -> std::io::Result<()> {
    w.write_all(text.as_bytes()).await?;
    w.write_all(b"\r\n").await?;
    w.flush().await
}

enum Data {
    Message(Vec<u8>),
    TooBig,
    LineTooLong,
    Eof,
}

/// Reads the message up to the lone dot, undoing dot-stuffing. Past a limit the rest is read and
/// dropped so the session stays in step.
async fn read_data<R: AsyncBufRead + Unpin>(r: &mut R, max: usize) -> std::io::Result<Data> {
    let mut msg = Vec::new();
    let mut too_big = false;
    let mut too_long = false;
    loop {
        match read_line(r, MAX_TEXT_LINE).await? {
            Line::Eof => return Ok(Data::Eof),
            Line::TooLong => too_long = true,
            Line::Data(line) => {
                let body = trim_crlf(&line);
                if body == b"." {
                    break;
                }
                let body = body.strip_prefix(b".").unwrap_or(body);
                if !too_big && !too_long {
                    if msg.len() + body.len() + 2 > max {
                        too_big = true;
                        msg = Vec::new();
                    } else {
                        msg.extend_from_slice(body);
                        msg.extend_from_slice(b"\r\n");
                    }
                }
            }
        }
    }
    Ok(if too_big {
        Data::TooBig
    } else if too_long {
        Data::LineTooLong
    } else {
        Data::Message(msg)
    })
}

/// Whether the listener takes mail for `address`, and what for.
fn mailbox(node: &Node, address: &str) -> Option<Mailbox> {
    let (local, domain) = address.rsplit_once('@')?;
    let cfg = &node.config;
    if cfg
        .bounce
        .feedback_addresses
        .iter()
        .any(|a| a.eq_ignore_ascii_case(address))
    {
        return Some(Mailbox::Feedback);
    }
    let (prefix, token) = local.split_once('+')?;
    if prefix.eq_ignore_ascii_case(&cfg.bounce.local_part)
        && cfg
            .bounce
            .domain
            .as_deref()
            .is_none_or(|d| d.eq_ignore_ascii_case(domain))
    {
        return node
            .assembler
            .tokens()
            .owner(Purpose::Verp, token)
            .map(|_| Mailbox::Verp);
    }
    let (u_local, u_domain) = cfg
        .message
        .unsubscribe_mailto
        .as_deref()?
        .rsplit_once('@')?;
    if prefix.eq_ignore_ascii_case(u_local) && domain.eq_ignore_ascii_case(u_domain) {
        return match node.assembler.tokens().owner(Purpose::Unsubscribe, token)? {
            Owner::Here(job) => Some(Mailbox::Unsubscribe(job)),
            Owner::Node(tag) => Some(Mailbox::UnsubscribeElsewhere(tag, token.to_owned())),
        };
    }
    None
}

/// Applies one received message; the reply to its final dot.
async fn deliver(node: &Arc<Node>, tx: &Transaction, message: &[u8]) -> String {
    let unsubscribes: Vec<JobId> = tx
        .rcpts
        .iter()
        .filter_map(|(_, m)| match m {
            Mailbox::Unsubscribe(job) => Some(*job),
            _ => None,
        })
        .collect();
    for job in &unsubscribes {
        if let Err(e) = crate::feedback::unsubscribe_job(node, *job, "mailto").await {
            tracing::error!(error = %e, "recording an unsubscribe failed");
            return "451 4.3.0 could not record the request; try again later".into();
        }
    }
    let mut elsewhere = 0;
    for (_, m) in &tx.rcpts {
        if let Mailbox::UnsubscribeElsewhere(tag, token) = m {
            elsewhere += 1;
            if let Err(e) = crate::feedback::forward_unsubscribe(node, tag, token, "mailto").await {
                tracing::error!(error = %e, "handing an unsubscribe to its node failed");
                return "451 4.3.0 could not record the request; try again later".into();
            }
        }
    }
    if unsubscribes.len() + elsewhere == tx.rcpts.len() {
        return "250 2.0.0 unsubscribed".into();
    }
    let rcpts: Vec<String> = tx
        .rcpts
        .iter()
        .filter(|(_, m)| {
            !matches!(
                m,
                Mailbox::Unsubscribe(_) | Mailbox::UnsubscribeElsewhere(..)
            )
        })
        .map(|(a, _)| a.clone())
        .collect();
    match crate::feedback::process(node, message, &rcpts, "smtp").await {
        Ok(p) => format!("250 2.0.0 {} {}", p.kind, p.result),
        Err(crate::feedback::FeedbackError::Parse(e)) => {
            REFUSED.with_label_values(&["unparseable"]).inc();
            tracing::info!(error = %e, "refused an unreadable report");
            format!("554 5.6.0 {e}")
        }
        Err(crate::feedback::FeedbackError::Spool(e)) => {
            tracing::error!(error = %e, "applying a report failed");
            "451 4.3.0 could not record the report; try again later".into()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_parse_case_insensitively_with_their_paths() {
        assert_eq!(Command::parse("ehlo client.test"), Command::Ehlo);
        assert_eq!(
            Command::parse("mail from:<a@b.test> SIZE=1200 BODY=8BITMIME"),
            Command::Mail(Some(MailFrom {
                path: "a@b.test",
                size: Some(1200)
            }))
        );
        assert_eq!(
            Command::parse("MAIL FROM: <> size=x"),
            Command::Mail(Some(MailFrom {
                path: "",
                size: None
            }))
        );
        assert_eq!(Command::parse("MAIL FROM:a@b.test"), Command::Mail(None));
        assert_eq!(Command::parse("MAIL a@b.test"), Command::Unknown);
        assert_eq!(
            Command::parse("RCPT TO:<x@y.test> NOTIFY=NEVER"),
            Command::Rcpt(Some("x@y.test"))
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
            matches!(read_data(&mut r, 100).await.unwrap(), Data::Message(m) if m == b"a\r\n.b\r\n")
        );
        let big = format!("{}\r\n.\r\nNOOP\r\n", "y".repeat(200));
        let mut r = BufReader::new(big.as_bytes());
        assert!(matches!(
            read_data(&mut r, 100).await.unwrap(),
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
}
