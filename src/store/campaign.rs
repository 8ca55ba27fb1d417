//! Campaigns: the stored record (template written once) and the in-memory registry with state and
//! per-state counts.
//!
//! Owns no I/O: callers persist records through the spool. The counts in memory are moved by the
//! code that changes a job's state; at recovery the final ones come from the campaign's stored
//! tally and the queued ones from its live jobs. The record also carries the campaign's
//! [`Lifecycle`] after sending, which [`crate::store::retention`] moves on.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU8, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::store::spool::JobState;

/// Version byte in front of the JSON campaign record.
const CAMPAIGN_VERSION: u8 = 1;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CampaignState {
    Active,
    Paused,
    Cancelled,
}

impl CampaignState {
    fn from_u8(v: u8) -> CampaignState {
        match v {
            1 => CampaignState::Paused,
            2 => CampaignState::Cancelled,
            _ => CampaignState::Active,
        }
    }
    fn as_u8(self) -> u8 {
        match self {
            CampaignState::Active => 0,
            CampaignState::Paused => 1,
            CampaignState::Cancelled => 2,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CampaignKind {
    /// Many recipients, one template (`POST /v1/campaigns`).
    Bulk,
    /// Transactional messages (`POST /v1/messages`). A record with a `stream` is either a
    /// stream's bucket (in the registry: one per stream and `retention.message_buckets` period,
    /// holding the messages as its jobs, for counts and state) or one message's own record (stored beside its job, see
    /// [`Campaign::message`]). Without one it is a single message stored as a campaign, as
    /// earlier versions did.
    Transactional,
}

/// The campaign as stored: written once, rewritten only when its state changes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CampaignRecord {
    pub id: Uuid,
    pub kind: CampaignKind,
    pub from: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from_name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reply_to: Option<String>,
    pub subject: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub text: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub html: Option<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub headers: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tags: Vec<String>,
    /// Sent with every message; stored once here, MIME-encoded once per process.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub attachments: Vec<Attachment>,
    /// False when every recipient gets the same message (no variables, no per-recipient
    /// headers): delivery then sends one message to several recipients of a domain at once.
    #[serde(default = "personalised", skip_serializing_if = "is_personalised")]
    pub personalised: bool,
    pub state: CampaignState,
    pub created_at_ms: u64,
    #[serde(flatten)]
    pub lifecycle: Lifecycle,
    /// Priority, weight, scheduled send and rate limit, as given.
    #[serde(flatten)]
    pub schedule: Schedule,
    /// The pool of egress sources it is sent through; unset: the default pool.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pool: Option<String>,
    /// The stream of a transactional bucket or message (see [`CampaignKind::Transactional`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stream: Option<String>,
    /// A raw message's envelope and where its bytes are (it has no templates then).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub raw: Option<RawMeta>,
    /// The campaign's own breaker thresholds (unset ones are `[guard]`'s).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guard: Option<crate::config::GuardThresholds>,
    /// What a breaker did to it (see [`crate::effects::guard`]).
    #[serde(flatten)]
    pub breaker: BreakerMark,
    /// The tenant it belongs to (see [`crate::store::tenants`]); unset: the default tenant.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tenant: Option<String>,
}

/// A campaign's breaker state: why a breaker paused it, and whether an operator resumed it
/// with `force`, after which no breaker pauses it again.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct BreakerMark {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub paused_reason: Option<PausedReason>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub breaker_override_at_ms: Option<u64>,
}

/// Why a breaker paused a campaign: which breaker, the measure, its rate over which window, and
/// the threshold it crossed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PausedReason {
    /// `campaign` or `domain` (the sending domain's breaker).
    pub breaker: String,
    /// `complaint_rate` or `hard_bounce_rate`.
    pub measure: String,
    pub rate_percent: f64,
    /// Complaints or hard bounces, and the sample they are counted over (delivered or
    /// attempted).
    pub count: u64,
    pub sample: u64,
    pub threshold_percent: f64,
    /// `campaign` (its whole life so far) or the sending-domain window (`24h`).
    pub window: String,
    /// The sending domain (the From address's).
    pub domain: String,
    pub at_ms: u64,
    /// The same, in a sentence.
    pub message: String,
}

/// What a raw message (MIME given whole, over SMTP or HTTP) keeps beside its bytes. The bytes
/// are stored once, under the key of its first job ([`crate::store::spool::SpoolBatch::put_message_body`]);
/// each recipient's job has this record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RawMeta {
    /// The index (in its bucket) of the job whose key holds the bytes: its first recipient's.
    pub body: u32,
    /// How many recipients it was accepted for.
    pub recipients: u32,
    /// How it came: `smtp` or `http`.
    pub via: String,
    /// The submitter's envelope sender, where DSNs about it go; empty: none.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub mail_from: String,
    /// RFC 3461 `RET` and `ENVID` of the submission.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ret: Option<Ret>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub envid: Option<String>,
}

/// RFC 3461 RET: what a failure DSN returns of the message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Ret {
    Full,
    Hdrs,
}

/// Where a campaign is in its life after sending: when it finished and what retention has
/// removed since. All unset while it has recipients queued.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lifecycle {
    /// When it last finished: no recipient queued and no upload open. Cleared if recipients
    /// are added again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_at_ms: Option<u64>,
    /// When retention deleted its recipients' tombstones (`retention.job_tombstones` after it
    /// finished). Reports about its messages are unmapped from then on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tombstones_deleted_at_ms: Option<u64>,
    /// When retention dropped its templates and attachments (`retention.campaigns` after it
    /// finished). It takes no more recipients from then on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub compacted_at_ms: Option<u64>,
    /// When retention moved it to the archive, once compacted with its tombstones gone: it is
    /// no longer held in memory or read at start-up, only looked up.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub archived_at_ms: Option<u64>,
}

/// How a campaign's (or a message's) mail is scheduled against other mail, as the request gave
/// it; unset fields take the defaults of its kind. A message's bucket holds the priority its
/// messages share; a message's own record holds its `send_at`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Schedule {
    /// 0 to 9, higher first.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priority: Option<u8>,
    /// Its share against campaigns of the same priority (1 to 1000).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weight: Option<u32>,
    /// Not attempted before this time (Unix ms).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub send_at_ms: Option<u64>,
    /// At most this many messages per period, on top of every site's limits.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_rate: Option<crate::config::Rate>,
}

fn personalised() -> bool {
    true
}

fn is_personalised(p: &bool) -> bool {
    *p
}

/// A file attached to every message of a campaign, as given in the request (validated at ingest).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Attachment {
    pub filename: String,
    pub content_type: String,
    pub content_base64: String,
}

impl Attachment {
    /// The file's bytes. Whitespace (line breaks of wrapped base64) is ignored.
    pub fn decode(&self) -> Result<Vec<u8>, String> {
        use base64::Engine;
        let compact: Vec<u8> = self
            .content_base64
            .bytes()
            .filter(|b| !b.is_ascii_whitespace())
            .collect();
        base64::engine::general_purpose::STANDARD
            .decode(compact)
            .map_err(|e| format!("not valid base64: {e}"))
    }
}

impl CampaignRecord {
    /// The size of the templates and attachments, a measure of the work to assemble a message.
    pub fn template_bytes(&self) -> usize {
        self.subject.len()
            + self.text.as_ref().map_or(0, String::len)
            + self.html.as_ref().map_or(0, String::len)
            + self
                .attachments
                .iter()
                .map(|a| a.content_base64.len())
                .sum::<usize>()
    }

    /// Its tenant's name.
    pub fn tenant(&self) -> &str {
        self.tenant
            .as_deref()
            .unwrap_or(crate::config::DEFAULT_TENANT)
    }

    /// A stream's bucket, whose jobs are messages with records of their own.
    pub fn is_bucket(&self) -> bool {
        self.kind == CampaignKind::Transactional && self.stream.is_some()
    }

    /// The record without what only sending needs: templates, headers and attachments. What
    /// stays (sender, subject, tags, counts' context) is what reports and lookups show.
    pub fn compacted(&self) -> CampaignRecord {
        CampaignRecord {
            text: None,
            html: None,
            attachments: Vec::new(),
            headers: BTreeMap::new(),
            ..self.clone()
        }
    }

    pub fn encode(&self) -> Vec<u8> {
        encode_versioned(self)
    }

    pub fn decode(bytes: &[u8]) -> Result<CampaignRecord, String> {
        decode_versioned(bytes, "campaign record")
    }
}

/// The version byte, then the JSON of `value`.
fn encode_versioned(value: &impl Serialize) -> Vec<u8> {
    let mut out = vec![CAMPAIGN_VERSION];
    serde_json::to_writer(&mut out, value).expect("campaign types always serialise");
    out
}

fn decode_versioned<T: serde::de::DeserializeOwned>(bytes: &[u8], what: &str) -> Result<T, String> {
    match bytes.split_first() {
        Some((&CAMPAIGN_VERSION, json)) => serde_json::from_slice(json).map_err(|e| e.to_string()),
        Some((v, _)) => Err(format!("unknown {what} version {v}")),
        None => Err(format!("empty {what}")),
    }
}

/// Per-state recipient counts of one campaign, as `GET /v1/campaigns/{id}` shows them.
#[derive(Debug, Default)]
pub struct Counts {
    pub queued: AtomicU64,
    pub deferred: AtomicU64,
    pub delivered: AtomicU64,
    pub bounced: AtomicU64,
    pub expired: AtomicU64,
    pub suppressed: AtomicU64,
    pub cancelled: AtomicU64,
    pub complained: AtomicU64,
    pub unsubscribed: AtomicU64,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CountsSnapshot {
    pub queued: u64,
    pub deferred: u64,
    pub delivered: u64,
    pub bounced: u64,
    pub expired: u64,
    pub suppressed: u64,
    pub cancelled: u64,
    pub complained: u64,
    pub unsubscribed: u64,
}

impl CountsSnapshot {
    /// Adds `other`'s counts to these (another node's, in cluster mode).
    pub fn add(&mut self, other: &CountsSnapshot) {
        self.queued += other.queued;
        self.deferred += other.deferred;
        self.delivered += other.delivered;
        self.bounced += other.bounced;
        self.expired += other.expired;
        self.suppressed += other.suppressed;
        self.cancelled += other.cancelled;
        self.complained += other.complained;
        self.unsubscribed += other.unsubscribed;
    }
}

impl Counts {
    /// The counter a job in `state` with `attempts` attempts belongs to.
    pub fn slot(&self, state: JobState, attempts: u32) -> &AtomicU64 {
        match state {
            JobState::Queued if attempts == 0 => &self.queued,
            JobState::Queued => &self.deferred,
            JobState::Delivered => &self.delivered,
            JobState::Bounced => &self.bounced,
            JobState::Expired => &self.expired,
            JobState::Suppressed => &self.suppressed,
            JobState::Cancelled => &self.cancelled,
        }
    }

    /// Moves one recipient from one counter to another (never below zero).
    pub fn shift(&self, from: &AtomicU64, to: &AtomicU64) {
        let _ = from.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |v| v.checked_sub(1));
        to.fetch_add(1, Ordering::Relaxed);
    }

    pub fn from_snapshot(s: &CountsSnapshot) -> Counts {
        let a = AtomicU64::new;
        Counts {
            queued: a(s.queued),
            deferred: a(s.deferred),
            delivered: a(s.delivered),
            bounced: a(s.bounced),
            expired: a(s.expired),
            suppressed: a(s.suppressed),
            cancelled: a(s.cancelled),
            complained: a(s.complained),
            unsubscribed: a(s.unsubscribed),
        }
    }

    pub fn snapshot(&self) -> CountsSnapshot {
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        CountsSnapshot {
            queued: g(&self.queued),
            deferred: g(&self.deferred),
            delivered: g(&self.delivered),
            bounced: g(&self.bounced),
            expired: g(&self.expired),
            suppressed: g(&self.suppressed),
            cancelled: g(&self.cancelled),
            complained: g(&self.complained),
            unsubscribed: g(&self.unsubscribed),
        }
    }
}

/// A campaign in memory.
#[derive(Debug)]
pub struct Campaign {
    pub seq: u32,
    /// The record as last persisted. Templates are immutable; only `state` changes, and the
    /// authoritative state is the atomic below.
    pub record: CampaignRecord,
    state: AtomicU8,
    /// Next recipient index to hand out.
    next_index: AtomicU32,
    /// Shared by a stream's bucket and its messages: a message counts into its bucket.
    pub counts: Arc<Counts>,
    /// The bucket of a message (see [`Campaign::message`]); `None` for campaigns and buckets.
    parent: Option<Arc<Campaign>>,
    /// Recipients queued or in flight (not final), whatever the counts say of a cancelled
    /// campaign, and uploads still open: while either is above zero the campaign is not
    /// finished.
    live: AtomicU64,
    uploads_open: AtomicU32,
    lifecycle: std::sync::Mutex<Lifecycle>,
    /// What breakers did; persisted with the record.
    breaker: std::sync::Mutex<BreakerMark>,
    /// A raw message's bytes, when they were read with its record ([`Campaign::message`]).
    pub body: Option<Arc<[u8]>>,
}

impl Campaign {
    pub fn new(seq: u32, record: CampaignRecord, next_index: u32) -> Campaign {
        let state = AtomicU8::new(record.state.as_u8());
        let lifecycle = std::sync::Mutex::new(record.lifecycle);
        let breaker = std::sync::Mutex::new(record.breaker.clone());
        Campaign {
            breaker,
            seq,
            record,
            state,
            next_index: AtomicU32::new(next_index),
            counts: Arc::default(),
            parent: None,
            live: AtomicU64::new(0),
            uploads_open: AtomicU32::new(0),
            lifecycle,
            body: None,
        }
    }

    /// One message of the stream bucket `bucket`, with its own `record` (read from beside its
    /// job). It lives only while a job of it is handled: its counts, liveness and state are the
    /// bucket's, so it can go wherever a campaign goes (delivery, transitions, reports) and the
    /// registry never holds one per message.
    pub fn message(
        bucket: &Arc<Campaign>,
        record: CampaignRecord,
        body: Option<Arc<[u8]>>,
    ) -> Campaign {
        Campaign {
            seq: bucket.seq,
            state: AtomicU8::new(bucket.state().as_u8()),
            next_index: AtomicU32::new(0),
            counts: Arc::clone(&bucket.counts),
            parent: Some(Arc::clone(bucket)),
            live: AtomicU64::new(0),
            uploads_open: AtomicU32::new(0),
            lifecycle: std::sync::Mutex::new(record.lifecycle),
            breaker: Default::default(),
            record,
            body,
        }
    }

    /// A message of a stream bucket (built by [`Campaign::message`]).
    pub fn is_message(&self) -> bool {
        self.parent.is_some()
    }

    /// Adds `n` recipients that are queued (committed upload, recovery).
    pub fn add_live(&self, n: u64) {
        if let Some(p) = &self.parent {
            return p.add_live(n);
        }
        self.live.fetch_add(n, Ordering::AcqRel);
    }

    /// One recipient became final.
    pub fn end_live(&self) {
        if let Some(p) = &self.parent {
            return p.end_live();
        }
        let _ = self
            .live
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |v| v.checked_sub(1));
    }

    /// An upload to this campaign opens: `None` (and nothing opens) once the campaign is
    /// compacted, else whether the campaign was finished and is not any more (its record must
    /// then be persisted with the upload). Decided under the lifecycle lock, so retention either
    /// sees the upload open or decides first.
    pub fn upload_open(&self) -> Option<bool> {
        let mut l = self.lifecycle.lock().expect("lifecycle lock");
        if l.compacted_at_ms.is_some() {
            return None;
        }
        self.uploads_open.fetch_add(1, Ordering::AcqRel);
        let reopened = l.finished_at_ms.is_some();
        l.finished_at_ms = None;
        l.tombstones_deleted_at_ms = None;
        Some(reopened)
    }

    /// An upload opened by [`Campaign::upload_open`] ends, committed or not.
    pub fn upload_closed(&self) {
        let _ = self
            .uploads_open
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |v| v.checked_sub(1));
    }

    /// Nothing queued, nothing in flight, no upload open.
    pub fn is_idle(&self) -> bool {
        self.uploads_open.load(Ordering::Acquire) == 0 && self.live.load(Ordering::Acquire) == 0
    }

    pub fn lifecycle(&self) -> Lifecycle {
        *self.lifecycle.lock().expect("lifecycle lock")
    }

    /// Moves the lifecycle on at `now` (ms), in memory, under the lifecycle lock: an idle
    /// campaign is finished from now if it was not, its tombstones are due for deletion
    /// `tombstones_ms` after it finished and its templates `templates_ms` after. A busy one is
    /// left as it is. Returns the step taken, if any; the caller persists
    /// [`Campaign::stored_record`] and deletes what the step says.
    pub fn advance_lifecycle(
        &self,
        now: u64,
        tombstones_ms: u64,
        templates_ms: u64,
    ) -> Option<LifecycleStep> {
        let mut l = self.lifecycle.lock().expect("lifecycle lock");
        let before = *l;
        let mut step = LifecycleStep {
            delete_tombstones_below: None,
        };
        // Busy: an upload that made it so has already cleared the finish time.
        if !self.is_idle() {
            return None;
        }
        let finished = *l.finished_at_ms.get_or_insert(now);
        if l.tombstones_deleted_at_ms.is_none() && now >= finished.saturating_add(tombstones_ms) {
            l.tombstones_deleted_at_ms = Some(now);
            // Uploads opened from here on get indexes at or above this bound.
            step.delete_tombstones_below = Some(self.next_index.load(Ordering::Acquire));
        }
        if l.compacted_at_ms.is_none() && now >= finished.saturating_add(templates_ms) {
            l.compacted_at_ms = Some(now);
        }
        (*l != before).then_some(step)
    }

    /// The state; a message's is its bucket's, so pausing or cancelling a stream's bucket
    /// pauses or cancels its messages.
    pub fn state(&self) -> CampaignState {
        if let Some(p) = &self.parent {
            return p.state();
        }
        CampaignState::from_u8(self.state.load(Ordering::Acquire))
    }

    pub fn set_state(&self, state: CampaignState) {
        self.state.store(state.as_u8(), Ordering::Release);
    }

    /// Reserves `n` consecutive recipient indexes, or `None` when the campaign is full.
    pub fn reserve_indexes(&self, n: u32) -> Option<u32> {
        self.next_index
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |cur| {
                cur.checked_add(n)
            })
            .ok()
    }

    /// Makes sure indexes below `next` are never handed out again (recovery).
    pub fn ensure_next_index(&self, next: u32) {
        self.next_index.fetch_max(next, Ordering::AcqRel);
    }

    /// Its breaker state.
    pub fn breaker(&self) -> BreakerMark {
        self.breaker.lock().expect("breaker lock").clone()
    }

    /// Replaces its breaker state (persisted with the next [`Campaign::stored_record`]).
    pub fn set_breaker(&self, mark: BreakerMark) {
        *self.breaker.lock().expect("breaker lock") = mark;
    }

    /// The record to persist: the templates as created, `state`, the current lifecycle and
    /// breaker state. Once compacted it keeps no templates or attachments.
    pub fn stored_record(&self, state: CampaignState) -> CampaignRecord {
        let lifecycle = self.lifecycle();
        let r = CampaignRecord {
            state,
            lifecycle,
            breaker: self.breaker(),
            ..self.record.clone()
        };
        if lifecycle.compacted_at_ms.is_some() {
            r.compacted()
        } else {
            r
        }
    }
}

/// The key of a bucket among the streams: its tenant, stream and priority.
fn stream_key(r: &CampaignRecord, stream: &str) -> (String, String, Option<u8>) {
    (
        r.tenant().to_owned(),
        stream.to_owned(),
        r.schedule.priority,
    )
}

/// A campaign change as the cluster's change stream carries it (cluster mode): a campaign
/// created on one node is created on every node, which then take recipient uploads for it
/// (each delivers the recipients it accepted), and a state change made on one node is made on
/// every node.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "kind")]
pub enum Change {
    #[serde(rename = "campaign.create")]
    Create { record: Box<CampaignRecord> },
    #[serde(rename = "campaign.state")]
    State {
        id: Uuid,
        state: CampaignState,
        /// The breaker state that goes with it (a breaker's pause, a forced resume).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        breaker: Option<BreakerMark>,
    },
}

impl Change {
    pub fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }
}

/// A campaign as the archive keeps it: its compacted record and its final counts, which no
/// longer change (its tombstones are gone, so no later report maps to it).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ArchivedCampaign {
    pub record: CampaignRecord,
    pub counts: CountsSnapshot,
}

impl ArchivedCampaign {
    /// `campaign` as archived at `now` (ms).
    pub fn of(campaign: &Campaign, now: u64) -> ArchivedCampaign {
        let mut record = campaign.stored_record(campaign.state()).compacted();
        record.lifecycle.archived_at_ms = Some(now);
        ArchivedCampaign {
            record,
            counts: campaign.counts.snapshot(),
        }
    }

    pub fn encode(&self) -> Vec<u8> {
        encode_versioned(self)
    }

    pub fn decode(bytes: &[u8]) -> Result<ArchivedCampaign, String> {
        decode_versioned(bytes, "archived campaign")
    }

    /// A campaign in memory to show it (`GET /v1/campaigns`); it is not registered.
    pub fn into_campaign(self, seq: u32) -> Campaign {
        let mut c = Campaign::new(seq, self.record, 0);
        c.counts = Arc::new(Counts::from_snapshot(&self.counts));
        c
    }
}

/// What [`Campaign::advance_lifecycle`] decided beyond the new record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LifecycleStep {
    /// Delete the tombstones (and address index) of recipients below this index.
    pub delete_tombstones_below: Option<u32>,
}

/// All campaigns by public id and by sequence.
#[derive(Default)]
pub struct Registry {
    inner: RwLock<RegistryInner>,
}

#[derive(Default)]
struct RegistryInner {
    by_id: HashMap<Uuid, Arc<Campaign>>,
    by_seq: HashMap<u32, Arc<Campaign>>,
    /// The newest bucket of each stream and priority (unset: the default for messages).
    streams: HashMap<(String, String, Option<u8>), Arc<Campaign>>,
    next_seq: u32,
    /// Campaigns moved to the archive (not held here).
    archived: u64,
}

impl Registry {
    pub fn get(&self, id: &Uuid) -> Option<Arc<Campaign>> {
        self.inner
            .read()
            .expect("registry lock")
            .by_id
            .get(id)
            .cloned()
    }

    pub fn by_seq(&self, seq: u32) -> Option<Arc<Campaign>> {
        self.inner
            .read()
            .expect("registry lock")
            .by_seq
            .get(&seq)
            .cloned()
    }

    pub fn insert(&self, campaign: Arc<Campaign>) {
        let mut g = self.inner.write().expect("registry lock");
        g.next_seq = g.next_seq.max(campaign.seq.saturating_add(1));
        g.by_id.insert(campaign.record.id, Arc::clone(&campaign));
        if let Some(stream) = campaign
            .record
            .stream
            .as_ref()
            .filter(|_| campaign.record.is_bucket())
        {
            let key = stream_key(&campaign.record, stream);
            let newer = g.streams.get(&key).is_none_or(|c| c.seq < campaign.seq);
            if newer {
                g.streams.insert(key, Arc::clone(&campaign));
            }
        }
        g.by_seq.insert(campaign.seq, campaign);
    }

    /// Takes `campaign` out (it has been archived) and counts it among the archived; `archived`
    /// is the new number of archived campaigns.
    pub fn remove_archived(&self, campaign: &Campaign, archived: u64) {
        let mut g = self.inner.write().expect("registry lock");
        g.by_id.remove(&campaign.record.id);
        g.by_seq.remove(&campaign.seq);
        if let Some(stream) = &campaign.record.stream {
            let key = stream_key(&campaign.record, stream);
            if g.streams.get(&key).is_some_and(|c| c.seq == campaign.seq) {
                g.streams.remove(&key);
            }
        }
        g.archived = archived;
    }

    /// Recovery: `archived` campaigns are in the archive, the highest numbered `highest`; new
    /// campaigns are numbered above it.
    pub fn set_archived(&self, archived: u64, highest: u32) {
        let mut g = self.inner.write().expect("registry lock");
        g.archived = archived;
        g.next_seq = g.next_seq.max(highest.saturating_add(1));
    }

    /// How many campaigns are archived.
    pub fn archived(&self) -> u64 {
        self.inner.read().expect("registry lock").archived
    }

    /// The newest bucket of `stream` for messages of `priority`, if it has one.
    /// The newest bucket of `tenant`'s `stream` for messages of `priority`.
    pub fn stream(
        &self,
        tenant: &str,
        stream: &str,
        priority: Option<u8>,
    ) -> Option<Arc<Campaign>> {
        self.inner
            .read()
            .expect("registry lock")
            .streams
            .get(&(tenant.to_owned(), stream.to_owned(), priority))
            .cloned()
    }

    /// Hands out a fresh campaign sequence number (not yet persisted; the commit persists it by
    /// writing the campaign record, and recovery resumes after the highest stored one).
    pub fn allocate_seq(&self) -> Option<u32> {
        let mut g = self.inner.write().expect("registry lock");
        let seq = g.next_seq.max(1);
        g.next_seq = seq.checked_add(1)?;
        Some(seq)
    }

    pub fn len(&self) -> usize {
        self.inner.read().expect("registry lock").by_id.len()
    }

    /// Every campaign, newest first.
    pub fn all(&self) -> Vec<Arc<Campaign>> {
        let mut v: Vec<Arc<Campaign>> = self
            .inner
            .read()
            .expect("registry lock")
            .by_seq
            .values()
            .cloned()
            .collect();
        v.sort_by_key(|c| std::cmp::Reverse(c.seq));
        v
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record() -> CampaignRecord {
        CampaignRecord {
            id: Uuid::now_v7(),
            kind: CampaignKind::Bulk,
            from: "news@example.com".into(),
            from_name: Some("News".into()),
            reply_to: None,
            subject: "Hi {{ first_name }}".into(),
            text: Some("Hello".into()),
            html: None,
            headers: BTreeMap::new(),
            tags: vec!["weekly".into()],
            attachments: vec![],
            personalised: true,
            state: CampaignState::Active,
            created_at_ms: 1,
            lifecycle: Lifecycle::default(),
            schedule: Schedule::default(),
            pool: None,
            stream: None,
            raw: None,
            guard: None,
            breaker: Default::default(),
            tenant: None,
        }
    }

    #[test]
    fn record_round_trips_with_version() {
        let r = record();
        let bytes = r.encode();
        assert_eq!(bytes[0], CAMPAIGN_VERSION);
        assert_eq!(CampaignRecord::decode(&bytes).unwrap(), r);
        assert!(
            CampaignRecord::decode(&[9, b'{'])
                .unwrap_err()
                .contains("version 9")
        );
        assert!(CampaignRecord::decode(&[]).is_err());
    }

    #[test]
    fn an_archived_campaign_keeps_counts_and_drops_templates() {
        let c = Campaign::new(7, record(), 3);
        c.counts.delivered.store(2, Ordering::Relaxed);
        c.counts.complained.store(1, Ordering::Relaxed);
        let a = ArchivedCampaign::of(&c, 1_000);
        let back = ArchivedCampaign::decode(&a.encode()).unwrap();
        assert_eq!(back, a);
        assert_eq!(back.record.lifecycle.archived_at_ms, Some(1_000));
        assert_eq!(
            (back.record.text.as_deref(), back.record.html.as_deref()),
            (None, None)
        );
        let shown = back.into_campaign(7);
        assert_eq!(shown.counts.snapshot(), c.counts.snapshot());
        assert_eq!(shown.record.id, c.record.id);
        assert!(
            ArchivedCampaign::decode(&[])
                .unwrap_err()
                .contains("archived campaign")
        );
    }

    #[test]
    fn indexes_are_reserved_without_overlap() {
        let c = Campaign::new(1, record(), u32::MAX - 10);
        assert_eq!(c.reserve_indexes(5), Some(u32::MAX - 10));
        assert_eq!(c.reserve_indexes(5), Some(u32::MAX - 5));
        assert_eq!(c.reserve_indexes(1), None);
    }

    #[test]
    fn registry_allocates_after_highest_seq() {
        let reg = Registry::default();
        assert_eq!(reg.allocate_seq(), Some(1));
        reg.insert(Arc::new(Campaign::new(7, record(), 0)));
        assert_eq!(reg.allocate_seq(), Some(8));
        assert_eq!(reg.by_seq(7).unwrap().seq, 7);
    }
}
