//! The `lockstep` command line. `serve` and `demo` run the server; `keys`, `policies`,
//! `token` and `entities` work on the database directly (bootstrap and recovery) with
//! the same validation and audit events as the Admin RPCs.

use crate::config::{Settings, StoreOptions};
use crate::engine::{CallOptions, Caller, Engine};
use crate::jwks::{self, JwksSource};
use crate::model::{KeyRecord, now_micros};
use crate::{server, store, token};
use anyhow::{Context as _, bail};
use clap::{Args, Parser, Subcommand};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

#[derive(Parser, Debug)]
#[command(
    name = "lockstep",
    version,
    about = "Authorize and commit state changes in one transaction",
    after_help = "Examples:
  lockstep demo                                       # a server with example policies, tokens and grpcurl lines
  lockstep serve --config /etc/lockstep/lockstep.toml  # options from a file (flags and env win)
  lockstep config check lockstep.toml                 # the settings serve would run with, secrets hidden
  lockstep serve --metrics-listen 127.0.0.1:9090 --log-format json
  lockstep policies validate --policies p.cedar --schema s.cedarschema
  lockstep policies put --policies p.cedar --schema s.cedarschema
  lockstep keys add --kid k1 --alg HS256 --secret-file secret.bin --issuer https://idp/
  lockstep token issue --kid k1 --sub alice --ttl 15m
Logs: LOCKSTEP_LOG=debug (an env filter); one line per call at INFO (target lockstep::call)."
)]
pub struct Cli {
    /// Configuration file (TOML): keys are serve's long option names, e.g. `listen =
    /// "0.0.0.0:50051"`. Flags and environment variables take precedence over it.
    #[arg(long, global = true, env = "LOCKSTEP_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Log lines as text, or as JSON objects (one per line).
    #[arg(long, global = true, env = "LOCKSTEP_LOG_FORMAT", default_value = "text", value_parser = ["text", "json"],
          help_heading = "Telemetry")]
    pub log_format: String,
    /// Database URL: sqlite:///abs/path.db, sqlite://relative.db or postgres://user@host:port/db.
    #[arg(
        long,
        global = true,
        env = "LOCKSTEP_DATABASE_URL",
        default_value = "sqlite://lockstep.db",
        help_heading = "Database"
    )]
    pub database: String,
    /// Mapping of Cedar entity types onto the application's own tables (TOML; see
    /// docs/mapping.md). Types it does not name stay in Lockstep's own store.
    #[arg(long, global = true, env = "LOCKSTEP_MAPPING", help_heading = "Database")]
    pub mapping: Option<PathBuf>,
    #[command(flatten)]
    pub db: DbArgs,
    #[command(subcommand)]
    pub command: Command,
}

/// Database connection settings shared by every command.
#[derive(Args, Debug, Clone)]
pub struct DbArgs {
    /// Milliseconds a call waits for the database (a pooled connection, or on SQLite its
    /// turn at the writer) before it answers UNAVAILABLE.
    #[arg(
        long,
        global = true,
        env = "LOCKSTEP_ACQUIRE_TIMEOUT_MS",
        default_value_t = 2_000,
        help_heading = "Database"
    )]
    pub acquire_timeout_ms: u64,
    /// SQLite: milliseconds to wait on a lock held by another process.
    #[arg(long, global = true, env = "LOCKSTEP_BUSY_TIMEOUT_MS", default_value_t = 5_000, help_heading = "Database")]
    pub busy_timeout_ms: u64,
    /// SQLite: group commit — concurrent write calls share one transaction and one fsync
    /// (each in its own savepoint; no call is answered before the group is durable).
    #[arg(long, global = true, env = "LOCKSTEP_SQLITE_GROUP_COMMIT", default_value_t = true, action = clap::ArgAction::Set, help_heading = "Database")]
    pub sqlite_group_commit: bool,
    /// SQLite: WAL pages after which the writer, between two groups, finishes the
    /// checkpoint that a background connection runs every 100 ms, so the WAL starts over.
    #[arg(long, global = true, env = "LOCKSTEP_SQLITE_WAL_AUTOCHECKPOINT", default_value_t = 1000,
          value_parser = clap::value_parser!(u32).range(1..), help_heading = "Database")]
    pub sqlite_wal_autocheckpoint: u32,
    /// PostgreSQL: connections in this instance's pool.
    #[arg(long, global = true, env = "LOCKSTEP_MAX_CONNECTIONS", default_value_t = 16, help_heading = "Database")]
    pub max_connections: u32,
    /// PostgreSQL: statement timeout in milliseconds (lock waits included).
    #[arg(
        long,
        global = true,
        env = "LOCKSTEP_STATEMENT_TIMEOUT_MS",
        default_value_t = 5_000,
        help_heading = "Database"
    )]
    pub statement_timeout_ms: u64,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Runs the gRPC server.
    Serve(ServeArgs),
    /// Seeds examples/quickstart (policies, schema, a demo key, entities) into the
    /// database, prints tokens and grpcurl commands, and runs the server.
    Demo(ServeArgs),
    /// Verification keys.
    #[command(subcommand)]
    Keys(KeysCommand),
    /// The policy set.
    #[command(subcommand)]
    Policies(PoliciesCommand),
    /// First-party tokens.
    #[command(subcommand)]
    Token(TokenCommand),
    /// Entities (bootstrap).
    #[command(subcommand)]
    Entities(EntitiesCommand),
    /// The mapping of entity types onto the application's tables (--mapping).
    #[command(subcommand)]
    Mapping(MappingCommand),
    /// The configuration file (--config).
    #[command(subcommand)]
    Config(ConfigCommand),
    /// Load generator: seeds an empty database, serves it in process (or drives --addr),
    /// prints throughput, p50/p99/p99.9 and errors by status code.
    Bench(BenchArgs),
}

#[derive(Args, Debug, Clone)]
pub struct BenchArgs {
    /// A running server to drive (seeded from the same --database); default: in process.
    #[arg(long)]
    pub addr: Option<SocketAddr>,
    /// Concurrent callers per phase, comma-separated.
    #[arg(long, default_value = "1,16,64", value_delimiter = ',')]
    pub callers: Vec<usize>,
    /// Seconds per phase.
    #[arg(long, default_value_t = 5)]
    pub seconds: u64,
    /// Calls to measure: commit, authorize, get, health (grpc.health.v1 Check: the floor
    /// of a unary call through the same transport, touching no database).
    #[arg(long, default_value = "commit,authorize,get", value_delimiter = ',')]
    pub calls: Vec<String>,
    /// Share of calls on the 4 hot items (0 to 1): the contention knob.
    #[arg(long, default_value_t = 0.0)]
    pub hot: f64,
    /// Distinct subjects (each owns one item).
    #[arg(long, default_value_t = 1000)]
    pub subjects: usize,
    /// Keep the users and items in tables of their own (`bench_users`, `bench_items`),
    /// mapped onto the entity types, instead of Lockstep's store (docs/mapping.md).
    #[arg(long)]
    pub mapped: bool,
    /// Open loop: start this many calls per second whatever the answers (as traffic
    /// meets an overloaded server); --callers then counts connections. Printed: the rate
    /// and latencies of the calls answered OK, every other answer by its code.
    #[arg(long, default_value_t = 0)]
    pub rate: u64,
}

#[derive(Args, Debug, Clone)]
pub struct ServeArgs {
    /// Address to listen on.
    #[arg(long, env = "LOCKSTEP_LISTEN", default_value = "127.0.0.1:50051", help_heading = "Listening and TLS")]
    pub listen: SocketAddr,
    /// Clock skew allowed on exp, nbf and iat, in seconds (at most 60).
    #[arg(long, env = "LOCKSTEP_LEEWAY_SECS", default_value_t = 30, value_parser = clap::value_parser!(u64).range(0..=60), help_heading = "Tokens")]
    pub leeway_secs: u64,
    /// Longest token lifetime accepted (`exp` this far from now at most), e.g. 24h.
    #[arg(long, env = "LOCKSTEP_MAX_TOKEN_LIFETIME", default_value = "24h", value_parser = parse_duration, help_heading = "Tokens")]
    pub max_token_lifetime: Duration,
    /// TLS certificate chain (PEM) for the listener. Without it the server speaks
    /// plaintext: fine on loopback, never across a network.
    #[arg(long, env = "LOCKSTEP_TLS_CERT", requires = "tls_key", help_heading = "Listening and TLS")]
    pub tls_cert: Option<PathBuf>,
    /// TLS private key (PEM).
    #[arg(long, env = "LOCKSTEP_TLS_KEY", requires = "tls_cert", help_heading = "Listening and TLS")]
    pub tls_key: Option<PathBuf>,
    /// CA (PEM) that client certificates must chain to: mutual TLS.
    #[arg(long, env = "LOCKSTEP_CLIENT_CA", requires = "tls_cert", help_heading = "Listening and TLS")]
    pub client_ca: Option<PathBuf>,
    /// A TLS connection that has not finished its handshake by then is closed, e.g. 10s.
    #[arg(long, env = "LOCKSTEP_TLS_HANDSHAKE_TIMEOUT", default_value = "10s", value_parser = parse_duration, help_heading = "Listening and TLS")]
    pub tls_handshake_timeout: Duration,
    /// Serve plaintext on a non-loopback address (refused without it: plaintext is for
    /// loopback; use --tls-cert/--tls-key, or a TLS-terminating proxy on the same host).
    #[arg(long, env = "LOCKSTEP_ALLOW_PLAINTEXT", help_heading = "Listening and TLS")]
    pub allow_plaintext: bool,
    /// Route map for Envoy ext_authz (envoy.service.auth.v3.Authorization/Check on the
    /// same port): JSON `{"routes": [{"method", "path": "/items/{id}", "action",
    /// "resource": {"type", "id": "{id}"}}]}`. Without it every edge check is denied.
    #[arg(long, env = "LOCKSTEP_EXT_AUTHZ_ROUTES", help_heading = "Listening and TLS")]
    pub ext_authz_routes: Option<PathBuf>,
    /// Put the determining policy ids of a denied AuthorizeAndCommit in a
    /// google.rpc.ErrorInfo detail (off by default: policy names help a caller probe).
    #[arg(long, env = "LOCKSTEP_REVEAL_POLICIES", help_heading = "Decisions")]
    pub reveal_policies: bool,
    /// An identity provider's JWKS (e.g. https://idp/.well-known/jwks.json), fetched at
    /// start, every --jwks-refresh, and on an unknown kid (at most every 30 s).
    #[arg(long, env = "LOCKSTEP_JWKS_URL", help_heading = "Tokens")]
    pub jwks_url: Option<String>,
    /// Required `iss` of tokens under the JWKS keys.
    #[arg(long, env = "LOCKSTEP_JWKS_ISSUER", default_value = "", help_heading = "Tokens")]
    pub jwks_issuer: String,
    /// Required `aud` of tokens under the JWKS keys.
    #[arg(long, env = "LOCKSTEP_JWKS_AUDIENCE", default_value = "", help_heading = "Tokens")]
    pub jwks_audience: String,
    /// Cedar type of the `sub` of tokens under the JWKS keys.
    #[arg(long, env = "LOCKSTEP_JWKS_PRINCIPAL_TYPE", default_value = "User", help_heading = "Tokens")]
    pub jwks_principal_type: String,
    /// How often the JWKS is fetched again.
    #[arg(long, env = "LOCKSTEP_JWKS_REFRESH", default_value = "5m", value_parser = parse_duration, help_heading = "Tokens")]
    pub jwks_refresh: Duration,
    /// Serve Prometheus metrics over HTTP on this address (e.g. 127.0.0.1:9090, path
    /// /metrics). Off unless given.
    #[arg(long, env = "LOCKSTEP_METRICS_LISTEN", help_heading = "Telemetry")]
    pub metrics_listen: Option<SocketAddr>,
    /// Export spans (one per call, per transaction attempt and per policy evaluation) over
    /// OTLP/gRPC to a collector, e.g. http://127.0.0.1:4317. Off unless given. A caller's
    /// W3C traceparent is their parent. OTEL_EXPORTER_OTLP_HEADERS adds request headers,
    /// OTEL_SERVICE_NAME names the service (lockstep), OTEL_BSP_* tune the batches.
    #[arg(long, env = "LOCKSTEP_OTLP_ENDPOINT", value_parser = parse_otlp_endpoint, help_heading = "Telemetry")]
    pub otlp_endpoint: Option<String>,
    /// Share of traces started here that are exported (0 to 1); a caller's traceparent
    /// decides for the traces it continues (its sampled flag).
    #[arg(long, env = "LOCKSTEP_OTLP_SAMPLE_RATIO", default_value_t = 1.0, value_parser = parse_ratio,
          help_heading = "Telemetry")]
    pub otlp_sample_ratio: f64,
    /// Calls served at once; more wait in the queue (--max-queue).
    #[arg(long, env = "LOCKSTEP_MAX_IN_FLIGHT", default_value_t = 256, help_heading = "Limits",
          value_parser = clap::value_parser!(u32).range(1..))]
    pub max_in_flight: u32,
    /// Calls waiting for one of --max-in-flight; beyond it a call is answered
    /// RESOURCE_EXHAUSTED at once (with a retry hint) and commits nothing.
    #[arg(long, env = "LOCKSTEP_MAX_QUEUE", default_value_t = 256, help_heading = "Limits")]
    pub max_queue: u32,
    /// Audit retention: events older than this (e.g. 30d) are exported to
    /// --audit-export-dir, then dropped from the database. Off unless given.
    #[arg(long, env = "LOCKSTEP_AUDIT_MAX_AGE", value_parser = parse_duration, help_heading = "Audit log",
          requires = "audit_export_dir")]
    pub audit_max_age: Option<Duration>,
    /// Audit retention: keep about this many events, the newest; older ones are exported,
    /// then dropped. Off unless given.
    #[arg(long, env = "LOCKSTEP_AUDIT_MAX_EVENTS", help_heading = "Audit log", requires = "audit_export_dir",
          value_parser = clap::value_parser!(u64).range(1..))]
    pub audit_max_events: Option<u64>,
    /// Where retention writes the events it drops, first (gzip JSON lines, one file per
    /// batch, named by their seq range). Instances of one database may share it.
    #[arg(long, env = "LOCKSTEP_AUDIT_EXPORT_DIR", help_heading = "Audit log")]
    pub audit_export_dir: Option<PathBuf>,
    /// Never drop events younger than this, whatever the limits.
    #[arg(long, env = "LOCKSTEP_AUDIT_KEEP_AT_LEAST", default_value = "60s", value_parser = parse_duration,
          help_heading = "Audit log")]
    pub audit_keep_at_least: Duration,
    /// How often retention runs.
    #[arg(long, env = "LOCKSTEP_AUDIT_RETENTION_EVERY", default_value = "10s", value_parser = parse_duration,
          help_heading = "Audit log")]
    pub audit_retention_every: Duration,
}

/// What tokens under a key must say, and whose tokens they are.
#[derive(Args, Debug, Clone)]
pub struct TokenRules {
    /// Required `iss` of tokens under the key; empty: not checked.
    #[arg(long, default_value = "")]
    pub issuer: String,
    /// Required `aud` of tokens under the key; empty: not checked.
    #[arg(long, default_value = "")]
    pub audience: String,
    /// Cedar type of the tokens' `sub`.
    #[arg(long, default_value = "User")]
    pub principal_type: String,
}

impl TokenRules {
    /// A key record carrying these rules.
    fn key(&self, kid: &str, algorithm: &str) -> KeyRecord {
        KeyRecord {
            kid: kid.to_owned(),
            algorithm: algorithm.to_owned(),
            issuer: self.issuer.clone(),
            audience: self.audience.clone(),
            principal_type: self.principal_type.clone(),
            ..KeyRecord::default()
        }
    }
}

#[derive(Subcommand, Debug)]
pub enum KeysCommand {
    /// Adds a verification key.
    Add {
        /// The key id: tokens name it in their `kid` header (never reused).
        #[arg(long)]
        kid: String,
        /// HS256, HS384, HS512, RS256, RS384, RS512, PS256, PS384, PS512, ES256, ES384, EdDSA.
        #[arg(long)]
        alg: String,
        /// HMAC secret, read as raw bytes (no trimming); at least 32 bytes.
        #[arg(long, conflicts_with = "public_key_file")]
        secret_file: Option<PathBuf>,
        /// PEM public key for RS*, PS*, ES* and EdDSA.
        #[arg(long)]
        public_key_file: Option<PathBuf>,
        #[command(flatten)]
        rules: TokenRules,
        /// Required `typ` header, e.g. at+jwt (RFC 9068).
        #[arg(long, default_value = "")]
        typ: String,
        /// Longest accepted token lifetime (exp - iat) under this key, e.g. 1h.
        #[arg(long, value_parser = parse_duration)]
        max_lifetime: Option<Duration>,
    },
    /// Imports the signing keys of a JWKS file; a later import retires keys it no longer
    /// lists (revoked keys stay revoked).
    ImportJwks {
        /// The JWKS file (JSON: `{"keys": [...]}`).
        #[arg(long)]
        file: PathBuf,
        #[command(flatten)]
        rules: TokenRules,
    },
    /// Makes a new first-party signing key; the previous one verifies until revoked.
    Rotate {
        /// The new key's id.
        #[arg(long)]
        kid: String,
        /// HS256, HS384, HS512, EdDSA, ES256 or ES384.
        #[arg(long, default_value = "EdDSA")]
        alg: String,
        #[command(flatten)]
        rules: TokenRules,
    },
    /// Lists keys (never their secrets).
    List,
    /// Revokes a key: no token signed with it is accepted afterwards.
    Revoke {
        /// The key to revoke.
        #[arg(long)]
        kid: String,
    },
}

#[derive(Subcommand, Debug)]
pub enum PoliciesCommand {
    /// Validates and activates a policy set.
    Put {
        /// The policies (.cedar).
        #[arg(long)]
        policies: PathBuf,
        /// The Cedar schema (.cedarschema): validated strictly against it.
        #[arg(long)]
        schema: Option<PathBuf>,
    },
    /// Validates a policy set (strictly, against the schema when given) without a
    /// database; prints `FILE:line:column: message` and exits non-zero when invalid.
    Validate {
        /// The policies (.cedar).
        #[arg(long)]
        policies: PathBuf,
        /// The Cedar schema (.cedarschema): validate strictly against it.
        #[arg(long)]
        schema: Option<PathBuf>,
        #[command(flatten)]
        no_database: NoDatabase,
    },
    /// Runs policy test files (*.json in DIR) against a policy set; prints a table and
    /// exits non-zero on any failure.
    Test {
        /// The directory of test files (*.json).
        dir: PathBuf,
        /// The policies (.cedar).
        #[arg(long)]
        policies: PathBuf,
        /// The Cedar schema (.cedarschema).
        #[arg(long)]
        schema: Option<PathBuf>,
        #[command(flatten)]
        no_database: NoDatabase,
    },
    /// Lists every policy version.
    History,
    /// Makes an earlier version active again (as a new version).
    Rollback {
        /// The version to make active again (see `policies history`).
        #[arg(long)]
        to: u64,
    },
    /// Prints the active policy set (its version goes to stderr).
    Get {
        /// Also write the schema to this file.
        #[arg(long)]
        schema_out: Option<PathBuf>,
    },
}

#[derive(Subcommand, Debug)]
pub enum TokenCommand {
    /// Signs a token with a first-party key (HMAC, or one made by `keys rotate`).
    Issue {
        /// The key; default: the current signing key (`keys rotate`).
        #[arg(long)]
        kid: Option<String>,
        /// The subject (`sub`): the principal's id.
        #[arg(long)]
        sub: String,
        /// Lifetime, e.g. 15m, 1h, 90s.
        #[arg(long, default_value = "15m", value_parser = parse_duration)]
        ttl: Duration,
        /// Space-separated scopes.
        #[arg(long, default_value = "")]
        scope: String,
    },
}

#[derive(Subcommand, Debug)]
pub enum MappingCommand {
    /// Checks the mapping against the database's tables and the active Cedar schema (and,
    /// on PostgreSQL, that its triggers are installed); exits non-zero on any problem.
    Check,
    /// Installs what the mapping needs in the application's tables (idempotent): on
    /// PostgreSQL the triggers that order direct writes with Lockstep's decisions, on
    /// both the triggers that bump version columns on direct updates.
    Install,
}

/// The database options, accepted but hidden (and unused) by commands that need no
/// database: their help lists only what they use. (Shadowing keeps the global options
/// from being shown there; the command line stays as it was.)
#[derive(Args, Debug, Clone, Default)]
pub struct NoDatabase {
    #[arg(long, hide = true)]
    database: Option<String>,
    #[arg(long, hide = true)]
    mapping: Option<PathBuf>,
    #[arg(long, hide = true)]
    acquire_timeout_ms: Option<u64>,
    #[arg(long, hide = true)]
    busy_timeout_ms: Option<u64>,
    #[arg(long, hide = true, action = clap::ArgAction::Set)]
    sqlite_group_commit: Option<bool>,
    #[arg(long, hide = true)]
    sqlite_wal_autocheckpoint: Option<u32>,
    #[arg(long, hide = true)]
    max_connections: Option<u32>,
    #[arg(long, hide = true)]
    statement_timeout_ms: Option<u64>,
}

#[derive(Subcommand, Debug)]
pub enum ConfigCommand {
    /// Checks a configuration file and prints the settings `lockstep serve --config FILE`
    /// would run with (the environment applied), each with where it came from; secrets
    /// redacted. Exits non-zero on an unknown key or a value serve would refuse.
    Check {
        /// The TOML file.
        file: PathBuf,
        #[command(flatten)]
        no_database: NoDatabase,
    },
}

#[derive(Subcommand, Debug)]
pub enum EntitiesCommand {
    /// Creates or replaces entities from a Cedar entities JSON file.
    Import {
        /// Cedar entities JSON (a list of `{"uid", "attrs", "parents"}`).
        #[arg(long)]
        file: PathBuf,
    },
}

/// `15m`, `1h`, `2d`, `90s`, or plain seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (num, unit) = match s.find(|c: char| !c.is_ascii_digit()) {
        Some(i) => s.split_at(i),
        None => (s, "s"),
    };
    let n: u64 = num.parse().map_err(|_| format!("`{s}` is not a duration like 15m, 1h or 90s"))?;
    let secs = match unit {
        "s" => n,
        "m" => n * 60,
        "h" => n * 3600,
        "d" => n * 86400,
        _ => return Err(format!("`{s}`: unknown unit `{unit}` (use s, m, h or d)")),
    };
    Ok(Duration::from_secs(secs))
}

fn store_options(db: &DbArgs, mapping: Arc<crate::mapping::Mapping>) -> StoreOptions {
    StoreOptions {
        mapping,
        acquire_timeout: Duration::from_millis(db.acquire_timeout_ms),
        busy_timeout: Duration::from_millis(db.busy_timeout_ms),
        group_commit: db.sqlite_group_commit,
        wal_autocheckpoint: db.sqlite_wal_autocheckpoint,
        max_connections: db.max_connections,
        statement_timeout: Duration::from_millis(db.statement_timeout_ms),
        ..StoreOptions::default()
    }
}

fn settings(args: Option<&ServeArgs>) -> Settings {
    let mut s = Settings::default();
    if let Some(a) = args {
        s.leeway_secs = a.leeway_secs;
        s.max_token_lifetime_secs = a.max_token_lifetime.as_secs();
        s.reveal_determining_policies = a.reveal_policies;
        s.max_in_flight = a.max_in_flight;
        s.max_queue = a.max_queue;
        if let Some(dir) = &a.audit_export_dir
            && (a.audit_max_age.is_some() || a.audit_max_events.is_some())
        {
            s.audit_retention = Some(crate::engine::AuditRetention {
                max_age: a.audit_max_age,
                max_events: a.audit_max_events,
                keep_at_least: a.audit_keep_at_least,
                export_dir: dir.clone(),
                every: a.audit_retention_every.max(Duration::from_secs(1)),
            });
        }
    }
    s
}

async fn engine(cli: &Cli, args: Option<&ServeArgs>) -> anyhow::Result<Arc<Engine>> {
    let mapping = match &cli.mapping {
        Some(f) => Arc::new(crate::mapping::Mapping::load(f)?),
        None => Arc::default(),
    };
    engine_mapped(cli, args, mapping).await
}

async fn engine_mapped(
    cli: &Cli,
    args: Option<&ServeArgs>,
    mapping: Arc<crate::mapping::Mapping>,
) -> anyhow::Result<Arc<Engine>> {
    server::check_crypto_provider()?;
    let store = store::open(&cli.database, &store_options(&cli.db, mapping)).await?;
    let mut sources = Vec::new();
    if let Some(a) = args
        && let Some(url) = &a.jwks_url
    {
        if !(url.starts_with("https://") || url.starts_with("http://")) {
            bail!("--jwks-url must be an http(s) URL");
        }
        sources.push(JwksSource {
            url: url.clone(),
            issuer: a.jwks_issuer.clone(),
            audience: a.jwks_audience.clone(),
            principal_type: a.jwks_principal_type.clone(),
            refresh: a.jwks_refresh,
        });
    }
    let mut engine = Engine::new(store, settings(args)).with_jwks(sources);
    if let Some(f) = args.and_then(|a| a.ext_authz_routes.as_ref()) {
        let text = std::fs::read_to_string(f).with_context(|| format!("cannot read {}", f.display()))?;
        engine = engine.with_edge_routes(crate::edge::RouteMap::parse(&text).map_err(anyhow::Error::msg)?);
    }
    Ok(Arc::new(engine))
}

/// Refuses to go on while the mapping has problems (each on its own line).
async fn require_mapping(engine: &Engine) -> anyhow::Result<()> {
    let problems = engine.mapping_problems().await?;
    if !problems.is_empty() {
        bail!(
            "the mapping (--mapping) cannot be served as it is:\n  {}\n(`lockstep mapping check` lists these; \
             `lockstep mapping install` installs missing triggers)",
            problems.join("\n  ")
        );
    }
    Ok(())
}

const OP: CallOptions = CallOptions { deadline: None };

pub async fn run(cli: Cli) -> anyhow::Result<()> {
    match &cli.command {
        Command::Serve(args) => {
            let tls = tls_options(args)?;
            check_plaintext(args, tls.is_some())?;
            if let Some(addr) = args.metrics_listen {
                crate::telemetry::install(addr)?;
            }
            let engine = engine(&cli, Some(args)).await?;
            require_mapping(&engine).await?;
            let listener = tokio::net::TcpListener::bind(args.listen)
                .await
                .with_context(|| format!("cannot listen on {}", args.listen))?;
            server::run_with(engine, listener, server::shutdown_signal(), tls).await
        }
        Command::Config(ConfigCommand::Check { file, .. }) => {
            for line in crate::config_file::check(file, &[])? {
                println!("{line}");
            }
            println!("# {}: OK", file.display());
            Ok(())
        }
        Command::Mapping(m) => {
            if cli.mapping.is_none() {
                bail!("give the mapping file: --mapping FILE (or LOCKSTEP_MAPPING)");
            }
            let engine = engine(&cli, None).await?;
            if let MappingCommand::Install = m {
                for done in engine.store().install_mapping().await? {
                    println!("installed {done}");
                }
            }
            let problems = engine.mapping_problems().await?;
            if problems.is_empty() {
                let n = engine.store().mapping().types().count();
                println!("mapping OK: {n} entity types in the application's tables");
                Ok(())
            } else {
                for p in &problems {
                    println!("{p}");
                }
                bail!("the mapping has {} problem(s)", problems.len())
            }
        }
        Command::Demo(args) => {
            let tls = tls_options(args)?;
            check_plaintext(args, tls.is_some())?;
            if let Some(addr) = args.metrics_listen {
                crate::telemetry::install(addr)?;
            }
            let engine = engine(&cli, Some(args)).await?;
            let listener = tokio::net::TcpListener::bind(args.listen)
                .await
                .with_context(|| format!("cannot listen on {}", args.listen))?;
            demo(&engine, &listener.local_addr()?).await?;
            server::run_with(engine, listener, server::shutdown_signal(), tls).await
        }
        Command::Keys(k) => {
            let engine = engine(&cli, None).await?;
            match k {
                KeysCommand::Add { kid, alg, secret_file, public_key_file, rules, typ, max_lifetime } => {
                    let secret = match secret_file {
                        Some(f) => std::fs::read(f).with_context(|| format!("cannot read {}", f.display()))?,
                        None => Vec::new(),
                    };
                    let public_key_pem = match public_key_file {
                        Some(f) => {
                            std::fs::read_to_string(f).with_context(|| format!("cannot read {}", f.display()))?
                        }
                        None => String::new(),
                    };
                    if secret.is_empty() && public_key_pem.is_empty() {
                        bail!("give --secret-file (HS*) or --public-key-file (RS*, PS*, ES*, EdDSA)");
                    }
                    let key = KeyRecord {
                        secret,
                        public_key_pem,
                        required_typ: typ.clone(),
                        max_lifetime_secs: max_lifetime.map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX)),
                        ..rules.key(kid, alg)
                    };
                    let seq = engine.add_key(Caller::Operator, key, OP).await?;
                    println!("added key {kid} (audit seq {seq})");
                }
                KeysCommand::ImportJwks { file, rules } => {
                    let text =
                        std::fs::read_to_string(file).with_context(|| format!("cannot read {}", file.display()))?;
                    let src = JwksSource {
                        issuer: rules.issuer.clone(),
                        audience: rules.audience.clone(),
                        principal_type: rules.principal_type.clone(),
                        ..JwksSource::default()
                    };
                    let (keys, skipped) = jwks::keys_from_jwks(&text, &src, "jwks-file").map_err(anyhow::Error::msg)?;
                    for s in &skipped {
                        eprintln!("skipped {s}");
                    }
                    let sync = engine.sync_jwks("jwks-file", keys).await?;
                    println!(
                        "added [{}], updated [{}], retired [{}], kept out (revoked or another source's) [{}]",
                        sync.added.join(", "),
                        sync.updated.join(", "),
                        sync.retired.join(", "),
                        sync.kept_out.join(", ")
                    );
                }
                KeysCommand::Rotate { kid, alg, rules } => {
                    let (seq, old) = engine.rotate(rules.key(kid, alg)).await?;
                    println!("{kid} ({alg}) is the signing key; verify-only: [{}] (audit seq {seq})", old.join(", "));
                }
                KeysCommand::List => {
                    println!(
                        "{:<24} {:<6} {:<8} {:<8} {:<8} {:<14} {:<24} {:<24}",
                        "KID", "ALG", "REVOKED", "RETIRED", "SIGNING", "PRINCIPAL", "ISSUER", "AUDIENCE"
                    );
                    for k in engine.list_keys(Caller::Operator, OP).await? {
                        println!(
                            "{:<24} {:<6} {:<8} {:<8} {:<8} {:<14} {:<24} {:<24}",
                            k.kid, k.algorithm, k.revoked, k.retired, k.signing, k.principal_type, k.issuer, k.audience
                        );
                    }
                }
                KeysCommand::Revoke { kid } => {
                    let seq = engine.revoke_key(Caller::Operator, kid, OP).await?;
                    println!("revoked key {kid} (audit seq {seq})");
                }
            }
            Ok(())
        }
        Command::Policies(PoliciesCommand::Validate { policies, schema, .. }) => {
            let (text, schema_text) = read_policy_files(policies, schema.as_ref())?;
            match crate::policy::compile(0, &text, &schema_text) {
                Ok(c) => {
                    let n = c.set.policies().count() + c.set.templates().count();
                    println!(
                        "{}: {n} policies valid{}",
                        policies.display(),
                        if schema.is_some() { " (strict, with schema)" } else { "" }
                    );
                    Ok(())
                }
                Err(e) => {
                    for m in &e.0 {
                        match (m.strip_prefix("schema "), schema) {
                            (Some(rest), Some(sf)) => eprintln!("{}:{rest}", sf.display()),
                            _ => eprintln!("{}:{m}", policies.display()),
                        }
                    }
                    bail!("{} error(s)", e.0.len())
                }
            }
        }
        Command::Policies(PoliciesCommand::Test { dir, policies, schema, .. }) => {
            let (text, schema_text) = read_policy_files(policies, schema.as_ref())?;
            let compiled = crate::policy::compile(0, &text, &schema_text)
                .map_err(|e| anyhow::anyhow!("{}: policies are invalid:\n{e}", policies.display()))?;
            let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
                .with_context(|| format!("cannot read {}", dir.display()))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|x| x == "json"))
                .collect();
            files.sort();
            if files.is_empty() {
                bail!("no *.json test files in {}", dir.display());
            }
            let mut outcomes = Vec::new();
            for f in &files {
                let text = std::fs::read_to_string(f).with_context(|| format!("cannot read {}", f.display()))?;
                let name = f.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
                outcomes.extend(crate::policytest::run_file(&name, &text, &compiled).map_err(anyhow::Error::msg)?);
            }
            println!("{:<6} {:<28} {:<44} {:<8} {:<8} DETERMINING", "RESULT", "FILE", "CASE", "WANT", "GOT");
            for o in &outcomes {
                println!(
                    "{:<6} {:<28} {:<44} {:<8} {:<8} {}{}",
                    if o.passed { "PASS" } else { "FAIL" },
                    o.file,
                    o.name,
                    o.expected,
                    o.got,
                    o.determining.join(","),
                    if o.note.is_empty() { String::new() } else { format!("  ({})", o.note) }
                );
            }
            let failed = outcomes.iter().filter(|o| !o.passed).count();
            println!("{} passed, {failed} failed", outcomes.len() - failed);
            if failed > 0 {
                bail!("{failed} policy test(s) failed");
            }
            Ok(())
        }
        Command::Policies(p) => {
            let engine = engine(&cli, None).await?;
            match p {
                PoliciesCommand::Validate { .. } | PoliciesCommand::Test { .. } => {}
                PoliciesCommand::History => {
                    println!("{:<8} {:<28} {:<10} {:<10}", "VERSION", "CREATED (unix s)", "POLICIES", "SCHEMA");
                    for r in engine.policy_history(Caller::Operator).await? {
                        println!(
                            "{:<8} {:<28} {:<10} {:<10}",
                            r.version,
                            r.created_at / 1_000_000,
                            r.policies.len(),
                            r.schema.len()
                        );
                    }
                }
                PoliciesCommand::Rollback { to } => {
                    let (version, seq) = engine.rollback_policies(Caller::Operator, *to).await?;
                    println!("policy version {version} active: a copy of version {to} (audit seq {seq})");
                }
                PoliciesCommand::Put { policies, schema } => {
                    let text = std::fs::read_to_string(policies)
                        .with_context(|| format!("cannot read {}", policies.display()))?;
                    let schema_text = match schema {
                        Some(s) => {
                            std::fs::read_to_string(s).with_context(|| format!("cannot read {}", s.display()))?
                        }
                        None => String::new(),
                    };
                    let (version, seq) = engine.put_policies(Caller::Operator, &text, &schema_text, false, OP).await?;
                    println!("policy version {version} active (audit seq {seq})");
                }
                PoliciesCommand::Get { schema_out } => match engine.get_policies(Caller::Operator, OP).await? {
                    Some(p) => {
                        eprintln!("policy version {}", p.version);
                        print!("{}", p.policies);
                        if let Some(f) = schema_out {
                            std::fs::write(f, &p.schema).with_context(|| format!("cannot write {}", f.display()))?;
                        }
                    }
                    None => eprintln!("no policies yet: every request is denied"),
                },
            }
            Ok(())
        }
        Command::Token(TokenCommand::Issue { kid, sub, ttl, scope }) => {
            let engine = engine(&cli, None).await?;
            let key = match kid {
                Some(kid) => engine.operator_key(kid).await?,
                None => engine.signing_key().await?,
            };
            let max = engine.settings().max_token_lifetime_secs;
            if ttl.as_secs() == 0 || ttl.as_secs() > max {
                bail!("--ttl must be between 1s and the maximum token lifetime ({max}s)");
            }
            println!("{}", token::issue(&key, sub, ttl.as_secs(), scope, now_micros() / 1_000_000)?);
            Ok(())
        }
        Command::Bench(b) => {
            if b.calls.iter().any(|c| !["commit", "authorize", "get", "health"].contains(&c.as_str()))
                || !(0.0..=1.0).contains(&b.hot)
            {
                bail!("--calls takes commit, authorize, get, health; --hot is a share from 0 to 1");
            }
            let engine = if b.mapped {
                use crate::bench::{BENCH_MAPPING, BENCH_TABLES_POSTGRES, BENCH_TABLES_SQLITE};
                crate::store::run_app_sql(&cli.database, BENCH_TABLES_SQLITE, BENCH_TABLES_POSTGRES).await?;
                let mapping = crate::mapping::Mapping::parse(BENCH_MAPPING).map_err(anyhow::Error::msg)?;
                let engine = engine_mapped(&cli, None, Arc::new(mapping)).await?;
                engine.store().install_mapping().await?;
                engine
            } else {
                engine(&cli, None).await?
            };
            let plan = crate::bench::BenchPlan {
                callers: b.callers.clone(),
                seconds: b.seconds.max(1),
                calls: b.calls.clone(),
                hot: b.hot,
                subjects: b.subjects.max(1),
                rate: b.rate,
            };
            crate::bench::run(engine, b.addr, &plan).await?;
            Ok(())
        }
        Command::Entities(EntitiesCommand::Import { file }) => {
            let engine = engine(&cli, None).await?;
            require_mapping(&engine).await?;
            let text = std::fs::read_to_string(file).with_context(|| format!("cannot read {}", file.display()))?;
            let entities = parse_entities(&text)?;
            let n = entities.len();
            let seq = engine.import_entities(entities).await?;
            println!("imported {n} entities (audit seq {seq})");
            Ok(())
        }
    }
}

/// Reads the TLS files and checks them, so that a bad file is named at start.
fn tls_options(args: &ServeArgs) -> anyhow::Result<Option<server::TlsOptions>> {
    let read = |p: &PathBuf| std::fs::read(p).with_context(|| format!("cannot read {}", p.display()));
    match (&args.tls_cert, &args.tls_key) {
        (Some(cert), Some(key)) => {
            let tls = server::TlsOptions {
                cert_pem: read(cert)?,
                key_pem: read(key)?,
                client_ca_pem: args.client_ca.as_ref().map(read).transpose()?,
                handshake_timeout: args.tls_handshake_timeout,
            };
            let ca = args.client_ca.as_ref().map(|p| p.display().to_string()).unwrap_or_default();
            let names = server::TlsSources {
                cert: &cert.display().to_string(),
                key: &key.display().to_string(),
                client_ca: &ca,
            };
            tls.check(&names).map_err(|e| anyhow::anyhow!("invalid TLS configuration: {e}"))?;
            Ok(Some(tls))
        }
        _ => Ok(None),
    }
}

/// Plaintext is for loopback: a non-loopback listener without TLS is refused unless the
/// operator says `--allow-plaintext` (then it is logged as a warning).
fn check_plaintext(args: &ServeArgs, tls: bool) -> anyhow::Result<()> {
    if tls || args.listen.ip().is_loopback() {
        return Ok(());
    }
    if !args.allow_plaintext {
        bail!(
            "refusing to serve plaintext on `{}`, which is not a loopback address: tokens would cross the network \
             in the clear; give --tls-cert and --tls-key (TLS), listen on 127.0.0.1, or pass --allow-plaintext \
             if a TLS-terminating proxy on this host is in front",
            args.listen
        );
    }
    tracing::warn!(listen = %args.listen, "serving PLAINTEXT on a non-loopback address (--allow-plaintext)");
    Ok(())
}

fn read_policy_files(policies: &PathBuf, schema: Option<&PathBuf>) -> anyhow::Result<(String, String)> {
    let text = std::fs::read_to_string(policies).with_context(|| format!("cannot read {}", policies.display()))?;
    let schema_text = match schema {
        Some(s) => std::fs::read_to_string(s).with_context(|| format!("cannot read {}", s.display()))?,
        None => String::new(),
    };
    Ok((text, schema_text))
}

pub use crate::entity_json::parse_entities;

const QUICKSTART_POLICIES: &str = include_str!("../examples/quickstart/policies.cedar");
const QUICKSTART_SCHEMA: &str = include_str!("../examples/quickstart/schema.cedarschema");
const QUICKSTART_ENTITIES: &str = include_str!("../examples/quickstart/entities.json");

/// Seeds the quickstart (once per database) and prints tokens and grpcurl commands.
async fn demo(engine: &Engine, addr: &SocketAddr) -> anyhow::Result<()> {
    if engine.get_policies(Caller::Operator, OP).await?.is_none() {
        engine.put_policies(Caller::Operator, QUICKSTART_POLICIES, QUICKSTART_SCHEMA, false, OP).await?;
        engine.import_entities(parse_entities(QUICKSTART_ENTITIES)?).await?;
    }
    let key = match engine.operator_key("demo").await {
        Ok(k) => k,
        Err(_) => {
            let key = KeyRecord {
                kid: "demo".into(),
                algorithm: "HS256".into(),
                secret: rand::random::<[u8; 32]>().to_vec(),
                public_key_pem: String::new(),
                issuer: "lockstep-demo".into(),
                audience: String::new(),
                principal_type: "User".into(),
                ..KeyRecord::default()
            };
            engine.add_key(Caller::Operator, key, OP).await?;
            engine.operator_key("demo").await?
        }
    };
    let now = now_micros() / 1_000_000;
    let alice = token::issue(&key, "alice", 3600, "items:write", now)?;
    let bob = token::issue(&key, "bob", 3600, "", now)?;
    let carol = token::issue(&key, "carol", 3600, "", now)?;
    let a = addr.to_string();
    println!(
        r#"
Lockstep demo: quickstart policies, schema and entities are in the database.
Tokens (HS256, key `demo`, valid 1 hour):

  export ALICE='{alice}'
  export BOB='{bob}'
  export CAROL='{carol}'

alice owns Item::"doc1". Try, in another terminal:

# 1. allowed: alice updates her item
grpcurl -plaintext -H "authorization: Bearer $ALICE" -d '{{"mutations":[{{"action":"UpdateItem","resource":{{"type":"Item","id":"doc1"}},"update":{{"merge_patch":{{"title":"Hello"}}}}}}]}}' {a} lockstep.v1.Lockstep/AuthorizeAndCommit

# 2. denied (PermissionDenied): bob is not the owner
grpcurl -plaintext -H "authorization: Bearer $BOB" -d '{{"mutations":[{{"action":"UpdateItem","resource":{{"type":"Item","id":"doc1"}},"update":{{"merge_patch":{{"title":"Mine now"}}}}}}]}}' {a} lockstep.v1.Lockstep/AuthorizeAndCommit

# 3. alice logs out (revokes the token of this very call)
grpcurl -plaintext -H "authorization: Bearer $ALICE" -d '{{}}' {a} lockstep.v1.Lockstep/RevokeToken

# 4. refused (Unauthenticated): the same write with the revoked token
grpcurl -plaintext -H "authorization: Bearer $ALICE" -d '{{"mutations":[{{"action":"UpdateItem","resource":{{"type":"Item","id":"doc1"}},"update":{{"merge_patch":{{"title":"After logout"}}}}}}]}}' {a} lockstep.v1.Lockstep/AuthorizeAndCommit

# the audit log (carol is an admin)
grpcurl -plaintext -H "authorization: Bearer $CAROL" -d '{{}}' {a} lockstep.v1.Lockstep/ListAuditEvents
"#
    );
    Ok(())
}

/// An OTLP/gRPC collector address: `http://host:port` (no TLS towards the collector).
fn parse_otlp_endpoint(s: &str) -> Result<String, String> {
    let uri: http::Uri = s.parse().map_err(|e| format!("not a URL: {e}"))?;
    if uri.scheme_str() != Some("http") || uri.host().is_none() || (uri.port().is_some() && uri.port_u16().is_none()) {
        return Err("give http://HOST:PORT of an OTLP/gRPC collector, e.g. http://127.0.0.1:4317 (TLS towards \
                    the collector is not built in: run the collector or its agent beside Lockstep)"
            .into());
    }
    Ok(s.to_owned())
}

/// A fraction from 0 to 1.
fn parse_ratio(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(r) if (0.0..=1.0).contains(&r) => Ok(r),
        _ => Err(format!("`{s}`: give a fraction from 0 to 1, e.g. 0.1")),
    }
}
