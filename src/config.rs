//! The TOML configuration: its schema, defaults, and validation at load.
//!
//! Owns parsing and checking only; it never opens sockets or the spool. Every error names the
//! file, the key (`http.listen`, `auth.api_keys[2]`) and the reason, so `sluice check-config`
//! can print something an operator fixes in one go. The loaded config is passed around as
//! `Arc<Config>`; there is no global.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

/// The environment variable that, when set, replaces `auth.api_keys` (comma-separated), so
/// secrets need not sit in the file.
pub const API_KEYS_ENV: &str = "SLUICE_API_KEYS";

/// The API key shipped in `config/sluice.toml` for a first run on a laptop.
pub const EXAMPLE_API_KEY: &str = "change-me";

/// The environment variable that, when set, replaces `secrets.token_keys` (comma-separated).
pub const TOKEN_KEYS_ENV: &str = "SLUICE_TOKEN_KEYS";

/// The token key shipped in `config/sluice.toml` (and the default): fine on a laptop only.
pub const EXAMPLE_TOKEN_KEY: &str = "development-token-key-change-me";

/// A config problem: which file, which key, and why.
#[derive(Debug, thiserror::Error)]
#[error("{file}: {key}: {reason}")]
pub struct ConfigError {
    pub file: String,
    pub key: String,
    pub reason: String,
}

impl ConfigError {
    pub fn new(file: &str, key: &str, reason: String) -> ConfigError {
        ConfigError {
            file: file.to_owned(),
            key: key.to_owned(),
            reason,
        }
    }
}

/// All problems found in one file, reported together.
#[derive(Debug, thiserror::Error)]
#[error("{}", .0.iter().map(|e| e.to_string()).collect::<Vec<_>>().join("\n"))]
pub struct ConfigErrors(pub Vec<ConfigError>);

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// `production` (the default) refuses the example API key and token key shipped in
    /// `config/sluice.toml`; `development` allows them, with a warning, for a laptop.
    #[serde(default)]
    pub profile: Profile,
    #[serde(default)]
    pub http: HttpConfig,
    #[serde(default)]
    pub auth: AuthConfig,
    #[serde(default)]
    pub spool: SpoolConfig,
    /// How long what was sent is kept.
    #[serde(default)]
    pub retention: RetentionConfig,
    #[serde(default)]
    pub limits: LimitsConfig,
    #[serde(default)]
    pub log: LogConfig,
    #[serde(default)]
    pub dns: DnsConfig,
    #[serde(default)]
    pub delivery: DeliveryConfig,
    /// Defaults for every destination site.
    #[serde(default)]
    pub shaping: Shaping,
    /// Overrides, matched by recipient domain or MX host pattern; the first match wins.
    #[serde(default, rename = "rule")]
    pub rules: Vec<Rule>,
    /// Static routes: mail for `domain` goes to `relay` instead of its MX hosts.
    #[serde(default, rename = "route")]
    pub routes: Vec<Route>,
    /// Egress sources: local addresses mail is sent from. None: one source, `default`, from
    /// `delivery.source_ip` (or the address the OS picks) with `delivery.ehlo_name`.
    #[serde(default, rename = "source")]
    pub sources: Vec<SourceConfig>,
    /// Pools of sources that campaigns and messages pick by name (`pool`). A pool named
    /// `default` takes mail without one; without it, the default pool is every source, weight 1.
    #[serde(default, rename = "pool")]
    pub pools: Vec<PoolConfig>,
    /// Warm-up schedules sources may name (besides the built-in `standard`).
    #[serde(default, rename = "warmup")]
    pub warmups: Vec<WarmupConfig>,
    /// Envelope sender (VERP return path).
    #[serde(default)]
    pub bounce: BounceConfig,
    /// The SMTP submission listener: raw messages from applications and relays.
    #[serde(default)]
    pub submission: SubmissionConfig,
    /// Headers Sluice adds to every message (unsubscribe, feedback).
    #[serde(default)]
    pub message: MessageConfig,
    #[serde(default)]
    pub secrets: SecretsConfig,
    /// DKIM keys; every key whose domain matches the From domain signs.
    #[serde(default, rename = "dkim")]
    pub dkim: Vec<DkimEntry>,
    /// Event receivers: batched, signed JSON POSTs from a durable outbox.
    #[serde(default, rename = "webhook")]
    pub webhooks: Vec<WebhookConfig>,
    /// Cluster mode: limits shared with other nodes through Redis Cluster. Unset: a single node
    /// that needs nothing but its disk.
    #[serde(default)]
    pub cluster: Option<ClusterConfig>,
    /// MTA-STS (RFC 8461): recipient domains' published TLS policies, fetched and enforced.
    #[serde(default)]
    pub mta_sts: MtaStsConfig,
    /// DANE (RFC 7672): TLSA records of MX hosts, found through DNSSEC-validated lookups.
    #[serde(default)]
    pub dane: DaneConfig,
    /// TLS reporting (RFC 8460): daily reports of DANE and MTA-STS results to the domains that
    /// ask for them.
    #[serde(default)]
    pub tls_reports: TlsReportsConfig,
    /// Deliverability guards: breakers that pause campaigns whose complaint or hard-bounce
    /// rate burns the sender's reputation.
    #[serde(default)]
    pub guard: GuardConfig,
    /// Authentication preflight of sending domains (DKIM, SPF, DMARC, PTR).
    #[serde(default)]
    pub preflight: PreflightConfig,
    /// Tenants: customers with API keys, From domains, a pool and limits of their own. The keys
    /// of `[auth]` are the operator's (the `default` tenant, which may send as any domain and
    /// use the admin API).
    #[serde(default, rename = "tenant")]
    pub tenants: Vec<TenantConfig>,
}

/// `[[tenant]]`, and the body of `POST /v1/admin/tenants` (without keys: the admin API makes
/// those).
#[derive(Debug, Clone, Deserialize, serde::Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TenantConfig {
    /// 1 to 64 of `a-z 0-9 _ -`: it is a metric label, a Feedback-ID field and a key prefix.
    pub name: String,
    /// Its API keys, in the clear (the config file only; never stored).
    #[serde(default, skip_serializing)]
    pub api_keys: Vec<String>,
    /// Its API keys as `sha256:` and the key's SHA-256 in hex, for a config file that should
    /// not hold the keys themselves (`sluice tenant hash-key` prints it).
    #[serde(default, skip_serializing)]
    pub api_key_hashes: Vec<String>,
    /// The From domains it may send as: `example.com` (that domain), `*.example.com` (any
    /// domain below it), `*` (any). Mail from another domain is refused with 422 naming `from`.
    pub sending_domains: Vec<String>,
    /// The pool its campaigns and messages use when they name none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pool: Option<String>,
    /// API requests it may make (every `/v1` route), e.g. `"50/s"`; over it: 429 with
    /// `Retry-After`. Unset: no limit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate: Option<Rate>,
    /// Recipients it may have accepted per UTC day (campaign recipients, messages, submitted
    /// mail); a request that would pass it is refused whole with 429. Unset: no limit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub daily_quota: Option<u64>,
    /// Recipients it may have queued at once; a request that would pass it is refused whole
    /// with 429. Unset: no limit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_queued: Option<u64>,
    /// Its share of a destination domain against the other tenants with mail of the same
    /// priority there (1 to 1000): weights 3 and 1 get three messages to one, however many
    /// campaigns each has.
    #[serde(default = "defaults::tenant_weight")]
    pub weight: u32,
}

impl TenantConfig {
    /// The operator's tenant: any From domain, no limits.
    pub fn default_tenant() -> TenantConfig {
        TenantConfig {
            name: DEFAULT_TENANT.to_owned(),
            api_keys: Vec::new(),
            api_key_hashes: Vec::new(),
            sending_domains: vec!["*".to_owned()],
            pool: None,
            rate: None,
            daily_quota: None,
            max_queued: None,
            weight: 1,
        }
    }

    /// What is wrong with it, as (key below the tenant, reason) pairs; `config` gives the pools
    /// it may name.
    pub fn problems(&self, config: &Config) -> Vec<(String, String)> {
        let mut out = Vec::new();
        let n = &self.name;
        if !(1..=64).contains(&n.len())
            || !n
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'_' | b'-'))
        {
            out.push((
                "name".to_owned(),
                format!("{n:?}: a tenant name is 1 to 64 of a-z, 0-9, '_' and '-'"),
            ));
        } else if n == DEFAULT_TENANT || n == "other" {
            out.push((
                "name".to_owned(),
                format!("{n:?} is reserved (the operator's keys of [auth] are the default tenant)"),
            ));
        }
        if self.sending_domains.is_empty() {
            out.push((
                "sending_domains".to_owned(),
                "a tenant needs at least one sending domain (\"*\" for any)".to_owned(),
            ));
        }
        for (i, d) in self.sending_domains.iter().enumerate() {
            let bare = d.strip_prefix("*.").unwrap_or(d);
            let ok = d == "*"
                || (!bare.is_empty()
                    && bare.len() <= 253
                    && bare.split('.').all(|l| {
                        (1..=63).contains(&l.len())
                            && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
                    }));
            if !ok {
                out.push((
                    format!("sending_domains[{i}]"),
                    format!("{d:?}: use a domain, *.domain or *"),
                ));
            }
        }
        if let Some(p) = &self.pool
            && !config.has_pool(p)
        {
            out.push(("pool".to_owned(), format!("{p:?} is not a configured pool")));
        }
        if self.daily_quota == Some(0) || self.max_queued == Some(0) {
            out.push((
                if self.daily_quota == Some(0) {
                    "daily_quota"
                } else {
                    "max_queued"
                }
                .to_owned(),
                "must be at least 1 (leave it out for no limit)".to_owned(),
            ));
        }
        if !(1..=1000).contains(&self.weight) {
            out.push(("weight".to_owned(), "must be 1 to 1000".to_owned()));
        }
        for (i, key) in self.api_keys.iter().enumerate() {
            if let Some(reason) = api_key_problem(key) {
                out.push((format!("api_keys[{i}]"), reason.to_owned()));
            }
        }
        for (i, h) in self.api_key_hashes.iter().enumerate() {
            if parse_key_hash(h).is_none() {
                out.push((
                    format!("api_key_hashes[{i}]"),
                    "must be sha256: and 64 hex digits".to_owned(),
                ));
            }
        }
        out
    }
}

/// The tenant of the operator's keys (`[auth] api_keys`) and of everything stored before
/// tenants existed.
pub const DEFAULT_TENANT: &str = "default";

/// SHA-256 of an API key: keys are known by it (a key is long and random, so a fast hash is
/// as good as a slow one).
pub type KeyHash = [u8; 32];

pub fn hash_key(key: &[u8]) -> KeyHash {
    let d = ring::digest::digest(&ring::digest::SHA256, key);
    let mut out = [0u8; 32];
    out.copy_from_slice(d.as_ref());
    out
}

/// `sha256:` and 64 hex digits, as `api_key_hashes` takes them.
pub fn parse_key_hash(s: &str) -> Option<KeyHash> {
    let hex = s.strip_prefix("sha256:")?;
    if hex.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(hex.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

/// What is wrong with an API key, if anything.
fn api_key_problem(key: &str) -> Option<&'static str> {
    if key.len() < 8 {
        Some("an API key must be at least 8 characters")
    } else if !key.bytes().all(|b| b.is_ascii_graphic()) {
        Some("an API key may hold only printable ASCII without spaces")
    } else {
        None
    }
}

/// `[preflight]`: checking that mail from a domain will pass DKIM, SPF and DMARC.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PreflightConfig {
    /// Refuse (422 naming `from`) a campaign whose From domain fails a check.
    #[serde(default)]
    pub enforce: bool,
    /// How long a domain's report is kept before DNS is asked again.
    #[serde(default = "defaults::five_minutes", with = "humantime_serde")]
    pub ttl: Duration,
}

/// `[guard]`: the complaint and hard-bounce breakers, per campaign and per sending domain.
/// Rates are percentages: complaints ÷ delivered, hard bounces (`bad-mailbox`, `bad-domain`) ÷
/// attempted (delivered + bounced). A rate is judged once its denominator reaches the minimum
/// sample; over the threshold the breaker trips.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GuardConfig {
    /// Evaluate the breakers (rates are counted and shown either way).
    #[serde(default = "defaults::yes")]
    pub enabled: bool,
    /// How often rates are evaluated: a breaker trips at most this long after its threshold is
    /// crossed.
    #[serde(default = "defaults::guard_interval", with = "humantime_serde")]
    pub interval: Duration,
    /// Defaults of every campaign (a campaign's `guard` object may override each).
    #[serde(default = "defaults::max_complaint_percent")]
    pub max_complaint_percent: f64,
    #[serde(default = "defaults::min_delivered")]
    pub min_delivered: u64,
    #[serde(default = "defaults::max_hard_bounce_percent")]
    pub max_hard_bounce_percent: f64,
    #[serde(default = "defaults::min_attempted")]
    pub min_attempted: u64,
    /// A rate at or above this share of its threshold shows as `warning`.
    #[serde(default = "defaults::guard_warning")]
    pub warning_ratio: f64,
    /// The sending-domain breaker: the same thresholds over this sliding window (a multiple of
    /// 10 minutes, at most 7 days); when it trips, every campaign from the domain pauses.
    #[serde(default = "defaults::yes")]
    pub domain_breaker: bool,
    #[serde(default = "defaults::guard_window", with = "humantime_serde")]
    pub domain_window: Duration,
}

/// A campaign's own thresholds (`guard` in `POST /v1/campaigns`); unset fields take
/// `[guard]`'s.
#[derive(Debug, Clone, Copy, Default, PartialEq, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct GuardThresholds {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_complaint_percent: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_delivered: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_hard_bounce_percent: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_attempted: Option<u64>,
}

impl GuardThresholds {
    /// What is wrong with these thresholds, as (field, reason): percentages from 0 to 100,
    /// minimum samples of at least 1.
    pub fn problems(&self) -> Vec<(&'static str, String)> {
        let mut out = Vec::new();
        for (key, v) in [
            ("max_complaint_percent", self.max_complaint_percent),
            ("max_hard_bounce_percent", self.max_hard_bounce_percent),
        ] {
            if let Some(v) = v
                && !(0.0..=100.0).contains(&v)
            {
                out.push((key, format!("{v} is not a percentage from 0 to 100")));
            }
        }
        for (key, v) in [
            ("min_delivered", self.min_delivered),
            ("min_attempted", self.min_attempted),
        ] {
            if v == Some(0) {
                out.push((key, "a minimum sample must be at least 1".into()));
            }
        }
        out
    }
}

impl GuardConfig {
    /// The global thresholds, as a campaign's would be given.
    pub fn thresholds(&self) -> GuardThresholds {
        GuardThresholds {
            max_complaint_percent: Some(self.max_complaint_percent),
            min_delivered: Some(self.min_delivered),
            max_hard_bounce_percent: Some(self.max_hard_bounce_percent),
            min_attempted: Some(self.min_attempted),
        }
    }
}

/// `[tls_reports]`: who the reports come from.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsReportsConfig {
    /// Send each day's reports to the `rua` of the domains' `_smtp._tls` TXT records.
    #[serde(default = "defaults::yes")]
    pub enabled: bool,
    /// `organization-name` of the reports; unset: `delivery.ehlo_name`.
    #[serde(default)]
    pub organization: Option<String>,
    /// `contact-info`; unset: `postmaster@` the EHLO name.
    #[serde(default)]
    pub contact: Option<String>,
    /// The From address of mailed reports; unset: `noreply-tlsrpt@` the EHLO name. Sign its
    /// domain with a `[[dkim]]` key (RFC 8460 §5.3 asks for it).
    #[serde(default)]
    pub from: Option<String>,
}

impl TlsReportsConfig {
    /// The organisation, contact and From address, defaults filled from `ehlo_name`.
    pub fn identity(&self, ehlo_name: &str) -> (String, String, String) {
        (
            self.organization
                .clone()
                .unwrap_or_else(|| ehlo_name.to_owned()),
            self.contact
                .clone()
                .unwrap_or_else(|| format!("postmaster@{ehlo_name}")),
            self.from
                .clone()
                .unwrap_or_else(|| format!("noreply-tlsrpt@{ehlo_name}")),
        )
    }
}

/// `[mta_sts]`: policy discovery, fetching and caching.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MtaStsConfig {
    /// Look policies up and apply them (`enforce`: only matching MX hosts with a valid
    /// certificate; `testing`: send anyway and report).
    #[serde(default = "defaults::yes")]
    pub enabled: bool,
    /// The most one policy fetch (connect, TLS, response) may take. A domain seen for the
    /// first time waits for it; later fetches run in the background.
    #[serde(default = "defaults::sts_fetch_timeout", with = "humantime_serde")]
    pub fetch_timeout: Duration,
    /// After a failed fetch, how long before the next try (the domain is treated as having no
    /// policy meanwhile, unless an earlier policy is still cached).
    #[serde(default = "defaults::sts_retry", with = "humantime_serde")]
    pub retry: Duration,
}

/// `[dane]`: DNSSEC validation for DANE.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DaneConfig {
    /// Validate MX, address and TLSA lookups and require TLS checked against usable TLSA
    /// records. Off by default: it needs name servers that pass DNSSEC records through.
    #[serde(default)]
    pub enabled: bool,
    /// DNSKEY records (zone-file lines) trusted as anchors; unset: the IANA root keys. For a zone
    /// other than the root, all its DNSKEYs (with only some trusted, its parent's DS is asked).
    #[serde(default)]
    pub trust_anchor: Option<PathBuf>,
}

/// `[cluster]`: this node's place in a fleet sharing one set of limits through Redis Cluster.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterConfig {
    /// This node's name, unique in the cluster (letters, digits, `-`, `_`; up to 64).
    pub node_id: String,
    /// Seed nodes of the Redis Cluster, `redis://host:port`.
    pub redis: Vec<String>,
    /// Deadline of every Redis call; a call that misses it counts as a failure.
    #[serde(default = "defaults::cluster_timeout", with = "humantime_serde")]
    pub timeout: Duration,
    /// Failed calls in a row that open the circuit breaker (the node is then degraded).
    #[serde(default = "defaults::breaker_failures")]
    pub breaker_failures: u32,
    /// How long the breaker stays open before one call tries again.
    #[serde(default = "defaults::breaker_cooldown", with = "humantime_serde")]
    pub breaker_cooldown: Duration,
    /// Lifetime of a connection lease; renewed every third of it (at least every second). A node
    /// that dies frees its leases after this.
    #[serde(default = "defaults::lease_ttl", with = "humantime_serde")]
    pub lease_ttl: Duration,
    /// How often a node publishes its heartbeat; one not seen for three is gone.
    #[serde(default = "defaults::heartbeat", with = "humantime_serde")]
    pub heartbeat: Duration,
}

impl ClusterConfig {
    /// The settings with their defaults for `node_id` and seed nodes `redis`.
    pub fn new(node_id: &str, redis: Vec<String>) -> ClusterConfig {
        ClusterConfig {
            node_id: node_id.to_owned(),
            redis,
            timeout: defaults::cluster_timeout(),
            breaker_failures: defaults::breaker_failures(),
            breaker_cooldown: defaults::breaker_cooldown(),
            lease_ttl: defaults::lease_ttl(),
            heartbeat: defaults::heartbeat(),
        }
    }
}

#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Profile {
    #[default]
    Production,
    Development,
}

/// One webhook receiver. Events are written to the spool's outbox with the outcome that caused
/// them and POSTed in batches; a receiver that is down delays its events, never delivery.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebhookConfig {
    /// Names the receiver's outbox and its metrics; keep it when changing the URL or the
    /// outbox is started afresh. Default: the URL.
    #[serde(default)]
    pub name: Option<String>,
    /// `http://` or `https://` (certificates checked against the Mozilla roots).
    pub url: String,
    /// Event types to send (`delivered`, `deferred`, `bounced`, `expired`, `delayed`,
    /// `delivery_report`, `complained`, `feedback`, `unsubscribed`, `suppressed`, `cancelled`,
    /// `rejected`, and `campaign_paused` when a breaker pauses a campaign). Default: all.
    #[serde(default)]
    pub events: Option<Vec<String>>,
    /// The signing secret: a Standard Webhooks secret (`whsec_` and the key in base64, as their
    /// libraries generate), or any string of at least 16 characters, whose bytes are the key.
    /// Signs the `webhook-signature` header (and the deprecated `X-Sluice-Signature`).
    pub secret: String,
    /// Secrets being rotated out: each also signs `webhook-signature` (one `v1,` signature per
    /// secret, the current one first), so receivers can move to the new secret at their pace.
    #[serde(default)]
    pub previous_secrets: Vec<String>,
    /// Events per POST; larger batches cost the receiver less per event.
    #[serde(default = "defaults::webhook_batch")]
    pub batch_size: usize,
    /// Time allowed for the receiver's answer; a timeout is a failure and the batch is resent.
    #[serde(default = "defaults::webhook_timeout", with = "humantime_serde")]
    pub timeout: Duration,
    /// First wait after a failed POST; it doubles up to `retry_max`.
    #[serde(default = "defaults::webhook_retry_initial", with = "humantime_serde")]
    pub retry_initial: Duration,
    #[serde(default = "defaults::webhook_retry_max", with = "humantime_serde")]
    pub retry_max: Duration,
    /// A tenant's receiver: it gets that tenant's events only. Unset: the operator's, which
    /// gets every tenant's.
    #[serde(default)]
    pub tenant: Option<String>,
}

/// The HMAC key of a configured secret: a Standard Webhooks secret (`whsec_<base64>`) is its
/// decoded bytes, any other string (16 characters at least) its own bytes.
pub fn webhook_key(secret: &str) -> Result<Vec<u8>, String> {
    use base64::Engine;
    match secret.strip_prefix("whsec_") {
        Some(b64) => match base64::engine::general_purpose::STANDARD.decode(b64) {
            Ok(k) if k.len() >= 16 => Ok(k),
            Ok(_) => Err("a whsec_ secret must hold at least 16 bytes".into()),
            Err(e) => Err(format!("whsec_ must be followed by base64: {e}")),
        },
        None if secret.len() >= 16 => Ok(secret.as_bytes().to_vec()),
        None => Err("must be at least 16 characters (or a whsec_ secret)".into()),
    }
}

/// Every event type a webhook can subscribe to.
pub const WEBHOOK_EVENTS: &[&str] = &[
    "delivered",
    "deferred",
    "bounced",
    "expired",
    "delayed",
    "delivery_report",
    "complained",
    "feedback",
    "unsubscribed",
    "suppressed",
    "cancelled",
    "rejected",
    "campaign_paused",
];

impl WebhookConfig {
    pub fn name(&self) -> &str {
        self.name.as_deref().unwrap_or(&self.url)
    }

    pub fn wants(&self, event: &str) -> bool {
        self.events
            .as_ref()
            .is_none_or(|list| list.iter().any(|e| e == event))
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BounceConfig {
    /// Domain of the VERP return path `<local_part>+<token>@<domain>`, which must route bounces
    /// back to Sluice. Unset: the From address's domain.
    #[serde(default)]
    pub domain: Option<String>,
    /// Local part in front of `+<token>`.
    #[serde(default = "defaults::bounce_local_part")]
    pub local_part: String,
    /// Bounce classification rules (TOML). Unset: the built-in `config/bounce-rules.toml`.
    /// Reloaded on SIGHUP.
    #[serde(default)]
    pub rules: Option<PathBuf>,
    /// Address of the inbound SMTP listener for DSNs and feedback reports (the MX of the bounce
    /// domain must lead here). Unset: no listener; `POST /v1/feedback` still works.
    #[serde(default)]
    pub listen: Option<SocketAddr>,
    /// PEM certificate chain and key for STARTTLS on the listener (offered when set). Senders of
    /// bounces use it opportunistically, like any MTA.
    #[serde(default)]
    pub tls_cert: Option<PathBuf>,
    #[serde(default)]
    pub tls_key: Option<PathBuf>,
    /// Addresses (besides the VERP ones) the listener accepts, for feedback loops (ARF) and
    /// `unsubscribe_mailto`: the Yahoo CFL or Microsoft JMRP address you registered, for example.
    #[serde(default)]
    pub feedback_addresses: Vec<String>,
    /// Where mail to `postmaster@` and `abuse@` of the bounce domain goes (RFC 5321 §4.5.1, RFC
    /// 2142), forwarded through Sluice's own delivery as an attachment. Unset: kept in the spool
    /// for `GET /v1/inbound` (the latest 1,000).
    #[serde(default)]
    pub operator_address: Option<String>,
    /// Largest inbound message; larger ones are refused with 552 (a DSN rarely needs 100 KB).
    #[serde(default = "defaults::bounce_max_message_bytes")]
    pub max_message_bytes: usize,
    /// Inbound connections at once; more get 421.
    #[serde(default = "defaults::bounce_max_connections")]
    pub max_connections: usize,
    /// Inbound connections at once from one client address.
    #[serde(default = "defaults::bounce_max_connections_per_ip")]
    pub max_connections_per_ip: usize,
}

/// The most recipients one raw message may have: its job numbers are reserved in one block.
pub const MAX_MESSAGE_RECIPIENTS: usize = 10_000;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SubmissionConfig {
    /// Address of the submission listener, with STARTTLS when `tls_cert` is set (port 587 in
    /// production). Unset: no listener.
    #[serde(default)]
    pub listen: Option<SocketAddr>,
    /// Address of a listener that speaks TLS from the first byte (RFC 8314, port 465). Needs
    /// `tls_cert`.
    #[serde(default)]
    pub listen_tls: Option<SocketAddr>,
    /// PEM certificate chain and key for STARTTLS and `listen_tls`.
    #[serde(default)]
    pub tls_cert: Option<PathBuf>,
    #[serde(default)]
    pub tls_key: Option<PathBuf>,
    /// Offer AUTH before TLS. For tests on loopback only: credentials would cross in the clear.
    #[serde(default)]
    pub allow_plaintext_auth: bool,
    /// Client networks (CIDR, `10.0.0.0/8` or `127.0.0.1/32`) that may submit without AUTH:
    /// relays and load generators on a private network. Default none.
    #[serde(default)]
    pub trusted_networks: Vec<String>,
    /// Largest message (announced as SIZE and counted).
    #[serde(default = "defaults::submission_max_message_bytes")]
    pub max_message_bytes: usize,
    /// Recipients per message.
    #[serde(default = "defaults::submission_max_recipients")]
    pub max_recipients: usize,
    /// Connections at once; more get 421.
    #[serde(default = "defaults::submission_max_connections")]
    pub max_connections: usize,
    /// Connections at once from one client address.
    #[serde(default = "defaults::submission_max_connections_per_ip")]
    pub max_connections_per_ip: usize,
    /// Failed AUTH attempts a client address may make per `auth_failure_window`; past it, AUTH
    /// is refused (454) until the window has passed.
    #[serde(default = "defaults::submission_max_auth_failures")]
    pub max_auth_failures: u32,
    #[serde(
        default = "defaults::submission_auth_failure_window",
        with = "humantime_serde"
    )]
    pub auth_failure_window: Duration,
}

impl Default for SubmissionConfig {
    fn default() -> Self {
        SubmissionConfig {
            listen: None,
            listen_tls: None,
            tls_cert: None,
            tls_key: None,
            allow_plaintext_auth: false,
            trusted_networks: Vec::new(),
            max_message_bytes: defaults::submission_max_message_bytes(),
            max_recipients: defaults::submission_max_recipients(),
            max_connections: defaults::submission_max_connections(),
            max_connections_per_ip: defaults::submission_max_connections_per_ip(),
            max_auth_failures: defaults::submission_max_auth_failures(),
            auth_failure_window: defaults::submission_auth_failure_window(),
        }
    }
}

impl SubmissionConfig {
    /// `trusted_networks` parsed; the errors name the entry.
    pub fn networks(&self) -> Result<Vec<ipnet::IpNet>, String> {
        self.trusted_networks
            .iter()
            .map(|n| {
                n.parse::<ipnet::IpNet>()
                    .or_else(|_| n.parse::<std::net::IpAddr>().map(ipnet::IpNet::from))
                    .map_err(|_| format!("{n:?} is not a network like 10.0.0.0/8 or an address"))
            })
            .collect()
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MessageConfig {
    /// One-click unsubscribe URL prefix (RFC 8058); the token is appended. Mailbox providers
    /// require https in production; it must reach Sluice's `/u/` route.
    #[serde(default = "defaults::unsubscribe_url")]
    pub unsubscribe_url: String,
    /// Optional address added to List-Unsubscribe as `mailto:<local>+<token>@<domain>`, for
    /// clients without one-click support.
    #[serde(default)]
    pub unsubscribe_mailto: Option<String>,
    /// Last field of `Feedback-ID` (`campaign:tag:kind:<this>`), the sender id Gmail's
    /// feedback loop reports by.
    #[serde(default = "defaults::feedback_sender_id")]
    pub feedback_sender_id: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SecretsConfig {
    /// HMAC-SHA256 keys for VERP, unsubscribe and trace tokens. The first signs; all verify, so
    /// a key is rotated by putting the new one first and dropping the old one once mail signed
    /// with it can no longer come back. Replaced by `SLUICE_TOKEN_KEYS` when that is set.
    #[serde(default = "defaults::token_keys")]
    pub token_keys: Vec<String>,
}

/// One DKIM key.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DkimEntry {
    /// The `d=` domain; signs mail whose From domain is this one or below it.
    pub domain: String,
    pub selector: String,
    pub algorithm: DkimAlgorithm,
    /// PEM: PKCS#8 or PKCS#1 for RSA, PKCS#8 for ed25519. Relative to the working directory.
    pub key_file: PathBuf,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum DkimAlgorithm {
    #[serde(rename = "rsa-sha256")]
    RsaSha256,
    #[serde(rename = "ed25519-sha256")]
    Ed25519Sha256,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DnsConfig {
    /// `ip:port` of the servers to ask; empty means the system resolver (`/etc/resolv.conf`).
    #[serde(default)]
    pub nameservers: Vec<SocketAddr>,
    /// Per-query timeout; a timeout defers the recipients, it never bounces them.
    #[serde(default = "defaults::dns_timeout", with = "humantime_serde")]
    pub timeout: Duration,
    /// An NXDOMAIN answer bounces a domain's recipients only when a second lookup this long
    /// after the first (bypassing the cache) says the same; meanwhile they are deferred.
    #[serde(default = "defaults::nxdomain_confirm", with = "humantime_serde")]
    pub confirm_nxdomain_after: Duration,
    /// Domains that always exist (e.g. `gmail.com`), looked up every `canary_interval`: while
    /// one gets NXDOMAIN or no answer, the resolver is taken to be at fault and no NXDOMAIN
    /// bounces anyone. Empty: no canary (the other checks still apply).
    #[serde(default)]
    pub canary: Vec<String>,
    #[serde(default = "defaults::canary_interval", with = "humantime_serde")]
    pub canary_interval: Duration,
    /// The window over which NXDOMAIN answers are counted for the resolver-fault check: when
    /// at least 10 distinct domains got NXDOMAIN in it and they are half or more of the distinct
    /// domains looked up, the resolver is at fault.
    #[serde(default = "defaults::canary_interval", with = "humantime_serde")]
    pub fault_window: Duration,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeliveryConfig {
    /// Run the delivery engine. Off, Sluice only accepts and queues (useful for ingest-only
    /// nodes and tests).
    #[serde(default = "defaults::yes")]
    pub enabled: bool,
    /// Name given in EHLO; should resolve to the sending IP and match its PTR record.
    #[serde(default = "defaults::ehlo_name")]
    pub ehlo_name: String,
    /// Destination port for MX hosts (25 in production; tests point it elsewhere).
    #[serde(default = "defaults::smtp_port")]
    pub smtp_port: u16,
    /// Local address outgoing connections are bound to; unset lets the OS choose.
    #[serde(default)]
    pub source_ip: Option<std::net::IpAddr>,
    /// First retry delay after a temporary failure; doubles per attempt with ±20% jitter.
    #[serde(default = "defaults::retry_initial", with = "humantime_serde")]
    pub retry_initial: Duration,
    /// Longest delay between two attempts.
    #[serde(default = "defaults::retry_max", with = "humantime_serde")]
    pub retry_max: Duration,
    /// A recipient still undelivered this long after acceptance expires (final).
    #[serde(default = "defaults::max_age", with = "humantime_serde")]
    pub max_age: Duration,
    /// An idle pooled connection is closed after this long.
    #[serde(default = "defaults::idle_timeout", with = "humantime_serde")]
    pub idle_timeout: Duration,
    /// On SIGTERM, how long SMTP transactions under way may take to finish. Past it they are
    /// abandoned (their recipients stay queued and are sent again after the restart, which may
    /// deliver a message twice); the whole stop takes at most this plus 10 s.
    #[serde(default = "defaults::shutdown_timeout", with = "humantime_serde")]
    pub shutdown_timeout: Duration,
    /// After a site's connections fail, wait this long before trying it again; doubles with
    /// each further failure up to `site_backoff_max`.
    #[serde(default = "defaults::site_backoff", with = "humantime_serde")]
    pub site_backoff: Duration,
    #[serde(default = "defaults::site_backoff_max", with = "humantime_serde")]
    pub site_backoff_max: Duration,
    /// TCP connect timeout.
    #[serde(default = "defaults::connect_timeout", with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// Waiting for the greeting (RFC 5321: 5 min).
    #[serde(default = "defaults::five_minutes", with = "humantime_serde")]
    pub greeting_timeout: Duration,
    /// Waiting for replies to EHLO, MAIL, RCPT (RFC 5321: 5 min).
    #[serde(default = "defaults::five_minutes", with = "humantime_serde")]
    pub command_timeout: Duration,
    /// Waiting for the 354 after DATA (RFC 5321: 2 min).
    #[serde(default = "defaults::data_init_timeout", with = "humantime_serde")]
    pub data_init_timeout: Duration,
    /// Sending each 64 KiB of the message (RFC 5321: 3 min per block).
    #[serde(default = "defaults::data_block_timeout", with = "humantime_serde")]
    pub data_block_timeout: Duration,
    /// Waiting for the reply to the final dot (RFC 5321: 10 min).
    #[serde(default = "defaults::data_final_timeout", with = "humantime_serde")]
    pub data_final_timeout: Duration,
    /// Send the content with BDAT (RFC 3030 CHUNKING) instead of DATA when the server offers it
    /// and the message is 8-bit or at least `bdat_min_bytes` long.
    #[serde(default = "defaults::yes")]
    pub bdat: bool,
    #[serde(default = "defaults::bdat_min_bytes")]
    pub bdat_min_bytes: usize,
    /// The share of a domain's sending that lower priorities get while a higher one has mail
    /// due (0 to 0.5; 0 serves priorities strictly in order, which can starve the lower ones).
    #[serde(default = "defaults::lower_priority_share")]
    pub lower_priority_share: f64,
    /// The shaping rules file (provider replies → suspend / throttle, AIMD); unset: the
    /// built-in `config/shaping.toml`. Reloaded on SIGHUP.
    #[serde(default)]
    pub shaping_rules: Option<PathBuf>,
    /// After this many failed connection rounds in a row, a site is *dead*: its mail waits
    /// `dead_site_period` without attempts (none counted, none logged), then one round probes
    /// it. 0: never.
    #[serde(default = "defaults::dead_site_after")]
    pub dead_site_after: u32,
    #[serde(default = "defaults::dead_site_period", with = "humantime_serde")]
    pub dead_site_period: Duration,
    /// CA certificates (PEM) trusted besides Mozilla's roots wherever a certificate is
    /// verified: MTA-STS policy hosts, MX hosts under an enforced policy or `tls = "verify"`.
    /// For a private PKI or tests.
    #[serde(default)]
    pub tls_ca_file: Option<PathBuf>,
}

/// Traffic shaping for one site (a set of MX hosts).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Shaping {
    /// Simultaneous connections to the site.
    #[serde(default = "defaults::max_connections")]
    pub max_connections: u32,
    /// Messages sent over one connection before it is closed and a new one opened.
    #[serde(default = "defaults::max_messages_per_connection")]
    pub max_messages_per_connection: u32,
    /// Recipients of one message sent in one transaction, for campaigns with
    /// `personalised: false` (every recipient gets the same message); personalised mail always
    /// goes one recipient per transaction.
    #[serde(default = "defaults::max_recipients_per_message")]
    pub max_recipients_per_message: u32,
    /// Messages per period, e.g. "200/s", "5000/m"; unset: unlimited.
    #[serde(default)]
    pub message_rate: Option<Rate>,
    /// New connections per period; unset: unlimited.
    #[serde(default)]
    pub connection_rate: Option<Rate>,
    /// STARTTLS policy: opportunistic, required, verify or disabled.
    #[serde(default)]
    pub tls: crate::outbound::smtp::client::TlsMode,
    /// Whom the limits above count: `source` (the default; each egress source has them, as
    /// providers count per sending address) or `site` (all sources together).
    #[serde(default)]
    pub per: Per,
    /// In cluster mode, whether the limits above hold for the whole cluster (`cluster`, the
    /// default) or for each node (`node`). Without `[cluster]` they are the node's anyway.
    #[serde(default)]
    pub scope: Scope,
    /// Apply recipient domains' MTA-STS policies (where `[mta_sts]` is on); a rule may turn it
    /// off for the sites it matches.
    #[serde(default = "defaults::yes")]
    pub mta_sts: bool,
    /// Apply MX hosts' DANE TLSA records (where `[dane]` is on); a rule may turn it off.
    #[serde(default = "defaults::yes")]
    pub dane: bool,
}

/// Where a site's limits hold in cluster mode.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Scope {
    #[default]
    Cluster,
    Node,
}

/// What a site's limits count.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Per {
    #[default]
    Source,
    Site,
}

/// An override of [`Shaping`] for the sites it matches.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rule {
    /// Names the sites this rule shapes in metrics and reports (a provider group such as
    /// `google`); the pattern is used when unset.
    #[serde(default)]
    pub name: Option<String>,
    /// `example.com` matches that domain or MX host exactly; `*.example.com` any name below it.
    #[serde(rename = "match")]
    pub pattern: String,
    pub max_connections: Option<u32>,
    pub max_messages_per_connection: Option<u32>,
    pub max_recipients_per_message: Option<u32>,
    pub message_rate: Option<Rate>,
    pub connection_rate: Option<Rate>,
    pub tls: Option<crate::outbound::smtp::client::TlsMode>,
    pub per: Option<Per>,
    pub scope: Option<Scope>,
    pub mta_sts: Option<bool>,
    pub dane: Option<bool>,
}

impl Rule {
    pub fn matches(&self, name: &str) -> bool {
        name_matches(&self.pattern, name)
    }

    /// `base` with this rule's settings laid over it.
    pub fn apply(&self, base: &Shaping) -> Shaping {
        Shaping {
            max_connections: self.max_connections.unwrap_or(base.max_connections),
            max_messages_per_connection: self
                .max_messages_per_connection
                .unwrap_or(base.max_messages_per_connection),
            max_recipients_per_message: self
                .max_recipients_per_message
                .unwrap_or(base.max_recipients_per_message),
            message_rate: self.message_rate.or(base.message_rate),
            connection_rate: self.connection_rate.or(base.connection_rate),
            tls: self.tls.unwrap_or(base.tls),
            per: self.per.unwrap_or(base.per),
            scope: self.scope.unwrap_or(base.scope),
            mta_sts: self.mta_sts.unwrap_or(base.mta_sts),
            dane: self.dane.unwrap_or(base.dane),
        }
    }
}

/// Midnight UTC of `YYYY-MM-DD`, in ms since the epoch.
pub fn parse_day(s: &str) -> Result<u64, String> {
    let bad = || format!("{s:?} is not a date like \"2026-12-01\"");
    let mut parts = s.splitn(3, '-');
    let mut next = |len: usize| {
        parts
            .next()
            .filter(|p| p.len() == len && p.bytes().all(|b| b.is_ascii_digit()))
            .and_then(|p| p.parse::<i32>().ok())
    };
    let (Some(y), Some(m), Some(d)) = (next(4), next(2), next(2)) else {
        return Err(bad());
    };
    let month = u8::try_from(m)
        .ok()
        .and_then(|m| time::Month::try_from(m).ok())
        .ok_or_else(bad)?;
    let date = time::Date::from_calendar_date(y, month, u8::try_from(d).map_err(|_| bad())?)
        .map_err(|e| format!("{s:?} is not a date: {e}"))?;
    let secs = date.midnight().assume_utc().unix_timestamp();
    u64::try_from(secs)
        .map(|s| s * 1000)
        .map_err(|_| format!("{s:?} is before 1970"))
}

/// Whether host or domain `name` matches `pattern`: `example.com` that name exactly (any case),
/// `*.example.com` any name below it, `*` any name (routes only: rules and providers refuse it).
pub fn name_matches(pattern: &str, name: &str) -> bool {
    if pattern == "*" {
        return true;
    }
    let p = pattern.to_ascii_lowercase();
    let name = name.to_ascii_lowercase();
    match p.strip_prefix("*.") {
        Some(suffix) => {
            name.len() > suffix.len()
                && name.ends_with(suffix)
                && name[..name.len() - suffix.len()].ends_with('.')
        }
        None => p == name,
    }
}

/// One egress source: a local address to send from, and the EHLO name that goes with it (in
/// production, the name the address's PTR record gives).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SourceConfig {
    /// Names it in pools, reports and metrics.
    pub name: String,
    /// The local IP address connections are bound to; it must be an address of this host.
    pub address: std::net::IpAddr,
    /// EHLO name; default `delivery.ehlo_name`.
    #[serde(default)]
    pub ehlo_name: Option<String>,
    /// A warm-up schedule (`[[warmup]]` name, or the built-in `standard`) capping what the
    /// source sends per provider group while it is new.
    #[serde(default)]
    pub warmup: Option<String>,
    /// Day 1 of the warm-up, `YYYY-MM-DD` (UTC); required with `warmup`.
    #[serde(default)]
    pub warmup_start: Option<String>,
}

/// A warm-up schedule: per day since a source's start, caps on what it sends to each provider
/// group (a `[[provider]]` of the shaping rules, else the site) per day and per hour.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WarmupConfig {
    pub name: String,
    /// Messages per provider group per day, for day 1, 2, ...; after the last day, no cap.
    #[serde(default)]
    pub per_day: Vec<u32>,
    /// Messages per provider group per hour, day by day (as long as `per_day`); unset: the
    /// day's cap spread over `spread_hours`.
    #[serde(default)]
    pub per_hour: Vec<u32>,
    /// Instead of `per_day`: from `from` a day, times `factor` each day, up to `to`.
    #[serde(default)]
    pub ramp: Option<Ramp>,
    /// With no `per_hour`: the hourly cap is the daily one divided by this (0: no hourly cap).
    #[serde(default = "defaults::spread_hours")]
    pub spread_hours: u32,
    /// The length of an "hour" and a "day" the caps count over (for tests; 1h and 24h).
    #[serde(default = "defaults::warmup_hour", with = "humantime_serde")]
    pub hour: Duration,
    #[serde(default = "defaults::warmup_day", with = "humantime_serde")]
    pub day: Duration,
}

#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Ramp {
    pub from: u32,
    pub to: u32,
    pub factor: f64,
}

/// The schedule shipped as `standard`: 50 a day, ×1.4 a day, to 500,000 (about 30 days).
pub const STANDARD_WARMUP: &str = "standard";

/// A warm-up schedule as delivery uses it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WarmupSchedule {
    pub name: String,
    /// (per day, per hour) caps for day 1, 2, ...
    pub days: Vec<(u64, Option<u64>)>,
    pub hour_ms: u64,
    pub day_ms: u64,
}

impl WarmupConfig {
    fn standard() -> WarmupConfig {
        WarmupConfig {
            name: STANDARD_WARMUP.to_owned(),
            per_day: Vec::new(),
            per_hour: Vec::new(),
            ramp: Some(Ramp {
                from: 50,
                to: 500_000,
                factor: 1.4,
            }),
            spread_hours: defaults::spread_hours(),
            hour: defaults::warmup_hour(),
            day: defaults::warmup_day(),
        }
    }

    fn schedule(&self) -> WarmupSchedule {
        let per_day: Vec<u64> = match self.ramp {
            Some(r) if r.factor > 1.0 && r.from > 0 => {
                let mut days = Vec::new();
                let mut n = f64::from(r.from);
                while n < f64::from(r.to) && days.len() < 366 {
                    days.push(n.round() as u64);
                    n *= r.factor;
                }
                days.push(u64::from(r.to));
                days
            }
            _ => self.per_day.iter().map(|&n| u64::from(n)).collect(),
        };
        let days = per_day
            .iter()
            .enumerate()
            .map(|(i, &d)| {
                let hour = match self.per_hour.get(i) {
                    Some(&h) => Some(u64::from(h)),
                    None if self.spread_hours > 0 => {
                        Some(d.div_ceil(u64::from(self.spread_hours)).max(1))
                    }
                    None => None,
                };
                (d, hour)
            })
            .collect();
        WarmupSchedule {
            name: self.name.clone(),
            days,
            hour_ms: self.hour.as_millis().max(1) as u64,
            day_ms: self.day.as_millis().max(1) as u64,
        }
    }
}

/// A named set of sources sharing traffic by weight.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PoolConfig {
    pub name: String,
    pub sources: Vec<PoolMember>,
    /// Mail over its sources' warm-up caps goes out through this pool instead of waiting.
    #[serde(default)]
    pub overflow: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PoolMember {
    pub source: String,
    /// Its share of the pool's traffic against the other members' weights (default 1).
    #[serde(default = "defaults::pool_weight")]
    pub weight: u32,
}

/// The name of the pool mail without a `pool` goes through, and of the implicit source.
pub const DEFAULT_POOL: &str = "default";

/// A source as delivery uses it: the config's, or the implicit one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Source {
    pub name: String,
    pub address: Option<std::net::IpAddr>,
    pub ehlo_name: String,
    /// Its warm-up schedule and day 1 (ms since the epoch), while it has one.
    pub warmup: Option<(std::sync::Arc<WarmupSchedule>, u64)>,
}

/// A pool as delivery uses it: members as indexes into [`Config::egress_sources`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pool {
    pub name: String,
    pub members: Vec<(usize, u32)>,
    /// The pool (index) that takes mail over the members' warm-up caps.
    pub overflow: Option<usize>,
}

impl Config {
    /// The sources delivery sends from, in config order (the implicit `default` one when none
    /// is configured).
    pub fn egress_sources(&self) -> Vec<Source> {
        if self.sources.is_empty() {
            return vec![Source {
                name: DEFAULT_POOL.to_owned(),
                address: self.delivery.source_ip,
                ehlo_name: self.delivery.ehlo_name.clone(),
                warmup: None,
            }];
        }
        let schedules = self.warmup_schedules();
        self.sources
            .iter()
            .map(|s| Source {
                name: s.name.clone(),
                address: Some(s.address),
                ehlo_name: s
                    .ehlo_name
                    .clone()
                    .unwrap_or_else(|| self.delivery.ehlo_name.clone()),
                warmup: s.warmup.as_ref().and_then(|w| {
                    let schedule = schedules.iter().find(|x| &x.name == w)?;
                    let start = parse_day(s.warmup_start.as_deref()?).ok()?;
                    Some((std::sync::Arc::new(schedule.clone()), start))
                }),
            })
            .collect()
    }

    /// The warm-up schedules: the configured ones and `standard` (unless one is so named).
    pub fn warmup_schedules(&self) -> Vec<WarmupSchedule> {
        let mut v: Vec<WarmupSchedule> = self.warmups.iter().map(|w| w.schedule()).collect();
        if !v.iter().any(|w| w.name == STANDARD_WARMUP) {
            v.push(WarmupConfig::standard().schedule());
        }
        v
    }

    /// The pools, with the default one first (the configured `default`, else every source with
    /// weight 1). Members naming unknown sources are left out (validation refuses them).
    pub fn egress_pools(&self) -> Vec<Pool> {
        let sources = self.egress_sources();
        let index = |name: &str| sources.iter().position(|s| s.name == name);
        let mut pools: Vec<Pool> = self
            .pools
            .iter()
            .map(|p| Pool {
                name: p.name.clone(),
                members: p
                    .sources
                    .iter()
                    .filter_map(|m| Some((index(&m.source)?, m.weight)))
                    .collect(),
                overflow: None,
            })
            .collect();
        match pools.iter().position(|p| p.name == DEFAULT_POOL) {
            Some(i) => {
                let d = pools.remove(i);
                pools.insert(0, d);
            }
            None => pools.insert(
                0,
                Pool {
                    name: DEFAULT_POOL.to_owned(),
                    members: (0..sources.len()).map(|i| (i, 1)).collect(),
                    overflow: None,
                },
            ),
        }
        let overflow: Vec<Option<usize>> = pools
            .iter()
            .map(|p| {
                let name = self
                    .pools
                    .iter()
                    .find(|c| c.name == p.name)?
                    .overflow
                    .as_ref()?;
                pools
                    .iter()
                    .position(|q| &q.name == name && q.name != p.name)
            })
            .collect();
        for (p, o) in pools.iter_mut().zip(overflow) {
            p.overflow = o;
        }
        pools
    }

    /// Whether mail may name pool `name`.
    pub fn has_pool(&self, name: &str) -> bool {
        name == DEFAULT_POOL || self.pools.iter().any(|p| p.name == name)
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Route {
    /// Recipient domain (exact, `*.example.com`, or `*` for every domain: a development
    /// setting the production profile refuses).
    pub domain: String,
    /// `host:port` to deliver to instead of the domain's MX hosts.
    pub relay: String,
}

/// A rate such as `200/s`: `count` events per `per`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rate {
    pub count: u32,
    pub per: Duration,
}

impl serde::Serialize for Rate {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// As it is written: `600/m`. A period that is not one of the units is given in seconds.
impl std::fmt::Display for Rate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let unit = match self.per.as_secs() {
            1 => "s",
            60 => "m",
            3600 => "h",
            86400 => "d",
            _ => return write!(f, "{}/{}s", self.count, self.per.as_secs_f64()),
        };
        write!(f, "{}/{unit}", self.count)
    }
}

impl<'de> Deserialize<'de> for Rate {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Rate, D::Error> {
        let s = String::deserialize(d)?;
        Rate::parse(&s).map_err(serde::de::Error::custom)
    }
}

impl Rate {
    /// Events per second.
    pub fn per_second(self) -> f64 {
        f64::from(self.count) / self.per.as_secs_f64()
    }

    pub fn parse(s: &str) -> Result<Rate, String> {
        let err = || format!("{s:?} is not a rate like \"200/s\", \"5000/m\" or \"100000/h\"");
        let (n, unit) = s.trim().split_once('/').ok_or_else(err)?;
        let count: u32 = n.trim().parse().map_err(|_| err())?;
        let per = match unit.trim() {
            "s" => Duration::from_secs(1),
            "m" => Duration::from_secs(60),
            "h" => Duration::from_secs(3600),
            "d" => Duration::from_secs(86400),
            _ => return Err(err()),
        };
        if count == 0 {
            return Err(format!("{s:?}: the count must be at least 1"));
        }
        Ok(Rate { count, per })
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpConfig {
    /// Address of the HTTP API.
    #[serde(default = "defaults::http_listen")]
    pub listen: SocketAddr,
    /// Requests served at once; past this the API sheds load with 503 + Retry-After rather than
    /// queueing without bound. Uploads hold a slot for their whole duration.
    #[serde(default = "defaults::max_concurrent_requests")]
    pub max_concurrent_requests: usize,
    /// How long a client may take between two pieces of a request body before it is cut off.
    #[serde(default = "defaults::body_read_timeout", with = "humantime_serde")]
    pub body_read_timeout: Duration,
    /// PEM certificate chain (leaf first) for HTTPS on `listen`; with `tls_key`. Unset: plain
    /// HTTP, for a loopback address or behind a TLS-terminating proxy.
    #[serde(default)]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of `tls_cert`.
    #[serde(default)]
    pub tls_key: Option<PathBuf>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthConfig {
    /// Bearer tokens accepted on `/v1`. Replaced by `SLUICE_API_KEYS` when that is set.
    #[serde(default = "defaults::api_keys")]
    pub api_keys: Vec<String>,
    /// API requests each key may make (every `/v1` route), e.g. `"100/s"`: the operator's keys
    /// and every tenant's, each on its own (a tenant's `rate` holds for all its keys together).
    /// Over it: 429 `rate_limited` with `Retry-After`. Unset: no limit.
    #[serde(default)]
    pub rate_limit: Option<Rate>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SpoolConfig {
    /// Directory of the RocksDB spool; relative paths are relative to the working directory.
    #[serde(default = "defaults::spool_path")]
    pub path: PathBuf,
    /// Jobs per write batch while streaming an upload. Larger batches write faster and hold more
    /// memory per open upload.
    #[serde(default = "defaults::ingest_batch")]
    pub ingest_batch: usize,
    /// How long an `Idempotency-Key` is remembered.
    #[serde(default = "defaults::idempotency_ttl", with = "humantime_serde")]
    pub idempotency_ttl: Duration,
    /// Free space, in bytes, the spool's filesystem must keep: below it ingest answers 507 and
    /// accepts nothing, while delivery goes on (and frees space). RocksDB needs this headroom to
    /// flush memtables and compact. 0 turns the guard off.
    #[serde(default = "defaults::min_free_bytes")]
    pub min_free_bytes: u64,
    /// How long the spool writer waits for more synced writes before syncing, when the last
    /// sync served several (concurrent SMTP sessions or API clients): fewer syncs, each acknowledged
    /// that much later. A lone writer never waits. `"0s"` syncs at once.
    #[serde(default = "defaults::commit_window", with = "humantime_serde")]
    pub commit_window: Duration,
}

/// What happens to the data of finished campaigns. A campaign is finished when none of its
/// recipients is queued and no upload to it is open; the clocks below start then.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetentionConfig {
    /// How long the compact record of each final recipient (about 100 bytes: state, address,
    /// attempts, last reply) is kept, so that DSNs, complaints and unsubscribes that arrive
    /// later still find their recipient. Afterwards they are reported as unmapped.
    #[serde(default = "defaults::job_tombstones", with = "humantime_serde")]
    pub job_tombstones: Duration,
    /// How long the campaign record keeps its templates and attachments. Afterwards it keeps
    /// its counts and metadata only, and takes no more recipients.
    #[serde(default = "defaults::campaign_retention", with = "humantime_serde")]
    pub campaigns: Duration,
    /// How often finished campaigns are looked for and their expired data deleted.
    #[serde(default = "defaults::retention_interval", with = "humantime_serde")]
    pub interval: Duration,
    /// How long one bucket of a transactional stream takes new messages (buckets start at
    /// multiples of this since the epoch, so `1d` is a UTC day). A bucket can finish only after
    /// its period, so a message's tombstone lasts between `job_tombstones` and `job_tombstones`
    /// plus this; each bucket is one small campaign record.
    #[serde(default = "defaults::message_buckets", with = "humantime_serde")]
    pub message_buckets: Duration,
}

impl RetentionConfig {
    /// The period of the message bucket that is open at `now_ms`.
    pub fn bucket_period(&self, now_ms: u64) -> u64 {
        now_ms / (self.message_buckets.as_millis() as u64).max(1)
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsConfig {
    /// Largest JSON request body (`POST /v1/campaigns`, `/v1/messages`), in bytes.
    #[serde(default = "defaults::max_request_bytes")]
    pub max_request_bytes: usize,
    /// Recipients in one JSON request; larger lists go through the NDJSON endpoint.
    #[serde(default = "defaults::max_recipients_per_request")]
    pub max_recipients_per_request: usize,
    /// Recipients in one NDJSON upload. Past it the whole upload is refused (413) and rolled back.
    #[serde(default = "defaults::max_recipients_per_upload")]
    pub max_recipients_per_upload: usize,
    /// Longest NDJSON line, in bytes; a longer line is rejected on its own.
    #[serde(default = "defaults::max_line_bytes")]
    pub max_line_bytes: usize,
    /// Largest per-recipient `vars` object, in bytes of JSON.
    #[serde(default = "defaults::max_vars_bytes")]
    pub max_vars_bytes: usize,
    /// Largest template part (subject, text or HTML), in bytes.
    #[serde(default = "defaults::max_template_bytes")]
    pub max_template_bytes: usize,
    /// Most entries in the 202's `rejected` list; `rejected_count` always has the full count.
    #[serde(default = "defaults::max_rejected_reported")]
    pub max_rejected_reported: usize,
    /// Attachments of one campaign, decoded, all together, in bytes. Stored once, but sent with
    /// every message: keep it small.
    #[serde(default = "defaults::max_attachment_bytes")]
    pub max_attachment_bytes: usize,
    /// Attachments per campaign.
    #[serde(default = "defaults::max_attachments")]
    pub max_attachments: usize,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogConfig {
    /// A `tracing` filter (`info`, `sluice=debug,warn`); `RUST_LOG` wins when set.
    #[serde(default = "defaults::log_level")]
    pub level: String,
    /// `text` for people, `json` for log shippers.
    #[serde(default)]
    pub format: LogFormat,
    /// One JSON line per delivery attempt (PowerMTA-style accounting record).
    #[serde(default = "defaults::delivery_log")]
    pub delivery_log: PathBuf,
    /// Rotate the delivery log once it reaches this many bytes; 0: never by size.
    #[serde(default = "defaults::delivery_log_max_bytes")]
    pub delivery_log_max_bytes: u64,
    /// Rotate the delivery log when this period turns over (UTC, counted from the epoch, so
    /// "1d" rotates at midnight UTC and "1h" on the hour). Unset: never by time.
    #[serde(default, with = "humantime_serde")]
    pub delivery_log_rotate_every: Option<Duration>,
    /// Rotated files to keep (`delivery.jsonl.<UTC time>`); older ones are deleted.
    #[serde(default = "defaults::delivery_log_keep")]
    pub delivery_log_keep: usize,
}

#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

mod defaults {
    use super::*;
    pub fn webhook_batch() -> usize {
        100
    }
    pub fn webhook_timeout() -> Duration {
        Duration::from_secs(10)
    }
    pub fn webhook_retry_initial() -> Duration {
        Duration::from_secs(1)
    }
    pub fn webhook_retry_max() -> Duration {
        Duration::from_secs(300)
    }
    pub fn http_listen() -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], 8025))
    }
    pub fn max_concurrent_requests() -> usize {
        256
    }
    pub fn body_read_timeout() -> Duration {
        Duration::from_secs(60)
    }
    pub fn api_keys() -> Vec<String> {
        Vec::new()
    }
    pub fn spool_path() -> PathBuf {
        PathBuf::from("var/spool")
    }
    pub fn ingest_batch() -> usize {
        4096
    }
    pub fn min_free_bytes() -> u64 {
        256 << 20
    }
    pub fn commit_window() -> Duration {
        Duration::from_micros(200)
    }
    pub fn idempotency_ttl() -> Duration {
        Duration::from_secs(24 * 3600)
    }
    pub fn job_tombstones() -> Duration {
        Duration::from_secs(30 * 86400)
    }
    pub fn campaign_retention() -> Duration {
        Duration::from_secs(90 * 86400)
    }
    pub fn retention_interval() -> Duration {
        Duration::from_secs(60)
    }
    pub fn message_buckets() -> Duration {
        Duration::from_secs(86400)
    }
    pub fn max_request_bytes() -> usize {
        32 << 20
    }
    pub fn max_recipients_per_request() -> usize {
        100_000
    }
    pub fn max_recipients_per_upload() -> usize {
        50_000_000
    }
    pub fn max_line_bytes() -> usize {
        64 << 10
    }
    pub fn max_vars_bytes() -> usize {
        16 << 10
    }
    pub fn max_template_bytes() -> usize {
        1 << 20
    }
    pub fn max_rejected_reported() -> usize {
        1000
    }
    pub fn log_level() -> String {
        "info".to_owned()
    }
    pub fn delivery_log() -> PathBuf {
        PathBuf::from("var/log/delivery.jsonl")
    }
    pub fn delivery_log_max_bytes() -> u64 {
        1 << 30
    }
    pub fn delivery_log_keep() -> usize {
        30
    }
    pub fn dns_timeout() -> Duration {
        Duration::from_secs(5)
    }
    pub fn nxdomain_confirm() -> Duration {
        Duration::from_secs(60)
    }
    pub fn canary_interval() -> Duration {
        Duration::from_secs(60)
    }
    pub fn guard_interval() -> Duration {
        Duration::from_secs(5)
    }
    pub fn max_complaint_percent() -> f64 {
        0.3
    }
    pub fn min_delivered() -> u64 {
        1000
    }
    pub fn max_hard_bounce_percent() -> f64 {
        5.0
    }
    pub fn min_attempted() -> u64 {
        500
    }
    pub fn guard_warning() -> f64 {
        0.5
    }
    pub fn guard_window() -> Duration {
        Duration::from_secs(86_400)
    }
    pub fn yes() -> bool {
        true
    }
    pub fn ehlo_name() -> String {
        "localhost.localdomain".to_owned()
    }
    pub fn smtp_port() -> u16 {
        25
    }
    pub fn retry_initial() -> Duration {
        Duration::from_secs(300)
    }
    pub fn retry_max() -> Duration {
        Duration::from_secs(4 * 3600)
    }
    pub fn pool_weight() -> u32 {
        1
    }
    pub fn tenant_weight() -> u32 {
        1
    }
    pub fn cluster_timeout() -> Duration {
        Duration::from_millis(250)
    }
    pub fn breaker_failures() -> u32 {
        3
    }
    pub fn breaker_cooldown() -> Duration {
        Duration::from_secs(2)
    }
    pub fn lease_ttl() -> Duration {
        Duration::from_secs(10)
    }
    pub fn heartbeat() -> Duration {
        Duration::from_secs(1)
    }
    pub fn dead_site_after() -> u32 {
        5
    }
    pub fn dead_site_period() -> Duration {
        Duration::from_secs(600)
    }
    pub fn warmup_hour() -> Duration {
        Duration::from_secs(3600)
    }
    pub fn warmup_day() -> Duration {
        Duration::from_secs(86_400)
    }
    pub fn spread_hours() -> u32 {
        12
    }
    pub fn lower_priority_share() -> f64 {
        0.1
    }
    pub fn max_age() -> Duration {
        Duration::from_secs(3 * 86400)
    }
    pub fn idle_timeout() -> Duration {
        Duration::from_secs(30)
    }
    pub fn shutdown_timeout() -> Duration {
        Duration::from_secs(20)
    }
    pub fn site_backoff() -> Duration {
        Duration::from_secs(30)
    }
    pub fn site_backoff_max() -> Duration {
        Duration::from_secs(600)
    }
    pub fn connect_timeout() -> Duration {
        Duration::from_secs(30)
    }
    pub fn five_minutes() -> Duration {
        Duration::from_secs(300)
    }
    pub fn data_init_timeout() -> Duration {
        Duration::from_secs(120)
    }
    pub fn data_block_timeout() -> Duration {
        Duration::from_secs(180)
    }
    pub fn data_final_timeout() -> Duration {
        Duration::from_secs(600)
    }
    pub fn bdat_min_bytes() -> usize {
        64 * 1024
    }
    pub fn max_connections() -> u32 {
        10
    }
    pub fn max_attachment_bytes() -> usize {
        10 << 20
    }
    pub fn max_attachments() -> usize {
        10
    }
    pub fn bounce_local_part() -> String {
        "bounce".into()
    }
    pub fn bounce_max_message_bytes() -> usize {
        10 << 20
    }
    pub fn bounce_max_connections() -> usize {
        100
    }
    pub fn bounce_max_connections_per_ip() -> usize {
        10
    }
    pub fn submission_max_message_bytes() -> usize {
        25 << 20
    }
    pub fn submission_max_recipients() -> usize {
        1000
    }
    pub fn submission_max_connections() -> usize {
        500
    }
    pub fn submission_max_connections_per_ip() -> usize {
        100
    }
    pub fn submission_max_auth_failures() -> u32 {
        5
    }
    pub fn submission_auth_failure_window() -> Duration {
        Duration::from_secs(300)
    }
    pub fn unsubscribe_url() -> String {
        "http://127.0.0.1:8025/u/".into()
    }
    pub fn feedback_sender_id() -> String {
        "sluice".into()
    }
    pub fn token_keys() -> Vec<String> {
        vec![EXAMPLE_TOKEN_KEY.into()]
    }
    pub fn max_messages_per_connection() -> u32 {
        100
    }
    pub fn sts_fetch_timeout() -> Duration {
        Duration::from_secs(10)
    }
    pub fn sts_retry() -> Duration {
        Duration::from_secs(300)
    }
    /// RFC 5321 §4.5.3.1.8: a server must accept at least 100 recipients; half of that keeps
    /// one refused transaction cheap.
    pub fn max_recipients_per_message() -> u32 {
        50
    }
}

macro_rules! default_from_serde {
    ($($t:ty),*) => {$(
        impl Default for $t {
            fn default() -> Self {
                // An empty table takes every field's named default.
                toml::from_str("").expect("every field has a default")
            }
        }
    )*};
}
default_from_serde!(
    HttpConfig,
    AuthConfig,
    SpoolConfig,
    RetentionConfig,
    LimitsConfig,
    LogConfig,
    DnsConfig,
    DeliveryConfig,
    Shaping,
    BounceConfig,
    MessageConfig,
    SecretsConfig,
    MtaStsConfig,
    DaneConfig,
    TlsReportsConfig,
    GuardConfig,
    PreflightConfig
);

impl Default for Config {
    fn default() -> Self {
        toml::from_str("").expect("every section has a default")
    }
}

/// A settings file's name (for errors) and text; a file that cannot be read is an error of
/// key `(file)`.
pub fn read_file(path: &Path) -> Result<(String, String), ConfigErrors> {
    let file = path.display().to_string();
    match std::fs::read_to_string(path) {
        Ok(text) => Ok((file, text)),
        Err(e) => Err(ConfigErrors(vec![ConfigError {
            file,
            key: "(file)".into(),
            reason: e.to_string(),
        }])),
    }
}

impl Config {
    /// Reads, parses and validates `path` (with `SLUICE_API_KEYS` and `SLUICE_TOKEN_KEYS`
    /// applied when set). The files it names (DKIM keys, bounce rules) are loaded by
    /// [`crate::server::Settings`], once.
    pub fn load(path: &Path) -> Result<Config, ConfigErrors> {
        let (file, text) = read_file(path)?;
        let env_keys = std::env::var(API_KEYS_ENV).ok();
        let env_tokens = std::env::var(TOKEN_KEYS_ENV).ok();
        Self::parse(&file, &text, env_keys.as_deref(), env_tokens.as_deref())
    }

    /// `check-config`'s warnings about rules that turn a receiver's transport security policy
    /// off (`mta_sts = false`, `dane = false`): mail to the sites they match may go in plain text
    /// or to hosts the policy would refuse.
    pub fn transport_warnings(&self, file: &str) -> Vec<String> {
        let mut out = Vec::new();
        for (i, r) in self.rules.iter().enumerate() {
            if r.mta_sts == Some(false) && self.mta_sts.enabled {
                out.push(format!(
                    "{file}: rule[{i}].mta_sts: warning: MTA-STS policies are not applied to the sites {:?} matches",
                    r.pattern
                ));
            }
            if r.dane == Some(false) && self.dane.enabled {
                out.push(format!(
                    "{file}: rule[{i}].dane: warning: DANE records are not applied to the sites {:?} matches",
                    r.pattern
                ));
            }
        }
        out
    }

    /// Parses and validates TOML text; `file` only labels errors.
    pub fn from_toml(
        file: &str,
        text: &str,
        env_keys: Option<&str>,
    ) -> Result<Config, ConfigErrors> {
        Self::parse(file, text, env_keys, None)
    }

    /// Parses TOML text, replaces the API keys and token keys with the environment's when given,
    /// and validates the result.
    fn parse(
        file: &str,
        text: &str,
        env_keys: Option<&str>,
        env_tokens: Option<&str>,
    ) -> Result<Config, ConfigErrors> {
        let de = toml::Deserializer::parse(text)
            .map_err(|e| ConfigErrors(vec![toml_error(file, text, "(syntax)", &e)]))?;
        let mut config: Config = serde_path_to_error::deserialize(de).map_err(|e| {
            let key = e.path().to_string();
            let inner = e.into_inner();
            ConfigErrors(vec![toml_error(file, text, &key, &inner)])
        })?;
        if let Some(keys) = env_keys {
            config.auth.api_keys = split_list(keys);
        }
        if let Some(keys) = env_tokens {
            config.secrets.token_keys = split_list(keys);
        }
        let errors = config.validate(file);
        if errors.is_empty() {
            Ok(config)
        } else {
            Err(ConfigErrors(errors))
        }
    }

    /// Whether `address` is one of the role addresses the bounce listener takes: `postmaster`
    /// alone (RFC 5321 §4.5.1), or `postmaster@` or `abuse@` (RFC 2142) one of the bounce
    /// domains: `bounce.domain` when set, else the domains Sluice signs for (their From domain
    /// is then the VERP domain); and always `delivery.ehlo_name` and the `unsubscribe_mailto`
    /// domain, which point their MX at the listener too.
    pub fn is_role_address(&self, address: &str) -> bool {
        let Some((local, domain)) = address.rsplit_once('@') else {
            return address.eq_ignore_ascii_case("postmaster");
        };
        if !(local.eq_ignore_ascii_case("postmaster") || local.eq_ignore_ascii_case("abuse")) {
            return false;
        }
        let bounce = self.bounce.domain.as_deref();
        let signed = self
            .dkim
            .iter()
            .filter(|_| bounce.is_none())
            .map(|d| d.domain.as_str());
        bounce
            .into_iter()
            .chain(std::iter::once(self.delivery.ehlo_name.as_str()))
            .chain(
                self.message
                    .unsubscribe_mailto
                    .as_deref()
                    .and_then(|m| m.rsplit_once('@').map(|(_, d)| d)),
            )
            .chain(signed)
            .any(|d| d.eq_ignore_ascii_case(domain))
    }

    fn validate(&self, file: &str) -> Vec<ConfigError> {
        let mut errors = Vec::new();
        let mut bad = |key: &str, reason: String| {
            errors.push(ConfigError {
                file: file.to_owned(),
                key: key.to_owned(),
                reason,
            });
        };
        if let Some(c) = &self.cluster {
            let id_ok = !c.node_id.is_empty()
                && c.node_id.len() <= 64
                && c.node_id
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
            if !id_ok {
                bad(
                    "cluster.node_id",
                    format!("{:?}: use 1 to 64 letters, digits, '-' or '_'", c.node_id),
                );
            }
            if c.redis.is_empty() {
                bad(
                    "cluster.redis",
                    "name at least one node of the Redis Cluster (redis://host:port)".into(),
                );
            }
            for (i, url) in c.redis.iter().enumerate() {
                if !(url.starts_with("redis://") || url.starts_with("rediss://")) {
                    bad(
                        &format!("cluster.redis[{i}]"),
                        format!("{url:?} is not a redis:// URL"),
                    );
                }
            }
            for (key, d) in [
                ("cluster.timeout", c.timeout),
                ("cluster.breaker_cooldown", c.breaker_cooldown),
                ("cluster.lease_ttl", c.lease_ttl),
                ("cluster.heartbeat", c.heartbeat),
            ] {
                if d.is_zero() {
                    bad(key, "must be more than 0".into());
                }
            }
            if c.breaker_failures == 0 {
                bad("cluster.breaker_failures", "must be at least 1".into());
            }
        }
        let g = &self.guard;
        for (key, reason) in g.thresholds().problems() {
            bad(&format!("guard.{key}"), reason);
        }
        if !(g.warning_ratio > 0.0 && g.warning_ratio <= 1.0) {
            bad(
                "guard.warning_ratio",
                format!("{} is not a share above 0 and at most 1", g.warning_ratio),
            );
        }
        if g.interval.is_zero() {
            bad("guard.interval", "must be more than 0".into());
        }
        let window = g.domain_window.as_secs();
        if window < 600 || !window.is_multiple_of(600) || window > 7 * 86_400 {
            bad(
                "guard.domain_window",
                format!(
                    "{}: use a multiple of 10 minutes, from 10m to 7d",
                    humantime::format_duration(g.domain_window)
                ),
            );
        }
        let d = &self.dns;
        for (key, v) in [
            ("dns.confirm_nxdomain_after", d.confirm_nxdomain_after),
            ("dns.canary_interval", d.canary_interval),
            ("dns.fault_window", d.fault_window),
        ] {
            if v.is_zero() {
                bad(key, "must be more than 0".into());
            }
        }
        for (i, c) in d.canary.iter().enumerate() {
            if crate::intake::address::check_host_name(c).is_err() {
                bad(
                    &format!("dns.canary[{i}]"),
                    format!("{c:?} is not a domain name"),
                );
            }
        }
        let share = self.delivery.lower_priority_share;
        if !(0.0..=0.5).contains(&share) {
            bad(
                "delivery.lower_priority_share",
                format!("{share} is not a share from 0 to 0.5"),
            );
        }
        if self.auth.api_keys.is_empty() {
            bad(
                "auth.api_keys",
                format!("no API key: set at least one here or in {API_KEYS_ENV}"),
            );
        }
        for (i, key) in self.auth.api_keys.iter().enumerate() {
            if let Some(reason) = api_key_problem(key) {
                bad(&format!("auth.api_keys[{i}]"), reason.into());
            }
        }
        // A key names one tenant: the same key twice would make its tenant depend on order.
        let mut key_owner = std::collections::HashMap::new();
        for key in &self.auth.api_keys {
            key_owner.insert(hash_key(key.as_bytes()), "[auth]");
        }
        let mut tenant_names = std::collections::HashSet::new();
        for (i, t) in self.tenants.iter().enumerate() {
            for (key, reason) in t.problems(self) {
                bad(&format!("tenant[{i}].{key}"), reason);
            }
            if !tenant_names.insert(t.name.as_str()) {
                bad(
                    &format!("tenant[{i}].name"),
                    format!("{:?} names two tenants", t.name),
                );
            }
            let hashes = t
                .api_keys
                .iter()
                .map(|k| hash_key(k.as_bytes()))
                .chain(t.api_key_hashes.iter().filter_map(|h| parse_key_hash(h)));
            for h in hashes {
                if let Some(other) = key_owner.insert(h, t.name.as_str()) {
                    bad(
                        &format!("tenant[{i}].api_keys"),
                        format!("a key of tenant {:?} is also a key of {other}", t.name),
                    );
                }
            }
        }
        if self.profile == Profile::Production {
            for (i, key) in self.auth.api_keys.iter().enumerate() {
                if key == EXAMPLE_API_KEY {
                    bad(
                        &format!("auth.api_keys[{i}]"),
                        format!(
                            "{EXAMPLE_API_KEY:?} is the example key: set your own here or in {API_KEYS_ENV}, or profile = \"development\" on a laptop"
                        ),
                    );
                }
            }
            for (i, r) in self.routes.iter().enumerate() {
                if r.domain == "*" {
                    bad(
                        &format!("route[{i}].domain"),
                        format!(
                            "\"*\" sends every domain's mail to {}, a development sink setting: remove this route for production, or profile = \"development\" on a laptop",
                            r.relay
                        ),
                    );
                }
            }
            if self.uses_example_token_key() {
                bad(
                    "secrets.token_keys",
                    format!(
                        "the example token key lets anyone forge unsubscribe and bounce tokens: set your own here or in {TOKEN_KEYS_ENV}, or profile = \"development\" on a laptop"
                    ),
                );
            }
        }
        if self.http.tls_cert.is_some() != self.http.tls_key.is_some() {
            bad(
                "http.tls_cert",
                "tls_cert and tls_key go together: set both or neither".into(),
            );
        }
        if self.bounce.tls_cert.is_some() != self.bounce.tls_key.is_some() {
            bad(
                "bounce.tls_cert",
                "tls_cert and tls_key go together: set both or neither".into(),
            );
        }
        let sub = &self.submission;
        if sub.tls_cert.is_some() != sub.tls_key.is_some() {
            bad(
                "submission.tls_cert",
                "tls_cert and tls_key go together: set both or neither".into(),
            );
        }
        if sub.listen_tls.is_some() && sub.tls_cert.is_none() {
            bad(
                "submission.listen_tls",
                "a TLS listener needs submission.tls_cert and tls_key".into(),
            );
        }
        if let Err(e) = sub.networks() {
            bad("submission.trusted_networks", e);
        }
        if sub.max_recipients == 0 || sub.max_recipients > MAX_MESSAGE_RECIPIENTS {
            bad(
                "submission.max_recipients",
                format!("must be between 1 and {MAX_MESSAGE_RECIPIENTS}"),
            );
        }
        if sub.max_connections == 0 || sub.max_connections_per_ip == 0 {
            bad(
                "submission.max_connections",
                "max_connections and max_connections_per_ip must be at least 1".into(),
            );
        }
        if self.http.max_concurrent_requests == 0 {
            bad("http.max_concurrent_requests", "must be at least 1".into());
        }
        if self.spool.path.as_os_str().is_empty() {
            bad("spool.path", "must not be empty".into());
        }
        if !(1..=1_000_000).contains(&self.spool.ingest_batch) {
            bad("spool.ingest_batch", "must be between 1 and 1000000".into());
        }
        let l = &self.limits;
        for (key, value) in [
            ("limits.max_request_bytes", l.max_request_bytes),
            (
                "limits.max_recipients_per_request",
                l.max_recipients_per_request,
            ),
            (
                "limits.max_recipients_per_upload",
                l.max_recipients_per_upload,
            ),
            ("limits.max_line_bytes", l.max_line_bytes),
            ("limits.max_vars_bytes", l.max_vars_bytes),
            ("limits.max_template_bytes", l.max_template_bytes),
        ] {
            if value == 0 {
                bad(key, "must be greater than 0".into());
            }
        }
        if l.max_recipients_per_upload > u32::MAX as usize {
            bad(
                "limits.max_recipients_per_upload",
                format!("must be at most {}", u32::MAX),
            );
        }
        if crate::intake::address::check_host_name(&self.delivery.ehlo_name).is_err() {
            bad(
                "delivery.ehlo_name",
                format!(
                    "{:?} is not a fully qualified host name",
                    self.delivery.ehlo_name
                ),
            );
        }
        for (key, s) in std::iter::once(("shaping".to_owned(), &self.shaping)) {
            if s.max_connections == 0 {
                bad(
                    &format!("{key}.max_connections"),
                    "must be at least 1".into(),
                );
            }
            if s.max_messages_per_connection == 0 {
                bad(
                    &format!("{key}.max_messages_per_connection"),
                    "must be at least 1".into(),
                );
            }
            if !(1..=1000).contains(&s.max_recipients_per_message) {
                bad(
                    &format!("{key}.max_recipients_per_message"),
                    "must be 1 to 1000".into(),
                );
            }
        }
        for (i, r) in self.rules.iter().enumerate() {
            let p = r.pattern.strip_prefix("*.").unwrap_or(&r.pattern);
            if p.is_empty() || p.contains('*') {
                bad(
                    &format!("rule[{i}].match"),
                    format!("{:?}: use a name or *.name", r.pattern),
                );
            }
            if r.max_connections == Some(0) || r.max_messages_per_connection == Some(0) {
                bad(&format!("rule[{i}]"), "limits must be at least 1".into());
            }
            if r.max_recipients_per_message
                .is_some_and(|n| !(1..=1000).contains(&n))
            {
                bad(
                    &format!("rule[{i}].max_recipients_per_message"),
                    "must be 1 to 1000".into(),
                );
            }
        }
        let mut source_names = std::collections::HashSet::new();
        for (i, src) in self.sources.iter().enumerate() {
            if let Some(reason) = name_problem(&src.name, &mut source_names, "sources") {
                bad(&format!("source[{i}].name"), reason);
            }
            // Binding to it is what delivery will do: an address this host does not have fails.
            if let Err(e) = std::net::TcpListener::bind((src.address, 0)) {
                bad(
                    &format!("source[{i}].address"),
                    format!("{} is not an address of this host: {e}", src.address),
                );
            }
            if let Some(name) = &src.ehlo_name
                && crate::intake::address::check_host_name(name).is_err()
            {
                bad(
                    &format!("source[{i}].ehlo_name"),
                    format!("{name:?} is not a host name"),
                );
            }
            match (&src.warmup, &src.warmup_start) {
                (Some(w), start) => {
                    if w != STANDARD_WARMUP && !self.warmups.iter().any(|x| &x.name == w) {
                        bad(
                            &format!("source[{i}].warmup"),
                            format!("no [[warmup]] is named {w:?} (built in: \"standard\")"),
                        );
                    }
                    match start {
                        None => bad(
                            &format!("source[{i}].warmup_start"),
                            "missing: the warm-up's first day, e.g. \"2026-12-01\"".into(),
                        ),
                        Some(d) => {
                            if let Err(reason) = parse_day(d) {
                                bad(&format!("source[{i}].warmup_start"), reason);
                            }
                        }
                    }
                }
                (None, Some(_)) => bad(
                    &format!("source[{i}].warmup_start"),
                    "set without warmup".into(),
                ),
                (None, None) => {}
            }
        }
        let mut warmup_names = std::collections::HashSet::new();
        for (i, w) in self.warmups.iter().enumerate() {
            if let Some(reason) = name_problem(&w.name, &mut warmup_names, "warm-up schedules") {
                bad(&format!("warmup[{i}].name"), reason);
            }
            match (&w.ramp, w.per_day.is_empty()) {
                (Some(_), false) => bad(
                    &format!("warmup[{i}]"),
                    "give per_day or ramp, not both".into(),
                ),
                (None, true) => bad(
                    &format!("warmup[{i}]"),
                    "needs per_day (caps day by day) or ramp".into(),
                ),
                (Some(r), true) => {
                    if !(r.factor > 1.0 && r.factor <= 10.0) {
                        bad(
                            &format!("warmup[{i}].ramp.factor"),
                            "must be more than 1 and at most 10".into(),
                        );
                    }
                    if r.from == 0 || r.to < r.from {
                        bad(&format!("warmup[{i}].ramp"), "needs 0 < from <= to".into());
                    }
                }
                (None, false) => {
                    if w.per_day.contains(&0) {
                        bad(
                            &format!("warmup[{i}].per_day"),
                            "caps must be at least 1".into(),
                        );
                    }
                }
            }
            if !w.per_hour.is_empty() && w.per_hour.len() != w.per_day.len() {
                bad(
                    &format!("warmup[{i}].per_hour"),
                    format!("needs one cap per day of per_day ({})", w.per_day.len()),
                );
            }
            if w.per_hour.contains(&0) {
                bad(
                    &format!("warmup[{i}].per_hour"),
                    "caps must be at least 1".into(),
                );
            }
            if w.hour.is_zero() || w.day < w.hour {
                bad(
                    &format!("warmup[{i}].day"),
                    "hour must be more than 0 and day at least an hour".into(),
                );
            }
        }
        let mut pool_names = std::collections::HashSet::new();
        for (i, p) in self.pools.iter().enumerate() {
            if let Some(reason) = name_problem(&p.name, &mut pool_names, "pools") {
                bad(&format!("pool[{i}].name"), reason);
            }
            for (j, m) in p.sources.iter().enumerate() {
                let known = if self.sources.is_empty() {
                    m.source == DEFAULT_POOL
                } else {
                    source_names.contains(m.source.as_str())
                };
                if !known {
                    bad(
                        &format!("pool[{i}].sources[{j}].source"),
                        format!("no [[source]] is named {:?}", m.source),
                    );
                }
            }
            if p.sources.iter().map(|m| u64::from(m.weight)).sum::<u64>() == 0 {
                bad(
                    &format!("pool[{i}].sources"),
                    "a pool needs at least one source with a weight above 0".into(),
                );
            }
            if let Some(o) = &p.overflow
                && (o == &p.name || !self.has_pool(o))
            {
                bad(
                    &format!("pool[{i}].overflow"),
                    format!("{o:?} is not another pool"),
                );
            }
        }
        for (i, r) in self.routes.iter().enumerate() {
            if r.domain.is_empty() {
                bad(&format!("route[{i}].domain"), "must not be empty".into());
            }
            let ok = r
                .relay
                .rsplit_once(':')
                .is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok());
            if !ok {
                bad(
                    &format!("route[{i}].relay"),
                    format!("{:?} is not host:port", r.relay),
                );
            }
        }
        let mut hook_names = std::collections::HashSet::new();
        for (i, w) in self.webhooks.iter().enumerate() {
            let key = |k: &str| format!("webhook[{i}].{k}");
            if !(w.url.starts_with("http://") || w.url.starts_with("https://"))
                || w.url.parse::<axum::http::Uri>().is_err()
            {
                bad(
                    &key("url"),
                    format!("{:?} is not an http:// or https:// URL", w.url),
                );
            }
            for (k, secret) in std::iter::once((key("secret"), &w.secret)).chain(
                w.previous_secrets
                    .iter()
                    .enumerate()
                    .map(|(j, s)| (key(&format!("previous_secrets[{j}]")), s)),
            ) {
                if let Err(e) = webhook_key(secret) {
                    bad(&k, e);
                }
            }
            if !(1..=10_000).contains(&w.batch_size) {
                bad(&key("batch_size"), "must be between 1 and 10000".into());
            }
            if w.timeout.is_zero() || w.retry_initial.is_zero() || w.retry_max < w.retry_initial {
                bad(
                    &key("retry_max"),
                    "timeout and retry_initial must be above zero and retry_max at least retry_initial"
                        .into(),
                );
            }
            for (j, e) in w.events.iter().flatten().enumerate() {
                if !WEBHOOK_EVENTS.contains(&e.as_str()) {
                    bad(
                        &format!("webhook[{i}].events[{j}]"),
                        format!("{e:?} is not one of {}", WEBHOOK_EVENTS.join(", ")),
                    );
                }
            }
            if !hook_names.insert(w.name()) {
                bad(&key("name"), format!("{:?} names two webhooks", w.name()));
            }
            if let Some(t) = &w.tenant
                && !self.tenants.iter().any(|c| &c.name == t)
            {
                bad(
                    &key("tenant"),
                    format!("{t:?} is not a [[tenant]] of this file"),
                );
            }
        }
        if self.retention.message_buckets < Duration::from_secs(1) {
            bad("retention.message_buckets", "must be at least 1s".into());
        }
        if self.retention.interval < Duration::from_secs(1) {
            bad(
                "retention.interval",
                "must be at least 1s: each pass reads every campaign in memory".into(),
            );
        }
        if self.delivery.retry_initial.is_zero()
            || self.delivery.retry_max < self.delivery.retry_initial
        {
            bad(
                "delivery.retry_max",
                "retry_initial must be above zero and retry_max at least retry_initial".into(),
            );
        }
        if let Some(d) = &self.bounce.domain
            && crate::intake::address::check_host_name(d).is_err()
        {
            bad("bounce.domain", format!("{d:?} is not a domain name"));
        }
        let lp = &self.bounce.local_part;
        if lp.is_empty()
            || lp.len() > 30
            || !lp
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
            || lp.starts_with('.')
            || lp.ends_with('.')
        {
            bad(
                "bounce.local_part",
                "1 to 30 of a-z, 0-9, '-', '_' and '.' (not first or last)".into(),
            );
        }
        for (i, a) in self.bounce.feedback_addresses.iter().enumerate() {
            if crate::intake::address::Address::parse(a).is_err() {
                bad(
                    &format!("bounce.feedback_addresses[{i}]"),
                    format!("{a:?} is not an email address"),
                );
            }
        }
        if let Some(a) = &self.bounce.operator_address {
            if crate::intake::address::Address::parse(a).is_err() {
                bad(
                    "bounce.operator_address",
                    format!("{a:?} is not an email address"),
                );
            } else if self.is_role_address(a) {
                bad(
                    "bounce.operator_address",
                    format!(
                        "{a:?} is a role address the bounce listener takes: forwarding would loop"
                    ),
                );
            }
        }
        if self.bounce.max_message_bytes < 1024 || self.bounce.max_connections == 0 {
            bad(
                "bounce.max_message_bytes",
                "max_message_bytes at least 1024 and max_connections above zero".into(),
            );
        }
        let url = &self.message.unsubscribe_url;
        if !(url.starts_with("https://") || url.starts_with("http://"))
            || url.len() > 200
            || !url
                .bytes()
                .all(|b| b.is_ascii_graphic() && !b"<>\"\\,".contains(&b))
        {
            bad(
                "message.unsubscribe_url",
                format!(
                    "{url:?} is not an http(s) URL prefix without spaces, quotes, '<', '>' or ','"
                ),
            );
        }
        if let Some(m) = &self.message.unsubscribe_mailto {
            match crate::intake::address::Address::parse(m) {
                Ok(a) if a.as_str().is_ascii() && !a.local().contains(['+', '"']) => {}
                _ => bad(
                    "message.unsubscribe_mailto",
                    format!("{m:?} is not an ASCII address without '+'"),
                ),
            }
        }
        let sid = &self.message.feedback_sender_id;
        if sid.is_empty()
            || sid.len() > 64
            || !sid.bytes().all(|b| b.is_ascii_graphic() && b != b':')
        {
            bad(
                "message.feedback_sender_id",
                "1 to 64 printable ASCII characters without ':'".into(),
            );
        }
        if self.secrets.token_keys.is_empty() {
            bad(
                "secrets.token_keys",
                format!("no token key: set at least one here or in {TOKEN_KEYS_ENV}"),
            );
        }
        for (i, key) in self.secrets.token_keys.iter().enumerate() {
            if key.len() < 16 {
                bad(
                    &format!("secrets.token_keys[{i}]"),
                    "a token key must be at least 16 bytes".into(),
                );
            }
        }
        let mut seen = std::collections::HashSet::new();
        for (i, k) in self.dkim.iter().enumerate() {
            if crate::intake::address::check_host_name(&k.domain).is_err() {
                bad(
                    &format!("dkim[{i}].domain"),
                    format!("{:?} is not a domain name", k.domain),
                );
            }
            let selector_ok = !k.selector.is_empty()
                && k.selector.len() <= 63
                && k.selector.split('.').all(|l| {
                    !l.is_empty()
                        && l.bytes()
                            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
                });
            if !selector_ok {
                bad(
                    &format!("dkim[{i}].selector"),
                    format!("{:?} is not a DNS label (a-z, 0-9, '-', '_')", k.selector),
                );
            }
            if !seen.insert((
                k.domain.to_ascii_lowercase(),
                k.selector.to_ascii_lowercase(),
            )) {
                bad(
                    &format!("dkim[{i}]"),
                    format!("{} and {} appear twice", k.domain, k.selector),
                );
            }
        }
        if tracing_subscriber::EnvFilter::try_new(&self.log.level).is_err() {
            bad(
                "log.level",
                format!("{:?} is not a valid log filter", self.log.level),
            );
        }
        errors
    }

    /// True when the only API key is the example one shipped in `config/sluice.toml`.
    pub fn uses_example_key(&self) -> bool {
        self.auth.api_keys.iter().any(|k| k == EXAMPLE_API_KEY)
    }

    /// True when the example token key is among the token keys.
    pub fn uses_example_token_key(&self) -> bool {
        self.secrets
            .token_keys
            .iter()
            .any(|k| k == EXAMPLE_TOKEN_KEY)
    }
}

fn split_list(s: &str) -> Vec<String> {
    s.split(',')
        .map(str::trim)
        .filter(|k| !k.is_empty())
        .map(str::to_owned)
        .collect()
}

fn toml_error(file: &str, text: &str, key: &str, e: &toml::de::Error) -> ConfigError {
    let reason = e.message().to_owned();
    let location = e.span().map(|span| {
        let line = text[..span.start.min(text.len())]
            .bytes()
            .filter(|&b| b == b'\n')
            .count()
            + 1;
        format!(" (line {line})")
    });
    let key = if key.is_empty() || key == "." {
        "(top level)".to_owned()
    } else {
        key.to_owned()
    };
    ConfigError {
        file: file.to_owned(),
        key: format!("{key}{}", location.unwrap_or_default()),
        reason,
    }
}

/// What is wrong with a source or pool name, if anything: it must be 1 to 64 of
/// `A-Z a-z 0-9 . _ -` (it becomes a metric label) and not already in `seen` (`what` names
/// them in the message).
fn name_problem<'a>(
    name: &'a str,
    seen: &mut std::collections::HashSet<&'a str>,
    what: &str,
) -> Option<String> {
    let valid = (1..=64).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if !valid {
        return Some(format!(
            "{name:?}: a name is 1 to 64 of A-Z, a-z, 0-9, '.', '_' and '-'"
        ));
    }
    (!seen.insert(name)).then(|| format!("{name:?} names two {what}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn errors(text: &str) -> Vec<String> {
        match Config::from_toml("t.toml", text, None) {
            Ok(_) => vec![],
            Err(ConfigErrors(es)) => es.into_iter().map(|e| e.to_string()).collect(),
        }
    }

    #[test]
    fn minimal_config_takes_defaults() {
        let c = Config::from_toml(
            "t.toml",
            "profile = \"development\"\n[auth]\napi_keys = [\"0123456789\"]\n",
            None,
        )
        .unwrap();
        assert_eq!(c.http.listen, "127.0.0.1:8025".parse().unwrap());
        assert_eq!(c.spool.path, PathBuf::from("var/spool"));
        assert_eq!(c.spool.idempotency_ttl, Duration::from_secs(86400));
    }

    #[test]
    fn transport_security_defaults_and_the_warnings_of_rules_that_turn_it_off() {
        let base = "profile = \"development\"\n[auth]\napi_keys = [\"0123456789\"]\n";
        let c = Config::from_toml("t.toml", base, None).unwrap();
        assert!(c.mta_sts.enabled && !c.dane.enabled && c.tls_reports.enabled);
        assert!(c.shaping.mta_sts && c.shaping.dane);
        assert_eq!(c.mta_sts.fetch_timeout, Duration::from_secs(10));
        assert!(c.transport_warnings("t.toml").is_empty());
        let text = format!(
            "{base}[dane]\nenabled = true\n[[rule]]\nmatch = \"*.example.net\"\nmta_sts = false\ndane = false\n"
        );
        let c = Config::from_toml("t.toml", &text, None).unwrap();
        let shaping = c.rules[0].apply(&c.shaping);
        assert!(!shaping.mta_sts && !shaping.dane);
        let w = c.transport_warnings("t.toml");
        assert_eq!(w.len(), 2, "{w:?}");
        assert!(
            w[0].starts_with("t.toml: rule[0].mta_sts: warning:"),
            "{w:?}"
        );
        assert!(w[1].starts_with("t.toml: rule[0].dane: warning:"), "{w:?}");
    }

    #[test]
    fn guard_thresholds_and_windows_out_of_range_name_their_key() {
        let base = "profile = \"development\"\n[auth]\napi_keys = [\"0123456789\"]\n";
        let c = Config::from_toml("t.toml", base, None).unwrap();
        assert_eq!(
            (c.guard.max_complaint_percent, c.guard.min_delivered),
            (0.3, 1000)
        );
        assert_eq!(
            (c.guard.max_hard_bounce_percent, c.guard.min_attempted),
            (5.0, 500)
        );
        assert_eq!(c.guard.domain_window, Duration::from_secs(86_400));
        for (table, key) in [
            (
                "[guard]\nmax_complaint_percent = 120.0",
                "guard.max_complaint_percent",
            ),
            (
                "[guard]\nmax_hard_bounce_percent = -1.0",
                "guard.max_hard_bounce_percent",
            ),
            ("[guard]\nmin_delivered = 0", "guard.min_delivered"),
            ("[guard]\nmin_attempted = 0", "guard.min_attempted"),
            ("[guard]\nwarning_ratio = 0.0", "guard.warning_ratio"),
            ("[guard]\ndomain_window = \"-5m\"", "guard.domain_window"),
            ("[guard]\ndomain_window = \"15m\"", "guard.domain_window"),
            ("[guard]\ninterval = \"0s\"", "guard.interval"),
            (
                "[dns]\nconfirm_nxdomain_after = \"0s\"",
                "dns.confirm_nxdomain_after",
            ),
            ("[dns]\ncanary = [\"not a domain\"]", "dns.canary[0]"),
        ] {
            let e = errors(&format!("{base}{table}\n"));
            assert_eq!(e.len(), 1, "{table}: {e:?}");
            assert!(
                e[0].starts_with(&format!("t.toml: {key}")),
                "{table}: {e:?}"
            );
        }
    }

    #[test]
    fn errors_name_file_key_and_reason() {
        let e = errors(
            "profile = \"development\"\n[auth]\napi_keys = [\"0123456789\"]\n[http]\nlisten = \"nope\"\n",
        );
        assert_eq!(e.len(), 1);
        assert!(e[0].starts_with("t.toml: http.listen (line 5): "), "{e:?}");
        assert!(e[0].contains("invalid socket address"), "{e:?}");

        let e = errors(
            "profile = \"development\"\n[auth]\napi_keys = [\"0123456789\"]\n[http]\nlisten_on = \"127.0.0.1:1\"\n",
        );
        assert!(e[0].contains("unknown field `listen_on`"), "{e:?}");
        assert!(e[0].starts_with("t.toml: http"), "{e:?}");

        let e = errors(
            "profile = \"development\"\n[auth]\napi_keys = [\"0123456789\"]\n[spool]\nidempotency_ttl = \"soon\"\n",
        );
        assert!(
            e[0].starts_with("t.toml: spool.idempotency_ttl (line 5): "),
            "{e:?}"
        );

        let e = errors(
            "profile = \"development\"\n[auth]\napi_keys = [\"short\", \"0123456789\", \"with space\"]\n[limits]\nmax_line_bytes = 0\n",
        );
        assert_eq!(
            e,
            vec![
                "t.toml: auth.api_keys[0]: an API key must be at least 8 characters",
                "t.toml: auth.api_keys[2]: an API key may hold only printable ASCII without spaces",
                "t.toml: limits.max_line_bytes: must be greater than 0",
            ]
        );
        let e = errors("[http\n");
        assert!(e[0].starts_with("t.toml: (syntax) (line 1): "), "{e:?}");
    }

    #[test]
    fn warm_up_schedules_overflow_and_per() {
        let head = "profile = \"development\"\n[auth]\napi_keys = [\"0123456789\"]\n";
        let c = Config::from_toml(
            "t.toml",
            &format!(
                "{head}[[rule]]\nmatch = \"*.example.com\"\nper = \"site\"\n\
                 [[source]]\nname = \"new\"\naddress = \"127.0.0.21\"\nwarmup = \"standard\"\nwarmup_start = \"2026-12-01\"\n\
                 [[source]]\nname = \"old\"\naddress = \"127.0.0.22\"\nwarmup = \"mine\"\nwarmup_start = \"2026-11-30\"\n\
                 [[warmup]]\nname = \"mine\"\nper_day = [10, 20]\nper_hour = [2, 4]\n\
                 [[pool]]\nname = \"cold\"\nsources = [{{source = \"new\"}}]\noverflow = \"warm\"\n\
                 [[pool]]\nname = \"warm\"\nsources = [{{source = \"old\"}}]\n"
            ),
            None,
        )
        .unwrap();
        assert_eq!(c.rules[0].apply(&c.shaping).per, Per::Site);
        assert_eq!(c.shaping.per, Per::Source);
        let sources = c.egress_sources();
        let (standard, start) = sources[0].warmup.clone().unwrap();
        // 50 a day, ×1.4 a day, to 500,000: about 30 days, each hour at most a twelfth.
        assert_eq!(standard.days[0], (50, Some(5)));
        assert_eq!(standard.days[1], (70, Some(6)));
        assert_eq!(standard.days.last(), Some(&(500_000, Some(41_667))));
        assert!(
            (27..=31).contains(&standard.days.len()),
            "{}",
            standard.days.len()
        );
        assert_eq!(start, 1_796_083_200_000);
        let (mine, _) = sources[1].warmup.clone().unwrap();
        assert_eq!(mine.days, vec![(10, Some(2)), (20, Some(4))]);
        let pools = c.egress_pools();
        let cold = pools.iter().position(|p| p.name == "cold").unwrap();
        let warm = pools.iter().position(|p| p.name == "warm").unwrap();
        assert_eq!(pools[cold].overflow, Some(warm));
        assert_eq!(pools[warm].overflow, None);

        let e = errors(&format!(
            "{head}[[source]]\nname = \"a\"\naddress = \"127.0.0.1\"\nwarmup = \"nope\"\nwarmup_start = \"2026-13-01\"\n\
             [[source]]\nname = \"b\"\naddress = \"127.0.0.1\"\nwarmup = \"standard\"\n\
             [[warmup]]\nname = \"w\"\nper_day = [5, 0]\nper_hour = [1]\n\
             [[pool]]\nname = \"p\"\nsources = [{{source = \"a\"}}]\noverflow = \"p\"\n"
        ));
        let keys: Vec<&str> = e
            .iter()
            .map(|l| l.split(": ").nth(1).unwrap_or(""))
            .collect();
        assert_eq!(
            keys,
            vec![
                "source[0].warmup",
                "source[0].warmup_start",
                "source[1].warmup_start",
                "warmup[0].per_day",
                "warmup[0].per_hour",
                "pool[0].overflow",
            ],
            "{e:?}"
        );
        assert_eq!(parse_day("2026-12-01"), Ok(1_796_083_200_000));
        assert!(parse_day("2026-2-01").is_err());
    }

    #[test]
    fn sources_and_pools() {
        let head = "profile = \"development\"\n[auth]\napi_keys = [\"0123456789\"]\n[delivery]\nehlo_name = \"mta.example.com\"\n";
        let c = Config::from_toml(
            "t.toml",
            &format!(
                "{head}[[source]]\nname = \"a\"\naddress = \"127.0.0.21\"\nehlo_name = \"a.example.com\"\n\
                 [[source]]\nname = \"b\"\naddress = \"127.0.0.22\"\n\
                 [[pool]]\nname = \"warm\"\nsources = [{{source = \"a\", weight = 2}}, {{source = \"b\"}}]\n"
            ),
            None,
        )
        .unwrap();
        let sources = c.egress_sources();
        assert_eq!(sources[0].ehlo_name, "a.example.com");
        assert_eq!(sources[1].ehlo_name, "mta.example.com");
        let pools = c.egress_pools();
        assert_eq!(pools[0].name, DEFAULT_POOL);
        assert_eq!(pools[0].members, vec![(0, 1), (1, 1)]);
        assert_eq!(pools[1].members, vec![(0, 2), (1, 1)]);
        assert!(c.has_pool("warm") && c.has_pool(DEFAULT_POOL) && !c.has_pool("cold"));
        // Without sources: one implicit source and pool.
        let c = Config::from_toml("t.toml", head, None).unwrap();
        assert_eq!(c.egress_sources()[0].name, DEFAULT_POOL);
        assert_eq!(c.egress_pools()[0].members, vec![(0, 1)]);

        let e = errors(&format!(
            "{head}[[source]]\nname = \"a\"\naddress = \"192.0.2.1\"\n\
             [[source]]\nname = \"a\"\naddress = \"127.0.0.1\"\nehlo_name = \"not a name\"\n\
             [[pool]]\nname = \"p\"\nsources = [{{source = \"nope\"}}, {{source = \"a\", weight = 0}}]\n\
             [[pool]]\nname = \"q\"\nsources = [{{source = \"a\", weight = 0}}]\n"
        ));
        let keys: Vec<&str> = e
            .iter()
            .map(|l| l.split(": ").nth(1).unwrap_or(""))
            .collect();
        assert_eq!(
            keys,
            vec![
                "source[0].address",
                "source[1].name",
                "source[1].ehlo_name",
                "pool[0].sources[0].source",
                "pool[1].sources",
            ],
            "{e:?}"
        );
        assert!(
            e[0].contains("192.0.2.1 is not an address of this host"),
            "{e:?}"
        );
    }

    #[test]
    fn tenants_are_checked_key_by_key() {
        let head = "profile = \"development\"\n[auth]\napi_keys = [\"0123456789\"]\n";
        let c = Config::from_toml(
            "t.toml",
            &format!(
                "{head}[[tenant]]\nname = \"acme\"\napi_keys = [\"acme-key-0123\"]\nsending_domains = [\"acme.com\", \"*.acme.com\"]\n\
                 daily_quota = 10\nrate = \"5/s\"\nweight = 3\n\
                 [[webhook]]\nurl = \"http://127.0.0.1:9/h\"\nsecret = \"0123456789abcdef\"\ntenant = \"acme\"\n"
            ),
            None,
        )
        .unwrap();
        assert_eq!(c.tenants[0].weight, 3);
        assert_eq!(c.tenants[0].daily_quota, Some(10));
        let e = errors(&format!(
            "{head}[[tenant]]\nname = \"default\"\nsending_domains = []\n\
             [[tenant]]\nname = \"b\"\napi_keys = [\"0123456789\", \"short\"]\napi_key_hashes = [\"md5:00\"]\n\
             sending_domains = [\"*.\", \"ok.example\"]\npool = \"nope\"\ndaily_quota = 0\nweight = 0\n\
             [[tenant]]\nname = \"b\"\nsending_domains = [\"*\"]\n\
             [[webhook]]\nurl = \"http://127.0.0.1:9/h\"\nsecret = \"0123456789abcdef\"\ntenant = \"nobody\"\n"
        ));
        let keys: Vec<&str> = e
            .iter()
            .map(|l| l.split(": ").nth(1).unwrap_or(""))
            .collect();
        for key in [
            "tenant[0].name",
            "tenant[0].sending_domains",
            "tenant[1].sending_domains[0]",
            "tenant[1].pool",
            "tenant[1].daily_quota",
            "tenant[1].weight",
            "tenant[1].api_keys[1]",
            "tenant[1].api_key_hashes[0]",
            "tenant[1].api_keys",
            "tenant[2].name",
            "webhook[0].tenant",
        ] {
            assert!(keys.contains(&key), "{key} not named: {e:?}");
        }
    }

    #[test]
    fn rules_routes_and_rates() {
        let c = Config::from_toml(
            "t.toml",
            "profile = \"development\"\n[auth]\napi_keys = [\"0123456789\"]\n[shaping]\nmessage_rate = \"100/s\"\n\
             [[rule]]\nmatch = \"*.google.com\"\nmax_connections = 20\nmessage_rate = \"5000/m\"\n\
             [[route]]\ndomain = \"example.test\"\nrelay = \"127.0.0.1:2525\"\n",
            None,
        )
        .unwrap();
        let r = &c.rules[0];
        assert!(r.matches("aspmx.l.GOOGLE.com"));
        assert!(!r.matches("google.com"));
        assert!(!r.matches("notgoogle.com"));
        let s = r.apply(&c.shaping);
        assert_eq!(s.max_connections, 20);
        assert_eq!(
            s.message_rate,
            Some(Rate {
                count: 5000,
                per: Duration::from_secs(60)
            })
        );
        assert_eq!(
            c.shaping.message_rate,
            Some(Rate {
                count: 100,
                per: Duration::from_secs(1)
            })
        );
        assert_eq!(c.routes[0].relay, "127.0.0.1:2525");
        assert_eq!(s.max_recipients_per_message, 50);
        let e = errors(
            "profile = \"development\"\n[auth]\napi_keys = [\"0123456789\"]\n[shaping]\nmax_recipients_per_message = 0\n\
             [[rule]]\nmatch = \"a.test\"\nmax_recipients_per_message = 5000\n",
        );
        assert_eq!(
            e,
            vec![
                "t.toml: shaping.max_recipients_per_message: must be 1 to 1000",
                "t.toml: rule[0].max_recipients_per_message: must be 1 to 1000"
            ]
        );
        let e = errors(
            "profile = \"development\"\n[auth]\napi_keys = [\"0123456789\"]\n[shaping]\nmessage_rate = \"fast\"\n",
        );
        assert!(
            e[0].starts_with("t.toml: shaping.message_rate (line 5): "),
            "{e:?}"
        );
        let e = errors(
            "profile = \"development\"\n[auth]\napi_keys = [\"0123456789\"]\n[[route]]\ndomain = \"a.test\"\nrelay = \"nowhere\"\n",
        );
        assert_eq!(
            e,
            vec!["t.toml: route[0].relay: \"nowhere\" is not host:port"]
        );
    }

    #[test]
    fn env_keys_replace_file_keys() {
        let c = Config::from_toml(
            "t.toml",
            "profile = \"development\"\n[auth]\napi_keys = [\"0123456789\"]\n",
            Some("aaaaaaaaaa, bbbbbbbbbb"),
        )
        .unwrap();
        assert_eq!(c.auth.api_keys, vec!["aaaaaaaaaa", "bbbbbbbbbb"]);
        let e = errors("");
        assert!(e[0].contains("auth.api_keys: no API key"), "{e:?}");
    }

    #[test]
    fn message_bounce_secrets_and_dkim_are_checked() {
        let e = errors(
            "profile = \"development\"\n[auth]\napi_keys = [\"0123456789\"]\n\
             [bounce]\ndomain = \"not a domain\"\nlocal_part = \"a+b\"\n\
             [message]\nunsubscribe_url = \"ftp://x\"\nunsubscribe_mailto = \"u+x@example.com\"\nfeedback_sender_id = \"a:b\"\n\
             [secrets]\ntoken_keys = [\"short\"]\n\
             [[dkim]]\ndomain = \"example.com\"\nselector = \"s 1\"\nalgorithm = \"rsa-sha256\"\nkey_file = \"k.pem\"\n\
             [[dkim]]\ndomain = \"example.com\"\nselector = \"s2\"\nalgorithm = \"rsa-sha256\"\nkey_file = \"k.pem\"\n\
             [[dkim]]\ndomain = \"Example.com\"\nselector = \"s2\"\nalgorithm = \"ed25519-sha256\"\nkey_file = \"k.pem\"\n",
        );
        let keys: Vec<&str> = e
            .iter()
            .map(|m| m.split(": ").nth(1).unwrap_or(""))
            .collect();
        assert_eq!(
            keys,
            vec![
                "bounce.domain",
                "bounce.local_part",
                "message.unsubscribe_url",
                "message.unsubscribe_mailto",
                "message.feedback_sender_id",
                "secrets.token_keys[0]",
                "dkim[0].selector",
                "dkim[2]",
            ],
            "{e:#?}"
        );
        let e = errors(
            "profile = \"development\"\n[auth]\napi_keys = [\"0123456789\"]\n[[dkim]]\ndomain = \"example.com\"\nselector = \"s\"\nalgorithm = \"rsa\"\nkey_file = \"k\"\n",
        );
        assert!(e[0].starts_with("t.toml: dkim[0].algorithm"), "{e:?}");
        let c = Config::from_toml(
            "t.toml",
            "profile = \"development\"\n[auth]\napi_keys = [\"0123456789\"]\n",
            None,
        )
        .unwrap();
        assert!(c.uses_example_token_key());
        assert_eq!(c.bounce.local_part, "bounce");
    }

    #[test]
    fn production_refuses_the_example_secrets() {
        let e = errors("[auth]\napi_keys = [\"change-me\", \"0123456789\"]\n");
        assert_eq!(e.len(), 2, "{e:?}");
        assert!(e[0].starts_with("t.toml: auth.api_keys[0]: "), "{e:?}");
        assert!(e[1].starts_with("t.toml: secrets.token_keys: "), "{e:?}");
        assert!(e[1].contains("profile = \"development\""), "{e:?}");
        let own = "[auth]\napi_keys = [\"0123456789\"]\n[secrets]\ntoken_keys = [\"0123456789abcdef0123\"]\n";
        assert!(errors(own).is_empty());
        let c = Config::from_toml("t.toml", own, None).unwrap();
        assert_eq!(c.profile, Profile::Production);
        // The environment's keys count, not the file's.
        let c = Config::parse(
            "t.toml",
            "[auth]\napi_keys = [\"change-me\"]\n",
            Some("0123456789"),
            Some("0123456789abcdef0123"),
        )
        .unwrap();
        assert!(!c.uses_example_key() && !c.uses_example_token_key());
        assert!(
            errors("profile = \"development\"\n[auth]\napi_keys = [\"change-me\"]\n").is_empty()
        );
        let e = errors("profile = \"staging\"\n[auth]\napi_keys = [\"0123456789\"]\n");
        assert!(e[0].starts_with("t.toml: profile"), "{e:?}");
        // Every domain to one sink: development only.
        let sink = "[[route]]\ndomain = \"*\"\nrelay = \"127.0.0.1:2525\"\n";
        let e = errors(&format!("{own}{sink}"));
        assert_eq!(e.len(), 1, "{e:?}");
        assert!(
            e[0].starts_with(
                "t.toml: route[0].domain: \"*\" sends every domain's mail to 127.0.0.1:2525"
            ),
            "{e:?}"
        );
        assert!(errors(&format!("profile = \"development\"\n{own}{sink}")).is_empty());
    }
}
