//! An order's timeline: what happened to it and what it waits for, in one document.
//!
//! Folded on demand from what the event store records of the order: its events (every event
//! sharing its correlation id, in commit order), the saga steps the order status view's fold
//! sees start and end, its deadlines (scheduled or extended, fired, or cancelled by the
//! saga's end), its dead letters, and who owns its saga partition. `GET
//! /petstore-domain/admin/orders/{id}/timeline` and `petstore explain` both answer
//! [`of_order`]'s document, so they cannot disagree.
//!
//! Events stay in commit order; every other entry goes before the first event recorded
//! after it (by time), so the merge never reorders the log.

use std::collections::BTreeSet;

use chrono::{DateTime, SecondsFormat, TimeZone, Utc};
use petstore_domain::OrderId;
use petstore_event_store::database::Database;
use petstore_event_store::dead_letters::{self, DeadLetter};
use petstore_event_store::deadlines::{self, DeadlineEnd, DeadlineKind, DeadlineRecord};
use petstore_event_store::leases;
use petstore_event_store::operator;
use petstore_event_store::published::{self, Published};
use petstore_event_store::records::{self, AttemptOutcome, ProviderAttempt, RefusedCommand};
use petstore_event_store::stream::{self, RecordedEvent};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::views::{OrderStatusView, SagaStepView};
use crate::ReadModelError;

/// How long past its due time an armed deadline may wait before the order counts as stuck:
/// the saga's deadline loop looks at least once a second, so one this late was not fired.
pub const OVERDUE_AFTER: chrono::Duration = chrono::Duration::seconds(5);

/// The most entries one page of a timeline holds.
pub const MAX_PAGE: usize = 500;

/// The subject of the saga's own commands (the saga runner's).
const SAGA_SUBJECT: &str = "saga";
/// The subject of commands the service makes by itself (the demo catalog).
const SYSTEM_SUBJECT: &str = "system";

/// An order's timeline, or one page of it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Timeline {
    /// The order.
    #[schema(value_type = String, format = Uuid)]
    pub order_id: OrderId,
    /// When the document was read (RFC 3339): the time [`Now`]'s time left is counted from.
    pub as_of: String,
    /// Where the order stands now.
    pub now: Now,
    /// How many entries the whole timeline has.
    pub total_entries: usize,
    /// This page's entries, in order.
    pub entries: Vec<TimelineEntry>,
    /// The `after` that asks for the next page, when there is one.
    pub next_after: Option<usize>,
}

/// The verdict on an order: `petstore explain`'s exit code.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    /// Completed or cancelled, nothing left to do or undo, no dead letter open (exit 0).
    Terminal,
    /// Its saga is running and nothing is overdue (exit 3).
    InFlight,
    /// A deadline is overdue, or a dead letter of the order is open (exit 4).
    Stuck,
}

impl Verdict {
    /// Its name, as the JSON document spells it.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Terminal => "terminal",
            Self::InFlight => "in_flight",
            Self::Stuck => "stuck",
        }
    }
}

/// Where an order stands now.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Now {
    /// The order's status, as `GET /orders/{id}/status` shows it.
    pub status: String,
    /// Why it was cancelled, when it was.
    pub cancellation_reason: Option<String>,
    /// Terminal, in flight or stuck.
    pub verdict: Verdict,
    /// Why it is stuck (empty unless it is).
    pub stuck_because: Vec<String>,
    /// What its saga waits for: a step (`reservation`, `payment`, `delivery`,
    /// `completion`) or `compensations`; absent when terminal.
    pub waiting_for: Option<String>,
    /// The armed deadline of what it waits for.
    pub deadline: Option<ArmedDeadline>,
    /// The next try of a held payment, a delivery waiting for its provider's breaker, or a
    /// compensation a provider did not take yet.
    pub next_retry: Option<ArmedDeadline>,
    /// The last error: an open dead letter's, the last provider attempt's that failed, or
    /// the failed step's reason.
    pub last_error: Option<String>,
    /// The latest provider call: its attempts so far and how the last one ended.
    pub last_call: Option<ProviderCall>,
    /// The saga's steps.
    pub steps: Vec<SagaStepView>,
    /// The saga partition the order belongs to and who owns it.
    pub owner: Option<PartitionOwner>,
}

/// A deadline still armed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ArmedDeadline {
    /// `reservation`, `payment`, `delivery`, `payment_hold`, `delivery_retry` or
    /// `compensation_retry`.
    pub kind: String,
    /// When it falls due (RFC 3339).
    pub due_at: String,
    /// Milliseconds from `as_of` until it falls due; negative when overdue.
    pub time_left_ms: i64,
    /// How often it was armed: for a retry, the tries scheduled so far.
    pub times_armed: u32,
}

/// A provider call and its attempts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ProviderCall {
    /// `payment` or `delivery`.
    pub provider: String,
    /// `charge`, `refund`, `book` or `cancel`.
    pub operation: String,
    /// The idempotency key every attempt of the call carries.
    pub idempotency_key: String,
    /// How many attempts were made.
    pub attempts: u32,
    /// How the last one ended: `succeeded`, `refused`, `failed` or `timed_out`.
    pub last_outcome: String,
    /// When the last one started (RFC 3339).
    pub last_attempt_at: String,
}

/// Where the Kafka relay published an event.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct KafkaCoordinates {
    /// The topic.
    pub topic: String,
    /// The partition.
    pub partition: i32,
    /// The offset in the partition.
    pub offset: i64,
}

/// The saga partition of an order, and its lease.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct PartitionOwner {
    /// The partition.
    pub partition: u32,
    /// The saga runner holding its lease; absent when none holds it (released or expired).
    pub runner: Option<String>,
    /// The lease's epoch: its fencing token.
    pub epoch: Option<i64>,
    /// Milliseconds until the lease expires unless renewed.
    pub lease_expires_in_ms: Option<u64>,
}

/// What an entry records.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum EntryKind {
    /// A request's command was accepted: the event it appended.
    CommandAccepted,
    /// An operator acted on the order through the console (retried its dead letter, say).
    OperatorAction,
    /// An aggregate refused a command (a request's or the saga's).
    CommandRefused,
    /// An event the saga or the service appended.
    Event,
    /// A saga step started.
    StepStarted,
    /// A saga step succeeded.
    StepSucceeded,
    /// A saga step failed.
    StepFailed,
    /// A saga step was skipped (the order was cancelled before it).
    StepSkipped,
    /// A saga step was compensated (pet released, payment refunded, delivery cancelled).
    Compensation,
    /// A deadline was scheduled.
    DeadlineScheduled,
    /// A deadline was armed again: a step's deadline moved, or a retry's next try.
    DeadlineExtended,
    /// A deadline fell due and fired.
    DeadlineFired,
    /// The saga ended before the deadline fell due.
    DeadlineCancelled,
    /// A provider call's first attempt.
    ProviderAttempt,
    /// A provider call's later attempt, under the same idempotency key.
    ProviderRetry,
    /// The Kafka relay published the event (after the broker acknowledged it).
    Published,
    /// A consumer set one of the order's events aside.
    DeadLettered,
    /// A dead letter was handled after all, or skipped by an operator.
    DeadLetterSettled,
}

impl EntryKind {
    /// Its name, as the JSON document spells it.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::CommandAccepted => "command_accepted",
            Self::OperatorAction => "operator_action",
            Self::CommandRefused => "command_refused",
            Self::Event => "event",
            Self::StepStarted => "step_started",
            Self::StepSucceeded => "step_succeeded",
            Self::StepFailed => "step_failed",
            Self::StepSkipped => "step_skipped",
            Self::Compensation => "compensation",
            Self::DeadlineScheduled => "deadline_scheduled",
            Self::DeadlineExtended => "deadline_extended",
            Self::DeadlineFired => "deadline_fired",
            Self::DeadlineCancelled => "deadline_cancelled",
            Self::ProviderAttempt => "provider_attempt",
            Self::ProviderRetry => "provider_retry",
            Self::Published => "published",
            Self::DeadLettered => "dead_lettered",
            Self::DeadLetterSettled => "dead_letter_settled",
        }
    }
}

/// One entry of a timeline.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct TimelineEntry {
    /// Its place in the whole timeline, from 0: its permalink and the paging cursor.
    pub index: usize,
    /// When (RFC 3339).
    pub at: String,
    /// What it records.
    pub kind: EntryKind,
    /// One line for a person.
    pub summary: String,
    /// The global position of the event it is, or that it follows from.
    pub global_position: Option<i64>,
    /// The correlation id.
    pub correlation_id: Option<String>,
    /// What caused it: a request's id, an event's id, or a deadline.
    pub causation_id: Option<String>,
    /// Who acted.
    pub subject: Option<String>,
    /// The trace it belongs to (from the event's `traceparent`).
    pub trace_id: Option<String>,
    /// The event's id, for an event.
    pub event_id: Option<String>,
    /// The event's type, for an event or what followed from one.
    pub event_type: Option<String>,
    /// The saga step, for a step's entry.
    pub step: Option<String>,
    /// The deadline's kind, for a deadline's entry.
    pub deadline: Option<String>,
    /// The dead letter, for a dead letter's entry.
    pub dead_letter_id: Option<i64>,
    /// The refused command's name, for a refusal.
    pub command: Option<String>,
    /// `payment` or `delivery` and what was asked (`charge`, `refund`, `book`, `cancel`),
    /// for a provider attempt.
    pub provider_call: Option<String>,
    /// The provider call's idempotency key.
    pub idempotency_key: Option<String>,
    /// How the attempt ended: `succeeded`, `refused`, `failed` or `timed_out`.
    pub outcome: Option<String>,
    /// Where the event was published, for a `published` entry.
    pub kafka: Option<KafkaCoordinates>,
}

/// The orders stuck at `as_of` (a deadline armed and overdue by more than
/// [`OVERDUE_AFTER`], or an open dead letter): at most `limit` of each kind.
pub async fn stuck_orders(
    database: &Database,
    as_of: DateTime<Utc>,
    limit: i64,
) -> Result<BTreeSet<OrderId>, sqlx::Error> {
    let mut stuck: BTreeSet<OrderId> =
        deadlines::overdue_orders(database, as_of - OVERDUE_AFTER, limit)
            .await?
            .into_iter()
            .collect();
    stuck.extend(dead_letters::open_orders(database, limit).await?);
    Ok(stuck)
}

/// The timeline of `order_id` as of `as_of`, entries after index `after` (all when `None`),
/// at most `limit` of them (at most [`MAX_PAGE`]); `None` for an order the store does not
/// hold.
pub async fn of_order(
    database: &Database,
    order_id: &OrderId,
    as_of: DateTime<Utc>,
    after: Option<usize>,
    limit: usize,
) -> Result<Option<Timeline>, ReadModelError> {
    Ok(whole(database, order_id, as_of)
        .await?
        .map(|timeline| timeline.page(after, limit)))
}

/// The whole timeline of `order_id` as of `as_of`, every entry in one document (what
/// `petstore explain` prints); `None` for an order the store does not hold.
pub async fn whole(
    database: &Database,
    order_id: &OrderId,
    as_of: DateTime<Utc>,
) -> Result<Option<Timeline>, ReadModelError> {
    let Some(correlation_id) = stream::correlation_of(
        database,
        petstore_domain::order::AGGREGATE_TYPE,
        &order_id.to_string(),
    )
    .await?
    else {
        return Ok(None);
    };
    let events = stream::events_with_correlation(database, &correlation_id).await?;
    let deadlines = deadlines::of_order(database, order_id).await?;
    let dead_letters = dead_letters::of_order(database, order_id).await?;
    let attempts = records::attempts_of(database, order_id).await?;
    let refusals = records::refusals_of(database, &correlation_id).await?;
    let positions: Vec<i64> = events
        .iter()
        .map(|event| event.position.global_position)
        .collect();
    let coordinates = published::of_positions(database, &positions).await?;
    let owner = match database.stored_saga_partitions().await? {
        Some(partitions) => {
            let partition = partitions.of_order(order_id);
            let lease = leases::state_of(database, partition).await?;
            Some(PartitionOwner {
                partition: partition.number(),
                runner: lease
                    .as_ref()
                    .filter(|lease| !lease.free)
                    .and_then(|lease| lease.owner.clone()),
                epoch: lease.as_ref().map(|lease| lease.epoch),
                lease_expires_in_ms: lease
                    .as_ref()
                    .filter(|lease| !lease.free)
                    .map(|lease| u64::try_from(lease.expires_in.as_millis()).unwrap_or(u64::MAX)),
            })
        }
        None => None,
    };
    let Some((view, from_events)) = fold_events(order_id, &events) else {
        return Ok(None);
    };
    let mut others = deadline_entries(&deadlines, &correlation_id);
    others.extend(dead_letter_entries(&dead_letters, &correlation_id));
    others.extend(attempt_entries(&attempts));
    others.extend(refusal_entries(&refusals));
    others.extend(published_entries(&coordinates, &events));
    let mut entries = merge(from_events, others);
    for (index, entry) in entries.iter_mut().enumerate() {
        entry.index = index;
    }
    let now = now_of(&view, &deadlines, &dead_letters, &attempts, owner, as_of);
    Ok(Some(Timeline {
        order_id: *order_id,
        as_of: rfc3339(as_of),
        now,
        total_entries: entries.len(),
        entries,
        next_after: None,
    }))
}

impl Timeline {
    /// The entries after index `after` (all when `None`), at most `limit` of them (at most
    /// [`MAX_PAGE`]), with the cursor of the next page.
    fn page(mut self, after: Option<usize>, limit: usize) -> Self {
        let first = after.map_or(0, |after| after.saturating_add(1));
        self.entries = std::mem::take(&mut self.entries)
            .into_iter()
            .skip(first)
            .take(limit.clamp(1, MAX_PAGE))
            .collect();
        self.next_after = self
            .entries
            .last()
            .map(|last| last.index)
            .filter(|last| last + 1 < self.total_entries);
        self
    }
}

/// RFC 3339 in milliseconds, UTC.
fn rfc3339(time: DateTime<Utc>) -> String {
    time.to_rfc3339_opts(SecondsFormat::Millis, true)
}

/// A time in milliseconds as stored, as RFC 3339.
fn from_millis(millis: i64) -> String {
    Utc.timestamp_millis_opt(millis)
        .single()
        .map_or_else(|| millis.to_string(), rfc3339)
}

/// An event's time, normalised to [`rfc3339`] so that entries compare as times.
fn event_time(event: &RecordedEvent) -> String {
    event
        .metadata
        .timestamp
        .as_deref()
        .and_then(|stored| DateTime::parse_from_rfc3339(stored).ok())
        .map_or_else(String::new, |time| rfc3339(time.with_timezone(&Utc)))
}

/// The trace id of a W3C `traceparent` (`00-{trace id}-{span id}-{flags}`).
fn trace_id(traceparent: &str) -> Option<String> {
    let trace = traceparent.split('-').nth(1)?;
    (trace.len() == 32 && trace.bytes().all(|byte| byte.is_ascii_hexdigit()))
        .then(|| trace.to_owned())
}

/// An entry with only what every entry has.
fn entry(at: String, kind: EntryKind, summary: String) -> TimelineEntry {
    TimelineEntry {
        index: 0,
        at,
        kind,
        summary,
        global_position: None,
        correlation_id: None,
        causation_id: None,
        subject: None,
        trace_id: None,
        event_id: None,
        event_type: None,
        step: None,
        deadline: None,
        dead_letter_id: None,
        command: None,
        provider_call: None,
        idempotency_key: None,
        outcome: None,
        kafka: None,
    }
}

/// Folds the order's view from `events`, with an entry per event and one per step that
/// changed state; `None` when no event placed the order.
fn fold_events(
    order_id: &OrderId,
    events: &[RecordedEvent],
) -> Option<(OrderStatusView, Vec<TimelineEntry>)> {
    let mut view: Option<OrderStatusView> = None;
    let mut entries = Vec::with_capacity(events.len() * 2);
    for event in events {
        let before: Vec<SagaStepView> = view
            .as_ref()
            .map(|view| view.steps.clone())
            .unwrap_or_default();
        // An event that cannot be decoded (a dead letter's, say) is still an entry; the
        // view stays as it was.
        let undecodable = (crate::views::order_view_id(event).as_ref() == Some(order_id))
            .then(|| OrderStatusView::fold(&mut view, event).err())
            .flatten()
            .map(|error| format!(" (cannot be decoded: {error})"))
            .unwrap_or_default();
        let at = event_time(event);
        let metadata = &event.metadata;
        let subject = metadata.subject.clone();
        let by_request = subject
            .as_deref()
            .is_some_and(|subject| subject != SAGA_SUBJECT && subject != SYSTEM_SUBJECT);
        let action = operator::RecordedAction::of(event);
        let kind = match &action {
            Some(_) => EntryKind::OperatorAction,
            None if by_request => EntryKind::CommandAccepted,
            None => EntryKind::Event,
        };
        let summary = match &action {
            Some(action) => format!(
                "{} {}: {} (was {}, now {})",
                action.subject,
                action.acted.action.as_str(),
                action.acted.target,
                action.acted.before,
                action.acted.after
            ),
            None => format!(
                "{} {} of {} {} (#{}){undecodable}",
                event.event_type,
                event.event_version,
                event.aggregate_type,
                event.aggregate_id,
                event.sequence
            ),
        };
        let base = TimelineEntry {
            global_position: Some(event.position.global_position),
            correlation_id: metadata.correlation_id.clone(),
            causation_id: metadata.causation_id.clone(),
            subject,
            trace_id: event.traceparent().and_then(trace_id),
            event_type: Some(event.event_type.clone()),
            ..entry(at.clone(), kind, summary)
        };
        entries.push(TimelineEntry {
            event_id: Some(event.event_id().to_string()),
            ..base.clone()
        });
        let Some(view) = view.as_ref() else { continue };
        for step in &view.steps {
            let was = before.iter().find(|earlier| earlier.name == step.name);
            if was.is_some_and(|was| was.state == step.state) {
                continue;
            }
            let (kind, verb) = match step.state.as_str() {
                "in_progress" => (EntryKind::StepStarted, "started"),
                "succeeded" => (EntryKind::StepSucceeded, "succeeded"),
                "failed" => (EntryKind::StepFailed, "failed"),
                "skipped" => (EntryKind::StepSkipped, "skipped"),
                "compensated" => (EntryKind::Compensation, "compensated"),
                _ => continue,
            };
            let detail = step
                .detail
                .as_deref()
                .map(|detail| format!(": {detail}"))
                .unwrap_or_default();
            entries.push(TimelineEntry {
                kind,
                summary: format!("step {} {verb}{detail}", step.name),
                step: Some(step.name.clone()),
                ..base.clone()
            });
        }
    }
    view.map(|view| (view, entries))
}

/// The entries of the order's deadlines.
fn deadline_entries(deadlines: &[DeadlineRecord], correlation_id: &str) -> Vec<TimelineEntry> {
    let mut entries = Vec::new();
    for deadline in deadlines {
        let kind = deadline.kind.as_str();
        let due = rfc3339(deadline.due_at);
        let with = |entry: TimelineEntry| TimelineEntry {
            correlation_id: Some(correlation_id.to_owned()),
            subject: Some(SAGA_SUBJECT.to_owned()),
            deadline: Some(kind.to_owned()),
            ..entry
        };
        if let Some(armed_at) = deadline.armed_at {
            let (entry_kind, summary) = if deadline.times_armed <= 1 {
                (
                    EntryKind::DeadlineScheduled,
                    format!("{kind} deadline scheduled, due {due}"),
                )
            } else {
                (
                    EntryKind::DeadlineExtended,
                    format!(
                        "{kind} deadline armed again (armed {} times), due {due}",
                        deadline.times_armed
                    ),
                )
            };
            entries.push(with(entry(rfc3339(armed_at), entry_kind, summary)));
        }
        match deadline.ended {
            Some(DeadlineEnd::Fired(at)) => entries.push(with(entry(
                rfc3339(at),
                EntryKind::DeadlineFired,
                format!("{kind} deadline fired (due {due})"),
            ))),
            Some(DeadlineEnd::Settled(at)) => entries.push(with(entry(
                rfc3339(at),
                EntryKind::DeadlineCancelled,
                format!("{kind} deadline cancelled: the saga ended before it fell due"),
            ))),
            None => {}
        }
    }
    entries
}

/// The entries of the order's dead letters.
fn dead_letter_entries(letters: &[DeadLetter], correlation_id: &str) -> Vec<TimelineEntry> {
    let mut entries = Vec::new();
    for letter in letters {
        let with = |entry: TimelineEntry| TimelineEntry {
            global_position: Some(letter.position.global_position),
            correlation_id: Some(correlation_id.to_owned()),
            subject: Some(letter.consumer.clone()),
            event_id: Some(letter.event_id.to_string()),
            event_type: Some(letter.event_type.clone()),
            dead_letter_id: Some(letter.id),
            ..entry
        };
        entries.push(with(entry(
            from_millis(letter.failed_at_ms),
            EntryKind::DeadLettered,
            format!(
                "{} set {} {} aside (dead letter {}, {} attempts): {}",
                letter.consumer,
                letter.event_type,
                letter.event_version,
                letter.id,
                letter.attempts,
                letter.error
            ),
        )));
        if let Some(resolved_at_ms) = letter.resolved_at_ms {
            entries.push(with(entry(
                from_millis(resolved_at_ms),
                EntryKind::DeadLetterSettled,
                format!("dead letter {} {}", letter.id, letter.status),
            )));
        }
    }
    entries
}

/// The entries of the order's provider attempts.
fn attempt_entries(attempts: &[ProviderAttempt]) -> Vec<TimelineEntry> {
    attempts
        .iter()
        .map(|attempt| {
            let call = format!(
                "{} {}",
                attempt.provider.as_str(),
                attempt.operation.as_str()
            );
            let error = attempt
                .error
                .as_deref()
                .map(|error| format!(": {error}"))
                .unwrap_or_default();
            let kind = if attempt.attempt > 1 {
                EntryKind::ProviderRetry
            } else {
                EntryKind::ProviderAttempt
            };
            TimelineEntry {
                correlation_id: Some(attempt.correlation_id.clone()),
                provider_call: Some(call.clone()),
                idempotency_key: Some(attempt.idempotency_key.clone()),
                outcome: Some(attempt.outcome.as_str().to_owned()),
                ..entry(
                    rfc3339(attempt.started_at),
                    kind,
                    format!(
                        "{call} attempt {} {} in {} ms{error}",
                        attempt.attempt,
                        attempt.outcome.as_str(),
                        attempt.duration.as_millis()
                    ),
                )
            }
        })
        .collect()
}

/// The entries of the commands refused under the order's correlation id.
fn refusal_entries(refusals: &[RefusedCommand]) -> Vec<TimelineEntry> {
    refusals
        .iter()
        .map(|refusal| TimelineEntry {
            correlation_id: Some(refusal.correlation_id.clone()),
            causation_id: refusal.causation_id.clone(),
            subject: refusal.subject.clone(),
            command: Some(refusal.command.clone()),
            ..entry(
                rfc3339(refusal.refused_at),
                EntryKind::CommandRefused,
                format!(
                    "{} refused {} {}: {}",
                    refusal.aggregate_type, refusal.command, refusal.aggregate_id, refusal.reason
                ),
            )
        })
        .collect()
}

/// The entries of where the relay published the order's events.
fn published_entries(coordinates: &[Published], events: &[RecordedEvent]) -> Vec<TimelineEntry> {
    coordinates
        .iter()
        .filter_map(|published| {
            let event = events
                .iter()
                .find(|event| event.position.global_position == published.global_position)?;
            Some(TimelineEntry {
                global_position: Some(published.global_position),
                correlation_id: event.metadata.correlation_id.clone(),
                event_type: Some(event.event_type.clone()),
                kafka: Some(KafkaCoordinates {
                    topic: published.topic.clone(),
                    partition: published.partition,
                    offset: published.offset,
                }),
                ..entry(
                    rfc3339(published.at),
                    EntryKind::Published,
                    format!(
                        "{} published to {} partition {} offset {}",
                        event.event_type, published.topic, published.partition, published.offset
                    ),
                )
            })
        })
        .collect()
}

/// `events` (in commit order) with `others` merged in: each other entry goes before the
/// first event entry later than it, others keeping their order by time.
fn merge(events: Vec<TimelineEntry>, mut others: Vec<TimelineEntry>) -> Vec<TimelineEntry> {
    others.sort_by(|left, right| left.at.cmp(&right.at));
    let mut merged = Vec::with_capacity(events.len() + others.len());
    let mut others = others.into_iter().peekable();
    for event in events {
        while let Some(other) = others.next_if(|other| other.at < event.at) {
            merged.push(other);
        }
        merged.push(event);
    }
    merged.extend(others);
    merged
}

/// Where the order stands, as of `as_of`.
fn now_of(
    view: &OrderStatusView,
    deadlines: &[DeadlineRecord],
    dead_letters: &[DeadLetter],
    attempts: &[ProviderAttempt],
    owner: Option<PartitionOwner>,
    as_of: DateTime<Utc>,
) -> Now {
    let terminal = view.current_status().is_terminal();
    let armed = |deadline: &DeadlineRecord| ArmedDeadline {
        kind: deadline.kind.as_str().to_owned(),
        due_at: rfc3339(deadline.due_at),
        time_left_ms: (deadline.due_at - as_of).num_milliseconds(),
        times_armed: deadline.times_armed,
    };
    let waiting_for = if terminal {
        None
    } else if view.status == crate::views::COMPENSATING {
        Some("compensations".to_owned())
    } else {
        view.steps
            .iter()
            .find(|step| step.state == "in_progress")
            .map(|step| step.name.clone())
    };
    let still_armed = || deadlines.iter().filter(|deadline| deadline.ended.is_none());
    let deadline = waiting_for.as_deref().and_then(|waiting| {
        still_armed()
            .find(|deadline| matches!(deadline.kind, DeadlineKind::Step(step) if step.as_str() == waiting))
            .map(armed)
    });
    let next_retry = still_armed()
        .filter(|deadline| !matches!(deadline.kind, DeadlineKind::Step(_)))
        .min_by_key(|deadline| deadline.due_at)
        .map(armed);
    let open: Vec<&DeadLetter> = dead_letters
        .iter()
        .filter(|letter| !letter.status.is_settled())
        .collect();
    let mut stuck_because: Vec<String> = still_armed()
        .filter(|deadline| deadline.due_at + OVERDUE_AFTER < as_of)
        .map(|deadline| {
            format!(
                "the {} deadline is overdue by {} s",
                deadline.kind,
                (as_of - deadline.due_at).num_seconds()
            )
        })
        .collect();
    stuck_because.extend(open.iter().map(|letter| {
        format!(
            "dead letter {} ({} could not handle {}) is {}",
            letter.id, letter.consumer, letter.event_type, letter.status
        )
    }));
    let verdict = if !stuck_because.is_empty() {
        Verdict::Stuck
    } else if terminal {
        Verdict::Terminal
    } else {
        Verdict::InFlight
    };
    let last_call = attempts.last().map(|last| ProviderCall {
        provider: last.provider.as_str().to_owned(),
        operation: last.operation.as_str().to_owned(),
        idempotency_key: last.idempotency_key.clone(),
        attempts: u32::try_from(
            attempts
                .iter()
                .filter(|attempt| attempt.idempotency_key == last.idempotency_key)
                .count(),
        )
        .unwrap_or(u32::MAX),
        last_outcome: last.outcome.as_str().to_owned(),
        last_attempt_at: rfc3339(last.started_at),
    });
    let failed_attempt = attempts
        .last()
        .filter(|attempt| attempt.outcome != AttemptOutcome::Succeeded)
        .and_then(|attempt| attempt.error.clone());
    let last_error = open
        .last()
        .map(|letter| letter.error.clone())
        .or(failed_attempt)
        .or_else(|| {
            view.steps
                .iter()
                .filter(|step| step.state == "failed")
                .find_map(|step| step.detail.clone())
        });
    Now {
        status: view.status.clone(),
        cancellation_reason: view.cancellation_reason.clone(),
        verdict,
        stuck_because,
        waiting_for,
        deadline,
        next_retry,
        last_error,
        last_call,
        steps: view.steps.clone(),
        owner,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_and_verdicts_are_named_as_the_document_spells_them() {
        for kind in [
            EntryKind::CommandAccepted,
            EntryKind::StepSucceeded,
            EntryKind::DeadLetterSettled,
            EntryKind::ProviderRetry,
        ] {
            assert_eq!(serde_json::to_value(kind).expect("json"), kind.as_str());
        }
        for verdict in [Verdict::Terminal, Verdict::InFlight, Verdict::Stuck] {
            assert_eq!(
                serde_json::to_value(verdict).expect("json"),
                verdict.as_str()
            );
        }
    }

    fn at(at: &str, kind: EntryKind) -> TimelineEntry {
        entry(at.to_owned(), kind, String::new())
    }

    #[test]
    fn the_merge_keeps_events_in_commit_order_and_places_the_others_by_time() {
        let events = vec![
            at("2026-01-01T00:00:01.000Z", EntryKind::Event),
            // Committed after the first though stamped earlier (a concurrent command).
            at("2026-01-01T00:00:00.500Z", EntryKind::CommandAccepted),
            at("2026-01-01T00:00:03.000Z", EntryKind::Event),
        ];
        let others = vec![
            at("2026-01-01T00:00:04.000Z", EntryKind::DeadlineFired),
            at("2026-01-01T00:00:02.000Z", EntryKind::DeadlineScheduled),
            at("2026-01-01T00:00:00.100Z", EntryKind::DeadLettered),
        ];
        let kinds: Vec<EntryKind> = merge(events, others)
            .into_iter()
            .map(|entry| entry.kind)
            .collect();
        assert_eq!(
            kinds,
            [
                EntryKind::DeadLettered,
                EntryKind::Event,
                EntryKind::CommandAccepted,
                EntryKind::DeadlineScheduled,
                EntryKind::Event,
                EntryKind::DeadlineFired,
            ]
        );
    }

    #[test]
    fn a_trace_id_is_read_from_a_traceparent_and_nothing_else() {
        assert_eq!(
            trace_id("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01").as_deref(),
            Some("4bf92f3577b34da6a3ce929d0e0e4736")
        );
        assert_eq!(trace_id("garbage"), None);
        assert_eq!(trace_id("00-short-00f067aa0ba902b7-01"), None);
    }
}
