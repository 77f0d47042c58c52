//! An OTLP/HTTP trace receiver on a free loopback port, as a collector or agent would be: it
//! decodes every export request with the OpenTelemetry protocol's own message types and
//! counts the spans.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use axum::body::Bytes;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use prost::Message as _;

/// A running receiver: where to export to, and how many spans it has decoded.
#[derive(Debug, Clone)]
pub struct Receiver {
    /// `http://127.0.0.1:PORT`, for `OTEL_EXPORTER_OTLP_ENDPOINT`.
    pub endpoint: String,
    spans: Arc<AtomicU64>,
}

impl Receiver {
    /// Starts a receiver on the current tokio runtime.
    pub async fn start() -> anyhow::Result<Self> {
        let spans = Arc::new(AtomicU64::new(0));
        let counter = spans.clone();
        let app = axum::Router::new().route(
            "/v1/traces",
            axum::routing::post(move |body: Bytes| {
                let counter = counter.clone();
                async move {
                    let Ok(request) = ExportTraceServiceRequest::decode(body) else {
                        return axum::http::StatusCode::BAD_REQUEST;
                    };
                    let count: usize = request
                        .resource_spans
                        .iter()
                        .flat_map(|resource| &resource.scope_spans)
                        .map(|scope| scope.spans.len())
                        .sum();
                    counter.fetch_add(count as u64, Ordering::Relaxed);
                    axum::http::StatusCode::OK
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let endpoint = format!("http://{}", listener.local_addr()?);
        tokio::spawn(async move { axum::serve(listener, app).await });
        Ok(Self { endpoint, spans })
    }

    /// Starts a receiver on a thread and runtime of its own, apart from the service's
    /// workers, for a bench that runs the service in its own process.
    pub fn start_on_own_thread() -> anyhow::Result<Self> {
        let (started, receiver) = std::sync::mpsc::channel();
        std::thread::Builder::new()
            .name("otlp-receiver".to_owned())
            .spawn(move || {
                let runtime = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(runtime) => runtime,
                    Err(error) => {
                        let _ = started.send(Err(anyhow::Error::from(error)));
                        return;
                    }
                };
                runtime.block_on(async move {
                    let _ = started.send(Self::start().await);
                    std::future::pending::<()>().await;
                });
            })?;
        receiver.recv()?
    }

    /// Spans decoded so far.
    pub fn spans(&self) -> u64 {
        self.spans.load(Ordering::Relaxed)
    }
}
