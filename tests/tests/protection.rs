//! Server-side protection: load shedding past `http.max_concurrent_requests` (503 with
//! `Retry-After`, never a queue; health and metrics still answer), per-route timeouts,
//! settings refused at start-up, and graceful shutdown under load (every accepted order is
//! stored and projected, a request in flight finishes, one past the drain deadline is
//! answered 503).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use petstore_cli::{Application, Role};
use petstore_settings::Settings;
use petstore_tests::{assert_problem, Engine, Storage, TestApp};
use serde_json::{json, Value};

/// A token ahead of anything the log holds: a query carrying it waits its whole
/// `http.consistency_wait_ms`, which makes a slow request on demand.
const FAR_AHEAD: &str = "t999999999p999999999";

fn slow_status(app: &TestApp) -> impl std::future::Future<Output = reqwest::Response> {
    let request = app
        .client
        .get(app.url(&format!(
            "/petstore-domain/orders/{}/status",
            uuid::Uuid::new_v4()
        )))
        .header("X-Consistency-Token", FAR_AHEAD)
        .send();
    async move { request.await.expect("answered") }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn past_the_concurrency_limit_requests_are_refused_at_once_not_queued() {
    let storage = Storage::new(Engine::Embedded).await;
    let mut settings = storage.settings();
    settings.http.max_concurrent_requests = 2;
    settings.http.consistency_wait_ms = 2_000;
    let app = TestApp::start(settings).await;
    app.wait_until_ready().await;

    let busy = [
        tokio::spawn(slow_status(&app)),
        tokio::spawn(slow_status(&app)),
    ];
    tokio::time::sleep(Duration::from_millis(300)).await;
    let refused = app.get("/petstore-domain/pets/browse").await;
    assert_eq!(refused.headers()["retry-after"], "1");
    let problem = assert_problem(refused, 503).await;
    assert!(
        problem["type"]
            .as_str()
            .expect("a type")
            .ends_with("overloaded"),
        "{problem}"
    );
    // Probes and metrics answer however busy the API is.
    assert_eq!(app.get("/health/live").await.status(), 200);
    let metrics = app.get("/metrics").await.text().await.expect("text");
    assert!(
        metrics.contains("petstore_requests_shed_total 1"),
        "{metrics}"
    );

    for request in busy {
        // The two that held the slots finish as they would have.
        assert_eq!(request.await.expect("finished").status(), 409);
    }
    assert_eq!(app.get("/petstore-domain/pets/browse").await.status(), 200);
    app.stop().await;
    storage.remove().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_route_timeout_replaces_the_default_for_that_route_only() {
    let storage = Storage::new(Engine::Embedded).await;
    let mut settings = storage.settings();
    settings.http.consistency_wait_ms = 1_500;
    settings.security.route_timeouts_ms = BTreeMap::from([(
        "GET /petstore-domain/orders/{order_id}/status".to_owned(),
        200,
    )]);
    let app = TestApp::start(settings).await;
    app.wait_until_ready().await;
    // Cut off at 200 ms: 503 with Retry-After, not the wait's 409.
    let cut = slow_status(&app).await;
    assert_eq!(cut.headers()["retry-after"], "1");
    assert_problem(cut, 503).await;
    // Another route keeps security.request_timeout_ms (30 s): the wait ends in its 409.
    let waited = app
        .client
        .get(app.url("/petstore-domain/pets/golden-retriever-001"))
        .header("X-Consistency-Token", FAR_AHEAD)
        .send()
        .await
        .expect("answered");
    assert_problem(waited, 409).await;
    app.stop().await;
    storage.remove().await;
}

/// A change to the settings a test starts from.
type Change = fn(&mut Settings);

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bad_protection_settings_stop_the_start_naming_the_key() {
    let storage = Storage::new(Engine::Embedded).await;
    let cases: [(Change, &str); 5] = [
        (
            |settings| settings.http.max_concurrent_requests = 0,
            "http.max_concurrent_requests",
        ),
        (
            |settings| settings.http.shutdown_drain_ms = 0,
            "http.shutdown_drain_ms",
        ),
        (
            |settings| {
                settings.security.route_timeouts_ms =
                    BTreeMap::from([("GET /petstore-domain/nowhere".to_owned(), 100)]);
            },
            "security.route_timeouts_ms.\"GET /petstore-domain/nowhere\"",
        ),
        (
            |settings| {
                settings.security.route_timeouts_ms =
                    BTreeMap::from([("PUT /petstore-domain/orders".to_owned(), 100)]);
            },
            "security.route_timeouts_ms.\"PUT /petstore-domain/orders\"",
        ),
        (
            |settings| {
                settings.security.route_timeouts_ms =
                    BTreeMap::from([("POST /petstore-domain/orders".to_owned(), 0)]);
            },
            "security.route_timeouts_ms.\"POST /petstore-domain/orders\"",
        ),
    ];
    for (change, key) in cases {
        let mut settings = storage.settings();
        change(&mut settings);
        let error = match Application::build(settings, &Role::all()).await {
            Ok(_) => panic!("{key}: the service started"),
            Err(error) => error.to_string(),
        };
        assert!(error.contains(key), "{key}: {error}");
    }
    storage.remove().await;
}

/// Places orders from `clients` tasks, each on fresh connections, until `stop` is set;
/// returns the ids of the accepted ones. A request either is accepted (202) or finds the
/// server gone; nothing else.
async fn place_until_stopped(
    app: &TestApp,
    clients: usize,
    stop: Arc<AtomicUsize>,
    accepted: Arc<AtomicUsize>,
) -> Vec<tokio::task::JoinHandle<Vec<String>>> {
    let token = app.token("admin", petstore_settings::RoleName::Admin);
    (0..clients)
        .map(|_| {
            let (url, token, stop, accepted) = (
                app.url("/petstore-domain/orders"),
                token.clone(),
                stop.clone(),
                accepted.clone(),
            );
            tokio::spawn(async move {
                // No idle connections: each request opens its own, as after a listener closes.
                let client = reqwest::Client::builder()
                    .pool_max_idle_per_host(0)
                    .build()
                    .expect("a client");
                let mut ids = Vec::new();
                while stop.load(Ordering::SeqCst) == 0 {
                    let sent = client
                        .post(&url)
                        .bearer_auth(&token)
                        .json(&json!({"customer_id": "customer-001", "pet_id": "persian-cat-001"}))
                        .send()
                        .await;
                    let Ok(response) = sent else {
                        // The listener is closed: the server is stopping.
                        break;
                    };
                    assert_eq!(response.status(), 202, "an order is accepted");
                    let body: Value = response.json().await.expect("a whole JSON body");
                    ids.push(body["order_id"].as_str().expect("an id").to_owned());
                    accepted.fetch_add(1, Ordering::SeqCst);
                }
                ids
            })
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_shutdown_under_load_keeps_every_accepted_order_and_finishes_what_is_in_flight() {
    for engine in [Engine::Embedded, Engine::Postgres] {
        let storage = Storage::new(engine).await;
        let mut settings = storage.settings();
        settings.http.consistency_wait_ms = 1_000;
        let app = TestApp::start(settings.clone()).await;
        app.wait_until_ready().await;
        let (stop, accepted) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        let clients = place_until_stopped(&app, 8, stop.clone(), accepted.clone()).await;
        while accepted.load(Ordering::SeqCst) < 60 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        // A slow request in flight when the shutdown starts still gets its answer.
        let in_flight = tokio::spawn(slow_status(&app));
        tokio::time::sleep(Duration::from_millis(100)).await;
        app.stop().await;
        stop.store(1, Ordering::SeqCst);
        assert_eq!(
            in_flight.await.expect("finished").status(),
            409,
            "the request in flight was drained, not cut"
        );
        let mut ids = Vec::new();
        for client in clients {
            ids.extend(client.await.expect("a client ends"));
        }
        assert!(ids.len() >= 60);

        // Every accepted order was stored, and after a restart each is projected and ends.
        let app = TestApp::start(settings).await;
        app.wait_until_ready().await;
        for id in &ids {
            app.wait_for_terminal(id).await;
        }
        assert_eq!(
            storage.count_events("OrderCreated").await,
            i64::try_from(ids.len()).expect("a count"),
            "{engine:?}: exactly the accepted orders"
        );
        app.stop().await;
        storage.remove().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_drain_deadline_cuts_off_what_outlasts_it() {
    let storage = Storage::new(Engine::Embedded).await;
    let mut settings = storage.settings();
    settings.http.consistency_wait_ms = 20_000;
    settings.http.shutdown_drain_ms = 300;
    let app = TestApp::start(settings).await;
    app.wait_until_ready().await;
    let request = app
        .client
        .get(app.url(&format!(
            "/petstore-domain/orders/{}/status",
            uuid::Uuid::new_v4()
        )))
        .header("X-Consistency-Token", FAR_AHEAD)
        .send();
    let in_flight = tokio::spawn(request);
    tokio::time::sleep(Duration::from_millis(200)).await;
    tokio::time::timeout(Duration::from_secs(10), app.stop())
        .await
        .expect("the service stops at its drain deadline, not after the 20 s wait");
    let cut = in_flight
        .await
        .expect("the client ends")
        .expect("an answer, not a dropped connection");
    assert_eq!(cut.headers()["retry-after"], "1");
    let problem = assert_problem(cut, 503).await;
    assert!(
        problem["detail"]
            .as_str()
            .expect("detail")
            .contains("shutting down"),
        "{problem}"
    );
    storage.remove().await;
}
