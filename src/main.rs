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
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    // The OTLP exporter's gRPC channel runs on the runtime: start it inside.
    let export = {
        let _inside = runtime.enter();
        match logging(&cli) {
            Ok(export) => export,
            Err(e) => {
                eprintln!("error: {e:#}");
                return std::process::ExitCode::FAILURE;
            }
        }
    };
    let outcome = runtime.block_on(lockstep::cli::run(cli));
    if let Some(export) = export {
        export.shutdown();
    }
    match outcome {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// Log lines to stderr (text, or JSON objects), filtered by LOCKSTEP_LOG; and, when `serve`
/// or `demo` is given --otlp-endpoint, spans to an OTLP collector (only the spans of
/// `telemetry::SPANS`, never a log line; the log never shows those spans).
fn logging(cli: &lockstep::cli::Cli) -> anyhow::Result<Option<lockstep::otlp::Export>> {
    use lockstep::cli::Command;
    use lockstep::telemetry::SPANS;
    use tracing_subscriber::filter::{FilterExt as _, Targets, filter_fn};
    use tracing_subscriber::prelude::*;

    // `bench` measures the server, not its access log: the per-call lines are off there
    // unless LOCKSTEP_LOG asks for them.
    let default_filter = if matches!(cli.command, Command::Bench(_)) { "info,lockstep::call=off" } else { "info" };
    let filter = tracing_subscriber::EnvFilter::try_from_env("LOCKSTEP_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_filter));
    let fmt = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    let fmt: Box<dyn tracing_subscriber::Layer<tracing_subscriber::Registry> + Send + Sync> =
        if cli.log_format == "json" {
            // One JSON object per line: time, level, target and the event's fields at the top.
            Box::new(fmt.json().flatten_event(true).with_current_span(false).with_span_list(false))
        } else {
            // Colour only for a person at a terminal: never escape codes in a log file.
            Box::new(fmt.with_ansi(std::io::stderr().is_terminal()))
        };
    let fmt = fmt.with_filter(filter.and(filter_fn(|m| m.target() != SPANS)));

    let endpoint = match &cli.command {
        Command::Serve(a) | Command::Demo(a) => a.otlp_endpoint.as_deref().map(|e| (e, a.otlp_sample_ratio)),
        _ => None,
    };
    let export = endpoint.map(|(e, ratio)| lockstep::otlp::Export::start(e, ratio)).transpose()?;
    let spans = export.as_ref().map(|e| {
        tracing_opentelemetry::layer()
            .with_tracer(e.tracer())
            .with_threads(false)
            .with_filter(Targets::new().with_target(SPANS, tracing::Level::INFO))
    });
    // No span layer at all without the exporter: an absent (`None`) layer would tell the
    // registry it wants every callsite, and each call would build its three spans for
    // nothing (a tenth of a decision's CPU in the server).
    let registry = tracing_subscriber::registry().with(fmt);
    match spans {
        Some(spans) => registry.with(spans).init(),
        None => registry.init(),
    }
    if let Some((endpoint, _)) = endpoint {
        tracing::info!(endpoint = %lockstep::config_file::redact_url(endpoint), "spans exported over OTLP");
    }
    Ok(export)
}
