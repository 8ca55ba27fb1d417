//! Webhooks end to end: a local receiver that checks every signature gets every delivery event
//! of a 1,000-recipient campaign once per event id, across a 30-second receiver outage and a
//! Sluice restart (SIGTERM, start again on the same spool).

use crate::common;

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::http::{HeaderMap, StatusCode};
use common::sink::{Sink, SinkOptions};
use common::*;
use serde_json::Value;
use tokio_util::sync::CancellationToken;

const SECRET: &str = "webhook-secret-0123456789";

#[derive(Default)]
struct Received {
    /// Every event of every request answered 2xx, in arrival order.
    events: Vec<Value>,
    /// Ids of events in requests the receiver answered with an error (may come again).
    failed_ids: HashSet<String>,
    bad_signatures: usize,
    requests: usize,
    /// Answer the next request with 503 (a receiver failure).
    fail_next: bool,
}

fn signature_ok(headers: &HeaderMap, body: &[u8]) -> bool {
    let Some(h) = headers
        .get("x-sluice-signature")
        .and_then(|v| v.to_str().ok())
    else {
        return false;
    };
    let mut t = None;
    let mut v1 = None;
    for part in h.split(',') {
        match part.split_once('=') {
            Some(("t", x)) => t = Some(x.to_owned()),
            Some(("v1", x)) => v1 = Some(x.to_owned()),
            _ => {}
        }
    }
    let (Some(t), Some(v1)) = (t, v1) else {
        return false;
    };
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, SECRET.as_bytes());
    let mut signed = t.clone().into_bytes();
    signed.push(b'.');
    signed.extend_from_slice(body);
    let want: String = ring::hmac::sign(&key, &signed)
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    // The Standard Webhooks headers, signed over the batch id, the same time and the body.
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    let (Some(id), Some(ts), Some(sig)) = (
        header("webhook-id"),
        header("webhook-timestamp"),
        header("webhook-signature"),
    ) else {
        return false;
    };
    let mut standard = format!("{id}.{ts}.").into_bytes();
    standard.extend_from_slice(body);
    let tag = ring::hmac::sign(&key, &standard);
    use base64::Engine;
    let b64 = base64::engine::general_purpose::STANDARD.encode(tag.as_ref());
    want == v1 && ts == t && sig == format!("v1,{b64}")
}

/// Serves the receiver on `addr` until `stop`.
async fn serve_receiver(
    addr: SocketAddr,
    state: Arc<Mutex<Received>>,
    stop: CancellationToken,
) -> tokio::task::JoinHandle<()> {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_reuseaddr(true).unwrap();
    socket.bind(addr).unwrap();
    let listener = socket.listen(64).unwrap();
    let app = axum::Router::new().route(
        "/hook",
        axum::routing::post(move |headers: HeaderMap, body: Bytes| {
            let state = Arc::clone(&state);
            async move {
                let mut s = state.lock().unwrap();
                s.requests += 1;
                if !signature_ok(&headers, &body) {
                    s.bad_signatures += 1;
                    return StatusCode::UNAUTHORIZED;
                }
                let events: Vec<Value> = serde_json::from_slice(&body).unwrap();
                if s.fail_next {
                    s.fail_next = false;
                    for e in &events {
                        s.failed_ids.insert(e["id"].as_str().unwrap().to_owned());
                    }
                    return StatusCode::SERVICE_UNAVAILABLE;
                }
                s.events.extend(events);
                StatusCode::NO_CONTENT
            }
        }),
    );
    tokio::spawn(async move {
        axum::serve(listener, app)
            .with_graceful_shutdown(stop.cancelled_owned())
            .await
            .unwrap();
    })
}

fn free_port() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_event_arrives_once_across_an_outage_and_a_restart() {
    let recipients = 1000usize;
    // Every tenth recipient is unknown (bounced); every seventh, when not bounced, is deferred once.
    // The breakers are off: a tenth unknown would pause the campaign (tests/guard.rs).
    let sink = Sink::start(SinkOptions {
        rcpt: Arc::new(|rcpt, prior| {
            let i: usize = rcpt
                .trim_start_matches("user")
                .split('@')
                .next()
                .and_then(|n| n.parse().ok())
                .unwrap_or(1);
            if i.is_multiple_of(10) {
                "550 5.1.1 no such user".into()
            } else if i % 7 == 3 && prior == 0 {
                "451 4.3.0 try again later".into()
            } else {
                "250 2.1.5 ok".into()
            }
        }),
        data_delay: Duration::from_millis(5),
        ..SinkOptions::default()
    })
    .await;
    let hook_addr = free_port();
    let state = Arc::new(Mutex::new(Received::default()));
    let mut receiver_stop = CancellationToken::new();
    let mut receiver = serve_receiver(hook_addr, Arc::clone(&state), receiver_stop.clone()).await;

    let dir = tempfile::tempdir().unwrap();
    let spool = dir.path().join("spool");
    let more = format!(
        "[delivery]\nenabled = true\nretry_initial = \"300ms\"\nretry_max = \"1s\"\n\
         [shaping]\nmax_connections = 2\n\
         [[route]]\ndomain = \"sink.test\"\nrelay = \"{}\"\n\
         [[webhook]]\nname = \"test\"\nurl = \"http://{hook_addr}/hook\"\nsecret = \"{SECRET}\"\n\
         batch_size = 50\nretry_initial = \"200ms\"\nretry_max = \"2s\"\n\
         [guard]\nenabled = false\n",
        sink.addr
    );
    let mut sluice = Process::spawn_with(dir.path(), &spool, &more);
    sluice.wait_ready(Duration::from_secs(30)).await;
    let id = post_campaign(sluice.addr, common::recipients(recipients)).await;

    // Events flow; then the receiver goes away for 30 s.
    let started = Instant::now();
    while state.lock().unwrap().events.len() < 100 {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "no events arrived"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    receiver_stop.cancel();
    receiver.await.unwrap();
    let outage = Instant::now();

    // Sluice restarts during the outage, with events still in its outbox.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let status = sluice.terminate(Duration::from_secs(30));
    assert!(status.success(), "graceful stop failed: {status}");
    sluice = Process::spawn_with(dir.path(), &spool, &more);
    sluice.wait_ready(Duration::from_secs(30)).await;
    let counts = wait_counts(sluice.addr, &id, Duration::from_secs(60), |c| {
        c["delivered"].as_u64().unwrap_or(0) + c["bounced"].as_u64().unwrap_or(0)
            == recipients as u64
    })
    .await;
    assert_eq!(counts["bounced"], 100);
    let during = state.lock().unwrap().events.len();

    // The events wait on disk, and the backlog gauge says so.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let backlog = metric_value(
        &metrics(sluice.addr).await,
        "sluice_webhook_backlog_events",
        "hook=\"test\"",
    )
    .expect("backlog gauge");
    assert!(backlog > 0.0, "no backlog during the outage");
    tokio::time::sleep(Duration::from_secs(30).saturating_sub(outage.elapsed())).await;
    // Back, and the first request it gets fails (a receiver error: those ids may repeat).
    state.lock().unwrap().fail_next = true;
    receiver_stop = CancellationToken::new();
    receiver = serve_receiver(hook_addr, Arc::clone(&state), receiver_stop.clone()).await;

    let deferred_expected = (0..recipients)
        .filter(|i| i % 10 != 0 && i % 7 == 3)
        .count();
    let expected = recipients + deferred_expected;
    let started = Instant::now();
    loop {
        let unique: HashSet<String> = state
            .lock()
            .unwrap()
            .events
            .iter()
            .map(|e| e["id"].as_str().unwrap().to_owned())
            .collect();
        if unique.len() >= expected {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "{} of {expected} events after the receiver came back",
            unique.len()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Nothing more trickles in.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let status = sluice.terminate(Duration::from_secs(30));
    assert!(status.success());
    receiver_stop.cancel();
    receiver.await.unwrap();

    let s = state.lock().unwrap();
    assert_eq!(s.bad_signatures, 0);
    assert!(
        !s.failed_ids.is_empty(),
        "the receiver failure was not exercised"
    );
    assert!(
        during < expected,
        "the outage came after every event was sent"
    );
    let mut seen: HashMap<&str, usize> = HashMap::new();
    for e in &s.events {
        *seen.entry(e["id"].as_str().unwrap()).or_default() += 1;
    }
    for (id, n) in &seen {
        assert!(
            *n == 1 || s.failed_ids.contains(*id),
            "event {id} arrived {n} times without a receiver failure"
        );
    }
    assert_eq!(seen.len(), expected);

    // One final event per recipient, a deferral for each deferred one, and the same records as
    // the delivery log (both runs).
    let mut by_type: HashMap<&str, HashSet<&str>> = HashMap::new();
    let mut unique_events: HashMap<&str, &Value> = HashMap::new();
    for e in &s.events {
        unique_events.insert(e["id"].as_str().unwrap(), e);
    }
    for e in unique_events.values() {
        assert_eq!(e["campaign"], id.as_str());
        by_type
            .entry(e["event"].as_str().unwrap())
            .or_default()
            .insert(e["recipient"].as_str().unwrap());
    }
    assert_eq!(by_type["delivered"].len(), 900);
    assert_eq!(by_type["bounced"].len(), 100);
    assert_eq!(by_type["deferred"].len(), deferred_expected);
    for e in unique_events.values().filter(|e| e["event"] == "bounced") {
        assert_eq!(e["bounce_cat"], "bad-mailbox");
        assert_eq!(e["reply_code"], 550);
    }
    let log: HashSet<(String, String, u64)> = log_records(dir.path())
        .iter()
        .map(|r| {
            (
                r["job"].as_str().unwrap().to_owned(),
                r["type"].as_str().unwrap().to_owned(),
                r["attempt"].as_u64().unwrap(),
            )
        })
        .collect();
    let events: HashSet<(String, String, u64)> = unique_events
        .values()
        .map(|e| {
            (
                e["job"].as_str().unwrap().to_owned(),
                e["type"].as_str().unwrap().to_owned(),
                e["attempt"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        events, log,
        "webhook events and delivery log records differ"
    );
}
