//! Tenants: the customers a node sends for. Each has API keys, the From domains it may send
//! as, a default pool and limits (API requests a second, recipients a day). The keys of
//! `[auth]` are the operator's: they act as the `default` tenant, which may send as any domain,
//! and they alone may use the admin API (`/v1/admin/…`).
//!
//! Tenants come from `[[tenant]]` in the config and from the admin API; keys from both too.
//! A key is known by its SHA-256 (a key is 32 random bytes, so a fast hash is as good as a
//! slow one), looked up in a map; the spool never holds a key, only the admin API's tenants and
//! key hashes, in `meta` under `tenant/` (`t/<name>`, `k/<hash in hex>`). A key added or
//! revoked is in force as soon as the write is synced. A tenant with a daily quota has its
//! recipients accepted per UTC day as merge operands under `tenant/q/<name>\0<day>` (summed by
//! RocksDB), written in the batch that accepts them, so the quota holds across restarts and
//! crashes.

use std::collections::HashMap;
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use governor::clock::Clock;
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use serde::{Deserialize, Serialize};

use crate::config::{Config, TenantConfig};
use crate::store::spool::{Durability, STATE_TENANT, Spool, SpoolBatch, SpoolError};

pub use crate::config::{DEFAULT_TENANT, KeyHash, hash_key, parse_key_hash};

/// How many tenants get a metric label of their own; the rest share `other`.
const MAX_LABELS: usize = 100;

/// How often a key's `last_used` is written at most (it is exact in memory).
const LAST_USED_EVERY_MS: u64 = 60_000;

const DAY_MS: u64 = 86_400_000;

/// A campaign record's `tenant` for tenant `name`: unset for the default tenant, as records
/// from before tenants are.
pub fn record_field(name: &str) -> Option<String> {
    (name != DEFAULT_TENANT).then(|| name.to_owned())
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A new API key: `sk_` and 32 random bytes in hex.
pub fn new_key() -> Result<String, TenantError> {
    use ring::rand::SecureRandom;
    let mut bytes = [0u8; 32];
    ring::rand::SystemRandom::new()
        .fill(&mut bytes)
        .map_err(|_| TenantError::Random)?;
    Ok(format!("sk_{}", hex(&bytes)))
}

#[derive(Debug, thiserror::Error)]
pub enum TenantError {
    #[error("no tenant is named {0:?}")]
    NoTenant(String),
    #[error("a tenant is already named {0:?}")]
    Exists(String),
    #[error("no key has id {0:?}")]
    NoKey(String),
    #[error("key {0:?} is in the config file: remove it there")]
    ConfigKey(String),
    #[error("the system's random source failed")]
    Random,
    #[error(transparent)]
    Spool(#[from] SpoolError),
}

/// Where a tenant or key was defined.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Origin {
    Config,
    Api,
}

/// An API key as the admin API lists it (and stores it, for keys it made). Never the key.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct KeyRecord {
    /// The first 16 hex digits of its SHA-256.
    pub id: String,
    pub tenant: String,
    pub name: String,
    pub origin: Origin,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created_at_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_used_ms: Option<u64>,
}

/// One key, as the registry holds it.
pub struct Key {
    pub record: KeyRecord,
    hash: KeyHash,
    /// Operator keys may use the admin API.
    pub admin: bool,
    last_used_ms: AtomicU64,
    written_ms: AtomicU64,
}

impl Key {
    pub fn last_used_ms(&self) -> Option<u64> {
        Some(self.last_used_ms.load(Ordering::Relaxed)).filter(|&t| t > 0)
    }
}

/// One tenant: its settings and its live limits.
pub struct Tenant {
    pub spec: TenantConfig,
    pub origin: Origin,
    /// Its number in the scheduler (the default tenant's is 0).
    pub id: u32,
    /// Its metric label: its name for the first [`MAX_LABELS`] tenants, else `other`.
    pub label: String,
    limiter: Option<DefaultDirectRateLimiter>,
    /// (UTC day, recipients accepted that day), reserved ones included.
    usage: Mutex<(u64, u64)>,
}

/// The governor quota of a request rate: a second's worth of requests may come at once.
fn quota(rate: crate::config::Rate) -> Quota {
    let period = (rate.per / rate.count.max(1)).max(Duration::from_nanos(1));
    let burst = rate.per_second().ceil().max(1.0) as u32;
    Quota::with_period(period)
        .expect("period is non-zero")
        .allow_burst(NonZeroU32::new(burst).expect("burst ≥ 1"))
}

impl Tenant {
    fn new(
        spec: TenantConfig,
        origin: Origin,
        id: u32,
        label: String,
        used_today: (u64, u64),
    ) -> Tenant {
        let limiter = spec.rate.map(|rate| RateLimiter::direct(quota(rate)));
        Tenant {
            spec,
            origin,
            id,
            label,
            limiter,
            usage: Mutex::new(used_today),
        }
    }

    pub fn name(&self) -> &str {
        &self.spec.name
    }

    pub fn is_default(&self) -> bool {
        self.spec.name == DEFAULT_TENANT
    }

    /// Whether it may send as `domain` (a From address's domain).
    pub fn may_send_as(&self, domain: &str) -> bool {
        self.spec
            .sending_domains
            .iter()
            .any(|p| crate::config::name_matches(p, domain))
    }

    /// Counts one API request against its rate: `Err(wait)` when over it.
    pub fn admit_request(&self) -> Result<(), Duration> {
        let Some(l) = &self.limiter else {
            return Ok(());
        };
        l.check()
            .map_err(|not_until| not_until.wait_time_from(l.clock().now()))
    }

    /// Recipients accepted today (UTC), reserved ones included.
    pub fn used_today(&self, now_ms: u64) -> u64 {
        let u = self.usage.lock().expect("tenant usage lock");
        if u.0 == now_ms / DAY_MS { u.1 } else { 0 }
    }

    /// Reserves `n` recipients of today's quota. Over the quota: `Err(seconds until the next
    /// UTC day)`. The reservation is given back when dropped unconfirmed.
    pub fn reserve(self: &Arc<Self>, n: u64, now_ms: u64) -> Result<Reservation, QuotaExceeded> {
        let day = now_ms / DAY_MS;
        let mut u = self.usage.lock().expect("tenant usage lock");
        if u.0 != day {
            *u = (day, 0);
        }
        if let Some(quota) = self.spec.daily_quota
            && u.1.saturating_add(n) > quota
        {
            return Err(QuotaExceeded {
                quota,
                used: u.1,
                retry_after_s: ((day + 1) * DAY_MS - now_ms).div_ceil(1000),
            });
        }
        u.1 += n;
        Ok(Reservation {
            tenant: Arc::clone(self),
            day,
            n,
            confirmed: false,
        })
    }
}

/// A daily quota would be passed.
#[derive(Debug, Clone, Copy)]
pub struct QuotaExceeded {
    pub quota: u64,
    pub used: u64,
    pub retry_after_s: u64,
}

/// Recipients of a tenant's daily quota held by a request until it commits.
pub struct Reservation {
    tenant: Arc<Tenant>,
    day: u64,
    n: u64,
    confirmed: bool,
}

impl Reservation {
    /// Stages the count in the batch that accepts the recipients (for a tenant with a daily
    /// quota: the others' counts are kept in memory only).
    pub fn stage(&self, batch: &mut SpoolBatch) {
        if self.n > 0 && self.tenant.spec.daily_quota.is_some() {
            batch.merge_state(
                STATE_TENANT,
                &usage_key(self.tenant.name(), self.day),
                &self.n.to_be_bytes(),
            );
        }
    }

    /// The batch was written: the recipients count for good.
    pub fn confirm(mut self) {
        self.confirmed = true;
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        if !self.confirmed {
            let mut u = self.tenant.usage.lock().expect("tenant usage lock");
            if u.0 == self.day {
                u.1 = u.1.saturating_sub(self.n);
            }
        }
    }
}

/// A tenant or key change as the cluster's change stream carries it (cluster mode): a tenant
/// or key made or revoked through one node's admin API is made or revoked on every node.
#[derive(Serialize, Deserialize)]
#[serde(tag = "kind")]
pub enum Change {
    #[serde(rename = "tenant.add")]
    AddTenant { tenant: TenantConfig },
    #[serde(rename = "tenant.key_add")]
    AddKey { key: StoredKey },
    #[serde(rename = "tenant.key_revoke")]
    RevokeKey { hash: String },
}

impl Change {
    pub fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }
}

/// Who sent a request: its tenant, and whether its key is the operator's.
#[derive(Clone)]
pub struct Caller {
    pub tenant: Arc<Tenant>,
    pub key: Arc<Key>,
}

impl Caller {
    pub fn admin(&self) -> bool {
        self.key.admin
    }
}

/// The registry of tenants and keys (empty until [`Tenants::load`]).
#[derive(Default)]
pub struct Tenants {
    inner: RwLock<Inner>,
    /// Usage counters of past days, deleted by the next [`Tenants::flush`].
    stale: Mutex<Vec<Vec<u8>>>,
    /// Cluster mode: tenants and keys made or revoked here are staged for the other nodes.
    replicate: std::sync::atomic::AtomicBool,
}

#[derive(Default)]
struct Inner {
    by_name: HashMap<String, Arc<Tenant>>,
    keys: HashMap<KeyHash, Arc<Key>>,
    /// `auth.rate_limit`: each key's own request rate, whatever its tenant.
    key_rate: Option<(
        crate::config::Rate,
        Arc<governor::DefaultKeyedRateLimiter<String>>,
    )>,
}

fn usage_key(tenant: &str, day: u64) -> Vec<u8> {
    let mut k = b"q/".to_vec();
    k.extend_from_slice(tenant.as_bytes());
    k.push(0);
    k.extend_from_slice(&day.to_be_bytes());
    k
}

fn key_id(hash: &KeyHash) -> String {
    hex(&hash[..8])
}

impl Tenants {
    /// Registers the tenants and keys of `config` and those the admin API stored in `spool`,
    /// with today's usage. Blocking.
    pub fn load(&self, config: &Config, spool: &Spool) -> Result<(), SpoolError> {
        let now = crate::now_ms();
        let today = now / DAY_MS;
        let mut stored_tenants = Vec::new();
        let mut stored_keys = Vec::new();
        let mut usage: HashMap<String, u64> = HashMap::new();
        let mut stale = Vec::new();
        spool.scan_state(STATE_TENANT, |k, v| {
            if let Some(name) = k.strip_prefix(b"t/") {
                match serde_json::from_slice::<TenantConfig>(v) {
                    Ok(t) => stored_tenants.push(t),
                    Err(e) => tracing::error!(tenant = %String::from_utf8_lossy(name), error = %e, "unreadable tenant record skipped"),
                }
            } else if let Some(id) = k.strip_prefix(b"k/") {
                match serde_json::from_slice::<StoredKey>(v) {
                    Ok(key) => stored_keys.push(key),
                    Err(e) => tracing::error!(key = %String::from_utf8_lossy(id), error = %e, "unreadable key record skipped"),
                }
            } else if let Some(rest) = k.strip_prefix(b"q/") {
                // `<name>\0<day>`: the day is the last 8 bytes (which may hold zeros).
                let parsed = rest.len().checked_sub(9).and_then(|i| {
                    let day = u64::from_be_bytes(rest.get(i + 1..)?.try_into().ok()?);
                    Some((String::from_utf8_lossy(&rest[..i]).into_owned(), day))
                });
                match parsed {
                    Some((name, day)) if day == today => {
                        let n = <[u8; 8]>::try_from(v).map_or(0, u64::from_be_bytes);
                        usage.insert(name, n);
                    }
                    _ => stale.push(k.to_vec()),
                }
            }
        })?;
        *self.stale.lock().expect("tenants lock") = stale;
        let mut inner = Inner {
            key_rate: config
                .auth
                .rate_limit
                .map(|rate| (rate, Arc::new(RateLimiter::keyed(quota(rate))))),
            ..Inner::default()
        };
        let add_tenant = |inner: &mut Inner, spec: TenantConfig, origin| {
            let used = usage.get(&spec.name).copied().unwrap_or(0);
            inner.add_tenant(spec, origin, (today, used))
        };
        let default = add_tenant(&mut inner, TenantConfig::default_tenant(), Origin::Config);
        for (i, k) in config.auth.api_keys.iter().enumerate() {
            inner.insert_key(
                &default,
                hash_key(k.as_bytes()),
                format!("auth.api_keys[{i}]"),
                Origin::Config,
                None,
                true,
            );
        }
        for spec in &config.tenants {
            let t = add_tenant(&mut inner, spec.clone(), Origin::Config);
            let hashes = spec
                .api_keys
                .iter()
                .map(|k| hash_key(k.as_bytes()))
                .chain(spec.api_key_hashes.iter().filter_map(|h| parse_key_hash(h)));
            for (i, h) in hashes.enumerate() {
                inner.insert_key(
                    &t,
                    h,
                    format!("{}[{i}]", spec.name),
                    Origin::Config,
                    None,
                    false,
                );
            }
        }
        for spec in stored_tenants {
            if inner.by_name.contains_key(&spec.name) {
                tracing::warn!(tenant = %spec.name, "a tenant made through the admin API is now in the config file; the config's settings apply");
                continue;
            }
            add_tenant(&mut inner, spec, Origin::Api);
        }
        for key in stored_keys {
            let (id, tenant) = (key.record.id.clone(), key.record.tenant.clone());
            if !inner.insert_stored(key) {
                tracing::warn!(key = %id, %tenant, "a stored key whose tenant is gone is not accepted");
            }
        }
        *self.inner.write().expect("tenants lock") = inner;
        Ok(())
    }

    /// The caller a bearer key stands for, if any. The key is hashed and looked up: its time
    /// depends on the key's hash, not on how much of a stored key it matches. Notes the use.
    pub fn authenticate(&self, key: &[u8]) -> Option<Caller> {
        let hash = hash_key(key);
        let inner = self.inner.read().expect("tenants lock");
        let key = Arc::clone(inner.keys.get(&hash)?);
        let tenant = Arc::clone(inner.by_name.get(&key.record.tenant)?);
        key.last_used_ms.store(crate::now_ms(), Ordering::Relaxed);
        Some(Caller { tenant, key })
    }

    /// Counts one API request of `caller`'s key against `auth.rate_limit`: `Err((rate, wait))`
    /// when over it.
    pub fn admit_key(&self, caller: &Caller) -> Result<(), (crate::config::Rate, Duration)> {
        let inner = self.inner.read().expect("tenants lock");
        let Some((rate, limiter)) = &inner.key_rate else {
            return Ok(());
        };
        limiter
            .check_key(&caller.key.record.id)
            .map_err(|not_until| (*rate, not_until.wait_time_from(limiter.clock().now())))
    }

    pub fn get(&self, name: &str) -> Option<Arc<Tenant>> {
        self.inner
            .read()
            .expect("tenants lock")
            .by_name
            .get(name)
            .cloned()
    }

    /// The scheduler's number and weight of tenant `name` (an unknown one, dropped from the
    /// config, gets the default tenant's number and weight 1).
    pub fn scheduling(&self, name: &str) -> (u32, u32) {
        self.get(name).map_or((0, 1), |t| (t.id, t.spec.weight))
    }

    /// The default tenant (always there).
    pub fn default_tenant(&self) -> Arc<Tenant> {
        self.get(DEFAULT_TENANT)
            .expect("the default tenant is always registered")
    }

    /// Calls `f` with the metric label of tenant `name` (`other` past the first hundred
    /// tenants, or when unknown), without copying it.
    pub fn with_label<R>(&self, name: &str, f: impl FnOnce(&str) -> R) -> R {
        let inner = self.inner.read().expect("tenants lock");
        f(inner
            .by_name
            .get(name)
            .map_or("other", |t| t.label.as_str()))
    }

    /// Every tenant, by name.
    pub fn all(&self) -> Vec<Arc<Tenant>> {
        let mut v: Vec<_> = self
            .inner
            .read()
            .expect("tenants lock")
            .by_name
            .values()
            .cloned()
            .collect();
        v.sort_by(|a, b| a.spec.name.cmp(&b.spec.name));
        v
    }

    /// The keys of `tenant` (every key when `None`), by tenant and name.
    pub fn keys(&self, tenant: Option<&str>) -> Vec<KeyRecord> {
        let inner = self.inner.read().expect("tenants lock");
        let mut v: Vec<KeyRecord> = inner
            .keys
            .values()
            .filter(|k| tenant.is_none_or(|t| k.record.tenant == t))
            .map(|k| KeyRecord {
                last_used_ms: k.last_used_ms(),
                ..k.record.clone()
            })
            .collect();
        v.sort_by(|a, b| (&a.tenant, &a.name, &a.id).cmp(&(&b.tenant, &b.name, &b.id)));
        v
    }

    /// Adds a tenant (admin API), synced before it is in force.
    pub async fn add_tenant(
        &self,
        spool: &Spool,
        spec: TenantConfig,
    ) -> Result<Arc<Tenant>, TenantError> {
        if self.get(&spec.name).is_some() {
            return Err(TenantError::Exists(spec.name));
        }
        let mut batch = spool.batch();
        stage_tenant(&mut batch, &spec);
        self.stage(&mut batch, || Change::AddTenant {
            tenant: spec.clone(),
        });
        spool.write(batch, Durability::Sync).await?;
        self.insert_tenant(spec)
    }

    /// Registers a tenant the admin API made (here or, in cluster mode, on another node).
    fn insert_tenant(&self, spec: TenantConfig) -> Result<Arc<Tenant>, TenantError> {
        let mut inner = self.inner.write().expect("tenants lock");
        if inner.by_name.contains_key(&spec.name) {
            return Err(TenantError::Exists(spec.name));
        }
        Ok(inner.add_tenant(spec, Origin::Api, (crate::now_ms() / DAY_MS, 0)))
    }

    /// Cluster mode: stage every change for the other nodes from now on.
    pub fn set_replicating(&self) {
        self.replicate.store(true, Ordering::Release);
    }

    fn stage(&self, batch: &mut SpoolBatch, change: impl FnOnce() -> Change) {
        if self.replicate.load(Ordering::Acquire) {
            crate::cluster::sync::stage(batch, &change().to_json());
        }
    }

    /// Cluster mode: writes another node's change into `batch` (then [`Tenants::apply_received`]).
    pub fn stage_received(batch: &mut SpoolBatch, change: &Change) {
        match change {
            Change::AddTenant { tenant } => stage_tenant(batch, tenant),
            Change::AddKey { key } => {
                if let Some(hash) = key.hash() {
                    batch.put_state(
                        STATE_TENANT,
                        &stored_key_name(&hash),
                        &serde_json::to_vec(key).expect("a key record serialises"),
                    );
                }
            }
            Change::RevokeKey { hash } => {
                batch.delete_state(STATE_TENANT, &[b"k/".as_slice(), hash.as_bytes()].concat());
            }
        }
    }

    /// Cluster mode: applies another node's change in memory, once written.
    pub fn apply_received(&self, change: Change) {
        match change {
            Change::AddTenant { tenant } => {
                let _ = self.insert_tenant(tenant);
            }
            Change::AddKey { key } => {
                self.inner.write().expect("tenants lock").insert_stored(key);
            }
            Change::RevokeKey { hash } => {
                if let Some(hash) = parse_key_hash(&format!("sha256:{hash}")) {
                    self.inner.write().expect("tenants lock").keys.remove(&hash);
                }
            }
        }
    }

    /// Makes a key for `tenant` (admin API): the key itself, returned once, and its record.
    /// Stored hashed and synced before it is in force.
    pub async fn add_key(
        &self,
        spool: &Spool,
        tenant: &str,
        name: &str,
    ) -> Result<(String, KeyRecord), TenantError> {
        let t = self
            .get(tenant)
            .ok_or_else(|| TenantError::NoTenant(tenant.to_owned()))?;
        let key = new_key()?;
        let hash = hash_key(key.as_bytes());
        let record = KeyRecord {
            id: key_id(&hash),
            tenant: tenant.to_owned(),
            name: name.to_owned(),
            origin: Origin::Api,
            created_at_ms: Some(crate::now_ms()),
            last_used_ms: None,
        };
        let stored = StoredKey {
            hash: hex(&hash),
            record: record.clone(),
        };
        let mut batch = spool.batch();
        batch.put_state(
            STATE_TENANT,
            &stored_key_name(&hash),
            &serde_json::to_vec(&stored).expect("a key record serialises"),
        );
        self.stage(&mut batch, || Change::AddKey { key: stored });
        spool.write(batch, Durability::Sync).await?;
        let mut inner = self.inner.write().expect("tenants lock");
        inner.insert_key(
            &t,
            hash,
            record.name.clone(),
            Origin::Api,
            record.created_at_ms,
            false,
        );
        Ok((key, record))
    }

    /// Revokes key `id` (admin API): refused from the moment this returns (the deletion is
    /// synced first). Keys of the config file are revoked there.
    pub async fn revoke_key(&self, spool: &Spool, id: &str) -> Result<KeyRecord, TenantError> {
        let (hash, record) = {
            let inner = self.inner.read().expect("tenants lock");
            let k = inner
                .keys
                .values()
                .find(|k| k.record.id == id)
                .ok_or_else(|| TenantError::NoKey(id.to_owned()))?;
            if k.record.origin == Origin::Config {
                return Err(TenantError::ConfigKey(k.record.name.clone()));
            }
            (k.hash, k.record.clone())
        };
        let mut batch = spool.batch();
        batch.delete_state(STATE_TENANT, &stored_key_name(&hash));
        self.stage(&mut batch, || Change::RevokeKey { hash: hex(&hash) });
        spool.write(batch, Durability::Sync).await?;
        self.inner.write().expect("tenants lock").keys.remove(&hash);
        Ok(record)
    }

    /// Writes the `last_used` of the admin API's keys used since they were last written, at
    /// most once a minute per key (every one with `all`, at shutdown), and deletes the usage
    /// counters of past days.
    pub async fn flush(&self, spool: &Spool, all: bool) -> Result<(), SpoolError> {
        let now = crate::now_ms();
        let due: Vec<(KeyHash, StoredKey)> = {
            let inner = self.inner.read().expect("tenants lock");
            inner
                .keys
                .values()
                .filter(|k| k.record.origin == Origin::Api)
                .filter_map(|k| {
                    let used = k.last_used_ms.load(Ordering::Relaxed);
                    let written = k.written_ms.load(Ordering::Relaxed);
                    (used > written && (all || now.saturating_sub(written) >= LAST_USED_EVERY_MS))
                        .then(|| {
                            k.written_ms.store(used, Ordering::Relaxed);
                            let record = KeyRecord {
                                last_used_ms: Some(used),
                                ..k.record.clone()
                            };
                            (
                                k.hash,
                                StoredKey {
                                    hash: hex(&k.hash),
                                    record,
                                },
                            )
                        })
                })
                .collect()
        };
        let stale = std::mem::take(&mut *self.stale.lock().expect("tenants lock"));
        if due.is_empty() && stale.is_empty() {
            return Ok(());
        }
        let mut batch = spool.batch();
        for k in &stale {
            batch.delete_state(STATE_TENANT, k);
        }
        for (hash, stored) in &due {
            batch.put_state(
                STATE_TENANT,
                &stored_key_name(hash),
                &serde_json::to_vec(stored).expect("a key record serialises"),
            );
        }
        spool.write(batch, Durability::Buffered).await
    }
}

impl Inner {
    /// Registers a tenant with the next number, its metric label (its name while there are
    /// fewer than [`MAX_LABELS`], else `other`) and `usage` (UTC day, recipients that day).
    fn add_tenant(&mut self, spec: TenantConfig, origin: Origin, usage: (u64, u64)) -> Arc<Tenant> {
        let label = if self.by_name.len() < MAX_LABELS {
            spec.name.clone()
        } else {
            "other".to_owned()
        };
        let id = self.by_name.len() as u32;
        let t = Arc::new(Tenant::new(spec, origin, id, label, usage));
        self.by_name.insert(t.spec.name.clone(), Arc::clone(&t));
        t
    }

    /// Registers a key the admin API stored (here or on another node): false when its hash
    /// does not read or its tenant is gone.
    fn insert_stored(&mut self, key: StoredKey) -> bool {
        let (Some(hash), Some(t)) = (key.hash(), self.by_name.get(&key.record.tenant).cloned())
        else {
            return false;
        };
        let r = key.record;
        self.insert_key(&t, hash, r.name, Origin::Api, r.created_at_ms, false);
        if let (Some(k), Some(used)) = (self.keys.get(&hash), r.last_used_ms) {
            k.last_used_ms.store(used, Ordering::Relaxed);
            k.written_ms.store(used, Ordering::Relaxed);
        }
        true
    }

    fn insert_key(
        &mut self,
        tenant: &Arc<Tenant>,
        hash: KeyHash,
        name: String,
        origin: Origin,
        created_at_ms: Option<u64>,
        admin: bool,
    ) {
        let key = Key {
            record: KeyRecord {
                id: key_id(&hash),
                tenant: tenant.spec.name.clone(),
                name,
                origin,
                created_at_ms,
                last_used_ms: None,
            },
            hash,
            admin,
            last_used_ms: AtomicU64::new(0),
            written_ms: AtomicU64::new(0),
        };
        self.keys.insert(hash, Arc::new(key));
    }
}

fn stage_tenant(batch: &mut SpoolBatch, spec: &TenantConfig) {
    let key = [b"t/".as_slice(), spec.name.as_bytes()].concat();
    batch.put_state(
        STATE_TENANT,
        &key,
        &serde_json::to_vec(spec).expect("a tenant serialises"),
    );
}

fn stored_key_name(hash: &KeyHash) -> Vec<u8> {
    [b"k/".as_slice(), hex(hash).as_bytes()].concat()
}

/// A key the admin API made, as stored: its hash and its record.
#[derive(Serialize, Deserialize)]
pub struct StoredKey {
    hash: String,
    #[serde(flatten)]
    record: KeyRecord,
}

impl StoredKey {
    fn hash(&self) -> Option<KeyHash> {
        parse_key_hash(&format!("sha256:{}", self.hash))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_hashes_parse_and_print() {
        let h = hash_key(b"a key of some length");
        let text = format!("sha256:{}", hex(&h));
        assert_eq!(parse_key_hash(&text), Some(h));
        assert_eq!(parse_key_hash(&text[..70]), None);
        assert_eq!(parse_key_hash(&text.replace("sha256:", "md5:")), None);
        assert_eq!(parse_key_hash("sha256:zz"), None);
    }

    #[test]
    fn new_keys_differ_and_are_long() {
        let (a, b) = (new_key().unwrap(), new_key().unwrap());
        assert_ne!(a, b);
        assert_eq!(a.len(), 3 + 64);
    }

    fn tenant(quota: Option<u64>, domains: &[&str]) -> Arc<Tenant> {
        let spec = TenantConfig {
            name: "a".into(),
            sending_domains: domains.iter().map(|d| d.to_string()).collect(),
            daily_quota: quota,
            ..TenantConfig::default_tenant()
        };
        Arc::new(Tenant::new(spec, Origin::Config, 1, "a".into(), (0, 0)))
    }

    #[test]
    fn quota_reservations_are_given_back_unless_confirmed() {
        let t = tenant(Some(10), &["*"]);
        let now = 5 * DAY_MS + 1000;
        let r = t.reserve(6, now).unwrap();
        let over = t.reserve(5, now).err().expect("over the quota");
        assert_eq!((over.quota, over.used), (10, 6));
        assert_eq!(over.retry_after_s, 86_399);
        drop(r);
        t.reserve(10, now).unwrap().confirm();
        assert_eq!(t.used_today(now), 10);
        assert!(t.reserve(1, now).is_err());
        // A new day starts from nothing.
        assert!(t.reserve(10, now + DAY_MS).is_ok());
    }

    #[test]
    fn sending_domains_match_patterns() {
        let t = tenant(None, &["example.com", "*.mail.example.net"]);
        assert!(t.may_send_as("example.com"));
        assert!(t.may_send_as("EXAMPLE.com"));
        assert!(!t.may_send_as("sub.example.com"));
        assert!(t.may_send_as("news.mail.example.net"));
        assert!(!t.may_send_as("mail.example.net"));
        assert!(!t.may_send_as("example.org"));
    }
}
