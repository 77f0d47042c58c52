//! Roles in separate processes: one active projector per projection, a standby takes over;
//! a broker that goes away stalls the Kafka projection visibly, and it resumes without loss.

use std::time::{Duration, Instant};

use petstore_domain::PetId;
use petstore_event_store::store::EventStore;
use petstore_projector::Projector;
use petstore_read_models::ReadModels;
use petstore_tests::{add_pets, assert_problem, Engine, Storage, TestApp};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_standby_projector_takes_over_when_the_active_one_dies() {
    let storage = Storage::new(Engine::Postgres).await;
    let store = EventStore::new(storage.database().await, 8);
    let settings = storage.settings();
    let read_models = ReadModels::open(store.database())
        .await
        .expect("read models");

    let first = Projector::new(
        store.clone(),
        read_models.clone(),
        settings.projector.clone(),
    );
    let mut first_progress = first.progress();
    let first = tokio::spawn(first.run(futures::future::pending()));
    first_progress
        .wait_for(|progress| progress.active)
        .await
        .expect("first is active");

    let second = Projector::new(
        store.clone(),
        read_models.clone(),
        settings.projector.clone(),
    );
    let mut second_progress = second.progress();
    let second = tokio::spawn(second.run(futures::future::pending()));
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    assert!(
        !second_progress.borrow().active,
        "only one active projector"
    );

    first.abort(); // the active process dies
    let _ = first.await;
    let died = Instant::now();
    tokio::time::timeout(
        Duration::from_secs(30),
        second_progress.wait_for(|progress| progress.active),
    )
    .await
    .expect("the standby takes over within seconds")
    .expect("progress");
    let takeover = died.elapsed();
    // One retry interval plus the dead connection's backend exiting; generous for a loaded CI.
    assert!(takeover < Duration::from_secs(10), "took {takeover:?}");

    add_pets(&store, "standby-canary", 1).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    let pet_id = PetId::parse("standby-canary-000").expect("valid");
    while read_models.pet(&pet_id).await.expect("query").is_none() {
        assert!(
            Instant::now() < deadline,
            "the new active projector does not project"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    second.abort();
    storage.remove().await;
}

/// A tansu broker of the test's own, on a free port, so it can be stopped and started.
struct OwnBroker {
    port: u16,
    child: Option<std::process::Child>,
}

impl OwnBroker {
    async fn start() -> Self {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|listener| listener.local_addr())
            .map(|address| address.port())
            .expect("a free port");
        let mut broker = Self { port, child: None };
        broker.restart().await;
        broker
    }

    fn address(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    async fn restart(&mut self) {
        let url = format!("tcp://{}", self.address());
        let child = std::process::Command::new("tansu")
            .args([
                "broker",
                "--listener-url",
                &url,
                "--advertised-listener-url",
                &url,
            ])
            .args(["--storage-engine", "memory://tansu/"])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("tansu is installed (scripts/test.sh installs it)");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        while tokio::net::TcpStream::connect(("127.0.0.1", self.port))
            .await
            .is_err()
        {
            assert!(Instant::now() < deadline, "tansu did not start");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for OwnBroker {
    fn drop(&mut self) {
        self.stop();
    }
}

fn metric(metrics: &str, line_start: &str) -> Option<String> {
    metrics
        .lines()
        .find(|line| line.starts_with(line_start))
        .and_then(|line| line.rsplit(' ').next())
        .map(str::to_owned)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_broker_outage_stalls_the_kafka_projection_visibly_and_loses_nothing() {
    let mut broker = OwnBroker::start().await;
    let storage = Storage::new(Engine::Postgres).await;
    let mut settings = storage.settings();
    settings.kafka.brokers = Some(broker.address());
    settings.kafka.topic_prefix = "outage".to_owned();
    settings.kafka.message_timeout_ms = 1_000;
    let roles = [
        petstore_cli::Role::Command,
        petstore_cli::Role::Query,
        petstore_cli::Role::Projector,
    ]
    .into_iter()
    .collect();
    let app = TestApp::start_with_roles(settings, &roles).await;
    app.wait_until_ready().await;
    let stalled = r#"petstore_projection_stalled{projection="kafka"}"#;
    app.wait_for_text("/metrics", |text| {
        metric(text, stalled).as_deref() == Some("0")
    })
    .await;

    broker.stop();
    let store = EventStore::new(storage.database().await, 8);
    add_pets(&store, "outage-canary", 1).await;
    let text = app
        .wait_for_text("/metrics", |text| {
            metric(text, stalled).as_deref() == Some("1")
        })
        .await;
    assert!(metric(
        &text,
        r#"petstore_projection_failures_total{projection="kafka"}"#
    )
    .is_some());
    let health: serde_json::Value = app
        .get("/petstore-domain/health")
        .await
        .json()
        .await
        .expect("json");
    assert_eq!(health["components"]["projection:kafka"]["status"], "down");
    assert_eq!(health["status"], "degraded");

    broker.restart().await;
    app.wait_for_text("/metrics", |text| {
        metric(text, stalled).as_deref() == Some("0")
    })
    .await;
    let database = store.database().clone();
    let head = petstore_event_store::stream::head_position(&database)
        .await
        .expect("head");
    let checkpoint = petstore_event_store::stream::load_checkpoint(&database, "kafka")
        .await
        .expect("checkpoint");
    assert_eq!(
        checkpoint, head,
        "everything appended during the outage was published"
    );
    app.stop().await;
    storage.remove().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn split_processes_each_answer_health_and_the_api_is_ready_once_read_models_catch_up() {
    use petstore_cli::Role;
    let storage = Storage::new(Engine::Postgres).await;
    let settings = storage.settings();
    let api =
        TestApp::start_with_roles(settings.clone(), &[Role::Command, Role::Query].into()).await;
    // No projector runs yet: the demo catalog is in the log, not in the read models.
    let not_ready = api.get("/health/ready").await;
    assert_problem(not_ready, 503).await;
    assert_eq!(api.get("/health/live").await.status(), 200);

    let workers = TestApp::start_with_roles(settings, &[Role::Projector, Role::Saga].into()).await;
    workers.wait_until_ready().await;
    let health: serde_json::Value = workers
        .get("/petstore-domain/health")
        .await
        .json()
        .await
        .expect("json");
    assert!(
        health["components"]["projection:read_models"].is_object(),
        "{health}"
    );
    assert_eq!(
        workers.get("/petstore-domain/pets/browse").await.status(),
        404,
        "no query role here"
    );

    api.wait_until_ready().await;
    let accepted = api.place_order("golden-retriever-001").await;
    let order_id = accepted["order_id"].as_str().expect("id");
    assert_eq!(api.wait_for_terminal(order_id).await["status"], "completed");
    api.stop().await;
    workers.stop().await;
    storage.remove().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_second_full_instance_is_ready_while_its_projectors_stand_by() {
    let storage = Storage::new(Engine::Postgres).await;
    let first = TestApp::start(storage.settings()).await;
    first.wait_until_ready().await;
    let second = TestApp::start(storage.settings()).await;
    second.wait_until_ready().await;
    let health: serde_json::Value = second
        .get("/petstore-domain/health")
        .await
        .json()
        .await
        .expect("json");
    assert_eq!(
        health["components"]["projection:read_models"]["detail"],
        "standby: another instance is active"
    );
    let accepted = second.place_order("labrador-001").await;
    let order_id = accepted["order_id"].as_str().expect("id");
    assert_eq!(
        second.wait_for_terminal(order_id).await["status"],
        "completed"
    );
    // The first instance goes: the second's projector takes over, and it stays ready.
    first.stop().await;
    second
        .wait_for_json("/petstore-domain/health", |health| {
            health["components"]["projection:read_models"]["detail"] == "caught up"
        })
        .await;
    assert_eq!(second.get("/health/ready").await.status(), 200);
    second.stop().await;
    storage.remove().await;
}
