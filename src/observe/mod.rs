//! Logging, Prometheus metrics, live quality from delayed labels, and the HTTP server
//! (`/metrics`, `/healthz`, `/readyz`, the dashboard at `/`).

pub mod dashboard;
pub mod http;
pub mod logfold;
pub mod metrics;
pub mod quality;

pub use dashboard::Dashboard;
pub use dashboard::ModelsReport;
pub use http::{router, spawn_server, spawn_server_with};
pub use metrics::Metrics;
pub use quality::{Joined, LiveQuality, QualitySettings, Role, Verdicts};

/// How log lines look.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines (colours on a terminal).
    #[default]
    Text,
    /// One JSON object a line: `timestamp`, `level`, `target`, `message` and the event's fields
    /// (`topic`, `partition`, `offset`, `reason`, `field`, ...) at the top level, for log
    /// pipelines to filter on.
    Json,
}

static LOG_FORMAT: std::sync::OnceLock<LogFormat> = std::sync::OnceLock::new();

/// The format [`init_logging`] chose (text before it ran): commands that print a plain line
/// (a run's summary) log it as an event instead when it is JSON, so every line parses.
pub fn log_format() -> LogFormat {
    LOG_FORMAT.get().copied().unwrap_or_default()
}

/// Logs to stderr at `RUST_LOG` (default `info`) in `format`, librdkafka's repeated lines
/// folded ([`logfold`]).
pub fn init_logging(format: LogFormat) {
    let _ = LOG_FORMAT.set(format);
    use tracing_subscriber::Layer;
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let fmt = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    let fmt = match format {
        LogFormat::Text => fmt
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .boxed(),
        LogFormat::Json => fmt
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .with_span_list(false)
            .boxed(),
    };
    // Folding sees only what the level filter lets through.
    let fmt = fmt
        .with_filter(logfold::FoldRdkafka::default())
        .with_filter(filter);
    let _ = tracing_subscriber::registry().with(fmt).try_init();
}
