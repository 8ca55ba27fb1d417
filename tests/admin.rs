//! The operator's view: suspending and resuming a destination domain while others keep
//! flowing, and the per-site reports behind `GET /v1/domains`, `GET /v1/queue` and `/metrics`.

use crate::common;

use std::time::{Duration, Instant};

use common::sink::{Sink, SinkOptions};
use common::*;
use serde_json::{Value, json};
use sluice::config::Route;

fn two_domain_recipients(n: usize) -> Vec<Value> {
    (0..n)
        .flat_map(|i| {
            ["a.test", "b.test"]
                .map(|d| json!({"email": format!("user{i}@{d}"), "vars": {"name": "x"}}))
        })
        .collect()
}

fn count(sink: &Sink) -> usize {
    sink.stats.messages.lock().unwrap().len()
}

fn connections(sink: &Sink) -> usize {
    sink.stats
        .connections
        .load(std::sync::atomic::Ordering::SeqCst)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn suspending_a_domain_stops_it_within_a_second_while_others_flow() {
    let slow = SinkOptions {
        data_delay: Duration::from_millis(10),
        ..SinkOptions::default()
    };
    let (a, b) = (Sink::start(slow.clone()).await, Sink::start(slow).await);
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = delivery_config(dir.path(), &a);
    cfg.shaping.max_connections = 2;
    // Each connection carries a few messages only, so a site that keeps sending keeps opening.
    cfg.shaping.max_messages_per_connection = 5;
    for (domain, sink) in [("a.test", &a), ("b.test", &b)] {
        cfg.routes.push(Route {
            domain: domain.into(),
            relay: sink.addr.to_string(),
        });
    }
    let node = start(cfg).await;
    let addr = node.http_addr;
    let id = post_campaign(addr, two_domain_recipients(1000)).await;

    let started = Instant::now();
    while count(&a) < 20 {
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "a.test never started"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let (status, sites) = get_json(addr, "/v1/domains").await;
    assert_eq!(status, 200);
    let site_a = format!("relay:127.0.0.1:{}", a.addr.port());
    let site_b = format!("relay:127.0.0.1:{}", b.addr.port());
    let a_row = sites["sites"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["site"] == site_a.as_str())
        .unwrap_or_else(|| panic!("{site_a} not in {sites}"));
    assert_eq!(a_row["label"], site_a.as_str());
    assert_eq!(a_row["domains"], json!(["a.test"]));
    assert!(
        a_row["connections"]["open"].as_i64().unwrap() >= 1,
        "{a_row}"
    );
    assert_eq!(a_row["connections"]["max"], 2);
    assert!(
        a_row["last_reply"].as_str().unwrap().starts_with("250"),
        "{a_row}"
    );

    let c = client();
    let r = c
        .post(url(addr, "/v1/domains/a.test/suspend"))
        .bearer_auth(KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    // What was already in a sender's hands may finish; after a second nothing new starts.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (a_msgs, a_conns, b_msgs) = (count(&a), connections(&a), count(&b));
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(count(&a), a_msgs, "a.test kept receiving while suspended");
    assert_eq!(
        connections(&a),
        a_conns,
        "a.test got new connections while suspended"
    );
    assert!(
        count(&b) > b_msgs,
        "b.test stalled while a.test was suspended"
    );
    assert!(
        a_msgs < 1000,
        "a.test finished before the suspension took effect"
    );

    let (_, report) = get_json(addr, "/v1/domains").await;
    let a_dom = report["domains"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["domain"] == "a.test")
        .unwrap();
    assert_eq!(a_dom["suspended"], true);
    assert_eq!(a_dom["site"], site_a.as_str());
    assert_eq!(a_dom["queued"].as_u64().unwrap() as usize, 1000 - a_msgs);
    assert_eq!(report["suspended"], json!(["a.test"]));
    let (status, queue) = get_json(addr, "/v1/queue").await;
    assert_eq!(status, 200);
    assert_eq!(queue["suspended_domains"], 1);
    assert_eq!(queue["campaigns"]["active"], 1);
    assert!(queue["queued"].as_u64().unwrap() >= (1000 - a_msgs) as u64);

    let r = c
        .post(url(addr, "/v1/domains/a.test/resume"))
        .bearer_auth(KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    wait_counts(addr, &id, Duration::from_secs(60), |c| {
        c["delivered"] == 2000
    })
    .await;
    assert_eq!(count(&a), 1000);
    assert_eq!(count(&b), 1000);

    // The per-site metrics carry the site labels and agree with what the sinks saw.
    tokio::time::sleep(Duration::from_secs(6)).await;
    let text = metrics(addr).await;
    let value = |name: &str, labels: &str| -> f64 {
        metric_value(&text, name, labels)
            .unwrap_or_else(|| panic!("{name}{{{labels}}} not in /metrics"))
    };
    let site_label = format!("site=\"{site_b}\"");
    assert!(
        value(
            "sluice_delivery_attempts_total",
            &format!("{site_label},verdict=\"delivered\"")
        ) >= 1000.0
    );
    assert_eq!(value("sluice_site_queue_jobs", &site_label), 0.0);
    assert!(
        value(
            "sluice_smtp_replies_total",
            &format!("class=\"2xx\",{site_label}")
        ) >= 1000.0
    );
    assert!(value("sluice_smtp_connections_open", &site_label) <= 2.0);
    assert_eq!(value("sluice_smtp_connections_in_use", &site_label), 0.0);
    let (_, queue) = get_json(addr, "/v1/queue").await;
    assert_eq!(queue["queued"], 0);
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reports_without_delivery_list_domains_only() {
    let dir = tempfile::tempdir().unwrap();
    let node = start(config(dir.path())).await;
    let id = post_campaign(node.http_addr, recipients(5)).await;
    let (status, report) = get_json(node.http_addr, "/v1/domains").await;
    assert_eq!(status, 200);
    assert_eq!(report["domains"][0]["domain"], "sink.test");
    assert_eq!(report["domains"][0]["queued"], 5);
    assert_eq!(report["sites"][0]["site"], "unresolved");
    assert_eq!(report["sites"][0]["queued"], 5);
    assert!(
        report["sites"][0]["oldest_queued_seconds"]
            .as_f64()
            .unwrap()
            < 60.0
    );
    let (_, queue) = get_json(node.http_addr, "/v1/queue").await;
    assert_eq!(queue["queued"], 5);
    assert_eq!(queue["delivery"], false);
    let (_, list) = get_json(node.http_addr, "/v1/campaigns?limit=1").await;
    assert_eq!(list["campaigns"][0]["id"], id.as_str());
    assert_eq!(list["total"], 1);
    let (status, err) = get_json(node.http_addr, "/v1/domains?limit=0").await;
    assert_eq!(status, 422);
    assert_eq!(err["error"]["field"], "limit");
    node.shutdown().await;
}
