//! Per-site statistics: the bounded `site` label of delivery metrics, connection and in-flight
//! gauges, delivery rates, and the reports behind `GET /v1/domains` and `GET /v1/queue`.
//!
//! Label values never carry raw recipient domains: a site is labelled by the `[[rule]]` that
//! shapes it (its `name`, else its pattern), by its static route, or by its primary MX host for
//! the first [`MAX_SITE_LABELS`] unconfigured sites; later ones share `other`. Reports read the
//! queue index under its lock (O(queued), so every few seconds at most) and one job record per
//! site from the spool on the blocking pool.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::ops::{Deref, DerefMut};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, LazyLock, Mutex};
use std::time::Instant;

use prometheus::{GaugeVec, IntGauge, IntGaugeVec, register_gauge_vec, register_int_gauge_vec};
use serde::Serialize;

use crate::node::Node;
use crate::outbound::smtp::client::Connection;
use crate::store::spool::{JobId, JobRecord, Reach};

/// Unconfigured sites that get a label of their own; the rest are `other`.
pub const MAX_SITE_LABELS: usize = 100;
/// The label of jobs whose domain has not been resolved to a site (or failed to resolve).
pub const UNRESOLVED: &str = "unresolved";

static CONN_OPEN: LazyLock<IntGaugeVec> = LazyLock::new(|| {
    register_int_gauge_vec!(
        "sluice_smtp_connections_open",
        "Outbound SMTP connections open per site, busy or idle in the pool. Capped by the site's max_connections.",
        &["site"]
    )
    .expect("metric registers once")
});

static CONN_IN_USE: LazyLock<IntGaugeVec> = LazyLock::new(|| {
    register_int_gauge_vec!(
        "sluice_smtp_connections_in_use",
        "Outbound SMTP connections per site held by a sender right now. Near max_connections with a growing queue: the site's limit is the bottleneck.",
        &["site"]
    )
    .expect("metric registers once")
});

static SITE_QUEUED: LazyLock<IntGaugeVec> = LazyLock::new(|| {
    register_int_gauge_vec!(
        "sluice_site_queue_jobs",
        "Recipients waiting per site (queued or deferred, due or not), refreshed every few seconds. site=\"unresolved\": domains not yet looked up.",
        &["site"]
    )
    .expect("metric registers once")
});

static SITE_QUEUED_BY_PRIORITY: LazyLock<IntGaugeVec> = LazyLock::new(|| {
    register_int_gauge_vec!(
        "sluice_site_queue_jobs_by_priority",
        "Recipients waiting per site and priority (0 to 9, higher is sent first; messages default to 7, campaigns to 5), refreshed every few seconds. A high priority that stays large: lower ones get only their guaranteed share.",
        &["site", "priority"]
    )
    .expect("metric registers once")
});

static SITE_IN_FLIGHT: LazyLock<IntGaugeVec> = LazyLock::new(|| {
    register_int_gauge_vec!(
        "sluice_site_in_flight_jobs",
        "Recipients taken by senders per site (being rendered, signed or sent).",
        &["site"]
    )
    .expect("metric registers once")
});

static SITE_OLDEST: LazyLock<GaugeVec> = LazyLock::new(|| {
    register_gauge_vec!(
        "sluice_site_oldest_job_age_seconds",
        "Age of the longest-waiting recipient per site (since it was accepted), refreshed every few seconds. Climbing steadily: the site is not keeping up or is deferring everything.",
        &["site"]
    )
    .expect("metric registers once")
});

/// Hands out site labels, keeping their number bounded.
#[derive(Default)]
pub struct Labels {
    given: Mutex<HashSet<String>>,
}

impl Labels {
    /// `wanted` if it is configured (a rule or route: bounded by the config) or one of the first
    /// [`MAX_SITE_LABELS`] others; else `other`.
    pub fn label(&self, wanted: String, configured: bool) -> String {
        let mut given = self.given.lock().expect("labels lock");
        if configured || given.contains(&wanted) {
            return wanted;
        }
        if given.len() < MAX_SITE_LABELS {
            given.insert(wanted.clone());
            return wanted;
        }
        "other".to_owned()
    }
}

/// Live counters of one site.
pub struct SiteStats {
    pub label: String,
    open: IntGauge,
    in_use: IntGauge,
    /// Jobs taken out of the queue by this site's lanes and not yet back or final.
    in_flight: AtomicU64,
    /// Deliveries, for the current rate.
    pub delivered: AtomicU64,
    /// (time, delivered) once a second, the last [`RATE_SAMPLES`].
    samples: Mutex<VecDeque<(Instant, u64)>>,
    /// The last reply or outcome, with its time.
    pub last_reply: Mutex<Option<(u64, String)>>,
}

const RATE_SAMPLES: usize = 11;

impl SiteStats {
    pub fn new(label: String) -> SiteStats {
        SiteStats {
            open: CONN_OPEN.with_label_values(&[&label]),
            in_use: CONN_IN_USE.with_label_values(&[&label]),
            label,
            in_flight: AtomicU64::new(0),
            delivered: AtomicU64::new(0),
            samples: Mutex::new(VecDeque::with_capacity(RATE_SAMPLES)),
            last_reply: Mutex::new(None),
        }
    }

    /// Counts `n` jobs in flight until the guard drops.
    pub fn hold(&self, n: usize) -> InFlight<'_> {
        self.in_flight.fetch_add(n as u64, Ordering::Relaxed);
        InFlight(self, n as u64)
    }

    pub fn in_flight(&self) -> u64 {
        self.in_flight.load(Ordering::Relaxed)
    }

    pub fn open(&self) -> i64 {
        self.open.get()
    }

    pub fn in_use(&self) -> i64 {
        self.in_use.get()
    }

    /// A new connection, counted open and in use while the returned value lives.
    /// A new connection of the site, from the source whose place `slot` holds.
    pub fn track(&self, conn: Connection, slot: Slot) -> Held {
        Held {
            conn,
            source: slot.source,
            _slot: slot,
            _open: Gauged::new(&self.open),
            busy: Some(Gauged::new(&self.in_use)),
            in_use: self.in_use.clone(),
        }
    }

    /// Takes the once-a-second sample for [`SiteStats::rate`].
    pub fn sample(&self) {
        let mut s = self.samples.lock().expect("samples lock");
        if s.len() == RATE_SAMPLES {
            s.pop_front();
        }
        s.push_back((Instant::now(), self.delivered.load(Ordering::Relaxed)));
    }

    /// Deliveries per second over the last ten seconds.
    pub fn rate(&self) -> f64 {
        let s = self.samples.lock().expect("samples lock");
        match (s.front(), s.back()) {
            (Some(a), Some(b)) if b.0 > a.0 => {
                (b.1 - a.1) as f64 / b.0.duration_since(a.0).as_secs_f64()
            }
            _ => 0.0,
        }
    }

    pub fn note_reply(&self, summary: String) {
        *self.last_reply.lock().expect("last reply lock") = Some((crate::now_ms(), summary));
    }
}

pub struct InFlight<'a>(&'a SiteStats, u64);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(self.1, Ordering::Relaxed);
    }
}

/// A gauge incremented while this lives.
struct Gauged(IntGauge);

impl Gauged {
    fn new(g: &IntGauge) -> Gauged {
        g.inc();
        Gauged(g.clone())
    }
}

impl Drop for Gauged {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// One of a source's `max_connections` places at a site, held by a connection (or by a lane
/// opening one) and given back when dropped.
pub struct Slot {
    counts: Arc<[AtomicU32]>,
    /// The count it holds a place in: its source's, or the site's one (`per = "site"`).
    index: usize,
    pub source: usize,
    /// In cluster mode: the lease that counts this place cluster-wide.
    pub lease: Option<crate::cluster::budget::Lease>,
}

impl Slot {
    /// Takes a place of `source` in count `index` if fewer than `max` are taken.
    pub fn take(counts: &Arc<[AtomicU32]>, index: usize, source: usize, max: u32) -> Option<Slot> {
        counts[index]
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < max).then_some(n + 1)
            })
            .ok()?;
        Some(Slot {
            counts: Arc::clone(counts),
            index,
            source,
            lease: None,
        })
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.counts[self.index].fetch_sub(1, Ordering::AcqRel);
    }
}

/// A connection of a site, counted in its open gauge while it lives and in its in-use gauge
/// while a lane holds it; it holds a place of its source ([`Slot`]).
pub struct Held {
    conn: Connection,
    /// The egress source it was opened from (an index into the configured sources).
    pub source: usize,
    _slot: Slot,
    _open: Gauged,
    busy: Option<Gauged>,
    in_use: IntGauge,
}

impl Held {
    /// Whether it holds a cluster-wide connection lease.
    pub fn leased(&self) -> bool {
        self._slot.lease.is_some()
    }

    /// Its cluster-wide connection lease, if it holds one.
    pub fn lease(&self) -> Option<&crate::cluster::budget::Lease> {
        self._slot.lease.as_ref()
    }

    /// Takes its cluster-wide lease, for the connection that replaces it.
    pub fn take_lease(&mut self) -> Option<crate::cluster::budget::Lease> {
        self._slot.lease.take()
    }

    /// Into the idle pool.
    pub fn idle(mut self) -> Held {
        self.busy = None;
        self
    }

    /// Out of the idle pool, to a lane.
    pub fn busy(mut self) -> Held {
        if self.busy.is_none() {
            self.busy = Some(Gauged::new(&self.in_use));
        }
        self
    }

    pub async fn quit(self) {
        self.conn.quit().await;
    }
}

impl Deref for Held {
    type Target = Connection;
    fn deref(&self) -> &Connection {
        &self.conn
    }
}

impl DerefMut for Held {
    fn deref_mut(&mut self) -> &mut Connection {
        &mut self.conn
    }
}

/// One site in `GET /v1/domains`.
#[derive(Debug, Serialize)]
pub struct SiteReport {
    /// The site's key: its MX hosts with preferences, or `relay:host:port`.
    pub site: String,
    /// Its label in metrics.
    pub label: String,
    /// Recipient domains served by this site with jobs (the first 20).
    pub domains: Vec<String>,
    pub domain_count: usize,
    pub queued: u64,
    /// Queued recipients per priority (higher is sent first).
    pub queued_by_priority: BTreeMap<u8, u64>,
    pub in_flight: u64,
    pub connections: Connections,
    /// Deliveries per second over the last ten seconds.
    pub rate_per_second: f64,
    /// `active` (sending), `idle`, `backoff` (connections failing; see `backoff_until`),
    /// `dead` (connections failed `delivery.dead_site_after` times in a row: mail waits until
    /// `backoff_until` without attempts) or `suspended` (every domain with jobs suspended).
    pub state: &'static str,
    /// Its provider group in the shaping rules.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub provider: Option<String>,
    /// Per egress source that has connections, shaping or AIMD here.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub sources: Vec<SourceReport>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub backoff_until: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_reply: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_reply_at: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub oldest_queued_seconds: Option<f64>,
}

/// One egress source at a site in `GET /v1/domains`.
#[derive(Debug, Serialize)]
pub struct SourceReport {
    pub source: String,
    pub connections: u32,
    /// Messages per second it sent lately.
    pub rate_per_second: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub suspended_until: Option<String>,
    /// A throttle action's limits.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub throttle: Option<Throttle>,
    /// AIMD's current limits, while it holds the source below the configured ones.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub aimd: Option<AimdReport>,
}

#[derive(Debug, Serialize)]
pub struct Throttle {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub message_rate: Option<crate::config::Rate>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_connections: Option<u32>,
}

/// A (source, site) AIMD holds below its limits, in `GET /v1/shaping`.
#[derive(Debug, Serialize)]
pub struct AimdEntry {
    pub source: String,
    pub site: String,
    pub site_label: String,
    pub rate_per_second: f64,
    /// Where it lets go: the configured rate, else the rate measured before the first decrease.
    pub ceiling_per_second: f64,
    pub connections: u32,
    /// The last decrease or step.
    pub changed_at: String,
    /// The reply of the last decrease.
    pub reply: String,
}

#[derive(Debug, Serialize)]
pub struct AimdReport {
    pub rate_per_second: f64,
    pub connections: u32,
}

#[derive(Debug, Serialize)]
pub struct Connections {
    pub open: i64,
    pub in_use: i64,
    pub max: u32,
}

/// One recipient domain in `GET /v1/domains`.
#[derive(Debug, Serialize)]
pub struct DomainReport {
    pub domain: String,
    /// The site it was last resolved to; absent until it is first due.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub site: Option<String>,
    pub queued: u64,
    /// Queued recipients per priority (higher is sent first).
    pub queued_by_priority: BTreeMap<u8, u64>,
    /// Jobs taken out of the queue: being delivered, parked for a paused campaign, or waiting
    /// for their campaign's `max_rate`.
    pub held: u64,
    pub suspended: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub next_attempt: Option<String>,
}

/// Everything both reports and the gauges need, from one pass over the queue.
pub struct Report {
    pub sites: Vec<SiteReport>,
    pub domains: Vec<DomainReport>,
    pub queued: u64,
    pub held: u64,
    pub oldest_queued_seconds: Option<f64>,
}

/// What a site contributes to a report, before its oldest job is read.
#[derive(Default)]
struct Acc {
    queued: u64,
    by_priority: BTreeMap<u8, u64>,
    domains: Vec<String>,
    domain_count: usize,
    oldest: Option<JobId>,
    all_parked: bool,
}

/// The live view of a site needed by [`report`]; provided by the delivery engine.
pub struct SiteView {
    pub key: String,
    pub stats: Arc<SiteStats>,
    pub max_connections: u32,
    pub lanes: u32,
    pub backoff_until_ms: u64,
    pub dead: bool,
    pub provider: Option<String>,
    pub sources: Vec<SourceView>,
}

/// The live view of one source at a site.
pub struct SourceView {
    pub name: String,
    pub open: u32,
    /// AIMD's (rate, connections), if in force.
    pub aimd: Option<(f64, u32)>,
    pub rate: f64,
}

/// Builds the report. `sites` are the engine's sites and `domain_site` maps a domain to its
/// site's key (both empty when delivery is off).
pub async fn report(
    node: &Arc<Node>,
    sites: Vec<SiteView>,
    domain_site: &(dyn Fn(&str) -> Option<String> + Sync),
) -> Report {
    let domains = node.scheduler.summaries();
    let mut acc: HashMap<Option<String>, Acc> = HashMap::new();
    let mut out_domains = Vec::with_capacity(domains.len());
    let (mut queued, mut held) = (0u64, 0u64);
    for s in domains {
        let (name, pending, h, parked, next_due, oldest) = (
            s.name,
            s.pending,
            s.held,
            s.suspended,
            s.next_due_ms,
            s.oldest,
        );
        let by_priority: BTreeMap<u8, u64> =
            s.by_priority.iter().map(|&(p, n)| (p, n as u64)).collect();
        let site = domain_site(&name);
        queued += pending;
        held += h;
        let a = acc.entry(site.clone()).or_insert_with(|| Acc {
            all_parked: true,
            ..Acc::default()
        });
        a.queued += pending;
        for (&p, &n) in &by_priority {
            *a.by_priority.entry(p).or_default() += n;
        }
        a.domain_count += 1;
        a.all_parked &= parked;
        if a.domains.len() < 20 {
            a.domains.push(name.clone());
        }
        a.oldest = match (a.oldest, oldest) {
            (Some(x), Some(y)) => Some(x.min(y)),
            (x, y) => x.or(y),
        };
        out_domains.push(DomainReport {
            domain: name,
            site,
            queued: pending,
            queued_by_priority: by_priority,
            held: h,
            suspended: parked,
            next_attempt: next_due.map(crate::effects::delivery_log::rfc3339),
        });
    }
    out_domains.sort_by(|a, b| b.queued.cmp(&a.queued).then(a.domain.cmp(&b.domain)));

    // One record per site (and the unresolved group) tells its oldest job's acceptance time.
    let wanted: Vec<(Option<String>, JobId)> = acc
        .iter()
        .filter_map(|(k, a)| a.oldest.map(|j| (k.clone(), j)))
        .collect();
    let ids: Vec<JobId> = wanted.iter().map(|(_, j)| *j).collect();
    let read = Arc::clone(node);
    let records = tokio::task::spawn_blocking(move || read.spool.get_jobs(&ids, Reach::Disk))
        .await
        .ok()
        .and_then(Result::ok)
        .unwrap_or_default();
    let now = crate::now_ms();
    let mut ages: HashMap<Option<String>, f64> = HashMap::new();
    for ((key, _), bytes) in wanted.into_iter().zip(records) {
        if let Some(rec) = bytes.as_deref().and_then(|b| JobRecord::decode(b).ok()) {
            ages.insert(key, now.saturating_sub(rec.accepted_at_ms) as f64 / 1000.0);
        }
    }
    let oldest_queued_seconds = ages.values().copied().reduce(f64::max);

    let mut out_sites = Vec::with_capacity(sites.len() + 1);
    for v in sites {
        let key = Some(v.key.clone());
        let a = acc.remove(&key).unwrap_or_default();
        let state = if v.dead {
            "dead"
        } else if v.backoff_until_ms > now {
            "backoff"
        } else if v.lanes > 0 {
            "active"
        } else if a.domain_count > 0 && a.all_parked {
            "suspended"
        } else {
            "idle"
        };
        let last = v.stats.last_reply.lock().expect("last reply lock").clone();
        out_sites.push(SiteReport {
            label: v.stats.label.clone(),
            domains: a.domains,
            domain_count: a.domain_count,
            queued: a.queued,
            queued_by_priority: a.by_priority,
            in_flight: v.stats.in_flight(),
            connections: Connections {
                open: v.stats.open(),
                in_use: v.stats.in_use(),
                max: v.max_connections,
            },
            rate_per_second: (v.stats.rate() * 100.0).round() / 100.0,
            state,
            backoff_until: (v.backoff_until_ms > now)
                .then(|| crate::effects::delivery_log::rfc3339(v.backoff_until_ms)),
            last_reply_at: last
                .as_ref()
                .map(|(t, _)| crate::effects::delivery_log::rfc3339(*t)),
            last_reply: last.map(|(_, r)| r),
            oldest_queued_seconds: ages.get(&key).copied(),
            provider: v.provider,
            sources: v
                .sources
                .into_iter()
                .filter_map(|s| {
                    let e = node.actions.effect(&s.name, &v.key, now);
                    let throttled = e.message_rate.is_some() || e.max_connections.is_some();
                    let suspended = e.suspended_until_ms > now;
                    if s.open == 0 && s.rate < 0.005 && s.aimd.is_none() && !throttled && !suspended
                    {
                        return None;
                    }
                    Some(SourceReport {
                        connections: s.open,
                        rate_per_second: (s.rate * 100.0).round() / 100.0,
                        suspended_until: suspended
                            .then(|| crate::effects::delivery_log::rfc3339(e.suspended_until_ms)),
                        throttle: throttled.then_some(Throttle {
                            message_rate: e.message_rate,
                            max_connections: e.max_connections,
                        }),
                        aimd: s.aimd.map(|(r, c)| AimdReport {
                            rate_per_second: (r * 100.0).round() / 100.0,
                            connections: c,
                        }),
                        source: s.name,
                    })
                })
                .collect(),
            site: v.key,
        });
    }
    // Domains not (or no longer) attached to a live site.
    let mut rest = Acc::default();
    let mut rest_oldest: Option<f64> = None;
    for (key, a) in acc {
        rest.queued += a.queued;
        for (p, n) in a.by_priority {
            *rest.by_priority.entry(p).or_default() += n;
        }
        rest.domain_count += a.domain_count;
        rest.domains.extend(a.domains);
        if let Some(age) = ages.get(&key) {
            rest_oldest = Some(rest_oldest.map_or(*age, |o: f64| o.max(*age)));
        }
    }
    if rest.domain_count > 0 {
        rest.domains.truncate(20);
        out_sites.push(SiteReport {
            site: UNRESOLVED.to_owned(),
            label: UNRESOLVED.to_owned(),
            domains: rest.domains,
            domain_count: rest.domain_count,
            queued: rest.queued,
            queued_by_priority: rest.by_priority,
            in_flight: 0,
            connections: Connections {
                open: 0,
                in_use: 0,
                max: 0,
            },
            rate_per_second: 0.0,
            state: "idle",
            provider: None,
            sources: Vec::new(),
            backoff_until: None,
            last_reply: None,
            last_reply_at: None,
            oldest_queued_seconds: rest_oldest,
        });
    }
    out_sites.sort_by(|a, b| b.queued.cmp(&a.queued).then(a.site.cmp(&b.site)));
    Report {
        sites: out_sites,
        domains: out_domains,
        queued,
        held,
        oldest_queued_seconds,
    }
}

/// The labels [`publish`] set last time.
#[derive(Default)]
pub struct Published {
    sites: HashSet<String>,
    priorities: HashSet<(String, u8)>,
}

/// Sets the per-site gauges from a report; labels that had values before and have none now are
/// set to zero (summed over sites that share a label).
pub fn publish(report: &Report, published: &mut Published) {
    let mut by_priority: HashMap<(String, u8), i64> = HashMap::new();
    for s in &report.sites {
        for (&p, &n) in &s.queued_by_priority {
            *by_priority.entry((s.label.clone(), p)).or_default() += n as i64;
        }
    }
    for gone in published
        .priorities
        .iter()
        .filter(|k| !by_priority.contains_key(*k))
    {
        SITE_QUEUED_BY_PRIORITY
            .with_label_values(&[gone.0.as_str(), &gone.1.to_string()])
            .set(0);
    }
    for ((label, p), n) in &by_priority {
        SITE_QUEUED_BY_PRIORITY
            .with_label_values(&[label.as_str(), &p.to_string()])
            .set(*n);
    }
    published.priorities = by_priority.into_keys().collect();
    let previous = &mut published.sites;
    let mut queued: HashMap<&str, i64> = HashMap::new();
    let mut in_flight: HashMap<&str, i64> = HashMap::new();
    let mut oldest: HashMap<&str, f64> = HashMap::new();
    for s in &report.sites {
        *queued.entry(&s.label).or_default() += s.queued as i64;
        *in_flight.entry(&s.label).or_default() += s.in_flight as i64;
        let o = oldest.entry(&s.label).or_default();
        *o = o.max(s.oldest_queued_seconds.unwrap_or(0.0));
    }
    let now: HashSet<String> = queued.keys().map(|k| (*k).to_owned()).collect();
    for gone in previous.difference(&now) {
        SITE_QUEUED.with_label_values(&[gone]).set(0);
        SITE_IN_FLIGHT.with_label_values(&[gone]).set(0);
        SITE_OLDEST.with_label_values(&[gone]).set(0.0);
    }
    for (label, n) in queued {
        SITE_QUEUED.with_label_values(&[label]).set(n);
        SITE_IN_FLIGHT
            .with_label_values(&[label])
            .set(in_flight.get(label).copied().unwrap_or(0));
        SITE_OLDEST
            .with_label_values(&[label])
            .set(oldest.get(label).copied().unwrap_or(0.0));
    }
    *previous = now;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_are_bounded_except_configured_ones() {
        let l = Labels::default();
        for i in 0..MAX_SITE_LABELS {
            assert_eq!(l.label(format!("mx{i}.test"), false), format!("mx{i}.test"));
        }
        assert_eq!(l.label("mx0.test".into(), false), "mx0.test");
        assert_eq!(l.label("late.test".into(), false), "other");
        assert_eq!(l.label("gmail".into(), true), "gmail");
    }
}
