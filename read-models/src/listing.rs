//! Listing orders for operators: by status, customer, when placed, and only the stuck ones,
//! newest first, a page at a time. Keyset on the global position of the event that placed
//! each order (ids do not give that order: an order placed under an idempotency key has a
//! UUIDv5).

use std::collections::BTreeSet;

use chrono::{DateTime, Utc};
use petstore_domain::{CustomerId, OrderId};

use crate::views::OrderStatusView;

/// A status an order's view can have: the order's own, and `compensating` while its saga
/// undoes what it did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum ViewStatus {
    /// Placed; the pet not yet reserved.
    Pending,
    /// The pet held.
    Reserved,
    /// Paid.
    Paid,
    /// The delivery scheduled.
    Scheduled,
    /// Done.
    Completed,
    /// Being undone.
    Compensating,
    /// Given up, every compensation recorded.
    Cancelled,
}

impl ViewStatus {
    /// Every status, in the saga's order.
    pub const ALL: [Self; 7] = [
        Self::Pending,
        Self::Reserved,
        Self::Paid,
        Self::Scheduled,
        Self::Completed,
        Self::Compensating,
        Self::Cancelled,
    ];

    /// The word the views hold.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Reserved => "reserved",
            Self::Paid => "paid",
            Self::Scheduled => "scheduled",
            Self::Completed => "completed",
            Self::Compensating => "compensating",
            Self::Cancelled => "cancelled",
        }
    }

    /// The status named `word`.
    pub fn parse(word: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|status| status.as_str() == word)
    }
}

/// Which orders; every field is optional.
#[derive(Debug, Clone, Default)]
pub struct OrderFilter {
    /// Only orders with this status.
    pub status: Option<ViewStatus>,
    /// Only this customer's orders.
    pub customer: Option<CustomerId>,
    /// Placed at or after this time.
    pub created_from: Option<DateTime<Utc>>,
    /// Placed before this time.
    pub created_to: Option<DateTime<Utc>>,
    /// Only these orders (the stuck ones, say).
    pub among: Option<BTreeSet<OrderId>>,
    /// Only orders placed before this global position (the previous page's cursor).
    pub before: Option<i64>,
    /// Page size.
    pub limit: u32,
}

impl OrderFilter {
    /// Whether `view` passes every filter but the cursor and `among`.
    pub(crate) fn admits(&self, view: &OrderStatusView) -> bool {
        let created = || DateTime::parse_from_rfc3339(&view.created_at).ok();
        self.status
            .is_none_or(|status| view.status == status.as_str())
            && self
                .customer
                .as_ref()
                .is_none_or(|customer| view.customer_id == *customer)
            && self
                .created_from
                .is_none_or(|from| created().is_some_and(|at| at >= from))
            && self
                .created_to
                .is_none_or(|to| created().is_some_and(|at| at < to))
    }
}

/// A page of orders, newest first.
#[derive(Debug, Clone, Default)]
pub struct OrderPage {
    /// The orders.
    pub orders: Vec<OrderStatusView>,
    /// The cursor of the next page (its `before`), when there is one.
    pub next_before: Option<i64>,
}

impl OrderPage {
    /// The first `limit` of `orders` (newest first, one more than a page when there is a
    /// next), with the cursor of the next page.
    pub(crate) fn of(mut orders: Vec<OrderStatusView>, limit: usize) -> Self {
        let next_before = (orders.len() > limit).then(|| {
            orders.truncate(limit);
            orders.last().map(placed_at)
        });
        Self {
            orders,
            next_before: next_before.flatten(),
        }
    }
}

/// The global position of the event that placed the order (its first status change); views
/// folded before the status history was kept start it at a later event.
pub(crate) fn placed_at(view: &OrderStatusView) -> i64 {
    view.status_history
        .first()
        .map_or(view.position.global_position, |first| {
            first.position.global_position
        })
}
