//! Node heartbeats and the claim on a `node_id`: one Redis script call per heartbeat renews
//! this node's claim, publishes its report and reads every node's, so the cluster knows who is
//! alive (for `GET /v1/cluster` and the degraded-mode share) at one command per node and
//! heartbeat.
//!
//! Keys share the `{nodes}` hash tag, so the script's keys live in one slot: the hash
//! `sluice:{nodes}` (node id → report JSON) and `sluice:{nodes}:owner:<node_id>` (the instance
//! id of the spool that holds the name, with an expiry of five heartbeats).

use std::sync::LazyLock;

use serde::{Deserialize, Serialize};

use super::Cluster;

const NODES_KEY: &str = "sluice:{nodes}";
/// How long a node counted alive still counts for the degraded-mode share.
const ALIVE_MEMORY_MS: u64 = 60_000;

fn owner_key(node_id: &str) -> String {
    format!("sluice:{{nodes}}:owner:{node_id}")
}

/// Claims the node id (unless another instance holds it), publishes the report, returns every
/// report: `[conflicting instance or "", id1, report1, id2, report2, ...]`.
static HEARTBEAT: LazyLock<redis::Script> = LazyLock::new(|| {
    redis::Script::new(
        r"
local cur = redis.call('GET', KEYS[2])
if cur and cur ~= ARGV[1] then return {cur} end
redis.call('SET', KEYS[2], ARGV[1], 'PX', ARGV[2])
if ARGV[4] ~= '' then redis.call('HSET', KEYS[1], ARGV[3], ARGV[4]) end
local out = {''}
local all = redis.call('HGETALL', KEYS[1])
for i = 1, #all do out[#out + 1] = all[i] end
return out
",
    )
});

/// Gives the node id up (graceful stop): only if this instance holds it.
static LEAVE: LazyLock<redis::Script> = LazyLock::new(|| {
    redis::Script::new(
        r"
if redis.call('GET', KEYS[2]) == ARGV[1] then redis.call('DEL', KEYS[2]) end
redis.call('HDEL', KEYS[1], ARGV[2])
return 1
",
    )
});

/// What a node publishes about itself at each heartbeat.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Report {
    /// When it was written (the node's clock, ms since the epoch).
    #[serde(default)]
    pub at_ms: u64,
    /// Recipients queued on the node.
    #[serde(default)]
    pub queued: u64,
    /// Messages per second it delivered lately.
    #[serde(default)]
    pub rate: f64,
    /// Whether it ran on local shares (could not reach Redis) when it last could write.
    #[serde(default)]
    pub degraded: bool,
    /// Its HTTP API address, for operators.
    #[serde(default)]
    pub http: String,
    /// A fingerprint of each limit setting (`shaping`, `rule[i]`), so nodes whose limits
    /// differ are told (a cluster-wide limit is only one limit if every node has it).
    #[serde(default)]
    pub limits: std::collections::BTreeMap<String, String>,
}

/// The fingerprints of `config`'s limit settings, for [`Report::limits`].
pub fn limit_fingerprints(
    config: &crate::config::Config,
) -> std::collections::BTreeMap<String, String> {
    let print = |text: String| {
        let d = ring::digest::digest(&ring::digest::SHA256, text.as_bytes());
        d.as_ref()[..8].iter().map(|b| format!("{b:02x}")).collect()
    };
    let mut out = std::collections::BTreeMap::new();
    out.insert("shaping".to_owned(), print(format!("{:?}", config.shaping)));
    for (i, r) in config.rules.iter().enumerate() {
        out.insert(format!("rule[{i}]"), print(format!("{r:?}")));
    }
    out
}

/// Whether a peer last heard of at `last_seen` (ms) may be running on its local share at
/// `now`: not heard of for `heard` ms, and not for more than `memory` ms after it was last
/// heard of or after this node came `back` to Redis.
fn presumed_on_share(last_seen: u64, now: u64, heard: u64, memory: u64, back: u64) -> bool {
    last_seen + heard < now && last_seen.max(back) + memory >= now
}

/// One node as `GET /v1/cluster` shows it.
#[derive(Debug, Clone, Serialize)]
pub struct NodeView {
    pub node_id: String,
    pub alive: bool,
    pub last_seen_ms: u64,
    pub queued: u64,
    pub rate: f64,
    pub degraded: bool,
    pub http: String,
    #[serde(skip)]
    pub limits: std::collections::BTreeMap<String, String>,
}

pub(super) enum Claim {
    /// Another live instance holds the id.
    Taken(String),
}

impl Cluster {
    /// How long a node's report counts as alive: three heartbeats, at least three seconds.
    fn alive_window_ms(&self) -> u64 {
        (self.config.heartbeat.as_millis() as u64 * 3).max(3000)
    }

    /// How recent a peer's report must be for the peer to count as heard from: two heartbeats
    /// (the report read at this node's last heartbeat may be one old already, and the next
    /// read is one away) and two call deadlines.
    fn heard_window_ms(&self) -> u64 {
        (self.config.heartbeat * 2 + self.config.timeout * 2).as_millis() as u64
    }

    /// Peers that may be running on their local shares now: as of this node's last heartbeat,
    /// their report is older than [`Self::heard_window_ms`] (they cannot write to Redis, or are
    /// gone), and not by more than the minute a degraded node keeps counting its peers alive,
    /// counted from their report or from when this node last came back to Redis, whichever is
    /// later: after an outage this node was caught in too, the others, as silent as it was, are
    /// presumed still on their shares until they write again. A peer that left (a graceful stop
    /// removes its report) does not count. At most the nodes a degraded node splits its limits
    /// over, less this one.
    ///
    /// Rates only: a silent peer's connection leases hold its places until they expire.
    pub fn silent_peers(&self) -> usize {
        let now = crate::now_ms();
        let heard = self.heard_window_ms();
        let back = self
            .reconnected_ms
            .load(std::sync::atomic::Ordering::Acquire);
        let silent = self
            .views
            .lock()
            .expect("views")
            .iter()
            .filter(|v| v.node_id != self.config.node_id)
            .filter(|v| presumed_on_share(v.last_seen_ms, now, heard, ALIVE_MEMORY_MS, back))
            .count();
        silent.min(self.alive_nodes() - 1)
    }

    /// From when this node, degraded, may spend its local share of a rate: once the others
    /// count it silent ([`Self::silent_peers`]), two heartbeats and two call deadlines after
    /// its last report (its own, as read back at its last heartbeat), so that they have left
    /// its share out of theirs. Until then they may still be splitting the whole rate among
    /// themselves. At once when it never published a report or has seen no other node.
    pub fn local_share_from(&self) -> u64 {
        if self.alive_nodes() <= 1 {
            return 0;
        }
        let views = self.views.lock().expect("views");
        match views.iter().find(|v| v.node_id == self.config.node_id) {
            Some(me) => me.last_seen_ms + self.heard_window_ms(),
            None => 0,
        }
    }

    /// Claims the node id without publishing a report (at start).
    pub(super) async fn claim(&self) -> Result<(), Claim> {
        match self.run_heartbeat("").await {
            Some(Err(other)) => Err(Claim::Taken(other)),
            _ => Ok(()),
        }
    }

    /// One heartbeat: claim renewed, report published, the nodes' reports read.
    pub(super) async fn heartbeat(&self, report: &Report) {
        let report = Report {
            at_ms: crate::now_ms(),
            degraded: self.degraded(),
            ..report.clone()
        };
        let json = serde_json::to_string(&report).unwrap_or_default();
        match self.run_heartbeat(&json).await {
            Some(Err(other)) => {
                tracing::error!(
                    node_id = %self.config.node_id,
                    other_instance = %other,
                    "cluster.node_id is in use by another running node: give each node its own"
                );
                *self.conflict.lock().expect("conflict") = Some(other);
            }
            Some(Ok(views)) => {
                *self.conflict.lock().expect("conflict") = None;
                self.compare_limits(&report, &views);
                let alive = views.iter().filter(|v| v.alive).count().max(1);
                // The count a degraded node splits limits by is the most seen alive over the
                // last minute: right after an outage or a failover the others' reports are
                // stale (they could not write either), and counting them gone would give this
                // node the whole limit.
                let now = crate::now_ms();
                let mut seen = self.alive_seen.lock().expect("alive seen");
                seen.push_back((now, alive));
                while seen
                    .front()
                    .is_some_and(|&(t, _)| t + ALIVE_MEMORY_MS < now)
                {
                    seen.pop_front();
                }
                let most = seen.iter().map(|&(_, n)| n).max().unwrap_or(alive);
                self.alive.store(most, std::sync::atomic::Ordering::Release);
                *self.views.lock().expect("views") = views;
            }
            None => {}
        }
    }

    /// `None`: Redis did not answer; `Some(Err(instance))`: the id is taken.
    async fn run_heartbeat(&self, json: &str) -> Option<Result<Vec<NodeView>, String>> {
        let ttl_ms = (self.config.heartbeat.as_millis() as u64 * 5).max(5000);
        let instance = self.instance.clone();
        let node_id = self.config.node_id.clone();
        let json = json.to_owned();
        let out: Vec<String> = self
            .call(|mut c| async move {
                HEARTBEAT
                    .key(NODES_KEY)
                    .key(owner_key(&node_id))
                    .arg(&instance)
                    .arg(ttl_ms)
                    .arg(&node_id)
                    .arg(&json)
                    .invoke_async(&mut c)
                    .await
            })
            .await
            .ok()?;
        let (first, rest) = out.split_first()?;
        if !first.is_empty() {
            return Some(Err(first.clone()));
        }
        let now = crate::now_ms();
        let window = self.alive_window_ms();
        let mut views: Vec<NodeView> = rest
            .chunks_exact(2)
            .map(|kv| {
                let r: Report = serde_json::from_str(&kv[1]).unwrap_or_default();
                NodeView {
                    node_id: kv[0].clone(),
                    alive: r.at_ms + window >= now,
                    last_seen_ms: r.at_ms,
                    queued: r.queued,
                    rate: r.rate,
                    degraded: r.degraded,
                    http: r.http,
                    limits: r.limits,
                }
            })
            .collect();
        views.sort_by(|a, b| a.node_id.cmp(&b.node_id));
        Some(Ok(views))
    }

    /// Warns, once per node and key, about limit settings that differ from another live node's.
    fn compare_limits(&self, mine: &Report, views: &[NodeView]) {
        let mut warned = self.limits_warned.lock().expect("limits warned");
        let mut now_differ = Vec::new();
        let others = views
            .iter()
            .filter(|v| v.alive && v.node_id != self.config.node_id);
        for v in others {
            let keys: std::collections::BTreeSet<&String> =
                mine.limits.keys().chain(v.limits.keys()).collect();
            for key in keys {
                if mine.limits.get(key) == v.limits.get(key) {
                    continue;
                }
                now_differ.push((v.node_id.clone(), key.clone()));
                if warned.insert((v.node_id.clone(), key.clone())) {
                    tracing::warn!(
                        key = %key,
                        other = %v.node_id,
                        "cluster: this limit setting differs from another node's; cluster-wide limits need the same settings on every node"
                    );
                }
            }
        }
        *self.mismatches.lock().expect("mismatches") = now_differ;
    }

    /// (node, key) of the limit settings that differed from another live node's at the last
    /// heartbeat.
    pub fn limit_mismatches(&self) -> Vec<(String, String)> {
        self.mismatches.lock().expect("mismatches").clone()
    }

    /// The nodes as of the last heartbeat.
    pub fn nodes(&self) -> Vec<NodeView> {
        self.views.lock().expect("views").clone()
    }

    /// Gives the node id up and removes this node's report (graceful stop).
    pub(super) async fn leave(&self) {
        let instance = self.instance.clone();
        let node_id = self.config.node_id.clone();
        let _: Result<i64, _> = self
            .call(|mut c| async move {
                LEAVE
                    .key(NODES_KEY)
                    .key(owner_key(&node_id))
                    .arg(&instance)
                    .arg(&node_id)
                    .invoke_async(&mut c)
                    .await
            })
            .await;
    }
}

#[cfg(test)]
mod tests {
    use super::presumed_on_share;

    const HEARD: u64 = 2_500;
    const MEMORY: u64 = 10_000;

    /// Whether a peer last heard of at `seen` is presumed on its share at `now`, this node
    /// having come back to Redis at `back`.
    fn on_share(seen: u64, now: u64, back: u64) -> bool {
        presumed_on_share(seen, now, HEARD, MEMORY, back)
    }

    #[test]
    fn a_peer_heard_lately_is_not_on_its_share() {
        assert!(!on_share(100_000, 100_000 + HEARD, 0));
        assert!(on_share(100_000, 100_000 + HEARD + 1, 0));
    }

    #[test]
    fn a_silent_peer_counts_as_gone_its_memory_after_it_was_last_heard_of() {
        assert!(on_share(100_000, 100_000 + MEMORY, 0));
        assert!(!on_share(100_000, 100_000 + MEMORY + 1, 0));
    }

    #[test]
    fn after_an_outage_silent_peers_count_from_when_this_node_came_back() {
        // Silent for 30 s, as this node was until 1 s ago: still presumed on its share, for the
        // memory from this node's return.
        let (seen, back) = (100_000, 129_000);
        assert!(on_share(seen, 130_000, back));
        assert!(on_share(seen, back + MEMORY, back));
        assert!(!on_share(seen, back + MEMORY + 1, back));
        // Heard of again since: not on its share.
        assert!(!on_share(130_000, 131_000, back));
    }
}
