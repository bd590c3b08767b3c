//! Logging, Prometheus metrics, live quality from delayed labels, and the HTTP server
//! (`/metrics`, `/healthz`, `/readyz`, the dashboard at `/`).

pub mod dashboard;
pub mod http;
pub mod logfold;
pub mod metrics;
pub mod quality;

pub use dashboard::Dashboard;
pub use http::{router, spawn_server};
pub use metrics::Metrics;
pub use quality::{Joined, LiveQuality, QualitySettings};

/// Logs to stderr at `RUST_LOG` (default `info`), librdkafka's repeated lines folded
/// ([`logfold`]).
pub fn init_logging() {
    use tracing_subscriber::Layer;
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let fmt = tracing_subscriber::fmt::layer()
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr)
        // Folding sees only what the level filter lets through.
        .with_filter(logfold::FoldRdkafka::default())
        .with_filter(filter);
    let _ = tracing_subscriber::registry().with(fmt).try_init();
}
