//! Events the saga cannot handle: tried a few times, then set aside as dead letters; and
//! handled again when an operator asks (`petstore dead-letters retry`).

use std::time::Duration;

use cqrs_es::Aggregate;
use petstore_domain::delivery::Delivery;
use petstore_domain::order::Order;
use petstore_domain::payment::Payment;
use petstore_domain::providers::{DeliveryProvider, PaymentGateway};
use petstore_domain::OrderId;
use petstore_event_store::dead_letters;
use petstore_event_store::leases::CheckError;
use petstore_event_store::stream::{self, RecordedEvent};
use petstore_event_store::subscription::{retry_dead_letters, Retried};

use crate::error::*;
use crate::events::*;
use crate::runner::*;

impl<P: PaymentGateway + 'static, D: DeliveryProvider + 'static> SagaRunner<P, D> {
    /// Handles one event, trying again a few times; one that keeps failing because an
    /// aggregate's stored history cannot be read is set aside (the failure is the events',
    /// not the infrastructure's).
    pub(crate) async fn handle_persistently(
        &self,
        order_id: OrderId,
        event: &RecordedEvent,
        decoded: &Decoded,
    ) -> Result<(), SagaError> {
        let mut attempt = 1;
        loop {
            let Err(error) = self.handle_event(order_id, event, decoded).await else {
                return Ok(());
            };
            tracing::Span::current().record("otel.status_code", "ERROR");
            if let SagaError::LeaseLost(_) = error {
                // Not this runner's order any more: nothing to try again.
                return Err(error);
            }
            tracing::error!(%error, attempt, "saga step failed");
            if attempt >= HANDLING_ATTEMPTS {
                // Only a failure of the event's own (its history cannot be read) is set
                // aside; anything else is the infrastructure's: the batch fails and is
                // retried from the checkpoint, the runner shows stalled.
                if !error.is_poison() {
                    return Err(error);
                }
                return self.set_aside(event, &error).await;
            }
            tokio::time::sleep(Duration::from_millis(100 * u64::from(attempt))).await;
            attempt += 1;
        }
    }

    /// Records `event` as a dead letter of the saga, with `error`.
    pub(crate) async fn set_aside(
        &self,
        event: &RecordedEvent,
        error: &SagaError,
    ) -> Result<(), SagaError> {
        let order_id = match event.aggregate_type.as_str() {
            Order::TYPE | Payment::TYPE | Delivery::TYPE => {
                OrderId::parse(&event.aggregate_id).ok()
            }
            _ => None,
        };
        // Fenced: a runner that lost the order's partition sets nothing aside for it.
        let id = dead_letters::record_fenced(
            self.store.database(),
            CHECKPOINT,
            event,
            order_id.as_ref(),
            &error.to_string(),
        )
        .await
        .map_err(|error| match error {
            CheckError::Lost(lost) => SagaError::LeaseLost(lost),
            other => SagaError::DeadLetters(other.to_string()),
        })?;
        self.metrics.dead_letter_recorded(CHECKPOINT);
        tracing::warn!(
            dead_letter = id,
            %error,
            event_type = %event.event_type,
            aggregate_id = %event.aggregate_id,
            sequence = event.sequence,
            "event set aside as a dead letter; the saga moves on"
        );
        Ok(())
    }

    /// Handles again the saga's dead letters an operator asked to retry
    /// (`petstore dead-letters retry`): resolved when handled, pending again when not.
    pub async fn retry_dead_letters(&self) -> Result<usize, SagaError> {
        let database = self.store.database();
        retry_dead_letters(database, CHECKPOINT, |letter| async move {
            let event = stream::aggregate_events_newest_first(
                database,
                &letter.aggregate_type,
                &letter.aggregate_id,
                letter.sequence..letter.sequence + 1,
                1,
            )
            .await?
            .into_iter()
            .next();
            let Some(event) = event else {
                return Ok(Retried::Failed(
                    "the event is no longer in the log".to_owned(),
                ));
            };
            let outcome = match saga_event(&event) {
                Ok(Some((order_id, decoded))) => {
                    self.handle_event(order_id, &event, &decoded).await
                }
                Ok(None) => Ok(()),
                Err(error) => Err(error),
            };
            Ok(match outcome {
                Ok(()) => Retried::Handled,
                Err(error) => {
                    self.metrics.dead_letter_recorded(CHECKPOINT);
                    Retried::Failed(error.to_string())
                }
            })
        })
        .await
    }
}
