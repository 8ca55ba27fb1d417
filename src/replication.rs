//! Cluster mode's replication task: publishes the changes this node staged in its spool to the
//! cluster's change stream, and applies the other nodes' changes to this node's spool and
//! memory ([`crate::cluster::sync`] is the transport).
//!
//! Changes, as JSON objects by `kind`:
//! * `suppression.add` (`entry`: a suppression entry) and `suppression.delete` (`address`,
//!   `scope`): every node's list is the same within a poll interval, so an unsubscribe taken by
//!   any node stops every node.
//! * `shaping.add` (`action`) and `shaping.lift` (`id`): a provider that pushes back on a source
//!   at a site, or an operator lifting that, acts on every node.
//! * `campaign.create` (`record`) and `campaign.state` (`id`, `state`): a campaign created on
//!   one node exists on every node (under a number of each node's own), so any node takes
//!   recipient uploads for it; pausing, resuming or cancelling it on one node does so on all.
//! * `tenant.add` (`tenant`), `tenant.key_add` (`key`: its hash and record) and
//!   `tenant.key_revoke` (`hash`): tenants and keys made through any node's admin API.
//! * `feedback.report` and `feedback.unsubscribe` (`node`: a node's token tag): a bounce,
//!   complaint or unsubscribe about another node's mail, which only the node named applies.
//!
//! Every second it also publishes this node's counts of each campaign that changed
//! ([`crate::cluster::counts`]), which `GET /v1/campaigns/{id}` adds up on any node.
//!
//! Owns the stream cursor (`cluster/stream` in `meta`) and nothing else; it applies changes
//! through the same spool writes and index updates as the API, minus the staging (a change
//! received is never published again).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::cluster::Cluster;
use crate::cluster::sync::MAX_PER_ENTRY;
use crate::effects::suppression;
use crate::feedback;
use crate::intake::ingest::Upload;
use crate::node::Node;
use crate::outbound::shaping::actions::{self, Actions};
use crate::store::campaign::{self, Campaign, CampaignKind, CountsSnapshot};
use crate::store::spool::{Durability, STATE_CLUSTER, STATE_CLUSTER_OUT};
use crate::store::tenants::{self, Tenants};

/// How often the spool's staged changes are published and the stream is read.
const POLL: Duration = Duration::from_millis(200);
/// Staged changes read from the spool per round.
const PUSH_BATCH: usize = 20 * MAX_PER_ENTRY;
/// Stream entries read per call.
const PULL_BATCH: usize = 100;
/// Bytes of changes per stream entry, about (reports handed to another node can be large).
const MAX_ENTRY_BYTES: usize = 1 << 20;
/// How often the counts of campaigns that changed are published.
const COUNTS_EVERY: Duration = Duration::from_secs(1);

/// Publishes staged changes and applies the stream's until `stop`.
pub async fn run(node: Arc<Node>, cluster: Arc<Cluster>, stop: CancellationToken) {
    // Recovery loads the suppression index first; changes apply on top of it.
    while !node.is_ready() {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_millis(20)) => {}
        }
    }
    let mut cursor = {
        let spool = Arc::clone(&node.spool);
        tokio::task::spawn_blocking(move || {
            let mut found = None;
            let _ = spool.scan_state(STATE_CLUSTER, |k, v| {
                if k == b"stream" {
                    found = Some(String::from_utf8_lossy(v).into_owned());
                }
            });
            found
        })
        .await
        .ok()
        .flatten()
        .unwrap_or_else(|| "0-0".to_owned())
    };
    let mut published = HashMap::new();
    let mut counts_due = 0;
    loop {
        let pushed = push(&node, &cluster).await;
        let pulled = pull(&node, &cluster, &mut cursor).await;
        if crate::now_ms() >= counts_due {
            publish_counts(&node, &cluster, &mut published).await;
            counts_due = crate::now_ms() + COUNTS_EVERY.as_millis() as u64;
        }
        // A backlog (an import, a return from an outage) goes on at once.
        if pushed < PUSH_BATCH && pulled < PULL_BATCH {
            tokio::select! {
                _ = stop.cancelled() => break,
                _ = tokio::time::sleep(POLL) => {}
            }
        } else if stop.is_cancelled() {
            break;
        }
    }
    // What was staged before the stop goes out now if Redis is there (else at next start).
    push(&node, &cluster).await;
}

/// Publishes up to [`PUSH_BATCH`] staged changes in order; returns how many.
async fn push(node: &Arc<Node>, cluster: &Cluster) -> usize {
    let spool = Arc::clone(&node.spool);
    let staged = tokio::task::spawn_blocking(move || {
        let mut out: Vec<(Vec<u8>, Vec<u8>)> = Vec::new();
        let _ = spool.scan_state(STATE_CLUSTER_OUT, |k, v| {
            if out.len() < PUSH_BATCH {
                out.push((k.to_vec(), v.to_vec()));
            }
        });
        out
    })
    .await
    .unwrap_or_default();
    let mut done = 0;
    for chunk in entries(&staged) {
        let changes: Vec<&[u8]> = chunk.iter().map(|(_, v)| v.as_slice()).collect();
        if cluster.publish(&changes).await.is_err() {
            break;
        }
        let mut batch = node.spool.batch();
        for (k, _) in chunk {
            batch.delete_state(STATE_CLUSTER_OUT, k);
        }
        // Published twice after a crash at worst, which applying allows.
        if node.spool.write(batch, Durability::Buffered).await.is_err() {
            break;
        }
        done += chunk.len();
    }
    done
}

/// Staged changes cut into stream entries of at most [`MAX_PER_ENTRY`] changes and about
/// [`MAX_ENTRY_BYTES`] (a change larger than that is an entry of its own).
fn entries(staged: &[(Vec<u8>, Vec<u8>)]) -> Vec<&[(Vec<u8>, Vec<u8>)]> {
    let mut out = Vec::new();
    let (mut start, mut bytes) = (0, 0);
    for (i, (_, v)) in staged.iter().enumerate() {
        if i > start && (i - start == MAX_PER_ENTRY || bytes + v.len() > MAX_ENTRY_BYTES) {
            out.push(&staged[start..i]);
            (start, bytes) = (i, 0);
        }
        bytes += v.len();
    }
    if start < staged.len() {
        out.push(&staged[start..]);
    }
    out
}

/// Publishes this node's counts of every campaign (not messages) whose counts changed since
/// they were last published; `published` remembers what was.
async fn publish_counts(
    node: &Node,
    cluster: &Cluster,
    published: &mut HashMap<uuid::Uuid, CountsSnapshot>,
) {
    let campaigns = node.campaigns.all();
    for c in &campaigns {
        if c.record.kind != CampaignKind::Bulk {
            continue;
        }
        let now = c.counts.snapshot();
        // Nothing to add (a campaign created here by another node, with no uploads here).
        let last = published.get(&c.record.id).copied().unwrap_or_default();
        if last == now {
            continue;
        }
        let json = serde_json::to_string(&now).unwrap_or_default();
        if cluster
            .publish_counts(&c.record.id.to_string(), &json)
            .await
            .is_err()
        {
            // Again next round, from where it stopped.
            return;
        }
        published.insert(c.record.id, now);
    }
    // Campaigns archived meanwhile: their counts in Redis expire on their own.
    if published.len() > campaigns.len() {
        let live: std::collections::HashSet<_> = campaigns.iter().map(|c| c.record.id).collect();
        published.retain(|id, _| live.contains(id));
    }
}

/// Applies up to [`PULL_BATCH`] stream entries after `cursor`; returns how many were read.
async fn pull(node: &Arc<Node>, cluster: &Cluster, cursor: &mut String) -> usize {
    let Ok(entries) = cluster.read(cursor, PULL_BATCH).await else {
        return 0;
    };
    let Some(last) = entries.last().map(|e| e.id.clone()) else {
        return 0;
    };
    let mut apply: Vec<Change> = Vec::new();
    for e in &entries {
        if e.origin == cluster.instance {
            continue;
        }
        match serde_json::from_str::<Vec<serde_json::Value>>(&e.changes) {
            Ok(changes) => apply.extend(changes.into_iter().filter_map(Change::read)),
            Err(err) => tracing::warn!(id = %e.id, error = %err, "cluster: bad stream entry"),
        }
    }
    // Campaign changes and reports handed to this node first, in order, each with its own
    // writes: a state change finds the campaign its stream entry follows.
    let tag = crate::outbound::tokens::node_tag(cluster.node_id());
    for change in &apply {
        let applied = match change {
            Change::Campaign(c) => apply_campaign(node, c).await,
            Change::Feedback(f) if f.is_for(&tag) => feedback::apply_handed(node, f)
                .await
                .map_err(|e| e.to_string()),
            _ => Ok(()),
        };
        if let Err(e) = applied {
            tracing::warn!(error = %e, "cluster: applying a change failed; read again");
            return 0;
        }
    }
    let mut batch = node.spool.batch();
    for change in &apply {
        match change {
            Change::Campaign(_) | Change::Feedback(_) => {}
            Change::Suppression(suppression::Change::Add { entry }) => {
                batch.put_suppression(&entry.key(), &entry.encode());
            }
            Change::Suppression(suppression::Change::Delete { address, scope }) => {
                batch.delete_suppression(&suppression::key(scope, address));
            }
            Change::Shaping(c) => Actions::stage_received(&mut batch, c),
            Change::Tenant(c) => Tenants::stage_received(&mut batch, c),
        }
    }
    batch.put_state(STATE_CLUSTER, b"stream", last.as_bytes());
    if let Err(e) = node.spool.write(batch, Durability::Buffered).await {
        tracing::warn!(error = %e, "cluster: applying changes failed; read again");
        return 0;
    }
    for change in apply {
        match change {
            Change::Campaign(_) | Change::Feedback(_) => {}
            Change::Suppression(suppression::Change::Add { entry }) => {
                node.suppressions.added(&entry);
            }
            Change::Suppression(suppression::Change::Delete { address, scope }) => {
                node.suppressions.remove(&address, &scope);
            }
            Change::Shaping(c) => node.actions.apply_received(c),
            Change::Tenant(c) => node.tenants.apply_received(c),
        }
    }
    *cursor = last;
    entries.len()
}

/// Creates a campaign another node created, or changes the state of one as it did. Applying
/// either twice does what applying it once does.
async fn apply_campaign(node: &Arc<Node>, change: &campaign::Change) -> Result<(), String> {
    match change {
        campaign::Change::Create { record } => {
            if node.campaigns.get(&record.id).is_some() {
                return Ok(());
            }
            let Some(seq) = node.campaigns.allocate_seq() else {
                return Err("no campaign numbers left".to_owned());
            };
            let bytes = record.encode();
            let created = Arc::new(Campaign::new(seq, (**record).clone(), 0));
            Upload::for_new_campaign(Arc::clone(node), created)
                .commit(|batch| batch.put_campaign(seq, &bytes))
                .await
                .map_err(|e| e.to_string())?;
            tracing::info!(campaign = %record.id, "cluster: campaign created by another node");
        }
        campaign::Change::State { id, state, breaker } => {
            // Unknown here (archived, or created before this node joined): nothing to change.
            if let Some(c) = node.campaigns.get(id)
                && c.state() != *state
                && c.state() != campaign::CampaignState::Cancelled
            {
                node.apply_campaign_state(&c, *state, breaker.clone())
                    .await
                    .map_err(|e| e.to_string())?;
            }
        }
    }
    Ok(())
}

/// A change read from the stream, by the module it belongs to.
enum Change {
    Suppression(suppression::Change),
    Shaping(actions::Change),
    Campaign(campaign::Change),
    Feedback(feedback::Change),
    Tenant(tenants::Change),
}

impl Change {
    /// The change, if its kind is one this node knows (a newer node may write others).
    fn read(v: serde_json::Value) -> Option<Change> {
        let kind = v.get("kind")?.as_str()?.to_owned();
        let parsed = if kind.starts_with("suppression.") {
            serde_json::from_value(v).map(Change::Suppression)
        } else if kind.starts_with("shaping.") {
            serde_json::from_value(v).map(Change::Shaping)
        } else if kind.starts_with("campaign.") {
            serde_json::from_value(v).map(Change::Campaign)
        } else if kind.starts_with("feedback.") {
            serde_json::from_value(v).map(Change::Feedback)
        } else if kind.starts_with("tenant.") {
            serde_json::from_value(v).map(Change::Tenant)
        } else {
            tracing::debug!(%kind, "cluster: change of an unknown kind skipped");
            return None;
        };
        parsed
            .map_err(|e| tracing::warn!(%kind, error = %e, "cluster: unreadable change skipped"))
            .ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn staged(sizes: &[usize]) -> Vec<(Vec<u8>, Vec<u8>)> {
        sizes.iter().map(|&n| (Vec::new(), vec![b'x'; n])).collect()
    }

    #[test]
    fn entries_hold_at_most_a_count_and_about_a_size() {
        let lens =
            |s: &[(Vec<u8>, Vec<u8>)]| entries(s).iter().map(|e| e.len()).collect::<Vec<_>>();
        assert!(entries(&[]).is_empty());
        assert_eq!(lens(&staged(&[10; 1201])), vec![500, 500, 201]);
        let mb = MAX_ENTRY_BYTES;
        // A change larger than an entry goes alone; small ones around it are grouped.
        assert_eq!(
            lens(&staged(&[10, 10, 2 * mb, 10, mb / 2, mb / 2])),
            vec![2, 1, 2, 1]
        );
    }
}
