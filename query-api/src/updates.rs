//! Live order updates: `GET /petstore-domain/orders/{order_id}/updates`, as a WebSocket or as
//! Server-Sent Events, gated by the `real_time_order_updates` flag.
//!
//! One [`OrderUpdates`] hub per process follows the read models' change notices
//! ([`ReadModels::order_changes`]: Postgres `NOTIFY` from whichever process projected, or the
//! in-memory read models' channel) and hands each followed order's new view to that order's
//! connections over a broadcast channel; it never waits for a client. A connection
//! subscribes first and reads the order's view (its snapshot) second, then sends every status
//! change after the last one it sent: a change committed before the subscription is in the
//! snapshot, one committed after reaches the hub later, so none falls between. Each view
//! carries the order's whole status history, so a connection that fell behind its broadcast
//! re-reads the view and still misses nothing.
//!
//! [`ReadModels::order_changes`]: petstore_read_models::ReadModels::order_changes

use std::sync::Arc;
use std::time::Duration;

use axum::extract::ws::{CloseFrame, Message, WebSocket, WebSocketUpgrade};
use axum::extract::{FromRequestParts, Query, State};
use axum::http::header::{HeaderValue, RETRY_AFTER, UPGRADE};
use axum::http::request::Parts;
use axum::http::{HeaderMap, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use petstore_domain::OrderId;
use petstore_event_store::stream::StreamPosition;
use petstore_live_settings::Live;
use petstore_read_models::{OrderStatusView, StatusChange};
use petstore_security::auth::Caller;
use petstore_settings::Flag;
use petstore_telemetry::metrics::{Metrics, UpdateProtocolLabels};
use petstore_web::{Path, Problem, ProblemDocument, RequestContext};
use serde::{Deserialize, Serialize};
use tokio::sync::{broadcast, watch};
use utoipa::{IntoParams, ToSchema};

use crate::reads::ConsistencyToken;
use crate::QueryState;

mod hub;

pub use hub::OrderUpdates;
use hub::{locked, Hub, Slot};

/// The route.
pub fn router() -> Router<QueryState> {
    Router::new().route(
        "/petstore-domain/orders/{order_id}/updates",
        get(order_updates),
    )
}

/// Views a followed order's connections have not taken yet, at most: one that falls further
/// behind re-reads the view.
const FOLLOWER_BACKLOG: usize = 16;

/// One status of an order, as the live updates send it (a WebSocket text message, or an SSE
/// `status` event's data).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct OrderUpdate {
    /// The update's position in the global stream: the SSE event id, and what
    /// `Last-Event-ID` or `last_event_id` take to resume after it.
    pub id: String,
    /// The order.
    #[schema(value_type = String, format = Uuid)]
    pub order_id: OrderId,
    /// `pending`, `reserved`, `paid`, `scheduled`, `completed`, `compensating` or
    /// `cancelled`.
    pub status: String,
    /// Why, when `cancelled`.
    pub cancellation_reason: Option<String>,
    /// When the event that set it was recorded (RFC 3339).
    pub at: String,
    /// True for the last update: the connection closes after it.
    pub terminal: bool,
}

impl OrderUpdate {
    fn new(order_id: OrderId, change: &StatusChange) -> Self {
        Self {
            id: change.position.to_token(),
            order_id,
            status: change.status.clone(),
            cancellation_reason: change.cancellation_reason.clone(),
            at: change.at.clone(),
            terminal: change.is_terminal(),
        }
    }
}

/// The query parameters of the updates route.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct UpdatesQuery {
    /// Resume after this update's `id` (as SSE's `Last-Event-ID` header does; the header wins).
    #[param(pattern = "^t[0-9]{1,18}p[0-9]{1,18}$")]
    pub last_event_id: Option<String>,
    /// The bearer token, for clients that cannot send `Authorization` (a browser's
    /// `WebSocket` or `EventSource`). Never both.
    pub access_token: Option<String>,
}

/// Why a connection ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum End {
    /// The order reached a terminal status and its update was sent.
    Terminal,
    /// The client went away or closed.
    Client,
    /// The client did not take an update within `send_timeout_ms`.
    Slow,
    /// `real_time_order_updates` was turned off for the caller.
    FlagOff,
    /// The process is shutting down.
    Shutdown,
    /// The read models could not be read.
    Error,
}

impl End {
    fn label(self) -> &'static str {
        match self {
            Self::Terminal => "terminal",
            Self::Client => "client",
            Self::Slow => "slow",
            Self::FlagOff => "flag_off",
            Self::Shutdown => "shutdown",
            Self::Error => "error",
        }
    }

    /// The WebSocket close code and reason (RFC 6455 §7.4.1).
    fn close_frame(self) -> CloseFrame {
        let (code, reason) = match self {
            Self::Terminal | Self::Client => (1000, "the order reached a terminal status"),
            Self::Slow => (1008, "client too slow: an update was not taken in time"),
            Self::FlagOff => (1008, "real_time_order_updates was turned off"),
            Self::Shutdown => (1001, "the server is shutting down; reconnect"),
            Self::Error => (1011, "the read models could not be read; reconnect"),
        };
        CloseFrame {
            code,
            reason: reason.into(),
        }
    }
}

/// One connection's subscription to its order: the updates it has yet to send.
struct Follower {
    hub: Arc<Hub>,
    order: OrderId,
    receiver: broadcast::Receiver<Arc<OrderStatusView>>,
    /// The position of the last status sent (or skipped by `Last-Event-ID`).
    last: StreamPosition,
    last_status: Option<String>,
    live: Live,
    settings: watch::Receiver<Arc<petstore_live_settings::LiveSnapshot>>,
    flag_subject: String,
    closing: watch::Receiver<bool>,
    _slot: Slot,
}

impl Drop for Follower {
    fn drop(&mut self) {
        let mut followed = locked(&self.hub.followed);
        // Our own receiver is still alive here.
        if followed
            .get(&self.order)
            .is_some_and(|sender| sender.receiver_count() <= 1)
        {
            followed.remove(&self.order);
        }
    }
}

impl Follower {
    /// Subscribes to `order_id` (before its snapshot is read: see the module's docs).
    fn subscribe(state: &QueryState, slot: Slot, order: &OrderId, flag_subject: String) -> Self {
        let hub = &state.updates.0;
        let receiver = locked(&hub.followed)
            .entry(*order)
            .or_insert_with(|| broadcast::channel(FOLLOWER_BACKLOG).0)
            .subscribe();
        Self {
            hub: hub.clone(),
            order: *order,
            receiver,
            last: StreamPosition::START,
            last_status: None,
            live: state.live.clone(),
            settings: state.live.subscribe(),
            flag_subject,
            closing: hub.closing.subscribe(),
            _slot: slot,
        }
    }

    /// The updates of `view` after the last one sent, marking them sent.
    fn take(&mut self, view: &OrderStatusView) -> Vec<OrderUpdate> {
        let legacy;
        let history = if view.status_history.is_empty() {
            legacy = [view.current_status()];
            &legacy[..]
        } else {
            &view.status_history[..]
        };
        let mut updates = Vec::new();
        for change in history {
            if change.position <= self.last
                || self.last_status.as_deref() == Some(change.status.as_str())
            {
                continue;
            }
            self.last = change.position;
            self.last_status = Some(change.status.clone());
            updates.push(OrderUpdate::new(view.order_id, change));
        }
        updates
    }

    /// The next updates to send, or why the connection ends.
    async fn next(&mut self) -> Result<Vec<OrderUpdate>, End> {
        loop {
            let received = tokio::select! {
                _ = self.closing.wait_for(|closing| *closing) => return Err(End::Shutdown),
                changed = self.settings.changed() => {
                    let on = changed.is_ok()
                        && self.live.current().flag(Flag::RealTimeOrderUpdates, &self.flag_subject);
                    if !on {
                        return Err(End::FlagOff);
                    }
                    continue;
                }
                received = self.receiver.recv() => received,
            };
            let view = match received {
                Ok(view) => view,
                Err(broadcast::error::RecvError::Lagged(_)) => {
                    // Fell behind the broadcast: the view itself has every status.
                    match self.hub.read_models.order(&self.order).await {
                        Ok(Some(view)) => Arc::new(view),
                        Ok(None) | Err(_) => return Err(End::Error),
                    }
                }
                Err(broadcast::error::RecvError::Closed) => return Err(End::Shutdown),
            };
            let updates = self.take(&view);
            if !updates.is_empty() {
                return Ok(updates);
            }
        }
    }

    /// Counts updates sent live (not the snapshot) and their delay from their event.
    fn sent(&self, updates: &[OrderUpdate], live: bool) {
        let metrics = &self.hub.metrics;
        metrics.order_updates_sent.inc_by(updates.len() as u64);
        if !live {
            return;
        }
        let now = chrono::Utc::now();
        for update in updates {
            if let Ok(at) = chrono::DateTime::parse_from_rfc3339(&update.at) {
                let delay = (now - at.to_utc()).to_std().unwrap_or_default();
                metrics.order_update_delay.observe(delay.as_secs_f64());
            }
        }
    }
}

/// An open connection in `petstore_order_update_connections`.
struct Open(Metrics, &'static str);

impl Open {
    fn new(metrics: &Metrics, protocol: &'static str) -> Self {
        metrics
            .order_update_connections
            .get_or_create(&UpdateProtocolLabels { protocol })
            .inc();
        Self(metrics.clone(), protocol)
    }
}

impl Drop for Open {
    fn drop(&mut self) {
        self.0
            .order_update_connections
            .get_or_create(&UpdateProtocolLabels { protocol: self.1 })
            .dec();
    }
}

/// Live updates of an order's status.
///
/// A WebSocket when the request asks to upgrade, Server-Sent Events otherwise (`curl -N`).
/// The first update is the order's current status; then each status change, in order, up to
/// the terminal `completed` or `cancelled`, after which the server closes (WebSocket close
/// 1000; the SSE stream ends). Each WebSocket text message, and each SSE `status` event's
/// data, is an [`OrderUpdate`]; its `id` is the SSE event id. A reconnect that sends the last
/// `id` it saw (`Last-Event-ID`, or `last_event_id`) gets every change after it and nothing
/// twice; when nothing is left (the order had ended) SSE answers 204, which stops a browser's
/// `EventSource` reconnecting.
///
/// Authorized as the status route is: the order's customer or an admin; a browser, which
/// cannot send `Authorization` on a WebSocket or an `EventSource`, passes the token as
/// `access_token`. Needs `real_time_order_updates` on for the caller (403
/// `feature-disabled` otherwise; connections close with 1008 when it is turned off). At most
/// `http.order_updates.max_connections_per_subject` connections per caller (429). A
/// WebSocket client that does not take an update within `http.order_updates.send_timeout_ms`
/// is dropped with close 1008; a slow SSE reader only delays itself. On shutdown connections
/// close with 1001 (SSE: a `close` event), and a reconnect with the last id resumes.
#[utoipa::path(
    get,
    path = "/petstore-domain/orders/{order_id}/updates",
    tag = "orders",
    params(
        ("order_id" = String, Path, format = Uuid, description = "The order's UUID"),
        UpdatesQuery,
        ("Last-Event-ID" = Option<String>, Header, pattern = "^t[0-9]{1,18}p[0-9]{1,18}$", description = "SSE: resume after this update's id"),
        ("X-Consistency-Token" = Option<String>, Header, pattern = "^t[0-9]{1,18}p[0-9]{1,18}$", description = "From a command's response: wait until the read model shows that write"),
    ),
    responses(
        (status = 101, description = "WebSocket: switching protocols; then one OrderUpdate per text message"),
        (status = 200, description = "Server-Sent Events: `status` events, each an OrderUpdate", body = OrderUpdate, content_type = "text/event-stream"),
        (status = 204, description = "Resumed after the order's terminal update: nothing is left to send"),
        (status = 400, description = "Not a UUID, or a malformed event id", body = ProblemDocument, content_type = "application/problem+json"),
        (status = 401, description = "No valid bearer token", body = ProblemDocument, content_type = "application/problem+json"),
        (status = 403, description = "The order belongs to another customer, or real_time_order_updates is off", body = ProblemDocument, content_type = "application/problem+json"),
        (status = 404, description = "No such order", body = ProblemDocument, content_type = "application/problem+json"),
        (status = 409, description = "The read model did not reach the order or the consistency token in time", body = ProblemDocument, content_type = "application/problem+json"),
        (status = 429, description = "Too many open update connections for this caller", body = ProblemDocument, content_type = "application/problem+json"),
    )
)]
pub async fn order_updates(
    State(state): State<QueryState>,
    caller: Caller,
    Path(order_id): Path<String>,
    Query(query): Query<UpdatesQuery>,
    headers: HeaderMap,
    token: ConsistencyToken,
    WebSocketRequest(upgrade): WebSocketRequest,
) -> Result<Response, Problem> {
    let order_id =
        OrderId::parse(&order_id).map_err(|error| Problem::bad_request(error.to_string()))?;
    RequestContext::record_order(&order_id);
    let flag_subject = caller.flag_subject();
    if !RequestContext::served_flag(
        Flag::RealTimeOrderUpdates,
        state.live.flag(Flag::RealTimeOrderUpdates, &flag_subject),
    ) {
        return Err(Problem::new(
            StatusCode::FORBIDDEN,
            "feature-disabled",
            "Feature disabled",
            "live order updates are off: the real_time_order_updates flag is off for you",
        ));
    }
    let resume = match headers
        .get("last-event-id")
        .map(|value| value.to_str().unwrap_or_default())
        .or(query.last_event_id.as_deref())
    {
        None => None,
        Some(id) => Some(StreamPosition::from_token(id).ok_or_else(|| {
            Problem::bad_request(format!("{id:?} is not an update id this API sent"))
        })?),
    };
    if let Some(token) = token.0 {
        state.wait_for(token).await?;
    }
    let hub = &state.updates.0;
    let slot = Slot::acquire(hub, caller.subject()).ok_or_else(|| {
        Problem::new(
            StatusCode::TOO_MANY_REQUESTS,
            "too-many-connections",
            "Too many connections",
            format!(
                "you hold {} open update connections, the most allowed; close one first",
                hub.settings.max_connections_per_subject
            ),
        )
        .with_header(RETRY_AFTER, HeaderValue::from_static("1"))
    })?;
    let mut follower = Follower::subscribe(&state, slot, &order_id, flag_subject);
    let Some(view) = state.projected_order(&order_id, None).await? else {
        return Err(Problem::not_found(format!(
            "order {order_id} does not exist"
        )));
    };
    caller.authorize_customer(view.customer_id.as_str())?;
    let updates = match resume {
        Some(after) => {
            follower.last = after;
            follower.take(&view)
        }
        None => {
            let current = view.current_status();
            follower.last = current.position;
            follower.last_status = Some(current.status.clone());
            vec![OrderUpdate::new(view.order_id, &current)]
        }
    };
    let first = Start {
        finished: updates.last().map_or_else(
            || view.current_status().is_terminal(),
            |update| update.terminal,
        ),
        updates,
    };
    if first.updates.is_empty() && first.finished && upgrade.is_none() {
        return Ok(StatusCode::NO_CONTENT.into_response());
    }
    let send_timeout = Duration::from_millis(hub.settings.send_timeout_ms);
    let keep_alive = Duration::from_millis(hub.settings.keep_alive_ms);
    Ok(match upgrade {
        Some(upgrade) => upgrade
            .on_upgrade(move |socket| async move {
                let open = Open::new(&follower.hub.metrics, "websocket");
                let end = serve_websocket(socket, follower, first, send_timeout, keep_alive).await;
                open.0.order_update_closed(end.label());
            })
            .into_response(),
        None => serve_sse(follower, first, keep_alive).into_response(),
    })
}

/// The WebSocket handshake, when the request asks to upgrade; `None` for SSE.
pub struct WebSocketRequest(Option<WebSocketUpgrade>);

impl<S: Send + Sync> FromRequestParts<S> for WebSocketRequest {
    type Rejection = Problem;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        let asks = parts
            .headers
            .get(UPGRADE)
            .and_then(|value| value.to_str().ok())
            .is_some_and(|value| value.eq_ignore_ascii_case("websocket"));
        if !asks {
            return Ok(Self(None));
        }
        WebSocketUpgrade::from_request_parts(parts, state)
            .await
            .map(|upgrade| Self(Some(upgrade)))
            .map_err(|rejection| {
                Problem::bad_request(format!(
                    "not a WebSocket handshake: {}",
                    rejection.body_text()
                ))
            })
    }
}

/// What a connection sends first, and whether the order has ended with it.
struct Start {
    updates: Vec<OrderUpdate>,
    finished: bool,
}

/// Sends `message` within `limit`; `Err(Slow)` past it, `Err(Client)` if the socket failed.
async fn send_within(socket: &mut WebSocket, message: Message, limit: Duration) -> Result<(), End> {
    match tokio::time::timeout(limit, socket.send(message)).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(_)) => Err(End::Client),
        Err(_) => Err(End::Slow),
    }
}

/// Sends `updates`, one text message each; `Err(Terminal)` once the last one is terminal.
async fn send_updates(
    socket: &mut WebSocket,
    updates: &[OrderUpdate],
    limit: Duration,
) -> Result<(), End> {
    for update in updates {
        let text = serde_json::to_string(update).map_err(|_| End::Error)?;
        send_within(socket, Message::Text(text.into()), limit).await?;
    }
    match updates.last() {
        Some(update) if update.terminal => Err(End::Terminal),
        _ => Ok(()),
    }
}

async fn serve_websocket(
    mut socket: WebSocket,
    mut follower: Follower,
    first: Start,
    send_timeout: Duration,
    keep_alive: Duration,
) -> End {
    let mut pings = tokio::time::interval_at(tokio::time::Instant::now() + keep_alive, keep_alive);
    let mut served = if first.updates.is_empty() && first.finished {
        Err(End::Terminal)
    } else {
        follower.sent(&first.updates, false);
        send_updates(&mut socket, &first.updates, send_timeout).await
    };
    while served.is_ok() {
        served = tokio::select! {
            received = socket.recv() => match received {
                None | Some(Err(_) | Ok(Message::Close(_))) => Err(End::Client),
                // Pings are answered by the socket itself; anything else is ignored.
                Some(Ok(_)) => Ok(()),
            },
            _ = pings.tick() => {
                send_within(&mut socket, Message::Ping(Default::default()), send_timeout).await
            }
            next = follower.next() => match next {
                Ok(updates) => {
                    follower.sent(&updates, true);
                    send_updates(&mut socket, &updates, send_timeout).await
                }
                Err(end) => Err(end),
            },
        };
    }
    let end = served.err().unwrap_or(End::Error);
    if end != End::Client {
        let close = Message::Close(Some(end.close_frame()));
        // The closing handshake, bounded (a client too slow to take an update may not take
        // the close either): the connection goes only once the client's Close answered ours.
        // Dropped at once, it could be reset under the client's reply, and the client would
        // see a broken pipe instead of our frame.
        let _ = tokio::time::timeout(Duration::from_secs(1), async {
            if socket.send(close).await.is_ok() {
                while let Some(Ok(message)) = socket.recv().await {
                    if matches!(message, Message::Close(_)) {
                        break;
                    }
                }
            }
        })
        .await;
    }
    end
}

fn sse_event(update: &OrderUpdate) -> Event {
    Event::default()
        .event("status")
        .id(update.id.clone())
        .json_data(update)
        .unwrap_or_else(|_| Event::default().event("status"))
}

/// The SSE stream: the first updates, then each change, ending after the terminal one (or
/// with a `close` event saying why it ended early).
fn serve_sse(follower: Follower, first: Start, keep_alive: Duration) -> impl IntoResponse {
    use futures::StreamExt;
    follower.sent(&first.updates, false);
    let open = Open::new(&follower.hub.metrics, "sse");
    let initial: Vec<Event> = first.updates.iter().map(sse_event).collect();
    let live =
        futures::stream::unfold(Some((follower, open, first.finished)), |state| async move {
            let (mut follower, open, finished) = state?;
            if finished {
                open.0.order_update_closed(End::Terminal.label());
                return None;
            }
            match follower.next().await {
                Ok(updates) => {
                    follower.sent(&updates, true);
                    let terminal = updates.last().is_some_and(|update| update.terminal);
                    let events: Vec<Event> = updates.iter().map(sse_event).collect();
                    Some((events, Some((follower, open, terminal))))
                }
                Err(end) => {
                    open.0.order_update_closed(end.label());
                    let close = Event::default()
                        .event("close")
                        .data(end.close_frame().reason.as_str());
                    Some((vec![close], None))
                }
            }
        });
    let events = futures::stream::iter(initial)
        .chain(live.flat_map(futures::stream::iter))
        .map(Ok::<_, std::convert::Infallible>);
    Sse::new(events).keep_alive(KeepAlive::new().interval(keep_alive))
}
