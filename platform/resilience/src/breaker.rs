//! A circuit breaker over a time window of buckets: recording a call and deciding whether to
//! let one through are O(1) and allocation-free, whatever the call rate.
//!
//! (tower-resilience's time-based window keeps one record per call and scans them all on
//! every call, O(calls in the window): at a few thousand Redis reads a second it took more
//! CPU than the reads. Its count-based window counts every call since the last transition,
//! not the last N. So this window follows Resilience4j's: `BUCKETS` partial sums, the oldest
//! evicted as time moves on, and a running total.)

use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use petstore_settings::BreakerSettings;

/// Buckets the window is divided in.
const BUCKETS: usize = 10;

/// Where a breaker stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BreakerState {
    /// Calls are made and counted.
    Closed,
    /// No call is made until the cool-down ends.
    Open,
    /// A bounded number of probes are let through.
    HalfOpen,
}

/// What a caller refused by the breaker is told.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Refused {
    /// When a call may be let through again (at least 1 ms).
    pub retry_after: Duration,
}

#[derive(Debug, Clone, Copy, Default)]
struct Counts {
    calls: u32,
    failures: u32,
    slow: u32,
}

impl Counts {
    fn add(&mut self, other: Counts) {
        self.calls += other.calls;
        self.failures += other.failures;
        self.slow += other.slow;
    }

    fn subtract(&mut self, other: Counts) {
        self.calls -= other.calls;
        self.failures -= other.failures;
        self.slow -= other.slow;
    }
}

/// The calls of the last `window`, in `BUCKETS` partial sums and their total.
struct Window {
    bucket: Duration,
    origin: Instant,
    /// The number (from `origin`) of the bucket `buckets[head % BUCKETS]` holds.
    head: u64,
    buckets: [Counts; BUCKETS],
    total: Counts,
}

impl Window {
    fn new(window: Duration) -> Self {
        Self {
            bucket: (window / BUCKETS as u32).max(Duration::from_millis(1)),
            origin: Instant::now(),
            head: 0,
            buckets: [Counts::default(); BUCKETS],
            total: Counts::default(),
        }
    }

    /// Evicts the buckets that fell out of the window by `now`.
    fn advance(&mut self, now: Instant) {
        let number = (now.duration_since(self.origin).as_nanos() / self.bucket.as_nanos()) as u64;
        let steps = number.saturating_sub(self.head).min(BUCKETS as u64);
        for step in 1..=steps {
            let slot = &mut self.buckets[((self.head + step) % BUCKETS as u64) as usize];
            self.total.subtract(*slot);
            *slot = Counts::default();
        }
        self.head = self.head.max(number);
    }

    fn record(&mut self, now: Instant, failure: bool, slow: bool) {
        self.advance(now);
        let call = Counts {
            calls: 1,
            failures: u32::from(failure),
            slow: u32::from(slow),
        };
        self.buckets[(self.head % BUCKETS as u64) as usize].add(call);
        self.total.add(call);
    }

    fn clear(&mut self) {
        self.buckets = [Counts::default(); BUCKETS];
        self.total = Counts::default();
    }
}

struct Inner {
    state: BreakerState,
    since: Instant,
    /// Bumped at every transition: a call let through before one is not counted after it.
    generation: u64,
    window: Window,
    /// Half-open: probes still to let through, and probes that succeeded.
    probes_left: u32,
    probes_passed: u32,
}

/// One breaker. `on_transition(from, to)` runs at every state change (under its lock: keep
/// it short).
pub struct Breaker {
    settings: BreakerSettings,
    inner: Mutex<Inner>,
    on_transition: Box<dyn Fn(BreakerState, BreakerState) + Send + Sync>,
}

/// A breaker's counts, as the admin routes show them.
#[derive(Debug, Clone, Copy)]
pub struct BreakerSnapshot {
    /// Its state.
    pub state: BreakerState,
    /// Calls in the window (closed) or probes that passed (half-open).
    pub calls: u32,
    /// Failed calls in the window.
    pub failures: u32,
    /// Slow calls in the window.
    pub slow_calls: u32,
    /// How long it has been in this state.
    pub in_state: Duration,
    /// Open: how long until the probes start.
    pub retry_after: Option<Duration>,
}

impl BreakerSnapshot {
    /// Share of failures in the window, 0 to 1.
    pub fn failure_rate(&self) -> f64 {
        if self.calls == 0 {
            0.0
        } else {
            f64::from(self.failures) / f64::from(self.calls)
        }
    }
}

/// Leave to make one call. Record its outcome with [`Permit::record`]; a permit dropped
/// unrecorded (the caller went away, the bulkhead refused) counts for nothing, and a probe's
/// place is given back.
pub struct Permit<'a> {
    breaker: &'a Breaker,
    generation: u64,
    probe: bool,
    started: Instant,
    recorded: bool,
}

impl Breaker {
    /// A closed breaker with `settings`.
    pub fn new(
        settings: BreakerSettings,
        on_transition: impl Fn(BreakerState, BreakerState) + Send + Sync + 'static,
    ) -> Self {
        let window = Window::new(Duration::from_millis(settings.window_ms));
        Self {
            settings,
            inner: Mutex::new(Inner {
                state: BreakerState::Closed,
                since: Instant::now(),
                generation: 0,
                window,
                probes_left: 0,
                probes_passed: 0,
            }),
            on_transition: Box::new(on_transition),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn open_for(&self) -> Duration {
        Duration::from_millis(self.settings.open_ms)
    }

    fn transition(&self, inner: &mut Inner, to: BreakerState) {
        let from = inner.state;
        inner.state = to;
        inner.since = Instant::now();
        inner.generation += 1;
        inner.window.clear();
        inner.probes_left = self.settings.half_open_calls;
        inner.probes_passed = 0;
        if from != to {
            (self.on_transition)(from, to);
        }
    }

    /// Leave to call now, or when to try again. An open breaker whose cool-down is over
    /// half-opens here.
    pub fn try_acquire(&self) -> Result<Permit<'_>, Refused> {
        let mut inner = self.lock();
        if inner.state == BreakerState::Open {
            let elapsed = inner.since.elapsed();
            let open_for = self.open_for();
            if elapsed < open_for {
                return Err(Refused {
                    retry_after: (open_for - elapsed).max(Duration::from_millis(1)),
                });
            }
            self.transition(&mut inner, BreakerState::HalfOpen);
        }
        let probe = inner.state == BreakerState::HalfOpen;
        if probe {
            if inner.probes_left == 0 {
                return Err(Refused {
                    retry_after: super::SHORT_WAIT,
                });
            }
            inner.probes_left -= 1;
        }
        Ok(Permit {
            breaker: self,
            generation: inner.generation,
            probe,
            started: Instant::now(),
            recorded: false,
        })
    }

    /// Whether a call now would be refused.
    pub fn is_open(&self) -> bool {
        let inner = self.lock();
        inner.state == BreakerState::Open && inner.since.elapsed() < self.open_for()
    }

    /// Closed again, with an empty window.
    pub fn reset(&self) {
        let mut inner = self.lock();
        self.transition(&mut inner, BreakerState::Closed);
    }

    /// Where it stands now.
    pub fn snapshot(&self) -> BreakerSnapshot {
        let mut inner = self.lock();
        inner.window.advance(Instant::now());
        let total = inner.window.total;
        let in_state = inner.since.elapsed();
        BreakerSnapshot {
            state: inner.state,
            calls: match inner.state {
                BreakerState::HalfOpen => inner.probes_passed,
                _ => total.calls,
            },
            failures: total.failures,
            slow_calls: total.slow,
            in_state,
            retry_after: (inner.state == BreakerState::Open)
                .then(|| self.open_for().saturating_sub(in_state)),
        }
    }

    fn record(&self, permit: &Permit<'_>, failure: bool) {
        let slow = permit.started.elapsed() >= Duration::from_millis(self.settings.slow_call_ms);
        let mut inner = self.lock();
        if inner.generation != permit.generation {
            return;
        }
        match inner.state {
            BreakerState::Closed => {
                inner.window.record(Instant::now(), failure, slow);
                let total = inner.window.total;
                let calls = f64::from(total.calls);
                let opens = total.calls >= self.settings.minimum_calls
                    && (f64::from(total.failures) / calls >= self.settings.failure_rate
                        || f64::from(total.slow) / calls >= self.settings.slow_call_rate);
                if opens {
                    self.transition(&mut inner, BreakerState::Open);
                }
            }
            BreakerState::HalfOpen if permit.probe => {
                if failure || slow {
                    self.transition(&mut inner, BreakerState::Open);
                } else {
                    inner.probes_passed += 1;
                    if inner.probes_passed >= self.settings.half_open_calls {
                        self.transition(&mut inner, BreakerState::Closed);
                    }
                }
            }
            BreakerState::HalfOpen | BreakerState::Open => {}
        }
    }
}

impl Permit<'_> {
    /// Counts the call: a failure of the dependency, or not. Its duration (since the permit
    /// was taken) decides whether it was slow.
    pub fn record(mut self, failure: bool) {
        self.recorded = true;
        self.breaker.record(&self, failure);
    }
}

impl Drop for Permit<'_> {
    fn drop(&mut self) {
        if self.recorded || !self.probe {
            return;
        }
        let mut inner = self.breaker.lock();
        if inner.generation == self.generation && inner.state == BreakerState::HalfOpen {
            inner.probes_left += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_window_forgets_calls_older_than_itself_and_keeps_exact_totals() {
        let mut window = Window::new(Duration::from_millis(1_000));
        let start = window.origin;
        for index in 0..10 {
            window.record(
                start + Duration::from_millis(index * 100),
                index % 2 == 0,
                false,
            );
        }
        assert_eq!(window.total.calls, 10);
        assert_eq!(window.total.failures, 5);
        // 1.05 s in: the first bucket (the call at 0 ms, a failure) has left.
        window.advance(start + Duration::from_millis(1_050));
        assert_eq!((window.total.calls, window.total.failures), (9, 4));
        // Long after: everything has left, whatever the gap.
        window.advance(start + Duration::from_secs(3_600));
        assert_eq!(window.total.calls, 0);
        window.record(start + Duration::from_secs(3_600), true, true);
        assert_eq!((window.total.calls, window.total.slow), (1, 1));
    }
}
