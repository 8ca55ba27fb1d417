//! Tenants end to end: each key sees and changes its own tenant's campaigns, messages and
//! suppressions only (another's ids are 404), sends only from its sending domains, and is held
//! to its rate and daily quota (429 with Retry-After, nothing queued; the quota across a
//! restart); keys made through the admin API are stored hashed and stop working when revoked;
//! webhook receivers of a tenant get that tenant's events only.

use crate::common;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use reqwest::Method;
use serde_json::{Value, json};
use sluice::config::Config;

const KEY_A: &str = "tenant-a-key-0123456789";
const KEY_B: &str = "tenant-b-key-0123456789";

/// The test config plus tenants `a` (a.example, `a_extra`) and `b` (b.example) and `more`.
fn config_with(dir: &std::path::Path, a_extra: &str, more: &str) -> Config {
    let base = config(dir);
    let text = format!(
        "[http]\nlisten = \"127.0.0.1:0\"\n[auth]\napi_keys = [\"{KEY}\"]\n\
         [secrets]\ntoken_keys = [\"test-token-key-0123456789\"]\n\
         [spool]\npath = \"{}\"\n[log]\nlevel = \"warn\"\ndelivery_log = \"{}\"\n\
         [delivery]\nenabled = false\n\
         [[tenant]]\nname = \"a\"\napi_keys = [\"{KEY_A}\"]\nsending_domains = [\"a.example\", \"*.a.example\"]\n{a_extra}\n\
         [[tenant]]\nname = \"b\"\napi_key_hashes = [\"sha256:{}\"]\nsending_domains = [\"b.example\"]\n\
         {more}",
        base.spool.path.display(),
        base.log.delivery_log.display(),
        hex(&sluice::config::hash_key(KEY_B.as_bytes())),
    );
    Config::from_toml("test.toml", &text, None).expect("tenant config is valid")
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// A request with `key`: status, headers and JSON body (`null` without one).
async fn call(
    addr: SocketAddr,
    key: &str,
    method: Method,
    path: &str,
    body: Option<Value>,
) -> (u16, reqwest::header::HeaderMap, Value) {
    let mut req = client().request(method, url(addr, path)).bearer_auth(key);
    if let Some(b) = body {
        req = req.json(&b);
    }
    let r = req.send().await.expect("request");
    let status = r.status().as_u16();
    let headers = r.headers().clone();
    (status, headers, r.json().await.unwrap_or(Value::Null))
}

/// A GET with `key`: status and JSON body.
async fn get_as(addr: SocketAddr, key: &str, path: &str) -> (u16, Value) {
    let (status, _, body) = call(addr, key, Method::GET, path, None).await;
    (status, body)
}

fn campaign(from: &str, recipients: &[&str]) -> Value {
    let list: Vec<Value> = recipients.iter().map(|r| json!({"email": r})).collect();
    json!({"from": from, "subject": "Hello", "text": "Hi.", "recipients": list})
}

async fn create(addr: SocketAddr, key: &str, from: &str, recipients: &[&str]) -> (u16, Value) {
    let (status, _, body) = call(
        addr,
        key,
        Method::POST,
        "/v1/campaigns",
        Some(campaign(from, recipients)),
    )
    .await;
    (status, body)
}

fn listed_ids(list: &Value) -> Vec<String> {
    list["campaigns"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["id"].as_str().unwrap().to_owned())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_key_sees_and_changes_its_own_tenants_records_only() {
    let dir = tempfile::tempdir().unwrap();
    let node = start(config_with(dir.path(), "", "")).await;
    let addr = node.http_addr;

    let (s, a) = create(addr, KEY_A, "news@a.example", &["x@sink.test"]).await;
    assert_eq!(s, 202, "{a}");
    let a_id = a["id"].as_str().unwrap().to_owned();
    let (s, b) = create(addr, KEY_B, "news@b.example", &["x@sink.test"]).await;
    assert_eq!(s, 202, "{b}");
    let b_id = b["id"].as_str().unwrap().to_owned();
    // The operator's (default tenant's) campaign.
    let (s, o) = create(addr, KEY, "news@operator.example", &["x@sink.test"]).await;
    assert_eq!(s, 202, "{o}");
    let o_id = o["id"].as_str().unwrap().to_owned();

    // Lists.
    for (key, own) in [(KEY_A, &a_id), (KEY_B, &b_id), (KEY, &o_id)] {
        let (s, list) = get_as(addr, key, "/v1/campaigns").await;
        assert_eq!(s, 200);
        assert_eq!(listed_ids(&list), vec![own.clone()], "{list}");
        assert_eq!(list["total"], 1);
    }
    // Another tenant's id is not found, whatever the method.
    for (key, other) in [(KEY_A, &b_id), (KEY_B, &a_id), (KEY_A, &o_id), (KEY, &a_id)] {
        let (s, body) = get_as(addr, key, &format!("/v1/campaigns/{other}")).await;
        assert_eq!(s, 404, "{body}");
        assert_eq!(body["error"]["code"], "campaign_not_found");
        for action in ["pause", "resume", "cancel"] {
            let path = format!("/v1/campaigns/{other}/{action}");
            let (s, _, _) = call(addr, key, Method::POST, &path, None).await;
            assert_eq!(s, 404, "{action}");
        }
        let path = format!("/v1/campaigns/{other}/recipients");
        let line = "{\"email\":\"y@sink.test\"}\n";
        let s = post_body_as(addr, key, &path, "application/x-ndjson", line)
            .await
            .0;
        assert_eq!(s, 404);
    }
    let (s, own) = get_as(addr, KEY_A, &format!("/v1/campaigns/{a_id}")).await;
    assert_eq!(s, 200);
    assert_eq!(own["counts"]["queued"], 1);

    // A message: its tenant finds it, another does not.
    let (s, _, m) = call(
        addr,
        KEY_A,
        Method::POST,
        "/v1/messages",
        Some(json!({"from": "receipts@mail.a.example", "to": "z@sink.test", "subject": "R", "text": "r"})),
    )
    .await;
    assert_eq!(s, 202, "{m}");
    let mid = m["id"].as_str().unwrap();
    let (s, _) = get_as(addr, KEY_A, &format!("/v1/messages/{mid}")).await;
    assert_eq!(s, 200);
    let (s, _) = get_as(addr, KEY_B, &format!("/v1/messages/{mid}")).await;
    assert_eq!(s, 404);

    // Suppressions: A's import stops A's mail only; the operator's global list stops everyone's.
    let csv = "address,reason\nann@sink.test,manual\n";
    let s = post_body_as(addr, KEY_A, "/v1/suppressions/import", "text/csv", csv)
        .await
        .0;
    assert_eq!(s, 200);
    let (s, _, _) = call(
        addr,
        KEY,
        Method::PUT,
        "/v1/suppressions/bob@sink.test",
        None,
    )
    .await;
    assert_eq!(s, 200);
    let suppressed = |v: &Value| -> Vec<String> {
        v["suppressed"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s["email"].as_str().unwrap().to_owned())
            .collect()
    };
    let people = ["ann@sink.test", "bob@sink.test", "cy@sink.test"];
    let (_, a2) = create(addr, KEY_A, "news@a.example", &people).await;
    assert_eq!(suppressed(&a2), ["ann@sink.test", "bob@sink.test"], "{a2}");
    let (_, b2) = create(addr, KEY_B, "news@b.example", &people).await;
    assert_eq!(suppressed(&b2), ["bob@sink.test"], "{b2}");
    // Each lists its own entries, scoped as it gave them.
    let (_, _, la) = call(addr, KEY_A, Method::GET, "/v1/suppressions", None).await;
    let (_, _, lb) = call(addr, KEY_B, Method::GET, "/v1/suppressions", None).await;
    let (_, _, lo) = call(addr, KEY, Method::GET, "/v1/suppressions", None).await;
    assert_eq!(la["items"].as_array().unwrap().len(), 1, "{la}");
    assert_eq!(la["items"][0]["address"], "ann@sink.test");
    assert_eq!(la["items"][0]["scope"], "global");
    assert_eq!(lb["items"].as_array().unwrap().len(), 0, "{lb}");
    assert_eq!(lo["items"].as_array().unwrap().len(), 1, "{lo}");
    assert_eq!(lo["items"][0]["address"], "bob@sink.test");
    let (s, _) = get_as(addr, KEY_B, "/v1/suppressions/ann@sink.test").await;
    assert_eq!(s, 404);
    let (s, _, _) = call(
        addr,
        KEY_B,
        Method::DELETE,
        "/v1/suppressions/ann@sink.test",
        None,
    )
    .await;
    assert_eq!(s, 404);
    let (s, _) = get_as(addr, KEY_A, "/v1/suppressions/ann@sink.test").await;
    assert_eq!(s, 200);

    // Operator routes and the admin API are the operator's.
    for path in ["/v1/queue", "/v1/domains", "/v1/admin/tenants"] {
        let (s, _, body) = call(addr, KEY_A, Method::GET, path, None).await;
        assert_eq!(s, 403, "{path}: {body}");
    }
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_from_domain_outside_the_tenants_is_refused_and_nothing_is_queued() {
    let dir = tempfile::tempdir().unwrap();
    let node = start(config_with(dir.path(), "", "")).await;
    let addr = node.http_addr;
    let before = spool_counts(&node).await;
    for from in ["news@b.example", "news@evil-a.example", "x@a.example.org"] {
        let (s, body) = create(addr, KEY_A, from, &["x@sink.test"]).await;
        assert_eq!(s, 422, "{from}: {body}");
        assert_eq!(body["error"]["field"], "from");
    }
    let (s, _, body) = call(
        addr,
        KEY_B,
        Method::POST,
        "/v1/messages",
        Some(json!({"from": "a@a.example", "to": "z@sink.test", "subject": "R", "text": "r"})),
    )
    .await;
    assert_eq!(s, 422, "{body}");
    assert_eq!(body["error"]["field"], "from");
    let message = "From: a@a.example\r\nTo: z@sink.test\r\nSubject: R\r\n\r\nr\r\n";
    let path = "/v1/messages/raw?to=z@sink.test";
    let s = post_body_as(addr, KEY_B, path, "message/rfc822", message)
        .await
        .0;
    assert_eq!(s, 422);
    assert_eq!(spool_counts(&node).await, before);
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_key_has_its_own_auth_rate_limit() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = config_with(dir.path(), "", "");
    config.auth.rate_limit = Some(sluice::config::Rate {
        count: 3,
        per: Duration::from_secs(1),
    });
    let node = start(config).await;
    let addr = node.http_addr;
    // The operator's key past its three a second: 429 naming the key, with Retry-After.
    let mut limited = None;
    for _ in 0..6 {
        let (s, h, body) = call(addr, KEY, Method::GET, "/v1/campaigns", None).await;
        if s == 429 {
            limited = Some((h, body));
            break;
        }
        assert_eq!(s, 200, "{body}");
    }
    let (headers, body) = limited.expect("the key's rate answered 429");
    assert_eq!(body["error"]["code"], "rate_limited");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("API key"),
        "{body}"
    );
    let retry: u64 = headers["retry-after"].to_str().unwrap().parse().unwrap();
    assert!((1..=2).contains(&retry), "{retry}");
    // Another key (a tenant's) has its own allowance meanwhile.
    let (s, body) = get_as(addr, KEY_A, "/v1/campaigns").await;
    assert_eq!(s, 200, "{body}");
    // And the first is served again once the wait is over.
    tokio::time::sleep(Duration::from_secs(retry)).await;
    let (s, body) = get_as(addr, KEY, "/v1/campaigns").await;
    assert_eq!(s, 200, "{body}");
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_and_daily_quota_answer_429_and_the_quota_holds_across_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = || config_with(dir.path(), "rate = \"5/s\"\ndaily_quota = 5\n", "");
    let node = start(cfg()).await;
    let addr = node.http_addr;

    // Over the rate: 429 with Retry-After; the other tenant is not held up.
    let mut limited = None;
    for _ in 0..20 {
        let (s, h, body) = call(addr, KEY_A, Method::GET, "/v1/campaigns", None).await;
        if s == 429 {
            limited = Some((h, body));
            break;
        }
    }
    let (headers, body) = limited.expect("the rate limit answered 429");
    assert_eq!(body["error"]["code"], "rate_limited");
    let retry: u64 = headers["retry-after"].to_str().unwrap().parse().unwrap();
    assert!((1..=2).contains(&retry), "{retry}");
    for _ in 0..20 {
        let (s, _) = get_as(addr, KEY_B, "/v1/campaigns").await;
        assert_eq!(s, 200);
    }
    tokio::time::sleep(Duration::from_secs(2)).await;

    // Daily quota of 5: 3, then 3 more is refused whole.
    let (s, body) = create(
        addr,
        KEY_A,
        "n@a.example",
        &["1@s.test", "2@s.test", "3@s.test"],
    )
    .await;
    assert_eq!(s, 202, "{body}");
    let before = spool_counts(&node).await;
    let (s, body) = create(
        addr,
        KEY_A,
        "n@a.example",
        &["4@s.test", "5@s.test", "6@s.test"],
    )
    .await;
    assert_eq!(s, 429, "{body}");
    assert_eq!(body["error"]["code"], "daily_quota_exceeded");
    assert_eq!(
        spool_counts(&node).await,
        before,
        "a refused request queued nothing"
    );
    node.shutdown().await;

    // After a restart the day's count is still 3: 3 more are refused, 2 taken.
    let node = start(cfg()).await;
    let addr = node.http_addr;
    let (s, h, body) = call(
        addr,
        KEY_A,
        Method::POST,
        "/v1/campaigns",
        Some(campaign(
            "n@a.example",
            &["4@s.test", "5@s.test", "6@s.test"],
        )),
    )
    .await;
    assert_eq!(s, 429, "{body}");
    let retry: u64 = h["retry-after"].to_str().unwrap().parse().unwrap();
    assert!((1..=86_400).contains(&retry));
    let (s, body) = create(addr, KEY_A, "n@a.example", &["4@s.test", "5@s.test"]).await;
    assert_eq!(s, 202, "{body}");
    let (_, _, t) = call(addr, KEY, Method::GET, "/v1/admin/tenants/a", None).await;
    assert_eq!(t["used_today"], 5, "{t}");
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_keys_are_stored_hashed_and_a_revoked_key_stops_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let node = start(config_with(dir.path(), "", "")).await;
    let addr = node.http_addr;

    let (s, _, t) = call(
        addr,
        KEY,
        Method::POST,
        "/v1/admin/tenants",
        Some(json!({"name": "c", "sending_domains": ["c.example"], "daily_quota": 1000})),
    )
    .await;
    assert_eq!(s, 201, "{t}");
    let (s, _, bad) = call(
        addr,
        KEY,
        Method::POST,
        "/v1/admin/tenants",
        Some(json!({"name": "Bad Name", "sending_domains": ["c.example"]})),
    )
    .await;
    assert_eq!(s, 422, "{bad}");
    assert_eq!(bad["error"]["field"], "name");
    let (s, _, k) = call(
        addr,
        KEY,
        Method::POST,
        "/v1/admin/keys",
        Some(json!({"tenant": "c", "name": "ci"})),
    )
    .await;
    assert_eq!(s, 201, "{k}");
    let key = k["key"].as_str().unwrap().to_owned();
    let id = k["id"].as_str().unwrap().to_owned();
    let (s, body) = create(addr, &key, "n@c.example", &["x@s.test"]).await;
    assert_eq!(s, 202, "{body}");

    // At rest: the key's hash, never the key.
    let n = Arc::clone(&node.node);
    let stored = tokio::task::spawn_blocking(move || {
        let mut found = Vec::new();
        n.spool
            .scan_state(sluice::store::spool::STATE_TENANT, |k, v| {
                if k.starts_with(b"k/") {
                    found.push(String::from_utf8_lossy(v).into_owned());
                }
            })
            .unwrap();
        found
    })
    .await
    .unwrap();
    assert_eq!(stored.len(), 1);
    println!("stored key record: {}", stored[0]);
    assert!(!stored[0].contains(&key));
    let hash = hex(&sluice::config::hash_key(key.as_bytes()));
    assert!(stored[0].contains(&hash), "{}", stored[0]);

    let (_, _, keys) = call(addr, KEY, Method::GET, "/v1/admin/keys?tenant=c", None).await;
    assert_eq!(keys["keys"][0]["id"], id.as_str());
    assert!(keys["keys"][0]["last_used_at"].is_string(), "{keys}");

    // Revoked: refused from the answer on.
    let (s, _, r) = call(
        addr,
        KEY,
        Method::DELETE,
        &format!("/v1/admin/keys/{id}"),
        None,
    )
    .await;
    assert_eq!(s, 200, "{r}");
    let revoked = Instant::now();
    let (s, _, _) = call(addr, &key, Method::GET, "/v1/campaigns", None).await;
    let took = revoked.elapsed();
    assert_eq!(s, 401);
    println!("first request after the revocation refused after {took:?}");
    assert!(took < Duration::from_secs(1));
    // Config keys are revoked in the config.
    let (_, _, all) = call(addr, KEY, Method::GET, "/v1/admin/keys?tenant=a", None).await;
    let config_key = all["keys"][0]["id"].as_str().unwrap().to_owned();
    let (s, _, _) = call(
        addr,
        KEY,
        Method::DELETE,
        &format!("/v1/admin/keys/{config_key}"),
        None,
    )
    .await;
    assert_eq!(s, 409);

    // Tenants and keys page by cursor, as every list does: one at a time, the same as all at
    // once.
    // (Compared by name and id: a key's `last_used_at` moves with these very requests.)
    for (list, field, id) in [
        ("/v1/admin/tenants", "tenants", "name"),
        ("/v1/admin/keys", "keys", "id"),
    ] {
        let (_, _, all) = call(addr, KEY, Method::GET, &format!("{list}?limit=1000"), None).await;
        let whole: Vec<Value> = all[field]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v[id].clone())
            .collect();
        assert!(whole.len() >= 3 && all["next_cursor"].is_null(), "{all}");
        let mut paged = Vec::new();
        let mut path = format!("{list}?limit=1");
        loop {
            let (s, _, page) = call(addr, KEY, Method::GET, &path, None).await;
            assert_eq!(s, 200, "{page}");
            assert_eq!(page[field].as_array().unwrap().len(), 1, "{page}");
            paged.push(page[field][0][id].clone());
            match page["next_cursor"].as_str() {
                Some(c) => path = format!("{list}?limit=1&cursor={c}"),
                None => break,
            }
            assert!(paged.len() <= whole.len(), "{paged:?}");
        }
        assert_eq!(paged, whole, "{list}");
    }
    node.shutdown().await;

    // The tenant and the revocation survive a restart.
    let node = start(config_with(dir.path(), "", "")).await;
    let (s, _, _) = call(node.http_addr, &key, Method::GET, "/v1/campaigns", None).await;
    assert_eq!(s, 401);
    let (s, _, t) = call(
        node.http_addr,
        KEY,
        Method::GET,
        "/v1/admin/tenants/c",
        None,
    )
    .await;
    assert_eq!(s, 200);
    assert_eq!(t["origin"], "api");
    assert_eq!(t["used_today"], 1);
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenants_webhook_receives_its_events_only() {
    let (a_events, b_events, all_events) = (
        Arc::new(Mutex::new(Vec::new())),
        Arc::new(Mutex::new(Vec::new())),
        Arc::new(Mutex::new(Vec::new())),
    );
    let a_addr = event_receiver(Arc::clone(&a_events)).await;
    let b_addr = event_receiver(Arc::clone(&b_events)).await;
    let all_addr = event_receiver(Arc::clone(&all_events)).await;
    let hook = |name: &str, addr: SocketAddr, tenant: Option<&str>| {
        let tenant = tenant.map_or(String::new(), |t| format!("tenant = \"{t}\"\n"));
        format!(
            "[[webhook]]\nname = \"{name}\"\nurl = \"http://{addr}/hook\"\nsecret = \"webhook-secret-0123456789\"\nbatch_size = 500\n{tenant}"
        )
    };
    let more = [
        hook("a", a_addr, Some("a")),
        hook("b", b_addr, Some("b")),
        hook("all", all_addr, None),
    ]
    .concat();
    let dir = tempfile::tempdir().unwrap();
    let node = start(config_with(dir.path(), "", &more)).await;
    let addr = node.http_addr;
    // 1,000 recipients refused at ingest per tenant: 1,000 `rejected` events each.
    let bad: Vec<String> = (0..1000).map(|i| format!("not-an-address-{i}")).collect();
    let bad: Vec<&str> = bad.iter().map(String::as_str).collect();
    let (s, a) = create(addr, KEY_A, "n@a.example", &bad).await;
    assert_eq!(s, 202, "{a}");
    assert_eq!(a["rejected_count"], 1000);
    let (s, _) = create(addr, KEY_B, "n@b.example", &bad).await;
    assert_eq!(s, 202);

    let started = Instant::now();
    while all_events.lock().unwrap().len() < 2000
        || a_events.lock().unwrap().len() < 1000
        || b_events.lock().unwrap().len() < 1000
    {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "events missing"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let tenants = |events: &Arc<Mutex<Vec<Value>>>| {
        let mut t: Vec<(String, usize)> = Vec::new();
        for e in events.lock().unwrap().iter() {
            assert_eq!(e["event"], "rejected");
            let name = e["tenant"].as_str().unwrap_or("-").to_owned();
            match t.iter_mut().find(|(n, _)| *n == name) {
                Some((_, c)) => *c += 1,
                None => t.push((name, 1)),
            }
        }
        t.sort();
        t
    };
    assert_eq!(tenants(&a_events), vec![("a".to_owned(), 1000)]);
    assert_eq!(tenants(&b_events), vec![("b".to_owned(), 1000)]);
    assert_eq!(
        tenants(&all_events),
        vec![("a".to_owned(), 1000), ("b".to_owned(), 1000)]
    );
    println!(
        "events: receiver a {} (all of a), receiver b {} (all of b), operator's {}",
        a_events.lock().unwrap().len(),
        b_events.lock().unwrap().len(),
        all_events.lock().unwrap().len()
    );
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenants_key_submits_over_smtp_as_its_own_domains_only() {
    use base64::Engine;
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config_with(dir.path(), "daily_quota = 2\n", "");
    cfg.submission.listen = Some("127.0.0.1:0".parse().unwrap());
    cfg.submission.allow_plaintext_auth = true;
    let node = start(cfg).await;
    let listener = node.submission.starttls.unwrap();
    let (mut c, greeting) = common::smtp::Smtp::connect(listener).await;
    assert!(greeting.starts_with("220"), "{greeting}");
    assert!(c.cmd("EHLO app.test").await.starts_with("250"));
    let plain = base64::engine::general_purpose::STANDARD.encode(format!("\0app\0{KEY_A}"));
    let r = c.cmd(&format!("AUTH PLAIN {plain}")).await;
    assert!(r.starts_with("235"), "{r}");
    let before = spool_counts(&node).await;
    let send =
        |from: &str| format!("From: {from}\r\nTo: x@sink.test\r\nSubject: S\r\n\r\nbody\r\n");
    // Another tenant's domain: refused, nothing queued.
    assert!(c.cmd("MAIL FROM:<app@a.example>").await.starts_with("250"));
    assert!(c.cmd("RCPT TO:<x@sink.test>").await.starts_with("250"));
    let r = c.data(send("news@b.example").as_bytes()).await;
    assert!(r.starts_with("554 5.6.0 From:"), "{r}");
    assert_eq!(spool_counts(&node).await, before);
    // Its own: queued as the tenant's message.
    assert!(c.cmd("MAIL FROM:<app@a.example>").await.starts_with("250"));
    assert!(c.cmd("RCPT TO:<x@sink.test>").await.starts_with("250"));
    assert!(c.cmd("RCPT TO:<y@sink.test>").await.starts_with("250"));
    let r = c.data(send("news@mail.a.example").as_bytes()).await;
    assert!(r.starts_with("250"), "{r}");
    let id = r.rsplit(' ').next().unwrap().to_owned();
    let (s, _, m) = call(
        node.http_addr,
        KEY_A,
        Method::GET,
        &format!("/v1/messages/{id}"),
        None,
    )
    .await;
    assert_eq!(s, 200, "{m}");
    let (s, _, _) = call(
        node.http_addr,
        KEY_B,
        Method::GET,
        &format!("/v1/messages/{id}"),
        None,
    )
    .await;
    assert_eq!(s, 404);
    // Its daily quota of 2 is spent: a temporary refusal.
    assert!(c.cmd("MAIL FROM:<app@a.example>").await.starts_with("250"));
    assert!(c.cmd("RCPT TO:<z@sink.test>").await.starts_with("250"));
    let r = c.data(send("news@a.example").as_bytes()).await;
    assert!(r.starts_with("451 4.7.1"), "{r}");
    c.cmd("QUIT").await;
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenant_at_its_max_queued_is_refused_until_mail_leaves() {
    let dir = tempfile::tempdir().unwrap();
    let node = start(config_with(dir.path(), "max_queued = 3\n", "")).await;
    let addr = node.http_addr;
    let (s, body) = create(addr, KEY_A, "n@a.example", &["1@s.test", "2@s.test"]).await;
    assert_eq!(s, 202, "{body}");
    let id = body["id"].as_str().unwrap().to_owned();
    let before = spool_counts(&node).await;
    let (s, body) = create(addr, KEY_A, "n@a.example", &["3@s.test", "4@s.test"]).await;
    assert_eq!(s, 429, "{body}");
    assert_eq!(body["error"]["code"], "max_queued");
    assert_eq!(spool_counts(&node).await, before);
    // Another tenant is not held by it; and once A's mail is gone (cancelled), A sends again.
    let (s, _) = create(addr, KEY_B, "n@b.example", &["3@s.test", "4@s.test"]).await;
    assert_eq!(s, 202);
    let (s, _, _) = call(
        addr,
        KEY_A,
        Method::POST,
        &format!("/v1/campaigns/{id}/cancel"),
        None,
    )
    .await;
    assert_eq!(s, 200);
    let (s, body) = create(addr, KEY_A, "n@a.example", &["3@s.test", "4@s.test"]).await;
    assert_eq!(s, 202, "{body}");
    node.shutdown().await;
}
