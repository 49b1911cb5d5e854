//! Typed settings: limits, token rules and database options, with their defaults.

use std::time::Duration;

/// How the store talks to its database.
#[derive(Clone, Debug)]
pub struct StoreOptions {
    /// How long a call waits for a database connection (or, on SQLite, for its turn at
    /// the single writer) before it answers UNAVAILABLE.
    pub acquire_timeout: Duration,
    /// SQLite: how long a statement waits on a lock held by another process (the CLI,
    /// a second server) before it fails; such a failure is UNAVAILABLE, never "locked".
    pub busy_timeout: Duration,
    /// SQLite: connections for read-only calls (Authorize, GetEntity, listings).
    pub read_connections: u32,
    /// SQLite: concurrent write calls share one transaction and one fsync, each in its
    /// own savepoint, and are answered once it is durable (off: one fsync per call).
    pub group_commit: bool,
    /// SQLite: WAL pages after which the writer finishes the background checkpoint between
    /// two groups, so the WAL starts over (1000, SQLite's own default threshold).
    pub wal_autocheckpoint: u32,
    /// PostgreSQL: the pool size of this instance.
    pub max_connections: u32,
    /// PostgreSQL: `statement_timeout` of every connection (includes lock waits).
    pub statement_timeout: Duration,
    /// Entity types kept in the application's own tables (empty: all in Lockstep's).
    pub mapping: std::sync::Arc<crate::mapping::Mapping>,
}

impl Default for StoreOptions {
    fn default() -> Self {
        Self {
            acquire_timeout: Duration::from_secs(2),
            busy_timeout: Duration::from_secs(5),
            read_connections: 4,
            group_commit: true,
            wal_autocheckpoint: 1000,
            max_connections: 16,
            statement_timeout: Duration::from_secs(5),
            mapping: std::sync::Arc::default(),
        }
    }
}

/// Limits and token rules applied to every call.
#[derive(Clone, Debug)]
pub struct Settings {
    /// Clock skew allowed on `exp`, `nbf` and `iat`.
    pub leeway_secs: u64,
    /// Tokens whose `exp` lies further than this in the future are refused, so that a
    /// revocation kept this long outlives every token it names.
    pub max_token_lifetime_secs: u64,
    pub max_token_bytes: usize,
    pub max_request_bytes: usize,
    pub max_mutations: usize,
    /// Nesting depth of attribute and context values (records and sets).
    pub max_value_depth: usize,
    /// Size of one entity's attributes, as JSON.
    pub max_attributes_bytes: usize,
    pub max_id_bytes: usize,
    pub max_idempotency_key_bytes: usize,
    pub default_audit_page: u32,
    pub max_audit_page: u32,
    /// How long committed idempotency keys are remembered.
    pub idempotency_retention: Duration,
    /// Whether a denied AuthorizeAndCommit carries the determining policy ids (in a
    /// google.rpc.ErrorInfo). Off by default: policy names can tell a caller how to probe.
    pub reveal_determining_policies: bool,
    /// Calls served at once; more wait, up to `max_queue`; beyond: RESOURCE_EXHAUSTED.
    pub max_in_flight: u32,
    pub max_queue: u32,
    /// Audit retention (None: the log keeps everything).
    pub audit_retention: Option<crate::engine::AuditRetention>,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            leeway_secs: 30,
            max_token_lifetime_secs: 24 * 3600,
            max_token_bytes: 8 * 1024,
            max_request_bytes: 1024 * 1024,
            max_mutations: 100,
            max_value_depth: 16,
            max_attributes_bytes: 64 * 1024,
            max_id_bytes: 1024,
            max_idempotency_key_bytes: 256,
            default_audit_page: 100,
            max_audit_page: 1000,
            idempotency_retention: Duration::from_secs(25 * 3600),
            reveal_determining_policies: false,
            max_in_flight: 256,
            max_queue: 256,
            audit_retention: None,
        }
    }
}
