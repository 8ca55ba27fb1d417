//! Suppression lists: addresses Sluice must not send to, globally or for one sending domain.
//!
//! Records live in the spool's `suppressions` column family (key `scope \0 address`, value a
//! versioned JSON record); this module owns their encoding and the in-memory index that ingest and
//! delivery consult, a hash lookup per recipient. A new entry is written first and indexed after
//! ([`Suppressions::added`]), so the index never holds what the disk will not: one caused by a
//! job's change travels with it ([`crate::effects::transition`]), others go through
//! [`Suppressions::add`]. Writes go through the spool's writer thread; lookups never block on I/O.
//!
//! Addresses are normalised to lower case as a whole: local parts are case-sensitive in theory,
//! but no large mailbox provider treats them so, and a suppression that misses `Ann@` because
//! `ann@` was listed would send mail someone asked not to get.

use std::collections::HashMap;
use std::sync::{LazyLock, RwLock};

use prometheus::{IntCounterVec, register_int_counter_vec};

use serde::{Deserialize, Serialize};

use crate::intake::address::{Address, AddressError};
use crate::store::spool::{Durability, Spool, SpoolError};

/// Suppressions added, by reason.
static ADDED: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register_int_counter_vec!(
        "sluice_suppressions_added_total",
        "Suppressions added by reason (hard_bounce, complaint, unsubscribe, manual). complaint and unsubscribe against delivered volume are the rates mailbox providers watch.",
        &["reason"]
    )
    .expect("metric registers once")
});

/// Version byte in front of the JSON record.
const VERSION: u8 = 1;
/// The scope of a suppression that applies to every sending domain.
pub const GLOBAL: &str = "*";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Reason {
    HardBounce,
    Complaint,
    Unsubscribe,
    Manual,
}

impl Reason {
    pub fn parse(s: &str) -> Option<Reason> {
        match s {
            "hard_bounce" => Some(Reason::HardBounce),
            "complaint" => Some(Reason::Complaint),
            "unsubscribe" => Some(Reason::Unsubscribe),
            "manual" => Some(Reason::Manual),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Reason::HardBounce => "hard_bounce",
            Reason::Complaint => "complaint",
            Reason::Unsubscribe => "unsubscribe",
            Reason::Manual => "manual",
        }
    }
}

/// One suppression, as stored and as the API shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    /// Normalised (see the module docs).
    pub address: String,
    /// `*` for every sending domain, else the sending (From) domain it applies to.
    pub scope: String,
    pub reason: Reason,
    pub created_at_ms: u64,
    /// What caused it: `api`, `unsubscribe`, an import, an operator's note.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
    /// The campaign whose message led to it (unsubscribe, bounce, complaint). Recovery counts
    /// these back into the campaign's `unsubscribed` and `complained`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub campaign: Option<uuid::Uuid>,
    /// The job (`campaign-seq.index`) whose message led to it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub job: Option<String>,
    /// Bounce category of a hard bounce (`bad-mailbox`, …).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub category: Option<crate::outbound::outcome::rules::Category>,
    /// The reply or report that caused it, for people asking why.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

impl Entry {
    pub fn key(&self) -> Vec<u8> {
        key(&self.scope, &self.address)
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut out = vec![VERSION];
        serde_json::to_writer(&mut out, self).expect("a suppression record always serialises");
        out
    }

    pub fn decode(bytes: &[u8]) -> Result<Entry, String> {
        match bytes.split_first() {
            Some((&VERSION, json)) => serde_json::from_slice(json).map_err(|e| e.to_string()),
            Some((v, _)) => Err(format!("unknown suppression record version {v}")),
            None => Err("empty suppression record".into()),
        }
    }
}

/// The spool key of a suppression.
pub fn key(scope: &str, address: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(scope.len() + 1 + address.len());
    k.extend_from_slice(scope.as_bytes());
    k.push(0);
    k.extend_from_slice(address.as_bytes());
    k
}

/// Validates and normalises an address for the suppression list.
pub fn normalise(address: &str) -> Result<String, AddressError> {
    Ok(Address::parse(address)?.as_str().to_lowercase())
}

/// Validates and normalises a scope: `global` (or `*`) or a domain name.
pub fn normalise_scope(scope: &str) -> Result<String, String> {
    if scope == "global" || scope == GLOBAL {
        return Ok(GLOBAL.to_owned());
    }
    let lower = scope.to_ascii_lowercase();
    crate::intake::address::check_host_name(&lower)
        .map_err(|_| format!("{scope:?} is neither \"global\" nor a domain name"))?;
    Ok(lower)
}

/// The stored scope of tenant `tenant`'s suppression in `scope` (`*` or a domain). The
/// operator's (the default tenant's) are stored as they are and apply to every tenant; a
/// tenant's are stored behind its name and a colon (which neither a domain nor `*` holds) and
/// apply to its mail only.
pub fn stored_scope(tenant: &str, scope: &str) -> String {
    if tenant == crate::config::DEFAULT_TENANT {
        scope.to_owned()
    } else {
        format!("{tenant}:{scope}")
    }
}

/// A stored scope as (tenant, scope): no tenant for the operator's.
pub fn split_scope(stored: &str) -> (Option<&str>, &str) {
    match stored.split_once(':') {
        Some((tenant, scope)) => (Some(tenant), scope),
        None => (None, stored),
    }
}

/// Whether a suppression of `stored` scope stops `tenant`'s mail from `from_domain`.
fn applies(stored: &str, from_domain: &str, tenant: &str) -> bool {
    let (owner, scope) = split_scope(stored);
    owner.is_none_or(|o| o == tenant)
        && (scope == GLOBAL || scope.eq_ignore_ascii_case(from_domain))
}

/// The scopes one address is suppressed in, with the reason in each.
type Scopes = Vec<(Box<str>, Reason)>;

/// A suppression change as the cluster's change stream carries it (cluster mode): every new
/// entry and every deletion is staged with the write that makes it, and applied by the other
/// nodes.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "kind")]
pub enum Change {
    #[serde(rename = "suppression.add")]
    Add { entry: Entry },
    #[serde(rename = "suppression.delete")]
    Delete { address: String, scope: String },
}

impl Change {
    pub fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }
}

/// The in-memory index: address → the scopes it is suppressed in.
#[derive(Default)]
pub struct Suppressions {
    index: RwLock<HashMap<Box<str>, Scopes>>,
    /// Cluster mode: changes written through [`Suppressions::add`] are staged for the other
    /// nodes.
    replicate: std::sync::atomic::AtomicBool,
}

impl Suppressions {
    /// Why `address` may not receive `tenant`'s mail from `from_domain`, if it may not: the
    /// operator's list (global, or for that domain) and the tenant's own. `address` is an
    /// already validated address; it is lower-cased here when it needs to be.
    pub fn check(&self, address: &str, from_domain: &str, tenant: &str) -> Option<Reason> {
        let index = self.index.read().expect("suppression index lock");
        if index.is_empty() {
            return None;
        }
        let scopes = if address.bytes().any(|b| b.is_ascii_uppercase()) || !address.is_ascii() {
            index.get(address.to_lowercase().as_str())
        } else {
            index.get(address)
        }?;
        scopes
            .iter()
            .find(|(scope, _)| applies(scope, from_domain, tenant))
            .map(|(_, reason)| *reason)
    }

    /// Adds or replaces `entry` in the index. True when the address was not suppressed in that
    /// scope before. Recovery loads entries with it; a new suppression goes through
    /// [`Suppressions::added`].
    pub fn insert(&self, entry: &Entry) -> bool {
        let mut index = self.index.write().expect("suppression index lock");
        let scopes = index.entry(entry.address.as_str().into()).or_default();
        match scopes.iter_mut().find(|(s, _)| **s == *entry.scope) {
            Some(slot) => {
                slot.1 = entry.reason;
                false
            }
            None => {
                scopes.push((entry.scope.as_str().into(), entry.reason));
                true
            }
        }
    }

    /// Indexes `entry` once its record is written (or queued with the change that caused it),
    /// counting and logging it when it is new. True when the address was not suppressed in
    /// that scope before. Every suppression, from any source, goes through here.
    pub fn added(&self, entry: &Entry) -> bool {
        let new = self.insert(entry);
        if new {
            ADDED.with_label_values(&[entry.reason.as_str()]).inc();
            tracing::debug!(
                address = %entry.address,
                scope = %entry.scope,
                reason = entry.reason.as_str(),
                source = entry.source.as_deref().unwrap_or(""),
                "suppression added"
            );
        }
        new
    }

    /// Writes `entries` and indexes them: suppressions that no job's change caused (the API,
    /// imports). `Buffered` is for all but the last batch of an import, whose final synced write
    /// covers them. Returns how many were new.
    pub async fn add(
        &self,
        spool: &Spool,
        entries: &[Entry],
        durability: Durability,
    ) -> Result<usize, SpoolError> {
        let mut batch = spool.batch();
        let replicate = self.replicating();
        for e in entries {
            batch.put_suppression(&e.key(), &e.encode());
            if replicate {
                let change = Change::Add { entry: e.clone() };
                crate::cluster::sync::stage(&mut batch, &change.to_json());
            }
        }
        spool.write(batch, durability).await?;
        Ok(entries.iter().filter(|e| self.added(e)).count())
    }

    /// Cluster mode: stage every change for the other nodes from now on.
    pub fn set_replicating(&self) {
        self.replicate
            .store(true, std::sync::atomic::Ordering::Release);
    }

    pub fn replicating(&self) -> bool {
        self.replicate.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Removes the suppression of `address` in `scope` (after it is deleted from the spool).
    pub fn remove(&self, address: &str, scope: &str) {
        let mut index = self.index.write().expect("suppression index lock");
        if let Some(scopes) = index.get_mut(address) {
            scopes.retain(|(s, _)| &**s != scope);
            if scopes.is_empty() {
                index.remove(address);
            }
        }
    }

    /// The scopes `address` is suppressed in.
    pub fn scopes(&self, address: &str) -> Vec<String> {
        self.index
            .read()
            .expect("suppression index lock")
            .get(address)
            .map(|v| v.iter().map(|(s, _)| s.to_string()).collect())
            .unwrap_or_default()
    }

    /// Suppressed addresses (in any scope).
    pub fn len(&self) -> usize {
        self.index.read().expect("suppression index lock").len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(address: &str, scope: &str, reason: Reason) -> Entry {
        Entry {
            address: address.into(),
            scope: scope.into(),
            reason,
            created_at_ms: 1,
            source: None,
            campaign: None,
            job: None,
            category: None,
            detail: None,
        }
    }

    #[test]
    fn global_and_domain_scopes() {
        let s = Suppressions::default();
        let s_check = |s: &Suppressions, a: &str, d: &str| s.check(a, d, "default");
        assert_eq!(s_check(&s, "ann@example.org", "news.example.com"), None);
        s.insert(&entry("ann@example.org", GLOBAL, Reason::HardBounce));
        s.insert(&entry(
            "bob@example.org",
            "news.example.com",
            Reason::Unsubscribe,
        ));
        assert_eq!(
            s_check(&s, "ann@example.org", "anything.example"),
            Some(Reason::HardBounce)
        );
        assert_eq!(
            s_check(&s, "Ann@Example.org", "anything.example"),
            Some(Reason::HardBounce),
            "case does not matter"
        );
        assert_eq!(
            s_check(&s, "bob@example.org", "news.example.com"),
            Some(Reason::Unsubscribe)
        );
        assert_eq!(s_check(&s, "bob@example.org", "shop.example.com"), None);
        s.insert(&entry(
            "bob@example.org",
            "news.example.com",
            Reason::Manual,
        ));
        assert_eq!(s.scopes("bob@example.org"), vec!["news.example.com"]);
        assert_eq!(
            s_check(&s, "bob@example.org", "news.example.com"),
            Some(Reason::Manual)
        );
        s.remove("bob@example.org", "news.example.com");
        assert_eq!(s_check(&s, "bob@example.org", "news.example.com"), None);
        assert_eq!(s.len(), 1);
    }

    #[test]
    fn tenants_lists_are_their_own_and_the_operators_apply_to_all() {
        let s = Suppressions::default();
        s.insert(&entry(
            "a@x.org",
            &stored_scope("acme", GLOBAL),
            Reason::Manual,
        ));
        s.insert(&entry(
            "b@x.org",
            &stored_scope("acme", "news.acme.test"),
            Reason::Unsubscribe,
        ));
        s.insert(&entry(
            "c@x.org",
            &stored_scope("default", GLOBAL),
            Reason::HardBounce,
        ));
        assert_eq!(
            s.check("a@x.org", "acme.test", "acme"),
            Some(Reason::Manual)
        );
        assert_eq!(s.check("a@x.org", "other.test", "other"), None);
        assert_eq!(s.check("a@x.org", "any.test", "default"), None);
        assert_eq!(
            s.check("b@x.org", "news.acme.test", "acme"),
            Some(Reason::Unsubscribe)
        );
        assert_eq!(s.check("b@x.org", "acme.test", "acme"), None);
        for tenant in ["acme", "other", "default"] {
            assert_eq!(
                s.check("c@x.org", "any.test", tenant),
                Some(Reason::HardBounce)
            );
        }
        assert_eq!(split_scope("acme:*"), (Some("acme"), "*"));
        assert_eq!(split_scope("news.acme.test"), (None, "news.acme.test"));
    }

    #[test]
    fn records_round_trip_and_normalise() {
        let e = Entry {
            source: Some("campaign x job 1.2".into()),
            ..entry("zoë@bücher.example", GLOBAL, Reason::Complaint)
        };
        assert_eq!(Entry::decode(&e.encode()).unwrap(), e);
        assert!(Entry::decode(&[7]).is_err());
        assert_eq!(e.key(), b"*\0zo\xc3\xab@b\xc3\xbccher.example".to_vec());
        assert_eq!(
            normalise("Zoë@Bücher.Example").unwrap(),
            "zoë@xn--bcher-kva.example"
        );
        assert!(normalise("nope").is_err());
        assert_eq!(normalise_scope("global").unwrap(), "*");
        assert_eq!(
            normalise_scope("News.Example.com").unwrap(),
            "news.example.com"
        );
        assert!(normalise_scope("not a domain").is_err());
        assert_eq!(Reason::parse("hard_bounce"), Some(Reason::HardBounce));
        assert_eq!(Reason::parse("x"), None);
    }
}
