//! Logging, Prometheus metrics, live quality from delayed labels, and the HTTP server
//! (`/metrics`, `/healthz`, `/readyz`, the dashboard at `/`).

pub mod dashboard;
pub mod http;
pub mod metrics;
pub mod quality;

pub use dashboard::Dashboard;
pub use http::{router, spawn_server};
pub use metrics::Metrics;
pub use quality::{Joined, LiveQuality, QualitySettings};

/// Logs to stderr at `RUST_LOG` (default `info`).
pub fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr)
        .try_init();
}
