//! Campaign rate limits (`max_rate`): a campaign's jobs wait here, in due order, and are let
//! into their domains' queues no faster than its rate.
//!
//! Holding them before the domain queues (rather than checking the limit when a domain is
//! served) keeps a limit across thousands of domains cheap: one release schedule entry per
//! campaign, and no domain is woken for a job it may not take. Jobs let in keep their due time
//! and are sent as any other job, within their site's limits, so the rate is an upper bound.
//!
//! The limiter is a GCRA of our own rather than `governor`'s: the scheduler needs the time of
//! the next allowed job without taking it, under its own lock.

use super::pending::Pending;
use crate::config::Rate;

/// Generic cell rate algorithm over milliseconds, with a burst of about 100 ms of traffic (at
/// least one job), as the site limiters have.
#[derive(Debug, Clone)]
pub struct Gcra {
    interval_ms: f64,
    tolerance_ms: f64,
    /// Theoretical arrival time of the next job.
    tat_ms: f64,
}

impl Gcra {
    pub fn new(rate: Rate) -> Gcra {
        Gcra::per_second(
            Rate {
                count: rate.count.max(1),
                ..rate
            }
            .per_second(),
        )
    }

    /// A limiter of `rate` events per second (more than 0).
    pub fn per_second(rate: f64) -> Gcra {
        let interval_ms = 1000.0 / rate.max(1e-6);
        let burst = (100.0 / interval_ms).floor().max(1.0);
        Gcra {
            interval_ms,
            tolerance_ms: (burst - 1.0) * interval_ms,
            tat_ms: 0.0,
        }
    }

    /// The first time a job is allowed.
    pub fn next_allowed(&self) -> u64 {
        (self.tat_ms - self.tolerance_ms).max(0.0).ceil() as u64
    }

    /// Takes one job's worth at `now` if allowed.
    pub fn try_take(&mut self, now: u64) -> bool {
        let now = now as f64;
        if self.tat_ms - self.tolerance_ms > now {
            return false;
        }
        self.tat_ms = self.tat_ms.max(now) + self.interval_ms;
        true
    }
}

/// A rate-limited campaign's jobs not yet let in: entries `(due, index << 32 | domain)`.
pub(super) struct Held {
    pub gcra: Gcra,
    pub jobs: Pending,
    /// This campaign's key in the index's release schedule, if it is there.
    pub scheduled_at: Option<u64>,
}

impl Held {
    pub fn new(rate: Rate) -> Held {
        Held {
            gcra: Gcra::new(rate),
            jobs: Pending::default(),
            scheduled_at: None,
        }
    }

    /// When the next job may be let in: its due time, but not before the limiter allows.
    pub fn next_release(&self) -> Option<u64> {
        let (due, _) = self.jobs.peek()?;
        Some(due.max(self.gcra.next_allowed()))
    }

    pub fn push(&mut self, due: u64, index: u32, domain: u32) {
        self.jobs
            .push((due, (u64::from(index) << 32) | u64::from(domain)));
    }

    /// The next job to let in at `now` (due, and allowed by the limiter), as
    /// `(due, index, domain)`.
    pub fn release(&mut self, now: u64) -> Option<(u64, u32, u32)> {
        if !self.jobs.is_due(now) || !self.gcra.try_take(now) {
            return None;
        }
        self.jobs.pop().map(split)
    }

    /// Every job, limiter or not (the limit was lifted).
    pub fn drain(&mut self) -> impl Iterator<Item = (u64, u32, u32)> + '_ {
        std::iter::from_fn(|| self.jobs.pop().map(split))
    }
}

fn split((due, v): (u64, u64)) -> (u64, u32, u32) {
    (due, (v >> 32) as u32, v as u32)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn rate(count: u32, secs: u64) -> Rate {
        Rate {
            count,
            per: Duration::from_secs(secs),
        }
    }

    #[test]
    fn gcra_spaces_jobs_by_the_interval_with_a_tenth_of_a_second_of_burst() {
        let mut g = Gcra::new(rate(600, 60));
        assert!(g.try_take(1000));
        assert!(!g.try_take(1000));
        assert_eq!(g.next_allowed(), 1100);
        assert!(g.try_take(1100));
        // 200/s: a burst of 20, then one per 5 ms.
        let mut g = Gcra::new(rate(200, 1));
        let burst = (0..100).filter(|_| g.try_take(5000)).count();
        assert_eq!(burst, 20);
        assert_eq!(g.next_allowed(), 5005);
        // Over 10 s, 10/s lets through 100 jobs (plus the first).
        let mut g = Gcra::new(rate(10, 1));
        let taken = (0..10_000u64).filter(|ms| g.try_take(*ms)).count();
        assert_eq!(taken, 100);
    }

    #[test]
    fn held_jobs_leave_in_due_order_at_the_rate() {
        let mut h = Held::new(rate(10, 1));
        h.push(50, 2, 7);
        h.push(0, 1, 7);
        h.push(0, 3, 8);
        assert_eq!(h.next_release(), Some(0));
        assert_eq!(h.release(0), Some((0, 1, 7)));
        assert_eq!(h.release(0), None);
        assert_eq!(h.next_release(), Some(100));
        assert_eq!(h.release(100), Some((0, 3, 8)));
        assert_eq!(h.release(150), None);
        assert_eq!(h.release(200), Some((50, 2, 7)));
        assert_eq!(h.next_release(), None);
        h.push(900, 4, 1);
        assert_eq!(h.drain().collect::<Vec<_>>(), vec![(900, 4, 1)]);
    }
}
