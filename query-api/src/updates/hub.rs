//! The hub of the live order updates: [`OrderUpdates`], its background task following the
//! read models' change notices, the broadcast per followed order, and the per-subject cap on
//! open connections.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use petstore_domain::OrderId;
use petstore_read_models::{OrderChanges, OrderStatusView, ReadModels};
use petstore_settings::OrderUpdateSettings;
use petstore_telemetry::metrics::Metrics;
use tokio::sync::{broadcast, watch};

/// The live order updates of one process: the hub every connection subscribes to.
#[derive(Clone)]
pub struct OrderUpdates(pub(crate) Arc<Hub>);

pub(crate) struct Hub {
    pub(crate) read_models: ReadModels,
    pub(crate) settings: OrderUpdateSettings,
    pub(crate) metrics: Metrics,
    /// A broadcast per followed order.
    pub(crate) followed: Mutex<HashMap<OrderId, broadcast::Sender<Arc<OrderStatusView>>>>,
    /// Open connections per subject.
    connections: Mutex<HashMap<String, u32>>,
    /// True once the process is shutting down: every connection closes.
    pub(crate) closing: watch::Sender<bool>,
}

pub(crate) fn locked<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl OrderUpdates {
    /// A hub over `read_models`; [`Self::run`] feeds it.
    pub fn new(read_models: ReadModels, settings: OrderUpdateSettings, metrics: Metrics) -> Self {
        Self(Arc::new(Hub {
            read_models,
            settings,
            metrics,
            followed: Mutex::default(),
            connections: Mutex::default(),
            closing: watch::channel(false).0,
        }))
    }

    /// Follows the read models' change notices and hands the followed orders' new views to
    /// their connections, until `shutdown`; then closes every connection.
    pub async fn run(self, shutdown: impl std::future::Future<Output = ()>) {
        tokio::pin!(shutdown);
        let hub = &self.0;
        let mut feed = None;
        loop {
            let changes = match feed.as_mut() {
                None => match hub.read_models.order_changes().await {
                    Ok(opened) => {
                        feed = Some(opened);
                        // Whatever changed before the feed opened is unknown.
                        Ok(OrderChanges::Unknown)
                    }
                    Err(error) => Err(error),
                },
                Some(feed) => tokio::select! {
                    () = &mut shutdown => break,
                    changes = feed.next() => changes,
                },
            };
            let delivered = match changes {
                Ok(OrderChanges::Orders(ids)) => hub.deliver(Some(&ids)).await,
                Ok(OrderChanges::Unknown) => hub.deliver(None).await,
                Err(error) => {
                    feed = None;
                    Err(error)
                }
            };
            if let Err(error) = delivered {
                tracing::warn!(%error, "live order updates: reading changes failed; retrying");
                tokio::select! {
                    () = &mut shutdown => break,
                    () = tokio::time::sleep(Duration::from_secs(1)) => {}
                }
                // Re-read everything followed once the store answers again.
                if feed.is_some() && hub.deliver(None).await.is_err() {
                    feed = None;
                }
            }
        }
        hub.closing.send_replace(true);
    }
}

impl Hub {
    /// Reads the views of the followed orders among `ids` (all followed ones for `None`) and
    /// broadcasts each to its connections.
    async fn deliver(
        &self,
        ids: Option<&[OrderId]>,
    ) -> Result<(), petstore_read_models::ReadModelError> {
        let wanted: Vec<OrderId> = {
            let followed = locked(&self.followed);
            match ids {
                Some(ids) => ids
                    .iter()
                    .filter(|id| followed.contains_key(*id))
                    .cloned()
                    .collect(),
                None => followed.keys().cloned().collect(),
            }
        };
        if wanted.is_empty() {
            return Ok(());
        }
        let views = self.read_models.orders(&wanted).await?;
        let followed = locked(&self.followed);
        for view in views {
            if let Some(sender) = followed.get(&view.order_id) {
                // No receiver left is fine: its connection just ended.
                let _ = sender.send(Arc::new(view));
            }
        }
        Ok(())
    }
}

/// A connection's place in the per-subject cap; given back when dropped.
pub(crate) struct Slot {
    hub: Arc<Hub>,
    subject: String,
}

impl Slot {
    pub(crate) fn acquire(hub: &Arc<Hub>, subject: &str) -> Option<Self> {
        let mut connections = locked(&hub.connections);
        let open = connections.entry(subject.to_owned()).or_default();
        if *open >= hub.settings.max_connections_per_subject {
            return None;
        }
        *open += 1;
        Some(Self {
            hub: hub.clone(),
            subject: subject.to_owned(),
        })
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut connections = locked(&self.hub.connections);
        if let Some(open) = connections.get_mut(&self.subject) {
            *open -= 1;
            if *open == 0 {
                connections.remove(&self.subject);
            }
        }
    }
}
