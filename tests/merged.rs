//! Campaigns that are not personalised (`"personalised": false`): one signed message per
//! transaction to several recipients of a domain, each recipient's outcome from its own RCPT
//! reply, and reports about such a message mapped to the recipient they name.

use crate::common;

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use common::sink::{Sink, SinkOptions};
use common::{
    delivery_config, get_json, post_body, post_json, report_eml, trace_token, wait_counts, wait_log,
};
use serde_json::{Value, json};
use sluice::config::{DkimAlgorithm, DkimEntry};
use sluice::outbound::tokens::Purpose;

const MAX_RCPT: usize = 20;

async fn feedback(addr: std::net::SocketAddr, body: Vec<u8>) -> Value {
    let (status, _, p) = post_body(addr, "/v1/feedback", "message/rfc822", body).await;
    assert_eq!(status, 200, "{p}");
    p
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_signed_message_goes_to_several_recipients() {
    let sink = Sink::start(SinkOptions {
        rcpt: Arc::new(|rcpt, _| {
            if rcpt == "user7@sink.test" {
                "550 5.1.1 no such user".to_owned()
            } else {
                "250 2.1.5 ok".to_owned()
            }
        }),
        ..SinkOptions::default()
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = delivery_config(dir.path(), &sink);
    cfg.shaping.max_recipients_per_message = MAX_RCPT as u32;
    cfg.dkim.push(DkimEntry {
        domain: "example.com".into(),
        selector: "s1".into(),
        algorithm: DkimAlgorithm::RsaSha256,
        key_file: std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/data/dkim/rsa2048.pem"),
    });
    let node = common::start(cfg).await;
    let addr = node.http_addr;
    let recipients: Vec<Value> = (0..45)
        .map(|i| json!({"email": format!("user{i}@sink.test")}))
        .collect();
    let (status, body) = post_json(
        addr,
        "/v1/campaigns",
        &json!({"from": "news@example.com", "subject": "Spring news", "text": "The same for everyone.\n",
                "personalised": false, "recipients": recipients}),
    )
    .await;
    assert_eq!(status, 202, "{body}");
    let id = body["id"].as_str().unwrap().to_owned();
    let counts = wait_counts(addr, &id, Duration::from_secs(20), |c| {
        c["delivered"] == 44 && c["bounced"] == 1
    })
    .await;
    assert_eq!(counts["queued"], 0, "{counts}");

    let msgs = sink.messages();
    let delivered: usize = msgs.iter().map(|m| m.rcpts.len()).sum();
    assert_eq!(delivered, 44);
    assert!(
        msgs.len() <= 8 && msgs.len() >= 45usize.div_ceil(MAX_RCPT),
        "{} messages for 45 recipients, at most {MAX_RCPT} each",
        msgs.len()
    );
    let mut seen = HashSet::new();
    for m in &msgs {
        assert!(m.rcpts.len() <= MAX_RCPT, "{:?}", m.rcpts);
        assert!(m.rcpts.iter().all(|r| seen.insert(r.clone())), "sent twice");
        assert!(
            m.data.contains("To: undisclosed-recipients:;\r\n"),
            "{}",
            m.data
        );
        let head = m
            .data
            .split("\r\n\r\n")
            .next()
            .unwrap()
            .replace("\r\n\t", " ");
        assert!(
            !head.lines().any(|l| l.starts_with("List-Unsubscribe")),
            "{head}"
        );
        assert!(
            !m.data.contains("sink.test"),
            "no recipient sees another: {}",
            m.data
        );
        assert_eq!(m.data.matches("DKIM-Signature:").count(), 1, "signed once");
    }
    // Every recipient's outcome is in the delivery log, with the envelope sender it was sent with.
    let log = wait_log(dir.path(), 45).await;
    assert_eq!(log.iter().filter(|r| r["type"] == "d").count(), 44);
    let bounced: Vec<&Value> = log.iter().filter(|r| r["type"] == "b").collect();
    assert_eq!(bounced.len(), 1);
    assert_eq!(bounced[0]["recipient"], "user7@sink.test");
    for m in &msgs {
        for r in &m.rcpts {
            let rec = log.iter().find(|l| l["recipient"] == r.as_str()).unwrap();
            assert_eq!(rec["sender"], m.mail_from.as_str(), "{rec}");
        }
    }

    // A DSN about the second recipient of a shared message reaches that recipient's job,
    // though its VERP address and trace header name the first one's.
    let m = msgs
        .iter()
        .find(|m| m.rcpts.len() >= 3)
        .expect("a merged message");
    let reference = trace_token(&m.data);
    let tokens = node.node.assembler.tokens();
    let lead = tokens.verify(Purpose::Trace, &reference).unwrap();
    let p = feedback(
        addr,
        report_eml("postfix", &m.mail_from, &m.rcpts[1], &reference),
    )
    .await;
    assert_eq!(
        (p["kind"].as_str(), p["result"].as_str()),
        (Some("bounce"), Some("applied")),
        "{p}"
    );
    assert_eq!(p["recipient"], m.rcpts[1].as_str(), "{p}");
    assert_ne!(p["job"], lead.to_string().as_str(), "{p}");
    let (_, e) = get_json(addr, &format!("/v1/suppressions/{}", m.rcpts[1])).await;
    assert_eq!(e["entries"][0]["reason"], "hard_bounce", "{e}");
    assert_eq!(e["entries"][0]["job"], p["job"], "{e}");
    let (_, c) = get_json(addr, &format!("/v1/campaigns/{id}")).await;
    assert_eq!(c["counts"]["bounced"], 2, "{c}");

    // A complaint naming the third recipient suppresses that one; one that redacts the
    // recipient cannot say who of the message's recipients it was, and changes nothing.
    let redacted = report_eml("arf-redacted", &m.mail_from, "", &reference);
    let p = feedback(addr, redacted.clone()).await;
    assert_eq!(
        (p["kind"].as_str(), p["result"].as_str()),
        (Some("complaint"), Some("unmapped")),
        "{p}"
    );
    assert_eq!(p["campaign"], id.as_str(), "{p}");
    let named = String::from_utf8(redacted).unwrap().replace(
        "Original-Rcpt-To: redacted@redacted",
        &format!("Original-Rcpt-To: {}", m.rcpts[2]),
    );
    let p = feedback(addr, named.into_bytes()).await;
    assert_eq!(
        (p["kind"].as_str(), p["result"].as_str()),
        (Some("complaint"), Some("applied")),
        "{p}"
    );
    assert_eq!(p["recipient"], m.rcpts[2].as_str(), "{p}");
    let (_, c) = get_json(addr, &format!("/v1/campaigns/{id}")).await;
    assert_eq!(c["counts"]["complained"], 1, "{c}");
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn variables_are_refused_where_every_recipient_gets_the_same_message() {
    let dir = tempfile::tempdir().unwrap();
    let node = common::start(common::config(dir.path())).await;
    let addr = node.http_addr;
    let (status, e) = post_json(
        addr,
        "/v1/campaigns",
        &json!({"from": "news@example.com", "subject": "Hi", "text": "Hello {{ name }}",
                "personalised": false, "recipients": [{"email": "a@example.org"}]}),
    )
    .await;
    assert_eq!(status, 422, "{e}");
    assert_eq!(e["error"]["field"], "text", "{e}");
    assert!(
        e["error"]["message"].as_str().unwrap().contains("name"),
        "{e}"
    );
    let (status, e) = post_json(
        addr,
        "/v1/messages",
        &json!({"from": "news@example.com", "subject": "Hi", "text": "Hello",
                "personalised": false, "to": "a@example.org"}),
    )
    .await;
    assert_eq!(status, 422, "{e}");
    assert_eq!(e["error"]["field"], "personalised", "{e}");
    // A recipient with variables is refused on its own; the others are accepted.
    let (status, body) = post_json(
        addr,
        "/v1/campaigns",
        &json!({"from": "news@example.com", "subject": "Hi", "text": "Hello",
                "personalised": false,
                "recipients": [{"email": "a@example.org", "vars": {}}, {"email": "b@example.org", "vars": {"name": "B"}},
                               {"email": "c@example.org"}]}),
    )
    .await;
    assert_eq!(status, 202, "{body}");
    assert_eq!(body["accepted"], 2, "{body}");
    assert_eq!(body["rejected"][0]["field"], "recipients[1].vars", "{body}");
    // The campaign says what it is, and keeps saying so after a restart.
    let path = format!("/v1/campaigns/{}", body["id"].as_str().unwrap());
    let (_, c) = get_json(addr, &path).await;
    assert_eq!(c["personalised"], false, "{c}");
    node.shutdown().await;
    let node = common::start(common::config(dir.path())).await;
    let (_, c) = get_json(node.http_addr, &path).await;
    assert_eq!(c["personalised"], false, "{c}");
    assert_eq!(c["counts"]["queued"], 2, "{c}");
    node.shutdown().await;
}
