//! Graceful shutdown under load: SIGTERM while a slow receiver holds every connection mid-DATA.
//! The API answers 503 with Retry-After while draining, every transaction under way finishes and
//! is recorded, the process exits well within 30 s, and a restart sends the rest with no message
//! delivered twice.

use crate::common;

use std::collections::HashSet;
use std::time::{Duration, Instant};

use common::sink::{Sink, SinkOptions};
use common::*;
use serde_json::Value;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_finishes_transactions_refuses_new_work_and_duplicates_nothing() {
    let recipients = 400usize;
    // Every DATA takes 1.5 s to be answered, so SIGTERM always finds transactions under way.
    let sink = Sink::start(SinkOptions {
        data_delay: Duration::from_millis(1500),
        ..SinkOptions::default()
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let spool = dir.path().join("spool");
    let more = format!(
        "[delivery]\nenabled = true\nretry_initial = \"300ms\"\nretry_max = \"1s\"\n\
         [shaping]\nmax_connections = 10\n\
         [[route]]\ndomain = \"sink.test\"\nrelay = \"{}\"\n",
        sink.addr
    );
    let mut sluice = Process::spawn_with(dir.path(), &spool, &more);
    sluice.wait_ready(Duration::from_secs(30)).await;
    let id = post_campaign(sluice.addr, common::recipients(recipients)).await;
    let started = Instant::now();
    while sink.messages().len() < 20 {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "nothing delivered"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    sluice.send_term();
    let term_at = Instant::now();
    // While transactions finish, new work is refused with 503 and Retry-After.
    let c = client();
    let mut refused = None;
    while term_at.elapsed() < Duration::from_secs(2) {
        let r = c
            .post(url(sluice.addr, "/v1/campaigns"))
            .bearer_auth(KEY)
            .json(
                &serde_json::json!({"from": "a@example.com", "subject": "s", "text": "t",
                                       "recipients": [{"email": "x@sink.test"}]}),
            )
            .send()
            .await;
        if let Ok(r) = r
            && r.status() == 503
        {
            let retry = r.headers().get("retry-after").cloned();
            let body: Value = r.json().await.unwrap();
            refused = Some((retry, body));
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (retry, body) = refused.expect("no 503 while draining");
    assert!(retry.is_some(), "503 without Retry-After");
    assert_eq!(body["error"]["code"], "shutting_down");

    let status = sluice.wait_exit(Duration::from_secs(30));
    let took = term_at.elapsed();
    assert!(status.success(), "exit status {status}");
    assert!(took < Duration::from_secs(10), "stopping took {took:?}");
    let before = sink.messages();
    let delivered_log = log_records(dir.path())
        .iter()
        .filter(|r| r["type"] == "d")
        .count();
    assert_eq!(
        delivered_log,
        before.len(),
        "every transaction the receiver completed is recorded"
    );
    assert!(
        before.len() < recipients,
        "everything was sent before the stop"
    );

    sluice = Process::spawn_with(dir.path(), &spool, &more);
    sluice.wait_ready(Duration::from_secs(30)).await;
    wait_counts(sluice.addr, &id, Duration::from_secs(120), |c| {
        c["delivered"] == recipients as u64
    })
    .await;
    let all = sink.messages();
    let unique: HashSet<&str> = all.iter().map(|m| m.rcpts[0].as_str()).collect();
    assert_eq!(unique.len(), recipients);
    assert_eq!(all.len(), recipients, "a message was delivered twice");
    sluice.terminate(Duration::from_secs(30));
    eprintln!(
        "shutdown: {} of {recipients} sent before SIGTERM's stop, which took {took:?}",
        before.len()
    );
}
