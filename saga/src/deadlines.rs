//! The deadline loop: fires the saga's due deadlines (a step that took too long cancels the
//! order; a held payment or a delivery retry looks again).

use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use cqrs_es::Aggregate;
use petstore_domain::order::{Order, OrderCommand};
use petstore_domain::providers::{DeliveryProvider, PaymentGateway};
use petstore_domain::SagaStep;
use petstore_event_store::deadlines::{self, Deadline, DeadlineKind};
use petstore_event_store::leases::Fence;
use petstore_event_store::store::EventMetadata;
use petstore_event_store::stream::{self};
use petstore_settings::Flag;
use petstore_telemetry::CorrelationId;
use tracing::Instrument;
use uuid::Uuid;

use crate::error::*;
use crate::events::*;
use crate::ownership::Owned;
use crate::runner::*;

/// Whether a due deadline is this runner's to fire.
enum Mine {
    /// Another runner's: its partition is not owned here.
    No,
    /// Fired without a fence (called directly, outside a running runner).
    Unfenced,
    /// Fired under its partition's fence.
    Under(Fence),
}

impl<P: PaymentGateway + 'static, D: DeliveryProvider + 'static> SagaRunner<P, D> {
    /// Fires the due deadlines of the partitions `owned` until `stopped`, each under its
    /// partition's fence.
    pub(crate) async fn fire_deadlines(
        &self,
        owned: tokio::sync::watch::Receiver<Owned>,
        mut stopped: tokio::sync::watch::Receiver<bool>,
    ) {
        let poll = Duration::from_millis(self.settings.deadline_poll_interval_ms.max(10));
        let partitions = self.settings.partitions();
        loop {
            let mine = |deadline: &Deadline| match &partitions {
                Ok(partitions) => owned
                    .borrow()
                    .get(&partitions.of_order(&deadline.order_id))
                    .map_or(Mine::No, |lease| {
                        Mine::Under(Fence {
                            owner: Arc::clone(&self.owner),
                            lease: *lease,
                        })
                    }),
                Err(_) => Mine::No,
            };
            if let Err(error) = self.fire_due_deadlines_of(mine).await {
                tracing::error!(%error, "firing deadlines failed; retrying");
            }
            if let Err(error) = self.retry_dead_letters().await {
                tracing::error!(%error, "retrying dead letters failed; trying again");
            }
            tokio::select! {
                _ = stopped.wait_for(|stop| *stop) => return,
                () = tokio::time::sleep(poll) => {}
            }
        }
    }

    /// Fires every deadline that is due now: cancels the order if it still waits for that
    /// step, then marks the deadline fired.
    pub async fn fire_due_deadlines(&self) -> Result<usize, SagaError> {
        self.fire_due_deadlines_of(|_| Mine::Unfenced).await
    }

    /// Fires the deadlines due now that are `mine`, each under its partition's fence.
    async fn fire_due_deadlines_of(
        &self,
        mine: impl Fn(&Deadline) -> Mine,
    ) -> Result<usize, SagaError> {
        let database = self.store.database();
        let due: Vec<(Deadline, Option<Fence>)> = deadlines::due(database, Utc::now(), 100)
            .await?
            .into_iter()
            .filter_map(|deadline| match mine(&deadline) {
                Mine::No => None,
                Mine::Unfenced => Some((deadline, None)),
                Mine::Under(fence) => Some((deadline, Some(fence))),
            })
            .collect();
        for (deadline, fence) in &due {
            let span = tracing::info_span!(
                parent: None,
                "saga deadline",
                otel.name = "saga deadline",
                order_id = %deadline.order_id,
                step = %deadline.kind,
                correlation_id = %deadline.correlation_id,
            );
            // Boxed: firing is deep (it may handle a step), and the fence nests it further.
            let fire = Box::pin(self.fire_deadline(deadline).instrument(span));
            match fence {
                Some(fence) => fence.clone().guard(fire).await?,
                None => fire.await?,
            }
        }
        Ok(due.len())
    }

    /// Fires one due deadline.
    pub(crate) async fn fire_deadline(&self, deadline: &Deadline) -> Result<(), SagaError> {
        let database = self.store.database();
        let step = match deadline.kind {
            DeadlineKind::PaymentHold => {
                return self.resume_step(deadline, "OrderPetReserved").await
            }
            DeadlineKind::DeliveryRetry => return self.resume_step(deadline, "OrderPaid").await,
            DeadlineKind::CompensationRetry => {
                return self.resume_step(deadline, "OrderCancelled").await
            }
            DeadlineKind::Step(step) => step,
        };
        let order_id = deadline.order_id;
        let order_key = order_id.to_string();
        if step == SagaStep::Payment {
            let order: Order = self.store.load(&order_key).await.map_err(store_error)?;
            let customer = order
                .request()
                .map(|request| request.customer_id.as_str().to_owned())
                .unwrap_or_default();
            if !self.live.flag(Flag::PaymentProcessing, &customer) {
                let timeout = self.live.current().settings.saga.payment_timeout_ms;
                let extended = Utc::now() + millis(timeout);
                tracing::info!(%extended, "payments are held: the payment deadline is extended");
                deadlines::rearm(
                    database,
                    &Deadline {
                        due_at: extended,
                        ..deadline.clone()
                    },
                )
                .await?;
                return Ok(());
            }
        }
        let command_id = Uuid::new_v5(
            &COMMAND_NAMESPACE,
            format!("deadline\u{0}{order_id}\u{0}{}", step.as_str()).as_bytes(),
        );
        let metadata = EventMetadata {
            causation_id: format!("deadline:{}:{}", order_id, step.as_str()),
            ..EventMetadata::caused_by(
                CorrelationId::parse(&deadline.correlation_id)
                    .unwrap_or_else(CorrelationId::generate),
                command_id,
                command_id,
                SUBJECT,
            )
        };
        self.send::<Order>(&order_key, OrderCommand::TimeOutStep { step }, metadata)
            .await?;
        deadlines::mark_fired(database, &order_id, deadline.kind).await?;
        Ok(())
    }
}

impl<P: PaymentGateway + 'static, D: DeliveryProvider + 'static> SagaRunner<P, D> {
    /// A waiting step is due for a look: a payment still held looks again later; else the
    /// order's `trigger` event (the one that started the step) is handled again, which calls
    /// the provider now (or makes the step wait anew). The step's own deadline still runs:
    /// when it falls due first, the order is cancelled and compensated as always.
    pub(crate) async fn resume_step(
        &self,
        deadline: &Deadline,
        trigger: &str,
    ) -> Result<(), SagaError> {
        let database = self.store.database();
        let order_id = deadline.order_id;
        let order_key = order_id.to_string();
        let order: Order = self.store.load(&order_key).await.map_err(store_error)?;
        let customer = order
            .request()
            .map(|request| request.customer_id.as_str().to_owned())
            .unwrap_or_default();
        if deadline.kind == DeadlineKind::PaymentHold
            && !self.live.flag(Flag::PaymentProcessing, &customer)
        {
            deadlines::rearm(
                database,
                &Deadline {
                    due_at: Utc::now() + PAYMENT_HOLD_RECHECK,
                    ..deadline.clone()
                },
            )
            .await?;
            return Ok(());
        }
        // Marked fired only at the time it fell due: held again meanwhile, it was re-armed
        // for later and stays.
        let started = stream::aggregate_events_newest_first(
            database,
            Order::TYPE,
            &order_key,
            1..i64::MAX,
            100,
        )
        .await?
        .into_iter()
        .find(|event| event.event_type == trigger);
        if let Some(event) = started {
            tracing::info!(order_id = %order_id, step = %deadline.kind, "resuming a waiting step");
            let decoded = Decoded::Order(decode(&event)?);
            self.handle_event(order_id, &event, &decoded).await?;
        }
        deadlines::mark_fired_at(database, deadline).await?;
        Ok(())
    }
}
