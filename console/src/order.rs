//! One order: where it stands now, its saga's steps, its timeline grouped by step and in
//! full (500 entries a page, a permalink per entry, a trace link per traced entry), and the
//! whole timeline as JSON.

use askama::Template;
use axum::extract::State;
use axum::http::header::{self, HeaderValue};
use axum::response::{IntoResponse, Response};
use chrono::Utc;
use petstore_domain::OrderId;
use petstore_read_models::timeline::{
    self, ArmedDeadline, Timeline, TimelineEntry, Verdict, MAX_PAGE,
};
use petstore_read_models::OrderStatusView;
use petstore_web::{Path, Problem, Query, RequestContext};
use serde::Deserialize;

use crate::session::Session;
use crate::{html, ConsoleState, Frame};

/// Which page of the timeline.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct PageQuery {
    after: Option<usize>,
}

/// An entry as the page shows it.
struct Entry {
    index: usize,
    at: String,
    kind: &'static str,
    summary: String,
    position: String,
    correlation_id: String,
    causation_id: String,
    subject: String,
    trace_id: Option<String>,
    trace_url: Option<String>,
    detail: String,
}

/// The entries of one saga step (or of the order before its saga started).
struct Group {
    name: String,
    entries: Vec<Entry>,
}

/// A deadline as the page shows it.
struct Deadline {
    kind: String,
    due_at: String,
    left: String,
    times_armed: u32,
}

impl From<&ArmedDeadline> for Deadline {
    fn from(deadline: &ArmedDeadline) -> Self {
        Self {
            kind: deadline.kind.clone(),
            due_at: deadline.due_at.clone(),
            left: time_left(deadline.time_left_ms),
            times_armed: deadline.times_armed,
        }
    }
}

/// "12.3 s left" or "overdue by 4.0 s".
fn time_left(millis: i64) -> String {
    let seconds = millis.unsigned_abs() as f64 / 1000.0;
    if millis >= 0 {
        format!("{seconds:.1} s left")
    } else {
        format!("overdue by {seconds:.1} s")
    }
}

/// The part of an order's page that changes while its saga runs: where it stands, its
/// steps, its timeline (grouped by step and in full, one page). The page renders it, and
/// the live stream ([`crate::live`]) sends it again, whole, each time it changes.
pub(crate) struct Live {
    pub(crate) timeline: Timeline,
    verdict: &'static str,
    deadline: Option<Deadline>,
    next_retry: Option<Deadline>,
    owner: Option<String>,
    groups: Vec<Group>,
    entries: Vec<Entry>,
    first_shown: usize,
    previous: Option<String>,
    next: Option<String>,
}

impl Live {
    /// The part of `order_id`'s page with the timeline's page after `after`; `None` for an
    /// order the store does not hold.
    pub(crate) async fn read(
        state: &ConsoleState,
        order_id: &OrderId,
        after: Option<usize>,
    ) -> Result<Option<Self>, Problem> {
        let Some(timeline) =
            timeline::of_order(&state.database, order_id, Utc::now(), after, MAX_PAGE)
                .await
                .map_err(|error| Problem::from_failure(&error))?
        else {
            return Ok(None);
        };
        let entry = |entry: &TimelineEntry| Entry {
            index: entry.index,
            at: entry.at.clone(),
            kind: entry.kind.as_str(),
            summary: entry.summary.clone(),
            position: entry
                .global_position
                .map_or_else(String::new, |position| position.to_string()),
            correlation_id: entry.correlation_id.clone().unwrap_or_default(),
            causation_id: entry.causation_id.clone().unwrap_or_default(),
            subject: entry.subject.clone().unwrap_or_default(),
            trace_url: entry
                .trace_id
                .as_deref()
                .and_then(|trace| state.settings.trace_url(trace)),
            trace_id: entry.trace_id.clone(),
            detail: detail(entry),
        };
        // An entry of a step goes to that step's group; one of no step (an event, a
        // deadline, a provider attempt) to the group of the step last named before it.
        let mut groups: Vec<Group> = Vec::new();
        let mut current = "order".to_owned();
        for item in &timeline.entries {
            if let Some(step) = &item.step {
                current.clone_from(step);
            }
            match groups.iter_mut().find(|group| group.name == current) {
                Some(group) => group.entries.push(entry(item)),
                None => groups.push(Group {
                    name: current.clone(),
                    entries: vec![entry(item)],
                }),
            }
        }
        let entries = timeline.entries.iter().map(entry).collect();
        let base = format!("/petstore-domain/console/orders/{order_id}");
        let first_shown = after.map_or(0, |after| after + 1);
        let previous = (first_shown > 0).then(|| match first_shown.checked_sub(MAX_PAGE + 1) {
            Some(after) => format!("{base}?after={after}"),
            None => base.clone(),
        });
        let next = timeline
            .next_after
            .map(|after| format!("{base}?after={after}"));
        let now = &timeline.now;
        Ok(Some(Self {
            verdict: now.verdict.as_str(),
            deadline: now.deadline.as_ref().map(Deadline::from),
            next_retry: now.next_retry.as_ref().map(Deadline::from),
            owner: now
                .owner
                .as_ref()
                .map(|owner| match (&owner.runner, owner.epoch) {
                    (Some(runner), Some(epoch)) => format!(
                        "partition {} held by {runner} (epoch {epoch}{})",
                        owner.partition,
                        owner
                            .lease_expires_in_ms
                            .map(|left| format!(", lease {:.1} s left", left as f64 / 1000.0))
                            .unwrap_or_default()
                    ),
                    _ => format!("partition {}, held by no runner now", owner.partition),
                }),
            groups,
            entries,
            first_shown,
            previous,
            next,
            timeline,
        }))
    }

    /// Whether the order can change no more (and the page need not be live).
    pub(crate) fn terminal(&self) -> bool {
        self.timeline.now.verdict == Verdict::Terminal
    }

    /// The global position of the latest event shown: the live stream's event id.
    pub(crate) fn position(&self) -> i64 {
        self.timeline
            .entries
            .iter()
            .filter_map(|entry| entry.global_position)
            .max()
            .unwrap_or(0)
    }

    /// What changes when the order does: the entries and where it stands, without the
    /// times counted from now (time left, the lease's expiry).
    pub(crate) fn fingerprint(&self) -> u64 {
        use std::hash::{Hash, Hasher};
        let mut now = self.timeline.now.clone();
        for deadline in [&mut now.deadline, &mut now.next_retry]
            .into_iter()
            .flatten()
        {
            deadline.time_left_ms = 0;
        }
        if let Some(owner) = &mut now.owner {
            owner.lease_expires_in_ms = None;
        }
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        serde_json::to_string(&(&self.timeline.entries, &now))
            .unwrap_or_default()
            .hash(&mut hasher);
        hasher.finish()
    }

    /// The part, rendered.
    pub(crate) fn render(&self) -> Result<String, askama::Error> {
        LiveFragment { live: self }.render()
    }
}

/// The live part alone: what the live stream sends.
#[derive(Template)]
#[template(path = "order_live.html")]
struct LiveFragment<'a> {
    live: &'a Live,
}

#[derive(Template)]
#[template(path = "order.html")]
struct OrderPage {
    frame: Frame,
    order_id: String,
    /// The order's view, once the read models reached it.
    order: Option<OrderStatusView>,
    amount: String,
    /// The live part, rendered.
    live: String,
    /// Where the live stream is, while the order can still change (first page only).
    live_url: Option<String>,
}

/// `GET /petstore-domain/console/orders/{order_id}`.
pub(crate) async fn page(
    State(state): State<ConsoleState>,
    session: Session,
    Path(order_id): Path<String>,
    Query(query): Query<PageQuery>,
) -> Result<Response, Problem> {
    let order_id = parse(&order_id)?;
    let live = Live::read(&state, &order_id, query.after)
        .await?
        .ok_or_else(|| Problem::not_found(format!("order {order_id} does not exist")))?;
    let order = state
        .read_models
        .order(&order_id)
        .await
        .map_err(|error| Problem::from_failure(&error))?;
    let amount = order
        .as_ref()
        .map(|order| crate::money(&order.amount))
        .unwrap_or_default();
    let live_url = (query.after.is_none() && !live.terminal()).then(|| {
        format!(
            "/petstore-domain/console/orders/{order_id}/live?after={}",
            live.position()
        )
    });
    let page = OrderPage {
        frame: session.frame(format!("Order {order_id}")),
        order_id: order_id.to_string(),
        order,
        amount,
        live: live.render().map_err(|error| Problem::internal(&error))?,
        live_url,
    };
    Ok(html(&page))
}

/// What an entry adds to its summary: the provider call, its key and outcome, where it was
/// published, the dead letter, the refused command.
fn detail(entry: &TimelineEntry) -> String {
    let mut parts = Vec::new();
    if let Some(call) = &entry.provider_call {
        parts.push(call.clone());
    }
    if let Some(outcome) = &entry.outcome {
        parts.push(outcome.clone());
    }
    if let Some(key) = &entry.idempotency_key {
        parts.push(format!("key {key}"));
    }
    if let Some(kafka) = &entry.kafka {
        parts.push(format!(
            "{} partition {} offset {}",
            kafka.topic, kafka.partition, kafka.offset
        ));
    }
    if let Some(letter) = entry.dead_letter_id {
        parts.push(format!("dead letter {letter}"));
    }
    if let Some(command) = &entry.command {
        parts.push(command.clone());
    }
    if let Some(deadline) = &entry.deadline {
        parts.push(format!("{deadline} deadline"));
    }
    parts.join(" · ")
}

pub(crate) fn parse(order_id: &str) -> Result<OrderId, Problem> {
    let order_id =
        OrderId::parse(order_id).map_err(|error| Problem::bad_request(error.to_string()))?;
    RequestContext::record_order(&order_id);
    Ok(order_id)
}

/// `GET /petstore-domain/console/orders/{order_id}/timeline.json`: the whole timeline, the
/// document `petstore explain --json` prints, as a download.
pub(crate) async fn download(
    State(state): State<ConsoleState>,
    Path(order_id): Path<String>,
) -> Result<Response, Problem> {
    let order_id = parse(&order_id)?;
    let timeline = timeline::whole(&state.database, &order_id, Utc::now())
        .await
        .map_err(|error| Problem::from_failure(&error))?
        .ok_or_else(|| Problem::not_found(format!("order {order_id} does not exist")))?;
    let body = serde_json::to_vec_pretty(&timeline).map_err(|error| Problem::internal(&error))?;
    let disposition = format!("attachment; filename=\"order-{order_id}-timeline.json\"");
    Ok((
        [
            (
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            ),
            (
                header::CONTENT_DISPOSITION,
                HeaderValue::from_str(&disposition).map_err(|error| Problem::internal(&error))?,
            ),
        ],
        body,
    )
        .into_response())
}
