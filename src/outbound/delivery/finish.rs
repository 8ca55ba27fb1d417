//! Finish: an attempt's outcome becomes the job's new state. The one classifier names it
//! (delivered, deferred with the retry schedule, bounced, expired); a [`Transition`] writes the
//! record, moves the counts, reports it (log line and webhook event) and suppresses a hard
//! bounce; the job goes back to the scheduler or leaves it; the attempt metrics are counted.
//!
//! Spool writes go to one batching task ([`write_updates`]) that syncs the WAL at most every
//! 100 ms: a crash may repeat a delivery that was in flight, never lose one.

use std::sync::{Arc, LazyLock};
use std::time::Duration;

use prometheus::{Histogram, IntCounterVec, register_histogram, register_int_counter_vec};
use tokio::sync::{mpsc, oneshot};

use super::pick::Prepared;
use super::site::Site;
use super::{Delivery, stats};
use crate::effects::delivery_log::{LogRecord, rfc3339};
use crate::effects::transition::{Transition, Writes};
use crate::node::Node;
use crate::outbound::outcome::{self, Outcome, Verdict};
use crate::outbound::retry::retry_delay;
use crate::scheduler::index::PendingJob;
use crate::store::campaign::CampaignState;
use crate::store::spool::{Durability, JobRecord, JobState};

static ATTEMPTS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register_int_counter_vec!(
        "sluice_delivery_attempts_total",
        "Delivery attempts by verdict (delivered, deferred, bounced, expired) and site label. rate() of delivered is throughput.",
        &["verdict", "site"]
    )
    .expect("metric registers once")
});

static TENANT_ATTEMPTS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register_int_counter_vec!(
        "sluice_tenant_delivery_attempts_total",
        "Delivery attempts per tenant (the first 100 tenants by name, then other) by verdict (delivered, deferred, bounced, expired).",
        &["tenant", "verdict"]
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

static SOURCE_ATTEMPTS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register_int_counter_vec!(
        "sluice_source_attempts_total",
        "Delivery attempts by egress source (names from [[source]]) and verdict (delivered, deferred, bounced, expired). A source whose deferred share rises is being pushed back.",
        &["source", "verdict"]
    )
    .expect("metric registers once")
});

static SHAPING_TRIGGERS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register_int_counter_vec!(
        "sluice_shaping_triggers_total",
        "Provider replies that set a shaping action (suspend, throttle) or an AIMD decrease, by egress source, kind and rule (aimd for AIMD).",
        &["source", "kind", "rule"]
    )
    .expect("metric registers once")
});

/// Shows every source's AIMD trigger count from the start (at 0), so its series exists before
/// the first throttling reply.
pub(super) fn register_sources(sources: &[crate::config::Source]) {
    for s in sources {
        SHAPING_TRIGGERS.with_label_values(&[s.name.as_str(), "aimd", "aimd"]);
    }
}

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

/// Messages to the outcome writer.
pub(super) enum Update {
    /// What one transition writes.
    Writes(Writes),
    Close(oneshot::Sender<()>),
}

impl Delivery {
    /// [`Delivery::finish`] for each job of a group, with the outcome `outcome(i)` of the i-th.
    pub(super) async fn finish_all(
        &self,
        group: &[Prepared],
        outcome: impl Fn(usize) -> Outcome,
        site: &Site,
        conn: Option<&stats::Held>,
        size: usize,
    ) {
        for (i, p) in group.iter().enumerate() {
            self.finish(p, outcome(i), Some(site), conn, size).await;
        }
    }

    /// Applies an outcome: new job state, counts, retry schedule, spool update, log record,
    /// suppression of a hard bounce, metrics.
    pub(super) async fn finish(
        &self,
        p: &Prepared,
        o: Outcome,
        site: Option<&Site>,
        conn: Option<&stats::Held>,
        size: usize,
    ) {
        let rec = &p.record;
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
                o.retry_at_ms
                    .filter(|&t| t > now)
                    .unwrap_or_else(|| now + retry_delay(attempt, d.retry_initial, d.retry_max)),
            ),
        };
        let summary = o.summary();
        let (kind, action, verdict) = match o.verdict {
            Verdict::Delivered => ("d", "delivered", "delivered"),
            Verdict::Deferred => ("t", "delayed", "deferred"),
            Verdict::Bounced => ("b", "failed", "bounced"),
            Verdict::Expired => ("x", "failed", "expired"),
        };
        let campaign = &p.campaign;
        let counts = &campaign.counts;
        let from = if campaign.state() == CampaignState::Cancelled {
            &counts.cancelled
        } else {
            counts.slot(JobState::Queued, rec.attempts)
        };
        let mut t = Transition::of(campaign, p.job.id);
        t.set_record(
            JobState::Queued,
            &JobRecord {
                state,
                attempts: attempt,
                next_attempt_ms: next,
                last_response: &summary,
                ..rec.as_record()
            },
        );
        t.counts = Some((from, counts.slot(state, attempt)));
        t.report = Some(LogRecord {
            kind,
            time_queued: rfc3339(rec.accepted_at_ms),
            time_logged: rfc3339(now),
            campaign: campaign.record.id.to_string(),
            job: p.job.id.to_string(),
            recipient: rec.address.clone(),
            sender: p.sender.clone(),
            dsn_action: action,
            dsn_status: o.status.to_string(),
            reply_code: o.code,
            dsn_diag: o.text.clone(),
            stage: o.stage.to_string(),
            mx_host: conn.map(|c| c.host.clone()),
            mx_ip: conn.map(|c| c.peer.ip().to_string()),
            tls: conn.is_some_and(|c| c.tls),
            tls_policy: conn.map(|c| c.tls_policy),
            source: conn
                .and_then(|c| self.sources.get(c.source))
                .map(|s| s.name.clone()),
            pool: Some(self.pools[self.pool_of(&p.campaign)].name.clone()),
            size,
            attempt,
            bounce_cat: o.class.map(|c| c.category.as_str()),
            feedback_type: None,
            tags: Vec::new(),
            tenant: None,
        });
        if let Some(class) = o.class
            && o.verdict == Verdict::Bounced
            && class.suppress
        {
            let address = rec.address.to_lowercase();
            // Already on the tenant's (or the operator's) global list: nothing to add.
            let tenant = campaign.record.tenant();
            if self.node.suppressions.check(&address, "", tenant).is_none() {
                t.suppression = Some(crate::effects::suppression::Entry {
                    address,
                    scope: crate::effects::suppression::stored_scope(
                        tenant,
                        crate::effects::suppression::GLOBAL,
                    ),
                    reason: crate::effects::suppression::Reason::HardBounce,
                    created_at_ms: now,
                    source: Some("delivery".into()),
                    campaign: Some(campaign.record.id),
                    job: Some(p.job.id.to_string()),
                    category: Some(class.category),
                    detail: Some(summary.clone()),
                });
            }
        }
        self.record(t).await;

        if state == JobState::Queued {
            self.node.scheduler.requeue([PendingJob {
                due_ms: next,
                ..p.job
            }]);
        } else {
            self.release(&p.job);
        }
        let label = site.map_or(stats::UNRESOLVED, |s| s.stats.label.as_str());
        ATTEMPTS.with_label_values(&[verdict, label]).inc();
        self.node
            .tenants
            .with_label(p.campaign.record.tenant(), |tenant| {
                TENANT_ATTEMPTS.with_label_values(&[tenant, verdict]).inc();
            });
        if verdict == "delivered" {
            self.node
                .delivered
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        if let Some(source) = conn.and_then(|c| self.sources.get(c.source)) {
            SOURCE_ATTEMPTS
                .with_label_values(&[source.name.as_str(), verdict])
                .inc();
        }
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
            s.stats.note_reply(summary);
        }
        if let Some(class) = o.class {
            FAILURES
                .with_label_values(&[verdict, class.category.as_str(), label])
                .inc();
        }
    }

    /// What the shaping rules do about a failure reply `o` that `source` got from `site`: a
    /// rule's suspension or throttle of the (source, site), recorded in the spool, or an AIMD
    /// decrease. Returns whether a rule acted on the (source, site) (whether its action was new
    /// or already in force); AIMD alone does not count, so a site that refuses every connection
    /// with a plain 421 still backs off as a whole.
    pub(super) async fn react(&self, site: &Site, source: usize, o: &Outcome) -> bool {
        use crate::outbound::shaping::rules::{Action, Reaction};
        if o.verdict == Verdict::Delivered || o.code.is_none_or(|c| c < 400) {
            return false;
        }
        let rules = self.node.shaping_rules();
        let name = self.sources.get(source).map_or("", |s| s.name.as_str());
        let summary = o.summary();
        let per_recipient = o.stage == crate::outbound::smtp::reply::Command::Rcpt;
        match rules.reaction(
            site.provider.as_deref(),
            o.code,
            o.status,
            &o.text,
            per_recipient,
        ) {
            None => false,
            Some(Reaction::Rule(r)) if r.action == Action::Ignore => false,
            Some(Reaction::Rule(r)) => {
                let added = self
                    .node
                    .actions
                    .add(
                        &self.node.spool,
                        r,
                        name,
                        &site.key,
                        &site.stats.label,
                        site.provider.as_deref(),
                        &summary,
                    )
                    .await;
                match added {
                    Ok(Some(a)) => {
                        tracing::warn!(
                            id = %a.id, rule = %a.rule, action = %a.kind, source = name,
                            site = %site.stats.label, until = %rfc3339(a.expires_at_ms),
                            reply = %summary, "shaping action"
                        );
                        SHAPING_TRIGGERS
                            .with_label_values(&[name, a.kind.as_str(), a.rule.as_str()])
                            .inc();
                    }
                    Ok(None) => {}
                    Err(e) => {
                        tracing::error!(error = %e, rule = %r.name, "recording a shaping action failed")
                    }
                }
                true
            }
            Some(Reaction::Aimd) => {
                if let Some((rate, connections)) =
                    site.aimd_decrease(source, &rules.aimd, &summary, crate::now_ms())
                {
                    tracing::info!(
                        source = name, site = %site.stats.label, rate_per_second = rate,
                        connections, reply = %summary, "throttling reply: AIMD decrease"
                    );
                    SHAPING_TRIGGERS
                        .with_label_values(&[name, "aimd", "aimd"])
                        .inc();
                }
                false
            }
        }
    }

    /// Queues a transition's writes for the outcome writer, then applies it in memory.
    pub(super) async fn record(&self, mut t: Transition<'_>) {
        let writes = t.writes(&self.node);
        let _ = self.updates.send(Update::Writes(writes)).await;
        t.apply(&self.node);
    }
}

/// A batch of outcome updates smaller than this (in spool writes) waits [`LINGER`] for more.
const LINGER_BELOW: usize = 64;
const LINGER: Duration = Duration::from_millis(1);

/// Batches outcome updates into spool writes; syncs the WAL at most every 100 ms, so a crash
/// may repeat a delivery that was in flight but never loses one.
pub(super) async fn write_updates(node: Arc<Node>, mut rx: mpsc::Receiver<Update>) {
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
        let mut lingered = false;
        loop {
            match next {
                Some(Update::Writes(w)) => w.stage(&mut batch),
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
            if next.is_none() && !lingered && batch.len() < LINGER_BELOW {
                // A small batch waits a moment for more: one spool write (and one wake-up of
                // the writer thread and of this task) for several outcomes rather than one
                // each. They are synced every 100 ms anyway, so nothing waits on this.
                lingered = true;
                tokio::time::sleep(LINGER).await;
                next = rx.try_recv().ok();
            }
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
async fn write_until_done(node: &Node, batch: crate::store::spool::SpoolBatch) {
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
            Err(crate::store::spool::SpoolError::Closed) => {
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
