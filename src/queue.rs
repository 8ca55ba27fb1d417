//! The in-memory index of pending jobs: which job is due when, grouped by destination domain.
//!
//! Owns no I/O and never touches the spool: it is rebuilt from the spool at start and fed by ingest
//! after each durable commit. The delivery engine consumes it. Memory is the constraint (millions
//! of queued recipients), so an entry is 16 bytes: due time and job id. Domain names are interned
//! once; the address and variables stay on disk and are read when the job is sent.
//!
//! Interface for the delivery engine: [`QueueIndex::next_due`] says when a domain next has work
//! (the scheduler keeps its own timer wheel over domains), [`QueueIndex::pop_due`] hands out up to
//! N jobs due by a time, and [`QueueIndex::push`] puts a deferred job back with its new due time.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};

use crate::spool::JobId;

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

#[derive(Default)]
struct DomainQueue {
    /// Min-heap on (due, job id): earliest first, then campaign order.
    heap: BinaryHeap<Reverse<(u64, u64)>>,
}

/// Pending jobs per destination domain.
#[derive(Default)]
pub struct QueueIndex {
    names: Vec<Box<str>>,
    ids: HashMap<Box<str>, DomainId>,
    queues: Vec<DomainQueue>,
    len: usize,
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
        let id = DomainId(u32::try_from(self.names.len()).expect("fewer than 4 billion domains"));
        let name: Box<str> = domain.into();
        self.names.push(name.clone());
        self.ids.insert(name, id);
        self.queues.push(DomainQueue::default());
        id
    }

    pub fn domain_name(&self, id: DomainId) -> &str {
        &self.names[id.0 as usize]
    }

    pub fn push(&mut self, job: PendingJob) {
        self.queues[job.domain.0 as usize]
            .heap
            .push(Reverse((job.due_ms, u64::from(job.id))));
        self.len += 1;
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
            .map_or(0, |q| q.heap.len())
    }

    /// The earliest due time of `domain`, if it has pending jobs.
    pub fn next_due(&self, domain: DomainId) -> Option<u64> {
        self.queues
            .get(domain.0 as usize)?
            .heap
            .peek()
            .map(|Reverse((due, _))| *due)
    }

    /// Removes and returns up to `max` jobs of `domain` due at or before `now_ms`, earliest first.
    pub fn pop_due(&mut self, domain: DomainId, now_ms: u64, max: usize) -> Vec<PendingJob> {
        let mut out = Vec::new();
        let Some(q) = self.queues.get_mut(domain.0 as usize) else {
            return out;
        };
        while out.len() < max {
            match q.heap.peek() {
                Some(Reverse((due, _))) if *due <= now_ms => {
                    let Some(Reverse((due_ms, id))) = q.heap.pop() else {
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
        out
    }

    /// Domains that have pending jobs, with their earliest due time.
    pub fn domains(&self) -> impl Iterator<Item = (DomainId, u64)> + '_ {
        self.queues.iter().enumerate().filter_map(|(i, q)| {
            q.heap
                .peek()
                .map(|Reverse((due, _))| (DomainId(i as u32), *due))
        })
    }

    /// Approximate heap bytes held, for the memory budget.
    pub fn heap_bytes(&self) -> usize {
        let entries: usize = self.queues.iter().map(|q| q.heap.capacity() * 16).sum();
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
