//! The delivery engine: from due jobs in the scheduler to SMTP transactions and outcomes.
//!
//! Owns sites, lanes, the connection pool, throttles, retries and expiry. It reads job records
//! from the spool on the blocking pool and writes outcome updates through one batching task; it
//! never blocks a tokio worker and never holds a lock across an `.await`. One file per step of an
//! attempt, in the order a job meets them:
//!
//! * this file: the engine's start and stop, and the **coordinator**, which takes domains whose
//!   next job is due from the scheduler, resolves each to a site (at once from the route cache
//!   while its answers' TTLs last, else in a task of its own) and attaches it. DNS failures
//!   are decided per domain at once: a null MX and a confirmed NXDOMAIN bounce the due jobs
//!   (see [`crate::outbound::resolver_health`]), temporary failures defer them. Also the sweeper (idle connections, empty sites, idle domains) and reports.
//! * [`route`]: domain → **site** (the MX set, or a static relay, so all domains a provider
//!   hosts share one set of limits) and site → open connection.
//! * [`site`]: a site's live state: throttles, lanes, idle connections, backoff. A site whose
//!   connections fail is backed off (doubling up to `site_backoff_max`), deferring one batch per
//!   failure so that every recipient's log shows what happened.
//! * [`lane`]: up to `max_connections` lanes per site and egress source, each owning one
//!   connection at a time; each transaction goes from a source of its campaign's pool, by weight.
//! * [`pick`]: pick and lease: jobs taken from the scheduler, read and decoded once, checked
//!   (paused, cancelled, suppressed, expired) and grouped into transactions.
//! * [`assembly`]: render, build and sign a group's message, on the assembly pool (one thread
//!   per core) when signing is costly, the next one while the current one is on the wire.
//! * [`transact`]: send one message.
//! * [`finish`]: classify the outcome and apply it as one [`crate::effects::transition::Transition`];
//!   the batching outcome writer.
//! * [`stats`]: per-site gauges and the reports of `GET /v1/domains` and `GET /v1/queue`.

mod assembly;
mod finish;
mod lane;
mod pick;
mod route;
mod secure;
mod site;
pub mod stats;
mod tlsrpt;
mod transact;

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::Config;
use crate::node::Node;
use crate::outbound::dns::Dns;
use crate::outbound::smtp::client::{ClientSettings, Timeouts};
use crate::scheduler::index::DomainId;
use finish::Update;
use site::Site;

pub(crate) use assembly::{ASSEMBLY_QUEUED, ASSEMBLY_SECONDS, ASSEMBLY_WAIT_SECONDS};
pub(crate) use finish::LATENCY_SECONDS;
pub(crate) use pick::{JOB_READS, SUPPRESSED_AT_DELIVERY};
pub(crate) use transact::TRANSACTION_SECONDS;

static SHAPING_ACTIONS: std::sync::LazyLock<prometheus::IntGaugeVec> = std::sync::LazyLock::new(
    || {
        prometheus::register_int_gauge_vec!(
            "sluice_shaping_active",
            "Sites where a source is held back now, by egress source and kind: suspend and throttle (shaping actions in force, GET /v1/shaping) and aimd (AIMD below the configured limits).",
            &["source", "kind"]
        )
        .expect("metric registers once")
    },
);

/// A domain with no queued or in-flight jobs is forgotten after this long.
const DOMAIN_IDLE_EVICT_MS: u64 = 60_000;
/// An empty site (no lanes, no domains, no idle connections) is forgotten after this long.
const SITE_IDLE_EVICT: Duration = Duration::from_secs(600);
/// A pooled connection holding a cluster-wide lease is closed after this long idle.
const LEASED_IDLE: Duration = Duration::from_secs(1);

/// What the API sees of the engine: its reports, once it runs (never with `delivery.enabled`
/// off). Set by whoever starts the engine; holds it weakly, so it does not keep it alive.
#[derive(Clone, Default)]
pub struct EngineHandle(Arc<OnceLock<Weak<Delivery>>>);

impl EngineHandle {
    pub fn set(&self, engine: &Arc<Delivery>) {
        let _ = self.0.set(Arc::downgrade(engine));
    }

    pub fn is_running(&self) -> bool {
        self.0.get().is_some()
    }

    /// The (source, site) pairs AIMD holds below their limits (none without a running engine).
    pub fn aimd(&self) -> Vec<stats::AimdEntry> {
        self.0
            .get()
            .and_then(Weak::upgrade)
            .map(|d| d.aimd())
            .unwrap_or_default()
    }

    /// Per-site and per-domain statistics; without a running engine, domains only.
    pub async fn report(&self, node: &Arc<Node>) -> stats::Report {
        match self.0.get().and_then(Weak::upgrade) {
            Some(d) => d.report().await,
            None => stats::report(node, Vec::new(), &|_| None).await,
        }
    }
}

pub struct Delivery {
    node: Arc<Node>,
    config: Arc<Config>,
    dns: Arc<Dns>,
    /// The HTTPS client of MTA-STS policy fetches and TLS reports posted.
    https: reqwest::Client,
    /// Whether NXDOMAIN answers are believed (resolver sanity).
    health: crate::outbound::resolver_health::ResolverHealth,
    /// Domains whose MTA-STS policy is being fetched in the background.
    refreshing: Mutex<std::collections::HashSet<String>>,
    /// Per egress source (see [`Config::egress_sources`]): its address and EHLO name.
    sources: Vec<crate::config::Source>,
    /// Client settings per source (they differ by EHLO name).
    clients: Vec<ClientSettings>,
    /// Pools of sources; the default one first.
    pools: Vec<crate::config::Pool>,
    sites: Mutex<HashMap<String, Arc<Site>>>,
    /// The site each domain was last resolved to, kept as long as the answers it came from
    /// (see [`route::Route`]); also what reports show.
    routes: Mutex<HashMap<String, route::Route>>,
    labels: stats::Labels,
    updates: mpsc::Sender<Update>,
    stop: CancellationToken,
    lanes: TaskTracker,
    background: TaskTracker,
    /// The assembly pool: one thread per core rendering and signing messages.
    assembly: assembly::Pool,
}

impl Delivery {
    /// Starts the coordinator, the outcome writer and the pool sweeper.
    pub fn start(node: Arc<Node>) -> Result<Arc<Delivery>, String> {
        let config = Arc::clone(&node.config);
        let d = &config.delivery;
        let mut dns = Dns::new(&config.dns.nameservers, config.dns.timeout)?;
        if config.dane.enabled {
            dns = dns.validating(node.trust.anchors.clone())?;
        }
        let dns = Arc::new(dns);
        let extra_roots = &node.trust.extra_roots;
        let https = crate::outbound::sts_cache::client(
            crate::outbound::smtp::client::root_store(extra_roots),
            Arc::new(crate::outbound::dns::HttpResolver(Arc::clone(&dns))),
        )?;
        let timeouts = Timeouts {
            connect: d.connect_timeout,
            greeting: d.greeting_timeout,
            command: d.command_timeout,
            data_init: d.data_init_timeout,
            data_block: d.data_block_timeout,
            data_final: d.data_final_timeout,
        };
        let (tx, rx) = mpsc::channel(16_384);
        let sources = config.egress_sources();
        finish::register_sources(&sources);
        let clients = sources
            .iter()
            .map(|s| ClientSettings::new(s.ehlo_name.clone(), timeouts, extra_roots))
            .collect();
        let delivery = Arc::new(Delivery {
            sources,
            clients,
            pools: config.egress_pools(),
            node: Arc::clone(&node),
            config: Arc::clone(&config),
            dns,
            https,
            refreshing: Mutex::new(Default::default()),
            health: crate::outbound::resolver_health::ResolverHealth::new(&config.dns),
            sites: Mutex::new(HashMap::new()),
            routes: Mutex::new(HashMap::new()),
            labels: stats::Labels::default(),
            updates: tx,
            stop: CancellationToken::new(),
            lanes: TaskTracker::new(),
            background: TaskTracker::new(),
            assembly: assembly::Pool::new(
                "assembly",
                std::thread::available_parallelism().map_or(2, |n| n.get()),
            )
            .map_err(|e| format!("cannot start the assembly threads: {e}"))?,
        });
        delivery
            .background
            .spawn(finish::write_updates(Arc::clone(&node), rx));
        delivery
            .background
            .spawn(Arc::clone(&delivery).coordinate());
        delivery.background.spawn(Arc::clone(&delivery).sweep());
        delivery
            .background
            .spawn(Arc::clone(&delivery).publish_stats());
        delivery
            .background
            .spawn(Arc::clone(&delivery).tls_report_loop());
        delivery
            .background
            .spawn(Arc::clone(&delivery).canary_loop());
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
                .flat_map(|s| std::mem::take(&mut s.lock().idle))
                .collect()
        };
        for c in idle {
            c.quit().await;
        }
        if let Err(e) = self.node.warmup.flush(&self.node.spool).await {
            tracing::error!(error = %e, "writing warm-up counts at shutdown failed");
        }
        if let Err(e) = self.node.tls_reports.flush(&self.node.spool).await {
            tracing::error!(error = %e, "writing TLS report counts at shutdown failed");
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
            let (due, next) = self.node.scheduler.take_due_domains(now, 512);
            let busy = !due.is_empty();
            for d in due {
                let Some(name) = self.node.scheduler.claim(d) else {
                    continue;
                };
                // A domain whose route is cached is attached here; one to resolve gets a task.
                let attached = self
                    .cached_site(&name, now)
                    .is_some_and(|site| self.attach(&site, d));
                if !attached {
                    self.lanes.spawn(Arc::clone(&self).activate(d, name));
                }
            }
            if busy {
                tokio::task::yield_now().await;
                continue;
            }
            let wait = next.map_or(1000, |t| t.saturating_sub(now)).min(1000);
            tokio::select! {
                _ = self.stop.cancelled() => break,
                _ = self.node.scheduler.woken() => {}
                _ = tokio::time::sleep(Duration::from_millis(wait)) => {}
            }
        }
    }

    /// The index of the pool a job of `campaign` goes through: its `pool`, else (or if the
    /// config no longer has it) the default pool.
    fn pool_of(&self, campaign: &crate::store::campaign::Campaign) -> usize {
        let Some(name) = campaign.record.pool.as_deref() else {
            return 0;
        };
        match self.pools.iter().position(|p| p.name == name) {
            Some(i) => i,
            None => {
                // Once per process: every job of such a campaign comes here.
                static WARNED: std::sync::atomic::AtomicBool =
                    std::sync::atomic::AtomicBool::new(false);
                if !WARNED.swap(true, std::sync::atomic::Ordering::Relaxed) {
                    tracing::warn!(
                        pool = name,
                        "queued mail names a pool the config no longer has; it goes through the default pool"
                    );
                }
                0
            }
        }
    }

    /// Resolves a newly due domain to its site and starts serving it.
    async fn activate(self: Arc<Self>, d: DomainId, name: String) {
        loop {
            match self.site_for(&name).await {
                Ok(site) => {
                    if self.attach(&site, d) {
                        return;
                    }
                    // The site was forgotten meanwhile: resolved again, to a new one.
                    self.forget_route(&name);
                }
                Err(outcome) => {
                    loop {
                        let jobs = self.node.scheduler.pop_due(d, crate::now_ms(), 256);
                        if jobs.is_empty() || self.stop.is_cancelled() {
                            break;
                        }
                        for p in self.prepare(jobs, None).await {
                            self.finish(&p, outcome.clone(), None, None, 0).await;
                        }
                    }
                    self.node.scheduler.deactivate([d], 0);
                    return;
                }
            }
        }
    }

    /// Hands domain `d` to `site` to serve, and starts a lane if it has room. False, and
    /// nothing done, when the sweeper has forgotten the site.
    fn attach(self: &Arc<Self>, site: &Arc<Site>, d: DomainId) -> bool {
        {
            let mut g = site.lock();
            if g.retired {
                return false;
            }
            g.active.push_back(d);
        }
        self.ensure_lanes(site);
        true
    }

    /// The (source, site) pairs AIMD holds below their limits.
    pub fn aimd(&self) -> Vec<stats::AimdEntry> {
        let sites: Vec<Arc<Site>> = self
            .sites
            .lock()
            .expect("sites lock")
            .values()
            .cloned()
            .collect();
        let mut out = Vec::new();
        for site in sites {
            for (i, a) in site.aimd_states() {
                out.push(stats::AimdEntry {
                    source: self
                        .sources
                        .get(i)
                        .map_or_else(String::new, |s| s.name.clone()),
                    site: site.key.clone(),
                    site_label: site.stats.label.clone(),
                    rate_per_second: (a.rate * 100.0).round() / 100.0,
                    ceiling_per_second: (a.ceiling * 100.0).round() / 100.0,
                    connections: a.connections,
                    changed_at: crate::effects::delivery_log::rfc3339(a.last_change_ms),
                    reply: a.reply,
                });
            }
        }
        out.sort_by(|a, b| a.source.cmp(&b.source).then(a.site.cmp(&b.site)));
        out
    }

    /// Per-site and per-domain statistics (see [`stats::report`]).
    pub async fn report(&self) -> stats::Report {
        let views: Vec<stats::SiteView> = {
            let sites = self.sites.lock().expect("sites lock");
            sites.values().map(|s| s.view(&self.sources)).collect()
        };
        let site_of = |d: &str| {
            self.routes
                .lock()
                .expect("routes lock")
                .get(d)
                .map(|r| r.site.key.clone())
        };
        stats::report(&self.node, views, &site_of).await
    }

    /// Refreshes the per-site gauges every few seconds, and forgets the site of domains the
    /// queue no longer knows.
    async fn publish_stats(self: Arc<Self>) {
        let mut tick = tokio::time::interval(Duration::from_secs(5));
        let mut labels = stats::Published::default();
        loop {
            tokio::select! {
                _ = self.stop.cancelled() => break,
                _ = tick.tick() => {}
            }
            let report = self.report().await;
            stats::publish(&report, &mut labels);
            self.publish_shaping();
            let mut map = self.routes.lock().expect("routes lock");
            self.node.scheduler.retain_known(&mut map);
        }
    }

    /// The shaping gauges: actions in force and AIMD-limited sites, per source (names from the
    /// config, so the label set is bounded).
    fn publish_shaping(&self) {
        let now = crate::now_ms();
        let actions = self.node.actions.list(now);
        let aimd = self.aimd();
        for source in &self.sources {
            for kind in ["suspend", "throttle"] {
                let n = actions
                    .iter()
                    .filter(|a| a.source == source.name && a.kind == kind)
                    .count();
                SHAPING_ACTIONS
                    .with_label_values(&[source.name.as_str(), kind])
                    .set(n as i64);
            }
            let n = aimd.iter().filter(|a| a.source == source.name).count();
            SHAPING_ACTIONS
                .with_label_values(&[source.name.as_str(), "aimd"])
                .set(n as i64);
        }
    }

    /// Closes idle connections past `idle_timeout` (or [`LEASED_IDLE`] for those holding a
    /// cluster-wide lease), forgets empty sites and writes the warm-up
    /// counts, once a second.
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
                    let mut g = site.lock();
                    let (old, keep): (Vec<stats::Held>, Vec<stats::Held>) =
                        std::mem::take(&mut g.idle).into_iter().partition(|c| {
                            // A pooled connection holding a cluster-wide lease keeps a
                            // place other nodes may need: closed after a second idle.
                            let limit = if c.leased() {
                                idle_timeout.min(LEASED_IDLE)
                            } else {
                                idle_timeout
                            };
                            c.last_used.elapsed() >= limit
                        });
                    g.idle = keep;
                    closing.extend(old);
                    // Forgotten: a route still naming it resolves again (see `attach`).
                    g.retired = g.lanes == 0
                        && g.active.is_empty()
                        && g.idle.is_empty()
                        && g.last_activity.elapsed() > SITE_IDLE_EVICT;
                    !g.retired
                });
            }
            for c in closing {
                tokio::spawn(c.quit());
            }
            if let Err(e) = self.node.warmup.flush(&self.node.spool).await {
                tracing::warn!(error = %e, "writing warm-up counts failed; retried in a second");
            }
            let evicted = self
                .node
                .scheduler
                .evict_idle(crate::now_ms(), DOMAIN_IDLE_EVICT_MS);
            if evicted > 0 {
                tracing::debug!(evicted, "idle domains forgotten");
            }
        }
    }
}
