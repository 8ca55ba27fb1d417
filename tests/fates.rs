//! Every recipient's fate is an event: a campaign of 1,000 recipients, 100 of them suppressed at
//! ingest and 50 suppressed while queued, is cancelled halfway; the webhook receiver gets
//! exactly one final event per recipient, and the delivery log agrees. Recipients refused at
//! ingest get a `rejected` event each.

use crate::common;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::sink::{Sink, SinkOptions};
use common::{KEY, client, delivery_config, log_records, start, url, wait_counts};
use serde_json::{Value, json};

/// Final event types, one of which every accepted recipient must get exactly once.
const FINAL: [&str; 5] = ["delivered", "bounced", "expired", "suppressed", "cancelled"];

async fn suppress(addr: std::net::SocketAddr, address: &str) {
    let r = client()
        .put(url(addr, &format!("/v1/suppressions/{address}")))
        .bearer_auth(KEY)
        .json(&json!({"reason": "manual"}))
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success(), "{}", r.status());
}

/// Acceptance 3.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_recipient_gets_exactly_one_final_event() {
    let dir = tempfile::tempdir().unwrap();
    // One connection, 10 ms per message: about 100 a second, slow enough to cancel halfway.
    let sink = Sink::start(SinkOptions {
        data_delay: Duration::from_millis(10),
        ..SinkOptions::default()
    })
    .await;
    let events = Arc::new(Mutex::new(Vec::new()));
    let hook = common::event_receiver(Arc::clone(&events)).await;
    let mut cfg = delivery_config(dir.path(), &sink);
    cfg.shaping.max_connections = 1;
    cfg.webhooks.push(
        toml::from_str(&format!(
            "url = \"http://{hook}/hook\"\nsecret = \"webhook-secret-0123456789\"\nbatch_size = 200\n"
        ))
        .unwrap(),
    );
    let node = start(cfg).await;
    let addr = node.http_addr;

    // 100 recipients are on the list before the campaign.
    for i in 0..100 {
        suppress(addr, &format!("user{i}@sink.test")).await;
    }
    let mut list: Vec<Value> = (0..1000)
        .map(|i| json!({"email": format!("user{i}@sink.test"), "vars": {"name": "N"}}))
        .collect();
    list.push(json!({"email": "not an address"}));
    list.push(json!({"email": "bad\r\nline@sink.test"}));
    let r = client()
        .post(url(addr, "/v1/campaigns"))
        .bearer_auth(KEY)
        .json(
            &json!({"from": "news@example.com", "subject": "Hi {{ name }}", "text": "Hello",
                      "tags": ["fates"], "recipients": list}),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    let body: Value = r.json().await.unwrap();
    assert_eq!(
        (body["accepted"].as_u64(), body["rejected_count"].as_u64()),
        (Some(900), Some(2)),
        "{body}"
    );
    let id = body["id"].as_str().unwrap().to_owned();

    // 50 more are suppressed while queued, ahead of delivery (about 200 messages, 2 s).
    for i in 300..350 {
        suppress(addr, &format!("user{i}@sink.test")).await;
    }
    // Cancelled halfway, once delivery has passed the addresses suppressed while queued.
    wait_counts(addr, &id, Duration::from_secs(60), |c| {
        c["delivered"].as_u64() >= Some(400)
    })
    .await;
    let r = client()
        .post(url(addr, &format!("/v1/campaigns/{id}/cancel")))
        .bearer_auth(KEY)
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success());

    // Every recipient reaches a final event.
    let started = Instant::now();
    let finals = loop {
        let finals: Vec<Value> = events
            .lock()
            .unwrap()
            .iter()
            .filter(|e| FINAL.contains(&e["event"].as_str().unwrap_or("")))
            .cloned()
            .collect();
        if finals.len() >= 1000 {
            break finals;
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "only {} final events",
            finals.len()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    // A moment for anything extra to show up.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let all = events.lock().unwrap().clone();
    let mut per_recipient: HashMap<String, Vec<String>> = HashMap::new();
    let mut by_type: HashMap<String, usize> = HashMap::new();
    for e in all
        .iter()
        .filter(|e| FINAL.contains(&e["event"].as_str().unwrap_or("")))
    {
        per_recipient
            .entry(e["recipient"].as_str().unwrap().to_owned())
            .or_default()
            .push(e["event"].as_str().unwrap().to_owned());
        *by_type
            .entry(e["event"].as_str().unwrap().to_owned())
            .or_default() += 1;
        assert_eq!(e["campaign"], id.as_str(), "{e}");
        assert_eq!(e["tags"], json!(["fates"]), "{e}");
    }
    assert_eq!(finals.len(), 1000);
    assert_eq!(per_recipient.len(), 1000, "a recipient is missing");
    let twice: Vec<_> = per_recipient.iter().filter(|(_, v)| v.len() != 1).collect();
    assert!(twice.is_empty(), "more than one final event: {twice:?}");
    assert_eq!(by_type.get("suppressed"), Some(&150), "{by_type:?}");
    let delivered = by_type.get("delivered").copied().unwrap_or(0);
    let cancelled = by_type.get("cancelled").copied().unwrap_or(0);
    assert_eq!(delivered + cancelled, 850, "{by_type:?}");
    assert!(cancelled > 0 && delivered >= 400, "{by_type:?}");
    for i in (0..100).chain(300..350) {
        assert_eq!(
            per_recipient[&format!("user{i}@sink.test")],
            vec!["suppressed".to_owned()]
        );
    }
    let rejected: Vec<&Value> = all.iter().filter(|e| e["event"] == "rejected").collect();
    assert_eq!(rejected.len(), 2, "{rejected:?}");
    assert!(
        rejected
            .iter()
            .all(|e| e["job"] == "" && e["campaign"] == id.as_str())
    );

    // The campaign's counts and the delivery log say the same.
    let (_, c) = common::get_json(addr, &format!("/v1/campaigns/{id}")).await;
    assert_eq!(c["counts"]["suppressed"], 150, "{c}");
    assert_eq!(c["counts"]["delivered"], delivered, "{c}");
    assert_eq!(c["counts"]["cancelled"], cancelled, "{c}");
    node.shutdown().await;
    let log = log_records(dir.path());
    let mut logged: HashMap<&str, usize> = HashMap::new();
    for r in &log {
        *logged.entry(r["type"].as_str().unwrap()).or_default() += 1;
    }
    assert_eq!(
        (
            logged.get("d"),
            logged.get("s"),
            logged.get("c"),
            logged.get("r")
        ),
        (Some(&delivered), Some(&150), Some(&cancelled), Some(&2)),
        "{logged:?}"
    );
}
