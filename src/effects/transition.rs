//! Job transitions: the one path by which something that happened to a recipient is written,
//! counted and reported.
//!
//! A [`Transition`] names a job and everything its change touches: the job's new record (kept
//! among the live jobs while queued, as a tombstone once final, and tallied by final state), the
//! in-memory campaign counter it moves between, the delivery-log record that reports it (which
//! is also its webhook event and an entry of the job's stored history), and a suppression it
//! causes. Delivery (an attempt's outcome, a job dropped
//! unsent) and feedback (a DSN, a complaint, an unsubscribe) both build one; neither writes a
//! record, a count or an event any other way, so the stored record, the counts and the events
//! cannot drift apart. A transactional message's own record is compacted by the transition
//! that makes its job final (and a raw message's bytes deleted, when it had one recipient).
//!
//! Two steps, because the two callers write differently: [`Transition::writes`] is what goes to
//! the spool, staged into whatever batch the caller writes (delivery batches many outcomes and
//! syncs on a timer; a report is written on its own, synced, before it is answered), and
//! [`Transition::apply`] changes memory (counts, suppression index, log line, metrics) once the
//! write is queued or done. [`Transition::commit`] is both, synced. No blocking work here; the
//! spool write goes through its writer thread.

use std::sync::LazyLock;
use std::sync::atomic::{AtomicU64, Ordering};

use prometheus::{IntCounter, register_int_counter};

use crate::effects::delivery_log::LogRecord;
use crate::effects::guard::Observation;
use crate::effects::suppression::{Entry, Reason};
use crate::node::Node;
use crate::store::campaign::Campaign;
use crate::store::spool::{Durability, JobId, JobRecord, JobState, SpoolBatch, SpoolError, Tally};

pub(crate) static COMPLAINED: LazyLock<IntCounter> = LazyLock::new(|| {
    register_int_counter!(
        "sluice_recipients_complained_total",
        "Recipients who complained (ARF abuse, fraud or virus report mapped to a message), counted once per recipient and sending domain. Over deliveries, the complaint rate mailbox providers watch."
    )
    .expect("metric registers once")
});

pub(crate) static UNSUBSCRIBED: LazyLock<IntCounter> = LazyLock::new(|| {
    register_int_counter!(
        "sluice_recipients_unsubscribed_total",
        "Recipients who unsubscribed (one-click link or unsubscribe mailto), counted once per recipient and sending domain."
    )
    .expect("metric registers once")
});

/// What a report counts for the breakers: a delivery or a bounce (complaints and unsubscribes
/// are counted with the suppression they cause, once per recipient).
fn observation(r: &LogRecord) -> Option<Observation<'static>> {
    match r.kind {
        "d" => Some(Observation::Delivered),
        "b" | "rb" => Some(Observation::Bounced {
            category: r.bounce_cat.unwrap_or("other"),
            remote: r.kind == "rb",
        }),
        _ => None,
    }
}

/// One change to one job. Every part is optional: a repeated complaint is only a report, an
/// unsent cancelled job only a record.
pub struct Transition<'a> {
    pub campaign: &'a Campaign,
    pub job: JobId,
    /// The job's new record, when it changes ([`Transition::set_record`]).
    pub record: Option<JobChange>,
    /// The campaign counters the recipient leaves and enters.
    pub counts: Option<(&'a AtomicU64, &'a AtomicU64)>,
    /// The delivery-log record reporting the change; also its webhook event.
    pub report: Option<LogRecord>,
    /// A suppression the change causes. One that names the campaign with reason complaint or
    /// unsubscribe counts into the campaign's `complained` or `unsubscribed` the first time the
    /// address is suppressed in that scope, exactly as recovery counts such entries back.
    pub suppression: Option<Entry>,
    /// The record change takes the job from queued to final (set by [`Transition::writes`]).
    ends_job: bool,
    /// A failure its submitter is told of ([`crate::effects::dsn`]): the recipient's DSN
    /// request and when the message arrived (set by [`Transition::set_record`]).
    dsn: Option<(crate::effects::dsn::Request, u64)>,
}

/// A job's new record and the states it moves between, which say where it is stored and how
/// the campaign's stored tally changes.
pub struct JobChange {
    from: JobState,
    to: JobState,
    bytes: Vec<u8>,
}

/// What a transition writes to the spool, owned, so it can travel to a batching writer.
#[derive(Default)]
pub struct Writes {
    job: Option<(JobId, JobChange)>,
    /// A message's record, compacted as its job ends.
    message: Option<(JobId, Vec<u8>)>,
    /// A raw message's bytes, deleted as its only job ends (those of a message to several
    /// recipients go with the tombstones).
    message_body: Option<JobId>,
    /// The report's entry in the job's history, with its time (ms).
    history: Option<(JobId, u64, Vec<u8>)>,
    event: Option<(Vec<u32>, Vec<u8>)>,
    /// The suppression's key and record, and in cluster mode the change for the other nodes
    /// (boxed: few transitions suppress, and every one travels to the writer).
    suppression: Option<Box<SuppressionWrite>>,
}

/// A suppression's spool key and record, and in cluster mode its change for the other nodes.
type SuppressionWrite = (Vec<u8>, Vec<u8>, Option<Vec<u8>>);

impl Writes {
    /// Adds these writes to `batch`.
    pub fn stage(self, batch: &mut SpoolBatch) {
        if let Some((id, change)) = self.job {
            match (change.from.is_final(), change.to.is_final()) {
                (false, false) => batch.put_job(id, &change.bytes),
                (false, true) => batch.finish_job(id, &change.bytes),
                (true, true) => batch.put_final(id, &change.bytes),
                (true, false) => {
                    batch.delete_final(id);
                    batch.put_job(id, &change.bytes);
                }
            }
            batch.tally(id.campaign, &Tally::moved(change.from, change.to));
        }
        if let Some((id, record)) = self.message {
            batch.put_message(id, &record);
        }
        if let Some(id) = self.message_body {
            batch.delete_message_body(id);
        }
        if let Some((id, at, entry)) = self.history {
            batch.put_history(id, at, &entry);
        }
        if let Some((hooks, json)) = self.event {
            batch.add_event(hooks, json);
        }
        if let Some(s) = self.suppression {
            let (key, value, change) = *s;
            batch.put_suppression(&key, &value);
            if let Some(change) = change {
                crate::cluster::sync::stage(batch, &change);
            }
        }
    }
}

/// What [`Transition::apply`] changed that callers report.
#[derive(Debug, Clone, Copy, Default)]
pub struct Applied {
    /// The suppression was new (the address was not suppressed in that scope before).
    pub suppressed: bool,
}

impl<'a> Transition<'a> {
    /// A transition of `job` of `campaign` that changes nothing yet.
    pub fn of(campaign: &'a Campaign, job: JobId) -> Transition<'a> {
        Transition {
            campaign,
            job,
            record: None,
            counts: None,
            report: None,
            suppression: None,
            ends_job: false,
            dsn: None,
        }
    }

    /// Sets the job's new record, `rec`, which replaces one in state `from`. A final record is
    /// stored as its tombstone (its `next_attempt_ms` is when it became final).
    pub fn set_record(&mut self, from: JobState, rec: &JobRecord<'_>) {
        let raw = self.campaign.record.raw.as_ref();
        // A submitted message's recipient keeps its DSN request (NOTIFY, ORCPT) when final: a
        // remote bounce after delivery is reported to the submitter too.
        let bytes = if rec.state.is_final() && raw.is_none() {
            rec.tombstone().encode()
        } else {
            rec.encode()
        };
        let failed = |s: JobState| matches!(s, JobState::Bounced | JobState::Expired);
        if let Some(raw) = raw
            && raw.via == "smtp"
            && !raw.mail_from.is_empty()
            && failed(rec.state)
            && !failed(from)
        {
            let request = crate::effects::dsn::Request::parse(rec.vars);
            self.dsn = request
                .wants_failure()
                .then_some((request, rec.accepted_at_ms));
        }
        self.record = Some(JobChange {
            from,
            to: rec.state,
            bytes,
        });
    }

    /// The spool writes: the job record, the event, the suppression record. Takes the record's
    /// bytes out of `self`.
    pub fn writes(&mut self, node: &Node) -> Writes {
        if let Some(r) = &mut self.report {
            if r.tags.is_empty() {
                r.tags.clone_from(&self.campaign.record.tags);
            }
            if r.tenant.is_none() {
                r.tenant.clone_from(&self.campaign.record.tenant);
            }
        }
        self.ends_job = self
            .record
            .as_ref()
            .is_some_and(|c| !c.from.is_final() && c.to.is_final());
        // A message keeps only what reports and lookups show once it is final.
        let message = (self.ends_job && self.campaign.is_message())
            .then(|| (self.job, self.campaign.record.compacted().encode()));
        let message_body = match &self.campaign.record.raw {
            Some(raw) if self.ends_job && raw.recipients == 1 => Some(JobId {
                campaign: self.job.campaign,
                index: raw.body,
            }),
            _ => None,
        };
        let history = self
            .report
            .as_ref()
            .map(|r| (self.job, crate::now_ms(), r.history_entry()));
        Writes {
            job: self.record.take().map(|r| (self.job, r)),
            message,
            message_body,
            history,
            event: self.report.as_ref().and_then(|r| node.webhooks.event(r)),
            suppression: self.suppression.as_ref().map(|e| {
                let change = node.suppressions.replicating().then(|| {
                    crate::effects::suppression::Change::Add { entry: e.clone() }.to_json()
                });
                Box::new((e.key(), e.encode(), change))
            }),
        }
    }

    /// The changes in memory, once the writes are queued (delivery) or done (reports).
    pub fn apply(self, node: &Node) -> Applied {
        let mut applied = Applied::default();
        if self.ends_job {
            self.campaign.end_live();
        }
        if let Some((from, to)) = self.counts {
            self.campaign.counts.shift(from, to);
        }
        if let Some(o) = self.report.as_ref().and_then(observation) {
            node.guard.observe(self.campaign, o);
        }
        if let Some(entry) = &self.suppression {
            applied.suppressed = node.suppressions.added(entry);
            if applied.suppressed && entry.campaign == Some(self.campaign.record.id) {
                let c = &self.campaign.counts;
                match entry.reason {
                    Reason::Complaint => {
                        COMPLAINED.inc();
                        c.complained.fetch_add(1, Ordering::Relaxed);
                        node.guard.observe(self.campaign, Observation::Complained);
                    }
                    Reason::Unsubscribe => {
                        UNSUBSCRIBED.inc();
                        c.unsubscribed.fetch_add(1, Ordering::Relaxed);
                        node.guard.observe(self.campaign, Observation::Unsubscribed);
                    }
                    Reason::HardBounce | Reason::Manual => {}
                }
            }
        }
        if let (Some((request, arrival_ms)), Some(report), Some(raw)) =
            (self.dsn, &self.report, &self.campaign.record.raw)
        {
            node.dsns.send(crate::effects::dsn::Notice {
                to: raw.mail_from.clone(),
                envid: raw.envid.clone(),
                ret: raw.ret,
                recipient: report.recipient.clone(),
                orcpt: request.orcpt,
                action: "failed",
                status: report.dsn_status.clone(),
                // The server's reply as it was: code, enhanced code, text.
                diagnostic: match report.reply_code {
                    Some(code) => format!("{code} {} {}", report.dsn_status, report.dsn_diag),
                    None => report.dsn_diag.clone(),
                },
                smtp_reply: report.reply_code.is_some(),
                remote_mta: report.mx_host.clone(),
                arrival_ms,
                original: self.campaign.body.clone(),
                job: report.job.clone(),
            });
        }
        if let Some(report) = self.report {
            node.log.record(report);
        }
        applied
    }

    /// Writes (synced) and applies: for changes a caller answers for, such as a report.
    pub async fn commit(mut self, node: &Node) -> Result<Applied, SpoolError> {
        let mut batch = node.spool.batch();
        self.writes(node).stage(&mut batch);
        if !batch.is_empty() {
            node.spool.write(batch, Durability::Sync).await?;
        }
        Ok(self.apply(node))
    }
}
