//! A site's live state: its hosts, shaping, throttles, lanes, idle connections and backoff.
//!
//! Owns nothing outside one site. The site lock is held for a few field updates at a time and
//! may be held while calling the scheduler (whose lock is a leaf), never across an `.await`.

use std::collections::VecDeque;
use std::num::NonZeroU32;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use governor::clock::Clock;
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};

use super::stats;
use crate::config::{DeliveryConfig, Rate, Shaping};
use crate::node::Node;
use crate::scheduler::index::{DomainId, PendingJob};

/// One destination host of a site.
#[derive(Debug, Clone)]
pub(super) struct Target {
    pub name: String,
    pub port: u16,
    pub preference: u16,
}

pub(super) struct Site {
    pub key: String,
    /// Connections open (or being opened) per egress source: each source has
    /// `max_connections` of its own, as providers count per sending address.
    pub open: Arc<[std::sync::atomic::AtomicU32]>,
    pub stats: Arc<stats::SiteStats>,
    pub targets: Vec<Target>,
    pub shaping: Shaping,
    pub message_rate: Option<DefaultDirectRateLimiter>,
    pub connection_rate: Option<DefaultDirectRateLimiter>,
    pub inner: Mutex<SiteInner>,
}

pub(super) struct SiteInner {
    /// Domains attached to this site with jobs to take, served round-robin.
    pub active: VecDeque<DomainId>,
    pub lanes: u32,
    /// Pooled connections, each of its source.
    pub idle: Vec<stats::Held>,
    /// Smooth weighted round-robin state per pool (by index): one counter per member.
    pub pickers: std::collections::HashMap<usize, Vec<i64>>,
    pub failures: u32,
    pub backoff_until_ms: u64,
    pub last_activity: Instant,
}

fn limiter(rate: Rate) -> DefaultDirectRateLimiter {
    let period = (rate.per / rate.count).max(Duration::from_nanos(1));
    // A burst of about 100 ms of traffic: smooth at the receiver, without stalls on jitter.
    let burst = ((f64::from(rate.count) / rate.per.as_secs_f64()) * 0.1)
        .floor()
        .max(1.0) as u32;
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
    pub fn new(
        key: String,
        label: String,
        targets: Vec<Target>,
        shaping: Shaping,
        sources: usize,
    ) -> Site {
        Site {
            key,
            open: (0..sources.max(1))
                .map(|_| std::sync::atomic::AtomicU32::new(0))
                .collect(),
            stats: Arc::new(stats::SiteStats::new(label)),
            message_rate: shaping.message_rate.map(limiter),
            connection_rate: shaping.connection_rate.map(limiter),
            targets,
            shaping,
            inner: Mutex::new(SiteInner {
                active: VecDeque::new(),
                lanes: 0,
                idle: Vec::new(),
                pickers: std::collections::HashMap::new(),
                failures: 0,
                backoff_until_ms: 0,
                last_activity: Instant::now(),
            }),
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

    /// The source of pool `pool` (members `(source, weight)`) the next transaction goes from:
    /// smooth weighted round-robin per (site, pool), so each source gets its weight's share of
    /// the pool's transactions to this site, spread evenly. `None` if no member has a weight.
    pub fn pick_source(&self, pool: usize, members: &[(usize, u32)]) -> Option<usize> {
        let mut g = self.lock();
        let current = g
            .pickers
            .entry(pool)
            .or_insert_with(|| vec![0; members.len()]);
        current.resize(members.len(), 0);
        let total: i64 = members.iter().map(|m| i64::from(m.1)).sum();
        let mut best: Option<usize> = None;
        for (i, &(_, w)) in members.iter().enumerate() {
            if w == 0 {
                continue;
            }
            current[i] += i64::from(w);
            if best.is_none_or(|b| current[i] > current[b]) {
                best = Some(i);
            }
        }
        let b = best?;
        current[b] -= total;
        Some(members[b].0)
    }

    /// Records a failed connection round and returns the time the site may be tried again:
    /// `site_backoff` doubling per consecutive failure up to `site_backoff_max`.
    pub fn failed(&self, d: &DeliveryConfig) -> u64 {
        let mut g = self.lock();
        g.failures = g.failures.saturating_add(1);
        let factor = 1u32 << (g.failures - 1).min(16);
        let backoff = d
            .site_backoff
            .saturating_mul(factor)
            .min(d.site_backoff_max);
        g.backoff_until_ms = crate::now_ms() + backoff.as_millis() as u64;
        tracing::info!(site = %self.key, failures = g.failures, backoff = ?backoff, "site unreachable; backing off");
        g.backoff_until_ms
    }

    pub fn view(&self) -> stats::SiteView {
        let g = self.lock();
        stats::SiteView {
            key: self.key.clone(),
            stats: Arc::clone(&self.stats),
            max_connections: self.shaping.max_connections,
            lanes: g.lanes,
            backoff_until_ms: g.backoff_until_ms,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
