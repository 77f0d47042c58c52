//! Following one order everywhere, with the real binary: its spans reach a real OTLP/HTTP
//! receiver as one trace across Kafka, a replay starts new traces linked to the old ones,
//! and its JSON log lines carry the request's ids and never a secret.

use crate::common;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::common::{FreshDatabase, Service};
use axum::body::Bytes;
use axum::routing::post;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::trace::v1::span::SpanKind;
use prost::Message;
use serde_json::Value;

/// A span as the receiver got it.
#[derive(Debug, Clone)]
struct ReceivedSpan {
    trace_id: String,
    span_id: String,
    parent_span_id: String,
    name: String,
    kind: SpanKind,
    links: Vec<(String, String)>,
    attributes: HashMap<String, String>,
}

/// An OTLP/HTTP receiver on a free loopback port: decodes `POST /v1/traces` (protobuf) with
/// the OpenTelemetry protocol's own message types and keeps every span.
struct OtlpReceiver {
    endpoint: String,
    spans: Arc<Mutex<Vec<ReceivedSpan>>>,
}

impl OtlpReceiver {
    async fn start() -> Self {
        let spans: Arc<Mutex<Vec<ReceivedSpan>>> = Arc::default();
        let sink = spans.clone();
        let app = axum::Router::new().route(
            "/v1/traces",
            post(move |body: Bytes| {
                let sink = sink.clone();
                async move {
                    let Ok(request) = ExportTraceServiceRequest::decode(body) else {
                        return (axum::http::StatusCode::BAD_REQUEST, Vec::new());
                    };
                    let mut spans = sink.lock().expect("spans");
                    for resource in request.resource_spans {
                        for scope in resource.scope_spans {
                            for span in scope.spans {
                                spans.push(ReceivedSpan {
                                    trace_id: hex(&span.trace_id),
                                    span_id: hex(&span.span_id),
                                    parent_span_id: hex(&span.parent_span_id),
                                    kind: SpanKind::try_from(span.kind)
                                        .unwrap_or(SpanKind::Unspecified),
                                    name: span.name,
                                    links: span
                                        .links
                                        .iter()
                                        .map(|link| (hex(&link.trace_id), hex(&link.span_id)))
                                        .collect(),
                                    attributes: span
                                        .attributes
                                        .iter()
                                        .map(|attribute| {
                                            (attribute.key.clone(), attribute_text(attribute))
                                        })
                                        .collect(),
                                });
                            }
                        }
                    }
                    // An empty ExportTraceServiceResponse.
                    (axum::http::StatusCode::OK, Vec::new())
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let endpoint = format!("http://{}", listener.local_addr().expect("address"));
        tokio::spawn(async move { axum::serve(listener, app).await });
        Self { endpoint, spans }
    }

    fn spans(&self) -> Vec<ReceivedSpan> {
        self.spans.lock().expect("spans").clone()
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|byte| format!("{byte:02x}")).collect()
}

fn attribute_text(attribute: &opentelemetry_proto::tonic::common::v1::KeyValue) -> String {
    use opentelemetry_proto::tonic::common::v1::any_value::Value as V;
    match attribute
        .value
        .as_ref()
        .and_then(|value| value.value.as_ref())
    {
        Some(V::StringValue(text)) => text.clone(),
        Some(V::IntValue(number)) => number.to_string(),
        Some(V::BoolValue(flag)) => flag.to_string(),
        Some(V::DoubleValue(number)) => number.to_string(),
        other => format!("{other:?}"),
    }
}

fn random_hex(digits: usize) -> String {
    uuid::Uuid::new_v4().simple().to_string()[..digits].to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_order_is_one_trace_across_kafka_and_a_replay_links_to_it() {
    let receiver = OtlpReceiver::start().await;
    let database = FreshDatabase::create().await;
    let prefix = format!("test-trace-{}", random_hex(12));
    let brokers = std::env::var("KAFKA_BROKERS").unwrap_or_else(|_| "127.0.0.1:9092".to_owned());
    let env = vec![
        ("DATABASE_URL", database.url.clone()),
        ("KAFKA_BROKERS", brokers.clone()),
        ("PETSTORE__KAFKA__TOPIC_PREFIX", prefix.clone()),
        ("PETSTORE__KAFKA__CONSUMER_GROUP", format!("{prefix}-saga")),
        ("PETSTORE__PROVIDERS__PAYMENT__LATENCY_MS", "1".to_owned()),
        ("PETSTORE__PROVIDERS__DELIVERY__LATENCY_MS", "1".to_owned()),
        ("OTEL_EXPORTER_OTLP_ENDPOINT", receiver.endpoint.clone()),
        ("OTEL_SERVICE_NAME", "petstore-test".to_owned()),
        (
            "PETSTORE__CONSOLE__TRACE_URL_TEMPLATE",
            "http://127.0.0.1:16686/trace/{trace_id}".to_owned(),
        ),
    ];
    let service = Service::start(&env).await;

    // The caller's own trace: the order must continue it.
    let trace_id = random_hex(32);
    let caller_span = random_hex(16);
    let response = reqwest::Client::new()
        .post(service.url("/petstore-domain/orders"))
        .header("traceparent", format!("00-{trace_id}-{caller_span}-01"))
        .json(&serde_json::json!({"customer_id": "customer-001", "pet_id": "golden-retriever-001"}))
        .send()
        .await
        .expect("answered");
    assert_eq!(response.status(), 202);
    let echoed = response
        .headers()
        .get("traceparent")
        .and_then(|value| value.to_str().ok())
        .expect("traceparent echoed")
        .to_owned();
    assert!(
        echoed.starts_with(&format!("00-{trace_id}-")),
        "the response names the same trace: {echoed}"
    );
    let accepted: Value = response.json().await.expect("json");
    let order_id = accepted["order_id"].as_str().expect("order id").to_owned();
    let view = service.wait_for_terminal(&order_id).await;
    assert_eq!(view["status"], "completed", "{view}");
    // The saga counts the completion once it has handled OrderCompleted itself.
    service
        .wait_for_text("/metrics", |text| {
            text.contains("petstore_saga_completed_total{outcome=\"completed\",reason=\"\"} 1")
        })
        .await;
    // The console's page of the order (open: these tests run without authentication) links
    // its entries to this trace, the one the receiver gets below, and says where the relay
    // published the order's events.
    let console = format!("/petstore-domain/console/orders/{order_id}");
    let published = format!("{prefix}.orders partition ");
    let page = service
        .wait_for_text(&console, |page| page.contains(&published))
        .await;
    assert!(
        page.contains(&format!("href=\"http://127.0.0.1:16686/trace/{trace_id}\"")),
        "no link to the trace {trace_id}: {page}"
    );
    // Graceful shutdown flushes the spans still buffered.
    let status = service.stop().await;
    assert!(status.success(), "clean exit: {status}");

    let spans = receiver.spans();
    let trace: Vec<&ReceivedSpan> = spans
        .iter()
        .filter(|span| span.trace_id == trace_id)
        .collect();
    let by_id: HashMap<&str, &ReceivedSpan> = trace
        .iter()
        .map(|span| (span.span_id.as_str(), *span))
        .collect();
    let names: Vec<&str> = trace.iter().map(|span| span.name.as_str()).collect();
    let find = |name: &str, kind: SpanKind| {
        trace
            .iter()
            .find(|span| span.name == name && span.kind == kind)
            .copied()
            .unwrap_or_else(|| panic!("no {kind:?} span {name:?} in the trace: {names:?}"))
    };
    let parent_of = |span: &ReceivedSpan| -> &ReceivedSpan {
        by_id
            .get(span.parent_span_id.as_str())
            .copied()
            .unwrap_or_else(|| panic!("the parent of {span:?} is not in the trace"))
    };

    let server = find("POST /petstore-domain/orders", SpanKind::Server);
    assert_eq!(
        server.parent_span_id, caller_span,
        "continues the caller's span"
    );
    assert_eq!(server.attributes["http.route"], "/petstore-domain/orders");
    assert_eq!(server.attributes["http.response.status_code"], "202");
    assert_eq!(echoed, format!("00-{trace_id}-{}-01", server.span_id));

    let created_append = trace
        .iter()
        .find(|span| span.name == "INSERT Order" && span.kind == SpanKind::Client)
        .expect("the order's append");
    assert_eq!(created_append.attributes["db.system.name"], "postgresql");
    let mut ancestor = parent_of(created_append);
    while ancestor.span_id != server.span_id {
        ancestor = parent_of(ancestor);
    }

    let orders_topic = format!("{prefix}.orders");
    let send = trace
        .iter()
        .find(|span| {
            span.kind == SpanKind::Producer
                && span.attributes.get("event_type").map(String::as_str) == Some("OrderCreated")
        })
        .unwrap_or_else(|| panic!("no producer span for OrderCreated: {names:?}"));
    assert_eq!(send.name, format!("send {orders_topic}"));
    assert_eq!(send.attributes["messaging.system"], "kafka");
    assert_eq!(send.attributes["messaging.destination.name"], orders_topic);
    assert_eq!(send.attributes["messaging.kafka.message.key"], order_id);
    assert_eq!(
        send.parent_span_id, created_append.span_id,
        "published from its append"
    );

    let consume = find("saga OrderCreated", SpanKind::Consumer);
    assert_eq!(
        consume.parent_span_id, send.span_id,
        "consumed from its message"
    );
    assert_eq!(consume.attributes["messaging.system"], "kafka");
    assert_eq!(consume.attributes["messaging.operation.type"], "process");
    assert_eq!(
        consume.attributes["correlation_id"],
        accepted["correlation_id"].as_str().expect("id")
    );

    // The steps after the first are reactions from memory to the runner's own appends:
    // internal spans, each inside the step that appended its event.
    for provider in ["call payment", "call delivery"] {
        let call = find(provider, SpanKind::Client);
        let step = parent_of(call);
        assert!(
            step.name.starts_with("saga ")
                && matches!(step.kind, SpanKind::Consumer | SpanKind::Internal),
            "{provider} inside a saga step: {step:?}"
        );
    }
    let completed = find("saga OrderCompleted", SpanKind::Internal);
    // Every span of the order hangs off the server span: one tree, no orphans.
    let mut ancestor = completed;
    let mut hops = 0;
    while ancestor.span_id != server.span_id {
        ancestor = parent_of(ancestor);
        hops += 1;
        assert!(hops < 200, "a cycle");
    }
    assert!(
        hops >= 6,
        "the completion is many hops down the order's trace"
    );

    // The projector's batches are traces of their own, linked to the order's.
    assert!(
        spans.iter().any(|span| span.name.starts_with("project ")
            && span.trace_id != trace_id
            && span.links.iter().any(|(linked, _)| *linked == trace_id)),
        "a projector batch links to the order's trace"
    );

    // A replay republishes in new traces that link to the originals, never inside them.
    let before = receiver.spans().len();
    let replay = common::petstore_command(&[
        ("DATABASE_URL", database.url.clone()),
        ("KAFKA_BROKERS", brokers),
        ("PETSTORE__KAFKA__TOPIC_PREFIX", prefix.clone()),
        ("OTEL_EXPORTER_OTLP_ENDPOINT", receiver.endpoint.clone()),
    ])
    .args(["replay", "--to-kafka"])
    .output()
    .expect("replay runs");
    assert!(
        replay.status.success(),
        "{}",
        String::from_utf8_lossy(&replay.stderr)
    );
    let replayed: Vec<ReceivedSpan> = receiver.spans()[before..].to_vec();
    let republished: Vec<&ReceivedSpan> = replayed
        .iter()
        .filter(|span| span.kind == SpanKind::Producer)
        .filter(|span| span.links.iter().any(|(linked, _)| *linked == trace_id))
        .collect();
    assert!(
        !republished.is_empty(),
        "the replay's messages link to the order's trace"
    );
    assert!(
        replayed.iter().all(|span| span.trace_id != trace_id),
        "a replay never adds spans to an old trace"
    );
    database.drop().await;
}

fn json_lines(service_lines: &[String]) -> Vec<Value> {
    service_lines
        .iter()
        .map(|line| serde_json::from_str(line).unwrap_or_else(|_| panic!("not JSON: {line}")))
        .collect()
}

fn is_hex(value: &Value, digits: usize) -> bool {
    value
        .as_str()
        .is_some_and(|text| text.len() == digits && text.bytes().all(|b| b.is_ascii_hexdigit()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_logs_follow_a_request_and_never_show_secrets() {
    let database = FreshDatabase::create().await;
    // The server trusts loopback connections, so the password is never checked: it is only
    // there to prove it never reaches a log line.
    let secret = format!("s3cret-{}", random_hex(8));
    let url_with_secret = database
        .url
        .replacen("postgres@", &format!("postgres:{secret}@"), 1);
    assert_ne!(
        url_with_secret, database.url,
        "the URL carries the password"
    );
    let service = Service::start(&[("DATABASE_URL", url_with_secret)]).await;
    let client = reqwest::Client::new();

    // A 4xx: an invalid order.
    let refused = client
        .post(service.url("/petstore-domain/orders"))
        .header("X-Correlation-ID", "corr-refused-1")
        .json(&serde_json::json!({"customer_id": "", "pet_id": "golden-retriever-001"}))
        .send()
        .await
        .expect("answered");
    assert_eq!(refused.status(), 422);
    let problem: Value = refused.json().await.expect("problem");
    assert!(is_hex(&problem["trace_id"], 32), "{problem}");

    // A 5xx: the events table is gone.
    let mut connection = database.connect().await;
    sqlx::query("DROP TABLE events CASCADE")
        .execute(&mut connection)
        .await
        .expect("break it");
    let failed = client
        .post(service.url("/petstore-domain/orders"))
        .header("X-Correlation-ID", "corr-failed-1")
        .json(&serde_json::json!({"customer_id": "customer-001", "pet_id": "golden-retriever-001"}))
        .send()
        .await
        .expect("answered");
    assert_eq!(failed.status(), 500);
    let failed_trace = failed
        .headers()
        .get("traceparent")
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.split('-').nth(1))
        .expect("traceparent")
        .to_owned();
    let problem: Value = failed.json().await.expect("problem");
    assert_eq!(problem["trace_id"], failed_trace.as_str());

    // Lines are written as they happen; give the reader a moment.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let lines = service.lines();
    let parsed = json_lines(&lines);
    for line in &parsed {
        for field in ["timestamp", "level", "target", "message"] {
            assert!(line[field].is_string(), "{field} missing: {line}");
        }
    }
    for (correlation_id, trace) in [
        ("corr-refused-1", None),
        ("corr-failed-1", Some(failed_trace.as_str())),
    ] {
        let of_request: Vec<&Value> = parsed
            .iter()
            .filter(|line| line["correlation_id"] == correlation_id)
            .collect();
        assert!(!of_request.is_empty(), "no line names {correlation_id}");
        for line in &of_request {
            assert!(is_hex(&line["trace_id"], 32), "{line}");
            assert!(is_hex(&line["span_id"], 16), "{line}");
            if let Some(trace) = trace {
                assert_eq!(line["trace_id"], trace, "{line}");
            }
        }
    }
    // The cause of the 5xx is logged, with the request's ids.
    let cause = parsed
        .iter()
        .find(|line| {
            line["correlation_id"] == "corr-failed-1"
                && line["level"] == "ERROR"
                && line["message"] != "request failed"
        })
        .unwrap_or_else(|| panic!("no line logs the cause:\n{}", lines.join("\n")));
    assert!(
        cause.to_string().contains("events"),
        "the cause names what failed: {cause}"
    );
    assert!(
        parsed
            .iter()
            .any(|line| line["correlation_id"] == "corr-failed-1"
                && line["message"] == "request failed"),
        "the 5xx itself is logged"
    );

    let status = service.stop().await;
    assert!(status.success(), "clean exit: {status}");
    let all = lines.join("\n");
    assert!(
        !all.contains(&secret),
        "a log line shows the database password"
    );
    assert!(
        !all.contains("postgres:s3cret"),
        "a log line shows the database URL"
    );
    database.drop().await;
}

#[tokio::test]
async fn a_bad_opentelemetry_setting_stops_start_up() {
    let output = common::petstore_command(&[("OTEL_TRACES_SAMPLER", "sometimes".to_owned())])
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--data-dir",
            "/nonexistent-petstore",
        ])
        .output()
        .expect("the binary runs");
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("OTEL_TRACES_SAMPLER"), "{stderr}");
}
