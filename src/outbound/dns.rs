//! MX and address resolution (hickory-resolver, with its TTL-respecting cache).
//!
//! Owns the mapping from a recipient domain to the ordered list of hosts to try, and the
//! distinction the delivery engine acts on: a permanent answer (NXDOMAIN, null MX) fails the
//! recipients at once, a temporary one (SERVFAIL, timeout) defers them. Async network I/O only.
//!
//! With DANE on ([`Dns::validating`]), MX, address and TLSA lookups go through hickory's own
//! DNSSEC validation, from the configured trust anchors (the IANA root keys by default) over
//! the same name servers, rather than trusting the AD bit of an upstream resolver: a node then
//! needs no validating resolver of its own, and tests can name a signed test zone's key. Each
//! answer comes back secure, insecure (a provably unsigned zone: everything works as without
//! DANE) or, for a bogus answer, as a temporary failure: a domain whose MX records fail
//! validation is deferred, never sent to unauthenticated hosts.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hickory_resolver::TokioResolver;
use hickory_resolver::config::{ConnectionConfig, NameServerConfig, ResolverConfig};
use hickory_resolver::net::NetError;
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::proto::dnssec::{Proof, TrustAnchors};
use hickory_resolver::proto::rr::RData;
use hickory_resolver::proto::rr::RecordType;

/// One host to try for a domain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MxHost {
    /// Host name in A-label form, without the trailing dot.
    pub name: String,
    pub preference: u16,
}

/// A domain's MX hosts and how long the answer may be kept.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MxAnswer {
    /// Best first; equal preferences in random order.
    pub hosts: Vec<MxHost>,
    /// The answer's TTL: when it must be looked up again.
    pub valid_until: Instant,
}

/// How long "no MX records, the domain is its own mail host" is kept when the answer carries no
/// negative TTL (no SOA).
const NO_MX_TTL: Duration = Duration::from_secs(300);

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
    /// The answer failed DNSSEC validation (bad or missing signatures where the chain of trust
    /// says there must be some): retried later, like a temporary failure.
    #[error("DNSSEC validation failed for {0}")]
    Bogus(String),
}

/// What a validating lookup proved about an answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Security {
    /// Signed, and the signatures chain to a trust anchor.
    Secure,
    /// Provably unsigned, or looked up without validation.
    Insecure,
}

/// The TLSA records of an MX host (`_25._tcp.<host>`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TlsaAnswer {
    /// Validated records (possibly through a CNAME), with the name they were found at.
    Secure {
        records: Vec<crate::outbound::dane::Tlsa>,
        owner: String,
    },
    /// No validated records: none exist (provably), or the zone is unsigned. DANE does not
    /// apply to the host.
    None,
}

impl DnsFailure {
    pub fn is_permanent(&self) -> bool {
        matches!(self, DnsFailure::NxDomain | DnsFailure::NullMx)
    }
}

pub struct Dns {
    resolver: TokioResolver,
    /// With DANE on: the resolver that validates MX, address and TLSA answers.
    validating: Option<TokioResolver>,
    /// A resolver without a cache, for lookups that must ask again (confirming an NXDOMAIN,
    /// the canary check); validating when `validating` is.
    fresh: TokioResolver,
    /// The configured servers (empty: the system's), asked directly for PTR records.
    nameservers: Vec<SocketAddr>,
    timeout: Duration,
}

impl Dns {
    /// A resolver using `nameservers` (`ip:port`), or the system configuration when empty.
    pub fn new(nameservers: &[SocketAddr], timeout: Duration) -> Result<Dns, String> {
        Ok(Dns {
            resolver: resolver(nameservers, timeout, None, true)?,
            fresh: resolver(nameservers, timeout, None, false)?,
            validating: None,
            nameservers: nameservers.to_vec(),
            timeout,
        })
    }

    /// Validates MX, address and TLSA answers from now on, from `anchors` (none: the IANA root
    /// keys).
    pub fn validating(mut self, anchors: Option<Arc<TrustAnchors>>) -> Result<Dns, String> {
        let anchors = anchors.unwrap_or_else(|| Arc::new(TrustAnchors::default()));
        self.validating = Some(resolver(
            &self.nameservers,
            self.timeout,
            Some(Arc::clone(&anchors)),
            true,
        )?);
        self.fresh = resolver(&self.nameservers, self.timeout, Some(anchors), false)?;
        Ok(self)
    }

    /// mail-auth's verifiers over the same name servers, asking them afresh (no cache).
    pub fn authenticator(&self) -> mail_auth::MessageAuthenticator {
        mail_auth::MessageAuthenticator(self.fresh.clone())
    }

    /// Whether answers are validated (DANE is on).
    pub fn is_validating(&self) -> bool {
        self.validating.is_some()
    }
}

/// A resolver over `nameservers` (the system's when empty); validating from `anchors` if given;
/// with a cache if `cached`.
fn resolver(
    nameservers: &[SocketAddr],
    timeout: Duration,
    anchors: Option<Arc<TrustAnchors>>,
    cached: bool,
) -> Result<TokioResolver, String> {
    {
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
        if let Some(anchors) = anchors {
            builder = builder.with_trust_anchor(anchors);
        }
        let opts = builder.options_mut();
        opts.timeout = timeout;
        opts.attempts = 2;
        opts.ndots = 0;
        opts.cache_size = if cached { 32_768 } else { 0 };
        builder
            .build()
            .map_err(|e| format!("building the resolver: {e}"))
    }
}

impl Dns {
    /// The resolver for MX and address lookups: the validating one when DANE is on.
    fn routing(&self) -> &TokioResolver {
        self.validating.as_ref().unwrap_or(&self.resolver)
    }

    /// The hosts to try for `domain`, best first; equal preferences in random order. A domain
    /// without MX records is its own mail host (RFC 5321 §5.1).
    pub async fn mx(&self, domain: &str) -> Result<MxAnswer, DnsFailure> {
        mx_with(self.routing(), domain).await
    }

    /// As [`Dns::mx`], asking the name servers again whatever is cached.
    pub async fn mx_fresh(&self, domain: &str) -> Result<MxAnswer, DnsFailure> {
        mx_with(&self.fresh, domain).await
    }

    /// The addresses of `host` (IPv4 and IPv6).
    pub async fn addresses(&self, host: &str) -> Result<Vec<IpAddr>, DnsFailure> {
        self.addresses_secured(host).await.map(|(ips, _)| ips)
    }

    /// The addresses of `host`, and whether the answer was validated as secure (always
    /// [`Security::Insecure`] without DANE). A bogus answer is a [`DnsFailure::Bogus`].
    pub async fn addresses_secured(
        &self,
        host: &str,
    ) -> Result<(Vec<IpAddr>, Security), DnsFailure> {
        if let Ok(ip) = host.parse::<IpAddr>() {
            return Ok((vec![ip], Security::Insecure));
        }
        let fqdn = format!("{host}.");
        match self.routing().lookup_ip(fqdn.as_str()).await {
            Ok(lookup) => {
                let answers = lookup.as_lookup().answers();
                let proof = [RecordType::A, RecordType::AAAA]
                    .into_iter()
                    .filter_map(|t| proof_of(answers, t))
                    .min();
                if proof == Some(Proof::Bogus) {
                    return Err(DnsFailure::Bogus(format!("the addresses of {host}")));
                }
                let ips: Vec<IpAddr> = lookup.iter().collect();
                if ips.is_empty() {
                    return Err(DnsFailure::NoAddress(host.to_owned()));
                }
                let security = if self.validating.is_some() && proof == Some(Proof::Secure) {
                    Security::Secure
                } else {
                    Security::Insecure
                };
                Ok((ips, security))
            }
            Err(e) => match classify(&e, || format!("the addresses of {host}")) {
                Err(DnsFailure::NxDomain) | Err(DnsFailure::NoAddress(_)) => {
                    Err(DnsFailure::NoAddress(host.to_owned()))
                }
                Err(f) => Err(f),
                Ok(()) => Err(DnsFailure::Temporary(e.to_string())),
            },
        }
    }

    /// The TLSA records for SMTP on `host` (`_25._tcp.<host>`, RFC 7672 §2.2.3), validated.
    /// Without DANE, or when the zone is unsigned or has none, [`TlsaAnswer::None`]. A bogus
    /// answer, or one that cannot be had, is an error: the host must not be used then.
    pub async fn tlsa(&self, host: &str, port: u16) -> Result<TlsaAnswer, DnsFailure> {
        let Some(resolver) = &self.validating else {
            return Ok(TlsaAnswer::None);
        };
        let name = format!("_{port}._tcp.{host}.");
        match resolver.tlsa_lookup(name.as_str()).await {
            Ok(lookup) => {
                let answers = lookup.answers();
                // The whole chain (CNAMEs and the records they lead to) must be secure.
                let proof = answers.iter().map(|r| r.proof).min();
                match proof {
                    Some(Proof::Secure) => {}
                    Some(Proof::Insecure) | None => return Ok(TlsaAnswer::None),
                    Some(_) => return Err(DnsFailure::Bogus(format!("the TLSA records {name}"))),
                }
                let mut owner = host.to_owned();
                let records = answers
                    .iter()
                    .filter_map(|r| match &r.data {
                        RData::TLSA(t) => {
                            owner = r.name.to_ascii().trim_end_matches('.').to_ascii_lowercase();
                            Some(crate::outbound::dane::Tlsa {
                                usage: t.cert_usage.into(),
                                selector: t.selector.into(),
                                matching: t.matching.into(),
                                data: t.cert_data.clone(),
                            })
                        }
                        _ => None,
                    })
                    .collect::<Vec<_>>();
                if records.is_empty() {
                    return Ok(TlsaAnswer::None);
                }
                // The base domain is the host the records belong to: `_25._tcp.` taken off.
                let owner = owner
                    .splitn(3, '.')
                    .nth(2)
                    .map_or_else(|| host.to_owned(), str::to_owned);
                Ok(TlsaAnswer::Secure { records, owner })
            }
            Err(e) => match classify(&e, || format!("the TLSA records {name}")) {
                Err(DnsFailure::NxDomain) | Err(DnsFailure::NoAddress(_)) => Ok(TlsaAnswer::None),
                Err(f) => Err(f),
                Ok(()) => Err(DnsFailure::Temporary(e.to_string())),
            },
        }
    }
}

/// The weakest proof among the records of type `t` in `answers` (`None`: there are none).
fn proof_of(answers: &[hickory_resolver::proto::rr::Record], t: RecordType) -> Option<Proof> {
    answers
        .iter()
        .filter(|r| r.record_type() == t)
        .map(|r| r.proof)
        .min()
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
            Err(e) => match classify(&e, || format!("the PTR records of {ip}")) {
                Err(DnsFailure::NxDomain) | Err(DnsFailure::NoAddress(_)) => Ok(Vec::new()),
                Err(f) => Err(f),
                Ok(()) => Err(DnsFailure::Temporary(e.to_string())),
            },
        }
    }
}

impl Dns {
    /// The TXT records at `name`, each record's strings joined; none when the name or the
    /// records do not exist.
    pub async fn txt(&self, name: &str) -> Result<Vec<String>, DnsFailure> {
        let fqdn = format!("{name}.");
        match self.resolver.txt_lookup(fqdn.as_str()).await {
            Ok(lookup) => Ok(lookup
                .answers()
                .iter()
                .filter_map(|r| match &r.data {
                    RData::TXT(t) => Some(
                        t.txt_data
                            .iter()
                            .map(|part| String::from_utf8_lossy(part))
                            .collect::<String>(),
                    ),
                    _ => None,
                })
                .collect()),
            Err(e) => match classify(&e, || format!("the TXT records of {name}")) {
                Err(DnsFailure::NxDomain) | Err(DnsFailure::NoAddress(_)) => Ok(Vec::new()),
                Err(f) => Err(f),
                Ok(()) => Err(DnsFailure::Temporary(e.to_string())),
            },
        }
    }
}

/// Resolves host names for HTTP clients (the MTA-STS policy fetch) through the same name
/// servers as mail, so a policy host is found where its MX hosts are.
pub struct HttpResolver(pub Arc<Dns>);

impl reqwest::dns::Resolve for HttpResolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let dns = Arc::clone(&self.0);
        Box::pin(async move {
            let ips = dns
                .addresses(name.as_str())
                .await
                .map_err(|e| -> Box<dyn std::error::Error + Send + Sync> { Box::new(e) })?;
            let addrs: reqwest::dns::Addrs =
                Box::new(ips.into_iter().map(|ip| SocketAddr::new(ip, 0)));
            Ok(addrs)
        })
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

/// `Err` for the answers that mean something (no such name, no records, a bogus answer about
/// `what`), `Ok` for "other".
fn classify(e: &NetError, what: impl FnOnce() -> String) -> Result<(), DnsFailure> {
    use hickory_resolver::net::DnsError;
    use hickory_resolver::proto::op::ResponseCode;
    if e.is_nx_domain() {
        return Err(DnsFailure::NxDomain);
    }
    if e.is_no_records_found() {
        return Err(DnsFailure::NoAddress(String::new()));
    }
    match e {
        // A validated denial: NXDOMAIN or no records of the type, proven or provably unsigned.
        NetError::Dns(DnsError::Nsec {
            response, proof, ..
        }) => match proof {
            Proof::Secure | Proof::Insecure if response.response_code == ResponseCode::NXDomain => {
                Err(DnsFailure::NxDomain)
            }
            Proof::Secure | Proof::Insecure => Err(DnsFailure::NoAddress(String::new())),
            _ => Err(DnsFailure::Bogus(what())),
        },
        NetError::Dns(DnsError::DnssecBogus) => Err(DnsFailure::Bogus(what())),
        _ => Ok(()),
    }
}

/// The MX hosts of `domain` through `resolver` (see [`Dns::mx`]).
async fn mx_with(resolver: &TokioResolver, domain: &str) -> Result<MxAnswer, DnsFailure> {
    let fqdn = format!("{domain}.");
    let itself = |ttl: Duration| MxAnswer {
        hosts: vec![MxHost {
            name: domain.to_owned(),
            preference: 0,
        }],
        valid_until: Instant::now() + ttl,
    };
    match resolver.mx_lookup(fqdn.as_str()).await {
        Ok(lookup) => {
            if proof_of(lookup.answers(), RecordType::MX) == Some(Proof::Bogus) {
                return Err(DnsFailure::Bogus(format!("the MX records of {domain}")));
            }
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
                return Ok(itself(NO_MX_TTL));
            }
            Ok(MxAnswer {
                hosts,
                valid_until: lookup.valid_until(),
            })
        }
        Err(e) => match classify(&e, || format!("the MX records of {domain}")) {
            Err(DnsFailure::NoAddress(_)) => Ok(itself(negative_ttl(&e).unwrap_or(NO_MX_TTL))),
            Err(f) => Err(f),
            Ok(()) => Err(DnsFailure::Temporary(e.to_string())),
        },
    }
}

/// The negative TTL of a "no records" answer (from its SOA), if it has one.
fn negative_ttl(e: &NetError) -> Option<Duration> {
    use hickory_resolver::net::DnsError;
    match e {
        NetError::Dns(DnsError::NoRecordsFound(n)) => {
            n.negative_ttl.map(|s| Duration::from_secs(s.into()))
        }
        _ => None,
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
