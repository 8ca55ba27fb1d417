//! DNS faults in the middle of a run: the name server answers SERVFAIL, stops answering (the
//! resolver times out), or is stopped altogether (port closed). Recipients at domains looked up
//! during a fault are deferred, never bounced; they are delivered once the fault clears; and
//! mail over a static route, which needs no lookup, keeps flowing meanwhile.
//!
//! The name server is a small one written here on a real UDP socket (hickory-proto encodes the
//! messages), because its faults must switch on cue; NSD serves the peer acceptance scripts.

use crate::common;

use std::collections::HashSet;
use std::net::{Ipv4Addr, SocketAddr};
use std::str::FromStr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::sink::{Sink, SinkOptions};
use common::*;
use hickory_proto::op::{Message, MessageType, OpCode, ResponseCode};
use hickory_proto::rr::rdata::{A, MX};
use hickory_proto::rr::{Name, RData, Record, RecordType};
use serde_json::{Value, json};
use sluice::config::Route;

#[derive(Clone, Copy, Debug, PartialEq)]
enum Mode {
    /// MX `mx.<domain>` for every name under `.test`, and 127.0.0.1 for every `mx.` name.
    Answer,
    ServFail,
    /// Reads queries and never answers.
    Silent,
    /// As `Answer`, with the MX host `mx2.<domain>`: the domain moved to another provider.
    Moved,
}

/// The programmable name server. `stop` closes its socket (the port then refuses), `start`
/// binds the same port again.
struct Dns {
    addr: SocketAddr,
    mode: Arc<Mutex<Mode>>,
    task: Option<tokio::task::JoinHandle<()>>,
    queries: Arc<Mutex<usize>>,
}

impl Dns {
    async fn start() -> Dns {
        let socket = tokio::net::UdpSocket::bind("127.0.0.1:0")
            .await
            .expect("bind DNS");
        let mut dns = Dns {
            addr: socket.local_addr().unwrap(),
            mode: Arc::new(Mutex::new(Mode::Answer)),
            task: None,
            queries: Default::default(),
        };
        dns.serve(socket);
        dns
    }

    /// Answers the queries that arrive on `socket`, as the current mode says.
    fn serve(&mut self, socket: tokio::net::UdpSocket) {
        let (m, q) = (Arc::clone(&self.mode), Arc::clone(&self.queries));
        self.task = Some(tokio::spawn(async move {
            let mut buf = vec![0u8; 4096];
            loop {
                let Ok((n, peer)) = socket.recv_from(&mut buf).await else {
                    continue;
                };
                *q.lock().unwrap() += 1;
                let mode = *m.lock().unwrap();
                if let Some(reply) = answer(&buf[..n], mode) {
                    let _ = socket.send_to(&reply, peer).await;
                }
            }
        }));
    }

    fn set(&self, mode: Mode) {
        *self.mode.lock().unwrap() = mode;
    }

    fn stop(&mut self) {
        if let Some(t) = self.task.take() {
            t.abort();
        }
    }

    /// Binds the same port again and answers on it.
    async fn restart(&mut self) {
        self.stop();
        // The aborted task drops its socket at its next poll; retry the bind briefly.
        let started = Instant::now();
        let socket = loop {
            if let Ok(s) = tokio::net::UdpSocket::bind(self.addr).await {
                break s;
            }
            assert!(
                started.elapsed() < Duration::from_secs(5),
                "DNS port stays busy"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        self.serve(socket);
    }

    fn queries(&self) -> usize {
        *self.queries.lock().unwrap()
    }
}

fn answer(query: &[u8], mode: Mode) -> Option<Vec<u8>> {
    let q = Message::from_vec(query).ok()?;
    let question = q.queries.first()?.clone();
    let mut r = Message::new(q.metadata.id, MessageType::Response, OpCode::Query);
    r.metadata.recursion_desired = q.metadata.recursion_desired;
    r.metadata.recursion_available = true;
    r.add_query(question.clone());
    match mode {
        Mode::Silent => return None,
        Mode::ServFail => r.metadata.response_code = ResponseCode::ServFail,
        Mode::Answer | Mode::Moved => {
            let name = question.name().clone();
            let text = name.to_ascii().to_lowercase();
            let host = if mode == Mode::Moved { "mx2" } else { "mx" };
            match question.query_type() {
                RecordType::MX if !text.starts_with("mx.") && !text.starts_with("mx2.") => {
                    let exchange = Name::from_str(&format!("{host}.{text}")).ok()?;
                    r.add_answer(Record::from_rdata(
                        name,
                        1,
                        RData::MX(MX::new(10, exchange)),
                    ));
                }
                RecordType::A if text.starts_with("mx.") || text.starts_with("mx2.") => {
                    r.add_answer(Record::from_rdata(
                        name,
                        1,
                        RData::A(A(Ipv4Addr::LOCALHOST)),
                    ));
                }
                // No AAAA, no MX for the hosts: an empty answer.
                _ => {}
            }
        }
    }
    r.to_vec().ok()
}

/// Connections opened to the site whose most preferred MX host is `host`.
async fn connections_to(addr: SocketAddr, host: &str) -> f64 {
    let text = metrics(addr).await;
    let labels = format!("result=\"ok\",site=\"{host}\"");
    metric_value(&text, "sluice_smtp_connections_total", &labels).unwrap_or(0.0)
}

/// `per` recipients at each of `domains` domains `<prefix><d>.test`.
fn spread(prefix: &str, domains: usize, per: usize) -> Vec<Value> {
    (0..domains)
        .flat_map(|d| (0..per).map(move |i| (d, i)))
        .map(|(d, i)| json!({"email": format!("u{i}@{prefix}{d}.test"), "vars": {"name": "N"}}))
        .collect()
}

/// Per-domain-prefix view of what the receiver got.
fn delivered_with(sink: &Sink, prefix: &str) -> usize {
    let all: HashSet<String> = sink
        .messages()
        .into_iter()
        .flat_map(|m| m.rcpts)
        .filter(|r| r.split('@').nth(1).is_some_and(|d| d.starts_with(prefix)))
        .collect();
    all.len()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dns_faults_defer_and_resume_and_never_stall_other_mail() {
    let sink = Sink::start(SinkOptions::default()).await;
    let mut dns = Dns::start().await;
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = delivery_config(dir.path(), &sink);
    cfg.routes = vec![Route {
        domain: "relay.test".into(),
        relay: sink.addr.to_string(),
    }];
    cfg.dns.nameservers = vec![dns.addr];
    cfg.dns.timeout = Duration::from_millis(400);
    cfg.delivery.smtp_port = sink.addr.port();
    let node = start(cfg).await;
    let addr = node.http_addr;
    let per = 3;
    let domains = 8;

    // Healthy: resolved and delivered.
    let ok = post_campaign(addr, spread("ok", domains, per)).await;
    wait_counts(addr, &ok, Duration::from_secs(30), |c| {
        c["delivered"].as_u64() == Some((domains * per) as u64)
    })
    .await;

    let mut phases = Vec::new();
    for (fault, prefix) in [
        ("SERVFAIL", "sf"),
        ("timeout", "to"),
        ("server stopped", "st"),
    ] {
        match fault {
            "SERVFAIL" => dns.set(Mode::ServFail),
            "timeout" => dns.set(Mode::Silent),
            _ => dns.stop(),
        }
        let queries_before = dns.queries();
        let id = post_campaign(addr, spread(prefix, domains, per)).await;
        // Every recipient is deferred (the lookup failed), none bounced or delivered.
        let counts = wait_counts(addr, &id, Duration::from_secs(30), |c| {
            c["deferred"].as_u64() == Some((domains * per) as u64)
        })
        .await;
        assert_eq!(counts["bounced"], 0, "{fault}: {counts}");
        assert_eq!(delivered_with(&sink, prefix), 0, "{fault}");
        if fault != "server stopped" {
            assert!(
                dns.queries() > queries_before,
                "{fault}: the server was not asked"
            );
        }
        // Mail that needs no lookup keeps flowing during the fault.
        let flowing = Instant::now();
        let relay: Vec<Value> = (0..20)
            .map(|i| json!({"email": format!("r{i}-{prefix}@relay.test"), "vars": {"name": "N"}}))
            .collect();
        let r = post_campaign(addr, relay).await;
        wait_counts(addr, &r, Duration::from_secs(10), |c| {
            c["delivered"].as_u64() == Some(20)
        })
        .await;
        let relay_took = flowing.elapsed();

        // The fault clears: the deferred recipients are delivered on their next attempt.
        let cleared = Instant::now();
        match fault {
            "server stopped" => dns.restart().await,
            _ => dns.set(Mode::Answer),
        }
        let counts = wait_counts(addr, &id, Duration::from_secs(30), |c| {
            c["delivered"].as_u64() == Some((domains * per) as u64)
        })
        .await;
        assert_eq!(counts["bounced"], 0, "{fault}: {counts}");
        assert_eq!(delivered_with(&sink, prefix), domains * per, "{fault}");
        phases.push(format!(
            "{fault}: {} deferred, relay mail delivered in {relay_took:?} meanwhile, all \
             delivered {:?} after the fault cleared",
            domains * per,
            cleared.elapsed()
        ));
    }

    // The deferrals carry the DNS failure's status.
    let deferrals: Vec<Value> = wait_log_kind(dir.path(), "t", 3 * domains * per)
        .await
        .into_iter()
        .filter(|r| r["type"] == "t")
        .collect();
    assert!(
        deferrals.len() >= 3 * domains * per,
        "{} deferrals logged",
        deferrals.len()
    );
    assert!(
        deferrals.iter().all(|r| r["dsn_status"] == "4.4.3"),
        "a DNS deferral without 4.4.3: {:?}",
        deferrals.iter().find(|r| r["dsn_status"] != "4.4.3")
    );
    for p in &phases {
        eprintln!("{p}");
    }
    node.shutdown().await;
}

/// A domain's route is kept only as long as its MX answer's TTL (one second here): once it runs
/// out, a domain that moved to another MX host is sent there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_route_is_kept_for_its_ttl_and_then_looked_up_again() {
    let sink = Sink::start(SinkOptions::default()).await;
    let dns = Dns::start().await;
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = delivery_config(dir.path(), &sink);
    cfg.dns.nameservers = vec![dns.addr];
    cfg.delivery.smtp_port = sink.addr.port();
    let node = start(cfg).await;
    let addr = node.http_addr;

    let first = post_campaign(addr, spread("moving", 1, 2)).await;
    wait_counts(addr, &first, Duration::from_secs(30), |c| {
        c["delivered"].as_u64() == Some(2)
    })
    .await;
    assert!(connections_to(addr, "mx.moving0.test").await >= 1.0);

    dns.set(Mode::Moved);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let second = post_campaign(addr, spread("moving", 1, 2)).await;
    wait_counts(addr, &second, Duration::from_secs(30), |c| {
        c["delivered"].as_u64() == Some(2)
    })
    .await;
    assert!(
        connections_to(addr, "mx2.moving0.test").await >= 1.0,
        "the route outlived its TTL"
    );
    node.shutdown().await;
}
