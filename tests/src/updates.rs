//! Clients of the live order updates (`GET /orders/{id}/updates`): a WebSocket one and a
//! Server-Sent Events one, each reading until the server ends the stream.

use std::time::Duration;

use futures::StreamExt;
use serde_json::Value;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

/// An open WebSocket.
pub type Socket = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// The updates path of `order_id`.
pub fn path(order_id: &str) -> String {
    format!("/petstore-domain/orders/{order_id}/updates")
}

/// Opens the updates WebSocket at `address` (`http://host:port`) + `path_and_query`, with
/// `bearer` in `Authorization` when given.
pub async fn connect(
    address: &str,
    path_and_query: &str,
    bearer: Option<&str>,
) -> Result<Socket, tokio_tungstenite::tungstenite::Error> {
    let authorization = bearer.map(|token| format!("Bearer {token}"));
    let headers: Vec<(&str, &str)> = authorization
        .iter()
        .map(|value| ("authorization", value.as_str()))
        .collect();
    connect_with(address, path_and_query, &headers).await
}

/// [`connect`] with any request headers.
pub async fn connect_with(
    address: &str,
    path_and_query: &str,
    headers: &[(&'static str, &str)],
) -> Result<Socket, tokio_tungstenite::tungstenite::Error> {
    let url = format!(
        "{}{path_and_query}",
        address.replacen("http://", "ws://", 1)
    );
    let mut request = url.into_client_request()?;
    for (name, value) in headers {
        request.headers_mut().insert(
            *name,
            HeaderValue::from_str(value).expect("an ASCII header"),
        );
    }
    Ok(tokio_tungstenite::connect_async(request).await?.0)
}

/// What a WebSocket received before it closed.
#[derive(Debug, Default)]
pub struct Received {
    /// Each text message, parsed.
    pub updates: Vec<Value>,
    /// The close frame's code and reason, if the server sent one.
    pub close: Option<(u16, String)>,
}

impl Received {
    /// The `status` of each update.
    pub fn statuses(&self) -> Vec<String> {
        statuses(&self.updates)
    }
}

/// The `status` of each update.
pub fn statuses(updates: &[Value]) -> Vec<String> {
    updates
        .iter()
        .map(|update| update["status"].as_str().unwrap_or_default().to_owned())
        .collect()
}

/// Reads `socket` until the server closes it; panics after `limit`.
pub async fn read_all(mut socket: Socket, limit: Duration) -> Received {
    let mut received = Received::default();
    let reading = async {
        while let Some(message) = socket.next().await {
            match message.expect("a WebSocket message") {
                Message::Text(text) => received
                    .updates
                    .push(serde_json::from_str(&text).expect("an update is JSON")),
                Message::Close(frame) => {
                    received.close =
                        frame.map(|frame| (u16::from(frame.code), frame.reason.to_string()));
                    let _ = socket.close(None).await;
                    break;
                }
                _ => {}
            }
        }
    };
    tokio::time::timeout(limit, reading)
        .await
        .unwrap_or_else(|_| panic!("the updates did not end within {limit:?}: {received:?}"));
    received
}

/// Reads the next text message of `socket` as JSON; panics after `limit`.
pub async fn next_update(socket: &mut Socket, limit: Duration) -> Value {
    let reading = async {
        loop {
            match socket.next().await {
                Some(Ok(Message::Text(text))) => {
                    return serde_json::from_str(&text).expect("an update is JSON")
                }
                Some(Ok(Message::Close(frame))) => panic!("closed: {frame:?}"),
                Some(Ok(_)) => {}
                other => panic!("the socket ended: {other:?}"),
            }
        }
    };
    tokio::time::timeout(limit, reading)
        .await
        .expect("an update in time")
}

/// One Server-Sent Event.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Event {
    /// `event:` (`message` when absent).
    pub event: String,
    /// `id:`.
    pub id: Option<String>,
    /// `data:`, lines joined by `\n`.
    pub data: String,
}

impl Event {
    /// The data as JSON.
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.data).expect("the event's data is JSON")
    }
}

/// Reads an SSE response until the server ends it; panics after `limit`.
pub async fn read_events(mut response: reqwest::Response, limit: Duration) -> Vec<Event> {
    let mut events = Vec::new();
    let mut buffer = String::new();
    let reading = async {
        while let Some(chunk) = response.chunk().await.expect("a body chunk") {
            buffer.push_str(std::str::from_utf8(&chunk).expect("UTF-8"));
            while let Some(end) = buffer.find("\n\n") {
                let block: String = buffer.drain(..end + 2).collect();
                if let Some(event) = parse_event(&block) {
                    events.push(event);
                }
            }
        }
    };
    tokio::time::timeout(limit, reading)
        .await
        .unwrap_or_else(|_| panic!("the event stream did not end within {limit:?}"));
    events
}

fn parse_event(block: &str) -> Option<Event> {
    let mut event = Event {
        event: "message".to_owned(),
        ..Event::default()
    };
    let mut data = Vec::new();
    for line in block.lines() {
        let (field, value) = line.split_once(':').unwrap_or((line, ""));
        let value = value.strip_prefix(' ').unwrap_or(value);
        match field {
            "event" => event.event = value.to_owned(),
            "id" => event.id = Some(value.to_owned()),
            "data" => data.push(value),
            _ => {}
        }
    }
    if data.is_empty() {
        // A keep-alive comment.
        return None;
    }
    event.data = data.join("\n");
    Some(event)
}
