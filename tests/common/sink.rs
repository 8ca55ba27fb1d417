//! A small SMTP server for end-to-end tests, on 127.0.0.1:0: scripted replies, STARTTLS with a
//! self-signed certificate, and counters for connections, concurrency and pipelining.
#![allow(dead_code)]

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::TcpListener;

/// Decides the reply to RCPT for an address, given how many times it was seen before.
pub type RcptReply = Arc<dyn Fn(&str, usize) -> String + Send + Sync>;

#[derive(Clone)]
pub struct SinkOptions {
    pub pipelining: bool,
    pub tls: Option<tokio_rustls::TlsAcceptor>,
    pub rcpt: RcptReply,
    /// Delay before answering the final dot.
    pub data_delay: Duration,
    /// Accept connections but never send the greeting.
    pub silent: bool,
    /// Close without replying after the final dot, for (first recipient, times seen before);
    /// nothing is captured then.
    pub drop_after_dot: Option<RcptDrop>,
    /// A reply instead of the greeting for this client address; the connection then closes.
    pub greeting: Option<PeerReply>,
    /// A reply to MAIL FROM instead of 250 for this client address; after a 421 the
    /// connection closes.
    pub mail: Option<PeerReply>,
    /// Where to listen (default 127.0.0.1:0).
    pub listen: Option<SocketAddr>,
    /// Offer CHUNKING and take BDAT (RFC 3030).
    pub chunking: bool,
}

/// A reply for a client address, or `None` to go on as usual.
pub type PeerReply = Arc<dyn Fn(std::net::IpAddr) -> Option<String> + Send + Sync>;

pub type RcptDrop = Arc<dyn Fn(&str, usize) -> bool + Send + Sync>;

impl Default for SinkOptions {
    fn default() -> Self {
        SinkOptions {
            pipelining: true,
            tls: None,
            rcpt: Arc::new(|_, _| "250 2.1.5 ok".to_owned()),
            data_delay: Duration::ZERO,
            silent: false,
            drop_after_dot: None,
            greeting: None,
            mail: None,
            listen: None,
            chunking: false,
        }
    }
}

#[derive(Debug, Clone)]
pub struct Captured {
    pub connection: usize,
    pub mail_from: String,
    pub rcpts: Vec<String>,
    pub data: String,
    pub tls: bool,
    /// When the message was taken (just before the final dot is answered).
    pub at: std::time::Instant,
    /// The client's address (the sender's egress source).
    pub peer: std::net::IpAddr,
    /// The name the client gave in EHLO or HELO.
    pub ehlo: String,
    /// The content came in BDAT chunks rather than after DATA.
    pub bdat: bool,
}

#[derive(Default)]
pub struct SinkStats {
    pub connections: AtomicUsize,
    /// Connections by client address.
    pub connections_by_peer: Mutex<HashMap<std::net::IpAddr, usize>>,
    pub open: AtomicUsize,
    pub max_open: AtomicUsize,
    /// Transactions where RCPT and DATA had arrived before MAIL was answered.
    pub pipelined: AtomicUsize,
    pub messages: Mutex<Vec<Captured>>,
    seen: Mutex<HashMap<String, usize>>,
    /// Transactions dropped after the final dot, per first recipient.
    dropped: Mutex<HashMap<String, usize>>,
}

pub struct Sink {
    pub addr: SocketAddr,
    pub stats: Arc<SinkStats>,
}

impl Sink {
    pub async fn start(opts: SinkOptions) -> Sink {
        let listener = TcpListener::bind(opts.listen.unwrap_or(([127, 0, 0, 1], 0).into()))
            .await
            .expect("bind sink");
        let addr = listener.local_addr().expect("sink address");
        let stats = Arc::new(SinkStats::default());
        let s = Arc::clone(&stats);
        tokio::spawn(async move {
            while let Ok((tcp, peer)) = listener.accept().await {
                let peer = peer.ip();
                // Replies to pipelined commands are separate small writes: without this, Nagle
                // and delayed ACKs add 40 ms to each transaction.
                let _ = tcp.set_nodelay(true);
                let id = s.connections.fetch_add(1, Ordering::SeqCst) + 1;
                *s.connections_by_peer
                    .lock()
                    .unwrap()
                    .entry(peer)
                    .or_default() += 1;
                let open = s.open.fetch_add(1, Ordering::SeqCst) + 1;
                s.max_open.fetch_max(open, Ordering::SeqCst);
                let (s, opts) = (Arc::clone(&s), opts.clone());
                tokio::spawn(async move {
                    let mut io = BufReader::new(tcp);
                    if opts.silent {
                        // Holds the connection open until the client gives up.
                        let mut sink = Vec::new();
                        let _ = tokio::io::AsyncReadExt::read_to_end(&mut io, &mut sink).await;
                        s.open.fetch_sub(1, Ordering::SeqCst);
                        return;
                    }
                    if let Some(reply) = opts.greeting.as_ref().and_then(|g| g(peer)) {
                        let _ = io
                            .get_mut()
                            .write_all(format!("{reply}\r\n").as_bytes())
                            .await;
                        s.open.fetch_sub(1, Ordering::SeqCst);
                        return;
                    }
                    let _ = io.get_mut().write_all(b"220 sink.test ESMTP\r\n").await;
                    if session(&mut io, &opts, &s, id, false, peer).await == Next::StartTls
                        && let Some(acceptor) = &opts.tls
                        && let Ok(tls) = acceptor.accept(io.into_inner()).await
                    {
                        let mut io = BufReader::new(tls);
                        session(&mut io, &opts, &s, id, true, peer).await;
                    }
                    s.open.fetch_sub(1, Ordering::SeqCst);
                });
            }
        });
        Sink { addr, stats }
    }

    pub fn messages(&self) -> Vec<Captured> {
        self.stats.messages.lock().unwrap().clone()
    }
}

#[derive(PartialEq)]
enum Next {
    Done,
    StartTls,
}

async fn session<S: AsyncRead + AsyncWrite + Unpin>(
    io: &mut BufReader<S>,
    opts: &SinkOptions,
    stats: &SinkStats,
    id: usize,
    tls: bool,
    peer: std::net::IpAddr,
) -> Next {
    let mut line = String::new();
    let mut ehlo = String::new();
    let mut mail_from = String::new();
    let mut rcpts: Vec<String> = Vec::new();
    let mut bdat_content: Vec<u8> = Vec::new();
    loop {
        line.clear();
        match io.read_line(&mut line).await {
            Ok(0) | Err(_) => return Next::Done,
            Ok(_) => {}
        }
        let cmd = line.trim_end().to_owned();
        let upper = cmd.to_ascii_uppercase();
        if upper.starts_with("EHLO") || upper.starts_with("HELO") {
            ehlo = cmd.get(5..).unwrap_or("").trim().to_owned();
        }
        let reply: String = if upper.starts_with("EHLO") {
            let mut r = String::from("250-sink.test\r\n");
            if opts.pipelining {
                r.push_str("250-PIPELINING\r\n");
            }
            if opts.tls.is_some() && !tls {
                r.push_str("250-STARTTLS\r\n");
            }
            if opts.chunking {
                r.push_str("250-CHUNKING\r\n");
            }
            r.push_str("250-8BITMIME\r\n250-ENHANCEDSTATUSCODES\r\n250 SIZE 10485760");
            r
        } else if upper.starts_with("HELO") {
            "250 sink.test".into()
        } else if upper == "STARTTLS" && opts.tls.is_some() && !tls {
            let _ = io.get_mut().write_all(b"220 2.0.0 go ahead\r\n").await;
            return Next::StartTls;
        } else if upper.starts_with("MAIL FROM:") {
            mail_from = cmd[10..]
                .trim()
                .trim_start_matches('<')
                .split('>')
                .next()
                .unwrap_or("")
                .to_owned();
            rcpts.clear();
            // Pipelining shows as RCPT and DATA already waiting before MAIL is answered.
            tokio::time::sleep(Duration::from_millis(5)).await;
            if io.buffer().is_empty() {
                let _ = tokio::time::timeout(Duration::from_millis(20), io.fill_buf()).await;
            }
            let pending = String::from_utf8_lossy(io.buffer()).to_ascii_uppercase();
            if pending.contains("RCPT TO:") && pending.contains("DATA") {
                stats.pipelined.fetch_add(1, Ordering::SeqCst);
            }
            match opts.mail.as_ref().and_then(|m| m(peer)) {
                Some(reply) if reply.starts_with("421") => {
                    let _ = io
                        .get_mut()
                        .write_all(format!("{reply}\r\n").as_bytes())
                        .await;
                    return Next::Done;
                }
                Some(reply) => reply,
                None => "250 2.1.0 ok".into(),
            }
        } else if upper.starts_with("RCPT TO:") {
            let rcpt = cmd[8..]
                .trim()
                .trim_start_matches('<')
                .split('>')
                .next()
                .unwrap_or("")
                .to_owned();
            let n = {
                let mut seen = stats.seen.lock().unwrap();
                let c = seen.entry(rcpt.clone()).or_insert(0);
                *c += 1;
                *c - 1
            };
            let r = (opts.rcpt)(&rcpt, n);
            if r.starts_with('2') {
                rcpts.push(rcpt);
            }
            r
        } else if upper == "DATA" {
            if rcpts.is_empty() {
                "554 5.5.1 no valid recipients".into()
            } else {
                let _ = io.get_mut().write_all(b"354 go ahead\r\n").await;
                let mut data = String::new();
                loop {
                    line.clear();
                    match io.read_line(&mut line).await {
                        Ok(0) | Err(_) => return Next::Done,
                        Ok(_) => {}
                    }
                    if line == ".\r\n" {
                        break;
                    }
                    data.push_str(line.strip_prefix('.').unwrap_or(&line));
                }
                if let Some(drop_it) = &opts.drop_after_dot {
                    let first = rcpts.first().cloned().unwrap_or_default();
                    let prior = stats
                        .dropped
                        .lock()
                        .unwrap()
                        .entry(first.clone())
                        .or_insert(0)
                        .to_owned();
                    if drop_it(&first, prior) {
                        *stats.dropped.lock().unwrap().entry(first).or_insert(0) += 1;
                        return Next::Done;
                    }
                }
                tokio::time::sleep(opts.data_delay).await;
                stats.messages.lock().unwrap().push(Captured {
                    connection: id,
                    mail_from: mail_from.clone(),
                    rcpts: std::mem::take(&mut rcpts),
                    data,
                    tls,
                    at: std::time::Instant::now(),
                    peer,
                    ehlo: ehlo.clone(),
                    bdat: false,
                });
                "250 2.0.0 queued".into()
            }
        } else if opts.chunking && upper.starts_with("BDAT ") {
            let mut words = upper[5..].split_ascii_whitespace();
            let size: Option<usize> = words.next().and_then(|n| n.parse().ok());
            let last = words.next() == Some("LAST");
            let Some(size) = size else {
                return Next::Done;
            };
            let mut chunk = vec![0; size];
            if tokio::io::AsyncReadExt::read_exact(io, &mut chunk)
                .await
                .is_err()
            {
                return Next::Done;
            }
            bdat_content.extend_from_slice(&chunk);
            if !last {
                "250 2.0.0 chunk taken".into()
            } else if rcpts.is_empty() {
                bdat_content.clear();
                "554 5.5.1 no valid recipients".into()
            } else {
                stats.messages.lock().unwrap().push(Captured {
                    connection: id,
                    mail_from: mail_from.clone(),
                    rcpts: std::mem::take(&mut rcpts),
                    data: String::from_utf8_lossy(&std::mem::take(&mut bdat_content)).into_owned(),
                    tls,
                    at: std::time::Instant::now(),
                    peer,
                    ehlo: ehlo.clone(),
                    bdat: true,
                });
                "250 2.0.0 queued".into()
            }
        } else if upper == "RSET" || upper == "NOOP" {
            rcpts.clear();
            bdat_content.clear();
            "250 2.0.0 ok".into()
        } else if upper == "QUIT" {
            let _ = io.get_mut().write_all(b"221 2.0.0 bye\r\n").await;
            return Next::Done;
        } else {
            "500 5.5.2 what?".into()
        };
        if io
            .get_mut()
            .write_all(format!("{reply}\r\n").as_bytes())
            .await
            .is_err()
            || reply.starts_with("421")
        {
            return Next::Done;
        }
    }
}

/// A TLS acceptor with a fresh self-signed certificate for `sink.test`.
pub fn self_signed_acceptor() -> tokio_rustls::TlsAcceptor {
    let cert =
        rcgen::generate_simple_self_signed(vec!["sink.test".to_owned()]).expect("certificate");
    let key =
        rustls::pki_types::PrivateKeyDer::try_from(cert.signing_key.serialize_der()).expect("key");
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("protocol versions")
        .with_no_client_auth()
        .with_single_cert(vec![cert.cert.der().clone()], key)
        .expect("server config");
    tokio_rustls::TlsAcceptor::from(Arc::new(config))
}
