//! Webhooks: delivery events POSTed to HTTP receivers from the spool's durable outbox.
//!
//! Owns the receivers' senders and the event format. An event is a delivery-log record plus
//! `id` and `event`; it is staged ([`Webhooks::stage`]) into the same spool batch as the state
//! change it reports (a job's outcome, a suppression), so an event exists exactly when its cause
//! was stored. The spool's writer numbers events in write order; the id is that number, the
//! same for every receiver.
//!
//! One task per receiver reads its events in order from the outbox (on the blocking pool),
//! POSTs them as a JSON array signed with HMAC-SHA256, and deletes them once the receiver answered
//! 2xx. Anything else is retried with doubling waits; meanwhile events wait on disk, so a receiver
//! that is down never slows delivery. A POST under way when Sluice stops is finished (or times
//! out) first, so a restart resends only batches whose answer never came.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, LazyLock};
use std::time::Duration;

use prometheus::{IntCounterVec, IntGaugeVec, register_int_counter_vec, register_int_gauge_vec};
use serde::Serialize;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::{Config, WebhookConfig};
use crate::effects::delivery_log::LogRecord;
use crate::store::spool::{Durability, Spool, SpoolBatch};

static BACKLOG: LazyLock<IntGaugeVec> = LazyLock::new(|| {
    register_int_gauge_vec!(
        "sluice_webhook_backlog_events",
        "Events waiting in the outbox per webhook. Growing while sluice_webhook_posts_total{result=\"failed\"} rises: the receiver is down or refusing; the events wait on disk.",
        &["hook"]
    )
    .expect("metric registers once")
});

static POSTS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register_int_counter_vec!(
        "sluice_webhook_posts_total",
        "Webhook POSTs per webhook by result: ok (2xx), failed (any other status, a timeout or a refused connection; the batch is retried).",
        &["hook", "result"]
    )
    .expect("metric registers once")
});

static SENT: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register_int_counter_vec!(
        "sluice_webhook_events_sent_total",
        "Events a webhook receiver acknowledged (2xx).",
        &["hook"]
    )
    .expect("metric registers once")
});

/// The signature header of earlier releases, still sent (deprecated; use the Standard Webhooks
/// headers): `t=<unix seconds>,v1=<hex HMAC-SHA256(secret, "<t>.<body>")>`.
pub const SIGNATURE_HEADER: &str = "x-sluice-signature";

/// Standard Webhooks (<https://www.standardwebhooks.com>), which has verifiers in many
/// languages: the batch's id (the same when a batch is sent again), the time it was signed
/// (Unix seconds), and `v1,<base64 HMAC-SHA256(key, "<id>.<timestamp>.<body>")>` for each
/// secret, separated by spaces.
pub const ID_HEADER: &str = "webhook-id";
pub const TIMESTAMP_HEADER: &str = "webhook-timestamp";
pub const STANDARD_SIGNATURE_HEADER: &str = "webhook-signature";

/// The `webhook-signature` value for `body` with id `id` sent at `t`, one signature per key.
pub fn standard_signature(keys: &[Vec<u8>], id: &str, t: u64, body: &[u8]) -> String {
    use base64::Engine;
    let mut out = String::new();
    for k in keys {
        let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, k);
        let mut ctx = ring::hmac::Context::with_key(&key);
        ctx.update(id.as_bytes());
        ctx.update(b".");
        ctx.update(t.to_string().as_bytes());
        ctx.update(b".");
        ctx.update(body);
        if !out.is_empty() {
            out.push(' ');
        }
        out.push_str("v1,");
        out.push_str(&base64::engine::general_purpose::STANDARD.encode(ctx.sign().as_ref()));
    }
    out
}

#[derive(Serialize)]
struct Body<'a> {
    event: &'static str,
    #[serde(flatten)]
    record: &'a LogRecord,
}

struct Hook {
    id: u32,
    config: WebhookConfig,
    /// The HMAC keys of its secret and its previous ones, in that order.
    keys: Vec<Vec<u8>>,
}

/// The configured receivers.
pub struct Webhooks {
    hooks: Vec<Hook>,
}

/// FNV-1a: a stable 32-bit id for a receiver's name, used in outbox keys.
fn hook_id(name: &str) -> u32 {
    name.bytes().fold(0x811c_9dc5u32, |h, b| {
        (h ^ u32::from(b)).wrapping_mul(0x0100_0193)
    })
}

impl Webhooks {
    pub fn new(config: &Config) -> Result<Webhooks, String> {
        let mut seen = HashMap::new();
        let mut hooks = Vec::new();
        for w in &config.webhooks {
            let id = hook_id(w.name());
            if let Some(other) = seen.insert(id, w.name().to_owned()) {
                return Err(format!(
                    "webhooks {other:?} and {:?} collide in the outbox; rename one",
                    w.name()
                ));
            }
            let keys = std::iter::once(&w.secret)
                .chain(&w.previous_secrets)
                .map(|s| {
                    crate::config::webhook_key(s)
                        .map_err(|e| format!("webhook {:?}: secret {e}", w.name()))
                })
                .collect::<Result<Vec<_>, _>>()?;
            hooks.push(Hook {
                id,
                config: w.clone(),
                keys,
            });
        }
        Ok(Webhooks { hooks })
    }

    pub fn is_empty(&self) -> bool {
        self.hooks.is_empty()
    }

    /// The ids of the receivers that take `event` of `tenant` (`None`: the default tenant's):
    /// a receiver of a tenant takes that tenant's events only, one without a tenant every
    /// event.
    fn wanting(&self, event: &str, tenant: Option<&str>) -> Vec<u32> {
        let tenant = tenant.unwrap_or(crate::config::DEFAULT_TENANT);
        self.hooks
            .iter()
            .filter(|h| {
                h.config.wants(event) && h.config.tenant.as_deref().is_none_or(|t| t == tenant)
            })
            .map(|h| h.id)
            .collect()
    }

    /// The receivers that want `record` and its event JSON (without the id, added when sent);
    /// `None` when no receiver wants it.
    pub fn event(&self, record: &LogRecord) -> Option<(Vec<u32>, Vec<u8>)> {
        if self.hooks.is_empty() {
            return None;
        }
        let event = record.event();
        let hooks = self.wanting(event, record.tenant.as_deref());
        if hooks.is_empty() {
            return None;
        }
        let json = serde_json::to_vec(&Body { event, record }).ok()?;
        Some((hooks, json))
    }

    /// Adds a campaign's event (`campaign_paused`: a breaker paused it, and why) to `batch` for
    /// every receiver that wants it.
    pub fn stage_campaign(
        &self,
        batch: &mut SpoolBatch,
        event: &'static str,
        campaign: &crate::store::campaign::Campaign,
        reason: &crate::store::campaign::PausedReason,
    ) {
        let hooks = self.wanting(event, campaign.record.tenant.as_deref());
        if hooks.is_empty() {
            return;
        }
        let mut json = serde_json::json!({
            "event": event,
            "time_logged": crate::effects::delivery_log::rfc3339(reason.at_ms),
            "campaign": campaign.record.id.to_string(),
            "tags": campaign.record.tags,
            "reason": reason,
        });
        if let Some(t) = &campaign.record.tenant {
            json["tenant"] = serde_json::json!(t);
        }
        if let Ok(bytes) = serde_json::to_vec(&json) {
            batch.add_event(hooks, bytes);
        }
    }

    /// Adds `record`'s event to `batch` for every receiver that wants it.
    pub fn stage(&self, batch: &mut SpoolBatch, record: &LogRecord) {
        if let Some((hooks, json)) = self.event(record) {
            batch.add_event(hooks, json);
        }
    }

    /// Counts each receiver's backlog, drops the outbox of receivers no longer configured, and
    /// starts one sender per receiver. Blocking part on the blocking pool.
    pub async fn start(
        self: &Arc<Self>,
        spool: &Arc<Spool>,
        stop: CancellationToken,
        tasks: &TaskTracker,
    ) {
        let hooks = &self.hooks;
        let keep: HashSet<u32> = hooks.iter().map(|h| h.id).collect();
        let scan = Arc::clone(spool);
        let counted = tokio::task::spawn_blocking(move || scan.prune_events(&keep)).await;
        let counts = match counted {
            Ok(Ok((dropped, counts))) => {
                if dropped > 0 {
                    tracing::warn!(
                        dropped,
                        "outbox events of webhooks no longer configured were dropped"
                    );
                }
                counts
            }
            Ok(Err(e)) => {
                tracing::error!(error = %e, "reading the webhook outbox failed");
                HashMap::new()
            }
            Err(e) => {
                tracing::error!(error = %e, "reading the webhook outbox failed");
                HashMap::new()
            }
        };
        let mut gauges = HashMap::new();
        for h in hooks {
            let g = BACKLOG.with_label_values(&[h.config.name()]);
            g.set(counts.get(&h.id).copied().unwrap_or(0) as i64);
            gauges.insert(h.id, g);
        }
        spool.set_event_gauges(gauges);
        let client = match http_client() {
            Ok(c) => c,
            Err(e) => {
                tracing::error!(error = %e, "building the webhook HTTP client failed; no webhooks");
                return;
            }
        };
        for i in 0..hooks.len() {
            tasks.spawn(send_loop(
                Arc::clone(self),
                Arc::clone(spool),
                i,
                client.clone(),
                stop.clone(),
            ));
        }
    }
}

fn http_client() -> Result<reqwest::Client, reqwest::Error> {
    let roots = rustls::RootCertStore {
        roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
    };
    let tls = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map(|b| b.with_root_certificates(roots).with_no_client_auth());
    let builder = reqwest::Client::builder()
        .no_proxy()
        .user_agent(concat!("sluice/", env!("CARGO_PKG_VERSION")));
    match tls {
        Ok(tls) => builder.tls_backend_preconfigured(tls).build(),
        // The ring provider supports the default versions; this cannot fail in practice.
        Err(_) => builder.build(),
    }
}

/// `t=<secs>,v1=<hex>` for `body` sent at `t`.
pub fn sign(secret: &[u8], t: u64, body: &[u8]) -> String {
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret);
    let mut ctx = ring::hmac::Context::with_key(&key);
    ctx.update(t.to_string().as_bytes());
    ctx.update(b".");
    ctx.update(body);
    let tag = ctx.sign();
    let mut hex = String::with_capacity(64);
    for b in tag.as_ref() {
        hex.push_str(&format!("{b:02x}"));
    }
    format!("t={t},v1={hex}")
}

/// A batch's `webhook-id`: its first and last events' ids, so a batch sent again has the same.
fn batch_id(events: &[(u64, Vec<u8>)]) -> String {
    let first = events.first().map_or(0, |e| e.0);
    let last = events.last().map_or(0, |e| e.0);
    format!("msg_{first:016x}_{last:016x}")
}

/// The POST body: the events as a JSON array, each with its id spliced in front.
fn body(events: &[(u64, Vec<u8>)]) -> Vec<u8> {
    let mut out = Vec::with_capacity(events.iter().map(|(_, j)| j.len() + 32).sum::<usize>() + 2);
    out.push(b'[');
    for (i, (seq, json)) in events.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        out.extend_from_slice(format!("{{\"id\":\"{seq:016x}\",").as_bytes());
        // Stored events are JSON objects with at least one field: skip their `{`.
        out.extend_from_slice(json.get(1..).unwrap_or_default());
    }
    out.push(b']');
    out
}

async fn send_loop(
    hooks: Arc<Webhooks>,
    spool: Arc<Spool>,
    index: usize,
    client: reqwest::Client,
    stop: CancellationToken,
) {
    let hook = &hooks.hooks[index];
    let cfg = &hook.config;
    let name = cfg.name();
    let mut written = spool.events_written();
    let mut cursor = 0u64;
    let mut failures = 0u32;
    let backlog = BACKLOG.with_label_values(&[name]);
    loop {
        if stop.is_cancelled() {
            break;
        }
        // Marked seen before reading, so a write that lands during the read wakes the next wait.
        written.borrow_and_update();
        let read = Arc::clone(&spool);
        let (id, max) = (hook.id, cfg.batch_size);
        let events =
            match tokio::task::spawn_blocking(move || read.scan_events(id, cursor, max)).await {
                Ok(Ok(e)) => e,
                Ok(Err(e)) => {
                    tracing::error!(hook = name, error = %e, "reading the webhook outbox failed");
                    Vec::new()
                }
                Err(e) => {
                    tracing::error!(hook = name, error = %e, "reading the webhook outbox failed");
                    Vec::new()
                }
            };
        if events.is_empty() {
            tokio::select! {
                _ = stop.cancelled() => break,
                changed = written.changed() => if changed.is_err() { break },
            }
            continue;
        }
        let payload = body(&events);
        let t = crate::now_ms() / 1000;
        let signature = sign(&hook.keys[0], t, &payload);
        let id = batch_id(&events);
        let standard = standard_signature(&hook.keys, &id, t, &payload);
        // Not raced against `stop`: a POST that was sent is answered (or times out) first.
        let result = client
            .post(&cfg.url)
            .timeout(cfg.timeout)
            .header("content-type", "application/json")
            .header(ID_HEADER, id)
            .header(TIMESTAMP_HEADER, t.to_string())
            .header(STANDARD_SIGNATURE_HEADER, standard)
            .header(SIGNATURE_HEADER, signature)
            .body(payload)
            .send()
            .await;
        let ok = match &result {
            Ok(r) if r.status().is_success() => true,
            Ok(r) => {
                tracing::warn!(hook = name, status = %r.status(), events = events.len(), "webhook receiver refused a batch; retrying");
                false
            }
            Err(e) => {
                tracing::warn!(hook = name, error = %e, events = events.len(), "webhook POST failed; retrying");
                false
            }
        };
        if ok {
            POSTS.with_label_values(&[name, "ok"]).inc();
            SENT.with_label_values(&[name]).inc_by(events.len() as u64);
            failures = 0;
            let mut batch = spool.batch();
            for (seq, _) in &events {
                batch.delete_event(*seq, hook.id);
            }
            cursor = events.last().map_or(cursor, |(seq, _)| *seq);
            if let Err(e) = spool.write(batch, Durability::Buffered).await {
                // They are sent; a restart would send them again, which receivers must tolerate.
                tracing::error!(hook = name, error = %e, "removing sent webhook events failed");
            }
            backlog.sub(events.len() as i64);
            continue;
        }
        POSTS.with_label_values(&[name, "failed"]).inc();
        failures = failures.saturating_add(1);
        let wait = crate::outbound::retry::retry_delay(failures, cfg.retry_initial, cfg.retry_max);
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = tokio::time::sleep(Duration::from_millis(wait)) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn standard_signatures_match_the_standard_webhooks_vector_and_rotate() {
        // The example of the Standard Webhooks specification (and of its libraries' tests).
        let key = crate::config::webhook_key("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").unwrap();
        let (id, t, body) = (
            "msg_p5jXN8AQM9LWM0D4loKWxJek",
            1_614_265_330,
            br#"{"test": 2432232314}"#,
        );
        assert_eq!(
            standard_signature(std::slice::from_ref(&key), id, t, body),
            "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="
        );
        // Rotation: the current secret's signature, then each previous one's.
        let old = crate::config::webhook_key("an-older-secret-0123").unwrap();
        let both = standard_signature(&[key, old.clone()], id, t, body);
        let (first, second) = both.split_once(' ').unwrap();
        assert_eq!(first, "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=");
        assert_eq!(second, standard_signature(&[old], id, t, body));
        assert!(crate::config::webhook_key("short").is_err());
        assert!(crate::config::webhook_key("whsec_not base64!").is_err());
        assert!(
            crate::config::webhook_key("whsec_c2hvcnQ=").is_err(),
            "5 bytes"
        );
        assert_eq!(
            crate::config::webhook_key("0123456789abcdef").unwrap(),
            b"0123456789abcdef"
        );
        assert_eq!(
            batch_id(&[(1, Vec::new()), (0x2a, Vec::new())]),
            "msg_0000000000000001_000000000000002a"
        );
    }

    #[test]
    fn signature_is_hmac_sha256_of_time_and_body() {
        // RFC 4231 has no "t.body" vector; check against ring's one-shot HMAC of the same input.
        let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, b"0123456789abcdef");
        let tag = ring::hmac::sign(&key, b"1700000000.[]");
        let hex: String = tag.as_ref().iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(
            sign(b"0123456789abcdef", 1_700_000_000, b"[]"),
            format!("t=1700000000,v1={hex}")
        );
    }

    #[test]
    fn body_splices_ids_into_events() {
        let b = body(&[
            (1, br#"{"event":"delivered"}"#.to_vec()),
            (255, br#"{"event":"bounced","x":1}"#.to_vec()),
        ]);
        let v: serde_json::Value = serde_json::from_slice(&b).unwrap();
        assert_eq!(v[0]["id"], "0000000000000001");
        assert_eq!(v[0]["event"], "delivered");
        assert_eq!(v[1]["id"], "00000000000000ff");
        assert_eq!(v[1]["x"], 1);
    }

    #[test]
    fn hook_ids_are_stable() {
        assert_eq!(hook_id(""), 0x811c_9dc5);
        assert_eq!(hook_id("a"), 0xe40c_292c);
        assert_ne!(hook_id("crm"), hook_id("warehouse"));
    }
}
