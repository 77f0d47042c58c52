//! The feed of changed order views: the notices the read models' commits send (on
//! [`ORDER_CHANGES_CHANNEL`] in Postgres, on an in-process channel in memory) and
//! [`OrderChangeFeed`], which delivers them.

use std::sync::Arc;

use petstore_domain::OrderId;

use sqlx::postgres::PgListener;
use tokio::sync::broadcast;

use crate::ReadModelError;

/// The in-memory read models' notices of changed orders.
#[derive(Debug)]
pub(crate) struct ChangeNotices(pub(crate) broadcast::Sender<Arc<[OrderId]>>);

impl Default for ChangeNotices {
    fn default() -> Self {
        Self(broadcast::channel(1024).0)
    }
}

/// The Postgres channel the read models' commits notify, with a comma-separated list of the
/// order ids they changed, or `*` when any order may have (a replay swapped the tables in).
pub const ORDER_CHANGES_CHANNEL: &str = "petstore_order_views";

/// Postgres refuses notification payloads of 8000 bytes and more.
const MAX_NOTICE_BYTES: usize = 7_900;

/// What [`OrderChangeFeed::next`] reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OrderChanges {
    /// These orders' views changed.
    Orders(Arc<[OrderId]>),
    /// Any order's view may have changed (notices were missed, the listener reconnected or a
    /// replay swapped the tables): re-read every order you follow.
    Unknown,
}

/// The notices of changed order views, in commit order, whichever process projected them.
pub struct OrderChangeFeed(pub(crate) Feed);

pub(crate) enum Feed {
    Postgres(PgListener),
    Memory(broadcast::Receiver<Arc<[OrderId]>>),
}

impl OrderChangeFeed {
    /// The next notice, waiting for one.
    pub async fn next(&mut self) -> Result<OrderChanges, ReadModelError> {
        match &mut self.0 {
            Feed::Postgres(listener) => match listener.try_recv().await? {
                // The connection dropped; the listener reconnects (and listens again) on the
                // next call, and anything notified in between is unknown.
                None => Ok(OrderChanges::Unknown),
                Some(notice) if notice.payload() == "*" => Ok(OrderChanges::Unknown),
                Some(notice) => Ok(OrderChanges::Orders(
                    // Only the read models' commits notify it, with ids they folded.
                    notice
                        .payload()
                        .split(',')
                        .filter_map(|id| OrderId::parse(id).ok())
                        .collect(),
                )),
            },
            Feed::Memory(receiver) => match receiver.recv().await {
                Ok(ids) => Ok(OrderChanges::Orders(ids)),
                Err(broadcast::error::RecvError::Lagged(_)) => Ok(OrderChanges::Unknown),
                // The sender lives as long as the read models do.
                Err(broadcast::error::RecvError::Closed) => std::future::pending().await,
            },
        }
    }
}

/// The notices of changed `ids` on [`ORDER_CHANGES_CHANNEL`].
pub(crate) fn order_notices(ids: &[OrderId]) -> impl Iterator<Item = (&'static str, String)> {
    notice_payloads(ids)
        .into_iter()
        .map(|payload| (ORDER_CHANGES_CHANNEL, payload))
}

/// Sends `notices` (channel, payload) in `transaction` (so at its commit), in one statement.
pub(crate) async fn notify(
    transaction: &mut sqlx::PgConnection,
    notices: Vec<(&'static str, String)>,
) -> Result<(), sqlx::Error> {
    if notices.is_empty() {
        return Ok(());
    }
    let (channels, payloads): (Vec<&str>, Vec<String>) = notices.into_iter().unzip();
    sqlx::query("SELECT pg_notify(channel, payload) FROM UNNEST($1::text[], $2::text[]) AS n(channel, payload)")
        .bind(channels)
        .bind(payloads)
        .execute(&mut *transaction)
        .await?;
    Ok(())
}

/// `ids` comma-separated, in as many payloads as Postgres's size limit needs.
fn notice_payloads(ids: &[OrderId]) -> Vec<String> {
    let mut payloads = Vec::new();
    let mut payload = String::new();
    for id in ids {
        let id = id.to_string();
        if !payload.is_empty() && payload.len() + 1 + id.len() > MAX_NOTICE_BYTES {
            payloads.push(std::mem::take(&mut payload));
        }
        if !payload.is_empty() {
            payload.push(',');
        }
        payload.push_str(&id);
    }
    if !payload.is_empty() {
        payloads.push(payload);
    }
    payloads
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn notices_carry_every_id_within_the_size_limit() {
        assert!(notice_payloads(&[]).is_empty());
        let one = OrderId::random();
        assert_eq!(notice_payloads(&[one]), vec![one.to_string()]);
        let ids: Vec<OrderId> = (0..1_000).map(|_| OrderId::random()).collect();
        let refs: Vec<String> = ids.iter().map(OrderId::to_string).collect();
        let payloads = notice_payloads(&ids);
        assert!(payloads.len() > 1, "a thousand ids need several notices");
        assert!(payloads
            .iter()
            .all(|payload| payload.len() <= MAX_NOTICE_BYTES));
        let back: Vec<&str> = payloads
            .iter()
            .flat_map(|payload| payload.split(','))
            .collect();
        assert_eq!(back, refs);
    }
}
