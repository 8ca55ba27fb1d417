//! Pick and lease: jobs taken from the scheduler are read back from the spool (on the task when
//! RocksDB has them in memory, as it does for mail sent soon after it came in, else on the
//! blocking pool, which then reads the next ones ahead: [`crate::store::spool::Spool::read_ahead`]),
//! decoded once, and sorted: those of paused campaigns are parked, cancelled, suppressed
//! and expired ones end here, the rest become [`Prepared`] jobs for an attempt, grouped into
//! transactions.
//!
//! A job taken from the scheduler is leased to delivery until it is requeued (deferred, or left
//! untouched) or released (final state); every path here does one or the other.

use std::sync::{Arc, LazyLock};

use prometheus::{IntCounter, IntCounterVec, register_int_counter_vec};

use super::Delivery;
use super::site::Site;
use crate::effects::delivery_log::{LogRecord, Unsent};
use crate::effects::transition::Transition;
use crate::outbound::outcome;
use crate::scheduler::index::{DomainId, PendingJob};
use crate::store::campaign::{Campaign, CampaignState};
use crate::store::spool::{JobId, JobRecord, JobState, OwnedJobRecord, Reach, SpoolError};

pub(crate) static SUPPRESSED_AT_DELIVERY: LazyLock<IntCounter> = LazyLock::new(|| {
    prometheus::register_int_counter!(
        "sluice_recipients_suppressed_at_delivery_total",
        "Queued recipients dropped just before delivery because a suppression was added after they were accepted."
    )
    .expect("metric registers once")
});

/// A job read back from the spool, decoded and checked, ready to attempt.
pub(super) struct Prepared {
    pub job: PendingJob,
    pub campaign: Arc<Campaign>,
    /// The job's record, decoded once for the whole attempt.
    pub record: OwnedJobRecord,
    /// The VERP envelope sender, computed once for the attempt and its log record.
    pub sender: String,
}

/// Batches of job records read for delivery, by where they were found: `memory` (RocksDB's
/// memtables and block cache, read on the delivery task) or `disk` (at least one record was
/// not, so the batch was read on the blocking pool).
pub(crate) static JOB_READS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register_int_counter_vec!(
        "sluice_job_reads_total",
        "Batches of queued recipients read back for delivery, by where RocksDB had them: memory (memtables, block cache) or disk (a read on the blocking pool).",
        &["from"]
    )
    .expect("metric registers once")
});

impl Delivery {
    /// Reads the jobs' records and sorts out those that must not be attempted: paused campaigns
    /// (parked), cancelled ones, suppressed recipients, expired jobs.
    pub(super) async fn prepare(
        &self,
        jobs: Vec<PendingJob>,
        site: Option<&Site>,
    ) -> Vec<Prepared> {
        if jobs.is_empty() {
            return Vec::new();
        }
        let ids: Vec<JobId> = jobs.iter().map(|j| j.id).collect();
        let read = match read_jobs(&self.node, &ids, Reach::Memory) {
            Err(SpoolError::NotInMemory) => {
                JOB_READS.with_label_values(&["disk"]).inc();
                let node = Arc::clone(&self.node);
                tokio::task::spawn_blocking(move || {
                    let read = read_jobs(&node, &ids, Reach::Disk);
                    // The next batches' records, while on this thread (see `read_ahead`). Only
                    // a warm-up: a read that needs them reports an error itself.
                    if let Some(last) = ids.iter().max()
                        && let Err(e) = node.spool.read_ahead(*last)
                    {
                        tracing::debug!(error = %e, "reading job records ahead failed");
                    }
                    read
                })
                .await
            }
            r => {
                JOB_READS.with_label_values(&["memory"]).inc();
                Ok(r)
            }
        };
        let (records, mut messages) = match read {
            Ok(Ok(r)) => r,
            Ok(Err(e)) => {
                tracing::error!(error = %e, "reading job records failed; retrying later");
                self.requeue_at(jobs, crate::now_ms() + 5_000);
                return Vec::new();
            }
            Err(e) => {
                tracing::error!(error = %e, "job read task failed; retrying later");
                self.requeue_at(jobs, crate::now_ms() + 5_000);
                return Vec::new();
            }
        };
        let mut out = Vec::with_capacity(jobs.len());
        for (i, (job, bytes)) in jobs.into_iter().zip(records).enumerate() {
            let Some(bytes) = bytes else {
                self.release(&job);
                continue;
            };
            let message = messages.get_mut(i).and_then(Option::take);
            let campaign = match self.node.campaign_of(job.id, message) {
                Ok(Some(c)) => c,
                Ok(None) => {
                    tracing::warn!(job = %job.id, "job without a campaign or message record; skipped");
                    self.release(&job);
                    continue;
                }
                Err(e) => {
                    tracing::error!(job = %job.id, error = %e, "corrupt message record; skipped");
                    self.release(&job);
                    continue;
                }
            };
            let record = match OwnedJobRecord::decode(&bytes) {
                Ok(r) => r,
                Err(e) => {
                    tracing::error!(job = %job.id, error = %e, "corrupt job record; skipped");
                    self.release(&job);
                    continue;
                }
            };
            if record.state != JobState::Queued {
                self.release(&job);
                continue;
            }
            match campaign.state() {
                CampaignState::Paused => {
                    self.node
                        .scheduler
                        .park(job, || campaign.state() == CampaignState::Paused);
                    continue;
                }
                CampaignState::Cancelled => {
                    // Counted as cancelled when the campaign was cancelled.
                    self.end_unsent(&job, &campaign, &record, JobState::Cancelled, None)
                        .await;
                    continue;
                }
                CampaignState::Active => {}
            }
            // Checked again here: a suppression added after ingest stops queued mail.
            let from_domain = crate::intake::address::domain_of(&campaign.record.from);
            if let Some(reason) =
                self.node
                    .suppressions
                    .check(&record.address, from_domain, campaign.record.tenant())
            {
                SUPPRESSED_AT_DELIVERY.inc();
                self.end_unsent(
                    &job,
                    &campaign,
                    &record,
                    JobState::Suppressed,
                    Some(reason.as_str()),
                )
                .await;
                continue;
            }
            let age = crate::now_ms().saturating_sub(record.accepted_at_ms);
            let expired = age >= self.config.delivery.max_age.as_millis() as u64;
            let sender = self
                .node
                .assembler
                .envelope_sender(&campaign.record, job.id);
            let p = Prepared {
                job,
                campaign,
                record,
                sender,
            };
            if expired {
                let o = outcome::expired(&p.record.last_response);
                self.finish(&p, o, site, None, 0).await;
                continue;
            }
            out.push(p);
        }
        out
    }

    /// Gives jobs back to the scheduler untouched.
    pub(super) fn requeue(&self, jobs: impl Iterator<Item = Prepared>) {
        self.node.scheduler.requeue(jobs.map(|p| p.job));
    }

    pub(super) fn requeue_at(&self, jobs: Vec<PendingJob>, due_ms: u64) {
        let jobs = jobs.into_iter().map(|j| PendingJob { due_ms, ..j });
        self.node.scheduler.requeue(jobs);
    }

    /// Ends a leased job without sending it: records its final `state` (with `reason` as its
    /// last response, else the one it had), reports it (a `suppressed` or `cancelled` event) and
    /// lets it go. A suppressed recipient moves from its queued count to `suppressed`.
    async fn end_unsent(
        &self,
        job: &PendingJob,
        campaign: &Campaign,
        record: &OwnedJobRecord,
        state: JobState,
        reason: Option<&str>,
    ) {
        let updated = JobRecord {
            state,
            next_attempt_ms: crate::now_ms(),
            last_response: reason.unwrap_or(&record.last_response),
            ..record.as_record()
        };
        let mut t = Transition::of(campaign, job.id);
        t.set_record(JobState::Queued, &updated);
        if state == JobState::Suppressed {
            let c = &campaign.counts;
            t.counts = Some((c.slot(JobState::Queued, record.attempts), &c.suppressed));
        }
        let (kind, detail) = match (state, reason) {
            (JobState::Suppressed, Some(r)) => ("s", format!("suppressed: {r}")),
            (JobState::Suppressed, None) => ("s", "suppressed".to_owned()),
            _ => ("c", "campaign cancelled".to_owned()),
        };
        t.report = Some(LogRecord::unsent(Unsent {
            kind,
            campaign: campaign.record.id.to_string(),
            job: job.id.to_string(),
            recipient: &record.address,
            accepted_at_ms: record.accepted_at_ms,
            attempts: record.attempts,
            detail,
            stage: "delivery",
        }));
        self.record(t).await;
        self.release(job);
    }

    /// A leased job leaves the engine for good (final state, or nothing to do).
    pub(super) fn release(&self, job: &PendingJob) {
        self.node.scheduler.release(job.domain, 1);
    }

    /// Takes up to `max` more due jobs of `domain` and `campaign` for a merged message (none if
    /// the domain was suspended meanwhile).
    pub(super) fn pop_more(&self, domain: DomainId, campaign: u32, max: usize) -> Vec<PendingJob> {
        self.node
            .scheduler
            .pop_due_of(domain, campaign, crate::now_ms(), max)
    }
}

/// The records of `ids` and, for jobs of streams' buckets, their messages' records (position for
/// position; `None` elsewhere). Blocking with [`Reach::Disk`].
fn read_jobs(
    node: &crate::node::Node,
    ids: &[JobId],
    reach: Reach,
) -> Result<(Records, Vec<Option<crate::node::MessageRead>>), SpoolError> {
    let records = node.spool.get_jobs(ids, reach)?;
    let in_bucket = |id: &JobId| {
        node.campaigns
            .by_seq(id.campaign)
            .is_some_and(|c| c.record.is_bucket())
    };
    let bucket: Vec<bool> = ids.iter().map(in_bucket).collect();
    if !bucket.contains(&true) {
        return Ok((records, Vec::new()));
    }
    // Only the messages' records are read; the other positions stay `None`.
    let wanted: Vec<JobId> = ids
        .iter()
        .zip(&bucket)
        .filter_map(|(id, &b)| b.then_some(*id))
        .collect();
    let mut found = node.read_messages(&wanted, true, reach)?.into_iter();
    let messages = bucket
        .iter()
        .map(|&b| if b { found.next().flatten() } else { None })
        .collect();
    Ok((records, messages))
}

/// Stored records, position for position with the ids they were read for.
type Records = Vec<Option<Vec<u8>>>;

/// Splits prepared jobs into transactions: each job alone, except consecutive jobs of one
/// campaign that is not personalised (or of one raw message), which share a message up to `max`
/// recipients. An address
/// that needs SMTPUTF8 always goes alone, so a server without it refuses only that one.
pub(super) fn group_recipients(prepared: Vec<Prepared>, max: usize) -> Vec<Vec<Prepared>> {
    let mergeable = |p: &Prepared| !p.campaign.record.personalised && p.record.address.is_ascii();
    let mut groups: Vec<Vec<Prepared>> = Vec::with_capacity(prepared.len());
    for p in prepared {
        if let Some(last) = groups.last_mut()
            && last.len() < max
            && mergeable(&p)
            && mergeable(&last[0])
            && same_message(&last[0].campaign, &p.campaign)
        {
            last.push(p);
            continue;
        }
        groups.push(vec![p]);
    }
    groups
}

/// Whether two jobs send the same message: one campaign's, or one raw message's (its jobs each
/// have their record, and share the bytes read for them).
fn same_message(a: &Arc<Campaign>, b: &Arc<Campaign>) -> bool {
    Arc::ptr_eq(a, b) || matches!((&a.body, &b.body), (Some(x), Some(y)) if Arc::ptr_eq(x, y))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn prepared(campaign: &Arc<Campaign>, index: u32, address: &str) -> Prepared {
        let record = OwnedJobRecord {
            state: JobState::Queued,
            upload: 1,
            accepted_at_ms: 1,
            attempts: 0,
            next_attempt_ms: 1,
            address: address.to_owned(),
            vars: String::new(),
            last_response: String::new(),
        };
        let mut queue = crate::scheduler::index::QueueIndex::new();
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
            record,
            sender: String::new(),
        }
    }

    fn campaign(seq: u32, personalised: bool) -> Arc<Campaign> {
        let record: crate::store::campaign::CampaignRecord =
            serde_json::from_value(serde_json::json!({
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
}
