//! Logs, traces and metrics of the petstore: what an operator sees of a process.
//!
//! Owns the process's one `tracing` subscriber, W3C trace context in and out, the
//! [`CorrelationId`] that ties a request's logs, events and responses together, and the
//! [`metrics`] registry. Must not know HTTP, the database or Kafka: those record into it.
//!
//! Logs and traces: one `tracing` subscriber for the process.
//!
//! - **Logs**: JSON lines (or text for a terminal) filtered by `log.filter` or `RUST_LOG`
//!   (which filters log lines only, not traces).
//!   Every JSON line carries `timestamp`, `level`, `target`, `message`, the event's own
//!   fields, and from the spans it runs in: `correlation_id` and `order_id` (the nearest span
//!   that has them) and `trace_id` and `span_id` (the current span's OpenTelemetry context).
//!   Requests, saga steps and projector batches each run in such a span, so every line they
//!   emit can be followed back to an order.
//! - **Traces**: every span is an OpenTelemetry span (tracing-opentelemetry), so ids exist
//!   even when nothing is exported. With `OTEL_EXPORTER_OTLP_ENDPOINT` (or
//!   `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`) set, spans are exported over OTLP/HTTP (protobuf)
//!   in batches; `OTEL_SERVICE_NAME` (default `petstore`), `OTEL_RESOURCE_ATTRIBUTES`,
//!   `OTEL_TRACES_SAMPLER` and `OTEL_TRACES_SAMPLER_ARG` are honoured, and a value the SDK
//!   would silently replace fails start-up instead. `OTEL_SDK_DISABLED=true` turns the
//!   OpenTelemetry layer off (no ids in logs either).
//! - **Propagation**: W3C `traceparent` in and out of HTTP headers, event metadata and Kafka
//!   headers ([`traceparent_of`], [`context_from_traceparent`]).

use std::collections::HashMap;
use std::fmt;

use opentelemetry::propagation::TextMapPropagator as _;
use opentelemetry::trace::{SpanContext, TraceContextExt, TracerProvider as _};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{Sampler, SdkTracerProvider};
use serde_json::{Map, Value};
use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id, Record};
use tracing::{Event, Level, Subscriber};
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::layer::{Context, SubscriberExt};
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

use petstore_settings::{LogFormat, LogSettings};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

pub mod health;
pub mod metrics;

/// Ties together everything one request causes: logs, events, the saga, responses.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct CorrelationId(String);

impl CorrelationId {
    /// Longest accepted id.
    pub const MAX_LEN: usize = 128;

    /// A fresh id: a UUIDv7, time-ordered, so the correlation index of the events grows at
    /// its right edge instead of at a random page per request.
    pub fn generate() -> Self {
        Self(Uuid::now_v7().to_string())
    }

    /// Accepts 1 to 128 characters of ASCII letters, digits and `-_.:`.
    pub fn parse(input: &str) -> Option<Self> {
        let valid = !input.is_empty()
            && input.len() <= Self::MAX_LEN
            && input
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_.:".contains(&b));
        valid.then(|| Self(input.to_owned()))
    }

    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for CorrelationId {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str(&self.0)
    }
}

/// Telemetry could not be set up: a bad OpenTelemetry environment variable.
#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    /// An environment variable has a value the service does not accept.
    #[error("{name}={value:?} is not valid: {reason}")]
    InvalidEnv {
        /// The variable.
        name: &'static str,
        /// Its value.
        value: String,
        /// Why.
        reason: String,
    },
    /// The OTLP exporter cannot be built.
    #[error("the OTLP span exporter cannot be built: {0}")]
    Exporter(#[from] opentelemetry_otlp::ExporterBuildError),
}

/// The tracer provider of the process: flush it before exit ([`Self::shutdown`]).
#[must_use = "call shutdown() before the process exits, or buffered spans are lost"]
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
    exporting: bool,
}

impl Telemetry {
    /// Whether spans are exported (an OTLP endpoint is configured).
    pub fn exporting(&self) -> bool {
        self.exporting
    }

    /// Exports the spans still buffered and stops the exporter.
    pub async fn shutdown(self) {
        let Some(provider) = self.provider else {
            return;
        };
        // The SDK blocks until the exporter task has flushed: off the async workers.
        let flushed = tokio::task::spawn_blocking(move || {
            let flushed = provider.force_flush();
            let _shutdown = provider.shutdown();
            flushed
        })
        .await;
        if let Ok(Err(error)) = flushed {
            tracing::warn!(%error, "flushing spans failed");
        }
    }
}

type LogFilterReload = Box<dyn Fn(&str) -> Result<(), String> + Send + Sync>;

/// Replaces the filter of the global subscriber's log output. One per process, as the
/// subscriber it belongs to.
static LOG_FILTER: std::sync::OnceLock<LogFilterReload> = std::sync::OnceLock::new();

/// Replaces the log filter (`log.filter`, live) of the subscriber [`init`] installed: `Ok(false)`
/// when [`init`] installed none (tests, a library user with their own subscriber).
pub fn set_log_filter(directives: &str) -> Result<bool, String> {
    match LOG_FILTER.get() {
        Some(reload) => reload(directives).map(|()| true),
        None => Ok(false),
    }
}

/// Installs the global subscriber: logs as `settings` say, spans as the `OTEL_*` variables
/// say. Calling it again keeps the first subscriber (tests do) and returns an inert handle.
pub fn init(settings: &LogSettings) -> Result<Telemetry, TelemetryError> {
    init_with(settings, |name| std::env::var(name).ok())
}

fn init_with(
    settings: &LogSettings,
    env: impl Fn(&str) -> Option<String>,
) -> Result<Telemetry, TelemetryError> {
    let disabled = env("OTEL_SDK_DISABLED").is_some_and(|value| value.eq_ignore_ascii_case("true"));
    let endpoint = env("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
        .or_else(|| env("OTEL_EXPORTER_OTLP_ENDPOINT"))
        .filter(|endpoint| !endpoint.is_empty());
    let provider = if disabled {
        None
    } else {
        Some(tracer_provider(endpoint.as_deref(), &env)?)
    };
    let exporting = provider.is_some() && endpoint.is_some();
    // Traces do not depend on the log filter: the service's own spans at `info` and above
    // (with its warnings and errors as span events), never its dependencies' (sqlx, rdkafka,
    // hyper).
    let otel_layer = provider.as_ref().map(|provider| {
        tracing_opentelemetry::layer()
            .with_tracer(provider.tracer("petstore"))
            .with_error_records_to_exceptions(true)
            .with_threads(false)
            .with_target(false)
            .with_tracked_inactivity(false)
            .with_location(false)
            .with_filter(tracing_subscriber::filter::filter_fn(|metadata| {
                // Spans, and as span events only what went wrong: the log has the rest.
                let floor = if metadata.is_span() {
                    Level::INFO
                } else {
                    Level::WARN
                };
                metadata.target().starts_with("petstore") && *metadata.level() <= floor
            }))
    });
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(&settings.filter));
    let (filter, filter_handle) = tracing_subscriber::reload::Layer::new(filter);
    let log_layer = match settings.format {
        LogFormat::Json => tracing_subscriber::fmt::layer()
            .event_format(JsonLines)
            .with_writer(std::io::stderr)
            .boxed(),
        // Colours only on a terminal: a redirected log stays plain text.
        LogFormat::Text => tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .boxed(),
    }
    .with_filter(filter);
    let installed = tracing_subscriber::registry()
        .with(LogFields)
        .with(otel_layer)
        .with(log_layer)
        .try_init()
        .is_ok();
    if installed {
        let reload: LogFilterReload = Box::new(move |directives: &str| {
            let filter = EnvFilter::try_new(directives).map_err(|error| error.to_string())?;
            filter_handle
                .reload(filter)
                .map_err(|error| error.to_string())
        });
        let _first = LOG_FILTER.set(reload);
    }
    Ok(Telemetry {
        provider: provider.filter(|_| installed),
        exporting: exporting && installed,
    })
}

fn tracer_provider(
    endpoint: Option<&str>,
    env: &impl Fn(&str) -> Option<String>,
) -> Result<SdkTracerProvider, TelemetryError> {
    let resource = opentelemetry_sdk::Resource::builder()
        .with_service_name(env("OTEL_SERVICE_NAME").unwrap_or_else(|| "petstore".to_owned()))
        .with_attribute(opentelemetry::KeyValue::new(
            "service.version",
            env!("CARGO_PKG_VERSION"),
        ))
        .build();
    // A process that exports nothing records nothing: its spans get real ids (for logs and
    // propagation) and pass on a caller's sampling decision, at the least cost.
    let sampler = match (endpoint, env("OTEL_TRACES_SAMPLER")) {
        (None, None) => Sampler::ParentBased(Box::new(Sampler::AlwaysOff)),
        _ => sampler(env)?,
    };
    let mut builder = SdkTracerProvider::builder()
        .with_sampler(sampler)
        .with_resource(resource);
    if let Some(endpoint) = endpoint {
        if !endpoint.starts_with("http://") {
            return Err(TelemetryError::InvalidEnv {
                name: "OTEL_EXPORTER_OTLP_ENDPOINT",
                value: endpoint.to_owned(),
                reason: "spans are exported over plain http:// (OTLP/HTTP to a local collector \
                         or agent); terminate TLS there"
                    .to_owned(),
            });
        }
        use opentelemetry_otlp::WithExportConfig as _;
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .with_protocol(opentelemetry_otlp::Protocol::HttpBinary)
            .build()?;
        let processor =
            opentelemetry_sdk::trace::span_processor_with_async_runtime::BatchSpanProcessor::builder(
                exporter,
                opentelemetry_sdk::runtime::Tokio,
            )
            .build();
        builder = builder.with_span_processor(processor);
    }
    Ok(builder.build())
}

/// The sampler `OTEL_TRACES_SAMPLER` (and `_ARG`) name; default `parentbased_always_on`.
fn sampler(env: &impl Fn(&str) -> Option<String>) -> Result<Sampler, TelemetryError> {
    let name = env("OTEL_TRACES_SAMPLER").unwrap_or_else(|| "parentbased_always_on".to_owned());
    let ratio = || -> Result<f64, TelemetryError> {
        let value = env("OTEL_TRACES_SAMPLER_ARG").unwrap_or_else(|| "1.0".to_owned());
        value
            .parse::<f64>()
            .ok()
            .filter(|ratio| (0.0..=1.0).contains(ratio))
            .ok_or(TelemetryError::InvalidEnv {
                name: "OTEL_TRACES_SAMPLER_ARG",
                value,
                reason: "a ratio between 0.0 and 1.0".to_owned(),
            })
    };
    Ok(match name.as_str() {
        "always_on" => Sampler::AlwaysOn,
        "always_off" => Sampler::AlwaysOff,
        "traceidratio" => Sampler::TraceIdRatioBased(ratio()?),
        "parentbased_always_on" => Sampler::ParentBased(Box::new(Sampler::AlwaysOn)),
        "parentbased_always_off" => Sampler::ParentBased(Box::new(Sampler::AlwaysOff)),
        "parentbased_traceidratio" => {
            Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(ratio()?)))
        }
        _ => {
            return Err(TelemetryError::InvalidEnv {
                name: "OTEL_TRACES_SAMPLER",
                value: name,
                reason: "one of always_on, always_off, traceidratio, parentbased_always_on, \
                         parentbased_always_off, parentbased_traceidratio"
                    .to_owned(),
            })
        }
    })
}

/// The W3C `traceparent` of the current span (`None` outside any span, or when tracing is
/// disabled).
pub fn current_traceparent() -> Option<String> {
    traceparent_of(&tracing::Span::current().context())
}

/// The W3C `traceparent` of an OpenTelemetry context, if it holds a valid span.
pub fn traceparent_of(context: &opentelemetry::Context) -> Option<String> {
    let span = context.span();
    let span_context = span.span_context();
    // The W3C format (version 00), as TraceContextPropagator writes it, without its map.
    span_context.is_valid().then(|| {
        format!(
            "00-{}-{}-{:02x}",
            span_context.trace_id(),
            span_context.span_id(),
            span_context.trace_flags().to_u8()
        )
    })
}

/// The context a W3C `traceparent` (and optional `tracestate`) names; `None` when it does
/// not parse.
pub fn context_from_traceparent(
    traceparent: &str,
    tracestate: Option<&str>,
) -> Option<opentelemetry::Context> {
    let mut carrier = HashMap::from([("traceparent".to_owned(), traceparent.to_owned())]);
    if let Some(state) = tracestate {
        carrier.insert("tracestate".to_owned(), state.to_owned());
    }
    let context = TraceContextPropagator::new().extract(&carrier);
    context.span().span_context().is_valid().then_some(context)
}

/// The span context a W3C `traceparent` names, to link to (replays link to the original).
pub fn span_context_from_traceparent(traceparent: &str) -> Option<SpanContext> {
    context_from_traceparent(traceparent, None).map(|context| context.span().span_context().clone())
}

/// Makes `span` a child of the remote span `traceparent` names (from a request, an event or
/// a message). A missing or malformed one leaves `span` where it was (a new trace).
pub fn continue_trace(span: &tracing::Span, traceparent: Option<&str>) {
    if let Some(context) = traceparent.and_then(|value| context_from_traceparent(value, None)) {
        // Fails only when the span was already started (entered): never the case here.
        let _ = span.set_parent(context);
    }
}

/// Most links one span gets (a batch links to the traces of the events it handles).
pub const MAX_LINKS: usize = 32;

/// Links `span` to the span `traceparent` names, if it parses: `span` stays in its own trace
/// (a replay, a batch) and points at the original.
pub fn link_to(span: &tracing::Span, traceparent: Option<&str>) {
    if let Some(context) = traceparent.and_then(span_context_from_traceparent) {
        span.add_link(context);
    }
}

/// Links `span` to the traces the `traceparents` name (the first [`MAX_LINKS`]): a batch
/// links to the traces of the events it handles.
pub fn link_to_all<'a>(span: &tracing::Span, traceparents: impl IntoIterator<Item = &'a str>) {
    for traceparent in traceparents.into_iter().take(MAX_LINKS) {
        link_to(span, Some(traceparent));
    }
}

/// What log lines take from the spans they run in.
#[derive(Default)]
struct SpanLogFields {
    correlation_id: Option<String>,
    order_id: Option<String>,
}

impl Visit for SpanLogFields {
    fn record_str(&mut self, field: &Field, value: &str) {
        match field.name() {
            "correlation_id" => self.correlation_id = Some(value.to_owned()),
            "order_id" => self.order_id = Some(value.to_owned()),
            _ => {}
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        match field.name() {
            "correlation_id" => self.correlation_id = Some(format!("{value:?}")),
            "order_id" => self.order_id = Some(format!("{value:?}")),
            _ => {}
        }
    }
}

/// Keeps each span's `correlation_id` and `order_id` (set when it starts or recorded later)
/// where [`JsonLines`] finds them.
struct LogFields;

impl<S: Subscriber + for<'a> LookupSpan<'a>> Layer<S> for LogFields {
    fn on_new_span(&self, attributes: &Attributes<'_>, id: &Id, context: Context<'_, S>) {
        let mut fields = SpanLogFields::default();
        attributes.record(&mut fields);
        if fields.correlation_id.is_some() || fields.order_id.is_some() {
            if let Some(span) = context.span(id) {
                span.extensions_mut().insert(fields);
            }
        }
    }

    fn on_record(&self, id: &Id, values: &Record<'_>, context: Context<'_, S>) {
        let mut recorded = SpanLogFields::default();
        values.record(&mut recorded);
        if recorded.correlation_id.is_none() && recorded.order_id.is_none() {
            return;
        }
        if let Some(span) = context.span(id) {
            let mut extensions = span.extensions_mut();
            match extensions.get_mut::<SpanLogFields>() {
                Some(fields) => {
                    fields.correlation_id =
                        recorded.correlation_id.or(fields.correlation_id.take());
                    fields.order_id = recorded.order_id.or(fields.order_id.take());
                }
                None => extensions.insert(recorded),
            }
        }
    }
}

/// One JSON object per line (see the module docs for its fields).
struct JsonLines;

/// An event's own fields, as JSON.
struct JsonFields<'a>(&'a mut Map<String, Value>);

impl Visit for JsonFields<'_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.0.insert(field.name().to_owned(), Value::from(value));
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        self.0.insert(field.name().to_owned(), Value::from(value));
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        self.0.insert(field.name().to_owned(), Value::from(value));
    }

    fn record_f64(&mut self, field: &Field, value: f64) {
        self.0.insert(field.name().to_owned(), Value::from(value));
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        self.0.insert(field.name().to_owned(), Value::from(value));
    }

    fn record_error(&mut self, field: &Field, value: &(dyn std::error::Error + 'static)) {
        self.0
            .insert(field.name().to_owned(), Value::from(value.to_string()));
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.0
            .insert(field.name().to_owned(), Value::from(format!("{value:?}")));
    }
}

impl<S, N> FormatEvent<S, N> for JsonLines
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        context: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        let metadata = event.metadata();
        let mut line = Map::new();
        line.insert(
            "timestamp".to_owned(),
            Value::from(chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Micros, true)),
        );
        line.insert("level".to_owned(), Value::from(metadata.level().as_str()));
        line.insert("target".to_owned(), Value::from(metadata.target()));
        let mut fields = Map::new();
        event.record(&mut JsonFields(&mut fields));
        line.insert(
            "message".to_owned(),
            fields.remove("message").unwrap_or(Value::from("")),
        );
        // Entered spans activate their OpenTelemetry context (tracing-opentelemetry).
        let otel = opentelemetry::Context::current();
        let span_context = otel.span().span_context().clone();
        if span_context.is_valid() {
            line.insert(
                "trace_id".to_owned(),
                Value::from(span_context.trace_id().to_string()),
            );
            line.insert(
                "span_id".to_owned(),
                Value::from(span_context.span_id().to_string()),
            );
        }
        if let Some(scope) = context.event_scope() {
            let mut correlation_id = None;
            let mut order_id = None;
            for span in scope {
                if let Some(fields) = span.extensions().get::<SpanLogFields>() {
                    correlation_id = correlation_id.or_else(|| fields.correlation_id.clone());
                    order_id = order_id.or_else(|| fields.order_id.clone());
                }
                if !line.contains_key("span") {
                    line.insert("span".to_owned(), Value::from(span.name()));
                }
            }
            if let Some(id) = correlation_id {
                line.insert("correlation_id".to_owned(), Value::from(id));
            }
            if let Some(id) = order_id {
                line.insert("order_id".to_owned(), Value::from(id));
            }
        }
        for (key, value) in fields {
            line.entry(key).or_insert(value);
        }
        let text = serde_json::to_string(&line).map_err(|_| fmt::Error)?;
        writeln!(writer, "{text}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env_of(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: HashMap<String, String> = pairs
            .iter()
            .map(|(key, value)| ((*key).to_owned(), (*value).to_owned()))
            .collect();
        move |name| map.get(name).cloned()
    }

    #[test]
    fn a_bad_sampler_or_endpoint_fails_instead_of_falling_back() {
        for pairs in [
            vec![("OTEL_TRACES_SAMPLER", "sometimes")],
            vec![
                ("OTEL_TRACES_SAMPLER", "traceidratio"),
                ("OTEL_TRACES_SAMPLER_ARG", "1.5"),
            ],
        ] {
            assert!(sampler(&env_of(&pairs)).is_err(), "{pairs:?}");
        }
        assert!(sampler(&env_of(&[])).is_ok());
        let https = tracer_provider(Some("https://collector:4318"), &env_of(&[]));
        assert!(matches!(https, Err(TelemetryError::InvalidEnv { .. })));
    }

    /// A writer the test reads back.
    #[derive(Clone, Default)]
    struct Captured(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

    impl std::io::Write for Captured {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            self.0
                .lock()
                .map_err(|_| std::io::Error::other("poisoned"))?
                .extend_from_slice(bytes);
            Ok(bytes.len())
        }

        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn json_lines_carry_the_ids_of_every_enclosing_span() {
        let captured = Captured::default();
        let writer = captured.clone();
        let provider = tracer_provider(None, &env_of(&[])).expect("provider");
        let subscriber = tracing_subscriber::registry()
            .with(LogFields)
            .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("test")))
            .with(
                tracing_subscriber::fmt::layer()
                    .event_format(JsonLines)
                    .with_writer(move || writer.clone()),
            );
        let remote = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        tracing::subscriber::with_default(subscriber, || {
            let request = tracing::info_span!("request", correlation_id = "corr-1");
            continue_trace(&request, Some(remote));
            let _request = request.enter();
            let handler = tracing::info_span!("handler", order_id = tracing::field::Empty);
            let _handler = handler.enter();
            tracing::Span::current().record("order_id", "order-9");
            tracing::error!(status = 500_u16, "request failed");
        });
        tracing::info!("outside any span");
        let text = String::from_utf8(captured.0.lock().expect("lock").clone()).expect("utf-8");
        let line: Value = serde_json::from_str(text.lines().next().expect("a line")).expect("json");
        assert_eq!(line["message"], "request failed");
        assert_eq!(line["level"], "ERROR");
        assert_eq!(line["status"], 500);
        assert_eq!(line["correlation_id"], "corr-1");
        assert_eq!(line["order_id"], "order-9");
        assert_eq!(line["trace_id"], "4bf92f3577b34da6a3ce929d0e0e4736");
        let span_id = line["span_id"].as_str().expect("span_id");
        assert_eq!(span_id.len(), 16);
        assert_ne!(
            span_id, "00f067aa0ba902b7",
            "the handler's own span, not the caller's"
        );
        assert!(line["timestamp"]
            .as_str()
            .is_some_and(|at| at.ends_with('Z')));
        assert!(line["target"].as_str().is_some());
    }

    #[test]
    fn traceparents_round_trip() {
        let traceparent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let context = context_from_traceparent(traceparent, None).expect("valid");
        assert_eq!(traceparent_of(&context).as_deref(), Some(traceparent));
        assert!(context_from_traceparent("00-zz-00f067aa0ba902b7-01", None).is_none());
        assert!(context_from_traceparent(
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            None
        )
        .is_none());
    }
}
