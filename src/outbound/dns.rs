//! MX and address resolution (hickory-resolver, with its TTL-respecting cache).
//!
//! Owns the mapping from a recipient domain to the ordered list of hosts to try, and the
//! distinction the delivery engine acts on: a permanent answer (NXDOMAIN, null MX) fails the
//! recipients at once, a temporary one (SERVFAIL, timeout) defers them. Async network I/O only.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use hickory_resolver::TokioResolver;
use hickory_resolver::config::{ConnectionConfig, NameServerConfig, ResolverConfig};
use hickory_resolver::net::NetError;
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::proto::rr::RData;

/// One host to try for a domain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MxHost {
    /// Host name in A-label form, without the trailing dot.
    pub name: String,
    pub preference: u16,
}

/// Why a name could not be resolved.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DnsFailure {
    /// The domain does not exist: permanent.
    #[error("domain does not exist (NXDOMAIN)")]
    NxDomain,
    /// The domain publishes a null MX (RFC 7505): it accepts no mail, permanent.
    #[error("domain accepts no mail (null MX)")]
    NullMx,
    /// The name exists but has no A/AAAA records.
    #[error("{0} has no address records")]
    NoAddress(String),
    /// SERVFAIL, timeout, refused: worth retrying later.
    #[error("DNS lookup failed temporarily: {0}")]
    Temporary(String),
}

impl DnsFailure {
    pub fn is_permanent(&self) -> bool {
        matches!(self, DnsFailure::NxDomain | DnsFailure::NullMx)
    }
}

pub struct Dns {
    resolver: TokioResolver,
    /// The configured servers (empty: the system's), asked directly for PTR records.
    nameservers: Vec<SocketAddr>,
    timeout: Duration,
}

impl Dns {
    /// A resolver using `nameservers` (`ip:port`), or the system configuration when empty.
    pub fn new(nameservers: &[SocketAddr], timeout: Duration) -> Result<Dns, String> {
        let mut builder = if nameservers.is_empty() {
            TokioResolver::builder_tokio()
                .map_err(|e| format!("reading the system resolver configuration: {e}"))?
        } else {
            let servers = nameservers
                .iter()
                .map(|ns| {
                    let mut udp = ConnectionConfig::udp();
                    udp.port = ns.port();
                    let mut tcp = ConnectionConfig::tcp();
                    tcp.port = ns.port();
                    NameServerConfig::new(ns.ip(), true, vec![udp, tcp])
                })
                .collect();
            TokioResolver::builder_with_config(
                ResolverConfig::from_name_servers(servers),
                TokioRuntimeProvider::default(),
            )
        };
        let opts = builder.options_mut();
        opts.timeout = timeout;
        opts.attempts = 2;
        opts.ndots = 0;
        opts.cache_size = 32_768;
        let resolver = builder
            .build()
            .map_err(|e| format!("building the resolver: {e}"))?;
        Ok(Dns {
            resolver,
            nameservers: nameservers.to_vec(),
            timeout,
        })
    }

    /// The hosts to try for `domain`, best first; equal preferences in random order. A domain
    /// without MX records is its own mail host (RFC 5321 §5.1).
    pub async fn mx(&self, domain: &str) -> Result<Vec<MxHost>, DnsFailure> {
        let fqdn = format!("{domain}.");
        match self.resolver.mx_lookup(fqdn.as_str()).await {
            Ok(lookup) => {
                let mut hosts: Vec<MxHost> = lookup
                    .answers()
                    .iter()
                    .filter_map(|r| match &r.data {
                        RData::MX(mx) => Some(MxHost {
                            name: mx
                                .exchange
                                .to_ascii()
                                .trim_end_matches('.')
                                .to_ascii_lowercase(),
                            preference: mx.preference,
                        }),
                        _ => None,
                    })
                    .collect();
                order_mx(&mut hosts);
                if hosts.len() == 1 && hosts[0].name.is_empty() {
                    return Err(DnsFailure::NullMx);
                }
                hosts.retain(|h| !h.name.is_empty());
                if hosts.is_empty() {
                    hosts.push(MxHost {
                        name: domain.to_owned(),
                        preference: 0,
                    });
                }
                Ok(hosts)
            }
            Err(e) => match classify(&e) {
                Err(DnsFailure::NoAddress(_)) => Ok(vec![MxHost {
                    name: domain.to_owned(),
                    preference: 0,
                }]),
                Err(f) => Err(f),
                Ok(()) => Err(DnsFailure::Temporary(e.to_string())),
            },
        }
    }

    /// The addresses of `host` (IPv4 and IPv6).
    pub async fn addresses(&self, host: &str) -> Result<Vec<IpAddr>, DnsFailure> {
        if let Ok(ip) = host.parse::<IpAddr>() {
            return Ok(vec![ip]);
        }
        let fqdn = format!("{host}.");
        match self.resolver.lookup_ip(fqdn.as_str()).await {
            Ok(lookup) => {
                let ips: Vec<IpAddr> = lookup.iter().collect();
                if ips.is_empty() {
                    Err(DnsFailure::NoAddress(host.to_owned()))
                } else {
                    Ok(ips)
                }
            }
            Err(e) => match classify(&e) {
                Err(DnsFailure::NxDomain) | Err(DnsFailure::NoAddress(_)) => {
                    Err(DnsFailure::NoAddress(host.to_owned()))
                }
                Err(f) => Err(f),
                Ok(()) => Err(DnsFailure::Temporary(e.to_string())),
            },
        }
    }
}

impl Dns {
    /// The names the PTR records of `ip` give (lower case, without the trailing dot).
    ///
    /// With configured nameservers they are asked directly (one UDP query each, in turn): the
    /// resolver answers loopback addresses itself ("localhost", as RFC 6761 asks of address
    /// lookups), which would hide what a test or private server publishes for them.
    pub async fn ptr(&self, ip: IpAddr) -> Result<Vec<String>, DnsFailure> {
        let mut last = None;
        for server in &self.nameservers {
            match ptr_direct(*server, ip, self.timeout).await {
                Ok(names) => return Ok(names),
                Err(e) => last = Some(e),
            }
        }
        if let Some(e) = last {
            return Err(e);
        }
        match self.resolver.reverse_lookup(ip).await {
            Ok(lookup) => Ok(ptr_names(lookup.answers())),
            Err(e) => match classify(&e) {
                Err(DnsFailure::NxDomain) | Err(DnsFailure::NoAddress(_)) => Ok(Vec::new()),
                Err(f) => Err(f),
                Ok(()) => Err(DnsFailure::Temporary(e.to_string())),
            },
        }
    }
}

/// The names of the PTR records among `records` (lower case, without the trailing dot).
fn ptr_names(records: &[hickory_resolver::proto::rr::Record]) -> Vec<String> {
    records
        .iter()
        .filter_map(|r| match &r.data {
            RData::PTR(name) => Some(name.0.to_ascii().trim_end_matches('.').to_ascii_lowercase()),
            _ => None,
        })
        .collect()
}

/// One PTR query for `ip` to `server` over UDP.
async fn ptr_direct(
    server: SocketAddr,
    ip: IpAddr,
    timeout: Duration,
) -> Result<Vec<String>, DnsFailure> {
    use hickory_resolver::proto::op::{Message, Query, ResponseCode};
    use hickory_resolver::proto::rr::{Name, RecordType};
    let temporary = |e: &dyn std::fmt::Display| DnsFailure::Temporary(format!("{server}: {e}"));
    let mut query = Message::query();
    query.metadata.recursion_desired = true;
    query.add_query(Query::query(Name::from(ip), RecordType::PTR));
    let bytes = query.to_vec().map_err(|e| temporary(&e))?;
    let local: SocketAddr = if server.is_ipv4() {
        ([0, 0, 0, 0], 0).into()
    } else {
        (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
    };
    let socket = tokio::net::UdpSocket::bind(local)
        .await
        .map_err(|e| temporary(&e))?;
    socket
        .send_to(&bytes, server)
        .await
        .map_err(|e| temporary(&e))?;
    let mut buf = vec![0u8; 4096];
    let answer = loop {
        let (n, from) = tokio::time::timeout(timeout, socket.recv_from(&mut buf))
            .await
            .map_err(|_| temporary(&"timed out"))?
            .map_err(|e| temporary(&e))?;
        if from != server {
            continue;
        }
        let Ok(m) = Message::from_vec(&buf[..n]) else {
            continue;
        };
        if m.metadata.id == query.metadata.id {
            break m;
        }
    };
    match answer.metadata.response_code {
        ResponseCode::NoError => Ok(ptr_names(&answer.answers)),
        ResponseCode::NXDomain => Ok(Vec::new()),
        other => Err(temporary(&other)),
    }
}

/// `Err` for the answers that mean something (no such name, no records), `Ok` for "other".
fn classify(e: &NetError) -> Result<(), DnsFailure> {
    if e.is_nx_domain() {
        Err(DnsFailure::NxDomain)
    } else if e.is_no_records_found() {
        Err(DnsFailure::NoAddress(String::new()))
    } else {
        Ok(())
    }
}

/// Sorts by preference and shuffles hosts of equal preference, so load spreads as RFC 5321
/// §5.1 asks.
pub fn order_mx(hosts: &mut [MxHost]) {
    fastrand::shuffle(hosts);
    hosts.sort_by_key(|h| h.preference);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mx_order_is_by_preference_random_within_equal() {
        let mk = |n: &str, p| MxHost {
            name: n.into(),
            preference: p,
        };
        let mut first_seen = std::collections::HashSet::new();
        for _ in 0..200 {
            let mut hosts = vec![mk("c", 20), mk("a1", 10), mk("a2", 10), mk("b", 15)];
            order_mx(&mut hosts);
            let names: Vec<_> = hosts.iter().map(|h| h.name.as_str()).collect();
            assert!(names[..2].contains(&"a1") && names[..2].contains(&"a2"));
            assert_eq!(&names[2..], &["b", "c"]);
            first_seen.insert(names[0].to_owned());
        }
        assert_eq!(
            first_seen.len(),
            2,
            "both equal-preference hosts come first sometimes"
        );
    }
}
