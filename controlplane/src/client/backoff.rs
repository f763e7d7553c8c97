//! The reconnect pacing of the Watch client.
//!
//! Owns [`Backoff`] (capped exponential backoff with jitter, backon's) and the delays of one
//! [`run`](super::run): the next one, and a restart after a stream that delivered a snapshot.
//! Pure: table-tested against backon's jitter bounds.
//!
//! Must not touch: connections, the view; it computes delays and never sleeps.

use std::time::Duration;

use backon::{BackoffBuilder as _, ExponentialBuilder};

/// Reconnect pacing: capped exponential backoff with jitter, so that nodes that lost the
/// control plane together do not reconnect in lockstep.
///
/// The `n`th delay (0-based) lies in `[d/2, d)` for `d = initial·2^n` capped at `max`: backon's
/// [`ExponentialBuilder`] is given half of each bound, and its jitter adds a random fraction
/// of up to as much again. So `initial` is the longest first wait and `max` the longest wait.
/// It never gives up; a stream that delivers a snapshot restarts it from `initial`.
#[derive(Clone, Copy, Debug)]
pub struct Backoff {
    /// The longest first delay.
    pub initial: Duration,
    /// The longest delay.
    pub max: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Self {
            initial: Duration::from_millis(200),
            max: Duration::from_secs(30),
        }
    }
}

impl Backoff {
    /// The backon builder of these delays.
    fn builder(&self) -> ExponentialBuilder {
        ExponentialBuilder::new()
            .with_jitter()
            .with_factor(2.0)
            .with_min_delay(self.initial / 2)
            .with_max_delay(self.max / 2)
            .without_max_times()
    }

    /// The delays of one client, from the first.
    pub(super) fn delays(&self) -> Delays {
        let builder = self.builder();
        Delays {
            builder,
            current: builder.build(),
            max: self.max,
        }
    }
}

/// The reconnect delays of one [`run`](super::run): the next one, and a restart after a good
/// stream.
#[derive(Debug)]
pub(super) struct Delays {
    builder: ExponentialBuilder,
    current: <ExponentialBuilder as backon::BackoffBuilder>::Backoff,
    max: Duration,
}

impl Delays {
    /// The delay before the next reconnect.
    pub(super) fn next(&mut self) -> Duration {
        // Without a limit on attempts backon's iterator does not end; were it to, the
        // longest delay is the safe answer.
        self.current.next().unwrap_or(self.max)
    }

    /// Starts again from the first delay (a stream delivered a snapshot).
    pub(super) fn reset(&mut self) {
        self.current = self.builder.build();
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;

    const MS: Duration = Duration::from_millis(1);

    /// Reaches its cap at the sixth delay.
    const BACKOFF: Backoff = Backoff {
        initial: Duration::from_millis(100),
        max: Duration::from_millis(3200),
    };

    /// Where each delay of [`BACKOFF`] must lie, by attempt: backon 1.6's jitter
    /// (`ExponentialBuilder::with_jitter`) adds `c·f` for a random `f` in `[0, 1)` to the
    /// un-jittered delay `c`, so a delay lies in `[c, 2c)`, and `c` is `initial/2` doubled per
    /// attempt up to `max/2`.
    const BOUNDS: [(u64, u64); 8] = [
        (50, 100),
        (100, 200),
        (200, 400),
        (400, 800),
        (800, 1600),
        (1600, 3200),
        (1600, 3200),
        (1600, 3200),
    ];

    /// Whether `d` lies in `[low, high)` ms. backon computes in f32 seconds, so each bound
    /// gets 10 parts per million of slack.
    fn within(d: Duration, (low, high): (u64, u64)) -> bool {
        let (low, high) = (MS * low as u32, MS * high as u32);
        let slack = high / 100_000;
        d + slack >= low && d < high + slack
    }

    #[test]
    fn delays_double_from_initial_up_to_the_cap_within_backons_jitter_bounds() {
        let mut top_at_cap = Duration::ZERO;
        for run in 0..200 {
            let mut delays = BACKOFF.delays();
            let mut previous = Duration::ZERO;
            for (attempt, bounds) in BOUNDS.iter().enumerate() {
                let d = delays.next();
                assert!(
                    within(d, *bounds),
                    "run {run}, attempt {attempt}: {d:?} not in {bounds:?} ms"
                );
                // Below the cap the ranges only touch, so a delay is never shorter than the
                // one before; at the cap they are all drawn from one range.
                if bounds.0 > BOUNDS[attempt.saturating_sub(1)].0 {
                    assert!(
                        d + d / 100_000 >= previous,
                        "run {run}, attempt {attempt}: {d:?} < {previous:?}"
                    );
                }
                previous = d;
            }
            // It never gives up and stays capped.
            for attempt in BOUNDS.len()..100 {
                let d = delays.next();
                assert!(
                    within(d, (1600, 3200)),
                    "run {run}, attempt {attempt}: {d:?}"
                );
                top_at_cap = top_at_cap.max(d);
            }
        }
        // Capped waits spread up to the cap, not stuck at its un-jittered half.
        assert!(
            top_at_cap > MS * 3000,
            "longest capped delay {top_at_cap:?}"
        );
    }

    #[test]
    fn first_delays_are_jittered_and_restart_after_a_good_stream() {
        let mut delays = BACKOFF.delays();
        let mut firsts = Vec::new();
        for _ in 0..200 {
            firsts.push(delays.next());
            // Some failures, then a stream that delivered a snapshot.
            for _ in 0..7 {
                delays.next();
            }
            delays.reset();
        }
        for d in &firsts {
            assert!(within(*d, BOUNDS[0]), "first delay {d:?} after a reset");
        }
        let distinct: BTreeSet<Duration> = firsts.iter().copied().collect();
        assert!(
            distinct.len() > 100,
            "only {} distinct first delays of 200",
            distinct.len()
        );
        // Both halves of [50, 100) ms are hit (each misses all 200 with probability 2^-200).
        let lower = firsts.iter().filter(|d| **d < MS * 75).count();
        assert!(
            lower > 0 && lower < firsts.len(),
            "{lower} of 200 below 75 ms"
        );
    }
}
