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

use super::dashboard::{Dashboard, spawn_sampler};
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
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .with_state(d)
}

/// Binds `addr` and serves until the runtime stops (sampling the dashboard's series meanwhile);
/// returns the bound address (port 0 picks one).
pub async fn spawn_server(addr: SocketAddr, m: Arc<Metrics>) -> std::io::Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    let d = Arc::new(Dashboard::new(m));
    spawn_sampler(d.clone());
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, router(d)).await {
            tracing::error!("http server: {e}");
        }
    });
    tracing::info!(%bound, "serving the dashboard (/), /metrics, /healthz, /readyz");
    Ok(bound)
}
