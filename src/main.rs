//! The `fraudstream` binary: parse the command line, run it, map errors to exit codes.

use std::process::ExitCode;

fn main() -> ExitCode {
    tune_runtime();
    let cli = match fraudstream::cli::parse() {
        Ok(cli) => cli,
        Err(err) => {
            eprintln!("error: {}", fraudstream::cli::describe(&err));
            return ExitCode::from(2);
        }
    };
    fraudstream::observe::init_logging(cli.log_format);
    match fraudstream::cli::run(cli) {
        Ok(code) => code,
        Err(err) => {
            eprintln!("error: {}", fraudstream::cli::describe(&err));
            ExitCode::from(2)
        }
    }
}

/// Process-wide settings that make the model's many short-lived tensors cheap, set before any
/// thread starts.
fn tune_runtime() {
    // candle splits each small matrix op across a rayon pool; on these sizes the hand-off costs
    // more than it gains, and training runs its own two threads instead.
    if std::env::var_os("RAYON_NUM_THREADS").is_none() {
        // SAFETY: called first thing in main, before any other thread exists.
        unsafe { std::env::set_var("RAYON_NUM_THREADS", "1") };
    }
    // glibc maps, unmaps and trims memory for every large tensor by default; growing the heap in
    // big steps and keeping freed memory made training ~1.5x faster here (system time ~0).
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator thresholds.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 512 << 20);
        libc::mallopt(libc::M_TOP_PAD, 256 << 20);
    }
}
