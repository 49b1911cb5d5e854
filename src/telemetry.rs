//! Metrics: names, descriptions and the Prometheus exporter (`--metrics-listen`). The
//! `metrics` macros are no-ops until `install` runs, so code records unconditionally.
//! Also the target of the spans exported over OTLP (`otlp`), and the facts of a call
//! its log line reports.

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder};
use std::net::SocketAddr;

/// The target of the spans exported over OTLP (server, transaction, policy evaluation);
/// the log lines never show them.
pub const SPANS: &str = "lockstep::span";

/// Whether the code runs inside a call's (exported) server span: the transaction and
/// policy spans are made only there, never as roots of traces of their own (housekeeping).
pub fn in_traced_call() -> bool {
    !tracing::Span::current().is_none()
}

/// Spans handed to the OTLP exporter, by `outcome` (`exported`, `failed`).
pub const OTLP_SPANS: &str = "lockstep_otlp_spans_total";

/// Calls answered, by `service`, `method` and gRPC `code` (e.g. `OK`, `PermissionDenied`).
pub const CALLS: &str = "lockstep_calls_total";
/// Call latency from arrival to answer, by `service` and `method`.
pub const CALL_SECONDS: &str = "lockstep_call_duration_seconds";
/// Calls running now (admitted) and waiting for admission.
pub const IN_FLIGHT: &str = "lockstep_calls_in_flight";
pub const QUEUED: &str = "lockstep_calls_queued";
/// Calls answered RESOURCE_EXHAUSTED by admission (commit nothing).
pub const SHED: &str = "lockstep_calls_shed_total";
/// Decisions, by `decision` (`allow`, `deny`) and `call` (`authorize`, `commit`, `edge`).
pub const DECISIONS: &str = "lockstep_decisions_total";
/// Write calls whose transaction committed (AuthorizeAndCommit allowed).
pub const COMMITS: &str = "lockstep_commits_total";
/// Transactions run again, by `cause` (`serialization`, `deadlock`, `busy`, ...).
pub const RETRIES: &str = "lockstep_txn_retries_total";
/// Revocations committed, by `kind` (`token`, `subject`, `key`).
pub const REVOCATIONS: &str = "lockstep_revocations_total";
/// The active policy version.
pub const POLICY_VERSION: &str = "lockstep_policy_version";
/// JWKS fetches, by `outcome` (`ok`, `error`).
pub const JWKS_FETCHES: &str = "lockstep_jwks_fetches_total";
/// Token verifications, by `result`: `hit` (verified before, not verified again) or `miss`.
pub const TOKEN_CACHE: &str = "lockstep_token_cache_total";
/// 1 while the server reports SERVING (readiness), 0 while NOT_SERVING.
pub const HEALTH: &str = "lockstep_serving";
/// 1 for each reason the server is NOT_SERVING now, by `reason` (`database_unreachable`,
/// `policy_set`, `mapping`); 0 once it is gone.
pub const HEALTH_PROBLEM: &str = "lockstep_not_serving_reason";
/// PostgreSQL pool connections, by `state` (`idle`, `in_use`), and the wait for one.
pub const POOL: &str = "lockstep_db_pool_connections";
pub const POOL_WAIT_SECONDS: &str = "lockstep_db_pool_wait_seconds";
/// SQLite group commit: calls per database transaction, and the time of its fsync (COMMIT).
pub const GROUP_SIZE: &str = "lockstep_sqlite_group_size";
pub const FSYNC_SECONDS: &str = "lockstep_sqlite_fsync_seconds";

/// Starts the exporter: Prometheus text format over HTTP on `addr` (any path). Needs a
/// tokio runtime. Histograms get buckets from 100 µs to 10 s.
pub fn install(addr: SocketAddr) -> anyhow::Result<()> {
    let seconds =
        [0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0];
    let sizes = [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0];
    PrometheusBuilder::new()
        .with_http_listener(addr)
        .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), &seconds)?
        .set_buckets_for_metric(Matcher::Full(GROUP_SIZE.into()), &sizes)?
        .install()
        .map_err(|e| anyhow::anyhow!("cannot serve metrics on {addr}: {e}"))?;
    describe();
    tracing::info!(%addr, "metrics (Prometheus) on http://{addr}/metrics");
    Ok(())
}

fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram};
    describe_counter!(CALLS, "gRPC calls answered, by service, method and status code");
    describe_counter!(OTLP_SPANS, "spans handed to the OTLP exporter, by outcome (exported, failed)");
    describe_histogram!(CALL_SECONDS, metrics::Unit::Seconds, "latency of admitted calls, by method");
    describe_gauge!(IN_FLIGHT, "calls being served now");
    describe_gauge!(QUEUED, "calls waiting for admission");
    describe_counter!(SHED, "calls refused by admission control (RESOURCE_EXHAUSTED; nothing committed)");
    describe_counter!(DECISIONS, "policy decisions, by decision and call");
    describe_counter!(COMMITS, "AuthorizeAndCommit calls that committed their mutations");
    describe_counter!(RETRIES, "transactions run again, by cause");
    describe_counter!(REVOCATIONS, "revocations committed, by kind");
    describe_gauge!(POLICY_VERSION, "the active policy version");
    describe_counter!(JWKS_FETCHES, "JWKS fetches, by outcome");
    describe_counter!(TOKEN_CACHE, "token verifications by result: hit (verified before) or miss");
    describe_gauge!(HEALTH, "1 while SERVING (readiness), 0 while NOT_SERVING");
    describe_gauge!(HEALTH_PROBLEM, "1 for each reason the server is NOT_SERVING now");
    describe_gauge!(POOL, "database pool connections, by state");
    describe_histogram!(POOL_WAIT_SECONDS, metrics::Unit::Seconds, "wait for a database connection");
    describe_histogram!(GROUP_SIZE, "SQLite group commit: write calls per database transaction");
    describe_histogram!(FSYNC_SECONDS, metrics::Unit::Seconds, "SQLite group commit: time of COMMIT (fsync)");
}

/// What a call's handler learned that its log line reports (never a token, a secret or an
/// attribute value).
#[derive(Clone, Debug, Default)]
pub struct CallFacts {
    pub principal: Option<String>,
    pub action: Option<String>,
    pub resource: Option<String>,
    pub decision: Option<&'static str>,
    pub audit_seq: Option<u64>,
    pub trace_id: Option<String>,
}

tokio::task_local! {
    static CALL: std::sync::Arc<std::sync::Mutex<CallFacts>>;
}

/// Runs a call's handler with `facts` as the place `note` writes to.
pub async fn scope<F: std::future::Future>(facts: std::sync::Arc<std::sync::Mutex<CallFacts>>, f: F) -> F::Output {
    CALL.scope(facts, f).await
}

/// Notes a fact of the current call for its log line (nothing outside a call).
pub fn note(f: impl FnOnce(&mut CallFacts)) {
    let _ = CALL.try_with(|c| {
        if let Ok(mut g) = c.lock() {
            f(&mut g);
        }
    });
}

/// The trace id of the current call (W3C `traceparent`), if it came with one.
pub fn trace_id() -> Option<String> {
    CALL.try_with(|c| c.lock().ok().and_then(|g| g.trace_id.clone())).ok().flatten()
}
