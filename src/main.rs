//! The `fraudstream` binary: parse the command line, run it, map errors to exit codes.

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    fraudstream::observe::init_logging();
    let cli = fraudstream::cli::Cli::parse();
    match fraudstream::cli::run(cli) {
        Ok(code) => code,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::from(2)
        }
    }
}
