//! Fair scheduling against an SMTP sink on loopback: transactional mail and small campaigns
//! overtaking a large one, fair shares between campaigns (equal and weighted), the guaranteed
//! share of a lower priority, scheduled send across a `kill -9`, a campaign's `max_rate`, and
//! AIMD against a receiver that answers 421 above a rate.
//!
//! These tests measure rates at the sink, so they have a binary of their own and run one at a
//! time. Each prints its figures (`cargo test --release --test fairness -- --nocapture`).

mod common;

use std::time::{Duration, Instant, SystemTime};

use common::sink::{Captured, Sink, SinkOptions};
use common::{Process, delivery_config, get_json, post_json};
use serde_json::{Value, json};
use sluice::config::Rate;

/// One test at a time: each measures rates, which tests beside it would skew.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn per_second(count: u32) -> Option<Rate> {
    Some(Rate {
        count,
        per: Duration::from_secs(1),
    })
}

/// A personalised campaign of `n` recipients whose subject starts with `tag`, plus `extra`
/// fields (priority, weight, ...).
fn campaign(tag: &str, n: usize, extra: Value) -> Value {
    let recipients: Vec<Value> = (0..n)
        .map(|i| json!({"email": format!("{tag}{i}@sink.test"), "vars": {"n": i}}))
        .collect();
    let mut body = json!({"from": "news@example.com", "subject": format!("{tag} {{{{ n }}}}"),
                          "text": "Hello {{ n }}.\n", "recipients": recipients});
    if let (Some(b), Some(e)) = (body.as_object_mut(), extra.as_object()) {
        b.extend(e.clone());
    }
    body
}

async fn post_campaign(addr: std::net::SocketAddr, body: &Value) -> String {
    let (status, got) = post_json(addr, "/v1/campaigns", body).await;
    assert_eq!(status, 202, "{got}");
    got["id"].as_str().expect("an id").to_owned()
}

async fn cancel(addr: std::net::SocketAddr, id: &str) {
    let (status, got) = post_json(addr, &format!("/v1/campaigns/{id}/cancel"), &json!({})).await;
    assert_eq!(status, 200, "{got}");
}

/// The first word of a captured message's subject: the campaign's tag.
fn tag(m: &Captured) -> &str {
    m.data
        .lines()
        .find_map(|l| l.strip_prefix("Subject: "))
        .and_then(|s| s.split_whitespace().next())
        .unwrap_or("")
}

/// Messages per tag that reached the sink in `[from, to)`.
fn count_between(sink: &Sink, from: Instant, to: Instant, t: &str) -> usize {
    sink.messages()
        .iter()
        .filter(|m| m.at >= from && m.at < to && tag(m) == t)
        .count()
}

/// Waits until the sink holds `n` messages tagged `t`; returns when the last one arrived.
async fn wait_tagged(sink: &Sink, t: &str, n: usize, within: Duration) -> Instant {
    let started = Instant::now();
    loop {
        let got: Vec<Instant> = sink
            .messages()
            .iter()
            .filter(|m| tag(m) == t)
            .map(|m| m.at)
            .collect();
        if got.len() >= n {
            return got.into_iter().max().expect("n ≥ 1");
        }
        assert!(
            started.elapsed() < within,
            "{} of {n} messages tagged {t} after {within:?}",
            got.len()
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// The share of messages tagged `a` among those tagged `a` or `b`, per 5-second window from
/// `start`, `windows` of them (waits for each to pass).
async fn shares(sink: &Sink, start: Instant, windows: u32, a: &str, b: &str) -> Vec<(f64, usize)> {
    let window = Duration::from_secs(5);
    let end = start + window * windows;
    tokio::time::sleep(end.saturating_duration_since(Instant::now())).await;
    (0..windows)
        .map(|w| {
            let from = start + window * w;
            let to = from + window;
            let (na, nb) = (
                count_between(sink, from, to, a),
                count_between(sink, from, to, b),
            );
            (na as f64 / (na + nb).max(1) as f64, na + nb)
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_and_a_small_campaign_overtake_a_large_campaign() {
    let _serial = SERIAL.lock().await;
    let sink = Sink::start(SinkOptions::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = delivery_config(dir.path(), &sink);
    cfg.shaping.message_rate = per_second(50);
    let node = common::start(cfg).await;
    let addr = node.http_addr;

    let big = post_campaign(addr, &campaign("Big", 1500, json!({}))).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let posted = Instant::now();
    let (status, got) = post_json(
        addr,
        "/v1/messages",
        &json!({"from": "account@example.com", "to": "reset@sink.test",
                "subject": "Reset your password", "text": "Here is your link.\n"}),
    )
    .await;
    assert_eq!(status, 202, "{got}");
    let message = wait_tagged(&sink, "Reset", 1, Duration::from_secs(10)).await - posted;

    let posted = Instant::now();
    post_campaign(addr, &campaign("Small", 3, json!({}))).await;
    let small = wait_tagged(&sink, "Small", 3, Duration::from_secs(10)).await - posted;
    let big_sent = sink.messages().iter().filter(|m| tag(m) == "Big").count();
    common::report(
        "fairness_overtake",
        "A message and a 3-recipient campaign behind a 1,500-recipient campaign, site at 50/s",
        &[
            (
                "message at the sink after",
                format!("{} ms", message.as_millis()),
            ),
            (
                "small campaign finished after",
                format!("{} ms", small.as_millis()),
            ),
            ("large campaign sent meanwhile", big_sent.to_string()),
        ],
    );
    assert!(
        message < Duration::from_secs(1),
        "the message took {message:?}"
    );
    assert!(
        small < Duration::from_secs(2),
        "the small campaign took {small:?}"
    );
    assert!(
        big_sent < 1500,
        "the large campaign had finished: nothing to overtake"
    );
    cancel(addr, &big).await;
    node.shutdown().await;
}

/// Two campaigns of 5,000 to one site at 200/s, the second posted 5 s after the first, with
/// `weights`: the first one's share of deliveries in three 5-second windows while both send.
async fn two_campaigns(weights: (u32, u32)) -> Vec<(f64, usize)> {
    let sink = Sink::start(SinkOptions::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = delivery_config(dir.path(), &sink);
    cfg.shaping.message_rate = per_second(200);
    let node = common::start(cfg).await;
    let addr = node.http_addr;
    let a = post_campaign(addr, &campaign("A", 5000, json!({"weight": weights.0}))).await;
    tokio::time::sleep(Duration::from_secs(5)).await;
    let b = post_campaign(addr, &campaign("B", 5000, json!({"weight": weights.1}))).await;
    let both = Instant::now();
    let got = shares(&sink, both, 3, "A", "B").await;
    for id in [&a, &b] {
        let (_, c) = get_json(addr, &format!("/v1/campaigns/{id}")).await;
        assert!(
            c["counts"]["queued"].as_u64().unwrap_or(0) > 0,
            "both campaigns still had mail at the end of the windows: {c}"
        );
    }
    // The campaign's view of its place in the queue.
    let (_, c) = get_json(addr, &format!("/v1/campaigns/{a}")).await;
    let expected = f64::from(weights.0) / f64::from(weights.0 + weights.1);
    let share = c["queue"]["share"].as_f64().expect("a share");
    assert!((share - expected).abs() < 0.01, "{c}");
    assert!(c["queue"]["next_attempt_at"].is_string(), "{c}");
    cancel(addr, &a).await;
    cancel(addr, &b).await;
    node.shutdown().await;
    got
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn campaigns_sharing_a_site_get_shares_by_weight() {
    let _serial = SERIAL.lock().await;
    let equal = two_campaigns((1, 1)).await;
    let weighted = two_campaigns((3, 1)).await;
    let show = |v: &[(f64, usize)]| {
        v.iter()
            .map(|(s, n)| format!("{:.0}% of {n}", s * 100.0))
            .collect::<Vec<_>>()
            .join(", ")
    };
    common::report(
        "fairness_shares",
        "Share of the first of two 5,000-recipient campaigns per 5 s window, site at 200/s",
        &[
            ("weights 1:1", show(&equal)),
            ("weights 3:1", show(&weighted)),
        ],
    );
    for (share, n) in &equal {
        assert!(*n > 500, "too few deliveries in a window: {equal:?}");
        assert!((share - 0.5).abs() <= 0.1, "{equal:?}");
    }
    for (share, _) in &weighted {
        assert!((share - 0.75).abs() <= 0.1, "{weighted:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_low_priority_campaign_keeps_its_guaranteed_share() {
    let _serial = SERIAL.lock().await;
    let sink = Sink::start(SinkOptions::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = delivery_config(dir.path(), &sink);
    cfg.shaping.message_rate = per_second(200);
    let share = cfg.delivery.lower_priority_share;
    let node = common::start(cfg).await;
    let addr = node.http_addr;
    let high = post_campaign(addr, &campaign("High", 4000, json!({"priority": "high"}))).await;
    let low = post_campaign(addr, &campaign("Low", 1000, json!({"priority": "low"}))).await;
    let start = Instant::now();
    let got = shares(&sink, start, 3, "Low", "High").await;
    let (_, c) = get_json(addr, &format!("/v1/campaigns/{low}")).await;
    assert_eq!(c["priority"], 2, "{c}");
    common::report(
        "fairness_priority",
        "A low-priority campaign beside a high-priority one, site at 200/s",
        &[
            ("guaranteed share", format!("{:.0}%", share * 100.0)),
            (
                "low priority's share per 5 s window",
                got.iter()
                    .map(|(s, n)| format!("{:.1}% of {n}", s * 100.0))
                    .collect::<Vec<_>>()
                    .join(", "),
            ),
        ],
    );
    for (s, n) in &got {
        assert!(*n > 500, "too few deliveries in a window: {got:?}");
        // Its share, give or take the messages in flight at the window's edges.
        assert!(*s >= share - 0.01, "{got:?}");
        assert!(
            *s <= share + 0.05,
            "the high priority is not served first: {got:?}"
        );
    }
    cancel(addr, &high).await;
    cancel(addr, &low).await;
    node.shutdown().await;
}

fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_millis(t).to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scheduled_send_waits_for_its_time_across_a_crash_and_cancel_sends_nothing() {
    let _serial = SERIAL.lock().await;
    let sink = Sink::start(SinkOptions::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let spool = dir.path().join("spool");
    let more = format!(
        "[delivery]\nenabled = true\n[[route]]\ndomain = \"sink.test\"\nrelay = \"{}\"\n",
        sink.addr
    );
    let mut sluice = Process::spawn_with(dir.path(), &spool, &more);
    sluice.wait_ready(Duration::from_secs(30)).await;
    let send_at = SystemTime::now() + Duration::from_secs(5);
    let due = Instant::now() + Duration::from_secs(5);
    let at = json!({"send_at": rfc3339(send_at)});
    let later = post_campaign(sluice.addr, &campaign("Later", 50, at.clone())).await;
    let dropped = post_campaign(sluice.addr, &campaign("Dropped", 20, at.clone())).await;
    let (status, got) = post_json(
        sluice.addr,
        "/v1/messages",
        &json!({"from": "account@example.com", "to": "note@sink.test", "subject": "Note",
                "text": "Later.\n", "send_at": rfc3339(send_at)}),
    )
    .await;
    assert_eq!(status, 202, "{got}");
    let (_, c) = get_json(sluice.addr, &format!("/v1/campaigns/{later}")).await;
    assert_eq!(c["scheduled"], true, "{c}");
    assert_eq!(c["send_at"], rfc3339(send_at), "{c}");
    cancel(sluice.addr, &dropped).await;

    // Killed before its time, restarted: the schedule is on disk.
    tokio::time::sleep(Duration::from_secs(1)).await;
    sluice.kill();
    sluice = Process::spawn_with(dir.path(), &spool, &more);
    sluice.wait_ready(Duration::from_secs(30)).await;
    assert!(Instant::now() < due, "the restart took past send_at");

    let last = wait_tagged(&sink, "Later", 50, Duration::from_secs(20)).await;
    let note = wait_tagged(&sink, "Note", 1, Duration::from_secs(5)).await;
    let first = sink
        .messages()
        .iter()
        .map(|m| m.at)
        .min()
        .expect("messages arrived");
    common::report(
        "fairness_send_at",
        "send_at 5 s ahead, with a kill -9 and restart in between",
        &[
            (
                "first message, from send_at",
                format!("{:+} ms", first.duration_since(due).as_millis()),
            ),
            (
                "last of 50, from send_at",
                format!("{:+} ms", last.duration_since(due).as_millis()),
            ),
            (
                "the message, from send_at",
                format!("{:+} ms", note.duration_since(due).as_millis()),
            ),
        ],
    );
    // Nothing early (Instant::duration_since saturates, so compare directly).
    assert!(first >= due, "a message arrived before send_at");
    assert!(last < due + Duration::from_secs(2), "{:?} late", last - due);
    let (_, c) = get_json(sluice.addr, &format!("/v1/campaigns/{dropped}")).await;
    assert_eq!(c["counts"]["cancelled"], 20, "{c}");
    assert_eq!(c["scheduled"], false, "{c}");
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        !sink.messages().iter().any(|m| tag(m) == "Dropped"),
        "a cancelled scheduled campaign sent mail"
    );
    sluice.terminate(Duration::from_secs(30));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_campaign_max_rate_holds_on_an_unthrottled_site() {
    let _serial = SERIAL.lock().await;
    let sink = Sink::start(SinkOptions::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let node = common::start(delivery_config(dir.path(), &sink)).await;
    let addr = node.http_addr;
    let id = post_campaign(addr, &campaign("Paced", 400, json!({"max_rate": "600/m"}))).await;
    // The burst allowance is one message; measure after the first second.
    let start = Instant::now() + Duration::from_secs(1);
    tokio::time::sleep(Duration::from_secs(21)).await;
    let n = count_between(&sink, start, start + Duration::from_secs(20), "Paced");
    let rate = n as f64 / 20.0;
    let (_, c) = get_json(addr, &format!("/v1/campaigns/{id}")).await;
    assert_eq!(c["max_rate"], "600/m", "{c}");
    assert!(c["queue"]["rate_held"].as_u64().unwrap_or(0) > 0, "{c}");
    common::report(
        "fairness_max_rate",
        "max_rate = \"600/m\" on an unthrottled site",
        &[("messages per second over 20 s", format!("{rate:.2}"))],
    );
    assert!((rate - 10.0).abs() <= 1.0, "{rate:.2} messages/s");
    // Cancelling lets the held recipients go at once: the campaign ends without waiting.
    cancel(addr, &id).await;
    let cancelled = Instant::now();
    loop {
        let (_, c) = get_json(addr, &format!("/v1/campaigns/{id}")).await;
        if c["queue"]["rate_held"] == 0 && c["queue"]["pending"] == 0 {
            break;
        }
        assert!(
            cancelled.elapsed() < Duration::from_secs(10),
            "a cancelled campaign's held recipients are still queued: {c}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    node.shutdown().await;
}

/// A receiver that refuses MAIL with a 421 whenever `limit` messages have arrived from the
/// client's address in the last second, while `throttling` is on; counts its refusals.
fn throttling_sink_options(
    limit: usize,
    throttling: std::sync::Arc<std::sync::atomic::AtomicBool>,
    refused: std::sync::Arc<std::sync::atomic::AtomicUsize>,
) -> SinkOptions {
    use std::collections::{HashMap, VecDeque};
    use std::sync::atomic::Ordering;
    let recent: std::sync::Mutex<HashMap<std::net::IpAddr, VecDeque<Instant>>> = Default::default();
    SinkOptions {
        mail: Some(std::sync::Arc::new(move |peer| {
            let now = Instant::now();
            let mut recent = recent.lock().unwrap();
            let q = recent.entry(peer).or_default();
            while q
                .front()
                .is_some_and(|t| now.duration_since(*t) >= Duration::from_secs(1))
            {
                q.pop_front();
            }
            if throttling.load(Ordering::SeqCst) && q.len() >= limit {
                refused.fetch_add(1, Ordering::SeqCst);
                return Some("421 4.7.0 Too many messages from your IP, slow down".into());
            }
            q.push_back(now);
            None
        })),
        ..SinkOptions::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aimd_settles_near_a_receivers_limit_and_climbs_back() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    let _serial = SERIAL.lock().await;
    const LIMIT: usize = 100;
    let throttling = Arc::new(AtomicBool::new(true));
    let refused = Arc::new(AtomicUsize::new(0));
    let sink = Sink::start(throttling_sink_options(
        LIMIT,
        Arc::clone(&throttling),
        Arc::clone(&refused),
    ))
    .await;
    let dir = tempfile::tempdir().unwrap();
    let rules = dir.path().join("shaping.toml");
    std::fs::write(
        &rules,
        "[aimd]\ndecrease = 0.5\ninterval = \"500ms\"\nstep = 0.1\nmin_rate = \"1/s\"\ncode = [421]\n",
    )
    .unwrap();
    let mut cfg = delivery_config(dir.path(), &sink);
    cfg.delivery.shaping_rules = Some(rules);
    let node = common::start(cfg).await;
    let addr = node.http_addr;
    let id = post_campaign(addr, &campaign("Aimd", 6000, json!({}))).await;

    // Once a second: messages accepted, refusals, and the AIMD rate in force.
    let mut rows = Vec::new();
    let started = Instant::now();
    let (mut delivered_before, mut refused_before) = (0usize, 0usize);
    for second in 1..=30u32 {
        if second == 16 {
            throttling.store(false, Ordering::SeqCst);
        }
        tokio::time::sleep_until((started + Duration::from_secs(u64::from(second))).into()).await;
        let delivered = sink.messages().len();
        let refusals = refused.load(Ordering::SeqCst);
        let (_, shaping) = get_json(addr, "/v1/shaping").await;
        let aimd = shaping["aimd"]
            .as_array()
            .and_then(|a| a.first())
            .and_then(|a| a["rate_per_second"].as_f64());
        rows.push((
            second,
            delivered - delivered_before,
            refusals - refused_before,
            aimd,
        ));
        delivered_before = delivered;
        refused_before = refusals;
    }
    cancel(addr, &id).await;
    node.shutdown().await;

    println!(
        "\nAIMD against a receiver refusing more than {LIMIT} messages/s (421), off after 15 s"
    );
    println!(
        "{:>6} {:>12} {:>10} {:>14}",
        "second", "accepted/s", "421s", "AIMD rate/s"
    );
    for (s, d, r, a) in &rows {
        let a = a.map_or_else(|| "(free)".to_owned(), |a| format!("{a:.1}"));
        println!("{s:>6} {d:>12} {r:>10} {a:>14}");
    }
    let settled = &rows[5..15];
    let accepted: usize = settled.iter().map(|r| r.1).sum();
    let refusals: usize = settled.iter().map(|r| r.2).sum();
    let mean = accepted as f64 / settled.len() as f64;
    // After the receiver stops throttling: the best second (the campaign may run dry once AIMD
    // lets go).
    let climbed = rows[16..].iter().map(|r| r.1).max().unwrap_or(0) as f64;
    common::report(
        "aimd",
        &format!("AIMD against a receiver limit of {LIMIT}/s"),
        &[
            (
                "accepted/s, seconds 6-15 (throttling)",
                format!("{mean:.1}"),
            ),
            (
                "421 replies per accepted, seconds 6-15",
                format!("{:.3}", refusals as f64 / accepted.max(1) as f64),
            ),
            (
                "best accepted/s after throttling stops",
                format!("{climbed:.1}"),
            ),
        ],
    );
    // Near the limit, and the receiver seldom has to say no (without AIMD it refuses most of
    // what comes: the sender runs at over ten times the limit).
    assert!(
        mean >= 0.5 * LIMIT as f64,
        "{mean:.1}/s while throttled: {rows:?}"
    );
    assert!(
        (refusals as f64) < 0.25 * accepted as f64,
        "{refusals} refusals for {accepted} accepted: {rows:?}"
    );
    // Back above the limit once the receiver stops throttling.
    assert!(
        climbed > 1.2 * LIMIT as f64,
        "{climbed:.1}/s after the receiver stopped throttling: {rows:?}"
    );
}

/// Posts `body` to `/v1/campaigns` with `key`; the campaign's id.
async fn post_campaign_as(addr: std::net::SocketAddr, key: &str, body: &Value) -> String {
    let (status, _, got) = common::post_body_as(
        addr,
        key,
        "/v1/campaigns",
        "application/json",
        body.to_string(),
    )
    .await;
    assert_eq!(status, 202, "{got}");
    got["id"].as_str().expect("an id").to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenants_small_campaign_gets_its_share_beside_anothers_large_ones() {
    let _serial = SERIAL.lock().await;
    let sink = Sink::start(SinkOptions::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = delivery_config(dir.path(), &sink);
    cfg.shaping.message_rate = per_second(200);
    for (name, key) in [
        ("big", "tenant-big-key-0123"),
        ("small", "tenant-small-key-0123"),
    ] {
        cfg.tenants.push(sluice::config::TenantConfig {
            name: name.into(),
            api_keys: vec![key.into()],
            sending_domains: vec!["example.com".into()],
            ..sluice::config::TenantConfig::default_tenant()
        });
    }
    let node = common::start(cfg).await;
    let addr = node.http_addr;
    // Tenant `big`: 100,000 recipients, and a second campaign of 5,000. By campaign, `small`'s
    // one campaign would get a third; by tenant it gets half.
    let a = post_campaign_as(
        addr,
        "tenant-big-key-0123",
        &campaign("A", 100_000, json!({})),
    )
    .await;
    let c = post_campaign_as(addr, "tenant-big-key-0123", &campaign("C", 5000, json!({}))).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let b = post_campaign_as(
        addr,
        "tenant-small-key-0123",
        &campaign("B", 1000, json!({})),
    )
    .await;
    let both = Instant::now();
    let window = Duration::from_secs(5);
    tokio::time::sleep(window * 2).await;
    let got: Vec<(f64, usize)> = (0..2)
        .map(|w| {
            let from = both + window * w;
            let to = from + window;
            let small = count_between(&sink, from, to, "B");
            let big = count_between(&sink, from, to, "A") + count_between(&sink, from, to, "C");
            (small as f64 / (small + big).max(1) as f64, small + big)
        })
        .collect();
    common::report(
        "fairness_tenants",
        "Share of tenant small (1,000 recipients) beside tenant big (100,000 + 5,000) per 5 s window, site at 200/s, equal tenant weights",
        &[(
            "tenant small's share",
            got.iter()
                .map(|(s, n)| format!("{:.1}% of {n}", s * 100.0))
                .collect::<Vec<_>>()
                .join(", "),
        )],
    );
    for (share, n) in &got {
        assert!(*n > 500, "too few deliveries in a window: {got:?}");
        assert!((share - 0.5).abs() <= 0.05, "{got:?}");
    }
    for id in [&a, &b, &c] {
        let r = common::client()
            .post(common::url(addr, &format!("/v1/campaigns/{id}/cancel")))
            .bearer_auth(if id == &b {
                "tenant-small-key-0123"
            } else {
                "tenant-big-key-0123"
            })
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
    }
    node.shutdown().await;
}
