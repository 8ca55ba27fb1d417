//! The inbound SMTP listener on `[bounce] listen`: receives DSNs, ARF complaint reports and
//! `unsubscribe_mailto` mail for the bounce domain, and nothing else.
//!
//! It accepts a recipient only when it is a VERP address whose token authenticates, an
//! unsubscribe address whose token authenticates, one of `bounce.feedback_addresses`, or the
//! postmaster or abuse address of the bounce domain ([`super::postmaster`], forwarded to the
//! operator or kept); anything else gets 550 5.7.1 and nothing is ever relayed. Limits:
//! connections overall and per client address, command and text line length, message size (SIZE
//! and counted), recipients per transaction, bad commands per session, idle time. A message is processed ([`crate::feedback`])
//! before the reply to its final dot, so a 250 means the effect is on disk; a report that cannot
//! be read gets 554 5.6.0 with the reason. Plain socket I/O on tokio; spool work goes through the
//! feedback module.

use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, LazyLock};
use std::time::Duration;

use prometheus::{IntCounterVec, register_int_counter_vec};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::intake::smtp::{
    COMMAND_TIMEOUT, Command, DATA_TIMEOUT, Data, Limits, MailFrom, Next, RcptTo, next_command,
    read_data, reply,
};
use crate::node::Node;
use crate::outbound::tokens::{NodeTag, Owner, Purpose};
use crate::store::spool::JobId;

/// RFC 5322 limits text lines to 998 octets; real DSNs keep to it, generous slack for the rest.
const MAX_TEXT_LINE: usize = 16 * 1024;
const MAX_RECIPIENTS: usize = 100;
const MAX_BAD_COMMANDS: usize = 20;

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
    /// `postmaster` or `abuse` of the bounce domain.
    Role,
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
    let limits = Arc::new(Limits::new(
        node.config.bounce.max_connections,
        node.config.bounce.max_connections_per_ip,
    ));
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
                let Some(_slot) = limits.enter(peer.ip()) else {
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
                    r = session(&node, stream, peer.ip(), tls.as_ref()) => {
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

struct Transaction {
    mail_from: Option<String>,
    rcpts: Vec<(String, Mailbox)>,
}

/// A connection: the greeting, the dialogue, and after STARTTLS the dialogue again over TLS.
async fn session(
    node: &Arc<Node>,
    mut stream: TcpStream,
    client: IpAddr,
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
        return dialogue(node, stream, client, false).await.map(drop);
    };
    let Some(plain) = dialogue(node, stream, client, true).await? else {
        return Ok(());
    };
    match tokio::time::timeout(COMMAND_TIMEOUT, acceptor.accept(plain)).await {
        // RFC 3207 §4.2: the client starts again with EHLO; nothing from before counts.
        Ok(Ok(secure)) => dialogue(node, secure, client, false).await.map(drop),
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
    client: IpAddr,
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
                        Some(MailFrom { path, size, .. }) => {
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
                        Some(RcptTo { path: to, .. }) => match mailbox(node, to) {
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
                    let r = match tokio::time::timeout(
                        DATA_TIMEOUT,
                        read_data(&mut rd, max_size, MAX_TEXT_LINE, false),
                    )
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
                        Data::LineTooLong | Data::BareLineEnding => {
                            REFUSED.with_label_values(&["line"]).inc();
                            format!(
                                "554 5.6.0 message has a line longer than {MAX_TEXT_LINE} octets"
                            )
                        }
                        Data::Message(m) => deliver(node, &tx, client, &m).await,
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

/// Whether the listener takes mail for `address`, and what for.
fn mailbox(node: &Node, address: &str) -> Option<Mailbox> {
    let cfg = &node.config;
    if cfg.is_role_address(address) {
        return Some(Mailbox::Role);
    }
    let (local, domain) = address.rsplit_once('@')?;
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
async fn deliver(node: &Arc<Node>, tx: &Transaction, client: IpAddr, message: &[u8]) -> String {
    let roles: Vec<String> = tx
        .rcpts
        .iter()
        .filter(|(_, m)| *m == Mailbox::Role)
        .map(|(a, _)| a.clone())
        .collect();
    if !roles.is_empty() {
        let arrival = super::postmaster::Arrival {
            client,
            mail_from: tx.mail_from.as_deref().unwrap_or(""),
            rcpts: &roles,
        };
        match super::postmaster::take(node, &arrival, message).await {
            Err(e) => {
                tracing::error!(error = %e, "taking mail for a role address failed");
                return "451 4.3.0 could not take the message; try again later".into();
            }
            Ok(text) if roles.len() == tx.rcpts.len() => return format!("250 2.0.0 {text}"),
            Ok(_) => {}
        }
    }
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
    if unsubscribes.len() + elsewhere + roles.len() == tx.rcpts.len() {
        return "250 2.0.0 unsubscribed".into();
    }
    let rcpts: Vec<String> = tx
        .rcpts
        .iter()
        .filter(|(_, m)| {
            !matches!(
                m,
                Mailbox::Unsubscribe(_) | Mailbox::UnsubscribeElsewhere(..) | Mailbox::Role
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
