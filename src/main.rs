//! The `lockstep` binary: parse the command line, set up tracing, run.

use clap::Parser;
use std::io::IsTerminal;

/// mimalloc: glibc's allocator serialized the server's threads on its arena locks
/// (perf: allocation and its futex waits were about a quarter of a call's CPU).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    // The configuration file's values join the command line where neither a flag nor the
    // environment set an option (config_file.rs); an unknown key fails here, naming it.
    let argv = match lockstep::config_file::argv_with_config(std::env::args_os().collect()) {
        Ok(argv) => argv,
        Err(e) => {
            eprintln!("error: {e:#}");
            return std::process::ExitCode::from(2);
        }
    };
    let cli = lockstep::cli::Cli::parse_from(argv);
    // `bench` measures the server, not its access log: the per-call lines are off there
    // unless LOCKSTEP_LOG asks for them.
    let default_filter =
        if matches!(cli.command, lockstep::cli::Command::Bench(_)) { "info,lockstep::call=off" } else { "info" };
    let logs = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("LOCKSTEP_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_filter)),
        )
        .with_writer(std::io::stderr);
    if cli.log_format == "json" {
        // One JSON object per line: time, level, target and the event's fields at the top.
        logs.json().flatten_event(true).with_current_span(false).with_span_list(false).init();
    } else {
        // Colour only for a person at a terminal: never escape codes in a log file.
        logs.with_ansi(std::io::stderr().is_terminal()).init();
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match runtime.block_on(lockstep::cli::run(cli)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
