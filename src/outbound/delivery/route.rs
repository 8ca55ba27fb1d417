//! Routing: a destination domain to its site, and a site to an open SMTP connection.
//!
//! A site is a static relay (`[[route]]`) or the domain's MX set *with* preferences, so domains
//! hosted by one provider share one pool and one set of limits. Shaping is `[shaping]` overlaid
//! by the first `[[rule]]` matching the domain or one of the hosts. DNS lookups go through the
//! TTL-cached resolver; connecting tries MX hosts in preference order (equal ones shuffled).

use std::net::SocketAddr;
use std::sync::{Arc, LazyLock};

use prometheus::{IntCounterVec, register_int_counter_vec};

use super::Delivery;
use super::site::{Site, Target};
use crate::outbound::dns::{DnsFailure, MxHost};
use crate::outbound::outcome::{self, Outcome};
use crate::outbound::smtp::client::{Connection, SmtpError, TlsMode};
use crate::outbound::smtp::reply::{Command, EnhancedCode};

static CONNECTIONS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register_int_counter_vec!(
        "sluice_smtp_connections_total",
        "Outbound SMTP connection attempts by result (ok, failed) and site label. A high failed share means an unreachable site.",
        &["result", "site"]
    )
    .expect("metric registers once")
});

impl Delivery {
    /// The site serving `domain`, created on first use. A DNS failure is the domain's.
    pub(super) async fn site_for(&self, domain: &str) -> Result<Arc<Site>, DnsFailure> {
        let route = self
            .config
            .routes
            .iter()
            .find(|r| crate::config::name_matches(&r.domain, domain));
        let (key, targets, relay_label) = match route {
            Some(r) => {
                let (host, port) = r.relay.rsplit_once(':').unwrap_or((r.relay.as_str(), "25"));
                let port = port.parse().unwrap_or(25);
                let host = host
                    .trim_start_matches('[')
                    .trim_end_matches(']')
                    .to_owned();
                let key = format!("relay:{host}:{port}");
                (
                    key.clone(),
                    vec![Target {
                        name: host,
                        port,
                        preference: 0,
                    }],
                    Some(key),
                )
            }
            None => {
                let hosts = self.dns.mx(domain).await?;
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
                (names.join(","), targets, None)
            }
        };
        let mut sites = self.sites.lock().expect("sites lock");
        if let Some(site) = sites.get(&key) {
            return Ok(Arc::clone(site));
        }
        let rule = self
            .config
            .rules
            .iter()
            .find(|r| r.matches(domain) || targets.iter().any(|t: &Target| r.matches(&t.name)));
        let shaping = rule.map_or_else(
            || self.config.shaping.clone(),
            |r| r.apply(&self.config.shaping),
        );
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
        if let Some(cluster) = self.node.cluster() {
            let names: Vec<String> = self.sources.iter().map(|s| s.name.clone()).collect();
            site = site.shared(cluster, &names);
        }
        let site = Arc::new(site);
        sites.insert(key, Arc::clone(&site));
        Ok(site)
    }

    /// Opens a connection to the site from egress source `source` (its address, its EHLO name):
    /// MX hosts in preference order (equal ones shuffled), each address in turn, moving on only
    /// when connecting or the greeting fails. Counted by result.
    pub(super) async fn connect(&self, site: &Site, source: usize) -> Result<Connection, Outcome> {
        let result = self.try_hosts(site, source).await;
        let label = if result.is_ok() { "ok" } else { "failed" };
        CONNECTIONS
            .with_label_values(&[label, &site.stats.label])
            .inc();
        result
    }

    async fn try_hosts(&self, site: &Site, source_index: usize) -> Result<Connection, Outcome> {
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
            let addrs = match self.dns.addresses(&target.name).await {
                Ok(a) => a,
                Err(f) => {
                    last = Some(outcome::from_dns(&f));
                    continue;
                }
            };
            for ip in addrs.into_iter().take(4) {
                let peer = SocketAddr::new(ip, target.port);
                let tls = site.shaping.tls;
                match Connection::open(peer, source, &target.name, tls, client).await {
                    Ok(c) => return Ok(c),
                    Err(SmtpError::Tls(e)) if tls == TlsMode::Opportunistic => {
                        tracing::debug!(host = %target.name, error = %e, "TLS handshake failed; retrying in plain text");
                        match Connection::open(
                            peer,
                            source,
                            &target.name,
                            TlsMode::Disabled,
                            client,
                        )
                        .await
                        {
                            Ok(c) => return Ok(c),
                            Err(e) => last = Some(outcome::from_error(&e)),
                        }
                    }
                    Err(e) => last = Some(outcome::from_error(&e)),
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
