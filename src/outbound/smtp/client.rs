//! One outbound SMTP connection: greeting, EHLO (HELO fallback), STARTTLS, and pipelined
//! transactions (RFC 5321, 2920, 3207, 1870, 6152, 6531).
//!
//! Owns the wire protocol only. It reports what happened as typed replies and errors; deciding
//! what that means for a recipient is `outcome`'s job. Every read and write has the RFC 5321
//! §4.5.3.2 timeout for its stage. Async network I/O; no blocking calls.
//!
//! A [`Connection`] runs over any byte stream ([`Connection::with_stream`]): TCP in production
//! ([`Connection::open`] connects, optionally from a source address), an in-memory pipe in the
//! unit tests below, which script the server's side of the dialogue.

use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use prometheus::{Histogram, register_histogram};
use serde::Deserialize;
use tokio::io::{
    AsyncBufReadExt, AsyncRead, AsyncWrite, AsyncWriteExt, BufReader, BufWriter, ReadBuf,
};

use tokio::net::{TcpSocket, TcpStream};
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

use super::reply::{Command, Reply, ReplyBuilder, ReplyError};

pub(crate) static CONNECT_SECONDS: std::sync::LazyLock<Histogram> = std::sync::LazyLock::new(
    || {
        register_histogram!(
        "sluice_smtp_connect_seconds",
        "Outbound TCP connect time, successful connects only. Tens of milliseconds and up mean a far or overloaded receiver; compare with sluice_smtp_tls_handshake_seconds.",
        prometheus::exponential_buckets(0.0001, 2.0, 18).expect("static buckets")
    )
    .expect("metric registers once")
    },
);

pub(crate) static TLS_SECONDS: std::sync::LazyLock<Histogram> = std::sync::LazyLock::new(|| {
    register_histogram!(
        "sluice_smtp_tls_handshake_seconds",
        "STARTTLS handshake time (after the 220 to STARTTLS), successful handshakes only. Mostly the receiver's key exchange; it is paid once per connection, so long ones argue for more messages per connection.",
        prometheus::exponential_buckets(0.0005, 2.0, 16).expect("static buckets")
    )
    .expect("metric registers once")
});

/// When to use STARTTLS.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TlsMode {
    /// Use it when offered, without checking the certificate; fall back to plain text if the
    /// handshake fails. What most MTAs do by default.
    #[default]
    Opportunistic,
    /// Insist on STARTTLS; any certificate is accepted.
    Required,
    /// Insist on STARTTLS with a certificate valid for the MX host name (WebPKI roots).
    Verify,
    /// Never use TLS.
    Disabled,
}

/// The TLS a connection must have: a mode, and for a connection whose certificate is checked
/// by something other than the settings' own verifiers (DANE's TLSA records), the connector
/// that does it.
#[derive(Clone)]
pub struct TlsPolicy {
    pub mode: TlsMode,
    pub connector: Option<TlsConnector>,
    /// Names the policy in the delivery log (`dane`, `sts-enforce`, `opportunistic`...).
    pub label: &'static str,
}

impl From<TlsMode> for TlsPolicy {
    fn from(mode: TlsMode) -> TlsPolicy {
        TlsPolicy {
            mode,
            connector: None,
            label: mode.label(),
        }
    }
}

impl TlsMode {
    /// The delivery log's name of the policy a rule's mode stands for.
    pub fn label(self) -> &'static str {
        match self {
            TlsMode::Opportunistic => "opportunistic",
            TlsMode::Required => "required",
            TlsMode::Verify => "verify",
            TlsMode::Disabled => "none",
        }
    }
}

/// Why a certificate was refused, in the result types of TLS reporting (RFC 8460 §4.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CertFailure {
    /// Not valid for the MX host name.
    HostMismatch,
    Expired,
    /// No chain to a trusted root (self-signed, unknown issuer, bad signature).
    NotTrusted,
    /// Anything else the verifier refused: a DANE mismatch, a malformed certificate.
    ValidationFailure,
}

impl CertFailure {
    /// The RFC 8460 result type.
    pub fn result_type(self) -> &'static str {
        match self {
            CertFailure::HostMismatch => "certificate-host-mismatch",
            CertFailure::Expired => "certificate-expired",
            CertFailure::NotTrusted => "certificate-not-trusted",
            CertFailure::ValidationFailure => "validation-failure",
        }
    }

    fn of(e: &rustls::Error) -> Option<CertFailure> {
        use rustls::CertificateError as C;
        let rustls::Error::InvalidCertificate(c) = e else {
            return None;
        };
        Some(match c {
            C::NotValidForName | C::NotValidForNameContext { .. } => CertFailure::HostMismatch,
            C::Expired | C::ExpiredContext { .. } => CertFailure::Expired,
            C::UnknownIssuer | C::BadSignature | C::UnknownRevocationStatus => {
                CertFailure::NotTrusted
            }
            _ => CertFailure::ValidationFailure,
        })
    }
}

/// Per-stage timeouts (RFC 5321 §4.5.3.2 defaults).
#[derive(Debug, Clone, Copy)]
pub struct Timeouts {
    pub connect: Duration,
    pub greeting: Duration,
    pub command: Duration,
    pub data_init: Duration,
    pub data_block: Duration,
    pub data_final: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            connect: Duration::from_secs(30),
            greeting: Duration::from_secs(300),
            command: Duration::from_secs(300),
            data_init: Duration::from_secs(120),
            data_block: Duration::from_secs(180),
            data_final: Duration::from_secs(600),
        }
    }
}

/// Shared, immutable client settings.
pub struct ClientSettings {
    pub ehlo_name: String,
    pub timeouts: Timeouts,
    verifying: TlsConnector,
    trusting: TlsConnector,
}

impl ClientSettings {
    /// Settings whose verifying connector trusts Mozilla's roots and `extra_roots`.
    pub fn new(
        ehlo_name: String,
        timeouts: Timeouts,
        extra_roots: &[rustls::pki_types::CertificateDer<'static>],
    ) -> ClientSettings {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let roots = root_store(extra_roots);
        let verifying = rustls::ClientConfig::builder_with_provider(Arc::clone(&provider))
            .with_safe_default_protocol_versions()
            .expect("ring supports the default protocol versions")
            .with_root_certificates(roots)
            .with_no_client_auth();
        let trusting = rustls::ClientConfig::builder_with_provider(Arc::clone(&provider))
            .with_safe_default_protocol_versions()
            .expect("ring supports the default protocol versions")
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AcceptAnyCert(provider)))
            .with_no_client_auth();
        ClientSettings {
            ehlo_name,
            timeouts,
            verifying: TlsConnector::from(Arc::new(verifying)),
            trusting: TlsConnector::from(Arc::new(trusting)),
        }
    }
}

/// Mozilla's roots and `extra` (certificates that do not parse as roots are skipped: the
/// config check reads them first and names the file).
pub fn root_store(extra: &[rustls::pki_types::CertificateDer<'static>]) -> rustls::RootCertStore {
    let mut roots = rustls::RootCertStore {
        roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
    };
    roots.add_parsable_certificates(extra.iter().cloned());
    roots
}

/// Opportunistic TLS encrypts without authenticating (RFC 7435): any certificate will do, but
/// the handshake signatures are still checked so the session keys are sound.
#[derive(Debug)]
struct AcceptAnyCert(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for AcceptAnyCert {
    fn verify_server_cert(
        &self,
        _end_entity: &rustls::pki_types::CertificateDer<'_>,
        _intermediates: &[rustls::pki_types::CertificateDer<'_>],
        _server_name: &rustls::pki_types::ServerName<'_>,
        _ocsp_response: &[u8],
        _now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// What went wrong on a connection, with the stage it went wrong in.
#[derive(Debug, thiserror::Error)]
pub enum SmtpError {
    #[error("{stage}: connection failed: {error}")]
    Io {
        stage: Command,
        error: std::io::Error,
    },
    #[error("{stage}: timed out after {after:?}")]
    Timeout { stage: Command, after: Duration },
    #[error("{stage}: protocol error: {error}")]
    Protocol { stage: Command, error: ReplyError },
    #[error("{stage}: connection closed by the server")]
    Closed { stage: Command },
    /// A negative reply to a connection-level command (greeting, EHLO, STARTTLS).
    #[error("{}: {reply}", reply.command)]
    Rejected { reply: Reply },
    #[error("STARTTLS: {0}")]
    Tls(String),
    /// The handshake failed because the certificate was refused by a policy that checks it.
    #[error("STARTTLS: {host}'s certificate was refused: {reason}")]
    Certificate {
        host: String,
        failure: CertFailure,
        reason: String,
    },
    #[error("the server does not offer STARTTLS and the TLS policy requires it")]
    TlsNotOffered,
}

impl SmtpError {
    pub fn stage(&self) -> Command {
        match self {
            SmtpError::Io { stage, .. }
            | SmtpError::Timeout { stage, .. }
            | SmtpError::Protocol { stage, .. }
            | SmtpError::Closed { stage } => *stage,
            SmtpError::Rejected { reply } => reply.command,
            SmtpError::Tls(_) | SmtpError::Certificate { .. } | SmtpError::TlsNotOffered => {
                Command::StartTls
            }
        }
    }
}

/// What the server offered in its EHLO reply.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Capabilities {
    pub esmtp: bool,
    pub pipelining: bool,
    pub starttls: bool,
    /// Maximum message size, when announced (0: announced without a limit).
    pub size: Option<u64>,
    pub eight_bit_mime: bool,
    pub smtputf8: bool,
    pub enhanced_status_codes: bool,
    pub chunking: bool,
    pub dsn: bool,
}

impl Capabilities {
    pub fn from_ehlo(reply: &Reply) -> Capabilities {
        let mut c = Capabilities {
            esmtp: true,
            ..Capabilities::default()
        };
        // The first line is the greeting name; keywords follow, one per line.
        for line in reply.lines().skip(1) {
            let mut words = line.split_ascii_whitespace();
            let Some(keyword) = words.next() else {
                continue;
            };
            match keyword.to_ascii_uppercase().as_str() {
                "PIPELINING" => c.pipelining = true,
                "STARTTLS" => c.starttls = true,
                "SIZE" => c.size = Some(words.next().and_then(|n| n.parse().ok()).unwrap_or(0)),
                "8BITMIME" => c.eight_bit_mime = true,
                "SMTPUTF8" => c.smtputf8 = true,
                "ENHANCEDSTATUSCODES" => c.enhanced_status_codes = true,
                "CHUNKING" => c.chunking = true,
                "DSN" => c.dsn = true,
                _ => {}
            }
        }
        c
    }
}

/// The byte stream a connection runs over: TCP, or anything else that reads and writes.
pub trait Transport: AsyncRead + AsyncWrite + Unpin + Send + 'static {}

impl<T: AsyncRead + AsyncWrite + Unpin + Send + 'static> Transport for T {}

/// Buffered both ways; the read buffer must be checked empty before STARTTLS.
type Io<S> = BufReader<BufWriter<Stream<S>>>;

fn buffered<S: Transport>(s: Stream<S>) -> Io<S> {
    BufReader::new(BufWriter::new(s))
}

enum Stream<S> {
    Plain(S),
    Tls(Box<TlsStream<S>>),
    /// Stands in for the TCP stream while it is moved into the TLS handshake.
    Detached,
}

fn detached() -> std::io::Error {
    std::io::Error::new(
        std::io::ErrorKind::NotConnected,
        "connection is being upgraded to TLS",
    )
}

impl<S: Transport> AsyncRead for Stream<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
            Stream::Detached => Poll::Ready(Err(detached())),
        }
    }
}

impl<S: Transport> AsyncWrite for Stream<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
            Stream::Detached => Poll::Ready(Err(detached())),
        }
    }
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
            Stream::Detached => Poll::Ready(Err(detached())),
        }
    }
    fn is_write_vectored(&self) -> bool {
        match self {
            Stream::Plain(s) => s.is_write_vectored(),
            Stream::Tls(s) => s.is_write_vectored(),
            Stream::Detached => false,
        }
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_flush(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
            Stream::Detached => Poll::Ready(Err(detached())),
        }
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
            Stream::Detached => Poll::Ready(Err(detached())),
        }
    }
}

/// Writes `slices` in order in as few vectored writes as the socket takes. A large message
/// goes past the write buffer straight to the socket with all its pieces (the DKIM-Signature
/// fields, the message behind them, the dots stuffed into it, its terminator) in the same
/// writes, rather than joined into a new buffer first or sent as packets of their own that the
/// receiver must wake up for.
async fn write_all_slices<W: AsyncWrite + Unpin>(
    io: &mut W,
    mut slices: &mut [std::io::IoSlice<'_>],
) -> std::io::Result<()> {
    // Leading empty slices dropped first: a write of empty slices only returns 0, which would
    // read as a closed socket. Later ones go with the bytes before them.
    std::io::IoSlice::advance_slices(&mut slices, 0);
    while !slices.is_empty() {
        let n = io.write_vectored(slices).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        std::io::IoSlice::advance_slices(&mut slices, n);
    }
    Ok(())
}

/// The length of the content made of `parts`.
fn content_len(parts: &[&[u8]]) -> usize {
    parts.iter().map(|p| p.len()).sum()
}

/// Whether the content made of `parts` (concatenated) ends with a line break.
fn ends_with_crlf(parts: &[&[u8]]) -> bool {
    let mut last = parts.iter().rev().flat_map(|p| p.iter().rev());
    last.next() == Some(&b'\n') && last.next() == Some(&b'\r')
}

/// The content made of `parts` (concatenated) as DATA sends it (RFC 5321 §4.5.2): a `.` put
/// before every line that starts with one, then the terminating `.` line (after a line break
/// of its own when the content does not end in one). The pieces borrow `parts`; only the
/// stuffed dots and the terminator are added.
fn dot_stuffed<'a>(parts: &[&'a [u8]]) -> Vec<std::io::IoSlice<'a>> {
    use std::io::IoSlice;
    let mut out = Vec::with_capacity(parts.len() + 1);
    let mut line_start = true;
    for &part in parts.iter().filter(|p| !p.is_empty()) {
        if line_start && part.first() == Some(&b'.') {
            out.push(IoSlice::new(b"."));
        }
        let mut start = 0;
        for pos in memchr::memmem::find_iter(part, b"\n.") {
            out.push(IoSlice::new(&part[start..=pos]));
            out.push(IoSlice::new(b"."));
            start = pos + 1;
        }
        out.push(IoSlice::new(&part[start..]));
        line_start = part.last() == Some(&b'\n');
    }
    out.push(IoSlice::new(if ends_with_crlf(parts) {
        b".\r\n"
    } else {
        b"\r\n.\r\n"
    }));
    out
}

/// The envelope of one transaction.
pub struct Envelope<'a> {
    pub sender: &'a str,
    pub recipients: &'a [&'a str],
    /// The message needs SMTPUTF8 (non-ASCII addresses).
    pub smtputf8: bool,
    /// The message has 8-bit content.
    pub eight_bit: bool,
    /// RFC 3461 parameters for the MAIL command (`RET=… ENVID=…`), and for each recipient's
    /// RCPT (`NOTIFY=… ORCPT=…`, position for position; missing or empty: none). Sent only to a
    /// server that offers DSN.
    pub dsn: Option<(&'a str, &'a [String])>,
    /// Send the content as one `BDAT … LAST` chunk (RFC 3030) when the server offers CHUNKING:
    /// no dot-stuffing on either side, and 8-bit content passes as it is.
    pub chunking: bool,
}

/// An open, greeted connection, over TCP unless made [`Connection::with_stream`].
pub struct Connection<S = TcpStream> {
    io: Io<S>,
    pub peer: SocketAddr,
    /// The MX host name this connection was made for.
    pub host: String,
    pub capabilities: Capabilities,
    pub tls: bool,
    /// The label of the TLS policy it was opened under ([`TlsPolicy::label`]).
    pub tls_policy: &'static str,
    /// Transactions attempted on this connection.
    pub transactions: u32,
    pub last_used: Instant,
    /// False once the server said 421, an I/O error happened, or the state is unknown.
    reusable: bool,
    /// A transaction was left half-way (MAIL accepted, not finished): RSET before the next.
    needs_rset: bool,
    line: Vec<u8>,
    timeouts: Timeouts,
}

impl Connection {
    /// Connects to `peer` (from `source` when given), then [`Connection::with_stream`].
    pub async fn open(
        peer: SocketAddr,
        source: Option<IpAddr>,
        host: &str,
        tls: impl Into<TlsPolicy>,
        settings: &ClientSettings,
    ) -> Result<Connection, SmtpError> {
        let t = settings.timeouts;
        let started = Instant::now();
        let tcp = tokio::time::timeout(t.connect, async {
            let socket = if peer.is_ipv4() {
                TcpSocket::new_v4()
            } else {
                TcpSocket::new_v6()
            }?;
            if let Some(ip) = source {
                socket.bind(SocketAddr::new(ip, 0))?;
            }
            socket.connect(peer).await
        })
        .await
        .map_err(|_| SmtpError::Timeout {
            stage: Command::Connect,
            after: t.connect,
        })?
        .map_err(|error| SmtpError::Io {
            stage: Command::Connect,
            error,
        })?;
        CONNECT_SECONDS.observe(started.elapsed().as_secs_f64());
        let _ = tcp.set_nodelay(true);
        Connection::with_stream(tcp, peer, host, tls, settings).await
    }
}

impl<S: Transport> Connection<S> {
    /// Reads the greeting on `stream`, says EHLO (HELO if refused) and applies the TLS policy.
    /// `peer` names the other end in logs; `host` is the MX name, for certificate checks.
    pub async fn with_stream(
        stream: S,
        peer: SocketAddr,
        host: &str,
        tls: impl Into<TlsPolicy>,
        settings: &ClientSettings,
    ) -> Result<Connection<S>, SmtpError> {
        let policy: TlsPolicy = tls.into();
        let tls = policy.mode;
        let t = settings.timeouts;
        let mut conn = Connection {
            io: buffered(Stream::Plain(stream)),
            peer,
            host: host.to_owned(),
            capabilities: Capabilities::default(),
            tls: false,
            tls_policy: policy.label,
            transactions: 0,
            last_used: Instant::now(),
            reusable: true,
            needs_rset: false,
            line: Vec::with_capacity(512),
            timeouts: t,
        };
        let greeting = conn.read_reply(Command::Connect, t.greeting).await?;
        if !greeting.is_positive() {
            return Err(SmtpError::Rejected { reply: greeting });
        }
        conn.hello(&settings.ehlo_name).await?;
        if tls == TlsMode::Disabled {
            return Ok(conn);
        }
        if !conn.capabilities.starttls {
            return if tls == TlsMode::Opportunistic {
                Ok(conn)
            } else {
                Err(SmtpError::TlsNotOffered)
            };
        }
        conn.write(b"STARTTLS\r\n", Command::StartTls).await?;
        conn.flush(Command::StartTls).await?;
        let reply = conn.read_reply(Command::StartTls, t.command).await?;
        if !reply.is_positive() {
            return if tls == TlsMode::Opportunistic {
                Ok(conn)
            } else {
                Err(SmtpError::Rejected { reply })
            };
        }
        if !conn.io.buffer().is_empty() {
            // Data after the 220 would be processed as if it came over TLS (CVE-2011-0411 class).
            return Err(SmtpError::Tls(
                "the server sent data before the TLS handshake".into(),
            ));
        }
        let Stream::Plain(plain) = std::mem::replace(&mut conn.io, buffered(Stream::Detached))
            .into_inner()
            .into_inner()
        else {
            return Err(SmtpError::Tls(
                "STARTTLS on a connection that already uses TLS".into(),
            ));
        };
        let connector = match (&policy.connector, tls) {
            (Some(c), _) => c,
            (None, TlsMode::Verify) => &settings.verifying,
            (None, _) => &settings.trusting,
        };
        let name = rustls::pki_types::ServerName::try_from(host.to_owned())
            .map_err(|e| SmtpError::Tls(format!("{host:?} is not a valid TLS server name: {e}")))?;
        let started = Instant::now();
        let stream = tokio::time::timeout(t.command, connector.connect(name, plain))
            .await
            .map_err(|_| SmtpError::Timeout {
                stage: Command::StartTls,
                after: t.command,
            })?
            .map_err(|e| {
                let refused = e
                    .get_ref()
                    .and_then(|inner| inner.downcast_ref::<rustls::Error>())
                    .and_then(CertFailure::of);
                match refused {
                    Some(failure) => SmtpError::Certificate {
                        host: host.to_owned(),
                        failure,
                        reason: e.to_string(),
                    },
                    None => SmtpError::Tls(e.to_string()),
                }
            })?;
        TLS_SECONDS.observe(started.elapsed().as_secs_f64());
        conn.io = buffered(Stream::Tls(Box::new(stream)));
        conn.tls = true;
        // RFC 3207 §4.2: forget everything learned before TLS and say EHLO again.
        conn.hello(&settings.ehlo_name).await?;
        Ok(conn)
    }

    async fn hello(&mut self, ehlo_name: &str) -> Result<(), SmtpError> {
        let t = self.timeouts.command;
        self.write_line(&format!("EHLO {ehlo_name}"), Command::Ehlo)
            .await?;
        let reply = self.read_reply(Command::Ehlo, t).await?;
        if reply.is_positive() {
            self.capabilities = Capabilities::from_ehlo(&reply);
            return Ok(());
        }
        if reply.code == 421 {
            return Err(SmtpError::Rejected { reply });
        }
        self.write_line(&format!("HELO {ehlo_name}"), Command::Helo)
            .await?;
        let reply = self.read_reply(Command::Helo, t).await?;
        if !reply.is_positive() {
            return Err(SmtpError::Rejected { reply });
        }
        self.capabilities = Capabilities::default();
        Ok(())
    }

    pub fn is_reusable(&self) -> bool {
        self.reusable
    }

    /// Sends one message to `env.recipients`. Returns one reply per recipient: the reply that
    /// decided its fate (MAIL's, its RCPT's, DATA's or the final dot's). An `Err` means the
    /// connection failed and nothing is known about the recipients not yet answered.
    pub async fn send(
        &mut self,
        env: &Envelope<'_>,
        message: &[u8],
    ) -> Result<Vec<Reply>, SmtpError> {
        self.send_parts(env, &[message]).await
    }

    /// [`Connection::send`] of the message made of `parts` one after the other (its
    /// DKIM-Signature fields, then the message they sign), which are written as they are
    /// rather than joined first.
    pub async fn send_parts(
        &mut self,
        env: &Envelope<'_>,
        parts: &[&[u8]],
    ) -> Result<Vec<Reply>, SmtpError> {
        self.transactions += 1;
        self.last_used = Instant::now();
        let result = self.transaction(env, parts).await;
        match &result {
            Err(_) => self.reusable = false,
            Ok(replies) => {
                if replies.iter().any(|r| r.code == 421) {
                    self.reusable = false;
                }
            }
        }
        result
    }

    async fn transaction(
        &mut self,
        env: &Envelope<'_>,
        parts: &[&[u8]],
    ) -> Result<Vec<Reply>, SmtpError> {
        let t = self.timeouts;
        if self.needs_rset {
            self.write_line("RSET", Command::Rset).await?;
            let r = self.read_reply(Command::Rset, t.command).await?;
            if !r.is_positive() {
                self.reusable = false;
                return Ok(vec![r; env.recipients.len()]);
            }
            self.needs_rset = false;
        }
        let mut mail = format!("MAIL FROM:<{}>", env.sender);
        if self.capabilities.size.is_some() {
            mail.push_str(&format!(" SIZE={}", content_len(parts)));
        }
        if env.eight_bit && self.capabilities.eight_bit_mime {
            mail.push_str(" BODY=8BITMIME");
        }
        if env.smtputf8 && self.capabilities.smtputf8 {
            mail.push_str(" SMTPUTF8");
        }
        let dsn = env.dsn.filter(|_| self.capabilities.dsn);
        if let Some((params, _)) = dsn
            && !params.is_empty()
        {
            mail.push(' ');
            mail.push_str(params);
        }
        let rcpt_line = |i: usize, rcpt: &str| match dsn.and_then(|(_, r)| r.get(i)) {
            Some(p) if !p.is_empty() => format!("RCPT TO:<{rcpt}> {p}"),
            _ => format!("RCPT TO:<{rcpt}>"),
        };
        let pipelined = self.capabilities.pipelining;
        let bdat = env.chunking && self.capabilities.chunking;
        self.write_line(&mail, Command::Mail).await?;
        let mail_reply = if pipelined {
            for (i, rcpt) in env.recipients.iter().enumerate() {
                self.write_line(&rcpt_line(i, rcpt), Command::Rcpt).await?;
            }
            // With BDAT the content waits for a recipient to be accepted (a pipelined chunk would
            // go out in full even when every RCPT is refused); DATA costs the same round trip.
            if !bdat {
                self.write_line("DATA", Command::Data).await?;
            }
            self.read_reply(Command::Mail, t.command).await?
        } else {
            self.read_reply(Command::Mail, t.command).await?
        };
        // A 421 at any step means the server is closing (RFC 5321 §3.8): nothing more will be
        // answered, and that reply is the outcome for every recipient, not the lost connection.
        let closing = |r: &Reply| (r.code == 421).then(|| vec![r.clone(); env.recipients.len()]);
        if let Some(all) = closing(&mail_reply) {
            return Ok(all);
        }
        let mut rcpt_replies = Vec::with_capacity(env.recipients.len());
        if pipelined {
            for _ in env.recipients {
                let r = self.read_reply(Command::Rcpt, t.command).await?;
                if let Some(all) = closing(&r) {
                    return Ok(all);
                }
                rcpt_replies.push(r);
            }
        } else if mail_reply.is_positive() {
            for (i, rcpt) in env.recipients.iter().enumerate() {
                self.write_line(&rcpt_line(i, rcpt), Command::Rcpt).await?;
                let r = self.read_reply(Command::Rcpt, t.command).await?;
                if let Some(all) = closing(&r) {
                    return Ok(all);
                }
                rcpt_replies.push(r);
            }
        }
        let any_rcpt = mail_reply.is_positive() && rcpt_replies.iter().any(Reply::is_positive);
        if bdat {
            if !mail_reply.is_positive() {
                self.needs_rset = mail_reply.code != 421;
                return Ok(vec![mail_reply; env.recipients.len()]);
            }
            if !any_rcpt {
                self.needs_rset = true;
                return Ok(rcpt_replies);
            }
            self.write_bdat(parts).await?;
            let r = self.read_reply(Command::Bdat, t.data_final).await?;
            // RFC 3030 §2: after a refused chunk the transaction is reset before the next.
            self.needs_rset = !r.is_positive() && r.code != 421;
            return Ok(Self::with_content_reply(rcpt_replies, &r));
        }
        let data_reply = if pipelined {
            Some(self.read_reply(Command::Data, t.data_init).await?)
        } else if any_rcpt {
            self.write_line("DATA", Command::Data).await?;
            Some(self.read_reply(Command::Data, t.data_init).await?)
        } else {
            None
        };
        if let Some(all) = data_reply.as_ref().and_then(closing) {
            return Ok(all);
        }
        if !mail_reply.is_positive() {
            if mail_reply.code != 421 {
                // MAIL failed; the pipelined RCPTs and DATA failed with it. Start clean.
                self.needs_rset = true;
            }
            return Ok(vec![mail_reply; env.recipients.len()]);
        }
        let data_reply = match data_reply {
            Some(r) if r.code == 354 => {
                if !any_rcpt {
                    // RFC 2920 §3.1: DATA was accepted with no valid recipient; end it empty.
                    self.write(b".\r\n", Command::Dot).await?;
                    self.flush(Command::Dot).await?;
                    let _ = self.read_reply(Command::Dot, t.data_final).await?;
                    return Ok(rcpt_replies);
                }
                self.write_data(parts).await?;
                self.read_reply(Command::Dot, t.data_final).await?
            }
            Some(r) => {
                self.needs_rset = r.code != 421;
                r
            }
            None => {
                self.needs_rset = true;
                return Ok(rcpt_replies);
            }
        };
        Ok(Self::with_content_reply(rcpt_replies, &data_reply))
    }

    /// Each accepted recipient's fate is the content's reply; a refused one keeps its refusal.
    fn with_content_reply(rcpt_replies: Vec<Reply>, content: &Reply) -> Vec<Reply> {
        rcpt_replies
            .into_iter()
            .map(|r| if r.is_positive() { content.clone() } else { r })
            .collect()
    }

    /// Writes the message made of `parts` as one `BDAT <size> LAST` chunk, exactly as it is
    /// (plus a final line break if it lacks one), then flushes.
    async fn write_bdat(&mut self, parts: &[&[u8]]) -> Result<(), SmtpError> {
        let tail: &[u8] = if ends_with_crlf(parts) { b"" } else { b"\r\n" };
        let len = content_len(parts);
        let io = &mut self.io;
        let block = async {
            let command = format!("BDAT {} LAST\r\n", len + tail.len());
            io.write_all(command.as_bytes()).await?;
            let mut slices: Vec<_> = parts
                .iter()
                .chain([&tail])
                .map(|p| std::io::IoSlice::new(p))
                .collect();
            write_all_slices(io, &mut slices).await?;
            io.flush().await
        };
        Self::timed_content(self.timeouts.data_block, len, Command::Bdat, block).await
    }

    /// Writes the message made of `parts` with dot-stuffing and the terminating `.`, then
    /// flushes.
    async fn write_data(&mut self, parts: &[&[u8]]) -> Result<(), SmtpError> {
        let len = content_len(parts);
        let io = &mut self.io;
        let block = async {
            write_all_slices(io, &mut dot_stuffed(parts)).await?;
            io.flush().await
        };
        Self::timed_content(self.timeouts.data_block, len, Command::Dot, block).await
    }

    /// Runs the writing of `len` bytes of content: one data-block timeout per 64 KiB, at least
    /// one.
    async fn timed_content(
        block_timeout: Duration,
        len: usize,
        stage: Command,
        block: impl std::future::Future<Output = std::io::Result<()>>,
    ) -> Result<(), SmtpError> {
        let budget = block_timeout * (1 + (len / 65_536) as u32);
        match tokio::time::timeout(budget, block).await {
            Err(_) => Err(SmtpError::Timeout {
                stage,
                after: budget,
            }),
            Ok(Err(error)) => Err(SmtpError::Io { stage, error }),
            Ok(Ok(())) => Ok(()),
        }
    }

    /// Says QUIT and waits (briefly) for the server to close, so that a connection counted as
    /// closed really is closed at the receiver.
    pub async fn quit(mut self) {
        let limit = Duration::from_secs(5);
        if self.write_line("QUIT", Command::Quit).await.is_ok()
            && self.read_reply(Command::Quit, limit).await.is_ok()
        {
            let _ = tokio::time::timeout(limit, async {
                let mut sink = [0u8; 256];
                while matches!(tokio::io::AsyncReadExt::read(&mut self.io, &mut sink).await, Ok(n) if n > 0) {}
            })
            .await;
        }
        let _ = self.io.shutdown().await;
    }

    async fn write(&mut self, bytes: &[u8], stage: Command) -> Result<(), SmtpError> {
        self.io
            .write_all(bytes)
            .await
            .map_err(|error| SmtpError::Io { stage, error })
    }

    async fn flush(&mut self, stage: Command) -> Result<(), SmtpError> {
        tokio::time::timeout(self.timeouts.command, self.io.flush())
            .await
            .map_err(|_| SmtpError::Timeout {
                stage,
                after: self.timeouts.command,
            })?
            .map_err(|error| SmtpError::Io { stage, error })
    }

    async fn write_line(&mut self, line: &str, stage: Command) -> Result<(), SmtpError> {
        self.write(line.as_bytes(), stage).await?;
        self.write(b"\r\n", stage).await
    }

    /// Flushes pending commands, then reads one complete reply.
    async fn read_reply(&mut self, command: Command, limit: Duration) -> Result<Reply, SmtpError> {
        if !self.io.get_ref().buffer().is_empty() {
            self.flush(command).await?;
        }
        let mut builder = ReplyBuilder::default();
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            self.line.clear();
            tokio::time::timeout_at(deadline, read_line(&mut self.io, &mut self.line))
                .await
                .map_err(|_| SmtpError::Timeout {
                    stage: command,
                    after: limit,
                })?
                .map_err(|e| match e {
                    LineError::Io(error) => SmtpError::Io {
                        stage: command,
                        error,
                    },
                    LineError::Eof => SmtpError::Closed { stage: command },
                    LineError::TooLong => SmtpError::Protocol {
                        stage: command,
                        error: ReplyError::LineTooLong,
                    },
                })?;
            let line = self.line.strip_suffix(b"\n").unwrap_or(&self.line);
            let line = line.strip_suffix(b"\r").unwrap_or(line);
            match builder.push(line, command) {
                Ok(Some(reply)) => {
                    if reply.code == 421 {
                        self.reusable = false;
                    }
                    return Ok(reply);
                }
                Ok(None) => {}
                Err(error) => {
                    return Err(SmtpError::Protocol {
                        stage: command,
                        error,
                    });
                }
            }
        }
    }
}

enum LineError {
    Io(std::io::Error),
    Eof,
    TooLong,
}

/// Reads up to and including `\n`, refusing lines longer than the reply limit.
async fn read_line<R: AsyncBufReadExt + Unpin>(
    r: &mut R,
    out: &mut Vec<u8>,
) -> Result<(), LineError> {
    loop {
        let buf = r.fill_buf().await.map_err(LineError::Io)?;
        if buf.is_empty() {
            return Err(LineError::Eof);
        }
        let (take, done) = match memchr::memchr(b'\n', buf) {
            Some(i) => (i + 1, true),
            None => (buf.len(), false),
        };
        if out.len() + take > super::reply::MAX_REPLY_LINE + 2 {
            return Err(LineError::TooLong);
        }
        out.extend_from_slice(&buf[..take]);
        r.consume(take);
        if done {
            return Ok(());
        }
    }
}

#[cfg(test)]
mod tests {
    //! The client against scripted servers on an in-memory pipe: what a server sends, in which
    //! pieces, and what it expects to read.

    use super::*;
    use crate::outbound::smtp::reply::EnhancedCode;
    use tokio::io::{AsyncReadExt, DuplexStream};

    /// Takes at most three bytes a call, vectored or not.
    struct Narrow(Vec<u8>);

    impl AsyncWrite for Narrow {
        fn poll_write(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<std::io::Result<usize>> {
            let n = buf.len().min(3);
            self.get_mut().0.extend_from_slice(&buf[..n]);
            Poll::Ready(Ok(n))
        }
        fn poll_write_vectored(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
            bufs: &[std::io::IoSlice<'_>],
        ) -> Poll<std::io::Result<usize>> {
            let this = self.get_mut();
            let mut n = 0;
            for b in bufs {
                let take = b.len().min(3 - n);
                this.0.extend_from_slice(&b[..take]);
                n += take;
            }
            Poll::Ready(Ok(n))
        }
        fn is_write_vectored(&self) -> bool {
            true
        }
        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
            Poll::Ready(Ok(()))
        }
        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    #[tokio::test]
    async fn slices_are_written_whole_through_short_vectored_writes() {
        for pieces in [
            &["", ".\r\n"][..],
            &["ab", ""],
            &["", "", ""],
            &["abcdefgh", "", "x", ".\r\n"],
            &["abc", "de", "f", "\r\n.\r\n"],
        ] {
            let mut w = Narrow(Vec::new());
            let mut slices: Vec<_> = pieces
                .iter()
                .map(|p| std::io::IoSlice::new(p.as_bytes()))
                .collect();
            write_all_slices(&mut w, &mut slices).await.unwrap();
            assert_eq!(w.0, pieces.concat().into_bytes());
        }
    }

    /// Dot-stuffing of the message in one piece, as DATA sends it.
    fn stuffed_whole(message: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        for line in message.split_inclusive(|&b| b == b'\n') {
            if line.first() == Some(&b'.') {
                out.push(b'.');
            }
            out.extend_from_slice(line);
        }
        if !message.ends_with(b"\r\n") {
            out.extend_from_slice(b"\r\n");
        }
        out.extend_from_slice(b".\r\n");
        out
    }

    #[test]
    fn a_message_in_pieces_is_stuffed_as_it_would_be_whole() {
        let message = b".a\r\n.\r\nb\r\n..c\r\nd.\r\n.";
        // Every way of cutting the message in three, the cuts at line starts, inside CRLF and
        // inside runs of dots included.
        for i in 0..=message.len() {
            for j in i..=message.len() {
                let parts = [&message[..i], &message[i..j], &message[j..]];
                let sent: Vec<u8> = dot_stuffed(&parts)
                    .iter()
                    .flat_map(|s| s.to_vec())
                    .collect();
                assert_eq!(sent, stuffed_whole(message), "cut at {i} and {j}");
            }
        }
        for whole in [&b""[..], b"\r\n", b"x\r", b"x\r\n"] {
            let sent: Vec<u8> = dot_stuffed(&[whole])
                .iter()
                .flat_map(|s| s.to_vec())
                .collect();
            assert_eq!(sent, stuffed_whole(whole));
        }
    }

    /// One step of a scripted server.
    enum Step {
        /// Read one command line and check it starts with this.
        Expect(&'static str),
        /// Write these bytes at once.
        Say(&'static str),
        /// Write these bytes a few at a time, with a pause between pieces.
        Trickle(&'static str),
        /// Read the message up to the final dot.
        Data,
        /// Read exactly these bytes.
        Bytes(&'static str),
        /// Close the connection.
        Close,
        /// Stop answering (keep the connection open).
        Hang,
    }
    use Step::*;

    fn settings(command: Duration) -> ClientSettings {
        ClientSettings::new(
            "client.example".into(),
            Timeouts {
                connect: command,
                greeting: command,
                command,
                data_init: command,
                data_block: command,
                data_final: command,
            },
            &[],
        )
    }

    fn peer() -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], 25))
    }

    async fn read_line(io: &mut BufReader<DuplexStream>) -> String {
        let mut line = String::new();
        io.read_line(&mut line).await.expect("server read");
        line
    }

    /// Runs `script` as the server side of a pipe; returns the client's end and the server task,
    /// which fails the test if the client did not send what the script expects.
    fn server(script: Vec<Step>) -> (DuplexStream, tokio::task::JoinHandle<()>) {
        let (client, server) = tokio::io::duplex(64 * 1024);
        let task = tokio::spawn(async move {
            let mut io = BufReader::new(server);
            for step in script {
                match step {
                    Expect(prefix) => {
                        let line = read_line(&mut io).await;
                        assert!(
                            line.starts_with(prefix),
                            "expected {prefix:?}, got {line:?}"
                        );
                        assert!(line.ends_with("\r\n"), "{line:?} does not end in CRLF");
                    }
                    Say(bytes) => io.get_mut().write_all(bytes.as_bytes()).await.unwrap(),
                    Trickle(bytes) => {
                        for piece in bytes.as_bytes().chunks(3) {
                            io.get_mut().write_all(piece).await.unwrap();
                            tokio::time::sleep(Duration::from_millis(2)).await;
                        }
                    }
                    Data => loop {
                        if read_line(&mut io).await == ".\r\n" {
                            break;
                        }
                    },
                    Bytes(expected) => {
                        let mut got = vec![0; expected.len()];
                        io.read_exact(&mut got).await.expect("server read");
                        assert_eq!(String::from_utf8_lossy(&got), expected);
                    }
                    Close => return,
                    Hang => {
                        let mut rest = Vec::new();
                        let _ = io.read_to_end(&mut rest).await;
                        return;
                    }
                }
            }
        });
        (client, task)
    }

    async fn connect(
        script: Vec<Step>,
    ) -> (
        Result<Connection<DuplexStream>, SmtpError>,
        tokio::task::JoinHandle<()>,
    ) {
        let (stream, task) = server(script);
        let settings = settings(Duration::from_secs(5));
        let conn =
            Connection::with_stream(stream, peer(), "mx.example", TlsMode::Disabled, &settings)
                .await;
        (conn, task)
    }

    fn envelope<'a>(recipients: &'a [&'a str]) -> Envelope<'a> {
        Envelope {
            sender: "bounces@example.com",
            recipients,
            smtputf8: false,
            eight_bit: false,
            dsn: None,
            chunking: false,
        }
    }

    #[tokio::test]
    async fn multi_line_ehlo_gives_the_capabilities() {
        let (conn, task) = connect(vec![
            Say("220 mx.example ESMTP\r\n"),
            Expect("EHLO client.example"),
            Say("250-mx.example hello\r\n250-PIPELINING\r\n250-SIZE 1000000\r\n250-8BITMIME\r\n250-SMTPUTF8\r\n250 ENHANCEDSTATUSCODES\r\n"),
        ])
        .await;
        let conn = conn.expect("connected");
        task.await.unwrap();
        let c = &conn.capabilities;
        assert!(c.esmtp && c.pipelining && c.eight_bit_mime && c.smtputf8);
        assert!(c.enhanced_status_codes && !c.starttls && !c.chunking);
        assert_eq!(c.size, Some(1_000_000));
    }

    #[tokio::test]
    async fn a_bare_last_ehlo_line_ends_the_reply() {
        let (conn, task) = connect(vec![
            Say("220 mx.example\r\n"),
            Expect("EHLO"),
            Say("250-mx.example\r\n250-PIPELINING\r\n250\r\n"),
            Expect("QUIT"),
            Say("221 bye\r\n"),
            Close,
        ])
        .await;
        let conn = conn.expect("connected");
        assert!(conn.capabilities.pipelining);
        conn.quit().await;
        task.await.unwrap();
    }

    #[tokio::test]
    async fn ehlo_refused_falls_back_to_helo() {
        let (conn, task) = connect(vec![
            Say("220 old.example\r\n"),
            Expect("EHLO"),
            Say("502 5.5.1 command not recognised\r\n"),
            Expect("HELO client.example"),
            Say("250 old.example\r\n"),
        ])
        .await;
        let conn = conn.expect("connected");
        task.await.unwrap();
        assert_eq!(conn.capabilities, Capabilities::default());
    }

    #[tokio::test]
    async fn replies_split_across_reads_and_pipelined_replies_together() {
        let (conn, task) = connect(vec![
            Trickle("220 mx.example\r\n"),
            Expect("EHLO"),
            Trickle("250-mx.example\r\n250 PIPELINING\r\n"),
            Expect("MAIL FROM:<bounces@example.com>"),
            Expect("RCPT TO:<a@example.org>"),
            Expect("RCPT TO:<b@example.org>"),
            Expect("DATA"),
            // Every reply of the flight in one write.
            Say("250 2.1.0 ok\r\n250 2.1.5 ok\r\n550 5.1.1 no such user\r\n354 go ahead\r\n"),
            Data,
            Trickle("250 2.0.0 queued as X1\r\n"),
        ])
        .await;
        let mut conn = conn.expect("connected");
        let replies = conn
            .send(
                &envelope(&["a@example.org", "b@example.org"]),
                b"Subject: x\r\n\r\n.hi\r\n",
            )
            .await
            .expect("sent");
        task.await.unwrap();
        assert_eq!(replies.len(), 2);
        assert_eq!((replies[0].code, replies[0].command), (250, Command::Dot));
        assert_eq!(replies[0].text, "queued as X1");
        assert_eq!((replies[1].code, replies[1].command), (550, Command::Rcpt));
        assert_eq!(replies[1].enhanced, Some(EnhancedCode(5, 1, 1)));
        assert!(conn.is_reusable());
    }

    #[tokio::test]
    async fn bdat_sends_the_content_unstuffed_only_after_a_recipient_is_accepted() {
        let (conn, task) = connect(vec![
            Say("220 mx.example\r\n"),
            Expect("EHLO"),
            Say("250-mx.example\r\n250-PIPELINING\r\n250 CHUNKING\r\n"),
            // One recipient refused: the chunk goes out once the replies are in.
            Expect("MAIL FROM:<bounces@example.com>\r\n"),
            Expect("RCPT TO:<a@example.org>"),
            Expect("RCPT TO:<b@example.org>"),
            Say("250 ok\r\n250 ok\r\n550 5.1.1 no such user\r\n"),
            Bytes("BDAT 19 LAST\r\nSubject: x\r\n\r\n.hi\r\n"),
            Say("250 2.0.0 queued\r\n"),
            // Every recipient refused: no chunk at all, and RSET before the next transaction.
            Expect("MAIL FROM:"),
            Expect("RCPT TO:<a@example.org>"),
            Say("250 ok\r\n550 no\r\n"),
            Expect("RSET"),
            Say("250 ok\r\n"),
            // A refused chunk resets the transaction too.
            Expect("MAIL FROM:"),
            Expect("RCPT TO:<a@example.org>"),
            Say("250 ok\r\n250 ok\r\n"),
            Bytes("BDAT 8 LAST\r\nbig\r\n.\r\n"),
            Say("552 5.3.4 too big\r\n"),
            Expect("RSET"),
            Say("250 ok\r\n"),
            Expect("MAIL FROM:"),
            Expect("RCPT TO:<a@example.org>"),
            Say("250 ok\r\n550 no\r\n"),
            Expect("QUIT"),
            Say("221 bye\r\n"),
            Close,
        ])
        .await;
        let mut conn = conn.expect("connected");
        assert!(conn.capabilities.chunking);
        let both = ["a@example.org", "b@example.org"];
        let one = ["a@example.org"];
        let bdat = |recipients| Envelope {
            chunking: true,
            ..envelope(recipients)
        };
        // In pieces, as a signed message is: the size is theirs together, the tail added once.
        let replies = conn
            .send_parts(&bdat(&both), &[b"Subject: x\r\n", b"", b"\r\n.hi"])
            .await
            .expect("sent");
        assert_eq!((replies[0].code, replies[0].command), (250, Command::Bdat));
        assert_eq!((replies[1].code, replies[1].command), (550, Command::Rcpt));
        let replies = conn.send(&bdat(&one), b"unsent\r\n").await.expect("sent");
        assert_eq!((replies[0].code, replies[0].command), (550, Command::Rcpt));
        let replies = conn.send(&bdat(&one), b"big\r\n.\r\n").await.expect("sent");
        assert_eq!((replies[0].code, replies[0].command), (552, Command::Bdat));
        let replies = conn.send(&bdat(&one), b"unsent\r\n").await.expect("sent");
        assert_eq!(replies[0].code, 550);
        assert!(conn.is_reusable());
        conn.quit().await;
        task.await.unwrap();
    }

    #[tokio::test]
    async fn dsn_parameters_go_only_to_a_server_that_offers_dsn() {
        let rcpt_params = ["NOTIFY=NEVER".to_owned(), String::new()];
        let send = |offer: &'static str, mail: &'static str, rcpt: &'static str| {
            let params = rcpt_params.clone();
            async move {
                let (conn, task) = connect(vec![
                    Say("220 mx.example\r\n"),
                    Expect("EHLO"),
                    Say(offer),
                    Expect(mail),
                    Expect(rcpt),
                    Expect("RCPT TO:<b@example.org>\r\n"),
                    Expect("DATA"),
                    Say("250 ok\r\n250 ok\r\n250 ok\r\n354 go\r\n"),
                    Data,
                    Say("250 queued\r\n"),
                ])
                .await;
                let mut conn = conn.expect("connected");
                let recipients = ["a@example.org", "b@example.org"];
                let env = Envelope {
                    dsn: Some(("RET=HDRS ENVID=x", &params)),
                    ..envelope(&recipients)
                };
                let replies = conn.send(&env, b"Subject: x\r\n\r\nhi\r\n").await;
                task.await.unwrap();
                assert!(replies.expect("sent").iter().all(|r| r.code == 250));
            }
        };
        send(
            "250-mx.example\r\n250-DSN\r\n250 PIPELINING\r\n",
            "MAIL FROM:<bounces@example.com> RET=HDRS ENVID=x\r\n",
            "RCPT TO:<a@example.org> NOTIFY=NEVER\r\n",
        )
        .await;
        send(
            "250-mx.example\r\n250 PIPELINING\r\n",
            "MAIL FROM:<bounces@example.com>\r\n",
            "RCPT TO:<a@example.org>\r\n",
        )
        .await;
    }

    #[tokio::test]
    async fn without_pipelining_each_command_waits_for_its_reply() {
        let (conn, task) = connect(vec![
            Say("220 mx.example\r\n"),
            Expect("EHLO"),
            Say("250 mx.example\r\n"),
            Expect("MAIL FROM:"),
            Say("250 ok\r\n"),
            Expect("RCPT TO:<a@example.org>"),
            Say("250 ok\r\n"),
            Expect("DATA"),
            Say("354 go\r\n"),
            Data,
            Say("250 queued\r\n"),
        ])
        .await;
        let mut conn = conn.expect("connected");
        let replies = conn
            .send(&envelope(&["a@example.org"]), b"x\r\n")
            .await
            .expect("sent");
        task.await.unwrap();
        assert_eq!(replies[0].code, 250);
    }

    #[tokio::test]
    async fn a_server_that_closes_mid_reply_is_a_closed_connection() {
        let (conn, task) = connect(vec![
            Say("220 mx.example\r\n"),
            Expect("EHLO"),
            Say("250-mx.example\r\n250-PIPE"),
            Close,
        ])
        .await;
        task.await.unwrap();
        match conn {
            Err(SmtpError::Closed { stage }) => assert_eq!(stage, Command::Ehlo),
            Err(e) => panic!("unexpected error {e}"),
            Ok(_) => panic!("connected to a server that closed"),
        }
    }

    #[tokio::test]
    async fn a_421_mid_transaction_answers_every_recipient_and_ends_reuse() {
        let (conn, task) = connect(vec![
            Say("220 mx.example\r\n"),
            Expect("EHLO"),
            Say("250-mx.example\r\n250 PIPELINING\r\n"),
            Expect("MAIL"),
            Expect("RCPT"),
            Expect("RCPT"),
            Expect("DATA"),
            Say("250 ok\r\n421 4.7.0 too many messages, closing\r\n"),
            Close,
        ])
        .await;
        let mut conn = conn.expect("connected");
        let replies = conn
            .send(&envelope(&["a@example.org", "b@example.org"]), b"x\r\n")
            .await
            .expect("a 421 is an answer, not a failure");
        task.await.unwrap();
        assert!(replies.iter().all(|r| r.code == 421), "{replies:?}");
        assert!(!conn.is_reusable());
    }

    #[tokio::test]
    async fn malformed_and_oversized_replies_are_protocol_errors() {
        let (conn, task) = connect(vec![Say("hello there\r\n"), Hang]).await;
        assert!(matches!(
            conn,
            Err(SmtpError::Protocol {
                stage: Command::Connect,
                ..
            })
        ));
        task.abort();
        let long: &'static str =
            Box::leak(format!("220 {}\r\n", "x".repeat(5000)).into_boxed_str());
        let (conn, task) = connect(vec![Say(long), Hang]).await;
        assert!(matches!(
            conn,
            Err(SmtpError::Protocol {
                error: ReplyError::LineTooLong,
                ..
            })
        ));
        task.abort();
    }

    #[tokio::test]
    async fn a_silent_server_times_out_at_the_stage_it_went_silent() {
        let (stream, task) = server(vec![Hang]);
        let s = settings(Duration::from_millis(200));
        let conn =
            Connection::with_stream(stream, peer(), "mx.example", TlsMode::Disabled, &s).await;
        match conn {
            Err(SmtpError::Timeout { stage, after }) => {
                assert_eq!(
                    (stage, after),
                    (Command::Connect, Duration::from_millis(200))
                )
            }
            Err(e) => panic!("unexpected error {e}"),
            Ok(_) => panic!("connected to a silent server"),
        }
        task.abort();

        let (conn, task) = {
            let (stream, task) = server(vec![
                Say("220 mx.example\r\n"),
                Expect("EHLO"),
                Say("250 mx.example\r\n"),
                Expect("MAIL"),
                Hang,
            ]);
            (
                Connection::with_stream(stream, peer(), "mx.example", TlsMode::Disabled, &s).await,
                task,
            )
        };
        let mut conn = conn.expect("connected");
        let e = conn
            .send(&envelope(&["a@example.org"]), b"x\r\n")
            .await
            .unwrap_err();
        assert!(
            matches!(
                e,
                SmtpError::Timeout {
                    stage: Command::Mail,
                    ..
                }
            ),
            "{e}"
        );
        assert!(!conn.is_reusable());
        task.abort();
    }

    #[tokio::test]
    async fn starttls_required_but_not_offered_is_refused() {
        let (stream, task) = server(vec![
            Say("220 mx.example\r\n"),
            Expect("EHLO"),
            Say("250 mx.example\r\n"),
        ]);
        let s = settings(Duration::from_secs(5));
        let conn =
            Connection::with_stream(stream, peer(), "mx.example", TlsMode::Required, &s).await;
        task.await.unwrap();
        assert!(matches!(conn, Err(SmtpError::TlsNotOffered)));
    }

    #[tokio::test]
    async fn data_after_the_starttls_reply_is_refused() {
        let (stream, task) = server(vec![
            Say("220 mx.example\r\n"),
            Expect("EHLO"),
            Say("250-mx.example\r\n250 STARTTLS\r\n"),
            Expect("STARTTLS"),
            // A reply and, in the same packet, bytes that would be read as if sent under TLS.
            Say("220 go ahead\r\n250 injected\r\n"),
            Hang,
        ]);
        let s = settings(Duration::from_secs(5));
        let conn =
            Connection::with_stream(stream, peer(), "mx.example", TlsMode::Required, &s).await;
        match conn {
            Err(SmtpError::Tls(m)) => assert!(m.contains("before the TLS handshake"), "{m}"),
            Err(e) => panic!("unexpected error {e}"),
            Ok(_) => panic!("accepted injected data"),
        }
        task.abort();
    }

    #[tokio::test]
    async fn dot_stuffing_and_the_final_line_break() {
        let (client, server_end) = tokio::io::duplex(64 * 1024);
        let server = tokio::spawn(async move {
            let mut io = BufReader::new(server_end);
            io.get_mut().write_all(b"220 mx\r\n").await.unwrap();
            read_line(&mut io).await;
            io.get_mut()
                .write_all(b"250-mx\r\n250 PIPELINING\r\n")
                .await
                .unwrap();
            for _ in 0..3 {
                read_line(&mut io).await;
            }
            io.get_mut()
                .write_all(b"250 ok\r\n250 ok\r\n354 go\r\n")
                .await
                .unwrap();
            let mut data = String::new();
            loop {
                let line = read_line(&mut io).await;
                if line == ".\r\n" {
                    break;
                }
                data.push_str(&line);
            }
            io.get_mut().write_all(b"250 ok\r\n").await.unwrap();
            data
        });
        let s = settings(Duration::from_secs(5));
        let mut conn = Connection::with_stream(client, peer(), "mx", TlsMode::Disabled, &s)
            .await
            .expect("connected");
        // In two pieces, the second starting a line with a dot, as a message does behind its
        // DKIM-Signature fields.
        conn.send_parts(
            &envelope(&["a@example.org"]),
            &[b".first\r\nmid\r\n", b".\r\n..two\r\nlast"],
        )
        .await
        .expect("sent");
        let data = server.await.unwrap();
        assert_eq!(data, "..first\r\nmid\r\n..\r\n...two\r\nlast\r\n");
    }
}
