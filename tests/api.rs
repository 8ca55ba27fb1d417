//! End-to-end tests of the ingestion API against an in-process node with a real RocksDB spool.

use crate::common;

use std::time::Duration;

use common::{KEY, client, config, get_json, metrics, post_json, spool_counts, start, url};
use serde_json::{Value, json};

fn campaign_body(recipients: Value) -> Value {
    json!({
        "from": "news@example.com",
        "from_name": "Example News",
        "subject": "Hello {{ first_name | default('friend') }}",
        "text": "Hi {{ first_name | default('friend') }}, your code is {{ code | default('-') }}.",
        "html": "<p>Hi {{ first_name | default('friend') }}</p>",
        "tags": ["weekly"],
        "recipients": recipients,
    })
}

#[tokio::test]
async fn campaign_is_accepted_counted_and_survives_restart() {
    let dir = tempfile::tempdir().unwrap();
    let node = start(config(dir.path())).await;
    let addr = node.http_addr;
    let recipients = json!([
        {"email": "ann@example.com", "vars": {"first_name": "Ann", "code": 1}},
        {"email": "bob@Example.ORG", "vars": {"first_name": "Bob", "code": 2}},
        {"email": "not-an-address"},
        {"email": "eve@example.net", "vars": {"first_name": "Eve\r\nBcc: all@example.com"}},
        {"email": "zoë@bücher.example", "vars": {"first_name": "Zoë"}},
    ]);
    let (status, body) = post_json(addr, "/v1/campaigns", &campaign_body(recipients)).await;
    assert_eq!(status, 202, "{body}");
    assert_eq!(body["accepted"], 3);
    assert_eq!(body["rejected_count"], 2);
    assert_eq!(body["rejected"][0]["index"], 2);
    assert_eq!(body["rejected"][0]["field"], "recipients[2].email");
    assert_eq!(body["rejected"][0]["email"], "not-an-address");
    assert_eq!(
        body["rejected"][1]["field"],
        "recipients[3].vars.first_name"
    );
    assert!(
        body["rejected"][1]["error"]
            .as_str()
            .unwrap()
            .contains("CR or LF")
    );
    let id = body["id"].as_str().unwrap().to_owned();

    let (status, got) = get_json(addr, &format!("/v1/campaigns/{id}")).await;
    assert_eq!(status, 200);
    assert_eq!(got["state"], "active");
    assert_eq!(got["counts"]["queued"], 3);
    assert_eq!(node.node.scheduler.len(), 3);

    node.shutdown().await;
    let node = start(config(dir.path())).await;
    let (status, got) = get_json(node.http_addr, &format!("/v1/campaigns/{id}")).await;
    assert_eq!(status, 200);
    assert_eq!(got["counts"]["queued"], 3, "{got}");
    assert_eq!(got["subject"], "Hello {{ first_name | default('friend') }}");
    let mut domains = node.node.scheduler.pending_domains();
    domains.sort();
    assert_eq!(
        domains,
        vec!["example.com", "example.org", "xn--bcher-kva.example"]
    );
    node.shutdown().await;
}

#[tokio::test]
async fn ndjson_upload_streams_and_commits_atomically() {
    let dir = tempfile::tempdir().unwrap();
    let node = start(config(dir.path())).await;
    let addr = node.http_addr;
    let (status, body) = post_json(addr, "/v1/campaigns", &campaign_body(json!([]))).await;
    assert_eq!(status, 202, "{body}");
    let id = body["id"].as_str().unwrap().to_owned();

    // 20,000 lines in pieces that split lines at arbitrary points, with CRLF endings, a blank
    // line, a bad line and a line over the limit.
    let mut text = String::new();
    for i in 0..20_000 {
        text.push_str(&format!(
            "{{\"email\":\"user{i}@d{}.example\",\"vars\":{{\"first_name\":\"U{i}\"}}}}\r\n",
            i % 7
        ));
    }
    text.push('\n');
    text.push_str("{\"email\":\"broken\"}\n");
    text.push_str(&format!(
        "{{\"email\":\"x@example.com\",\"vars\":{{\"pad\":\"{}\"}}}}\n",
        "p".repeat(70_000)
    ));
    text.push_str("{\"email\":\"last@example.com\"}");
    let bytes = text.into_bytes();
    let pieces: Vec<Result<Vec<u8>, std::io::Error>> =
        bytes.chunks(7919).map(|c| Ok(c.to_vec())).collect();
    let r = client()
        .post(url(addr, &format!("/v1/campaigns/{id}/recipients")))
        .bearer_auth(KEY)
        .header("content-type", "application/x-ndjson")
        .body(reqwest::Body::wrap_stream(futures_util::stream::iter(
            pieces,
        )))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["accepted"], 20_001, "{body}");
    assert_eq!(body["rejected_count"], 2);
    assert_eq!(body["rejected"][0]["line"], 20_002);
    assert_eq!(body["rejected"][0]["field"], "line 20002.email");
    assert_eq!(body["rejected"][1]["line"], 20_003);
    assert!(
        body["rejected"][1]["error"]
            .as_str()
            .unwrap()
            .contains("longer than")
    );

    let (_, got) = get_json(addr, &format!("/v1/campaigns/{id}")).await;
    assert_eq!(got["counts"]["queued"], 20_001);
    let counts = spool_counts(&node).await;
    assert!(
        counts.contains(&("jobs+finals".into(), 20_001)),
        "{counts:?}"
    );
    assert!(
        counts.contains(&("meta".into(), 1)),
        "only the schema version remains: {counts:?}"
    );
    node.shutdown().await;
}

#[tokio::test]
async fn abandoned_upload_leaves_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let node = start(config(dir.path())).await;
    let addr = node.http_addr;
    let (_, body) = post_json(addr, "/v1/campaigns", &campaign_body(json!([]))).await;
    let id = body["id"].as_str().unwrap().to_owned();
    let before = spool_counts(&node).await;

    // Send 50,000 lines (several chunks reach the spool), then fail the body stream.
    let mut pieces: Vec<Result<Vec<u8>, std::io::Error>> = Vec::new();
    for block in 0..50 {
        let mut s = String::new();
        for i in 0..1000 {
            s.push_str(&format!("{{\"email\":\"u{block}x{i}@example.com\"}}\n"));
        }
        pieces.push(Ok(s.into_bytes()));
    }
    pieces.push(Err(std::io::Error::other("client gave up")));
    let r = client()
        .post(url(addr, &format!("/v1/campaigns/{id}/recipients")))
        .bearer_auth(KEY)
        .header("content-type", "application/x-ndjson")
        .body(reqwest::Body::wrap_stream(futures_util::stream::iter(
            pieces,
        )))
        .send()
        .await;
    assert!(r.is_err() || r.unwrap().status() != 202);

    // The rollback runs in the background; wait for it.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        if spool_counts(&node).await == before {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "staged jobs not rolled back: {:?}",
            spool_counts(&node).await
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (_, got) = get_json(addr, &format!("/v1/campaigns/{id}")).await;
    assert_eq!(got["counts"]["queued"], 0);
    assert_eq!(node.node.scheduler.len(), 0);
    node.shutdown().await;
}

const OTHER_KEY: &str = "other-key-0123456789";

/// The test config with a second operator key.
fn two_keys(dir: &std::path::Path) -> sluice::config::Config {
    let mut c = config(dir);
    c.auth.api_keys.push(OTHER_KEY.to_owned());
    c
}

#[tokio::test]
async fn idempotency_key_replays_the_first_answer() {
    let dir = tempfile::tempdir().unwrap();
    let node = start(two_keys(dir.path())).await;
    let addr = node.http_addr;
    let body = campaign_body(json!([{"email": "a@example.com", "vars": {"first_name": "A"}}]));
    let send = |key: &'static str| {
        client()
            .post(url(addr, "/v1/campaigns"))
            .bearer_auth(KEY)
            .header("Idempotency-Key", key)
            .json(&body)
            .send()
    };
    let first = send("retry-1").await.unwrap();
    assert_eq!(first.status(), 202);
    assert!(first.headers().get("idempotent-replayed").is_none());
    let first: Value = first.json().await.unwrap();
    let counts = spool_counts(&node).await;

    let second = send("retry-1").await.unwrap();
    assert_eq!(second.status(), 202);
    assert_eq!(second.headers()["idempotent-replayed"], "true");
    let second: Value = second.json().await.unwrap();
    assert_eq!(first, second);
    assert_eq!(spool_counts(&node).await, counts, "a replay adds nothing");
    assert_eq!(node.node.campaigns.len(), 1);

    // The same key on another route is a client bug, not a replay.
    let r = client()
        .post(url(addr, "/v1/messages"))
        .bearer_auth(KEY)
        .header("Idempotency-Key", "retry-1")
        .json(&json!({"from": "a@example.com", "subject": "s", "text": "t", "to": "b@example.com"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 422);
    let e: Value = r.json().await.unwrap();
    assert_eq!(e["error"]["code"], "idempotency_key_reused");

    // The same key with another body is another request: refused, not replayed.
    let other = campaign_body(json!([{"email": "z@example.com", "vars": {"first_name": "Z"}}]));
    let r = client()
        .post(url(addr, "/v1/campaigns"))
        .bearer_auth(KEY)
        .header("Idempotency-Key", "retry-1")
        .json(&other)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 422);
    assert!(r.headers().get("idempotent-replayed").is_none());
    let e: Value = r.json().await.unwrap();
    assert_eq!(e["error"]["code"], "idempotency_key_reused");
    assert_eq!(e["error"]["field"], "Idempotency-Key");
    assert_eq!(
        spool_counts(&node).await,
        counts,
        "a refused reuse adds nothing"
    );

    // Keys are the API key's own: the same key and body from another key is a new request.
    let r = client()
        .post(url(addr, "/v1/campaigns"))
        .bearer_auth(OTHER_KEY)
        .header("Idempotency-Key", "retry-1")
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    assert!(r.headers().get("idempotent-replayed").is_none());
    assert_eq!(node.node.campaigns.len(), 2);

    // A recipient upload is bound to its streamed body the same way.
    let id = first["id"].as_str().unwrap().to_owned();
    let upload = |key: &'static str, lines: &'static str| {
        client()
            .post(url(addr, &format!("/v1/campaigns/{id}/recipients")))
            .bearer_auth(KEY)
            .header("Idempotency-Key", key)
            .header("content-type", "application/x-ndjson")
            .body(lines)
            .send()
    };
    let lines = "{\"email\":\"u1@example.com\",\"vars\":{\"first_name\":\"U\"}}\n";
    let up = upload("upload-1", lines).await.unwrap();
    assert_eq!(up.status(), 202);
    let up: Value = up.json().await.unwrap();
    let after_upload = spool_counts(&node).await;
    let again = upload("upload-1", lines).await.unwrap();
    assert_eq!(again.headers()["idempotent-replayed"], "true");
    assert_eq!(again.json::<Value>().await.unwrap(), up);
    let changed = upload(
        "upload-1",
        "{\"email\":\"u2@example.com\",\"vars\":{\"first_name\":\"V\"}}\n",
    )
    .await
    .unwrap();
    assert_eq!(changed.status(), 422);
    assert_eq!(
        changed.json::<Value>().await.unwrap()["error"]["code"],
        "idempotency_key_reused"
    );
    assert_eq!(spool_counts(&node).await, after_upload);

    // Remembered across a restart, because it was committed with the campaign.
    node.shutdown().await;
    let node = start(two_keys(dir.path())).await;
    let addr = node.http_addr;
    let third = client()
        .post(url(addr, "/v1/campaigns"))
        .bearer_auth(KEY)
        .header("Idempotency-Key", "retry-1")
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(third.headers()["idempotent-replayed"], "true");
    assert_eq!(third.json::<Value>().await.unwrap(), first);
    node.shutdown().await;
}

#[tokio::test]
async fn message_pause_resume_cancel() {
    let dir = tempfile::tempdir().unwrap();
    let node = start(config(dir.path())).await;
    let addr = node.http_addr;
    let (status, body) = post_json(
        addr,
        "/v1/messages",
        &json!({"from": "app@example.com", "subject": "Reset for {{ name }}", "text": "Code {{ code }}",
                "to": "user@example.com", "vars": {"name": "U", "code": "123"}}),
    )
    .await;
    assert_eq!(status, 202, "{body}");
    assert_eq!(body["accepted"], 1);
    let (status, body) = post_json(
        addr,
        "/v1/messages",
        &json!({"from": "app@example.com", "subject": "s", "text": "t", "to": "bad@", "vars": {}}),
    )
    .await;
    assert_eq!(status, 422);
    assert_eq!(body["error"]["field"], "to");

    let (_, body) = post_json(
        addr,
        "/v1/campaigns",
        &campaign_body(json!([{"email": "a@example.com"}])),
    )
    .await;
    let id = body["id"].as_str().unwrap().to_owned();
    let (s, b) = post_json(addr, &format!("/v1/campaigns/{id}/pause"), &json!({})).await;
    assert_eq!((s, b["state"].as_str()), (200, Some("paused")));
    let (s, b) = post_json(addr, &format!("/v1/campaigns/{id}/resume"), &json!({})).await;
    assert_eq!((s, b["state"].as_str()), (200, Some("active")));
    let (s, b) = post_json(addr, &format!("/v1/campaigns/{id}/cancel"), &json!({})).await;
    assert_eq!((s, b["state"].as_str()), (200, Some("cancelled")));
    assert_eq!(b["counts"]["cancelled"], 1);
    assert_eq!(b["counts"]["queued"], 0);
    let (s, b) = post_json(addr, &format!("/v1/campaigns/{id}/resume"), &json!({})).await;
    assert_eq!(
        (s, b["error"]["code"].as_str()),
        (409, Some("campaign_cancelled"))
    );

    node.shutdown().await;
    let node = start(config(dir.path())).await;
    let (_, got) = get_json(node.http_addr, &format!("/v1/campaigns/{id}")).await;
    assert_eq!(got["state"], "cancelled");
    assert_eq!(got["counts"]["cancelled"], 1, "{got}");
    assert_eq!(got["counts"]["queued"], 0);
    node.shutdown().await;
}

#[tokio::test]
async fn health_and_metrics_need_no_key() {
    let dir = tempfile::tempdir().unwrap();
    let node = start(config(dir.path())).await;
    let addr = node.http_addr;
    let c = client();
    assert_eq!(
        c.get(url(addr, "/healthz")).send().await.unwrap().status(),
        200
    );
    assert_eq!(
        c.get(url(addr, "/readyz")).send().await.unwrap().status(),
        200
    );
    post_json(
        addr,
        "/v1/campaigns",
        &campaign_body(json!([{"email": "a@example.com"}])),
    )
    .await;
    let text = metrics(addr).await;
    assert!(text.contains("sluice_recipients_accepted_total"), "{text}");
    assert!(text.contains("sluice_spool_sync_seconds_bucket"), "{text}");
    assert!(
        text.contains("sluice_http_requests_total{route=\"/v1/campaigns\",status=\"202\"}"),
        "{text}"
    );
    node.shutdown().await;
}
