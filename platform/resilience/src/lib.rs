//! The policies every call to an outbound dependency goes through, composed (outermost
//! first) as: an overall timeout, retries with exponential backoff and full jitter under a
//! retry budget, a circuit breaker, a per-attempt timeout, a bulkhead.
//!
//! The bulkhead is tower-resilience's; the breaker is ours ([`breaker`]: modelled on
//! Resilience4j, a time window of buckets with a minimum number of calls, slow calls, bounded
//! half-open probes whose permit a cancelled probe gives back; O(1) per call, where
//! tower-resilience's time window scans a record per call); the retry budget is tower's
//! `TpsBudget`.
//! Only the dependency's failures count against the breaker (an error, a time-out): a final
//! answer (a declined card) does not, nor does a caller that went away (its attempt is
//! dropped unrecorded). A retry is never made into an open breaker.
//!
//! Each policy follows its `resilience.{dependency}` live settings: a changed policy is
//! rebuilt, its breaker starting closed, for the calls that start after the change. An admin
//! may force a breaker open or closed ([`Mode`]); breakers are per process.

use std::convert::Infallible;
use std::future::Future;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use serde::{Deserialize, Serialize};
use tower::retry::budget::{Budget, TpsBudget};
use tower::{Layer, ServiceExt};
use tower_resilience::bulkhead::{BulkheadHandle, BulkheadLayer, BulkheadServiceError};
use tracing::Instrument;
use utoipa::ToSchema;

use petstore_settings::DependencyPolicy;
use petstore_telemetry::metrics::{Metrics, BREAKER_CLOSED, BREAKER_HALF_OPEN, BREAKER_OPEN};

pub mod breaker;
mod policies;

pub use policies::Policies;

use breaker::{Breaker, BreakerState};

/// How long the retry budget remembers calls.
const BUDGET_WINDOW: Duration = Duration::from_secs(10);
/// What a caller refused by a full half-open breaker or a full bulkhead is told to wait.
const SHORT_WAIT: Duration = Duration::from_millis(250);

/// Whether a breaker decides for itself or an admin decided for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    /// Opens, half-opens and closes by the calls' outcomes.
    Automatic,
    /// Open until released: no call is made (maintenance).
    ForcedOpen,
    /// Closed until released: every call is made and none is counted.
    ForcedClosed,
}

impl Mode {
    /// The mode as written in the admin API and the console (`forced_open`).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Automatic => "automatic",
            Self::ForcedOpen => "forced_open",
            Self::ForcedClosed => "forced_closed",
        }
    }
}

/// Why no attempt was made.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Rejection {
    /// The breaker is open (or half-open with every probe taken).
    #[error("its circuit breaker is open")]
    BreakerOpen {
        /// When a call may be let through again.
        retry_after: Duration,
    },
    /// The bulkhead is full and no place freed within its wait.
    #[error("as many calls as its bulkhead allows are in flight")]
    BulkheadFull {
        /// A short wait before trying again.
        retry_after: Duration,
    },
}

impl Rejection {
    /// When trying again makes sense.
    pub fn retry_after(&self) -> Duration {
        match self {
            Rejection::BreakerOpen { retry_after } | Rejection::BulkheadFull { retry_after } => {
                *retry_after
            }
        }
    }
}

/// How one attempt failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AttemptFailure<E> {
    /// The dependency answered with a failure.
    Error(E),
    /// It did not answer in time.
    TimedOut(Duration),
}

impl<E: std::fmt::Display> std::fmt::Display for AttemptFailure<E> {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            AttemptFailure::Error(error) => error.fmt(formatter),
            AttemptFailure::TimedOut(after) => {
                write!(formatter, "no answer within {} ms", after.as_millis())
            }
        }
    }
}

/// Why a call through a [`Policy`] did not succeed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CallError<E> {
    /// The dependency answered, for good (not its failure): not retried, not counted.
    Refused(E),
    /// It failed: the last failure, after `attempts` attempts (fewer than allowed when the
    /// retry budget ran out, the breaker opened or the overall timeout struck).
    Failed {
        /// The last attempt's failure.
        failure: AttemptFailure<E>,
        /// Attempts made.
        attempts: u32,
    },
    /// No attempt was made.
    Rejected(Rejection),
}

impl<E: std::fmt::Display> std::fmt::Display for CallError<E> {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CallError::Refused(error) => error.fmt(formatter),
            CallError::Failed { failure, attempts } => {
                write!(formatter, "{failure} (after {attempts} attempts)")
            }
            CallError::Rejected(rejection) => rejection.fmt(formatter),
        }
    }
}

/// The outcome of one attempt that the breaker does not count as a failure.
enum Answer<T, E> {
    Value(T),
    Refused(E),
    BulkheadFull,
}

type AttemptResult<T, E> = Result<Answer<T, E>, AttemptFailure<E>>;

/// A dependency's breaker, bulkhead and budget, built from one version of its settings.
struct Guards {
    settings: DependencyPolicy,
    breaker: Breaker,
    bulkhead: BulkheadLayer,
    bulkhead_handle: BulkheadHandle,
    budget: TpsBudget,
}

/// Where a policy reads its settings, at each call.
pub type PolicySource = Arc<dyn Fn() -> DependencyPolicy + Send + Sync>;

struct PolicyInner {
    name: &'static str,
    source: PolicySource,
    metrics: Metrics,
    guards: Mutex<Arc<Guards>>,
    mode: Mutex<Mode>,
}

/// The policy of one dependency. Cheap to clone; clones share the breaker.
#[derive(Clone)]
pub struct Policy {
    inner: Arc<PolicyInner>,
}

/// A breaker's state, as `/admin/config` and `/admin/circuit-breakers` show it.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct BreakerStatus {
    /// `closed`, `open` or `half_open`.
    pub state: String,
    /// Whether the breaker decides itself or is forced.
    pub mode: Mode,
    /// Calls in its window.
    pub calls: usize,
    /// Failed calls in its window.
    pub failures: usize,
    /// Slow calls in its window.
    pub slow_calls: usize,
    /// Share of failures in the window, 0 to 1.
    pub failure_rate: f64,
    /// How long it has been in this state, in milliseconds.
    pub in_state_ms: u64,
    /// Open: when the probes start, in milliseconds.
    pub retry_after_ms: Option<u64>,
    /// Calls in flight (the bulkhead's count).
    pub in_flight: usize,
    /// The bulkhead's limit.
    pub max_concurrent: usize,
}

impl Policy {
    /// The policy of dependency `name` (as in `petstore_circuit_breaker_state`), following
    /// `source` at each call.
    pub fn new(name: &'static str, source: PolicySource, metrics: Metrics) -> Self {
        let guards = Guards::build(name, &source(), &metrics);
        metrics
            .circuit_breaker_state
            .get_or_create(&petstore_telemetry::metrics::DependencyLabels { dependency: name })
            .set(BREAKER_CLOSED);
        Self {
            inner: Arc::new(PolicyInner {
                name,
                source,
                metrics,
                guards: Mutex::new(Arc::new(guards)),
                mode: Mutex::new(Mode::Automatic),
            }),
        }
    }

    /// The dependency's name.
    pub fn name(&self) -> &'static str {
        self.inner.name
    }

    /// How many calls may run at once: the bulkhead's limit in force (unbounded when the
    /// policy is disabled).
    pub fn max_concurrent(&self) -> usize {
        let guards = self.guards();
        if guards.settings.enabled {
            guards.settings.bulkhead.max_concurrent as usize
        } else {
            usize::MAX
        }
    }

    /// The guards of the settings in force, rebuilt when those changed.
    fn guards(&self) -> Arc<Guards> {
        let wanted = (self.inner.source)();
        let mut guards = self
            .inner
            .guards
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if guards.settings != wanted {
            tracing::info!(
                dependency = self.inner.name,
                "resilience policy changed: its breaker starts closed"
            );
            *guards = Arc::new(Guards::build(self.inner.name, &wanted, &self.inner.metrics));
            self.publish_state(BreakerState::Closed);
        }
        Arc::clone(&guards)
    }

    fn mode(&self) -> Mode {
        *self
            .inner
            .mode
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    fn publish_state(&self, state: BreakerState) {
        let value = match (self.mode(), state) {
            (Mode::ForcedOpen, _) => BREAKER_OPEN,
            (Mode::ForcedClosed, _) => BREAKER_CLOSED,
            (Mode::Automatic, state) => gauge_value(state),
        };
        self.inner
            .metrics
            .circuit_breaker_state
            .get_or_create(&petstore_telemetry::metrics::DependencyLabels {
                dependency: self.inner.name,
            })
            .set(value);
    }

    /// Forces the breaker open or closed, or lets it decide again (starting closed).
    pub async fn set_mode(&self, mode: Mode) {
        let guards = self.guards();
        let before = std::mem::replace(
            &mut *self
                .inner
                .mode
                .lock()
                .unwrap_or_else(PoisonError::into_inner),
            mode,
        );
        if mode == Mode::Automatic && before != Mode::Automatic {
            guards.breaker.reset();
        }
        tracing::warn!(dependency = self.inner.name, ?before, now = ?mode, "circuit breaker mode set by an admin");
        self.publish_state(guards.breaker.snapshot().state);
    }

    /// The breaker's state now.
    pub async fn status(&self) -> BreakerStatus {
        let guards = self.guards();
        let snapshot = guards.breaker.snapshot();
        let mode = self.mode();
        let state = match (mode, snapshot.state) {
            (Mode::ForcedOpen, _) | (Mode::Automatic, BreakerState::Open) => "open",
            (Mode::ForcedClosed, _) | (Mode::Automatic, BreakerState::Closed) => "closed",
            (Mode::Automatic, BreakerState::HalfOpen) => "half_open",
        };
        BreakerStatus {
            state: state.to_owned(),
            mode,
            calls: snapshot.calls as usize,
            failures: snapshot.failures as usize,
            slow_calls: snapshot.slow_calls as usize,
            failure_rate: snapshot.failure_rate(),
            in_state_ms: millis(snapshot.in_state),
            retry_after_ms: snapshot
                .retry_after
                .filter(|_| mode == Mode::Automatic)
                .map(millis),
            in_flight: guards.bulkhead_handle.active_calls(),
            max_concurrent: guards.bulkhead_handle.max_concurrent(),
        }
    }

    /// Calls the dependency: `attempt` makes one attempt; `is_failure` says which of its
    /// errors are the dependency's failures (counted, retried) rather than final answers.
    pub async fn call<T, E, F, Fut>(
        &self,
        is_failure: fn(&E) -> bool,
        mut attempt: F,
    ) -> Result<T, CallError<E>>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, E>> + Send + 'static,
        T: Send + 'static,
        E: Send + 'static,
    {
        let guards = self.guards();
        if !guards.settings.enabled {
            return match self.attempt(&guards, is_failure, attempt(), 1).await {
                Ok(Answer::Value(value)) => Ok(value),
                Ok(Answer::Refused(error)) => Err(CallError::Refused(error)),
                Err(Some(failure)) => Err(CallError::Failed {
                    failure,
                    attempts: 1,
                }),
                Ok(Answer::BulkheadFull) | Err(None) => {
                    unreachable!("a disabled policy neither limits nor breaks")
                }
            };
        }
        let overall = Duration::from_millis(guards.settings.timeout_ms);
        let started = Instant::now();
        let mut attempts = 0;
        let mut last = None;
        let run = self.attempts(&guards, is_failure, &mut attempt, &mut attempts, &mut last);
        match tokio::time::timeout(overall, run).await {
            Ok(result) => result,
            Err(_) => {
                self.rejected("timeout");
                Err(CallError::Failed {
                    failure: last.unwrap_or(AttemptFailure::TimedOut(started.elapsed())),
                    attempts,
                })
            }
        }
    }

    async fn attempts<T, E, F, Fut>(
        &self,
        guards: &Guards,
        is_failure: fn(&E) -> bool,
        attempt: &mut F,
        attempts: &mut u32,
        last: &mut Option<AttemptFailure<E>>,
    ) -> Result<T, CallError<E>>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, E>> + Send + 'static,
        T: Send + 'static,
        E: Send + 'static,
    {
        let settings = &guards.settings;
        let max_attempts = settings.max_attempts.max(1);
        let mut backoff = Duration::from_millis(settings.initial_backoff_ms);
        let max_backoff = Duration::from_millis(settings.max_backoff_ms);
        guards.budget.deposit();
        let stopped_by = loop {
            match self
                .attempt(guards, is_failure, attempt(), *attempts + 1)
                .await
            {
                Ok(Answer::Value(value)) => return Ok(value),
                Ok(Answer::Refused(error)) => return Err(CallError::Refused(error)),
                Ok(Answer::BulkheadFull) if last.is_none() => {
                    self.rejected("bulkhead_full");
                    return Err(CallError::Rejected(Rejection::BulkheadFull {
                        retry_after: SHORT_WAIT,
                    }));
                }
                Err(None) if last.is_none() => {
                    self.rejected("breaker_open");
                    return Err(CallError::Rejected(Rejection::BreakerOpen {
                        retry_after: self.open_remaining(guards).await,
                    }));
                }
                // A retry refused: the caller learns the failure that made it a retry.
                Ok(Answer::BulkheadFull) => break "bulkhead_full",
                Err(None) => break "breaker_open",
                Err(Some(failure)) => {
                    *attempts += 1;
                    *last = Some(failure);
                }
            }
            if *attempts >= max_attempts {
                break "max_attempts";
            }
            if self.refuses_now(guards) {
                break "breaker_open";
            }
            if !guards.budget.withdraw() {
                self.rejected("retry_budget");
                break "retry_budget";
            }
            let jittered = fastrand::u64(0..=millis(backoff));
            tokio::time::sleep(Duration::from_millis(jittered)).await;
            backoff = backoff.saturating_mul(2).min(max_backoff);
        };
        tracing::info!(
            dependency = self.inner.name,
            attempts = *attempts,
            stopped_by,
            "call failed"
        );
        Err(CallError::Failed {
            failure: last
                .take()
                .unwrap_or(AttemptFailure::TimedOut(Duration::ZERO)),
            attempts: *attempts,
        })
    }

    /// Whether a call now would be refused without being made.
    fn refuses_now(&self, guards: &Guards) -> bool {
        match self.mode() {
            Mode::ForcedOpen => true,
            Mode::ForcedClosed => false,
            Mode::Automatic => guards.breaker.is_open(),
        }
    }

    async fn open_remaining(&self, guards: &Guards) -> Duration {
        let open_for = Duration::from_millis(guards.settings.breaker.open_ms);
        if self.mode() == Mode::ForcedOpen {
            return open_for;
        }
        match guards.breaker.snapshot().retry_after {
            Some(left) => left.max(Duration::from_millis(1)),
            None => SHORT_WAIT,
        }
    }

    fn rejected(&self, reason: &'static str) {
        self.inner
            .metrics
            .resilience_rejection(self.inner.name, reason);
    }

    /// One attempt: through the breaker (unless forced), under the attempt timeout, in the
    /// bulkhead; straight to the dependency when the policy is disabled. `Err(None)`: the
    /// breaker refused it.
    async fn attempt<T, E, Fut>(
        &self,
        guards: &Guards,
        is_failure: fn(&E) -> bool,
        call: Fut,
        number: u32,
    ) -> Result<Answer<T, E>, Option<AttemptFailure<E>>>
    where
        Fut: Future<Output = Result<T, E>> + Send + 'static,
        T: Send + 'static,
        E: Send + 'static,
    {
        let name = self.inner.name;
        let span = tracing::info_span!(
            "dependency call",
            otel.name = %format_args!("call {name}"),
            otel.kind = "client",
            otel.status_code = tracing::field::Empty,
            dependency = name,
            attempt = number,
            outcome = tracing::field::Empty,
        );
        let started = Instant::now();
        let outcome = if guards.settings.enabled {
            self.guarded(guards, is_failure, call)
                .instrument(span.clone())
                .await
        } else {
            match call.instrument(span.clone()).await {
                Ok(value) => Ok(Answer::Value(value)),
                Err(error) if is_failure(&error) => Err(Some(AttemptFailure::Error(error))),
                Err(error) => Ok(Answer::Refused(error)),
            }
        };
        let label = match &outcome {
            Ok(Answer::Value(_)) => "ok",
            Ok(Answer::Refused(_)) => "refused",
            Ok(Answer::BulkheadFull) => "bulkhead_full",
            Err(None) => "breaker_open",
            Err(Some(AttemptFailure::TimedOut(_))) => "timeout",
            Err(Some(AttemptFailure::Error(_))) => "unavailable",
        };
        span.record("outcome", label);
        if matches!(outcome, Err(Some(_))) {
            span.record("otel.status_code", "ERROR");
        }
        if !matches!(outcome, Err(None) | Ok(Answer::BulkheadFull)) {
            self.inner
                .metrics
                .provider_call(name, label, started.elapsed());
        }
        outcome
    }

    /// An attempt through the breaker (unless forced), the attempt timeout and the bulkhead.
    async fn guarded<T, E, Fut>(
        &self,
        guards: &Guards,
        is_failure: fn(&E) -> bool,
        call: Fut,
    ) -> Result<Answer<T, E>, Option<AttemptFailure<E>>>
    where
        Fut: Future<Output = Result<T, E>> + Send + 'static,
        T: Send + 'static,
        E: Send + 'static,
    {
        let limit = Duration::from_millis(guards.settings.attempt_timeout_ms);
        let bulkhead = guards
            .bulkhead
            .layer(tower::service_fn(run::<Result<T, E>>));
        let bounded: BoxFuture<'static, AttemptResult<T, E>> = Box::pin(async move {
            match tokio::time::timeout(limit, bulkhead.oneshot(Call(Box::pin(call)))).await {
                Err(_) => Err(AttemptFailure::TimedOut(limit)),
                Ok(Err(BulkheadServiceError::Bulkhead(_))) => Ok(Answer::BulkheadFull),
                Ok(Err(BulkheadServiceError::Inner(never))) => match never {},
                Ok(Ok(Ok(value))) => Ok(Answer::Value(value)),
                Ok(Ok(Err(error))) if is_failure(&error) => Err(AttemptFailure::Error(error)),
                Ok(Ok(Err(error))) => Ok(Answer::Refused(error)),
            }
        });
        match self.mode() {
            Mode::ForcedOpen => Err(None),
            Mode::ForcedClosed => bounded.await.map_err(Some),
            Mode::Automatic => {
                // Dropped unrecorded when the caller goes away: a probe's place is given back.
                let permit = guards.breaker.try_acquire().map_err(|_| None)?;
                match bounded.await {
                    // Not the dependency's doing: not counted.
                    Ok(Answer::BulkheadFull) => Ok(Answer::BulkheadFull),
                    Ok(answer) => {
                        permit.record(false);
                        Ok(answer)
                    }
                    Err(failure) => {
                        permit.record(true);
                        Err(Some(failure))
                    }
                }
            }
        }
    }
}

impl Guards {
    fn build(name: &'static str, settings: &DependencyPolicy, metrics: &Metrics) -> Self {
        if !settings.enabled {
            tracing::warn!(
                dependency = name,
                "resilience policy disabled (resilience.{name}.enabled: false): calls go straight to the dependency, with no timeout, retry, breaker or bulkhead"
            );
        }
        let gauge = metrics
            .circuit_breaker_state
            .get_or_create(&petstore_telemetry::metrics::DependencyLabels { dependency: name })
            .clone();
        let breaker = Breaker::new(settings.breaker.clone(), move |from, to| {
            gauge.set(gauge_value(to));
            let to = match to {
                BreakerState::Closed => "closed",
                BreakerState::HalfOpen => "half_open",
                BreakerState::Open => "open",
            };
            tracing::warn!(dependency = name, from = ?from, to, "circuit breaker state changed");
        });
        let (bulkhead, bulkhead_handle) = BulkheadLayer::builder()
            .name(name)
            .max_concurrent_calls(settings.bulkhead.max_concurrent as usize)
            .max_wait_duration(Duration::from_millis(settings.bulkhead.max_wait_ms))
            .build_with_handle()
            .unwrap_or_else(|error| {
                unreachable!("resilience.{name}.bulkhead was validated: {error}")
            });
        Self {
            settings: settings.clone(),
            breaker,
            bulkhead,
            bulkhead_handle,
            budget: TpsBudget::new(
                BUDGET_WINDOW,
                settings.retry_budget.min_per_second,
                settings.retry_budget.percent / 100.0,
            ),
        }
    }
}

/// A call handed to a tower service (a named type: a bare boxed future as the request trips
/// the compiler's higher-ranked `Send` inference).
struct Call<R>(BoxFuture<'static, R>);

/// The bulkhead's and the breaker's inner service: runs the call.
fn run<R: 'static>(call: Call<R>) -> BoxFuture<'static, Result<R, Infallible>> {
    Box::pin(async move { Ok(call.0.await) })
}

/// `petstore_circuit_breaker_state`'s value for `state`.
fn gauge_value(state: BreakerState) -> i64 {
    match state {
        BreakerState::Closed => BREAKER_CLOSED,
        BreakerState::HalfOpen => BREAKER_HALF_OPEN,
        BreakerState::Open => BREAKER_OPEN,
    }
}

fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    #[test]
    fn a_modes_name_is_how_the_admin_api_writes_it() {
        for mode in [Mode::Automatic, Mode::ForcedOpen, Mode::ForcedClosed] {
            assert_eq!(
                serde_json::to_value(mode).expect("json"),
                serde_json::json!(mode.as_str())
            );
        }
    }

    #[derive(Debug, Clone, PartialEq)]
    enum Failing {
        Down,
        Declined,
    }

    fn is_down(error: &Failing) -> bool {
        *error == Failing::Down
    }

    /// A policy with small numbers: at least 4 calls, opens at half, 2 probes.
    fn policy(tune: impl FnOnce(&mut DependencyPolicy)) -> (Policy, Metrics) {
        let mut settings = DependencyPolicy {
            max_attempts: 1,
            initial_backoff_ms: 1,
            ..DependencyPolicy::default()
        };
        settings.breaker.minimum_calls = 4;
        settings.breaker.open_ms = 150;
        settings.breaker.half_open_calls = 2;
        tune(&mut settings);
        let metrics = Metrics::new();
        let source: PolicySource = Arc::new(move || settings.clone());
        (Policy::new("payment", source, metrics.clone()), metrics)
    }

    async fn call(
        policy: &Policy,
        calls: &Arc<AtomicUsize>,
        result: Result<u32, Failing>,
    ) -> Result<u32, CallError<Failing>> {
        let calls = Arc::clone(calls);
        policy
            .call(is_down, move || {
                let calls = Arc::clone(&calls);
                let result = result.clone();
                async move {
                    calls.fetch_add(1, Ordering::SeqCst);
                    result
                }
            })
            .await
    }

    fn gauge(metrics: &Metrics) -> i64 {
        metrics
            .circuit_breaker_state
            .get_or_create(&petstore_telemetry::metrics::DependencyLabels {
                dependency: "payment",
            })
            .get()
    }

    #[tokio::test]
    async fn the_breaker_opens_at_its_ratio_fails_fast_probes_and_closes_or_reopens() {
        let (policy, metrics) = policy(|_| {});
        let calls = Arc::new(AtomicUsize::new(0));
        // Below the minimum number of calls nothing opens, whatever the ratio.
        for _ in 0..3 {
            assert!(matches!(
                call(&policy, &calls, Err(Failing::Down)).await,
                Err(CallError::Failed { attempts: 1, .. })
            ));
        }
        assert_eq!(policy.status().await.state, "closed");
        // The fourth call makes 4 calls with 3 failures (75 % >= 50 %): open.
        call(&policy, &calls, Ok(1)).await.expect("succeeds");
        let status = policy.status().await;
        assert_eq!(status.state, "open");
        assert!(
            status.retry_after_ms.is_some_and(|ms| ms <= 150),
            "{status:?}"
        );
        assert_eq!(gauge(&metrics), BREAKER_OPEN);
        // Open: refused at once, the dependency not called.
        let made = calls.load(Ordering::SeqCst);
        match call(&policy, &calls, Ok(1)).await {
            Err(CallError::Rejected(Rejection::BreakerOpen { retry_after })) => {
                assert!(retry_after <= Duration::from_millis(150));
            }
            other => panic!("fail fast expected, got {other:?}"),
        }
        assert_eq!(calls.load(Ordering::SeqCst), made);
        // After the cool-down: half-open, two probes; a failed probe reopens it at once.
        tokio::time::sleep(Duration::from_millis(200)).await;
        call(&policy, &calls, Ok(1)).await.expect("succeeds");
        assert_eq!(policy.status().await.state, "half_open");
        assert!(call(&policy, &calls, Err(Failing::Down)).await.is_err());
        assert_eq!(
            calls.load(Ordering::SeqCst),
            made + 2,
            "both probes were made"
        );
        assert_eq!(policy.status().await.state, "open", "a probe failed");
        // Cool-down again; both probes succeed: closed.
        tokio::time::sleep(Duration::from_millis(200)).await;
        call(&policy, &calls, Ok(1)).await.expect("succeeds");
        assert_eq!(policy.status().await.state, "half_open");
        assert_eq!(gauge(&metrics), BREAKER_HALF_OPEN);
        call(&policy, &calls, Ok(1)).await.expect("succeeds");
        assert_eq!(policy.status().await.state, "closed");
        assert_eq!(gauge(&metrics), BREAKER_CLOSED);
    }

    fn policy_slow() -> (Policy, Metrics) {
        policy(|settings| settings.breaker.slow_call_ms = 20)
    }

    #[tokio::test]
    async fn final_answers_are_not_failures_and_slow_calls_are() {
        let (policy, _) = policy_slow();
        let calls = Arc::new(AtomicUsize::new(0));
        for _ in 0..8 {
            assert!(matches!(
                call(&policy, &calls, Err(Failing::Declined)).await,
                Err(CallError::Refused(Failing::Declined))
            ));
        }
        assert_eq!(
            policy.status().await.state,
            "closed",
            "declines are answers"
        );
        let (policy, _) = policy_slow();
        for _ in 0..4 {
            policy
                .call(is_down, || async {
                    tokio::time::sleep(Duration::from_millis(40)).await;
                    Ok::<_, Failing>(1)
                })
                .await
                .expect("succeeds");
        }
        assert_eq!(policy.status().await.state, "open", "every call was slow");
    }

    #[tokio::test]
    async fn a_cancelled_probe_gives_its_permit_back() {
        let (policy, _) = policy(|settings| settings.breaker.half_open_calls = 1);
        let calls = Arc::new(AtomicUsize::new(0));
        for _ in 0..4 {
            let _ = call(&policy, &calls, Err(Failing::Down)).await;
        }
        assert_eq!(policy.status().await.state, "open");
        tokio::time::sleep(Duration::from_millis(200)).await;
        // The only probe hangs and its caller goes away.
        let hanging = policy.call(is_down, || async {
            tokio::time::sleep(Duration::from_secs(60)).await;
            Ok::<_, Failing>(1)
        });
        assert!(tokio::time::timeout(Duration::from_millis(50), hanging)
            .await
            .is_err());
        // Its permit came back: the next probe is made and closes the breaker.
        call(&policy, &calls, Ok(1)).await.expect("succeeds");
        assert_eq!(policy.status().await.state, "closed");
    }

    #[tokio::test]
    async fn retries_back_off_stop_at_the_budget_and_never_go_into_an_open_breaker() {
        // A budget of 1 retry per second (a reserve of 10) and no share of the calls: 8
        // failing calls would retry 16 times; 10 are allowed.
        let (policy, metrics) = policy(|settings| {
            settings.max_attempts = 3;
            settings.breaker.minimum_calls = 100;
            settings.retry_budget.percent = 0.0;
            settings.retry_budget.min_per_second = 1;
        });
        let calls = Arc::new(AtomicUsize::new(0));
        let mut attempts = Vec::new();
        for _ in 0..8 {
            match call(&policy, &calls, Err(Failing::Down)).await {
                Err(CallError::Failed { attempts: made, .. }) => attempts.push(made),
                other => panic!("{other:?}"),
            }
        }
        let retried: u32 = attempts.iter().map(|made| made - 1).sum();
        assert!(retried <= 11, "the budget bounds retries: {attempts:?}");
        assert!(
            attempts.iter().filter(|made| **made == 1).count() >= 2,
            "{attempts:?}"
        );
        assert!(metrics.render().contains("reason=\"retry_budget\""));

        // Failures that open the breaker mid-call end the call there.
        let (policy, _) = policy_with_retries();
        let calls = Arc::new(AtomicUsize::new(0));
        match call(&policy, &calls, Err(Failing::Down)).await {
            Err(CallError::Failed { attempts, .. }) => assert_eq!(attempts, 2),
            other => panic!("{other:?}"),
        }
        assert_eq!(calls.load(Ordering::SeqCst), 2);
    }

    fn policy_with_retries() -> (Policy, Metrics) {
        policy(|settings| {
            settings.max_attempts = 5;
            settings.breaker.minimum_calls = 2;
        })
    }

    #[tokio::test]
    async fn the_bulkhead_refuses_past_its_limit_after_its_wait() {
        let (policy, _) = policy(|settings| {
            settings.bulkhead.max_concurrent = 2;
            settings.bulkhead.max_wait_ms = 30;
        });
        let release = Arc::new(tokio::sync::Notify::new());
        let mut holders = Vec::new();
        for _ in 0..2 {
            let policy = policy.clone();
            let release = Arc::clone(&release);
            holders.push(tokio::spawn(async move {
                policy
                    .call(is_down, move || {
                        let release = Arc::clone(&release);
                        async move {
                            release.notified().await;
                            Ok::<_, Failing>(1)
                        }
                    })
                    .await
            }));
        }
        while policy.status().await.in_flight < 2 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let calls = Arc::new(AtomicUsize::new(0));
        match call(&policy, &calls, Ok(1)).await {
            Err(CallError::Rejected(Rejection::BulkheadFull { .. })) => {}
            other => panic!("refusal expected, got {other:?}"),
        }
        assert_eq!(calls.load(Ordering::SeqCst), 0);
        release.notify_waiters();
        for holder in holders {
            holder.await.expect("joined").expect("succeeds");
        }
        call(&policy, &calls, Ok(1)).await.expect("succeeds");
        assert_eq!(
            policy.status().await.state,
            "closed",
            "refusals are not failures"
        );
    }

    #[tokio::test]
    async fn an_admin_forces_a_breaker_and_a_changed_policy_starts_closed() {
        let shared = Arc::new(Mutex::new(DependencyPolicy::default()));
        let source = Arc::clone(&shared);
        let metrics = Metrics::new();
        let policy = Policy::new(
            "delivery",
            Arc::new(move || source.lock().expect("settings").clone()),
            metrics,
        );
        let calls = Arc::new(AtomicUsize::new(0));
        policy.set_mode(Mode::ForcedOpen).await;
        assert!(matches!(
            call(&policy, &calls, Ok(1)).await,
            Err(CallError::Rejected(Rejection::BreakerOpen { .. }))
        ));
        assert_eq!(calls.load(Ordering::SeqCst), 0);
        assert_eq!(policy.status().await.state, "open");
        policy.set_mode(Mode::ForcedClosed).await;
        for _ in 0..30 {
            let _ = call(&policy, &calls, Err(Failing::Down)).await;
        }
        assert_eq!(
            policy.status().await.state,
            "closed",
            "forced closed counts nothing"
        );
        policy.set_mode(Mode::Automatic).await;
        for _ in 0..10 {
            let _ = call(&policy, &calls, Err(Failing::Down)).await;
        }
        assert_eq!(policy.status().await.state, "open");
        shared.lock().expect("settings").breaker.open_ms = 9_000;
        assert_eq!(
            policy.status().await.state,
            "closed",
            "rebuilt by the change"
        );
    }

    #[tokio::test]
    async fn a_disabled_policy_calls_once_directly_and_never_opens() {
        let (policy, _) = policy(|settings| {
            settings.enabled = false;
            settings.max_attempts = 3;
        });
        let calls = Arc::new(AtomicUsize::new(0));
        for _ in 0..10 {
            match call(&policy, &calls, Err(Failing::Down)).await {
                Err(CallError::Failed { attempts: 1, .. }) => {}
                other => panic!("one failed attempt expected, got {other:?}"),
            }
        }
        assert_eq!(calls.load(Ordering::SeqCst), 10, "no retries");
        assert_eq!(policy.status().await.state, "closed");
    }
}
