//! `petstore providers serve`: a simulated payment gateway and delivery provider speaking the
//! provider protocol over HTTP (the one `providers.payment.url` and `providers.delivery.url`
//! call), for trying the distributed setup and for the tests.
//!
//! It answers as a real provider would: a repeated `Idempotency-Key` gets the first answer
//! again (a 5xx is not an answer and is not kept, so a retry may succeed), the same key with
//! another request is refused; it waits a configurable latency (±50 %), fails a configurable
//! share of calls with 503, and honours `X-Simulate-Failure` (`card-declined`: 402 on a
//! charge; `delivery-refused`: 422 on a booking; any other value: 503). It records every call
//! (`GET /calls`) and counts the effects (`GET /effects`).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use chrono::Utc;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

/// The most calls `GET /calls` keeps (the oldest are dropped first).
pub const MAX_RECORDED_CALLS: usize = 100_000;

/// How the simulated providers behave.
#[derive(Debug, Clone, Copy, Default)]
pub struct Behaviour {
    /// Latency of each answer, in milliseconds (each varies by up to ±50 %).
    pub latency_ms: u64,
    /// Share of calls answered 503 (before anything is done), 0.0 to 1.0.
    pub failure_rate: f64,
}

/// One call as recorded.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Call {
    /// `charge`, `refund`, `delivery` or `cancel`.
    pub operation: String,
    /// Its `Idempotency-Key` (empty when missing).
    pub idempotency_key: String,
    /// The status answered.
    pub status: u16,
    /// Whether it repeated a key and got the first answer again.
    pub replayed: bool,
    /// Who called: the request's `User-Agent` (`petstore (RUNNER ID)`), empty when none.
    pub caller: String,
    /// When it was answered, in milliseconds since the Unix epoch.
    pub at_ms: i64,
}

/// The effects made (each at most once per key).
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Effects {
    /// Charges taken.
    pub charges: usize,
    /// Refunds made.
    pub refunds: usize,
    /// Deliveries booked.
    pub deliveries: usize,
    /// Deliveries called off.
    pub cancellations: usize,
}

/// The simulators' state.
#[derive(Default)]
struct Books {
    /// The answer kept per (operation, key), with the request it answered.
    answers: HashMap<(&'static str, String), (Value, StatusCode, Value)>,
    /// Charge id → (amount, refunded so far).
    charges: HashMap<String, (i64, i64)>,
    /// Delivery id → cancelled.
    deliveries: HashMap<String, bool>,
    calls: std::collections::VecDeque<Call>,
    effects: Effects,
}

/// Both simulated providers: their routes, and what they were asked and did.
#[derive(Clone)]
pub struct Simulator {
    behaviour: Behaviour,
    books: Arc<Mutex<Books>>,
}

/// The routes of both simulated providers.
pub fn router(behaviour: Behaviour) -> Router {
    Simulator::new(behaviour).router()
}

impl Simulator {
    /// Simulators that have seen no call yet.
    pub fn new(behaviour: Behaviour) -> Self {
        Self {
            behaviour,
            books: Arc::default(),
        }
    }

    /// Their routes (sharing these books).
    pub fn router(&self) -> Router {
        Router::new()
            .route("/charges", post(charge))
            .route("/refunds", post(refund))
            .route("/deliveries", post(book))
            .route("/deliveries/{delivery_id}/cancel", post(cancel))
            .route("/calls", get(calls))
            .route("/effects", get(effects))
            .route("/health", get(|| async { Json(json!({"status": "up"})) }))
            .with_state(self.clone())
    }

    /// Every call recorded so far (the latest [`MAX_RECORDED_CALLS`]), oldest first.
    pub fn calls(&self) -> Vec<Call> {
        self.books().calls.iter().cloned().collect()
    }

    /// The effects made so far.
    pub fn effects(&self) -> Effects {
        self.books().effects
    }
}

/// An answer: a status and a JSON body.
type Answer = (StatusCode, Value);

fn error(status: StatusCode, message: impl Into<String>) -> Answer {
    (status, json!({ "error": message.into() }))
}

impl Simulator {
    fn books(&self) -> std::sync::MutexGuard<'_, Books> {
        self.books.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Answers a call of `operation`: the kept answer of its key, or `act`'s (kept unless a
    /// 5xx), after the latency and the simulated failures; records the call.
    async fn answer(
        &self,
        operation: &'static str,
        headers: &HeaderMap,
        body: &Bytes,
        act: impl FnOnce(&mut Books, &Value, Option<&str>) -> Answer,
    ) -> Response {
        let latency = self.behaviour.latency_ms;
        if latency > 0 {
            let jittered = latency - latency / 2 + fastrand::u64(0..=latency);
            tokio::time::sleep(Duration::from_millis(jittered)).await;
        }
        let key = headers
            .get("idempotency-key")
            .and_then(|key| key.to_str().ok())
            .filter(|key| !key.is_empty())
            .map(str::to_owned);
        let caller = headers
            .get("user-agent")
            .and_then(|agent| agent.to_str().ok())
            .unwrap_or_default()
            .to_owned();
        let simulate = headers
            .get("x-simulate-failure")
            .and_then(|value| value.to_str().ok());
        let request: Result<Value, _> = if body.is_empty() {
            Ok(json!({}))
        } else {
            serde_json::from_slice(body)
        };
        let mut books = self.books();
        let (status, answer, replayed) = match (&key, request) {
            (None, _) => {
                let (status, answer) = error(
                    StatusCode::BAD_REQUEST,
                    "an Idempotency-Key header is required",
                );
                (status, answer, false)
            }
            (Some(_), Err(parse)) => {
                let (status, answer) = error(
                    StatusCode::BAD_REQUEST,
                    format!("the body is not JSON: {parse}"),
                );
                (status, answer, false)
            }
            (Some(key), Ok(request)) => match books.answers.get(&(operation, key.clone())) {
                Some((first, status, answer)) if *first == request => {
                    (*status, answer.clone(), true)
                }
                Some(_) => {
                    let (status, answer) = error(
                        StatusCode::UNPROCESSABLE_ENTITY,
                        "this Idempotency-Key was used with another request",
                    );
                    (status, answer, false)
                }
                None => {
                    let (status, answer) = if fastrand::f64() < self.behaviour.failure_rate {
                        error(
                            StatusCode::SERVICE_UNAVAILABLE,
                            "transient failure (simulated)",
                        )
                    } else {
                        act(&mut books, &request, simulate)
                    };
                    if !status.is_server_error() {
                        books
                            .answers
                            .insert((operation, key.clone()), (request, status, answer.clone()));
                    }
                    (status, answer, false)
                }
            },
        };
        if books.calls.len() >= MAX_RECORDED_CALLS {
            books.calls.pop_front();
        }
        books.calls.push_back(Call {
            operation: operation.to_owned(),
            idempotency_key: key.unwrap_or_default(),
            status: status.as_u16(),
            replayed,
            caller,
            at_ms: Utc::now().timestamp_millis(),
        });
        (status, Json(answer)).into_response()
    }
}

/// The string field `name` of `request`.
fn text<'a>(request: &'a Value, name: &str) -> Result<&'a str, Answer> {
    request[name]
        .as_str()
        .filter(|value| !value.is_empty())
        .ok_or_else(|| {
            error(
                StatusCode::BAD_REQUEST,
                format!("{name} is required (a string)"),
            )
        })
}

/// The non-negative amount `amount_minor` of `request`.
fn amount(request: &Value) -> Result<i64, Answer> {
    request["amount_minor"]
        .as_i64()
        .filter(|amount| *amount >= 0)
        .ok_or_else(|| {
            error(
                StatusCode::BAD_REQUEST,
                "amount_minor is required (a whole number, not negative)",
            )
        })
}

/// A simulated failure asked for: `refusal` is the header value that refuses with `refused`.
fn simulated(simulate: Option<&str>, refusal: &str, refused: Answer) -> Option<Answer> {
    match simulate {
        None => None,
        Some(value) if value == refusal => Some(refused),
        Some(value) => Some(error(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("failing as asked ({value})"),
        )),
    }
}

async fn charge(State(simulator): State<Simulator>, headers: HeaderMap, body: Bytes) -> Response {
    simulator
        .answer("charge", &headers, &body, |books, request, simulate| {
            let checked = (|| {
                text(request, "order_id")?;
                text(request, "customer_id")?;
                text(request, "currency")?;
                amount(request)
            })();
            let amount = match checked {
                Ok(amount) => amount,
                Err(answer) => return answer,
            };
            let declined = error(StatusCode::PAYMENT_REQUIRED, "card_declined");
            if let Some(answer) = simulated(simulate, "card-declined", declined) {
                return answer;
            }
            let charge_id = format!("ch_{}", uuid::Uuid::new_v4().simple());
            books.charges.insert(charge_id.clone(), (amount, 0));
            books.effects.charges += 1;
            (
                StatusCode::CREATED,
                json!({ "charge_id": charge_id, "status": "succeeded" }),
            )
        })
        .await
}

async fn refund(State(simulator): State<Simulator>, headers: HeaderMap, body: Bytes) -> Response {
    simulator
        .answer("refund", &headers, &body, |books, request, simulate| {
            let checked = (|| Ok::<_, Answer>((text(request, "charge_id")?, amount(request)?)))();
            let (charge_id, amount) = match checked {
                Ok(checked) => checked,
                Err(answer) => return answer,
            };
            let refused = error(StatusCode::UNPROCESSABLE_ENTITY, "refund refused");
            if let Some(answer) = simulated(simulate, "refund-refused", refused) {
                return answer;
            }
            let Some((charged, refunded)) = books.charges.get_mut(charge_id) else {
                return error(StatusCode::NOT_FOUND, format!("no charge {charge_id}"));
            };
            if *refunded + amount > *charged {
                return error(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    format!(
                        "{amount} is more than the {} left to refund",
                        *charged - *refunded
                    ),
                );
            }
            *refunded += amount;
            books.effects.refunds += 1;
            let refund_id = format!("re_{}", uuid::Uuid::new_v4().simple());
            (StatusCode::CREATED, json!({ "refund_id": refund_id }))
        })
        .await
}

async fn book(State(simulator): State<Simulator>, headers: HeaderMap, body: Bytes) -> Response {
    simulator
        .answer("delivery", &headers, &body, |books, request, simulate| {
            let checked = (|| {
                text(request, "order_id")?;
                text(request, "pet_id")?;
                text(request, "customer_id").map(|_| ())
            })();
            if let Err(answer) = checked {
                return answer;
            }
            let refused = error(StatusCode::UNPROCESSABLE_ENTITY, "address not served");
            if let Some(answer) = simulated(simulate, "delivery-refused", refused) {
                return answer;
            }
            let delivery_id = format!("dl_{}", uuid::Uuid::new_v4().simple());
            books.deliveries.insert(delivery_id.clone(), false);
            books.effects.deliveries += 1;
            let scheduled_for = Utc::now() + chrono::Duration::days(3);
            (
                StatusCode::CREATED,
                json!({ "delivery_id": delivery_id, "scheduled_for": scheduled_for }),
            )
        })
        .await
}

async fn cancel(
    State(simulator): State<Simulator>,
    Path(delivery_id): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    simulator
        .answer("cancel", &headers, &body, |books, _, simulate| {
            if let Some(value) = simulate {
                return error(
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!("failing as asked ({value})"),
                );
            }
            let Some(cancelled) = books.deliveries.get_mut(&delivery_id) else {
                return error(StatusCode::NOT_FOUND, format!("no delivery {delivery_id}"));
            };
            if !*cancelled {
                *cancelled = true;
                books.effects.cancellations += 1;
            }
            (
                StatusCode::OK,
                json!({ "delivery_id": delivery_id, "status": "cancelled" }),
            )
        })
        .await
}

/// `GET /calls?operation=`: the calls recorded, oldest first.
#[derive(Deserialize)]
struct CallsQuery {
    operation: Option<String>,
}

async fn calls(State(simulator): State<Simulator>, Query(query): Query<CallsQuery>) -> Json<Value> {
    let books = simulator.books();
    let calls: Vec<&Call> = books
        .calls
        .iter()
        .filter(|call| {
            query
                .operation
                .as_ref()
                .is_none_or(|operation| *operation == call.operation)
        })
        .collect();
    Json(json!({ "calls": calls }))
}

async fn effects(State(simulator): State<Simulator>) -> Json<Effects> {
    Json(simulator.books().effects)
}
