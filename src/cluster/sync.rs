//! The cluster's change stream: state changes one node makes that every node must apply
//! (suppressions today), carried by a Redis stream.
//!
//! A change is first staged in the node's own spool, in the batch of the write it describes
//! (`cluster/out/` records in `meta`, [`stage`]), so a change made while Redis is unreachable,
//! or before a crash, is not lost: the node's replication task publishes staged changes in
//! order, a few hundred per stream entry, and deletes them once Redis has them. Every node
//! reads the stream from the last entry it applied (kept in its spool) and applies the other
//! nodes' changes to its own spool and memory, so no per-recipient check ever crosses the
//! network. Applying a change twice does what applying it once does.
//!
//! This module is the transport: changes are opaque JSON here; the replication task
//! (`crate::replication`) knows what they mean.

use std::sync::atomic::{AtomicU64, Ordering};

use super::{Cluster, Unavailable};
use crate::store::spool::{STATE_CLUSTER_OUT, SpoolBatch};

/// The stream every node publishes to and reads (one key, one slot).
const STREAM: &str = "sluice:{changes}";
/// Entries kept in the stream (approximately): a node away longer than it takes the fleet to
/// write this many entries (each up to [`MAX_PER_ENTRY`] changes) misses changes.
const MAX_ENTRIES: u64 = 1_000_000;
/// Changes per stream entry.
pub const MAX_PER_ENTRY: usize = 500;

/// How long publishing waits for a replica to confirm an entry.
const REPLICA_WAIT_MS: u64 = 200;

static NEXT: AtomicU64 = AtomicU64::new(0);

static UNREPLICATED: std::sync::LazyLock<prometheus::IntCounter> = std::sync::LazyLock::new(|| {
    prometheus::register_int_counter!(
        "sluice_cluster_unreplicated_changes_total",
        "Changes (suppressions, shaping actions) published to the change stream that no Redis replica confirmed within 200 ms: a failover of the stream's master then could lose them."
    )
    .expect("metric registers once")
});

/// Stages `change` (a JSON object with a `kind`) in `batch`, to be published in order.
pub fn stage(batch: &mut SpoolBatch, change: &[u8]) {
    // Time-ordered and unique in this process; later than any key of an earlier process
    // unless the clock went back more than the keys' spacing.
    let floor = crate::now_ms() << 16;
    let key = NEXT
        .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
            Some(n.saturating_add(1).max(floor))
        })
        .map_or(floor, |prev| prev.saturating_add(1).max(floor));
    batch.put_state(STATE_CLUSTER_OUT, &key.to_be_bytes(), change);
}

/// One stream entry as read: its id, the instance (spool) that wrote it and its changes (JSON
/// array).
pub struct Entry {
    pub id: String,
    pub origin: String,
    pub changes: String,
}

impl Cluster {
    /// Publishes `changes` (JSON objects) as one stream entry, and waits up to
    /// 200 ms for a replica of the stream's master to have it, so a master that
    /// fails right after does not take it along (changes no replica confirmed in time are
    /// counted in `sluice_cluster_unreplicated_changes_total`).
    pub async fn publish(&self, changes: &[&[u8]]) -> Result<(), Unavailable> {
        let mut json = Vec::with_capacity(changes.iter().map(|c| c.len() + 1).sum::<usize>() + 2);
        json.push(b'[');
        for (i, c) in changes.iter().enumerate() {
            if i > 0 {
                json.push(b',');
            }
            json.extend_from_slice(c);
        }
        json.push(b']');
        let origin = self.instance.clone();
        // WAIT has no key: in a pipeline it goes to the stream's master with the XADD, and
        // answers how many replicas have the entry.
        let (_, replicas): (String, i64) = self
            .call(|mut c| async move {
                redis::pipe()
                    .cmd("XADD")
                    .arg(STREAM)
                    .arg("MAXLEN")
                    .arg("~")
                    .arg(MAX_ENTRIES)
                    .arg("*")
                    .arg("o")
                    .arg(&origin)
                    .arg("c")
                    .arg(&json)
                    .cmd("WAIT")
                    .arg(1)
                    .arg(REPLICA_WAIT_MS)
                    .query_async(&mut c)
                    .await
            })
            .await?;
        if replicas < 1 {
            UNREPLICATED.inc_by(changes.len() as u64);
        }
        Ok(())
    }

    /// Up to `count` entries after `after` (`0-0` for all).
    pub async fn read(&self, after: &str, count: usize) -> Result<Vec<Entry>, Unavailable> {
        let start = if after == "0-0" {
            "-".to_owned()
        } else {
            format!("({after}")
        };
        let raw: Vec<(String, Vec<(String, String)>)> = self
            .call(|mut c| async move {
                redis::cmd("XRANGE")
                    .arg(STREAM)
                    .arg(&start)
                    .arg("+")
                    .arg("COUNT")
                    .arg(count)
                    .query_async(&mut c)
                    .await
            })
            .await?;
        Ok(raw
            .into_iter()
            .map(|(id, fields)| {
                let mut e = Entry {
                    id,
                    origin: String::new(),
                    changes: String::new(),
                };
                for (k, v) in fields {
                    match k.as_str() {
                        "o" => e.origin = v,
                        "c" => e.changes = v,
                        _ => {}
                    }
                }
                e
            })
            .collect())
    }
}
