//! Transactional messages end to end: each is a job of its stream's bucket with its own record
//! beside it, not a campaign. Messages of one stream share a bucket (counts, pause), deliver
//! with their own templates across a restart, keep a compacted record once final, and a
//! bucket's messages go with its tombstones once its period is over.

use crate::common;

use std::sync::Arc;
use std::time::Duration;

use common::sink::{Sink, SinkOptions};
use common::{delivery_config, get_json, post_json, start, wait_counts, wait_keys, wait_log_kind};
use serde_json::{Value, json};
use sluice::store::campaign::CampaignRecord;
use sluice::store::retention;
use sluice::store::spool::{CF_FINALS, CF_MESSAGES, JobId};

fn message(to: &str, stream: Option<&str>, subject: &str) -> Value {
    let mut m = json!({"from": "app@example.com", "subject": subject,
                       "text": "Your code is {{ code }}.", "to": to, "vars": {"code": "4711"},
                       "tags": ["otp"]});
    if let Some(s) = stream {
        m["stream"] = json!(s);
    }
    m
}

fn job_id(id: &str) -> JobId {
    let (campaign, index) = id.split_once('.').expect("a job id is <campaign>.<index>");
    JobId {
        campaign: campaign.parse().unwrap(),
        index: index.parse().unwrap(),
    }
}

async fn stored_message(node: &sluice::server::Running, id: JobId) -> CampaignRecord {
    let n = Arc::clone(&node.node);
    let bytes = tokio::task::spawn_blocking(move || {
        n.spool
            .get_messages(&[id], sluice::store::spool::Reach::Disk)
            .unwrap()
    })
    .await
    .unwrap()
    .pop()
    .flatten()
    .expect("a message record beside the job");
    CampaignRecord::decode(&bytes).unwrap()
}

async fn keys(node: &sluice::server::Running) -> (usize, usize) {
    let n = Arc::clone(&node.node);
    let c = tokio::task::spawn_blocking(move || {
        n.spool
            .count_keys_together(&[CF_FINALS, CF_MESSAGES])
            .unwrap()
    })
    .await
    .unwrap();
    (c[0], c[1])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_are_jobs_of_their_streams_bucket_not_campaigns() {
    let dir = tempfile::tempdir().unwrap();
    let sink = Sink::start(SinkOptions::default()).await;
    let mut cfg = delivery_config(dir.path(), &sink);
    cfg.retention.interval = Duration::from_secs(3600);
    let node = start(cfg.clone()).await;
    let addr = node.http_addr;

    // Refused before anything is written: a bad stream name, a stream on a campaign.
    let (s, e) = post_json(
        addr,
        "/v1/messages",
        &message("a@sink.test", Some("no spaces"), "x"),
    )
    .await;
    assert_eq!(
        (s, e["error"]["field"].as_str()),
        (422, Some("stream")),
        "{e}"
    );
    let (s, e) = post_json(
        addr,
        "/v1/campaigns",
        &json!({"from": "n@example.com", "subject": "s", "text": "t", "stream": "x",
                "recipients": [{"email": "a@sink.test"}]}),
    )
    .await;
    assert_eq!(
        (s, e["error"]["field"].as_str()),
        (422, Some("stream")),
        "{e}"
    );
    assert_eq!(node.node.campaigns.len(), 0);

    let mut ids = Vec::new();
    for (i, stream) in [None, None, Some("receipts")].into_iter().enumerate() {
        let to = format!("user{i}@sink.test");
        let (s, b) = post_json(
            addr,
            "/v1/messages",
            &message(&to, stream, &format!("Code {i}")),
        )
        .await;
        assert_eq!(s, 202, "{b}");
        assert_eq!(b["accepted"], 1, "{b}");
        assert_eq!(b["stream"], stream.unwrap_or("default"), "{b}");
        ids.push((
            b["id"].as_str().unwrap().to_owned(),
            b["campaign"].as_str().unwrap().to_owned(),
        ));
    }
    // Two messages of the default stream share its bucket; the other stream has its own.
    assert_eq!(ids[0].1, ids[1].1);
    assert_ne!(ids[0].1, ids[2].1);
    assert_ne!(ids[0].0, ids[1].0);
    assert_eq!(
        node.node.campaigns.len(),
        2,
        "one bucket per stream, none per message"
    );

    let bucket = &ids[0].1;
    wait_counts(addr, bucket, Duration::from_secs(20), |c| {
        c["delivered"] == 2
    })
    .await;
    wait_counts(addr, &ids[2].1, Duration::from_secs(20), |c| {
        c["delivered"] == 1
    })
    .await;
    let (_, b) = get_json(addr, &format!("/v1/campaigns/{bucket}")).await;
    assert_eq!(
        (b["kind"].as_str(), b["stream"].as_str()),
        (Some("transactional"), Some("default")),
        "{b}"
    );

    // Each message went out with its own subject and variables.
    let mut subjects: Vec<String> = sink
        .messages()
        .iter()
        .map(|m| {
            assert!(m.data.contains("Your code is 4711."), "{}", m.data);
            m.data
                .lines()
                .find_map(|l| l.strip_prefix("Subject: "))
                .unwrap()
                .to_owned()
        })
        .collect();
    subjects.sort();
    assert_eq!(subjects, ["Code 0", "Code 1", "Code 2"]);

    // Its events carry its tags and name its bucket and job.
    let log = wait_log_kind(dir.path(), "d", 3).await;
    let first = log
        .iter()
        .find(|r| r["type"] == "d" && r["job"] == ids[0].0.as_str())
        .expect("a delivery record for the first message");
    assert_eq!(first["campaign"], bucket.as_str());
    assert_eq!(first["tags"], json!(["otp"]));

    // Once final, the message keeps its sender, subject and tags, not its templates.
    let stored = stored_message(&node, job_id(&ids[0].0)).await;
    assert_eq!(
        (stored.subject.as_str(), stored.text.as_deref()),
        ("Code 0", None)
    );
    assert_eq!(stored.tags, ["otp"]);
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_queued_message_keeps_its_content_across_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let sink = Sink::start(SinkOptions::default()).await;
    let cfg = delivery_config(dir.path(), &sink);
    let node = start(cfg.clone()).await;
    let addr = node.http_addr;
    // The stream's bucket exists once a message was posted; pausing it holds later messages.
    let (_, b) = post_json(
        addr,
        "/v1/messages",
        &message("first@sink.test", None, "First"),
    )
    .await;
    let bucket = b["campaign"].as_str().unwrap().to_owned();
    wait_counts(addr, &bucket, Duration::from_secs(20), |c| {
        c["delivered"] == 1
    })
    .await;
    let (s, _) = post_json(addr, &format!("/v1/campaigns/{bucket}/pause"), &json!({})).await;
    assert_eq!(s, 200);
    let (s, b) = post_json(
        addr,
        "/v1/messages",
        &message("held@sink.test", None, "Held"),
    )
    .await;
    assert_eq!(s, 202, "{b}");
    assert_eq!(
        b["campaign"],
        bucket.as_str(),
        "a paused bucket still takes messages"
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(sink.messages().len(), 1, "a paused stream sends nothing");
    node.shutdown().await;

    let node = start(cfg).await;
    let addr = node.http_addr;
    let (s, _) = post_json(addr, &format!("/v1/campaigns/{bucket}/resume"), &json!({})).await;
    assert_eq!(s, 200);
    wait_counts(addr, &bucket, Duration::from_secs(20), |c| {
        c["delivered"] == 2
    })
    .await;
    let held = sink
        .messages()
        .into_iter()
        .find(|m| m.rcpts == ["held@sink.test"])
        .expect("the held message was delivered");
    assert!(held.data.contains("Subject: Held"), "{}", held.data);
    assert!(held.data.contains("Your code is 4711."), "{}", held.data);
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_buckets_messages_go_with_its_tombstones_after_its_period() {
    let dir = tempfile::tempdir().unwrap();
    let sink = Sink::start(SinkOptions::default()).await;
    let mut cfg = delivery_config(dir.path(), &sink);
    cfg.retention.interval = Duration::from_secs(3600);
    cfg.retention.message_buckets = Duration::from_secs(3600);
    let node = start(cfg).await;
    let addr = node.http_addr;
    let mut bucket = String::new();
    for i in 0..3 {
        let (s, b) = post_json(
            addr,
            "/v1/messages",
            &message(&format!("u{i}@sink.test"), None, "Hi"),
        )
        .await;
        assert_eq!(s, 202, "{b}");
        bucket = b["campaign"].as_str().unwrap().to_owned();
    }
    wait_counts(addr, &bucket, Duration::from_secs(20), |c| {
        c["delivered"] == 3
    })
    .await;
    wait_keys(&node, &[CF_FINALS, CF_MESSAGES], &[3, 3]).await;

    // Within its period the bucket takes messages, so it does not finish however idle it is.
    let now = sluice::now_ms();
    let p = retention::pass(&node.node, now).await.unwrap();
    assert_eq!(p.finished, 0);
    // After it, it finishes; after `job_tombstones` its tombstones and messages go by range.
    let later = now + 3_600_000;
    assert_eq!(
        retention::pass(&node.node, later).await.unwrap().finished,
        1
    );
    let p = retention::pass(&node.node, later + 30 * 86_400_000 + 1)
        .await
        .unwrap();
    assert_eq!(p.tombstones_deleted, 1);
    assert_eq!(keys(&node).await, (0, 0));
    let (_, b) = get_json(addr, &format!("/v1/campaigns/{bucket}")).await;
    assert_eq!(b["counts"]["delivered"], 3, "{b}");

    node.shutdown().await;
}
