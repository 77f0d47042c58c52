//! `petstore explain` and `GET /petstore-domain/admin/orders/{id}/timeline`: the real binary
//! answers "what happened to this order, and what is it waiting for" from the embedded store
//! and from Postgres, the command and the route agree, and the exit code says where the order
//! stands (0 terminal, 3 in flight, 4 stuck, 2 unknown).

use std::process::Output;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::common::{self, FreshDatabase, Service};

/// A pet of the demo catalog.
const PET: &str = "golden-retriever-001";

fn explain(env: &[(&str, String)], args: &[&str]) -> Output {
    common::petstore_command(env)
        .arg("explain")
        .args(args)
        .output()
        .expect("the binary runs")
}

fn code(output: &Output) -> i32 {
    output.status.code().expect("exited, not killed")
}

fn json_of(output: &Output) -> Value {
    serde_json::from_slice(&output.stdout).unwrap_or_else(|error| {
        panic!(
            "{error}: {}\n{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        )
    })
}

async fn place_order(service: &Service) -> String {
    place_order_failing(service, None).await
}

/// Places an order, with `X-Simulate-Failure: failing` when given.
async fn place_order_failing(service: &Service, failing: Option<&str>) -> String {
    let mut request = reqwest::Client::new()
        .post(service.url("/petstore-domain/orders"))
        .json(&json!({"customer_id": "customer-001", "pet_id": PET}));
    if let Some(failing) = failing {
        request = request.header("X-Simulate-Failure", failing);
    }
    let response = request.send().await.expect("answered");
    assert_eq!(response.status(), 202);
    let accepted: Value = response.json().await.expect("json");
    accepted["order_id"].as_str().expect("id").to_owned()
}

async fn timeline(service: &Service, order_id: &str, query: &str) -> reqwest::Response {
    reqwest::Client::new()
        .get(service.url(&format!(
            "/petstore-domain/admin/orders/{order_id}/timeline{query}"
        )))
        .send()
        .await
        .expect("answered")
}

async fn timeline_json(service: &Service, order_id: &str) -> Value {
    let response = timeline(service, order_id, "").await;
    assert_eq!(response.status(), 200);
    response.json().await.expect("json")
}

/// Polls `explain --json` until `accept` takes its document (30 s at most).
async fn explain_until(
    env: &[(&str, String)],
    order_id: &str,
    accept: impl Fn(&Value) -> bool,
) -> (Output, Value) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let output = explain(env, &["--order", order_id, "--json"]);
        if output
            .status
            .code()
            .is_some_and(|code| code == 0 || code == 3 || code == 4)
        {
            let document = json_of(&output);
            if accept(&document) {
                return (output, document);
            }
        }
        assert!(
            Instant::now() < deadline,
            "explain never answered as expected: {}\n{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn kinds(document: &Value) -> Vec<String> {
    entries(document)
        .iter()
        .map(|entry| entry["kind"].as_str().expect("kind").to_owned())
        .collect()
}

fn entries(document: &Value) -> &Vec<Value> {
    document["entries"].as_array().expect("entries")
}

/// The entries of `kind` naming `field` = `value`.
fn has_entry(document: &Value, kind: &str, field: &str, value: &str) -> bool {
    entries(document)
        .iter()
        .any(|entry| entry["kind"] == kind && entry[field] == value)
}

/// Events in commit order, the other entries in time order, every index its place.
fn assert_chronological(document: &Value) {
    let entries = entries(document);
    let positions: Vec<i64> = entries
        .iter()
        .filter(|entry| entry["event_id"].is_string())
        .map(|entry| entry["global_position"].as_i64().expect("position"))
        .collect();
    assert!(
        positions.windows(2).all(|pair| pair[0] < pair[1]),
        "events in commit order: {positions:?}"
    );
    let others: Vec<&str> = entries
        .iter()
        .filter(|entry| entry["event_id"].is_null() && entry["step"].is_null())
        .map(|entry| entry["at"].as_str().expect("at"))
        .collect();
    assert!(
        others.windows(2).all(|pair| pair[0] <= pair[1]),
        "{others:?}"
    );
    for (index, entry) in entries.iter().enumerate() {
        assert_eq!(entry["index"], index);
    }
    assert_eq!(document["total_entries"], entries.len());
}

/// The document without what depends on the moment it was read: `as_of`, the time left
/// on deadlines, the lease's time left.
fn timeless(document: &Value) -> Value {
    let mut document = document.clone();
    document["as_of"] = Value::Null;
    for armed in ["deadline", "next_retry"] {
        if document["now"][armed].is_object() {
            document["now"][armed]["time_left_ms"] = Value::Null;
        }
    }
    if document["now"]["owner"].is_object() {
        document["now"]["owner"]["lease_expires_in_ms"] = Value::Null;
    }
    document
}

/// The fixture's form of a completed order's `explain --json`: ids, times and positions
/// replaced by what they are, the entries split into the events and what follows them
/// (fixed order) and the rest (deadlines, whose times interleave with the events').
fn fixture_form(document: &Value) -> Value {
    fn scrub(value: &Value, order_id: &str) -> Value {
        match value {
            Value::Object(map) => Value::Object(
                map.iter()
                    .map(|(key, value)| {
                        let scrubbed = match (key.as_str(), value) {
                            (_, Value::Null) => Value::Null,
                            (
                                "as_of"
                                | "at"
                                | "due_at"
                                | "started_at"
                                | "finished_at"
                                | "event_id"
                                | "correlation_id"
                                | "causation_id"
                                | "trace_id"
                                | "global_position"
                                | "time_left_ms"
                                | "lease_expires_in_ms"
                                | "epoch"
                                | "partition"
                                | "runner"
                                | "idempotency_key"
                                | "last_attempt_at"
                                | "offset"
                                | "order_id",
                                _,
                            ) => json!(format!("<{key}>")),
                            // People's text: it names times, ids and provider references.
                            ("summary" | "detail", _) => json!(format!("<{key}>")),
                            _ => scrub(value, order_id),
                        };
                        (key.clone(), scrubbed)
                    })
                    .collect(),
            ),
            Value::Array(items) => {
                Value::Array(items.iter().map(|item| scrub(item, order_id)).collect())
            }
            Value::String(text) => json!(text.replace(order_id, "<order_id>")),
            other => other.clone(),
        }
    }
    let order_id = document["order_id"].as_str().expect("order id");
    let mut scrubbed = scrub(document, order_id);
    let (events, others): (Vec<Value>, Vec<Value>) = entries(&scrubbed)
        .iter()
        .cloned()
        .partition(|entry| entry["event_type"].is_string());
    let indexless = |entries: &[Value]| -> Vec<Value> {
        entries
            .iter()
            .map(|entry| {
                let mut entry = entry.clone();
                entry["index"] = json!("<index>");
                entry
            })
            .collect()
    };
    scrubbed["entries"] = json!({
        "events_and_steps": indexless(&events),
        "deadlines": indexless(&others),
    });
    scrubbed
}

fn assert_matches_fixture(document: &Value) {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/explain_completed_order.json");
    let form = fixture_form(document);
    if std::env::var_os("BLESS").is_some() {
        std::fs::write(
            &path,
            serde_json::to_string_pretty(&form).expect("json") + "\n",
        )
        .expect("fixture written");
    }
    let fixture: Value =
        serde_json::from_str(&std::fs::read_to_string(&path).expect("fixture")).expect("json");
    assert_eq!(
        form,
        fixture,
        "explain --json changed shape; if on purpose, run again with BLESS=1 and review the diff:\n{}",
        serde_json::to_string_pretty(&form).expect("json")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn explain_follows_an_order_from_in_flight_to_terminal_on_the_embedded_store() {
    let data_dir = tempfile::tempdir().expect("temp dir");
    let env = [
        (
            "PETSTORE__STORAGE__DATA_DIR",
            data_dir.path().display().to_string(),
        ),
        // The saga waits for the customer's payment: the order stays in flight.
        (
            "PETSTORE__FEATURE_FLAGS__EXPRESS_ORDER_PROCESSING",
            "false".to_owned(),
        ),
    ];
    let service = Service::start(&env).await;
    let order_id = place_order(&service).await;

    // In flight: waiting for the payment, its deadline armed, someone owning the order.
    let (output, waiting) = explain_until(&env, &order_id, |document| {
        document["now"]["waiting_for"] == "payment"
    })
    .await;
    assert_eq!(code(&output), 3, "in flight");
    assert_eq!(waiting["now"]["verdict"], "in_flight");
    assert_eq!(waiting["now"]["status"], "reserved");
    assert_eq!(waiting["now"]["deadline"]["kind"], "payment");
    assert!(
        waiting["now"]["deadline"]["time_left_ms"]
            .as_i64()
            .expect("ms")
            > 0
    );
    assert!(waiting["now"]["owner"]["runner"].is_string(), "{waiting}");
    assert!(has_entry(
        &waiting,
        "command_accepted",
        "event_type",
        "OrderCreated"
    ));
    assert!(has_entry(&waiting, "step_started", "step", "payment"));
    assert!(has_entry(
        &waiting,
        "deadline_scheduled",
        "deadline",
        "payment"
    ));
    let table = explain(&env, &["--order", &order_id]);
    assert_eq!(code(&table), 3);
    let text = String::from_utf8_lossy(&table.stdout);
    assert!(
        text.contains("waiting for: payment") && text.contains("s left"),
        "{text}"
    );

    // The customer pays; the saga completes the order.
    let paid = reqwest::Client::new()
        .post(service.url("/petstore-domain/payments"))
        .json(&json!({"order_id": order_id}))
        .send()
        .await
        .expect("answered");
    assert_eq!(paid.status(), 200);
    service.wait_for_terminal(&order_id).await;
    // Provider attempts are written in batches, within a tenth of a second.
    let (output, done) = explain_until(&env, &order_id, |document| {
        document["now"]["verdict"] == "terminal"
            && has_entry(
                document,
                "provider_attempt",
                "provider_call",
                "delivery book",
            )
    })
    .await;
    assert_eq!(code(&output), 0);
    assert_eq!(done["now"]["status"], "completed");
    assert!(done["now"]["waiting_for"].is_null());
    assert!(done["now"]["deadline"].is_null());
    for step in ["reservation", "payment", "delivery"] {
        assert!(has_entry(&done, "step_succeeded", "step", step), "{step}");
        assert!(
            has_entry(&done, "deadline_cancelled", "deadline", step),
            "the {step} deadline was cancelled when the saga ended: {:?}",
            kinds(&done)
        );
    }
    assert!(has_entry(
        &done,
        "command_accepted",
        "event_type",
        "PaymentProcessed"
    ));
    // The customer's charge and the saga's booking, each attempted once under its key.
    let key = format!("customer-payment:{order_id}");
    assert!(entries(&done)
        .iter()
        .any(|entry| entry["kind"] == "provider_attempt"
            && entry["provider_call"] == "payment charge"
            && entry["idempotency_key"] == key.as_str()
            && entry["outcome"] == "succeeded"));
    assert!(has_entry(
        &done,
        "provider_attempt",
        "provider_call",
        "delivery book"
    ));
    assert_eq!(done["now"]["last_call"]["provider"], "delivery");
    assert_eq!(done["now"]["last_call"]["attempts"], 1);
    assert!(entries(&done)
        .iter()
        .filter(|entry| entry["event_id"].is_string())
        .all(|entry| entry["trace_id"].as_str().is_some_and(|id| id.len() == 32)));
    assert_chronological(&done);

    // The route answers the same document.
    let over_http = timeline_json(&service, &order_id).await;
    assert_eq!(timeless(&over_http), timeless(&done));
    // Paged: the pages together are the whole.
    let mut paged = Vec::new();
    let mut query = "?limit=4".to_owned();
    loop {
        let page: Value = timeline(&service, &order_id, &query)
            .await
            .json()
            .await
            .expect("json");
        assert!(entries(&page).len() <= 4);
        paged.extend(entries(&page).iter().cloned());
        match page["next_after"].as_u64() {
            Some(after) => query = format!("?limit=4&after={after}"),
            None => break,
        }
    }
    assert_eq!(&paged, entries(&over_http));
    assert_matches_fixture(&done);

    // --follow of a terminal order prints its entries, then where it stands, and exits 0.
    let followed = explain(&env, &["--order", &order_id, "--follow", "--json"]);
    assert_eq!(code(&followed), 0);
    let lines: Vec<Value> = String::from_utf8_lossy(&followed.stdout)
        .lines()
        .map(|line| serde_json::from_str(line).expect("a JSON line"))
        .collect();
    assert_eq!(lines.len(), entries(&done).len() + 1);
    assert_eq!(lines.last().expect("now")["verdict"], "terminal");

    // Paying again is refused by the payment, and the refusal is on the order's timeline.
    let again = reqwest::Client::new()
        .post(service.url("/petstore-domain/payments"))
        .json(&json!({"order_id": order_id}))
        .send()
        .await
        .expect("answered");
    assert_eq!(again.status(), 409);
    let (_, refused) = explain_until(&env, &order_id, |document| {
        has_entry(document, "command_refused", "subject", "anonymous")
    })
    .await;
    assert_chronological(&refused);

    // Unhappy paths.
    let unknown = "6f1e0b6c-58a4-4c1e-9a3e-2d7b0c5f1a90";
    let missing = explain(&env, &["--order", unknown]);
    assert_eq!(code(&missing), 2);
    assert!(String::from_utf8_lossy(&missing.stderr).contains("does not exist"));
    let malformed = explain(&env, &["--order", "nope"]);
    assert_eq!(code(&malformed), 1);
    assert!(String::from_utf8_lossy(&malformed.stderr).contains("--order nope"));
    for (path_id, query, status) in [
        ("nope", "", 400),
        (unknown, "", 404),
        (order_id.as_str(), "?limit=0", 400),
        (order_id.as_str(), "?limit=501", 400),
        (order_id.as_str(), "?after=-1", 400),
        (order_id.as_str(), "?page=2", 422),
    ] {
        let response = timeline(&service, path_id, query).await;
        assert_eq!(response.status(), status, "{path_id}{query}");
        assert_eq!(
            response.headers()["content-type"],
            "application/problem+json"
        );
        let problem: Value = response.json().await.expect("json");
        assert!(problem["correlation_id"].is_string(), "{problem}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn explain_calls_an_order_stuck_while_its_deadline_is_overdue_on_postgres() {
    let database = FreshDatabase::create().await;
    let env = [
        ("DATABASE_URL", database.url.clone()),
        ("PETSTORE__SAGA__RESERVATION_TIMEOUT_MS", "1000".to_owned()),
    ];
    // No saga runner: the reservation deadline the order's placement scheduled falls due and
    // nobody fires it.
    let front = Service::start_roles(&env, "command,query,projector").await;
    let order_id = place_order(&front).await;
    let (output, stuck) = explain_until(&env, &order_id, |document| {
        document["now"]["verdict"] == "stuck"
    })
    .await;
    assert_eq!(code(&output), 4);
    assert_eq!(stuck["now"]["status"], "pending");
    assert_eq!(stuck["now"]["waiting_for"], "reservation");
    assert!(
        stuck["now"]["deadline"]["time_left_ms"]
            .as_i64()
            .expect("ms")
            < -5000
    );
    assert!(
        stuck["now"]["stuck_because"][0]
            .as_str()
            .is_some_and(|reason| reason.contains("reservation deadline is overdue")),
        "{stuck}"
    );
    let over_http = timeline_json(&front, &order_id).await;
    assert_eq!(over_http["now"]["verdict"], "stuck");
    let table = explain(&env, &["--order", &order_id]);
    assert_eq!(code(&table), 4);
    assert!(String::from_utf8_lossy(&table.stdout).contains("STUCK"));

    // A saga runner starts. Either its deadline loop fires the overdue deadline first (the
    // order is cancelled and compensated) or its stream reaches the order first (the pet is
    // reserved, and the deadline then finds nothing to cancel): the timeline says which.
    let saga = Service::start_roles(&env, "saga").await;
    front.wait_for_terminal(&order_id).await;
    let (output, ended) = explain_until(&env, &order_id, |document| {
        // A completed order's last provider call (the booking) is written within 0.1 s.
        document["now"]["verdict"] == "terminal"
            && (document["now"]["status"] == "cancelled"
                || document["now"]["last_call"]["operation"] == "book")
    })
    .await;
    assert_eq!(code(&output), 0);
    assert!(
        has_entry(&ended, "deadline_fired", "deadline", "reservation")
            || has_entry(&ended, "deadline_cancelled", "deadline", "reservation"),
        "{:?}",
        kinds(&ended)
    );
    if ended["now"]["status"] == "cancelled" {
        assert_eq!(ended["now"]["cancellation_reason"], "step-timed-out");
        assert!(has_entry(
            &ended,
            "deadline_fired",
            "deadline",
            "reservation"
        ));
        assert!(has_entry(&ended, "step_failed", "step", "reservation"));
    } else {
        assert_eq!(ended["now"]["status"], "completed");
        assert!(has_entry(&ended, "step_succeeded", "step", "reservation"));
    }
    assert!(ended["now"]["owner"]["runner"].is_string(), "{ended}");
    assert_chronological(&ended);
    let over_http = timeline_json(&front, &order_id).await;
    assert_eq!(timeless(&over_http), timeless(&ended));
    drop(saga);
    drop(front);
    database.drop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn explain_shows_a_failing_providers_attempts_and_the_compensation() {
    let data_dir = tempfile::tempdir().expect("temp dir");
    let env = [(
        "PETSTORE__STORAGE__DATA_DIR",
        data_dir.path().display().to_string(),
    )];
    let service = Service::start(&env).await;
    let order_id = place_order_failing(&service, Some("payment-service")).await;
    service.wait_for_terminal(&order_id).await;
    let (output, ended) = explain_until(&env, &order_id, |document| {
        document["now"]["verdict"] == "terminal" && document["now"]["last_call"].is_object()
    })
    .await;
    assert_eq!(code(&output), 0);
    assert_eq!(ended["now"]["status"], "cancelled");
    assert_eq!(ended["now"]["cancellation_reason"], "payment-failed");
    let charges: Vec<&Value> = entries(&ended)
        .iter()
        .filter(|entry| entry["provider_call"] == "payment charge")
        .collect();
    assert!(!charges.is_empty(), "{:?}", kinds(&ended));
    assert!(charges.iter().all(|entry| entry["outcome"] != "succeeded"));
    assert_eq!(charges[0]["kind"], "provider_attempt");
    assert!(charges[1..]
        .iter()
        .all(|entry| entry["kind"] == "provider_retry"));
    assert!(
        charges
            .iter()
            .all(|entry| entry["idempotency_key"] == charges[0]["idempotency_key"]),
        "one key for every attempt of one call"
    );
    assert!(has_entry(&ended, "step_failed", "step", "payment"));
    assert!(has_entry(&ended, "compensation", "step", "reservation"));
    assert_eq!(ended["now"]["last_call"]["provider"], "payment");
    assert_eq!(ended["now"]["last_call"]["attempts"], charges.len());
    assert!(ended["now"]["last_error"].is_string(), "{}", ended["now"]);
    assert_chronological(&ended);
    let table = explain(&env, &["--order", &order_id]);
    let text = String::from_utf8_lossy(&table.stdout);
    assert!(
        text.contains("last provider call: payment charge"),
        "{text}"
    );
}
