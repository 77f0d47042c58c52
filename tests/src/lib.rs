//! Test support for the black-box suites in `tests/tests/`: a fresh Postgres database per
//! test, the real application started on port 0 against Postgres or the embedded store, and
//! an HTTP client that speaks to it. Nothing here fakes a dependency.
//!
//! # Layout
//! - [`TestDatabase`]: a uniquely named database created for one test and dropped after it.
//! - [`Engine`]: which store a test runs against.
//! - [`TestApp`]: the running service and helpers to call it.
//! - [`updates`]: WebSocket and Server-Sent Events clients of the live order updates.

pub mod updates;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use petstore_cli::{Application, Role, Shutdown};
use petstore_event_store::database::Database;
use petstore_security::auth::TokenVerifier;
use petstore_settings::{JwtSettings, LogFormat, RoleName, Settings};
use secrecy::SecretString;
use serde_json::Value;
use sqlx::{Connection, PgConnection};
use tempfile::TempDir;
use tokio::task::JoinHandle;

/// The server the test databases are created on; override with `PETSTORE_TEST_DATABASE_URL`.
pub fn admin_url() -> String {
    std::env::var("PETSTORE_TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".to_owned())
}

/// A database of its own for one test.
pub struct TestDatabase {
    name: String,
    url: String,
}

impl TestDatabase {
    /// Creates `petstore_test_<random>` on the test server.
    pub async fn create() -> Self {
        let admin = admin_url();
        let name = format!("petstore_test_{}", uuid::Uuid::new_v4().simple());
        let mut connection = PgConnection::connect(&admin)
            .await
            .expect("the test Postgres server must be running (scripts/test.sh starts it)");
        sqlx::query(&format!("CREATE DATABASE {name}"))
            .execute(&mut connection)
            .await
            .expect("create the test database");
        let base = admin
            .rsplit_once('/')
            .map_or(admin.as_str(), |(base, _)| base);
        let url = format!("{base}/{name}");
        Self { name, url }
    }

    /// Its URL.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// A direct connection, to inspect or break things.
    pub async fn connect(&self) -> PgConnection {
        PgConnection::connect(&self.url)
            .await
            .expect("connect to the test database")
    }

    /// Drops the database (terminating leftover connections).
    pub async fn drop_database(self) {
        if let Ok(mut connection) = PgConnection::connect(&admin_url()).await {
            let _ = sqlx::query(&format!(
                "DROP DATABASE IF EXISTS {} WITH (FORCE)",
                self.name
            ))
            .execute(&mut connection)
            .await;
        }
    }
}

/// Which event store a test runs against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Engine {
    /// The embedded default: SQLite file, in-memory read models.
    Embedded,
    /// Postgres: a fresh database per test.
    Postgres,
}

/// Where a test's data lives; kept alive for the test's length.
pub enum Storage {
    /// A temporary folder for the embedded store.
    Embedded(TempDir),
    /// A fresh Postgres database.
    Postgres(TestDatabase),
}

impl Storage {
    /// Fresh storage for `engine`.
    pub async fn new(engine: Engine) -> Self {
        match engine {
            Engine::Embedded => Self::Embedded(tempfile::tempdir().expect("create a temp dir")),
            Engine::Postgres => Self::Postgres(TestDatabase::create().await),
        }
    }

    /// Settings that point the service at this storage, listening on port 0.
    pub fn settings(&self) -> Settings {
        let mut settings = Settings::default();
        settings.http.listen = ([127, 0, 0, 1], 0).into();
        settings.log.format = LogFormat::Text;
        settings.projector.poll_interval_ms = 50;
        settings.database.max_connections = 8;
        // Tests mint their own tokens with this secret (TestApp::token); rate limits are
        // off except in the tests of rate limits, which poll far less than the others.
        settings.security.jwt.secret = Some(SecretString::from(TEST_TOKEN_SECRET.to_owned()));
        settings.security.rate_limits.enabled = false;
        match self {
            Self::Embedded(dir) => settings.storage.data_dir = dir.path().to_path_buf(),
            Self::Postgres(database) => {
                settings.database.url = Some(SecretString::from(database.url().to_owned()));
            }
        }
        settings
    }

    /// A migrated connection to this storage's event store.
    pub async fn database(&self) -> Database {
        let settings = self.settings();
        let database = Database::connect(&settings.database, &settings.storage)
            .await
            .expect("connect");
        database.migrate().await.expect("migrate");
        database
    }

    /// How many stored events have this type.
    pub async fn count_events(&self, event_type: &str) -> i64 {
        let query = "SELECT count(*) FROM events WHERE event_type = $1";
        let database = self.database().await;
        let count = match &database {
            Database::Postgres(pool) => {
                sqlx::query_scalar(query)
                    .bind(event_type)
                    .fetch_one(pool)
                    .await
            }
            Database::Sqlite(pool) => {
                sqlx::query_scalar(query)
                    .bind(event_type)
                    .fetch_one(pool)
                    .await
            }
        }
        .expect("count events");
        database.close().await;
        count
    }

    /// The Postgres database, when there is one.
    pub fn postgres(&self) -> Option<&TestDatabase> {
        match self {
            Self::Postgres(database) => Some(database),
            Self::Embedded(_) => None,
        }
    }

    /// Removes the storage.
    pub async fn remove(self) {
        if let Self::Postgres(database) = self {
            database.drop_database().await;
        }
    }
}

/// The token secret of test services (at least 32 bytes).
pub const TEST_TOKEN_SECRET: &str = "test-token-secret-of-at-least-32-bytes!";

/// The service, running on a free port.
pub struct TestApp {
    /// `http://127.0.0.1:PORT`.
    pub address: String,
    /// A client that sends an admin's bearer token on every request (so tests of other
    /// things act with every right).
    pub client: reqwest::Client,
    /// A client with no default headers: no token.
    pub anonymous: reqwest::Client,
    jwt: JwtSettings,
    shutdown: Shutdown,
    server: JoinHandle<()>,
}

impl TestApp {
    /// Starts the application with `settings` and every role.
    pub async fn start(settings: Settings) -> Self {
        Self::start_with_roles(settings, &Role::all()).await
    }

    /// Starts the application with `settings` and `roles`.
    pub async fn start_with_roles(settings: Settings, roles: &BTreeSet<Role>) -> Self {
        // The first test of the process installs the subscriber; the rest reuse it.
        let _telemetry = petstore_telemetry::init(&settings.log).expect("telemetry");
        let jwt = settings.security.jwt.clone();
        let application = Application::build(settings, roles)
            .await
            .expect("the service starts");
        let address = format!("http://127.0.0.1:{}", application.port());
        let shutdown = application.shutdown_handle();
        let server = tokio::spawn(async move {
            application
                .run_until_stopped()
                .await
                .expect("the service runs");
        });
        let mut app = Self {
            address,
            client: reqwest::Client::new(),
            anonymous: reqwest::Client::new(),
            jwt,
            shutdown,
            server,
        };
        if app.jwt.secret.is_some() {
            app.client = app.client_as("admin", RoleName::Admin);
        }
        app
    }

    /// A token of this service's own for `subject` with `role`.
    pub fn token(&self, subject: &str, role: RoleName) -> String {
        TokenVerifier::new(&self.jwt, Vec::new())
            .expect("the test secret is a valid key")
            .issue(subject, role)
            .expect("the test service has a secret")
            .0
    }

    /// A client that sends a token for `subject` with `role` on every request.
    pub fn client_as(&self, subject: &str, role: RoleName) -> reqwest::Client {
        let mut headers = reqwest::header::HeaderMap::new();
        let value = format!("Bearer {}", self.token(subject, role));
        headers.insert(
            reqwest::header::AUTHORIZATION,
            reqwest::header::HeaderValue::from_str(&value).expect("a token is ASCII"),
        );
        reqwest::Client::builder()
            .default_headers(headers)
            .build()
            .expect("a client")
    }

    /// Stops the application gracefully and waits until it has.
    pub async fn stop(self) {
        self.shutdown.trigger();
        self.server.await.expect("the server task ends cleanly");
    }

    /// `address` + `path`.
    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.address)
    }

    /// GET `path`.
    pub async fn get(&self, path: &str) -> reqwest::Response {
        self.client
            .get(self.url(path))
            .send()
            .await
            .expect("GET is answered")
    }

    /// GET `path` and its JSON body (`Null` when the body is not JSON).
    pub async fn get_json(&self, path: &str) -> Value {
        self.get(path).await.json().await.unwrap_or(Value::Null)
    }

    /// GET `path` with the consistency token `token` (any text, to test refusals too).
    pub async fn get_with_token(&self, path: &str, token: &str) -> reqwest::Response {
        self.client
            .get(self.url(path))
            .header("X-Consistency-Token", token)
            .send()
            .await
            .expect("GET is answered")
    }

    /// POST `body` as JSON to `path`.
    pub async fn post_json(&self, path: &str, body: &Value) -> reqwest::Response {
        self.client
            .post(self.url(path))
            .json(body)
            .send()
            .await
            .expect("POST is answered")
    }

    /// Places the seed's example order and returns the response body.
    pub async fn place_order(&self, pet_id: &str) -> Value {
        let response = self
            .post_json(
                "/petstore-domain/orders",
                &serde_json::json!({
                    "customer_id": "customer-001",
                    "pet_id": pet_id,
                    "special_instructions": "Include training guide"
                }),
            )
            .await;
        assert_eq!(response.status(), 202, "order accepted");
        response.json().await.expect("JSON body")
    }

    /// Places an order for `pet_id` as customer-001, with `X-Simulate-Failure: SERVICE`
    /// when `simulate` names one; returns its id.
    pub async fn post_order(&self, pet_id: &str, simulate: Option<&str>) -> String {
        let mut request = self
            .client
            .post(self.url("/petstore-domain/orders"))
            .json(&serde_json::json!({"customer_id": "customer-001", "pet_id": pet_id}));
        if let Some(service) = simulate {
            request = request.header("X-Simulate-Failure", service);
        }
        let response = request.send().await.expect("answered");
        assert_eq!(response.status(), 202);
        let body: Value = response.json().await.expect("json");
        body["order_id"].as_str().expect("order id").to_owned()
    }

    /// Polls the order's status until `accept` holds or 30 s pass; returns the last view.
    pub async fn wait_for_order(&self, order_id: &str, accept: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let response = self
                .get(&format!("/petstore-domain/orders/{order_id}/status"))
                .await;
            if response.status() == 200 {
                let view: Value = response.json().await.expect("JSON body");
                if accept(&view) {
                    return view;
                }
                assert!(
                    Instant::now() < deadline,
                    "order {order_id} stuck at {view}"
                );
            } else {
                // 404 until the read model has the order; 503 asks the client to retry.
                assert!(
                    matches!(response.status().as_u16(), 404 | 503),
                    "unexpected status {}",
                    response.status()
                );
                assert!(Instant::now() < deadline, "order {order_id} never appeared");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Polls until the order is `completed` or `cancelled`; returns its status view. A
    /// `cancelled` view must be settled: no step that has a compensation (reservation,
    /// payment, delivery) may still show `succeeded`.
    pub async fn wait_for_terminal(&self, order_id: &str) -> Value {
        let view = self
            .wait_for_order(order_id, |view| {
                matches!(view["status"].as_str(), Some("completed" | "cancelled"))
            })
            .await;
        if view["status"] == "cancelled" {
            assert_settled(&view);
        }
        view
    }

    /// Polls `path` until `accept` holds for its JSON body or 30 s pass; returns the body.
    pub async fn wait_for_json(&self, path: &str, accept: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let body: Value = self.get(path).await.json().await.unwrap_or(Value::Null);
            if accept(&body) {
                return body;
            }
            assert!(
                Instant::now() < deadline,
                "{path} never satisfied the test: {body}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Polls `path` until `accept` holds for its text body or 30 s pass; returns the text.
    pub async fn wait_for_text(&self, path: &str, accept: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let text = self.get(path).await.text().await.unwrap_or_default();
            if accept(&text) {
                return text;
            }
            assert!(
                Instant::now() < deadline,
                "{path} never satisfied the test:\n{text}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Polls until the read models are ready (health/ready answers 200) or 30 s pass.
    pub async fn wait_until_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while self.get("/petstore-domain/health/ready").await.status() != 200 {
            assert!(Instant::now() < deadline, "the service never became ready");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// The shared Redis the tests use; override with `PETSTORE_TEST_REDIS_URL`. Each test uses
/// its own key prefix.
pub fn redis_url() -> String {
    std::env::var("PETSTORE_TEST_REDIS_URL")
        .unwrap_or_else(|_| "redis://127.0.0.1:6379/0".to_owned())
}

/// The Kafka-protocol broker the tests use; override with `KAFKA_BROKERS`. Each test uses its
/// own topic prefix and consumer groups.
pub fn kafka_brokers() -> String {
    std::env::var("KAFKA_BROKERS").unwrap_or_else(|_| "127.0.0.1:9092".to_owned())
}

/// Points `settings` at the test broker under topics and a consumer group of the test's own
/// (returned: the topic prefix), with step deadlines out of the way of group rebalances.
pub fn with_kafka(settings: &mut Settings) -> String {
    let prefix = unique_name("kafka").replace('-', "_");
    settings.kafka.brokers = Some(kafka_brokers());
    settings.kafka.topic_prefix = prefix.clone();
    settings.kafka.consumer_group = format!("{prefix}.saga");
    // Joining and rebalancing the group takes seconds: keep step deadlines out of the way.
    settings.saga.reservation_timeout_ms = 300_000;
    settings.saga.payment_timeout_ms = 300_000;
    settings.saga.delivery_timeout_ms = 300_000;
    prefix
}

/// Points `settings` at the Redis at `url`, under the key prefix `prefix`.
pub fn with_redis(settings: &mut Settings, url: &str, prefix: &str) {
    settings.redis.url = Some(SecretString::from(url.to_owned()));
    settings.redis.key_prefix = prefix.to_owned();
}

/// A unique name for a test's keys, topics and groups.
pub fn unique_name(kind: &str) -> String {
    format!("test-{kind}-{}", uuid::Uuid::new_v4().simple())
}

/// A Redis server of the test's own (`redis-server` on a free port), so the test can stop
/// and restart it without disturbing others.
pub struct OwnRedis {
    port: u16,
    child: Option<std::process::Child>,
}

impl OwnRedis {
    /// Starts `redis-server` on a free loopback port, without persistence.
    pub async fn start() -> Self {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|listener| listener.local_addr())
            .map(|address| address.port())
            .expect("a free port");
        let mut redis = Self { port, child: None };
        redis.restart().await;
        redis
    }

    /// `redis://127.0.0.1:PORT/0`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    /// Starts the server again (empty: it keeps nothing) on the same port.
    pub async fn restart(&mut self) {
        let child = std::process::Command::new("redis-server")
            .args([
                "--port",
                &self.port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("redis-server is installed");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            // A server that exits (its port taken meanwhile) must not pass for ready because
            // something else answers on the port.
            let exited = self
                .child
                .as_mut()
                .and_then(|child| child.try_wait().ok().flatten());
            assert!(exited.is_none(), "redis-server exited: {exited:?}");
            if tokio::net::TcpStream::connect(("127.0.0.1", self.port))
                .await
                .is_ok()
                && exited.is_none()
            {
                // Give a server that failed to bind the moment it needs to exit.
                tokio::time::sleep(Duration::from_millis(50)).await;
                let still_running = self
                    .child
                    .as_mut()
                    .is_some_and(|child| matches!(child.try_wait(), Ok(None)));
                assert!(still_running, "redis-server exited: its port was taken");
                break;
            }
            assert!(Instant::now() < deadline, "redis-server did not start");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Kills the server.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for OwnRedis {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Adds `count` pets named `{prefix}-000`, `{prefix}-001`, ... through the event store (for
/// tests that need more pets than the demo catalog has); returns their ids.
pub async fn add_pets(
    store: &petstore_event_store::store::EventStore,
    prefix: &str,
    count: usize,
) -> Vec<String> {
    use petstore_domain::pet::{Pet, PetCommand, PetDetails};
    let metadata = petstore_event_store::store::EventMetadata::new(
        petstore_web::CorrelationId::generate(),
        "test",
    );
    let mut pets = Vec::with_capacity(count);
    for index in 0..count {
        let pet_id = format!("{prefix}-{index:03}");
        let details = PetDetails {
            pet_id: petstore_domain::PetId::parse(&pet_id).expect("a valid test pet id"),
            name: format!("Test pet {index}"),
            category: petstore_domain::PetCategory::Dog,
            breed: "Mixed".into(),
            age_months: 2,
            vaccinated: false,
            price: petstore_domain::Money::usd(10_000).expect("valid"),
            description: "test".into(),
        };
        store
            .execute::<Pet>(&pet_id, PetCommand::AddPet(details), &(), &metadata)
            .await
            .expect("add pet");
        pets.push(pet_id);
    }
    pets
}

/// Asserts that a cancelled order's view has nothing left to undo: no reservation, payment
/// or delivery step still `succeeded`.
pub fn assert_settled(view: &Value) {
    let steps = view["steps"].as_array().expect("steps");
    for step in steps {
        if step["name"] != "completion" {
            assert_ne!(
                step["state"], "succeeded",
                "a cancelled order not settled: {view}"
            );
        }
    }
}

/// Asserts `response` is a problem with `status`, and returns its body.
pub async fn assert_problem(response: reqwest::Response, status: u16) -> Value {
    assert_eq!(response.status(), status, "status");
    let content_type = response
        .headers()
        .get("content-type")
        .and_then(|value| value.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    assert_eq!(content_type, "application/problem+json");
    let header_id = response
        .headers()
        .get("x-correlation-id")
        .and_then(|value| value.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    let body: Value = response.json().await.expect("problem body is JSON");
    assert_eq!(body["status"], status);
    for field in ["type", "title", "detail", "correlation_id"] {
        assert!(body[field].is_string(), "problem lacks {field}: {body}");
    }
    assert_eq!(
        body["correlation_id"], header_id,
        "the body names the header's correlation id"
    );
    body
}

/// Declares `postgres::NAME` and `embedded::NAME` tests that run `async fn NAME(Engine)` once
/// per engine, so one suite covers both stores.
#[macro_export]
macro_rules! on_both_engines {
    ($($name:ident),* $(,)?) => {
        mod postgres {
            $(#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn $name() { super::$name($crate::Engine::Postgres).await })*
        }
        mod embedded {
            $(#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn $name() { super::$name($crate::Engine::Embedded).await })*
        }
    };
}

/// Unpadded base64url (RFC 4648 §5), enough to hand-make a token's parts in a test.
pub fn base64url(bytes: &[u8]) -> String {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, b)| n | u32::from(*b) << (16 - 8 * i));
        for i in 0..=chunk.len() {
            out.push(ALPHABET[(n >> (18 - 6 * i) & 63) as usize] as char);
        }
    }
    out
}
