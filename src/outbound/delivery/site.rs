//! A site's live state: its hosts, shaping, throttles, lanes, idle connections and backoff, and
//! per egress source: its rate limiters, the shaping actions in force, AIMD and how fast it is
//! sending.
//!
//! Owns nothing outside one site. The site lock is held for a few field updates at a time and
//! may be held while calling the scheduler (whose lock is a leaf) or reading the node's shaping
//! actions and warm-up counts (leaves too), never across an `.await`.
//!
//! A site's `[[rule]]` limits apply per source (`per = "source"`, the default: providers count
//! per sending address) or to all sources together (`per = "site"`). On top of them, per
//! (source, site): a throttle action caps the rate and connections, a suspension stops the
//! source, and AIMD lowers both after a throttling reply and raises them back step by step.

use std::collections::VecDeque;
use std::num::NonZeroU32;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use governor::clock::Clock;
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};

use super::stats;
use crate::cluster::Cluster;
use crate::cluster::budget::{self, SharedRate};
use crate::config::{DeliveryConfig, Per, Rate, Scope, Shaping};
use crate::node::Node;
use crate::outbound::shaping::actions::Effect;
use crate::outbound::shaping::rules::Aimd;
use crate::scheduler::index::{DomainId, PendingJob};
use crate::scheduler::rate::Gcra;

/// One destination host of a site.
#[derive(Debug, Clone)]
pub(super) struct Target {
    pub name: String,
    pub port: u16,
    pub preference: u16,
}

pub(super) struct Site {
    pub key: String,
    /// Connections open (or being opened) per egress source (one count for all with
    /// `per = "site"`).
    pub open: Arc<[std::sync::atomic::AtomicU32]>,
    pub stats: Arc<stats::SiteStats>,
    pub targets: Vec<Target>,
    pub shaping: Shaping,
    /// The configured rate limiters, per source (one for all with `per = "site"`).
    limits: Vec<Limits>,
    /// The site's provider group in the shaping rules, if any.
    pub provider: Option<String>,
    /// What warm-up caps count against: the provider group, else the site (its key: labels
    /// beyond the first hundred sites are shared).
    pub group: String,
    /// Per egress source: held by the lane whose message waits for the source's rate limits,
    /// queued for by the lanes behind it. Tokio's mutex is fair, so messages held for a rate
    /// go in the order they were taken from the schedule (which is the fair order), and a
    /// lane that finds the source's turn taken waits in line rather than racing for the next
    /// token.
    pub turns: Vec<tokio::sync::Mutex<()>>,
    /// The MTA-STS policy its domain's mail follows (`enforce` or `testing`): such a domain has
    /// a site of its own, keyed by the policy's id, since its connections are checked for it.
    pub sts: Option<Arc<crate::outbound::sts_cache::Cached>>,
    pub inner: Mutex<SiteInner>,
}

struct Limits {
    message_rate: Option<DefaultDirectRateLimiter>,
    connection_rate: Option<DefaultDirectRateLimiter>,
    /// In cluster mode (and `scope = "cluster"`): the same limits, cluster-wide; they stand in
    /// for the local limiters above.
    shared: Option<Shared>,
}

/// The cluster-wide form of a (source, site)'s limits.
struct Shared {
    cluster: Arc<Cluster>,
    message_rate: Option<Arc<SharedRate>>,
    connection_rate: Option<Arc<SharedRate>>,
    /// The Redis key of its connection leases.
    leases: String,
}

/// What one egress source does at this site besides the configured limits.
#[derive(Default)]
pub(super) struct SourceLive {
    /// The shaping actions in force, as of [`Actions::generation`] `generation`.
    effect: Effect,
    generation: Option<u64>,
    /// A throttle action's limiter, with the rate it was built for.
    throttle: Option<(Rate, Gcra)>,
    aimd: Option<AimdState>,
    /// A rate limit said "not before" this, further than a lane waits: the source is passed
    /// over until then.
    blocked_until_ms: u64,
    /// A connection from it was opened and greeted lately. Until one is, and again after one
    /// fails, it opens one connection at a time (slow start), so a site that refuses the
    /// source sees one attempt, not `max_connections`.
    pub proven: bool,
    /// Messages sent in the current and the previous second, for the measured rate.
    second: u64,
    sent_this_second: u32,
    sent_last_second: u32,
}

/// AIMD in force for a (source, site).
#[derive(Debug, Clone)]
pub(super) struct AimdState {
    /// Messages per second allowed now.
    pub rate: f64,
    /// The rate set by the last decrease: a step adds a fraction of it.
    pub base: f64,
    /// Where it stops climbing and lets go: the configured rate, else the rate measured before
    /// the first decrease.
    pub ceiling: f64,
    pub connections: u32,
    pub last_change_ms: u64,
    /// The reply that caused the last decrease.
    pub reply: String,
    gcra: Gcra,
}

impl AimdState {
    /// Adds a step per clean interval since the last change; true when back at the ceiling
    /// and the connection limit (AIMD lets go).
    fn recover(&mut self, aimd: &Aimd, max_connections: u32, now: u64) -> bool {
        let interval = aimd.interval.as_millis().max(1) as u64;
        if now < self.last_change_ms + interval {
            return false;
        }
        let steps = (now - self.last_change_ms) / interval;
        self.rate = (self.rate + self.base * aimd.step * steps as f64).min(self.ceiling);
        self.connections = self
            .connections
            .saturating_add(u32::try_from(steps).unwrap_or(u32::MAX))
            .min(max_connections);
        self.last_change_ms += steps * interval;
        self.gcra = Gcra::per_second(self.rate);
        self.rate >= self.ceiling && self.connections >= max_connections
    }
}

pub(super) struct SiteInner {
    /// Domains attached to this site with jobs to take, served round-robin.
    pub active: VecDeque<DomainId>,
    pub lanes: u32,
    /// Pooled connections, each of its source.
    pub idle: Vec<stats::Held>,
    /// Smooth weighted round-robin state per pool (by index): one counter per member.
    pub pickers: std::collections::HashMap<usize, Vec<i64>>,
    /// Per egress source (by index).
    pub sources: Vec<SourceLive>,
    pub failures: u32,
    pub backoff_until_ms: u64,
    /// Marked dead (`delivery.dead_site_after` failed rounds in a row) until `backoff_until_ms`.
    pub dead: bool,
    pub last_activity: Instant,
    /// Forgotten by the sweeper (idle too long): no domain may be attached to it any more.
    pub retired: bool,
}

fn limiter(rate: Rate) -> DefaultDirectRateLimiter {
    let period = (rate.per / rate.count).max(Duration::from_nanos(1));
    // A burst of about 100 ms of traffic: smooth at the receiver, without stalls on jitter.
    let burst = (rate.per_second() * 0.1).floor().max(1.0) as u32;
    let quota = Quota::with_period(period)
        .expect("period is non-zero")
        .allow_burst(NonZeroU32::new(burst).expect("burst ≥ 1"));
    RateLimiter::direct(quota)
}

/// `None` when allowed now, else how long to wait.
pub(super) fn throttle(l: &Option<DefaultDirectRateLimiter>) -> Option<Duration> {
    let l = l.as_ref()?;
    // The wait must be measured on the limiter's own clock: instants of another clock instance
    // are not comparable.
    l.check()
        .err()
        .map(|not_until| not_until.wait_time_from(l.clock().now()))
}

impl Site {
    /// How the key of a static relay route's site begins (`relay:HOST:PORT`).
    pub const RELAY_PREFIX: &'static str = "relay:";

    /// The site is a static `[[route]]` relay, not a domain's MX set.
    pub fn is_relay(&self) -> bool {
        self.key.starts_with(Self::RELAY_PREFIX)
    }

    pub fn new(
        key: String,
        label: String,
        targets: Vec<Target>,
        shaping: Shaping,
        sources: usize,
        provider: Option<String>,
    ) -> Site {
        let counted = match shaping.per {
            Per::Source => sources.max(1),
            Per::Site => 1,
        };
        Site {
            open: (0..counted)
                .map(|_| std::sync::atomic::AtomicU32::new(0))
                .collect(),
            group: provider.clone().unwrap_or_else(|| key.clone()),
            key,
            provider,
            stats: Arc::new(stats::SiteStats::new(label)),
            limits: (0..counted)
                .map(|_| Limits {
                    message_rate: shaping.message_rate.map(limiter),
                    connection_rate: shaping.connection_rate.map(limiter),
                    shared: None,
                })
                .collect(),
            targets,
            shaping,
            turns: (0..sources.max(1))
                .map(|_| tokio::sync::Mutex::new(()))
                .collect(),
            sts: None,
            inner: Mutex::new(SiteInner {
                active: VecDeque::new(),
                lanes: 0,
                idle: Vec::new(),
                pickers: std::collections::HashMap::new(),
                sources: (0..sources.max(1)).map(|_| SourceLive::default()).collect(),
                failures: 0,
                backoff_until_ms: 0,
                dead: false,
                last_activity: Instant::now(),
                retired: false,
            }),
        }
    }

    /// Makes the site's limits cluster-wide (cluster mode, `scope = "cluster"`): `sources` are
    /// the egress sources' names, which name the limits in Redis with the site's key.
    pub fn shared(mut self, cluster: &Arc<Cluster>, sources: &[String]) -> Site {
        if self.shaping.scope != Scope::Cluster {
            return self;
        }
        for (i, l) in self.limits.iter_mut().enumerate() {
            let source = match self.shaping.per {
                Per::Source => sources.get(i).map_or("default", String::as_str),
                Per::Site => "*",
            };
            let (rate_key, leases) = budget::keys(&self.key, source);
            let rate = |r: Rate, what: &str| {
                Arc::new(SharedRate::new(
                    format!("{rate_key}:{what}"),
                    r.per_second(),
                ))
            };
            l.shared = Some(Shared {
                cluster: Arc::clone(cluster),
                message_rate: self.shaping.message_rate.map(|r| rate(r, "messages")),
                connection_rate: self.shaping.connection_rate.map(|r| rate(r, "connections")),
                leases,
            });
        }
        self
    }

    /// The cluster and lease key `source`'s connections need a lease under, in cluster mode.
    pub fn lease_key(&self, source: usize) -> Option<(&Arc<Cluster>, &str)> {
        let sh = self.limits[self.counted(source)].shared.as_ref()?;
        Some((&sh.cluster, sh.leases.as_str()))
    }

    /// Where `source`'s connections and limits are counted: its own, or the site's one.
    pub fn counted(&self, source: usize) -> usize {
        match self.shaping.per {
            Per::Source => source,
            Per::Site => 0,
        }
    }

    /// In cluster mode, while Redis answers: the most lanes worth running for the site, the
    /// leases this node holds under its keys plus one per key to ask for another. A lane
    /// without a connection place would only hold jobs that the lanes with one could send.
    pub fn leased_lanes(&self) -> Option<u32> {
        let mut lanes = None;
        for sh in self.limits.iter().filter_map(|l| l.shared.as_ref()) {
            if sh.cluster.degraded() {
                return None;
            }
            let held = u32::try_from(sh.cluster.leases_held(&sh.leases)).unwrap_or(u32::MAX);
            lanes = Some(lanes.unwrap_or(0u32).saturating_add(held.saturating_add(1)));
        }
        lanes
    }

    /// Whether any rate limit may apply to this site's transactions (lanes then take one job
    /// at a time, so none waits behind a limit another job is under).
    pub fn rate_limited(&self) -> bool {
        self.shaping.message_rate.is_some()
    }

    /// The most connections `source` may have open to the site now: the configured limit,
    /// lowered by a throttle action or AIMD, and one until a connection of it has worked.
    pub fn connection_cap(&self, source: usize) -> u32 {
        let g = self.lock();
        let Some(s) = g.sources.get(source) else {
            return self.shaping.max_connections;
        };
        // Slow start counts a source's own connections, which only limits per source do.
        if !s.proven && self.shaping.per == Per::Source {
            return 1;
        }
        let mut cap = self.shaping.max_connections;
        if let Some(c) = s.effect.max_connections {
            cap = cap.min(c);
        }
        if let Some(a) = &s.aimd {
            cap = cap.min(a.connections);
        }
        // Cluster mode without Redis: this node's share of the cluster-wide limit.
        if let Some(sh) = &self.limits[self.counted(source)].shared
            && sh.cluster.degraded()
        {
            let share = sh
                .cluster
                .local_share(f64::from(self.shaping.max_connections));
            cap = cap.min(share.floor() as u32);
        }
        cap.max(1)
    }

    /// A new connection from `source` is allowed by the connection rate now, else the wait.
    pub fn connection_throttle(&self, source: usize) -> Option<Duration> {
        let l = &self.limits[self.counted(source)];
        match &l.shared {
            Some(Shared {
                cluster,
                connection_rate: Some(r),
                ..
            }) => r.try_take(cluster, crate::now_ms()),
            _ => throttle(&l.connection_rate),
        }
    }

    pub fn lock(&self) -> std::sync::MutexGuard<'_, SiteInner> {
        self.inner.lock().expect("site lock")
    }

    /// Takes up to `max` due jobs, round-robin over the site's domains; domains with nothing due
    /// go back to the schedule.
    pub fn pop(&self, node: &Node, now_ms: u64, max: usize) -> Vec<PendingJob> {
        let mut g = self.lock();
        g.last_activity = Instant::now();
        node.scheduler.pop_round_robin(&mut g.active, now_ms, max)
    }

    pub fn has_work(&self) -> bool {
        !self.lock().active.is_empty()
    }

    /// A pooled connection of `source`, if there is one.
    pub fn take_idle(&self, source: usize) -> Option<stats::Held> {
        let mut g = self.lock();
        let i = g.idle.iter().rposition(|c| c.source == source)?;
        Some(g.idle.swap_remove(i).busy())
    }

    /// With limits per site (one connection count for all sources), a pooled connection of
    /// another source than `source`, taken out to be closed. `None` with limits per source.
    pub fn take_idle_of_another(&self, source: usize) -> Option<stats::Held> {
        if self.shaping.per != Per::Site {
            return None;
        }
        let mut g = self.lock();
        let i = g.idle.iter().position(|c| c.source != source)?;
        Some(g.idle.swap_remove(i).busy())
    }

    /// The source of pool `pool` (members `(source, weight)`) the next transaction goes from:
    /// smooth weighted round-robin per (site, pool), so each source gets its weight's share of
    /// the pool's transactions to this site, spread evenly. `None` if no member has a weight.
    ///
    /// Members for which `available` says no are passed over: their weight goes to the others
    /// for this pick. `None` if no member is available.
    pub fn pick_source(
        g: &mut SiteInner,
        pool: usize,
        members: &[(usize, u32)],
        available: impl Fn(usize) -> bool,
    ) -> Option<usize> {
        let current = g
            .pickers
            .entry(pool)
            .or_insert_with(|| vec![0; members.len()]);
        current.resize(members.len(), 0);
        let mut total = 0i64;
        let mut best: Option<usize> = None;
        for (i, &(source, w)) in members.iter().enumerate() {
            if w == 0 || !available(source) {
                continue;
            }
            total += i64::from(w);
            current[i] += i64::from(w);
            if best.is_none_or(|b| current[i] > current[b]) {
                best = Some(i);
            }
        }
        let b = best?;
        current[b] -= total;
        Some(members[b].0)
    }

    /// Brings `source`'s view of the shaping actions up to date, and AIMD up by the steps of
    /// the clean intervals since its last change.
    pub fn refresh(&self, g: &mut SiteInner, node: &Node, source: usize, name: &str, now: u64) {
        let generation = node.actions.generation();
        let s = &mut g.sources[source];
        if s.generation != Some(generation) || now >= s.effect.changes_at_ms {
            s.effect = node.actions.effect(name, &self.key, now);
            s.generation = Some(generation);
            s.throttle = match (s.effect.message_rate, s.throttle.take()) {
                (Some(r), Some((old, gcra))) if old == r => Some((r, gcra)),
                (Some(r), _) => Some((r, Gcra::new(r))),
                (None, _) => None,
            };
        }
        if let Some(a) = &mut s.aimd
            && a.recover(
                &node.shaping_rules().aimd,
                self.shaping.max_connections,
                now,
            )
        {
            tracing::info!(site = %self.key, source = name, "AIMD back at the limit; released");
            s.aimd = None;
        }
    }

    /// Whether `source` may be picked at `now`; else until when it may not.
    pub fn source_blocked(g: &SiteInner, source: usize, now: u64) -> Option<u64> {
        let s = &g.sources[source];
        if s.effect.suspended_until_ms > now {
            return Some(s.effect.suspended_until_ms);
        }
        (s.blocked_until_ms > now).then_some(s.blocked_until_ms)
    }

    /// Takes one message's place under `source`'s rate limits at `now`, or says how long to
    /// wait: the throttle action's and AIMD's limiters are asked first, without taking, then
    /// the configured one, then both take.
    pub fn take_rate(&self, g: &mut SiteInner, source: usize, now: u64) -> Option<Duration> {
        let s = &mut g.sources[source];
        let mut next = 0u64;
        if let Some((_, gcra)) = &s.throttle {
            next = next.max(gcra.next_allowed());
        }
        if let Some(a) = &s.aimd {
            next = next.max(a.gcra.next_allowed());
        }
        if next > now {
            return Some(Duration::from_millis(next - now));
        }
        let l = &self.limits[self.counted(source)];
        let wait = match &l.shared {
            Some(Shared {
                cluster,
                message_rate: Some(r),
                ..
            }) => r.try_take(cluster, now),
            _ => throttle(&l.message_rate),
        };
        if wait.is_some() {
            return wait;
        }
        if let Some((_, gcra)) = &mut s.throttle {
            gcra.try_take(now);
        }
        if let Some(a) = &mut s.aimd {
            a.gcra.try_take(now);
        }
        None
    }

    /// Passes `source` over until `until` (a rate limit further than a lane waits).
    pub fn block(g: &mut SiteInner, source: usize, until: u64) {
        let s = &mut g.sources[source];
        s.blocked_until_ms = s.blocked_until_ms.max(until);
    }

    /// Counts `n` messages sent from `source`, for its measured rate.
    pub fn count_sent(g: &mut SiteInner, source: usize, n: u32, now: u64) {
        let s = &mut g.sources[source];
        let second = now / 1000;
        if second != s.second {
            s.sent_last_second = if second == s.second + 1 {
                s.sent_this_second
            } else {
                0
            };
            s.sent_this_second = 0;
            s.second = second;
        }
        s.sent_this_second = s.sent_this_second.saturating_add(n);
    }

    /// Messages per second `source` sent lately: the last full second, blended with the
    /// current one as it fills.
    fn measured_rate(s: &SourceLive, now: u64) -> f64 {
        let second = now / 1000;
        let (this, last) = match second.saturating_sub(s.second) {
            0 => (s.sent_this_second, s.sent_last_second),
            1 => (0, s.sent_this_second),
            _ => (0, 0),
        };
        let f = (now % 1000) as f64 / 1000.0;
        f64::from(last) * (1.0 - f) + f64::from(this)
    }

    /// A throttling reply to `source`: its rate and connections go down by the AIMD factor, at
    /// most once per interval. Returns the new (rate, connections) if they changed.
    pub fn aimd_decrease(
        &self,
        source: usize,
        aimd: &Aimd,
        reply: &str,
        now: u64,
    ) -> Option<(f64, u32)> {
        let mut g = self.lock();
        let open = self.open[self.counted(source)].load(std::sync::atomic::Ordering::Relaxed);
        let s = g.sources.get_mut(source)?;
        let interval = aimd.interval.as_millis() as u64;
        if s.aimd
            .as_ref()
            .is_some_and(|a| now < a.last_change_ms + interval)
        {
            return None;
        }
        let measured = Site::measured_rate(s, now).max(aimd.min_rate);
        let configured = self.shaping.message_rate.map(Rate::per_second);
        let (current, ceiling, connections) = match &s.aimd {
            Some(a) => (a.rate.min(measured), a.ceiling, a.connections),
            None => (
                configured.map_or(measured, |c| c.min(measured)),
                configured.unwrap_or(measured),
                self.shaping.max_connections.min(open.max(1)),
            ),
        };
        let rate = (current * aimd.decrease).max(aimd.min_rate);
        let connections = ((f64::from(connections) * aimd.decrease).floor() as u32).max(1);
        s.aimd = Some(AimdState {
            rate,
            base: rate,
            ceiling: ceiling.max(rate),
            connections,
            last_change_ms: now,
            reply: reply.chars().take(256).collect(),
            gcra: Gcra::per_second(rate),
        });
        Some((rate, connections))
    }

    /// The sources AIMD holds below their limits here: (source, state).
    pub fn aimd_states(&self) -> Vec<(usize, AimdState)> {
        let g = self.lock();
        g.sources
            .iter()
            .enumerate()
            .filter_map(|(i, s)| Some((i, s.aimd.clone()?)))
            .collect()
    }

    /// Records a failed connection round and returns the time the site may be tried again:
    /// `site_backoff` doubling per consecutive failure up to `site_backoff_max`, or, from the
    /// `dead_site_after`th failure in a row, `dead_site_period` (the site is dead).
    pub fn failed(&self, d: &DeliveryConfig) -> u64 {
        let mut g = self.lock();
        g.failures = g.failures.saturating_add(1);
        if d.dead_site_after > 0 && g.failures >= d.dead_site_after {
            if !g.dead {
                tracing::warn!(site = %self.key, failures = g.failures, period = ?d.dead_site_period, "site dead: its mail waits without attempts");
            }
            g.dead = true;
            g.backoff_until_ms = crate::now_ms() + d.dead_site_period.as_millis() as u64;
            return g.backoff_until_ms;
        }
        let factor = 1u32 << (g.failures - 1).min(16);
        let backoff = d
            .site_backoff
            .saturating_mul(factor)
            .min(d.site_backoff_max);
        g.backoff_until_ms = crate::now_ms() + backoff.as_millis() as u64;
        tracing::info!(site = %self.key, failures = g.failures, backoff = ?backoff, "site unreachable; backing off");
        g.backoff_until_ms
    }

    pub fn view(&self, names: &[crate::config::Source]) -> stats::SiteView {
        let g = self.lock();
        stats::SiteView {
            key: self.key.clone(),
            stats: Arc::clone(&self.stats),
            max_connections: self.shaping.max_connections,
            lanes: g.lanes,
            backoff_until_ms: g.backoff_until_ms,
            dead: g.dead && g.backoff_until_ms > crate::now_ms(),
            provider: self.provider.clone(),
            sources: g
                .sources
                .iter()
                .enumerate()
                .map(|(i, s)| stats::SourceView {
                    name: names.get(i).map_or_else(String::new, |n| n.name.clone()),
                    open: self.open[self.counted(i)].load(std::sync::atomic::Ordering::Relaxed),
                    aimd: s.aimd.as_ref().map(|a| (a.rate, a.connections)),
                    rate: Site::measured_rate(s, crate::now_ms()),
                })
                .collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn site(max_connections: u32, message_rate: Option<Rate>) -> Site {
        let shaping = Shaping {
            max_connections,
            max_messages_per_connection: 100,
            max_recipients_per_message: 1,
            message_rate,
            connection_rate: None,
            tls: Default::default(),
            per: Per::Source,
            scope: Default::default(),
            mta_sts: true,
            dane: true,
        };
        Site::new("k".into(), "k".into(), Vec::new(), shaping, 2, None)
    }

    #[test]
    fn aimd_halves_once_per_interval_then_climbs_back_and_lets_go() {
        let rules = crate::outbound::shaping::rules::ShapingRules::parse(
            "s.toml",
            "[aimd]\ndecrease = 0.5\ninterval = \"1s\"\nstep = 0.1\nmin_rate = \"1/s\"\ncode = [421]\n",
        )
        .unwrap();
        let aimd = &rules.aimd;
        let s = site(8, None);
        let t0 = 1_000_000;
        // 200 messages sent in the last second.
        {
            let mut g = s.lock();
            Site::count_sent(&mut g, 0, 200, t0 - 1000);
            Site::count_sent(&mut g, 0, 0, t0);
        }
        s.open[0].store(8, std::sync::atomic::Ordering::Relaxed);
        let (rate, conns) = s.aimd_decrease(0, aimd, "421 4.7.0 slow down", t0).unwrap();
        assert!((rate - 100.0).abs() < 1e-9, "{rate}");
        assert_eq!(conns, 4);
        // One decrease per interval: the burst's other replies change nothing.
        assert!(s.aimd_decrease(0, aimd, "421", t0 + 500).is_none());
        // The other source is untouched.
        assert!(s.lock().sources[1].aimd.is_none());
        let mut a = s.lock().sources[0].aimd.clone().unwrap();
        assert!((a.ceiling - 200.0).abs() < 1e-9);
        // Three clean intervals: three steps of a tenth of 100, one connection each.
        assert!(!a.recover(aimd, 8, t0 + 3_500));
        assert!((a.rate - 130.0).abs() < 1e-9, "{}", a.rate);
        assert_eq!(a.connections, 7);
        // Back at the ceiling and the connection limit: released.
        assert!(a.recover(aimd, 8, t0 + 20_000));
        assert!((a.rate - 200.0).abs() < 1e-9);
        // A configured rate caps the ceiling.
        let limited = site(
            8,
            Some(Rate {
                count: 50,
                per: Duration::from_secs(1),
            }),
        );
        {
            let mut g = limited.lock();
            Site::count_sent(&mut g, 0, 40, t0 - 1000);
        }
        let (rate, _) = limited.aimd_decrease(0, aimd, "421", t0).unwrap();
        assert!((rate - 20.0).abs() < 1e-9, "{rate}");
        assert!((limited.lock().sources[0].aimd.as_ref().unwrap().ceiling - 50.0).abs() < 1e-9);
    }

    #[test]
    fn a_passed_over_source_gives_its_share_to_the_others() {
        let s = site(1, None);
        let members = [(0, 2), (1, 1)];
        let mut g = s.lock();
        let picks: Vec<usize> = (0..6)
            .map(|_| Site::pick_source(&mut g, 0, &members, |_| true).unwrap())
            .collect();
        assert_eq!(picks.iter().filter(|&&p| p == 0).count(), 4);
        let only_one: Vec<usize> = (0..4)
            .map(|_| Site::pick_source(&mut g, 0, &members, |src| src == 1).unwrap())
            .collect();
        assert_eq!(only_one, vec![1, 1, 1, 1]);
        assert_eq!(Site::pick_source(&mut g, 0, &members, |_| false), None);
    }

    #[test]
    fn limiter_burst_is_a_tenth_of_a_second() {
        let l = limiter(Rate {
            count: 100,
            per: Duration::from_secs(1),
        });
        let allowed = (0..100).filter(|_| l.check().is_ok()).count();
        assert_eq!(allowed, 10);
        let slow = limiter(Rate {
            count: 60,
            per: Duration::from_secs(60),
        });
        assert!(slow.check().is_ok());
        assert!(slow.check().is_err());
    }
}
