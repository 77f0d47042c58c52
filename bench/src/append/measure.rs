//! Measuring one workload: N writers for a fixed time, after a warm-up, into a
//! [`Measurement`] of throughput and latency.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use hdrhistogram::Histogram;

use crate::workload::{Appender, Workload};

/// Throughput and latency of one workload at one concurrency.
#[derive(Clone)]
pub(crate) struct Measurement {
    operations: u64,
    elapsed: Duration,
    /// Latency per operation, in microseconds.
    latency: Histogram<u64>,
}

impl Measurement {
    pub(crate) fn per_second(&self) -> f64 {
        self.operations as f64 / self.elapsed.as_secs_f64().max(f64::EPSILON)
    }

    pub(crate) fn quantile_ms(&self, quantile: f64) -> f64 {
        self.latency.value_at_quantile(quantile) as f64 / 1000.0
    }
}

fn new_histogram() -> anyhow::Result<Histogram<u64>> {
    // 1 µs to 100 s at 3 significant digits.
    Ok(Histogram::new_with_bounds(1, 100_000_000, 3)?)
}

/// Runs `workload` on `writers` concurrent tasks: unmeasured for `warmup`, then measured for
/// `duration`. An operation counts when it starts inside the measured window; the window ends
/// when the last such operation finishes.
pub(crate) async fn measure(
    appender: &Arc<Appender>,
    workload: Workload,
    writers: u32,
    warmup: Duration,
    duration: Duration,
) -> anyhow::Result<Measurement> {
    let measure_from = Instant::now() + warmup;
    let measure_until = measure_from + duration;
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..writers {
        let appender = Arc::clone(appender);
        tasks.spawn(async move {
            let mut latency = new_histogram()?;
            let mut operations = 0_u64;
            let mut finished = measure_from;
            loop {
                let started = Instant::now();
                if started >= measure_until {
                    break;
                }
                appender.append(workload).await?;
                let now = Instant::now();
                if started >= measure_from {
                    let micros =
                        u64::try_from(now.duration_since(started).as_micros()).unwrap_or(u64::MAX);
                    latency.saturating_record(micros.max(1));
                    operations += 1;
                    finished = now;
                }
            }
            anyhow::Ok((operations, finished, latency))
        });
    }
    let mut total = Measurement {
        operations: 0,
        elapsed: duration,
        latency: new_histogram()?,
    };
    while let Some(joined) = tasks.join_next().await {
        let (operations, finished, latency) = joined.context("a writer task panicked")??;
        total.operations += operations;
        total.elapsed = total.elapsed.max(finished.duration_since(measure_from));
        total.latency.add(&latency)?;
    }
    Ok(total)
}
