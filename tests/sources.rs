//! Egress sources and pools: mail leaves from the pool's source addresses in proportion to
//! their weights, each with its own EHLO name, and an unknown pool is refused.

use crate::common;

use std::collections::HashMap;
use std::time::Duration;

use common::sink::{Sink, SinkOptions};
use common::{delivery_config, post_json};
use serde_json::{Value, json};
use sluice::config::{PoolConfig, PoolMember};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pool_spreads_mail_over_its_sources_by_weight() {
    let sink = Sink::start(SinkOptions::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = delivery_config(dir.path(), &sink);
    cfg.sources = vec![
        common::egress_source("one", "127.0.0.21"),
        common::egress_source("two", "127.0.0.22"),
        common::egress_source("three", "127.0.0.23"),
    ];
    let member = |s: &str, weight| PoolMember {
        source: s.into(),
        weight,
    };
    cfg.pools = vec![PoolConfig {
        name: "spread".into(),
        sources: vec![member("one", 2), member("two", 1), member("three", 1)],
        overflow: None,
    }];
    let node = common::start(cfg).await;
    let addr = node.http_addr;

    let (status, got) = post_json(
        addr,
        "/v1/campaigns",
        &json!({"from": "news@example.com", "subject": "Hi", "text": "Hi.\n", "pool": "cold",
                "recipients": [{"email": "a@sink.test"}]}),
    )
    .await;
    assert_eq!(status, 422, "{got}");
    assert_eq!(got["error"]["field"], "pool", "{got}");

    const N: usize = 4000;
    let recipients: Vec<Value> = (0..N)
        .map(|i| json!({"email": format!("u{i}@sink.test"), "vars": {"n": i}}))
        .collect();
    let (status, got) = post_json(
        addr,
        "/v1/campaigns",
        &json!({"from": "news@example.com", "subject": "Hi {{ n }}", "text": "Hello {{ n }}.\n",
                "pool": "spread", "recipients": recipients}),
    )
    .await;
    assert_eq!(status, 202, "{got}");
    let id = got["id"].as_str().unwrap().to_owned();
    common::wait_counts(addr, &id, Duration::from_secs(120), |c| c["delivered"] == N).await;
    let (_, c) = common::get_json(addr, &format!("/v1/campaigns/{id}")).await;
    assert_eq!(c["pool"], "spread", "{c}");
    // Each delivery's log record names its source and pool.
    let log = common::wait_log_kind(dir.path(), "d", N).await;
    let delivered: Vec<&Value> = log.iter().filter(|r| r["type"] == "d").collect();
    assert_eq!(delivered.len(), N);
    for r in delivered {
        assert_eq!(r["pool"], "spread", "{r}");
        assert!(
            ["one", "two", "three"].contains(&r["source"].as_str().unwrap_or("")),
            "{r}"
        );
    }

    let mut by_peer: HashMap<String, usize> = HashMap::new();
    for m in sink.messages() {
        let expected = match m.peer.to_string().as_str() {
            "127.0.0.21" => "one.mta.test",
            "127.0.0.22" => "two.mta.test",
            "127.0.0.23" => "three.mta.test",
            other => panic!("a message came from {other}, not a source"),
        };
        assert_eq!(m.ehlo, expected, "the EHLO name is the source's");
        *by_peer.entry(m.peer.to_string()).or_default() += 1;
    }
    let share = |ip: &str| by_peer.get(ip).copied().unwrap_or(0) as f64 / N as f64;
    let shares = [
        share("127.0.0.21"),
        share("127.0.0.22"),
        share("127.0.0.23"),
    ];
    println!("shares of 4,000 messages by source address (2:1:1): {shares:.3?}");
    for (got, want) in shares.iter().zip([0.5, 0.25, 0.25]) {
        assert!((got - want).abs() <= 0.05, "{shares:?}");
    }

    // Mail without a pool goes through the default pool: every source, weight 1.
    let before = sink.messages().len();
    let (status, got) = post_json(
        addr,
        "/v1/messages",
        &json!({"from": "a@example.com", "to": "x@sink.test", "subject": "One", "text": "x\n"}),
    )
    .await;
    assert_eq!(status, 202, "{got}");
    for _ in 0..500 {
        if sink.messages().len() > before {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let last = sink.messages().pop().expect("the message arrived");
    assert!(last.ehlo.ends_with(".mta.test"), "{}", last.ehlo);
    node.shutdown().await;
}
