//! Deliverability guards end to end: the complaint breaker fed by ARF reports over SMTP to the
//! bounce listener, the hard-bounce breaker fed by a receiver's 550 5.1.1, the sending-domain
//! breaker, a breaker's pause surviving a restart, and resuming (refused while the breaker
//! would trip again, allowed with `force`).

use crate::common;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::sink::{Sink, SinkOptions};
use common::smtp::Smtp;
use common::*;
use serde_json::{Value, json};

const FEEDBACK: &str = "fbl@bounces.example.com";

/// A node delivering to `sink`, with the bounce listener taking feedback reports, breakers
/// judged every 100 ms, and a webhook receiver on `hook` when given.
fn guarded_config(
    dir: &std::path::Path,
    sink: &Sink,
    hook: Option<String>,
) -> sluice::config::Config {
    let mut cfg = delivery_config(dir, sink);
    cfg.bounce.listen = Some("127.0.0.1:0".parse().unwrap());
    cfg.bounce.domain = Some("bounces.example.com".into());
    cfg.bounce.feedback_addresses = vec![FEEDBACK.into()];
    cfg.guard.interval = Duration::from_millis(100);
    if let Some(url) = hook {
        cfg.webhooks.push(
            toml::from_str(&format!(
                "url = {url:?}\nsecret = \"0123456789abcdef\"\nevents = [\"campaign_paused\"]\nretry_initial = \"100ms\"\n"
            ))
            .unwrap(),
        );
    }
    cfg
}

/// Posts a campaign of `n` recipients at `sink.test` sent at `rate`, with `extra` fields.
async fn campaign(
    addr: std::net::SocketAddr,
    from: &str,
    first: usize,
    n: usize,
    rate: &str,
    extra: Value,
) -> String {
    let recipients: Vec<Value> = (first..first + n)
        .map(|i| json!({"email": format!("user{i}@sink.test")}))
        .collect();
    let mut body = json!({"from": from, "subject": "Hello", "text": "Hi.", "recipients": recipients, "max_rate": rate});
    if let (Some(b), Some(e)) = (body.as_object_mut(), extra.as_object()) {
        b.extend(e.clone());
    }
    let (status, v) = post_json(addr, "/v1/campaigns", &body).await;
    assert_eq!(status, 202, "{v}");
    v["id"].as_str().unwrap().to_owned()
}

/// Sends an ARF complaint about every `every`th message the sink captures, over SMTP to the
/// bounce listener, until `stop`; returns how many it sent.
fn feedback_loop(
    sink: Arc<common::sink::SinkStats>,
    listener: std::net::SocketAddr,
    every: usize,
    stop: tokio_util::sync::CancellationToken,
) -> tokio::task::JoinHandle<usize> {
    tokio::spawn(async move {
        let template = std::fs::read_to_string(format!(
            "{}/tests/data/reports/arf-redacted.eml",
            env!("CARGO_MANIFEST_DIR")
        ))
        .unwrap();
        let (_, template) = template.split_once('\n').unwrap();
        let mut seen = 0;
        let mut sent = 0;
        while !stop.is_cancelled() {
            let msgs: Vec<common::sink::Captured> = sink.messages.lock().unwrap()[seen..].to_vec();
            for m in msgs {
                seen += 1;
                if seen % every != 0 {
                    continue;
                }
                let report = template
                    .replace("{{VERP}}", &m.mail_from)
                    .replace("{{RCPT}}", &m.rcpts[0])
                    .replace("{{REF}}", &trace_token(&m.data))
                    .replace("{{FEEDBACK}}", FEEDBACK);
                let r = Smtp::send(listener, FEEDBACK, report.as_bytes()).await;
                assert!(r.starts_with("250 2.0.0 complaint applied"), "{r}");
                sent += 1;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        sent
    })
}

async fn campaign_json(addr: std::net::SocketAddr, id: &str) -> Value {
    let (status, v) = get_json(addr, &format!("/v1/campaigns/{id}")).await;
    assert_eq!(status, 200, "{v}");
    v
}

/// Waits until the campaign's state is `state`.
async fn wait_state(addr: std::net::SocketAddr, id: &str, state: &str, within: Duration) -> Value {
    let started = Instant::now();
    loop {
        let v = campaign_json(addr, id).await;
        if v["state"] == state {
            return v;
        }
        assert!(started.elapsed() < within, "not {state} in {within:?}: {v}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A webhook receiver keeping every event it is sent: its URL and the events.
async fn receiver() -> (String, Arc<Mutex<Vec<Value>>>) {
    let events: Arc<Mutex<Vec<Value>>> = Arc::default();
    let addr = common::event_receiver(Arc::clone(&events)).await;
    (format!("http://{addr}/hook"), events)
}

/// Acceptance 1 and 5: an ARF complaint for every 200th delivered message (0.5%) pauses the
/// campaign once 1,000 are delivered; nothing more is sent; the event and the reason are there;
/// the pause survives a restart; resume is refused while the rate is over, and works with
/// `force`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn complaints_over_the_threshold_pause_the_campaign_until_forced() {
    let dir = tempfile::tempdir().unwrap();
    let sink = Sink::start(SinkOptions::default()).await;
    let (hook, events) = receiver().await;
    let node = start(guarded_config(dir.path(), &sink, Some(hook.clone()))).await;
    let addr = node.http_addr;
    let listener = node.bounce_addr.unwrap();
    let stop = tokio_util::sync::CancellationToken::new();
    let fbl = feedback_loop(Arc::clone(&sink.stats), listener, 200, stop.clone());
    let id = campaign(addr, "news@example.com", 0, 3000, "400/s", json!({})).await;

    let paused = wait_state(addr, &id, "paused", Duration::from_secs(30)).await;
    let at_pause = sink.messages().len();
    let reason = &paused["paused_reason"];
    assert_eq!(
        (
            reason["breaker"].as_str(),
            reason["measure"].as_str(),
            reason["window"].as_str()
        ),
        (Some("campaign"), Some("complaint_rate"), Some("campaign")),
        "{paused}"
    );
    let sample = reason["sample"].as_u64().unwrap();
    assert!(
        (1000..1400).contains(&sample),
        "judged at {sample} delivered: {reason}"
    );
    assert!(reason["rate_percent"].as_f64().unwrap() > 0.3, "{reason}");
    assert_eq!(reason["threshold_percent"], 0.3);
    assert!(
        reason["message"]
            .as_str()
            .unwrap()
            .contains("complaint rate"),
        "{reason}"
    );
    assert_eq!(
        paused["guard"]["complaint_rate"]["level"], "tripped",
        "{paused}"
    );

    // Nothing more is sent: what was in flight at the pause finishes, then the sink stays still.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let after = sink.messages().len();
    assert!(
        after <= at_pause + 50,
        "{at_pause} at the pause, {after} two seconds later"
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(sink.messages().len(), after, "still sending while paused");
    stop.cancel();
    let complaints = fbl.await.unwrap();

    // The event reached the webhook with the reason.
    let started = Instant::now();
    while events.lock().unwrap().is_empty() {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "no campaign_paused event"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let event = events.lock().unwrap()[0].clone();
    assert_eq!(
        (event["event"].as_str(), event["campaign"].as_str()),
        (Some("campaign_paused"), Some(id.as_str())),
        "{event}"
    );
    assert_eq!(event["reason"]["measure"], "complaint_rate", "{event}");

    // The rates show in the metrics too (the sending domain's, over its window).
    let m = metrics(addr).await;
    let trips = metric_value(
        &m,
        "sluice_guard_trips_total",
        "breaker=\"campaign\",measure=\"complaint_rate\"",
    );
    assert_eq!(trips, Some(1.0), "{m}");

    // A restart keeps it paused, with its reason.
    node.shutdown().await;
    let node = start(guarded_config(dir.path(), &sink, Some(hook))).await;
    let addr = node.http_addr;
    let again = campaign_json(addr, &id).await;
    assert_eq!(again["state"], "paused", "{again}");
    assert_eq!(again["paused_reason"], paused["paused_reason"], "{again}");
    assert_eq!(
        again["guard"]["complained"], paused["guard"]["complained"],
        "{again}"
    );

    // A plain resume is refused while the rate is over the threshold; force resumes it.
    let (status, body) = post_json(addr, &format!("/v1/campaigns/{id}/resume"), &json!({})).await;
    assert_eq!(status, 409, "{body}");
    assert_eq!(body["error"]["code"], "breaker_tripped", "{body}");
    assert_eq!(body["error"]["field"], "force", "{body}");
    let (status, body) = post_json(
        addr,
        &format!("/v1/campaigns/{id}/resume?force=true"),
        &json!({}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let counts = wait_counts(addr, &id, Duration::from_secs(60), |c| {
        c["delivered"] == 3000
    })
    .await;
    let done = campaign_json(addr, &id).await;
    assert_eq!(done["guard"]["judged"], false, "{done}");
    assert!(done.get("paused_reason").is_none(), "{done}");
    assert!(done["breaker_override_at"].is_string(), "{done}");
    report(
        "guard",
        "Complaint breaker (3,000 recipients at 400/s, ARF for every 200th delivered)",
        &[
            ("complaints sent before the pause", complaints.to_string()),
            ("delivered when judged", sample.to_string()),
            (
                "captured at the pause / 2 s later",
                format!("{at_pause} / {after}"),
            ),
            ("after forced resume", counts["delivered"].to_string()),
        ],
    );
    node.shutdown().await;
}

/// Acceptance 1: at 0.1% complaints the campaign is not paused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn complaints_under_the_threshold_leave_the_campaign_alone() {
    let dir = tempfile::tempdir().unwrap();
    let sink = Sink::start(SinkOptions::default()).await;
    let node = start(guarded_config(dir.path(), &sink, None)).await;
    let addr = node.http_addr;
    let stop = tokio_util::sync::CancellationToken::new();
    let fbl = feedback_loop(
        Arc::clone(&sink.stats),
        node.bounce_addr.unwrap(),
        1000,
        stop.clone(),
    );
    let id = campaign(addr, "news@example.com", 0, 3000, "1000/s", json!({})).await;
    wait_counts(addr, &id, Duration::from_secs(60), |c| {
        c["delivered"] == 3000
    })
    .await;
    // The last complaint arrives after the last delivery: give it and one evaluation time.
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.cancel();
    assert_eq!(fbl.await.unwrap(), 3);
    let v = campaign_json(addr, &id).await;
    assert_eq!(v["state"], "active", "{v}");
    assert_eq!(v["guard"]["complained"], 3, "{v}");
    assert_eq!(v["guard"]["complaint_rate"]["rate_percent"], 0.1, "{v}");
    assert_eq!(v["guard"]["complaint_rate"]["level"], "ok", "{v}");
    node.shutdown().await;
}

/// Acceptance 2: a list with 10% unknown users is paused by the bounce breaker after 500
/// attempted; a clean campaign from the same domain keeps sending while the domain's rate stays
/// under the threshold. Then a campaign allowed 50% by its own threshold trips the domain
/// breaker instead, which pauses every campaign from the domain; the domain resumes only with
/// `force` while its window is over.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_users_trip_the_bounce_breaker_and_the_domain_breaker() {
    let rcpt = Arc::new(|rcpt: &str, _seen: usize| {
        // 10% unknown below 100,000; 30% from 10,000 to 20,000.
        let i = index_of(rcpt);
        let bad = match i {
            10_000..20_000 => i % 10 < 3,
            0..100_000 => i.is_multiple_of(10),
            _ => false,
        };
        if bad {
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
    let mut cfg = guarded_config(dir.path(), &sink, None);
    cfg.guard.domain_window = Duration::from_secs(600);
    let node = start(cfg).await;
    let addr = node.http_addr;
    // Bad list (10% unknown) slowly, clean list (indexes from 100,000) three times as fast:
    // the domain sees about 2.5%.
    let bad = campaign(addr, "news@example.com", 0, 2000, "200/s", json!({})).await;
    let clean = campaign(
        addr,
        "offers@example.com",
        100_000,
        3000,
        "600/s",
        json!({}),
    )
    .await;
    let paused = wait_state(addr, &bad, "paused", Duration::from_secs(30)).await;
    let reason = &paused["paused_reason"];
    assert_eq!(
        (reason["breaker"].as_str(), reason["measure"].as_str()),
        (Some("campaign"), Some("hard_bounce_rate")),
        "{paused}"
    );
    let sample = reason["sample"].as_u64().unwrap();
    assert!(
        (500..800).contains(&sample),
        "judged at {sample} attempted: {reason}"
    );
    wait_counts(addr, &clean, Duration::from_secs(60), |c| {
        c["delivered"] == 3000
    })
    .await;
    let (_, domain) = get_json(addr, "/v1/sending-domains/example.com").await;
    assert_eq!(domain["breaker"]["state"], "ok", "{domain}");
    let rate = domain["last_24h"]["hard_bounce_rate_percent"]
        .as_f64()
        .unwrap();
    assert!(rate < 5.0, "{domain}");
    let v = campaign_json(addr, &clean).await;
    assert_eq!(v["state"], "active", "{v}");

    // Allowed 50% by its own threshold, a list with 30% unknown trips the domain breaker
    // instead, which pauses every campaign from the domain, the clean one started beside it too.
    let lenient = campaign(
        addr,
        "news@example.com",
        10_000,
        3000,
        "400/s",
        json!({"guard": {"max_hard_bounce_percent": 50.0}}),
    )
    .await;
    let other = campaign(addr, "offers@example.com", 200_000, 3000, "50/s", json!({})).await;
    let paused = wait_state(addr, &lenient, "paused", Duration::from_secs(30)).await;
    assert_eq!(paused["paused_reason"]["breaker"], "domain", "{paused}");
    assert_eq!(paused["paused_reason"]["domain"], "example.com", "{paused}");
    assert_eq!(paused["paused_reason"]["window"], "10m", "{paused}");
    let v = wait_state(addr, &other, "paused", Duration::from_secs(5)).await;
    assert_eq!(v["paused_reason"]["breaker"], "domain", "{v}");
    // A campaign created now starts paused.
    let late = campaign(addr, "late@example.com", 300_000, 10, "50/s", json!({})).await;
    let v = campaign_json(addr, &late).await;
    assert_eq!(
        (v["state"].as_str(), v["paused_reason"]["breaker"].as_str()),
        (Some("paused"), Some("domain")),
        "{v}"
    );
    let (_, list) = get_json(addr, "/v1/sending-domains").await;
    let d = list["sending_domains"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["domain"] == "example.com")
        .cloned()
        .unwrap();
    assert_eq!(d["breaker"]["state"], "tripped", "{d}");
    assert_eq!(d["breaker"]["reason"]["measure"], "hard_bounce_rate", "{d}");
    let m = metrics(addr).await;
    assert_eq!(
        metric_value(
            &m,
            "sluice_guard_level",
            "domain=\"example.com\",measure=\"hard_bounce_rate\""
        ),
        Some(2.0),
        "{m}"
    );

    // Resuming a campaign the domain paused is refused while the domain is tripped; the domain
    // resumes only with force, and takes its campaigns along (not the one its own breaker
    // paused).
    let (status, body) =
        post_json(addr, &format!("/v1/campaigns/{other}/resume"), &json!({})).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (409, Some("breaker_tripped")),
        "{body}"
    );
    let (status, body) =
        post_json(addr, "/v1/sending-domains/example.com/resume", &json!({})).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (409, Some("breaker_tripped")),
        "{body}"
    );
    let (status, body) = post_json(
        addr,
        "/v1/sending-domains/example.com/resume?force=true",
        &json!({}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let resumed: Vec<&str> = body["resumed"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(Value::as_str)
        .collect();
    for id in [&lenient, &other, &late] {
        assert!(resumed.contains(&id.as_str()), "{id} not resumed: {body}");
    }
    assert!(!resumed.contains(&bad.as_str()), "{body}");
    let (_, domain) = get_json(addr, "/v1/sending-domains/example.com").await;
    assert_eq!(domain["breaker"]["state"], "exempt", "{domain}");
    wait_counts(addr, &late, Duration::from_secs(30), |c| {
        c["delivered"] == 10
    })
    .await;
    let v = campaign_json(addr, &bad).await;
    assert_eq!(v["state"], "paused", "{v}");
    node.shutdown().await;
}

/// Bad input: a campaign's thresholds out of range get 422 naming the field, and nothing is
/// created.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn campaign_thresholds_out_of_range_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let node = start(config(dir.path())).await;
    for (guard, field) in [
        (
            json!({"max_complaint_percent": 101}),
            "guard.max_complaint_percent",
        ),
        (
            json!({"max_hard_bounce_percent": -2}),
            "guard.max_hard_bounce_percent",
        ),
        (json!({"min_delivered": 0}), "guard.min_delivered"),
        (json!({"min_attempted": -1}), "guard.min_attempted"),
        (json!({"max_rate": 3}), "guard.max_rate"),
    ] {
        let (status, body) = post_json(
            node.http_addr,
            "/v1/campaigns",
            &json!({"from": "news@example.com", "subject": "s", "text": "t",
                    "recipients": [{"email": "a@sink.test"}], "guard": guard}),
        )
        .await;
        assert_eq!(status, 422, "{guard}: {body}");
        let got = body["error"]["field"].as_str().unwrap_or_default();
        assert!(got.starts_with(field), "{guard}: {body}");
    }
    let (_, list) = get_json(node.http_addr, "/v1/campaigns").await;
    assert_eq!(list["total"], 0, "{list}");
    node.shutdown().await;
}
