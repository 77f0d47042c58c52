//! The projection loop: read the global stream from the read models' checkpoint, apply each
//! batch, repeat. Errors are logged and retried from the last committed checkpoint, so the
//! read models never skip an event.

use std::future::Future;
use std::time::Duration;

use petstore_platform::event_store::EventStore;
use petstore_platform::settings::ProjectorSettings;
use petstore_platform::stream::{self, StreamPosition, StreamReader};
use tokio::sync::watch;

use crate::read_models::ReadModels;

/// How far the projector has come.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ProjectorProgress {
    /// The position the read models reflect.
    pub position: StreamPosition,
    /// Whether the read models have reached what was committed when the projector started
    /// (rebuilt or resumed); stays true afterwards.
    pub caught_up: bool,
}

/// Keeps the read models current.
pub struct Projector {
    store: EventStore,
    read_models: ReadModels,
    settings: ProjectorSettings,
    progress: watch::Sender<ProjectorProgress>,
}

impl Projector {
    /// A projector of `store`'s stream into `read_models`.
    pub fn new(store: EventStore, read_models: ReadModels, settings: ProjectorSettings) -> Self {
        Self {
            store,
            read_models,
            settings,
            progress: watch::Sender::new(ProjectorProgress::default()),
        }
    }

    /// Follows the projector's progress.
    pub fn progress(&self) -> watch::Receiver<ProjectorProgress> {
        self.progress.subscribe()
    }

    /// Projects until `shutdown` resolves. A batch being applied when it does still commits.
    pub async fn run(self, shutdown: impl Future<Output = ()>) {
        tokio::pin!(shutdown);
        loop {
            let start = match self.read_models.position().await {
                Ok(position) => position,
                Err(error) => {
                    tracing::error!(%error, "cannot read the projector checkpoint; retrying");
                    tokio::select! {
                        () = &mut shutdown => return,
                        () = tokio::time::sleep(Duration::from_secs(1)) => continue,
                    }
                }
            };
            // Caught up means: at or past what was committed when the projector (re)started.
            // An empty read does not prove it: on Postgres an older open transaction anywhere
            // in the cluster hides newer events until it ends.
            let head = match stream::head_position(self.store.database()).await {
                Ok(head) => head,
                Err(error) => {
                    tracing::error!(%error, "cannot read the stream head; retrying");
                    tokio::select! {
                        () = &mut shutdown => return,
                        () = tokio::time::sleep(Duration::from_secs(1)) => continue,
                    }
                }
            };
            let mut reader = StreamReader::new(
                &self.store,
                start,
                self.settings.batch_size,
                self.settings.poll_interval(),
            );
            self.progress.send_modify(|progress| {
                progress.position = start;
                progress.caught_up |= start >= head;
            });
            loop {
                let batch = tokio::select! {
                    () = &mut shutdown => return,
                    batch = reader.next_batch_or_idle() => batch,
                };
                let result = match batch {
                    Ok(None) => continue,
                    Ok(Some(events)) => self.read_models.apply(&events).await.map(|()| events),
                    Err(error) => Err(error.into()),
                };
                match result {
                    Ok(events) => {
                        self.progress.send_modify(|progress| {
                            progress.position = reader.position();
                            progress.caught_up |= progress.position >= head;
                        });
                        tracing::debug!(events = events.len(), "projected");
                    }
                    Err(error) => {
                        tracing::error!(%error, "projecting failed; resuming from the checkpoint");
                        tokio::select! {
                            () = &mut shutdown => return,
                            () = tokio::time::sleep(Duration::from_secs(1)) => break,
                        }
                    }
                }
            }
        }
    }
}
