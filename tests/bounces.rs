//! Bounces end to end: synchronous 5xx replies classified and suppressed, soft failures retried;
//! asynchronous DSNs and ARF reports over SMTP to the inbound listener and over HTTP.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::sink::{Sink, SinkOptions};
use common::{
    KEY, client, delivery_config, log_records, post_campaign, recipients, start, url, wait_counts,
};
use serde_json::{Value, json};

async fn get(addr: std::net::SocketAddr, path: &str) -> (u16, Value) {
    let r = client()
        .get(url(addr, path))
        .bearer_auth(KEY)
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

/// `n` of `<user{n}@sink.test>` (the sink hands over the address in angle brackets or bare).
fn index_of(rcpt: &str) -> usize {
    rcpt.trim_start_matches('<')
        .trim_start_matches("user")
        .split('@')
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or(usize::MAX)
}

/// Acceptance 1: one MX answers 550 5.1.1 for a tenth of 1,000 recipients.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hard_bounces_are_suppressed_and_skipped_by_the_next_campaign() {
    let rcpt = Arc::new(|rcpt: &str, _seen: usize| {
        if index_of(rcpt).is_multiple_of(10) {
            "550 5.1.1 <user> no such user here".to_owned()
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
    let addr = node.http_addr;
    let first = post_campaign(addr, recipients(1000)).await;
    let counts = wait_counts(addr, &first, Duration::from_secs(60), |c| {
        c["delivered"] == 900 && c["bounced"] == 100
    })
    .await;
    assert_eq!(counts["deferred"], 0, "{counts}");

    let (status, entry) = get(addr, "/v1/suppressions/user10@sink.test").await;
    assert_eq!(status, 200, "{entry}");
    let e = &entry["entries"][0];
    assert_eq!(e["reason"], "hard_bounce", "{entry}");
    assert_eq!(e["category"], "bad-mailbox", "{entry}");
    assert_eq!(e["scope"], "*");
    assert_eq!(e["campaign"], first.as_str());
    assert!(
        e["detail"].as_str().unwrap().starts_with("550 5.1.1"),
        "{entry}"
    );
    let (_, delivered) = get(addr, "/v1/suppressions/user11@sink.test").await;
    assert!(delivered["entries"].is_null(), "{delivered}");
    let (_, page) = get(addr, "/v1/suppressions?reason=hard_bounce&limit=1000").await;
    assert_eq!(page["items"].as_array().unwrap().len(), 100);
    let bounced: Vec<Value> = log_records(dir.path())
        .into_iter()
        .filter(|r| r["type"] == "b")
        .collect();
    assert_eq!(bounced.len(), 100);
    assert!(bounced.iter().all(|r| r["bounce_cat"] == "bad-mailbox"));

    // The same list again: the bounced tenth is reported suppressed and never sent to.
    let sent_before = sink.messages().len();
    let r = client()
        .post(url(addr, "/v1/campaigns"))
        .bearer_auth(KEY)
        .json(
            &json!({"from": "news@example.com", "subject": "Again", "text": "Hi {{ name }}.",
                      "recipients": recipients(1000)}),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["accepted"], 900, "{body}");
    assert_eq!(body["suppressed_count"], 100, "{body}");
    let suppressed = body["suppressed"].as_array().unwrap();
    assert!(
        suppressed
            .iter()
            .all(|s| s["reason"] == "hard_bounce" && s["index"].as_u64().unwrap() % 10 == 0),
        "{body}"
    );
    let second = body["id"].as_str().unwrap().to_owned();
    let counts = wait_counts(addr, &second, Duration::from_secs(60), |c| {
        c["delivered"] == 900
    })
    .await;
    assert_eq!(
        (counts["bounced"].as_u64(), counts["suppressed"].as_u64()),
        (Some(0), Some(100))
    );
    let again = &sink.messages()[sent_before..];
    assert_eq!(again.len(), 900);
    assert!(
        again
            .iter()
            .all(|m| !index_of(&m.rcpts[0]).is_multiple_of(10)),
        "a suppressed address got mail"
    );
    node.shutdown().await;
}

/// A 5xx of a soft category (a full mailbox) is retried, not bounced, and suppresses nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn soft_permanent_failures_follow_the_retry_schedule() {
    let rcpt = Arc::new(|_: &str, seen: usize| {
        if seen == 0 {
            "552 5.2.2 Mailbox full; Recipient's mailbox is full.".to_owned()
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
    let id = post_campaign(node.http_addr, recipients(3)).await;
    wait_counts(node.http_addr, &id, Duration::from_secs(20), |c| {
        c["delivered"] == 3
    })
    .await;
    let log = log_records(dir.path());
    let deferred: Vec<&Value> = log.iter().filter(|r| r["type"] == "t").collect();
    assert_eq!(deferred.len(), 3, "{log:?}");
    assert!(
        deferred
            .iter()
            .all(|r| r["bounce_cat"] == "quota-issues" && r["reply_code"] == 552)
    );
    assert!(node.node.suppressions.is_empty());
    node.shutdown().await;
}
