//! What operators did through the console: each write is an `OperatorActed` event (who, what,
//! on what, with which parameters, before and after) in one stream of its own, the
//! `OperatorAction` aggregate's `console` instance, so the actions keep their order and page
//! by sequence. An action about an order carries the order's correlation id, so it also
//! stands in that order's timeline; its `causation_id` is the console request's.

use cqrs_es::event_sink::EventSink;
use cqrs_es::{Aggregate, DomainEvent};
use petstore_domain::OrderId;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::database::Database;
use crate::metadata::EventMetadata;
use crate::store::EventStore;
use crate::stream::{self, RecordedEvent, StreamError};

/// The aggregate type of operator actions.
pub const AGGREGATE_TYPE: &str = "OperatorAction";

/// The one stream every operator action is appended to.
pub const AGGREGATE_ID: &str = "console";

/// What an operator did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ActionKind {
    /// Had a dead letter's consumer handle its event again.
    DeadLetterRetried,
    /// Discarded a dead letter.
    DeadLetterSkipped,
    /// Turned a feature flag on or off.
    FlagSet,
    /// Forced a circuit breaker open or closed, or back to automatic.
    BreakerForced,
    /// Started rebuilding a projection from the log (or a dry run of it).
    ReplayStarted,
}

impl ActionKind {
    /// Its name, as stored.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::DeadLetterRetried => "dead_letter_retried",
            Self::DeadLetterSkipped => "dead_letter_skipped",
            Self::FlagSet => "flag_set",
            Self::BreakerForced => "breaker_forced",
            Self::ReplayStarted => "replay_started",
        }
    }
}

/// One operator action, as stored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OperatorActed {
    /// What was done.
    pub action: ActionKind,
    /// What it was done to: `dead-letter 12`, `flag premium_filters`, `breaker payment`.
    pub target: String,
    /// The order it concerns, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub order_id: Option<OrderId>,
    /// What the operator asked, as sent.
    pub parameters: Value,
    /// The target before.
    pub before: Value,
    /// The target after.
    pub after: Value,
}

/// Events of the operator actions.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum OperatorEvent {
    /// An operator acted.
    OperatorActed(OperatorActed),
}

impl DomainEvent for OperatorEvent {
    fn event_type(&self) -> String {
        "OperatorActed".to_owned()
    }

    fn event_version(&self) -> String {
        "1.0".to_owned()
    }
}

/// Commands of the operator actions.
#[derive(Debug, Clone)]
pub enum OperatorCommand {
    /// Record an action.
    Record(OperatorActed),
}

/// Recording an action cannot be refused.
#[derive(Debug, thiserror::Error)]
#[error("never")]
pub enum Never {}

/// The operator actions, folded: only how many there are.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct OperatorActions {
    count: u64,
}

impl Aggregate for OperatorActions {
    const TYPE: &'static str = AGGREGATE_TYPE;
    type Command = OperatorCommand;
    type Event = OperatorEvent;
    type Error = Never;
    type Services = ();

    async fn handle(
        &mut self,
        command: Self::Command,
        _services: &Self::Services,
        sink: &EventSink<Self>,
    ) -> Result<(), Self::Error> {
        let OperatorCommand::Record(acted) = command;
        sink.write(OperatorEvent::OperatorActed(acted), self).await;
        Ok(())
    }

    fn apply(&mut self, _event: Self::Event) {
        self.count += 1;
    }
}

/// Recording an action failed.
#[derive(Debug, thiserror::Error)]
#[error("the operator action could not be recorded: {0}")]
pub struct RecordError(String);

/// Appends `acted` with `metadata` (the acting subject; for an action about an order, that
/// order's correlation id).
pub async fn record(
    store: &EventStore,
    acted: OperatorActed,
    metadata: &EventMetadata,
) -> Result<(), RecordError> {
    store
        .execute::<OperatorActions>(AGGREGATE_ID, OperatorCommand::Record(acted), &(), metadata)
        .await
        .map(|_| ())
        .map_err(|error| RecordError(error.to_string()))
}

/// An action as read back.
#[derive(Debug, Clone, PartialEq)]
pub struct RecordedAction {
    /// Its number in the stream of actions, from 1: the paging cursor.
    pub sequence: i64,
    /// When (RFC 3339).
    pub at: String,
    /// Who.
    pub subject: String,
    /// The correlation id it was recorded under.
    pub correlation_id: String,
    /// The action.
    pub acted: OperatorActed,
}

impl RecordedAction {
    /// `event` read as an action; `None` for another aggregate's event or one that does
    /// not decode.
    pub fn of(event: &RecordedEvent) -> Option<Self> {
        if event.aggregate_type != AGGREGATE_TYPE {
            return None;
        }
        let OperatorEvent::OperatorActed(acted) =
            serde_json::from_str(event.payload.raw().get()).ok()?;
        Some(Self {
            sequence: event.sequence,
            at: event.metadata.timestamp().unwrap_or_default().to_owned(),
            subject: event.metadata.subject().unwrap_or_default().to_owned(),
            correlation_id: event
                .metadata
                .correlation_id()
                .unwrap_or_default()
                .to_owned(),
            acted,
        })
    }
}

/// At most `limit` actions, newest first, before the action numbered `before` (all when
/// `None`).
pub async fn list(
    database: &Database,
    before: Option<i64>,
    limit: i64,
) -> Result<Vec<RecordedAction>, StreamError> {
    let events = stream::aggregate_events_newest_first(
        database,
        AGGREGATE_TYPE,
        AGGREGATE_ID,
        1..before.unwrap_or(i64::MAX),
        limit,
    )
    .await?;
    Ok(events.iter().filter_map(RecordedAction::of).collect())
}
