//! Campaign counts across the fleet: each node publishes its own absolute per-state counts of
//! a campaign (a hash per campaign, one field per node), so any node can answer for the
//! cluster by adding up the fields. Absolute counts, not increments: a publication lost to a
//! failover is made good by the next one, and a count is never added twice.
//!
//! The counts are opaque JSON here; the replication task publishes them, the API reads them.

use std::collections::HashMap;

use super::{Cluster, Unavailable};

/// How long a campaign's counts stay in Redis after its last change on any node.
const KEEP_MS: u64 = 30 * 24 * 3_600_000;

fn key(campaign: &str) -> String {
    format!("sluice:counts:{{{campaign}}}")
}

impl Cluster {
    /// Publishes this node's counts of `campaign` (JSON).
    pub async fn publish_counts(&self, campaign: &str, counts: &str) -> Result<(), Unavailable> {
        let (key, node, counts) = (
            key(campaign),
            self.config.node_id.clone(),
            counts.to_owned(),
        );
        let _: (i64, i64) = self
            .call(|mut c| async move {
                redis::pipe()
                    .cmd("HSET")
                    .arg(&key)
                    .arg(&node)
                    .arg(&counts)
                    .cmd("PEXPIRE")
                    .arg(&key)
                    .arg(KEEP_MS)
                    .query_async(&mut c)
                    .await
            })
            .await?;
        Ok(())
    }

    /// Every node's published counts of `campaign`: node id → counts (JSON).
    pub async fn counts(&self, campaign: &str) -> Result<HashMap<String, String>, Unavailable> {
        let key = key(campaign);
        self.call(|mut c| async move { redis::cmd("HGETALL").arg(&key).query_async(&mut c).await })
            .await
    }
}
