//! Transport security end to end, on loopback with real parts: NSD serving a DNSSEC-signed tree
//! (`ldns-signzone`, its keys the trust anchor), an HTTPS policy server with a test CA, and SMTP
//! receivers with certificates from that CA, with a wrong name, self-signed, or without
//! STARTTLS, all on one port at addresses of their own (`delivery.smtp_port`, so the TLSA
//! records are published under `_<port>._tcp`, the port connected to).
//!
//! * MTA-STS: `enforce` sends only to matching MX hosts with a valid certificate and defers
//!   otherwise; `testing` sends and counts the failure; a policy is cached across a restart
//!   with its server gone; malformed, oversized and hanging policy servers leave the domain
//!   without a policy (and reported), without holding up other domains.
//! * DANE: DANE-EE and DANE-TA records that match deliver over TLS; a mismatch, a receiver
//!   without STARTTLS and a bogus (badly signed) TLSA answer defer, never sending in plain text;
//!   a TLSA record reached through a CNAME works; records of unusable usages still make TLS
//!   mandatory; an unsigned domain goes as before.
//! * TLS reporting: the day's aggregate is mailed to the `rua` and parses as RFC 8460 JSON.

use crate::common;

use std::collections::HashMap;
use std::io::Read;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::nsd::{SignedDns, Zone};
use common::sink::{Sink, SinkOptions};
use common::*;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use serde_json::{Value, json};
use sluice::config::{Config, Route};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_rustls::TlsAcceptor;

/// A test CA.
struct Pki {
    issuer: rcgen::CertifiedIssuer<'static, rcgen::KeyPair>,
}

impl Pki {
    /// A CA whose certificate is written to `dir/ca.pem`.
    fn new(dir: &Path) -> Pki {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "Sluice test CA");
        let issuer = rcgen::CertifiedIssuer::self_signed(params, key).unwrap();
        std::fs::write(dir.join("ca.pem"), issuer.as_ref().pem()).unwrap();
        Pki { issuer }
    }

    fn ca_der(&self) -> CertificateDer<'static> {
        self.issuer.as_ref().der().clone()
    }

    /// A server presenting a certificate for `names` from this CA, and the CA after it.
    fn acceptor(&self, names: &[&str]) -> (TlsAcceptor, CertificateDer<'static>) {
        let key = rcgen::KeyPair::generate().unwrap();
        let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
        let leaf = rcgen::CertificateParams::new(names)
            .unwrap()
            .signed_by(&key, &self.issuer)
            .unwrap();
        let der = leaf.der().clone();
        (acceptor(vec![der.clone(), self.ca_der()], &key), der)
    }
}

/// A server presenting a fresh self-signed certificate for `name`.
fn self_signed(name: &str) -> (TlsAcceptor, CertificateDer<'static>) {
    let cert = rcgen::generate_simple_self_signed(vec![name.to_owned()]).unwrap();
    let der = cert.cert.der().clone();
    (acceptor(vec![der.clone()], &cert.signing_key), der)
}

fn acceptor(chain: Vec<CertificateDer<'static>>, key: &rcgen::KeyPair) -> TlsAcceptor {
    let key = PrivateKeyDer::try_from(key.serialize_der()).unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .unwrap();
    TlsAcceptor::from(Arc::new(config))
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|b| format!("{b:02x}")).collect()
}

fn sha256(b: &[u8]) -> Vec<u8> {
    ring::digest::digest(&ring::digest::SHA256, b)
        .as_ref()
        .to_vec()
}

/// `3 1 1 <SHA-256 of the certificate's SubjectPublicKeyInfo>`.
fn dane_ee(cert: &CertificateDer<'_>) -> String {
    let parsed = webpki::EndEntityCert::try_from(cert).unwrap();
    format!(
        "3 1 1 {}",
        hex(&sha256(parsed.subject_public_key_info().as_ref()))
    )
}

/// A port free on `ip` (the receivers all listen on it, each at its own address).
fn free_port(ip: &str) -> u16 {
    let l = std::net::TcpListener::bind((ip, 0)).unwrap();
    l.local_addr().unwrap().port()
}

async fn receiver(ip: &str, port: u16, tls: Option<TlsAcceptor>) -> Sink {
    Sink::start(SinkOptions {
        tls,
        listen: Some(SocketAddr::new(ip.parse().unwrap(), port)),
        ..SinkOptions::default()
    })
    .await
}

/// What the policy server answers for a host.
#[derive(Clone)]
enum Answer {
    Policy(String),
    /// A body over the 64 KiB limit.
    Oversized,
    /// Reads the request and never answers.
    Hang,
}

/// HTTPS on `ip:443`, answering `GET /.well-known/mta-sts.txt` by the Host header.
struct PolicyServer {
    task: tokio::task::JoinHandle<()>,
}

impl PolicyServer {
    async fn start(ip: &str, tls: TlsAcceptor, answers: HashMap<String, Answer>) -> PolicyServer {
        let listener = tokio::net::TcpListener::bind((ip, 443))
            .await
            .expect("bind the policy server on port 443 (root)");
        let answers = Arc::new(answers);
        let task = tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let (tls, answers) = (tls.clone(), Arc::clone(&answers));
                tokio::spawn(async move {
                    let Ok(mut s) = tls.accept(tcp).await else {
                        return;
                    };
                    let mut req = Vec::new();
                    let mut buf = [0u8; 1024];
                    while !req.windows(4).any(|w| w == b"\r\n\r\n") {
                        match s.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => req.extend_from_slice(&buf[..n]),
                        }
                    }
                    let text = String::from_utf8_lossy(&req).to_ascii_lowercase();
                    let host = text
                        .lines()
                        .find_map(|l| l.strip_prefix("host:"))
                        .map(|h| h.trim().to_owned())
                        .unwrap_or_default();
                    let body = match answers.get(&host) {
                        Some(Answer::Policy(p)) => p.clone(),
                        Some(Answer::Oversized) => format!(
                            "version: STSv1\r\nmode: enforce\r\nmax_age: 86400\r\n{}",
                            "mx: filler.example\r\n".repeat(4000)
                        ),
                        Some(Answer::Hang) => {
                            tokio::time::sleep(Duration::from_secs(3600)).await;
                            return;
                        }
                        None => {
                            let _ = s
                                .write_all(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
                                .await;
                            return;
                        }
                    };
                    let head = format!(
                        "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                        body.len()
                    );
                    let _ = s.write_all(head.as_bytes()).await;
                    let _ = s.write_all(body.as_bytes()).await;
                    let _ = s.shutdown().await;
                });
            }
        });
        PolicyServer { task }
    }
}

impl Drop for PolicyServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A delivering node that resolves through `dns` (validating from its anchor when `dane`)
/// and trusts the test CA in `dir`; MX hosts listen on `port`.
fn node_config(dir: &Path, dns: &SignedDns, port: u16, dane: bool) -> Config {
    let mut cfg = config(&dir.join("spool"));
    cfg.delivery.enabled = true;
    cfg.delivery.retry_initial = Duration::from_millis(300);
    cfg.delivery.retry_max = Duration::from_secs(1);
    cfg.delivery.site_backoff = Duration::from_millis(300);
    cfg.delivery.smtp_port = port;
    cfg.delivery.tls_ca_file = Some(dir.join("ca.pem"));
    cfg.log.delivery_log = dir.join("delivery.jsonl");
    cfg.dns.nameservers = vec![dns.addr];
    cfg.dns.timeout = Duration::from_secs(2);
    cfg.mta_sts.fetch_timeout = Duration::from_secs(2);
    cfg.dane.enabled = dane;
    cfg.dane.trust_anchor = Some(dns.anchor.clone());
    cfg
}

/// Polls the delivery log until `done` holds for its records (within `within`).
async fn wait_records(dir: &Path, within: Duration, done: impl Fn(&[Value]) -> bool) -> Vec<Value> {
    let started = Instant::now();
    loop {
        let records = log_records(dir);
        if done(&records) {
            return records;
        }
        assert!(
            started.elapsed() < within,
            "timed out; the delivery log holds {records:#?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn record_for<'a>(records: &'a [Value], kind: &str, rcpt: &str) -> Option<&'a Value> {
    records
        .iter()
        .find(|r| r["type"] == kind && r["recipient"] == rcpt)
}

fn rcpts(sink: &Sink) -> Vec<String> {
    let mut v: Vec<String> = sink
        .messages()
        .into_iter()
        .flat_map(|m| m.rcpts.clone())
        .collect();
    v.sort();
    v
}

/// The JSON of the TLS report attached to `data` (a multipart/report message).
fn report_of(data: &str) -> Value {
    use base64::Engine;
    assert!(data.contains("report-type=\"tlsrpt\""), "{data}");
    let part = data
        .split("Content-Type: application/tlsrpt+gzip")
        .nth(1)
        .expect("a tlsrpt+gzip part");
    let body = part.split("\r\n\r\n").nth(1).expect("the part's body");
    let b64: String = body.lines().take_while(|l| !l.starts_with("--")).collect();
    let gz = base64::engine::general_purpose::STANDARD
        .decode(b64.trim())
        .expect("base64");
    let mut json = String::new();
    flate2::read::GzDecoder::new(&gz[..])
        .read_to_string(&mut json)
        .expect("gzip");
    serde_json::from_str(&json).expect("JSON")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mta_sts_enforces_tests_reports_and_keeps_its_cache_across_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let pki = Pki::new(d);
    let ip = |n: u8| format!("127.0.3.{n}");
    let port = free_port(&ip(1));
    let listed = receiver(&ip(1), port, Some(pki.acceptor(&["mx1.sts.test"]).0)).await;
    let unlisted = receiver(&ip(2), port, Some(pki.acceptor(&["mx0.sts.test"]).0)).await;
    let misnamed = receiver(&ip(3), port, Some(pki.acceptor(&["elsewhere.test"]).0)).await;
    let untrusted = receiver(&ip(4), port, Some(self_signed("mx.testing.test").0)).await;
    let mailbox = Sink::start(SinkOptions::default()).await;

    let policy = |mode: &str, mx: &str| {
        Answer::Policy(format!(
            "version: STSv1\r\nmode: {mode}\r\nmx: {mx}\r\nmax_age: 86400\r\n"
        ))
    };
    let answers: HashMap<String, Answer> = [
        ("mta-sts.sts.test", policy("enforce", "mx1.sts.test")),
        ("mta-sts.wrong.test", policy("enforce", "mx.wrong.test")),
        ("mta-sts.testing.test", policy("testing", "mx.testing.test")),
        // No max_age: not a policy.
        (
            "mta-sts.malformed.test",
            Answer::Policy("version: STSv1\r\nmode: enforce\r\nmx: mx.malformed.test\r\n".into()),
        ),
        ("mta-sts.oversized.test", Answer::Oversized),
        ("mta-sts.hanging.test", Answer::Hang),
    ]
    .into_iter()
    .map(|(h, a)| (h.to_owned(), a))
    .collect();
    let hosts: Vec<&str> = answers.keys().map(String::as_str).collect();
    let server = PolicyServer::start(&ip(10), pki.acceptor(&hosts).0, answers.clone()).await;

    let sts_zone = |name: &str, mx: Vec<String>| {
        let mut records = mx;
        records.push("_mta-sts IN TXT \"v=STSv1; id=20261203;\"".into());
        records.push(format!("mta-sts IN A {}", ip(10)));
        records.push("_smtp._tls IN TXT \"v=TLSRPTv1; rua=mailto:tlsrpt@reports.test\"".into());
        Zone {
            name: name.into(),
            records,
            signed: false,
            tamper: vec![],
        }
    };
    let one_mx = |host_ip: String| vec!["@ IN MX 10 mx".into(), format!("mx IN A {host_ip}")];
    let dns = SignedDns::start(
        &d.join("dns"),
        &[
            // The better MX is not in the policy: enforce skips it.
            sts_zone(
                "sts.test",
                vec![
                    "@ IN MX 5 mx0".into(),
                    "@ IN MX 10 mx1".into(),
                    format!("mx0 IN A {}", ip(2)),
                    format!("mx1 IN A {}", ip(1)),
                ],
            ),
            sts_zone("wrong.test", one_mx(ip(3))),
            sts_zone("testing.test", one_mx(ip(4))),
            sts_zone("malformed.test", one_mx(ip(2))),
            sts_zone("oversized.test", one_mx(ip(2))),
            sts_zone("hanging.test", one_mx(ip(2))),
        ],
    );

    let mut cfg = node_config(d, &dns, port, false);
    cfg.routes.push(Route {
        domain: "reports.test".into(),
        relay: mailbox.addr.to_string(),
    });
    let node = start(cfg.clone()).await;
    let addr = node.http_addr;
    let started = Instant::now();
    let to = [
        "a@sts.test",
        "b@wrong.test",
        "c@testing.test",
        "d@malformed.test",
        "e@oversized.test",
        "f@hanging.test",
    ];
    let _id = post_campaign(
        addr,
        to.iter()
            .map(|t| json!({"email": t, "vars": {"name": "X"}}))
            .collect(),
    )
    .await;
    let records = wait_records(d, Duration::from_secs(30), |r| {
        ["a@sts.test", "c@testing.test", "f@hanging.test"]
            .iter()
            .all(|t| record_for(r, "d", t).is_some())
            && record_for(r, "t", "b@wrong.test").is_some()
    })
    .await;

    // Enforce: only the listed MX, over verified TLS.
    assert_eq!(rcpts(&listed), ["a@sts.test"]);
    let a = record_for(&records, "d", "a@sts.test").unwrap();
    assert_eq!(
        (a["tls"].as_bool(), a["tls_policy"].as_str()),
        (Some(true), Some("sts-enforce")),
        "{a}"
    );
    assert_eq!(a["mx_host"], "mx1.sts.test");
    // The only MX presents a certificate for another name: deferred, never sent.
    let b = record_for(&records, "t", "b@wrong.test").unwrap();
    let diag = b["dsn_diag"].as_str().unwrap();
    assert!(
        diag.contains("certificate") && diag.contains("mx.wrong.test"),
        "{b}"
    );
    assert_eq!(b["dsn_status"], "4.7.5", "{b}");
    assert!(misnamed.messages().is_empty());
    // Testing: sent (to a self-signed certificate), and the failure counted.
    assert_eq!(rcpts(&untrusted), ["c@testing.test"]);
    let c = record_for(&records, "d", "c@testing.test").unwrap();
    assert_eq!(c["tls_policy"], "sts-testing", "{c}");
    // Bad policies are no policies: the mail goes as before, to the better MX.
    assert_eq!(
        rcpts(&unlisted),
        ["d@malformed.test", "e@oversized.test", "f@hanging.test"]
    );
    for r in ["d@malformed.test", "e@oversized.test", "f@hanging.test"] {
        assert_eq!(
            record_for(&records, "d", r).unwrap()["tls_policy"],
            "opportunistic"
        );
    }
    // The hanging policy server held up its own domain for the fetch time-out only.
    assert!(started.elapsed() < Duration::from_secs(20));

    // Today's aggregates and the cached policies.
    let (s, rep) = get_json(addr, "/v1/tls-reports").await;
    assert_eq!(s, 200, "{rep}");
    let domain = |name: &str| -> Value {
        rep["domains"]
            .as_array()
            .unwrap()
            .iter()
            .find(|x| x["domain"] == name)
            .cloned()
            .unwrap_or_else(|| panic!("{name} in {rep:#}"))
    };
    let failures = |name: &str| -> Vec<String> {
        domain(name)["policies"][0]["failure_details"]
            .as_array()
            .unwrap()
            .iter()
            .map(|f| f["result_type"].as_str().unwrap().to_owned())
            .collect()
    };
    assert!(domain("sts.test")["policies"][0]["successful_sessions"].as_u64() >= Some(1));
    assert_eq!(failures("testing.test"), ["certificate-not-trusted"]);
    assert_eq!(failures("wrong.test"), ["certificate-host-mismatch"]);
    assert_eq!(failures("malformed.test"), ["sts-policy-invalid"]);
    assert_eq!(failures("oversized.test"), ["sts-policy-invalid"]);
    assert_eq!(failures("hanging.test"), ["sts-policy-fetch-error"]);
    let cached: Vec<&str> = rep["mta_sts_policies"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["domain"].as_str().unwrap())
        .collect();
    assert_eq!(cached, ["sts.test", "testing.test", "wrong.test"]);

    // After the day: the report reaches the rua mailbox as RFC 8460 JSON.
    let delivery = node.delivery().expect("delivery runs");
    let tomorrow = sluice::now_ms() + 86_400_000;
    let sent = delivery.send_tls_reports(tomorrow).await;
    assert!(sent >= 6, "{sent} reports sent");
    let deadline = Instant::now() + Duration::from_secs(20);
    let report = loop {
        let found = mailbox.messages().into_iter().find(|m| {
            m.rcpts == ["tlsrpt@reports.test"] && m.data.contains("TLS-Report-Domain: testing.test")
        });
        if let Some(m) = found {
            break report_of(&m.data);
        }
        assert!(
            Instant::now() < deadline,
            "no report for testing.test arrived"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let p = &report["policies"][0];
    assert_eq!(p["policy"]["policy-type"], "sts", "{report:#}");
    assert_eq!(p["policy"]["policy-domain"], "testing.test");
    assert_eq!(p["policy"]["mx-host"], json!(["mx.testing.test"]));
    assert_eq!(p["summary"]["total-successful-session-count"], 0);
    assert_eq!(p["summary"]["total-failure-session-count"], 1);
    assert_eq!(
        p["failure-details"][0]["result-type"],
        "certificate-not-trusted"
    );
    assert_eq!(
        p["failure-details"][0]["receiving-mx-hostname"],
        "mx.testing.test"
    );
    assert_eq!(p["failure-details"][0]["receiving-ip"], ip(4));
    assert!(
        report["report-id"]
            .as_str()
            .is_some_and(|r| r.contains("testing.test"))
    );
    // The engine holds the spool open: let go of it before the node stops.
    drop(delivery);
    node.shutdown().await;

    // The policy server is gone; after a restart the cached policy still rules sts.test.
    drop(server);
    let node = start(cfg).await;
    let _ = post_campaign(
        node.http_addr,
        vec![json!({"email": "again@sts.test", "vars": {"name": "Y"}})],
    )
    .await;
    wait_records(d, Duration::from_secs(20), |r| {
        record_for(r, "d", "again@sts.test").is_some()
    })
    .await;
    assert_eq!(rcpts(&listed), ["a@sts.test", "again@sts.test"]);
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dane_checks_certificates_against_validated_tlsa_records() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let pki = Pki::new(d);
    let ip = |n: u8| format!("127.0.4.{n}");
    let port = free_port(&ip(1));
    let (ok_tls, ok_cert) = self_signed("mx-ok.dane.test");
    let (bad_tls, _) = self_signed("mx-bad.dane.test");
    let (_, other_cert) = self_signed("other.dane.test");
    let (bogus_tls, bogus_cert) = self_signed("mx-bogus.dane.test");
    let (ta_tls, _) = pki.acceptor(&["mx-ta.dane.test"]);
    let (cname_tls, cname_cert) = self_signed("mx-cname.dane.test");
    let (unusable_tls, _) = self_signed("mx-unusable.dane.test");
    let ok = receiver(&ip(1), port, Some(ok_tls)).await;
    let bad = receiver(&ip(2), port, Some(bad_tls)).await;
    let plain_only = receiver(&ip(3), port, None).await;
    let bogus = receiver(&ip(4), port, Some(bogus_tls)).await;
    let ta = receiver(&ip(5), port, Some(ta_tls)).await;
    let cname = receiver(&ip(6), port, Some(cname_tls)).await;
    let unusable = receiver(&ip(7), port, Some(unusable_tls)).await;
    let unsigned = receiver(&ip(9), port, None).await;

    let bogus_tlsa = dane_ee(&bogus_cert);
    let mut flipped = bogus_tlsa.clone();
    // The last hex digit changed: the record no longer matches its signature.
    let last = if flipped.ends_with('0') { "1" } else { "0" };
    flipped.replace_range(flipped.len() - 1.., last);
    let host = |name: &str, n: u8, tlsa: Option<String>| -> Vec<String> {
        let mut r = vec![
            format!("{name} IN MX 10 mx-{name}"),
            format!("mx-{name} IN A {}", ip(n)),
        ];
        if let Some(t) = tlsa {
            r.push(format!("_{port}._tcp.mx-{name} IN TLSA {t}"));
        }
        r
    };
    let mut records = Vec::new();
    records.extend(host("ok", 1, Some(dane_ee(&ok_cert))));
    records.extend(host("bad", 2, Some(dane_ee(&other_cert))));
    records.extend(host("notls", 3, Some(dane_ee(&other_cert))));
    records.extend(host("bogus", 4, Some(bogus_tlsa.clone())));
    records.extend(host(
        "ta",
        5,
        Some(format!("2 0 1 {}", hex(&sha256(&pki.ca_der())))),
    ));
    records.extend(host("cname", 6, None));
    records.push(format!("_{port}._tcp.mx-cname IN CNAME tlsa-target"));
    records.push(format!("tlsa-target IN TLSA {}", dane_ee(&cname_cert)));
    // PKIX-EE (usage 1) is not for SMTP: unusable, so TLS without authentication.
    records.extend(host(
        "unusable",
        7,
        Some(format!("1 1 1 {}", hex(&[7; 32]))),
    ));
    let dns = SignedDns::start(
        &d.join("dns"),
        &[
            Zone {
                name: "dane.test".into(),
                records,
                signed: true,
                tamper: vec![(format!("TLSA\t{bogus_tlsa}"), format!("TLSA\t{flipped}"))],
            },
            Zone {
                name: "plain.test".into(),
                records: vec![
                    "@ IN MX 10 mx".into(),
                    format!("mx IN A {}", ip(9)),
                    format!("_{port}._tcp.mx IN TLSA {}", dane_ee(&other_cert)),
                ],
                signed: false,
                tamper: vec![],
            },
        ],
    );
    let cfg = node_config(d, &dns, port, true);
    let node = start(cfg).await;
    let to = [
        "a@ok.dane.test",
        "b@bad.dane.test",
        "c@notls.dane.test",
        "d@bogus.dane.test",
        "e@ta.dane.test",
        "f@cname.dane.test",
        "g@unusable.dane.test",
        "h@plain.test",
    ];
    post_campaign(
        node.http_addr,
        to.iter()
            .map(|t| json!({"email": t, "vars": {"name": "X"}}))
            .collect(),
    )
    .await;
    let delivered = [
        "a@ok.dane.test",
        "e@ta.dane.test",
        "f@cname.dane.test",
        "g@unusable.dane.test",
        "h@plain.test",
    ];
    let deferred = ["b@bad.dane.test", "c@notls.dane.test", "d@bogus.dane.test"];
    let records = wait_records(d, Duration::from_secs(30), |r| {
        delivered.iter().all(|t| record_for(r, "d", t).is_some())
            && deferred.iter().all(|t| record_for(r, "t", t).is_some())
    })
    .await;
    for t in &delivered[..4] {
        let r = record_for(&records, "d", t).unwrap();
        assert_eq!(
            (r["tls"].as_bool(), r["tls_policy"].as_str()),
            (Some(true), Some("dane")),
            "{r}"
        );
    }
    // The unsigned domain: opportunistic as before (its receiver offers no TLS), its TLSA
    // record never asked for.
    let h = record_for(&records, "d", "h@plain.test").unwrap();
    assert_eq!(
        (h["tls"].as_bool(), h["tls_policy"].as_str()),
        (Some(false), Some("opportunistic")),
        "{h}"
    );
    for (sink, rcpt) in [
        (&ok, "a@ok.dane.test"),
        (&ta, "e@ta.dane.test"),
        (&cname, "f@cname.dane.test"),
        (&unusable, "g@unusable.dane.test"),
    ] {
        assert_eq!(rcpts(sink), [rcpt]);
        assert!(sink.messages().iter().all(|m| m.tls));
    }
    assert_eq!(rcpts(&unsigned), ["h@plain.test"]);
    // Mismatch, no STARTTLS, bogus TLSA: deferred with the reason, nothing sent.
    let reason = |t: &str| {
        record_for(&records, "t", t).unwrap()["dsn_diag"]
            .as_str()
            .unwrap()
            .to_owned()
    };
    assert!(
        reason("b@bad.dane.test").contains("certificate"),
        "{}",
        reason("b@bad.dane.test")
    );
    assert!(
        reason("c@notls.dane.test").contains("STARTTLS"),
        "{}",
        reason("c@notls.dane.test")
    );
    assert!(
        reason("d@bogus.dane.test").contains("DNSSEC"),
        "{}",
        reason("d@bogus.dane.test")
    );
    for sink in [&bad, &plain_only, &bogus] {
        assert!(sink.messages().is_empty());
    }

    let (_, rep) = get_json(node.http_addr, "/v1/tls-reports").await;
    let results = |name: &str| -> Vec<String> {
        rep["domains"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|x| x["domain"] == name)
            .flat_map(|x| x["policies"].as_array().unwrap().clone())
            .flat_map(|p| p["failure_details"].as_array().unwrap().clone())
            .map(|f| f["result_type"].as_str().unwrap().to_owned())
            .collect()
    };
    assert!(
        results("bad.dane.test").contains(&"validation-failure".to_owned()),
        "{rep:#}"
    );
    assert!(
        results("notls.dane.test").contains(&"starttls-not-supported".to_owned()),
        "{rep:#}"
    );
    assert!(
        results("bogus.dane.test").contains(&"dnssec-invalid".to_owned()),
        "{rep:#}"
    );
    node.shutdown().await;
}
