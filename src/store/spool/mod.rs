//! The RocksDB spool: the only place Sluice's durable state lives.
//!
//! Owns the database, its column families and the single writer thread. It knows encodings, not
//! policy: it never decides what to send or when. Every RocksDB call blocks, so callers on tokio
//! reach it through [`Spool::write`] (the writer thread) or `spawn_blocking`; nothing here runs on
//! a tokio worker.
//!
//! **Group commit.** All writes go through one writer thread fed by a bounded channel. It takes
//! whatever has queued up, writes each batch to the WAL without syncing, then syncs the WAL once
//! for the whole group if any of them asked for durability, and only then answers. Concurrent
//! ingest requests therefore share one `fsync`, and the bounded channel pushes back on uploads
//! that outrun the disk.
//!
//! **Staged uploads.** A request that adds recipients is an upload. Its jobs are written in chunks
//! as the request streams, each job tagged with the upload id, and an `open upload` record is
//! written in the same batch as the first chunk. The commit batch (campaign record, idempotency
//! record, removal of the open record) is synced before the 202. Recovery deletes the jobs of
//! uploads still open, so a crash never leaves half an upload visible.
//!
//! **Live and final jobs.** `jobs` holds queued jobs only. The batch that makes a job final
//! deletes it there and writes its tombstone to `finals`, with a merge operand that adds one to
//! the campaign's tally of that state. Recovery reads `jobs` and `tallies`, so it costs what is
//! queued plus one value per campaign; the deletions in `jobs` are compacted away early (a
//! collector flags files that are mostly deletions). Everything else kept per job (its
//! tombstone, its `history` of attempts and reports, a transactional message's record in
//! `messages`) is keyed by the job's key first, so retention deletes a finished campaign's with
//! one range deletion per column family, then compacts that range to free the disk.
//!
//! **Bounded WAL.** The WAL is kept under `max_total_wal_size` by flushing the column families
//! that pin its oldest file, and a clean stop flushes every memtable, so a start after a clean
//! stop replays nothing and one after a crash replays at most that much.
//!
//! **Event outbox.** A batch may carry events ([`SpoolBatch::add_event`]) for webhook receivers.
//! The writer thread numbers them as it writes, so sequence order is write order and a reader
//! that has seen sequence N never later finds a new event below N; it then publishes the last
//! sequence on a watch channel.

pub mod codec;

use std::collections::HashSet;
use std::path::Path;
use std::sync::{Arc, LazyLock};
use std::thread::JoinHandle;
use std::time::Instant;

use prometheus::{Histogram, register_histogram};
use rocksdb::{ColumnFamilyDescriptor, DB, IteratorMode, Options, WriteBatch, WriteOptions};
use tokio::sync::{mpsc, oneshot, watch};

pub use codec::{JobId, JobRecord, JobState, OwnedJobRecord, Tally};

/// Campaign records, keyed by campaign sequence (u32 big-endian).
pub const CF_CAMPAIGNS: &str = "campaigns";
/// One record per queued recipient, keyed by [`JobId::key`]. A job leaves it when it becomes
/// final, so this column family, which recovery reads whole, holds what is pending, not history.
pub const CF_JOBS: &str = "jobs";
/// Tombstones of final jobs ([`JobRecord::tombstone`]), keyed like jobs, kept for the reports
/// that arrive later (DSNs, complaints, unsubscribes) and for lookups, until retention deletes a
/// finished campaign's range.
pub const CF_FINALS: &str = "finals";
/// The record of each transactional message (a campaign record with the message's templates),
/// keyed like its job in its stream's bucket: written with the job, compacted when the job is
/// final, deleted with its tombstone. A raw message's bytes are here too, once, under its first
/// job's key followed by `b`: deleted when its only job is final, else with the tombstones.
pub const CF_MESSAGES: &str = "messages";
/// What happened to each job, for lookups: one entry per attempt, fate and later report, keyed
/// by the job's key, the time (ms, big-endian) and a tie-breaker, so a job's entries are one
/// ordered range. Deleted with the job's tombstone.
pub const CF_HISTORY: &str = "history";
/// The key of a raw message's bytes: its first job's key and `b`, which sorts between that job
/// and the next, so the campaign's key ranges take it along.
fn body_key(id: JobId) -> [u8; 9] {
    let mut key = [b'b'; 9];
    key[..8].copy_from_slice(&id.key());
    key
}

/// One [`Tally`] per campaign, keyed by campaign sequence (u32 big-endian), updated by merge.
pub const CF_TALLIES: &str = "tallies";
/// Finished campaigns that retention has compacted and whose recipients' tombstones are gone,
/// keyed by campaign sequence (u32 big-endian): the compacted record with its final counts.
/// Recovery never reads it, so start-up does not grow with the campaigns ever sent; lookups
/// reach it by id through the `archived/` index in `meta`.
pub const CF_ARCHIVE: &str = "archive";
/// Suppressed addresses.
pub const CF_SUPPRESSIONS: &str = "suppressions";
/// Outbox of delivery events (webhooks, delivery log).
pub const CF_EVENTS: &str = "events";
/// Schema version and open uploads.
pub const CF_META: &str = "meta";
/// Stored responses to requests that carried an `Idempotency-Key`, so a retry gets the same answer.
pub const CF_IDEMPOTENCY: &str = "idempotency";
/// Mail to the bounce domain's postmaster and abuse addresses, kept when no operator address
/// is configured to forward it to: time-ordered key (ms and a sequence, big-endian), a JSON
/// summary and the raw message.
pub const CF_INBOUND: &str = "inbound";

/// A record read back whole: key and value.
pub type KeyValue = (Vec<u8>, Vec<u8>);

const ALL_CFS: [&str; 12] = [
    CF_CAMPAIGNS,
    CF_ARCHIVE,
    CF_JOBS,
    CF_FINALS,
    CF_MESSAGES,
    CF_HISTORY,
    CF_TALLIES,
    CF_SUPPRESSIONS,
    CF_EVENTS,
    CF_META,
    CF_IDEMPOTENCY,
    CF_INBOUND,
];

/// The schema this build reads and writes. Version 1 kept final jobs in `jobs` and had no
/// tallies; [`Spool::recover`] migrates it.
pub const SCHEMA_VERSION: u32 = 2;
const META_SCHEMA: &[u8] = b"schema_version";
const META_UPLOAD_PREFIX: &[u8] = b"upload/";
/// `rcpt/` + campaign sequence (u32 big-endian) + address: the job index (u32 big-endian) of
/// that recipient, kept for campaigns that are not personalised, whose messages go to several
/// recipients at once and so cannot name one job in their VERP address.
const META_RECIPIENT_PREFIX: &[u8] = b"rcpt/";
/// `archived/` + campaign id (16 bytes): the sequence (u32 big-endian) of an archived campaign.
const META_ARCHIVED_PREFIX: &[u8] = b"archived/";
/// How many campaigns are archived (u64 big-endian), so listing them needs no scan.
const META_ARCHIVED_COUNT: &[u8] = b"archived_count";
/// Shaping actions in force, by id (JSON).
pub const STATE_SHAPING: &[u8] = b"shaping/";
/// Warm-up counts per (source, provider group) (JSON).
pub const STATE_WARMUP: &[u8] = b"warmup/";
/// Cluster mode: this spool's instance id (`instance`), which tells a restarted node from
/// another process using the same `node_id`,
/// and the id of the last change-stream entry it applied (`stream`).
pub const STATE_CLUSTER: &[u8] = b"cluster/";
/// Cluster mode: changes staged for the change stream, by a time-ordered u64 (big-endian).
pub const STATE_CLUSTER_OUT: &[u8] = b"cluster-out/";
/// MTA-STS policies fetched, by domain (JSON).
pub const STATE_STS: &[u8] = b"mta-sts/";
/// TLS reporting aggregates, by `<day>/<domain>/<policy type>` (JSON).
pub const STATE_TLSRPT: &[u8] = b"tls-rpt/";
/// Breaker counts and states: `c/<campaign seq>`, `d/<domain>\0<bucket>`, `t/<domain>` (JSON).
pub const STATE_GUARD: &[u8] = b"guard/";
/// Tenants and API keys made through the admin API (`t/<name>`, `k/<key hash in hex>`, JSON),
/// and recipients accepted per tenant and UTC day (`q/<name>\0<day>`, a u64 summed by merge).
pub const STATE_TENANT: &[u8] = b"tenant/";
/// The prefixes of small state records in `meta` ([`SpoolBatch::put_state`]).
pub const STATE_PREFIXES: [&[u8]; 8] = [
    STATE_GUARD,
    STATE_TENANT,
    STATE_SHAPING,
    STATE_WARMUP,
    STATE_CLUSTER,
    STATE_CLUSTER_OUT,
    STATE_STS,
    STATE_TLSRPT,
];

fn archived_key(id: &[u8; 16]) -> Vec<u8> {
    [META_ARCHIVED_PREFIX, &id[..]].concat()
}

/// The campaign sequence a key of `campaigns`, `tallies` or `archive` holds (u32 big-endian);
/// `what` names the column family in the error.
fn seq_key(k: &[u8], what: &str) -> Result<u32, SpoolError> {
    <[u8; 4]>::try_from(k)
        .map(u32::from_be_bytes)
        .map_err(|_| SpoolError::Corrupt {
            key: format!("{what} {k:?}"),
            reason: "key is not 4 bytes".into(),
        })
}

/// A column family of the spool; every one is created at open, so a missing one is a bug.
fn cf<'a>(db: &'a DB, name: &str) -> &'a rocksdb::ColumnFamily {
    db.cf_handle(name)
        .expect("column families are created at open")
}

fn recipient_key(campaign: u32, address: &str) -> Vec<u8> {
    let mut key = Vec::with_capacity(META_RECIPIENT_PREFIX.len() + 4 + address.len());
    key.extend_from_slice(META_RECIPIENT_PREFIX);
    key.extend_from_slice(&campaign.to_be_bytes());
    key.extend_from_slice(address.as_bytes());
    key
}

/// The `rcpt/` keys of `campaign`, as a range for deletion.
fn recipient_range(campaign: u32) -> (Vec<u8>, Vec<u8>) {
    let from = [META_RECIPIENT_PREFIX, &campaign.to_be_bytes()].concat();
    let to = match campaign.checked_add(1) {
        Some(next) => [META_RECIPIENT_PREFIX, &next.to_be_bytes()].concat(),
        // Past every `rcpt/` key: '0' follows '/'.
        None => b"rcpt0".to_vec(),
    };
    (from, to)
}

/// Batches queued for the writer thread before senders wait.
const WRITER_QUEUE: usize = 64;
/// Most batches the writer folds into one group before syncing.
const MAX_GROUP: usize = 256;

pub(crate) static WRITE_SECONDS: LazyLock<Histogram> = LazyLock::new(|| {
    register_histogram!(
        "sluice_spool_write_seconds",
        "Time to apply one group of write batches to RocksDB, before any sync. Rising values mean \
         the memtable or compaction is falling behind.",
        prometheus::exponential_buckets(0.0001, 2.0, 16).expect("static buckets")
    )
    .expect("metric registers once")
});

pub(crate) static SYNC_SECONDS: LazyLock<Histogram> = LazyLock::new(|| {
    register_histogram!(
        "sluice_spool_sync_seconds",
        "Time of one WAL fsync shared by a group of durable writes (group commit). This bounds \
         ingest latency; it is the disk's sync latency.",
        prometheus::exponential_buckets(0.0001, 2.0, 16).expect("static buckets")
    )
    .expect("metric registers once")
});

pub(crate) static FREE_BYTES: LazyLock<prometheus::IntGauge> = LazyLock::new(|| {
    prometheus::register_int_gauge!(
        "sluice_spool_free_bytes",
        "Bytes free on the spool's filesystem (for unprivileged users), sampled every half second. \
         Under spool.min_free_bytes ingest answers 507."
    )
    .expect("metric registers once")
});

pub(crate) static GROUP_SIZE: LazyLock<Histogram> = LazyLock::new(|| {
    register_histogram!(
        "sluice_spool_group_batches",
        "Write batches folded into one group commit. Values above 1 show concurrent requests \
         sharing a sync.",
        vec![1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0]
    )
    .expect("metric registers once")
});

#[derive(Debug, Clone, thiserror::Error)]
pub enum SpoolError {
    #[error("spool I/O error: {0}")]
    Rocks(String),
    #[error("spool is full or out of disk space: {0}")]
    NoSpace(String),
    #[error("spool schema version {found} is not supported (this build reads {SCHEMA_VERSION})")]
    Schema { found: u32 },
    #[error("spool record {key} is corrupt: {reason}")]
    Corrupt { key: String, reason: String },
    #[error("spool writer has stopped")]
    Closed,
    /// A [`Reach::Memory`] read needed the disk.
    #[error("spool read needs the disk")]
    NotInMemory,
}

impl From<rocksdb::Error> for SpoolError {
    fn from(e: rocksdb::Error) -> Self {
        if e.kind() == rocksdb::ErrorKind::Incomplete {
            return SpoolError::NotInMemory;
        }
        let text = e.into_string();
        if text.contains("No space left") || text.contains("NoSpace") {
            SpoolError::NoSpace(text)
        } else {
            SpoolError::Rocks(text)
        }
    }
}

/// Job records [`Spool::read_ahead`] brings into the block cache: 70 KB of records of 140 bytes
/// (an address and a name), some 18 table blocks, and 64 lanes' batches of 8.
pub const JOB_READ_AHEAD: usize = 512;

/// Where a point read may look.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reach {
    /// Anywhere, the disk included: blocking, for the blocking pool.
    Disk,
    /// The memtables and the block cache only: never waits on I/O, so a task may do it on a
    /// runtime worker. Fails whole with [`SpoolError::NotInMemory`] when a record (or the index
    /// of the file it would be in) is not there; the caller then reads with [`Reach::Disk`].
    Memory,
}

/// Read options that keep to the memtables and the block cache ([`Reach::Memory`]), with an
/// upper bound for iterators.
fn cached_only(upper_bound: Option<Vec<u8>>) -> rocksdb::ReadOptions {
    let mut opts = rocksdb::ReadOptions::default();
    opts.set_read_tier(rocksdb::ReadTier::BlockCache);
    if let Some(b) = upper_bound {
        opts.set_iterate_upper_bound(b);
    }
    opts
}

/// Whether a write must be on disk before it is acknowledged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Durability {
    /// Acknowledged after the WAL is synced (ingest commits, state changes users were told of).
    Sync,
    /// Acknowledged once in the WAL's OS buffer; a later sync covers it.
    Buffered,
}

struct WriteRequest {
    batch: WriteBatch,
    events: Vec<StagedEvent>,
    durability: Durability,
    done: oneshot::Sender<Result<(), SpoolError>>,
}

enum WriterMsg {
    Write(WriteRequest),
    /// Drain what is queued, sync, and stop.
    Close(oneshot::Sender<()>),
}

/// An event for the outbox: its JSON and the receivers (webhook ids) that want it.
#[derive(Clone)]
struct StagedEvent {
    hooks: Vec<u32>,
    json: Vec<u8>,
}

/// Outbox key: sequence then receiver, big-endian, so the column family is in write order.
pub fn event_key(seq: u64, hook: u32) -> [u8; 12] {
    let mut k = [0u8; 12];
    k[..8].copy_from_slice(&seq.to_be_bytes());
    k[8..].copy_from_slice(&hook.to_be_bytes());
    k
}

fn split_event_key(k: &[u8]) -> Option<(u64, u32)> {
    let seq = u64::from_be_bytes(k.get(..8)?.try_into().ok()?);
    let hook = u32::from_be_bytes(k.get(8..12)?.try_into().ok()?);
    Some((seq, hook))
}

/// A write batch bound to the spool's column families.
pub struct SpoolBatch {
    db: Arc<DB>,
    batch: WriteBatch,
    events: Vec<StagedEvent>,
}

impl SpoolBatch {
    /// A copy, for a write that may have to be retried.
    pub fn copy(&self) -> SpoolBatch {
        SpoolBatch {
            db: Arc::clone(&self.db),
            batch: WriteBatch::from_data(self.batch.data()),
            events: self.events.clone(),
        }
    }

    /// Adds an event for the receivers `hooks`; the writer gives it its sequence number.
    pub fn add_event(&mut self, hooks: Vec<u32>, json: Vec<u8>) {
        if !hooks.is_empty() {
            self.events.push(StagedEvent { hooks, json });
        }
    }

    pub fn delete_event(&mut self, seq: u64, hook: u32) {
        let cf = cf(&self.db, CF_EVENTS);
        self.batch.delete_cf(cf, event_key(seq, hook));
    }

    /// Records which job of `id.campaign` is `address` (see [`Spool::find_recipient`]).
    pub fn put_recipient(&mut self, id: JobId, address: &str) {
        let cf = cf(&self.db, CF_META);
        self.batch.put_cf(
            cf,
            recipient_key(id.campaign, address),
            id.index.to_be_bytes(),
        );
    }

    pub fn put_job(&mut self, id: JobId, value: &[u8]) {
        let cf = cf(&self.db, CF_JOBS);
        self.batch.put_cf(cf, id.key(), value);
    }

    pub fn delete_job(&mut self, id: JobId) {
        let cf = cf(&self.db, CF_JOBS);
        self.batch.delete_cf(cf, id.key());
    }

    /// Moves a job that became final out of the live jobs: deletes it there and writes its
    /// tombstone.
    pub fn finish_job(&mut self, id: JobId, tombstone: &[u8]) {
        self.delete_job(id);
        self.put_final(id, tombstone);
    }

    /// Deletes a final job's tombstone (a final job queued again).
    pub fn delete_final(&mut self, id: JobId) {
        let cf = cf(&self.db, CF_FINALS);
        self.batch.delete_cf(cf, id.key());
    }

    /// Writes (or rewrites, when a later report changes it) a final job's tombstone.
    pub fn put_final(&mut self, id: JobId, tombstone: &[u8]) {
        let cf = cf(&self.db, CF_FINALS);
        self.batch.put_cf(cf, id.key(), tombstone);
    }

    /// Stores the record of the message that is job `id` (see [`CF_MESSAGES`]).
    pub fn put_message(&mut self, id: JobId, record: &[u8]) {
        let cf = cf(&self.db, CF_MESSAGES);
        self.batch.put_cf(cf, id.key(), record);
    }

    /// Stores the bytes of the raw message whose first job is `id` (see [`CF_MESSAGES`]).
    pub fn put_message_body(&mut self, id: JobId, bytes: &[u8]) {
        let cf = cf(&self.db, CF_MESSAGES);
        self.batch.put_cf(cf, body_key(id), bytes);
    }

    /// Deletes the bytes [`SpoolBatch::put_message_body`] stored.
    pub fn delete_message_body(&mut self, id: JobId) {
        let cf = cf(&self.db, CF_MESSAGES);
        self.batch.delete_cf(cf, body_key(id));
    }

    /// Adds an entry at `at_ms` to job `id`'s history (see [`CF_HISTORY`]).
    pub fn put_history(&mut self, id: JobId, at_ms: u64, entry: &[u8]) {
        static TIE: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let tie = TIE.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let mut key = [0u8; 20];
        key[..8].copy_from_slice(&id.key());
        key[8..16].copy_from_slice(&at_ms.to_be_bytes());
        key[16..].copy_from_slice(&tie.to_be_bytes());
        self.batch.put_cf(cf(&self.db, CF_HISTORY), key, entry);
    }

    /// Deletes the tombstones of `campaign`'s recipients below index `below`, their histories,
    /// their message records (a stream's bucket) and the campaign's address index, by key
    /// range: a few bytes in the batch whatever their number; compaction reclaims the space.
    pub fn delete_tombstones(&mut self, campaign: u32, below: u32) {
        let from = JobId { campaign, index: 0 }.key();
        let to = u64::from(JobId {
            campaign,
            index: below,
        })
        .to_be_bytes();
        // A history key starts with its job's key, so the range holds exactly these jobs' entries.
        for name in [CF_FINALS, CF_MESSAGES, CF_HISTORY] {
            self.batch.delete_range_cf(cf(&self.db, name), from, to);
        }
        let (from, to) = recipient_range(campaign);
        self.batch.delete_range_cf(cf(&self.db, CF_META), from, to);
    }

    /// Adds `tally` to the campaign's stored tally.
    pub fn tally(&mut self, campaign: u32, tally: &Tally) {
        if tally.is_empty() {
            return;
        }
        let cf = cf(&self.db, CF_TALLIES);
        self.batch
            .merge_cf(cf, campaign.to_be_bytes(), tally.encode());
    }

    pub fn put_campaign(&mut self, seq: u32, value: &[u8]) {
        let cf = cf(&self.db, CF_CAMPAIGNS);
        self.batch.put_cf(cf, seq.to_be_bytes(), value);
    }

    /// Moves campaign `seq` (public id `id`) out of the campaigns recovery loads: deletes its
    /// record and tally, stores `archived` (its final form) in the archive, indexes it by id and
    /// sets the number of archived campaigns to `count`.
    pub fn archive_campaign(&mut self, seq: u32, id: &[u8; 16], archived: &[u8], count: u64) {
        let key = seq.to_be_bytes();
        self.batch.delete_cf(cf(&self.db, CF_CAMPAIGNS), key);
        self.batch.delete_cf(cf(&self.db, CF_TALLIES), key);
        self.batch.put_cf(cf(&self.db, CF_ARCHIVE), key, archived);
        let meta = cf(&self.db, CF_META);
        self.batch.put_cf(meta, archived_key(id), key);
        self.batch
            .put_cf(meta, META_ARCHIVED_COUNT, count.to_be_bytes());
    }

    pub fn open_upload(&mut self, upload: u64, campaign: u32) {
        let cf = cf(&self.db, CF_META);
        self.batch
            .put_cf(cf, upload_key(upload), campaign.to_be_bytes());
    }

    pub fn close_upload(&mut self, upload: u64) {
        let cf = cf(&self.db, CF_META);
        self.batch.delete_cf(cf, upload_key(upload));
    }

    pub fn put_suppression(&mut self, key: &[u8], value: &[u8]) {
        let cf = cf(&self.db, CF_SUPPRESSIONS);
        self.batch.put_cf(cf, key, value);
    }

    pub fn delete_suppression(&mut self, key: &[u8]) {
        let cf = cf(&self.db, CF_SUPPRESSIONS);
        self.batch.delete_cf(cf, key);
    }

    /// Puts a small state record in `meta` under `prefix` (one of [`STATE_PREFIXES`]) and `key`.
    pub fn put_state(&mut self, prefix: &[u8], key: &[u8], value: &[u8]) {
        debug_assert!(STATE_PREFIXES.contains(&prefix));
        let cf = cf(&self.db, CF_META);
        self.batch.put_cf(cf, [prefix, key].concat(), value);
    }

    /// Adds `value` (a u64, big-endian) to the counter under `prefix` and `key` in `meta`.
    pub fn merge_state(&mut self, prefix: &[u8], key: &[u8], value: &[u8; 8]) {
        debug_assert!(STATE_PREFIXES.contains(&prefix));
        let cf = cf(&self.db, CF_META);
        self.batch.merge_cf(cf, [prefix, key].concat(), value);
    }

    pub fn delete_state(&mut self, prefix: &[u8], key: &[u8]) {
        let cf = cf(&self.db, CF_META);
        self.batch.delete_cf(cf, [prefix, key].concat());
    }

    pub fn put_inbound(&mut self, key: &[u8], value: &[u8]) {
        let cf = cf(&self.db, CF_INBOUND);
        self.batch.put_cf(cf, key, value);
    }

    pub fn delete_inbound(&mut self, key: &[u8]) {
        let cf = cf(&self.db, CF_INBOUND);
        self.batch.delete_cf(cf, key);
    }

    pub fn put_idempotency(&mut self, key: &[u8], value: &[u8]) {
        let cf = cf(&self.db, CF_IDEMPOTENCY);
        self.batch.put_cf(cf, key, value);
    }

    pub fn delete_idempotency(&mut self, key: &[u8]) {
        let cf = cf(&self.db, CF_IDEMPOTENCY);
        self.batch.delete_cf(cf, key);
    }

    pub fn len(&self) -> usize {
        self.batch.len() + self.events.len()
    }

    pub fn is_empty(&self) -> bool {
        self.batch.is_empty() && self.events.is_empty()
    }

    pub fn size_in_bytes(&self) -> usize {
        self.batch.size_in_bytes()
    }
}

fn upload_key(upload: u64) -> Vec<u8> {
    let mut key = META_UPLOAD_PREFIX.to_vec();
    key.extend_from_slice(&upload.to_be_bytes());
    key
}

/// A write handed to the writer thread; await it to learn whether it landed.
pub struct PendingWrite(oneshot::Receiver<Result<(), SpoolError>>);

impl PendingWrite {
    pub async fn wait(self) -> Result<(), SpoolError> {
        self.0.await.unwrap_or(Err(SpoolError::Closed))
    }
}

/// What recovery found, handed to the engine to rebuild its in-memory state.
pub struct Recovered {
    /// Highest upload id seen in any job or open-upload record.
    pub max_upload: u64,
    /// Jobs of uncommitted uploads that were deleted.
    pub rolled_back: u64,
}

/// The open spool. Cheap to share behind an `Arc`.
pub struct Spool {
    db: Arc<DB>,
    writer: mpsc::Sender<WriterMsg>,
    /// The last event sequence written.
    events_written: watch::Receiver<u64>,
    /// Per-receiver backlog gauges, raised by the writer as it writes events.
    event_gauges: Arc<std::sync::OnceLock<std::collections::HashMap<u32, prometheus::IntGauge>>>,
    thread: std::sync::Mutex<Option<JoinHandle<()>>>,
    space: Arc<Space>,
    /// Microseconds the writer gathers synced writes for (see [`Spool::set_commit_window`]).
    commit_window: Arc<std::sync::atomic::AtomicU64>,
}

/// The free-space guard: the spool filesystem's free bytes, sampled by a thread, against the
/// configured floor.
struct Space {
    min_free: std::sync::atomic::AtomicU64,
    free: std::sync::atomic::AtomicU64,
}

/// How often the free space is sampled.
const SPACE_SAMPLE: std::time::Duration = std::time::Duration::from_millis(500);

/// Bytes an unprivileged writer may still use on the filesystem holding `path`.
fn free_bytes(path: &Path) -> std::io::Result<u64> {
    let st = rustix::fs::statvfs(path)?;
    Ok(st.f_bavail.saturating_mul(st.f_frsize))
}

/// Samples the free space until the spool is dropped (the thread then holds the last reference).
fn sample_space(path: std::path::PathBuf, space: Arc<Space>) {
    while Arc::strong_count(&space) > 1 {
        match free_bytes(&path) {
            Ok(free) => {
                space.free.store(free, std::sync::atomic::Ordering::Relaxed);
                FREE_BYTES.set(i64::try_from(free).unwrap_or(i64::MAX));
            }
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "statvfs of the spool failed")
            }
        }
        std::thread::sleep(SPACE_SAMPLE);
    }
}

impl Spool {
    /// Opens (creating if needed) the spool at `path` and starts the writer thread. Blocking.
    pub fn open(path: &Path) -> Result<Spool, SpoolError> {
        std::fs::create_dir_all(path)
            .map_err(|e| SpoolError::Rocks(format!("creating {}: {e}", path.display())))?;
        let mut opts = Options::default();
        opts.create_if_missing(true);
        opts.create_missing_column_families(true);
        // One flush and one compaction thread: a 2-core box must keep a core for HTTP and SMTP.
        opts.set_max_background_jobs(2);
        opts.set_bytes_per_sync(1 << 20);
        // Writes are pipelined through one thread; concurrent memtable writes buy nothing here.
        opts.set_allow_concurrent_memtable_write(false);
        // A WAL file is deleted only once every column family's memtable data in it is flushed,
        // so one that is rarely written (campaigns, meta) would keep them all (RocksDB's default
        // bound is four times all memtables, gigabytes). Past this size the column families
        // holding the oldest WAL are flushed: the WAL, and the replay at the next start, stay
        // bounded whatever the history.
        opts.set_max_total_wal_size(64 << 20);
        // WAL files are reused rather than created: appending to a new file grows its size, so
        // every sync also writes the inode, where overwriting a recycled one syncs the data
        // only (half the I/O per commit; RocksDB marks the records of each use, so a recycled
        // file's stale tail is not replayed).
        opts.set_recycle_log_file_num(4);
        let cfs = ALL_CFS
            .iter()
            .map(|name| ColumnFamilyDescriptor::new(*name, cf_options(name)));
        let db = Arc::new(DB::open_cf_descriptors(&opts, path, cfs)?);
        check_schema(&db)?;
        let last_event = {
            let cf = cf(&db, CF_EVENTS);
            let mut it = db.raw_iterator_cf(cf);
            it.seek_to_last();
            it.key().and_then(split_event_key).map_or(0, |(seq, _)| seq)
        };
        let (events_tx, events_written) = watch::channel(last_event);
        let event_gauges = Arc::new(std::sync::OnceLock::new());
        let outbox = Outbox {
            next: last_event + 1,
            written: events_tx,
            gauges: Arc::clone(&event_gauges),
        };
        let space = Arc::new(Space {
            min_free: std::sync::atomic::AtomicU64::new(0),
            free: std::sync::atomic::AtomicU64::new(free_bytes(path).unwrap_or(u64::MAX)),
        });
        {
            let (path, space) = (path.to_owned(), Arc::clone(&space));
            std::thread::Builder::new()
                .name("spool-space".into())
                .spawn(move || sample_space(path, space))
                .map_err(|e| SpoolError::Rocks(format!("starting the space sampler: {e}")))?;
        }
        let (tx, rx) = mpsc::channel(WRITER_QUEUE);
        let writer_db = Arc::clone(&db);
        let commit_window = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let window = Arc::clone(&commit_window);
        let thread = std::thread::Builder::new()
            .name("spool-writer".into())
            .spawn(move || writer_loop(&writer_db, rx, outbox, &window))
            .map_err(|e| SpoolError::Rocks(format!("starting the writer thread: {e}")))?;
        Ok(Spool {
            db,
            writer: tx,
            events_written,
            event_gauges,
            thread: std::sync::Mutex::new(Some(thread)),
            space,
            commit_window,
        })
    }

    /// Sets how long the writer gathers more synced writes before a sync when several writers
    /// are committing at once (see [`writer_loop`]); zero syncs at once.
    pub fn set_commit_window(&self, window: std::time::Duration) {
        let micros = u64::try_from(window.as_micros()).unwrap_or(u64::MAX);
        self.commit_window
            .store(micros, std::sync::atomic::Ordering::Relaxed);
    }

    /// Sets the free space the filesystem must keep for [`Spool::check_space`] to pass (0: no
    /// floor).
    pub fn set_min_free_bytes(&self, bytes: u64) {
        self.space
            .min_free
            .store(bytes, std::sync::atomic::Ordering::Relaxed);
    }

    /// Refuses new data (ingest, imports) while the filesystem's free space, as last sampled, is
    /// under the floor. Writes that record progress (delivery outcomes, bounces) do not ask: they
    /// are small and must not stop because a large upload used the room.
    pub fn check_space(&self) -> Result<(), SpoolError> {
        let min = self
            .space
            .min_free
            .load(std::sync::atomic::Ordering::Relaxed);
        let free = self.space.free.load(std::sync::atomic::Ordering::Relaxed);
        if free < min {
            return Err(SpoolError::NoSpace(format!(
                "the spool's filesystem has {free} bytes free, under spool.min_free_bytes \
                 ({min}); ingest resumes by itself once space is freed"
            )));
        }
        Ok(())
    }

    pub fn batch(&self) -> SpoolBatch {
        SpoolBatch {
            db: Arc::clone(&self.db),
            batch: WriteBatch::default(),
            events: Vec::new(),
        }
    }

    /// Queues `batch` for the writer thread, waiting for room when the disk is behind.
    pub async fn submit(
        &self,
        batch: SpoolBatch,
        durability: Durability,
    ) -> Result<PendingWrite, SpoolError> {
        let (done, rx) = oneshot::channel();
        self.writer
            .send(WriterMsg::Write(WriteRequest {
                batch: batch.batch,
                events: batch.events,
                durability,
                done,
            }))
            .await
            .map_err(|_| SpoolError::Closed)?;
        Ok(PendingWrite(rx))
    }

    /// Writes `batch` and waits until it is applied (and synced, for [`Durability::Sync`]).
    pub async fn write(&self, batch: SpoolBatch, durability: Durability) -> Result<(), SpoolError> {
        self.submit(batch, durability).await?.wait().await
    }

    /// Reads one idempotency record. Blocking.
    pub fn get_idempotency(&self, key: &[u8]) -> Result<Option<Vec<u8>>, SpoolError> {
        let cf = cf(&self.db, CF_IDEMPOTENCY);
        Ok(self.db.get_cf(cf, key)?)
    }

    /// Visits the state records under `prefix` as (key without the prefix, value). Blocking.
    pub fn scan_state(
        &self,
        prefix: &[u8],
        mut visit: impl FnMut(&[u8], &[u8]),
    ) -> Result<(), SpoolError> {
        let meta = cf(&self.db, CF_META);
        for item in self.db.prefix_iterator_cf(meta, prefix) {
            let (k, v) = item?;
            let Some(key) = k.strip_prefix(prefix) else {
                break;
            };
            visit(key, &v);
        }
        Ok(())
    }

    /// Visits every idempotency record (for expiry). Blocking.
    pub fn scan_idempotency(&self, mut visit: impl FnMut(&[u8], &[u8])) -> Result<(), SpoolError> {
        let cf = cf(&self.db, CF_IDEMPOTENCY);
        for item in self.db.iterator_cf(cf, IteratorMode::Start) {
            let (k, v) = item?;
            visit(&k, &v);
        }
        Ok(())
    }

    /// Reads a job's record, live or final (its tombstone). Blocking.
    pub fn get_job(&self, id: JobId) -> Result<Option<Vec<u8>>, SpoolError> {
        for name in [CF_JOBS, CF_FINALS] {
            let cf = cf(&self.db, name);
            if let Some(v) = self.db.get_cf(cf, id.key())? {
                return Ok(Some(v));
            }
        }
        Ok(None)
    }

    /// The records of the messages that are jobs `ids` (see [`CF_MESSAGES`]). Blocking with
    /// [`Reach::Disk`].
    pub fn get_messages(
        &self,
        ids: &[JobId],
        reach: Reach,
    ) -> Result<Vec<Option<Vec<u8>>>, SpoolError> {
        self.multi_get(CF_MESSAGES, ids, reach)
    }

    /// The bytes of the raw messages whose first jobs are `ids`, position for position. Blocking
    /// with [`Reach::Disk`].
    pub fn get_message_bodies(
        &self,
        ids: &[JobId],
        reach: Reach,
    ) -> Result<Vec<Option<Vec<u8>>>, SpoolError> {
        let keys: Vec<[u8; 9]> = ids.iter().map(|id| body_key(*id)).collect();
        self.multi_get_keys(CF_MESSAGES, &keys, reach)
    }

    /// The values of `ids` in column family `name`, position for position. Blocking with
    /// [`Reach::Disk`].
    fn multi_get(
        &self,
        name: &str,
        ids: &[JobId],
        reach: Reach,
    ) -> Result<Vec<Option<Vec<u8>>>, SpoolError> {
        let keys: Vec<[u8; 8]> = ids.iter().map(|id| id.key()).collect();
        self.multi_get_keys(name, &keys, reach)
    }

    fn multi_get_keys<K: AsRef<[u8]>>(
        &self,
        name: &str,
        keys: &[K],
        reach: Reach,
    ) -> Result<Vec<Option<Vec<u8>>>, SpoolError> {
        let cf = cf(&self.db, name);
        match reach {
            Reach::Disk => self
                .db
                .batched_multi_get_cf(cf, keys.iter(), false)
                .into_iter()
                .map(|r| r.map(|v| v.map(|s| s.to_vec())).map_err(SpoolError::from))
                .collect(),
            // Not MultiGet: it reads table blocks from the disk whatever the read tier says,
            // where Get and iterators keep to it. Several keys: the scan first, then point
            // reads if it needed a block the keys themselves may not be in (see
            // `scan_cached`). One key: a point read, cheaper than setting up an iterator.
            Reach::Memory => {
                if keys.len() > 1 {
                    match self.scan_cached(cf, keys) {
                        Err(SpoolError::NotInMemory) => {}
                        r => return r,
                    }
                }
                let opts = cached_only(None);
                keys.iter()
                    .map(|k| {
                        let v = self.db.get_pinned_cf_opt(cf, k, &opts)?;
                        Ok(v.map(|s| s.to_vec()))
                    })
                    .collect()
            }
        }
    }

    /// A [`Reach::Memory`] read of `keys` with one iterator, in key order: where the next key
    /// wanted is there, it is the iterator's next step, which costs a fraction of a point
    /// read's search through the memtables and each file's index (a lane's batch is mostly
    /// consecutive jobs of one campaign: 0.37 µs a record against 0.79 for point reads, with
    /// the records in table files; `job_read` in `benches/delivery.rs`). `None` where a key is
    /// not there.
    ///
    /// A seek positions every level, so it may need a block of another file, around the keys
    /// but without them, that is not cached: then this fails with
    /// [`SpoolError::NotInMemory`] although point reads would not, and the caller tries those.
    fn scan_cached<K: AsRef<[u8]>>(
        &self,
        cf: &rocksdb::ColumnFamily,
        keys: &[K],
    ) -> Result<Vec<Option<Vec<u8>>>, SpoolError> {
        let mut order: Vec<usize> = (0..keys.len()).collect();
        order.sort_unstable_by(|&a, &b| keys[a].as_ref().cmp(keys[b].as_ref()));
        let mut out = vec![None; keys.len()];
        let Some(&last) = order.last() else {
            return Ok(out);
        };
        // The first key after the last one wanted: the iterator never reads past it.
        let mut bound = keys[last].as_ref().to_vec();
        bound.push(0);
        let mut it = self.db.raw_iterator_cf_opt(cf, cached_only(Some(bound)));
        // The key wanted before, and where it was found (the iterator is then at the first
        // key after it, or at the first key at or after it if it was not there).
        let mut previous: Option<(&[u8], usize)> = None;
        for (n, &i) in order.iter().enumerate() {
            let want = keys[i].as_ref();
            if let Some((p, at)) = previous
                && p == want
            {
                out[i] = out[at].clone();
                continue;
            }
            // A seek unless the iterator is already at or after this key. Also after a step
            // that needed an uncached block: this key may be elsewhere.
            let behind = match it.key() {
                Some(k) => k < want,
                None => it.status().is_err(),
            };
            if previous.is_none() || behind {
                it.seek(want);
            }
            match it.key() {
                Some(k) if k == want => {
                    out[i] = it.value().map(<[u8]>::to_vec);
                    if n + 1 < order.len() {
                        it.next();
                    }
                }
                // Past it (or past every key wanted): it is not there.
                Some(_) => {}
                None => it.status()?,
            }
            previous = Some((want, i));
        }
        Ok(out)
    }

    /// Compacts the key ranges [`SpoolBatch::delete_tombstones`] deleted for `campaign` below
    /// `below` (and its address index), so their disk space is freed now instead of whenever compaction would reach
    /// those files by itself (a range deletion alone frees nothing). Blocking; rewrites only the
    /// files that overlap the range.
    pub fn compact_tombstones(&self, campaign: u32, below: u32) {
        let from = JobId { campaign, index: 0 }.key();
        let to = u64::from(JobId {
            campaign,
            index: below,
        })
        .to_be_bytes();
        // The range usually sits in the last level, which RocksDB skips by default.
        let mut opts = rocksdb::CompactOptions::default();
        opts.set_bottommost_level_compaction(rocksdb::BottommostLevelCompaction::ForceOptimized);
        for name in [CF_FINALS, CF_MESSAGES, CF_HISTORY] {
            self.db
                .compact_range_cf_opt(cf(&self.db, name), Some(&from[..]), Some(&to[..]), &opts);
        }
        let (from, to) = recipient_range(campaign);
        self.db
            .compact_range_cf_opt(cf(&self.db, CF_META), Some(from), Some(to), &opts);
    }

    /// Job `id`'s history entries, oldest first (see [`CF_HISTORY`]). Blocking.
    pub fn history(&self, id: JobId) -> Result<Vec<Vec<u8>>, SpoolError> {
        let prefix = id.key();
        let mut out = Vec::new();
        let mode = IteratorMode::From(&prefix, rocksdb::Direction::Forward);
        for item in self.db.iterator_cf(cf(&self.db, CF_HISTORY), mode) {
            let (k, v) = item?;
            if !k.starts_with(&prefix) {
                break;
            }
            out.push(v.to_vec());
        }
        Ok(out)
    }

    /// Every campaign's stored tally, in sequence order. Blocking.
    pub fn load_tallies(&self) -> Result<Vec<(u32, Tally)>, SpoolError> {
        let cf = cf(&self.db, CF_TALLIES);
        let mut out = Vec::new();
        for item in self.db.iterator_cf(cf, IteratorMode::Start) {
            let (k, v) = item?;
            let corrupt = |reason: String| SpoolError::Corrupt {
                key: format!("tally {k:?}"),
                reason,
            };
            let seq = seq_key(&k, "tally")?;
            out.push((seq, Tally::decode(&v).map_err(|e| corrupt(e.to_string()))?));
        }
        Ok(out)
    }

    /// The job of `campaign` sent to `address`, for a campaign that is not personalised.
    /// Addresses are recorded and looked up in lower case (A-label domains). Blocking.
    pub fn find_recipient(
        &self,
        campaign: u32,
        address: &str,
    ) -> Result<Option<JobId>, SpoolError> {
        let cf = cf(&self.db, CF_META);
        let found = self.db.get_cf(cf, recipient_key(campaign, address))?;
        Ok(found
            .and_then(|v| <[u8; 4]>::try_from(&v[..]).ok())
            .map(|b| JobId {
                campaign,
                index: u32::from_be_bytes(b),
            }))
    }

    /// Counts the records of one column family (`CF_*`). Blocking; a full scan, for tests and
    /// diagnostics.
    pub fn count_keys(&self, cf: &str) -> Result<usize, SpoolError> {
        let handle = self
            .db
            .cf_handle(cf)
            .ok_or_else(|| SpoolError::Rocks(format!("no column family {cf:?}")))?;
        let mut n = 0;
        for item in self.db.iterator_cf(handle, IteratorMode::Start) {
            item?;
            n += 1;
        }
        Ok(n)
    }

    /// Counts the records of several column families in one snapshot, so a record that moves
    /// from one to another meanwhile is counted once. Blocking; full scans, for tests and
    /// diagnostics.
    pub fn count_keys_together(&self, cfs: &[&str]) -> Result<Vec<usize>, SpoolError> {
        let snapshot = self.db.snapshot();
        cfs.iter()
            .map(|cf| {
                let handle = self
                    .db
                    .cf_handle(cf)
                    .ok_or_else(|| SpoolError::Rocks(format!("no column family {cf:?}")))?;
                let mut n = 0;
                for item in snapshot.iterator_cf(handle, IteratorMode::Start) {
                    item?;
                    n += 1;
                }
                Ok(n)
            })
            .collect()
    }

    /// Watches the last event sequence written.
    pub fn events_written(&self) -> watch::Receiver<u64> {
        self.events_written.clone()
    }

    /// Gauges the writer raises by the events it writes per receiver; set once at start.
    pub fn set_event_gauges(&self, gauges: std::collections::HashMap<u32, prometheus::IntGauge>) {
        let _ = self.event_gauges.set(gauges);
    }

    /// Up to `max` outbox events of receiver `hook` after sequence `after`, in order. Blocking.
    pub fn scan_events(
        &self,
        hook: u32,
        after: u64,
        max: usize,
    ) -> Result<Vec<(u64, Vec<u8>)>, SpoolError> {
        let cf = cf(&self.db, CF_EVENTS);
        let start = event_key(after.saturating_add(1), 0);
        let mut out = Vec::new();
        for item in self
            .db
            .iterator_cf(cf, IteratorMode::From(&start, rocksdb::Direction::Forward))
        {
            let (k, v) = item?;
            if let Some((seq, h)) = split_event_key(&k)
                && h == hook
            {
                out.push((seq, v.into_vec()));
                if out.len() >= max {
                    break;
                }
            }
        }
        Ok(out)
    }

    /// In one scan of the outbox: deletes the events of receivers not in `keep` (removed from
    /// the config) and counts the others per receiver. Blocking; done once at start. Returns how
    /// many were deleted and the counts.
    pub fn prune_events(
        &self,
        keep: &HashSet<u32>,
    ) -> Result<(u64, std::collections::HashMap<u32, u64>), SpoolError> {
        let cf = cf(&self.db, CF_EVENTS);
        let mut batch = WriteBatch::default();
        let mut dropped = 0;
        let mut counts = std::collections::HashMap::new();
        for item in self.db.iterator_cf(cf, IteratorMode::Start) {
            let (k, _) = item?;
            match split_event_key(&k) {
                Some((_, h)) if keep.contains(&h) => *counts.entry(h).or_default() += 1,
                _ => {
                    batch.delete_cf(cf, &k);
                    dropped += 1;
                }
            }
        }
        if dropped > 0 {
            self.db.write(batch)?;
        }
        Ok((dropped, counts))
    }

    /// Reads one suppression record. Blocking.
    pub fn get_suppression(&self, key: &[u8]) -> Result<Option<Vec<u8>>, SpoolError> {
        let cf = cf(&self.db, CF_SUPPRESSIONS);
        Ok(self.db.get_cf(cf, key)?)
    }

    /// Suppression records in key order, starting after `after` (exclusive; `None`: from the
    /// first), visiting each until `visit` returns false. Blocking.
    pub fn scan_suppressions(
        &self,
        after: Option<&[u8]>,
        mut visit: impl FnMut(&[u8], &[u8]) -> bool,
    ) -> Result<(), SpoolError> {
        let cf = cf(&self.db, CF_SUPPRESSIONS);
        let mode = match after {
            Some(k) => IteratorMode::From(k, rocksdb::Direction::Forward),
            None => IteratorMode::Start,
        };
        for item in self.db.iterator_cf(cf, mode) {
            let (k, v) = item?;
            if after.is_some_and(|a| a == &k[..]) {
                continue;
            }
            if !visit(&k, &v) {
                break;
            }
        }
        Ok(())
    }

    /// Reads every campaign record: `(sequence, encoded record)` in sequence order. Blocking.
    pub fn load_campaigns(&self) -> Result<Vec<(u32, Vec<u8>)>, SpoolError> {
        let cf = cf(&self.db, CF_CAMPAIGNS);
        let mut campaigns = Vec::new();
        for item in self.db.iterator_cf(cf, IteratorMode::Start) {
            let (k, v) = item?;
            let seq = seq_key(&k, "campaign")?;
            campaigns.push((seq, v.into_vec()));
        }

        Ok(campaigns)
    }

    /// The archived campaign with public id `id`: its sequence and stored bytes. Blocking.
    pub fn get_archived(&self, id: &[u8; 16]) -> Result<Option<(u32, Vec<u8>)>, SpoolError> {
        let Some(seq) = self.db.get_cf(cf(&self.db, CF_META), archived_key(id))? else {
            return Ok(None);
        };
        let seq = <[u8; 4]>::try_from(&seq[..]).map_err(|_| SpoolError::Corrupt {
            key: "archived campaign index".into(),
            reason: "value is not 4 bytes".into(),
        })?;
        let found = self.db.get_cf(cf(&self.db, CF_ARCHIVE), seq)?;
        Ok(found.map(|v| (u32::from_be_bytes(seq), v)))
    }

    /// Up to `limit` archived campaigns with sequences below `before` (all when `None`), newest
    /// first. Blocking.
    pub fn archived_page(
        &self,
        before: Option<u32>,
        limit: usize,
    ) -> Result<Vec<(u32, Vec<u8>)>, SpoolError> {
        let mut iter = self.db.raw_iterator_cf(cf(&self.db, CF_ARCHIVE));
        match before {
            Some(0) => return Ok(Vec::new()),
            Some(b) => iter.seek_for_prev((b - 1).to_be_bytes()),
            None => iter.seek_to_last(),
        }
        let mut out = Vec::new();
        while out.len() < limit {
            let (Some(k), Some(v)) = (iter.key(), iter.value()) else {
                break;
            };
            out.push((seq_key(k, "archive")?, v.to_vec()));
            iter.prev();
        }
        iter.status()?;
        Ok(out)
    }

    /// Up to `limit` kept inbound messages with keys below `before` (all when `None`), newest
    /// first, as (key, value). Blocking.
    pub fn inbound_page(
        &self,
        before: Option<&[u8]>,
        limit: usize,
    ) -> Result<Vec<KeyValue>, SpoolError> {
        let mut iter = self.db.raw_iterator_cf(cf(&self.db, CF_INBOUND));
        match before {
            Some(b) => {
                iter.seek_for_prev(b);
                if iter.key() == Some(b) {
                    iter.prev();
                }
            }
            None => iter.seek_to_last(),
        }
        let mut out = Vec::new();
        while out.len() < limit {
            let (Some(k), Some(v)) = (iter.key(), iter.value()) else {
                break;
            };
            out.push((k.to_vec(), v.to_vec()));
            iter.prev();
        }
        iter.status()?;
        Ok(out)
    }

    /// The keys of kept inbound messages, oldest first. Blocking.
    pub fn inbound_keys(&self) -> Result<Vec<Vec<u8>>, SpoolError> {
        let mut iter = self.db.raw_iterator_cf(cf(&self.db, CF_INBOUND));
        iter.seek_to_first();
        let mut out = Vec::new();
        while let Some(k) = iter.key() {
            out.push(k.to_vec());
            iter.next();
        }
        iter.status()?;
        Ok(out)
    }

    pub fn get_inbound(&self, key: &[u8]) -> Result<Option<Vec<u8>>, SpoolError> {
        Ok(self.db.get_cf(cf(&self.db, CF_INBOUND), key)?)
    }

    /// How many campaigns are archived, and the highest sequence among them (0 when none), so
    /// a new campaign never reuses an archived one's number. Two point reads. Blocking.
    pub fn archive_summary(&self) -> Result<(u64, u32), SpoolError> {
        let count = self
            .db
            .get_cf(cf(&self.db, CF_META), META_ARCHIVED_COUNT)?
            .and_then(|v| <[u8; 8]>::try_from(&v[..]).ok())
            .map_or(0, u64::from_be_bytes);
        let mut iter = self.db.raw_iterator_cf(cf(&self.db, CF_ARCHIVE));
        iter.seek_to_last();
        let highest = iter
            .key()
            .and_then(|k| <[u8; 4]>::try_from(k).ok())
            .map_or(0, u32::from_be_bytes);
        iter.status()?;
        Ok((count, highest))
    }

    /// Reads several live job records at once (`None` for a job that is final or gone).
    /// Blocking with [`Reach::Disk`].
    pub fn get_jobs(
        &self,
        ids: &[JobId],
        reach: Reach,
    ) -> Result<Vec<Option<Vec<u8>>>, SpoolError> {
        self.multi_get(CF_JOBS, ids, reach)
    }

    /// Brings the records after job `after` into the block cache, up to [`JOB_READ_AHEAD`] of
    /// them and not past its campaign, by stepping an iterator over them. Blocking.
    ///
    /// Delivery calls it after a read that needed the disk: the scheduler hands a campaign's jobs
    /// out about in order, so the batches that follow find their records in memory and are read
    /// on the delivery task. Without it, with a million jobs of one campaign queued (in table
    /// files), 28% of the lanes' batches of 8 went to the blocking pool, each costing a failed
    /// memory read, a hand-off and the wake-ups around it; with it, 3%.
    pub fn read_ahead(&self, after: JobId) -> Result<(), SpoolError> {
        let mut opts = rocksdb::ReadOptions::default();
        if let Some(next) = after.campaign.checked_add(1) {
            opts.set_iterate_upper_bound(
                JobId {
                    campaign: next,
                    index: 0,
                }
                .key(),
            );
        }
        let mut it = self.db.raw_iterator_cf_opt(cf(&self.db, CF_JOBS), opts);
        it.seek(after.key());
        for _ in 0..JOB_READ_AHEAD {
            if !it.valid() {
                break;
            }
            it.next();
        }
        Ok(it.status()?)
    }

    /// Rebuilds state after a start: rolls back uncommitted uploads, migrates a version 1 spool,
    /// then hands every committed live job to `visit` in key order. Reads the live jobs only, so
    /// its time depends on what is queued, not on what was ever sent. Blocking; run it before
    /// serving.
    pub fn recover(
        &self,
        mut visit: impl FnMut(JobId, &JobRecord<'_>),
    ) -> Result<Recovered, SpoolError> {
        let meta = cf(&self.db, CF_META);
        let mut open = HashSet::new();
        let mut max_upload = 0;
        for item in self.db.prefix_iterator_cf(meta, META_UPLOAD_PREFIX) {
            let (k, _) = item?;
            if !k.starts_with(META_UPLOAD_PREFIX) {
                break;
            }
            let id = k[META_UPLOAD_PREFIX.len()..]
                .try_into()
                .map(u64::from_be_bytes)
                .map_err(|_| SpoolError::Corrupt {
                    key: format!("meta {k:?}"),
                    reason: "bad upload key".into(),
                })?;
            max_upload = max_upload.max(id);
            open.insert(id);
        }
        if self.schema()? == 1 {
            self.migrate_from_v1(&open)?;
        }

        let jobs = cf(&self.db, CF_JOBS);
        let mut rollback = WriteBatch::default();
        let mut rolled_back = 0;
        let mut iter = self.db.raw_iterator_cf(jobs);
        iter.seek_to_first();
        while let (Some(k), Some(v)) = (iter.key(), iter.value()) {
            let id = JobId::from_key(k).map_err(|e| SpoolError::Corrupt {
                key: format!("job {k:?}"),
                reason: e.to_string(),
            })?;
            let rec = JobRecord::decode(v).map_err(|e| SpoolError::Corrupt {
                key: format!("job {id}"),
                reason: e.to_string(),
            })?;
            max_upload = max_upload.max(rec.upload);
            if open.contains(&rec.upload) {
                rollback.delete_cf(jobs, k);
                rolled_back += 1;
            } else if rec.state.is_final() {
                // Written by this build only as tombstones; a final job here is corrupt data.
                return Err(SpoolError::Corrupt {
                    key: format!("job {id}"),
                    reason: format!("a {:?} job among the live jobs", rec.state),
                });
            } else {
                visit(id, &rec);
            }
            iter.next();
        }
        iter.status()?;
        for id in &open {
            rollback.delete_cf(meta, upload_key(*id));
        }
        if !rollback.is_empty() {
            let mut sync = WriteOptions::default();
            sync.set_sync(true);
            self.db.write_opt(rollback, &sync)?;
        }
        Ok(Recovered {
            max_upload,
            rolled_back,
        })
    }

    fn schema(&self) -> Result<u32, SpoolError> {
        let meta = cf(&self.db, CF_META);
        Ok(self
            .db
            .get_cf(meta, META_SCHEMA)?
            .and_then(|v| <[u8; 4]>::try_from(&v[..]).ok())
            .map_or(SCHEMA_VERSION, u32::from_be_bytes))
    }

    /// Version 1 to 2: final jobs move to their tombstones and are tallied, and every campaign's
    /// next free index is tallied. Each synced batch moves what it tallies, so a crash part way
    /// leaves nothing counted twice: the next start carries on with what is left. Jobs of
    /// uploads still open are left for the rollback.
    fn migrate_from_v1(&self, open: &HashSet<u64>) -> Result<(), SpoolError> {
        let started = Instant::now();
        let cf = |name| cf(&self.db, name);
        let (jobs, finals, tallies, meta) =
            (cf(CF_JOBS), cf(CF_FINALS), cf(CF_TALLIES), cf(CF_META));
        let mut sync = WriteOptions::default();
        sync.set_sync(true);
        let mut batch = WriteBatch::default();
        let mut pending: std::collections::HashMap<u32, Tally> = Default::default();
        let mut moved = 0u64;
        let flush = |batch: &mut WriteBatch,
                     pending: &mut std::collections::HashMap<u32, Tally>|
         -> Result<(), SpoolError> {
            for (seq, t) in pending.drain() {
                batch.merge_cf(tallies, seq.to_be_bytes(), t.encode());
            }
            self.db.write_opt(std::mem::take(batch), &sync)?;
            Ok(())
        };
        let mut iter = self.db.raw_iterator_cf(jobs);
        iter.seek_to_first();
        while let (Some(k), Some(v)) = (iter.key(), iter.value()) {
            let id = JobId::from_key(k).map_err(|e| SpoolError::Corrupt {
                key: format!("job {k:?}"),
                reason: e.to_string(),
            })?;
            let rec = JobRecord::decode(v).map_err(|e| SpoolError::Corrupt {
                key: format!("job {id}"),
                reason: e.to_string(),
            })?;
            if !open.contains(&rec.upload) {
                let t = pending.entry(id.campaign).or_default();
                t.next_index = t.next_index.max(id.index.saturating_add(1));
                if rec.state.is_final() {
                    t.merge(&Tally::moved(JobState::Queued, rec.state));
                    batch.delete_cf(jobs, k);
                    let stone = rec.tombstone();
                    batch.put_cf(finals, k, stone.encode());
                    moved += 1;
                }
            }
            if batch.len() >= 10_000 {
                flush(&mut batch, &mut pending)?;
            }
            iter.next();
        }
        iter.status()?;
        batch.put_cf(meta, META_SCHEMA, SCHEMA_VERSION.to_be_bytes());
        flush(&mut batch, &mut pending)?;
        tracing::info!(
            moved,
            seconds = started.elapsed().as_secs_f64(),
            "spool migrated from schema 1: final jobs moved to tombstones"
        );
        Ok(())
    }

    /// Stops the writer once it has applied everything queued before this call, and syncs the
    /// WAL. Later writes fail with [`SpoolError::Closed`].
    pub async fn close(&self) -> Result<(), SpoolError> {
        let (tx, rx) = oneshot::channel();
        if self.writer.send(WriterMsg::Close(tx)).await.is_ok() {
            let _ = rx.await;
        }
        let handle = self.thread.lock().map_err(|_| SpoolError::Closed)?.take();
        if let Some(handle) = handle {
            let _ = tokio::task::spawn_blocking(move || handle.join()).await;
        }
        Ok(())
    }
}

fn cf_options(name: &str) -> Options {
    let mut o = Options::default();
    match name {
        CF_JOBS => {
            // Jobs are written in bulk at ingest and then updated a few times: large memtables
            // keep L0 flushes rare during a million-recipient upload.
            o.set_write_buffer_size(64 << 20);
            o.set_max_write_buffer_number(3);
            o.set_compression_type(rocksdb::DBCompressionType::Lz4);
            o.set_level_compaction_dynamic_level_bytes(true);
            // Every job is deleted here when it becomes final. A file that is mostly deletions
            // is compacted soon, so recovery's scan of the live jobs does not wade through
            // the markers of everything sent.
            o.add_compact_on_deletion_collector_factory(4096, 2048, 0.5);
        }
        CF_FINALS | CF_MESSAGES | CF_HISTORY => {
            o.set_write_buffer_size(32 << 20);
            o.set_compression_type(rocksdb::DBCompressionType::Lz4);
            o.set_level_compaction_dynamic_level_bytes(true);
        }
        CF_TALLIES => {
            o.set_write_buffer_size(8 << 20);
            // Archiving deletes a campaign's tally; recovery reads this column family whole.
            o.add_compact_on_deletion_collector_factory(1024, 256, 0.5);
            o.set_merge_operator_associative("tally", |_key, existing, operands| {
                let (merged, skipped) = codec::merge_tallies(existing, operands);
                if skipped > 0 {
                    tracing::error!(skipped, "corrupt tally operands were skipped");
                }
                Some(merged)
            });
        }
        CF_META => {
            o.set_write_buffer_size(8 << 20);
            // Counters written with [`SpoolBatch::merge_state`]; nothing else in `meta` is merged.
            o.set_merge_operator_associative("sum", |_key, existing, operands| {
                Some(codec::merge_sum(existing, operands))
            });
        }
        CF_CAMPAIGNS => {
            o.set_write_buffer_size(8 << 20);
            // As for tallies: recovery reads it whole, archiving deletes from it.
            o.add_compact_on_deletion_collector_factory(1024, 256, 0.5);
        }
        _ => {
            o.set_write_buffer_size(8 << 20);
        }
    }
    o
}

fn check_schema(db: &DB) -> Result<(), SpoolError> {
    let meta = cf(db, CF_META);
    match db.get_cf(meta, META_SCHEMA)? {
        None => {
            let mut sync = WriteOptions::default();
            sync.set_sync(true);
            db.put_cf_opt(meta, META_SCHEMA, SCHEMA_VERSION.to_be_bytes(), &sync)?;
            Ok(())
        }
        Some(v) => {
            let found = <[u8; 4]>::try_from(&v[..])
                .map(u32::from_be_bytes)
                .unwrap_or(u32::MAX);
            // Version 1 is migrated by recovery.
            if found == SCHEMA_VERSION || found == 1 {
                Ok(())
            } else {
                Err(SpoolError::Schema { found })
            }
        }
    }
}

/// The writer thread's side of the event outbox.
struct Outbox {
    next: u64,
    written: watch::Sender<u64>,
    gauges: Arc<std::sync::OnceLock<std::collections::HashMap<u32, prometheus::IntGauge>>>,
}

impl Outbox {
    /// Numbers the request's events into its batch; returns the events per receiver.
    fn stage(&mut self, db: &DB, batch: &mut WriteBatch, events: Vec<StagedEvent>) -> Vec<u32> {
        let cf = cf(db, CF_EVENTS);
        let mut hooks = Vec::new();
        for e in events {
            let seq = self.next;
            self.next += 1;
            for h in e.hooks {
                batch.put_cf(cf, event_key(seq, h), &e.json);
                hooks.push(h);
            }
        }
        hooks
    }

    fn written(&self, hooks: &[u32]) {
        if let Some(g) = self.gauges.get() {
            for h in hooks {
                if let Some(g) = g.get(h) {
                    g.inc();
                }
            }
        }
        self.written.send_replace(self.next - 1);
    }
}

/// The writer thread: takes every request queued, writes each batch, syncs the WAL once for all
/// those that asked for it, then answers them (group commit). A sync costs the same for one
/// request as for many, so when the last group synced for several (writers are committing
/// concurrently, as SMTP sessions and API clients do under load) and a synced write arrives, the
/// thread first waits the commit window for the others: fewer, larger syncs, for that much
/// latency. A lone writer is never kept waiting.
fn writer_loop(
    db: &DB,
    mut rx: mpsc::Receiver<WriterMsg>,
    mut outbox: Outbox,
    commit_window: &std::sync::atomic::AtomicU64,
) {
    let no_sync = WriteOptions::default();
    let mut group = Vec::with_capacity(MAX_GROUP);
    let mut closing = None;
    let mut concurrent = false;
    while closing.is_none() {
        match rx.blocking_recv() {
            Some(WriterMsg::Write(req)) => group.push(req),
            Some(WriterMsg::Close(done)) => closing = Some(done),
            None => break,
        }
        let window = commit_window.load(std::sync::atomic::Ordering::Relaxed);
        if concurrent
            && window > 0
            && group
                .first()
                .is_some_and(|r| r.durability == Durability::Sync)
        {
            std::thread::sleep(std::time::Duration::from_micros(window));
        }
        while group.len() < MAX_GROUP && closing.is_none() {
            match rx.try_recv() {
                Ok(WriterMsg::Write(req)) => group.push(req),
                Ok(WriterMsg::Close(done)) => closing = Some(done),
                Err(_) => break,
            }
        }
        if group.is_empty() {
            continue;
        }
        GROUP_SIZE.observe(group.len() as f64);
        concurrent = group
            .iter()
            .filter(|r| r.durability == Durability::Sync)
            .nth(1)
            .is_some();
        let started = Instant::now();
        let mut results: Vec<Result<(), SpoolError>> = Vec::with_capacity(group.len());
        let mut need_sync = false;
        let mut events_to = Vec::new();
        let mut wrote_events = false;
        for req in group.iter_mut() {
            let mut batch = std::mem::take(&mut req.batch);
            let hooks = if req.events.is_empty() {
                Vec::new()
            } else {
                outbox.stage(db, &mut batch, std::mem::take(&mut req.events))
            };
            let r = db.write_opt(batch, &no_sync).map_err(SpoolError::from);
            need_sync |= r.is_ok() && req.durability == Durability::Sync;
            if r.is_ok() && !hooks.is_empty() {
                events_to.extend(hooks);
                wrote_events = true;
            }
            results.push(r);
        }
        if wrote_events {
            outbox.written(&events_to);
        }
        WRITE_SECONDS.observe(started.elapsed().as_secs_f64());
        let sync_result = if need_sync {
            let started = Instant::now();
            let r = db.flush_wal(true).map_err(SpoolError::from);
            SYNC_SECONDS.observe(started.elapsed().as_secs_f64());
            r
        } else {
            Ok(())
        };
        for (req, r) in group.drain(..).zip(results) {
            let r = match (r, req.durability, &sync_result) {
                (Ok(()), Durability::Sync, Err(e)) => Err(e.clone()),
                (r, _, _) => r,
            };
            let _ = req.done.send(r);
        }
    }
    rx.close();
    let _ = db.flush_wal(true);
    // A clean stop leaves nothing to replay: the next start reads no WAL.
    for name in ALL_CFS {
        if let Err(e) = db.flush_cf(cf(db, name)) {
            tracing::warn!(cf = name, error = %e, "flushing at close failed; the next start replays the WAL");
        }
    }
    if let Some(done) = closing {
        let _ = done.send(());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job(campaign: u32, index: u32) -> JobId {
        JobId { campaign, index }
    }

    fn record(state: JobState, upload: u64, address: &str) -> Vec<u8> {
        JobRecord {
            state,
            upload,
            accepted_at_ms: 1_000,
            attempts: u32::from(state.is_final()),
            next_attempt_ms: 2_000,
            address,
            vars: r#"{"name":"Ada"}"#,
            last_response: "250 ok",
        }
        .encode()
    }

    fn recovered(spool: &Spool) -> Vec<JobId> {
        let mut live = Vec::new();
        spool
            .recover(|id, rec| {
                assert_eq!(rec.state, JobState::Queued);
                live.push(id);
            })
            .unwrap();
        live
    }

    #[tokio::test]
    async fn a_memory_read_of_many_keys_answers_as_the_disk_does() {
        let dir = tempfile::tempdir().unwrap();
        let address = |i: u32| format!("r{i}@example.org");
        {
            let spool = Spool::open(dir.path()).unwrap();
            let mut b = spool.batch();
            for i in (0..3_000).filter(|i| i % 7 != 3) {
                b.put_job(job(1, i), &record(JobState::Queued, 1, &address(i)));
            }
            spool.write(b, Durability::Sync).await.unwrap();
            spool.close().await.unwrap();
        }
        // Campaign 1 in a table file, its blocks cached by a disk read; campaign 2 and the
        // deletions of some of campaign 1's jobs in the memtable.
        let spool = Spool::open(dir.path()).unwrap();
        let all: Vec<JobId> = (0..3_000).map(|i| job(1, i)).collect();
        spool.get_jobs(&all, Reach::Disk).unwrap();
        let mut b = spool.batch();
        for i in 0..50 {
            b.put_job(job(2, i), &record(JobState::Queued, 1, &address(i)));
        }
        for i in (0..3_000).filter(|i| i % 11 == 5) {
            b.delete_job(job(1, i));
        }
        spool.write(b, Durability::Sync).await.unwrap();
        let batches: [Vec<JobId>; 6] = [
            (100..108).map(|i| job(1, i)).collect(),
            // Out of order, a duplicate, missing and deleted jobs, gaps, two campaigns.
            vec![
                job(1, 20),
                job(2, 3),
                job(1, 10),
                job(1, 3),
                job(1, 16),
                job(1, 10),
            ],
            vec![
                job(1, 2_999),
                job(1, 3_000),
                job(2, 49),
                job(2, 50),
                job(3, 0),
            ],
            vec![job(0, 5), job(1, 0), job(1, 1), job(1, 2), job(1, 4)],
            (0..3_000).step_by(97).map(|i| job(1, i)).collect(),
            vec![job(2, 7)],
        ];
        for ids in &batches {
            let disk = spool.get_jobs(ids, Reach::Disk).unwrap();
            assert_eq!(spool.get_jobs(ids, Reach::Memory).unwrap(), disk, "{ids:?}");
            // The scan itself answered, not the point reads behind it.
            let keys: Vec<[u8; 8]> = ids.iter().map(|id| id.key()).collect();
            let scanned = spool.scan_cached(cf(&spool.db, CF_JOBS), &keys);
            assert_eq!(scanned.unwrap(), disk, "{ids:?}");
        }
        let read = spool
            .get_jobs(
                &[job(1, 3), job(1, 12), job(1, 5), job(2, 3)],
                Reach::Memory,
            )
            .unwrap();
        let addresses: Vec<Option<String>> = read
            .iter()
            .map(|r| {
                r.as_deref()
                    .map(|b| JobRecord::decode(b).unwrap().address.to_owned())
            })
            .collect();
        assert_eq!(
            addresses,
            [None, Some(address(12)), None, Some(address(3))],
            "job 3 was never written, job 5 was deleted"
        );
        assert!(spool.get_jobs(&[], Reach::Memory).unwrap().is_empty());
    }

    #[tokio::test]
    async fn a_memory_read_finds_fresh_records_and_says_when_it_needs_the_disk() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(dir.path()).unwrap();
        let mut b = spool.batch();
        b.put_job(job(1, 0), &record(JobState::Queued, 1, "a@example.org"));
        spool.write(b, Durability::Sync).await.unwrap();
        let fresh = spool.get_jobs(&[job(1, 0)], Reach::Memory).unwrap();
        assert_eq!(fresh, spool.get_jobs(&[job(1, 0)], Reach::Disk).unwrap());
        assert!(fresh[0].is_some());
        // After a restart it is in a table file whose blocks were never read: only the disk
        // has it.
        spool.close().await.unwrap();
        drop(spool);
        let spool = Spool::open(dir.path()).unwrap();
        assert!(matches!(
            spool.get_jobs(&[job(1, 0)], Reach::Memory),
            Err(SpoolError::NotInMemory)
        ));
        assert_eq!(spool.get_jobs(&[job(1, 0)], Reach::Disk).unwrap(), fresh);
    }

    #[tokio::test]
    async fn reading_ahead_brings_the_campaigns_next_records_into_memory() {
        let dir = tempfile::tempdir().unwrap();
        let long = 4 * JOB_READ_AHEAD as u32;
        // Campaigns 1 and 3 have more records than a read ahead takes, 2 fewer.
        let sizes = [(1, long), (2, 100), (3, long)];
        let address = |i: u32| format!("recipient-{i}@example.org");
        {
            let spool = Spool::open(dir.path()).unwrap();
            let mut b = spool.batch();
            for (c, n) in sizes {
                for i in 0..n {
                    b.put_job(job(c, i), &record(JobState::Queued, 1, &address(i)));
                }
            }
            spool.write(b, Durability::Sync).await.unwrap();
            spool.close().await.unwrap();
        }
        // Reopened: everything is in a table file none of whose blocks was read.
        let spool = Spool::open(dir.path()).unwrap();
        let range = |c: u32, from: u32, to: u32| (from..to).map(|i| job(c, i)).collect::<Vec<_>>();
        let cold = |ids: &[JobId]| {
            assert!(
                matches!(
                    spool.get_jobs(ids, Reach::Memory),
                    Err(SpoolError::NotInMemory)
                ),
                "{ids:?}"
            )
        };
        let next = range(1, 8, JOB_READ_AHEAD as u32);
        let rest = range(2, 8, 100);
        let far = [job(1, long - 1)];
        let beyond = [job(3, 300)];
        for ids in [
            &range(1, 0, 8)[..],
            &next,
            &range(2, 0, 8),
            &rest,
            &far,
            &beyond,
        ] {
            cold(ids);
        }
        for c in [1, 2] {
            let read = spool.get_jobs(&range(c, 0, 8), Reach::Disk).unwrap();
            assert!(read.iter().all(Option::is_some));
            spool.read_ahead(job(c, 7)).unwrap();
        }
        // The records after those read are now in memory, and read as the disk has them.
        for ids in [&next, &rest] {
            let warm = spool.get_jobs(ids, Reach::Memory).unwrap();
            assert_eq!(warm, spool.get_jobs(ids, Reach::Disk).unwrap());
            assert_eq!(
                JobRecord::decode(warm[0].as_deref().unwrap())
                    .unwrap()
                    .address,
                address(8)
            );
        }
        // Not past the read ahead's length, nor past the end of a campaign.
        cold(&far);
        cold(&beyond);
    }

    #[tokio::test]
    async fn final_jobs_leave_the_live_jobs_and_are_tallied() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(dir.path()).unwrap();
        let mut b = spool.batch();
        for i in 0..3 {
            b.put_job(job(1, i), &record(JobState::Queued, 1, "a@example.org"));
        }
        b.tally(
            1,
            &Tally {
                next_index: 3,
                ..Tally::default()
            },
        );
        spool.write(b, Durability::Sync).await.unwrap();

        let delivered = record(JobState::Delivered, 1, "a@example.org");
        let stone = JobRecord {
            next_attempt_ms: 5_000,
            ..JobRecord::decode(&delivered).unwrap()
        }
        .tombstone()
        .encode();
        let mut b = spool.batch();
        b.finish_job(job(1, 1), &stone);
        b.tally(1, &Tally::moved(JobState::Queued, JobState::Delivered));
        spool.write(b, Durability::Sync).await.unwrap();

        assert_eq!(recovered(&spool), vec![job(1, 0), job(1, 2)]);
        let got = spool.get_job(job(1, 1)).unwrap().unwrap();
        let got = JobRecord::decode(&got).unwrap();
        assert_eq!(
            (got.state, got.vars, got.next_attempt_ms),
            (JobState::Delivered, "", 5_000)
        );
        assert_eq!(
            spool.get_jobs(&[job(1, 1)], Reach::Disk).unwrap(),
            vec![None]
        );
        let tallies = spool.load_tallies().unwrap();
        assert_eq!(tallies.len(), 1);
        assert_eq!(tallies[0].1.count(JobState::Delivered), 1);
        assert_eq!(tallies[0].1.next_index, 3);
        spool.close().await.unwrap();
    }

    #[tokio::test]
    async fn a_version_1_spool_is_migrated_once() {
        let dir = tempfile::tempdir().unwrap();
        {
            let spool = Spool::open(dir.path()).unwrap();
            let mut b = spool.batch();
            b.put_job(job(1, 0), &record(JobState::Queued, 1, "a@example.org"));
            b.put_job(job(1, 1), &record(JobState::Delivered, 1, "b@example.org"));
            b.put_job(job(1, 4), &record(JobState::Bounced, 1, "c@example.org"));
            b.put_job(job(2, 0), &record(JobState::Suppressed, 2, "d@example.org"));
            // An upload that never committed: rolled back, not migrated.
            b.open_upload(3, 2);
            b.put_job(job(2, 7), &record(JobState::Suppressed, 3, "e@example.org"));
            spool.write(b, Durability::Sync).await.unwrap();
            let meta = spool.db.cf_handle(CF_META).unwrap();
            spool
                .db
                .put_cf(meta, META_SCHEMA, 1u32.to_be_bytes())
                .unwrap();
            spool.close().await.unwrap();
        }
        let spool = Spool::open(dir.path()).unwrap();
        assert_eq!(spool.schema().unwrap(), 1);
        assert_eq!(recovered(&spool), vec![job(1, 0)]);
        assert_eq!(spool.schema().unwrap(), SCHEMA_VERSION);
        let stone = spool.get_job(job(1, 4)).unwrap().unwrap();
        let stone = JobRecord::decode(&stone).unwrap();
        assert_eq!((stone.state, stone.vars), (JobState::Bounced, ""));
        assert_eq!(spool.get_job(job(2, 7)).unwrap(), None);
        let tallies: std::collections::HashMap<u32, Tally> =
            spool.load_tallies().unwrap().into_iter().collect();
        assert_eq!(tallies[&1].count(JobState::Delivered), 1);
        assert_eq!(tallies[&1].count(JobState::Bounced), 1);
        assert_eq!(tallies[&1].next_index, 5);
        assert_eq!(tallies[&2].count(JobState::Suppressed), 1);
        assert_eq!(tallies[&2].next_index, 1);
        // A second start finds nothing left to migrate and counts nothing twice.
        assert_eq!(recovered(&spool), vec![job(1, 0)]);
        let again: std::collections::HashMap<u32, Tally> =
            spool.load_tallies().unwrap().into_iter().collect();
        assert_eq!(again, tallies);
        spool.close().await.unwrap();
    }

    #[tokio::test]
    async fn archived_campaigns_leave_what_recovery_reads_and_page_newest_first() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(dir.path()).unwrap();
        let mut b = spool.batch();
        for seq in 1..=4u32 {
            b.put_campaign(seq, format!("record {seq}").as_bytes());
            b.tally(seq, &Tally::moved(JobState::Queued, JobState::Delivered));
        }
        spool.write(b, Durability::Sync).await.unwrap();
        assert_eq!(spool.archive_summary().unwrap(), (0, 0));
        for (n, seq) in [1u32, 2, 3].into_iter().enumerate() {
            let mut b = spool.batch();
            let id = [seq as u8; 16];
            b.archive_campaign(seq, &id, format!("archived {seq}").as_bytes(), n as u64 + 1);
            spool.write(b, Durability::Sync).await.unwrap();
        }
        let live: Vec<u32> = spool
            .load_campaigns()
            .unwrap()
            .iter()
            .map(|c| c.0)
            .collect();
        assert_eq!(live, [4]);
        let tallied: Vec<u32> = spool.load_tallies().unwrap().iter().map(|t| t.0).collect();
        assert_eq!(tallied, [4]);
        assert_eq!(spool.archive_summary().unwrap(), (3, 3));
        assert_eq!(
            spool.get_archived(&[2; 16]).unwrap(),
            Some((2, b"archived 2".to_vec()))
        );
        assert_eq!(spool.get_archived(&[4; 16]).unwrap(), None);
        let seqs = |page: Vec<(u32, Vec<u8>)>| page.into_iter().map(|p| p.0).collect::<Vec<_>>();
        assert_eq!(seqs(spool.archived_page(None, 10).unwrap()), [3, 2, 1]);
        assert_eq!(seqs(spool.archived_page(None, 2).unwrap()), [3, 2]);
        assert_eq!(seqs(spool.archived_page(Some(3), 10).unwrap()), [2, 1]);
        assert_eq!(
            seqs(spool.archived_page(Some(1), 10).unwrap()),
            Vec::<u32>::new()
        );
        spool.close().await.unwrap();
    }
}
