//! Suppression lists end to end: the API (put, get, list with cursors, delete), persistence
//! across a restart, the check at ingest (reported in the 202, never queued) and the check just
//! before delivery (a suppression added after ingest stops queued mail).

use crate::common;

use std::time::Duration;

use common::sink::{Sink, SinkOptions};
use common::{KEY, client, config, start, url};
use serde_json::{Value, json};
use sluice::config::Route;

async fn call(
    addr: std::net::SocketAddr,
    method: reqwest::Method,
    path: &str,
    body: Option<Value>,
) -> (u16, Value) {
    let mut req = client().request(method, url(addr, path)).bearer_auth(KEY);
    if let Some(b) = body {
        req = req.json(&b);
    }
    let r = req.send().await.unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

use reqwest::Method;

#[tokio::test]
async fn api_puts_gets_lists_deletes_and_survives_restart() {
    let dir = tempfile::tempdir().unwrap();
    let node = start(config(dir.path())).await;
    let a = node.http_addr;

    let (s, b) = call(a, Method::PUT, "/v1/suppressions/Ann@Example.ORG", None).await;
    assert_eq!(s, 200, "{b}");
    assert_eq!(b["address"], "ann@example.org");
    assert_eq!(
        (b["scope"].as_str(), b["reason"].as_str()),
        (Some("global"), Some("manual"))
    );
    // Times as everywhere in the API: RFC 3339, UTC, milliseconds.
    let created = b["created_at"].as_str().unwrap_or_default();
    assert!(
        created.len() == 24 && created.ends_with('Z') && created.as_bytes()[19] == b'.',
        "{b}"
    );
    assert!(b.get("created_at_ms").is_none(), "{b}");
    let body = json!({"reason": "unsubscribe", "scope": "News.Example.com", "source": "crm"});
    let (s, b) = call(
        a,
        Method::PUT,
        "/v1/suppressions/ann@example.org",
        Some(body),
    )
    .await;
    assert_eq!(s, 200, "{b}");
    assert_eq!(b["scope"], "news.example.com");
    for (i, addr) in ["b@example.org", "c@example.org", "d@example.org"]
        .iter()
        .enumerate()
    {
        let reason = if i == 1 { "complaint" } else { "hard_bounce" };
        let (s, _) = call(
            a,
            Method::PUT,
            &format!("/v1/suppressions/{addr}"),
            Some(json!({ "reason": reason })),
        )
        .await;
        assert_eq!(s, 200);
    }

    let (s, b) = call(a, Method::GET, "/v1/suppressions/ann@example.org", None).await;
    assert_eq!(s, 200, "{b}");
    assert_eq!(b["entries"].as_array().unwrap().len(), 2, "{b}");

    // Pages of two, following the cursor; then a reason filter.
    let mut seen = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let path = match &cursor {
            Some(c) => format!("/v1/suppressions?limit=2&cursor={c}"),
            None => "/v1/suppressions?limit=2".to_owned(),
        };
        let (s, b) = call(a, Method::GET, &path, None).await;
        assert_eq!(s, 200, "{b}");
        for e in b["items"].as_array().unwrap() {
            seen.push(format!(
                "{}|{}",
                e["scope"].as_str().unwrap(),
                e["address"].as_str().unwrap()
            ));
        }
        match b["next_cursor"].as_str() {
            Some(c) => cursor = Some(c.to_owned()),
            None => break,
        }
    }
    assert_eq!(
        seen,
        vec![
            "global|ann@example.org",
            "global|b@example.org",
            "global|c@example.org",
            "global|d@example.org",
            "news.example.com|ann@example.org"
        ]
    );
    let (_, b) = call(a, Method::GET, "/v1/suppressions?reason=hard_bounce", None).await;
    assert_eq!(b["items"].as_array().unwrap().len(), 2, "{b}");

    // Bad input names the field.
    for (method, path, body, field) in [
        (
            Method::PUT,
            "/v1/suppressions/not-an-address",
            None,
            "address",
        ),
        (
            Method::PUT,
            "/v1/suppressions/x@example.org",
            Some(json!({"reason": "bored"})),
            "reason",
        ),
        (
            Method::PUT,
            "/v1/suppressions/x@example.org",
            Some(json!({"scope": "no such scope"})),
            "scope",
        ),
        (
            Method::PUT,
            "/v1/suppressions/x@example.org",
            Some(json!({"why": 1})),
            "why",
        ),
        (Method::GET, "/v1/suppressions?limit=0", None, "limit"),
        (Method::GET, "/v1/suppressions?cursor=zz", None, "cursor"),
        (Method::GET, "/v1/suppressions?limit=ten", None, "limit"),
        (Method::GET, "/v1/suppressions?colour=red", None, "colour"),
        (Method::GET, "/v1/suppressions/%FF%FE", None, "address"),
        (
            Method::DELETE,
            "/v1/suppressions/x@example.org?scope=global&all=1",
            None,
            "all",
        ),
        (
            Method::GET,
            "/v1/suppressions/nobody@example.org",
            None,
            "address",
        ),
    ] {
        let (s, b) = call(a, method, path, body).await;
        assert!((400..500).contains(&s), "{path}: {s} {b}");
        assert_eq!(b["error"]["field"], field, "{path}: {b}");
    }

    let (s, b) = call(
        a,
        Method::DELETE,
        "/v1/suppressions/ann@example.org?scope=news.example.com",
        None,
    )
    .await;
    assert_eq!(s, 200, "{b}");
    assert_eq!(b["deleted"], json!(["news.example.com"]));
    let (s, _) = call(a, Method::DELETE, "/v1/suppressions/b@example.org", None).await;
    assert_eq!(s, 200);
    let (s, _) = call(a, Method::DELETE, "/v1/suppressions/b@example.org", None).await;
    assert_eq!(s, 404);

    node.shutdown().await;
    let node = start(config(dir.path())).await;
    assert_eq!(
        node.node.suppressions.len(),
        3,
        "ann, c and d survive the restart"
    );
    assert_eq!(
        node.node
            .suppressions
            .check("ann@example.org", "anything.example", "default"),
        Some(sluice::effects::suppression::Reason::Manual)
    );
    assert_eq!(
        node.node
            .suppressions
            .check("b@example.org", "x.example", "default"),
        None
    );
    node.shutdown().await;
}

#[tokio::test]
async fn ingest_reports_suppressed_recipients_and_queues_none_of_them() {
    let dir = tempfile::tempdir().unwrap();
    let node = start(config(dir.path())).await;
    let a = node.http_addr;
    call(
        a,
        Method::PUT,
        "/v1/suppressions/gone@example.org",
        Some(json!({"reason": "hard_bounce"})),
    )
    .await;
    call(
        a,
        Method::PUT,
        "/v1/suppressions/unsub@example.org",
        Some(json!({"reason": "unsubscribe", "scope": "example.com"})),
    )
    .await;
    let campaign = |from: &str| {
        json!({"from": from, "subject": "s", "text": "t", "recipients": [
            {"email": "ok@example.org"}, {"email": "Gone@example.org"}, {"email": "unsub@example.org"}]})
    };
    let (s, b) = call(
        a,
        Method::POST,
        "/v1/campaigns",
        Some(campaign("news@example.com")),
    )
    .await;
    assert_eq!(s, 202, "{b}");
    assert_eq!(b["accepted"], 1, "{b}");
    assert_eq!(b["suppressed_count"], 2, "{b}");
    assert_eq!(
        b["suppressed"],
        json!([
            {"index": 1, "email": "Gone@example.org", "reason": "hard_bounce"},
            {"index": 2, "email": "unsub@example.org", "reason": "unsubscribe"}
        ])
    );
    let id = b["id"].as_str().unwrap().to_owned();
    // The unsubscribe was for example.com only: another sending domain may still mail them.
    let (_, b) = call(
        a,
        Method::POST,
        "/v1/campaigns",
        Some(campaign("shop@other.example")),
    )
    .await;
    assert_eq!(
        (b["accepted"].as_u64(), b["suppressed_count"].as_u64()),
        (Some(2), Some(1)),
        "{b}"
    );
    assert_eq!(node.node.scheduler.len(), 3);

    // A message to a suppressed address says so, naming `to`, and queues nothing.
    let before = common::spool_counts(&node).await;
    let message =
        |from: &str, to: &str| json!({"from": from, "subject": "s", "text": "t", "to": to});
    let (s, b) = call(
        a,
        Method::POST,
        "/v1/messages",
        Some(message("news@example.com", "gone@example.org")),
    )
    .await;
    assert_eq!(s, 422, "{b}");
    assert_eq!(b["error"]["code"], "recipient_suppressed");
    assert_eq!(b["error"]["field"], "to");
    assert!(
        b["error"]["message"]
            .as_str()
            .unwrap()
            .contains("hard_bounce"),
        "{b}"
    );
    assert_eq!(common::spool_counts(&node).await, before);
    assert_eq!(node.node.scheduler.len(), 3);
    // The unsubscribe is example.com's only: from another domain the message goes, with its id.
    let (s, b) = call(
        a,
        Method::POST,
        "/v1/messages",
        Some(message("shop@other.example", "unsub@example.org")),
    )
    .await;
    assert_eq!((s, b["accepted"].as_u64()), (202, Some(1)), "{b}");
    assert!(b["id"].as_str().is_some_and(|id| !id.is_empty()), "{b}");
    assert_eq!(node.node.scheduler.len(), 4);

    // NDJSON uploads are checked the same way.
    let r = client()
        .post(url(a, &format!("/v1/campaigns/{id}/recipients")))
        .bearer_auth(KEY)
        .header("content-type", "application/x-ndjson")
        .body("{\"email\":\"gone@example.org\"}\n{\"email\":\"new@example.org\"}\n")
        .send()
        .await
        .unwrap();
    let b: Value = r.json().await.unwrap();
    assert_eq!(
        (b["accepted"].as_u64(), b["suppressed_count"].as_u64()),
        (Some(1), Some(1)),
        "{b}"
    );
    assert_eq!(b["suppressed"][0]["index"], 0);

    let (_, got) = call(a, Method::GET, &format!("/v1/campaigns/{id}"), None).await;
    assert_eq!(
        (
            got["counts"]["queued"].as_u64(),
            got["counts"]["suppressed"].as_u64()
        ),
        (Some(2), Some(3)),
        "{got}"
    );
    node.shutdown().await;
    // Counts are derived from the job records at recovery: suppressed ones included.
    let node = start(config(dir.path())).await;
    let (_, got) = call(
        node.http_addr,
        Method::GET,
        &format!("/v1/campaigns/{id}"),
        None,
    )
    .await;
    assert_eq!(
        (
            got["counts"]["queued"].as_u64(),
            got["counts"]["suppressed"].as_u64()
        ),
        (Some(2), Some(3)),
        "{got}"
    );
    node.shutdown().await;
}

#[tokio::test]
async fn a_suppression_added_after_ingest_stops_queued_mail() {
    // stop@ is deferred on its first attempt and would be accepted on the next one.
    let sink = Sink::start(SinkOptions {
        rcpt: std::sync::Arc::new(|rcpt, n| {
            if rcpt == "stop@sink.test" && n == 0 {
                "451 4.3.0 try later".to_owned()
            } else {
                "250 2.1.5 ok".to_owned()
            }
        }),
        ..SinkOptions::default()
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path());
    cfg.delivery.enabled = true;
    cfg.delivery.retry_initial = Duration::from_secs(1);
    cfg.delivery.retry_max = Duration::from_secs(1);
    cfg.routes.push(Route {
        domain: "sink.test".into(),
        relay: sink.addr.to_string(),
    });
    let node = start(cfg).await;
    let a = node.http_addr;
    let body = json!({"from": "news@example.com", "subject": "s", "text": "t",
                      "recipients": [{"email": "keep@sink.test"}, {"email": "stop@sink.test"}]});
    let (s, b) = call(a, Method::POST, "/v1/campaigns", Some(body)).await;
    assert_eq!(s, 202, "{b}");
    let id = b["id"].as_str().unwrap().to_owned();
    let counts = |want: &'static dyn Fn(&Value) -> bool| {
        let id = id.clone();
        async move {
            let deadline = std::time::Instant::now() + Duration::from_secs(20);
            loop {
                let (_, got) = call(a, Method::GET, &format!("/v1/campaigns/{id}"), None).await;
                if want(&got["counts"]) {
                    return got["counts"].clone();
                }
                assert!(
                    std::time::Instant::now() < deadline,
                    "counts never matched: {got}"
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    };
    counts(&|c| c["delivered"] == 1 && c["deferred"] == 1).await;
    let (s, _) = call(a, Method::PUT, "/v1/suppressions/stop@sink.test", None).await;
    assert_eq!(s, 200);
    let c = counts(&|c| c["deferred"] == 0).await;
    assert_eq!(
        (c["delivered"].as_u64(), c["suppressed"].as_u64()),
        (Some(1), Some(1)),
        "{c}"
    );
    assert!(
        sink.messages()
            .iter()
            .all(|m| m.rcpts != ["stop@sink.test"]),
        "a suppressed recipient got mail"
    );
    node.shutdown().await;
}

#[tokio::test]
async fn one_click_unsubscribe_suppresses_for_the_sending_domain_once() {
    let sink = Sink::start(SinkOptions::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let make_config = || {
        let mut cfg = config(dir.path());
        cfg.delivery.enabled = true;
        cfg.routes.push(Route {
            domain: "sink.test".into(),
            relay: sink.addr.to_string(),
        });
        cfg
    };
    let node = start(make_config()).await;
    let a = node.http_addr;
    let body = json!({"from": "news@example.com", "subject": "s", "text": "t",
                      "recipients": [{"email": "Reader@sink.test"}]});
    let (_, b) = call(a, Method::POST, "/v1/campaigns", Some(body.clone())).await;
    let id = b["id"].as_str().unwrap().to_owned();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while sink.messages().is_empty() {
        assert!(std::time::Instant::now() < deadline, "not delivered");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let data = sink.messages()[0].data.clone();
    let token = data
        .split("List-Unsubscribe: <")
        .nth(1)
        .and_then(|r| r.split('>').next())
        .and_then(|u| u.rsplit('/').next())
        .expect("List-Unsubscribe URL")
        .to_owned();

    // GET shows a page and changes nothing; POST unsubscribes, and again changes nothing.
    let page = client()
        .get(url(a, &format!("/u/{token}")))
        .send()
        .await
        .unwrap();
    assert_eq!(page.status(), 200);
    let html = page.text().await.unwrap();
    assert!(
        html.contains("method=\"post\"") && html.contains("reader@sink.test"),
        "{html}"
    );
    assert_eq!(
        node.node
            .suppressions
            .check("reader@sink.test", "example.com", "default"),
        None
    );
    for _ in 0..2 {
        let r = client()
            .post(url(a, &format!("/u/{token}")))
            .header("content-type", "application/x-www-form-urlencoded")
            .body("List-Unsubscribe=One-Click")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
    }
    let (_, got) = call(a, Method::GET, &format!("/v1/campaigns/{id}"), None).await;
    assert_eq!(got["counts"]["unsubscribed"], 1, "{got}");
    let (_, e) = call(a, Method::GET, "/v1/suppressions/reader@sink.test", None).await;
    assert_eq!(e["entries"][0]["reason"], "unsubscribe", "{e}");
    assert_eq!(e["entries"][0]["scope"], "example.com", "{e}");
    assert_eq!(e["entries"][0]["campaign"], id.as_str(), "{e}");

    // Forged, mistyped or other-purpose tokens are refused.
    let trace = node.node.assembler.tokens().issue(
        sluice::outbound::tokens::Purpose::Trace,
        sluice::store::spool::JobId {
            campaign: 1,
            index: 0,
        },
    );
    let last = if token.ends_with('0') { '1' } else { '0' };
    let forged = format!("{}{last}", &token[..31]);
    for bad in [forged.as_str(), trace.as_str(), "nope"] {
        let r = client()
            .post(url(a, &format!("/u/{bad}")))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 404, "{bad}");
    }

    // After a restart the count is rebuilt and the next campaign from example.com skips them.
    node.shutdown().await;
    let node = start(make_config()).await;
    let a = node.http_addr;
    let (_, got) = call(a, Method::GET, &format!("/v1/campaigns/{id}"), None).await;
    assert_eq!(got["counts"]["unsubscribed"], 1, "{got}");
    let (_, b) = call(a, Method::POST, "/v1/campaigns", Some(body)).await;
    assert_eq!(b["suppressed"][0]["reason"], "unsubscribe", "{b}");
    node.shutdown().await;
}

async fn import(addr: std::net::SocketAddr, content_type: &str, body: &str) -> (u16, Value) {
    let r = client()
        .post(url(addr, "/v1/suppressions/import"))
        .bearer_auth(KEY)
        .header("content-type", content_type)
        .body(body.to_owned())
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

async fn export(addr: std::net::SocketAddr, query: &str) -> (String, String) {
    let r = client()
        .get(url(addr, &format!("/v1/suppressions/export{query}")))
        .bearer_auth(KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let ct = r.headers()["content-type"].to_str().unwrap().to_owned();
    (ct, r.text().await.unwrap())
}

#[tokio::test]
async fn import_keeps_good_rows_names_bad_lines_and_export_round_trips() {
    let dir = tempfile::tempdir().unwrap();
    let node = start(config(dir.path())).await;
    let addr = node.http_addr;
    let csv = "address,reason,scope,source\n\
               ann@example.org,hard_bounce,,crm\n\
               not-an-address,manual,,\n\
               \"Bob@Example.org\",unsubscribe,news.example.com,\"list, old\"\n\
               \n\
               cy@example.org,grumpy,,\n\
               dee@example.org,manual,not a domain,\n\
               \"eve@example.org,manual\n\
               fay@example.org\n";
    let (status, body) = import(addr, "text/csv", csv).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["imported"], 3, "{body}");
    assert_eq!(body["rejected_count"], 4, "{body}");
    let lines: Vec<u64> = body["rejected"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["line"].as_u64().unwrap())
        .collect();
    assert_eq!(lines, [3, 6, 7, 8], "{body}");
    let errors = body["rejected"].to_string();
    for want in ["address:", "reason:", "scope:", "unterminated"] {
        assert!(errors.contains(want), "{want} in {errors}");
    }
    let (_, bob) = call(addr, Method::GET, "/v1/suppressions/bob@example.org", None).await;
    assert_eq!(bob["entries"][0]["scope"], "news.example.com", "{bob}");
    assert_eq!(bob["entries"][0]["source"], "list, old", "{bob}");
    let (_, fay) = call(addr, Method::GET, "/v1/suppressions/fay@example.org", None).await;
    assert_eq!(
        (
            fay["entries"][0]["reason"].as_str(),
            fay["entries"][0]["scope"].as_str()
        ),
        (Some("manual"), Some("global")),
        "defaults: {fay}"
    );

    // NDJSON, with an unknown field and a missing address.
    let nd = "{\"email\":\"gus@example.org\",\"reason\":\"complaint\"}\n\
              {\"address\":\"hal@example.org\",\"color\":\"red\"}\n\
              {\"reason\":\"manual\"}\n";
    let (status, body) = import(addr, "application/x-ndjson", nd).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        (body["imported"].as_u64(), body["rejected_count"].as_u64()),
        (Some(1), Some(2))
    );
    assert_eq!(body["rejected"][0]["line"], 2);
    assert!(
        body["rejected"][1]["error"]
            .as_str()
            .unwrap()
            .contains("address: missing")
    );
    let (status, body) = import(addr, "text/plain", "x@example.org\n").await;
    assert_eq!(
        (status, body["error"]["field"].as_str()),
        (415, Some("Content-Type"))
    );
    // Another system's export, re-saved by a spreadsheet: a byte-order mark, CRLF, the columns
    // in another order, and columns the import does not know (ignored).
    let sendgrid = "\u{feff}Created,Reason,Email,Status\r\n\
                    1700000000,unsubscribe,\"Ida@Example.org\",bounced\r\n\
                    1700000001,,jo@example.org,\r\n";
    let (status, body) = import(addr, "text/csv", sendgrid).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        (body["imported"].as_u64(), body["rejected_count"].as_u64()),
        (Some(2), Some(0)),
        "{body}"
    );
    let (_, ida) = call(addr, Method::GET, "/v1/suppressions/ida@example.org", None).await;
    assert_eq!(ida["entries"][0]["reason"], "unsubscribe", "{ida}");
    let (status, body) = import(addr, "text/csv", "address,colour\nkai@example.org,red\n").await;
    assert_eq!(
        (status, body["imported"].as_u64()),
        (200, Some(1)),
        "{body}"
    );

    // Export, then import the export elsewhere: the same entries.
    let (ct, nd) = export(addr, "").await;
    assert_eq!(ct, "application/x-ndjson");
    assert_eq!(nd.lines().count(), 7, "{nd}");
    let (_, unsub) = export(addr, "?reason=unsubscribe").await;
    assert_eq!(unsub.lines().count(), 2);
    let (ct, csv) = export(addr, "?format=csv").await;
    assert!(ct.starts_with("text/csv"));
    assert!(csv.starts_with("address,scope,reason,created_at,"), "{csv}");
    assert!(csv.contains("\"list, old\""), "{csv}");
    let other_dir = tempfile::tempdir().unwrap();
    let other = start(config(other_dir.path())).await;
    let (status, body) = import(other.http_addr, "text/csv", &csv).await;
    assert_eq!(
        (status, body["imported"].as_u64()),
        (200, Some(7)),
        "{body}"
    );
    let (_, again) = export(other.http_addr, "").await;
    let sorted = |s: &str| {
        let mut v: Vec<Value> = s
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        v.sort_by_key(|e| e["address"].as_str().unwrap().to_owned());
        v
    };
    assert_eq!(sorted(&nd), sorted(&again));
    // The NDJSON export imports back as is too, its RFC 3339 times kept.
    assert!(nd.contains("\"created_at\":\""), "{nd}");
    let (status, body) = import(other.http_addr, "application/x-ndjson", &nd).await;
    assert_eq!(
        (status, body["replaced"].as_u64()),
        (200, Some(7)),
        "{body}"
    );
    let (_, again) = export(other.http_addr, "").await;
    assert_eq!(sorted(&nd), sorted(&again));
    other.shutdown().await;
    node.shutdown().await;
}
