//! Raw messages in: `POST /v1/messages/raw` and the SMTP submission listener (STARTTLS, AUTH
//! with an API key, trusted networks, BDAT, DSN parameters), delivered to an in-process sink.
//! Each bad input is refused with its code and leaves the spool as it was. Submissions by real
//! clients (swaks, Postfix's smtp-source) and dkimpy's verdict on what they become are in
//! `scripts/acceptance/submission.sh`.

use crate::common;

use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use common::sink::{Sink, SinkOptions};
use common::*;
use rustls::pki_types::pem::PemObject;
use sluice::config::{DkimAlgorithm, DkimEntry};
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncWrite, AsyncWriteExt, BufReader};

fn dkim() -> DkimEntry {
    DkimEntry {
        domain: "example.com".into(),
        selector: "s2".into(),
        algorithm: DkimAlgorithm::Ed25519Sha256,
        key_file: std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/data/dkim/ed25519.pem"),
    }
}

/// A self-signed certificate for `localhost`, written as PEM files into `dir`.
fn certificate(dir: &std::path::Path) -> (std::path::PathBuf, std::path::PathBuf, String) {
    let cert = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
    let (c, k) = (dir.join("cert.pem"), dir.join("key.pem"));
    std::fs::write(&c, cert.cert.pem()).unwrap();
    std::fs::write(&k, cert.signing_key.serialize_pem()).unwrap();
    (c, k, cert.cert.pem())
}

/// One SMTP reply (all its lines).
async fn reply<R: AsyncBufReadExt + Unpin>(r: &mut R) -> String {
    let mut out = String::new();
    loop {
        let mut l = String::new();
        if r.read_line(&mut l).await.unwrap() == 0 {
            return out;
        }
        out.push_str(&l);
        if l.len() < 4 || l.as_bytes()[3] != b'-' {
            return out;
        }
    }
}

/// Sends `text` and returns the reply.
async fn cmd<S: AsyncRead + AsyncWrite + Unpin>(io: &mut BufReader<S>, text: &str) -> String {
    io.get_mut().write_all(text.as_bytes()).await.unwrap();
    io.get_mut().write_all(b"\r\n").await.unwrap();
    reply(io).await
}

/// `MAIL FROM:<from>…` and `RCPT TO:<to>…` (both must get 250), then DATA (354) when `data`.
async fn begin<S: AsyncRead + AsyncWrite + Unpin>(
    io: &mut BufReader<S>,
    mail: &str,
    rcpt: &str,
    data: bool,
) {
    let r = cmd(io, &format!("MAIL FROM:{mail}")).await;
    assert!(r.starts_with("250"), "MAIL FROM:{mail}: {r}");
    let r = cmd(io, &format!("RCPT TO:{rcpt}")).await;
    assert!(r.starts_with("250"), "RCPT TO:{rcpt}: {r}");
    if data {
        let r = cmd(io, "DATA").await;
        assert!(r.starts_with("354"), "DATA: {r}");
    }
}

async fn connect(addr: std::net::SocketAddr) -> BufReader<tokio::net::TcpStream> {
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut io = BufReader::new(tcp);
    assert!(reply(&mut io).await.starts_with("220 "));
    io
}

fn plain(user: &str, key: &str) -> String {
    base64::engine::general_purpose::STANDARD.encode(format!("\0{user}\0{key}"))
}

const MESSAGE: &str = "From: Shop <shop@example.com>\r\nTo: buyer@sink.test\r\nSubject: Your receipt\r\nX-Sluice-Tags: receipt, eu\r\nX-Sluice-Campaign: receipts\r\n\r\nThank you.\r\n.leading dot\r\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_raw_message_over_http_is_stored_once_and_sent_signed_to_each_recipient() {
    let sink = Sink::start(SinkOptions::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = delivery_config(dir.path(), &sink);
    cfg.dkim.push(dkim());
    let node = start(cfg).await;
    let addr = node.http_addr;
    // A Unix file: LF line endings.
    let body = MESSAGE.replace("\r\n", "\n");
    let (status, _, b) = post_body(
        addr,
        "/v1/messages/raw?to=a@sink.test&to=b@sink.test,c@sink.test&mail_from=app@example.com",
        "message/rfc822",
        body.into_bytes(),
    )
    .await;
    assert_eq!(status, 202, "{b}");
    assert_eq!(b["accepted"], 3, "{b}");
    assert_eq!(b["stream"], "receipts", "{b}");
    let id = b["id"].as_str().unwrap().to_owned();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while sink.messages().iter().map(|m| m.rcpts.len()).sum::<usize>() < 3 {
        assert!(std::time::Instant::now() < deadline, "not delivered");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let got = sink.messages();
    // The three recipients share one transaction: one message, stored once.
    assert_eq!(got.len(), 1, "{got:?}");
    let m = &got[0];
    let mut rcpts = m.rcpts.clone();
    rcpts.sort();
    assert_eq!(rcpts, ["a@sink.test", "b@sink.test", "c@sink.test"]);
    assert!(m.mail_from.starts_with("bounce+"), "VERP: {}", m.mail_from);
    let data = &m.data;
    assert!(data.starts_with("DKIM-Signature: "), "{data}");
    assert!(data.contains("\r\nX-Sluice-Ref: "), "trace field: {data}");
    assert!(data.contains("\r\nReceived: by "), "{data}");
    assert!(
        data.contains("\r\nMessage-ID: <"),
        "a Message-ID was added: {data}"
    );
    assert!(data.contains("\r\nDate: "), "a Date was added: {data}");
    assert!(
        !data.contains("X-Sluice-Tags") && !data.contains("X-Sluice-Campaign"),
        "our fields never leave: {data}"
    );
    // The client's bytes follow ours unchanged (the dot of the last line was stuffed on the wire
    // and taken off by the sink).
    assert!(
        data.ends_with("From: Shop <shop@example.com>\r\nTo: buyer@sink.test\r\nSubject: Your receipt\r\n\r\nThank you.\r\n.leading dot\r\n"),
        "{data}"
    );
    // A DSN about the second recipient reaches that recipient's job, though the VERP address
    // and the trace field name the first one's (the message was shared).
    let second = &m.rcpts[1];
    let p = {
        let (status, _, p) = post_body(
            addr,
            "/v1/feedback",
            "message/rfc822",
            report_eml("postfix", &m.mail_from, second, &trace_token(data)),
        )
        .await;
        assert_eq!(status, 200, "{p}");
        p
    };
    assert_eq!(
        (p["result"].as_str(), p["recipient"].as_str()),
        (Some("applied"), Some(second.as_str())),
        "{p}"
    );
    assert_ne!(p["job"], id.as_str(), "{p}");
    // The lookup shows it with its tags.
    let (status, shown) = get_json(addr, &format!("/v1/messages/{id}")).await;
    assert_eq!(status, 200, "{shown}");
    assert_eq!(shown["from"], "shop@example.com");
    assert_eq!(shown["subject"], "Your receipt");
    assert_eq!(shown["tags"], serde_json::json!(["receipt", "eu"]));
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_raw_messages_over_http_name_their_fault_and_change_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let node = start(config(dir.path())).await;
    let addr = node.http_addr;
    let before = spool_counts(&node).await;
    let long = format!("From: a@example.com\r\n\r\n{}\r\n", "x".repeat(1000));
    let cases: Vec<(&str, &str, String, u16, &str)> = vec![
        (
            "?to=a@sink.test",
            "message/rfc822",
            "From: a@example.com\r\nFrom: b@example.com\r\n\r\nx\r\n".into(),
            422,
            "from",
        ),
        ("?to=a@sink.test", "message/rfc822", long, 422, "line"),
        (
            "?to=a@sink.test",
            "message/rfc822",
            "From: a@example.com\r\n\r\nbare\nLF\r\n".into(),
            422,
            "line",
        ),
        (
            "?to=a@sink.test",
            "message/rfc822",
            "Subject: none\r\n\r\nx\r\n".into(),
            422,
            "from",
        ),
        ("", "message/rfc822", MESSAGE.into(), 422, "to"),
        (
            "?to=not-an-address",
            "message/rfc822",
            MESSAGE.into(),
            422,
            "to",
        ),
        (
            "?to=a@sink.test&bcc=x@y.test",
            "message/rfc822",
            MESSAGE.into(),
            422,
            "bcc",
        ),
        (
            "?to=a@sink.test",
            "message/rfc822",
            MESSAGE.replace("X-Sluice-Tags: receipt, eu", "X-Sluice-Pool: nowhere"),
            422,
            "X-Sluice-Pool",
        ),
        (
            "?to=a@sink.test",
            "message/rfc822",
            MESSAGE.replace("X-Sluice-Tags: receipt, eu", "X-Sluice-Priority: urgent"),
            422,
            "X-Sluice-Priority",
        ),
        ("?to=a@sink.test", "text/plain", MESSAGE.into(), 415, ""),
    ];
    for (query, ctype, body, status, field) in cases {
        let (s, _, b) = post_body(
            addr,
            &format!("/v1/messages/raw{query}"),
            ctype,
            body.into_bytes(),
        )
        .await;
        assert_eq!(s, status, "{query} {b}");
        if !field.is_empty() {
            assert_eq!(b["error"]["field"], field, "{query}: {b}");
        }
    }
    assert_eq!(spool_counts(&node).await, before, "nothing was written");
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn smtp_submission_needs_tls_before_auth_and_auth_before_mail() {
    let sink = Sink::start(SinkOptions::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let (cert, key, pem) = certificate(dir.path());
    let mut cfg = delivery_config(dir.path(), &sink);
    cfg.dkim.push(dkim());
    cfg.submission.listen = Some("127.0.0.1:0".parse().unwrap());
    cfg.submission.tls_cert = Some(cert);
    cfg.submission.tls_key = Some(key);
    cfg.submission.max_auth_failures = 2;
    let node = start(cfg).await;
    let listener = node.submission.starttls.unwrap();
    let before = spool_counts(&node).await;

    let mut io = connect(listener).await;
    let ehlo = cmd(&mut io, "EHLO app.test").await;
    for ext in [
        "PIPELINING",
        "SIZE ",
        "8BITMIME",
        "SMTPUTF8",
        "ENHANCEDSTATUSCODES",
        "CHUNKING",
        "DSN",
        "STARTTLS",
    ] {
        assert!(ehlo.contains(ext), "{ext}: {ehlo}");
    }
    assert!(!ehlo.contains("AUTH"), "no AUTH in the clear: {ehlo}");
    let r = cmd(&mut io, &format!("AUTH PLAIN {}", plain("app", KEY))).await;
    assert!(r.starts_with("538 5.7.11"), "{r}");
    let r = cmd(&mut io, "MAIL FROM:<app@example.com>").await;
    assert!(r.starts_with("530 5.7.0"), "unauthenticated relay: {r}");
    // Commands pipelined behind STARTTLS are refused by closing.
    io.get_mut()
        .write_all(b"STARTTLS\r\nMAIL FROM:<app@example.com>\r\n")
        .await
        .unwrap();
    let r = reply(&mut io).await;
    assert!(r.starts_with("220 2.0.0") || r.is_empty(), "{r}");
    let mut rest = Vec::new();
    let _ = tokio::time::timeout(
        Duration::from_secs(5),
        tokio::io::AsyncReadExt::read_to_end(&mut io, &mut rest),
    )
    .await
    .expect("closed");

    // STARTTLS, then AUTH with a wrong key (twice: the limit), then the right one is refused too.
    let mut io = connect(listener).await;
    cmd(&mut io, "EHLO app.test").await;
    assert!(cmd(&mut io, "STARTTLS").await.starts_with("220 2.0.0"));
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls::pki_types::CertificateDer::pem_slice_iter(pem.as_bytes()) {
        roots.add(c.unwrap()).unwrap();
    }
    let client = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(client));
    let tls = connector
        .connect(
            rustls::pki_types::ServerName::try_from("localhost").unwrap(),
            io.into_inner(),
        )
        .await
        .expect("TLS handshake");
    let mut io = BufReader::new(tls);
    let ehlo = cmd(&mut io, "EHLO app.test").await;
    assert!(
        ehlo.contains("AUTH PLAIN LOGIN") && !ehlo.contains("STARTTLS"),
        "{ehlo}"
    );
    for _ in 0..2 {
        let r = cmd(
            &mut io,
            &format!("AUTH PLAIN {}", plain("app", "wrong-key")),
        )
        .await;
        assert!(r.starts_with("535 5.7.8"), "{r}");
    }
    let r = cmd(&mut io, &format!("AUTH PLAIN {}", plain("app", KEY))).await;
    assert!(r.starts_with("454 4.7.0"), "over the failure limit: {r}");
    drop(io);
    assert_eq!(spool_counts(&node).await, before, "nothing was queued");
    assert!(sink.messages().is_empty());
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn smtp_submissions_are_queued_synced_and_delivered_and_bad_ones_are_refused() {
    let sink = Sink::start(SinkOptions::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = delivery_config(dir.path(), &sink);
    cfg.dkim.push(dkim());
    cfg.submission.listen = Some("127.0.0.1:0".parse().unwrap());
    cfg.submission.allow_plaintext_auth = true;
    cfg.submission.max_message_bytes = 20_000;
    let node = start(cfg).await;
    let listener = node.submission.starttls.unwrap();

    let mut io = connect(listener).await;
    cmd(&mut io, "EHLO app.test").await;
    let r = cmd(&mut io, "AUTH LOGIN").await;
    assert!(r.starts_with("334 "), "{r}");
    let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
    assert!(cmd(&mut io, &b64("app")).await.starts_with("334 "));
    let r = cmd(&mut io, &b64(KEY)).await;
    assert!(r.starts_with("235 2.7.0"), "{r}");
    let before = spool_counts(&node).await;

    // Each refused with its code, nothing queued.
    let two_from = "From: a@example.com\r\nFrom: b@example.com\r\n\r\nx\r\n.\r\n";
    let long_line = format!("From: a@example.com\r\n\r\n{}\r\n.\r\n", "y".repeat(1000));
    let bare_lf = "From: a@example.com\r\n\r\nbare\nLF\r\n.\r\n";
    for (data, code) in [
        (two_from.to_owned(), "554 5.6.0"),
        (long_line, "554 5.6.0"),
        (bare_lf.to_owned(), "554 5.6.0"),
        (
            format!(
                "From: a@example.com\r\n\r\n{}\r\n.\r\n",
                "z\r\n".repeat(8000)
            ),
            "552 5.3.4",
        ),
    ] {
        begin(&mut io, "<app@example.com>", "<x@sink.test>", true).await;
        io.get_mut().write_all(data.as_bytes()).await.unwrap();
        let r = reply(&mut io).await;
        assert!(r.starts_with(code), "{code}: {r}");
    }
    let r = cmd(&mut io, "MAIL FROM:<app@example.com> SIZE=30000").await;
    assert!(r.starts_with("552 5.3.4"), "{r}");
    let r = cmd(&mut io, &format!("NOOP {}", "x".repeat(100_000))).await;
    assert!(r.starts_with("500 5.5.2"), "{r}");
    // BDAT whose announced size is larger than what follows LAST: the rest of the stream is
    // taken as chunk data, so the message ends early and is refused.
    begin(&mut io, "<app@example.com>", "<x@sink.test>", false).await;
    let r = cmd(&mut io, "BDAT 10 LAST\r\nFrom: a@example").await;
    assert!(r.starts_with("554 5.6.0"), "a cut message: {r}");
    let r = reply(&mut io).await;
    assert!(
        r.starts_with("502"),
        "the rest is a command to the server: {r}"
    );
    assert_eq!(spool_counts(&node).await, before, "nothing was queued");

    // A good one over DATA with DSN parameters, and one over BDAT in two chunks.
    assert!(cmd(&mut io, "RSET").await.starts_with("250"));
    begin(
        &mut io,
        "<app@example.com> RET=HDRS ENVID=order+2B42",
        "<one@sink.test> NOTIFY=FAILURE ORCPT=rfc822;one+40sink.test",
        true,
    )
    .await;
    io.get_mut()
        .write_all(b"From: shop@example.com\r\nSubject: over DATA\r\n\r\n..stuffed\r\nend\r\n.\r\n")
        .await
        .unwrap();
    let r = reply(&mut io).await;
    assert!(r.starts_with("250 2.0.0 queued as "), "{r}");
    let body = b"From: shop@example.com\r\nSubject: over BDAT\r\n\r\n.not stuffed\r\n";
    let (first, second) = body.split_at(20);
    io.get_mut()
        .write_all(b"MAIL FROM:<app@example.com>\r\nRCPT TO:<two@sink.test>\r\n")
        .await
        .unwrap();
    assert!(reply(&mut io).await.starts_with("250"));
    assert!(reply(&mut io).await.starts_with("250"));
    io.get_mut()
        .write_all(format!("BDAT {}\r\n", first.len()).as_bytes())
        .await
        .unwrap();
    io.get_mut().write_all(first).await.unwrap();
    io.get_mut()
        .write_all(format!("BDAT {} LAST\r\n", second.len()).as_bytes())
        .await
        .unwrap();
    io.get_mut().write_all(second).await.unwrap();
    assert!(reply(&mut io).await.starts_with("250 2.0.0 20 octets"));
    let r = reply(&mut io).await;
    assert!(r.starts_with("250 2.0.0 queued as "), "{r}");
    assert!(cmd(&mut io, "QUIT").await.starts_with("221"));

    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while sink.messages().len() < 2 {
        assert!(std::time::Instant::now() < deadline, "not delivered");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let got = sink.messages();
    let by_rcpt = |r: &str| got.iter().find(|m| m.rcpts == [r]).unwrap().data.clone();
    let over_data = by_rcpt("one@sink.test");
    assert!(
        over_data.contains("\r\nReceived: from app.test ([127.0.0.1])\r\n\tby "),
        "{over_data}"
    );
    assert!(over_data.contains("with ESMTPA;"), "{over_data}");
    assert!(
        over_data
            .ends_with("From: shop@example.com\r\nSubject: over DATA\r\n\r\n.stuffed\r\nend\r\n"),
        "{over_data}"
    );
    let over_bdat = by_rcpt("two@sink.test");
    assert!(over_bdat.starts_with("DKIM-Signature: "), "{over_bdat}");
    assert!(
        over_bdat.ends_with(std::str::from_utf8(body).unwrap()),
        "byte for byte: {over_bdat}"
    );
    // The registry is the process's, which other tests share: at least this test's.
    let m = metrics(node.http_addr).await;
    let count = |result: &str| {
        metric_value(
            &m,
            "sluice_submission_messages_total",
            &format!("result=\"{result}\""),
        )
        .unwrap_or(0.0)
    };
    assert!(count("accepted") >= 2.0 && count("refused") >= 5.0, "{m}");
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trusted_network_submits_without_auth() {
    let sink = Sink::start(SinkOptions::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = delivery_config(dir.path(), &sink);
    cfg.submission.listen = Some("127.0.0.1:0".parse().unwrap());
    cfg.submission.trusted_networks = vec!["127.0.0.0/8".into()];
    let node = start(cfg).await;
    let mut io = connect(node.submission.starttls.unwrap()).await;
    let ehlo = cmd(&mut io, "EHLO relay.test").await;
    assert!(!ehlo.contains("AUTH"), "{ehlo}");
    io.get_mut()
        .write_all(b"MAIL FROM:<>\r\nRCPT TO:<x@sink.test>\r\nDATA\r\n")
        .await
        .unwrap();
    assert!(reply(&mut io).await.starts_with("250"));
    assert!(reply(&mut io).await.starts_with("250"));
    assert!(reply(&mut io).await.starts_with("354"));
    let r = cmd(&mut io, "From: relay@example.com\r\n\r\nhello\r\n.").await;
    assert!(r.starts_with("250 2.0.0 queued as "), "{r}");
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while sink.messages().is_empty() {
        assert!(std::time::Instant::now() < deadline, "not delivered");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let data = &sink.messages()[0].data;
    assert!(
        data.contains("\r\n\tby ") && data.contains(" with ESMTP;"),
        "neither TLS nor AUTH: {data}"
    );
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bounced_submission_sends_a_dsn_to_its_return_path_unless_notify_never() {
    let sink = Sink::start(SinkOptions {
        rcpt: Arc::new(|rcpt, _| {
            if rcpt.starts_with("nobody") {
                "550 5.1.1 no such user here".to_owned()
            } else {
                "250 2.1.5 ok".to_owned()
            }
        }),
        ..SinkOptions::default()
    })
    .await;
    let submitter = Sink::start(SinkOptions::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = delivery_config(dir.path(), &sink);
    cfg.routes.push(sluice::config::Route {
        domain: "back.test".into(),
        relay: submitter.addr.to_string(),
    });
    cfg.submission.listen = Some("127.0.0.1:0".parse().unwrap());
    cfg.submission.trusted_networks = vec!["127.0.0.1/32".into()];
    let node = start(cfg).await;
    let mut io = connect(node.submission.starttls.unwrap()).await;
    cmd(&mut io, "EHLO app.test").await;
    for (rcpt, params) in [
        (
            "nobody@sink.test",
            " NOTIFY=FAILURE ORCPT=rfc822;nobody+40sink.test",
        ),
        ("nobody2@sink.test", " NOTIFY=NEVER"),
        ("someone@sink.test", ""),
    ] {
        begin(
            &mut io,
            "<app@back.test> RET=HDRS ENVID=order-7",
            &format!("<{rcpt}>{params}"),
            true,
        )
        .await;
        let r = cmd(
            &mut io,
            &format!("From: app@back.test\r\nSubject: to {rcpt}\r\n\r\nsecret body\r\n."),
        )
        .await;
        assert!(r.starts_with("250"), "{r}");
    }
    cmd(&mut io, "QUIT").await;
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while submitter.messages().is_empty() || sink.messages().is_empty() {
        assert!(std::time::Instant::now() < deadline, "no DSN");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Time for a second DSN (that must not come) to arrive.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let dsns = submitter.messages();
    assert_eq!(
        dsns.len(),
        1,
        "one DSN: NOTIFY=NEVER has none, the delivered one none"
    );
    let dsn = &dsns[0];
    assert_eq!(dsn.mail_from, "", "a DSN has a null return path");
    assert_eq!(dsn.rcpts, ["app@back.test"]);
    use mail_parser::MimeHeaders;
    let parsed = mail_parser::MessageParser::default()
        .parse(dsn.data.as_bytes())
        .unwrap();
    let ct = parsed.content_type().unwrap();
    assert_eq!(
        (ct.ctype(), ct.attribute("report-type")),
        ("multipart", Some("delivery-status"))
    );
    let text = &dsn.data;
    for field in [
        "Final-Recipient: rfc822; nobody@sink.test",
        "Original-Recipient: rfc822;nobody@sink.test",
        "Original-Envelope-Id: order-7",
        "Action: failed",
        "Status: 5.1.1",
        "Diagnostic-Code: smtp; 550 5.1.1 no such user here",
        "Content-Type: text/rfc822-headers",
        "Subject: to nobody@sink.test",
    ] {
        assert!(text.contains(field), "{field}: {text}");
    }
    assert!(!text.contains("secret body"), "RET=HDRS: {text}");
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_and_eight_bit_messages_go_over_bdat_to_a_server_that_offers_chunking() {
    let sink = Sink::start(SinkOptions {
        chunking: true,
        ..SinkOptions::default()
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = delivery_config(dir.path(), &sink);
    cfg.dkim.push(dkim());
    let node = start(cfg).await;
    let head = |to: &str, extra: &str| {
        format!("From: shop@example.com\r\nTo: {to}\r\nSubject: sizes\r\n{extra}\r\n")
    };
    let small = head("small@sink.test", "") + "short\r\n.dot\r\n";
    let eight_bit = head(
        "utf8@sink.test",
        "Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n",
    ) + "Grüße aus Köln\r\n";
    // 100 KB, with lines that start with a dot and one that is only a dot: nothing is stuffed.
    let mut large = head("large@sink.test", "");
    for i in 0..1_400 {
        large.push_str(&format!(".{i:05} {}\r\n", "x".repeat(64)));
    }
    large.push_str(".\r\nend\r\n");
    for (to, body) in [
        ("small@sink.test", &small),
        ("utf8@sink.test", &eight_bit),
        ("large@sink.test", &large),
    ] {
        let (status, _, b) = post_body(
            node.http_addr,
            &format!("/v1/messages/raw?to={to}&mail_from=app@example.com"),
            "message/rfc822",
            body.clone().into_bytes(),
        )
        .await;
        assert_eq!(status, 202, "{b}");
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while sink.messages().len() < 3 {
        assert!(std::time::Instant::now() < deadline, "not delivered");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let got = sink.messages();
    let by_rcpt = |rcpt: &str| {
        got.iter()
            .find(|m| m.rcpts == [rcpt])
            .unwrap_or_else(|| panic!("{rcpt} not delivered: {got:?}"))
    };
    for (rcpt, body, bdat) in [
        ("small@sink.test", &small, false),
        ("utf8@sink.test", &eight_bit, true),
        ("large@sink.test", &large, true),
    ] {
        let m = by_rcpt(rcpt);
        assert_eq!(m.bdat, bdat, "{rcpt}: over BDAT");
        assert!(m.data.starts_with("DKIM-Signature: "), "{rcpt}: {}", m.data);
        // The client's bytes follow the fields we add, exactly as they were submitted.
        assert!(m.data.ends_with(body.as_str()), "{rcpt}: {}", m.data);
    }
    let text = metrics(node.http_addr).await;
    assert!(
        metric_value(&text, "sluice_smtp_content_total", "command=\"bdat\"").unwrap_or(0.0) >= 2.0,
        "{text}"
    );
}
