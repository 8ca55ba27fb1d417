//! Resolver sanity: an NXDOMAIN answer bounces (and suppresses) a domain's recipients only
//! when the resolver looks healthy and a second lookup confirms it.
//!
//! A broken or hijacked resolver that answers NXDOMAIN for everything would otherwise bounce a
//! whole list as `bad-domain` and suppress it. So an NXDOMAIN is taken as a resolver fault,
//! and the recipients deferred (4.4.3), when
//! * a canary domain (`dns.canary`, looked up every `dns.canary_interval`) does not resolve;
//! * within `dns.fault_window`, at least [`FAULT_MIN_DOMAINS`] distinct domains got NXDOMAIN
//!   and they are half or more of the distinct domains looked up;
//! * or the domain itself resolved within [`RECENT_MS`] (domains do not vanish overnight).
//!
//! Otherwise the first NXDOMAIN defers the domain's recipients too, and a lookup at least
//! `dns.confirm_nxdomain_after` later, bypassing the cache, decides: still NXDOMAIN → bounced;
//! a confirmed domain keeps bouncing without another lookup for [`CONFIRMED_MS`]. Pure state
//! here (no I/O); the delivery engine does the lookups.

use std::collections::{HashMap, VecDeque};
use std::sync::{LazyLock, Mutex};

use prometheus::{IntCounterVec, IntGauge, register_int_counter_vec, register_int_gauge};

use crate::config::DnsConfig;

static FAULT: LazyLock<IntGauge> = LazyLock::new(|| {
    register_int_gauge!(
        "sluice_dns_resolver_fault",
        "1 while the resolver is taken to be at fault (a canary domain does not resolve, or NXDOMAIN answers for half or more of the domains looked up lately): no NXDOMAIN bounces anyone, recipients are deferred. Alert on it."
    )
    .expect("metric registers once")
});

static NXDOMAIN: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register_int_counter_vec!(
        "sluice_dns_nxdomain_total",
        "NXDOMAIN answers for recipient domains by what was done: confirmed (bounced), unconfirmed (deferred until a second lookup), fault (deferred: resolver fault), recent (deferred: the domain resolved lately).",
        &["verdict"]
    )
    .expect("metric registers once")
});

/// Distinct domains with NXDOMAIN within the fault window before the share counts.
pub const FAULT_MIN_DOMAINS: usize = 10;
/// How long a domain that resolved keeps an NXDOMAIN from being believed.
pub const RECENT_MS: u64 = 86_400_000;
/// How long a confirmed NXDOMAIN is believed without another lookup.
pub const CONFIRMED_MS: u64 = 3_600_000;
/// Most domains remembered as resolved, and as waiting for confirmation.
const MAX_DOMAINS: usize = 200_000;

/// What to do with an NXDOMAIN answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Bounce: confirmed earlier.
    Believe,
    /// Look again, bypassing the cache, and believe what that says.
    Confirm,
    /// Defer, for this reason.
    Defer(String),
}

#[derive(Default)]
struct Inner {
    /// Domain → when it last resolved (ms).
    resolved: HashMap<String, u64>,
    /// Lookups within the fault window: (ms, domain, NXDOMAIN?).
    window: VecDeque<(u64, String, bool)>,
    /// Per domain in the window: its lookups and its NXDOMAIN answers there.
    in_window: HashMap<String, (u32, u32)>,
    /// Domains in the window with at least one NXDOMAIN.
    nx_domains: usize,
    /// Domain → (first NXDOMAIN, when confirmed).
    nx: HashMap<String, (u64, Option<u64>)>,
    /// Why the canary check fails, while it does.
    canary: Option<String>,
    /// The fault the share check found at the last look.
    share: Option<String>,
}

pub struct ResolverHealth {
    confirm_ms: u64,
    window_ms: u64,
    inner: Mutex<Inner>,
}

impl ResolverHealth {
    pub fn new(config: &DnsConfig) -> ResolverHealth {
        FAULT.set(0);
        for verdict in ["confirmed", "unconfirmed", "fault", "recent"] {
            NXDOMAIN.with_label_values(&[verdict]);
        }
        ResolverHealth {
            confirm_ms: config.confirm_nxdomain_after.as_millis() as u64,
            window_ms: config.fault_window.as_millis() as u64,
            inner: Mutex::default(),
        }
    }

    /// `domain` resolved at `now`.
    pub fn resolved(&self, domain: &str, now: u64) {
        let mut g = self.inner.lock().expect("resolver health lock");
        if g.resolved.len() >= MAX_DOMAINS && !g.resolved.contains_key(domain) {
            g.resolved.retain(|_, t| now.saturating_sub(*t) < RECENT_MS);
            if g.resolved.len() >= MAX_DOMAINS {
                g.resolved.clear();
            }
        }
        g.resolved.insert(domain.to_owned(), now);
        g.nx.remove(domain);
        g.push(now, domain, false);
        self.update(&mut g, now);
    }

    /// `domain` got NXDOMAIN at `now`: what to do.
    pub fn nxdomain(&self, domain: &str, now: u64) -> Step {
        let mut g = self.inner.lock().expect("resolver health lock");
        g.push(now, domain, true);
        self.update(&mut g, now);
        let fault = g.canary.clone().or_else(|| g.share.clone());
        if let Some(why) = fault {
            NXDOMAIN.with_label_values(&["fault"]).inc();
            return Step::Defer(format!(
                "NXDOMAIN not trusted: resolver fault suspected ({why})"
            ));
        }
        if let Some(&at) = g.resolved.get(domain)
            && now.saturating_sub(at) < RECENT_MS
        {
            NXDOMAIN.with_label_values(&["recent"]).inc();
            return Step::Defer(format!(
                "NXDOMAIN not trusted: {domain} resolved {}s ago",
                now.saturating_sub(at) / 1000
            ));
        }
        if g.nx.len() >= MAX_DOMAINS && !g.nx.contains_key(domain) {
            let keep = self.confirm_ms.saturating_mul(10).max(CONFIRMED_MS);
            g.nx.retain(|_, (first, _)| now.saturating_sub(*first) < keep);
        }
        let (first, confirmed) = *g.nx.entry(domain.to_owned()).or_insert((now, None));
        match confirmed {
            Some(at) if now.saturating_sub(at) < CONFIRMED_MS => {
                NXDOMAIN.with_label_values(&["confirmed"]).inc();
                Step::Believe
            }
            _ if now.saturating_sub(first) >= self.confirm_ms => Step::Confirm,
            _ => {
                NXDOMAIN.with_label_values(&["unconfirmed"]).inc();
                Step::Defer(format!(
                    "NXDOMAIN, to be confirmed by a second lookup {}s after the first",
                    self.confirm_ms / 1000
                ))
            }
        }
    }

    /// When `domain`'s first NXDOMAIN may be confirmed, while it waits for that.
    pub fn confirm_at(&self, domain: &str) -> Option<u64> {
        let g = self.inner.lock().expect("resolver health lock");
        match g.nx.get(domain) {
            Some(&(first, None)) => Some(first.saturating_add(self.confirm_ms)),
            _ => None,
        }
    }

    /// The confirming lookup of `domain` said NXDOMAIN again.
    pub fn confirmed(&self, domain: &str, now: u64) {
        NXDOMAIN.with_label_values(&["confirmed"]).inc();
        let mut g = self.inner.lock().expect("resolver health lock");
        g.nx.entry(domain.to_owned()).or_insert((now, None)).1 = Some(now);
    }

    /// The canary check's result: `None` when every canary resolved.
    pub fn canary(&self, failure: Option<String>, now: u64) {
        let mut g = self.inner.lock().expect("resolver health lock");
        g.canary = failure;
        self.update(&mut g, now);
    }

    /// Why the resolver is taken to be at fault now, if it is.
    pub fn fault(&self, now: u64) -> Option<String> {
        let mut g = self.inner.lock().expect("resolver health lock");
        self.update(&mut g, now);
        g.canary.clone().or_else(|| g.share.clone())
    }

    /// Slides the window and re-judges the share of NXDOMAIN answers; sets the gauge.
    fn update(&self, g: &mut Inner, now: u64) {
        g.slide(now.saturating_sub(self.window_ms));
        let (nx, looked) = (g.nx_domains, g.in_window.len());
        g.share = (nx >= FAULT_MIN_DOMAINS && nx * 2 >= looked).then(|| {
            format!(
                "{nx} of {looked} domains looked up in the last {}s got NXDOMAIN",
                self.window_ms / 1000
            )
        });
        FAULT.set(i64::from(g.canary.is_some() || g.share.is_some()));
    }
}

impl Inner {
    /// A lookup of `domain` at `now` enters the window.
    fn push(&mut self, now: u64, domain: &str, nx: bool) {
        let e = match self.in_window.get_mut(domain) {
            Some(e) => e,
            None => self.in_window.entry(domain.to_owned()).or_default(),
        };
        e.0 += 1;
        if nx {
            e.1 += 1;
            if e.1 == 1 {
                self.nx_domains += 1;
            }
        }
        self.window.push_back((now, domain.to_owned(), nx));
    }

    /// Lookups before `start` leave the window.
    fn slide(&mut self, start: u64) {
        while self.window.front().is_some_and(|(t, _, _)| *t < start) {
            let Some((_, domain, nx)) = self.window.pop_front() else {
                break;
            };
            if let Some(e) = self.in_window.get_mut(&domain) {
                e.0 -= 1;
                if nx {
                    e.1 -= 1;
                    if e.1 == 0 {
                        self.nx_domains -= 1;
                    }
                }
                if e.0 == 0 {
                    self.in_window.remove(&domain);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn health() -> ResolverHealth {
        let config = DnsConfig {
            confirm_nxdomain_after: Duration::from_secs(60),
            fault_window: Duration::from_secs(60),
            ..DnsConfig::default()
        };
        ResolverHealth::new(&config)
    }

    #[test]
    fn an_nxdomain_is_believed_after_a_confirming_lookup_a_while_later() {
        let h = health();
        let t = 1_000_000;
        assert!(matches!(h.nxdomain("gone.example", t), Step::Defer(_)));
        assert!(matches!(
            h.nxdomain("gone.example", t + 59_000),
            Step::Defer(_)
        ));
        assert_eq!(h.confirm_at("gone.example"), Some(t + 60_000));
        assert_eq!(h.nxdomain("gone.example", t + 60_000), Step::Confirm);
        h.confirmed("gone.example", t + 60_000);
        assert_eq!(h.nxdomain("gone.example", t + 61_000), Step::Believe);
        // A domain that resolves again starts over.
        h.resolved("gone.example", t + 62_000);
        assert!(matches!(
            h.nxdomain("gone.example", t + 63_000),
            Step::Defer(_)
        ));
    }

    #[test]
    fn a_domain_that_resolved_lately_is_not_believed_gone() {
        let h = health();
        let t = 1_000_000;
        h.resolved("example.com", t);
        let Step::Defer(why) = h.nxdomain("example.com", t + 120_000) else {
            panic!("believed")
        };
        assert!(why.contains("resolved 120s ago"), "{why}");
        // A day later it is a plain unconfirmed NXDOMAIN.
        let later = t + RECENT_MS + 1;
        let Step::Defer(why) = h.nxdomain("example.com", later) else {
            panic!("believed")
        };
        assert!(why.contains("to be confirmed"), "{why}");
    }

    #[test]
    fn nxdomain_for_most_domains_at_once_is_a_resolver_fault() {
        let h = health();
        let t = 1_000_000;
        for i in 0..5 {
            h.resolved(&format!("ok{i}.example"), t);
        }
        for i in 0..9 {
            h.nxdomain(&format!("nx{i}.example"), t + i);
        }
        assert_eq!(h.fault(t + 10), None, "9 is below the minimum");
        let Step::Defer(why) = h.nxdomain("nx9.example", t + 10) else {
            panic!("believed")
        };
        assert!(why.contains("10 of 15 domains"), "{why}");
        // Even one that waited long enough is not confirmed during the fault.
        let Step::Defer(why) = h.nxdomain("nx0.example", t + 50_000) else {
            panic!("believed")
        };
        assert!(why.contains("resolver fault"), "{why}");
        // The window slides past: no fault any more.
        assert_eq!(h.fault(t + 120_000), None);
    }

    #[test]
    fn a_failing_canary_is_a_resolver_fault() {
        let h = health();
        h.canary(Some("canary.example does not resolve: NXDOMAIN".into()), 5);
        let Step::Defer(why) = h.nxdomain("a.example", 10) else {
            panic!("believed")
        };
        assert!(why.contains("canary.example"), "{why}");
        h.canary(None, 20);
        assert_eq!(h.fault(20), None);
    }
}
