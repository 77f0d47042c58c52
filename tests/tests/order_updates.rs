//! Live order updates (`GET /petstore-domain/orders/{id}/updates`) through real WebSocket and
//! Server-Sent Events clients: every status change in order up to the terminal one, nothing
//! missed by a client connecting mid-saga, resuming with `Last-Event-ID`, 200 concurrent
//! subscribers, a query process that does not project, and every refusal.

use std::collections::BTreeSet;
use std::time::Duration;

use petstore_cli::Role;
use petstore_settings::{FlagSetting, RoleName, Settings};
use petstore_tests::updates::{self, statuses};
use petstore_tests::{assert_problem, on_both_engines, Engine, Storage, TestApp};
use serde_json::{json, Value};

const LIMIT: Duration = Duration::from_secs(30);

/// Live updates on, payments held (orders wait at `reserved` until payments are turned on).
fn held_settings(storage: &Storage) -> Settings {
    let mut settings = storage.settings();
    settings.feature_flags.real_time_order_updates = FlagSetting::On;
    settings.feature_flags.payment_processing = FlagSetting::Off;
    settings
}

async fn set_flag(app: &TestApp, flag: &str, on: bool) {
    let response = app
        .client
        .put(app.url("/petstore-domain/admin/config"))
        .json(&json!({"feature_flags": {flag: on}}))
        .send()
        .await
        .expect("PUT is answered");
    assert_eq!(response.status(), 200, "PUT {flag}={on}");
}

/// Places an order for `pet_id` as customer-001 and returns its id and consistency token.
async fn order(app: &TestApp, pet_id: &str, simulate: Option<&str>) -> (String, String) {
    let mut request = app
        .client
        .post(app.url("/petstore-domain/orders"))
        .json(&json!({
            "customer_id": "customer-001",
            "pet_id": pet_id,
        }));
    if let Some(service) = simulate {
        request = request.header("X-Simulate-Failure", service);
    }
    let response = request.send().await.expect("POST is answered");
    assert_eq!(response.status(), 202);
    let token = response.headers()["x-consistency-token"]
        .to_str()
        .expect("ASCII")
        .to_owned();
    let body: Value = response.json().await.expect("JSON");
    (body["order_id"].as_str().expect("an id").to_owned(), token)
}

async fn available_pets(app: &TestApp, count: usize) -> Vec<String> {
    app.wait_until_ready().await;
    let page = app
        .get_json(&format!(
            "/petstore-domain/pets/browse?availability=available&limit={count}"
        ))
        .await;
    let pets: Vec<String> = page["pets"]
        .as_array()
        .expect("pets")
        .iter()
        .map(|pet| pet["id"].as_str().expect("an id").to_owned())
        .collect();
    assert_eq!(pets.len(), count, "enough demo pets: {page}");
    pets
}

async fn wait_reserved(app: &TestApp, order_id: &str) {
    app.wait_for_order(order_id, |view| view["status"] == "reserved")
        .await;
}

/// The `id`s of the order's statuses from `from` on, as its status view records them.
async fn history_ids_from(app: &TestApp, order_id: &str, from: &str) -> (Vec<String>, Vec<String>) {
    let view = app.wait_for_terminal(order_id).await;
    let history = view["status_history"].as_array().expect("a status history");
    let start = history
        .iter()
        .position(|change| change["status"] == from)
        .expect("the status is in the history");
    let ids = history[start..]
        .iter()
        .map(|change| {
            let position = &change["position"];
            format!(
                "t{}p{}",
                position["transaction_id"], position["global_position"]
            )
        })
        .collect();
    let names = history[start..]
        .iter()
        .map(|change| change["status"].as_str().expect("a status").to_owned())
        .collect();
    (ids, names)
}

fn ids(updates: &[Value]) -> Vec<String> {
    updates
        .iter()
        .map(|update| update["id"].as_str().expect("an id").to_owned())
        .collect()
}

on_both_engines!(
    websocket_and_sse_clients_get_every_change_in_order_and_can_resume,
    a_client_connecting_at_any_point_misses_nothing,
    two_hundred_subscribers_each_get_every_change,
    the_updates_route_refuses_clearly,
);

async fn websocket_and_sse_clients_get_every_change_in_order_and_can_resume(engine: Engine) {
    let storage = Storage::new(engine).await;
    let app = TestApp::start(held_settings(&storage)).await;
    let pet = &available_pets(&app, 1).await[0];
    let (order_id, _) = order(&app, pet, None).await;
    wait_reserved(&app, &order_id).await;

    // Mid-saga: an admin on a WebSocket with the header, the customer on SSE with the query
    // parameter a browser would use.
    let admin_token = app.token("admin", RoleName::Admin);
    let socket = updates::connect(&app.address, &updates::path(&order_id), Some(&admin_token))
        .await
        .expect("the WebSocket opens");
    let customer_token = app.token("customer-001", RoleName::Customer);
    let events = app
        .anonymous
        .get(app.url(&format!(
            "{}?access_token={customer_token}",
            updates::path(&order_id)
        )))
        .send()
        .await
        .expect("SSE is answered");
    assert_eq!(events.status(), 200);
    assert_eq!(events.headers()["content-type"], "text/event-stream");
    let reading_ws = tokio::spawn(updates::read_all(socket, LIMIT));
    let reading_sse = tokio::spawn(updates::read_events(events, LIMIT));
    tokio::time::sleep(Duration::from_millis(300)).await;
    set_flag(&app, "payment_processing", true).await;

    let received = reading_ws.await.expect("the reader ends");
    let events = reading_sse.await.expect("the reader ends");
    let (expected_ids, expected) = history_ids_from(&app, &order_id, "reserved").await;
    assert_eq!(expected, ["reserved", "paid", "scheduled", "completed"]);
    assert_eq!(received.statuses(), expected);
    assert_eq!(ids(&received.updates), expected_ids);
    assert_eq!(
        received.close,
        Some((1000, "the order reached a terminal status".to_owned()))
    );
    assert!(received
        .updates
        .iter()
        .all(|u| u["order_id"] == order_id.as_str()));
    let terminal: Vec<bool> = received
        .updates
        .iter()
        .map(|u| u["terminal"].as_bool().expect("terminal"))
        .collect();
    assert_eq!(terminal, [false, false, false, true]);

    assert!(
        events.iter().all(|event| event.event == "status"),
        "{events:?}"
    );
    let sse_updates: Vec<Value> = events.iter().map(updates::Event::json).collect();
    assert_eq!(sse_updates, received.updates);
    let event_ids: Vec<String> = events
        .iter()
        .map(|e| e.id.clone().expect("an id"))
        .collect();
    assert_eq!(event_ids, expected_ids);

    // Resuming after `paid` sends what came after it, and nothing twice.
    let resumed = app
        .client
        .get(app.url(&updates::path(&order_id)))
        .header("Last-Event-ID", &expected_ids[1])
        .send()
        .await
        .expect("SSE is answered");
    let resumed = updates::read_events(resumed, LIMIT).await;
    let resumed: Vec<Value> = resumed.iter().map(updates::Event::json).collect();
    assert_eq!(statuses(&resumed), ["scheduled", "completed"]);
    let resumed_ws = updates::connect(
        &app.address,
        &format!(
            "{}?last_event_id={}",
            updates::path(&order_id),
            expected_ids[2]
        ),
        Some(&admin_token),
    )
    .await
    .expect("the WebSocket opens");
    let resumed_ws = updates::read_all(resumed_ws, LIMIT).await;
    assert_eq!(resumed_ws.statuses(), ["completed"]);

    // After the terminal update nothing is left: SSE answers 204 (which stops a browser's
    // EventSource), a WebSocket closes at once.
    let done = app
        .client
        .get(app.url(&updates::path(&order_id)))
        .header("Last-Event-ID", &expected_ids[3])
        .send()
        .await
        .expect("SSE is answered");
    assert_eq!(done.status(), 204);
    let done_ws = updates::connect(
        &app.address,
        &format!(
            "{}?last_event_id={}",
            updates::path(&order_id),
            expected_ids[3]
        ),
        Some(&admin_token),
    )
    .await
    .expect("the WebSocket opens");
    let done_ws = updates::read_all(done_ws, LIMIT).await;
    assert!(done_ws.updates.is_empty());
    assert_eq!(done_ws.close.map(|close| close.0), Some(1000));

    // A finished order still answers its current status, then closes.
    let finished = updates::connect(&app.address, &updates::path(&order_id), Some(&admin_token))
        .await
        .expect("the WebSocket opens");
    assert_eq!(
        updates::read_all(finished, LIMIT).await.statuses(),
        ["completed"]
    );

    let metrics = app.get("/metrics").await.text().await.expect("text");
    assert!(
        metrics.contains("petstore_order_updates_sent_total"),
        "{metrics}"
    );
    assert!(
        metrics.contains("petstore_order_update_closes_total{reason=\"terminal\"}"),
        "{metrics}"
    );
    assert!(metrics.contains("petstore_order_update_delay_seconds_bucket"));
    app.stop().await;
    storage.remove().await;
}

async fn a_client_connecting_at_any_point_misses_nothing(engine: Engine) {
    let storage = Storage::new(engine).await;
    let mut settings = storage.settings();
    settings.feature_flags.real_time_order_updates = FlagSetting::On;
    settings.providers.payment.latency_ms = 60;
    settings.providers.delivery.latency_ms = 60;
    let app = TestApp::start(settings).await;
    let pets = available_pets(&app, 4).await;
    let admin_token = app.token("admin", RoleName::Admin);
    let all = ["pending", "reserved", "paid", "scheduled", "completed"];
    // Connect at different moments of each saga: right after the POST, then later and later.
    for (index, pet) in pets.iter().take(3).enumerate() {
        let (order_id, token) = order(&app, pet, None).await;
        tokio::time::sleep(Duration::from_millis(45 * index as u64)).await;
        let authorization = format!("Bearer {admin_token}");
        let socket = updates::connect_with(
            &app.address,
            &updates::path(&order_id),
            &[
                ("authorization", &authorization),
                ("x-consistency-token", &token),
            ],
        )
        .await
        .expect("the WebSocket opens");
        let received = updates::read_all(socket, LIMIT).await;
        let got = received.statuses();
        let first = all
            .iter()
            .position(|status| *status == got[0])
            .expect("a known status");
        assert_eq!(got, all[first..], "order {index}");
        let (expected_ids, _) = history_ids_from(&app, &order_id, &got[0]).await;
        assert_eq!(ids(&received.updates), expected_ids);
    }
    // A payment failure ends the stream with `cancelled` and its reason.
    let (order_id, _) = order(&app, &pets[3], Some("payment-service")).await;
    app.wait_for_order(&order_id, |_| true).await;
    let socket = updates::connect(&app.address, &updates::path(&order_id), Some(&admin_token))
        .await
        .expect("the WebSocket opens");
    let received = updates::read_all(socket, LIMIT).await;
    // `compensating` while the pet's release is still to come, then `cancelled`.
    let failed = ["pending", "reserved", "compensating", "cancelled"];
    let got = received.statuses();
    let got: Vec<&str> = got.iter().map(String::as_str).collect();
    assert!(failed.ends_with(&got), "{got:?}");
    let view = app.wait_for_terminal(&order_id).await;
    let history: Vec<&str> = view["status_history"]
        .as_array()
        .expect("history")
        .iter()
        .map(|change| change["status"].as_str().expect("a status"))
        .collect();
    assert_eq!(history, failed);
    let last = received.updates.last().expect("updates");
    assert_eq!(last["status"], "cancelled");
    assert_eq!(last["cancellation_reason"], "payment-failed");
    assert_eq!(last["terminal"], true);
    app.stop().await;
    storage.remove().await;
}

async fn two_hundred_subscribers_each_get_every_change(engine: Engine) {
    let storage = Storage::new(engine).await;
    let mut settings = held_settings(&storage);
    settings.http.order_updates.max_connections_per_subject = 256;
    let app = TestApp::start(settings).await;
    let mut orders = Vec::new();
    for pet in available_pets(&app, 4).await {
        orders.push(order(&app, &pet, None).await.0);
    }
    for order_id in &orders {
        wait_reserved(&app, order_id).await;
    }
    let token = app.token("admin", RoleName::Admin);
    let mut readers = Vec::new();
    for index in 0..200 {
        let order_id = orders[index % orders.len()].clone();
        let mut socket = updates::connect(&app.address, &updates::path(&order_id), Some(&token))
            .await
            .expect("the WebSocket opens");
        // Each has its snapshot before payments resume.
        let snapshot = updates::next_update(&mut socket, LIMIT).await;
        assert_eq!(snapshot["status"], "reserved");
        readers.push(tokio::spawn(async move {
            (order_id, updates::read_all(socket, LIMIT).await)
        }));
    }
    let open = app.get("/metrics").await.text().await.expect("text");
    assert!(
        open.contains("petstore_order_update_connections{protocol=\"websocket\"} 200"),
        "{open}"
    );
    set_flag(&app, "payment_processing", true).await;
    for reader in readers {
        let (order_id, received) = reader.await.expect("the reader ends");
        assert_eq!(
            received.statuses(),
            ["paid", "scheduled", "completed"],
            "{order_id}"
        );
        assert_eq!(received.close.map(|close| close.0), Some(1000));
    }
    app.stop().await;
    storage.remove().await;
}

async fn the_updates_route_refuses_clearly(engine: Engine) {
    let storage = Storage::new(engine).await;
    let mut settings = storage.settings();
    settings.feature_flags.payment_processing = FlagSetting::Off;
    settings.http.order_updates.max_connections_per_subject = 2;
    settings.http.order_updates.keep_alive_ms = 100;
    let app = TestApp::start(settings).await;
    let pet = &available_pets(&app, 1).await[0];
    let (order_id, _) = order(&app, pet, None).await;
    wait_reserved(&app, &order_id).await;
    let path = updates::path(&order_id);

    // The flag is off by default: a clear refusal.
    let problem = assert_problem(app.get(&path).await, 403).await;
    assert!(
        problem["type"]
            .as_str()
            .expect("a type")
            .ends_with("feature-disabled"),
        "{problem}"
    );
    assert!(problem["detail"]
        .as_str()
        .expect("detail")
        .contains("real_time_order_updates"));
    set_flag(&app, "real_time_order_updates", true).await;

    assert_problem(
        app.get("/petstore-domain/orders/not-a-uuid/updates").await,
        400,
    )
    .await;
    assert_problem(
        app.get(&updates::path(&uuid::Uuid::new_v4().to_string()))
            .await,
        404,
    )
    .await;
    let stranger = app.client_as("customer-002", RoleName::Customer);
    assert_problem(
        stranger.get(app.url(&path)).send().await.expect("answered"),
        403,
    )
    .await;
    assert_problem(
        app.anonymous
            .get(app.url(&path))
            .send()
            .await
            .expect("answered"),
        401,
    )
    .await;
    let forged = app
        .anonymous
        .get(app.url(&format!("{path}?access_token=not.a.token")))
        .send()
        .await
        .expect("answered");
    assert_problem(forged, 401).await;
    let token = app.token("customer-001", RoleName::Customer);
    let both = app
        .client
        .get(app.url(&format!("{path}?access_token={token}")))
        .send()
        .await
        .expect("answered");
    assert_problem(both, 401).await;
    for bad in ["42", "t1p", "tp1", "t-1p2"] {
        let response = app
            .client
            .get(app.url(&path))
            .header("Last-Event-ID", bad)
            .send()
            .await
            .expect("answered");
        assert_problem(response, 400).await;
    }
    // The access token only works where documented.
    let elsewhere = app
        .anonymous
        .get(app.url(&format!(
            "/petstore-domain/orders/{order_id}/status?access_token={token}"
        )))
        .send()
        .await
        .expect("answered");
    assert_problem(elsewhere, 401).await;

    // Two connections per subject here; the third is refused until one closes.
    let customer = app.client_as("customer-001", RoleName::Customer);
    let first = customer.get(app.url(&path)).send().await.expect("answered");
    assert_eq!(first.status(), 200);
    let second = updates::connect(&app.address, &path, Some(&token))
        .await
        .expect("the WebSocket opens");
    let refused = customer.get(app.url(&path)).send().await.expect("answered");
    let problem = assert_problem(refused, 429).await;
    assert!(problem["type"]
        .as_str()
        .expect("a type")
        .ends_with("too-many-connections"));
    let refused_ws = updates::connect(&app.address, &path, Some(&token)).await;
    assert!(refused_ws.is_err(), "a third WebSocket is refused");
    // An admin is another subject.
    assert_eq!(app.get(&path).await.status(), 200);
    drop(first);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let again = customer.get(app.url(&path)).send().await.expect("answered");
        if again.status() == 200 {
            break;
        }
        assert_eq!(again.status(), 429);
        assert!(
            tokio::time::Instant::now() < deadline,
            "the dropped connection's slot is freed"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // Turning the flag off closes open connections with a reason.
    let mut watching = second;
    assert_eq!(
        updates::next_update(&mut watching, LIMIT).await["status"],
        "reserved"
    );
    set_flag(&app, "real_time_order_updates", false).await;
    let closed = updates::read_all(watching, LIMIT).await;
    assert_eq!(
        closed.close,
        Some((1008, "real_time_order_updates was turned off".to_owned()))
    );

    // Shutting down closes the rest with 1001, and the server stops.
    set_flag(&app, "real_time_order_updates", true).await;
    let admin_token = app.token("admin", RoleName::Admin);
    let mut open = updates::connect(&app.address, &path, Some(&admin_token))
        .await
        .expect("the WebSocket opens");
    updates::next_update(&mut open, LIMIT).await;
    let reading = tokio::spawn(updates::read_all(open, LIMIT));
    tokio::time::timeout(LIMIT, app.stop())
        .await
        .expect("the server stops with connections open");
    let closed = reading.await.expect("the reader ends");
    assert_eq!(closed.close.map(|close| close.0), Some(1001));
    storage.remove().await;
}

/// On Postgres, a process with only the query role (no projector) serves live updates of the
/// changes another process projects.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_query_only_process_streams_what_another_projects() {
    let storage = Storage::new(Engine::Postgres).await;
    let settings = held_settings(&storage);
    let writer = TestApp::start(settings.clone()).await;
    let reader = TestApp::start_with_roles(settings, &BTreeSet::from([Role::Query])).await;
    let pet = &available_pets(&writer, 1).await[0];
    let (order_id, _) = order(&writer, pet, None).await;
    wait_reserved(&reader, &order_id).await;
    let token = reader.token("customer-001", RoleName::Customer);
    let socket = updates::connect(&reader.address, &updates::path(&order_id), Some(&token))
        .await
        .expect("the WebSocket opens");
    let reading = tokio::spawn(updates::read_all(socket, LIMIT));
    tokio::time::sleep(Duration::from_millis(200)).await;
    set_flag(&writer, "payment_processing", true).await;
    let received = reading.await.expect("the reader ends");
    assert_eq!(
        received.statuses(),
        ["reserved", "paid", "scheduled", "completed"]
    );
    reader.stop().await;
    writer.stop().await;
    storage.remove().await;
}
