//! The delivery engine: from due jobs in the queue index to SMTP transactions and outcomes.
//!
//! Owns sites, lanes, the connection pool, throttles, retries and expiry. It reads job records
//! from the spool on the blocking pool and writes outcome updates through one batching task; it
//! never blocks a tokio worker and never holds a lock across an `.await`.
//!
//! * A **site** is the set of MX hosts a domain resolves to (or a static relay), so all domains a
//!   provider hosts share one set of limits. Shaping comes from `[shaping]` overlaid by the first
//!   `[[rule]]` matching the domain or one of the MX hosts.
//! * The **coordinator** takes domains whose next job is due from the queue index, resolves them
//!   to a site and attaches them to it. DNS failures are decided per domain at once: NXDOMAIN and
//!   null MX bounce the due jobs, temporary failures defer them.
//! * A site runs up to `max_connections` **lanes**. A lane owns one connection at a time, takes
//!   jobs round-robin from the site's domains, and sends them. Throttles answer "not before T":
//!   a short wait is taken holding only the connection; a long one ends the lane and the site's
//!   domains are rescheduled for T. Nothing waits while holding a job.
//! * Idle connections stay in the site's pool up to `idle_timeout`, and are reused up to
//!   `max_messages_per_connection` transactions.
//! * A site whose connections fail is backed off (doubling up to `site_backoff_max`), deferring
//!   one batch per failure so that every recipient's log shows what happened.

pub mod log;
pub mod stats;

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::sync::{Arc, LazyLock, Mutex};
use std::time::{Duration, Instant, UNIX_EPOCH};

use governor::clock::Clock;
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use prometheus::{
    Histogram, IntCounter, IntCounterVec, register_histogram, register_int_counter_vec,
};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::campaign::{Campaign, CampaignState};
use crate::config::{Config, Rate, Shaping};
use crate::dns::{Dns, DnsFailure, MxHost};
use crate::node::Node;
use crate::outcome::{self, Outcome, Verdict};
use crate::queue::{DomainId, PendingJob};
use crate::smtp::client::{ClientSettings, Connection, Envelope, SmtpError, Timeouts, TlsMode};
use crate::smtp::reply::{Command, EnhancedCode};
use crate::spool::{Durability, JobId, JobRecord, JobState};
use log::{DeliveryLog, LogRecord};

static ATTEMPTS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register_int_counter_vec!(
        "sluice_delivery_attempts_total",
        "Delivery attempts by verdict (delivered, deferred, bounced, expired) and site label. rate() of delivered is throughput.",
        &["verdict", "site"]
    )
    .expect("metric registers once")
});

static CONNECTIONS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register_int_counter_vec!(
        "sluice_smtp_connections_total",
        "Outbound SMTP connection attempts by result (ok, failed) and site label. A high failed share means an unreachable site.",
        &["result", "site"]
    )
    .expect("metric registers once")
});

pub(crate) static TRANSACTION_SECONDS: LazyLock<Histogram> = LazyLock::new(|| {
    register_histogram!(
        "sluice_smtp_transaction_seconds",
        "Duration of one SMTP transaction (MAIL to the reply to the final dot) on an open connection.",
        prometheus::exponential_buckets(0.0005, 2.0, 18).expect("static buckets")
    )
    .expect("metric registers once")
});

pub(crate) static ASSEMBLY_SECONDS: LazyLock<Histogram> = LazyLock::new(|| {
    register_histogram!(
        "sluice_message_assembly_seconds",
        "Time to render, build and DKIM-sign one message, including the wait for a free assembly slot. Rising values with flat signing time mean the CPU is saturated.",
        prometheus::exponential_buckets(0.00005, 2.0, 18).expect("static buckets")
    )
    .expect("metric registers once")
});

pub(crate) static SUPPRESSED_AT_DELIVERY: LazyLock<IntCounter> = LazyLock::new(|| {
    prometheus::register_int_counter!(
        "sluice_recipients_suppressed_at_delivery_total",
        "Queued recipients dropped just before delivery because a suppression was added after they were accepted."
    )
    .expect("metric registers once")
});

static FAILURES: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register_int_counter_vec!(
        "sluice_delivery_failures_total",
        "Failed attempts by verdict (deferred, bounced, expired), bounce category (config/bounce-rules.toml) and site label. A rise of bad-mailbox means a stale list; spam-related or policy-related, a reputation or authentication problem.",
        &["verdict", "category", "site"]
    )
    .expect("metric registers once")
});

static REPLIES: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register_int_counter_vec!(
        "sluice_smtp_replies_total",
        "Replies that decided an attempt, by class (2xx, 4xx, 5xx; none: no reply, e.g. a timeout or a refused connection) and site label.",
        &["class", "site"]
    )
    .expect("metric registers once")
});

pub(crate) static LATENCY_SECONDS: LazyLock<Histogram> = LazyLock::new(|| {
    register_histogram!(
        "sluice_delivery_latency_seconds",
        "Time from acceptance (the 202) to delivery, per delivered recipient, retries included. The high quantiles show how long deferred mail waits.",
        vec![
            0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0, 14400.0,
            43200.0, 86400.0, 259200.0
        ]
    )
    .expect("metric registers once")
});

/// Jobs a lane takes at once when no message rate applies.
const LANE_BATCH: usize = 8;
/// Campaigns whose templates and attachments come to at most this many bytes, and whose From
/// domain has no RSA key, are assembled on the delivery task itself rather than the blocking pool.
const INLINE_ASSEMBLY_BYTES: usize = 32 * 1024;
/// Jobs deferred per failed connection round of a site.
const FAIL_BATCH: usize = 32;
/// A throttle wait up to this long is taken inside the lane; longer ends the lane.
const MAX_LANE_WAIT: Duration = Duration::from_secs(1);
/// A domain with no queued or in-flight jobs is forgotten after this long.
const DOMAIN_IDLE_EVICT_MS: u64 = 60_000;
/// An empty site (no lanes, no domains, no idle connections) is forgotten after this long.
const SITE_IDLE_EVICT: Duration = Duration::from_secs(600);

/// One destination host of a site.
#[derive(Debug, Clone)]
struct Target {
    name: String,
    port: u16,
    preference: u16,
}

struct Site {
    key: String,
    stats: Arc<stats::SiteStats>,
    targets: Vec<Target>,
    shaping: Shaping,
    message_rate: Option<DefaultDirectRateLimiter>,
    connection_rate: Option<DefaultDirectRateLimiter>,
    inner: Mutex<SiteInner>,
}

struct SiteInner {
    /// Domains attached to this site with jobs to take, served round-robin.
    active: VecDeque<DomainId>,
    lanes: u32,
    idle: Vec<stats::Held>,
    failures: u32,
    backoff_until_ms: u64,
    last_activity: Instant,
}

fn limiter(rate: Rate) -> DefaultDirectRateLimiter {
    let period = (rate.per / rate.count).max(Duration::from_nanos(1));
    // A burst of about 100 ms of traffic: smooth at the receiver, without stalls on jitter.
    let burst = ((f64::from(rate.count) / rate.per.as_secs_f64()) * 0.1)
        .floor()
        .max(1.0) as u32;
    let quota = Quota::with_period(period)
        .expect("period is non-zero")
        .allow_burst(NonZeroU32::new(burst).expect("burst ≥ 1"));
    RateLimiter::direct(quota)
}

/// `None` when allowed now, else how long to wait.
fn throttle(l: &Option<DefaultDirectRateLimiter>) -> Option<Duration> {
    let l = l.as_ref()?;
    // The wait must be measured on the limiter's own clock: instants of another clock instance
    // are not comparable.
    l.check()
        .err()
        .map(|not_until| not_until.wait_time_from(l.clock().now()))
}

impl Site {
    /// Takes up to `max` due jobs, round-robin over the site's domains; domains with nothing due
    /// go back to the schedule.
    fn pop(&self, node: &Node, now_ms: u64, max: usize) -> Vec<PendingJob> {
        let mut g = self.inner.lock().expect("site lock");
        g.last_activity = Instant::now();
        let mut queue = node.queue.lock().expect("queue lock");
        for _ in 0..g.active.len() {
            let Some(d) = g.active.pop_front() else { break };
            if queue.is_parked(d) {
                continue;
            }
            let jobs = queue.pop_due(d, now_ms, max);
            if jobs.is_empty() {
                queue.deactivate(d, 0);
                continue;
            }
            g.active.push_back(d);
            return jobs;
        }
        Vec::new()
    }

    fn has_work(&self) -> bool {
        !self.inner.lock().expect("site lock").active.is_empty()
    }

    fn take_idle(&self) -> Option<stats::Held> {
        self.inner
            .lock()
            .expect("site lock")
            .idle
            .pop()
            .map(stats::Held::busy)
    }

    fn view(&self) -> stats::SiteView {
        let g = self.inner.lock().expect("site lock");
        stats::SiteView {
            key: self.key.clone(),
            stats: Arc::clone(&self.stats),
            max_connections: self.shaping.max_connections,
            lanes: g.lanes,
            backoff_until_ms: g.backoff_until_ms,
        }
    }
}

/// Messages to the outcome writer.
enum Update {
    /// A job's new record, and the event reporting it for webhook receivers that want it.
    Job(JobId, Vec<u8>, Option<(Vec<u32>, Vec<u8>)>),
    /// A suppression record (key, value), already in the in-memory index.
    Suppress(Vec<u8>, Vec<u8>),
    Close(oneshot::Sender<()>),
}

/// A job read back from the spool and checked, ready to attempt.
struct Prepared {
    job: PendingJob,
    campaign: Arc<Campaign>,
    bytes: Vec<u8>,
    /// The VERP envelope sender, computed once for the attempt and its log record.
    sender: String,
}

pub struct Delivery {
    node: Arc<Node>,
    config: Arc<Config>,
    dns: Dns,
    client: ClientSettings,
    sites: Mutex<HashMap<String, Arc<Site>>>,
    /// The site key each domain was last resolved to, for reports.
    domain_sites: Mutex<HashMap<String, String>>,
    labels: stats::Labels,
    updates: mpsc::Sender<Update>,
    log: DeliveryLog,
    stop: CancellationToken,
    lanes: TaskTracker,
    background: TaskTracker,
    /// Messages being assembled at once on the blocking pool: one per core, so signing uses the
    /// CPU fully without queueing unbounded work behind it.
    assembly_slots: tokio::sync::Semaphore,
}

impl Delivery {
    /// Starts the coordinator, the outcome writer and the pool sweeper.
    pub fn start(node: Arc<Node>) -> Result<Arc<Delivery>, String> {
        let config = Arc::clone(&node.config);
        let d = &config.delivery;
        let dns = Dns::new(&config.dns.nameservers, config.dns.timeout)?;
        let timeouts = Timeouts {
            connect: d.connect_timeout,
            greeting: d.greeting_timeout,
            command: d.command_timeout,
            data_init: d.data_init_timeout,
            data_block: d.data_block_timeout,
            data_final: d.data_final_timeout,
        };
        let log = node.log.clone();
        let (tx, rx) = mpsc::channel(16_384);
        let delivery = Arc::new(Delivery {
            client: ClientSettings::new(d.ehlo_name.clone(), timeouts),
            node: Arc::clone(&node),
            config: Arc::clone(&config),
            dns,
            sites: Mutex::new(HashMap::new()),
            domain_sites: Mutex::new(HashMap::new()),
            labels: stats::Labels::default(),
            updates: tx,
            log,
            stop: CancellationToken::new(),
            lanes: TaskTracker::new(),
            background: TaskTracker::new(),
            assembly_slots: tokio::sync::Semaphore::new(
                std::thread::available_parallelism().map_or(2, |n| n.get()),
            ),
        });
        delivery
            .background
            .spawn(write_updates(Arc::clone(&node), rx));
        delivery
            .background
            .spawn(Arc::clone(&delivery).coordinate());
        delivery.background.spawn(Arc::clone(&delivery).sweep());
        delivery
            .background
            .spawn(Arc::clone(&delivery).publish_stats());
        let _ = node.delivery.set(Arc::downgrade(&delivery));
        Ok(delivery)
    }

    /// Stops taking work, lets in-flight transactions finish (for up to
    /// `delivery.shutdown_timeout`), and writes every outcome.
    pub async fn shutdown(&self) {
        self.stop.cancel();
        self.lanes.close();
        let limit = self.config.delivery.shutdown_timeout;
        if tokio::time::timeout(limit, self.lanes.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                lanes = self.lanes.len(),
                "SMTP transactions still under way after {limit:?}; abandoned, their recipients stay queued"
            );
        }
        let idle: Vec<stats::Held> = {
            let sites = self.sites.lock().expect("sites lock");
            sites
                .values()
                .flat_map(|s| std::mem::take(&mut s.inner.lock().expect("site lock").idle))
                .collect()
        };
        for c in idle {
            c.quit().await;
        }
        let (tx, rx) = oneshot::channel();
        if self.updates.send(Update::Close(tx)).await.is_ok() {
            let _ = rx.await;
        }
        self.background.close();
        self.background.wait().await;
    }

    async fn coordinate(self: Arc<Self>) {
        loop {
            let now = crate::now_ms();
            let (due, next) = self
                .node
                .queue
                .lock()
                .expect("queue lock")
                .take_due_domains(now, 512);
            let busy = !due.is_empty();
            for d in due {
                self.lanes.spawn(Arc::clone(&self).activate(d));
            }
            if busy {
                tokio::task::yield_now().await;
                continue;
            }
            let wait = next.map_or(1000, |t| t.saturating_sub(now)).min(1000);
            tokio::select! {
                _ = self.stop.cancelled() => break,
                _ = self.node.wake.notified() => {}
                _ = tokio::time::sleep(Duration::from_millis(wait)) => {}
            }
        }
    }

    /// Resolves a newly due domain to its site and starts serving it.
    async fn activate(self: Arc<Self>, d: DomainId) {
        let name = self
            .node
            .queue
            .lock()
            .expect("queue lock")
            .domain_name(d)
            .to_owned();
        if self.node.is_suspended(&name) {
            self.node
                .queue
                .lock()
                .expect("queue lock")
                .set_parked(d, true);
            return;
        }
        match self.site_for(&name).await {
            Ok(site) => {
                self.domain_sites
                    .lock()
                    .expect("domain sites lock")
                    .insert(name, site.key.clone());
                site.inner.lock().expect("site lock").active.push_back(d);
                self.ensure_lanes(&site);
            }
            Err(failure) => {
                let outcome = outcome::from_dns(&failure);
                loop {
                    let jobs = self.node.queue.lock().expect("queue lock").pop_due(
                        d,
                        crate::now_ms(),
                        256,
                    );
                    if jobs.is_empty() || self.stop.is_cancelled() {
                        break;
                    }
                    for p in self.prepare(jobs, None).await {
                        self.finish(&p, outcome.clone(), None, None, 0).await;
                    }
                }
                self.node.queue.lock().expect("queue lock").deactivate(d, 0);
            }
        }
    }

    async fn site_for(&self, domain: &str) -> Result<Arc<Site>, DnsFailure> {
        let route = self.config.routes.iter().find(|r| {
            let p = r.domain.to_ascii_lowercase();
            match p.strip_prefix("*.") {
                Some(s) => domain.ends_with(&format!(".{s}")),
                None => p == domain,
            }
        });
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
        let site = Arc::new(Site {
            key: key.clone(),
            stats: Arc::new(stats::SiteStats::new(label)),
            message_rate: shaping.message_rate.map(limiter),
            connection_rate: shaping.connection_rate.map(limiter),
            targets,
            shaping,
            inner: Mutex::new(SiteInner {
                active: VecDeque::new(),
                lanes: 0,
                idle: Vec::new(),
                failures: 0,
                backoff_until_ms: 0,
                last_activity: Instant::now(),
            }),
        });
        sites.insert(key, Arc::clone(&site));
        Ok(site)
    }

    /// Starts one more lane if the site has work, room and is not backed off.
    fn ensure_lanes(self: &Arc<Self>, site: &Arc<Site>) {
        let mut g = site.inner.lock().expect("site lock");
        if g.active.is_empty()
            || g.lanes >= site.shaping.max_connections
            || self.stop.is_cancelled()
        {
            return;
        }
        let now = crate::now_ms();
        if now < g.backoff_until_ms {
            let until = g.backoff_until_ms;
            let mut queue = self.node.queue.lock().expect("queue lock");
            for d in g.active.drain(..) {
                queue.deactivate(d, until);
            }
            return;
        }
        g.lanes += 1;
        drop(g);
        self.lanes.spawn(Arc::clone(self).lane(Arc::clone(site)));
    }

    async fn lane(self: Arc<Self>, site: Arc<Site>) {
        let mut conn: Option<stats::Held> = None;
        let mut not_before = 0u64;
        let batch = if site.message_rate.is_some() {
            1
        } else {
            LANE_BATCH
        };
        'lane: while !self.stop.is_cancelled() {
            if let Some(wait) = throttle(&site.message_rate) {
                if wait <= MAX_LANE_WAIT {
                    tokio::time::sleep(wait).await;
                    continue;
                }
                not_before = crate::now_ms() + wait.as_millis() as u64;
                break;
            }
            let jobs = site.pop(&self.node, crate::now_ms(), batch);
            if jobs.is_empty() {
                break;
            }
            let _in_flight = site.stats.hold(jobs.len());
            if site.has_work() {
                self.ensure_lanes(&site);
            }
            let mut prepared = self.prepare(jobs, Some(&site)).await;
            let max_rcpt = site.shaping.max_recipients_per_message as usize;
            let mut _topped_up = None;
            if max_rcpt > 1
                && let Some(first) = prepared.first()
                && !first.campaign.record.personalised
                && prepared.len() < max_rcpt
            {
                // Not personalised: one message can go to several recipients of this domain,
                // so take more of its jobs for the transaction.
                let more = self.pop_domain(first.job.domain, max_rcpt - prepared.len());
                _topped_up = Some(site.stats.hold(more.len()));
                prepared.extend(self.prepare(more, Some(&site)).await);
            }
            let mut groups = group_recipients(prepared, max_rcpt).into_iter();
            while let Some(g) = groups.next() {
                if self.stop.is_cancelled() {
                    // Stopping: the transaction under way has finished; the rest stays queued.
                    self.requeue(g.into_iter().chain(groups.flatten()));
                    break 'lane;
                }
                // A connection: the current one if still good, else a pooled one, else a new one.
                let fresh = conn.as_ref().is_some_and(|c| {
                    c.is_reusable() && c.transactions < site.shaping.max_messages_per_connection
                });
                if !fresh {
                    if let Some(old) = conn.take() {
                        // Closed before a new one opens, so max_connections holds at the receiver.
                        old.quit().await;
                    }
                    conn = site.take_idle();
                    if conn.is_none() {
                        if let Some(wait) = throttle(&site.connection_rate) {
                            // Put the jobs back untouched; the site is retried when allowed.
                            self.requeue(g.into_iter().chain(groups.flatten()));
                            not_before = crate::now_ms() + wait.as_millis() as u64;
                            break 'lane;
                        }
                        match self.connect(&site).await {
                            Ok(c) => {
                                CONNECTIONS
                                    .with_label_values(&["ok", &site.stats.label])
                                    .inc();
                                site.inner.lock().expect("site lock").failures = 0;
                                conn = Some(site.stats.track(c));
                            }
                            Err(o) => {
                                CONNECTIONS
                                    .with_label_values(&["failed", &site.stats.label])
                                    .inc();
                                let mut rest: Vec<Prepared> =
                                    g.into_iter().chain(groups.flatten()).collect();
                                let more = site.pop(
                                    &self.node,
                                    crate::now_ms(),
                                    FAIL_BATCH.saturating_sub(rest.len()),
                                );
                                let _more = site.stats.hold(more.len());
                                rest.extend(self.prepare(more, Some(&site)).await);
                                for p in rest {
                                    self.finish(&p, o.clone(), Some(&site), None, 0).await;
                                }
                                not_before = self.site_failed(&site);
                                break 'lane;
                            }
                        }
                    }
                }
                let Some(c) = conn.as_mut() else { break 'lane };
                self.attempt(g, &site, c).await;
            }
        }
        if let Some(c) = conn {
            if c.is_reusable()
                && c.transactions < site.shaping.max_messages_per_connection
                && !self.stop.is_cancelled()
            {
                site.inner.lock().expect("site lock").idle.push(c.idle());
            } else {
                c.quit().await;
            }
        }
        let again = {
            let mut g = site.inner.lock().expect("site lock");
            g.lanes -= 1;
            if g.lanes == 0 && !g.active.is_empty() {
                if not_before > crate::now_ms() || self.stop.is_cancelled() {
                    let mut queue = self.node.queue.lock().expect("queue lock");
                    for d in g.active.drain(..) {
                        queue.deactivate(d, not_before);
                    }
                    false
                } else {
                    true
                }
            } else {
                false
            }
        };
        if again {
            self.ensure_lanes(&site);
        }
    }

    /// Records a failed connection round and returns the time the site may be tried again.
    fn site_failed(&self, site: &Site) -> u64 {
        let d = &self.config.delivery;
        let mut g = site.inner.lock().expect("site lock");
        g.failures = g.failures.saturating_add(1);
        let factor = 1u32 << (g.failures - 1).min(16);
        let backoff = d
            .site_backoff
            .saturating_mul(factor)
            .min(d.site_backoff_max);
        g.backoff_until_ms = crate::now_ms() + backoff.as_millis() as u64;
        tracing::info!(site = %site.key, failures = g.failures, backoff = ?backoff, "site unreachable; backing off");
        g.backoff_until_ms
    }

    /// Opens a connection to the site: MX hosts in preference order (equal ones shuffled), each
    /// address in turn, moving on only when connecting or the greeting fails.
    async fn connect(&self, site: &Site) -> Result<Connection, Outcome> {
        let mut hosts: Vec<MxHost> = site
            .targets
            .iter()
            .map(|t| MxHost {
                name: t.name.clone(),
                preference: t.preference,
            })
            .collect();
        crate::dns::order_mx(&mut hosts);
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
                let source = self.config.delivery.source_ip;
                match Connection::open(peer, source, &target.name, tls, &self.client).await {
                    Ok(c) => return Ok(c),
                    Err(SmtpError::Tls(e)) if tls == TlsMode::Opportunistic => {
                        tracing::debug!(host = %target.name, error = %e, "TLS handshake failed; retrying in plain text");
                        match Connection::open(
                            peer,
                            source,
                            &target.name,
                            TlsMode::Disabled,
                            &self.client,
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

    /// Reads the jobs' records and sorts out those that must not be attempted: paused campaigns
    /// (parked), cancelled ones, expired jobs.
    async fn prepare(&self, jobs: Vec<PendingJob>, site: Option<&Site>) -> Vec<Prepared> {
        if jobs.is_empty() {
            return Vec::new();
        }
        let node = Arc::clone(&self.node);
        let ids: Vec<JobId> = jobs.iter().map(|j| j.id).collect();
        let records = match tokio::task::spawn_blocking(move || node.spool.get_jobs(&ids)).await {
            Ok(Ok(r)) => r,
            Ok(Err(e)) => {
                tracing::error!(error = %e, "reading job records failed; retrying later");
                self.requeue_jobs(jobs, crate::now_ms() + 5_000);
                return Vec::new();
            }
            Err(e) => {
                tracing::error!(error = %e, "job read task failed; retrying later");
                self.requeue_jobs(jobs, crate::now_ms() + 5_000);
                return Vec::new();
            }
        };
        let mut out = Vec::with_capacity(jobs.len());
        for (job, bytes) in jobs.into_iter().zip(records) {
            let Some(bytes) = bytes else {
                self.release(&job);
                continue;
            };
            let Some(campaign) = self.node.campaigns.by_seq(job.id.campaign) else {
                tracing::warn!(job = %job.id, "job without a campaign; skipped");
                self.release(&job);
                continue;
            };
            let rec = match JobRecord::decode(&bytes) {
                Ok(r) => r,
                Err(e) => {
                    tracing::error!(job = %job.id, error = %e, "corrupt job record; skipped");
                    self.release(&job);
                    continue;
                }
            };
            if rec.state != JobState::Queued {
                self.release(&job);
                continue;
            }
            match campaign.state() {
                CampaignState::Paused => {
                    let mut parked = self.node.parked.lock().expect("parked lock");
                    if campaign.state() == CampaignState::Paused {
                        parked.entry(job.id.campaign).or_default().push(job);
                    } else {
                        drop(parked);
                        self.requeue_jobs(vec![job], job.due_ms);
                    }
                    continue;
                }
                CampaignState::Cancelled => {
                    let last = rec.last_response;
                    self.end_unsent(&job, rec, JobState::Cancelled, last).await;
                    continue;
                }
                CampaignState::Active => {}
            }
            // Checked again here: a suppression added after ingest stops queued mail.
            let from_domain = crate::address::domain_of(&campaign.record.from);
            if let Some(reason) = self.node.suppressions.check(rec.address, from_domain) {
                let counts = &campaign.counts;
                counts.shift(
                    counts.slot(JobState::Queued, rec.attempts),
                    &counts.suppressed,
                );
                SUPPRESSED_AT_DELIVERY.inc();
                self.end_unsent(&job, rec, JobState::Suppressed, reason.as_str())
                    .await;
                continue;
            }
            let age = crate::now_ms().saturating_sub(rec.accepted_at_ms);
            let expired = age >= self.config.delivery.max_age.as_millis() as u64;
            let last = rec.last_response.to_owned();
            let sender = self
                .node
                .assembler
                .envelope_sender(&campaign.record, job.id);
            let p = Prepared {
                job,
                campaign,
                bytes,
                sender,
            };
            if expired {
                self.finish(&p, outcome::expired(&last), site, None, 0)
                    .await;
                continue;
            }
            out.push(p);
        }
        out
    }

    fn requeue(&self, jobs: impl Iterator<Item = Prepared>) {
        let jobs: Vec<PendingJob> = jobs.map(|p| p.job).collect();
        let mut queue = self.node.queue.lock().expect("queue lock");
        for j in jobs {
            queue.push_back(j);
        }
    }

    fn requeue_jobs(&self, jobs: Vec<PendingJob>, due_ms: u64) {
        let mut queue = self.node.queue.lock().expect("queue lock");
        for j in jobs {
            queue.push_back(PendingJob { due_ms, ..j });
        }
    }

    /// Ends a popped job without sending it: records its final `state` and lets it go.
    async fn end_unsent<'a>(
        &self,
        job: &PendingJob,
        rec: JobRecord<'a>,
        state: JobState,
        last_response: &'a str,
    ) {
        let updated = JobRecord {
            state,
            last_response,
            ..rec
        }
        .encode();
        let _ = self.updates.send(Update::Job(job.id, updated, None)).await;
        self.release(job);
    }

    /// A popped job leaves the engine for good (final state, or nothing to do).
    fn release(&self, job: &PendingJob) {
        self.node
            .queue
            .lock()
            .expect("queue lock")
            .release(job.domain, 1);
    }

    /// Renders and sends one message on `conn` to the group's recipients (one job, or several
    /// of a campaign that is not personalised), then records each one's outcome.
    async fn attempt(&self, mut group: Vec<Prepared>, site: &Site, conn: &mut Connection) {
        let mut addresses = Vec::with_capacity(group.len());
        group.retain(|p| match JobRecord::decode(&p.bytes) {
            Ok(rec) => {
                addresses.push(rec.address.to_owned());
                true
            }
            Err(_) => {
                self.release(&p.job);
                false
            }
        });
        let Some(lead) = group.first() else { return };
        // Every message of a campaign that is not personalised has the shared form, also when
        // one recipient happens to go alone: what a recipient gets must not depend on timing.
        let merged = !lead.campaign.record.personalised;
        let record = &lead.campaign.record;
        let rendered = match self.assemble(lead, merged).await {
            Ok(r) => r,
            Err(o) => return self.finish_all(&group, |_| o.clone(), site, None, 0).await,
        };
        let size = rendered.bytes.len();
        let smtputf8 = !record.from.is_ascii() || addresses.iter().any(|a| !a.is_ascii());
        if smtputf8 && !conn.capabilities.smtputf8 {
            let o = outcome::local_failure(
                EnhancedCode(5, 6, 7),
                "the address needs SMTPUTF8, which the server does not offer",
                Command::Mail,
            );
            return self
                .finish_all(&group, |_| o.clone(), site, Some(conn), size)
                .await;
        }
        if let Some(limit) = conn.capabilities.size
            && limit > 0
            && size as u64 > limit
        {
            let o = outcome::local_failure(
                EnhancedCode(5, 3, 4),
                format!("message of {size} bytes exceeds the server's limit of {limit}"),
                Command::Mail,
            );
            return self
                .finish_all(&group, |_| o.clone(), site, Some(conn), size)
                .await;
        }
        // Every recipient of a merged message is sent with the lead's envelope sender.
        let sender = lead.sender.clone();
        for p in group.iter_mut().skip(1) {
            p.sender.clone_from(&sender);
        }
        let recipients: Vec<&str> = addresses.iter().map(String::as_str).collect();
        let env = Envelope {
            sender: &sender,
            recipients: &recipients,
            smtputf8,
            eight_bit: rendered.eight_bit,
        };
        let started = Instant::now();
        let result = conn.send(&env, &rendered.bytes).await;
        TRANSACTION_SECONDS.observe(started.elapsed().as_secs_f64());
        let outcomes: Vec<Outcome> = match result {
            Ok(replies) => (0..group.len())
                .map(|i| match replies.get(i) {
                    Some(r) => outcome::from_reply(r),
                    None => outcome::local_failure(
                        EnhancedCode(4, 0, 0),
                        "no reply for the recipient",
                        Command::Rcpt,
                    ),
                })
                .collect(),
            Err(e) => vec![outcome::from_error(&e); group.len()],
        };
        self.finish_all(&group, |i| outcomes[i].clone(), site, Some(conn), size)
            .await;
    }

    /// [`Delivery::finish`] for each job of a group, with the outcome `outcome(i)` of the i-th.
    async fn finish_all(
        &self,
        group: &[Prepared],
        outcome: impl Fn(usize) -> Outcome,
        site: &Site,
        conn: Option<&Connection>,
        size: usize,
    ) {
        for (i, p) in group.iter().enumerate() {
            self.finish(p, outcome(i), Some(site), conn, size).await;
        }
    }

    /// Takes up to `max` more due jobs of `domain` for a merged message (none if the domain
    /// was suspended meanwhile).
    fn pop_domain(&self, domain: DomainId, max: usize) -> Vec<PendingJob> {
        let mut queue = self.node.queue.lock().expect("queue lock");
        if queue.is_parked(domain) {
            return Vec::new();
        }
        queue.pop_due(domain, crate::now_ms(), max)
    }

    /// Renders, builds and signs a job's message. RSA signing (a quarter of a millisecond to one,
    /// by CPU) and large templates go to the blocking pool, at most one per core at a time; a
    /// small message without an RSA key (tens of microseconds) is assembled right here, which
    /// spares two thread hand-offs per message. A failure is the outcome.
    ///
    /// With `merged`, the message is the campaign's shared one for several recipients, led by
    /// `p` ([`crate::render::Assembler::assemble_merged`]).
    async fn assemble(
        &self,
        p: &Prepared,
        merged: bool,
    ) -> Result<crate::render::Rendered, Outcome> {
        let compiled = p.campaign.compiled().map_err(|e| {
            outcome::local_failure(
                EnhancedCode(5, 6, 0),
                format!("message could not be rendered: {e}"),
                Command::Data,
            )
        })?;
        let job = p.job.id;
        let record = &p.campaign.record;
        let started = Instant::now();
        let inline = record.template_bytes() <= INLINE_ASSEMBLY_BYTES
            && !self
                .node
                .assembler
                .signs_with_rsa(crate::address::domain_of(&record.from));
        let result = if inline {
            Ok(self
                .node
                .assembler
                .assemble_job(record, &compiled, job, &p.bytes, merged))
        } else {
            let _permit = self
                .assembly_slots
                .acquire()
                .await
                .expect("the assembly semaphore is never closed");
            let node = Arc::clone(&self.node);
            let campaign = Arc::clone(&p.campaign);
            let bytes = p.bytes.clone();
            tokio::task::spawn_blocking(move || {
                node.assembler
                    .assemble_job(&campaign.record, &compiled, job, &bytes, merged)
            })
            .await
        };
        ASSEMBLY_SECONDS.observe(started.elapsed().as_secs_f64());
        match result {
            Ok(Ok(r)) => Ok(r),
            Ok(Err(crate::render::AssembleError::Render(e))) => Err(outcome::local_failure(
                EnhancedCode(5, 6, 0),
                format!("message could not be rendered: {e}"),
                Command::Data,
            )),
            Ok(Err(crate::render::AssembleError::Sign(e))) => {
                tracing::error!(error = %e, "DKIM signing failed; the message waits");
                Err(outcome::local_failure(
                    EnhancedCode(4, 7, 0),
                    e.to_string(),
                    Command::Data,
                ))
            }
            Err(e) => Err(outcome::local_failure(
                EnhancedCode(4, 3, 0),
                format!("message assembly did not finish: {e}"),
                Command::Data,
            )),
        }
    }

    /// Applies an outcome: new job state, counts, retry schedule, spool update, log record.
    async fn finish(
        &self,
        p: &Prepared,
        o: Outcome,
        site: Option<&Site>,
        conn: Option<&Connection>,
        size: usize,
    ) {
        let Ok(rec) = JobRecord::decode(&p.bytes) else {
            return self.release(&p.job);
        };
        let d = &self.config.delivery;
        let now = crate::now_ms();
        let attempt = rec.attempts.saturating_add(1);
        let rules = self.node.rules();
        let mut o = outcome::classify(o, &rules);
        if o.verdict == Verdict::Deferred
            && now.saturating_sub(rec.accepted_at_ms) >= d.max_age.as_millis() as u64
        {
            o = outcome::classify(outcome::expired(&o.summary()), &rules);
        }
        let (state, next) = match o.verdict {
            Verdict::Delivered => (JobState::Delivered, now),
            Verdict::Bounced => (JobState::Bounced, now),
            Verdict::Expired => (JobState::Expired, now),
            Verdict::Deferred => (
                JobState::Queued,
                now + retry_delay(attempt, d.retry_initial, d.retry_max),
            ),
        };
        let summary = o.summary();
        let updated = JobRecord {
            state,
            attempts: attempt,
            next_attempt_ms: next,
            last_response: &summary,
            ..rec.clone()
        };
        let (kind, action) = match o.verdict {
            Verdict::Delivered => ("d", "delivered"),
            Verdict::Deferred => ("t", "delayed"),
            Verdict::Bounced => ("b", "failed"),
            Verdict::Expired => ("x", "failed"),
        };
        let record = LogRecord {
            kind,
            time_queued: rfc3339(rec.accepted_at_ms),
            time_logged: rfc3339(now),
            campaign: p.campaign.record.id.to_string(),
            job: p.job.id.to_string(),
            recipient: rec.address.to_owned(),
            sender: p.sender.clone(),
            dsn_action: action,
            dsn_status: o.status.to_string(),
            reply_code: o.code,
            dsn_diag: o.text.clone(),
            stage: o.stage.to_string(),
            mx_host: conn.map(|c| c.host.clone()),
            mx_ip: conn.map(|c| c.peer.ip().to_string()),
            tls: conn.is_some_and(|c| c.tls),
            size,
            attempt,
            bounce_cat: o.class.map(|c| c.category.as_str()),
            feedback_type: None,
        };
        let event = self.node.webhooks.event(&record);
        let _ = self
            .updates
            .send(Update::Job(p.job.id, updated.encode(), event))
            .await;

        let counts = &p.campaign.counts;
        let from = if p.campaign.state() == CampaignState::Cancelled {
            &counts.cancelled
        } else {
            counts.slot(JobState::Queued, rec.attempts)
        };
        counts.shift(from, counts.slot(state, attempt));
        {
            let mut queue = self.node.queue.lock().expect("queue lock");
            if state == JobState::Queued {
                queue.push_back(PendingJob {
                    due_ms: next,
                    ..p.job
                });
            } else {
                queue.release(p.job.domain, 1);
            }
        }
        let verdict = match o.verdict {
            Verdict::Delivered => "delivered",
            Verdict::Deferred => "deferred",
            Verdict::Bounced => "bounced",
            Verdict::Expired => "expired",
        };
        let label = site.map_or(stats::UNRESOLVED, |s| s.stats.label.as_str());
        ATTEMPTS.with_label_values(&[verdict, label]).inc();
        let class = match o.code.map(|c| c / 100) {
            Some(2) => "2xx",
            Some(3) => "3xx",
            Some(4) => "4xx",
            Some(5) => "5xx",
            Some(_) => "other",
            None => "none",
        };
        REPLIES.with_label_values(&[class, label]).inc();
        if o.verdict == Verdict::Delivered {
            LATENCY_SECONDS.observe(now.saturating_sub(rec.accepted_at_ms) as f64 / 1000.0);
        }
        if let Some(s) = site {
            if o.verdict == Verdict::Delivered {
                s.stats
                    .delivered
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
            s.stats.note_reply(summary.clone());
        }
        if let Some(class) = o.class {
            FAILURES
                .with_label_values(&[verdict, class.category.as_str(), label])
                .inc();
            if o.verdict == Verdict::Bounced && class.suppress {
                self.suppress_bounced(p, rec.address, &o, class.category, now)
                    .await;
            }
        }
        self.log.record(record);
    }

    /// Puts a hard-bounced address on the global suppression list (index now, spool with the
    /// job's update), unless it already is there.
    async fn suppress_bounced(
        &self,
        p: &Prepared,
        address: &str,
        o: &Outcome,
        category: crate::outcome::rules::Category,
        now: u64,
    ) {
        let address = address.to_lowercase();
        if self.node.suppressions.check(&address, "").is_some() {
            return;
        }
        let entry = crate::suppression::Entry {
            address,
            scope: crate::suppression::GLOBAL.to_owned(),
            reason: crate::suppression::Reason::HardBounce,
            created_at_ms: now,
            source: Some("delivery".into()),
            campaign: Some(p.campaign.record.id),
            job: Some(p.job.id.to_string()),
            category: Some(category),
            detail: Some(o.summary()),
        };
        self.node.suppressions.insert(&entry);
        crate::suppression::ADDED
            .with_label_values(&[entry.reason.as_str()])
            .inc();
        let _ = self
            .updates
            .send(Update::Suppress(entry.key(), entry.encode()))
            .await;
    }

    /// Per-site and per-domain statistics (see [`stats::report`]).
    pub async fn report(&self) -> stats::Report {
        let views: Vec<stats::SiteView> = {
            let sites = self.sites.lock().expect("sites lock");
            sites.values().map(|s| s.view()).collect()
        };
        let site_of = |d: &str| {
            self.domain_sites
                .lock()
                .expect("domain sites lock")
                .get(d)
                .cloned()
        };
        stats::report(&self.node, views, &site_of).await
    }

    /// Refreshes the per-site gauges every few seconds, and forgets the site of domains the
    /// queue no longer knows.
    async fn publish_stats(self: Arc<Self>) {
        let mut tick = tokio::time::interval(Duration::from_secs(5));
        let mut labels = std::collections::HashSet::new();
        loop {
            tokio::select! {
                _ = self.stop.cancelled() => break,
                _ = tick.tick() => {}
            }
            let report = self.report().await;
            stats::publish(&report, &mut labels);
            let mut map = self.domain_sites.lock().expect("domain sites lock");
            let queue = self.node.queue.lock().expect("queue lock");
            map.retain(|d, _| queue.find_domain(d).is_some());
        }
    }

    /// Closes idle connections past `idle_timeout` and forgets empty sites.
    async fn sweep(self: Arc<Self>) {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tokio::select! {
                _ = self.stop.cancelled() => break,
                _ = tick.tick() => {}
            }
            let idle_timeout = self.config.delivery.idle_timeout;
            let mut closing = Vec::new();
            {
                let mut sites = self.sites.lock().expect("sites lock");
                sites.retain(|_, site| {
                    site.stats.sample();
                    let mut g = site.inner.lock().expect("site lock");
                    let (old, keep): (Vec<stats::Held>, Vec<stats::Held>) =
                        std::mem::take(&mut g.idle)
                            .into_iter()
                            .partition(|c| c.last_used.elapsed() >= idle_timeout);
                    g.idle = keep;
                    closing.extend(old);
                    !(g.lanes == 0
                        && g.active.is_empty()
                        && g.idle.is_empty()
                        && g.last_activity.elapsed() > SITE_IDLE_EVICT)
                });
            }
            for c in closing {
                tokio::spawn(c.quit());
            }
            let evicted = self
                .node
                .queue
                .lock()
                .expect("queue lock")
                .evict_idle(crate::now_ms(), DOMAIN_IDLE_EVICT_MS);
            if evicted > 0 {
                tracing::debug!(evicted, "idle domains forgotten");
            }
        }
    }
}

/// Splits prepared jobs into transactions: each job alone, except consecutive jobs of one
/// campaign that is not personalised, which share a message up to `max` recipients. An address
/// that needs SMTPUTF8 always goes alone, so a server without it refuses only that one.
fn group_recipients(prepared: Vec<Prepared>, max: usize) -> Vec<Vec<Prepared>> {
    let mergeable = |p: &Prepared| {
        !p.campaign.record.personalised
            && JobRecord::decode(&p.bytes).is_ok_and(|r| r.address.is_ascii())
    };
    let mut groups: Vec<Vec<Prepared>> = Vec::with_capacity(prepared.len());
    for p in prepared {
        if let Some(last) = groups.last_mut()
            && last.len() < max
            && mergeable(&p)
            && mergeable(&last[0])
            && Arc::ptr_eq(&last[0].campaign, &p.campaign)
        {
            last.push(p);
            continue;
        }
        groups.push(vec![p]);
    }
    groups
}

/// `initial · 2^(attempt−1)`, capped at `max`, with ±20% jitter so retries of one burst spread.
pub fn retry_delay(attempt: u32, initial: Duration, max: Duration) -> u64 {
    let factor = 1u32 << attempt.saturating_sub(1).min(20);
    let base = initial.saturating_mul(factor).min(max).as_millis() as f64;
    (base * (0.8 + 0.4 * fastrand::f64())) as u64
}

pub(crate) fn rfc3339(ms: u64) -> String {
    humantime::format_rfc3339_millis(UNIX_EPOCH + Duration::from_millis(ms)).to_string()
}

/// Batches outcome updates into spool writes; syncs the WAL at most every 100 ms, so a crash
/// may repeat a delivery that was in flight but never loses one.
async fn write_updates(node: Arc<Node>, mut rx: mpsc::Receiver<Update>) {
    let mut dirty = false;
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    loop {
        let msg = tokio::select! {
            m = rx.recv() => m,
            _ = tick.tick() => {
                if dirty {
                    if let Err(e) = node.spool.write(node.spool.batch(), Durability::Sync).await {
                        tracing::error!(error = %e, "syncing outcome updates failed");
                    }
                    dirty = false;
                }
                continue;
            }
        };
        let mut close = None;
        let mut batch = node.spool.batch();
        let mut next = msg;
        loop {
            match next {
                Some(Update::Job(id, bytes, event)) => {
                    batch.put_job(id, &bytes);
                    if let Some((hooks, json)) = event {
                        batch.add_event(hooks, json);
                    }
                }
                Some(Update::Suppress(key, value)) => batch.put_suppression(&key, &value),
                Some(Update::Close(done)) => {
                    close = Some(done);
                    break;
                }
                None => break,
            }
            if batch.len() >= 4096 {
                break;
            }
            next = rx.try_recv().ok();
            if next.is_none() {
                break;
            }
        }
        if !batch.is_empty() {
            write_until_done(&node, batch).await;
            dirty = true;
        }
        if let Some(done) = close {
            if let Err(e) = node.spool.write(node.spool.batch(), Durability::Sync).await {
                tracing::error!(error = %e, "syncing outcome updates failed");
            }
            let _ = done.send(());
            break;
        }
        if rx.is_closed() && rx.is_empty() {
            break;
        }
    }
}

/// Writes a batch of outcome updates, retrying while the spool refuses it (a full disk) until it
/// is written or the spool closes. Meanwhile the update channel fills and delivery waits on it:
/// mail whose outcome cannot be recorded is not sent.
async fn write_until_done(node: &Node, batch: crate::spool::SpoolBatch) {
    let mut failures = 0u32;
    let mut wait = Duration::from_millis(250);
    loop {
        match node.spool.write(batch.copy(), Durability::Buffered).await {
            Ok(()) => {
                if failures > 0 {
                    tracing::warn!(failures, "outcome updates written after failed attempts");
                }
                return;
            }
            Err(crate::spool::SpoolError::Closed) => {
                tracing::error!(
                    "the spool closed before outcome updates were written; the jobs stay queued and are sent again after a restart"
                );
                return;
            }
            Err(e) => {
                if failures == 0 {
                    tracing::error!(error = %e, "writing outcome updates failed; retrying, delivery waits");
                }
                failures += 1;
                tokio::time::sleep(wait).await;
                wait = (wait * 2).min(Duration::from_secs(5));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn prepared(campaign: &Arc<Campaign>, index: u32, address: &str) -> Prepared {
        let bytes = JobRecord {
            state: JobState::Queued,
            upload: 1,
            accepted_at_ms: 1,
            attempts: 0,
            next_attempt_ms: 1,
            address,
            vars: "",
            last_response: "",
        }
        .encode();
        let mut queue = crate::queue::QueueIndex::new();
        Prepared {
            job: PendingJob {
                id: JobId {
                    campaign: campaign.seq,
                    index,
                },
                domain: queue.domain_id("example.org"),
                due_ms: 1,
            },
            campaign: Arc::clone(campaign),
            bytes,
            sender: String::new(),
        }
    }

    fn campaign(seq: u32, personalised: bool) -> Arc<Campaign> {
        let record: crate::campaign::CampaignRecord = serde_json::from_value(serde_json::json!({
            "id": uuid::Uuid::now_v7(), "kind": "bulk", "from": "news@example.com",
            "subject": "Hi", "text": "Hello", "personalised": personalised,
            "state": "active", "created_at_ms": 1
        }))
        .expect("a valid campaign record");
        Arc::new(Campaign::new(seq, record, 0))
    }

    #[test]
    fn shared_messages_group_consecutive_jobs_of_one_campaign() {
        let (shared, other, personal) = (campaign(1, false), campaign(2, false), campaign(3, true));
        let jobs = vec![
            prepared(&shared, 0, "a@example.org"),
            prepared(&shared, 1, "b@example.org"),
            prepared(&shared, 2, "ü@example.org"),
            prepared(&shared, 3, "c@example.org"),
            prepared(&shared, 4, "d@example.org"),
            prepared(&shared, 5, "e@example.org"),
            prepared(&other, 0, "f@example.org"),
            prepared(&personal, 0, "g@example.org"),
            prepared(&personal, 1, "h@example.org"),
        ];
        let groups: Vec<Vec<(u32, u32)>> = group_recipients(jobs, 2)
            .iter()
            .map(|g| {
                g.iter()
                    .map(|p| (p.job.id.campaign, p.job.id.index))
                    .collect()
            })
            .collect();
        assert_eq!(
            groups,
            vec![
                vec![(1, 0), (1, 1)],
                // An address that needs SMTPUTF8 goes alone.
                vec![(1, 2)],
                vec![(1, 3), (1, 4)],
                vec![(1, 5)],
                // Another campaign starts its own message.
                vec![(2, 0)],
                // Personalised jobs are never grouped.
                vec![(3, 0)],
                vec![(3, 1)],
            ]
        );
    }

    #[test]
    fn retry_delay_doubles_with_jitter_and_caps() {
        let i = Duration::from_secs(60);
        let m = Duration::from_secs(3600);
        for (attempt, base) in [
            (1u32, 60_000f64),
            (2, 120_000.0),
            (3, 240_000.0),
            (10, 3_600_000.0),
        ] {
            for _ in 0..50 {
                let d = retry_delay(attempt, i, m) as f64;
                assert!(
                    d >= base * 0.8 - 1.0 && d <= base * 1.2 + 1.0,
                    "attempt {attempt}: {d}"
                );
            }
        }
    }

    #[test]
    fn limiter_burst_is_a_tenth_of_a_second() {
        let l = limiter(Rate {
            count: 100,
            per: Duration::from_secs(1),
        });
        let allowed = (0..100).filter(|_| l.check().is_ok()).count();
        assert_eq!(allowed, 10);
        let slow = limiter(Rate {
            count: 60,
            per: Duration::from_secs(60),
        });
        assert!(slow.check().is_ok());
        assert!(slow.check().is_err());
    }
}
