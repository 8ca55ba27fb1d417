//! Routing: a destination domain to its site, and a site to an open SMTP connection.
//!
//! A site is a static relay (`[[route]]`) or the domain's MX set *with* preferences, so domains
//! hosted by one provider share one pool and one set of limits. Shaping is `[shaping]` overlaid
//! by the first `[[rule]]` matching the domain or one of the hosts. DNS lookups go through the
//! TTL-cached resolver, and what a domain resolved to is kept beside it ([`Route`]) for as long
//! as those answers hold, so a domain due again finds its site with one map look-up;
//! connecting tries MX hosts in preference order (equal ones shuffled).

use std::net::SocketAddr;
use std::sync::{Arc, LazyLock};

use prometheus::{IntCounterVec, register_int_counter_vec};

use super::site::{Site, Target};
use super::{Delivery, secure};
use crate::outbound::dns::{DnsFailure, MxAnswer, MxHost};
use crate::outbound::outcome::{self, Outcome};
use crate::outbound::smtp::client::{Connection, SmtpError, TlsMode, TlsPolicy};
use crate::outbound::smtp::reply::{Command, EnhancedCode};
use crate::outbound::sts;

static CONNECTIONS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register_int_counter_vec!(
        "sluice_smtp_connections_total",
        "Outbound SMTP connection attempts by result (ok, failed) and site label. A high failed share means an unreachable site.",
        &["result", "site"]
    )
    .expect("metric registers once")
});

/// What a domain resolved to: its site, until the answers that chose it may have changed.
pub(super) struct Route {
    pub site: Arc<Site>,
    /// When to resolve again (ms since the epoch): the MX answer's TTL, and with MTA-STS on the
    /// next look for a policy and the cached policy's expiry. Never, for a static relay route.
    pub until_ms: u64,
    /// When the resolver-health check last counted the domain as resolved (never, for a relay).
    noted_ms: u64,
}

impl Delivery {
    /// The site `domain`'s cached route names, while it is valid.
    ///
    /// The resolver-health check counts an answer used from here as a lookup, as it counted
    /// the resolver cache's answers, so the domains being served keep their place among those
    /// "looked up lately" beside any NXDOMAIN: once per half of its window, not every visit.
    pub(super) fn cached_site(&self, domain: &str, now_ms: u64) -> Option<Arc<Site>> {
        let half_window = self.config.dns.fault_window.as_millis() as u64 / 2;
        let (site, note) = {
            let mut routes = self.routes.lock().expect("routes lock");
            let r = routes.get_mut(domain).filter(|r| r.until_ms > now_ms)?;
            let note = now_ms >= r.noted_ms.saturating_add(half_window);
            if note {
                r.noted_ms = now_ms;
            }
            (Arc::clone(&r.site), note)
        };
        if note {
            self.health.resolved(domain, now_ms);
        }
        Some(site)
    }

    /// Drops `domain`'s cached route: its next activation resolves it again.
    pub(super) fn forget_route(&self, domain: &str) {
        if let Some(r) = self.routes.lock().expect("routes lock").get_mut(domain) {
            r.until_ms = 0;
        }
    }

    /// The site serving `domain`: the cached route's while valid, else resolved and cached.
    pub(super) async fn site_for(self: &Arc<Self>, domain: &str) -> Result<Arc<Site>, Outcome> {
        let now = crate::now_ms();
        if let Some(site) = self.cached_site(domain, now) {
            return Ok(site);
        }
        let (site, until_ms) = self.resolve(domain).await?;
        // `resolve` told the resolver-health check of its lookup; a relay needs none.
        let relay = site.is_relay();
        self.routes.lock().expect("routes lock").insert(
            domain.to_owned(),
            Route {
                site: Arc::clone(&site),
                until_ms,
                noted_ms: if relay { u64::MAX } else { now },
            },
        );
        Ok(site)
    }

    /// Resolves `domain` to its site, created on first use, and how long that holds (see
    /// [`Route::until_ms`]). A DNS failure is the domain's, and so is an enforced MTA-STS
    /// policy that none of its MX hosts matches.
    async fn resolve(self: &Arc<Self>, domain: &str) -> Result<(Arc<Site>, u64), Outcome> {
        let route = self
            .config
            .routes
            .iter()
            .find(|r| crate::config::name_matches(&r.domain, domain));
        let mut until_ms = u64::MAX;
        let (key, targets, relay_label, sts) = match route {
            Some(r) => {
                let (host, port) = r.relay.rsplit_once(':').unwrap_or((r.relay.as_str(), "25"));
                let port = port.parse().unwrap_or(25);
                let host = host
                    .trim_start_matches('[')
                    .trim_end_matches(']')
                    .to_owned();
                let key = format!("{}{host}:{port}", Site::RELAY_PREFIX);
                (
                    key.clone(),
                    vec![Target {
                        name: host,
                        port,
                        preference: 0,
                    }],
                    Some(key),
                    None,
                )
            }
            None => {
                // The policy lookup (usually a cached answer) runs beside the MX lookup.
                let (mx, sts) = tokio::join!(self.mx(domain), self.sts_policy(domain));
                let mx = mx.map_err(|f| {
                    let mut o = outcome::from_dns(&f);
                    // An NXDOMAIN waiting for its confirming lookup is tried again just then.
                    o.retry_at_ms = self.health.confirm_at(domain);
                    o
                })?;
                let now = crate::now_ms();
                let ttl = mx
                    .valid_until
                    .saturating_duration_since(std::time::Instant::now());
                until_ms = now.saturating_add(ttl.as_millis() as u64);
                if self.config.mta_sts.enabled {
                    // A policy published, changed or expired is met by the next look.
                    until_ms = until_ms.min(now + crate::outbound::sts_cache::RECHECK_MS);
                    if let Some(c) = &sts {
                        until_ms = until_ms.min(c.expires_ms());
                    }
                }
                let mut hosts = mx.hosts;
                let names = hosts.iter().map(|h| h.name.as_str());
                let sts = sts.filter(|_| self.shaping_for(domain, names).mta_sts);
                if let Some(c) = sts.as_ref().filter(|c| c.policy.mode == sts::Mode::Enforce) {
                    hosts.retain(|h| c.policy.matches(&h.name));
                    if hosts.is_empty() {
                        return Err(secure::no_matching_mx(domain, &c.policy));
                    }
                }
                // The rollup key is the MX set *with* preferences: two domains share a site
                // (its pool and throttles) only when they would pick hosts the same way.
                let mut names: Vec<String> = hosts
                    .iter()
                    .map(|h| format!("{}:{}", h.preference, h.name))
                    .collect();
                names.sort_unstable();
                let port = self.config.delivery.smtp_port;
                let targets = hosts
                    .iter()
                    .map(|h| Target {
                        name: h.name.clone(),
                        port,
                        preference: h.preference,
                    })
                    .collect();
                let key = match &sts {
                    Some(c) => format!("sts:{domain}:{}|{}", c.id, names.join(",")),
                    None => names.join(","),
                };
                (key, targets, None, sts)
            }
        };
        let mut sites = self.sites.lock().expect("sites lock");
        if let Some(site) = sites.get(&key) {
            return Ok((Arc::clone(site), until_ms));
        }
        let rule = self.rule_for(domain, targets.iter().map(|t| t.name.as_str()));
        let shaping = self.shaping_for(domain, targets.iter().map(|t| t.name.as_str()));
        let label = match (relay_label, rule) {
            (Some(relay), _) => self.labels.label(relay, true),
            (None, Some(r)) => self
                .labels
                .label(r.name.clone().unwrap_or_else(|| r.pattern.clone()), true),
            // The most preferred host names the site (alphabetically first among equals).
            (None, None) => {
                let primary = targets
                    .iter()
                    .min_by(|a, b| a.preference.cmp(&b.preference).then(a.name.cmp(&b.name)))
                    .map_or_else(|| key.clone(), |t| t.name.clone());
                self.labels.label(primary, false)
            }
        };
        let provider = {
            let rules = self.node.shaping_rules();
            let names = std::iter::once(domain).chain(targets.iter().map(|t| t.name.as_str()));
            rules.provider_of(names).map(str::to_owned)
        };
        let mut site = Site::new(
            key.clone(),
            label,
            targets,
            shaping,
            self.sources.len(),
            provider,
        );
        site.sts = sts;
        if let Some(cluster) = self.node.cluster() {
            let names: Vec<String> = self.sources.iter().map(|s| s.name.clone()).collect();
            site = site.shared(cluster, &names);
        }
        let site = Arc::new(site);
        sites.insert(key, Arc::clone(&site));
        Ok((site, until_ms))
    }

    /// The MX hosts of `domain`, with an NXDOMAIN believed only as
    /// [`crate::outbound::resolver_health`] says: otherwise it is a temporary failure (4.4.3)
    /// whose text says why.
    async fn mx(&self, domain: &str) -> Result<MxAnswer, DnsFailure> {
        use crate::outbound::resolver_health::Step;
        let now = crate::now_ms();
        match self.dns.mx(domain).await {
            Ok(hosts) => {
                self.health.resolved(domain, now);
                Ok(hosts)
            }
            Err(DnsFailure::NxDomain) => match self.health.nxdomain(domain, now) {
                Step::Believe => Err(DnsFailure::NxDomain),
                Step::Defer(why) => Err(DnsFailure::Temporary(why)),
                Step::Confirm => match self.dns.mx_fresh(domain).await {
                    Err(DnsFailure::NxDomain) => {
                        self.health.confirmed(domain, crate::now_ms());
                        Err(DnsFailure::NxDomain)
                    }
                    Ok(hosts) => {
                        self.health.resolved(domain, crate::now_ms());
                        Ok(hosts)
                    }
                    Err(other) => Err(other),
                },
            },
            Err(other) => Err(other),
        }
    }

    /// Looks the canary domains up (bypassing the cache) every `dns.canary_interval` and tells
    /// the resolver health check whether they all resolved.
    pub(super) async fn canary_loop(self: Arc<Self>) {
        let dns = &self.config.dns;
        let mut tick = tokio::time::interval(dns.canary_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = self.stop.cancelled() => return,
                _ = tick.tick() => {}
            }
            let mut failure = None;
            for canary in &dns.canary {
                if let Err(e) = self.dns.mx_fresh(canary).await {
                    failure = Some(format!("canary {canary} does not resolve: {e}"));
                    break;
                }
            }
            if let Some(why) = &failure
                && self.health.fault(crate::now_ms()).is_none()
            {
                tracing::error!(reason = %why, "DNS resolver fault suspected: NXDOMAIN answers defer instead of bouncing");
            }
            self.health.canary(failure, crate::now_ms());
        }
    }

    /// The first `[[rule]]` matching `domain` or one of its `hosts`.
    fn rule_for<'h>(
        &self,
        domain: &str,
        hosts: impl Iterator<Item = &'h str> + Clone,
    ) -> Option<&crate::config::Rule> {
        self.config
            .rules
            .iter()
            .find(|r| r.matches(domain) || hosts.clone().any(|h| r.matches(h)))
    }

    /// The shaping of a site of `domain` with MX `hosts`: `[shaping]` with its rule laid over.
    fn shaping_for<'h>(
        &self,
        domain: &str,
        hosts: impl Iterator<Item = &'h str> + Clone,
    ) -> crate::config::Shaping {
        self.rule_for(domain, hosts).map_or_else(
            || self.config.shaping.clone(),
            |r| r.apply(&self.config.shaping),
        )
    }

    /// Opens a connection to the site from egress source `source` (its address, its EHLO name):
    /// MX hosts in preference order (equal ones shuffled), each address in turn, moving on only
    /// when connecting or the greeting fails. Counted by result.
    pub(super) async fn connect(
        &self,
        site: &Site,
        source: usize,
        domain: &str,
    ) -> Result<Connection, Outcome> {
        let result = self.try_hosts(site, source, domain).await;
        let label = if result.is_ok() { "ok" } else { "failed" };
        CONNECTIONS
            .with_label_values(&[label, &site.stats.label])
            .inc();
        result
    }

    /// Tries the site's hosts in order; TLS policy results are counted for `domain`, whose mail
    /// the connection is opened for.
    async fn try_hosts(
        &self,
        site: &Site,
        source_index: usize,
        domain: &str,
    ) -> Result<Connection, Outcome> {
        let source = self.sources.get(source_index).and_then(|s| s.address);
        let client = &self.clients[source_index.min(self.clients.len() - 1)];
        let mut hosts: Vec<MxHost> = site
            .targets
            .iter()
            .map(|t| MxHost {
                name: t.name.clone(),
                preference: t.preference,
            })
            .collect();
        crate::outbound::dns::order_mx(&mut hosts);
        let mut last = None;
        for host in &hosts {
            let Some(target) = site.targets.iter().find(|t| t.name == host.name) else {
                continue;
            };
            let (addrs, security) = match self.dns.addresses_secured(&target.name).await {
                Ok(a) => a,
                Err(f) => {
                    last = Some(outcome::from_dns(&f));
                    continue;
                }
            };
            // DANE, else the domain's MTA-STS policy, else the site's `tls`.
            let tls = match self.host_tls(site, target, security, domain).await {
                Ok(t) => t,
                Err(o) => {
                    last = Some(o);
                    continue;
                }
            };
            for ip in addrs.into_iter().take(4) {
                let peer = SocketAddr::new(ip, target.port);
                let mut attempt = tls.policy.clone();
                // The attempt under the host's own policy: its result is what TLS reports count.
                let mut first = true;
                loop {
                    let (mode, label) = (attempt.mode, attempt.label);
                    let e =
                        match Connection::open(peer, source, &target.name, attempt, client).await {
                            Ok(c) => {
                                if first {
                                    self.tls_result(domain, &tls, &target.name, ip, None);
                                }
                                return Ok(c);
                            }
                            Err(e) => e,
                        };
                    if first {
                        self.tls_result(domain, &tls, &target.name, ip, Some(&e));
                    }
                    // A policy in testing mode reports what enforcing it would have refused,
                    // and the connection is made as without it.
                    if first
                        && let Some(fallback) = tls.fallback
                        && secure::is_tls_failure(&e)
                    {
                        attempt = TlsPolicy {
                            label,
                            ..fallback.into()
                        };
                        first = false;
                        continue;
                    }
                    if mode == TlsMode::Opportunistic
                        && matches!(e, SmtpError::Tls(_) | SmtpError::Certificate { .. })
                    {
                        tracing::debug!(host = %target.name, error = %e, "TLS handshake failed; retrying in plain text");
                        attempt = TlsPolicy {
                            label,
                            ..TlsMode::Disabled.into()
                        };
                        first = false;
                        continue;
                    }
                    last = Some(outcome::from_error(&e));
                    break;
                }
            }
        }
        Err(last.unwrap_or_else(|| {
            outcome::local_failure(
                EnhancedCode(4, 4, 4),
                "no MX host could be tried",
                Command::Connect,
            )
        }))
    }
}
