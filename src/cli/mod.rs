//! Command-line definitions (clap) and the glue from each subcommand to the library.

mod bench;
mod compare;
pub mod config;
mod data;
mod demo;
mod evaluate;
mod replay;
mod serve;
mod simulate;
mod train;
mod validate;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

pub use bench::BenchArgs;
pub use demo::DemoArgs;
pub use evaluate::EvaluateArgs;
pub use replay::ReplayArgs;
pub use serve::ServeArgs;
pub use simulate::SimulateArgs;
pub use train::TrainArgs;
pub use validate::{SpecArgs, ValidateArgs};

/// fraudstream: streaming credit-card fraud detection with an attention-LSTM.
#[derive(Debug, Parser)]
#[command(name = "fraudstream", version, about, propagate_version = true)]
pub struct Cli {
    /// Log lines as text or one JSON object a line (any command; also FRAUDSTREAM_LOG_FORMAT).
    #[arg(long, global = true, value_enum, env = "FRAUDSTREAM_LOG_FORMAT",
          default_value_t = crate::observe::LogFormat::Text)]
    pub log_format: crate::observe::LogFormat,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// The main job with no set-up: embedded broker, simulated traffic, detector, summary.
    Demo(DemoArgs),
    /// Generate a seeded synthetic card-transaction stream with fraud (CSV or JSONL).
    Simulate(SimulateArgs),
    /// Train the attention-LSTM on a time-split file and write a model bundle.
    Train(TrainArgs),
    /// Score a labelled file with a model bundle at natural prevalence; metrics and HTML report.
    Evaluate(EvaluateArgs),
    /// Run the detector: score transactions card by card and publish alerts.
    Serve(Box<ServeArgs>),
    /// Produce a file's transactions into a Kafka topic, keyed by card, in time order.
    Replay(ReplayArgs),
    /// Measure inference and end-to-end throughput.
    Bench(BenchArgs),
    /// Check a CSV/JSONL file against a feature spec and report the first bad rows.
    Validate(ValidateArgs),
    /// Print a feature spec (a preset or a TOML file) as TOML, to start a custom one.
    Spec(SpecArgs),
}

/// The command line of this process, with `serve`'s environment variables and config file
/// applied ([`config`]).
pub fn parse() -> anyhow::Result<Cli> {
    config::parse_from(std::env::args_os().collect())
}

/// Runs the parsed command; the exit code says whether it succeeded.
pub fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Demo(args) => demo::run(args),
        Command::Simulate(args) => simulate::run(args),
        Command::Train(args) => train::run(args),
        Command::Evaluate(args) if args.model.len() == 2 => compare::run(&args),
        Command::Evaluate(args) => evaluate::run(args),
        Command::Serve(args) => serve::run(*args),
        Command::Replay(args) => replay::run(args),
        Command::Bench(args) => bench::run(args),
        Command::Validate(args) => validate::run(args),
        Command::Spec(args) => validate::print_spec(args),
    }
}

/// A progress bar on stderr that hides itself when stderr is not a terminal.
pub(crate) fn progress(len: u64, unit: &str) -> indicatif::ProgressBar {
    let bar = indicatif::ProgressBar::new(len);
    let template = format!(
        "{{prefix}} {{spinner}} [{{elapsed_precise}}] {{bar:40}} {{pos}}/{{len}} {unit} ({{per_sec}}, eta {{eta}}) {{msg}}"
    );
    bar.set_style(
        indicatif::ProgressStyle::with_template(&template)
            .expect("valid template")
            .progress_chars("=> "),
    );
    bar
}

/// An error as one line for people: each cause once. `anyhow`'s `{:#}` joins the chain with
/// ": ", and an error that already prints its source (`"reading X: {source}"`) would show that
/// source twice; a cause whose text the line already ends with is left out.
pub fn describe(err: &anyhow::Error) -> String {
    let mut line = String::new();
    for cause in err.chain() {
        let text = cause.to_string();
        if line.ends_with(&text) {
            continue;
        }
        if !line.is_empty() {
            line.push_str(": ");
        }
        line.push_str(&text);
    }
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("reading {path}: {source}")]
    struct Reading {
        path: String,
        #[source]
        source: std::io::Error,
    }

    #[test]
    fn each_cause_is_said_once() {
        let io = std::io::Error::new(std::io::ErrorKind::NotFound, "No such file or directory");
        let err = anyhow::Error::new(Reading {
            path: "x.csv".into(),
            source: io,
        })
        .context("loading x.csv");
        assert_eq!(
            describe(&err),
            "loading x.csv: reading x.csv: No such file or directory"
        );
        let plain = anyhow::anyhow!("inner").context("outer");
        assert_eq!(describe(&plain), "outer: inner");
    }
}
