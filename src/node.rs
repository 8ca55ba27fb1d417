//! One Sluice process: its config, spool, campaign registry, scheduler, suppression index and
//! the rest of the shared state, and the start-up recovery that rebuilds the in-memory parts
//! from the spool.
//!
//! Owns the wiring, not the policy of any layer, and knows nothing of the delivery engine (which
//! holds the node, not the other way round). Recovery and other RocksDB reads run on the blocking
//! pool; the HTTP layer holds an `Arc<Node>`.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use crate::config::Config;
use crate::scheduler::Scheduler;
use crate::scheduler::index::{CampaignParams, PendingJob, QueueIndex};
use crate::store::campaign::{Campaign, CampaignKind, CampaignRecord, CampaignState, Registry};
use crate::store::spool::{Durability, JobId, JobState, Reach, Spool, SpoolError};

pub struct Node {
    /// Serialises campaign record writes (state changes, retention) so the stored and in-memory
    /// records agree.
    pub(crate) state_changes: tokio::sync::Mutex<()>,
    pub config: Arc<Config>,
    pub spool: Arc<Spool>,
    pub campaigns: Registry,
    /// Which pending job is taken when: the index, parked jobs, suspended domains.
    pub scheduler: Scheduler,
    /// Last upload id handed out; resumes after the highest one found in the spool.
    pub upload_seq: AtomicU64,
    /// Idempotency keys of requests being processed right now.
    pub idempotency_in_flight: Mutex<std::collections::HashSet<String>>,
    /// Suppressed addresses, loaded at recovery, consulted at ingest and before each delivery.
    pub suppressions: crate::effects::suppression::Suppressions,
    /// Message assembly: token keys, DKIM keys, configured addresses.
    pub assembler: crate::outbound::render::Assembler,
    /// The delivery log: attempts, asynchronous bounces and complaints.
    pub log: crate::effects::delivery_log::DeliveryLog,
    /// Webhook receivers: which events go to whom.
    pub webhooks: Arc<crate::effects::webhook::Webhooks>,
    /// Bounce classification rules; replaced whole on SIGHUP.
    rules: std::sync::RwLock<Arc<crate::outbound::outcome::rules::Rules>>,
    /// Shaping rules (provider replies → actions); replaced whole on SIGHUP.
    shaping_rules: std::sync::RwLock<Arc<crate::outbound::shaping::rules::ShapingRules>>,
    /// Shaping actions in force per (source, site), loaded at recovery.
    pub actions: crate::outbound::shaping::actions::Actions,
    /// Warm-up counts per (source, provider group), loaded at recovery.
    pub warmup: crate::outbound::shaping::warmup::Counts,
    /// MTA-STS policies fetched (kept in the spool for their `max_age`).
    pub sts: crate::outbound::sts_cache::StsCache,
    /// Extra CA certificates and DNSSEC trust anchors for outbound TLS and DANE.
    pub trust: crate::outbound::trust::Trust,
    /// TLS reporting's aggregates (RFC 8460).
    pub tls_reports: crate::effects::tls_reports::TlsReports,
    /// The breakers' counts and sending-domain states, loaded at recovery.
    pub guard: crate::effects::guard::Guard,
    /// Sending domains' authentication preflight reports, kept for `preflight.ttl`.
    pub preflight: crate::outbound::preflight::Preflight,
    /// Tenants and their API keys (config and admin API), loaded at recovery.
    pub tenants: crate::store::tenants::Tenants,
    /// Failures of submitted messages to report to their submitters.
    pub dsns: crate::effects::dsn::Notices,
    /// Messages this node delivered since it started (for its heartbeat's rate).
    pub delivered: AtomicU64,
    /// Cluster mode's link to Redis, set at start when `[cluster]` is configured.
    cluster: std::sync::OnceLock<Arc<crate::cluster::Cluster>>,
    ready: AtomicBool,
    draining: AtomicBool,
}

/// What recovery did, for the start-up log line.
#[derive(Debug, Clone, Copy)]
pub struct RecoveryReport {
    pub campaigns: usize,
    pub queued: usize,
    pub rolled_back: u64,
    pub seconds: f64,
}

impl Node {
    /// Opens the spool. Blocking. The node is not ready until [`Node::recover`] has run.
    pub fn open(
        config: Arc<Config>,
        dkim: crate::outbound::dkim::DkimKeys,
        rules: crate::outbound::outcome::rules::Rules,
        shaping: crate::outbound::shaping::rules::ShapingRules,
        trust: crate::outbound::trust::Trust,
        log: crate::effects::delivery_log::DeliveryLog,
    ) -> Result<Arc<Node>, SpoolError> {
        let webhooks =
            Arc::new(crate::effects::webhook::Webhooks::new(&config).map_err(SpoolError::Rocks)?);
        let spool = Arc::new(Spool::open(&config.spool.path)?);
        spool.set_min_free_bytes(config.spool.min_free_bytes);
        spool.set_commit_window(config.spool.commit_window);
        let assembler = crate::outbound::render::Assembler::new(&config, dkim);
        Ok(Arc::new(Node {
            log,
            assembler,
            rules: std::sync::RwLock::new(Arc::new(rules)),
            shaping_rules: std::sync::RwLock::new(Arc::new(shaping)),
            actions: Default::default(),
            warmup: Default::default(),
            sts: Default::default(),
            trust,
            tls_reports: Default::default(),
            guard: Default::default(),
            preflight: Default::default(),
            tenants: Default::default(),
            webhooks,
            suppressions: Default::default(),
            state_changes: tokio::sync::Mutex::new(()),
            config,
            spool,
            campaigns: Registry::default(),
            scheduler: Scheduler::new(),
            upload_seq: AtomicU64::new(0),
            idempotency_in_flight: Mutex::new(Default::default()),
            delivered: AtomicU64::new(0),
            dsns: Default::default(),
            cluster: std::sync::OnceLock::new(),
            ready: AtomicBool::new(false),
            draining: AtomicBool::new(false),
        }))
    }

    /// The bounce classification rules in force.
    pub fn rules(&self) -> Arc<crate::outbound::outcome::rules::Rules> {
        Arc::clone(&self.rules.read().expect("rules lock"))
    }

    pub fn replace_rules(&self, rules: crate::outbound::outcome::rules::Rules) {
        *self.rules.write().expect("rules lock") = Arc::new(rules);
    }

    /// The shaping rules in force.
    pub fn shaping_rules(&self) -> Arc<crate::outbound::shaping::rules::ShapingRules> {
        Arc::clone(&self.shaping_rules.read().expect("shaping rules lock"))
    }

    pub fn replace_shaping_rules(&self, rules: crate::outbound::shaping::rules::ShapingRules) {
        *self.shaping_rules.write().expect("shaping rules lock") = Arc::new(rules);
    }

    /// Rebuilds campaigns, counts and the pending-job index from the spool, rolling back uploads
    /// that never committed. Reads the campaigns not archived, their tallies and the live jobs,
    /// not the final ones nor the archive. Blocking: run it on the blocking pool.
    pub fn recover(&self) -> Result<RecoveryReport, SpoolError> {
        let started = Instant::now();
        let mut campaigns = HashMap::new();
        for (seq, bytes) in self.spool.load_campaigns()? {
            let record = CampaignRecord::decode(&bytes).map_err(|reason| SpoolError::Corrupt {
                key: format!("campaign {seq}"),
                reason,
            })?;
            campaigns.insert(seq, Campaign::new(seq, record, 0));
        }
        let mut bad = None;
        // Unsubscribes and complaints per campaign, counted back into its counts below.
        let mut feedback: HashMap<(uuid::Uuid, crate::effects::suppression::Reason), u64> =
            HashMap::new();
        self.spool.scan_suppressions(None, |k, v| {
            match crate::effects::suppression::Entry::decode(v) {
                Ok(e) => {
                    if let Some(c) = e.campaign {
                        *feedback.entry((c, e.reason)).or_default() += 1;
                    }
                    self.suppressions.insert(&e);
                }
                Err(reason) => bad = Some((String::from_utf8_lossy(k).into_owned(), reason)),
            }
            bad.is_none()
        })?;
        if let Some((key, reason)) = bad {
            return Err(SpoolError::Corrupt {
                key: format!("suppression {key:?}"),
                reason,
            });
        }
        // Final counts and the next free index are stored per campaign; the live jobs add the
        // queued ones below.
        for (seq, tally) in self.spool.load_tallies()? {
            let Some(campaign) = campaigns.get(&seq) else {
                continue;
            };
            campaign.ensure_next_index(tally.next_index);
            let c = &campaign.counts;
            for state in [
                JobState::Delivered,
                JobState::Bounced,
                JobState::Expired,
                JobState::Suppressed,
                JobState::Cancelled,
            ] {
                c.slot(state, 0)
                    .store(tally.count(state), Ordering::Relaxed);
            }
        }
        // Before the campaigns' scheduling parameters, which name their tenants.
        self.tenants.load(&self.config, &self.spool)?;
        let mut queue = QueueIndex::new();
        queue.set_lower_share(self.config.delivery.lower_priority_share);
        for (&seq, campaign) in &campaigns {
            let mut params = self.schedule_params(&campaign.record);
            if campaign.state() == CampaignState::Cancelled {
                params.max_rate = None;
            }
            queue.set_params(seq, params);
        }
        let mut orphans = 0u64;
        let found = self.spool.recover(|id, rec| {
            let Some(campaign) = campaigns.get(&id.campaign) else {
                // A committed job always has its campaign record; count rather than guess.
                orphans += 1;
                return;
            };
            campaign.ensure_next_index(id.index.saturating_add(1));
            campaign.add_live(1);
            let cancelled = campaign.state() == CampaignState::Cancelled;
            let state = if rec.state == JobState::Queued && cancelled {
                JobState::Cancelled
            } else {
                rec.state
            };
            campaign
                .counts
                .slot(state, rec.attempts)
                .fetch_add(1, Ordering::Relaxed);
            // Every live job is queued, those of a cancelled campaign at once: delivery ends
            // them (a tombstone each), so they do not stay among the live jobs for good.
            let domain = queue.domain_id(crate::intake::address::domain_of(rec.address));
            queue.push(PendingJob {
                id,
                domain,
                due_ms: if cancelled { 0 } else { rec.next_attempt_ms },
            });
        })?;
        if orphans > 0 {
            tracing::warn!(orphans, "jobs without a campaign record were left alone");
        }
        let n_campaigns = campaigns.len();
        for campaign in campaigns.values() {
            let id = campaign.record.id;
            let get = |r| feedback.get(&(id, r)).copied().unwrap_or(0);
            let c = &campaign.counts;
            c.unsubscribed.store(
                get(crate::effects::suppression::Reason::Unsubscribe),
                Ordering::Relaxed,
            );
            c.complained.store(
                get(crate::effects::suppression::Reason::Complaint),
                Ordering::Relaxed,
            );
        }
        for (_, campaign) in campaigns {
            self.campaigns.insert(Arc::new(campaign));
        }
        let (archived, highest) = self.spool.archive_summary()?;
        self.campaigns.set_archived(archived, highest);
        let queued = queue.len();
        self.scheduler.install(queue);
        self.upload_seq.store(found.max_upload, Ordering::Relaxed);
        let actions = self.actions.load(&self.spool)?;
        if actions > 0 {
            tracing::info!(actions, "shaping actions in force restored");
        }
        self.warmup.load(&self.spool)?;
        let policies = self.sts.load(&self.spool, crate::now_ms())?;
        if policies > 0 {
            tracing::info!(policies, "MTA-STS policies restored");
        }
        self.tls_reports.load(&self.spool)?;
        self.guard.load(&self.spool)?;
        self.ready.store(true, Ordering::Release);
        Ok(RecoveryReport {
            campaigns: n_campaigns,
            queued,
            rolled_back: found.rolled_back,
            seconds: started.elapsed().as_secs_f64(),
        })
    }

    /// Adds a new campaign (or bucket) to the registry, and its priority, weight and rate limit
    /// to the scheduler, before any of its jobs is queued.
    pub fn register(&self, campaign: Arc<Campaign>) {
        self.scheduler
            .set_params(campaign.seq, self.schedule_params(&campaign.record));
        self.campaigns.insert(campaign);
    }

    /// The scheduler's parameters for `record` ([`schedule_params`]) with its tenant's number
    /// and weight.
    pub fn schedule_params(&self, record: &CampaignRecord) -> CampaignParams {
        let (tenant, tenant_weight) = self.tenants.scheduling(record.tenant());
        CampaignParams {
            tenant,
            tenant_weight,
            ..schedule_params(record)
        }
    }

    /// The cluster link, in cluster mode.
    pub fn cluster(&self) -> Option<&Arc<crate::cluster::Cluster>> {
        self.cluster.get()
    }

    /// Joins the cluster named by `[cluster]`: the spool's instance id (made on first start)
    /// identifies this node to the others. Errors when another live node holds the `node_id`.
    pub async fn join_cluster(self: &Arc<Self>) -> Result<(), crate::cluster::StartError> {
        let Some(config) = self.config.cluster.clone() else {
            return Ok(());
        };
        let spool = Arc::clone(&self.spool);
        let stored = tokio::task::spawn_blocking(move || instance_id(&spool))
            .await
            .ok()
            .flatten();
        let instance = match stored {
            Some(id) => id,
            None => {
                let id = uuid::Uuid::now_v7().to_string();
                let mut batch = self.spool.batch();
                batch.put_state(
                    crate::store::spool::STATE_CLUSTER,
                    b"instance",
                    id.as_bytes(),
                );
                if let Err(e) = self.spool.write(batch, Durability::Sync).await {
                    tracing::warn!(error = %e, "storing the cluster instance id failed");
                }
                id
            }
        };
        let cluster = crate::cluster::Cluster::start(config, instance).await?;
        self.suppressions.set_replicating();
        self.actions.set_replicating();
        self.tenants.set_replicating();
        let _ = self.cluster.set(cluster);
        Ok(())
    }

    /// True once recovery is done and until shutdown starts.
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Acquire) && !self.draining.load(Ordering::Acquire)
    }

    /// Recovery has run (whether or not the node is shutting down since).
    pub fn is_recovered(&self) -> bool {
        self.ready.load(Ordering::Acquire)
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Acquire)
    }

    pub fn start_draining(&self) {
        self.draining.store(true, Ordering::Release);
    }

    /// The campaign of job `id` as delivery and reports see it: the registered campaign, or for
    /// a job of a stream's bucket the message built from `message`, as
    /// [`Node::read_messages`] read it. `Ok(None)` when there is no such campaign, or the message
    /// record is missing.
    pub fn campaign_of(
        &self,
        id: JobId,
        message: Option<MessageRead>,
    ) -> Result<Option<Arc<Campaign>>, SpoolError> {
        let Some(campaign) = self.campaigns.by_seq(id.campaign) else {
            return Ok(None);
        };
        if !campaign.record.is_bucket() {
            return Ok(Some(campaign));
        }
        let Some(message) = message else {
            return Ok(None);
        };
        let (record, body) = message?;
        Ok(Some(Arc::new(Campaign::message(&campaign, record, body))))
    }

    /// The message records of bucket jobs `ids`, position for position (`None`: no record), and
    /// with `bodies` the bytes of the raw ones, each read once however many of its jobs are
    /// asked for, so they share one copy. Blocking with [`Reach::Disk`].
    pub fn read_messages(
        &self,
        ids: &[JobId],
        bodies: bool,
        reach: Reach,
    ) -> Result<Vec<Option<MessageRead>>, SpoolError> {
        let found = self.spool.get_messages(ids, reach)?;
        let mut out: Vec<Option<MessageRead>> = ids
            .iter()
            .zip(found)
            .map(|(id, bytes)| {
                bytes.map(|b| {
                    CampaignRecord::decode(&b)
                        .map(|r| (r, None))
                        .map_err(|reason| SpoolError::Corrupt {
                            key: format!("message {id}"),
                            reason,
                        })
                })
            })
            .collect();
        let body_of = |id: &JobId, m: &Option<MessageRead>| match m {
            Some(Ok((r, _))) => r.raw.as_ref().map(|raw| JobId {
                campaign: id.campaign,
                index: raw.body,
            }),
            _ => None,
        };
        let mut wanted: Vec<JobId> = match bodies {
            true => ids
                .iter()
                .zip(&out)
                .filter_map(|(id, m)| body_of(id, m))
                .collect(),
            false => Vec::new(),
        };
        if wanted.is_empty() {
            return Ok(out);
        }
        wanted.sort_unstable();
        wanted.dedup();
        let read = self.spool.get_message_bodies(&wanted, reach)?;
        let by_id: HashMap<JobId, Arc<[u8]>> = wanted
            .into_iter()
            .zip(read)
            .filter_map(|(id, b)| b.map(|b| (id, Arc::from(b))))
            .collect();
        for (id, m) in ids.iter().zip(out.iter_mut()) {
            let key = body_of(id, m);
            if let (Some(key), Some(Ok((_, body)))) = (key, m) {
                *body = by_id.get(&key).cloned();
            }
        }
        Ok(out)
    }

    /// Job `id`'s record (queued, or its tombstone) and its campaign as [`Node::campaign_of`]
    /// gives it (without a raw message's bytes); `None` when either is gone. Blocking.
    pub fn load_job(&self, id: JobId) -> Result<Option<LoadedJob>, SpoolError> {
        let Some(bytes) = self.spool.get_job(id)? else {
            return Ok(None);
        };
        let bucket = self
            .campaigns
            .by_seq(id.campaign)
            .is_some_and(|c| c.record.is_bucket());
        let message = match bucket {
            true => self
                .read_messages(&[id], false, Reach::Disk)?
                .pop()
                .flatten(),
            false => None,
        };
        Ok(self.campaign_of(id, message)?.map(|c| (c, bytes)))
    }

    /// The bucket that takes `tenant`'s `stream`'s messages of `priority` (unset: the default for
    /// messages) now: a stream has a bucket per priority its messages use, each its own flow in
    /// the scheduler. The newest, unless that one is from an earlier period (`retention.message_buckets`, a UTC day by default), cancelled or
    /// compacted, in which case a new one is created (its record synced before it is used). A
    /// bucket per period keeps a stream's counts by day and lets retention finish and delete a
    /// period's messages as a whole.
    pub async fn stream_bucket(
        &self,
        tenant: &str,
        stream: &str,
        priority: Option<u8>,
        now_ms: u64,
    ) -> Result<Arc<Campaign>, BucketError> {
        let r = &self.config.retention;
        let usable = |c: &Campaign| {
            r.bucket_period(c.record.created_at_ms) == r.bucket_period(now_ms)
                && c.state() != CampaignState::Cancelled
                && c.lifecycle().compacted_at_ms.is_none()
        };
        if let Some(c) = self
            .campaigns
            .stream(tenant, stream, priority)
            .filter(|c| usable(c))
        {
            return Ok(c);
        }
        let _serial = self.state_changes.lock().await;
        if let Some(c) = self
            .campaigns
            .stream(tenant, stream, priority)
            .filter(|c| usable(c))
        {
            return Ok(c);
        }
        self.spool.check_space()?;
        let seq = self
            .campaigns
            .allocate_seq()
            .ok_or(BucketError::Exhausted)?;
        let record = CampaignRecord {
            id: uuid::Uuid::now_v7(),
            kind: crate::store::campaign::CampaignKind::Transactional,
            from: String::new(),
            from_name: None,
            reply_to: None,
            subject: String::new(),
            text: None,
            html: None,
            headers: Default::default(),
            tags: Vec::new(),
            attachments: Vec::new(),
            personalised: true,
            state: CampaignState::Active,
            created_at_ms: now_ms,
            lifecycle: Default::default(),
            schedule: crate::store::campaign::Schedule {
                priority,
                ..Default::default()
            },
            pool: None,
            stream: Some(stream.to_owned()),
            raw: None,
            guard: None,
            breaker: Default::default(),
            tenant: crate::store::tenants::record_field(tenant),
        };
        let mut batch = self.spool.batch();
        batch.put_campaign(seq, &record.encode());
        self.spool.write(batch, Durability::Sync).await?;
        let bucket = Arc::new(Campaign::new(seq, record, 0));
        self.register(Arc::clone(&bucket));
        Ok(bucket)
    }

    /// Persists a campaign state change (synced), then applies it in memory. `Ok(false)`, and
    /// nothing changes, when retention archived the campaign meanwhile.
    /// In cluster mode the change is staged for the other nodes with the write.
    pub async fn set_campaign_state(
        &self,
        campaign: &Campaign,
        state: CampaignState,
    ) -> Result<bool, SpoolError> {
        self.change_campaign_state(campaign, state, None, self.cluster().is_some())
            .await
    }

    /// As [`Node::set_campaign_state`], with the campaign's breaker state replaced by `mark`
    /// in the same write (a breaker's pause, a forced resume).
    pub async fn set_campaign_state_marked(
        &self,
        campaign: &Campaign,
        state: CampaignState,
        mark: Option<crate::store::campaign::BreakerMark>,
    ) -> Result<bool, SpoolError> {
        self.change_campaign_state(campaign, state, mark, self.cluster().is_some())
            .await
    }

    /// Applies a state change another node made (cluster mode): as
    /// [`Node::set_campaign_state`], without publishing it again.
    pub async fn apply_campaign_state(
        &self,
        campaign: &Campaign,
        state: CampaignState,
        mark: Option<crate::store::campaign::BreakerMark>,
    ) -> Result<bool, SpoolError> {
        self.change_campaign_state(campaign, state, mark, false)
            .await
    }

    async fn change_campaign_state(
        &self,
        campaign: &Campaign,
        state: CampaignState,
        mark: Option<crate::store::campaign::BreakerMark>,
        stage: bool,
    ) -> Result<bool, SpoolError> {
        let _serial = self.state_changes.lock().await;
        if self
            .campaigns
            .by_seq(campaign.seq)
            .is_none_or(|c| !std::ptr::eq(&*c, campaign))
        {
            return Ok(false);
        }
        let mut batch = self.spool.batch();
        let mut record = campaign.stored_record(state);
        if let Some(m) = &mark {
            record.breaker = m.clone();
        }
        batch.put_campaign(campaign.seq, &record.encode());
        if stage {
            let change = crate::store::campaign::Change::State {
                id: campaign.record.id,
                state,
                breaker: mark.clone(),
            };
            crate::cluster::sync::stage(&mut batch, &change.to_json());
        }
        if let Some(reason) = mark.as_ref().and_then(|m| m.paused_reason.as_ref())
            && state == CampaignState::Paused
        {
            self.webhooks
                .stage_campaign(&mut batch, "campaign_paused", campaign, reason);
        }
        self.spool.write(batch, Durability::Sync).await?;
        if let Some(m) = mark {
            campaign.set_breaker(m);
        }
        let previous = campaign.state();
        campaign.set_state(state);
        if state == CampaignState::Cancelled && previous != CampaignState::Cancelled {
            // Queued jobs of a cancelled campaign are never sent; the delivery engine drops them
            // when it meets them, and recovery counts them as cancelled.
            let k = &campaign.counts;
            let moved = k.queued.swap(0, Ordering::Relaxed) + k.deferred.swap(0, Ordering::Relaxed);
            k.cancelled.fetch_add(moved, Ordering::Relaxed);
        }
        if state == CampaignState::Cancelled {
            // Jobs scheduled for later or held for its rate are ended now.
            self.scheduler.expedite(campaign.seq);
        }
        if state != CampaignState::Paused {
            // Resumed or cancelled: parked jobs go back to the queue (the engine drops those of a
            // cancelled campaign when it meets them).
            self.scheduler.unpark_campaign(campaign.seq).await;
        }
        Ok(true)
    }
}

/// A bucket job's message as [`Node::read_messages`] read it: its record and, for a raw message
/// whose bytes were asked for, the bytes.
pub type MessageRead = Result<(CampaignRecord, Option<Arc<[u8]>>), SpoolError>;

/// A job's campaign (see [`Node::campaign_of`]) and its stored record.
pub type LoadedJob = (Arc<Campaign>, Vec<u8>);

/// Why [`Node::stream_bucket`] could not give a bucket.
#[derive(Debug, thiserror::Error)]
pub enum BucketError {
    #[error(transparent)]
    Spool(#[from] SpoolError),
    #[error("no campaign numbers left")]
    Exhausted,
}

/// The scheduler's parameters for a campaign or bucket record: its priority (else its kind's
/// default: messages go ahead of campaigns), weight and rate limit; the default tenant's
/// (see [`Node::schedule_params`] for its own).
pub fn schedule_params(record: &CampaignRecord) -> CampaignParams {
    let s = &record.schedule;
    CampaignParams {
        priority: s.priority.unwrap_or(default_priority(record.kind)),
        weight: s.weight.unwrap_or(1),
        max_rate: s.max_rate,
        ..CampaignParams::default()
    }
}

/// The priority of mail that gives none: transactional messages go ahead of campaigns.
pub fn default_priority(kind: CampaignKind) -> u8 {
    use crate::scheduler::fair::{PRIORITY_HIGH, PRIORITY_NORMAL};
    match kind {
        CampaignKind::Bulk => PRIORITY_NORMAL,
        CampaignKind::Transactional => PRIORITY_HIGH,
    }
}

/// This spool's cluster instance id, if one was stored. Blocking.
fn instance_id(spool: &Spool) -> Option<String> {
    let mut found = None;
    spool
        .scan_state(crate::store::spool::STATE_CLUSTER, |k, v| {
            if k == b"instance" {
                found = Some(String::from_utf8_lossy(v).into_owned());
            }
        })
        .ok()?;
    found
}
