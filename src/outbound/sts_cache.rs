//! MTA-STS policies once fetched: the cache (in memory, and in the spool so a restart keeps
//! them for their `max_age`) and the HTTPS fetch itself (RFC 8461 §3.3).
//!
//! The cache is a leaf: its locks are held for a map operation at a time. Deciding when to
//! fetch (first sight of a domain, a changed id, a policy near its end) is the delivery
//! engine's; this module only stores and fetches.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::sts::{MAX_POLICY_BYTES, Policy};
use crate::store::spool::{Durability, STATE_STS, Spool, SpoolError};

/// A fetched policy: what the `_mta-sts` TXT record's id was when it was fetched, and when.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Cached {
    pub id: String,
    pub policy: Policy,
    pub fetched_ms: u64,
}

impl Cached {
    /// Until when it may be used (its `max_age` from the fetch).
    pub fn expires_ms(&self) -> u64 {
        self.fetched_ms
            .saturating_add(self.policy.max_age.saturating_mul(1000))
    }

    /// Whether it is past half its life, when a fresh copy is fetched in the background so
    /// that a policy in use never lapses.
    pub fn wants_refresh(&self, now: u64) -> bool {
        now >= self.fetched_ms + self.policy.max_age.saturating_mul(500)
    }
}

/// How long after a look at a domain's `_mta-sts` TXT record it is not looked at again: a
/// domain's mail is activated many times a minute, and most domains publish no policy.
pub const RECHECK_MS: u64 = 300_000;

/// Fetched policies by domain, the domains whose last fetch failed (until when they are left
/// alone), and when each domain's TXT record was last looked at.
#[derive(Default)]
pub struct StsCache {
    policies: Mutex<HashMap<String, Arc<Cached>>>,
    failed: Mutex<HashMap<String, (u64, String)>>,
    /// By a hash of the domain (16 bytes an entry, for millions of domains); a collision only
    /// delays a look by [`RECHECK_MS`].
    looked: Mutex<HashMap<u64, u64>>,
    hasher: std::collections::hash_map::RandomState,
}

impl StsCache {
    /// Loads the stored policies that have not expired at `now`. Blocking.
    pub fn load(&self, spool: &Spool, now: u64) -> Result<usize, SpoolError> {
        let mut map = self.policies.lock().expect("mta-sts cache lock");
        spool.scan_state(STATE_STS, |k, v| {
            let domain = String::from_utf8_lossy(k).into_owned();
            match serde_json::from_slice::<Cached>(v) {
                Ok(c) if c.expires_ms() > now => {
                    map.insert(domain, Arc::new(c));
                }
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!(domain, error = %e, "unreadable MTA-STS policy dropped")
                }
            }
        })?;
        Ok(map.len())
    }

    /// The policy of `domain` valid at `now`.
    pub fn get(&self, domain: &str, now: u64) -> Option<Arc<Cached>> {
        let map = self.policies.lock().expect("mta-sts cache lock");
        map.get(domain)
            .filter(|c| c.expires_ms() > now)
            .map(Arc::clone)
    }

    /// Keeps `policy` for `domain`, in memory and in the spool (buffered: a policy lost in a
    /// crash is fetched again).
    pub async fn put(
        &self,
        spool: &Spool,
        domain: &str,
        policy: Cached,
    ) -> Result<Arc<Cached>, SpoolError> {
        let json = serde_json::to_vec(&policy).expect("a policy serialises");
        let mut batch = spool.batch();
        batch.put_state(STATE_STS, domain.as_bytes(), &json);
        spool.write(batch, Durability::Buffered).await?;
        let policy = Arc::new(policy);
        self.policies
            .lock()
            .expect("mta-sts cache lock")
            .insert(domain.to_owned(), Arc::clone(&policy));
        self.failed
            .lock()
            .expect("mta-sts cache lock")
            .remove(domain);
        Ok(policy)
    }

    /// Notes that fetching `domain`'s policy failed with `reason`; no new attempt before
    /// `until`.
    pub fn fetch_failed(&self, domain: &str, until: u64, reason: String) {
        self.failed
            .lock()
            .expect("mta-sts cache lock")
            .insert(domain.to_owned(), (until, reason));
    }

    /// Why the last fetch for `domain` failed, while it is left alone at `now`.
    pub fn failure(&self, domain: &str, now: u64) -> Option<String> {
        let mut failed = self.failed.lock().expect("mta-sts cache lock");
        match failed.get(domain) {
            Some((until, reason)) if *until > now => Some(reason.clone()),
            Some(_) => {
                failed.remove(domain);
                None
            }
            None => None,
        }
    }

    /// Whether `domain`'s TXT record is due for a look at `now`; if so, it counts as looked at
    /// now. Entries older than [`RECHECK_MS`] are dropped as the map grows.
    pub fn look_due(&self, domain: &str, now: u64) -> bool {
        use std::hash::BuildHasher;
        let key = self.hasher.hash_one(domain);
        let mut looked = self.looked.lock().expect("mta-sts cache lock");
        if looked
            .get(&key)
            .is_some_and(|at| now < at.saturating_add(RECHECK_MS))
        {
            return false;
        }
        if looked.len() >= 65_536 && looked.len().is_power_of_two() {
            looked.retain(|_, at| now < at.saturating_add(RECHECK_MS));
        }
        looked.insert(key, now);
        true
    }

    /// The cached policies, for reports.
    pub fn snapshot(&self) -> Vec<(String, Arc<Cached>)> {
        let map = self.policies.lock().expect("mta-sts cache lock");
        let mut v: Vec<_> = map
            .iter()
            .map(|(d, c)| (d.clone(), Arc::clone(c)))
            .collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    }
}

/// Why a policy could not be had, as TLS reporting names it (RFC 8460 §4.3.2.2).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FetchError {
    /// No answer, a refused connection, a TLS failure, an HTTP error status, a redirect, a
    /// time-out: `sts-policy-fetch-error`.
    #[error("fetching the MTA-STS policy failed: {0}")]
    Fetch(String),
    /// A response that is not a valid policy: `sts-policy-invalid`.
    #[error("the MTA-STS policy is invalid: {0}")]
    Invalid(String),
}

impl FetchError {
    pub fn result_type(&self) -> &'static str {
        match self {
            FetchError::Fetch(_) => "sts-policy-fetch-error",
            FetchError::Invalid(_) => "sts-policy-invalid",
        }
    }
}

/// The HTTPS client for policy fetches: certificates verified against `roots`, no redirects
/// (RFC 8461 §3.3), no proxy, names resolved by `resolver`.
pub fn client(
    roots: rustls::RootCertStore,
    resolver: Arc<crate::outbound::dns::HttpResolver>,
) -> Result<reqwest::Client, String> {
    let tls = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| e.to_string())?
    .with_root_certificates(roots)
    .with_no_client_auth();
    reqwest::Client::builder()
        .no_proxy()
        .https_only(true)
        .redirect(reqwest::redirect::Policy::none())
        .dns_resolver(resolver)
        .user_agent(concat!("sluice/", env!("CARGO_PKG_VERSION")))
        .tls_backend_preconfigured(tls)
        .build()
        .map_err(|e| e.to_string())
}

/// Fetches and parses `https://mta-sts.<domain>/.well-known/mta-sts.txt` within `deadline`: a
/// 200 answer of type `text/plain` and at most [`MAX_POLICY_BYTES`].
pub async fn fetch(
    client: &reqwest::Client,
    domain: &str,
    deadline: Duration,
) -> Result<Policy, FetchError> {
    let url = format!("https://mta-sts.{domain}/.well-known/mta-sts.txt");
    let body = tokio::time::timeout(deadline, read(client, &url))
        .await
        .map_err(|_| {
            FetchError::Fetch(format!("{url}: no complete answer within {deadline:?}"))
        })??;
    super::sts::parse_policy(&body).map_err(|e| FetchError::Invalid(format!("{url}: {e}")))
}

async fn read(client: &reqwest::Client, url: &str) -> Result<Vec<u8>, FetchError> {
    let fetch = |e: &dyn std::fmt::Display| FetchError::Fetch(format!("{url}: {e}"));
    let mut resp = client
        .get(url)
        .send()
        .await
        .map_err(|e| fetch(&error_chain(&e)))?;
    let status = resp.status();
    if status != reqwest::StatusCode::OK {
        return Err(fetch(&format_args!("the server answered {status}")));
    }
    let media = resp
        .headers()
        .get(reqwest::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let essence = media.split(';').next().unwrap_or("").trim();
    if !essence.eq_ignore_ascii_case("text/plain") {
        return Err(FetchError::Invalid(format!(
            "{url}: the policy is served as {media:?}, not text/plain"
        )));
    }
    let too_big = || {
        FetchError::Invalid(format!(
            "{url}: the policy is larger than {MAX_POLICY_BYTES} bytes"
        ))
    };
    if resp
        .content_length()
        .is_some_and(|n| n > MAX_POLICY_BYTES as u64)
    {
        return Err(too_big());
    }
    let mut body = Vec::new();
    while let Some(chunk) = resp.chunk().await.map_err(|e| fetch(&error_chain(&e)))? {
        if body.len() + chunk.len() > MAX_POLICY_BYTES {
            return Err(too_big());
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

/// An error and its sources, `: `-joined (reqwest's own message names only the outer layer).
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::outbound::sts::Mode;

    fn cached(max_age: u64, fetched_ms: u64) -> Cached {
        Cached {
            id: "20261203".into(),
            policy: Policy {
                mode: Mode::Enforce,
                mx: vec!["mx.example.com".into()],
                max_age,
            },
            fetched_ms,
        }
    }

    #[test]
    fn a_policy_lives_max_age_and_is_refreshed_after_half_of_it() {
        let c = cached(86_400, 1_000);
        assert_eq!(c.expires_ms(), 1_000 + 86_400_000);
        assert!(!c.wants_refresh(1_000 + 43_199_999));
        assert!(c.wants_refresh(1_000 + 43_200_000));
    }

    #[tokio::test]
    async fn policies_survive_a_reopen_until_they_expire() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(dir.path()).unwrap();
        let cache = StsCache::default();
        cache
            .put(&spool, "long.example", cached(86_400, 1_000))
            .await
            .unwrap();
        cache
            .put(&spool, "short.example", cached(60, 1_000))
            .await
            .unwrap();
        spool.close().await.unwrap();
        drop(spool);
        let spool = Spool::open(dir.path()).unwrap();
        let reopened = StsCache::default();
        // Two minutes later the short one has expired; the long one is back as it was.
        assert_eq!(reopened.load(&spool, 121_000).unwrap(), 1);
        assert_eq!(
            reopened.get("long.example", 121_000).as_deref(),
            Some(&cached(86_400, 1_000))
        );
        assert!(reopened.get("short.example", 121_000).is_none());
        spool.close().await.unwrap();
    }

    #[test]
    fn a_domains_record_is_looked_at_once_per_recheck_period() {
        let cache = StsCache::default();
        assert!(cache.look_due("a.example", 1_000));
        assert!(!cache.look_due("a.example", 1_000 + RECHECK_MS - 1));
        assert!(
            cache.look_due("b.example", 1_001),
            "each domain has its own time"
        );
        assert!(cache.look_due("a.example", 1_000 + RECHECK_MS));
    }

    #[test]
    fn a_failed_fetch_is_remembered_until_its_retry_time() {
        let cache = StsCache::default();
        cache.fetch_failed("a.example", 5_000, "timed out".into());
        assert_eq!(
            cache.failure("a.example", 4_999).as_deref(),
            Some("timed out")
        );
        assert_eq!(cache.failure("a.example", 5_000), None);
        assert_eq!(cache.failure("a.example", 1), None, "forgotten once past");
    }
}
