//! What the tests of the real binary share: a fresh Postgres database, and the `petstore`
//! binary run as a service whose log lines the test reads.

#![allow(dead_code)] // each test binary uses its own part of this module

use std::io::BufRead;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use sqlx::{Connection, PgConnection};

/// The server the test databases are created on.
pub fn admin_url() -> String {
    std::env::var("PETSTORE_TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".to_owned())
}

/// A fresh database of this test's own (the test script drops leftovers by this prefix).
pub struct FreshDatabase {
    /// Its name.
    pub name: String,
    /// Its URL.
    pub url: String,
}

impl FreshDatabase {
    /// Creates `petstore_test_<random>`.
    pub async fn create() -> Self {
        let admin = admin_url();
        let name = format!("petstore_test_{}", uuid::Uuid::new_v4().simple());
        let mut connection = PgConnection::connect(&admin).await.expect("postgres");
        sqlx::query(&format!("CREATE DATABASE {name}"))
            .execute(&mut connection)
            .await
            .expect("create");
        let base = admin
            .rsplit_once('/')
            .map_or(admin.as_str(), |(base, _)| base);
        let url = format!("{base}/{name}");
        Self { name, url }
    }

    /// A direct connection, to inspect or break things.
    pub async fn connect(&self) -> PgConnection {
        PgConnection::connect(&self.url).await.expect("connect")
    }

    /// The tables of the public schema.
    pub async fn tables(&self) -> Vec<String> {
        sqlx::query_scalar(
            "SELECT tablename::text FROM pg_tables WHERE schemaname = 'public' ORDER BY 1",
        )
        .fetch_all(&mut self.connect().await)
        .await
        .expect("tables")
    }

    /// Drops the database.
    pub async fn drop(self) {
        let mut connection = PgConnection::connect(&admin_url()).await.expect("postgres");
        sqlx::query(&format!(
            "DROP DATABASE IF EXISTS {} WITH (FORCE)",
            self.name
        ))
        .execute(&mut connection)
        .await
        .expect("drop");
    }
}

/// `petstore` with a clean environment: no config files, no Redis, Kafka or OTLP endpoint
/// unless `env` sets them, JSON logs, and the seed's demo mode without rate limits (these
/// tests are about other things; `cli/tests/security.rs` runs the binary with the shipped
/// config and its users).
pub fn petstore_command(env: &[(&str, String)]) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_petstore"));
    command
        .env_remove("PETSTORE_CONFIG_DIR")
        .env("PETSTORE__LOG__FORMAT", "json")
        .env_remove("DATABASE_URL")
        .env_remove("REDIS_URL")
        .env_remove("KAFKA_BROKERS")
        .env_remove("RUST_LOG");
    for (name, _) in std::env::vars() {
        if name.starts_with("OTEL_") || name.starts_with("PETSTORE__") {
            command.env_remove(name);
        }
    }
    command
        .env("PETSTORE__LOG__FORMAT", "json")
        .env("PETSTORE__SECURITY__AUTHENTICATION_REQUIRED", "false")
        .env("PETSTORE__SECURITY__RATE_LIMITS__ENABLED", "false");
    for (name, value) in env {
        command.env(name, value);
    }
    command
}

/// The port a `listening` log line names, JSON (`"port":N`) or text (`port=N`).
fn listening_port(line: &str) -> Option<u64> {
    if let Ok(line) = serde_json::from_str::<serde_json::Value>(line) {
        return (line["message"] == "listening").then(|| line["port"].as_u64())?;
    }
    let (_, rest) = line.split_once(" listening ")?;
    let (_, port) = rest.split_once("port=")?;
    port.split(|c: char| !c.is_ascii_digit())
        .next()?
        .parse()
        .ok()
}

/// `petstore serve` on a free port, its stderr (JSON log lines) collected.
pub struct Service {
    child: Child,
    /// `http://127.0.0.1:PORT`.
    pub base: String,
    lines: Arc<Mutex<Vec<String>>>,
}

impl Service {
    /// Starts `petstore serve --listen 127.0.0.1:0` with `env` and waits until it is ready.
    pub async fn start(env: &[(&str, String)]) -> Self {
        Self::start_command(petstore_command(env)).await
    }

    /// Starts `petstore serve --listen 127.0.0.1:0 --roles ROLES` with `env`, and waits until
    /// it is ready.
    pub async fn start_roles(env: &[(&str, String)], roles: &str) -> Self {
        Self::start_with(petstore_command(env), &["--roles", roles]).await
    }

    /// Starts `command serve --listen 127.0.0.1:0` and waits until it is ready; its log
    /// lines may be JSON or text.
    pub async fn start_command(command: Command) -> Self {
        Self::start_with(command, &[]).await
    }

    /// Starts `command serve --listen 127.0.0.1:0 ARGS` and waits until it is ready.
    pub async fn start_with(mut command: Command, args: &[&str]) -> Self {
        let mut child = command
            .args(["serve", "--listen", "127.0.0.1:0"])
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("the binary starts");
        let stderr = child.stderr.take().expect("piped stderr");
        let lines = Arc::new(Mutex::new(Vec::new()));
        let sink = lines.clone();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stderr)
                .lines()
                .map_while(Result::ok)
            {
                sink.lock().expect("lines").push(line);
            }
        });
        let deadline = Instant::now() + Duration::from_secs(60);
        let port = loop {
            let port = lines
                .lock()
                .expect("lines")
                .iter()
                .find_map(|line| listening_port(line));
            if let Some(port) = port {
                break port;
            }
            if let Ok(Some(status)) = child.try_wait() {
                panic!(
                    "the service exited with {status}:\n{}",
                    lines.lock().expect("lines").join("\n")
                );
            }
            assert!(Instant::now() < deadline, "the service never listened");
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        let service = Self {
            child,
            base: format!("http://127.0.0.1:{port}"),
            lines,
        };
        let client = reqwest::Client::new();
        while client
            .get(service.url("/health/ready"))
            .send()
            .await
            .map_or(true, |response| response.status() != 200)
        {
            assert!(Instant::now() < deadline, "the service never became ready");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        service
    }

    /// `base` + `path`.
    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// Every log line so far.
    pub fn lines(&self) -> Vec<String> {
        self.lines.lock().expect("lines").clone()
    }

    /// Sends it `signal` (`KILL`, `STOP`, `CONT`…).
    pub fn signal(&self, signal: &str) {
        let sent = Command::new("kill")
            .args([&format!("-{signal}"), &self.child.id().to_string()])
            .status()
            .expect("kill runs");
        assert!(sent.success(), "kill -{signal} failed");
    }

    /// Kills it (`kill -9`: nothing handed over, nothing flushed) and reaps it.
    pub fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Stops it with SIGTERM (a graceful shutdown) and waits, at most 30 s.
    pub async fn stop(mut self) -> ExitStatus {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return status;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                panic!("the service did not stop within 30 s of SIGTERM");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Polls `path` until its text satisfies `accept` (60 s at most); returns it.
    pub async fn wait_for_text(&self, path: &str, accept: impl Fn(&str) -> bool) -> String {
        let client = reqwest::Client::new();
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let text = match client.get(self.url(path)).send().await {
                Ok(response) => response.text().await.unwrap_or_default(),
                Err(_) => String::new(),
            };
            if accept(&text) {
                return text;
            }
            assert!(
                Instant::now() < deadline,
                "{path} never satisfied the test:\n{text}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Polls the order's status until it is completed or cancelled (60 s at most).
    pub async fn wait_for_terminal(&self, order_id: &str) -> serde_json::Value {
        let client = reqwest::Client::new();
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let response = client
                .get(self.url(&format!("/petstore-domain/orders/{order_id}/status")))
                .send()
                .await
                .expect("answered");
            if response.status() == 200 {
                let view: serde_json::Value = response.json().await.expect("json");
                if matches!(view["status"].as_str(), Some("completed" | "cancelled")) {
                    return view;
                }
            }
            assert!(Instant::now() < deadline, "order {order_id} never ended");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `petstore providers serve --listen 127.0.0.1:0 --latency-ms LATENCY`, killed when dropped.
pub struct Providers {
    child: Child,
    /// `http://127.0.0.1:PORT`, read from its first line.
    pub base: String,
}

impl Providers {
    /// Starts it and reads its address.
    pub fn start(latency_ms: u64) -> Self {
        let mut child = petstore_command(&[])
            .args([
                "providers",
                "serve",
                "--listen",
                "127.0.0.1:0",
                "--latency-ms",
            ])
            .arg(latency_ms.to_string())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("the binary starts");
        let stdout = child.stdout.take().expect("piped stdout");
        let mut line = String::new();
        std::io::BufReader::new(stdout)
            .read_line(&mut line)
            .expect("a first line");
        let base = line
            .trim()
            .strip_prefix("providers listening on ")
            .unwrap_or_else(|| panic!("unexpected first line: {line:?}"))
            .to_owned();
        Self { child, base }
    }

    /// `PETSTORE__PROVIDERS__{PAYMENT,DELIVERY}__URL` pointing at it.
    pub fn env(&self) -> [(&'static str, String); 2] {
        [
            ("PETSTORE__PROVIDERS__PAYMENT__URL", self.base.clone()),
            ("PETSTORE__PROVIDERS__DELIVERY__URL", self.base.clone()),
        ]
    }

    /// `GET path`'s JSON.
    pub async fn get(&self, path: &str) -> serde_json::Value {
        reqwest::get(format!("{}{path}", self.base))
            .await
            .expect("the providers answer")
            .json()
            .await
            .expect("json")
    }
}

impl Drop for Providers {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
