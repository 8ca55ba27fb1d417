//! Transport security: which MTA-STS policy a domain's mail follows, and which TLS each
//! connection to an MX host must have.
//!
//! * **DANE** (RFC 7672) first, per host: when `[dane]` is on and the host's addresses are
//!   DNSSEC-secure, its `_25._tcp` TLSA records are looked up; usable ones make TLS mandatory,
//!   checked by [`DaneVerifier`]; a secure set with none usable still makes TLS mandatory,
//!   unauthenticated; a TLSA answer that fails validation or cannot be had keeps the host
//!   unused. Insecure hosts are not asked (RFC 7672 §2.2.2): unsigned domains go as before.
//! * **MTA-STS** (RFC 8461) next, per recipient domain: the policy is read from the cache, and
//!   the `_mta-sts` TXT record looked at once per [`sts_cache::RECHECK_MS`] at most (beside
//!   the MX lookup); a domain seen for the first time waits for its fetch (up to
//!   `mta_sts.fetch_timeout`);
//!   a changed id or a policy past half its life is fetched again in the background, while
//!   the cached one keeps applying. `enforce` keeps only matching MX hosts (the site is made of
//!   them) and verifies their certificates for the MX name; `testing` verifies, reports a
//!   failure, and connects as without the policy.
//! * Otherwise the site's `tls` setting.

use std::net::IpAddr;
use std::sync::{Arc, LazyLock};

use prometheus::{IntCounterVec, register_int_counter_vec};
use tokio_rustls::TlsConnector;

use super::Delivery;
use super::site::{Site, Target};
use crate::effects::tls_reports::PolicyRef;
use crate::outbound::dane::DaneVerifier;
use crate::outbound::dns::{Security, TlsaAnswer};
use crate::outbound::outcome::{self, Outcome};
use crate::outbound::smtp::client::{SmtpError, TlsMode, TlsPolicy};
use crate::outbound::smtp::reply::{Command, EnhancedCode};
use crate::outbound::sts::{self, Mode, Policy};
use crate::outbound::sts_cache::{self, Cached};

static SESSIONS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register_int_counter_vec!(
        "sluice_tls_policy_sessions_total",
        "Connections made under a DANE or MTA-STS policy, by policy (dane, sts-enforce, sts-testing) and result: success, or the TLS reporting failure type (certificate-host-mismatch, certificate-not-trusted, validation-failure, starttls-not-supported, tlsa-invalid, dnssec-invalid...). Failures under dane or sts-enforce deferred mail.",
        &["policy", "result"]
    )
    .expect("metric registers once")
});

static FETCHES: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register_int_counter_vec!(
        "sluice_mta_sts_fetches_total",
        "MTA-STS policy fetches by result: ok, sts-policy-fetch-error (no answer, HTTP error, time-out) or sts-policy-invalid.",
        &["result"]
    )
    .expect("metric registers once")
});

/// The TLS a connection to one host must have, and what goes with it.
pub(super) struct HostTls {
    pub policy: TlsPolicy,
    /// `sts-testing`: the mode to connect with when the policy's checks fail.
    pub fallback: Option<TlsMode>,
    /// The policy as TLS reports describe it; `None` without a DANE or MTA-STS policy.
    report: Option<Described>,
}

/// A policy as TLS reports describe it (RFC 8460 §4.3).
struct Described {
    policy_type: &'static str,
    policy_string: Vec<String>,
    mx_host: Vec<String>,
}

impl Described {
    fn as_ref(&self) -> PolicyRef<'_> {
        PolicyRef {
            policy_type: self.policy_type,
            policy_string: &self.policy_string,
            mx_host: &self.mx_host,
        }
    }

    fn sts(policy: &Policy) -> Described {
        Described {
            policy_type: "sts",
            policy_string: policy.lines(),
            mx_host: policy.mx.clone(),
        }
    }
}

impl HostTls {
    fn plain(mode: TlsMode) -> HostTls {
        HostTls {
            policy: mode.into(),
            fallback: None,
            report: None,
        }
    }
}

/// The outcome of an enforced policy that leaves no MX host to try.
pub(super) fn no_matching_mx(domain: &str, policy: &Policy) -> Outcome {
    outcome::local_failure(
        EnhancedCode(4, 7, 5),
        format!(
            "no MX host of {domain} matches its MTA-STS policy (mode enforce, mx: {}); mail waits for one that does",
            policy.mx.join(", ")
        ),
        Command::Connect,
    )
}

/// Whether `e` is a failure of TLS itself (what a policy's checks refuse), not of the
/// connection or the server's replies.
pub(super) fn is_tls_failure(e: &SmtpError) -> bool {
    matches!(
        e,
        SmtpError::Tls(_) | SmtpError::Certificate { .. } | SmtpError::TlsNotOffered
    )
}

/// The TLS reporting result type of a failed connection under a policy, if TLS failed.
fn result_type(e: &SmtpError) -> Option<&'static str> {
    match e {
        SmtpError::TlsNotOffered => Some("starttls-not-supported"),
        SmtpError::Rejected { reply } if reply.command == Command::StartTls => {
            Some("starttls-not-supported")
        }
        SmtpError::Certificate { failure, .. } => Some(failure.result_type()),
        SmtpError::Tls(_) => Some("validation-failure"),
        _ => None,
    }
}

impl Delivery {
    /// The MTA-STS policy `domain`'s mail follows now (`enforce` or `testing`), if any.
    pub(super) async fn sts_policy(self: &Arc<Self>, domain: &str) -> Option<Arc<Cached>> {
        if !self.config.mta_sts.enabled {
            return None;
        }
        let now = crate::now_ms();
        let cached = self.node.sts.get(domain, now);
        // The TXT record (a new policy, a changed id) is looked at once per recheck period; in
        // between, what is cached applies.
        if !self.node.sts.look_due(domain, now) {
            return cached.filter(|c| c.policy.mode != Mode::None);
        }
        let record = match self.dns.txt(&format!("_mta-sts.{domain}")).await {
            Ok(txt) => sts::parse_record(&txt).ok(),
            // The TXT lookup failing leaves what is cached in force (RFC 8461 §5.1).
            Err(_) => None,
        };
        let current = match (cached, record) {
            (Some(c), Some(r)) => {
                if r.id != c.id || c.wants_refresh(now) {
                    self.refresh_in_background(domain, r.id);
                }
                Some(c)
            }
            // A removed TXT record does not withdraw a cached policy; `mode: none` does.
            (Some(c), None) => Some(c),
            (None, Some(r)) => {
                if self.node.sts.failure(domain, now).is_some() {
                    None
                } else {
                    self.fetch_policy(domain, r.id).await
                }
            }
            (None, None) => None,
        };
        current.filter(|c| c.policy.mode != Mode::None)
    }

    /// Fetches `domain`'s policy (TXT id `id`) and caches it; a failure is noted, counted,
    /// and retried no sooner than `mta_sts.retry`.
    async fn fetch_policy(&self, domain: &str, id: String) -> Option<Arc<Cached>> {
        let timeout = self.config.mta_sts.fetch_timeout;
        match sts_cache::fetch(&self.https, domain, timeout).await {
            Ok(policy) => {
                FETCHES.with_label_values(&["ok"]).inc();
                let cached = Cached {
                    id,
                    policy,
                    fetched_ms: crate::now_ms(),
                };
                match self.node.sts.put(&self.node.spool, domain, cached).await {
                    Ok(c) => {
                        // The domain's next activation routes by the new policy.
                        self.forget_route(domain);
                        Some(c)
                    }
                    Err(e) => {
                        tracing::warn!(domain, error = %e, "storing an MTA-STS policy failed");
                        None
                    }
                }
            }
            Err(e) => {
                FETCHES.with_label_values(&[e.result_type()]).inc();
                tracing::warn!(domain, error = %e, "MTA-STS policy not fetched");
                let until = crate::now_ms() + self.config.mta_sts.retry.as_millis() as u64;
                self.node.sts.fetch_failed(domain, until, e.to_string());
                let none = PolicyRef {
                    policy_type: "sts",
                    policy_string: &[],
                    mx_host: &[],
                };
                self.count_session(domain, &none, e.result_type(), "", None);
                None
            }
        }
    }

    /// Fetches `domain`'s policy again in the background, unless a fetch is under way or the
    /// last one failed lately.
    fn refresh_in_background(self: &Arc<Self>, domain: &str, id: String) {
        if self.node.sts.failure(domain, crate::now_ms()).is_some() {
            return;
        }
        if !self
            .refreshing
            .lock()
            .expect("refreshing lock")
            .insert(domain.to_owned())
        {
            return;
        }
        let this = Arc::clone(self);
        let domain = domain.to_owned();
        self.background.spawn(async move {
            this.fetch_policy(&domain, id).await;
            this.refreshing
                .lock()
                .expect("refreshing lock")
                .remove(&domain);
        });
    }

    /// The TLS a connection to `target` of `site` must have; `Err` when the host must not be
    /// used now (its TLSA records could not be had or failed validation).
    pub(super) async fn host_tls(
        &self,
        site: &Site,
        target: &Target,
        security: Security,
        domain: &str,
    ) -> Result<HostTls, Outcome> {
        let rule = site.shaping.tls;
        if self.dns.is_validating()
            && site.shaping.dane
            && !site.is_relay()
            && security == Security::Secure
        {
            match self.dns.tlsa(&target.name, target.port).await {
                Ok(TlsaAnswer::Secure { records, owner }) => {
                    let described = Described {
                        policy_type: "tlsa",
                        policy_string: records.iter().map(ToString::to_string).collect(),
                        mx_host: Vec::new(),
                    };
                    let mut names = vec![target.name.clone()];
                    if owner != target.name {
                        names.push(owner);
                    }
                    let provider = Arc::new(rustls::crypto::ring::default_provider());
                    let connector = match DaneVerifier::new(records, names, Arc::clone(&provider)) {
                        Some(v) => Some(dane_connector(v, provider).ok_or_else(|| {
                            outcome::local_failure(
                                EnhancedCode(4, 7, 5),
                                "the DANE verifier could not be set up",
                                Command::StartTls,
                            )
                        })?),
                        None => None,
                    };
                    return Ok(HostTls {
                        // No usable record: TLS is still mandatory, unauthenticated.
                        policy: TlsPolicy {
                            mode: TlsMode::Required,
                            connector,
                            label: "dane",
                        },
                        fallback: None,
                        report: Some(described),
                    });
                }
                Ok(TlsaAnswer::None) => {}
                Err(f) => {
                    let result = if matches!(f, crate::outbound::dns::DnsFailure::Bogus(_)) {
                        "dnssec-invalid"
                    } else {
                        "tlsa-invalid"
                    };
                    SESSIONS.with_label_values(&["dane", result]).inc();
                    let policy = PolicyRef {
                        policy_type: "tlsa",
                        policy_string: &[],
                        mx_host: &[],
                    };
                    self.count_session(domain, &policy, result, &target.name, None);
                    return Err(outcome::local_failure(
                        EnhancedCode(4, 7, 5),
                        format!(
                            "{}: DANE TLSA lookup failed ({f}); the host is not used without it",
                            target.name
                        ),
                        Command::Connect,
                    ));
                }
            }
        }
        let Some(sts) = &site.sts else {
            return Ok(HostTls::plain(rule));
        };
        let policy = &sts.policy;
        Ok(match policy.mode {
            Mode::Enforce => HostTls {
                policy: TlsPolicy {
                    label: "sts-enforce",
                    ..TlsMode::Verify.into()
                },
                fallback: None,
                report: Some(Described::sts(policy)),
            },
            Mode::Testing if policy.matches(&target.name) => HostTls {
                policy: TlsPolicy {
                    label: "sts-testing",
                    ..TlsMode::Verify.into()
                },
                fallback: Some(rule),
                report: Some(Described::sts(policy)),
            },
            // A host the policy does not name: enforcing would have refused it. Counted here,
            // the connection is not reported again.
            Mode::Testing => {
                SESSIONS
                    .with_label_values(&["sts-testing", "validation-failure"])
                    .inc();
                let d = Described::sts(policy);
                self.count_session(
                    domain,
                    &d.as_ref(),
                    "validation-failure",
                    &target.name,
                    None,
                );
                HostTls::plain(rule)
            }
            Mode::None => HostTls::plain(rule),
        })
    }

    /// Counts the result of a connection attempt made under a DANE or MTA-STS policy
    /// (`error`: how it failed), for metrics and TLS reports.
    pub(super) fn tls_result(
        &self,
        domain: &str,
        tls: &HostTls,
        host: &str,
        ip: IpAddr,
        error: Option<&SmtpError>,
    ) {
        let Some(d) = &tls.report else {
            return;
        };
        let result = match error {
            None => "success",
            Some(e) => match result_type(e) {
                Some(r) => r,
                // The connection failed before TLS: not a TLS session.
                None => return,
            },
        };
        SESSIONS
            .with_label_values(&[tls.policy.label, result])
            .inc();
        self.count_session(domain, &d.as_ref(), result, host, Some(ip));
    }

    /// Counts one session to `domain` under `policy` in today's TLS report.
    fn count_session(
        &self,
        domain: &str,
        policy: &PolicyRef<'_>,
        result: &str,
        host: &str,
        ip: Option<IpAddr>,
    ) {
        self.node
            .tls_reports
            .session(crate::now_ms(), domain, policy, result, host, ip);
    }
}

/// A connector that checks certificates with `verifier`.
fn dane_connector(
    verifier: DaneVerifier,
    provider: Arc<rustls::crypto::CryptoProvider>,
) -> Option<TlsConnector> {
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .ok()?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_no_client_auth();
    Some(TlsConnector::from(Arc::new(config)))
}
