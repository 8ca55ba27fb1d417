//! Message lookup: `GET /v1/messages/{id}` and `sluice message show` give a message's or a
//! campaign recipient's state and every attempt, fate and later report with its reply, until
//! retention deletes the tombstone (and the history with it).

use crate::common;

use std::sync::Arc;
use std::time::Duration;

use common::sink::{Sink, SinkOptions};
use common::{
    KEY, client, delivery_config, get_json, post_campaign, post_json, start, trace_token, url,
    wait_counts, wait_log_kind,
};
use serde_json::{Value, json};
use sluice::store::retention;
use sluice::store::spool::CF_HISTORY;

const DAY_MS: u64 = 86_400_000;

fn events(v: &Value) -> Vec<(String, Value)> {
    v["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["event"].as_str().unwrap().to_owned(),
                e["reply_code"].clone(),
            )
        })
        .collect()
}

/// The lookup of message `id` once `done` holds for it (within 10 s).
async fn wait_lookup(addr: std::net::SocketAddr, id: &str, done: impl Fn(&Value) -> bool) -> Value {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let (s, v) = get_json(addr, &format!("/v1/messages/{id}")).await;
        if s == 200 && done(&v) {
            return v;
        }
        assert!(std::time::Instant::now() < deadline, "{s}: {v}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn history_keys(node: &sluice::server::Running) -> usize {
    let n = Arc::clone(&node.node);
    tokio::task::spawn_blocking(move || n.spool.count_keys(CF_HISTORY).unwrap())
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_shows_every_attempt_and_later_report_until_retention() {
    let dir = tempfile::tempdir().unwrap();
    // The first attempt to each recipient is deferred, the second accepted.
    let sink = Sink::start(SinkOptions {
        rcpt: Arc::new(|_, seen| match seen {
            0 => "451 4.7.1 greylisted, try again".to_owned(),
            _ => "250 2.1.5 ok".to_owned(),
        }),
        ..SinkOptions::default()
    })
    .await;
    let mut cfg = delivery_config(dir.path(), &sink);
    cfg.retention.interval = Duration::from_secs(3600);
    cfg.bounce.domain = Some("bounces.example.com".into());
    cfg.bounce.feedback_addresses = vec!["fbl@bounces.example.com".into()];
    let node = start(cfg).await;
    let addr = node.http_addr;

    let (s, b) = post_json(
        addr,
        "/v1/messages",
        &json!({"from": "app@example.com", "subject": "Your receipt", "text": "Thanks.",
                "to": "buyer@sink.test", "stream": "receipts", "tags": ["receipt"]}),
    )
    .await;
    assert_eq!(s, 202, "{b}");
    let id = b["id"].as_str().unwrap().to_owned();
    let bucket = b["campaign"].as_str().unwrap().to_owned();
    let (s, v) = get_json(addr, &format!("/v1/messages/{id}")).await;
    assert_eq!(s, 200, "{v}");
    assert!(
        ["queued", "deferred", "delivered"].contains(&v["state"].as_str().unwrap()),
        "{v}"
    );
    wait_counts(addr, &bucket, Duration::from_secs(20), |c| {
        c["delivered"] == 1
    })
    .await;

    // The lookup reads the spool, which the outcome's write reaches a moment after the count.
    let v = wait_lookup(addr, &id, |v| v["state"] == "delivered").await;
    assert_eq!(
        (
            v["recipient"].as_str(),
            v["state"].as_str(),
            v["attempts"].as_u64()
        ),
        (Some("buyer@sink.test"), Some("delivered"), Some(2)),
        "{v}"
    );
    assert_eq!(
        (v["stream"].as_str(), v["subject"].as_str()),
        (Some("receipts"), Some("Your receipt"))
    );
    assert!(v["final_at"].is_string(), "{v}");
    assert_eq!(
        events(&v),
        [
            ("deferred".to_owned(), json!(451)),
            ("delivered".to_owned(), json!(250))
        ],
        "{v}"
    );
    assert!(
        v["events"][0]["dsn_diag"]
            .as_str()
            .unwrap()
            .contains("greylisted"),
        "{v}"
    );

    // A complaint days later joins the history.
    let m = sink.messages().pop().unwrap();
    let arf = std::fs::read_to_string(format!(
        "{}/tests/data/reports/arf-redacted.eml",
        env!("CARGO_MANIFEST_DIR")
    ))
    .unwrap();
    let (_, arf) = arf.split_once('\n').unwrap();
    let arf = arf
        .replace("{{VERP}}", &m.mail_from)
        .replace("{{RCPT}}", &m.rcpts[0])
        .replace("{{REF}}", &trace_token(&m.data))
        .replace("{{FEEDBACK}}", "fbl@bounces.example.com");
    let r = client()
        .post(url(addr, "/v1/feedback"))
        .bearer_auth(KEY)
        .header("content-type", "message/rfc822")
        .body(arf)
        .send()
        .await
        .unwrap();
    let p: Value = r.json().await.unwrap();
    assert_eq!(p["result"], "applied", "{p}");
    let (_, v) = get_json(addr, &format!("/v1/messages/{id}")).await;
    let names: Vec<String> = events(&v).into_iter().map(|(e, _)| e).collect();
    assert_eq!(names, ["deferred", "delivered", "complained"], "{v}");

    // A campaign recipient is looked up by the job id its events carry.
    let campaign = post_campaign(
        addr,
        vec![json!({"email": "reader@sink.test", "vars": {"name": "R"}})],
    )
    .await;
    wait_counts(addr, &campaign, Duration::from_secs(20), |c| {
        c["delivered"] == 1
    })
    .await;
    let log = wait_log_kind(dir.path(), "d", 2).await;
    let job = log
        .iter()
        .find(|r| r["type"] == "d" && r["campaign"] == campaign.as_str())
        .unwrap()["job"]
        .as_str()
        .unwrap()
        .to_owned();
    let v = wait_lookup(addr, &job, |v| v["state"] == "delivered").await;
    assert_eq!(
        (
            v["kind"].as_str(),
            v["state"].as_str(),
            v["campaign"].as_str()
        ),
        (Some("bulk"), Some("delivered"), Some(campaign.as_str()))
    );

    // The CLI prints the same lookup.
    let out = tokio::task::spawn_blocking({
        let id = id.clone();
        move || {
            std::process::Command::new(env!("CARGO_BIN_EXE_sluice"))
                .args(["--url", &format!("http://{addr}"), "--api-key", KEY])
                .args(["message", "show", &id])
                .env_remove("SLUICE_URL")
                .env_remove("SLUICE_API_KEY")
                .output()
                .unwrap()
        }
    })
    .await
    .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(
        text.contains("buyer@sink.test") && text.contains("complained"),
        "{text}"
    );
    assert!(text.contains("greylisted"), "{text}");

    // Unknown and malformed ids are 404s naming the field.
    for bad in ["999.0", "nonsense"] {
        let (s, e) = get_json(addr, &format!("/v1/messages/{bad}")).await;
        assert_eq!(
            (s, e["error"]["code"].as_str()),
            (404, Some("message_not_found")),
            "{e}"
        );
    }

    // Retention deletes the histories with the tombstones: the lookup is then a 404.
    assert!(history_keys(&node).await >= 4);
    let now = sluice::now_ms();
    retention::pass(&node.node, now).await.unwrap();
    retention::pass(&node.node, now + 2 * DAY_MS).await.unwrap();
    let p = retention::pass(&node.node, now + 33 * DAY_MS)
        .await
        .unwrap();
    assert_eq!(p.tombstones_deleted, 2, "the bucket and the campaign");
    assert_eq!(history_keys(&node).await, 0);
    let (s, _) = get_json(addr, &format!("/v1/messages/{id}")).await;
    assert_eq!(s, 404);
    node.shutdown().await;
}
