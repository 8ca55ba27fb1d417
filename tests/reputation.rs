//! Sending reputation against SMTP sinks that see each connection's client address: a provider
//! reply that suspends one source (and the action's life: listed, kept across a restart,
//! lifted), warm-up caps with and without an overflow pool, and a dead site whose mail waits
//! without attempts.

use crate::common;

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use common::sink::{Sink, SinkOptions};
use common::{delivery_config, get_json, post_json};
use serde_json::{Value, json};
use sluice::config::{PoolConfig, PoolMember, Route, SourceConfig, WarmupConfig};

fn pool(name: &str, members: &[&str], overflow: Option<&str>) -> PoolConfig {
    PoolConfig {
        name: name.into(),
        sources: members
            .iter()
            .map(|m| PoolMember {
                source: (*m).into(),
                weight: 1,
            })
            .collect(),
        overflow: overflow.map(str::to_owned),
    }
}

/// A personalised campaign of `n` recipients at `domain` through `pool`.
fn campaign(domain: &str, n: usize, pool: Option<&str>) -> Value {
    let recipients: Vec<Value> = (0..n)
        .map(|i| json!({"email": format!("u{i}@{domain}"), "vars": {"n": i}}))
        .collect();
    let mut body = json!({"from": "news@example.com", "subject": "Hi {{ n }}",
                          "text": "Hello {{ n }}.\n", "recipients": recipients});
    if let Some(p) = pool {
        body["pool"] = json!(p);
    }
    body
}

async fn post(addr: std::net::SocketAddr, body: &Value) -> String {
    let (status, got) = post_json(addr, "/v1/campaigns", body).await;
    assert_eq!(status, 202, "{got}");
    got["id"].as_str().unwrap().to_owned()
}

fn by_peer(sink: &Sink) -> HashMap<IpAddr, usize> {
    let mut m = HashMap::new();
    for c in sink.messages() {
        *m.entry(c.peer).or_default() += 1;
    }
    m
}

async fn delete(addr: std::net::SocketAddr, path: &str) -> (u16, Value) {
    let r = common::client()
        .delete(common::url(addr, path))
        .bearer_auth(common::KEY)
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

const TSS04: &str = "421 4.7.0 [TSS04] Messages from 127.0.0.32 temporarily deferred due to unexpected volume or user complaints - 4.16.55.1; see https://postmaster.yahooinc.com/error-codes";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_yahoo_tss04_suspends_one_source_and_the_others_take_its_share() {
    let refusing = Arc::new(AtomicBool::new(true));
    let r = Arc::clone(&refusing);
    let sink = Sink::start(SinkOptions {
        greeting: Some(Arc::new(move |peer: IpAddr| {
            (r.load(Ordering::SeqCst) && peer.to_string() == "127.0.0.32").then(|| TSS04.into())
        })),
        ..SinkOptions::default()
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = delivery_config(dir.path(), &sink);
    // yahoo.com goes to the sink: the site is of the yahoo provider group by its domain.
    cfg.routes.push(Route {
        domain: "yahoo.com".into(),
        relay: sink.addr.to_string(),
    });
    cfg.sources = vec![
        common::egress_source("one", "127.0.0.31"),
        common::egress_source("two", "127.0.0.32"),
        common::egress_source("three", "127.0.0.33"),
    ];
    let node = common::start(cfg.clone()).await;
    let addr = node.http_addr;

    const N: usize = 600;
    let id = post(addr, &campaign("yahoo.com", N, None)).await;
    let counts =
        common::wait_counts(addr, &id, Duration::from_secs(60), |c| c["delivered"] == N).await;
    assert_eq!(counts["bounced"], 0, "{counts}");
    let peers = by_peer(&sink);
    let from = |ip: &str| {
        peers
            .get(&ip.parse::<IpAddr>().unwrap())
            .copied()
            .unwrap_or(0)
    };
    println!(
        "TSS04 for 127.0.0.32: delivered from .31 {}, .32 {}, .33 {}; connections from .32: {:?}",
        from("127.0.0.31"),
        from("127.0.0.32"),
        from("127.0.0.33"),
        sink.stats
            .connections_by_peer
            .lock()
            .unwrap()
            .get(&"127.0.0.32".parse::<IpAddr>().unwrap())
    );
    assert_eq!(from("127.0.0.32"), 0);
    assert_eq!(from("127.0.0.31") + from("127.0.0.33"), N);
    // The other two share the suspended source's part evenly.
    let share = from("127.0.0.31") as f64 / N as f64;
    assert!((0.4..=0.6).contains(&share), "{share}");
    // Suspended at its first refusal: a source opens one connection to a site until one has
    // worked (slow start), so the site saw one attempt from it.
    let tried = sink
        .stats
        .connections_by_peer
        .lock()
        .unwrap()
        .get(&"127.0.0.32".parse::<IpAddr>().unwrap())
        .copied()
        .unwrap_or(0);
    assert_eq!(tried, 1, "connections from the suspended source");

    let (status, got) = get_json(addr, "/v1/shaping").await;
    assert_eq!(status, 200, "{got}");
    let actions = got["actions"].as_array().unwrap();
    assert_eq!(actions.len(), 1, "{got}");
    let a = &actions[0];
    assert_eq!(a["rule"], "yahoo-tss04", "{a}");
    assert_eq!(a["kind"], "suspend", "{a}");
    assert_eq!(a["source"], "two", "{a}");
    assert_eq!(a["provider"], "yahoo", "{a}");
    assert!(a["reply"].as_str().unwrap().contains("[TSS04]"), "{a}");
    let action_id = a["id"].as_str().unwrap().to_owned();
    let (_, sources) = get_json(addr, "/v1/sources").await;
    assert_eq!(sources["sources"][1]["actions"], 1, "{sources}");
    let text = common::metrics(addr).await;
    assert_eq!(
        common::metric_value(
            &text,
            "sluice_shaping_triggers_total",
            "kind=\"suspend\",rule=\"yahoo-tss04\",source=\"two\""
        ),
        Some(1.0),
        "{text}"
    );

    // The action survives a restart.
    node.shutdown().await;
    let node = common::start(cfg.clone()).await;
    let addr = node.http_addr;
    let (_, got) = get_json(addr, "/v1/shaping").await;
    assert_eq!(got["actions"][0]["id"], action_id.as_str(), "{got}");

    // Lifted, the source sends again.
    refusing.store(false, Ordering::SeqCst);
    let (status, got) = delete(addr, "/v1/shaping/nope").await;
    assert_eq!(status, 404, "{got}");
    assert_eq!(got["error"]["field"], "id", "{got}");
    let (status, got) = delete(addr, &format!("/v1/shaping/{action_id}")).await;
    assert_eq!(status, 200, "{got}");
    assert_eq!(got["lifted"]["rule"], "yahoo-tss04", "{got}");
    let (_, got) = get_json(addr, "/v1/shaping").await;
    assert_eq!(got["actions"].as_array().unwrap().len(), 0, "{got}");
    let before = from("127.0.0.32");
    let id = post(addr, &campaign("yahoo.com", 90, None)).await;
    common::wait_counts(addr, &id, Duration::from_secs(30), |c| c["delivered"] == 90).await;
    let after = by_peer(&sink)
        .get(&"127.0.0.32".parse::<IpAddr>().unwrap())
        .copied()
        .unwrap_or(0);
    assert!(
        after - before >= 15,
        "{} from .32 after the lift",
        after - before
    );
    node.shutdown().await;
}

/// Seconds to the next clock hour.
fn to_next_hour() -> u64 {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    3600 - now % 3600
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn warm_up_caps_send_the_rest_through_the_overflow_pool_or_make_it_wait() {
    // The caps count per clock hour: keep clear of the turn of the hour.
    if to_next_hour() < 90 {
        tokio::time::sleep(Duration::from_secs(to_next_hour() + 2)).await;
    }
    let sink = Sink::start(SinkOptions::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = delivery_config(dir.path(), &sink);
    let today = time_date(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs(),
    );
    let warming = |name: &str, address: &str| SourceConfig {
        warmup: Some("hundred".into()),
        warmup_start: Some(today.clone()),
        ..common::egress_source(name, address)
    };
    cfg.sources = vec![
        warming("cold", "127.0.0.41"),
        common::egress_source("warm", "127.0.0.42"),
        warming("cold2", "127.0.0.43"),
    ];
    cfg.pools = vec![
        pool("new", &["cold"], Some("established")),
        pool("established", &["warm"], None),
        pool("patient", &["cold2"], None),
    ];
    cfg.warmups = vec![WarmupConfig {
        name: "hundred".into(),
        per_day: vec![1000, 5000],
        per_hour: vec![100, 500],
        ramp: None,
        spread_hours: 12,
        hour: Duration::from_secs(3600),
        day: Duration::from_secs(86_400),
    }];
    let node = common::start(cfg.clone()).await;
    let addr = node.http_addr;

    // With overflow: 100 through the warming source, the rest through the warm pool.
    let id = post(addr, &campaign("sink.test", 500, Some("new"))).await;
    common::wait_counts(addr, &id, Duration::from_secs(60), |c| {
        c["delivered"] == 500
    })
    .await;
    let peers = by_peer(&sink);
    let from = |p: &HashMap<IpAddr, usize>, ip: &str| {
        p.get(&ip.parse::<IpAddr>().unwrap()).copied().unwrap_or(0)
    };
    println!(
        "warm-up 100/h with overflow: {} from the warming source, {} through the overflow pool",
        from(&peers, "127.0.0.41"),
        from(&peers, "127.0.0.42")
    );
    assert_eq!(from(&peers, "127.0.0.41"), 100);
    assert_eq!(from(&peers, "127.0.0.42"), 400);

    // Without: 100 go, 400 wait for the next hour.
    let id = post(addr, &campaign("sink.test", 500, Some("patient"))).await;
    common::wait_counts(addr, &id, Duration::from_secs(60), |c| {
        c["delivered"] == 100
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (_, c) = get_json(addr, &format!("/v1/campaigns/{id}")).await;
    assert_eq!(c["counts"]["delivered"], 100, "{c}");
    assert_eq!(c["counts"]["queued"], 400, "{c}");
    let next = c["queue"]["next_attempt_at"].as_str().unwrap_or("");
    let hour = {
        let secs = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs();
        secs - secs % 3600 + 3600
    };
    let expected = time::OffsetDateTime::from_unix_timestamp(hour as i64).unwrap();
    let got = time::OffsetDateTime::parse(next, &time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|e| panic!("{next:?}: {e} in {c}"));
    assert_eq!(
        got, expected,
        "the waiting mail is due at the next hour: {c}"
    );
    let (_, s) = get_json(addr, "/v1/sources").await;
    let cold2 = &s["sources"][2]["warmup"];
    assert_eq!(cold2["schedule"], "hundred", "{s}");
    assert_eq!(cold2["day"], 1, "{s}");
    assert_eq!(cold2["groups"][0]["sent_this_hour"], 100, "{s}");

    // The counts survive a restart: nothing more goes out this hour.
    node.shutdown().await;
    let node = common::start(cfg).await;
    let addr = node.http_addr;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (_, c) = get_json(addr, &format!("/v1/campaigns/{id}")).await;
    assert_eq!(c["counts"]["delivered"], 100, "{c}");
    let (_, s) = get_json(addr, "/v1/sources").await;
    assert_eq!(
        s["sources"][2]["warmup"]["groups"][0]["sent_this_hour"], 100,
        "{s}"
    );
    node.shutdown().await;
}

/// `YYYY-MM-DD` (UTC) of a Unix time.
fn time_date(secs: u64) -> String {
    let t = time::OffsetDateTime::from_unix_timestamp(secs as i64).unwrap();
    format!("{:04}-{:02}-{:02}", t.year(), u8::from(t.month()), t.day())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_site_waits_without_attempts_and_resumes() {
    // A port nothing listens on, where a sink starts later.
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let placeholder = Sink::start(SinkOptions::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = delivery_config(dir.path(), &placeholder);
    cfg.routes.push(Route {
        domain: "dead.test".into(),
        relay: format!("127.0.0.1:{port}"),
    });
    cfg.delivery.site_backoff = Duration::from_millis(100);
    cfg.delivery.dead_site_after = 3;
    cfg.delivery.dead_site_period = Duration::from_secs(4);
    let node = common::start(cfg).await;
    let addr = node.http_addr;

    let id = post(addr, &campaign("dead.test", 50, None)).await;
    // Dead after three failed rounds.
    let mut dead = false;
    for _ in 0..200 {
        let (_, d) = get_json(addr, "/v1/domains").await;
        if d["sites"]
            .as_array()
            .unwrap()
            .iter()
            .any(|s| s["site"] == format!("relay:127.0.0.1:{port}") && s["state"] == "dead")
        {
            dead = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(dead, "the site was never marked dead");
    let failed = |text: &str| {
        common::metric_value(
            text,
            "sluice_smtp_connections_total",
            &format!("result=\"failed\",site=\"relay:127.0.0.1:{port}\""),
        )
        .unwrap_or(0.0)
    };
    let at_death = failed(&common::metrics(addr).await);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let later = failed(&common::metrics(addr).await);
    assert_eq!(
        at_death, later,
        "no connection is tried while the site is dead"
    );
    let (_, c) = get_json(addr, &format!("/v1/campaigns/{id}")).await;
    let counts = &c["counts"];
    assert_eq!(counts["bounced"], 0, "{c}");
    assert_eq!(counts["expired"], 0, "{c}");
    assert_eq!(counts["delivered"], 0, "{c}");
    // Two rounds deferred a batch each; the third made the site dead and deferred nothing.
    let attempted: u64 = common::log_records(dir.path())
        .iter()
        .filter(|r| r["type"] == "t")
        .count() as u64;
    assert!(
        attempted <= 2 * 32,
        "{attempted} deferrals: the dead round burnt attempts"
    );

    // The site comes back: its mail goes after the dead period.
    let sink = Sink::start(SinkOptions {
        listen: Some(([127, 0, 0, 1], port).into()),
        ..SinkOptions::default()
    })
    .await;
    let counts =
        common::wait_counts(addr, &id, Duration::from_secs(30), |c| c["delivered"] == 50).await;
    assert_eq!(counts["bounced"], 0, "{counts}");
    assert_eq!(sink.messages().len(), 50);
    node.shutdown().await;
}

/// The most connections a sink saw open at once while 200 messages went out from three
/// sources under a rule of two connections, counted `per`.
async fn max_open_with(per: sluice::config::Per) -> usize {
    let sink = Sink::start(SinkOptions {
        data_delay: Duration::from_millis(20),
        ..SinkOptions::default()
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = delivery_config(dir.path(), &sink);
    cfg.sources = vec![
        common::egress_source("one", "127.0.0.51"),
        common::egress_source("two", "127.0.0.52"),
        common::egress_source("three", "127.0.0.53"),
    ];
    cfg.rules.push(sluice::config::Rule {
        name: Some("sink".into()),
        pattern: "sink.test".into(),
        max_connections: Some(2),
        max_messages_per_connection: None,
        max_recipients_per_message: None,
        message_rate: None,
        connection_rate: None,
        tls: None,
        per: Some(per),
        scope: None,
        mta_sts: None,
        dane: None,
    });
    let node = common::start(cfg).await;
    let id = post(node.http_addr, &campaign("sink.test", 200, None)).await;
    common::wait_counts(node.http_addr, &id, Duration::from_secs(60), |c| {
        c["delivered"] == 200
    })
    .await;
    node.shutdown().await;
    sink.stats.max_open.load(Ordering::SeqCst)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rule_limits_count_per_source_unless_the_rule_says_per_site() {
    let per_source = max_open_with(sluice::config::Per::Source).await;
    let per_site = max_open_with(sluice::config::Per::Site).await;
    println!(
        "max_connections = 2, three sources: {per_source} open at once per source, {per_site} per site"
    );
    assert!(per_source > 2 && per_source <= 6, "{per_source}");
    assert!(per_site <= 2, "{per_site}");
}
