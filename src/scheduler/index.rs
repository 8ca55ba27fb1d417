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
//! domain due by a time, and [`QueueIndex::push`] puts a deferred job back with its new due time.

use std::cmp::Reverse;
use std::collections::{BTreeSet, BinaryHeap, HashMap, VecDeque};

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

/// A domain's pending jobs ordered by (due, job id): earliest first, then campaign order.
///
/// Jobs mostly arrive in that order already (an upload's recipients are due at once with rising
/// ids; a retry is usually due after everything queued), so those go to the back of a sorted
/// run, taken from the front in O(1) and in memory order. Only a job that would break the run's
/// order (a retry due sooner than the run's last job, jobs of a paused campaign put back, a
/// campaign appended to in the same millisecond) goes to a min-heap. Popping takes the smaller
/// of the two heads. With a million jobs of one campaign queued, a heap pop is 20 cache-missing
/// levels; the run is a pointer bump.
#[derive(Default)]
struct Pending {
    run: VecDeque<(u64, u64)>,
    heap: BinaryHeap<Reverse<(u64, u64)>>,
}

impl Pending {
    fn push(&mut self, entry: (u64, u64)) {
        match self.run.back() {
            Some(&back) if entry < back => self.heap.push(Reverse(entry)),
            _ => self.run.push_back(entry),
        }
    }

    /// Whether the heap holds the smallest entry. On a tie the two heads are equal entries, so
    /// taking the run's is as right and cheaper.
    fn heap_first(&self) -> bool {
        self.heap
            .peek()
            .is_some_and(|Reverse(h)| self.run.front().is_none_or(|r| h < r))
    }

    fn peek(&self) -> Option<(u64, u64)> {
        if self.heap_first() {
            self.heap.peek().map(|Reverse(e)| *e)
        } else {
            self.run.front().copied()
        }
    }

    fn pop(&mut self) -> Option<(u64, u64)> {
        if self.heap_first() {
            self.heap.pop().map(|Reverse(e)| e)
        } else {
            self.run.pop_front()
        }
    }

    fn len(&self) -> usize {
        self.run.len() + self.heap.len()
    }

    fn is_empty(&self) -> bool {
        self.run.is_empty() && self.heap.is_empty()
    }

    fn iter(&self) -> impl Iterator<Item = (u64, u64)> + '_ {
        self.run
            .iter()
            .copied()
            .chain(self.heap.iter().map(|Reverse(e)| *e))
    }

    fn capacity(&self) -> usize {
        self.run.capacity() + self.heap.capacity()
    }
}

#[derive(Default)]
struct DomainQueue {
    pending: Pending,
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
#[derive(Debug, Clone, Copy)]
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
}

impl QueueIndex {
    pub fn new() -> QueueIndex {
        QueueIndex::default()
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
        touched.sort_unstable();
        touched.dedup();
        for d in touched {
            self.reschedule(d);
        }
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

    /// Adds a pending job without rescheduling its domain.
    fn insert(&mut self, job: PendingJob) {
        self.queues[job.domain.0 as usize]
            .pending
            .push((job.due_ms, u64::from(job.id)));
        self.len += 1;
    }

    /// Puts an inactive, unparked domain with jobs into the schedule at its next useful time.
    fn reschedule(&mut self, d: DomainId) {
        let q = &mut self.queues[d.0 as usize];
        let want = match q.pending.peek() {
            Some((due, _)) if !q.active && !q.parked => Some(due.max(q.not_before)),
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
    /// active. Also returns the time the next domain becomes due, if any.
    pub fn take_due_domains(&mut self, now_ms: u64, max: usize) -> (Vec<DomainId>, Option<u64>) {
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
        (out, self.schedule.first().map(|(at, _)| *at))
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
        self.queues
            .get(domain.0 as usize)?
            .pending
            .peek()
            .map(|(due, _)| due)
    }

    /// Removes and returns up to `max` jobs of `domain` due at or before `now_ms`, earliest first.
    pub fn pop_due(&mut self, domain: DomainId, now_ms: u64, max: usize) -> Vec<PendingJob> {
        let mut out = Vec::new();
        let Some(q) = self.queues.get_mut(domain.0 as usize) else {
            return out;
        };
        while out.len() < max {
            match q.pending.peek() {
                Some((due, _)) if due <= now_ms => {
                    let Some((due_ms, id)) = q.pending.pop() else {
                        break;
                    };
                    out.push(PendingJob {
                        id: JobId::from(id),
                        domain,
                        due_ms,
                    });
                }
                _ => break,
            }
        }
        self.len -= out.len();
        q.pins += out.len() as u64;
        out
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
                next_due_ms: q.pending.peek().map(|(due, _)| due),
                // Job ids grow with acceptance within a campaign and campaigns are numbered in
                // creation order, so the smallest id is the longest queued (recipients appended
                // to an old campaign later aside).
                oldest: q.pending.iter().map(|(_, id)| id).min().map(JobId::from),
            })
        })
    }

    /// Domains that have pending jobs, with their earliest due time.
    pub fn domains(&self) -> impl Iterator<Item = (DomainId, u64)> + '_ {
        self.queues
            .iter()
            .enumerate()
            .filter_map(|(i, q)| q.pending.peek().map(|(due, _)| (DomainId(i as u32), due)))
    }

    /// Approximate heap bytes held, for the memory budget.
    pub fn heap_bytes(&self) -> usize {
        let entries: usize = self.queues.iter().map(|q| q.pending.capacity() * 16).sum();
        let names: usize = self.names.iter().map(|n| n.len() * 2 + 48).sum();
        entries + names + self.queues.capacity() * std::mem::size_of::<DomainQueue>()
    }
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

    #[test]
    fn an_upload_in_order_stays_out_of_the_heap() {
        let mut p = Pending::default();
        for id in 0..1000 {
            p.push((7, id));
        }
        // A retry due later joins the run; one due sooner than the run's end goes to the heap.
        p.push((90, 5));
        p.push((50, 6));
        assert_eq!((p.run.len(), p.heap.len()), (1001, 1));
        let order: Vec<u64> = std::iter::from_fn(|| p.pop()).map(|(_, id)| id).collect();
        assert_eq!(order.len(), 1002);
        assert_eq!(&order[998..], &[998, 999, 6, 5]);
    }

    proptest::proptest! {
        /// The run-plus-heap order is exactly a min-heap's, whatever the order of pushes and pops:
        /// mostly rising entries (uploads, retries) mixed with out-of-order ones.
        #[test]
        fn pending_pops_in_heap_order(ops in proptest::collection::vec((0u8..4, 0u64..50, 0u64..1000), 0..400)) {
            let mut pending = Pending::default();
            let mut reference = BinaryHeap::new();
            let mut rising = 0;
            for (op, due, id) in ops {
                match op {
                    0 => {
                        let e = pending.pop();
                        proptest::prop_assert_eq!(e, reference.pop().map(|Reverse(e)| e));
                    }
                    1 => {
                        pending.push((due, id));
                        reference.push(Reverse((due, id)));
                    }
                    _ => {
                        rising += due % 3;
                        pending.push((rising, id));
                        reference.push(Reverse((rising, id)));
                    }
                }
                proptest::prop_assert_eq!(pending.peek(), reference.peek().map(|Reverse(e)| *e));
                proptest::prop_assert_eq!(pending.len(), reference.len());
            }
            let mut rest: Vec<(u64, u64)> = pending.iter().collect();
            rest.sort_unstable();
            let mut want: Vec<(u64, u64)> = reference.into_iter().map(|Reverse(e)| e).collect();
            want.sort_unstable();
            proptest::prop_assert_eq!(rest, want);
        }
    }
}
