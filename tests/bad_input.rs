//! Bad input, table-driven: each request gets the right status and a JSON error naming the
//! problem, and the spool is unchanged afterwards.

use crate::common;

use common::{KEY, client, config, spool_counts, start, url};
use serde_json::{Value, json};

struct Case {
    name: &'static str,
    path: String,
    content_type: &'static str,
    key: Option<&'static str>,
    body: Vec<u8>,
    status: u16,
    code: &'static str,
    field: Option<&'static str>,
    message_has: &'static str,
}

fn case(
    name: &'static str,
    path: &str,
    body: Value,
    status: u16,
    code: &'static str,
    field: Option<&'static str>,
    message_has: &'static str,
) -> Case {
    Case {
        name,
        path: path.to_owned(),
        content_type: "application/json",
        key: Some(KEY),
        body: serde_json::to_vec(&body).unwrap(),
        status,
        code,
        field,
        message_has,
    }
}

fn good() -> Value {
    json!({"from": "news@example.com", "subject": "Hi {{ name }}", "text": "Hello {{ name }}",
           "recipients": [{"email": "a@example.com", "vars": {"name": "A"}}]})
}

fn with(mut v: Value, key: &str, value: Value) -> Value {
    v[key] = value;
    v
}

fn without(mut v: Value, key: &str) -> Value {
    v.as_object_mut().unwrap().remove(key);
    v
}

#[tokio::test]
async fn bad_requests_are_refused_and_change_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path());
    cfg.limits.max_request_bytes = 64 * 1024;
    cfg.limits.max_recipients_per_request = 100;
    cfg.limits.max_recipients_per_upload = 1000;
    let node = start(cfg).await;
    let addr = node.http_addr;

    // One existing campaign, so that NDJSON cases have a target.
    let r = client()
        .post(url(addr, "/v1/campaigns"))
        .bearer_auth(KEY)
        .json(&good())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    let id = r.json::<Value>().await.unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let recipients = format!("/v1/campaigns/{id}/recipients");
    let unknown = "0190f0f0-0000-7000-8000-000000000000";

    let long_local = format!("{}@example.com", "a".repeat(65));
    let long_domain = format!("a@{}.com", vec!["b".repeat(60); 5].join("."));
    let mut cases = vec![
        Case {
            body: b"{\"from\": \"a@example.com\", ".to_vec(),
            ..case(
                "truncated JSON",
                "/v1/campaigns",
                json!(null),
                400,
                "malformed_json",
                None,
                "not valid JSON",
            )
        },
        Case {
            body: b"[1,2".to_vec(),
            ..case(
                "not JSON",
                "/v1/messages",
                json!(null),
                400,
                "malformed_json",
                None,
                "not valid JSON",
            )
        },
        Case {
            body: [serde_json::to_vec(&good()).unwrap(), b" trailing".to_vec()].concat(),
            ..case(
                "trailing garbage",
                "/v1/campaigns",
                json!(null),
                400,
                "malformed_json",
                None,
                "trailing",
            )
        },
        Case {
            content_type: "text/plain",
            ..case(
                "wrong content type",
                "/v1/campaigns",
                good(),
                415,
                "unsupported_media_type",
                Some("Content-Type"),
                "application/json",
            )
        },
        Case {
            content_type: "application/json",
            ..case(
                "JSON to the NDJSON endpoint",
                &recipients,
                good(),
                415,
                "unsupported_media_type",
                Some("Content-Type"),
                "ndjson",
            )
        },
        case(
            "send_at more than a year ahead",
            "/v1/campaigns",
            with(good(), "send_at", json!("2099-01-01T00:00:00Z")),
            422,
            "invalid_field",
            Some("send_at"),
            "more than a year ahead",
        ),
        case(
            "send_at not RFC 3339",
            "/v1/messages",
            json!({"from": "a@example.com", "to": "b@example.com", "subject": "s", "text": "t",
                   "send_at": "next tuesday"}),
            422,
            "invalid_field",
            Some("send_at"),
            "RFC 3339",
        ),
        case(
            "unknown priority",
            "/v1/campaigns",
            with(good(), "priority", json!("urgent")),
            422,
            "invalid_field",
            Some("priority"),
            "\"low\", \"normal\", \"high\"",
        ),
        case(
            "weight out of range",
            "/v1/campaigns",
            with(good(), "weight", json!(0)),
            422,
            "invalid_field",
            Some("weight"),
            "from 1 to 1000",
        ),
        case(
            "max_rate not a rate",
            "/v1/campaigns",
            with(good(), "max_rate", json!("10 per hour")),
            422,
            "invalid_field",
            Some("max_rate"),
            "not a rate",
        ),
        case(
            "weight on a message",
            "/v1/messages",
            json!({"from": "a@example.com", "to": "b@example.com", "subject": "s", "text": "t",
                   "weight": 2}),
            422,
            "invalid_field",
            Some("weight"),
            "only campaigns",
        ),
        case(
            "missing from",
            "/v1/campaigns",
            without(good(), "from"),
            422,
            "invalid_field",
            Some("from"),
            "missing field `from`",
        ),
        case(
            "missing subject",
            "/v1/campaigns",
            without(good(), "subject"),
            422,
            "invalid_field",
            Some("subject"),
            "missing field `subject`",
        ),
        case(
            "no body part",
            "/v1/campaigns",
            without(good(), "text"),
            422,
            "invalid_field",
            Some("text"),
            "text or an html part",
        ),
        case(
            "unknown field",
            "/v1/campaigns",
            with(good(), "form", json!("x")),
            422,
            "invalid_field",
            Some("form"),
            "unknown field `form`",
        ),
        case(
            "wrong type",
            "/v1/campaigns",
            with(good(), "tags", json!("weekly")),
            422,
            "invalid_field",
            Some("tags"),
            "expected a sequence",
        ),
        case(
            "recipient email wrong type",
            "/v1/campaigns",
            with(good(), "recipients", json!(5)),
            422,
            "invalid_field",
            Some("recipients"),
            "expected a sequence",
        ),
        case(
            "invalid from",
            "/v1/campaigns",
            with(good(), "from", json!("news at example.com")),
            422,
            "invalid_field",
            Some("from"),
            "no '@'",
        ),
        case(
            "local part too long",
            "/v1/campaigns",
            with(good(), "from", json!(long_local)),
            422,
            "invalid_field",
            Some("from"),
            "longer than 64",
        ),
        case(
            "domain too long",
            "/v1/campaigns",
            with(good(), "reply_to", json!(long_domain)),
            422,
            "invalid_field",
            Some("reply_to"),
            "255",
        ),
        case(
            "template syntax error",
            "/v1/campaigns",
            with(good(), "html", json!("<p>\n{% if name %}\n{{ name }")),
            422,
            "invalid_field",
            Some("html"),
            "line 3",
        ),
        case(
            "CRLF in subject",
            "/v1/campaigns",
            with(good(), "subject", json!("Hi\r\nBcc: all@example.com")),
            422,
            "invalid_field",
            Some("subject"),
            "CR or LF",
        ),
        case(
            "CRLF in header",
            "/v1/campaigns",
            with(
                good(),
                "headers",
                json!({"X-Campaign": "a\nBcc: x@example.com"}),
            ),
            422,
            "invalid_field",
            Some("headers.X-Campaign"),
            "CR or LF",
        ),
        case(
            "reserved header",
            "/v1/campaigns",
            with(good(), "headers", json!({"DKIM-Signature": "v=1"})),
            422,
            "invalid_field",
            Some("headers.DKIM-Signature"),
            "set by Sluice",
        ),
        case(
            "CRLF in header variable",
            "/v1/messages",
            json!({"from": "a@example.com", "subject": "Hi {{ name }}", "text": "t", "to": "b@example.com", "vars": {"name": "x\r\nBcc: v@example.com"}}),
            422,
            "invalid_field",
            Some("vars.name"),
            "CR or LF",
        ),
        case(
            "bad message recipient",
            "/v1/messages",
            json!({"from": "a@example.com", "subject": "s", "text": "t", "to": long_local}),
            422,
            "invalid_field",
            Some("to"),
            "longer than 64",
        ),
        case(
            "message without to",
            "/v1/messages",
            json!({"from": "a@example.com", "subject": "s", "text": "t"}),
            422,
            "invalid_field",
            Some("to"),
            "missing field `to`",
        ),
        case(
            "recipients on a message",
            "/v1/messages",
            with(good(), "to", json!("b@example.com")),
            422,
            "invalid_field",
            Some("recipients"),
            "one recipient",
        ),
        case(
            "to on a campaign",
            "/v1/campaigns",
            with(good(), "to", json!("b@example.com")),
            422,
            "invalid_field",
            Some("to"),
            "not a campaign field",
        ),
        case(
            "too many recipients",
            "/v1/campaigns",
            with(
                good(),
                "recipients",
                json!(
                    (0..101)
                        .map(|i| json!({"email": format!("u{i}@example.com")}))
                        .collect::<Vec<_>>()
                ),
            ),
            413,
            "too_many_recipients",
            Some("recipients"),
            "NDJSON",
        ),
        case(
            "body over the limit",
            "/v1/campaigns",
            with(good(), "text", json!("x".repeat(70_000))),
            413,
            "body_too_large",
            None,
            "larger than 65536",
        ),
        Case {
            key: None,
            ..case(
                "missing API key",
                "/v1/campaigns",
                good(),
                401,
                "unauthorized",
                Some("Authorization"),
                "Bearer",
            )
        },
        Case {
            key: Some("wrong-key-0123456789"),
            ..case(
                "unknown API key",
                "/v1/campaigns",
                good(),
                401,
                "unauthorized",
                Some("Authorization"),
                "invalid API key",
            )
        },
        case(
            "unknown campaign",
            &format!("/v1/campaigns/{unknown}/pause"),
            json!({}),
            404,
            "campaign_not_found",
            Some("id"),
            unknown,
        ),
        case(
            "malformed campaign id",
            "/v1/campaigns/42/cancel",
            json!({}),
            404,
            "campaign_not_found",
            Some("id"),
            "42",
        ),
        Case {
            content_type: "application/x-ndjson",
            body: b"{\"email\":\"a@example.com\"}\n".to_vec(),
            ..case(
                "recipients for an unknown campaign",
                &format!("/v1/campaigns/{unknown}/recipients"),
                json!(null),
                404,
                "campaign_not_found",
                Some("id"),
                unknown,
            )
        },
        Case {
            content_type: "application/x-ndjson",
            body: (0..1001)
                .map(|i| format!("{{\"email\":\"u{i}@example.com\"}}\n"))
                .collect::<String>()
                .into_bytes(),
            ..case(
                "upload over the recipient limit",
                &recipients,
                json!(null),
                413,
                "too_many_recipients",
                None,
                "nothing was accepted",
            )
        },
    ];
    cases.push(Case {
        path: "/v1/nope".into(),
        ..case(
            "unknown route",
            "/v1/nope",
            json!({}),
            404,
            "not_found",
            None,
            "no such",
        )
    });

    for c in cases {
        let before = spool_counts(&node).await;
        let mut req = client()
            .post(url(addr, &c.path))
            .header("content-type", c.content_type)
            .body(c.body.clone());
        if let Some(k) = c.key {
            req = req.bearer_auth(k);
        }
        let resp = req.send().await.unwrap();
        let status = resp.status().as_u16();
        let body: Value = resp.json().await.unwrap_or(Value::Null);
        assert_eq!(status, c.status, "{}: {body}", c.name);
        let error = &body["error"];
        assert_eq!(error["code"], c.code, "{}: {body}", c.name);
        let message = error["message"].as_str().unwrap_or_default();
        assert!(
            message.contains(c.message_has),
            "{}: message {message:?} lacks {:?}",
            c.name,
            c.message_has
        );
        if let Some(field) = c.field {
            assert_eq!(error["field"], field, "{}: {body}", c.name);
        }
        // The NDJSON rollback of an over-limit upload runs as the request ends; give it a moment.
        let mut after = spool_counts(&node).await;
        for _ in 0..100 {
            if after == before {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            after = spool_counts(&node).await;
        }
        assert_eq!(after, before, "{}: the spool changed", c.name);
    }
    let r = client()
        .get(url(addr, &format!("/v1/campaigns/{id}")))
        .bearer_auth(KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(r.json::<Value>().await.unwrap()["counts"]["queued"], 1);

    // A send_at already past is accepted as "now": nothing is scheduled.
    let (status, got) = common::post_json(
        addr,
        "/v1/campaigns",
        &with(good(), "send_at", json!("2001-02-03T04:05:06+07:00")),
    )
    .await;
    assert_eq!(status, 202, "{got}");
    let id = got["id"].as_str().unwrap();
    let (_, c) = common::get_json(addr, &format!("/v1/campaigns/{id}")).await;
    assert_eq!(c["scheduled"], false, "{c}");
    assert!(c["send_at"].is_null(), "{c}");
    assert!(c["queue"]["next_attempt_at"].is_string(), "{c}");
    node.shutdown().await;
}
