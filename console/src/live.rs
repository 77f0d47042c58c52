//! An order's page, live: a Server-Sent Events stream of the page's changing part (where the
//! order stands, its steps, the first page of its timeline), sent whole each time it
//! changes, so that a client that reconnects misses nothing and shows nothing twice. The
//! htmx SSE extension swaps each `timeline` event into the page; `done` ends it once the
//! order is terminal.
//!
//! Each event's `id` is the global position of the latest event shown; a reconnect names
//! it in `Last-Event-ID` or, as the htmx extension does not send that header, in `?after=`.
//! The order is read again every second (an operator's page: a timeline read costs a few
//! milliseconds, bench/README section 23), and sent only when something but the clock
//! changed. A subject holds at most [`STREAMS_PER_SUBJECT`] streams; a client that does not
//! take an event within [`SEND_TIMEOUT`] is dropped (every stream has its own task, so a
//! slow one holds up no other); comments keep idle connections open; a stream ends after
//! `console.live_max_seconds` (the browser reconnects) and when the process shuts down.

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use axum::extract::State;
use axum::http::header::{HeaderMap, HeaderValue, RETRY_AFTER};
use axum::http::StatusCode;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use petstore_domain::OrderId;
use petstore_web::{Path, Problem, Query};
use serde::Deserialize;
use tokio::sync::mpsc;

use crate::order::{parse, Live};
use crate::session::Session;
use crate::ConsoleState;

/// Live streams one subject may hold at once.
pub const STREAMS_PER_SUBJECT: u32 = 4;

/// How long a client may take to accept an event before it is dropped.
pub const SEND_TIMEOUT: Duration = Duration::from_secs(10);

/// How often the order is read again.
const POLL: Duration = Duration::from_secs(1);

/// How soon a browser reconnects a stream that ended (the `retry` field).
pub(crate) const RECONNECT: Duration = Duration::from_secs(1);

/// How often an idle stream sends a comment.
pub(crate) const KEEP_ALIVE: Duration = Duration::from_secs(15);

/// The open streams, by subject.
#[derive(Clone, Default)]
pub struct Streams(Arc<Mutex<HashMap<String, u32>>>);

impl Streams {
    /// A place for one more stream of `subject`, or 429.
    pub(crate) fn acquire_or_refuse(&self, subject: &str) -> Result<Slot, Problem> {
        self.acquire(subject).ok_or_else(|| {
            Problem::new(
                StatusCode::TOO_MANY_REQUESTS,
                "too-many-streams",
                "Too many live pages",
                format!(
                    "you follow {STREAMS_PER_SUBJECT} live pages already, the most allowed: close one"
                ),
            )
            .with_header(RETRY_AFTER, HeaderValue::from_static("1"))
        })
    }

    fn acquire(&self, subject: &str) -> Option<Slot> {
        let mut open = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        let count = open.entry(subject.to_owned()).or_default();
        if *count >= STREAMS_PER_SUBJECT {
            return None;
        }
        *count += 1;
        Some(Slot {
            streams: self.clone(),
            subject: subject.to_owned(),
        })
    }
}

/// A stream's place among its subject's; given back when the stream ends.
pub(crate) struct Slot {
    streams: Streams,
    subject: String,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut open = self
            .streams
            .0
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(count) = open.get_mut(&self.subject) {
            *count -= 1;
            if *count == 0 {
                open.remove(&self.subject);
            }
        }
    }
}

/// Where a reconnect resumes.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct LiveQuery {
    after: Option<i64>,
}

/// Where a reconnecting stream resumes: after its `Last-Event-ID` (a global position it
/// sent) or else after `after` (the htmx SSE extension reconnects without the header); 400
/// for a header that is not one, or a position below 0.
pub(crate) fn resume_after(
    headers: &HeaderMap,
    after: Option<i64>,
) -> Result<Option<i64>, Problem> {
    let after = match headers.get("last-event-id") {
        Some(value) => Some(
            value
                .to_str()
                .ok()
                .and_then(|id| id.parse::<i64>().ok())
                .ok_or_else(|| {
                    Problem::bad_request("Last-Event-ID must be an event id this stream sent")
                })?,
        ),
        None => after,
    };
    if after.is_some_and(|after| after < 0) {
        return Err(Problem::bad_request("after must be 0 or more"));
    }
    Ok(after)
}

/// `GET /petstore-domain/console/orders/{order_id}/live`.
pub(crate) async fn stream(
    State(state): State<ConsoleState>,
    session: Session,
    headers: HeaderMap,
    Path(order_id): Path<String>,
    Query(query): Query<LiveQuery>,
) -> Result<Response, Problem> {
    let order_id = parse(&order_id)?;
    // The state is sent whole whatever the stream resumes from; a bad resume point is
    // still refused.
    resume_after(&headers, query.after)?;
    let slot = state.streams.acquire_or_refuse(session.subject())?;
    let first = Live::read(&state, &order_id, None)
        .await?
        .ok_or_else(|| Problem::not_found(format!("order {order_id} does not exist")))?;
    let (sender, receiver) = mpsc::channel(2);
    tokio::spawn(follow(state, order_id, first, slot, sender));
    Ok(respond(receiver))
}

/// The response of a stream whose task sends its events to `receiver`'s sender (each
/// stream has its own task: [`deliver`] drops a client too slow to take them), with
/// comments every [`KEEP_ALIVE`] while idle.
pub(crate) fn respond(receiver: mpsc::Receiver<Event>) -> Response {
    let events = futures::stream::unfold(receiver, |mut receiver| async move {
        let event = receiver.recv().await?;
        Some((Ok::<_, Infallible>(event), receiver))
    });
    Sse::new(events)
        .keep_alive(KeepAlive::new().interval(KEEP_ALIVE))
        .into_response()
}

/// Sends `live` whenever it changes, until the order is terminal, the client goes or is too
/// slow, or the process shuts down. On (re)connecting, the current state is sent at once:
/// whole, it replaces whatever the client showed.
async fn follow(
    state: ConsoleState,
    order_id: OrderId,
    mut live: Live,
    _slot: Slot,
    sender: mpsc::Sender<Event>,
) {
    let mut pacing = Pacing::new(&state);
    let mut sent = None;
    loop {
        let fingerprint = live.fingerprint();
        if sent != Some(fingerprint) {
            let event = match live.render() {
                Ok(html) => Event::default()
                    .event("timeline")
                    .id(live.position().to_string())
                    .retry(RECONNECT)
                    .data(html),
                Err(error) => {
                    tracing::error!(%error, %order_id, "the live order page cannot be rendered");
                    return;
                }
            };
            if !deliver(&sender, event).await {
                return;
            }
            sent = Some(fingerprint);
        }
        if live.terminal() {
            let done = Event::default().event("done").data("terminal");
            deliver(&sender, done).await;
            return;
        }
        if !pacing.wait(POLL, &sender).await {
            return;
        }
        live = match Live::read(&state, &order_id, None).await {
            Ok(Some(read)) => read,
            Ok(None) => return,
            Err(problem) => {
                tracing::warn!(detail = problem.detail(), %order_id, "the live order page could not read the order; trying again");
                continue;
            }
        };
    }
}

/// When a stream's task goes on: after each pause, unless the client went, the process is
/// shutting down, or the stream's time (`console.live_max_seconds`) is up; the browser then
/// reconnects and gets the state whole again.
pub(crate) struct Pacing {
    closing: tokio::sync::watch::Receiver<bool>,
    ends_at: tokio::time::Instant,
}

impl Pacing {
    pub(crate) fn new(state: &ConsoleState) -> Self {
        Self {
            closing: state.closing.clone(),
            ends_at: tokio::time::Instant::now()
                + Duration::from_secs(state.settings.live_max_seconds),
        }
    }

    /// Waits `pause`; false when the stream is to end instead.
    pub(crate) async fn wait(&mut self, pause: Duration, sender: &mpsc::Sender<Event>) -> bool {
        tokio::select! {
            () = tokio::time::sleep(pause) => true,
            _ = self.closing.wait_for(|closing| *closing) => false,
            () = sender.closed() => false,
            () = tokio::time::sleep_until(self.ends_at) => false,
        }
    }
}

/// Hands `event` to the client's connection; false when it is gone or did not take it in
/// [`SEND_TIMEOUT`] (it is then dropped).
pub(crate) async fn deliver(sender: &mpsc::Sender<Event>, event: Event) -> bool {
    match tokio::time::timeout(SEND_TIMEOUT, sender.send(event)).await {
        Ok(Ok(())) => true,
        Ok(Err(_)) => false,
        Err(_) => {
            tracing::info!("a live console page took no event in time; it is dropped");
            false
        }
    }
}
