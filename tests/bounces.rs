//! Bounces end to end: synchronous 5xx replies classified and suppressed, soft failures retried;
//! asynchronous DSNs and ARF reports over SMTP to the inbound listener and over HTTP.

use crate::common;

use std::sync::Arc;
use std::time::Duration;

use common::sink::{Sink, SinkOptions};
use common::smtp::Smtp;
use common::{
    KEY, client, config, delivery_config, get_json, index_of, post_campaign, recipients, start,
    trace_token, url, wait_counts, wait_log_kind,
};
use serde_json::{Value, json};

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
    let mut cfg = delivery_config(dir.path(), &sink);
    // A tenth unknown would trip the hard-bounce breaker (tests/guard.rs): this test is about
    // what each bounce does, so the whole list must go.
    cfg.guard.enabled = false;
    let node = start(cfg).await;
    let addr = node.http_addr;
    let first = post_campaign(addr, recipients(1000)).await;
    let counts = wait_counts(addr, &first, Duration::from_secs(60), |c| {
        c["delivered"] == 900 && c["bounced"] == 100
    })
    .await;
    assert_eq!(counts["deferred"], 0, "{counts}");

    let (status, entry) = get_json(addr, "/v1/suppressions/user10@sink.test").await;
    assert_eq!(status, 200, "{entry}");
    let e = &entry["entries"][0];
    assert_eq!(e["reason"], "hard_bounce", "{entry}");
    assert_eq!(e["category"], "bad-mailbox", "{entry}");
    assert_eq!(e["scope"], "global");
    assert_eq!(e["campaign"], first.as_str());
    assert!(
        e["detail"].as_str().unwrap().starts_with("550 5.1.1"),
        "{entry}"
    );
    let (_, delivered) = get_json(addr, "/v1/suppressions/user11@sink.test").await;
    assert!(delivered["entries"].is_null(), "{delivered}");
    // The list is read from the spool, where suppressions land with the outcome batch a moment
    // after the counts (kept in memory) move.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        let (_, page) = get_json(addr, "/v1/suppressions?reason=hard_bounce&limit=1000").await;
        let listed = page["items"].as_array().unwrap().len();
        if listed == 100 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{listed} of 100 listed"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let bounced: Vec<Value> = wait_log_kind(dir.path(), "b", 100)
        .await
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
    let log = wait_log_kind(dir.path(), "t", 3).await;
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

const FEEDBACK: &str = "fbl@bounces.example.com";

/// A node with the bounce listener on 127.0.0.1:0, delivering `n` recipients to an accepting
/// sink; returns it with the captured messages (in recipient order).
async fn delivered(
    dir: &std::path::Path,
    n: usize,
) -> (
    sluice::server::Running,
    Sink,
    String,
    Vec<common::sink::Captured>,
) {
    let sink = Sink::start(SinkOptions::default()).await;
    let mut cfg = delivery_config(dir, &sink);
    cfg.bounce.listen = Some("127.0.0.1:0".parse().unwrap());
    cfg.bounce.domain = Some("bounces.example.com".into());
    cfg.bounce.feedback_addresses = vec![FEEDBACK.into()];
    cfg.bounce.max_message_bytes = 10 << 20;
    let node = start(cfg).await;
    let id = post_campaign(node.http_addr, recipients(n)).await;
    wait_counts(node.http_addr, &id, Duration::from_secs(20), |c| {
        c["delivered"] == n
    })
    .await;
    let mut msgs = sink.messages();
    msgs.sort_by_key(|m| index_of(&m.rcpts[0]));
    (node, sink, id, msgs)
}

/// A sample report with the placeholders filled for `m`; returns its expected category too.
fn sample(name: &str, m: &common::sink::Captured) -> (String, Vec<u8>) {
    let text = std::fs::read_to_string(format!(
        "{}/tests/data/reports/{name}.eml",
        env!("CARGO_MANIFEST_DIR")
    ))
    .unwrap();
    let (first, rest) = text.split_once('\n').unwrap();
    let expect = first.strip_prefix("# expect: ").unwrap().trim().to_owned();
    let body = rest
        .replace("{{VERP}}", &m.mail_from)
        .replace("{{RCPT}}", &m.rcpts[0])
        .replace("{{REF}}", &trace_token(&m.data))
        .replace("{{FEEDBACK}}", FEEDBACK);
    (expect, body.into_bytes())
}

async fn entry(addr: std::net::SocketAddr, address: &str) -> Value {
    let (status, body) = get_json(addr, &format!("/v1/suppressions/{address}")).await;
    if status == 404 {
        return Value::Null;
    }
    body["entries"][0].clone()
}

/// Acceptance 2: DSNs of real MTAs over SMTP map to their jobs and are classified; an ARF
/// complaint with a redacted recipient suppresses with reason complaint.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dsns_and_complaints_over_smtp_reach_their_jobs() {
    let dir = tempfile::tempdir().unwrap();
    let (node, _sink, id, msgs) = delivered(dir.path(), 8).await;
    let listener = node.bounce_addr.expect("listener runs");
    let addr = node.http_addr;
    let names = ["postfix", "exim", "exchange", "gmail", "yahoo"];
    for (i, name) in names.iter().enumerate() {
        let m = &msgs[i];
        let (expect, report) = sample(name, m);
        let r = Smtp::send(listener, &m.mail_from, &report).await;
        assert!(r.starts_with("250 2.0.0 bounce applied"), "{name}: {r}");
        let e = entry(addr, &m.rcpts[0]).await;
        if expect == "quota-issues" {
            // A soft category bounces the job but keeps the address.
            assert!(e.is_null(), "{name}: {e}");
        } else {
            assert_eq!(e["reason"], "hard_bounce", "{name}: {e}");
            assert_eq!(e["category"], expect.as_str(), "{name}: {e}");
            assert_eq!(e["campaign"], id.as_str(), "{name}");
            assert!(e["source"].as_str().unwrap().starts_with("dsn"), "{e}");
        }
    }
    // Sent again, a DSN changes nothing.
    let (_, again) = sample("postfix", &msgs[0]);
    let r = Smtp::send(listener, &msgs[0].mail_from, &again).await;
    assert!(r.starts_with("250 2.0.0 bounce duplicate"), "{r}");
    let (_, c) = get_json(addr, &format!("/v1/campaigns/{id}")).await;
    assert_eq!(c["counts"]["bounced"], 5, "{c}");
    assert_eq!(c["counts"]["delivered"], 3, "{c}");

    // The complaint names no recipient; the trace header names the job.
    let (_, arf) = sample("arf-redacted", &msgs[5]);
    let r = Smtp::send(listener, FEEDBACK, &arf).await;
    assert!(r.starts_with("250 2.0.0 complaint applied"), "{r}");
    let e = entry(addr, &msgs[5].rcpts[0]).await;
    assert_eq!(
        (e["reason"].as_str(), e["scope"].as_str()),
        (Some("complaint"), Some("example.com")),
        "{e}"
    );
    let (_, c) = get_json(addr, &format!("/v1/campaigns/{id}")).await;
    assert_eq!(c["counts"]["complained"], 1, "{c}");

    // The same report over HTTP for another job.
    let (_, dsn) = sample("postfix", &msgs[6]);
    let r = client()
        .post(url(addr, "/v1/feedback"))
        .bearer_auth(KEY)
        .header("content-type", "message/rfc822")
        .body(dsn)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let p: Value = r.json().await.unwrap();
    assert_eq!(
        (
            p["kind"].as_str(),
            p["result"].as_str(),
            p["category"].as_str()
        ),
        (Some("bounce"), Some("applied"), Some("bad-mailbox")),
        "{p}"
    );
    assert_eq!(p["recipient"], msgs[6].rcpts[0].as_str());

    let log = wait_log_kind(dir.path(), "rb", 7).await;
    let remote: Vec<&Value> = log.iter().filter(|r| r["type"] == "rb").collect();
    assert_eq!(
        remote.len(),
        7,
        "five over SMTP, one of them again, one over HTTP"
    );
    assert!(
        log.iter()
            .any(|r| r["type"] == "f" && r["feedback_type"] == "abuse")
    );
    node.shutdown().await;
}

/// Acceptance 2 and 4: what the listener refuses, and that it keeps serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_listener_refuses_relays_forgeries_and_garbage_and_keeps_serving() {
    let dir = tempfile::tempdir().unwrap();
    let (node, _sink, id, msgs) = delivered(dir.path(), 2).await;
    let listener = node.bounce_addr.expect("listener runs");
    let verp = msgs[0].mail_from.clone();
    let (mut c, _) = Smtp::connect(listener).await;
    assert!(c.cmd("EHLO relay.test").await.starts_with("250"));
    assert!(
        c.cmd("MAIL FROM:<spammer@elsewhere.test>")
            .await
            .starts_with("250")
    );
    // Relaying, a forged token, another purpose's token, the right token at another domain.
    let (local, _) = verp.split_once('@').unwrap();
    let token = local.split_once('+').unwrap().1;
    let flipped = if token.ends_with('0') { "1" } else { "0" };
    let forged = format!("{local}@bounces.example.com")
        .replace(token, &format!("{}{flipped}", &token[..token.len() - 1]));
    let trace = format!("bounce+{}@bounces.example.com", trace_token(&msgs[0].data));
    for rcpt in [
        "victim@elsewhere.test".to_owned(),
        forged,
        trace,
        format!("{local}@elsewhere.test"),
    ] {
        let r = c.cmd(&format!("RCPT TO:<{rcpt}>")).await;
        assert!(r.starts_with("550 5.7.1"), "{rcpt}: {r}");
    }
    assert!(
        c.cmd("DATA").await.starts_with("503"),
        "no recipient, no data"
    );
    // A command line of 100,000 characters.
    let r = c.cmd(&format!("NOOP {}", "x".repeat(100_000))).await;
    assert!(r.starts_with("500 5.5.2"), "{r}");
    assert!(c.cmd("NOOP").await.starts_with("250"), "still in step");
    assert!(c.cmd(&format!("RCPT TO:<{verp}>")).await.starts_with("250"));
    // A message line of 100,000 characters.
    let long = format!(
        "Subject: x\r\nContent-Type: text/plain\r\n\r\n{}\r\n",
        "y".repeat(100_000)
    );
    let r = c.data(long.as_bytes()).await;
    assert!(
        r.starts_with("554 5.6.0") && r.contains("line longer"),
        "{r}"
    );

    let refused = |name: &str, r: &str, want: &str| {
        assert!(
            r.starts_with("554 5.6.0") && r.contains(want),
            "{name}: {r}"
        );
    };
    let (_, good) = sample("postfix", &msgs[0]);
    let good = String::from_utf8(good).unwrap();
    // A multipart/report without its delivery-status part.
    let start = good.find("Content-Description: Delivery report").unwrap();
    let end = good
        .find("Content-Description: Undelivered Message Headers")
        .unwrap();
    let missing = format!("{}{}", &good[..start], &good[end..]);
    refused(
        "no status part",
        &Smtp::send(listener, &verp, missing.as_bytes()).await,
        "without a message/delivery-status part",
    );
    // Malformed status fields.
    let bad_status = good.replace("Status: 5.1.1", "Status: five-one-one");
    refused(
        "bad status",
        &Smtp::send(listener, &verp, bad_status.as_bytes()).await,
        "not a status code",
    );
    let no_action = good.replace("Action: failed\n", "");
    refused(
        "no action",
        &Smtp::send(listener, &verp, no_action.as_bytes()).await,
        "no Action field",
    );
    // 50 MB: refused whole, the connection stays usable.
    let (mut c, _) = Smtp::connect(listener).await;
    assert!(c.cmd("EHLO big.test").await.contains("SIZE 10485760"));
    assert!(
        c.cmd("MAIL FROM:<> SIZE=52428800")
            .await
            .starts_with("552 5.3.4")
    );
    assert!(c.cmd("MAIL FROM:<>").await.starts_with("250"));
    assert!(c.cmd(&format!("RCPT TO:<{verp}>")).await.starts_with("250"));
    let mut huge = b"Subject: big\r\n\r\n".to_vec();
    let line = [b'z'; 998];
    while huge.len() < 50 << 20 {
        huge.extend_from_slice(&line);
        huge.extend_from_slice(b"\r\n");
    }
    let r = c.data(&huge).await;
    assert!(r.starts_with("552 5.3.4"), "{}", &r[..r.len().min(200)]);
    assert!(c.cmd("NOOP").await.starts_with("250"));
    drop(c);

    // After all that, nothing changed and a good report still goes through.
    let (_, counts) = get_json(node.http_addr, &format!("/v1/campaigns/{id}")).await;
    assert_eq!(counts["counts"]["delivered"], 2, "{counts}");
    assert!(node.node.suppressions.is_empty());
    let r = Smtp::send(listener, &verp, good.as_bytes()).await;
    assert!(r.starts_with("250 2.0.0 bounce applied"), "{r}");
    // A reply that is not a report at all is taken and ignored.
    let r = Smtp::send(
        listener,
        &msgs[1].mail_from,
        b"From: ann@example.org\r\nSubject: Re: Hello\r\n\r\nThanks!\r\n",
    )
    .await;
    assert!(r.starts_with("250 2.0.0 ignored"), "{r}");
    // Over HTTP, garbage gets a 422 naming the body.
    let r = client()
        .post(url(node.http_addr, "/v1/feedback"))
        .bearer_auth(KEY)
        .body(missing)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 422);
    let e: Value = r.json().await.unwrap();
    assert_eq!(e["error"]["field"], "body", "{e}");
    node.shutdown().await;
}

/// Mail to postmaster (bare or at the bounce domain) and abuse@ is taken: kept for
/// `GET /v1/inbound` without an operator address, forwarded to it through delivery with one.
/// Other role-like addresses are still refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postmaster_and_abuse_mail_is_kept_or_forwarded_to_the_operator() {
    let report = b"From: Reporter <reporter@isp.test>\r\nTo: abuse@bounces.example.com\r\nSubject: Spam from your network\r\n\r\nSee the headers below.\r\n.\r\n";
    let take = |addr: std::net::SocketAddr, rcpts: &'static [&'static str]| async move {
        let (mut c, _) = Smtp::connect(addr).await;
        assert!(c.cmd("EHLO isp.test").await.starts_with("250"));
        assert!(
            c.cmd("MAIL FROM:<reporter@isp.test>")
                .await
                .starts_with("250")
        );
        for r in rcpts {
            let reply = c.cmd(&format!("RCPT TO:<{r}>")).await;
            assert!(reply.starts_with("250"), "{r}: {reply}");
        }
        for refused in ["hostmaster@bounces.example.com", "abuse@example.org"] {
            let reply = c.cmd(&format!("RCPT TO:<{refused}>")).await;
            assert!(reply.starts_with("550 5.7.1"), "{refused}: {reply}");
        }
        let r = c.data(report).await;
        c.cmd("QUIT").await;
        r
    };

    // No operator address: kept.
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path());
    cfg.bounce.listen = Some("127.0.0.1:0".parse().unwrap());
    cfg.bounce.domain = Some("bounces.example.com".into());
    let node = start(cfg).await;
    let listener = node.bounce_addr.expect("listener runs");
    let r = take(listener, &["postmaster", "Abuse@Bounces.Example.com"]).await;
    assert!(r.starts_with("250 2.0.0 kept as "), "{r}");
    let id = r.rsplit(' ').next().unwrap().to_owned();
    let (status, list) = get_json(node.http_addr, "/v1/inbound").await;
    assert_eq!(status, 200, "{list}");
    let item = &list["items"][0];
    assert_eq!(item["id"], id.as_str(), "{list}");
    assert_eq!(item["subject"], "Spam from your network");
    assert_eq!(item["from"], "Reporter <reporter@isp.test>");
    assert_eq!(item["mail_from"], "reporter@isp.test");
    assert_eq!(item["client"], "127.0.0.1");
    assert_eq!(
        item["rcpt_to"],
        json!(["postmaster", "Abuse@Bounces.Example.com"])
    );
    let raw = client()
        .get(url(node.http_addr, &format!("/v1/inbound/{id}")))
        .bearer_auth(KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(raw.status(), 200);
    assert_eq!(raw.headers()["content-type"], "message/rfc822");
    // As it arrived (the test client ends the data with one more empty line).
    let body = raw.bytes().await.unwrap();
    assert!(body.starts_with(report), "{body:?}");
    let gone = client()
        .delete(url(node.http_addr, &format!("/v1/inbound/{id}")))
        .bearer_auth(KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(gone.status(), 200);
    let (status, body) = get_json(node.http_addr, &format!("/v1/inbound/{id}")).await;
    assert_eq!(status, 404, "{body}");
    assert_eq!(body["error"]["field"], "id");
    let (_, list) = get_json(node.http_addr, "/v1/inbound").await;
    assert_eq!(list["items"], json!([]), "{list}");
    let (status, body) = get_json(node.http_addr, "/v1/inbound?limit=0").await;
    assert_eq!(
        (status, body["error"]["field"].as_str()),
        (422, Some("limit"))
    );
    node.shutdown().await;

    // An operator address: forwarded through delivery, the original attached unchanged, from
    // the null return path.
    let sink = Sink::start(SinkOptions::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = delivery_config(dir.path(), &sink);
    cfg.bounce.listen = Some("127.0.0.1:0".parse().unwrap());
    cfg.bounce.domain = Some("bounces.example.com".into());
    cfg.bounce.operator_address = Some("ops@sink.test".into());
    let node = start(cfg).await;
    let listener = node.bounce_addr.expect("listener runs");
    let r = take(listener, &["abuse@bounces.example.com"]).await;
    assert_eq!(r, "250 2.0.0 forwarded to the operator");
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while sink.messages().is_empty() {
        assert!(std::time::Instant::now() < deadline, "not forwarded");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let m = &sink.messages()[0];
    assert_eq!(m.rcpts, ["ops@sink.test"]);
    assert_eq!(m.mail_from, "", "null return path");
    assert!(
        m.data
            .contains("\r\nSubject: [abuse] Spam from your network\r\n"),
        "{}",
        m.data
    );
    assert!(
        m.data
            .contains("From: Sluice <postmaster@bounces.example.com>"),
        "{}",
        m.data
    );
    assert!(
        m.data.contains(&format!(
            "Content-Type: message/rfc822\r\nContent-Disposition: attachment; filename=\"original.eml\"\r\n\r\n{}",
            std::str::from_utf8(report).unwrap()
        )),
        "{}",
        m.data
    );
    let (_, list) = get_json(node.http_addr, "/v1/inbound").await;
    assert_eq!(list["items"], json!([]), "nothing kept: {list}");
    node.shutdown().await;
}
