//! The stream's live tail: the latest events, of one type or all, newest last, kept current
//! as events are committed (Server-Sent Events: each update the whole window of the latest
//! 50, its `id` the global position read up to). Pausing keeps the place: the paused page
//! shows the events up to the last one seen, and resuming goes on from there, so nothing
//! committed meanwhile is missed. Without JavaScript the page is a snapshot.

use std::time::Duration;

use askama::Template;
use axum::extract::State;
use axum::response::sse::Event;
use axum::response::Response;
use petstore_event_store::stream::{self, RecordedEvent, StreamPosition};
use petstore_web::{Problem, Query};
use serde::Deserialize;
use tokio::sync::mpsc;

use crate::session::Session;
use crate::{html, ConsoleState, Frame};

/// Events the page shows when it opens.
const SHOWN: u32 = 50;

/// How often the stream is read again when nothing new came.
const POLL: Duration = Duration::from_millis(500);

/// Which events, and from where.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct TailQuery {
    #[serde(default, rename = "type")]
    event_type: Option<String>,
    #[serde(default)]
    until: Option<i64>,
    #[serde(default)]
    paused: Option<String>,
}

/// An event as the tail shows it.
pub(crate) struct Row {
    position: i64,
    at: String,
    event: String,
    aggregate: String,
    order_id: Option<String>,
    subject: String,
    correlation_id: String,
}

impl From<&RecordedEvent> for Row {
    fn from(event: &RecordedEvent) -> Self {
        let of_order = matches!(
            event.aggregate_type.as_str(),
            "Order" | "Payment" | "Delivery"
        );
        Self {
            position: event.position.global_position,
            at: event.metadata.timestamp().unwrap_or_default().to_owned(),
            event: format!("{} {}", event.event_type, event.event_version),
            aggregate: format!(
                "{} {} (#{})",
                event.aggregate_type, event.aggregate_id, event.sequence
            ),
            order_id: of_order.then(|| event.aggregate_id.clone()),
            subject: event.metadata.subject().unwrap_or_default().to_owned(),
            correlation_id: event
                .metadata
                .correlation_id()
                .unwrap_or_default()
                .to_owned(),
        }
    }
}

#[derive(Template)]
#[template(path = "tail.html")]
struct TailPage {
    frame: Frame,
    event_type: String,
    rows: Vec<Row>,
    live_url: Option<String>,
    pause: String,
    resume: Option<String>,
}

/// The window of one live update, and the pause link moved to where it was read up to.
#[derive(Template)]
#[template(path = "tail_rows.html")]
struct TailRows {
    rows: Vec<Row>,
    pause: String,
}

/// The query string of the tail of `event_type` (all, when empty) with `more`.
fn link(event_type: &str, more: &str) -> String {
    let mut query: Vec<String> = Vec::new();
    if !event_type.is_empty() {
        query.push(format!("type={}", crate::encode(event_type)));
    }
    if !more.is_empty() {
        query.push(more.to_owned());
    }
    match query.is_empty() {
        true => "/petstore-domain/console/tail".to_owned(),
        false => format!("/petstore-domain/console/tail?{}", query.join("&")),
    }
}

/// The event type asked for: letters and digits only.
fn event_type(query: Option<&str>) -> Result<Option<String>, Problem> {
    match query.map(str::trim).filter(|text| !text.is_empty()) {
        None => Ok(None),
        Some(text) if text.len() <= 100 && text.chars().all(|c| c.is_ascii_alphanumeric()) => {
            Ok(Some(text.to_owned()))
        }
        Some(text) => Err(Problem::validation(format!(
            "type: {text:?} is not an event type (letters and digits, such as OrderCreated)"
        ))),
    }
}

/// The stream position of the event at `global_position` (400 when there is none).
async fn position(state: &ConsoleState, global_position: i64) -> Result<StreamPosition, Problem> {
    stream::position_at(&state.database, global_position)
        .await
        .map_err(|error| Problem::from_failure(&error))?
        .ok_or_else(|| {
            Problem::bad_request(format!("there is no event at position {global_position}"))
        })
}

/// `GET /petstore-domain/console/tail`: the latest events (up to `until`), live unless
/// `paused`.
pub(crate) async fn page(
    State(state): State<ConsoleState>,
    session: Session,
    Query(query): Query<TailQuery>,
) -> Result<Response, Problem> {
    let wanted = event_type(query.event_type.as_deref())?;
    let until = match query.until {
        Some(global) => Some(position(&state, global).await?),
        None => None,
    };
    let mut events = stream::newest_first(&state.database, until, wanted.as_deref(), SHOWN)
        .await
        .map_err(|error| Problem::from_failure(&error))?;
    events.reverse();
    // Where the live part goes on from: the last event shown, else where the page was
    // asked to end, else the stream's head.
    let from = match (events.last(), until) {
        (Some(last), _) => last.position,
        (None, Some(until)) => until,
        (None, None) => stream::head_position(&state.database)
            .await
            .map_err(|error| Problem::from_failure(&error))?,
    };
    let kind = wanted.unwrap_or_default();
    let paused = query.paused.is_some();
    let here = format!("until={}", from.global_position);
    Ok(html(&TailPage {
        frame: session.frame("Live tail of the stream"),
        live_url: (!paused).then(|| {
            let mut url = format!(
                "/petstore-domain/console/tail/live?after={}",
                from.global_position
            );
            if !kind.is_empty() {
                url.push_str(&format!("&type={}", crate::encode(&kind)));
            }
            url
        }),
        pause: link(&kind, &format!("{here}&paused=1")),
        resume: paused.then(|| link(&kind, &here)),
        rows: events.iter().map(Row::from).collect(),
        event_type: kind,
    }))
}

/// Where the live tail goes on from.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct LiveQuery {
    after: i64,
    #[serde(default, rename = "type")]
    event_type: Option<String>,
}

/// `GET /petstore-domain/console/tail/live`: the window at once, then again each time
/// events are committed after `after` (or `Last-Event-ID`).
pub(crate) async fn live(
    State(state): State<ConsoleState>,
    session: Session,
    headers: axum::http::HeaderMap,
    Query(query): Query<LiveQuery>,
) -> Result<Response, Problem> {
    let wanted = event_type(query.event_type.as_deref())?;
    let after = match crate::live::resume_after(&headers, Some(query.after))? {
        Some(global) if global > 0 => position(&state, global).await?,
        _ => StreamPosition::START,
    };
    let slot = state.streams.acquire_or_refuse(session.subject())?;
    let (sender, receiver) = mpsc::channel(2);
    tokio::spawn(async move {
        let _slot = slot;
        follow(state, after, wanted, sender).await;
    });
    Ok(crate::live::respond(receiver))
}

/// Sends the tail's window (the latest [`SHOWN`] events of the type, up to the newest
/// read) at once and whenever events are committed: whole, it replaces what the page
/// showed, so a reconnect, whatever it resumes from, shows each event once.
async fn follow(
    state: ConsoleState,
    mut after: StreamPosition,
    wanted: Option<String>,
    sender: mpsc::Sender<Event>,
) {
    let mut pacing = crate::live::Pacing::new(&state);
    let kind = wanted.clone().unwrap_or_default();
    let mut changed = true;
    loop {
        // The newest event committed (and visible: none can commit before it later).
        match stream::newest_first(&state.database, None, None, 1).await {
            Ok(newest) => {
                if let Some(newest) = newest.first().filter(|newest| newest.position > after) {
                    after = newest.position;
                    changed = true;
                }
            }
            Err(error) => {
                tracing::warn!(%error, "the console's live tail could not read the stream; trying again");
            }
        }
        if changed {
            let window = match stream::newest_first(
                &state.database,
                (after != StreamPosition::START).then_some(after),
                wanted.as_deref(),
                SHOWN,
            )
            .await
            {
                Ok(mut window) => {
                    window.reverse();
                    window
                }
                Err(error) => {
                    tracing::warn!(%error, "the console's live tail could not read the stream; trying again");
                    Vec::new()
                }
            };
            let fragment = TailRows {
                rows: window.iter().map(Row::from).collect(),
                pause: link(&kind, &format!("until={}&paused=1", after.global_position)),
            };
            let event = match fragment.render() {
                Ok(html) => Event::default()
                    .event("events")
                    .id(after.global_position.to_string())
                    .retry(crate::live::RECONNECT)
                    .data(html),
                Err(error) => {
                    tracing::error!(%error, "the live tail cannot be rendered");
                    return;
                }
            };
            if !crate::live::deliver(&sender, event).await {
                return;
            }
            changed = false;
        }
        if !pacing.wait(POLL, &sender).await {
            return;
        }
    }
}
