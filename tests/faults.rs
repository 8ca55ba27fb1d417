//! Receivers that misbehave, all at once in one campaign, each on its own destination: 421 and
//! close, 450/451/452 for a while, 550/552/554, the connection dropped after the final dot, a
//! slow DATA reply, a greeting that never comes. Every recipient must end in the state the
//! receiver's answers call for, deferred ones must go through once the fault clears, and a good
//! destination must not wait for the bad ones.

use crate::common;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::sink::{Sink, SinkOptions};
use common::*;
use serde_json::{Value, json};
use sluice::config::Route;

/// A sink whose RCPT replies come from `reply(times seen before)`.
async fn replying(reply: fn(usize) -> &'static str) -> Sink {
    Sink::start(SinkOptions {
        rcpt: Arc::new(move |_, prior| reply(prior).to_owned()),
        ..SinkOptions::default()
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_recipient_ends_as_its_receiver_said() {
    let ok = Sink::start(SinkOptions::default()).await;
    let sinks: Vec<(&str, Sink)> = vec![
        ("ok.test", Sink::start(SinkOptions::default()).await),
        // 421 at RCPT and the connection closed, once; then fine.
        (
            "close421.test",
            replying(|n| {
                if n == 0 {
                    "421 4.7.0 closing, try later"
                } else {
                    "250 2.1.5 ok"
                }
            })
            .await,
        ),
        (
            "busy450.test",
            replying(|n| {
                if n < 2 {
                    "450 4.2.1 mailbox busy"
                } else {
                    "250 2.1.5 ok"
                }
            })
            .await,
        ),
        (
            "local451.test",
            replying(|n| {
                if n == 0 {
                    "451 4.3.0 local error"
                } else {
                    "250 2.1.5 ok"
                }
            })
            .await,
        ),
        (
            "full452.test",
            replying(|n| {
                if n == 0 {
                    "452 4.2.2 over quota"
                } else {
                    "250 2.1.5 ok"
                }
            })
            .await,
        ),
        (
            "unknown550.test",
            replying(|_| "550 5.1.1 no such user").await,
        ),
        (
            "full552.test",
            replying(|n| {
                if n == 0 {
                    "552 5.2.2 mailbox full"
                } else {
                    "250 2.1.5 ok"
                }
            })
            .await,
        ),
        (
            "policy554.test",
            replying(|_| "554 5.7.1 rejected by policy").await,
        ),
        (
            "dropdot.test",
            Sink::start(SinkOptions {
                drop_after_dot: Some(Arc::new(|_, prior| prior == 0)),
                ..SinkOptions::default()
            })
            .await,
        ),
        (
            "slow.test",
            Sink::start(SinkOptions {
                data_delay: Duration::from_millis(1500),
                ..SinkOptions::default()
            })
            .await,
        ),
        (
            "silent.test",
            Sink::start(SinkOptions {
                silent: true,
                ..SinkOptions::default()
            })
            .await,
        ),
    ];
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = delivery_config(dir.path(), &ok);
    cfg.delivery.greeting_timeout = Duration::from_secs(1);
    cfg.delivery.command_timeout = Duration::from_secs(2);
    cfg.delivery.data_final_timeout = Duration::from_secs(3);
    cfg.delivery.retry_initial = Duration::from_millis(300);
    cfg.delivery.retry_max = Duration::from_millis(600);
    cfg.delivery.site_backoff = Duration::from_millis(300);
    cfg.delivery.site_backoff_max = Duration::from_millis(600);
    // Long enough for every fault above to clear, short enough for the permanent ones to expire.
    cfg.delivery.max_age = Duration::from_secs(12);
    // A dead site's mail waits out the dead period (minutes) before its expiry is noticed, and
    // a 421 slows the (source, site) down (AIMD); this test is about each reply's verdict and
    // attempts ending at max_age, so neither applies here.
    cfg.delivery.dead_site_after = 0;
    let rules = dir.path().join("shaping.toml");
    std::fs::write(
        &rules,
        "[aimd]\nenabled = false\ndecrease = 0.5\ninterval = \"10s\"\nstep = 0.1\nmin_rate = \"1/s\"\n",
    )
    .unwrap();
    cfg.delivery.shaping_rules = Some(rules);
    for (domain, sink) in &sinks {
        cfg.routes.push(Route {
            domain: (*domain).into(),
            relay: sink.addr.to_string(),
        });
    }
    let node = start(cfg).await;
    let addr = node.http_addr;
    let per_domain = 5;
    let list: Vec<Value> = sinks
        .iter()
        .flat_map(|(d, _)| {
            (0..per_domain)
                .map(move |i| json!({"email": format!("u{i}@{d}"), "vars": {"name": "x"}}))
        })
        .collect();
    let started = Instant::now();
    let id = post_campaign(addr, list).await;

    // The good destination is not held up by the bad ones.
    while sinks[0].1.messages().len() < per_domain {
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "ok.test waited behind the faults"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let ok_done = started.elapsed();

    let total = (sinks.len() * per_domain) as u64;
    let counts = wait_counts(addr, &id, Duration::from_secs(60), |c| {
        c["delivered"].as_u64().unwrap()
            + c["bounced"].as_u64().unwrap()
            + c["expired"].as_u64().unwrap()
            == total
    })
    .await;
    let log = log_records(dir.path());
    let mut last: HashMap<String, &Value> = HashMap::new();
    let mut attempts: HashMap<String, Vec<String>> = HashMap::new();
    for r in &log {
        let rcpt = r["recipient"].as_str().unwrap().to_owned();
        attempts.entry(rcpt.clone()).or_default().push(format!(
            "{} {}",
            r["type"].as_str().unwrap(),
            r["dsn_status"].as_str().unwrap()
        ));
        last.insert(rcpt, r);
    }
    let want: &[(&str, &str, &str)] = &[
        ("ok.test", "d", "delivered at once"),
        ("close421.test", "d", "deferred by 421, then delivered"),
        ("busy450.test", "d", "deferred twice, then delivered"),
        ("local451.test", "d", "deferred, then delivered"),
        ("full452.test", "d", "deferred, then delivered"),
        ("unknown550.test", "b", "bounced"),
        ("full552.test", "d", "a soft 5xx: retried, then delivered"),
        (
            "policy554.test",
            "x",
            "a policy 5xx: retried until it expired",
        ),
        (
            "dropdot.test",
            "d",
            "no reply to the dot: retried, delivered",
        ),
        ("slow.test", "d", "delivered, slowly"),
        ("silent.test", "x", "never greeted: expired"),
    ];
    for (domain, kind, what) in want {
        for i in 0..per_domain {
            let rcpt = format!("u{i}@{domain}");
            let r = last
                .get(&rcpt)
                .unwrap_or_else(|| panic!("{rcpt}: no log record"));
            assert_eq!(
                r["type"], *kind,
                "{rcpt} should be {what}; attempts: {:?}",
                attempts[&rcpt]
            );
        }
    }
    // Those that were deferred first say so in their log, with the receiver's status.
    for (domain, status) in [
        ("close421.test", "4.7.0"),
        ("busy450.test", "4.2.1"),
        ("local451.test", "4.3.0"),
        ("full452.test", "4.2.2"),
        ("full552.test", "5.2.2"),
    ] {
        let a = &attempts[&format!("u0@{domain}")];
        assert!(a[0] == format!("t {status}"), "{domain}: {a:?}");
    }
    assert!(attempts["u0@busy450.test"].len() >= 3);
    // Each message reached its receiver once (the dropped ones were not captured there).
    for (domain, sink) in &sinks {
        let expected = match *domain {
            "unknown550.test" | "policy554.test" | "silent.test" => 0,
            _ => per_domain,
        };
        assert_eq!(sink.messages().len(), expected, "{domain}");
    }
    assert_eq!(counts["bounced"], per_domain);
    assert_eq!(counts["expired"], 2 * per_domain);
    assert_eq!(counts["queued"], 0);
    eprintln!(
        "faults: ok.test done in {ok_done:?}; all {total} final in {:?}; {counts}",
        started.elapsed()
    );
    node.shutdown().await;
}
