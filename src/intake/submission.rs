//! The SMTP submission listener on `[submission] listen` (STARTTLS) and `listen_tls` (TLS from
//! the first byte, RFC 8314): the second door in, beside the HTTP API, for software that speaks
//! SMTP. Its promise is the API's: the `250` after a message means it is synced to the spool.
//!
//! A client submits after AUTH PLAIN or LOGIN with an API key as the password (the user name is
//! free), offered only over TLS unless `allow_plaintext_auth`, or from `trusted_networks`
//! without AUTH. Failed AUTH is counted per client address and refused past
//! `max_auth_failures` per `auth_failure_window`. ESMTP: PIPELINING, SIZE, 8BITMIME, SMTPUTF8,
//! ENHANCEDSTATUSCODES, CHUNKING (BDAT) and DSN (RFC 3461: RET and ENVID per message, NOTIFY and
//! ORCPT per recipient, kept with the jobs). Each message is checked and queued by
//! [`crate::intake::raw`]; a message it refuses gets `554 5.6.0` with the reason, and nothing of
//! it is kept. Limits on connections, command and text lines, size, recipients and errors, as
//! the bounce listener has; the line and TLS machinery is shared with it ([`crate::intake::smtp`]).
//! Concurrent sessions' commits share the spool writer's syncs (group commit).

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, LazyLock, Mutex};
use std::time::{Duration, Instant};

use base64::Engine;
use prometheus::{IntCounter, IntCounterVec, register_int_counter, register_int_counter_vec};
use tokio::io::{AsyncBufRead, AsyncRead, AsyncWrite, AsyncWriteExt, BufReader, BufWriter};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::intake::address::Address;
use crate::intake::raw::{self, Recipient, Ret};
use crate::intake::smtp::{
    COMMAND_TIMEOUT, Command, DATA_TIMEOUT, Data, Limits, Line, MAX_COMMAND_LINE, MailFrom, Next,
    RcptTo, next_command, params, queue_reply, read_chunk, read_data, read_line, reply, trim_crlf,
    xtext_decode,
};
use crate::node::Node;

const MAX_BAD_COMMANDS: usize = 20;
/// RFC 3461 §4.4: ENVID is at most 100 characters.
const MAX_ENVID: usize = 100;

static SESSIONS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register_int_counter_vec!(
        "sluice_submission_connections_total",
        "Connections to the submission listener by result (served, over_limit, tls_failed).",
        &["result"]
    )
    .expect("metric registers once")
});

static MESSAGES: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register_int_counter_vec!(
        "sluice_submission_messages_total",
        "Messages submitted over SMTP by result: accepted (queued and synced), refused (5xx: the message or its envelope is invalid), deferred (4xx: the spool could not take it now).",
        &["result"]
    )
    .expect("metric registers once")
});

static RECIPIENTS: LazyLock<IntCounter> = LazyLock::new(|| {
    register_int_counter!(
        "sluice_submission_recipients_total",
        "Recipients of messages accepted over SMTP."
    )
    .expect("metric registers once")
});

static AUTH: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register_int_counter_vec!(
        "sluice_submission_auth_total",
        "AUTH attempts on the submission listener by result (ok, failed, blocked). blocked: the client address is over submission.max_auth_failures.",
        &["result"]
    )
    .expect("metric registers once")
});

static REFUSED: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register_int_counter_vec!(
        "sluice_submission_refused_total",
        "Commands the submission listener refused, by reason (auth_required, encryption_required, size, line, syntax, recipients, tls).",
        &["reason"]
    )
    .expect("metric registers once")
});

/// What every session shares.
struct Shared {
    node: Arc<Node>,
    limits: Limits,
    tls: Option<TlsAcceptor>,
    trusted: Vec<ipnet::IpNet>,
    /// Failed AUTH attempts per client address: how many, since when.
    failures: Mutex<HashMap<IpAddr, (u32, Instant)>>,
}

impl Shared {
    /// Whether `ip` is over its failed AUTH attempts.
    fn blocked(&self, ip: IpAddr) -> bool {
        let cfg = &self.node.config.submission;
        let map = self.failures.lock().expect("auth failures lock");
        map.get(&ip).is_some_and(|(n, since)| {
            *n >= cfg.max_auth_failures && since.elapsed() < cfg.auth_failure_window
        })
    }

    fn failed(&self, ip: IpAddr) {
        let window = self.node.config.submission.auth_failure_window;
        let mut map = self.failures.lock().expect("auth failures lock");
        // Addresses whose window has passed are forgotten, so the map stays small.
        if map.len() >= 10_000 {
            map.retain(|_, (_, since)| since.elapsed() < window);
        }
        let entry = map.entry(ip).or_insert((0, Instant::now()));
        if entry.1.elapsed() >= window {
            *entry = (0, Instant::now());
        }
        entry.0 += 1;
    }

    /// The tenant of an API key given as the AUTH password, if it is one.
    fn tenant_of(&self, key: &[u8]) -> Option<Arc<crate::store::tenants::Tenant>> {
        self.node.tenants.authenticate(key).map(|c| c.tenant)
    }
}

/// The listeners' bound addresses.
#[derive(Debug, Clone, Copy, Default)]
pub struct Bound {
    pub starttls: Option<SocketAddr>,
    pub tls: Option<SocketAddr>,
}

/// Binds the configured addresses and serves until `stop`.
pub async fn serve(
    node: Arc<Node>,
    stop: CancellationToken,
    tasks: TaskTracker,
) -> std::io::Result<Bound> {
    let cfg = &node.config.submission;
    let tls = match (&cfg.tls_cert, &cfg.tls_key) {
        (Some(cert), Some(key)) => {
            let (cert, key) = (cert.clone(), key.clone());
            let loaded =
                tokio::task::spawn_blocking(move || crate::tls::acceptor(&cert, &key, &[]))
                    .await
                    .map_err(std::io::Error::other)?;
            Some(loaded.map_err(|e| std::io::Error::other(format!("submission.tls_cert: {e}")))?)
        }
        _ => None,
    };
    let trusted = cfg
        .networks()
        .map_err(|e| std::io::Error::other(format!("submission.trusted_networks: {e}")))?;
    let (plain_addr, tls_addr) = (cfg.listen, cfg.listen_tls);
    let shared = Arc::new(Shared {
        limits: Limits::new(cfg.max_connections, cfg.max_connections_per_ip),
        node,
        tls,
        trusted,
        failures: Mutex::new(HashMap::new()),
    });
    let mut bound = Bound::default();
    if let Some(addr) = plain_addr {
        let listener = TcpListener::bind(addr).await?;
        bound.starttls = Some(listener.local_addr()?);
        tasks.spawn(accept_loop(
            Arc::clone(&shared),
            listener,
            false,
            stop.clone(),
            tasks.clone(),
        ));
    }
    if let Some(addr) = tls_addr {
        let listener = TcpListener::bind(addr).await?;
        bound.tls = Some(listener.local_addr()?);
        tasks.spawn(accept_loop(shared, listener, true, stop, tasks.clone()));
    }
    Ok(bound)
}

async fn accept_loop(
    shared: Arc<Shared>,
    listener: TcpListener,
    implicit_tls: bool,
    stop: CancellationToken,
    tasks: TaskTracker,
) {
    loop {
        let (stream, peer) = tokio::select! {
            _ = stop.cancelled() => break,
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    tracing::warn!(error = %e, "submission listener accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        let shared = Arc::clone(&shared);
        let stop = stop.clone();
        tasks.spawn(async move {
            let Some(_slot) = shared.limits.enter(peer.ip()) else {
                SESSIONS.with_label_values(&["over_limit"]).inc();
                if !implicit_tls {
                    let mut stream = stream;
                    let _ = stream
                        .write_all(b"421 4.7.0 too many connections, try again later\r\n")
                        .await;
                }
                return;
            };
            SESSIONS.with_label_values(&["served"]).inc();
            tokio::select! {
                _ = stop.cancelled() => {}
                r = session(&shared, stream, peer.ip(), implicit_tls) => {
                    if let Err(e) = r {
                        tracing::debug!(%peer, error = %e, "submission session ended");
                    }
                }
            }
        });
    }
}

/// What a session knows of its client.
struct Client {
    ip: IpAddr,
    trusted: bool,
    tls: bool,
    helo: Option<String>,
    /// The user name the client authenticated as.
    user: Option<String>,
    /// The tenant of the key it authenticated with (mail from a trusted network without AUTH
    /// is the default tenant's).
    tenant: Option<Arc<crate::store::tenants::Tenant>>,
}

/// The transaction in progress.
#[derive(Default)]
struct Transaction {
    mail_from: Option<String>,
    ret: Option<Ret>,
    envid: Option<String>,
    rcpts: Vec<Recipient>,
    /// BDAT chunks so far, and whether one was too big (the rest is read and dropped).
    chunks: Option<Vec<u8>>,
    chunks_too_big: bool,
}

async fn session(
    shared: &Shared,
    mut stream: TcpStream,
    ip: IpAddr,
    implicit_tls: bool,
) -> std::io::Result<()> {
    let node = &shared.node;
    let mut client = Client {
        ip,
        trusted: shared.trusted.iter().any(|n| n.contains(&ip)),
        tls: false,
        helo: None,
        user: None,
        tenant: None,
    };
    if implicit_tls {
        let Some(acceptor) = &shared.tls else {
            return Ok(());
        };
        let secure = match tokio::time::timeout(COMMAND_TIMEOUT, acceptor.accept(stream)).await {
            Ok(Ok(s)) => s,
            _ => {
                SESSIONS.with_label_values(&["tls_failed"]).inc();
                return Ok(());
            }
        };
        client.tls = true;
        return greet_and_talk(shared, secure, &mut client, false)
            .await
            .map(drop);
    }
    if !node.is_ready() || node.is_draining() {
        return reply(&mut stream, "421 4.3.2 not ready, try again later").await;
    }
    let Some(plain) = greet_and_talk(shared, stream, &mut client, shared.tls.is_some()).await?
    else {
        return Ok(());
    };
    let Some(acceptor) = &shared.tls else {
        return Ok(());
    };
    match tokio::time::timeout(COMMAND_TIMEOUT, acceptor.accept(plain)).await {
        // RFC 3207 §4.2: the client starts again with EHLO; nothing from before counts.
        Ok(Ok(secure)) => {
            client.tls = true;
            client.helo = None;
            client.user = None;
            client.tenant = None;
            dialogue(shared, secure, &mut client, false).await.map(drop)
        }
        Ok(Err(e)) => {
            SESSIONS.with_label_values(&["tls_failed"]).inc();
            tracing::debug!(error = %e, "STARTTLS handshake on the submission listener failed");
            Ok(())
        }
        Err(_) => Ok(()),
    }
}

async fn greet_and_talk<S: AsyncRead + AsyncWrite + Unpin>(
    shared: &Shared,
    mut stream: S,
    client: &mut Client,
    offer_tls: bool,
) -> std::io::Result<Option<S>> {
    let node = &shared.node;
    if !node.is_ready() || node.is_draining() {
        reply(&mut stream, "421 4.3.2 not ready, try again later").await?;
        return Ok(None);
    }
    let host = &node.config.delivery.ehlo_name;
    reply(&mut stream, &format!("220 {host} ESMTP Sluice submission")).await?;
    dialogue(shared, stream, client, offer_tls).await
}

/// Commands until QUIT, an error limit, or STARTTLS (when `offer_tls`): then the stream is
/// handed back for the handshake.
async fn dialogue<S: AsyncRead + AsyncWrite + Unpin>(
    shared: &Shared,
    stream: S,
    client: &mut Client,
    offer_tls: bool,
) -> std::io::Result<Option<S>> {
    let node = &shared.node;
    let cfg = &node.config.submission;
    let (rd, wr) = tokio::io::split(stream);
    let mut rd = BufReader::with_capacity(64 * 1024, rd);
    // Replies wait here while pipelined commands are still to be read (see the loop's end).
    let mut wr = BufWriter::with_capacity(4096, wr);
    let host = &node.config.delivery.ehlo_name;
    let max_size = cfg.max_message_bytes;
    let mut tx = Transaction::default();
    let mut bad = 0usize;
    loop {
        let text = match next_command(&mut rd, &mut wr).await? {
            Next::Closed => return Ok(None),
            Next::TooLong => {
                REFUSED.with_label_values(&["line"]).inc();
                bad += 1;
                if bad >= MAX_BAD_COMMANDS {
                    break;
                }
                continue;
            }
            Next::Command(text) => text,
        };
        let may_auth = client.tls || cfg.allow_plaintext_auth;
        let answer: String = match Command::parse(&text) {
            Command::Ehlo | Command::Helo => {
                let name: String = text
                    .split_ascii_whitespace()
                    .nth(1)
                    .unwrap_or("")
                    .chars()
                    .filter(|c| c.is_ascii_graphic())
                    .take(255)
                    .collect();
                if name.is_empty() {
                    "501 5.5.4 syntax: EHLO <your host name>".into()
                } else {
                    tx = Transaction::default();
                    client.helo = Some(name);
                    if text[..4].eq_ignore_ascii_case("HELO") {
                        format!("250 {host}")
                    } else {
                        let mut ext = vec![
                            host.to_string(),
                            "PIPELINING".into(),
                            format!("SIZE {max_size}"),
                            "8BITMIME".into(),
                            "SMTPUTF8".into(),
                            "ENHANCEDSTATUSCODES".into(),
                            "CHUNKING".into(),
                            "DSN".into(),
                        ];
                        if offer_tls && !client.tls {
                            ext.push("STARTTLS".into());
                        }
                        if may_auth {
                            ext.push("AUTH PLAIN LOGIN".into());
                        }
                        let last = ext.len() - 1;
                        ext.iter()
                            .enumerate()
                            .map(|(i, e)| format!("250{}{e}", if i == last { ' ' } else { '-' }))
                            .collect::<Vec<_>>()
                            .join("\r\n")
                    }
                }
            }
            Command::Auth { mechanism, initial } => {
                if client.user.is_some() {
                    "503 5.5.1 already authenticated".into()
                } else if tx.mail_from.is_some() {
                    "503 5.5.1 AUTH is not allowed during a transaction".into()
                } else if !may_auth {
                    REFUSED.with_label_values(&["encryption_required"]).inc();
                    "538 5.7.11 encryption required: STARTTLS first".into()
                } else if shared.blocked(client.ip) {
                    AUTH.with_label_values(&["blocked"]).inc();
                    "454 4.7.0 too many failed authentication attempts; try again later".into()
                } else {
                    let mechanism = mechanism.to_ascii_uppercase();
                    let initial = initial.map(str::to_owned);
                    match authenticate(&mut rd, &mut wr, &mechanism, initial).await? {
                        Auth::Credentials(user, password) => {
                            if let Some(tenant) = shared.tenant_of(&password) {
                                AUTH.with_label_values(&["ok"]).inc();
                                client.user = Some(user);
                                client.tenant = Some(tenant);
                                "235 2.7.0 authentication successful".into()
                            } else {
                                AUTH.with_label_values(&["failed"]).inc();
                                shared.failed(client.ip);
                                "535 5.7.8 authentication credentials invalid".into()
                            }
                        }
                        Auth::Cancelled => "501 5.7.0 authentication cancelled".into(),
                        Auth::Malformed => {
                            AUTH.with_label_values(&["failed"]).inc();
                            shared.failed(client.ip);
                            "501 5.5.2 cannot decode the response (base64)".into()
                        }
                        Auth::Unsupported => {
                            "504 5.5.4 unsupported mechanism; use PLAIN or LOGIN".into()
                        }
                        Auth::Eof => return Ok(None),
                    }
                }
            }
            Command::Mail(mail) => {
                if client.user.is_none() && !client.trusted {
                    REFUSED.with_label_values(&["auth_required"]).inc();
                    if may_auth {
                        "530 5.7.0 authentication required".into()
                    } else {
                        "530 5.7.0 authentication required: STARTTLS, then AUTH".into()
                    }
                } else if client.helo.is_none() {
                    "503 5.5.1 EHLO first".into()
                } else if tx.mail_from.is_some() {
                    "503 5.5.1 nested MAIL command".into()
                } else {
                    match mail {
                        None => {
                            bad += 1;
                            "501 5.5.4 syntax: MAIL FROM:<address>".into()
                        }
                        Some(m) => match mail_from(&m, max_size) {
                            Ok(t) => {
                                tx = t;
                                "250 2.1.0 sender ok".into()
                            }
                            Err(reply) => {
                                if reply.starts_with("552") {
                                    REFUSED.with_label_values(&["size"]).inc();
                                }
                                reply
                            }
                        },
                    }
                }
            }
            Command::Rcpt(rcpt) => {
                if tx.mail_from.is_none() {
                    "503 5.5.1 MAIL first".into()
                } else if tx.rcpts.len() >= cfg.max_recipients {
                    REFUSED.with_label_values(&["recipients"]).inc();
                    format!(
                        "452 4.5.3 at most {} recipients per message",
                        cfg.max_recipients
                    )
                } else {
                    match rcpt {
                        None => {
                            bad += 1;
                            "501 5.5.4 syntax: RCPT TO:<address>".into()
                        }
                        Some(r) => match rcpt_to(&r) {
                            Ok(r) => {
                                tx.rcpts.push(r);
                                "250 2.1.5 recipient ok".into()
                            }
                            Err(reply) => reply,
                        },
                    }
                }
            }
            Command::Data => {
                if tx.chunks.is_some() {
                    "503 5.5.1 DATA after BDAT in one transaction".into()
                } else if tx.mail_from.is_none() {
                    "503 5.5.1 MAIL first".into()
                } else if tx.rcpts.is_empty() {
                    "554 5.5.1 no valid recipients".into()
                } else {
                    reply(&mut wr, "354 end data with <CR><LF>.<CR><LF>").await?;
                    let read = tokio::time::timeout(
                        DATA_TIMEOUT,
                        read_data(&mut rd, max_size, raw::MAX_LINE, true),
                    )
                    .await;
                    let r = match read {
                        Err(_) => {
                            reply(&mut wr, "421 4.4.2 data timeout, closing").await?;
                            return Ok(None);
                        }
                        Ok(r) => r?,
                    };
                    let answer = match r {
                        Data::Eof => return Ok(None),
                        Data::TooBig => {
                            REFUSED.with_label_values(&["size"]).inc();
                            MESSAGES.with_label_values(&["refused"]).inc();
                            format!("552 5.3.4 message size exceeds {max_size} octets")
                        }
                        Data::LineTooLong => {
                            REFUSED.with_label_values(&["line"]).inc();
                            MESSAGES.with_label_values(&["refused"]).inc();
                            format!(
                                "554 5.6.0 line: a line is longer than {} octets (RFC 5322 §2.1.1)",
                                raw::MAX_LINE
                            )
                        }
                        Data::BareLineEnding => {
                            REFUSED.with_label_values(&["line"]).inc();
                            MESSAGES.with_label_values(&["refused"]).inc();
                            "554 5.6.0 line: a line ends in a bare LF or holds a bare CR; lines end in CRLF"
                                .into()
                        }
                        Data::Message(m) => {
                            submit(shared, client, std::mem::take(&mut tx), m).await
                        }
                    };
                    tx = Transaction::default();
                    answer
                }
            }
            Command::Bdat(None) => {
                // The chunk's length is unknown, so the session cannot stay in step.
                REFUSED.with_label_values(&["syntax"]).inc();
                reply(&mut wr, "501 5.5.4 syntax: BDAT <size> [LAST]; closing").await?;
                return Ok(None);
            }
            Command::Bdat(Some(chunk)) => {
                let ready = tx.mail_from.is_some() && !tx.rcpts.is_empty();
                let mut into = tx.chunks.take().unwrap_or_default();
                let read = tokio::time::timeout(
                    DATA_TIMEOUT,
                    read_chunk(&mut rd, chunk.size, &mut into, max_size),
                )
                .await;
                let fits = match read {
                    Err(_) => {
                        reply(&mut wr, "421 4.4.2 data timeout, closing").await?;
                        return Ok(None);
                    }
                    Ok(Err(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                        return Ok(None);
                    }
                    Ok(r) => r?,
                };
                if !ready {
                    // RFC 3030 §2: the chunk is read and dropped.
                    tx.chunks = None;
                    if tx.mail_from.is_none() {
                        "503 5.5.1 MAIL first".into()
                    } else {
                        "554 5.5.1 no valid recipients".into()
                    }
                } else {
                    tx.chunks_too_big |= !fits;
                    if !chunk.last {
                        tx.chunks = Some(into);
                        format!("250 2.0.0 {} octets received", chunk.size)
                    } else if tx.chunks_too_big {
                        REFUSED.with_label_values(&["size"]).inc();
                        MESSAGES.with_label_values(&["refused"]).inc();
                        tx = Transaction::default();
                        format!("552 5.3.4 message size exceeds {max_size} octets")
                    } else {
                        let answer = submit(shared, client, std::mem::take(&mut tx), into).await;
                        tx = Transaction::default();
                        answer
                    }
                }
            }
            Command::Rset => {
                tx = Transaction::default();
                "250 2.0.0 ok".into()
            }
            Command::Noop => "250 2.0.0 ok".into(),
            Command::Vrfy => "252 2.5.0 cannot verify".into(),
            Command::Help => "214 2.0.0 see RFC 5321 and RFC 6409".into(),
            Command::Quit => {
                reply(&mut wr, "221 2.0.0 bye").await?;
                return Ok(None);
            }
            Command::StartTls { params } if offer_tls && !client.tls => {
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
                    return Ok(Some(rd.into_inner().unsplit(wr.into_inner())));
                }
            }
            Command::StartTls { .. } if client.tls => "503 5.5.1 TLS is already active".into(),
            _ => {
                bad += 1;
                REFUSED.with_label_values(&["syntax"]).inc();
                "502 5.5.2 command not recognised".into()
            }
        };
        queue_reply(&mut wr, &answer).await?;
        // Flushed unless a whole command is already waiting: the next read cannot block then.
        if memchr::memchr(b'\n', rd.buffer()).is_none() {
            wr.flush().await?;
        }
        if bad >= MAX_BAD_COMMANDS {
            break;
        }
    }
    reply(&mut wr, "421 4.7.0 too many errors, closing").await?;
    Ok(None)
}

/// The outcome of an AUTH exchange.
enum Auth {
    /// The user name (or authorisation identity) and password given.
    Credentials(String, Vec<u8>),
    Cancelled,
    Malformed,
    Unsupported,
    Eof,
}

/// Runs the AUTH exchange for `mechanism` (RFC 4954 with RFC 4616 PLAIN, or LOGIN).
async fn authenticate<R: AsyncBufRead + Unpin, W: AsyncWriteExt + Unpin>(
    rd: &mut R,
    wr: &mut W,
    mechanism: &str,
    initial: Option<String>,
) -> std::io::Result<Auth> {
    /// One response line from the client: `None` at the end of the stream, `Some(Err)` when
    /// it cancelled (`*`) or it is not base64.
    async fn respond<R: AsyncBufRead + Unpin, W: AsyncWriteExt + Unpin>(
        rd: &mut R,
        wr: &mut W,
        prompt: &str,
    ) -> std::io::Result<Option<Result<Vec<u8>, Auth>>> {
        reply(wr, prompt).await?;
        let line =
            match tokio::time::timeout(COMMAND_TIMEOUT, read_line(rd, MAX_COMMAND_LINE)).await {
                Err(_) => return Ok(None),
                Ok(l) => l?,
            };
        Ok(match line {
            Line::Eof => None,
            Line::TooLong => Some(Err(Auth::Malformed)),
            Line::Data(l) => Some(decode(&String::from_utf8_lossy(trim_crlf(&l)))),
        })
    }
    fn decode(text: &str) -> Result<Vec<u8>, Auth> {
        if text.trim() == "*" {
            return Err(Auth::Cancelled);
        }
        base64::engine::general_purpose::STANDARD
            .decode(text.trim())
            .map_err(|_| Auth::Malformed)
    }
    match mechanism {
        "PLAIN" => {
            let response = match initial {
                // RFC 4954 §4: "=" is an empty initial response.
                Some(i) if i == "=" => Ok(Vec::new()),
                Some(i) => decode(&i),
                None => match respond(rd, wr, "334 ").await? {
                    None => return Ok(Auth::Eof),
                    Some(r) => r,
                },
            };
            let response = match response {
                Ok(r) => r,
                Err(a) => return Ok(a),
            };
            // authzid NUL authcid NUL passwd
            let mut parts = response.split(|&b| b == 0);
            let (Some(authz), Some(authc), Some(password), None) =
                (parts.next(), parts.next(), parts.next(), parts.next())
            else {
                return Ok(Auth::Malformed);
            };
            let user = if authc.is_empty() { authz } else { authc };
            Ok(Auth::Credentials(
                String::from_utf8_lossy(user).into_owned(),
                password.to_vec(),
            ))
        }
        "LOGIN" => {
            let user = match initial {
                Some(i) => decode(&i),
                None => match respond(rd, wr, "334 VXNlcm5hbWU6").await? {
                    None => return Ok(Auth::Eof),
                    Some(r) => r,
                },
            };
            let user = match user {
                Ok(u) => u,
                Err(a) => return Ok(a),
            };
            let password = match respond(rd, wr, "334 UGFzc3dvcmQ6").await? {
                None => return Ok(Auth::Eof),
                Some(Ok(p)) => p,
                Some(Err(a)) => return Ok(a),
            };
            Ok(Auth::Credentials(
                String::from_utf8_lossy(&user).into_owned(),
                password,
            ))
        }
        _ => Ok(Auth::Unsupported),
    }
}

/// A new transaction from `MAIL FROM`, or the reply that refuses it.
fn mail_from(m: &MailFrom<'_>, max_size: usize) -> Result<Transaction, String> {
    if !m.path.is_empty()
        && let Err(e) = Address::parse(m.path)
    {
        return Err(format!("553 5.1.7 <{}>: {e}", m.path));
    }
    let mut tx = Transaction {
        mail_from: Some(m.path.to_owned()),
        ..Transaction::default()
    };
    for (key, value) in params(m.params) {
        match (key.to_ascii_uppercase().as_str(), value) {
            ("SIZE", Some(v)) => match v.parse::<u64>() {
                Ok(n) if n > max_size as u64 => {
                    return Err(format!("552 5.3.4 message size exceeds {max_size} octets"));
                }
                Ok(_) => {}
                Err(_) => return Err("501 5.5.4 SIZE takes a number".into()),
            },
            ("BODY", Some(v)) if v.eq_ignore_ascii_case("7BIT") => {}
            ("BODY", Some(v)) if v.eq_ignore_ascii_case("8BITMIME") => {}
            ("SMTPUTF8", None) => {}
            ("RET", Some(v)) => {
                tx.ret = Some(match v.to_ascii_uppercase().as_str() {
                    "FULL" => Ret::Full,
                    "HDRS" => Ret::Hdrs,
                    _ => return Err("501 5.5.4 RET is FULL or HDRS".into()),
                });
            }
            ("ENVID", Some(v)) => match xtext_decode(v) {
                Some(id) if id.len() <= MAX_ENVID => tx.envid = Some(id),
                _ => {
                    return Err(format!(
                        "501 5.5.4 ENVID is xtext of at most {MAX_ENVID} characters"
                    ));
                }
            },
            // RFC 4954 §5: the submitter's claim about who authored it; nothing to do with it.
            ("AUTH", Some(_)) => {}
            _ => return Err(format!("555 5.5.4 unsupported MAIL parameter {key}")),
        }
    }
    Ok(tx)
}

/// A recipient from `RCPT TO`, or the reply that refuses it.
fn rcpt_to(r: &RcptTo<'_>) -> Result<Recipient, String> {
    let address = Address::parse(r.path).map_err(|e| format!("553 5.1.3 <{}>: {e}", r.path))?;
    let mut notify = None;
    let mut orcpt = None;
    for (key, value) in params(r.params) {
        match (key.to_ascii_uppercase().as_str(), value) {
            ("NOTIFY", Some(v)) => {
                let v = v.to_ascii_uppercase();
                let items: Vec<&str> = v.split(',').collect();
                let valid = if items.contains(&"NEVER") {
                    items.len() == 1
                } else {
                    items
                        .iter()
                        .all(|i| matches!(*i, "SUCCESS" | "FAILURE" | "DELAY"))
                };
                if !valid {
                    return Err(
                        "501 5.5.4 NOTIFY is NEVER, or some of SUCCESS, FAILURE, DELAY".into(),
                    );
                }
                notify = Some(v);
            }
            ("ORCPT", Some(v)) => match xtext_decode(v) {
                Some(o) if o.contains(';') && o.len() <= 500 => orcpt = Some(o),
                _ => return Err("501 5.5.4 ORCPT is <address type>;<xtext address>".into()),
            },
            _ => return Err(format!("555 5.5.4 unsupported RCPT parameter {key}")),
        }
    }
    Ok(Recipient {
        address,
        notify,
        orcpt,
    })
}

/// Checks and queues one message; the reply to its end.
async fn submit(shared: &Shared, client: &Client, tx: Transaction, message: Vec<u8>) -> String {
    let node = &shared.node;
    let checked = match raw::check(&message) {
        Ok(c) => c,
        Err(e) => {
            MESSAGES.with_label_values(&["refused"]).inc();
            return format!("554 5.6.0 {}: {}", e.field, e.message);
        }
    };
    // RFC 3848: ESMTP, plus S with TLS, plus A with AUTH.
    let protocol = format!(
        "ESMTP{}{}",
        if client.tls { "S" } else { "" },
        if client.user.is_some() { "A" } else { "" }
    );
    let received = format!(
        "Received: from {} ([{}])\r\n\tby {} (Sluice) with {protocol};\r\n\t{}",
        client.helo.as_deref().unwrap_or("unknown"),
        client.ip,
        node.config.delivery.ehlo_name,
        raw::rfc2822_date(crate::now_ms())
    );
    let recipients = tx.rcpts.len() as u64;
    // Each message counts as a request against its tenant's API rate.
    if let Some(t) = &client.tenant
        && t.admit_request().is_err()
    {
        MESSAGES.with_label_values(&["deferred"]).inc();
        crate::metrics::TENANT_REFUSED
            .with_label_values(&[t.label.as_str(), "rate_limited"])
            .inc();
        return format!(
            "451 4.7.1 tenant {:?} is over its rate of {}; try again shortly",
            t.name(),
            t.spec.rate.map_or_else(String::new, |r| r.to_string())
        );
    }
    let submission = raw::Submission {
        checked,
        recipients: tx.rcpts,
        mail_from: tx.mail_from.unwrap_or_default(),
        ret: tx.ret,
        envid: tx.envid,
        via: "smtp",
        received: Some(received),
        tenant: client.tenant.clone(),
    };
    match raw::ingest(node, submission, |_, _| {}).await {
        Ok(q) => {
            MESSAGES.with_label_values(&["accepted"]).inc();
            RECIPIENTS.inc_by(recipients);
            match q.id {
                Some(id) => format!("250 2.0.0 queued as {id}"),
                None => "250 2.0.0 accepted".into(),
            }
        }
        Err(raw::IngestError::Invalid(e)) => {
            MESSAGES.with_label_values(&["refused"]).inc();
            format!("554 5.6.0 {}: {}", e.field, e.message)
        }
        Err(e) => {
            MESSAGES.with_label_values(&["deferred"]).inc();
            tracing::warn!(error = %e, "a submitted message could not be queued");
            match e {
                raw::IngestError::Upload(crate::intake::ingest::UploadError::Spool(
                    crate::store::spool::SpoolError::NoSpace(_),
                )) => "452 4.3.1 insufficient system storage; try again later".into(),
                raw::IngestError::Quota(q) => {
                    if let Some(t) = &client.tenant {
                        crate::metrics::TENANT_REFUSED
                            .with_label_values(&[t.label.as_str(), "daily_quota_exceeded"])
                            .inc();
                    }
                    format!(
                        "451 4.7.1 daily quota of {} recipients reached; try again in {} s",
                        q.quota, q.retry_after_s
                    )
                }
                _ => "451 4.3.0 the message could not be queued; try again later".into(),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mail(text: &str) -> Result<Transaction, String> {
        match Command::parse(text) {
            Command::Mail(Some(m)) => mail_from(&m, 1000),
            other => panic!("{other:?}"),
        }
    }

    fn rcpt(text: &str) -> Result<Recipient, String> {
        match Command::parse(text) {
            Command::Rcpt(Some(r)) => rcpt_to(&r),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn mail_parameters_are_checked_and_kept() {
        let tx = mail("MAIL FROM:<a@b.test> SIZE=10 BODY=8BITMIME RET=hdrs ENVID=x+2By SMTPUTF8")
            .unwrap();
        assert_eq!(tx.mail_from.as_deref(), Some("a@b.test"));
        assert_eq!(tx.ret, Some(Ret::Hdrs));
        assert_eq!(tx.envid.as_deref(), Some("x+y"));
        assert!(mail("MAIL FROM:<>").is_ok());
        for (text, code) in [
            ("MAIL FROM:<a@b.test> SIZE=1001", "552"),
            ("MAIL FROM:<a@b.test> SIZE=x", "501"),
            ("MAIL FROM:<a@b.test> BODY=BINARYMIME", "555"),
            ("MAIL FROM:<a@b.test> RET=ALL", "501"),
            ("MAIL FROM:<a@b.test> ENVID=a+zz", "501"),
            ("MAIL FROM:<a@b.test> XFOO=1", "555"),
            ("MAIL FROM:<not an address>", "553"),
        ] {
            let e = mail(text).err().unwrap_or_else(|| panic!("{text}"));
            assert!(e.starts_with(code), "{text}: {e}");
        }
    }

    #[test]
    fn rcpt_parameters_are_checked_and_kept() {
        let r = rcpt("RCPT TO:<x@y.test> NOTIFY=failure,delay ORCPT=rfc822;x+40y.test").unwrap();
        assert_eq!(r.notify.as_deref(), Some("FAILURE,DELAY"));
        assert_eq!(r.orcpt.as_deref(), Some("rfc822;x@y.test"));
        assert_eq!(
            rcpt("RCPT TO:<x@y.test> NOTIFY=NEVER")
                .unwrap()
                .notify
                .as_deref(),
            Some("NEVER")
        );
        for (text, code) in [
            ("RCPT TO:<x@y.test> NOTIFY=NEVER,FAILURE", "501"),
            ("RCPT TO:<x@y.test> NOTIFY=SOMETIMES", "501"),
            ("RCPT TO:<x@y.test> ORCPT=x+40y.test", "501"),
            ("RCPT TO:<x@y.test> FOO=1", "555"),
            ("RCPT TO:<nobody>", "553"),
        ] {
            let e = rcpt(text).err().unwrap_or_else(|| panic!("{text}"));
            assert!(e.starts_with(code), "{text}: {e}");
        }
    }

    #[tokio::test]
    async fn auth_plain_and_login_exchanges() {
        let b64 = |s: &[u8]| base64::engine::general_purpose::STANDARD.encode(s);
        let mut out = Vec::new();
        let mut rd = BufReader::new(&b""[..]);
        let initial = b64(b"\0user\0secret");
        match authenticate(&mut rd, &mut out, "PLAIN", Some(initial))
            .await
            .unwrap()
        {
            Auth::Credentials(u, p) => {
                assert_eq!((u.as_str(), p.as_slice()), ("user", &b"secret"[..]))
            }
            _ => panic!("PLAIN with an initial response"),
        }
        let lines = format!("{}\r\n{}\r\n", b64(b"me"), b64(b"pw"));
        let mut rd = BufReader::new(lines.as_bytes());
        let mut out = Vec::new();
        match authenticate(&mut rd, &mut out, "LOGIN", None)
            .await
            .unwrap()
        {
            Auth::Credentials(u, p) => assert_eq!((u.as_str(), p.as_slice()), ("me", &b"pw"[..])),
            _ => panic!("LOGIN"),
        }
        assert_eq!(out, b"334 VXNlcm5hbWU6\r\n334 UGFzc3dvcmQ6\r\n");
        let mut rd = BufReader::new(&b"*\r\n"[..]);
        assert!(matches!(
            authenticate(&mut rd, &mut Vec::new(), "PLAIN", None)
                .await
                .unwrap(),
            Auth::Cancelled
        ));
        assert!(matches!(
            authenticate(&mut rd, &mut Vec::new(), "PLAIN", Some("!!".into()))
                .await
                .unwrap(),
            Auth::Malformed
        ));
        assert!(matches!(
            authenticate(&mut rd, &mut Vec::new(), "CRAM-MD5", None)
                .await
                .unwrap(),
            Auth::Unsupported
        ));
    }
}
