//! The pending-job index: which job is due when, grouped by destination domain.
//!
//! A plain data structure with no lock and no I/O; [`super::Scheduler`]
//! owns the one instance the engine uses and is its only caller outside benchmarks. Memory is the
//! constraint (millions of queued recipients), so an entry is 16 bytes: due time and job id.
//! Domain names are interned once; the address and variables stay on disk and are read when the
//! job is sent.
//!
//! [`QueueIndex::take_due_domains`] hands out domains whose next job is due (from a schedule of
//! the inactive domains ordered by that time), [`QueueIndex::pop_due`] up to N jobs of one
//! domain due by a time, in the fair order of [`super::fair`], and [`QueueIndex::push`] puts a
//! deferred job back with its new due time.
//!
//! Campaigns with scheduling parameters ([`CampaignParams`]: priority, weight, `max_rate`) are
//! registered with [`QueueIndex::set_params`]; jobs of others get the defaults. Jobs of a
//! campaign with a `max_rate` wait in a per-campaign hold ([`super::rate`]) and are let into
//! their domains' queues at that rate by [`QueueIndex::take_due_domains`]; meanwhile they pin
//! their domain, as jobs taken out do.

use std::collections::{BTreeSet, HashMap};

use super::fair::{self, FairQueue, FlowView};
use super::rate::Held;
use crate::config::Rate;
use crate::store::spool::JobId;

/// An interned destination domain.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DomainId(u32);

/// One pending job as the delivery engine sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PendingJob {
    pub id: JobId,
    pub domain: DomainId,
    /// Unix time in milliseconds before which the job must not be attempted.
    pub due_ms: u64,
}

/// How a campaign's jobs are scheduled (see [`super::fair`] and [`super::rate`]).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CampaignParams {
    /// 0 to [`fair::PRIORITY_MAX`]; higher is served first.
    pub priority: u8,
    /// 1 to [`fair::WEIGHT_MAX`]: its share against its tenant's campaigns of the same
    /// priority.
    pub weight: u32,
    /// At most this many of its jobs are let into the domain queues per period.
    pub max_rate: Option<Rate>,
    /// Its tenant's number and weight (its share against other tenants).
    pub tenant: u32,
    pub tenant_weight: u32,
}

impl Default for CampaignParams {
    fn default() -> CampaignParams {
        CampaignParams {
            priority: fair::PRIORITY_NORMAL,
            weight: 1,
            max_rate: None,
            tenant: 0,
            tenant_weight: 1,
        }
    }
}

/// A registered campaign: its parameters, and its held jobs when it has a `max_rate`.
struct CampaignEntry {
    params: CampaignParams,
    held: Option<Held>,
}

/// What the index holds of one campaign, over all domains ([`QueueIndex::campaign_view`]).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct CampaignView {
    /// Jobs in domain queues.
    pub pending: usize,
    /// Jobs waiting for the campaign's `max_rate`.
    pub rate_held: usize,
    /// When its next job may be taken.
    pub next_due_ms: Option<u64>,
    /// The fraction of its domains' jobs it gets now, averaged over its domains weighted by
    /// its jobs in each ([`FlowView::share`]).
    pub share: f64,
}

/// The share of the jobs taken that the classes below the highest due one get by default.
pub const DEFAULT_LOWER_SHARE: f64 = 0.1;

#[derive(Default)]
struct DomainQueue {
    pending: FairQueue,
    /// Being served by the delivery engine; not in the schedule meanwhile.
    active: bool,
    /// Suspended by an operator: never scheduled until resumed.
    parked: bool,
    /// A throttle or backoff said "not before this time".
    not_before: u64,
    /// This domain's key in `schedule`, if it is there.
    scheduled_at: Option<u64>,
    /// Jobs of this domain held outside the index (popped by delivery, parked, staged by an
    /// upload). While any exist the domain id must not be reused.
    pins: u64,
}

/// A domain's line in [`QueueIndex::summaries`].
#[derive(Debug, Clone)]
pub struct DomainSummary<'a> {
    pub name: &'a str,
    /// Jobs in the index.
    pub pending: usize,
    /// Jobs taken out (being delivered, parked for a paused campaign, staged by an upload).
    pub held: u64,
    /// Suspended by an operator.
    pub parked: bool,
    pub next_due_ms: Option<u64>,
    /// The pending job accepted first.
    pub oldest: Option<JobId>,
    /// Pending jobs per priority, highest first.
    pub by_priority: Vec<(u8, usize)>,
}

/// Pending jobs per destination domain, plus a schedule of the inactive domains by the time
/// they next have work.
#[derive(Default)]
pub struct QueueIndex {
    names: Vec<Box<str>>,
    ids: HashMap<Box<str>, DomainId>,
    queues: Vec<DomainQueue>,
    schedule: BTreeSet<(u64, DomainId)>,
    len: usize,
    /// Slots of evicted domains, reused by new ones.
    free: Vec<DomainId>,
    /// Domains that became idle, with the time they did: eviction candidates.
    idle: std::collections::VecDeque<(u64, DomainId)>,
    /// Returns or releases of jobs that were never taken out: an accounting bug if not 0.
    pin_underflows: u64,
    /// Campaigns with parameters other than the defaults.
    campaigns: HashMap<u32, CampaignEntry>,
    /// Rate-limited campaigns with held jobs, by the time the next may be let in.
    releases: BTreeSet<(u64, u32)>,
    /// Jobs held for their campaign's rate.
    rate_held: usize,
    /// The share of jobs for lower priorities ([`DEFAULT_LOWER_SHARE`] unless set).
    lower_share: Option<f64>,
}

impl QueueIndex {
    pub fn new() -> QueueIndex {
        QueueIndex::default()
    }

    /// Sets the share of the jobs taken that lower priorities get while a higher one has due
    /// jobs (0 to 0.5; 0 is strict priority).
    pub fn set_lower_share(&mut self, share: f64) {
        self.lower_share = Some(share.clamp(0.0, 0.5));
    }

    fn share(&self) -> f64 {
        self.lower_share.unwrap_or(DEFAULT_LOWER_SHARE)
    }

    /// Registers (or changes) `campaign`'s scheduling parameters; defaults forget it. Its queued
    /// jobs keep their place; a `max_rate` applies to jobs queued from now on, and jobs held for
    /// a limit that is lifted are let in at once.
    pub fn set_params(&mut self, campaign: u32, params: CampaignParams) {
        let held = match self.campaigns.remove(&campaign) {
            Some(mut e) => match (e.held.take(), params.max_rate) {
                (Some(h), Some(rate)) if e.params.max_rate == Some(rate) => Some(h),
                (old, rate) => {
                    if let Some(h) = old {
                        self.flush_held(campaign, h, params);
                    }
                    rate.map(Held::new)
                }
            },
            None => params.max_rate.map(Held::new),
        };
        if params != CampaignParams::default() {
            self.campaigns
                .insert(campaign, CampaignEntry { params, held });
        }
    }

    /// Lets every job of `h` into its domain's queue.
    fn flush_held(&mut self, campaign: u32, mut h: Held, params: CampaignParams) {
        if let Some(at) = h.scheduled_at.take() {
            self.releases.remove(&(at, campaign));
        }
        let jobs: Vec<(u64, u32, u32)> = h.drain().collect();
        let mut touched = Vec::new();
        self.let_in(campaign, params, jobs, &mut touched);
        self.reschedule_all(touched);
    }

    /// Moves held jobs `(due, index, domain)` of `campaign` into their domains' queues (their
    /// domains, to reschedule, into `touched`).
    fn let_in(
        &mut self,
        campaign: u32,
        params: CampaignParams,
        jobs: Vec<(u64, u32, u32)>,
        touched: &mut Vec<DomainId>,
    ) {
        for (due, index, domain) in jobs {
            let domain = DomainId(domain);
            self.rate_held -= 1;
            self.unpin(domain, 1);
            self.insert_fair(params, JobId { campaign, index }, domain, due);
            touched.push(domain);
        }
    }

    fn reschedule_all(&mut self, mut touched: Vec<DomainId>) {
        touched.sort_unstable();
        touched.dedup();
        for d in touched {
            self.reschedule(d);
        }
    }

    /// `campaign`'s parameters.
    pub fn params(&self, campaign: u32) -> CampaignParams {
        self.campaigns
            .get(&campaign)
            .map_or_else(CampaignParams::default, |e| e.params)
    }

    /// Makes every job of `campaign` due by `now` at the latest and lifts its rate limit: a
    /// cancelled campaign's jobs are ended at once. O(domains).
    pub fn expedite(&mut self, campaign: u32, now: u64) {
        let params = CampaignParams {
            max_rate: None,
            ..self.params(campaign)
        };
        self.set_params(campaign, params);
        for i in 0..self.queues.len() {
            let q = &mut self.queues[i];
            if q.pending.is_empty() {
                continue;
            }
            q.pending.expedite(campaign, now);
            self.reschedule(DomainId(i as u32));
        }
    }

    /// Jobs held for their campaign's `max_rate`.
    pub fn rate_held(&self) -> usize {
        self.rate_held
    }

    /// Interns `domain` (already normalised: lower-case A-labels).
    pub fn domain_id(&mut self, domain: &str) -> DomainId {
        if let Some(&id) = self.ids.get(domain) {
            return id;
        }
        let name: Box<str> = domain.into();
        let id = match self.free.pop() {
            Some(id) => {
                self.names[id.0 as usize] = name.clone();
                self.queues[id.0 as usize] = DomainQueue::default();
                id
            }
            None => {
                let id = DomainId(
                    u32::try_from(self.names.len()).expect("fewer than 4 billion domains"),
                );
                self.names.push(name.clone());
                self.queues.push(DomainQueue::default());
                id
            }
        };
        self.ids.insert(name, id);
        id
    }

    /// Records `n` jobs of `domain` held outside the index (an upload's staged jobs).
    pub fn pin(&mut self, domain: DomainId, n: u64) {
        self.queues[domain.0 as usize].pins += n;
    }

    /// Returns a job taken out by [`QueueIndex::pop_due`] or pinned: it is queued again.
    pub fn push_back(&mut self, job: PendingJob) {
        self.unpin(job.domain, 1);
        self.push(job);
    }

    /// [`QueueIndex::push_back`] of many jobs, scheduling each domain once rather than once per
    /// job: an upload's jobs come in long runs of few domains.
    pub fn push_back_many(&mut self, jobs: impl IntoIterator<Item = PendingJob>) {
        let mut touched: Vec<DomainId> = Vec::new();
        for job in jobs {
            self.unpin(job.domain, 1);
            self.insert(job);
            if touched.last() != Some(&job.domain) {
                touched.push(job.domain);
            }
        }
        self.reschedule_all(touched);
    }

    /// Forgets `n` jobs taken out or pinned that reached a final state (or were dropped).
    pub fn release(&mut self, domain: DomainId, n: u64) {
        self.unpin(domain, n);
        self.note_if_idle(domain);
    }

    /// `n` jobs of `domain` held outside the index are no longer; more than were held is
    /// counted as an underflow.
    fn unpin(&mut self, domain: DomainId, n: u64) {
        let q = &mut self.queues[domain.0 as usize];
        match q.pins.checked_sub(n) {
            Some(p) => q.pins = p,
            None => {
                q.pins = 0;
                self.pin_underflows += 1;
            }
        }
    }

    fn is_idle(&self, d: DomainId) -> bool {
        let q = &self.queues[d.0 as usize];
        q.pending.is_empty() && !q.active && !q.parked && q.pins == 0 && q.scheduled_at.is_none()
    }

    fn note_if_idle(&mut self, d: DomainId) {
        if self.is_idle(d) {
            self.idle.push_back((crate::now_ms(), d));
        }
    }

    /// Forgets domains that have been idle (no jobs, not served, not suspended, no job held
    /// elsewhere) for at least `min_idle_ms`, so per-domain state over millions of recipient
    /// domains does not grow forever. Returns how many were evicted.
    pub fn evict_idle(&mut self, now_ms: u64, min_idle_ms: u64) -> usize {
        let mut evicted = 0;
        while let Some(&(since, d)) = self.idle.front() {
            if now_ms.saturating_sub(since) < min_idle_ms {
                break;
            }
            self.idle.pop_front();
            let name = &self.names[d.0 as usize];
            // Skip slots already freed, or busy again since they were noted.
            if name.is_empty() || !self.is_idle(d) {
                continue;
            }
            let name = std::mem::take(&mut self.names[d.0 as usize]);
            self.ids.remove(&name);
            self.queues[d.0 as usize] = DomainQueue::default();
            self.free.push(d);
            evicted += 1;
        }
        evicted
    }

    /// Jobs returned or released that were never taken out (should stay 0).
    pub fn pin_underflows(&self) -> u64 {
        self.pin_underflows
    }

    /// Domains currently interned.
    pub fn domain_count(&self) -> usize {
        self.ids.len()
    }

    pub fn domain_name(&self, id: DomainId) -> &str {
        &self.names[id.0 as usize]
    }

    /// Looks a domain up without interning it.
    pub fn find_domain(&self, domain: &str) -> Option<DomainId> {
        self.ids.get(domain).copied()
    }

    pub fn push(&mut self, job: PendingJob) {
        self.insert(job);
        self.reschedule(job.domain);
    }

    /// Adds a pending job without rescheduling its domain: to its domain's queue, or to its
    /// campaign's hold when the campaign has a `max_rate` (then the domain is pinned instead).
    fn insert(&mut self, job: PendingJob) {
        let campaign = job.id.campaign;
        let Some(entry) = self.campaigns.get_mut(&campaign) else {
            self.insert_fair(CampaignParams::default(), job.id, job.domain, job.due_ms);
            return;
        };
        let params = entry.params;
        let Some(held) = entry.held.as_mut() else {
            self.insert_fair(params, job.id, job.domain, job.due_ms);
            return;
        };
        held.push(job.due_ms, job.id.index, job.domain.0);
        schedule_release(&mut self.releases, campaign, held);
        self.rate_held += 1;
        self.queues[job.domain.0 as usize].pins += 1;
    }

    fn insert_fair(&mut self, params: CampaignParams, id: JobId, domain: DomainId, due: u64) {
        let flow = fair::FlowParams {
            priority: params.priority,
            weight: params.weight,
            tenant: params.tenant,
            tenant_weight: params.tenant_weight,
        };
        self.queues[domain.0 as usize]
            .pending
            .push(flow, id.campaign, (due, u64::from(id)));
        self.len += 1;
    }

    /// Lets held jobs whose campaign's rate allows them by `now` into their domains' queues.
    fn release_held(&mut self, now: u64) {
        let mut touched = Vec::new();
        while let Some(&(at, campaign)) = self.releases.first() {
            if at > now {
                break;
            }
            self.releases.pop_first();
            let Some(entry) = self.campaigns.get_mut(&campaign) else {
                continue;
            };
            let params = entry.params;
            let Some(held) = entry.held.as_mut() else {
                continue;
            };
            // Popped from the schedule above.
            held.scheduled_at = None;
            let mut released = Vec::new();
            while let Some(job) = held.release(now) {
                released.push(job);
            }
            schedule_release(&mut self.releases, campaign, held);
            self.let_in(campaign, params, released, &mut touched);
        }
        self.reschedule_all(touched);
    }

    /// The earliest time anything is scheduled: a domain's next due job or a held job's release.
    pub fn next_wake(&self) -> Option<u64> {
        let domain = self.schedule.first().map(|(at, _)| *at);
        let release = self.releases.first().map(|(at, _)| *at);
        match (domain, release) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Puts an inactive, unparked domain with jobs into the schedule at its next useful time.
    fn reschedule(&mut self, d: DomainId) {
        let q = &mut self.queues[d.0 as usize];
        let want = match q.pending.peek_due() {
            Some(due) if !q.active && !q.parked => Some(due.max(q.not_before)),
            _ => None,
        };
        if q.scheduled_at == want {
            return;
        }
        if let Some(old) = q.scheduled_at.take() {
            self.schedule.remove(&(old, d));
        }
        if let Some(at) = want {
            self.schedule.insert((at, d));
            self.queues[d.0 as usize].scheduled_at = Some(at);
        }
    }

    /// Hands out up to `max` inactive domains whose next job is due by `now_ms`, marking them
    /// active, after letting in the held jobs whose rate allows them. Also returns the time
    /// something next becomes due, if anything ([`QueueIndex::next_wake`]).
    pub fn take_due_domains(&mut self, now_ms: u64, max: usize) -> (Vec<DomainId>, Option<u64>) {
        self.release_held(now_ms);
        let mut out = Vec::new();
        while out.len() < max {
            match self.schedule.first() {
                Some(&(at, d)) if at <= now_ms => {
                    self.schedule.remove(&(at, d));
                    let q = &mut self.queues[d.0 as usize];
                    q.scheduled_at = None;
                    q.active = true;
                    out.push(d);
                }
                _ => break,
            }
        }
        (out, self.next_wake())
    }

    /// The delivery engine stops serving `domain`; it is scheduled again at its next due time,
    /// but not before `not_before_ms`.
    pub fn deactivate(&mut self, domain: DomainId, not_before_ms: u64) {
        let q = &mut self.queues[domain.0 as usize];
        q.active = false;
        q.not_before = not_before_ms;
        self.reschedule(domain);
        self.note_if_idle(domain);
    }

    /// Suspends or resumes a domain. A parked domain keeps its jobs but is never handed out.
    pub fn set_parked(&mut self, domain: DomainId, parked: bool) {
        let q = &mut self.queues[domain.0 as usize];
        q.parked = parked;
        if parked {
            q.active = false;
        }
        self.reschedule(domain);
        self.note_if_idle(domain);
    }

    pub fn is_parked(&self, domain: DomainId) -> bool {
        self.queues[domain.0 as usize].parked
    }

    /// Total pending jobs.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Pending jobs for one domain.
    pub fn domain_len(&self, domain: DomainId) -> usize {
        self.queues
            .get(domain.0 as usize)
            .map_or(0, |q| q.pending.len())
    }

    /// The earliest due time of `domain`, if it has pending jobs.
    pub fn next_due(&self, domain: DomainId) -> Option<u64> {
        self.queues.get(domain.0 as usize)?.pending.peek_due()
    }

    /// Removes and returns up to `max` jobs of `domain` due at or before `now_ms`, of one
    /// campaign chosen by priority and fair share (see [`super::fair`]), earliest first.
    pub fn pop_due(&mut self, domain: DomainId, now_ms: u64, max: usize) -> Vec<PendingJob> {
        let share = self.share();
        self.take_from(domain, max, |q, out| q.pop(now_ms, max, share, out))
    }

    /// Up to `max` due jobs of `domain` from `campaign` only (more recipients for one message).
    pub fn pop_due_of(
        &mut self,
        domain: DomainId,
        campaign: u32,
        now_ms: u64,
        max: usize,
    ) -> Vec<PendingJob> {
        let share = self.share();
        self.take_from(domain, max, |q, out| {
            q.pop_campaign(campaign, now_ms, max, share, out)
        })
    }

    fn take_from(
        &mut self,
        domain: DomainId,
        max: usize,
        pop: impl FnOnce(&mut FairQueue, &mut Vec<(u64, u64)>) -> usize,
    ) -> Vec<PendingJob> {
        let Some(q) = self.queues.get_mut(domain.0 as usize) else {
            return Vec::new();
        };
        let mut entries = Vec::with_capacity(max.min(64));
        let n = pop(&mut q.pending, &mut entries);
        self.len -= n;
        q.pins += n as u64;
        entries
            .into_iter()
            .map(|(due_ms, id)| PendingJob {
                id: JobId::from(id),
                domain,
                due_ms,
            })
            .collect()
    }

    /// What the index holds of `campaign` at `now`, over every domain. O(domains): for
    /// lookups, not the delivery path.
    pub fn campaign_view(&self, campaign: u32, now: u64) -> CampaignView {
        let share = self.share();
        let mut view = CampaignView::default();
        let mut weighted = 0.0;
        for q in &self.queues {
            if q.pending.is_empty() {
                continue;
            }
            let Some(FlowView {
                pending,
                next_due_ms,
                share: s,
            }) = q.pending.flow_view(campaign, now, share)
            else {
                continue;
            };
            view.pending += pending;
            weighted += s * pending as f64;
            view.next_due_ms = match (view.next_due_ms, next_due_ms) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
        }
        if view.pending > 0 {
            view.share = weighted / view.pending as f64;
        }
        if let Some(held) = self.campaigns.get(&campaign).and_then(|e| e.held.as_ref()) {
            view.rate_held = held.jobs.len();
            if let Some(at) = held.next_release() {
                view.next_due_ms = Some(view.next_due_ms.map_or(at, |d| d.min(at)));
            }
        }
        view
    }

    /// One line per known domain with jobs pending, held elsewhere, or parked, for reports.
    /// Walks every pending job (to find each domain's oldest): O(queued), so callers do it
    /// every few seconds at most.
    pub fn summaries(&self) -> impl Iterator<Item = DomainSummary<'_>> + '_ {
        self.queues.iter().enumerate().filter_map(|(i, q)| {
            let name = &self.names[i];
            if name.is_empty() || (q.pending.is_empty() && q.pins == 0 && !q.parked) {
                return None;
            }
            Some(DomainSummary {
                name,
                pending: q.pending.len(),
                held: q.pins,
                parked: q.parked,
                next_due_ms: q.pending.peek_due(),
                // Job ids grow with acceptance within a campaign and campaigns are numbered in
                // creation order, so the smallest id is the longest queued (recipients appended
                // to an old campaign later aside).
                oldest: q.pending.iter().map(|(_, id)| id).min().map(JobId::from),
                by_priority: q.pending.by_priority().collect(),
            })
        })
    }

    /// Domains that have pending jobs, with their earliest due time.
    pub fn domains(&self) -> impl Iterator<Item = (DomainId, u64)> + '_ {
        self.queues
            .iter()
            .enumerate()
            .filter_map(|(i, q)| q.pending.peek_due().map(|due| (DomainId(i as u32), due)))
    }

    /// Approximate heap bytes held, for the memory budget.
    pub fn heap_bytes(&self) -> usize {
        let entries: usize = self
            .queues
            .iter()
            .map(|q| q.pending.capacity() * 16 + q.pending.flow_count() * 96)
            .sum();
        let names: usize = self.names.iter().map(|n| n.len() * 2 + 48).sum();
        entries + names + self.queues.capacity() * std::mem::size_of::<DomainQueue>()
    }
}

/// Puts rate-limited `campaign` into the release schedule at its next release time (or takes it
/// out when nothing is held), as [`QueueIndex::reschedule`] does for a domain.
fn schedule_release(releases: &mut BTreeSet<(u64, u32)>, campaign: u32, held: &mut Held) {
    let want = held.next_release();
    if want == held.scheduled_at {
        return;
    }
    if let Some(at) = held.scheduled_at.take() {
        releases.remove(&(at, campaign));
    }
    if let Some(at) = want {
        releases.insert((at, campaign));
    }
    held.scheduled_at = want;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job(q: &mut QueueIndex, domain: &str, index: u32, due_ms: u64) -> PendingJob {
        let domain = q.domain_id(domain);
        PendingJob {
            id: JobId { campaign: 1, index },
            domain,
            due_ms,
        }
    }

    #[test]
    fn pops_due_jobs_in_order_per_domain() {
        let mut q = QueueIndex::new();
        for (d, i, due) in [
            ("a.example", 0, 30),
            ("a.example", 1, 10),
            ("b.example", 2, 10),
            ("a.example", 3, 20),
        ] {
            let j = job(&mut q, d, i, due);
            q.push(j);
        }
        let a = q.domain_id("a.example");
        let b = q.domain_id("b.example");
        assert_eq!(q.len(), 4);
        assert_eq!(q.next_due(a), Some(10));
        let got: Vec<u32> = q.pop_due(a, 25, 10).iter().map(|j| j.id.index).collect();
        assert_eq!(got, vec![1, 3]);
        assert_eq!(q.len(), 2);
        assert_eq!(q.pop_due(a, 25, 10), vec![]);
        assert_eq!(q.pop_due(b, 10, 0), vec![]);
        assert_eq!(q.pop_due(b, 10, 5).len(), 1);
        assert_eq!(q.next_due(b), None);
        assert_eq!(q.domains().collect::<Vec<_>>(), vec![(a, 30)]);
        assert_eq!(q.domain_name(a), "a.example");
    }

    #[test]
    fn schedule_hands_out_due_domains_once() {
        let mut q = QueueIndex::new();
        for (d, i, due) in [
            ("a.example", 0, 10),
            ("b.example", 1, 50),
            ("a.example", 2, 5),
        ] {
            let j = job(&mut q, d, i, due);
            q.push(j);
        }
        let a = q.domain_id("a.example");
        let b = q.domain_id("b.example");
        assert_eq!(q.take_due_domains(4, 10), (vec![], Some(5)));
        assert_eq!(q.take_due_domains(20, 10), (vec![a], Some(50)));
        // Active: not handed out again, even when more work arrives.
        let j = job(&mut q, "a.example", 3, 1);
        q.push(j);
        assert_eq!(q.take_due_domains(20, 10), (vec![], Some(50)));
        assert_eq!(q.pop_due(a, 20, 10).len(), 3);
        q.deactivate(a, 0);
        assert_eq!(q.take_due_domains(100, 10), (vec![b], None));
        // A throttle's "not before" holds a domain back even when its jobs are due.
        let j = job(&mut q, "a.example", 4, 0);
        q.push(j);
        q.set_parked(a, true);
        assert_eq!(q.take_due_domains(100, 10), (vec![], None));
        q.set_parked(a, false);
        q.deactivate(a, 500);
        assert_eq!(q.take_due_domains(100, 10), (vec![], Some(500)));
        assert_eq!(q.take_due_domains(500, 10), (vec![a], None));
    }

    #[test]
    fn idle_domains_are_evicted_only_when_nothing_holds_them() {
        let mut q = QueueIndex::new();
        let j = job(&mut q, "a.example", 1, 0);
        q.push(j);
        let a = q.domain_id("a.example");
        assert_eq!(q.take_due_domains(0, 10).0, vec![a]);
        let popped = q.pop_due(a, 0, 10);
        q.deactivate(a, 0);
        // The popped job is still out (a delivery attempt): not evictable.
        assert_eq!(q.evict_idle(u64::MAX, 0), 0);
        assert_eq!(q.domain_name(a), "a.example");
        q.push_back(PendingJob {
            due_ms: 5,
            ..popped[0]
        });
        assert_eq!(q.take_due_domains(5, 10).0, vec![a]);
        let popped = q.pop_due(a, 5, 10);
        q.deactivate(a, 0);
        q.release(a, popped.len() as u64);
        assert_eq!(q.evict_idle(u64::MAX, 0), 1);
        assert_eq!(q.find_domain("a.example"), None);
        assert_eq!(q.domain_count(), 0);
        // The slot is reused, clean.
        let b = q.domain_id("b.example");
        assert_eq!(b, a);
        assert_eq!(q.domain_name(b), "b.example");
        assert_eq!(q.domain_len(b), 0);
        // Recently idle domains wait for the minimum idle time; pinned ones are kept.
        let c = q.domain_id("c.example");
        q.pin(c, 1);
        q.release(c, 1);
        assert_eq!(q.evict_idle(crate::now_ms(), 60_000), 0);
        q.pin(c, 1);
        assert_eq!(q.evict_idle(u64::MAX, 0), 0);
        assert_eq!(q.domain_name(c), "c.example");
        assert_eq!(q.pin_underflows(), 0);
        q.release(c, 2);
        assert_eq!(
            q.pin_underflows(),
            1,
            "a release of more than was taken out is counted"
        );
    }

    #[test]
    fn a_rate_limited_campaign_is_let_in_at_its_rate_and_flushed_when_lifted() {
        let mut q = QueueIndex::new();
        let ten_per_second = Rate {
            count: 10,
            per: std::time::Duration::from_secs(1),
        };
        q.set_params(
            2,
            CampaignParams {
                max_rate: Some(ten_per_second),
                ..CampaignParams::default()
            },
        );
        let a = q.domain_id("a.example");
        let b = q.domain_id("b.example");
        for index in 0..6 {
            let domain = if index % 2 == 0 { a } else { b };
            q.push(PendingJob {
                id: JobId { campaign: 2, index },
                domain,
                due_ms: 1000,
            });
        }
        // Held: nothing pending, both domains pinned, the release due at 1000.
        assert_eq!((q.len(), q.rate_held()), (0, 6));
        assert_eq!(q.evict_idle(u64::MAX, 0), 0);
        assert_eq!(q.take_due_domains(999, 8), (vec![], Some(1000)));
        // One job per 100 ms, counted from when the last was let in.
        assert_eq!(q.take_due_domains(1000, 8), (vec![a], Some(1100)));
        assert_eq!(q.pop_due(a, 1000, 8).len(), 1);
        q.deactivate(a, 0);
        assert_eq!(q.take_due_domains(1150, 8), (vec![b], Some(1250)));
        assert_eq!(q.rate_held(), 4);
        let view = q.campaign_view(2, 1150);
        assert_eq!((view.pending, view.rate_held), (1, 4));
        assert_eq!(view.next_due_ms, Some(1000));
        // Lifting the limit lets the rest in at once.
        q.set_params(2, CampaignParams::default());
        assert_eq!((q.len(), q.rate_held()), (5, 0));
        assert_eq!(q.take_due_domains(1150, 8), (vec![a], None));
        assert_eq!(q.pin_underflows(), 0);
    }

    #[test]
    fn a_cancelled_campaign_scheduled_for_later_becomes_due_now() {
        let mut q = QueueIndex::new();
        let j = job(&mut q, "a.example", 0, 1_000_000);
        q.push(j);
        let a = j.domain;
        assert_eq!(q.take_due_domains(10, 8), (vec![], Some(1_000_000)));
        q.expedite(1, 10);
        assert_eq!(q.take_due_domains(10, 8), (vec![a], None));
        assert_eq!(q.pop_due(a, 10, 8).len(), 1);
    }

    #[test]
    fn same_due_time_keeps_campaign_order() {
        let mut q = QueueIndex::new();
        for i in [5, 2, 9, 1] {
            let j = job(&mut q, "x.example", i, 100);
            q.push(j);
        }
        let x = q.domain_id("x.example");
        let got: Vec<u32> = q.pop_due(x, 100, 10).iter().map(|j| j.id.index).collect();
        assert_eq!(got, vec![1, 2, 5, 9]);
    }
}
