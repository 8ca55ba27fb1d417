//! Retry schedules: how long to wait before the next try of something that failed for now.
//!
//! Pure arithmetic, used by delivery (a deferred recipient) and by the webhook senders (a
//! receiver that did not acknowledge). No I/O, no state.

use std::time::Duration;

/// `initial · 2^(attempt−1)`, capped at `max`, with ±20% jitter so retries of one burst spread.
/// In milliseconds.
pub fn retry_delay(attempt: u32, initial: Duration, max: Duration) -> u64 {
    let factor = 1u32 << attempt.saturating_sub(1).min(20);
    let base = initial.saturating_mul(factor).min(max).as_millis() as f64;
    (base * (0.8 + 0.4 * fastrand::f64())) as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_delay_doubles_with_jitter_and_caps() {
        let i = Duration::from_secs(60);
        let m = Duration::from_secs(3600);
        for (attempt, base) in [
            (1u32, 60_000f64),
            (2, 120_000.0),
            (3, 240_000.0),
            (10, 3_600_000.0),
        ] {
            for _ in 0..50 {
                let d = retry_delay(attempt, i, m) as f64;
                assert!(
                    d >= base * 0.8 - 1.0 && d <= base * 1.2 + 1.0,
                    "attempt {attempt}: {d}"
                );
            }
        }
    }
}
