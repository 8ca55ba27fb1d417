//! Message assembly end to end: what ingest refuses (templates, variables, headers, attachments),
//! and what a delivered message carries (headers, attachment, DKIM signatures), captured at an
//! in-process SMTP sink. DKIM signatures are verified independently by dkimpy in
//! `scripts/acceptance/dkim-dkimpy.sh`; here we check their presence and coverage.

use crate::common;

use std::time::Duration;

use common::sink::{Sink, SinkOptions};
use common::{KEY, client, config, post_body, spool_counts, start, url};
use serde_json::{Value, json};
use sluice::config::Config;

async fn post(addr: std::net::SocketAddr, path: &str, body: Vec<u8>) -> (u16, Value) {
    let (status, _, body) = post_body(addr, path, "application/json", body).await;
    (status, body)
}

fn campaign(extra: Value) -> Value {
    let mut c = json!({
        "from": "news@example.com",
        "subject": "Hi {{ name }}",
        "text": "Hello {{ name }}",
        "recipients": [{"email": "a@example.org", "vars": {"name": "Ann"}}],
    });
    if let (Some(c), Some(extra)) = (c.as_object_mut(), extra.as_object()) {
        for (k, v) in extra {
            c.insert(k.clone(), v.clone());
        }
    }
    c
}

fn small_attachments(spool: &std::path::Path) -> Config {
    let mut c = config(spool);
    c.limits.max_attachment_bytes = 1000;
    c
}

#[tokio::test]
async fn bad_templates_headers_and_attachments_are_refused_and_change_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let node = start(small_attachments(dir.path())).await;
    let addr = node.http_addr;
    let before = spool_counts(&node).await;
    let refused = |body: Value| async move {
        let (s, b) = post(addr, "/v1/campaigns", serde_json::to_vec(&body).unwrap()).await;
        (s, b["error"]["field"].as_str().unwrap_or("").to_owned(), b)
    };

    let (s, field, b) = refused(campaign(json!({"text": "Hello\n{{ name }"}))).await;
    assert_eq!((s, field.as_str()), (422, "text"), "{b}");
    assert!(
        b["error"]["message"]
            .as_str()
            .unwrap()
            .contains("syntax error on line 2"),
        "{b}"
    );

    let (s, field, b) = refused(campaign(json!({"headers": {"X-Note": "a\r\nBcc: x@y"}}))).await;
    assert_eq!((s, field.as_str()), (422, "headers.X-Note"), "{b}");
    let (s, field, b) = refused(campaign(
        json!({"headers": {"List-Unsubscribe": "<https://evil.example/>"}}),
    ))
    .await;
    assert_eq!(
        (s, field.as_str()),
        (422, "headers.List-Unsubscribe"),
        "{b}"
    );

    let attachment = |name: &str, ct: &str, b64: &str| json!({"attachments": [{"filename": name, "content_type": ct, "content_base64": b64}]});
    let (s, field, b) = refused(campaign(attachment(
        "a.pdf",
        "application/pdf",
        &"QUFB".repeat(400),
    )))
    .await;
    assert_eq!(
        (s, field.as_str()),
        (422, "attachments[0].content_base64"),
        "oversized: {b}"
    );
    assert!(
        b["error"]["message"]
            .as_str()
            .unwrap()
            .contains("1000 bytes"),
        "{b}"
    );
    let (s, field, b) = refused(campaign(attachment(
        "a.pdf",
        "application/pdf",
        "not base64!",
    )))
    .await;
    assert_eq!(
        (s, field.as_str()),
        (422, "attachments[0].content_base64"),
        "{b}"
    );
    let (s, field, b) = refused(campaign(attachment(
        "a\r\nb.pdf",
        "application/pdf",
        "QUFB",
    )))
    .await;
    assert_eq!((s, field.as_str()), (422, "attachments[0].filename"), "{b}");
    let (s, field, b) = refused(campaign(attachment("a.eml", "message/rfc822", "QUFB"))).await;
    assert_eq!(
        (s, field.as_str()),
        (422, "attachments[0].content_type"),
        "{b}"
    );

    // A file name that is not UTF-8: a lone surrogate escape, and raw bytes that are not UTF-8.
    let body =
        serde_json::to_string(&campaign(attachment("NAME", "application/pdf", "QUFB"))).unwrap();
    let escaped = body.replace("NAME", "\\udc80.pdf");
    let (s, b) = post(addr, "/v1/campaigns", escaped.into_bytes()).await;
    assert_eq!(s, 400, "{b}");
    assert!(
        b["error"]["message"]
            .as_str()
            .unwrap()
            .contains("surrogate"),
        "{b}"
    );
    assert_eq!(b["error"]["field"], "attachments[0].filename", "{b}");
    let mut raw = body.replace("NAME", "\u{1}").into_bytes();
    let at = raw.iter().position(|&c| c == 1).unwrap();
    raw.splice(at..=at, [0xff, 0xfe]);
    let (s, b) = post(addr, "/v1/campaigns", raw).await;
    assert_eq!(s, 400, "{b}");
    assert!(
        b["error"]["message"].as_str().unwrap().contains("UTF-8"),
        "{b}"
    );
    assert_eq!(b["error"]["field"], "attachments[0].filename", "{b}");

    assert_eq!(spool_counts(&node).await, before, "nothing was written");
    assert_eq!(node.node.campaigns.len(), 0);
    assert_eq!(node.node.scheduler.len(), 0);
    node.shutdown().await;
}

#[tokio::test]
async fn recipients_whose_variables_cannot_render_are_rejected_alone() {
    let dir = tempfile::tempdir().unwrap();
    let node = start(config(dir.path())).await;
    let body = json!({
        "from": "news@example.com",
        "subject": "Hi {{ name }}",
        "text": "Your items:{% for i in items %} {{ i }}{% endfor %}",
        "recipients": [
            {"email": "ok@example.org", "vars": {"name": "Ann", "items": [1, 2]}},
            {"email": "missing@example.org", "vars": {"items": []}},
            {"email": "wrongtype@example.org", "vars": {"name": "Bob", "items": 7}},
            {"email": "inject@example.org", "vars": {"name": "x\nBcc: all@example.com", "items": []}},
            {"email": "ok2@example.org", "vars": {"name": "Cy", "items": []}},
        ],
    });
    let (s, b) = post(
        node.http_addr,
        "/v1/campaigns",
        serde_json::to_vec(&body).unwrap(),
    )
    .await;
    assert_eq!(s, 202, "{b}");
    assert_eq!(b["accepted"], 2, "{b}");
    let rejected: Vec<(String, String)> = b["rejected"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["field"].as_str().unwrap().to_owned(),
                r["error"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    assert_eq!(rejected.len(), 3, "{b}");
    assert_eq!(rejected[0].0, "recipients[1].vars.name");
    assert!(rejected[0].1.contains("subject template"), "{rejected:?}");
    assert_eq!(rejected[1].0, "recipients[2].vars");
    assert!(rejected[1].1.contains("text template"), "{rejected:?}");
    assert_eq!(rejected[2].0, "recipients[3].vars.name");
    assert!(rejected[2].1.contains("CR or LF"), "{rejected:?}");
    let id = b["id"].as_str().unwrap();
    let got: Value = client()
        .get(url(node.http_addr, &format!("/v1/campaigns/{id}")))
        .bearer_auth(KEY)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(got["counts"]["queued"], 2, "{got}");
    assert_eq!(node.node.scheduler.len(), 2);
    node.shutdown().await;
}

/// Unfolds header fields and returns the value of the first one named `name`.
fn header(data: &str, name: &str) -> Option<String> {
    let head = data.split("\r\n\r\n").next()?;
    let mut fields: Vec<String> = Vec::new();
    for line in head.split("\r\n") {
        if line.starts_with([' ', '\t']) {
            if let Some(last) = fields.last_mut() {
                last.push_str(line);
            }
        } else {
            fields.push(line.to_owned());
        }
    }
    fields.into_iter().find_map(|f| {
        let (n, v) = f.split_once(':')?;
        n.eq_ignore_ascii_case(name).then(|| v.trim().to_owned())
    })
}

#[tokio::test]
async fn delivered_messages_carry_signed_unsubscribe_headers_and_the_attachment() {
    let sink = Sink::start(SinkOptions::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let keys = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/dkim");
    let text = format!(
        "[http]\nlisten = \"127.0.0.1:0\"\n[auth]\napi_keys = [\"{KEY}\"]\n[secrets]\ntoken_keys = [\"test-token-key-0123456789\"]\n[spool]\npath = \"{spool}\"\n\
         [log]\nlevel = \"warn\"\ndelivery_log = \"{spool}/delivery.jsonl\"\n\
         [delivery]\nehlo_name = \"mta.example.com\"\nretry_initial = \"1s\"\n\
         [[route]]\ndomain = \"sink.test\"\nrelay = \"{sink}\"\n\
         [bounce]\ndomain = \"bounces.example.com\"\n\
         [message]\nunsubscribe_url = \"https://mta.example.com/u/\"\nunsubscribe_mailto = \"unsub@bounces.example.com\"\n\
         [[dkim]]\ndomain = \"example.com\"\nselector = \"rsa\"\nalgorithm = \"rsa-sha256\"\nkey_file = \"{keys}/rsa2048.pem\"\n\
         [[dkim]]\ndomain = \"example.com\"\nselector = \"ed\"\nalgorithm = \"ed25519-sha256\"\nkey_file = \"{keys}/ed25519.pem\"\n",
        spool = dir.path().display(),
        sink = sink.addr,
        keys = keys.display(),
    );
    let config = Config::from_toml("test.toml", &text, None).unwrap();
    let node = start(config).await;
    let body = json!({
        "from": "news@example.com",
        "from_name": "Zoë's News",
        "subject": "Grüße {{ name }}",
        "text": "Hallo {{ name }}\n.a dot line\n",
        "html": "<p>Hallo {{ name }}</p>",
        "attachments": [{"filename": "prix.txt", "content_type": "text/plain", "content_base64": "cHJpeAo="}],
        "recipients": [{"email": "ann@sink.test", "vars": {"name": "Änn"}}],
    });
    let (s, b) = post(
        node.http_addr,
        "/v1/campaigns",
        serde_json::to_vec(&body).unwrap(),
    )
    .await;
    assert_eq!(s, 202, "{b}");
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while sink.messages().is_empty() {
        assert!(std::time::Instant::now() < deadline, "nothing delivered");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let m = &sink.messages()[0];
    assert!(
        m.mail_from.starts_with("bounce+") && m.mail_from.ends_with("@bounces.example.com"),
        "{}",
        m.mail_from
    );
    let d = &m.data;
    let lu = header(d, "List-Unsubscribe").expect("List-Unsubscribe");
    assert!(lu.starts_with("<https://mta.example.com/u/"), "{lu}");
    assert!(lu.contains("<mailto:unsub+"), "{lu}");
    assert_eq!(
        header(d, "List-Unsubscribe-Post").as_deref(),
        Some("List-Unsubscribe=One-Click")
    );
    assert!(header(d, "Feedback-ID").is_some_and(|f| f.ends_with(":bulk:sluice")));
    // The trace and unsubscribe tokens authenticate and name this recipient's job.
    let tokens = node.node.assembler.tokens();
    let trace = header(d, "X-Sluice-Ref").expect("trace header");
    let job = tokens
        .verify(sluice::outbound::tokens::Purpose::Trace, &trace)
        .expect("the trace token authenticates");
    let unsub = lu
        .trim_start_matches("<https://mta.example.com/u/")
        .split('>')
        .next()
        .unwrap_or_default();
    assert_eq!(
        tokens.verify(sluice::outbound::tokens::Purpose::Unsubscribe, unsub),
        Some(job)
    );
    assert_eq!(
        tokens.verify(sluice::outbound::tokens::Purpose::Verp, &trace),
        None
    );
    assert!(d.contains("filename=\"prix.txt\""), "{d}");
    // A text attachment goes quoted-printable ("prix\n"); a binary one would be base64.
    assert!(d.contains("prix=0A") || d.contains("cHJpeAo="), "{d}");
    let sigs: Vec<&str> = d.split("DKIM-Signature:").skip(1).collect();
    assert_eq!(sigs.len(), 2, "{d}");
    for s in sigs {
        let tags: String = s
            .split("\r\n")
            .take_while(|l| !l.contains(':') || l.starts_with([' ', '\t']) || l.contains("v=1"))
            .collect::<String>()
            .split_whitespace()
            .collect();
        let h = tags
            .split(';')
            .find_map(|t| t.strip_prefix("h="))
            .unwrap_or_else(|| panic!("h= in {tags}"))
            .to_ascii_lowercase();
        for name in ["from", "list-unsubscribe", "list-unsubscribe-post"] {
            assert!(h.split(':').any(|n| n == name), "{name} signed: {h}");
        }
        assert!(tags.contains("d=example.com"), "{tags}");
    }
    node.shutdown().await;
}

fn dkim_config(spool: &std::path::Path, sink: std::net::SocketAddr, selector: &str) -> Config {
    let keys = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/dkim");
    let text = format!(
        "[http]\nlisten = \"127.0.0.1:0\"\n[auth]\napi_keys = [\"{KEY}\"]\n[secrets]\ntoken_keys = [\"test-token-key-0123456789\"]\n[spool]\npath = \"{spool}\"\n\
         [log]\nlevel = \"warn\"\ndelivery_log = \"{spool}/delivery.jsonl\"\n\
         [delivery]\nehlo_name = \"mta.example.com\"\nretry_initial = \"1s\"\nretry_max = \"1s\"\n\
         [[route]]\ndomain = \"sink.test\"\nrelay = \"{sink}\"\n\
         [[dkim]]\ndomain = \"example.com\"\nselector = \"{selector}\"\nalgorithm = \"rsa-sha256\"\nkey_file = \"{keys}/rsa2048.pem\"\n",
        spool = spool.display(),
        keys = keys.display(),
    );
    Config::from_toml("test.toml", &text, None).unwrap()
}

fn selectors(data: &str) -> Vec<String> {
    data.split("DKIM-Signature:")
        .skip(1)
        .filter_map(|s| {
            let compact: String = s.split_whitespace().collect();
            compact
                .split(';')
                .find_map(|t| t.strip_prefix("s=").map(str::to_owned))
        })
        .collect()
}

/// Key rotation: mail queued under the old selector goes out signed with the new one, after a
/// reload (SIGHUP's path) and after a restart, and nothing queued is lost.
#[tokio::test]
async fn rotated_keys_sign_queued_mail_after_reload_and_restart() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};
    let accept = Arc::new(AtomicBool::new(false));
    let attempts = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let (gate, seen) = (Arc::clone(&accept), Arc::clone(&attempts));
    let sink = Sink::start(SinkOptions {
        rcpt: Arc::new(move |_, _| {
            seen.fetch_add(1, Ordering::SeqCst);
            if gate.load(Ordering::SeqCst) {
                "250 2.1.5 ok".to_owned()
            } else {
                "451 4.3.0 try later".to_owned()
            }
        }),
        ..SinkOptions::default()
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let node = start(dkim_config(dir.path(), sink.addr, "old")).await;
    let body = json!({
        "from": "news@example.com", "subject": "s", "text": "t",
        "recipients": [{"email": "a@sink.test"}, {"email": "b@sink.test"}],
    });
    let (s, b) = post(
        node.http_addr,
        "/v1/campaigns",
        serde_json::to_vec(&body).unwrap(),
    )
    .await;
    assert_eq!(s, 202, "{b}");
    // Both recipients deferred once while "old" is the key.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while attempts.load(Ordering::SeqCst) < 2 {
        assert!(std::time::Instant::now() < deadline, "no attempt");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    node.reload(Arc::new(dkim_config(dir.path(), sink.addr, "new")))
        .await
        .expect("reload");
    // Restart too, with the same rotated config: the queue survives and the new key signs.
    node.shutdown().await;
    let node = start(dkim_config(dir.path(), sink.addr, "new")).await;
    accept.store(true, Ordering::SeqCst);
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while sink.messages().len() < 2 {
        assert!(
            std::time::Instant::now() < deadline,
            "queued mail was not delivered"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for m in sink.messages() {
        assert_eq!(selectors(&m.data), vec!["new"], "{}", m.data);
    }
    node.shutdown().await;
}

#[tokio::test]
async fn reload_swaps_keys_in_place_and_keeps_them_on_error() {
    let sink = Sink::start(SinkOptions::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let node = start(dkim_config(dir.path(), sink.addr, "old")).await;
    let send = |to: &'static str| {
        let addr = node.http_addr;
        async move {
            let body = json!({"from": "news@example.com", "subject": "s", "text": "t", "to": to});
            let (s, b) = post(addr, "/v1/messages", serde_json::to_vec(&body).unwrap()).await;
            assert_eq!(s, 202, "{b}");
        }
    };
    let wait = |n: usize| {
        let sink = &sink;
        async move {
            let deadline = std::time::Instant::now() + Duration::from_secs(20);
            while sink.messages().len() < n {
                assert!(std::time::Instant::now() < deadline, "not delivered");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    };
    send("a@sink.test").await;
    wait(1).await;
    node.reload(std::sync::Arc::new(dkim_config(
        dir.path(),
        sink.addr,
        "new",
    )))
    .await
    .expect("reload");
    send("b@sink.test").await;
    wait(2).await;
    let mut bad = dkim_config(dir.path(), sink.addr, "broken");
    bad.dkim[0].key_file = "/nonexistent/key.pem".into();
    let e = node.reload(std::sync::Arc::new(bad)).await.unwrap_err();
    assert!(e.to_string().contains("dkim[0].key_file"), "{e}");
    send("c@sink.test").await;
    wait(3).await;
    let got: Vec<(String, Vec<String>)> = sink
        .messages()
        .into_iter()
        .map(|m| (m.rcpts[0].clone(), selectors(&m.data)))
        .collect();
    let of = |r: &str| got.iter().find(|(x, _)| x == r).map(|(_, s)| s.clone());
    assert_eq!(of("a@sink.test"), Some(vec!["old".to_owned()]));
    assert_eq!(of("b@sink.test"), Some(vec!["new".to_owned()]));
    assert_eq!(
        of("c@sink.test"),
        Some(vec!["new".to_owned()]),
        "a failed reload keeps the keys"
    );
    node.shutdown().await;
}
