//! How far the read models have got, as their commits tell it: [`Progress`], which a query
//! waiting for its reader's write (read-your-writes) waits on, instead of reading the
//! checkpoint again every few milliseconds.
//!
//! On Postgres each commit of the read models notifies [`PROGRESS_CHANNEL`] with the position
//! it moved the checkpoint to (in the same transaction, so the notice is delivered only once
//! the views are visible, and in commit order), whichever process projected it; one
//! listening connection per process follows them. In memory, the fold sets it.

use std::time::Duration;

use petstore_event_store::database::Database;
use petstore_event_store::stream::{self, StreamPosition};
use sqlx::postgres::PgListener;
use sqlx::PgPool;
use tokio::sync::watch;
use tokio::time::Instant;

use crate::ReadModelError;

/// The Postgres channel the read models' commits notify with their new position (the
/// consistency token's form, `t{transaction}p{position}`).
pub const PROGRESS_CHANNEL: &str = "petstore_read_models_progress";

/// The read models' position as last told: never ahead of what a read sees.
#[derive(Debug, Clone)]
pub struct Progress(pub(crate) watch::Receiver<StreamPosition>);

impl Progress {
    /// The position last told.
    pub fn current(&self) -> StreamPosition {
        *self.0.borrow()
    }

    /// Waits until the read models reach `position`; false when `deadline` comes first.
    pub async fn reached(&self, position: StreamPosition, deadline: Instant) -> bool {
        let mut receiver = self.0.clone();
        let waited = tokio::time::timeout_at(deadline, async {
            receiver.wait_for(|at| *at >= position).await.is_ok()
        })
        .await;
        waited.unwrap_or(false)
    }
}

/// Follows [`PROGRESS_CHANNEL`] on a connection of its own: the position as the read models'
/// `checkpoint` holds it now, then as each commit tells it. Ends when every [`Progress`] is
/// dropped.
pub(crate) async fn follow_postgres(
    pool: &PgPool,
    checkpoint: &'static str,
) -> Result<Progress, ReadModelError> {
    let mut listener = PgListener::connect_with(pool).await?;
    listener.listen(PROGRESS_CHANNEL).await?;
    // Read after listening: nothing committed in between is missed.
    let database = Database::Postgres(pool.clone());
    let start = stream::load_checkpoint(&database, checkpoint).await?;
    let (sender, receiver) = watch::channel(start);
    tokio::spawn(async move {
        loop {
            tokio::select! {
                () = sender.closed() => return,
                notice = listener.try_recv() => match notice {
                    Ok(Some(notice)) => match StreamPosition::from_token(notice.payload()) {
                        Some(position) => {
                            sender.send_replace(position);
                        }
                        None => tracing::warn!(payload = notice.payload(), "a progress notice not understood"),
                    },
                    // The connection dropped (the listener reconnects on the next call):
                    // notices may have been missed, so read where the checkpoint stands.
                    Ok(None) => reread(&database, checkpoint, &sender).await,
                    Err(error) => {
                        tracing::warn!(%error, "following the read models' progress failed; trying again in a second");
                        tokio::time::sleep(Duration::from_secs(1)).await;
                        reread(&database, checkpoint, &sender).await;
                    }
                },
            }
        }
    });
    Ok(Progress(receiver))
}

/// Sets the position to `checkpoint`'s, read now.
async fn reread(database: &Database, checkpoint: &str, sender: &watch::Sender<StreamPosition>) {
    match stream::load_checkpoint(database, checkpoint).await {
        Ok(position) => {
            sender.send_replace(position);
        }
        Err(error) => tracing::warn!(%error, "reading the read models' checkpoint failed"),
    }
}

/// The notice of `position`, as [`PROGRESS_CHANNEL`] carries it.
pub(crate) fn notice(position: StreamPosition) -> (&'static str, String) {
    (PROGRESS_CHANNEL, position.to_token())
}
