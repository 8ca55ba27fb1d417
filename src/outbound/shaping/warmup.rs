//! Warm-up counts: what each source with a warm-up schedule has sent to each provider group in
//! the current hour and day, against the schedule's caps for the source's day.
//!
//! Days count from the source's `warmup_start` (day 1 is that date, UTC); hours are clock hours
//! (of the schedule's `hour` length). Counts are kept in memory and written to the spool
//! (`meta`, under `warmup/`) at most once a second and at shutdown, so they survive restarts; a
//! crash may forget the last second's count, which lets that second's worth through again.

use std::collections::{HashMap, HashSet};
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

use crate::config::WarmupSchedule;
use crate::store::spool::{Durability, STATE_WARMUP, Spool, SpoolError};

#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
struct Count {
    /// The hour window (`now / hour`) `hour_sent` counts in.
    hour: u64,
    hour_sent: u64,
    /// The day since the start (0 = day 1) `day_sent` counts in.
    day: u64,
    day_sent: u64,
}

/// Where a source stands in its warm-up for one provider group.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Standing {
    pub group: String,
    /// Day of the warm-up (1 = the start date).
    pub day: u64,
    pub per_day: u64,
    pub sent_today: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub per_hour: Option<u64>,
    pub sent_this_hour: u64,
}

/// The counts, by (source, provider group).
#[derive(Default)]
pub struct Counts {
    map: Mutex<HashMap<(String, String), Count>>,
    dirty: Mutex<HashSet<(String, String)>>,
}

/// The day of the warm-up (0 = day 1) at `now`, for a schedule started at `start_ms`.
fn day_of(schedule: &WarmupSchedule, start_ms: u64, now: u64) -> u64 {
    now.saturating_sub(start_ms) / schedule.day_ms
}

/// The hour and day windows a message sent at `now` counts in, with their caps.
struct Window {
    day: u64,
    hour: u64,
    per_day: u64,
    per_hour: Option<u64>,
    /// Where the next day and hour windows start.
    next_day_ms: u64,
    next_hour_ms: u64,
}

impl Window {
    /// `None` past the schedule's last day: no cap.
    fn at(schedule: &WarmupSchedule, start_ms: u64, now: u64) -> Option<Window> {
        let day = day_of(schedule, start_ms, now);
        let &(per_day, per_hour) = schedule.days.get(usize::try_from(day).ok()?)?;
        let hour = now / schedule.hour_ms;
        Some(Window {
            day,
            hour,
            per_day,
            per_hour,
            next_day_ms: start_ms
                .saturating_add((day + 1).saturating_mul(schedule.day_ms))
                .max(now + 1),
            next_hour_ms: (hour + 1).saturating_mul(schedule.hour_ms),
        })
    }

    /// `c` with the counts of windows past reset.
    fn current(&self, mut c: Count) -> Count {
        if c.day != self.day {
            c.day = self.day;
            c.day_sent = 0;
        }
        if c.hour != self.hour {
            c.hour = self.hour;
            c.hour_sent = 0;
        }
        c
    }

    /// Room under both caps for counts `c` (of these windows), else when there will be.
    fn check(&self, c: &Count) -> Result<(), u64> {
        if c.day_sent >= self.per_day {
            return Err(self.next_day_ms);
        }
        if self.per_hour.is_some_and(|cap| c.hour_sent >= cap) {
            return Err(self.next_hour_ms);
        }
        Ok(())
    }
}

impl Counts {
    /// Loads the stored counts. Blocking.
    pub fn load(&self, spool: &Spool) -> Result<usize, SpoolError> {
        let mut map = self.map.lock().expect("warm-up counts lock");
        spool.scan_state(STATE_WARMUP, |k, v| {
            let key = String::from_utf8_lossy(k);
            let Some((source, group)) = key.split_once('\0') else {
                return;
            };
            match serde_json::from_slice::<Count>(v) {
                Ok(c) => {
                    map.insert((source.to_owned(), group.to_owned()), c);
                }
                Err(e) => {
                    tracing::warn!(key = %key, error = %e, "unreadable warm-up count dropped")
                }
            }
        })?;
        Ok(map.len())
    }

    /// Counts `n` messages from `source` to `group` if the caps of the source's day have room
    /// at `now` (a cap is reached when the count is at it; a group of recipients in one message
    /// may pass it by less than its size). `Err(t)`: full until `t`, the start of the next hour
    /// or day window. Past the schedule's last day there is no cap.
    pub fn take(
        &self,
        source: &str,
        group: &str,
        schedule: &WarmupSchedule,
        start_ms: u64,
        now: u64,
        n: u64,
    ) -> Result<(), u64> {
        let Some(w) = Window::at(schedule, start_ms, now) else {
            return Ok(());
        };
        let key = (source.to_owned(), group.to_owned());
        let mut map = self.map.lock().expect("warm-up counts lock");
        let c = map.entry(key.clone()).or_default();
        *c = w.current(*c);
        w.check(c)?;
        c.day_sent += n;
        c.hour_sent += n;
        drop(map);
        self.dirty.lock().expect("warm-up counts lock").insert(key);
        Ok(())
    }

    /// Whether `source` has room for one more message to `group` at `now`, without counting;
    /// `Err(t)` as [`Counts::take`].
    pub fn room(
        &self,
        source: &str,
        group: &str,
        schedule: &WarmupSchedule,
        start_ms: u64,
        now: u64,
    ) -> Result<(), u64> {
        let Some(w) = Window::at(schedule, start_ms, now) else {
            return Ok(());
        };
        let map = self.map.lock().expect("warm-up counts lock");
        let c = map
            .get(&(source.to_owned(), group.to_owned()))
            .copied()
            .unwrap_or_default();
        w.check(&w.current(c))
    }

    /// Where `source` stands with each group it has sent to, at `now`.
    pub fn standing(
        &self,
        source: &str,
        schedule: &WarmupSchedule,
        start_ms: u64,
        now: u64,
    ) -> Vec<Standing> {
        let Some(w) = Window::at(schedule, start_ms, now) else {
            return Vec::new();
        };
        let map = self.map.lock().expect("warm-up counts lock");
        let mut v: Vec<Standing> = map
            .iter()
            .filter(|((s, _), _)| s == source)
            .map(|((_, g), c)| {
                let c = w.current(*c);
                Standing {
                    group: g.clone(),
                    day: w.day + 1,
                    per_day: w.per_day,
                    sent_today: c.day_sent,
                    per_hour: w.per_hour,
                    sent_this_hour: c.hour_sent,
                }
            })
            .collect();
        v.sort_by(|a, b| a.group.cmp(&b.group));
        v
    }

    /// Writes the counts changed since the last flush.
    pub async fn flush(&self, spool: &Spool) -> Result<(), SpoolError> {
        let dirty: Vec<(String, String)> = self
            .dirty
            .lock()
            .expect("warm-up counts lock")
            .drain()
            .collect();
        if dirty.is_empty() {
            return Ok(());
        }
        let mut batch = spool.batch();
        {
            let map = self.map.lock().expect("warm-up counts lock");
            for key in &dirty {
                if let Some(c) = map.get(key) {
                    let k = format!("{}\0{}", key.0, key.1);
                    batch.put_state(
                        STATE_WARMUP,
                        k.as_bytes(),
                        &serde_json::to_vec(c).expect("a count serialises"),
                    );
                }
            }
        }
        let written = spool.write(batch, Durability::Sync).await;
        if written.is_err() {
            // Written with the next flush.
            self.dirty
                .lock()
                .expect("warm-up counts lock")
                .extend(dirty);
        }
        written
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn schedule() -> WarmupSchedule {
        WarmupSchedule {
            name: "t".into(),
            days: vec![(5, Some(2)), (8, None)],
            hour_ms: 1000,
            day_ms: 10_000,
        }
    }

    #[test]
    fn caps_per_hour_and_day_then_none_after_the_schedule() {
        let (s, c) = (schedule(), Counts::default());
        let start = 100_000;
        // Day 1, hour at 100_000: two an hour.
        assert_eq!(c.take("a", "g", &s, start, 100_000, 1), Ok(()));
        assert_eq!(c.take("a", "g", &s, start, 100_500, 1), Ok(()));
        assert_eq!(c.room("a", "g", &s, start, 100_600), Err(101_000));
        assert_eq!(c.take("a", "g", &s, start, 100_600, 1), Err(101_000));
        // Another group and another source count apart.
        assert_eq!(c.take("a", "h", &s, start, 100_600, 1), Ok(()));
        assert_eq!(c.take("b", "g", &s, start, 100_600, 1), Ok(()));
        // Next hours: the day's cap of five stops the sixth.
        assert_eq!(c.take("a", "g", &s, start, 101_000, 1), Ok(()));
        assert_eq!(c.take("a", "g", &s, start, 101_001, 1), Ok(()));
        assert_eq!(c.take("a", "g", &s, start, 102_000, 1), Ok(()));
        assert_eq!(c.take("a", "g", &s, start, 103_000, 1), Err(110_000));
        // Day 2: eight, no hourly cap.
        for i in 0..8 {
            assert_eq!(c.take("a", "g", &s, start, 110_000 + i, 1), Ok(()));
        }
        assert_eq!(c.take("a", "g", &s, start, 110_100, 1), Err(120_000));
        let st = c.standing("a", &s, start, 110_100);
        assert_eq!((st[0].day, st[0].per_day, st[0].sent_today), (2, 8, 8));
        // Day 3: warm.
        for i in 0..100 {
            assert_eq!(c.take("a", "g", &s, start, 120_000 + i, 1), Ok(()));
        }
    }
}
