//! Cluster mode: what must be one across a fleet of nodes, kept in Redis Cluster. Each node
//! keeps its own spool; Redis holds the state the nodes share: per-(source, site) rate budgets
//! and connection leases ([`budget`]), the nodes' heartbeats ([`nodes`]), each node's campaign
//! counts ([`counts`]) and the change stream that carries suppressions, shaping actions and
//! campaigns to every node ([`sync`]).
//!
//! Owns the Redis connection, the deadline every call has and the circuit breaker in front of
//! it, and so the node's *mode*: `connected` while calls succeed, `degraded` while the breaker is
//! open (or no connection could be made). In degraded mode nothing waits for Redis: the budgets
//! fall back to a local share of each limit (limit × 0.8 ÷ the nodes last seen alive), so the
//! fleet stays under every limit while it cannot coordinate; and the nodes that can still reach
//! Redis leave those shares of a rate out of what they split among themselves
//! ([`Cluster::connected_rate`]), so it stays under every rate while only some of it can.
//! Never touches the spool and knows nothing of delivery: the delivery engine asks it for
//! grants and leases.

pub mod budget;
pub mod counts;
pub mod nodes;
pub mod sync;

use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, LazyLock, Mutex};
use std::time::Duration;

use prometheus::{IntCounterVec, IntGauge, register_int_counter_vec, register_int_gauge};
use redis::cluster::ClusterClient;
use redis::cluster_async::ClusterConnection;

use crate::config::ClusterConfig;

static CALLS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register_int_counter_vec!(
        "sluice_cluster_redis_calls_total",
        "Redis calls by result: ok, error, timeout, or skipped (breaker open: the node is degraded).",
        &["result"]
    )
    .expect("metric registers once")
});

static DEGRADED: LazyLock<IntGauge> = LazyLock::new(|| {
    register_int_gauge!(
        "sluice_cluster_degraded",
        "1 while this node cannot reach Redis and runs on local shares of every limit, else 0."
    )
    .expect("metric registers once")
});

/// Why a Redis call gave no answer: the node then acts on its local share.
#[derive(Debug, thiserror::Error)]
pub enum Unavailable {
    #[error("Redis is unreachable (circuit breaker open)")]
    Open,
    #[error("no connection to Redis yet")]
    NotConnected,
    #[error("Redis did not answer within {0:?}")]
    Timeout(Duration),
    #[error("Redis: {0}")]
    Redis(#[from] redis::RedisError),
}

/// Consecutive failures open it for a cooldown; after the cooldown one call is let through
/// (half-open) and its success closes it.
struct Breaker {
    failures: AtomicU32,
    open_until_ms: AtomicU64,
    /// A half-open trial call is under way.
    trial: AtomicBool,
    threshold: u32,
    cooldown: Duration,
}

impl Breaker {
    fn new(threshold: u32, cooldown: Duration) -> Breaker {
        Breaker {
            failures: AtomicU32::new(0),
            open_until_ms: AtomicU64::new(0),
            trial: AtomicBool::new(false),
            threshold: threshold.max(1),
            cooldown,
        }
    }

    /// Whether a call may go now (taking the trial when half-open).
    fn allow(&self, now: u64) -> bool {
        if self.failures.load(Ordering::Acquire) < self.threshold {
            return true;
        }
        if now < self.open_until_ms.load(Ordering::Acquire) {
            return false;
        }
        !self.trial.swap(true, Ordering::AcqRel)
    }

    fn open(&self) -> bool {
        self.failures.load(Ordering::Acquire) >= self.threshold
    }

    fn success(&self) {
        self.failures.store(0, Ordering::Release);
        self.trial.store(false, Ordering::Release);
    }

    fn failure(&self, now: u64) {
        let n = self.failures.fetch_add(1, Ordering::AcqRel) + 1;
        if n >= self.threshold {
            self.open_until_ms
                .store(now + self.cooldown.as_millis() as u64, Ordering::Release);
        }
        self.trial.store(false, Ordering::Release);
    }
}

/// This node's link to the cluster.
pub struct Cluster {
    pub config: ClusterConfig,
    client: ClusterClient,
    conn: Mutex<Option<ClusterConnection>>,
    breaker: Breaker,
    /// Nodes seen alive, the most over the last minute of heartbeats (this one included; at
    /// least 1), with the counts it is the most of.
    alive: AtomicUsize,
    alive_seen: Mutex<std::collections::VecDeque<(u64, usize)>>,
    /// Leases this node holds, renewed by [`Cluster::run`]'s renewal task.
    pub(crate) leases: budget::Leases,
    /// Stable id of this node's spool, so a restarted node keeps its `node_id` and another
    /// process using the same `node_id` is told apart; the origin of its stream entries.
    pub instance: String,
    /// Another live process claims this node_id (seen at the last heartbeat).
    pub conflict: Mutex<Option<String>>,
    /// Every node's report as of the last heartbeat.
    views: Mutex<Vec<nodes::NodeView>>,
    /// The mode last logged (true: degraded).
    logged_degraded: AtomicBool,
    /// When this node last came back from degraded mode (ms since the epoch; 0: never).
    reconnected_ms: AtomicU64,
    /// (node, limit key) pairs already warned about as different from this node's.
    limits_warned: Mutex<std::collections::HashSet<(String, String)>>,
    /// The limit settings that differ from another live node's now.
    mismatches: Mutex<Vec<(String, String)>>,
}

/// Why cluster mode could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cluster.redis: {0}")]
    Client(redis::RedisError),
    #[error(
        "cluster.node_id: \"{0}\" is in use by another running node (instance {1}); give each node its own"
    )]
    NodeIdInUse(String, String),
}

impl Cluster {
    /// Builds the client and tries to connect once. Unreachable Redis is not an error: the node
    /// starts degraded and keeps trying (see [`Cluster::run`]). A `node_id` held by another
    /// live node is.
    pub async fn start(
        config: ClusterConfig,
        instance: String,
    ) -> Result<Arc<Cluster>, StartError> {
        let client = ClusterClient::builder(config.redis.clone())
            .connection_timeout(config.timeout)
            .response_timeout(config.timeout)
            .retries(1)
            .build()
            .map_err(StartError::Client)?;
        let cluster = Arc::new(Cluster {
            breaker: Breaker::new(config.breaker_failures, config.breaker_cooldown),
            config,
            client,
            conn: Mutex::new(None),
            alive: AtomicUsize::new(1),
            alive_seen: Mutex::new(Default::default()),
            leases: budget::Leases::default(),
            instance,
            conflict: Mutex::new(None),
            views: Mutex::new(Vec::new()),
            logged_degraded: AtomicBool::new(false),
            reconnected_ms: AtomicU64::new(0),
            limits_warned: Mutex::new(Default::default()),
            mismatches: Mutex::new(Vec::new()),
        });
        if cluster.connect().await {
            if let Err(nodes::Claim::Taken(other)) = cluster.claim().await {
                return Err(StartError::NodeIdInUse(
                    cluster.config.node_id.clone(),
                    other,
                ));
            }
            cluster.heartbeat(&nodes::Report::default()).await;
        } else {
            cluster.logged_degraded.store(true, Ordering::Release);
            DEGRADED.set(1);
            tracing::warn!(
                redis = ?cluster.config.redis,
                "cluster: Redis is unreachable; starting degraded (local shares of every limit) and retrying"
            );
        }
        Ok(cluster)
    }

    pub fn node_id(&self) -> &str {
        &self.config.node_id
    }

    /// Whether the node runs on local shares (Redis unreachable or failing).
    pub fn degraded(&self) -> bool {
        self.conn.lock().expect("cluster conn").is_none() || self.breaker.open()
    }

    /// `connected` or `degraded`.
    pub fn mode(&self) -> &'static str {
        if self.degraded() {
            "degraded"
        } else {
            "connected"
        }
    }

    /// Nodes seen alive lately (the most over the last minute), this one included.
    pub fn alive_nodes(&self) -> usize {
        self.alive.load(Ordering::Acquire).max(1)
    }

    /// A node's local share of a cluster-wide `limit` while degraded: 0.8 of it split over the
    /// nodes last seen alive.
    pub fn local_share(&self, limit: f64) -> f64 {
        limit * 0.8 / self.alive_nodes() as f64
    }

    /// What this node, connected, may spend of a cluster-wide rate `limit` together with the
    /// other connected nodes: the limit less the local share of every peer that may be running
    /// on it ([`Cluster::silent_peers`]). Without that, nodes that reach Redis would take the
    /// whole limit while the others send their shares beside it (during a failover, nodes
    /// come back one by one).
    pub fn connected_rate(&self, limit: f64) -> f64 {
        limit - self.silent_peers() as f64 * self.local_share(limit)
    }

    async fn connect(&self) -> bool {
        match tokio::time::timeout(self.config.timeout * 4, self.client.get_async_connection())
            .await
        {
            Ok(Ok(c)) => {
                *self.conn.lock().expect("cluster conn") = Some(c);
                self.breaker.success();
                self.set_mode();
                true
            }
            Ok(Err(e)) => {
                tracing::debug!(error = %e, "cluster: connecting to Redis failed");
                false
            }
            Err(_) => false,
        }
    }

    fn set_mode(&self) {
        let degraded = self.degraded();
        let was = self.logged_degraded.swap(degraded, Ordering::AcqRel);
        if degraded != was {
            if degraded {
                tracing::warn!(
                    "cluster: Redis unreachable; degraded to local shares of every limit"
                );
            } else {
                self.reconnected_ms
                    .store(crate::now_ms(), Ordering::Release);
                tracing::info!("cluster: Redis reachable; limits are cluster-wide again");
            }
        }
        DEGRADED.set(i64::from(degraded));
    }

    /// Runs one Redis operation under the deadline and the breaker.
    pub async fn call<T, F, Fut>(&self, op: F) -> Result<T, Unavailable>
    where
        F: FnOnce(ClusterConnection) -> Fut,
        Fut: Future<Output = redis::RedisResult<T>>,
    {
        let now = crate::now_ms();
        let Some(conn) = self.conn.lock().expect("cluster conn").clone() else {
            CALLS.with_label_values(&["skipped"]).inc();
            return Err(Unavailable::NotConnected);
        };
        if !self.breaker.allow(now) {
            CALLS.with_label_values(&["skipped"]).inc();
            return Err(Unavailable::Open);
        }
        let result = match tokio::time::timeout(self.config.timeout, op(conn)).await {
            Ok(Ok(v)) => {
                CALLS.with_label_values(&["ok"]).inc();
                self.breaker.success();
                Ok(v)
            }
            Ok(Err(e)) => {
                CALLS.with_label_values(&["error"]).inc();
                self.breaker.failure(crate::now_ms());
                Err(Unavailable::Redis(e))
            }
            Err(_) => {
                CALLS.with_label_values(&["timeout"]).inc();
                self.breaker.failure(crate::now_ms());
                Err(Unavailable::Timeout(self.config.timeout))
            }
        };
        self.set_mode();
        result
    }

    /// How often leases are renewed: every third of their lifetime, and at least every second,
    /// since the renewal also says whether other nodes wait for a place.
    pub(crate) fn renew_every(&self) -> Duration {
        (self.config.lease_ttl / 3).min(Duration::from_secs(1))
    }

    /// The background work of cluster mode until `stop`: reconnecting, heartbeats (with the
    /// node's report from `report`) and lease renewal.
    pub async fn run(
        self: Arc<Self>,
        report: impl Fn() -> nodes::Report + Send + 'static,
        stop: tokio_util::sync::CancellationToken,
    ) {
        let mut heartbeat = tokio::time::interval(self.config.heartbeat);
        heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut renew = tokio::time::interval(self.renew_every());
        renew.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = stop.cancelled() => break,
                _ = heartbeat.tick() => {
                    if self.conn.lock().expect("cluster conn").is_none() && !self.connect().await {
                        continue;
                    }
                    self.heartbeat(&report()).await;
                }
                _ = renew.tick() => self.renew_leases().await,
            }
        }
        self.leave().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn breaker_opens_after_failures_and_lets_one_trial_through_after_the_cooldown() {
        let b = Breaker::new(3, Duration::from_millis(100));
        assert!(b.allow(0));
        b.failure(0);
        b.failure(0);
        assert!(b.allow(0) && !b.open());
        b.failure(10);
        assert!(b.open());
        assert!(!b.allow(50), "open during the cooldown");
        assert!(b.allow(110), "one trial after it");
        assert!(!b.allow(111), "only one");
        b.failure(120);
        assert!(!b.allow(150), "a failed trial opens it again");
        assert!(b.allow(221));
        b.success();
        assert!(!b.open() && b.allow(222) && b.allow(222));
    }
}
