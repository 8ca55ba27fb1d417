//! A sorted run of pending jobs plus a min-heap for the few that arrive out of order: the
//! queue of one flow of one domain (see [`super::fair`]).

use std::cmp::Reverse;
use std::collections::{BinaryHeap, VecDeque};

/// A flow's pending entries ordered by (due, job id): earliest first, then campaign order.
///
/// Jobs mostly arrive in that order already (an upload's recipients are due at once with rising
/// ids; a retry is usually due after everything queued), so those go to the back of a sorted
/// run, taken from the front in O(1) and in memory order. Only a job that would break the run's
/// order (a retry due sooner than the run's last job, jobs of a paused campaign put back, a
/// campaign appended to in the same millisecond) goes to a min-heap. Popping takes the smaller
/// of the two heads. With a million jobs of one campaign queued, a heap pop is 20 cache-missing
/// levels; the run is a pointer bump.
#[derive(Default)]
pub(super) struct Pending {
    run: VecDeque<(u64, u64)>,
    heap: BinaryHeap<Reverse<(u64, u64)>>,
}

impl Pending {
    pub fn push(&mut self, entry: (u64, u64)) {
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

    pub fn peek(&self) -> Option<(u64, u64)> {
        if self.heap_first() {
            self.heap.peek().map(|Reverse(e)| *e)
        } else {
            self.run.front().copied()
        }
    }

    pub fn pop(&mut self) -> Option<(u64, u64)> {
        if self.heap_first() {
            self.heap.pop().map(|Reverse(e)| e)
        } else {
            self.run.pop_front()
        }
    }

    /// Moves up to `max` entries due by `now` to `out`, earliest first; returns how many.
    pub fn pop_due_into(&mut self, now: u64, max: usize, out: &mut Vec<(u64, u64)>) -> usize {
        let mut n = 0;
        while n < max {
            match self.peek() {
                Some((due, _)) if due <= now => {}
                _ => break,
            }
            let Some(e) = self.pop() else { break };
            out.push(e);
            n += 1;
        }
        n
    }

    /// Whether the first entry is due by `now`.
    pub fn is_due(&self, now: u64) -> bool {
        self.peek().is_some_and(|(due, _)| due <= now)
    }

    /// Makes every entry due at `now` at the latest (a cancelled campaign's jobs, to be ended
    /// at once). O(entries).
    pub fn expedite(&mut self, now: u64) {
        if self.iter().all(|(due, _)| due <= now) {
            return;
        }
        let mut all: Vec<(u64, u64)> = self.iter().map(|(due, id)| (due.min(now), id)).collect();
        all.sort_unstable();
        self.heap.clear();
        self.run = all.into();
    }

    pub fn len(&self) -> usize {
        self.run.len() + self.heap.len()
    }

    pub fn is_empty(&self) -> bool {
        self.run.is_empty() && self.heap.is_empty()
    }

    pub fn iter(&self) -> impl Iterator<Item = (u64, u64)> + '_ {
        self.run
            .iter()
            .copied()
            .chain(self.heap.iter().map(|Reverse(e)| *e))
    }

    pub fn capacity(&self) -> usize {
        self.run.capacity() + self.heap.capacity()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
