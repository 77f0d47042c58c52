//! The saga runner's health check.

use tokio::sync::watch;

use crate::runner::*;

/// The saga runner in `/health`: `caught up`, `lagging`, `stalled` (handling an event failed:
/// down until one succeeds) or `down` (it stopped). Not essential: queries still work.
pub struct SagaRunnerHealth(pub watch::Receiver<SagaProgress>);

impl petstore_telemetry::health::HealthCheck for SagaRunnerHealth {
    fn name(&self) -> String {
        "saga_runner".to_owned()
    }

    fn essential(&self) -> bool {
        false
    }

    fn check(&self) -> futures::future::BoxFuture<'_, petstore_telemetry::health::ComponentHealth> {
        use petstore_telemetry::health::ComponentHealth;
        let progress = *self.0.borrow();
        let stopped = self.0.has_changed().is_err();
        Box::pin(async move {
            if stopped {
                ComponentHealth::down("in-process", "down: the saga runner stopped")
            } else if progress.failing {
                ComponentHealth::down(
                    "in-process",
                    "stalled: an event's handling failed; retrying from the checkpoint",
                )
            } else {
                let detail = progress.lag.lagging().unwrap_or_else(|| {
                    match progress.position {
                        Some(_) => "caught up",
                        None => "waiting for the first event",
                    }
                    .to_owned()
                });
                ComponentHealth::up("in-process", Some(detail))
            }
        })
    }
}
