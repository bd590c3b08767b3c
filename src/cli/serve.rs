//! `fraudstream serve`: Kafka mode (`--brokers`) or embedded mode (`--input`).

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use candle_core::Device;
use clap::Args;

use crate::features::DEFAULT_LABEL_DELAY;
use crate::features::StateLimits;
use crate::model::Bundle;
use crate::observe::{Metrics, ModelsReport, QualitySettings, Role, spawn_server_with};
use crate::schema::{Format, Span, StateScope};
use crate::state::cache::{DEFAULT_FLUSH_INTERVAL, MAX_FLUSH_INTERVAL};
use crate::stream::file::{Endpoint, FileSink, FileSource};
use crate::stream::kafka::{CLOSE_TIMEOUT, DEFAULT_TRANSACTION_INTERVAL, KafkaSettings, run_kafka};
use crate::stream::rollout::{Rollout, spawn_admin};
use crate::stream::{
    BatchSettings, DEFAULT_MAX_DEAD_LETTER_PAYLOAD_BYTES, DEFAULT_MAX_FUTURE_SKEW,
    DEFAULT_MAX_MESSAGE_BYTES, DEFAULT_MAX_PAST_AGE, Detector, DetectorSettings, TimeLimits,
};

/// Options of `serve`.
#[derive(Debug, Args)]
pub struct ServeArgs {
    /// A TOML file of these settings (keys: the long flag names; `[kafka]` a table of
    /// librdkafka settings). Precedence: flags > FRAUDSTREAM_* environment > this file >
    /// defaults; an unknown key is an error. Example: deploy/fraudstream.toml.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Model bundle directory (default: the built-in `models/default`).
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Scoring arithmetic: f32, bf16 matrix products (CPUs with AVX512_BF16) or int8 products
    /// of hidden states (CPUs with AVX-512 BW); both faster, scores differ slightly: see the
    /// README's measurements.
    #[arg(long, value_enum, default_value_t = crate::model::Precision::F32)]
    pub precision: crate::model::Precision,
    /// A shadow challenger bundle: it scores the same windows in the same batches, its scores
    /// go to the scores topic tagged `challenger`, it never alerts; live precision and recall
    /// per model on /metrics, /models and the dashboard. Same features as --model (another
    /// scaler or a shorter window is fine).
    #[arg(long)]
    pub challenger: Option<PathBuf>,
    /// Load a bundle written into the --model (or --challenger) directory while running: it is
    /// verified beside the running one and swapped in between batches, card state kept; a
    /// corrupt or incompatible bundle is refused and the running one keeps scoring. SIGHUP
    /// reloads both directories whether or not this is set.
    #[arg(long)]
    pub watch_model: bool,
    /// With --watch-model: seconds between looks at the model directories.
    #[arg(long, default_value_t = 5.0)]
    pub watch_interval_s: f64,
    /// Serve the admin endpoints here (POST /admin/model, POST|DELETE /admin/challenger, POST
    /// /admin/promote, GET /admin/models). Off by default: whoever reaches it can change the
    /// model, so bind it to a private address.
    #[arg(long)]
    pub admin_addr: Option<std::net::SocketAddr>,
    /// Embedded mode: transactions from `file:PATH` (JSONL or CSV) or `-` (JSONL on stdin).
    #[arg(long, conflicts_with = "brokers", required_unless_present = "brokers")]
    pub input: Option<Endpoint>,
    /// Kafka mode: bootstrap servers (`host:port,...`).
    #[arg(long)]
    pub brokers: Option<String>,
    /// Kafka consumer group.
    #[arg(long, default_value = "fraudstream")]
    pub group: String,
    /// Static group membership: this member's stable `group.instance.id` (e.g. the pod name).
    /// A member restarted within the session timeout gets its partitions back without a
    /// rebalance, so the others are not disturbed and its cards need no restore elsewhere.
    #[arg(long, env = "FRAUDSTREAM_INSTANCE_ID")]
    pub instance_id: Option<String>,
    /// Exactly-once: alerts, scores, dead letters and changelog records, and the input offsets
    /// they consumed, are written in one Kafka transaction (readers of the output topics with
    /// isolation.level=read_committed see each output once, even across a crash). Default:
    /// at-least-once.
    #[arg(long, conflicts_with = "input")]
    pub exactly_once: bool,
    /// Exactly-once: commit a transaction at least this often (milliseconds); also when idle.
    #[arg(long, default_value_t = DEFAULT_TRANSACTION_INTERVAL.as_millis() as u64)]
    pub transaction_interval_ms: u64,
    /// With --changelog-topic: keep a local snapshot of the card store in this directory
    /// (written every --snapshot-interval-s and at shutdown, atomically), so a restart reads only
    /// the changelog written since; a corrupt, stale or other model's snapshot is ignored.
    #[arg(long, requires = "changelog_topic")]
    pub state_dir: Option<PathBuf>,
    /// Seconds between snapshots with --state-dir.
    #[arg(long, default_value_t = 60.0)]
    pub snapshot_interval_s: f64,
    /// Kafka topic of transactions (JSON).
    #[arg(long, default_value = "transactions")]
    pub input_topic: String,
    /// Kafka topic for alerts (keyed by card id).
    #[arg(long, default_value = "alerts")]
    pub alerts_topic: String,
    /// Kafka topic for every score (optional).
    #[arg(long)]
    pub scores_topic: Option<String>,
    /// Kafka topic for dead letters (optional; they are always counted and logged).
    #[arg(long)]
    pub dead_letter_topic: Option<String>,
    /// Kafka topic where each card's state is written after it changes (compacted, keyed by
    /// card, with as many partitions as the input topic): the cards of newly assigned
    /// partitions are restored from it before their records are scored, so a restart, crash or
    /// rebalance does not empty their windows.
    #[arg(long, conflicts_with = "input")]
    pub changelog_topic: Option<String>,
    /// With --changelog-topic: a card's changes within this many milliseconds are coalesced into
    /// one changelog record (0: one record per transaction; at most 1000). Input offsets are
    /// committed only at these flushes.
    #[arg(long, default_value_t = DEFAULT_FLUSH_INTERVAL.as_millis() as u64,
          value_parser = clap::value_parser!(u64).range(0..=MAX_FLUSH_INTERVAL.as_millis() as u64))]
    pub changelog_flush_ms: u64,
    /// Kafka topic of fraud labels, JSON `{transaction_id, is_fraud, labelled_at}`, joined to
    /// remembered scores for live precision and recall (inline labels always count).
    #[arg(long, conflicts_with = "input")]
    pub labels_topic: Option<String>,
    /// Remember scores for labels for this many seconds (default one day).
    #[arg(long, default_value_t = QualitySettings::DEFAULT_TTL_MS / 1000)]
    pub label_ttl_s: u64,
    /// Remember at most this many scores for labels (the oldest are forgotten first).
    #[arg(long, default_value_t = QualitySettings::DEFAULT_MAX_SCORES)]
    pub max_remembered_scores: usize,
    /// Any librdkafka setting, `key=value`, applied last (SASL, TLS, timeouts); repeatable.
    #[arg(long = "kafka", value_parser = crate::stream::kafka::parse_kafka_setting)]
    pub kafka: Vec<(String, String)>,
    /// Input format; by default from the file extension (stdin: JSONL).
    #[arg(long, value_enum)]
    pub format: Option<Format>,
    /// Embedded mode: where alerts go, as JSONL: `file:PATH` or `-` (stdout).
    #[arg(long, default_value = "-")]
    pub output: Endpoint,
    /// Embedded mode: also write every score, as JSONL.
    #[arg(long)]
    pub scores_output: Option<Endpoint>,
    /// Embedded mode: write dead letters (bad records) as JSONL.
    #[arg(long)]
    pub dead_letter_output: Option<Endpoint>,
    /// Score a batch when this many windows wait...
    #[arg(long, default_value_t = BatchSettings::DEFAULT_MAX_BATCH)]
    pub max_batch: usize,
    /// ...or when the oldest has waited this long (milliseconds). 0: adaptive, score at once
    /// whatever waits when the scorer is free (large batches form by themselves under load).
    #[arg(long, default_value_t = BatchSettings::DEFAULT_MAX_WAIT_MS)]
    pub max_wait_ms: u64,
    /// Capacity of the queues between stages (back-pressure beyond it).
    #[arg(long, default_value_t = BatchSettings::DEFAULT_QUEUE)]
    pub queue: usize,
    /// Keep at most this many cards' windows; the least recently seen beyond it are evicted.
    #[arg(long, default_value_t = StateLimits::DEFAULT_MAX_CARDS)]
    pub max_cards: usize,
    /// Evict a card not seen for this many seconds (default 30 days).
    #[arg(long, default_value_t = StateLimits::DEFAULT_IDLE_TTL_MS / 1000)]
    pub card_ttl_s: u64,
    /// Serve the dashboard (/), /metrics (Prometheus), /healthz and /readyz on this address.
    #[arg(long, default_value = "127.0.0.1:9898")]
    pub http: std::net::SocketAddr,
    /// Before consuming, replay this labelled file (CSV or JSONL in the model's spec) into the
    /// card windows and label-rate tables, as if the detector had seen it: the history a fresh
    /// deployment lacks.
    #[arg(long)]
    pub warm_from: Option<PathBuf>,
    /// With --warm-from: labels without a `labelled_at` count as known this long after their
    /// transaction.
    #[arg(long, default_value_t = DEFAULT_LABEL_DELAY)]
    pub warm_label_delay: Span,
    /// Larger messages are dead-lettered without parsing.
    #[arg(long, default_value_t = DEFAULT_MAX_MESSAGE_BYTES)]
    pub max_message_bytes: usize,
    /// On SIGTERM/SIGINT, drain (score, publish, acknowledge and commit what was read) for at
    /// most this many seconds; then exit with code 2, naming what was abandoned (its offsets are
    /// not committed: it is read again after a restart).
    #[arg(long, default_value_t = BatchSettings::DEFAULT_DRAIN_TIMEOUT_S as f64)]
    pub shutdown_timeout_s: f64,
    /// A dead letter carries at most this many bytes of its message (with the whole message's
    /// size and SHA-256), so that it fits under the broker's message limit.
    #[arg(long, default_value_t = DEFAULT_MAX_DEAD_LETTER_PAYLOAD_BYTES)]
    pub max_dead_letter_payload_bytes: usize,
    /// Dead-letter (`ts_out_of_range`) an event time further than this ahead of both its
    /// partition's watermark (the latest event time accepted from it) and the wall clock.
    #[arg(long, default_value_t = DEFAULT_MAX_FUTURE_SKEW)]
    pub max_future_skew: Span,
    /// Dead-letter (`ts_out_of_range`) an event time further than this behind its partition's
    /// watermark. Historical replays work: the watermark is the stream's own time.
    #[arg(long, default_value_t = DEFAULT_MAX_PAST_AGE)]
    pub max_past_age: Span,
}

impl ServeArgs {
    /// Validates the flags into the detector's and the batcher's settings.
    fn settings(&self) -> anyhow::Result<(DetectorSettings, BatchSettings)> {
        anyhow::ensure!(
            self.max_batch > 0 && self.queue > 0,
            "--max-batch and --queue must be positive"
        );
        anyhow::ensure!(self.max_cards > 0, "--max-cards must be positive");
        anyhow::ensure!(
            self.shutdown_timeout_s.is_finite() && self.shutdown_timeout_s >= 0.0,
            "--shutdown-timeout-s must be a number of seconds"
        );
        let detector = DetectorSettings {
            max_message_bytes: self.max_message_bytes,
            max_dead_letter_payload_bytes: self.max_dead_letter_payload_bytes,
            limits: StateLimits {
                max_cards: self.max_cards,
                idle_ttl_ms: self.card_ttl_s.saturating_mul(1000),
            },
            quality: QualitySettings {
                // Scores are remembered for labels only when a labels topic brings them.
                max_scores: if self.labels_topic.is_some() {
                    self.max_remembered_scores
                } else {
                    0
                },
                ttl_ms: i64::try_from(self.label_ttl_s.saturating_mul(1000)).unwrap_or(i64::MAX),
                ..QualitySettings::default()
            },
            time: TimeLimits {
                max_future_skew: self.max_future_skew,
                max_past_age: self.max_past_age,
            },
            changelog: self.changelog_topic.is_some(),
        };
        let batch = BatchSettings {
            max_batch: self.max_batch,
            max_wait: Duration::from_millis(self.max_wait_ms),
            queue: self.queue,
            drain_timeout: Duration::from_secs_f64(self.shutdown_timeout_s),
        };
        Ok((detector, batch))
    }
}

/// Replays a labelled history file into the detector's state.
fn warm(
    detector: &Detector,
    path: &std::path::Path,
    format: Option<Format>,
    label_delay: Span,
) -> anyhow::Result<()> {
    let began = std::time::Instant::now();
    let txs = super::data::load_sorted(path, format, detector.spec())?;
    let (transactions, labels) = detector.warm(&txs, label_delay);
    detector.sync_card_metrics();
    tracing::info!(
        transactions,
        labels,
        cards = detector.cards(),
        seconds = began.elapsed().as_secs_f64(),
        file = %path.display(),
        "state warmed from history"
    );
    Ok(())
}

/// Resolves on SIGINT or SIGTERM.
pub(crate) async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = term => {},
    }
    tracing::info!("shutdown requested: draining");
}

/// How long past `--shutdown-timeout-s` the rest of a shutdown (closing the Kafka clients,
/// stopping the runtime) may take before the watchdog ends the process.
const EXIT_GRACE: Duration = Duration::from_secs(3);

/// How long the runtime's remaining tasks may take to stop once the run has ended.
const RUNTIME_STOP: Duration = Duration::from_secs(2);

/// [`shutdown_signal`], after which the process is held to `limit`: see [`arm_exit_watchdog`].
async fn shutdown_within(limit: Duration) {
    shutdown_signal().await;
    arm_exit_watchdog(limit, || std::process::exit(2));
}

/// The last line of defence of `--shutdown-timeout-s`: every step of a shutdown has its own
/// bound (the drain, the final commit, closing the clients), and this thread calls `exit` if the
/// process is still there `limit` after the signal anyway - a client stuck in a call that
/// takes no timeout must not keep a detector that was asked to stop (an orchestrator then
/// kills it without a word). What was acknowledged is committed by then or read again
/// (at-least-once).
fn arm_exit_watchdog(limit: Duration, exit: impl FnOnce() + Send + 'static) {
    let armed = std::thread::Builder::new()
        .name("shutdown-watchdog".into())
        .spawn(move || {
            std::thread::sleep(limit);
            tracing::error!(
                "shutdown still running {:.0}s after the signal (--shutdown-timeout-s, then {}s \
                 to close the clients and {}s to stop): exiting with code 2; the last steps \
                 logged above say where it stopped",
                limit.as_secs_f64(),
                CLOSE_TIMEOUT.as_secs(),
                EXIT_GRACE.as_secs()
            );
            exit();
        });
    if let Err(e) = armed {
        tracing::warn!("no shutdown watchdog: {e}");
    }
}

pub(crate) fn run(args: ServeArgs) -> anyhow::Result<ExitCode> {
    crate::model::set_precision(args.precision).map_err(anyhow::Error::msg)?;
    let effective = super::config::effective();
    if !effective.is_empty() {
        let line = effective
            .iter()
            .map(|s| format!("{}={} ({})", s.name, s.value, s.source))
            .collect::<Vec<_>>()
            .join(" ");
        tracing::info!(settings = %line, "configuration (flags > environment > file > defaults; secrets redacted)");
    }
    let (settings, batch) = args.settings()?;
    let exit_limit = batch.drain_timeout + CLOSE_TIMEOUT + EXIT_GRACE;
    let bundle = Bundle::load_or_default(args.model.as_deref(), &Device::Cpu)
        .context("loading the model")?;
    tracing::info!(
        model = %bundle.manifest.name,
        version = %bundle.manifest.version,
        threshold = bundle.threshold(),
        "model loaded"
    );
    anyhow::ensure!(
        args.watch_interval_s.is_finite() && args.watch_interval_s > 0.0,
        "--watch-interval-s must be a positive number of seconds"
    );
    let metrics = Arc::new(Metrics::new(prometheus::Registry::new())?);
    let detector = Arc::new(Detector::new(&bundle, settings, metrics.clone()));
    let rollout = Arc::new(Rollout::new(detector.clone(), args.model.clone()));
    if let Some(dir) = &args.challenger {
        rollout
            .load(Role::Challenger, dir)
            .map_err(anyhow::Error::msg)
            .context("loading the challenger")?;
    }
    if let Some(path) = &args.warm_from {
        warm(&detector, path, args.format, args.warm_label_delay)?;
    }
    if detector.spec().needs(StateScope::Labels)
        && args.labels_topic.is_none()
        && args.warm_from.is_none()
    {
        tracing::warn!(
            "the model has label-rate features but no --labels-topic or --warm-from: \
             they read empty tables (no fraud known anywhere)"
        );
    }
    let rt = tokio::runtime::Runtime::new()?;
    let _runtime = rt.enter();
    if args.watch_model {
        if args.model.is_none() && args.challenger.is_none() {
            tracing::warn!(
                "--watch-model without --model or --challenger: the built-in model has no directory to watch"
            );
        }
        rollout.spawn_watch(Duration::from_secs_f64(args.watch_interval_s));
    }
    #[cfg(unix)]
    rollout.spawn_sighup().context("listening for SIGHUP")?;
    if let Some(addr) = args.admin_addr {
        rt.block_on(spawn_admin(addr, rollout.clone()))
            .with_context(|| format!("serving the admin endpoints on {addr}"))?;
    }
    let report = rollout.clone();
    let models: ModelsReport = Arc::new(move || report.report());
    // On Kafka the metrics endpoint is how the detector is watched: failing to serve it is an
    // error. A file run goes on without it.
    match (
        rt.block_on(spawn_server_with(args.http, metrics, Some(models))),
        &args.brokers,
    ) {
        (Ok(_), _) => {}
        (Err(e), Some(_)) => anyhow::bail!("serving HTTP on {}: {e}", args.http),
        (Err(e), None) => tracing::warn!("not serving HTTP on {}: {e}", args.http),
    }
    let stats = match (args.input, args.brokers) {
        (Some(input), _) => {
            let sink = FileSink::create(
                &args.output,
                args.scores_output.as_ref(),
                args.dead_letter_output.as_ref(),
            )
            .context("opening the outputs")?;
            let source = rt.block_on(async { FileSource::open(&input, args.format) })?;
            detector.metrics().set_ready(true);
            rt.block_on(crate::stream::run(
                detector,
                source,
                sink,
                batch,
                shutdown_within(exit_limit),
                |_| {},
            ))
        }
        (None, Some(brokers)) => {
            let settings = KafkaSettings {
                brokers,
                group: args.group,
                input_topic: args.input_topic,
                alerts_topic: args.alerts_topic,
                scores_topic: args.scores_topic,
                dead_letter_topic: args.dead_letter_topic,
                labels_topic: args.labels_topic,
                changelog_topic: args.changelog_topic,
                changelog_flush: Duration::from_millis(args.changelog_flush_ms),
                instance_id: args.instance_id,
                state_dir: args.state_dir.map(|d| {
                    (
                        d,
                        Duration::from_secs_f64(args.snapshot_interval_s.max(0.1)),
                    )
                }),
                exactly_once: args
                    .exactly_once
                    .then(|| Duration::from_millis(args.transaction_interval_ms)),
                extra: super::config::file_kafka()
                    .iter()
                    .cloned()
                    .chain(args.kafka)
                    .collect(),
                batch,
                on_assigned: None,
            };
            tracing::info!(brokers = %settings.brokers, group = %settings.group, topic = %settings.input_topic, "consuming");
            rt.block_on(run_kafka(
                detector,
                settings,
                shutdown_within(exit_limit),
                |_| {},
            ))
        }
        (None, None) => anyhow::bail!("give --input (embedded mode) or --brokers (Kafka mode)"),
    };
    let stats = match stats {
        Ok(stats) => stats,
        Err(e) => {
            // Tasks may still wait on an unreachable broker (or a blocked stdin): do not wait
            // for them on the way out.
            rt.shutdown_background();
            return Err(e.into());
        }
    };
    // Tasks left (the HTTP server, signal listeners) get a bounded time to stop: dropping the
    // runtime would wait for its blocking threads without limit.
    rt.shutdown_timeout(RUNTIME_STOP);
    match crate::observe::log_format() {
        crate::observe::LogFormat::Text => eprintln!("{}", stats.summary()),
        crate::observe::LogFormat::Json => tracing::info!(
            scored = stats.scored,
            alerts = stats.alerts,
            dead_lettered = stats.invalid,
            "{}",
            stats.summary()
        ),
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_exit_watchdog_fires_once_its_limit_has_passed_and_not_before() {
        let (tx, rx) = std::sync::mpsc::channel();
        let armed = std::time::Instant::now();
        arm_exit_watchdog(Duration::from_millis(300), move || {
            let _ = tx.send(armed.elapsed());
        });
        let fired = rx
            .recv_timeout(Duration::from_secs(30))
            .expect("the watchdog fired");
        assert!(fired >= Duration::from_millis(300), "{fired:?}");
    }
}
