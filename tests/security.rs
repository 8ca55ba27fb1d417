//! Security: no start with the example secrets outside the development profile, API keys kept
//! out of the logs, HTTPS on the API, STARTTLS on the bounce listener (which still relays
//! nothing), and the listener's connection limits per client and overall.

use crate::common;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use rustls::pki_types::pem::PemObject;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

/// A self-signed certificate for `localhost`, written as PEM files into `dir`.
fn certificate(dir: &std::path::Path) -> (std::path::PathBuf, std::path::PathBuf, String) {
    let cert = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
    let (c, k) = (dir.join("cert.pem"), dir.join("key.pem"));
    std::fs::write(&c, cert.cert.pem()).unwrap();
    std::fs::write(&k, cert.signing_key.serialize_pem()).unwrap();
    (c, k, cert.cert.pem())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn production_refuses_the_example_secrets() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("sluice.toml");
    let run = |text: &str| {
        std::fs::write(&cfg, text).unwrap();
        std::process::Command::new(env!("CARGO_BIN_EXE_sluice"))
            .args(["serve", "--config"])
            .arg(&cfg)
            .env_remove("SLUICE_API_KEYS")
            .env_remove("SLUICE_TOKEN_KEYS")
            .output()
            .unwrap()
    };
    let base = format!(
        "[http]\nlisten = \"127.0.0.1:0\"\n[auth]\napi_keys = [\"change-me\"]\n[spool]\npath = \"{}\"\n",
        dir.path().join("spool").display()
    );
    let out = run(&base);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("auth.api_keys[0]"), "{stderr}");
    assert!(stderr.contains("secrets.token_keys"), "{stderr}");
    assert!(
        !dir.path().join("spool").exists(),
        "it opened the spool before refusing"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_keys_never_reach_the_logs() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("sluice.toml");
    let secret = "correct-horse-battery-staple";
    let wrong = "wrong-key-that-must-not-be-logged";
    std::fs::write(
        &cfg,
        format!(
            "[http]\nlisten = \"127.0.0.1:0\"\n[auth]\napi_keys = [\"{secret}\"]\n\
             [secrets]\ntoken_keys = [\"token-key-0123456789abcdef\"]\n\
             [spool]\npath = \"{}\"\n[log]\nlevel = \"trace\"\ndelivery_log = \"{}\"\n\
             [delivery]\nenabled = false\n",
            dir.path().join("spool").display(),
            dir.path().join("d.jsonl").display()
        ),
    )
    .unwrap();
    let log = dir.path().join("stderr.log");
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_sluice"))
        .args(["serve", "--config"])
        .arg(&cfg)
        .env_remove("RUST_LOG")
        .env_remove("SLUICE_API_KEYS")
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let addr = loop {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        if let Some(a) = text
            .split("http_addr=")
            .nth(1)
            .and_then(|r| r.split_whitespace().next())
        {
            break a.to_owned();
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let c = client();
    for key in [secret, wrong, secret] {
        let r = c
            .get(format!("http://{addr}/v1/queue"))
            .bearer_auth(key)
            .send()
            .await
            .unwrap();
        assert!(matches!(r.status().as_u16(), 200 | 401 | 503));
    }
    let _ = std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    child.wait().unwrap();
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(
        text.lines().count() > 3,
        "trace logging produced nothing: {text}"
    );
    assert!(!text.contains(secret), "the API key is in the log");
    assert!(!text.contains(wrong), "a presented key is in the log");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_speaks_https_when_given_a_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let (cert, key, pem) = certificate(dir.path());
    let mut cfg = config(dir.path());
    cfg.http.tls_cert = Some(cert);
    cfg.http.tls_key = Some(key);
    let node = start(cfg).await;
    let addr = node.http_addr;
    let _ = rustls::crypto::ring::default_provider().install_default();
    let https = reqwest::Client::builder()
        .no_proxy()
        .add_root_certificate(reqwest::Certificate::from_pem(pem.as_bytes()).unwrap())
        .resolve("localhost", addr)
        .build()
        .unwrap();
    let url = format!("https://localhost:{}", addr.port());
    let r = https
        .get(format!("{url}/v1/queue"))
        .bearer_auth(KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(
        https
            .get(format!("{url}/healthz"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    // Plain HTTP on the TLS port gets nowhere.
    let plain = client()
        .get(format!("http://{addr}/healthz"))
        .timeout(Duration::from_secs(5))
        .send()
        .await;
    assert!(plain.is_err() || !plain.unwrap().status().is_success());
    // An unverified client is refused by its own check (the certificate is self-signed).
    let strict = reqwest::Client::builder()
        .no_proxy()
        .tls_certs_only([])
        .resolve("localhost", addr)
        .build()
        .unwrap();
    assert!(strict.get(format!("{url}/healthz")).send().await.is_err());
    node.shutdown().await;
}

async fn line<R: tokio::io::AsyncBufRead + Unpin>(r: &mut R) -> String {
    let mut reply = String::new();
    loop {
        let mut l = String::new();
        r.read_line(&mut l).await.unwrap();
        reply.push_str(&l);
        if l.len() < 4 || l.as_bytes()[3] != b'-' {
            return reply;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_bounce_listener_offers_starttls_and_still_relays_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let (cert, key, pem) = certificate(dir.path());
    let mut cfg = config(dir.path());
    cfg.bounce.listen = Some("127.0.0.1:0".parse().unwrap());
    cfg.bounce.tls_cert = Some(cert);
    cfg.bounce.tls_key = Some(key);
    cfg.bounce.feedback_addresses = vec!["fbl@bounces.example.com".into()];
    let node = start(cfg).await;
    let listener = node.bounce_addr.unwrap();

    let tcp = tokio::net::TcpStream::connect(listener).await.unwrap();
    let mut io = BufReader::new(tcp);
    assert!(line(&mut io).await.starts_with("220 "));
    io.get_mut()
        .write_all(b"EHLO client.test\r\n")
        .await
        .unwrap();
    let ehlo = line(&mut io).await;
    assert!(ehlo.contains("250-STARTTLS"), "{ehlo}");
    io.get_mut().write_all(b"STARTTLS\r\n").await.unwrap();
    assert!(line(&mut io).await.starts_with("220 2.0.0"));

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
    let tls = tokio_rustls::TlsConnector::from(Arc::new(client))
        .connect(
            rustls::pki_types::ServerName::try_from("localhost").unwrap(),
            io.into_inner(),
        )
        .await
        .expect("TLS handshake");
    let mut io = BufReader::new(tls);
    // After TLS the client starts again; STARTTLS is not offered twice.
    io.get_mut()
        .write_all(b"EHLO client.test\r\n")
        .await
        .unwrap();
    let ehlo = line(&mut io).await;
    assert!(
        ehlo.starts_with("250-") && !ehlo.contains("STARTTLS"),
        "{ehlo}"
    );
    io.get_mut()
        .write_all(b"MAIL FROM:<>\r\nRCPT TO:<someone@elsewhere.example>\r\n")
        .await
        .unwrap();
    assert!(line(&mut io).await.starts_with("250"));
    let relay = line(&mut io).await;
    assert!(relay.starts_with("550 5.7.1"), "relayed over TLS: {relay}");
    io.get_mut()
        .write_all(b"RCPT TO:<fbl@bounces.example.com>\r\nQUIT\r\n")
        .await
        .unwrap();
    assert!(line(&mut io).await.starts_with("250"));
    assert!(line(&mut io).await.starts_with("221"));

    // Commands pipelined behind STARTTLS in the clear are never taken: the client is dropped.
    let tcp = tokio::net::TcpStream::connect(listener).await.unwrap();
    let mut io = BufReader::new(tcp);
    line(&mut io).await;
    io.get_mut()
        .write_all(b"EHLO client.test\r\nSTARTTLS\r\nRCPT TO:<fbl@bounces.example.com>\r\n")
        .await
        .unwrap();
    line(&mut io).await;
    assert!(line(&mut io).await.starts_with("220 2.0.0"));
    let mut rest = String::new();
    let n = tokio::time::timeout(Duration::from_secs(5), io.read_line(&mut rest))
        .await
        .expect("the listener closed the connection")
        .unwrap_or(0);
    assert_eq!(n, 0, "the listener answered {rest:?}");
    node.shutdown().await;
}

/// Connects to `to` from the loopback address `from` and returns the greeting line.
async fn greeting_from(
    from: [u8; 4],
    to: std::net::SocketAddr,
) -> (BufReader<tokio::net::TcpStream>, String) {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind(std::net::SocketAddr::from((from, 0))).unwrap();
    let mut io = BufReader::new(socket.connect(to).await.unwrap());
    let first = line(&mut io).await;
    (io, first)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_bounce_listener_limits_connections_per_client_and_overall() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path());
    cfg.bounce.listen = Some("127.0.0.1:0".parse().unwrap());
    cfg.bounce.max_connections_per_ip = 3;
    cfg.bounce.max_connections = 5;
    let node = start(cfg).await;
    let listener = node.bounce_addr.unwrap();

    // Three from one client are served; its fourth is turned away with a 421.
    let mut held = Vec::new();
    for _ in 0..3 {
        let (io, first) = greeting_from([127, 0, 0, 1], listener).await;
        assert!(first.starts_with("220 "), "{first}");
        held.push(io);
    }
    let (_, fourth) = greeting_from([127, 0, 0, 1], listener).await;
    assert!(fourth.starts_with("421 4.7.0"), "{fourth}");
    // Another client is not affected by the first one's limit...
    for _ in 0..2 {
        let (io, first) = greeting_from([127, 0, 0, 2], listener).await;
        assert!(first.starts_with("220 "), "{first}");
        held.push(io);
    }
    // ...but the overall limit (5) holds for everyone.
    let (_, sixth) = greeting_from([127, 0, 0, 3], listener).await;
    assert!(sixth.starts_with("421 4.7.0"), "{sixth}");

    // A client that hangs up gives its place back.
    let mut quit = held.remove(0);
    quit.get_mut().write_all(b"QUIT\r\n").await.unwrap();
    assert!(line(&mut quit).await.starts_with("221"));
    drop(quit);
    let started = std::time::Instant::now();
    loop {
        let (_io, first) = greeting_from([127, 0, 0, 1], listener).await;
        if first.starts_with("220 ") {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "the place was not given back: {first}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let m = metrics(node.http_addr).await;
    let refused = metric_value(
        &m,
        "sluice_inbound_connections_total",
        "result=\"over_limit\"",
    );
    assert!(refused.is_some_and(|n| n >= 2.0), "{refused:?}");
    node.shutdown().await;
}
