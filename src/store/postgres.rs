//! The PostgreSQL store: several stateless Lockstep instances on one database. Its own
//! tables live in the schema `lockstep`; entity types the mapping names live in the
//! application's tables (docs/mapping.md), read and written by the `mapped_*` methods.
//!
//! # Locking protocol
//!
//! Write transactions run at READ COMMITTED; each statement reads the latest committed
//! state, and the locks below make every revoking change and every commit it could
//! forbid meet on something both lock, so one waits for the other. The one that waits
//! takes its audit `seq` (a sequence, drawn by the last statement before commit) after
//! the other has committed, so `seq` orders conflicting changes as they were serialized.
//!
//! | a commit (AuthorizeAndCommit, …) | conflicts with |
//! |---|---|
//! | plain read of `keys` (ACCESS SHARE) | RevokeKey: `LOCK TABLE keys IN ACCESS EXCLUSIVE MODE` |
//! | its subject's advisory lock, shared, taken **before** the revocation reads (in the same statement as its principal entity's, shared) | RevokeSubject and logout: the same lock, exclusive |
//! | plain read of `revoked_tokens` (after the subject lock) | RevokeToken by jti of a token whose subject is unknown: `LOCK TABLE revoked_tokens IN ACCESS EXCLUSIVE MODE` |
//! | plain read of `policies` (ACCESS SHARE) | PutPolicies: `LOCK TABLE policies IN ACCESS EXCLUSIVE MODE` |
//! | principal and ancestors: their entity advisory locks, shared, level by level (`read_ancestors`, one round trip: each level locked, then read by a new statement) | any change of those entities (membership is the child's `parents`) |
//! | the resource: its entity advisory lock, exclusive (create: also the unique index) | transfers and any other change of the resource |
//! | a mapped resource (the application's table): its row `FOR NO KEY UPDATE`, then its entity lock | a direct UPDATE or DELETE of the row (row lock, then its trigger's entity lock) |
//! | a mapped principal or ancestor: its entity lock, shared | a direct write of its row or its join-table rows: the trigger `lockstep.guard()` takes the entity lock (the child's, for a join table) exclusive |
//!
//! Entity and subject locks are transaction-scoped advisory locks keyed by a 64-bit hash
//! of the uid (`hashtextextended`): a collision only serializes two unrelated writers.
//! Every writer of an entity first reads it through `Txn::entity`, which takes the
//! exclusive lock (an invariant of the engine).
//!
//! A statement that waited for a lock runs on a snapshot taken after the wait, so it
//! sees what the holder committed. Rare writers (keys, policies, revocation of another
//! subject's token) take table locks instead of one hot row that every commit would
//! share-lock; frequent ones take advisory locks, which write nothing and queue fairly. Deadlocks and serialization failures (40P01, 40001) are retried by the
//! engine. Read-only calls use a REPEATABLE READ snapshot and take no row locks.
//!
//! # Settling an interrupted COMMIT
//!
//! When the connection fails while COMMIT is on its way (sent, no answer), the
//! transaction may have committed, may have aborted, or may still be committing on its
//! old backend, which keeps running without a client. The store does not guess:
//!
//! 1. Before COMMIT it knows the transaction id and the backend: the audit insert, the
//!    last statement of every audited transaction, also returns `pg_current_xact_id()`
//!    and `pg_backend_pid()` (no extra round trip; a write transaction without an audit
//!    event asks with one statement, `pg_current_xact_id_if_assigned()`: NULL means it
//!    wrote nothing, so there is nothing to settle).
//! 2. After the failure it asks `pg_xact_status(xid)` on a fresh connection (not the
//!    pool, whose connections may all be dead), retrying connection failures with
//!    backoff (10 ms doubling to 250 ms) until the caller's deadline, or for
//!    `SETTLE_WINDOW` when the call has none:
//!    - `committed`: OK;
//!    - `aborted`: UNAVAILABLE, nothing was committed;
//!    - `in progress`: the old backend is still committing. Nobody can read its answer any
//!      more, so it is ended with `pg_terminate_backend`, only while it still holds this
//!      xid (`pg_stat_activity.backend_xid`), and the status is asked again until it is
//!      committed or aborted (terminating after the commit record changes nothing: the
//!      backend finishes the commit first). An audit-row lookup alone could not tell "not
//!      yet" from "never": it would read "absent" while the old backend is still
//!      committing, and answer UNAVAILABLE for a write that lands a moment later;
//!    - NULL (the xid is older than the commit log kept): the audit event is looked up by
//!      its `seq` instead; with the xid that old, nothing of it is still in progress.
//! 3. Only when the database cannot be asked in time is the answer `Unknown` (UNKNOWN),
//!    naming the xid and the audit seq to look for.

use super::mapped::{self, ColumnValue};
use super::{
    AuditRow, CallStateRow, EntityRow, KeyRow, LinkRow, PolicyRow, Store, StoreError, StoreResult, Txn,
    audit_entities_json, audit_mutations_json, call_state, json_err, policy_state_of, to_i64, to_u64,
};
use crate::config::StoreOptions;
use crate::mapping::{ColumnType, IdType, Mapping, ParentSource, TypeMap};
use crate::model::{
    AuditEvent, CallState, EntityRecord, KeyRecord, NewAuditEvent, PolicyRecord, PolicyState, TemplateLink, Uid,
};
use async_trait::async_trait;
use serde_json::{Map, Value};
use sqlx::Connection;
use sqlx::postgres::PgConnection;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{PgPool, Postgres, Row, Transaction};
use std::collections::{HashMap, HashSet};
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

/// How long an interrupted COMMIT of a call without a deadline is settled (see the module
/// doc): long enough for a failover or a restart of the proxy in front of the database,
/// short enough that a caller without a deadline is not held indefinitely.
pub const SETTLE_WINDOW: Duration = Duration::from_secs(5);

pub struct PgStore {
    pool: PgPool,
    /// Entity types kept in the application's tables (see `mapped_*` below).
    mapping: Arc<Mapping>,
}

/// The schema of Lockstep's own tables, beside the application's in the same database so
/// that one transaction spans both. Every Lockstep connection has it first on its
/// `search_path` (then `public`); the mapped tables are always named with their schema.
pub const SCHEMA: &str = "lockstep";

/// Lockstep's tables (and function) of the releases that kept them in `public`: moved into
/// `SCHEMA` once, before the migrations run.
const LEGACY_TABLES: &[&str] = &[
    "_sqlx_migrations",
    "keys",
    "revoked_tokens",
    "subjects",
    "policies",
    "entities",
    "idempotency",
    "audit",
    "policy_links",
    "policy_links_meta",
];

impl PgStore {
    /// Connects (lazily: the pool opens connections on demand, so a server starts and
    /// reports NOT_SERVING while the database is down) and runs the migrations.
    pub async fn open(url: &str, opts: &StoreOptions) -> anyhow::Result<Self> {
        let timeout_ms = opts.statement_timeout.as_millis().to_string();
        let connect = PgConnectOptions::from_str(url)
            .map_err(|e| anyhow::anyhow!("invalid PostgreSQL URL: {e}"))?
            .application_name("lockstep")
            .options([
                ("statement_timeout", timeout_ms.as_str()),
                ("idle_in_transaction_session_timeout", "60000"),
                // Lockstep's schema first (its own statements name tables unqualified),
                // then public: the application's triggers that fire on Lockstep's writes
                // to mapped tables find their unqualified tables there.
                ("search_path", "lockstep, public"),
                // Timestamps of mapped columns are read and written as UTC.
                ("TimeZone", "UTC"),
                // Lockstep's own writes skip the guard triggers (migration 0005): they hold
                // the entity locks the triggers would take.
                ("lockstep.writer", "on"),
            ]);
        let pool = PgPoolOptions::new()
            .max_connections(opts.max_connections.max(2))
            .min_connections(0)
            .acquire_timeout(opts.acquire_timeout)
            .test_before_acquire(false)
            .connect_lazy_with(connect);
        prepare_schema(&pool)
            .await
            .map_err(|e| anyhow::anyhow!("cannot reach or migrate the PostgreSQL database: {e}"))?;
        sqlx::migrate!("migrations/postgres")
            .run(&pool)
            .await
            .map_err(|e| anyhow::anyhow!("cannot reach or migrate the PostgreSQL database: {e}"))?;
        Ok(Self { pool, mapping: opts.mapping.clone() })
    }

    /// Settles the outcome of transaction `xid` (text of `pg_current_xact_id()`), last run
    /// by backend `pid`, as `commit` does when the COMMIT acknowledgement is lost. Public
    /// so that the outage tests can settle a transaction they hold open themselves.
    #[doc(hidden)]
    pub async fn settle(&self, xid: &str, pid: i32, audit_seq: Option<u64>, until: Instant) -> StoreResult<()> {
        settle(&self.pool, &Pending { xid: xid.to_owned(), pid, audit_seq }, until, "settled on request").await
    }
}

#[async_trait]
impl Store for PgStore {
    async fn write(&self) -> StoreResult<Box<dyn Txn>> {
        Ok(Box::new(self.begin(true).await?))
    }

    async fn read(&self) -> StoreResult<Box<dyn Txn>> {
        Ok(Box::new(self.begin(false).await?))
    }

    async fn read_single(&self) -> StoreResult<Box<dyn Txn>> {
        // A connection without BEGIN: see `Db::Unbegun`.
        let started = std::time::Instant::now();
        let conn = self.pool.acquire().await.map_err(map_err)?;
        metrics::histogram!(crate::telemetry::POOL_WAIT_SECONDS).record(started.elapsed().as_secs_f64());
        Ok(Box::new(self.txn(Db::Unbegun(conn), false)))
    }

    async fn retention_lock(&self) -> StoreResult<Option<Box<dyn std::any::Any + Send>>> {
        // A session lock on a connection of its own, closed (not returned to the pool) when
        // the guard is dropped: the lock goes with the session, even if the run is cut off.
        let mut conn = self.pool.acquire().await.map_err(map_err)?;
        let got: bool = sqlx::query_scalar(
            "SELECT pg_try_advisory_lock(hashtextextended('lockstep' || chr(31) || 'audit-retention', 0))",
        )
        .fetch_one(&mut *conn)
        .await
        .map_err(map_err)?;
        if !got {
            return Ok(None);
        }
        conn.close_on_drop();
        Ok(Some(Box::new(conn)))
    }

    fn pool_connections(&self) -> Option<(u32, u32)> {
        let idle = u32::try_from(self.pool.num_idle()).unwrap_or(u32::MAX);
        Some((self.pool.size(), idle))
    }

    async fn ping(&self) -> StoreResult<()> {
        sqlx::query("SELECT max(version) FROM policies").execute(&self.pool).await.map_err(map_err)?;
        Ok(())
    }

    fn mapping(&self) -> Arc<Mapping> {
        self.mapping.clone()
    }

    async fn mapping_problems(&self) -> StoreResult<Vec<String>> {
        let mut conn = self.pool.acquire().await.map_err(map_err)?;
        let mut problems = Vec::new();
        for tm in self.mapping.types() {
            check_type_catalog(&mut conn, &self.mapping, tm, &mut problems).await?;
        }
        if !problems.is_empty() {
            return Ok(problems);
        }
        for (table, ty, col, vcol) in self.mapping.guarded_tables() {
            let name = guard_name(&ty, &col, vcol.as_deref());
            let installed: bool = sqlx::query_scalar(
                "SELECT EXISTS (SELECT 1 FROM pg_trigger WHERE tgrelid = to_regclass($1) AND tgname = $2
                                AND tgenabled <> 'D' AND NOT tgisinternal)",
            )
            .bind(mapped::qt(&table, Some("public")))
            .bind(&name)
            .fetch_one(&mut *conn)
            .await
            .map_err(map_err)?;
            if !installed {
                problems.push(format!(
                    "{} (entity type {ty}): trigger {name} is not installed, so direct writes to it would not be \
                     ordered with Lockstep's decisions; run `lockstep mapping install`",
                    qualified(&table)
                ));
            }
        }
        Ok(problems)
    }

    async fn install_mapping(&self) -> StoreResult<Vec<String>> {
        let mut tx = self.pool.begin().await.map_err(map_err)?;
        let mut done = Vec::new();
        for (table, ty, col, vcol) in self.mapping.guarded_tables() {
            let name = guard_name(&ty, &col, vcol.as_deref());
            let lit = |s: &str| format!("'{}'", s.replace('\'', "''"));
            let sql = format!(
                "CREATE OR REPLACE TRIGGER {} BEFORE INSERT OR UPDATE OR DELETE ON {} FOR EACH ROW \
                 EXECUTE FUNCTION {SCHEMA}.guard({}, {}, {})",
                mapped::q(&name),
                mapped::qt(&table, Some("public")),
                lit(&ty),
                lit(&col),
                lit(vcol.as_deref().unwrap_or(""))
            );
            sqlx::query(sqlx::AssertSqlSafe(sql)).execute(&mut *tx).await.map_err(map_err)?;
            done.push(format!("{}: trigger {name} (entity type {ty}, column {col})", qualified(&table)));
        }
        tx.commit().await.map_err(map_err)?;
        Ok(done)
    }
}

impl PgStore {
    /// A pooled connection and its BEGIN (READ COMMITTED for writes; REPEATABLE READ READ
    /// ONLY for reads). BEGIN runs in a task of its own: a caller dropped at its deadline in
    /// the middle of it must not leave sqlx believing no transaction is open on a connection
    /// where PostgreSQL has one (the connection would go back to the pool inside it). The
    /// task finishes BEGIN; a transaction nobody takes is then rolled back when dropped.
    async fn begin(&self, write: bool) -> StoreResult<PgTxn> {
        let started = std::time::Instant::now();
        let pool = self.pool.clone();
        let tx = tokio::spawn(async move {
            if write {
                pool.begin().await
            } else {
                pool.begin_with("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY").await
            }
        })
        .await
        .map_err(|e| StoreError::Internal(format!("BEGIN's task failed: {e}")))?
        .map_err(map_err)?;
        metrics::histogram!(crate::telemetry::POOL_WAIT_SECONDS).record(started.elapsed().as_secs_f64());
        Ok(self.txn(Db::Open(tx), write))
    }

    fn txn(&self, db: Db, write: bool) -> PgTxn {
        PgTxn {
            db,
            write,
            pool: self.pool.clone(),
            pending: None,
            mapping: self.mapping.clone(),
            read: HashMap::new(),
            shared_held: HashSet::new(),
            deferred: None,
            prefetch: None,
            prefetched: None,
            prefetch_read: None,
            prefetched_read: None,
        }
    }
}

/// Where a transaction's statements go.
enum Db {
    /// A lazy read (`Store::read_single`) before its BEGIN: its first statement, when it is
    /// the announced `key_and_read_context`, runs alone (one statement: one snapshot); any
    /// other statement begins the transaction first.
    Unbegun(sqlx::pool::PoolConnection<Postgres>),
    /// A lazy read whose one statement ran: a second one would see another snapshot, so the
    /// call is read again in a transaction (`RESTART_IN_SNAPSHOT`).
    Spent(sqlx::pool::PoolConnection<Postgres>),
    Open(Transaction<'static, Postgres>),
    /// While a lazy read's BEGIN runs, and after it failed.
    Gone,
}

impl Db {
    /// The connection of the begun transaction (every statement but a lazy read's first).
    fn tx(&mut self) -> StoreResult<&mut PgConnection> {
        match self {
            Db::Open(tx) => Ok(tx),
            _ => Err(StoreError::Internal("a statement outside the transaction".into())),
        }
    }
}

/// A table as messages name it (`public.items`).
fn qualified(t: &crate::mapping::TableName) -> String {
    format!("{}.{}", t.schema.as_deref().unwrap_or("public"), t.name)
}

/// The trigger that guards `column` (the id of `entity_type`) of a table; the name holds a
/// digest of its arguments, so a changed mapping installs a new trigger.
fn guard_name(entity_type: &str, column: &str, version: Option<&str>) -> String {
    use sha2::Digest;
    let d = sha2::Sha256::digest(format!("{entity_type}\u{1f}{column}\u{1f}{}", version.unwrap_or("")));
    format!("lockstep_guard_{}", hex::encode(&d[..6]))
}

/// PostgreSQL's cast for an id type.
fn id_cast(t: IdType) -> &'static str {
    match t {
        IdType::Text => "text",
        IdType::Integer => "bigint",
        IdType::Uuid => "uuid",
    }
}

/// Whether a column of catalog type (`data_type`, `udt_name`) can hold a value mapped as `ty`.
fn column_fits(ty: ColumnType, data_type: &str, udt: &str) -> bool {
    let text = matches!(data_type, "text" | "character varying" | "character" | "USER-DEFINED");
    let int = matches!(data_type, "smallint" | "integer" | "bigint");
    let ts = data_type.starts_with("timestamp");
    match ty {
        ColumnType::Text => text,
        ColumnType::Integer => int,
        ColumnType::Boolean => data_type == "boolean",
        ColumnType::Json => matches!(data_type, "json" | "jsonb"),
        ColumnType::Datetime | ColumnType::TimestampText => ts,
        ColumnType::TextSet => data_type == "ARRAY" && matches!(udt, "_text" | "_varchar" | "_bpchar"),
        ColumnType::IntegerSet => data_type == "ARRAY" && matches!(udt, "_int2" | "_int4" | "_int8"),
        ColumnType::Entity => text || int || data_type == "uuid",
    }
}

fn id_fits(t: IdType, data_type: &str) -> bool {
    match t {
        IdType::Text => matches!(data_type, "text" | "character varying" | "character" | "USER-DEFINED"),
        IdType::Integer => matches!(data_type, "smallint" | "integer" | "bigint"),
        IdType::Uuid => data_type == "uuid",
    }
}

/// The columns of a table: name -> (data_type, udt_name); None when there is no such table.
async fn catalog_columns(
    conn: &mut PgConnection,
    t: &crate::mapping::TableName,
) -> StoreResult<Option<HashMap<String, (String, String)>>> {
    let schema = t.schema.as_deref().unwrap_or("public");
    let rows: Vec<(String, String, String)> = sqlx::query_as(
        "SELECT column_name::text, data_type::text, udt_name::text FROM information_schema.columns
         WHERE table_schema = $1 AND table_name = $2",
    )
    .bind(schema)
    .bind(&t.name)
    .fetch_all(&mut *conn)
    .await
    .map_err(map_err)?;
    if rows.is_empty() {
        return Ok(None);
    }
    Ok(Some(rows.into_iter().map(|(c, d, u)| (c, (d, u))).collect()))
}

/// Checks one mapped type against the live catalog; problems name type, table and column.
async fn check_type_catalog(
    conn: &mut PgConnection,
    mapping: &Mapping,
    tm: &TypeMap,
    problems: &mut Vec<String>,
) -> StoreResult<()> {
    let et = &tm.entity_type;
    let Some(cols) = catalog_columns(conn, &tm.table).await? else {
        problems.push(format!("entity type {et}: table {} does not exist", qualified(&tm.table)));
        return Ok(());
    };
    let table = qualified(&tm.table);
    let need = |col: &str, what: &str, fits: &dyn Fn(&str, &str) -> bool, want: &str| match cols.get(col) {
        None => Some(format!("entity type {et}: {what}: column {table}.{col} does not exist")),
        Some((d, u)) if !fits(d, u) => {
            Some(format!("entity type {et}: {what}: column {table}.{col} is {d}, which cannot hold {want}"))
        }
        Some(_) => None,
    };
    problems.extend(need(&tm.id_column, "id", &|d, _| id_fits(tm.id_type, d), &format!("{} ids", tm.id_type.name())));
    if let Some(v) = &tm.version_column {
        problems.extend(need(v, "version", &|d, u| column_fits(ColumnType::Integer, d, u), "an integer version"));
    }
    for (a, m) in &tm.attributes {
        let ty = m.ty;
        let target_id = m.entity_type.as_deref().and_then(|t| mapping.get(t)).map(|t| t.id_type);
        problems.extend(need(
            &m.column,
            &format!("attribute `{a}`"),
            &|d, u| match target_id {
                Some(idt) if ty == ColumnType::Entity => id_fits(idt, d),
                _ => column_fits(ty, d, u),
            },
            &format!("a {} value", ty.name()),
        ));
    }
    let parent_id = |p: &str| mapping.get(p).map_or(IdType::Text, |t| t.id_type);
    for (pty, source) in &tm.parents {
        match source {
            ParentSource::Column(c) => {
                let idt = parent_id(pty);
                problems.extend(need(
                    c,
                    &format!("parent {pty}"),
                    &|d, _| id_fits(idt, d),
                    &format!("{} ids", idt.name()),
                ));
            }
            ParentSource::Join { table: jt, child, parent } => {
                let Some(jcols) = catalog_columns(conn, jt).await? else {
                    problems
                        .push(format!("entity type {et}: parent {pty}: join table {} does not exist", qualified(jt)));
                    continue;
                };
                for (c, idt) in [(child, tm.id_type), (parent, parent_id(pty))] {
                    match jcols.get(c) {
                        None => problems.push(format!(
                            "entity type {et}: parent {pty}: column {}.{c} does not exist",
                            qualified(jt)
                        )),
                        Some((d, _)) if !id_fits(idt, d) => problems.push(format!(
                            "entity type {et}: parent {pty}: column {}.{c} is {d}, which cannot hold {} ids",
                            qualified(jt),
                            idt.name()
                        )),
                        Some(_) => {}
                    }
                }
            }
        }
    }
    Ok(())
}

/// `SELECT id, row` of a mapped type for ids `$1` (text[]): the row as `mapped::record_from_row`
/// reads it (jsonb_build_object takes at most 50 pairs, hence the chunks).
fn mapped_select(tm: &TypeMap) -> String {
    let q = mapped::q;
    let t = mapped::qt(&tm.table, Some("public"));
    let id = q(&tm.id_column);
    let mut pairs = Vec::new();
    for (i, (_, m)) in tm.attributes.iter().enumerate() {
        let c = q(&m.column);
        let expr = match m.ty {
            ColumnType::Datetime | ColumnType::TimestampText => {
                format!("to_char(t.{c}::timestamptz AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.MS\"Z\"')")
            }
            ColumnType::Entity => format!("t.{c}::text"),
            _ => format!("t.{c}"),
        };
        pairs.push(format!("'{}', {expr}", mapped::attr_key(i)));
    }
    for (i, (_, source)) in tm.parents.iter().enumerate() {
        let expr = match source {
            ParentSource::Column(c) => format!("t.{}::text", q(c)),
            ParentSource::Join { table, child, parent } => format!(
                "(SELECT coalesce(jsonb_agg(j.{p}::text ORDER BY j.{p}::text), '[]'::jsonb) FROM {jt} j WHERE j.{c} = t.{id})",
                p = q(parent),
                c = q(child),
                jt = mapped::qt(table, Some("public"))
            ),
        };
        pairs.push(format!("'{}', {expr}", mapped::parent_key(i)));
    }
    if let Some(v) = &tm.version_column {
        pairs.push(format!("'{}', t.{}", mapped::VERSION_KEY, q(v)));
    }
    let obj = if pairs.is_empty() {
        "'{}'::jsonb".to_owned()
    } else {
        pairs.chunks(40).map(|c| format!("jsonb_build_object({})", c.join(", "))).collect::<Vec<_>>().join(" || ")
    };
    format!("SELECT t.{id}::text, ({obj})::text FROM {t} t WHERE t.{id} = ANY($1::text[]::{}[])", id_cast(tm.id_type))
}

/// One transaction of the PostgreSQL store.
struct PgTxn {
    db: Db,
    /// Write transactions take the locks of the protocol; read-only ones take none.
    write: bool,
    /// For settling a commit whose acknowledgement was lost (see `commit`).
    pool: PgPool,
    /// Who this transaction is, for settling its COMMIT: set by the audit insert.
    pending: Option<Pending>,
    mapping: Arc<Mapping>,
    /// Mapped entities as this transaction last read them (`entity`): an update writes
    /// only the columns it changes, and the join-table edges it adds or removes.
    read: HashMap<Uid, EntityRecord>,
    /// Advisory lock keys this transaction holds shared (see `lock_shared`).
    shared_held: HashSet<String>,
    /// An update of an own-store entity not sent yet: it goes with the next statement
    /// (the audit insert, as one statement: one round trip less), or alone before any
    /// other (`flush`), so every read still sees it.
    deferred: Option<EntityRow>,
    /// The `entity_for_write` announced (`prefetch_for_write`), and what reading it found.
    prefetch: Option<WriteArgs>,
    prefetched: Option<(WriteArgs, Option<EntityRecord>, Vec<EntityRecord>)>,
    /// The same for a read-only transaction's `entities_with_ancestors`.
    prefetch_read: Option<Vec<Uid>>,
    prefetched_read: Option<(Vec<Uid>, Vec<EntityRecord>)>,
}

/// The arguments of an `entity_for_write`.
#[derive(PartialEq, Eq)]
struct WriteArgs {
    resource: Uid,
    also: Vec<Uid>,
    with_parents: bool,
}

/// A transaction about to commit, as the database knows it.
#[derive(Debug, Clone)]
struct Pending {
    /// `pg_current_xact_id()` as text (an `xid8`: never wraps around).
    xid: String,
    /// `pg_backend_pid()` of the backend running it.
    pid: i32,
    /// The audit event it appended: the fallback proof of its commit.
    audit_seq: Option<u64>,
}

/// Maps a driver error: retry (serialization failure, deadlock), unavailable
/// (connection lost, server shutting down, timeouts), conflict, or a bug.
fn map_err(e: sqlx::Error) -> StoreError {
    match &e {
        sqlx::Error::PoolTimedOut => {
            StoreError::Unavailable("timed out waiting for a database connection; nothing was committed, retry".into())
        }
        sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed
        | sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::Protocol(_) => StoreError::Unavailable(format!("database connection failed: {e}")),
        sqlx::Error::Database(db) => {
            let code = db.code().map(|c| c.into_owned()).unwrap_or_default();
            match code.as_str() {
                "40001" | "40P01" => StoreError::Retry(db.message().to_owned()),
                "23505" => StoreError::Conflict(constraint_message(db.as_ref()).replacen(
                    "refused the write",
                    "refused a duplicate",
                    1,
                )),
                "23502" | "23503" | "23514" | "23P01" => StoreError::Invalid(constraint_message(db.as_ref())),
                c if c.starts_with("22") => StoreError::Invalid(constraint_message(db.as_ref())),
                "57014" | "55P03" => StoreError::Unavailable("the database did not answer in time".into()),
                c if c.starts_with("08") || c.starts_with("53") || c.starts_with("57P") => {
                    StoreError::Unavailable(format!("database unavailable: {}", db.message()))
                }
                _ => StoreError::Internal(e.to_string()),
            }
        }
        _ => StoreError::Internal(e.to_string()),
    }
}

/// A constraint or conversion error as the caller reads it: PostgreSQL's message (which
/// names the column or constraint) and its detail.
fn constraint_message(db: &(dyn sqlx::error::DatabaseError + 'static)) -> String {
    let pg = db.try_downcast_ref::<sqlx::postgres::PgDatabaseError>();
    let detail = pg.and_then(|p| p.detail()).map(|d| format!(" ({d})")).unwrap_or_default();
    let column = pg.and_then(|p| p.column()).map(|c| format!(" [column {c}]")).unwrap_or_default();
    format!("the database refused the write: {}{detail}{column}; nothing was committed", db.message())
}

/// Advisory-lock key of a subject (its tokens' revocation state).
fn subject_lock_key(u: &Uid) -> String {
    format!("lockstep\u{1f}subject\u{1f}{}\u{1f}{}", u.ty, u.id)
}

/// Advisory-lock key of an entity.
fn entity_lock_key(u: &Uid) -> String {
    format!("lockstep\u{1f}entity\u{1f}{}\u{1f}{}", u.ty, u.id)
}

impl PgTxn {
    /// A mapped entity (see `mapped_select`). In a write transaction its row is locked
    /// first (FOR NO KEY UPDATE: a direct UPDATE of the row takes the row lock before its
    /// trigger takes the entity lock, so taking them in the same order cannot deadlock
    /// with it), then its entity lock, then it is read: a new statement, so a snapshot
    /// taken after both waits.
    async fn mapped_entity(&mut self, tm: &TypeMap, uid: &Uid) -> StoreResult<Option<EntityRecord>> {
        if tm.id_type.canonical(&uid.id).is_none() {
            return Ok(None); // no row of this table can have such an id
        }
        if self.write {
            let sql = format!(
                "WITH r AS (SELECT 1 FROM {} WHERE {} = $1::{} FOR NO KEY UPDATE)
                 SELECT pg_advisory_xact_lock(hashtextextended($2, 0)) FROM (SELECT count(*) FROM r) AS x",
                mapped::qt(&tm.table, Some("public")),
                mapped::q(&tm.id_column),
                id_cast(tm.id_type)
            );
            sqlx::query(sqlx::AssertSqlSafe(sql))
                .bind(&uid.id)
                .bind(entity_lock_key(uid))
                .execute(self.db.tx()?)
                .await
                .map_err(map_err)?;
        }
        let found = self.mapped_rows(tm, vec![uid.id.clone()]).await?.pop();
        match &found {
            Some(e) => {
                self.read.insert(uid.clone(), e.clone());
            }
            None => {
                self.read.remove(uid);
            }
        }
        Ok(found)
    }

    /// The rows of `ids` (those that exist) of a mapped type.
    async fn mapped_rows(&mut self, tm: &TypeMap, ids: Vec<String>) -> StoreResult<Vec<EntityRecord>> {
        let ids: Vec<String> = ids.into_iter().filter(|id| tm.id_type.canonical(id).is_some()).collect();
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let rows: Vec<(String, String)> = sqlx::query_as(sqlx::AssertSqlSafe(mapped_select(tm)))
            .bind(ids)
            .fetch_all(self.db.tx()?)
            .await
            .map_err(map_err)?;
        rows.into_iter()
            .map(|(id, row)| {
                let row: Map<String, Value> = serde_json::from_str(&row).map_err(json_err)?;
                mapped::record_from_row(tm, id, row)
            })
            .collect()
    }

    /// Runs `sql` with one JSON argument (`jsonb_populate_record(set)` converts each value
    /// to its column's type, and a value it cannot convert is INVALID_ARGUMENT).
    async fn with_json(&mut self, sql: String, arg: Value, id: Option<&str>) -> StoreResult<u64> {
        let mut q = sqlx::query(sqlx::AssertSqlSafe(sql)).bind(arg.to_string());
        if let Some(id) = id {
            q = q.bind(id.to_owned());
        }
        Ok(q.execute(self.db.tx()?).await.map_err(map_err)?.rows_affected())
    }

    async fn mapped_insert(&mut self, tm: &TypeMap, e: &EntityRecord) -> StoreResult<()> {
        let values = mapped::columns_of(&self.mapping, tm, e)?;
        let present: Vec<&ColumnValue> = values.iter().filter(|v| !v.value.is_null()).collect();
        let t = mapped::qt(&tm.table, Some("public"));
        let cols = present.iter().map(|v| mapped::q(&v.column)).collect::<Vec<_>>().join(", ");
        let obj: Map<String, Value> = present.iter().map(|v| (v.column.clone(), v.value.clone())).collect();
        let sql = format!("INSERT INTO {t} ({cols}) SELECT {cols} FROM jsonb_populate_record(NULL::{t}, $1::jsonb)");
        self.with_json(sql, Value::Object(obj), None).await?;
        let edges = mapped::join_edges(&self.mapping, tm, &e.parents)?;
        self.add_edges(tm, &e.uid.id, &edges).await?;
        self.read.insert(e.uid.clone(), e.clone());
        Ok(())
    }

    async fn mapped_update(&mut self, tm: &TypeMap, e: &EntityRecord) -> StoreResult<()> {
        let before = match self.read.get(&e.uid).cloned() {
            Some(b) => b,
            None => self
                .mapped_rows(tm, vec![e.uid.id.clone()])
                .await?
                .pop()
                .ok_or_else(|| StoreError::Internal(format!("update of missing entity {}", e.uid)))?,
        };
        let changed = mapped::changed_columns(&self.mapping, tm, &before, e)?;
        let changed: Vec<&ColumnValue> = changed.iter().collect();
        if !changed.is_empty() {
            let t = mapped::qt(&tm.table, Some("public"));
            let sets = changed.iter().map(|v| format!("{c} = r.{c}", c = mapped::q(&v.column))).collect::<Vec<_>>();
            let obj: Map<String, Value> = changed.iter().map(|v| (v.column.clone(), v.value.clone())).collect();
            let sql = format!(
                "UPDATE {t} AS t SET {} FROM jsonb_populate_record(NULL::{t}, $1::jsonb) AS r WHERE t.{} = $2::{}",
                sets.join(", "),
                mapped::q(&tm.id_column),
                id_cast(tm.id_type)
            );
            if self.with_json(sql, Value::Object(obj), Some(&e.uid.id)).await? != 1 {
                return Err(StoreError::Internal(format!("update of missing entity {}", e.uid)));
            }
        }
        let (added, removed) = mapped::edge_changes(&self.mapping, tm, &before.parents, &e.parents)?;
        self.remove_edges(tm, &e.uid.id, &removed).await?;
        self.add_edges(tm, &e.uid.id, &added).await?;
        self.read.insert(e.uid.clone(), e.clone());
        Ok(())
    }

    async fn mapped_delete(&mut self, tm: &TypeMap, uid: &Uid) -> StoreResult<()> {
        let id_cast = id_cast(tm.id_type);
        for (_, source) in &tm.parents {
            if let ParentSource::Join { table, child, .. } = source {
                let sql = format!(
                    "DELETE FROM {} WHERE {} = $1::{id_cast}",
                    mapped::qt(table, Some("public")),
                    mapped::q(child)
                );
                sqlx::query(sqlx::AssertSqlSafe(sql)).bind(&uid.id).execute(self.db.tx()?).await.map_err(map_err)?;
            }
        }
        let sql = format!(
            "DELETE FROM {} WHERE {} = $1::{id_cast}",
            mapped::qt(&tm.table, Some("public")),
            mapped::q(&tm.id_column)
        );
        sqlx::query(sqlx::AssertSqlSafe(sql)).bind(&uid.id).execute(self.db.tx()?).await.map_err(map_err)?;
        self.read.remove(uid);
        Ok(())
    }

    /// The join-table rows of `edges` (index into `tm.parents`, parent id) of child `id`.
    fn edge_rows(tm: &TypeMap, id: &str, edges: &[(usize, String)]) -> Vec<(String, String, String, Value)> {
        edges
            .iter()
            .filter_map(|(i, pid)| match &tm.parents[*i].1 {
                ParentSource::Join { table, child, parent } => Some((
                    mapped::qt(table, Some("public")),
                    mapped::q(child),
                    mapped::q(parent),
                    Value::Object(Map::from_iter([
                        (child.clone(), Value::String(id.to_owned())),
                        (parent.clone(), Value::String(pid.clone())),
                    ])),
                )),
                ParentSource::Column(_) => None,
            })
            .collect()
    }

    async fn add_edges(&mut self, tm: &TypeMap, id: &str, edges: &[(usize, String)]) -> StoreResult<()> {
        for (t, c, p, row) in Self::edge_rows(tm, id, edges) {
            let sql =
                format!("INSERT INTO {t} ({c}, {p}) SELECT {c}, {p} FROM jsonb_populate_record(NULL::{t}, $1::jsonb)");
            self.with_json(sql, row, None).await?;
        }
        Ok(())
    }

    async fn remove_edges(&mut self, tm: &TypeMap, id: &str, edges: &[(usize, String)]) -> StoreResult<()> {
        for (t, c, p, row) in Self::edge_rows(tm, id, edges) {
            let sql = format!(
                "DELETE FROM {t} AS j USING jsonb_populate_record(NULL::{t}, $1::jsonb) AS r WHERE j.{c} = r.{c} AND j.{p} = r.{p}"
            );
            self.with_json(sql, row, None).await?;
        }
        Ok(())
    }

    /// A link changed: the next transaction recompiles the policy set with the links.
    async fn bump_links_generation(&mut self) -> StoreResult<()> {
        sqlx::query("UPDATE policy_links_meta SET generation = generation + 1 WHERE id = 1")
            .execute(self.db.tx()?)
            .await
            .map_err(map_err)?;
        Ok(())
    }

    /// Transaction-scoped shared advisory locks, taken in a fixed (sorted) order. The
    /// lock manager queues requests fairly, so a waiting exclusive request is not
    /// starved by a stream of shared ones (as it would be by `FOR SHARE` on a hot row),
    /// and nothing is written to the locked rows.
    async fn lock_shared(&mut self, keys: &[String]) -> StoreResult<()> {
        // Locks this transaction holds already are held until it ends: not asked again.
        let mut keys: Vec<String> = keys.iter().filter(|k| !self.shared_held.contains(*k)).cloned().collect();
        if keys.is_empty() {
            return Ok(());
        }
        keys.sort();
        keys.dedup();
        self.shared_held.extend(keys.iter().cloned());
        sqlx::query(
            "SELECT count(pg_advisory_xact_lock_shared(hashtextextended(k, 0)))
             FROM (SELECT k FROM unnest($1::text[]) AS k ORDER BY k) AS s",
        )
        .bind(keys)
        .execute(self.db.tx()?)
        .await
        .map_err(map_err)?;
        Ok(())
    }

    /// `key_and_call_state` with the announced `entity_for_write` in the same statement
    /// (`write_context`, migration 0008): the key, the subject's and principal's locks and
    /// the call state, then the resource's lock and row and its context.
    async fn key_and_write_context(
        &mut self,
        kid: &str,
        subject: &Uid,
        token_id: &str,
        args: WriteArgs,
    ) -> StoreResult<Option<(KeyRecord, CallState)>> {
        self.shared_held.extend([subject_lock_key(subject), entity_lock_key(subject)]);
        let keys: Vec<String> = args.also.iter().map(|u| format!("{}\u{1f}{}", u.ty, u.id)).collect();
        let rows = sqlx::query_as::<_, ContextRow>(
            "SELECT k.*, c.* FROM keys k
             CROSS JOIN LATERAL write_context($2, $3, $4, $5, $6, $7, $8) AS c WHERE k.kid = $1",
        )
        .bind(kid)
        .bind(&subject.ty)
        .bind(&subject.id)
        .bind(token_id)
        .bind(&args.resource.ty)
        .bind(&args.resource.id)
        .bind(keys)
        .bind(args.with_parents)
        .fetch_all(self.db.tx()?)
        .await
        .map_err(map_err)?;
        let mut rows = rows.into_iter();
        let Some(first) = rows.next() else { return Ok(None) };
        let state = call_state((first.revoked_at_secs, first.token_revoked, first.version, first.generation));
        let key = KeyRecord::from(first.key);
        let (mut current, mut loaded) = (None, Vec::new());
        for r in rows {
            match r.into_entity()? {
                Some((true, e)) => current = Some(e),
                Some((false, e)) => loaded.push(e),
                None => {}
            }
        }
        self.prefetched = Some((args, current, loaded));
        Ok(Some((key, state)))
    }

    /// `key_and_call_state` of a read-only transaction with the announced
    /// `entities_with_ancestors` in the same statement (one snapshot: REPEATABLE READ).
    async fn key_and_read_context(
        &mut self,
        kid: &str,
        subject: &Uid,
        token_id: &str,
        uids: Vec<Uid>,
    ) -> StoreResult<Option<(KeyRecord, CallState)>> {
        let keys: Vec<String> = uids.iter().map(|u| format!("{}\u{1f}{}", u.ty, u.id)).collect();
        // In a transaction (REPEATABLE READ) or alone (a lazy read, autocommit): either way
        // one snapshot — the subqueries and the STABLE `read_ancestors_at` share the
        // statement's.
        if !matches!(self.db, Db::Unbegun(_)) {
            self.flush().await?;
        }
        let conn: &mut PgConnection = match &mut self.db {
            Db::Open(tx) => tx,
            Db::Unbegun(c) => c,
            _ => return Err(StoreError::Internal("a statement outside the transaction".into())),
        };
        let rows = sqlx::query_as::<_, ContextRow>(concat!(
            "WITH st AS (SELECT ",
            read_call_state!(),
            ")
             SELECT k.*, st.*, NULL::boolean AS r_resource, a.etype AS r_etype, a.eid AS r_eid,
                    a.attributes AS r_attributes, a.parents AS r_parents, a.version AS r_version, a.tags AS r_tags
             FROM keys k CROSS JOIN st LEFT JOIN LATERAL read_ancestors_at($5) AS a ON true
             WHERE k.kid = $1"
        ))
        .bind(kid)
        .bind(&subject.ty)
        .bind(&subject.id)
        .bind(token_id)
        .bind(keys)
        .fetch_all(conn)
        .await
        .map_err(map_err)?;
        self.db = match std::mem::replace(&mut self.db, Db::Gone) {
            Db::Unbegun(c) => Db::Spent(c),
            other => other,
        };
        let mut rows = rows.into_iter().peekable();
        let Some(first) = rows.peek() else { return Ok(None) };
        let state = call_state((first.revoked_at_secs, first.token_revoked, first.version, first.generation));
        let key = KeyRecord::from(first.key.clone());
        let mut loaded = Vec::new();
        for r in rows {
            if let Some((_, e)) = r.into_entity()? {
                loaded.push(e);
            }
        }
        self.prefetched_read = Some((uids, loaded));
        Ok(Some((key, state)))
    }

    /// Before a statement: a lazy read begins its transaction (or, after its one statement,
    /// asks for the call to be read again in one); a deferred update (see `deferred`) is
    /// sent on its own.
    async fn flush(&mut self) -> StoreResult<()> {
        if !matches!(self.db, Db::Open(_)) {
            self.begin_lazy().await?;
        }
        let Some(d) = self.deferred.take() else { return Ok(()) };
        let done = sqlx::query(
            "UPDATE entities SET attributes = $3, parents = $4, version = $5, tags = $6 WHERE etype = $1 AND eid = $2",
        )
        .bind(&d.etype)
        .bind(&d.eid)
        .bind(&d.attributes)
        .bind(&d.parents)
        .bind(d.version)
        .bind(&d.tags)
        .execute(self.db.tx()?)
        .await
        .map_err(map_err)?;
        if done.rows_affected() != 1 {
            return Err(StoreError::Internal(format!("update of missing entity {}::{:?}", d.etype, d.eid)));
        }
        Ok(())
    }

    /// BEGIN on a lazy read's connection, in a task of its own (as `PgStore::begin`).
    async fn begin_lazy(&mut self) -> StoreResult<()> {
        let conn = match std::mem::replace(&mut self.db, Db::Gone) {
            Db::Unbegun(c) => c,
            Db::Spent(c) => {
                self.db = Db::Spent(c);
                return Err(StoreError::Retry(super::RESTART_IN_SNAPSHOT.into()));
            }
            Db::Open(tx) => {
                self.db = Db::Open(tx);
                return Ok(());
            }
            Db::Gone => return Err(StoreError::Internal("a statement outside the transaction".into())),
        };
        let tx = tokio::spawn(async move {
            use sqlx::SqlSafeStr as _;
            Transaction::begin(
                conn,
                Some(sqlx::AssertSqlSafe("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY").into_sql_str()),
            )
            .await
        })
        .await
        .map_err(|e| StoreError::Internal(format!("BEGIN's task failed: {e}")))?
        .map_err(map_err)?;
        self.db = Db::Open(tx);
        Ok(())
    }

    async fn lock_exclusive(&mut self, key: &str) -> StoreResult<()> {
        sqlx::query("SELECT pg_advisory_xact_lock(hashtextextended($1, 0))")
            .bind(key)
            .execute(self.db.tx()?)
            .await
            .map_err(map_err)?;
        Ok(())
    }
}

/// The call state of a read-only transaction as columns (`revoked_at_secs`,
/// `token_revoked`, `version`, `generation`) of subject `$2`/`$3` and token `$4`.
macro_rules! read_call_state {
    () => {
        "(SELECT revoked_at_secs FROM subjects WHERE etype = $2 AND eid = $3) AS revoked_at_secs,
         EXISTS (SELECT 1 FROM revoked_tokens WHERE token_id = $4) AS token_revoked,
         (SELECT max(version) FROM policies) AS version,
         (SELECT generation FROM policy_links_meta WHERE id = 1) AS generation"
    };
}
use read_call_state;

/// A key with the call state (`key_and_call_state`).
#[derive(sqlx::FromRow)]
struct KeyStateRow {
    #[sqlx(flatten)]
    key: KeyRow,
    revoked_at_secs: Option<i64>,
    token_revoked: bool,
    version: Option<i64>,
    generation: i64,
}

/// A row of `key_and_write_context`: the key and the call state, then (rows after the
/// first) one entity each.
#[derive(sqlx::FromRow)]
struct ContextRow {
    #[sqlx(flatten)]
    key: KeyRow,
    revoked_at_secs: Option<i64>,
    token_revoked: bool,
    version: Option<i64>,
    generation: i64,
    r_resource: Option<bool>,
    r_etype: Option<String>,
    r_eid: Option<String>,
    r_attributes: Option<String>,
    r_parents: Option<String>,
    r_version: Option<i64>,
    r_tags: Option<String>,
}

impl ContextRow {
    /// The entity this row carries (None: a row of the call state alone), and whether it is
    /// the resource itself.
    fn into_entity(self) -> StoreResult<Option<(bool, EntityRecord)>> {
        let Some(etype) = self.r_etype else { return Ok(None) };
        let e = EntityRecord::try_from(EntityRow {
            etype,
            eid: self.r_eid.unwrap_or_default(),
            attributes: self.r_attributes.unwrap_or_default(),
            parents: self.r_parents.unwrap_or_default(),
            version: self.r_version.unwrap_or_default(),
            tags: self.r_tags.unwrap_or_default(),
        })?;
        Ok(Some((self.r_resource == Some(true), e)))
    }
}

/// An entity row of `read_for_write`, marked when it is the resource itself.
#[derive(sqlx::FromRow)]
struct FlaggedEntityRow {
    is_resource: bool,
    #[sqlx(flatten)]
    row: EntityRow,
}

fn split(uids: &[Uid]) -> (Vec<String>, Vec<String>) {
    uids.iter().map(|u| (u.ty.clone(), u.id.clone())).unzip()
}

#[async_trait]
impl Txn for PgTxn {
    async fn key(&mut self, kid: &str) -> StoreResult<Option<KeyRecord>> {
        self.flush().await?;
        let row = sqlx::query_as::<_, KeyRow>("SELECT * FROM keys WHERE kid = $1")
            .bind(kid)
            .fetch_optional(self.db.tx()?)
            .await
            .map_err(map_err)?;
        Ok(row.map(KeyRecord::from))
    }

    async fn list_keys(&mut self) -> StoreResult<Vec<KeyRecord>> {
        self.flush().await?;
        let rows = sqlx::query_as::<_, KeyRow>("SELECT * FROM keys ORDER BY added_at, kid")
            .fetch_all(self.db.tx()?)
            .await
            .map_err(map_err)?;
        Ok(rows.into_iter().map(KeyRecord::from).collect())
    }

    async fn insert_key(&mut self, k: &KeyRecord) -> StoreResult<()> {
        self.flush().await?;
        sqlx::query(
            "INSERT INTO keys (kid, algorithm, secret, public_key_pem, issuer, audience, principal_type, revoked, added_at,
                               jwk, source, retired, required_typ, max_lifetime_secs, signing, private_key)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16)",
        )
        .bind(&k.kid)
        .bind(&k.algorithm)
        .bind(&k.secret)
        .bind(&k.public_key_pem)
        .bind(&k.issuer)
        .bind(&k.audience)
        .bind(&k.principal_type)
        .bind(k.revoked)
        .bind(k.added_at)
        .bind(&k.jwk)
        .bind(&k.source)
        .bind(k.retired)
        .bind(&k.required_typ)
        .bind(k.max_lifetime_secs)
        .bind(k.signing)
        .bind(&k.private_key)
        .execute(self.db.tx()?)
        .await
        .map_err(map_err)?;
        Ok(())
    }

    async fn update_key(&mut self, k: &KeyRecord) -> StoreResult<()> {
        self.flush().await?;
        sqlx::query("LOCK TABLE keys IN ACCESS EXCLUSIVE MODE").execute(self.db.tx()?).await.map_err(map_err)?;
        sqlx::query("UPDATE keys SET jwk = $2, retired = $3, signing = $4 WHERE kid = $1")
            .bind(&k.kid)
            .bind(&k.jwk)
            .bind(k.retired)
            .bind(k.signing)
            .execute(self.db.tx()?)
            .await
            .map_err(map_err)?;
        Ok(())
    }

    async fn revoke_key(&mut self, kid: &str, now: i64) -> StoreResult<bool> {
        self.flush().await?;
        sqlx::query("LOCK TABLE keys IN ACCESS EXCLUSIVE MODE").execute(self.db.tx()?).await.map_err(map_err)?;
        let done = sqlx::query("UPDATE keys SET revoked = TRUE, revoked_at = coalesce(revoked_at, $2) WHERE kid = $1")
            .bind(kid)
            .bind(now)
            .execute(self.db.tx()?)
            .await
            .map_err(map_err)?;
        Ok(done.rows_affected() > 0)
    }

    async fn revoke_token(
        &mut self,
        token_id: &str,
        subject: Option<&Uid>,
        expires_at: i64,
        now: i64,
    ) -> StoreResult<()> {
        match subject {
            Some(s) => self.lock_exclusive(&subject_lock_key(s)).await?,
            None => {
                sqlx::query("LOCK TABLE revoked_tokens IN ACCESS EXCLUSIVE MODE")
                    .execute(self.db.tx()?)
                    .await
                    .map_err(map_err)?;
            }
        }
        sqlx::query(
            "INSERT INTO revoked_tokens (token_id, expires_at_secs, revoked_at) VALUES ($1, $2, $3)
             ON CONFLICT (token_id) DO UPDATE SET expires_at_secs = GREATEST(revoked_tokens.expires_at_secs, EXCLUDED.expires_at_secs)",
        )
        .bind(token_id)
        .bind(expires_at)
        .bind(now)
        .execute(self.db.tx()?)
        .await
        .map_err(map_err)?;
        Ok(())
    }

    async fn revocations_and_policy(&mut self, subject: &Uid, token_id: &str) -> StoreResult<CallState> {
        self.flush().await?;
        if self.write {
            // The subject's lock and its entity's (the principal, read later with its
            // ancestors), shared, then the read: one round trip (`call_state_locked`, whose
            // read is a new statement, so at READ COMMITTED a snapshot taken after the
            // locks). Shared locks only wait for writers of that entity, so taking the
            // principal's before the resource's changes no answer.
            self.shared_held.extend([subject_lock_key(subject), entity_lock_key(subject)]);
        }
        let sql = if self.write {
            "SELECT * FROM call_state_locked($1, $2, $3)"
        } else {
            "SELECT (SELECT revoked_at_secs FROM subjects WHERE etype = $1 AND eid = $2),
                    EXISTS (SELECT 1 FROM revoked_tokens WHERE token_id = $3),
                    (SELECT max(version) FROM policies),
                    (SELECT generation FROM policy_links_meta WHERE id = 1)"
        };
        let row: CallStateRow = sqlx::query_as(sql)
            .bind(&subject.ty)
            .bind(&subject.id)
            .bind(token_id)
            .fetch_one(self.db.tx()?)
            .await
            .map_err(map_err)?;
        Ok(call_state(row))
    }

    async fn key_and_call_state(
        &mut self,
        kid: &str,
        subject: &Uid,
        token_id: &str,
    ) -> StoreResult<Option<(KeyRecord, CallState)>> {
        // Announced: with the ancestors, in one statement (a lazy read's, without BEGIN).
        if !self.write
            && let Some(uids) = self.prefetch_read.take()
        {
            return self.key_and_read_context(kid, subject, token_id, uids).await;
        }
        self.flush().await?;
        if self.write
            && let Some(args) = self.prefetch.take()
        {
            return self.key_and_write_context(kid, subject, token_id, args).await;
        }
        // One statement: the key (its table lock taken when the statement is planned, as
        // by `key`), and in a write transaction `call_state_locked` — the subject's locks,
        // then a read with a snapshot of its own, taken after them.
        let sql = if self.write {
            self.shared_held.extend([subject_lock_key(subject), entity_lock_key(subject)]);
            "SELECT k.*, s.revoked_at_secs, s.token_revoked, s.version, s.generation
             FROM keys k CROSS JOIN LATERAL call_state_locked($2, $3, $4) AS s WHERE k.kid = $1"
        } else {
            concat!("SELECT k.*, ", read_call_state!(), " FROM keys k WHERE k.kid = $1")
        };
        let row = sqlx::query_as::<_, KeyStateRow>(sql)
            .bind(kid)
            .bind(&subject.ty)
            .bind(&subject.id)
            .bind(token_id)
            .fetch_optional(self.db.tx()?)
            .await
            .map_err(map_err)?;
        Ok(row.map(|r| {
            (KeyRecord::from(r.key), call_state((r.revoked_at_secs, r.token_revoked, r.version, r.generation)))
        }))
    }

    async fn revoke_subject(&mut self, subject: &Uid, at_secs: i64) -> StoreResult<()> {
        self.flush().await?;
        self.lock_exclusive(&subject_lock_key(subject)).await?;
        sqlx::query(
            "INSERT INTO subjects (etype, eid, revoked_at_secs) VALUES ($1, $2, $3)
             ON CONFLICT (etype, eid) DO UPDATE
             SET revoked_at_secs = GREATEST(coalesce(subjects.revoked_at_secs, 0), EXCLUDED.revoked_at_secs)",
        )
        .bind(&subject.ty)
        .bind(&subject.id)
        .bind(at_secs)
        .execute(self.db.tx()?)
        .await
        .map_err(map_err)?;
        Ok(())
    }

    async fn policy_state(&mut self) -> StoreResult<PolicyState> {
        self.flush().await?;
        let (version, links): (Option<i64>, i64) = sqlx::query_as(
            "SELECT (SELECT max(version) FROM policies), (SELECT generation FROM policy_links_meta WHERE id = 1)",
        )
        .fetch_one(self.db.tx()?)
        .await
        .map_err(map_err)?;
        Ok(policy_state_of(version, links))
    }

    async fn policy_links(&mut self) -> StoreResult<Vec<TemplateLink>> {
        self.flush().await?;
        let rows = sqlx::query_as::<_, LinkRow>("SELECT * FROM policy_links ORDER BY link_id")
            .fetch_all(self.db.tx()?)
            .await
            .map_err(map_err)?;
        Ok(rows.into_iter().map(TemplateLink::from).collect())
    }

    async fn insert_link(&mut self, l: &TemplateLink, now: i64) -> StoreResult<()> {
        self.flush().await?;
        sqlx::query("LOCK TABLE policies IN ACCESS EXCLUSIVE MODE").execute(self.db.tx()?).await.map_err(map_err)?;
        sqlx::query(
            "INSERT INTO policy_links (link_id, template_id, principal_type, principal_id, resource_type, resource_id, created_at)
             VALUES ($1, $2, $3, $4, $5, $6, $7)",
        )
        .bind(&l.link_id)
        .bind(&l.template_id)
        .bind(l.principal.as_ref().map(|u| u.ty.as_str()))
        .bind(l.principal.as_ref().map(|u| u.id.as_str()))
        .bind(l.resource.as_ref().map(|u| u.ty.as_str()))
        .bind(l.resource.as_ref().map(|u| u.id.as_str()))
        .bind(now)
        .execute(self.db.tx()?)
        .await
        .map_err(map_err)?;
        self.bump_links_generation().await?;
        Ok(())
    }

    async fn delete_link(&mut self, link_id: &str) -> StoreResult<Option<TemplateLink>> {
        self.flush().await?;
        sqlx::query("LOCK TABLE policies IN ACCESS EXCLUSIVE MODE").execute(self.db.tx()?).await.map_err(map_err)?;
        let row = sqlx::query_as::<_, LinkRow>("DELETE FROM policy_links WHERE link_id = $1 RETURNING *")
            .bind(link_id)
            .fetch_optional(self.db.tx()?)
            .await
            .map_err(map_err)?;
        if row.is_some() {
            self.bump_links_generation().await?;
        }
        Ok(row.map(TemplateLink::from))
    }

    async fn policies(&mut self, version: u64) -> StoreResult<Option<PolicyRecord>> {
        self.flush().await?;
        let row = sqlx::query_as::<_, PolicyRow>(
            "SELECT version, policies, schema, created_at FROM policies WHERE version = $1",
        )
        .bind(to_i64(version))
        .fetch_optional(self.db.tx()?)
        .await
        .map_err(map_err)?;
        Ok(row.map(PolicyRecord::from))
    }

    async fn insert_policies(&mut self, policies: &str, schema: &str, now: i64) -> StoreResult<u64> {
        self.flush().await?;
        sqlx::query("LOCK TABLE policies IN ACCESS EXCLUSIVE MODE").execute(self.db.tx()?).await.map_err(map_err)?;
        let v: i64 = sqlx::query_scalar(
            "INSERT INTO policies (version, policies, schema, created_at)
             SELECT coalesce(max(version), 0) + 1, $1, $2, $3 FROM policies RETURNING version",
        )
        .bind(policies)
        .bind(schema)
        .bind(now)
        .fetch_one(self.db.tx()?)
        .await
        .map_err(map_err)?;
        Ok(to_u64(v))
    }

    async fn policy_history(&mut self) -> StoreResult<Vec<PolicyRecord>> {
        self.flush().await?;
        let rows = sqlx::query_as::<_, PolicyRow>(
            "SELECT version, policies, schema, created_at FROM policies ORDER BY version",
        )
        .fetch_all(self.db.tx()?)
        .await
        .map_err(map_err)?;
        Ok(rows.into_iter().map(PolicyRecord::from).collect())
    }

    async fn entity(&mut self, uid: &Uid) -> StoreResult<Option<EntityRecord>> {
        self.flush().await?;
        let mapping = self.mapping.clone();
        if let Some(tm) = mapping.get(&uid.ty) {
            return self.mapped_entity(tm, uid).await;
        }
        // INVARIANT: the engine reads an entity this way before it inserts, updates or
        // deletes it, so every writer of an entity holds its exclusive lock: in a write
        // transaction `read_entity_locked` takes it, then reads (one round trip).
        let sql = if self.write {
            "SELECT etype, eid, attributes, parents, version, tags FROM read_entity_locked($1, $2)"
        } else {
            "SELECT etype, eid, attributes, parents, version, tags FROM entities WHERE etype = $1 AND eid = $2"
        };
        let row = sqlx::query_as::<_, EntityRow>(sql)
            .bind(&uid.ty)
            .bind(&uid.id)
            .fetch_optional(self.db.tx()?)
            .await
            .map_err(map_err)?;
        row.map(EntityRecord::try_from).transpose()
    }

    async fn entities_with_ancestors(&mut self, uids: &[Uid]) -> StoreResult<Vec<EntityRecord>> {
        // Read with the key already (a lazy read's one statement): no statement, no BEGIN.
        if let Some((done, rows)) = self.prefetched_read.take()
            && done == uids
        {
            return Ok(rows);
        }
        self.flush().await?;
        if uids.is_empty() {
            return Ok(Vec::new());
        }
        if self.mapping.is_empty() {
            // One round trip: `read_ancestors` walks the levels by primary key, taking each
            // level's shared locks first in a write transaction (migration 0006).
            let keys: Vec<String> = uids.iter().map(|u| format!("{}\u{1f}{}", u.ty, u.id)).collect();
            let rows = sqlx::query_as::<_, EntityRow>(
                "SELECT etype, eid, attributes, parents, version, tags FROM read_ancestors($1, $2)",
            )
            .bind(keys)
            .bind(self.write)
            .fetch_all(self.db.tx()?)
            .await
            .map_err(map_err)?;
            return rows.into_iter().map(EntityRecord::try_from).collect();
        }
        // Level by level, share-locking each level before reading it (write transactions):
        // a locked entity cannot change until this transaction ends (in the application's
        // tables neither: their triggers take the same lock), so the closure is exact.
        let mut seen: HashSet<Uid> = uids.iter().cloned().collect();
        let mut frontier: Vec<Uid> = seen.iter().cloned().collect();
        let mut out = Vec::new();
        while !frontier.is_empty() {
            if self.write {
                self.lock_shared(&frontier.iter().map(entity_lock_key).collect::<Vec<_>>()).await?;
            }
            let (own, in_tables): (Vec<Uid>, Vec<Uid>) =
                frontier.into_iter().partition(|u| self.mapping.get(&u.ty).is_none());
            let mut level = Vec::new();
            if !own.is_empty() {
                let (types, ids) = split(&own);
                let rows = sqlx::query_as::<_, EntityRow>(
                    "SELECT etype, eid, attributes, parents, version, tags FROM entities
                     WHERE (etype, eid) IN (SELECT * FROM UNNEST($1::text[], $2::text[]))",
                )
                .bind(types)
                .bind(ids)
                .fetch_all(self.db.tx()?)
                .await
                .map_err(map_err)?;
                for r in rows {
                    level.push(EntityRecord::try_from(r)?);
                }
            }
            let mut by_type: HashMap<String, Vec<String>> = HashMap::new();
            for u in in_tables {
                by_type.entry(u.ty).or_default().push(u.id);
            }
            for (ty, ids) in by_type {
                let mapping = self.mapping.clone();
                let tm = mapping.get(&ty).expect("partitioned by the mapping above");
                level.extend(self.mapped_rows(tm, ids).await?);
            }
            frontier = Vec::new();
            for e in level {
                for p in &e.parents {
                    if seen.insert(p.clone()) {
                        frontier.push(p.clone());
                    }
                }
                out.push(e);
            }
        }
        Ok(out)
    }

    async fn entity_for_write(
        &mut self,
        resource: &Uid,
        also: &[Uid],
        with_parents: bool,
    ) -> StoreResult<(Option<EntityRecord>, Vec<EntityRecord>)> {
        self.flush().await?;
        let args = WriteArgs { resource: resource.clone(), also: also.to_vec(), with_parents };
        if let Some((done, current, loaded)) = self.prefetched.take()
            && done == args
        {
            return Ok((current, loaded));
        }
        if !self.write || !self.mapping.is_empty() {
            // Entities in the application's tables take their own path (row lock first).
            return super::entity_for_write_in_steps(self, resource, also, with_parents).await;
        }
        // One round trip (`read_for_write`, migration 0008): the resource's lock exclusive
        // and its row, then the rest with their ancestors, each level's locks shared first.
        let keys: Vec<String> = also.iter().map(|u| format!("{}\u{1f}{}", u.ty, u.id)).collect();
        let rows = sqlx::query_as::<_, FlaggedEntityRow>(
            "SELECT r_resource AS is_resource, r_etype AS etype, r_eid AS eid, r_attributes AS attributes,
                    r_parents AS parents, r_version AS version, r_tags AS tags
             FROM read_for_write($1, $2, $3, $4)",
        )
        .bind(&resource.ty)
        .bind(&resource.id)
        .bind(keys)
        .bind(with_parents)
        .fetch_all(self.db.tx()?)
        .await
        .map_err(map_err)?;
        let mut current = None;
        let mut loaded = Vec::with_capacity(rows.len());
        for r in rows {
            if r.is_resource {
                current = Some(EntityRecord::try_from(r.row)?);
            } else {
                loaded.push(EntityRecord::try_from(r.row)?);
            }
        }
        Ok((current, loaded))
    }

    fn prefetch_ancestors(&mut self, uids: &[Uid]) {
        if !self.write && self.mapping.is_empty() {
            self.prefetch_read = Some(uids.to_vec());
        }
    }

    fn prefetch_for_write(&mut self, resource: &Uid, also: &[Uid], with_parents: bool) {
        // Entities in the application's tables take their own path (row lock first).
        if self.write && self.mapping.is_empty() {
            self.prefetch = Some(WriteArgs { resource: resource.clone(), also: also.to_vec(), with_parents });
        }
    }

    async fn insert_entity(&mut self, e: &EntityRecord) -> StoreResult<()> {
        self.flush().await?;
        let mapping = self.mapping.clone();
        if let Some(tm) = mapping.get(&e.uid.ty) {
            return self.mapped_insert(tm, e).await;
        }
        sqlx::query(
            "INSERT INTO entities (etype, eid, attributes, parents, version, tags) VALUES ($1, $2, $3, $4, $5, $6)",
        )
        .bind(&e.uid.ty)
        .bind(&e.uid.id)
        .bind(serde_json::to_string(&e.attributes).map_err(json_err)?)
        .bind(serde_json::to_string(&e.parents).map_err(json_err)?)
        .bind(to_i64(e.version))
        .bind(serde_json::to_string(&e.tags).map_err(json_err)?)
        .execute(self.db.tx()?)
        .await
        .map_err(map_err)?;
        Ok(())
    }

    async fn update_entity(&mut self, e: &EntityRecord) -> StoreResult<()> {
        let mapping = self.mapping.clone();
        if let Some(tm) = mapping.get(&e.uid.ty) {
            return self.mapped_update(tm, e).await;
        }
        self.flush().await?;
        // Sent with the next statement (see `deferred`); the entity's exclusive lock is
        // held already (`entity`), so nothing can come between.
        self.deferred = Some(EntityRow {
            etype: e.uid.ty.clone(),
            eid: e.uid.id.clone(),
            attributes: serde_json::to_string(&e.attributes).map_err(json_err)?,
            parents: serde_json::to_string(&e.parents).map_err(json_err)?,
            version: to_i64(e.version),
            tags: serde_json::to_string(&e.tags).map_err(json_err)?,
        });
        Ok(())
    }

    async fn delete_entity(&mut self, uid: &Uid) -> StoreResult<()> {
        self.flush().await?;
        let mapping = self.mapping.clone();
        if let Some(tm) = mapping.get(&uid.ty) {
            return self.mapped_delete(tm, uid).await;
        }
        sqlx::query("DELETE FROM entities WHERE etype = $1 AND eid = $2")
            .bind(&uid.ty)
            .bind(&uid.id)
            .execute(self.db.tx()?)
            .await
            .map_err(map_err)?;
        Ok(())
    }

    async fn savepoint(&mut self) -> StoreResult<()> {
        self.flush().await?;
        sqlx::query("SAVEPOINT lockstep_mutations").execute(self.db.tx()?).await.map_err(map_err)?;
        Ok(())
    }

    async fn rollback_to_savepoint(&mut self) -> StoreResult<()> {
        // A deferred update was made after the savepoint: undone by not sending it.
        self.deferred = None;
        sqlx::query("ROLLBACK TO SAVEPOINT lockstep_mutations").execute(self.db.tx()?).await.map_err(map_err)?;
        Ok(())
    }

    async fn claim_idempotency_key(
        &mut self,
        subject: &Uid,
        key: &str,
        request_hash: &[u8],
        now: i64,
    ) -> StoreResult<Option<(Vec<u8>, String)>> {
        // A concurrent holder of the key makes this INSERT wait until it commits (then
        // nothing is inserted and its row is read below) or rolls back (then we insert).
        let claimed = sqlx::query(
            "INSERT INTO idempotency (etype, eid, key, request_hash, response, created_at)
             VALUES ($1, $2, $3, $4, '', $5) ON CONFLICT DO NOTHING",
        )
        .bind(&subject.ty)
        .bind(&subject.id)
        .bind(key)
        .bind(request_hash)
        .bind(now)
        .execute(self.db.tx()?)
        .await
        .map_err(map_err)?;
        if claimed.rows_affected() == 1 {
            return Ok(None);
        }
        let row =
            sqlx::query("SELECT request_hash, response FROM idempotency WHERE etype = $1 AND eid = $2 AND key = $3")
                .bind(&subject.ty)
                .bind(&subject.id)
                .bind(key)
                .fetch_optional(self.db.tx()?)
                .await
                .map_err(map_err)?;
        match row {
            Some(r) => Ok(Some((r.try_get(0).map_err(map_err)?, r.try_get(1).map_err(map_err)?))),
            // Purged between the two statements: claim it again on the next attempt.
            None => Err(StoreError::Retry("idempotency record vanished".into())),
        }
    }

    async fn complete_idempotency_key(&mut self, subject: &Uid, key: &str, response: &str) -> StoreResult<()> {
        self.flush().await?;
        sqlx::query("UPDATE idempotency SET response = $4 WHERE etype = $1 AND eid = $2 AND key = $3")
            .bind(&subject.ty)
            .bind(&subject.id)
            .bind(key)
            .bind(response)
            .execute(self.db.tx()?)
            .await
            .map_err(map_err)?;
        Ok(())
    }

    async fn append_audit(&mut self, ev: &NewAuditEvent, now: i64) -> StoreResult<u64> {
        // Also returns who this transaction is, for settling an interrupted COMMIT: no
        // extra round trip (see the module doc).
        // A deferred update goes in the same statement: the audit row and the write, one
        // round trip (the update's row count comes back beside the seq).
        let d = self.deferred.take();
        let sql = if d.is_some() {
            "WITH u AS (UPDATE entities SET attributes = $11, parents = $12, version = $13, tags = $14
                        WHERE etype = $9 AND eid = $10 RETURNING 1)
             INSERT INTO audit (time, kind, principal_type, principal_id, token_id, mutations, entities, detail)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8)
             RETURNING seq, pg_current_xact_id()::text, pg_backend_pid(), (SELECT count(*) FROM u)"
        } else {
            "INSERT INTO audit (time, kind, principal_type, principal_id, token_id, mutations, entities, detail)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8) RETURNING seq, pg_current_xact_id()::text, pg_backend_pid(), 1::bigint"
        };
        let mut q = sqlx::query_as::<_, (i64, String, i32, i64)>(sql)
            .bind(now)
            .bind(ev.kind as i64)
            .bind(ev.principal.as_ref().map(|p| p.ty.as_str()))
            .bind(ev.principal.as_ref().map(|p| p.id.as_str()))
            .bind(&ev.token_id)
            .bind(audit_mutations_json(&ev.mutations)?)
            .bind(audit_entities_json(&ev.entities)?)
            .bind(&ev.detail);
        if let Some(d) = &d {
            q = q.bind(&d.etype).bind(&d.eid).bind(&d.attributes).bind(&d.parents).bind(d.version).bind(&d.tags);
        }
        let (seq, xid, pid, updated) = q.fetch_one(self.db.tx()?).await.map_err(map_err)?;
        if let Some(d) = d
            && updated != 1
        {
            return Err(StoreError::Internal(format!("update of missing entity {}::{:?}", d.etype, d.eid)));
        }
        self.pending = Some(Pending { xid, pid, audit_seq: Some(to_u64(seq)) });
        Ok(to_u64(seq))
    }

    async fn audit_events(&mut self, after_seq: u64, limit: u32) -> StoreResult<Vec<AuditEvent>> {
        self.flush().await?;
        let rows = sqlx::query_as::<_, AuditRow>("SELECT * FROM audit WHERE seq > $1 ORDER BY seq LIMIT $2")
            .bind(to_i64(after_seq))
            .bind(i64::from(limit))
            .fetch_all(self.db.tx()?)
            .await
            .map_err(map_err)?;
        rows.into_iter().map(AuditEvent::try_from).collect()
    }

    async fn audit_extent(&mut self) -> StoreResult<(u64, Option<u64>, Option<u64>)> {
        self.flush().await?;
        let (through, oldest, newest): (i64, Option<i64>, Option<i64>) = sqlx::query_as(
            "SELECT (SELECT through_seq FROM audit_trim WHERE id = 1), (SELECT min(seq) FROM audit),
                    (SELECT max(seq) FROM audit)",
        )
        .fetch_one(self.db.tx()?)
        .await
        .map_err(map_err)?;
        Ok((to_u64(through), oldest.map(to_u64), newest.map(to_u64)))
    }

    async fn audit_time_at(&mut self, seq: u64) -> StoreResult<Option<(u64, i64)>> {
        self.flush().await?;
        let row: Option<(i64, i64)> =
            sqlx::query_as("SELECT seq, time FROM audit WHERE seq >= $1 ORDER BY seq LIMIT 1")
                .bind(to_i64(seq))
                .fetch_optional(self.db.tx()?)
                .await
                .map_err(map_err)?;
        Ok(row.map(|(s, t)| (to_u64(s), t)))
    }

    async fn trim_audit(&mut self, seqs: &[u64]) -> StoreResult<u64> {
        self.flush().await?;
        let Some(&last) = seqs.last() else { return Ok(0) };
        sqlx::query("UPDATE audit_trim SET through_seq = greatest(through_seq, $1) WHERE id = 1")
            .bind(to_i64(last))
            .execute(self.db.tx()?)
            .await
            .map_err(map_err)?;
        let seqs: Vec<i64> = seqs.iter().map(|s| to_i64(*s)).collect();
        let done = sqlx::query("DELETE FROM audit WHERE seq = ANY($1)")
            .bind(seqs)
            .execute(self.db.tx()?)
            .await
            .map_err(map_err)?;
        Ok(done.rows_affected())
    }

    async fn purge(&mut self, now_secs: i64, idempotency_before: i64) -> StoreResult<(u64, u64)> {
        self.flush().await?;
        let tokens = sqlx::query("DELETE FROM revoked_tokens WHERE expires_at_secs < $1")
            .bind(now_secs)
            .execute(self.db.tx()?)
            .await
            .map_err(map_err)?;
        let keys = sqlx::query("DELETE FROM idempotency WHERE created_at < $1")
            .bind(idempotency_before)
            .execute(self.db.tx()?)
            .await
            .map_err(map_err)?;
        Ok((tokens.rows_affected(), keys.rows_affected()))
    }

    /// Commits; an interrupted COMMIT is settled for `SETTLE_WINDOW`.
    async fn commit(self: Box<Self>) -> StoreResult<()> {
        self.commit_before(None).await
    }

    /// Commits. When the connection fails during COMMIT the outcome is unknown to us: it
    /// is then settled by asking the database about this transaction id until `deadline`
    /// (see the module doc), so that a committed call is never answered UNAVAILABLE and an
    /// uncommitted one is not answered UNKNOWN when the database is back in time.
    async fn commit_before(self: Box<Self>, deadline: Option<Instant>) -> StoreResult<()> {
        let mut this = self;
        if !matches!(this.db, Db::Open(_)) {
            // A lazy read that ran its one statement (or none): nothing to commit; the
            // connection goes back to the pool outside any transaction.
            return Ok(());
        }
        this.flush().await?;
        let PgTxn { db, write, pool, pending, .. } = *this;
        let Db::Open(mut tx) = db else { return Ok(()) };
        let pending = match pending {
            Some(p) => Some(p),
            // Rare (housekeeping, a repeated idempotent request): one statement.
            None if write => {
                let (xid, pid): (Option<String>, i32) =
                    sqlx::query_as("SELECT pg_current_xact_id_if_assigned()::text, pg_backend_pid()")
                        .fetch_one(&mut *tx)
                        .await
                        .map_err(map_err)?;
                xid.map(|xid| Pending { xid, pid, audit_seq: None })
            }
            None => None,
        };
        match tx.commit().await.map_err(map_err) {
            Err(StoreError::Unavailable(m)) => match pending {
                // Wrote nothing: whatever happened, nothing was committed.
                None => Err(StoreError::Unavailable(m)),
                Some(p) => {
                    let until = deadline.unwrap_or_else(|| Instant::now() + SETTLE_WINDOW);
                    settle(&pool, &p, until, &m).await
                }
            },
            other => other,
        }
    }
}

/// Creates `SCHEMA` and moves the tables of a release that kept them in `public` into it
/// (recognised by `public.policy_links_meta` beside `public._sqlx_migrations`), in one
/// transaction under an advisory lock, so that instances starting together do it once.
async fn prepare_schema(pool: &PgPool) -> Result<(), sqlx::Error> {
    let mut tx = pool.begin().await?;
    sqlx::query("SELECT pg_advisory_xact_lock(hashtextextended('lockstep\u{1f}schema', 0))").execute(&mut *tx).await?;
    let exists: bool = sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_namespace WHERE nspname = $1)")
        .bind(SCHEMA)
        .fetch_one(&mut *tx)
        .await?;
    if !exists {
        sqlx::query(sqlx::AssertSqlSafe(format!("CREATE SCHEMA {SCHEMA}"))).execute(&mut *tx).await?;
    }
    let legacy: bool = sqlx::query_scalar(
        "SELECT to_regclass('public._sqlx_migrations') IS NOT NULL AND to_regclass('public.policy_links_meta') IS NOT NULL
                AND to_regclass('lockstep._sqlx_migrations') IS NULL",
    )
    .fetch_one(&mut *tx)
    .await?;
    if legacy {
        for t in LEGACY_TABLES {
            sqlx::query(sqlx::AssertSqlSafe(format!("ALTER TABLE IF EXISTS public.{t} SET SCHEMA {SCHEMA}")))
                .execute(&mut *tx)
                .await?;
        }
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "ALTER FUNCTION public.lockstep_audit_append_only() SET SCHEMA {SCHEMA}"
        )))
        .execute(&mut *tx)
        .await?;
        tracing::info!("moved Lockstep's tables from schema public into schema {SCHEMA}");
    }
    tx.commit().await
}

/// What became of a transaction, as far as the database can tell.
enum XactStatus {
    Committed,
    Aborted,
    InProgress,
    /// Older than the commit log kept, and no audit event to look up.
    Forgotten,
}

/// Asks once, on `conn` (opened first if needed), what became of `p`. A transaction still
/// in progress has its old backend ended (only while that backend still holds its xid; an
/// error there, e.g. a missing privilege, leaves it to finish by itself).
async fn ask(conn: &mut Option<PgConnection>, pool: &PgPool, p: &Pending) -> Result<XactStatus, sqlx::Error> {
    if conn.is_none() {
        *conn = Some(PgConnection::connect_with(&pool.connect_options()).await?);
    }
    let c = conn.as_mut().expect("connected above");
    let status: Option<String> =
        sqlx::query_scalar("SELECT pg_xact_status($1::xid8)::text").bind(&p.xid).fetch_one(&mut *c).await?;
    Ok(match status.as_deref() {
        Some("committed") => XactStatus::Committed,
        Some("aborted") => XactStatus::Aborted,
        Some(_) => {
            let ended = sqlx::query_scalar::<_, Option<bool>>(
                "SELECT bool_or(pg_terminate_backend(pid)) FROM pg_stat_activity
                 WHERE pid = $2 AND backend_xid = $1::xid8::xid",
            )
            .bind(&p.xid)
            .bind(p.pid)
            .fetch_one(&mut *c)
            .await;
            if let Err(e) = ended {
                tracing::debug!(pid = p.pid, error = %e, "cannot end the backend of an interrupted COMMIT");
            }
            XactStatus::InProgress
        }
        // Older than the commit log: nothing of it is in progress, so its audit event
        // (if it wrote one) tells.
        None => match p.audit_seq {
            None => XactStatus::Forgotten,
            Some(seq) => {
                let found =
                    sqlx::query("SELECT 1 FROM audit WHERE seq = $1").bind(to_i64(seq)).fetch_optional(&mut *c).await?;
                if found.is_some() { XactStatus::Committed } else { XactStatus::Aborted }
            }
        },
    })
}

/// Settles an interrupted COMMIT of `p` by `until` (the protocol is in the module doc).
/// `cause`: why COMMIT failed, for the answer.
async fn settle(pool: &PgPool, p: &Pending, until: Instant, cause: &str) -> StoreResult<()> {
    let t0 = Instant::now();
    let mut conn: Option<PgConnection> = None;
    let mut backoff = Duration::from_millis(10);
    let mut last = "no answer in time".to_owned();
    let mut asked = 0u32;
    let mut told_to_end = false;
    let committed = loop {
        asked += 1;
        let Ok(status) = tokio::time::timeout_at(until, ask(&mut conn, pool, p)).await else { break None };
        match status {
            Ok(XactStatus::Committed) => break Some(true),
            Ok(XactStatus::Aborted) => break Some(false),
            Ok(XactStatus::InProgress) => {
                if !told_to_end {
                    // Its old backend was just told to end: ask again soon.
                    told_to_end = true;
                    backoff = Duration::from_millis(10);
                }
            }
            Ok(XactStatus::Forgotten) => {
                last = "its xid is older than the commit log and it wrote no audit event".into();
                break None;
            }
            Err(e) => {
                last = e.to_string();
                conn = None;
            }
        }
        let pause = backoff.min(until.saturating_duration_since(Instant::now()));
        if pause.is_zero() {
            break None;
        }
        tokio::time::sleep(pause).await;
        backoff = (backoff * 2).min(Duration::from_millis(250));
    };
    if let Some(c) = conn {
        tokio::spawn(async move {
            let _ = c.close().await;
        });
    }
    let elapsed = t0.elapsed();
    match committed {
        Some(true) => {
            tracing::warn!(xid = %p.xid, asked, ?elapsed, "COMMIT was interrupted; it committed");
            Ok(())
        }
        Some(false) => {
            tracing::warn!(xid = %p.xid, asked, ?elapsed, "COMMIT was interrupted; it did not commit");
            Err(StoreError::Unavailable(format!(
                "the connection failed during COMMIT ({cause}) and the transaction did not commit; nothing was \
                 committed, retry"
            )))
        }
        None => {
            tracing::error!(xid = %p.xid, asked, ?elapsed, error = %last, "COMMIT was interrupted; outcome unknown");
            let seq = p.audit_seq.map_or_else(|| "no audit event".to_owned(), |s| format!("audit seq {s}"));
            Err(StoreError::Unknown(format!(
                "the connection failed during COMMIT ({cause}) and the database could not tell in time whether it \
                 committed ({last}): transaction {} ({seq}) committed if `SELECT pg_xact_status('{}')` says so",
                p.xid, p.xid
            )))
        }
    }
}
