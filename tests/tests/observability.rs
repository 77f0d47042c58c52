//! Metrics and health, seen from outside: a real Prometheus scrapes the service and answers
//! the seed's queries and every query of the shipped dashboard and alert rules; route labels
//! stay bounded; the saga runner shows in `/health` and in metrics when it stalls.

use std::collections::{BTreeSet, HashSet};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use petstore_tests::{
    assert_problem, on_both_engines, redis_url, unique_name, with_kafka, with_redis, Engine,
    Storage, TestApp,
};
use serde_json::Value;

/// The series of a scrape: every sample line's name and labels (values and comments cut).
fn series(scrape: &str) -> BTreeSet<String> {
    scrape
        .lines()
        .filter(|line| !line.starts_with('#') && !line.is_empty())
        .filter_map(|line| line.rsplit_once(' ').map(|(series, _)| series.to_owned()))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn unknown_ids_and_paths_add_no_metric_series() {
    let storage = Storage::new(Engine::Embedded).await;
    let app = TestApp::start(storage.settings()).await;
    app.wait_until_ready().await;
    let warm_up = |index: u32| {
        let order = uuid::Uuid::from_u128(u128::from(index));
        [
            format!("/petstore-domain/orders/{order}/status"),
            format!("/petstore-domain/pets/no-such-pet-{index}"),
            format!("/no/such/path/{index}"),
        ]
    };
    for path in warm_up(0) {
        app.get(&path).await;
    }
    // The scrape counts itself from the second one on.
    app.get("/metrics").await;
    let before = series(&app.get("/metrics").await.text().await.expect("text"));
    for index in 1..=1_000 {
        for path in warm_up(index) {
            app.get(&path).await;
        }
    }
    let scrape = app.get("/metrics").await.text().await.expect("text");
    let after = series(&scrape);
    let added: Vec<&String> = after.difference(&before).collect();
    assert!(added.is_empty(), "new series: {added:?}");
    assert!(
        scrape.contains(
            "petstore_requests_total{route=\"/petstore-domain/orders/{order_id}/status\",method=\"GET\",status_class=\"4xx\"} 1001"
        ),
        "counted under the route template:\n{scrape}"
    );
    assert!(scrape.contains(
        "petstore_requests_errors_total{route=\"unmatched\",method=\"GET\",status_class=\"4xx\"} 1001"
    ));
    app.stop().await;
    storage.remove().await;
}

/// A Prometheus server of the test's own, scraping the given targets every second.
struct OwnPrometheus {
    child: std::process::Child,
    base: String,
    _dir: tempfile::TempDir,
}

impl OwnPrometheus {
    async fn start(target: &str, rule_files: &[PathBuf]) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|listener| listener.local_addr())
            .map(|address| address.port())
            .expect("a free port");
        let rules: Vec<String> = rule_files
            .iter()
            .map(|path| format!("  - {}", path.display()))
            .collect();
        let config = format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nrule_files:\n{}\nscrape_configs:\n  - job_name: petstore\n    static_configs:\n      - targets: ['{target}']\n",
            rules.join("\n")
        );
        let config_path = dir.path().join("prometheus.yml");
        std::fs::write(&config_path, config).expect("write the config");
        let child = std::process::Command::new("prometheus")
            .arg(format!("--config.file={}", config_path.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("prometheus is installed (scripts/test.sh installs it)");
        let prometheus = Self {
            child,
            base: format!("http://127.0.0.1:{port}"),
            _dir: dir,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while reqwest::get(format!("{}/-/ready", prometheus.base))
            .await
            .map_or(true, |response| response.status() != 200)
        {
            assert!(Instant::now() < deadline, "prometheus never became ready");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        prometheus
    }

    /// Runs an instant query; `Err` carries Prometheus's error.
    async fn query(&self, expression: &str) -> Result<Vec<Value>, String> {
        let body: Value = reqwest::Client::new()
            .get(format!("{}/api/v1/query", self.base))
            .query(&[("query", expression)])
            .send()
            .await
            .map_err(|error| error.to_string())?
            .json()
            .await
            .map_err(|error| error.to_string())?;
        if body["status"] != "success" {
            return Err(body.to_string());
        }
        Ok(body["data"]["result"]
            .as_array()
            .cloned()
            .unwrap_or_default())
    }

    /// Polls `expression` until it has a result (30 s at most).
    async fn wait_for(&self, expression: &str) -> Vec<Value> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            match self.query(expression).await {
                Ok(result) if !result.is_empty() => return result,
                Ok(_) => {}
                Err(error) => panic!("{expression} failed: {error}"),
            }
            assert!(Instant::now() < deadline, "{expression} stayed empty");
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }
}

impl Drop for OwnPrometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn observability_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../observability")
}

/// Every PromQL expression of the shipped dashboard, with Grafana's interval variables
/// replaced by a range Prometheus accepts.
fn dashboard_expressions() -> Vec<String> {
    let path = observability_dir().join("grafana/dashboards/petstore.json");
    let dashboard: Value =
        serde_json::from_str(&std::fs::read_to_string(&path).expect("the dashboard"))
            .expect("json");
    let mut expressions = Vec::new();
    collect_expressions(&dashboard, &mut expressions);
    assert!(
        expressions.len() >= 10,
        "the dashboard has its panels: {expressions:?}"
    );
    expressions
        .into_iter()
        .map(|expression| {
            expression
                .replace("$__rate_interval", "1m")
                .replace("$__interval", "1m")
                .replace("$__range", "5m")
        })
        .collect()
}

fn collect_expressions(value: &Value, into: &mut Vec<String>) {
    match value {
        Value::Object(map) => {
            for (key, inner) in map {
                match (key.as_str(), inner) {
                    ("expr", Value::String(expression)) => into.push(expression.clone()),
                    _ => collect_expressions(inner, into),
                }
            }
        }
        Value::Array(items) => items
            .iter()
            .for_each(|item| collect_expressions(item, into)),
        _ => {}
    }
}

/// Every alert rule's expression.
fn alert_expressions() -> Vec<String> {
    #[derive(serde::Deserialize)]
    struct RuleFile {
        groups: Vec<Group>,
    }
    #[derive(serde::Deserialize)]
    struct Group {
        rules: Vec<Rule>,
    }
    #[derive(serde::Deserialize)]
    struct Rule {
        expr: String,
    }
    let path = observability_dir().join("prometheus/alerts.yml");
    use figment::providers::Format as _;
    let file: RuleFile = figment::Figment::from(figment::providers::Yaml::file(&path))
        .extract()
        .expect("the alert rules parse");
    file.groups
        .into_iter()
        .flat_map(|group| group.rules)
        .map(|rule| rule.expr)
        .collect()
}

/// The `petstore_*` metric names an expression uses.
fn metric_names(expression: &str) -> HashSet<String> {
    let mut names = HashSet::new();
    let mut rest = expression;
    while let Some(start) = rest.find("petstore_") {
        let tail = &rest[start..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        names.insert(tail[..end].to_owned());
        rest = &tail[end..];
    }
    names
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn prometheus_answers_the_seed_queries_the_dashboard_and_the_alert_rules() {
    let storage = Storage::new(Engine::Postgres).await;
    let mut settings = storage.settings();
    with_kafka(&mut settings);
    with_redis(&mut settings, &redis_url(), &unique_name("metrics"));
    let app = TestApp::start(settings).await;
    app.wait_until_ready().await;
    let target = app.address.trim_start_matches("http://").to_owned();
    let prometheus = OwnPrometheus::start(
        &target,
        &[observability_dir().join("prometheus/alerts.yml")],
    )
    .await;

    // The seed's traffic: browsing, an order through its saga, errors.
    for _ in 0..20 {
        app.get("/petstore-domain/pets/browse?category=dog").await;
    }
    app.get("/petstore-domain/pets/golden-retriever-001").await;
    let order = app.place_order("golden-retriever-001").await;
    let order_id = order["order_id"].as_str().expect("id");
    let view = app.wait_for_terminal(order_id).await;
    assert_eq!(view["status"], "completed", "{view}");
    assert_problem(app.get("/petstore-domain/pets/no-such-pet").await, 404).await;
    // Let the lag measurements and a few scrapes happen.
    tokio::time::sleep(Duration::from_secs(4)).await;
    for _ in 0..5 {
        app.get("/petstore-domain/pets/browse?category=dog").await;
    }

    // The seed's "Key Metrics to Watch", as written.
    for expression in [
        "rate(petstore_requests_total[5m])",
        "rate(petstore_requests_errors_total[5m]) / rate(petstore_requests_total[5m])",
        "histogram_quantile(0.95, petstore_request_duration_seconds_bucket)",
        "rate(petstore_saga_completed_total[5m])",
        "petstore_circuit_breaker_state",
        "rate(petstore_requests_total[1m])",
    ] {
        prometheus.wait_for(expression).await;
    }
    // A quantile over rates is NaN until two scrapes straddle some traffic: poll for a number.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        app.get("/petstore-domain/pets/browse?category=dog").await;
        let p95 = prometheus
            .wait_for("histogram_quantile(0.95, sum by (le) (rate(petstore_request_duration_seconds_bucket[1m])))")
            .await;
        let p95: f64 = p95[0]["value"][1]
            .as_str()
            .and_then(|value| value.parse().ok())
            .expect("a number");
        if p95.is_finite() {
            assert!(p95 > 0.0, "p95 {p95}");
            break;
        }
        assert!(Instant::now() < deadline, "p95 stayed {p95}");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let breakers = prometheus.wait_for("petstore_circuit_breaker_state").await;
    assert_eq!(breakers.len(), 5, "one series per dependency: {breakers:?}");

    // Every metric the dashboard and the rules name is really exported.
    let scrape = app
        .wait_for_text("/metrics", |text| {
            text.contains("petstore_projection_lag_seconds{projection=\"kafka\"}")
                && text.contains("petstore_saga_runner_lag_seconds")
                && text.contains("petstore_cache_reads_total")
        })
        .await;
    let exported: HashSet<&str> = scrape
        .lines()
        .filter(|line| !line.starts_with('#'))
        .filter_map(|line| line.split(['{', ' ']).next())
        .collect();
    let dashboard = dashboard_expressions();
    let alerts = alert_expressions();
    for expression in dashboard.iter().chain(&alerts) {
        for name in metric_names(expression) {
            assert!(
                exported.contains(name.as_str()),
                "{name} (in {expression}) is not exported"
            );
        }
        prometheus
            .query(expression)
            .await
            .unwrap_or_else(|error| panic!("{expression} does not run: {error}"));
    }
    // Prometheus loaded every alert rule and evaluates them without error.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let rules: Value = reqwest::get(format!("{}/api/v1/rules", prometheus.base))
            .await
            .expect("rules")
            .json()
            .await
            .expect("json");
        let loaded: Vec<&Value> = rules["data"]["groups"]
            .as_array()
            .into_iter()
            .flatten()
            .flat_map(|group| group["rules"].as_array().into_iter().flatten())
            .collect();
        assert_eq!(loaded.len(), alerts.len(), "every rule is loaded");
        if loaded.iter().all(|rule| rule["health"] == "ok") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "a rule does not evaluate: {loaded:?}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    app.stop().await;
    storage.remove().await;
}

async fn the_saga_runner_shows_in_health_and_stalls_loudly(engine: Engine) {
    let storage = Storage::new(engine).await;
    let app = TestApp::start(storage.settings()).await;
    app.wait_until_ready().await;
    let health = app.get_json("/petstore-domain/health").await;
    assert_eq!(
        health["components"]["saga_runner"]["status"], "up",
        "{health}"
    );

    // Break the saga's own table: every batch with a new order fails from now on.
    let database = storage.database().await;
    let drop = "DROP TABLE saga_deadlines";
    match &database {
        petstore_event_store::database::Database::Postgres(pool) => {
            sqlx::query(drop).execute(pool).await.map(|_| ())
        }
        petstore_event_store::database::Database::Sqlite(pool) => {
            sqlx::query(drop).execute(pool).await.map(|_| ())
        }
    }
    .expect("drop the deadlines");
    let order = app.place_order("golden-retriever-001").await;
    let stalled = app
        .wait_for_json("/petstore-domain/health", |health| {
            health["components"]["saga_runner"]["status"] == "down"
        })
        .await;
    assert_eq!(
        stalled["status"], "degraded",
        "queries still work: {stalled}"
    );
    let detail = stalled["components"]["saga_runner"]["detail"]
        .as_str()
        .expect("detail");
    assert!(detail.starts_with("stalled"), "{detail}");
    let scrape = app
        .wait_for_text("/metrics", |text| {
            text.contains("petstore_saga_runner_stalled 1")
                && !text.contains("petstore_saga_runner_failures_total 0")
        })
        .await;
    assert!(scrape.contains("petstore_saga_started_total"), "{scrape}");
    // Lag is measured from the stalled position: the order's events wait.
    app.wait_for_text("/metrics", |text| {
        text.lines().any(|line| {
            line.strip_prefix("petstore_saga_runner_lag_events ")
                .and_then(|value| value.parse::<i64>().ok())
                .is_some_and(|events| events > 0)
        })
    })
    .await;
    let order_id = order["order_id"].as_str().expect("id");
    let view = app
        .get_json(&format!("/petstore-domain/orders/{order_id}/status"))
        .await;
    assert_ne!(view["status"], "completed", "nothing was skipped: {view}");
    database.close().await;
    app.stop().await;
    storage.remove().await;
}

on_both_engines!(the_saga_runner_shows_in_health_and_stalls_loudly);
