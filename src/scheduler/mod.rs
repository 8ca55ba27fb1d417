//! The scheduler: which pending job is taken when. Owns the pending-job index, the jobs parked
//! for paused campaigns, the set of suspended domains, and the wake-up of the delivery engine.
//!
//! Everything here sits behind one `std::sync::Mutex` that no other module sees: callers use the
//! methods below, each of which takes the lock, does a bounded amount of work, and lets go. No
//! I/O, no `.await` with the lock held, and no call out of this module while it is held.
//!
//! # Invariants
//!
//! * **Where a job is.** A queued job is in exactly one place: pending in the index (scheduled by
//!   its due time), *held* (taken out by [`Scheduler::pop_due`] for an attempt, staged by an
//!   upload that has not committed yet, or waiting in its campaign's `max_rate` hold: the index
//!   counts these per domain as pins), or parked here for its paused campaign (also a pin). It leaves the scheduler only through
//!   [`Scheduler::release`] (final state), and comes back through [`Scheduler::requeue`].
//!   A domain with pins is never evicted, so a held job's `DomainId` stays valid.
//! * **Who serves a domain.** A domain handed out by [`Scheduler::take_due_domains`] is *active*:
//!   it is not handed out again until the engine gives it back with [`Scheduler::deactivate`],
//!   so exactly one site serves it at a time. A suspended domain keeps its jobs but is never
//!   handed out, and [`Scheduler::pop_due`] returns nothing for it.
//! * **Parked jobs.** A job of a paused campaign met by delivery is parked under the same lock as
//!   the campaign-state check ([`Scheduler::park`]), and [`Scheduler::unpark_campaign`] moves
//!   them back after the new state is set, so a resume can never miss one.
//! * **Bounded holds.** An upload's jobs (possibly millions) enter the index in slices of
//!   [`ENQUEUE_SLICE`], the lock released and the task yielding between slices, so delivery lanes
//!   keep taking jobs while a large upload is indexed.
//! * **Lock order.** This lock is a leaf: it may be taken while a caller holds its own lock (a
//!   site's, in delivery), never the other way round.
//!
//! * **Order.** Which of a domain's due jobs goes next is [`fair`]'s: priority classes with a
//!   guaranteed share for lower ones, then weighted fair queuing across campaigns. A campaign's
//!   parameters are set ([`Scheduler::set_params`]) before its first job is queued.
//!
//! Memory and the cost of each operation are those of [`index::QueueIndex`].

pub mod fair;
pub mod index;
mod pending;
pub mod rate;

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Mutex, MutexGuard};

use crate::store::spool::JobId;
use index::{CampaignParams, CampaignView, DomainId, PendingJob, QueueIndex};

/// Jobs of an upload put into the index per lock hold.
pub const ENQUEUE_SLICE: usize = 4096;

#[derive(Default)]
struct State {
    index: QueueIndex,
    /// Jobs of paused campaigns met by the delivery engine, by campaign sequence, until resume.
    parked: HashMap<u32, Vec<PendingJob>>,
    /// Domains an operator suspended (runtime only: a restart resumes them).
    suspended: HashSet<String>,
}

/// See the module documentation.
#[derive(Default)]
pub struct Scheduler {
    state: Mutex<State>,
    wake: tokio::sync::Notify,
}

/// A domain's line in [`Scheduler::summaries`].
#[derive(Debug, Clone)]
pub struct DomainSummary {
    pub name: String,
    /// Jobs pending in the index.
    pub pending: u64,
    /// Jobs taken out (being delivered, parked for a paused campaign, staged by an upload).
    pub held: u64,
    /// Suspended by an operator.
    pub suspended: bool,
    pub next_due_ms: Option<u64>,
    /// The pending job accepted first.
    pub oldest: Option<JobId>,
    /// Pending jobs per priority, highest first.
    pub by_priority: Vec<(u8, usize)>,
}

/// What [`Scheduler::set_suspended`] found.
#[derive(Debug, Clone, Copy)]
pub struct SuspendResult {
    /// Whether the domain has (or had recently) a queue.
    pub known: bool,
    /// Jobs pending for it.
    pub queued: usize,
}

impl Scheduler {
    pub fn new() -> Scheduler {
        Scheduler::default()
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().expect("scheduler lock")
    }

    /// Replaces the index with one rebuilt by recovery.
    pub fn install(&self, index: QueueIndex) {
        self.lock().index = index;
        self.wake.notify_one();
    }

    /// Runs `f` on the index and wakes the engine if it made something due sooner than
    /// anything was before (a domain given back with a short wait, a job requeued), so the
    /// coordinator never sleeps past it.
    fn with_index<R>(&self, f: impl FnOnce(&mut QueueIndex) -> R) -> R {
        let mut g = self.lock();
        let before = g.index.next_wake();
        let r = f(&mut g.index);
        let after = g.index.next_wake();
        drop(g);
        if after.is_some_and(|a| before.is_none_or(|b| a < b)) {
            self.wake();
        }
        r
    }

    // ---- campaigns ----

    /// Registers a campaign's priority, weight and rate limit before its jobs are queued.
    pub fn set_params(&self, campaign: u32, params: CampaignParams) {
        self.with_index(|i| i.set_params(campaign, params));
    }

    /// A cancelled campaign: its jobs become due at once, held ones included, so delivery ends
    /// them now rather than at their scheduled time.
    pub fn expedite(&self, campaign: u32) {
        self.with_index(|i| i.expedite(campaign, crate::now_ms()));
    }

    /// Forgets a campaign's parameters (it was archived).
    pub fn forget(&self, campaign: u32) {
        self.with_index(|i| i.set_params(campaign, CampaignParams::default()));
    }

    /// What the queue holds of a campaign now. O(domains).
    pub fn campaign_view(&self, campaign: u32) -> CampaignView {
        self.lock().index.campaign_view(campaign, crate::now_ms())
    }

    /// Jobs waiting for their campaign's `max_rate`.
    pub fn rate_held(&self) -> usize {
        self.lock().index.rate_held()
    }

    /// Wakes the delivery engine's coordinator (new work may be due sooner than it expects).
    fn wake(&self) {
        self.wake.notify_one();
    }

    /// Resolves once new work may be due sooner than the engine expects (jobs enqueued, a
    /// campaign or domain resumed) since the last wait.
    pub async fn woken(&self) {
        self.wake.notified().await
    }

    // ---- ingest ----

    /// Interns the domains of jobs an upload has staged and pins one job on each, so no domain
    /// id is evicted before the upload commits ([`Scheduler::enqueue_staged`]) or rolls back
    /// ([`Scheduler::unstage`]).
    pub fn stage<'a>(&self, domains: impl ExactSizeIterator<Item = &'a str>) -> Vec<DomainId> {
        let mut g = self.lock();
        let mut out = Vec::with_capacity(domains.len());
        for name in domains {
            let d = g.index.domain_id(name);
            g.index.pin(d, 1);
            out.push(d);
        }
        out
    }

    /// Makes an upload's staged jobs pending, due at `due_ms`, a slice at a time (see the
    /// module's invariants), and wakes the engine.
    pub async fn enqueue_staged(&self, campaign: u32, due_ms: u64, staged: Vec<(u32, DomainId)>) {
        let jobs = staged.into_iter().map(|(index, domain)| PendingJob {
            id: JobId { campaign, index },
            domain,
            due_ms,
        });
        self.requeue_in_slices(jobs).await;
    }

    /// Puts jobs held outside the index back, [`ENQUEUE_SLICE`] per lock hold, yielding between
    /// slices, and wakes the engine.
    async fn requeue_in_slices(&self, jobs: impl ExactSizeIterator<Item = PendingJob>) {
        let mut jobs = jobs.peekable();
        while jobs.peek().is_some() {
            self.lock()
                .index
                .push_back_many(jobs.by_ref().take(ENQUEUE_SLICE));
            self.wake();
            if jobs.peek().is_some() {
                tokio::task::yield_now().await;
            }
        }
    }

    /// Lets go of staged jobs whose upload did not commit.
    pub fn unstage(&self, domains: impl IntoIterator<Item = DomainId>) {
        let mut g = self.lock();
        for d in domains {
            g.index.release(d, 1);
        }
    }

    // ---- delivery ----

    /// Hands out up to `max` domains whose next job is due by `now_ms` (they become active),
    /// and the time the next one becomes due.
    pub fn take_due_domains(&self, now_ms: u64, max: usize) -> (Vec<DomainId>, Option<u64>) {
        self.lock().index.take_due_domains(now_ms, max)
    }

    /// The name of a domain just handed out, or `None` when an operator suspended it: it is then
    /// parked in the index (kept, never handed out) until resumed.
    pub fn claim(&self, d: DomainId) -> Option<String> {
        let mut g = self.lock();
        let name = g.index.domain_name(d);
        if g.suspended.contains(name) {
            g.index.set_parked(d, true);
            return None;
        }
        Some(name.to_owned())
    }

    /// Takes up to `max` jobs of `d` due by `now_ms`, of one campaign chosen by priority and
    /// fair share, earliest first (none when suspended).
    pub fn pop_due(&self, d: DomainId, now_ms: u64, max: usize) -> Vec<PendingJob> {
        let mut g = self.lock();
        if g.index.is_parked(d) {
            return Vec::new();
        }
        g.index.pop_due(d, now_ms, max)
    }

    /// Takes up to `max` jobs of `d` and `campaign` due by `now_ms` (more recipients for one
    /// message; none when suspended).
    pub fn pop_due_of(
        &self,
        d: DomainId,
        campaign: u32,
        now_ms: u64,
        max: usize,
    ) -> Vec<PendingJob> {
        let mut g = self.lock();
        if g.index.is_parked(d) {
            return Vec::new();
        }
        g.index.pop_due_of(d, campaign, now_ms, max)
    }

    /// Takes up to `max` due jobs from the first of `domains` (a site's active domains, served
    /// round-robin) that has some; that domain moves to the back. Domains with nothing due are
    /// given back to the schedule and dropped from `domains`; suspended ones are dropped.
    pub fn pop_round_robin(
        &self,
        domains: &mut VecDeque<DomainId>,
        now_ms: u64,
        max: usize,
    ) -> Vec<PendingJob> {
        let mut g = self.lock();
        for _ in 0..domains.len() {
            let Some(d) = domains.pop_front() else { break };
            if g.index.is_parked(d) {
                continue;
            }
            let jobs = g.index.pop_due(d, now_ms, max);
            if jobs.is_empty() {
                g.index.deactivate(d, 0);
                continue;
            }
            domains.push_back(d);
            return jobs;
        }
        Vec::new()
    }

    /// The engine stops serving `domains`; each is scheduled again at its next due time, not
    /// before `not_before_ms`.
    pub fn deactivate(&self, domains: impl IntoIterator<Item = DomainId>, not_before_ms: u64) {
        self.with_index(|i| {
            for d in domains {
                i.deactivate(d, not_before_ms);
            }
        });
    }

    /// Puts jobs taken out back into the index, each at its `due_ms`.
    pub fn requeue(&self, jobs: impl IntoIterator<Item = PendingJob>) {
        self.with_index(|i| i.push_back_many(jobs));
    }

    /// Forgets `n` jobs of `d` taken out that reached a final state (or were dropped).
    pub fn release(&self, d: DomainId, n: u64) {
        self.lock().index.release(d, n);
    }

    /// Holds a job of a campaign that `still_paused` says is paused, until
    /// [`Scheduler::unpark_campaign`]. The check runs under the scheduler's lock, so a resume
    /// that set the campaign active before unparking cannot miss the job: if it is no longer
    /// paused, the job is queued again at once.
    pub fn park(&self, job: PendingJob, still_paused: impl FnOnce() -> bool) {
        let mut g = self.lock();
        if still_paused() {
            g.parked.entry(job.id.campaign).or_default().push(job);
        } else {
            g.index.push_back(job);
        }
    }

    /// Queues a campaign's parked jobs again (it was resumed or cancelled; delivery drops the
    /// jobs of a cancelled one when it meets them), in slices like an upload's.
    pub async fn unpark_campaign(&self, campaign: u32) {
        let jobs = self.lock().parked.remove(&campaign).unwrap_or_default();
        self.requeue_in_slices(jobs.into_iter()).await;
    }

    /// Forgets domains idle for at least `min_idle_ms` (see [`QueueIndex::evict_idle`]).
    pub fn evict_idle(&self, now_ms: u64, min_idle_ms: u64) -> usize {
        self.lock().index.evict_idle(now_ms, min_idle_ms)
    }

    // ---- operators ----

    /// Suspends or resumes delivery to `domain` (normalised).
    pub fn set_suspended(&self, domain: &str, suspended: bool) -> SuspendResult {
        let mut g = self.lock();
        if suspended {
            g.suspended.insert(domain.to_owned());
        } else {
            g.suspended.remove(domain);
        }
        let found = g.index.find_domain(domain);
        if let Some(d) = found {
            g.index.set_parked(d, suspended);
        }
        let queued = found.map_or(0, |d| g.index.domain_len(d));
        drop(g);
        if !suspended {
            self.wake();
        }
        SuspendResult {
            known: found.is_some(),
            queued,
        }
    }

    /// The suspended domains, sorted.
    pub fn suspended(&self) -> Vec<String> {
        let mut v: Vec<String> = self.lock().suspended.iter().cloned().collect();
        v.sort_unstable();
        v
    }

    // ---- reports ----

    /// Pending jobs in the index.
    pub fn len(&self) -> usize {
        self.lock().index.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Jobs parked for paused campaigns.
    pub fn parked_jobs(&self) -> usize {
        self.lock().parked.values().map(Vec::len).sum()
    }

    /// Domains currently known to the index.
    pub fn domain_count(&self) -> usize {
        self.lock().index.domain_count()
    }

    /// Whether the index still knows `domain`.
    pub fn knows(&self, domain: &str) -> bool {
        self.lock().index.find_domain(domain).is_some()
    }

    /// Keeps the entries of `map` whose domain the index still knows.
    pub fn retain_known<V>(&self, map: &mut HashMap<String, V>) {
        let g = self.lock();
        map.retain(|d, _| g.index.find_domain(d).is_some());
    }

    /// The names of the domains with pending jobs.
    pub fn pending_domains(&self) -> Vec<String> {
        let g = self.lock();
        g.index
            .domains()
            .map(|(d, _)| g.index.domain_name(d).to_owned())
            .collect()
    }

    /// Jobs given back or released that were never taken out: an accounting bug if not 0.
    pub fn pin_underflows(&self) -> u64 {
        self.lock().index.pin_underflows()
    }

    /// One line per domain with jobs pending, held or suspended. O(queued): for reports every
    /// few seconds at most.
    pub fn summaries(&self) -> Vec<DomainSummary> {
        let g = self.lock();
        g.index
            .summaries()
            .map(|s| DomainSummary {
                name: s.name.to_owned(),
                pending: s.pending as u64,
                held: s.held,
                suspended: s.parked,
                next_due_ms: s.next_due_ms,
                oldest: s.oldest,
                by_priority: s.by_priority,
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn staged_jobs_enter_in_slices_and_stay_pinned_until_then() {
        let s = Scheduler::new();
        let n = ENQUEUE_SLICE * 2 + 7;
        let domains = s.stage(std::iter::repeat_n("a.example", n));
        assert_eq!(s.len(), 0);
        // Staged jobs pin their domain: it survives eviction.
        assert_eq!(s.evict_idle(u64::MAX, 0), 0);
        let staged = domains.into_iter().enumerate().map(|(i, d)| (i as u32, d));
        s.enqueue_staged(3, 10, staged.collect()).await;
        assert_eq!(s.len(), n);
        assert_eq!(s.pin_underflows(), 0);
        let (due, _) = s.take_due_domains(10, 8);
        assert_eq!(due.len(), 1);
        let jobs = s.pop_due(due[0], 10, 3);
        let ids: Vec<u32> = jobs.iter().map(|j| j.id.index).collect();
        assert_eq!(ids, vec![0, 1, 2]);
        assert!(jobs.iter().all(|j| j.id.campaign == 3));
    }

    #[test]
    fn a_rolled_back_upload_leaves_nothing_behind() {
        let s = Scheduler::new();
        let domains = s.stage(["a.example", "b.example"].into_iter());
        s.unstage(domains);
        assert_eq!(s.evict_idle(u64::MAX, 0), 2);
        assert_eq!(s.domain_count(), 0);
        assert_eq!(s.pin_underflows(), 0);
    }

    #[test]
    fn parked_jobs_return_on_unpark_and_a_resumed_campaign_parks_nothing() {
        let s = Scheduler::new();
        let d = s.stage(["a.example"].into_iter());
        block_on(s.enqueue_staged(1, 0, vec![(0, d[0])]));
        let (due, _) = s.take_due_domains(0, 1);
        let job = s.pop_due(due[0], 0, 1)[0];
        s.park(job, || true);
        assert_eq!((s.len(), s.parked_jobs()), (0, 1));
        block_on(s.unpark_campaign(1));
        assert_eq!((s.len(), s.parked_jobs()), (1, 0));
        s.deactivate([due[0]], 0);
        let (due, _) = s.take_due_domains(0, 1);
        let job = s.pop_due(due[0], 0, 1)[0];
        // Resumed between the caller's state check and the park: queued at once.
        s.park(job, || false);
        assert_eq!((s.len(), s.parked_jobs()), (1, 0));
        assert_eq!(s.pin_underflows(), 0);
    }

    #[test]
    fn suspended_domains_are_never_claimed_or_popped() {
        let s = Scheduler::new();
        let d = s.stage(["a.example", "a.example"].into_iter());
        block_on(s.enqueue_staged(1, 0, vec![(0, d[0]), (1, d[1])]));
        let r = s.set_suspended("a.example", true);
        assert!(r.known);
        assert_eq!(r.queued, 2);
        assert_eq!(s.take_due_domains(0, 8).0, vec![]);
        assert_eq!(s.suspended(), vec!["a.example".to_owned()]);
        s.set_suspended("a.example", false);
        let (due, _) = s.take_due_domains(0, 8);
        assert_eq!(due.len(), 1);
        // Suspended again after it was handed out: claiming parks it.
        s.set_suspended("a.example", true);
        assert_eq!(s.claim(due[0]), None);
        assert!(s.pop_due(due[0], 0, 8).is_empty());
        assert!(!s.set_suspended("b.example", true).known);
    }

    fn block_on<F: std::future::Future>(f: F) -> F::Output {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("a runtime")
            .block_on(f)
    }
}
