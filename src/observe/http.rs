//! The HTTP server: the dashboard (`/`, fed by `/api/dashboard`), `/metrics` (Prometheus
//! text), `/healthz` (process alive), `/readyz` (model loaded and, on Kafka, partitions
//! assigned).

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;

use super::dashboard::{Dashboard, ModelsReport, spawn_sampler};
use super::metrics::Metrics;

async fn metrics(State(d): State<Arc<Dashboard>>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        d.metrics().render(),
    )
}

/// The dashboard page: one self-contained file compiled in (no build step, no CDN).
const DASHBOARD_HTML: &str = include_str!("dashboard.html");

async fn dashboard() -> impl IntoResponse {
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        DASHBOARD_HTML,
    )
}

async fn dashboard_data(State(d): State<Arc<Dashboard>>) -> impl IntoResponse {
    (
        [(header::CACHE_CONTROL, "no-store")],
        axum::Json(d.snapshot()),
    )
}

async fn models(State(d): State<Arc<Dashboard>>) -> axum::response::Response {
    match d.models() {
        Some(v) => ([(header::CACHE_CONTROL, "no-store")], axum::Json(v)).into_response(),
        None => (StatusCode::NOT_FOUND, "no model lineup here\n").into_response(),
    }
}

async fn healthz() -> &'static str {
    "ok\n"
}

async fn readyz(State(d): State<Arc<Dashboard>>) -> (StatusCode, &'static str) {
    if d.metrics().is_ready() {
        (StatusCode::OK, "ready\n")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready\n")
    }
}

/// The routes, for serving or testing.
pub fn router(d: Arc<Dashboard>) -> Router {
    Router::new()
        .route("/", get(dashboard))
        .route("/api/dashboard", get(dashboard_data))
        .route("/metrics", get(metrics))
        .route("/models", get(models))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .with_state(d)
}

/// At most this many connections at once: Prometheus, a few dashboards and probes need a
/// handful; a client opening more (or a slowloris) cannot exhaust the process's descriptors.
/// Connections above the limit are closed at once.
pub const MAX_CONNECTIONS: usize = 256;

/// A client must send a request's headers within this time (an idle keep-alive connection is
/// closed after it too): long enough for any real client, short enough that half-open
/// connections do not pile up.
pub const HEADER_READ_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// A connection lives at most this long, whatever it does (a dashboard reconnects).
pub const MAX_CONNECTION_AGE: std::time::Duration = std::time::Duration::from_secs(300);

/// Binds `addr` and serves until the runtime stops (sampling the dashboard's series meanwhile);
/// returns the bound address (port 0 picks one). Connections are limited in number
/// ([`MAX_CONNECTIONS`]), header time ([`HEADER_READ_TIMEOUT`]) and age ([`MAX_CONNECTION_AGE`]).
pub async fn spawn_server(addr: SocketAddr, m: Arc<Metrics>) -> std::io::Result<SocketAddr> {
    spawn_server_with(addr, m, None).await
}

/// [`spawn_server`], with the model lineup at `/models` and on the dashboard.
pub async fn spawn_server_with(
    addr: SocketAddr,
    m: Arc<Metrics>,
    models: Option<ModelsReport>,
) -> std::io::Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    let d = Arc::new(Dashboard::with_models(m, models));
    spawn_sampler(d.clone());
    tokio::spawn(serve(listener, router(d)));
    tracing::info!(%bound, "serving the dashboard (/), /metrics, /models, /healthz, /readyz");
    Ok(bound)
}

/// The accept loop: one task per connection, each holding a permit of the connection limit.
pub(crate) async fn serve(listener: tokio::net::TcpListener, app: Router) {
    let permits = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                // Out of descriptors and the like: wait a little rather than spin.
                tracing::warn!("http accept: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            tracing::debug!("http: {MAX_CONNECTIONS} connections open, closing a new one");
            continue;
        };
        let service = hyper_util::service::TowerToHyperService::new(app.clone());
        tokio::spawn(async move {
            let connection = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(HEADER_READ_TIMEOUT)
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service);
            let _ = tokio::time::timeout(MAX_CONNECTION_AGE, connection).await;
            drop(permit);
        });
    }
}
