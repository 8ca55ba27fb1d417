//! Retention: what is kept of a campaign once it has finished, and for how long.
//!
//! A campaign is *finished* when none of its recipients is queued or in flight and no upload to
//! it is open ([`Campaign::is_idle`]). From then on, each pass (every `retention.interval`)
//! moves its [`Lifecycle`] on: it is marked finished, after `retention.job_tombstones` its
//! recipients' tombstones, histories, message records and address index are deleted by key
//! range, and after
//! `retention.campaigns` its record keeps counts and metadata only. A campaign that takes
//! recipients again before that is simply not finished any more. Once both have happened
//! nothing about it can change, so it moves to the archive: out of memory and out of what
//! recovery reads, still found by id. Start-up and the registry then hold the campaigns of the
//! last `max(job_tombstones, campaigns)` only, whatever was sent before.
//!
//! Deleting by range costs a few bytes per campaign in a write batch, whatever the number of
//! recipients, and nothing on the hot path. The range is then compacted on the blocking pool,
//! which rewrites only the files it overlaps, so the disk space comes back at once instead of
//! whenever RocksDB would reach those files. Live jobs never need deleting here, since a job
//! leaves the live jobs when it becomes final.
//!
//! Each step is decided under the campaign's lifecycle lock ([`Campaign::advance_lifecycle`]),
//! so an upload either opens before it (and the campaign is not finished) or after (and gets
//! indexes above the deleted range, or is refused once the templates are gone); it is written
//! synced, under the node's campaign-state lock, together with the deletions it makes.

use std::sync::Arc;

use crate::node::Node;
use crate::store::campaign::{ArchivedCampaign, Campaign, Lifecycle};
use crate::store::spool::{Durability, SpoolError};

/// What one pass did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Pass {
    /// Campaigns that finished in this pass.
    pub finished: usize,
    /// Campaigns whose tombstones were deleted.
    pub tombstones_deleted: usize,
    /// Campaigns whose templates were dropped.
    pub compacted: usize,
    /// Campaigns moved to the archive.
    pub archived: usize,
}

/// Runs one pass over the campaigns in memory at `now` (ms).
pub async fn pass(node: &Arc<Node>, now: u64) -> Result<Pass, SpoolError> {
    let r = &node.config.retention;
    let tombstones_ms = r.job_tombstones.as_millis() as u64;
    let templates_ms = r.campaigns.as_millis() as u64;
    let mut done = Pass::default();
    for campaign in node.campaigns.all() {
        let before = campaign.lifecycle();
        if campaign.record.is_bucket()
            && r.bucket_period(campaign.record.created_at_ms) == r.bucket_period(now)
        {
            // A stream's bucket takes messages for its whole period; it may finish after it.
            continue;
        }
        let step = campaign.advance_lifecycle(now, tombstones_ms, templates_ms);
        let after = campaign.lifecycle();
        // Compacted (so it takes no more recipients) with its tombstones gone (so no report
        // maps to it any more): nothing about it can change again.
        let archive = after.compacted_at_ms.is_some()
            && after.tombstones_deleted_at_ms.is_some()
            && campaign.is_idle();
        if step.is_none() && !archive {
            continue;
        }
        let below = step.and_then(|s| s.delete_tombstones_below);
        persist(node, &campaign, below, archive.then_some(now)).await?;
        count(&mut done, &before, &after);
        done.archived += usize::from(archive);
    }
    Ok(done)
}

fn count(done: &mut Pass, before: &Lifecycle, after: &Lifecycle) {
    let newly = |b: Option<u64>, a: Option<u64>| b.is_none() && a.is_some();
    if newly(before.finished_at_ms, after.finished_at_ms) {
        done.finished += 1;
    }
    if newly(
        before.tombstones_deleted_at_ms,
        after.tombstones_deleted_at_ms,
    ) {
        done.tombstones_deleted += 1;
    }
    if newly(before.compacted_at_ms, after.compacted_at_ms) {
        done.compacted += 1;
    }
}

/// Writes what a step decided: the tombstone deletions and the new record, or, when
/// `archive_at` is set, the move to the archive, after which the campaign leaves the registry.
async fn persist(
    node: &Node,
    campaign: &Campaign,
    delete_tombstones_below: Option<u32>,
    archive_at: Option<u64>,
) -> Result<(), SpoolError> {
    {
        let _serial = node.state_changes.lock().await;
        let mut batch = node.spool.batch();
        if let Some(below) = delete_tombstones_below {
            batch.delete_tombstones(campaign.seq, below);
        }
        let archived = node.campaigns.archived() + 1;
        match archive_at {
            Some(now) => batch.archive_campaign(
                campaign.seq,
                campaign.record.id.as_bytes(),
                &ArchivedCampaign::of(campaign, now).encode(),
                archived,
            ),
            None => batch.put_campaign(
                campaign.seq,
                &campaign.stored_record(campaign.state()).encode(),
            ),
        }
        node.spool.write(batch, Durability::Sync).await?;
        if archive_at.is_some() {
            // Under the lock, so a state change either wrote before this or finds the
            // campaign gone.
            node.campaigns.remove_archived(campaign, archived);
            node.scheduler.forget(campaign.seq);
        }
    }
    if let Some(below) = delete_tombstones_below {
        let (spool, seq) = (Arc::clone(&node.spool), campaign.seq);
        tokio::task::spawn_blocking(move || spool.compact_tombstones(seq, below))
            .await
            .map_err(|e| SpoolError::Rocks(format!("compaction task: {e}")))?;
    }
    Ok(())
}

/// Runs a pass every `retention.interval` until `stop`.
pub async fn run(node: Arc<Node>, stop: tokio_util::sync::CancellationToken) {
    let mut tick = tokio::time::interval(node.config.retention.interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = tick.tick() => {}
        }
        match pass(&node, crate::now_ms()).await {
            Ok(p) if p == Pass::default() => {}
            Ok(p) => tracing::info!(
                finished = p.finished,
                tombstones_deleted = p.tombstones_deleted,
                compacted = p.compacted,
                archived = p.archived,
                "retention pass"
            ),
            Err(e) => tracing::warn!(error = %e, "retention pass failed; retried at the next"),
        }
    }
}
