//! Authentication preflight: will mail from a domain pass DKIM, SPF and DMARC at the receiver,
//! judged before any is sent.
//!
//! For one From domain it builds the message a receiver would judge (a From at the domain,
//! signed with every `[[dkim]]` key that signs for it) and runs mail-auth's own verifiers on it
//! through the configured name servers: DKIM (each signature against the published key, so a
//! selector whose TXT record is missing or holds another key fails), SPF of the envelope
//! sender's domain (the bounce domain, else the From domain) for every egress source's address
//! (includes and redirects evaluated within the 10-lookup limit), and DMARC with those results
//! (the record found by the tree walk, and whether the DKIM `d=` or the SPF domain aligns with
//! From). Then the forward-confirmed PTR of each source against its EHLO name, and whether the
//! domain publishes MTA-STS and TLS-RPT records. Every check is `pass`, `warn` or `fail`, with
//! the record seen and what to publish instead.
//!
//! [`Preflight`] keeps each domain's report for `preflight.ttl`, so the API and campaign
//! creation ask DNS at most that often per domain.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

use mail_auth::{
    AuthenticatedMessage, DkimResult, DmarcResult, SpfResult, dmarc::Policy,
    dmarc::verify::DmarcParameters, spf::verify::SpfParameters,
};
use serde::Serialize;

use crate::config::{Config, DkimEntry, Source};
use crate::outbound::dkim::DkimKeys;
use crate::outbound::dns::Dns;

/// A check's outcome.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Verdict {
    Pass,
    Warn,
    Fail,
}

/// One check of a domain.
#[derive(Debug, Clone, Serialize)]
pub struct Check {
    /// `dkim`, `spf`, `dmarc`, `ptr`, `mta_sts` or `tls_rpt`.
    pub check: &'static str,
    /// What it is about: the selector's name, the source address, the record's name.
    pub subject: String,
    pub verdict: Verdict,
    pub message: String,
    /// The record found, if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub seen: Option<String>,
    /// What to publish to pass.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub publish: Option<String>,
}

/// Every check of one domain.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub domain: String,
    /// The worst of the checks.
    pub verdict: Verdict,
    pub checked_at_ms: u64,
    pub checks: Vec<Check>,
}

impl Report {
    /// The failing checks, in a sentence each.
    pub fn failures(&self) -> Vec<String> {
        self.checks
            .iter()
            .filter(|c| c.verdict == Verdict::Fail)
            .map(|c| format!("{} {}: {}", c.check, c.subject, c.message))
            .collect()
    }
}

fn check(
    check: &'static str,
    subject: impl Into<String>,
    verdict: Verdict,
    message: impl Into<String>,
) -> Check {
    Check {
        check,
        subject: subject.into(),
        verdict,
        message: message.into(),
        seen: None,
        publish: None,
    }
}

impl Check {
    fn seen(mut self, seen: Option<String>) -> Check {
        self.seen = seen;
        self
    }

    fn publish(mut self, publish: impl Into<String>) -> Check {
        self.publish = Some(publish.into());
        self
    }
}

/// The TXT records at `name` that start with `prefix` (case-insensitive), joined with ` | `.
async fn txt_seen(dns: &Dns, name: &str, prefix: &str) -> Option<String> {
    let found: Vec<String> = dns
        .txt(name)
        .await
        .ok()?
        .into_iter()
        .filter(|t| t.to_ascii_lowercase().starts_with(prefix))
        .collect();
    (!found.is_empty()).then(|| found.join(" | "))
}

/// The DNS lookups an SPF record costs (RFC 7208 §4.6.4: `include`, `a`, `mx`, `ptr`,
/// `exists`, `redirect`), following includes and redirects, up to `depth` levels.
async fn spf_lookups(dns: &Dns, domain: &str, depth: u8) -> usize {
    let Some(record) = txt_seen(dns, domain, "v=spf1").await else {
        return 0;
    };
    let mut n = 0;
    for term in record.split_whitespace().skip(1) {
        let t = term
            .trim_start_matches(['+', '-', '~', '?'])
            .to_ascii_lowercase();
        let target = t
            .strip_prefix("include:")
            .or_else(|| t.strip_prefix("redirect="));
        if let Some(target) = target {
            n += 1;
            if depth > 0 {
                n += Box::pin(spf_lookups(dns, target, depth - 1)).await;
            }
        } else if ["a", "mx", "ptr"].contains(&t.as_str())
            || ["a:", "a/", "mx:", "mx/", "ptr:", "exists:"]
                .iter()
                .any(|p| t.starts_with(p))
        {
            n += 1;
        }
    }
    n
}

/// The message a receiver would judge: From at `domain`, signed by every key that signs for
/// it. `None` when signing fails (a key that cannot sign).
fn sample_message(dkim: &DkimKeys, domain: &str) -> Result<Vec<u8>, String> {
    let body = format!(
        "From: <preflight@{domain}>\r\nTo: <check@preflight.invalid>\r\nSubject: preflight\r\nDate: Thu, 01 Jan 2026 00:00:00 +0000\r\nMessage-ID: <preflight@{domain}>\r\nMIME-Version: 1.0\r\nContent-Type: text/plain; charset=us-ascii\r\n\r\nAuthentication preflight.\r\n"
    );
    let mut signed = dkim
        .sign(domain, body.as_bytes())
        .map_err(|e| e.to_string())?;
    signed.extend_from_slice(body.as_bytes());
    Ok(signed)
}

/// The `[[dkim]]` entries whose keys sign for `domain` (its own, or its nearest parent's).
fn entries_for<'c>(config: &'c Config, dkim: &DkimKeys, domain: &str) -> Vec<&'c DkimEntry> {
    let signers = dkim.for_domain(domain);
    config
        .dkim
        .iter()
        .filter(|e| {
            signers
                .iter()
                .any(|s| s.domain.eq_ignore_ascii_case(&e.domain) && s.selector == e.selector)
        })
        .collect()
}

/// Every check of `domain`.
pub async fn check_domain(config: &Config, dkim: &DkimKeys, dns: &Dns, domain: &str) -> Report {
    let auth = dns.authenticator();
    let domain = domain.to_ascii_lowercase();
    let mut checks = Vec::new();

    // DKIM: each signature verified against the published key.
    let entries = entries_for(config, dkim, &domain);
    let message = sample_message(dkim, &domain);
    let parsed = message
        .as_ref()
        .ok()
        .and_then(|m| AuthenticatedMessage::parse(m));
    let mut dkim_outputs = Vec::new();
    if let Some(m) = &parsed {
        dkim_outputs = auth.verify_dkim(m).await;
    }
    if entries.is_empty() {
        checks.push(
            check(
                "dkim",
                &domain,
                Verdict::Fail,
                format!("no [[dkim]] key signs mail from {domain}: receivers see it unsigned, and DMARC can align through SPF only"),
            )
            .publish(format!("a [[dkim]] key for {domain}, and its record at <selector>._domainkey.{domain}")),
        );
    }
    if let Err(e) = &message {
        checks.push(check("dkim", &domain, Verdict::Fail, e.clone()));
    }
    for e in &entries {
        let name = format!(
            "{}._domainkey.{}",
            e.selector,
            e.domain.to_ascii_lowercase()
        );
        let seen = txt_seen(dns, &name, "").await;
        let ours = crate::outbound::dkim::public_record(e).ok();
        let output = dkim_outputs.iter().find(|o| {
            o.signature()
                .is_some_and(|s| s.s == e.selector && s.d.eq_ignore_ascii_case(&e.domain))
        });
        let c = match output.map(|o| o.result()) {
            Some(DkimResult::Pass) => check(
                "dkim",
                &name,
                Verdict::Pass,
                "the published key verifies our signature",
            ),
            _ if seen.is_none() => check(
                "dkim",
                &name,
                Verdict::Fail,
                format!("no TXT record at {name}: receivers cannot verify the signature"),
            ),
            Some(DkimResult::TempError(err)) => check(
                "dkim",
                &name,
                Verdict::Warn,
                format!("the key could not be read now: {err}"),
            ),
            Some(DkimResult::Fail(err) | DkimResult::Neutral(err) | DkimResult::PermError(err)) => {
                check(
                    "dkim",
                    &name,
                    Verdict::Fail,
                    format!(
                        "the published key does not verify our signature ({err}): it is not the public half of {}",
                        e.key_file.display()
                    ),
                )
            }
            Some(DkimResult::None) | None => check(
                "dkim",
                &name,
                Verdict::Fail,
                "our signature could not be checked",
            ),
        };
        let c = c.seen(seen);
        checks.push(match (&ours, c.verdict) {
            (Some(r), Verdict::Fail) => c.publish(format!("{name} TXT \"{r}\"")),
            _ => c,
        });
    }

    // SPF of the envelope sender's domain, for every source address.
    let bounce_domain = config
        .bounce
        .domain
        .as_deref()
        .map_or_else(|| domain.clone(), str::to_ascii_lowercase);
    let sender = format!("{}@{bounce_domain}", config.bounce.local_part);
    let spf_seen = txt_seen(dns, &bounce_domain, "v=spf1").await;
    let sources = config.egress_sources();
    let mut spf_for_dmarc = None;
    for source in &sources {
        let Some(ip) = source.address else {
            checks.push(check(
                "spf",
                &source.name,
                Verdict::Warn,
                format!("source {:?} has no fixed address (the kernel picks one), so its SPF cannot be checked: set [[source]] address", source.name),
            ));
            continue;
        };
        let output = auth
            .verify_spf(SpfParameters::verify_mail_from(
                ip,
                &source.ehlo_name,
                &source.ehlo_name,
                &sender,
            ))
            .await;
        let mechanism = match ip {
            IpAddr::V4(_) => format!("ip4:{ip}"),
            IpAddr::V6(_) => format!("ip6:{ip}"),
        };
        let c = match output.result() {
            SpfResult::Pass => check(
                "spf",
                ip.to_string(),
                Verdict::Pass,
                format!("{bounce_domain} authorises {ip}"),
            ),
            SpfResult::None => check(
                "spf",
                ip.to_string(),
                Verdict::Fail,
                format!("{bounce_domain} publishes no SPF record"),
            )
            .publish(format!("{bounce_domain} TXT \"v=spf1 {mechanism} -all\"")),
            SpfResult::PermError => {
                let lookups = spf_lookups(dns, &bounce_domain, 10).await;
                let why = if lookups > 10 {
                    format!(
                        "{bounce_domain}'s SPF record needs {lookups} DNS lookups, over the limit of 10 (permerror): receivers treat it as broken"
                    )
                } else {
                    format!("{bounce_domain}'s SPF record is broken (permerror)")
                };
                check("spf", ip.to_string(), Verdict::Fail, why)
                    .publish(format!("{bounce_domain} TXT \"v=spf1 {mechanism} -all\" (flatten includes to stay within 10 lookups)"))
            }
            SpfResult::TempError => check(
                "spf",
                ip.to_string(),
                Verdict::Warn,
                format!("{bounce_domain}'s SPF record could not be read now"),
            ),
            other => check(
                "spf",
                ip.to_string(),
                Verdict::Fail,
                format!("{bounce_domain}'s SPF record does not authorise {ip} ({other:?})"),
            )
            .publish(format!("add {mechanism} to {bounce_domain}'s SPF record")),
        };
        // DMARC is judged with the worst source's SPF result.
        if spf_for_dmarc.is_none() || c.verdict != Verdict::Pass {
            spf_for_dmarc = Some(output);
        }
        checks.push(c.seen(spf_seen.clone()));
    }
    if sources.iter().all(|s| s.address.is_none()) {
        spf_for_dmarc = None;
    }

    // DMARC: the record, and whether our headers align under it.
    let dmarc_name = format!("_dmarc.{domain}");
    let dmarc_seen = txt_seen(dns, &dmarc_name, "v=dmarc1").await;
    let publish_dmarc =
        format!("{dmarc_name} TXT \"v=DMARC1; p=none; rua=mailto:dmarc-reports@{domain}\"");
    match &parsed {
        Some(m) => {
            let spf =
                spf_for_dmarc.unwrap_or_else(|| mail_auth::SpfOutput::new(bounce_domain.clone()));
            let out = auth
                .verify_dmarc(DmarcParameters::new(m, &dkim_outputs, &bounce_domain, &spf))
                .await;
            let aligned = |r: &DmarcResult| matches!(r, DmarcResult::Pass);
            let (dkim_ok, spf_ok) = (aligned(out.dkim_result()), aligned(out.spf_result()));
            let c = match out.dmarc_record() {
                None if dmarc_seen.is_none() => check(
                    "dmarc",
                    &dmarc_name,
                    Verdict::Fail,
                    format!("{domain} publishes no DMARC record (bulk senders must have one)"),
                )
                .publish(publish_dmarc),
                None => check(
                    "dmarc",
                    &dmarc_name,
                    Verdict::Fail,
                    "the DMARC record cannot be read",
                )
                .publish(publish_dmarc),
                Some(_) if dkim_ok || spf_ok => {
                    let via = match (dkim_ok, spf_ok) {
                        (true, true) => "DKIM and SPF",
                        (true, false) => "DKIM",
                        _ => "SPF",
                    };
                    check(
                        "dmarc",
                        &dmarc_name,
                        Verdict::Pass,
                        format!("passes, aligned through {via} (p={})", out.policy()),
                    )
                }
                Some(record) => {
                    let why = format!(
                        "our mail would fail DMARC: no DKIM signature with d= aligned with {domain} passes, and the envelope domain {bounce_domain} does not align or pass SPF (adkim={}, aspf={})",
                        alignment(record.adkim),
                        alignment(record.aspf)
                    );
                    let verdict = match out.policy() {
                        Policy::Reject | Policy::Quarantine => Verdict::Fail,
                        _ => Verdict::Warn,
                    };
                    check("dmarc", &dmarc_name, verdict, format!("p={}: {why}", out.policy()))
                        .publish(format!("a [[dkim]] key for {domain} (or a parent) with its record published, or bounce.domain under {domain}"))
                }
            };
            checks.push(c.seen(dmarc_seen));
        }
        None => checks.push(
            check(
                "dmarc",
                &dmarc_name,
                Verdict::Fail,
                "the sample message could not be built",
            )
            .seen(dmarc_seen),
        ),
    }

    // PTR of each source, forward-confirmed.
    for source in &sources {
        checks.push(ptr_check(dns, source).await);
    }

    // MTA-STS and TLS reporting: reported, never required.
    for (name, prefix, what, publish) in [
        (
            format!("_mta-sts.{domain}"),
            "v=stsv1",
            "mta_sts",
            format!(
                "_mta-sts.{domain} TXT \"v=STSv1; id=1\" and a policy at https://mta-sts.{domain}/.well-known/mta-sts.txt"
            ),
        ),
        (
            format!("_smtp._tls.{domain}"),
            "v=tlsrptv1",
            "tls_rpt",
            format!("_smtp._tls.{domain} TXT \"v=TLSRPTv1; rua=mailto:tls-reports@{domain}\""),
        ),
    ] {
        let seen = txt_seen(dns, &name, prefix).await;
        let c = match &seen {
            Some(_) => check(what, &name, Verdict::Pass, "published"),
            None => check(
                what,
                &name,
                Verdict::Warn,
                "not published (optional: it protects mail sent to this domain)",
            )
            .publish(publish),
        };
        checks.push(c.seen(seen));
    }

    Report {
        verdict: checks
            .iter()
            .map(|c| c.verdict)
            .max()
            .unwrap_or(Verdict::Pass),
        domain,
        checked_at_ms: crate::now_ms(),
        checks,
    }
}

fn alignment(a: mail_auth::dmarc::Alignment) -> &'static str {
    match a {
        mail_auth::dmarc::Alignment::Relaxed => "r",
        mail_auth::dmarc::Alignment::Strict => "s",
    }
}

/// The source's address has a PTR record giving its EHLO name, and that name's addresses
/// include the address (forward-confirmed reverse DNS).
pub async fn ptr_check(dns: &Dns, source: &Source) -> Check {
    let ehlo = source.ehlo_name.to_ascii_lowercase();
    let Some(ip) = source.address else {
        return check(
            "ptr",
            &source.name,
            Verdict::Warn,
            format!(
                "source {:?} has no fixed address, so its PTR cannot be checked",
                source.name
            ),
        );
    };
    let subject = ip.to_string();
    let publish = format!("PTR {ip} → {ehlo}, and {ehlo} A/AAAA {ip}");
    match dns.ptr(ip).await {
        Ok(names) if names.is_empty() => check(
            "ptr",
            subject,
            Verdict::Fail,
            format!("{ip} has no PTR record; receivers expect it to give the EHLO name {ehlo}"),
        )
        .publish(publish),
        Ok(names) if !names.contains(&ehlo) => check(
            "ptr",
            subject,
            Verdict::Fail,
            format!(
                "the PTR record of {ip} gives {}, not the EHLO name {ehlo}",
                names.join(", ")
            ),
        )
        .seen(Some(names.join(", ")))
        .publish(publish),
        Ok(_) => match dns.addresses(&ehlo).await {
            Ok(ips) if ips.contains(&ip) => {
                check("ptr", subject, Verdict::Pass, format!("{ip} ↔ {ehlo}")).seen(Some(ehlo))
            }
            _ => check(
                "ptr",
                subject,
                Verdict::Fail,
                format!("the PTR of {ip} gives {ehlo}, but {ehlo} does not resolve to {ip}"),
            )
            .seen(Some(ehlo))
            .publish(publish),
        },
        Err(e) => check(
            "ptr",
            subject,
            Verdict::Warn,
            format!("the PTR record of {ip} could not be read: {e}"),
        ),
    }
}

/// Reports per domain, each kept for `preflight.ttl`.
#[derive(Default)]
pub struct Preflight {
    dns: std::sync::OnceLock<Arc<Dns>>,
    reports: Mutex<HashMap<String, Arc<Report>>>,
}

impl Preflight {
    /// `domain`'s report: the one kept if younger than `preflight.ttl`, else a new one.
    pub async fn report(
        &self,
        config: &Config,
        dkim: &DkimKeys,
        domain: &str,
    ) -> Result<Arc<Report>, String> {
        let domain = domain.to_ascii_lowercase();
        let now = crate::now_ms();
        let ttl = config.preflight.ttl.as_millis() as u64;
        let kept = self
            .reports
            .lock()
            .expect("preflight lock")
            .get(&domain)
            .filter(|r| now.saturating_sub(r.checked_at_ms) < ttl)
            .cloned();
        if let Some(r) = kept {
            return Ok(r);
        }
        let dns = match self.dns.get() {
            Some(d) => Arc::clone(d),
            None => {
                let d = Arc::new(Dns::new(&config.dns.nameservers, config.dns.timeout)?);
                Arc::clone(self.dns.get_or_init(|| d))
            }
        };
        let report = Arc::new(check_domain(config, dkim, &dns, &domain).await);
        let mut kept = self.reports.lock().expect("preflight lock");
        if kept.len() > 10_000 {
            kept.retain(|_, r| now.saturating_sub(r.checked_at_ms) < ttl);
        }
        kept.insert(domain, Arc::clone(&report));
        Ok(report)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_report_is_as_bad_as_its_worst_check_and_names_the_failures() {
        let r = Report {
            domain: "example.com".into(),
            verdict: Verdict::Fail,
            checked_at_ms: 0,
            checks: vec![
                check("dkim", "s1._domainkey.example.com", Verdict::Pass, "ok"),
                check(
                    "spf",
                    "192.0.2.1",
                    Verdict::Fail,
                    "example.com's SPF record does not authorise 192.0.2.1",
                ),
                check(
                    "mta_sts",
                    "_mta-sts.example.com",
                    Verdict::Warn,
                    "not published",
                ),
            ],
        };
        assert_eq!(
            r.failures(),
            vec!["spf 192.0.2.1: example.com's SPF record does not authorise 192.0.2.1"]
        );
        assert!(Verdict::Fail > Verdict::Warn && Verdict::Warn > Verdict::Pass);
    }
}
