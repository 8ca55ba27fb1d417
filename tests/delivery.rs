//! End-to-end delivery: campaigns posted over HTTP, delivered by the engine over real sockets to
//! in-process SMTP sinks on 127.0.0.1 (reached through static routes, so no DNS is involved).

use crate::common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::sink::{Sink, SinkOptions, self_signed_acceptor};
use common::{
    KEY, client, delivery_config, post_campaign, recipients, start, url, wait_counts, wait_log,
};
use serde_json::{Value, json};
use sluice::outbound::smtp::client::TlsMode;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delivers_with_pipelining_and_logs_each_attempt() {
    let sink = Sink::start(SinkOptions::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let node = start(delivery_config(dir.path(), &sink)).await;
    let id = post_campaign(node.http_addr, recipients(3)).await;
    let counts = wait_counts(node.http_addr, &id, Duration::from_secs(20), |c| {
        c["delivered"] == 3
    })
    .await;
    assert_eq!(counts["queued"], 0);
    let msgs = sink.messages();
    assert_eq!(msgs.len(), 3);
    let m = msgs
        .iter()
        .find(|m| m.rcpts == ["user1@sink.test"])
        .expect("user1's message");
    // VERP: bounce+<token>@<From domain>, the token naming this recipient's job.
    let token = m
        .mail_from
        .strip_prefix("bounce+")
        .and_then(|t| t.strip_suffix("@example.com"))
        .unwrap_or_else(|| panic!("VERP sender: {}", m.mail_from));
    let job = node
        .node
        .assembler
        .tokens()
        .verify(sluice::outbound::tokens::Purpose::Verp, token)
        .expect("the VERP token authenticates");
    assert_eq!(job.index, 1, "user1 is the campaign's second recipient");
    assert!(m.data.contains("Subject: Hello User 1\r\n"), "{}", m.data);
    assert!(
        m.data.contains("\r\n.dot line\r\n"),
        "dot-stuffing undone by the sink: {}",
        m.data
    );
    assert_eq!(
        sink.stats
            .pipelined
            .load(std::sync::atomic::Ordering::SeqCst),
        3,
        "MAIL, RCPT and DATA in one flight"
    );
    let log = wait_log(dir.path(), 3).await;
    assert_eq!(log.len(), 3);
    for r in &log {
        assert_eq!(r["type"], "d");
        assert_eq!(r["dsn_status"], "2.0.0");
        assert_eq!(r["reply_code"], 250);
        assert_eq!(r["mx_ip"], "127.0.0.1");
        assert_eq!(r["attempt"], 1);
        assert_eq!(r["campaign"], id.as_str());
    }
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_pipelining_commands_go_one_by_one() {
    let sink = Sink::start(SinkOptions {
        pipelining: false,
        ..SinkOptions::default()
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let node = start(delivery_config(dir.path(), &sink)).await;
    let id = post_campaign(node.http_addr, recipients(2)).await;
    wait_counts(node.http_addr, &id, Duration::from_secs(20), |c| {
        c["delivered"] == 2
    })
    .await;
    assert_eq!(
        sink.stats
            .pipelined
            .load(std::sync::atomic::Ordering::SeqCst),
        0
    );
    node.shutdown().await;
}

/// Waits until `n` domains have gone idle (no job queued, served, parked or held anywhere) and
/// evicts them; fails if that does not happen within 10 s or any job was returned twice.
async fn wait_evicted(node: &sluice::server::Running, n: usize) {
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut evicted = 0;
    loop {
        assert_eq!(node.node.scheduler.pin_underflows(), 0);
        evicted += node.node.scheduler.evict_idle(u64::MAX, 0);
        if evicted >= n {
            assert_eq!(evicted, n);
            return;
        }
        assert!(
            Instant::now() < deadline,
            "only {evicted} of {n} domains became idle"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deferred_then_delivered_and_bounced() {
    let rcpt = Arc::new(|rcpt: &str, seen: usize| {
        if rcpt.starts_with("later") && seen == 0 {
            "450 4.2.1 mailbox busy, try later".to_owned()
        } else if rcpt.starts_with("gone") {
            "550 5.1.1 no such user".to_owned()
        } else {
            "250 2.1.5 ok".to_owned()
        }
    });
    let sink = Sink::start(SinkOptions {
        rcpt,
        ..SinkOptions::default()
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let node = start(delivery_config(dir.path(), &sink)).await;
    let id = post_campaign(
        node.http_addr,
        vec![
            json!({"email": "later@sink.test", "vars": {"name": "L"}}),
            json!({"email": "gone@sink.test", "vars": {"name": "G"}}),
        ],
    )
    .await;
    let counts = wait_counts(node.http_addr, &id, Duration::from_secs(20), |c| {
        c["delivered"] == 1 && c["bounced"] == 1
    })
    .await;
    assert_eq!(counts["deferred"], 0);
    let log = wait_log(dir.path(), 3).await;
    let of = |who: &str| {
        log.iter()
            .filter(|r| r["recipient"] == who)
            .cloned()
            .collect::<Vec<_>>()
    };
    let later = of("later@sink.test");
    assert_eq!(later.len(), 2, "{later:?}");
    assert_eq!(
        (later[0]["type"].as_str(), later[0]["dsn_status"].as_str()),
        (Some("t"), Some("4.2.1"))
    );
    assert_eq!(later[0]["stage"], "RCPT");
    assert_eq!(
        (later[1]["type"].as_str(), later[1]["attempt"].as_u64()),
        (Some("d"), Some(2))
    );
    // Every job taken out was returned or released: the idle domain can be forgotten.
    wait_evicted(&node, 1).await;
    assert_eq!(node.node.scheduler.domain_count(), 0);
    let gone = of("gone@sink.test");
    assert_eq!(gone.len(), 1);
    assert_eq!(
        (gone[0]["type"].as_str(), gone[0]["dsn_status"].as_str()),
        (Some("b"), Some("5.1.1"))
    );
    assert_eq!(gone[0]["dsn_diag"], "no such user");

    // The final states survive a restart (outcomes reach the spool).
    node.shutdown().await;
    let mut cfg = delivery_config(dir.path(), &sink);
    cfg.delivery.enabled = false;
    let node = start(cfg).await;
    let counts = wait_counts(node.http_addr, &id, Duration::from_secs(5), |_| true).await;
    assert_eq!(
        (counts["delivered"].as_u64(), counts["bounced"].as_u64()),
        (Some(1), Some(1)),
        "{counts}"
    );
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_are_reused_up_to_the_rule() {
    let sink = Sink::start(SinkOptions::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = delivery_config(dir.path(), &sink);
    cfg.shaping.max_connections = 1;
    cfg.shaping.max_messages_per_connection = 10;
    let node = start(cfg).await;
    let id = post_campaign(node.http_addr, recipients(25)).await;
    wait_counts(node.http_addr, &id, Duration::from_secs(30), |c| {
        c["delivered"] == 25
    })
    .await;
    let connections = sink
        .stats
        .connections
        .load(std::sync::atomic::Ordering::SeqCst);
    assert!(
        connections <= 3,
        "25 messages at 10 per connection used {connections} connections"
    );
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_connections_holds() {
    let sink = Sink::start(SinkOptions {
        data_delay: Duration::from_millis(5),
        ..SinkOptions::default()
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = delivery_config(dir.path(), &sink);
    cfg.shaping.max_connections = 2;
    let node = start(cfg).await;
    let id = post_campaign(node.http_addr, recipients(200)).await;
    wait_counts(node.http_addr, &id, Duration::from_secs(60), |c| {
        c["delivered"] == 200
    })
    .await;
    let max_open = sink
        .stats
        .max_open
        .load(std::sync::atomic::Ordering::SeqCst);
    assert!(max_open <= 2, "{max_open} connections open at once");
    assert_eq!(max_open, 2, "both allowed connections were used");
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn starttls_opportunistic_succeeds_and_verify_defers() {
    let sink = Sink::start(SinkOptions {
        tls: Some(self_signed_acceptor()),
        ..SinkOptions::default()
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let node = start(delivery_config(dir.path(), &sink)).await;
    let id = post_campaign(node.http_addr, recipients(1)).await;
    wait_counts(node.http_addr, &id, Duration::from_secs(20), |c| {
        c["delivered"] == 1
    })
    .await;
    assert!(sink.messages()[0].tls, "the message went over TLS");
    let log = wait_log(dir.path(), 1).await;
    assert_eq!(log[0]["tls"], true);
    node.shutdown().await;

    let sink = Sink::start(SinkOptions {
        tls: Some(self_signed_acceptor()),
        ..SinkOptions::default()
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = delivery_config(dir.path(), &sink);
    cfg.shaping.tls = TlsMode::Verify;
    let node = start(cfg).await;
    let id = post_campaign(node.http_addr, recipients(1)).await;
    wait_counts(node.http_addr, &id, Duration::from_secs(20), |c| {
        c["deferred"] == 1
    })
    .await;
    let log = wait_log(dir.path(), 1).await;
    assert_eq!(log[0]["type"], "t");
    // A certificate refused is a cryptographic failure (4.7.5); no TLS at all would be 4.7.10.
    assert_eq!(log[0]["dsn_status"], "4.7.5", "{:?}", log[0]);
    assert!(
        log[0]["dsn_diag"]
            .as_str()
            .is_some_and(|d| d.contains("certificate was refused")),
        "{:?}",
        log[0]
    );
    assert!(
        sink.messages().is_empty(),
        "nothing was sent without a verified certificate"
    );
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paused_campaigns_wait_and_cancelled_ones_are_never_sent() {
    let sink = Sink::start(SinkOptions::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let node = start(delivery_config(dir.path(), &sink)).await;
    // Create paused: post, then pause before the engine gets to it is racy, so pause an empty
    // campaign and add recipients to it.
    let id = post_campaign(node.http_addr, vec![]).await;
    let c = client();
    let r = c
        .post(url(node.http_addr, &format!("/v1/campaigns/{id}/pause")))
        .bearer_auth(KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let body: String = recipients(5).iter().map(|v| format!("{v}\n")).collect();
    let r = c
        .post(url(
            node.http_addr,
            &format!("/v1/campaigns/{id}/recipients"),
        ))
        .bearer_auth(KEY)
        .header("content-type", "application/x-ndjson")
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        sink.messages().is_empty(),
        "a paused campaign sends nothing"
    );
    let r = c
        .post(url(node.http_addr, &format!("/v1/campaigns/{id}/resume")))
        .bearer_auth(KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    wait_counts(node.http_addr, &id, Duration::from_secs(20), |c| {
        c["delivered"] == 5
    })
    .await;

    // Cancelled while paused: its recipients are never sent, and the counts say so.
    let id = post_campaign(node.http_addr, vec![]).await;
    c.post(url(node.http_addr, &format!("/v1/campaigns/{id}/pause")))
        .bearer_auth(KEY)
        .send()
        .await
        .unwrap();
    let body: String = (0..3)
        .map(|i| format!("{{\"email\":\"late{i}@sink.test\",\"vars\":{{\"name\":\"x\"}}}}\n"))
        .collect();
    c.post(url(
        node.http_addr,
        &format!("/v1/campaigns/{id}/recipients"),
    ))
    .bearer_auth(KEY)
    .header("content-type", "application/x-ndjson")
    .body(body)
    .send()
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    c.post(url(node.http_addr, &format!("/v1/campaigns/{id}/cancel")))
        .bearer_auth(KEY)
        .send()
        .await
        .unwrap();
    let counts = wait_counts(node.http_addr, &id, Duration::from_secs(5), |c| {
        c["cancelled"] == 3
    })
    .await;
    assert_eq!(counts["queued"], 0);
    // Parked, resumed and cancelled jobs are all accounted for: once the engine has dropped the
    // cancelled ones, the domain is idle and can be forgotten.
    wait_evicted(&node, 1).await;
    assert_eq!(
        sink.messages().len(),
        5,
        "nothing of the cancelled campaign was sent"
    );
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn message_rate_holds_at_the_sink() {
    let sink = Sink::start(SinkOptions::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = delivery_config(dir.path(), &sink);
    cfg.shaping.message_rate = Some(sluice::config::Rate::parse("100/s").unwrap());
    cfg.shaping.max_connections = 4;
    let node = start(cfg).await;
    let id = post_campaign(node.http_addr, recipients(1500)).await;
    // Count what the sink received over 10 s, starting at the first delivery.
    let started = Instant::now();
    while sink.messages().is_empty() {
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "nothing delivered"
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let first = sink.messages().len();
    tokio::time::sleep(Duration::from_secs(10)).await;
    let received = sink.messages().len() - first;
    assert!(
        (900..=1100).contains(&received),
        "100/s for 10 s delivered {received}"
    );
    let c = client();
    c.post(url(node.http_addr, &format!("/v1/campaigns/{id}/cancel")))
        .bearer_auth(KEY)
        .send()
        .await
        .unwrap();
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn suspended_domains_wait_until_resumed() {
    let sink = Sink::start(SinkOptions::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let node = start(delivery_config(dir.path(), &sink)).await;
    let c = client();
    let r = c
        .post(url(node.http_addr, "/v1/domains/SINK.test/suspend"))
        .bearer_auth(KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.json::<Value>().await.unwrap()["domain"], "sink.test");
    let id = post_campaign(node.http_addr, recipients(3)).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        sink.messages().is_empty(),
        "a suspended domain gets nothing"
    );
    let r = c
        .post(url(node.http_addr, "/v1/domains/sink.test/resume"))
        .bearer_auth(KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(r.json::<Value>().await.unwrap()["queued"], 3);
    wait_counts(node.http_addr, &id, Duration::from_secs(20), |c| {
        c["delivered"] == 3
    })
    .await;
    let r = c
        .post(url(node.http_addr, "/v1/domains/not_a_domain/suspend"))
        .bearer_auth(KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 422);
    node.shutdown().await;
}
