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
//! | its subject's advisory lock, shared, taken **before** the revocation reads (by the statement before them, with its principal entity's, shared) | RevokeSubject and logout: the same lock, exclusive |
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
//! share-lock; frequent ones take advisory locks, which write nothing and queue fairly.
//! Deadlocks and serialization failures (40P01, 40001) are retried by the engine.
//! Read-only calls use a REPEATABLE READ snapshot and take no row locks.
//!
//! # Round trips
//!
//! Statements go through tokio-postgres, which sends requests awaited together in one
//! write and the server runs them in order (pipelining); each is still its own statement,
//! so at READ COMMITTED each takes its own snapshot, after the locks of the ones before
//! it. An AuthorizeAndCommit of one mutation by a token verified before is two round
//! trips (`txn`): BEGIN, the locks (`WRITE_LOCKS`) and the read (`WRITE_CONTEXT`: key,
//! call state, resource, principal, and ancestors only where there are parents); then
//! the entity update with the audit insert as one statement, and COMMIT. A request the
//! database refuses with the write ends in COMMIT answering ROLLBACK: nothing commits.
//! An Authorize is one statement without BEGIN (`Db::Lazy`). A transaction dropped
//! before COMMIT is rolled back before its connection is reused.
//!
//! # One round trip (speculative writes)
//!
//! Each instance remembers what it last saw committed (`speculate::Recall`): keys (with a
//! hash of the row), subjects' `revoked_at_secs`, the policy version and links generation,
//! and own-store entities as stored (text), or that they did not exist. It learns them from
//! the read of a two-round-trip write, and from its own commits (the rows it wrote). A lone
//! update or delete of an own-store entity by a token verified before (no idempotency key,
//! nothing mapped), whose key, subject, policy state, resource, principal and every
//! ancestor of both were seen, is decided on what was seen, with nothing sent; its COMMIT
//! is then one round trip: BEGIN; the same locks as a full read takes (`WRITE_LOCKS`, then
//! the seen ancestors' entity locks, shared); one statement that — with a snapshot taken
//! after those locks, as the full read's — checks that everything the decision used is as
//! seen (the key row's hash, the subject's revocation, no revocation of the token, the
//! policy version and generation, each entity's stored text and version, or its absence)
//! and only then updates the entity and inserts the audit row (`speculative_statement`);
//! COMMIT. So it commits exactly what a full read under the same locks would have decided,
//! or writes nothing: found changed, it answers `Retry(SPECULATION_STALE)` and the engine
//! reads again in full, at once (the resource is read in full for a second). A revoking
//! change that commits first is seen by the check (its locks are the ones a full read
//! waits for); one that commits later waits for this write's locks, as before. Anything
//! the decision needs beyond what was seen (a statement, an error such as an `if_version`
//! mismatch or a revoked token) gives the attempt up before it sent anything
//! (`Retry(SPECULATION_ABANDONED)`), and the call is read in full. A denial is speculative
//! too: its audit event is inserted only if the state it was denied on still holds.
//!
//! # Settling an interrupted COMMIT
//!
//! When the connection fails while COMMIT is on its way (sent, no answer), the
//! transaction may have committed, may have aborted, or may still be committing on its
//! old backend, which keeps running without a client. The store does not guess:
//!
//! 1. Before COMMIT it knows the transaction id and the backend: the first read of a
//!    write sent in two round trips, or else the audit insert (the last statement of
//!    every audited transaction), also returns `pg_current_xact_id()` and
//!    `pg_backend_pid()` (no extra round trip; a write transaction without an audit
//!    event asks with one statement, `pg_current_xact_id_if_assigned()`: NULL means it
//!    wrote nothing, so there is nothing to settle). When the audit insert went with
//!    COMMIT and its answer was lost, a committed transaction's seq is read back by its
//!    `xmin` (`settle::recover_seq`).
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
//!
//! A speculative write sends COMMIT before any answer, so when all its answers are lost
//! its xid is unknown. Its audit row carries a random `nonce` (migration 0013) and it knows
//! an audit seq committed before it began (its own is greater) and its connection's backend
//! (pid and start time, asked once per connection). `settle::settle_unseen` ends that
//! backend if it still runs (`pg_terminate_backend`, matched on pid and start time), waits
//! until it is gone — from then on nothing of it can commit — and looks for the nonce among
//! the audit rows after that seq: found, OK with its seq; absent, UNAVAILABLE (nothing was
//! committed). When the writing statement answered and only COMMIT's answer was lost, it is
//! settled by its xid as above.

mod settle;
mod speculate;
mod txn;
mod wire;

use super::mapped;
use super::{Store, StoreResult, Txn};
use crate::config::StoreOptions;
use crate::mapping::{ColumnType, IdType, Mapping, ParentSource, TypeMap};
use async_trait::async_trait;
use deadpool_postgres::{Manager, ManagerConfig, Object, Pool, RecyclingMethod, Runtime};
use sqlx::Connection;
use sqlx::postgres::{PgConnectOptions, PgConnection};
use std::collections::{HashMap, HashSet};
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;
use tokio_postgres::Client;
use txn::{BEGIN_WRITE, Db, PgTxn};
use wire::map_pool_err;

pub(crate) use settle::Pending;

/// How long an interrupted COMMIT of a call without a deadline is settled (see the module
/// doc): long enough for a failover or a restart of the proxy in front of the database,
/// short enough that a caller without a deadline is not held indefinitely.
pub const SETTLE_WINDOW: Duration = Duration::from_secs(5);

/// The PostgreSQL store. Statements go through tokio-postgres (`txn`), which sends what is
/// awaited together in one round trip; the migrations run through sqlx, as on SQLite.
pub struct PgStore {
    pool: Pool,
    /// How the pool connects: also for the connections that settle a COMMIT.
    connect: Arc<tokio_postgres::Config>,
    /// How long one round trip may take (see `PgTxn::limit`).
    limit: Duration,
    /// Entity types kept in the application's tables (see `mapped_*` in `txn`).
    mapping: Arc<Mapping>,
    /// How a read-only transaction begins (`txn::begin_read`).
    begin_read: &'static str,
    /// What this instance last saw committed, for speculative writes (`speculate`).
    recall: Arc<speculate::Recall>,
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

/// The session settings of every connection.
fn session_settings(opts: &StoreOptions) -> Vec<(&'static str, String)> {
    vec![
        ("statement_timeout", opts.statement_timeout.as_millis().to_string()),
        ("idle_in_transaction_session_timeout", "60000".into()),
        // Lockstep's schema first (its own statements name tables unqualified), then
        // public: the application's triggers that fire on Lockstep's writes to mapped
        // tables find their unqualified tables there.
        ("search_path", format!("{SCHEMA},public")),
        // Timestamps of mapped columns are read and written as UTC.
        ("TimeZone", "UTC".into()),
        // Lockstep's own writes skip the guard triggers (migration 0005): they hold the
        // entity locks the triggers would take.
        ("lockstep.writer", "on".into()),
        // Each prepared statement is planned once per connection. Its statements read by key
        // (and say so where a planner could think otherwise: `OFFSET 0` in `txn.rs`), so one
        // generic plan is right for every argument; PostgreSQL's default planned Authorize's
        // statement anew on every call, which cost more than running it.
        ("plan_cache_mode", "force_generic_plan".into()),
    ]
}

impl PgStore {
    /// Runs the migrations (on a connection of their own), then opens the pool lazily: it
    /// opens connections on demand, so a server keeps answering (NOT_SERVING) while the
    /// database is down later.
    pub async fn open(url: &str, opts: &StoreOptions) -> anyhow::Result<Self> {
        let settings = session_settings(opts);
        let migrations = PgConnectOptions::from_str(url)
            .map_err(|e| anyhow::anyhow!("invalid PostgreSQL URL: {e}"))?
            .application_name("lockstep")
            .options(settings.iter().map(|(k, v)| (*k, v.as_str())));
        let mut connect = tokio_postgres::Config::from_str(url)
            .map_err(|e| anyhow::anyhow!("invalid PostgreSQL URL (as tokio-postgres reads it): {e}"))?;
        let options: Vec<String> = settings.iter().map(|(k, v)| format!("-c {k}={v}")).collect();
        connect.application_name("lockstep").options(options.join(" "));
        if connect.get_connect_timeout().is_none() {
            connect.connect_timeout(opts.acquire_timeout);
        }
        // A peer gone without a reset (a failover, a dropped NAT entry) is noticed: idle
        // connections by keepalives, busy ones by unacknowledged data and by `limit`.
        connect
            .keepalives(true)
            .keepalives_idle(Duration::from_secs(10))
            .keepalives_interval(Duration::from_secs(2))
            .keepalives_retries(3)
            .tcp_user_timeout(opts.statement_timeout + Duration::from_secs(5));
        let migrate = async {
            let mut conn = PgConnection::connect_with(&migrations).await?;
            prepare_schema(&mut conn).await?;
            sqlx::migrate!("migrations/postgres").run(&mut conn).await?;
            conn.close().await?;
            Ok::<(), anyhow::Error>(())
        };
        migrate.await.map_err(|e| anyhow::anyhow!("cannot reach or migrate the PostgreSQL database: {e}"))?;
        let manager = Manager::from_config(
            connect.clone(),
            tokio_postgres::NoTls,
            ManagerConfig { recycling_method: RecyclingMethod::Fast },
        );
        let pool = Pool::builder(manager)
            .max_size(opts.max_connections.max(2) as usize)
            .wait_timeout(Some(opts.acquire_timeout))
            .create_timeout(Some(opts.acquire_timeout))
            .runtime(Runtime::Tokio1)
            .build()
            .map_err(|e| anyhow::anyhow!("cannot build the PostgreSQL pool: {e}"))?;
        // A round trip carries at most three statements, each bounded by the statement
        // timeout on the server; a connection silent for longer is given up.
        let limit = opts.statement_timeout * 3 + Duration::from_secs(2);
        let begin_read = txn::begin_read(&opts.mapping);
        Ok(Self {
            pool,
            connect: Arc::new(connect),
            limit,
            mapping: opts.mapping.clone(),
            begin_read,
            recall: Default::default(),
        })
    }

    /// Settles the outcome of transaction `xid` (text of `pg_current_xact_id()`), last run
    /// by backend `pid`, as `commit` does when the COMMIT acknowledgement is lost. Public
    /// so that the outage tests can settle a transaction they hold open themselves.
    #[doc(hidden)]
    pub async fn settle(&self, xid: &str, pid: i32, audit_seq: Option<u64>, until: Instant) -> StoreResult<()> {
        let p = Pending { xid: xid.to_owned(), pid, audit_seq };
        settle::settle(&self.connect, &p, until, "settled on request").await
    }

    /// A pooled connection; the time waited for it is measured.
    async fn acquire(&self) -> StoreResult<Object> {
        let started = std::time::Instant::now();
        let conn = self.pool.get().await.map_err(map_pool_err)?;
        metrics::histogram!(crate::telemetry::POOL_WAIT_SECONDS).record(started.elapsed().as_secs_f64());
        Ok(conn)
    }

    fn txn(&self, db: Db, write: bool) -> PgTxn {
        PgTxn {
            db,
            write,
            connect: self.connect.clone(),
            limit: self.limit,
            pending: None,
            mapping: self.mapping.clone(),
            begin_read: self.begin_read,
            read: HashMap::new(),
            shared_held: HashSet::new(),
            deferred: None,
            last_audit: None,
            prefetch: None,
            prefetched: None,
            prefetch_read: None,
            prefetched_read: None,
            recall: self.recall.clone(),
            speculation: None,
            wrote: Vec::new(),
            touched: Vec::new(),
        }
    }
}

#[async_trait]
impl Store for PgStore {
    async fn write(&self) -> StoreResult<Box<dyn Txn>> {
        // READ COMMITTED; BEGIN goes with the first statement.
        Ok(Box::new(self.txn(Db::Begin(self.acquire().await?, BEGIN_WRITE), true)))
    }

    async fn read(&self) -> StoreResult<Box<dyn Txn>> {
        Ok(Box::new(self.txn(Db::Begin(self.acquire().await?, self.begin_read), false)))
    }

    async fn read_single(&self) -> StoreResult<Box<dyn Txn>> {
        // A connection without BEGIN: see `Db::Lazy`.
        Ok(Box::new(self.txn(Db::Lazy(self.acquire().await?), false)))
    }

    async fn retention_lock(&self) -> StoreResult<Option<Box<dyn std::any::Any + Send>>> {
        // A session lock on a connection of its own, closed (not returned to the pool) when
        // the guard is dropped: the lock goes with the session, even if the run is cut off.
        let conn = self.acquire().await?;
        let got: bool = conn
            .query_one(
                "SELECT pg_try_advisory_lock(hashtextextended('lockstep' || chr(31) || 'audit-retention', 0))",
                &[],
            )
            .await
            .map_err(wire::map_err)?
            .get(0);
        if !got {
            return Ok(None);
        }
        Ok(Some(Box::new(Object::take(conn))))
    }

    fn pool_connections(&self) -> Option<(u32, u32)> {
        let s = self.pool.status();
        let size = u32::try_from(s.size).unwrap_or(u32::MAX);
        Some((size, u32::try_from(s.available).unwrap_or(u32::MAX).min(size)))
    }

    async fn ping(&self) -> StoreResult<()> {
        let conn = self.acquire().await?;
        conn.execute("SELECT max(version) FROM policies", &[]).await.map_err(wire::map_err)?;
        Ok(())
    }

    fn mapping(&self) -> Arc<Mapping> {
        self.mapping.clone()
    }

    async fn mapping_problems(&self) -> StoreResult<Vec<String>> {
        let conn = self.acquire().await?;
        let mut problems = Vec::new();
        for tm in self.mapping.types() {
            check_type_catalog(&conn, &self.mapping, tm, &mut problems).await?;
        }
        if !problems.is_empty() {
            return Ok(problems);
        }
        for (table, ty, col, vcol) in self.mapping.guarded_tables() {
            let name = guard_name(&ty, &col, vcol.as_deref());
            let row = conn
                .query_opt(
                    "SELECT t.tgtype::int4,
                            coalesce(t.tgqual IS NULL AND cardinality(t.tgattr::int2[]) = 0 AND t.tgconstraint = 0
                              AND p.oid = to_regprocedure('lockstep.guard()') AND NOT p.prosecdef AND p.provolatile = 'v'
                              AND p.prolang = (SELECT oid FROM pg_language WHERE lanname = 'plpgsql')
                              AND p.proconfig = ARRAY['search_path=pg_catalog, pg_temp']
                              AND p.proowner = (SELECT nspowner FROM pg_namespace WHERE nspname = 'lockstep'), false),
                            t.tgargs, p.prosrc,
                            EXISTS (SELECT 1 FROM pg_inherits WHERE inhparent = t.tgrelid) AS children,
                            (SELECT string_agg(o.tgname, ', ') FROM pg_trigger o
                             WHERE o.tgrelid = t.tgrelid AND NOT o.tgisinternal AND o.tgname > t.tgname
                               AND o.tgtype & 3 = 3 AND o.tgtype & 20 <> 0 AND o.tgenabled <> 'D') AS later
                     FROM pg_trigger t JOIN pg_proc p ON p.oid = t.tgfoid
                     WHERE t.tgrelid = to_regclass($1) AND t.tgname = $2 AND t.tgenabled = 'A' AND NOT t.tgisinternal",
                    &[&mapped::qt(&table, Some("public")), &name],
                )
                .await
                .map_err(wire::map_err)?;
            let Some(row) = row else {
                problems.push(format!(
                    "{} (entity type {ty}): trigger {name} is not installed and enabled ALWAYS (disabled, \
                     `ENABLE REPLICA`, plain `ENABLE`, or installed by an older release: it would not fire in every \
                     session, e.g. not under session_replication_role = replica), so direct writes to it would not \
                     be ordered with Lockstep's decisions; run `lockstep mapping install`",
                    qualified(&table)
                ));
                continue;
            };
            let args = format!("{ty}\0{col}\0{}\0", vcol.as_deref().unwrap_or(""));
            // (A column that cannot be read counts against the guard: never a panic here.)
            let as_installed = row.try_get::<_, i32>(0).is_ok_and(|t| t == GUARD_TRIGGER_TYPE)
                && row.try_get::<_, bool>(1).unwrap_or(false)
                && row.try_get::<_, &[u8]>(2).is_ok_and(|a| a == args.as_bytes())
                && row.try_get::<_, &str>(3).is_ok_and(|b| b == guard_body());
            if !as_installed {
                problems.push(format!(
                    "{} (entity type {ty}): trigger {name} is not the guard `lockstep mapping install` creates (its \
                     events, timing, WHEN condition, columns, arguments or function differ, or the function \
                     lockstep.guard() was changed: its body, language, volatility, SECURITY DEFINER, settings or \
                     owner), so direct writes to it may not be ordered with Lockstep's decisions; run `lockstep \
                     mapping install` (as the owner of the schema lockstep)",
                    qualified(&table)
                ));
            }
            if row.try_get::<_, bool>(4).unwrap_or(true) {
                problems.push(format!(
                    "{} (entity type {ty}) has inheritance children or partitions: rows written to them do not fire \
                     its guard, yet Lockstep reads them; map a table without children",
                    qualified(&table)
                ));
            }
            if let Some(later) = row.try_get::<_, Option<String>>(5).unwrap_or_else(|_| Some("(unreadable)".into())) {
                problems.push(format!(
                    "{} (entity type {ty}): BEFORE INSERT/UPDATE row trigger(s) {later} fire after the guard {name} \
                     (triggers fire in name order) and could change the row after it took its lock; rename them to \
                     sort before `lockstep_guard_`, or make them AFTER triggers",
                    qualified(&table)
                ));
            }
        }
        Ok(problems)
    }

    async fn install_mapping(&self) -> StoreResult<Vec<String>> {
        let mut conn = self.acquire().await?;
        let tx = conn.transaction().await.map_err(wire::map_err)?;
        // The guard function as this release defines it (a copy changed by hand is replaced).
        tx.batch_execute(GUARD_SQL).await.map_err(wire::map_err)?;
        let mut done = Vec::new();
        for (table, ty, col, vcol) in self.mapping.guarded_tables() {
            let name = guard_name(&ty, &col, vcol.as_deref());
            let lit = |s: &str| format!("'{}'", s.replace('\'', "''"));
            // ENABLE ALWAYS: an ordinary trigger does not fire in sessions with
            // session_replication_role = replica (logical replication's apply, bulk loads),
            // whose writes would then go unordered.
            let sql = format!(
                "CREATE OR REPLACE TRIGGER {name_q} BEFORE INSERT OR UPDATE OR DELETE ON {table_q} FOR EACH ROW \
                 EXECUTE FUNCTION {SCHEMA}.guard({}, {}, {});
                 ALTER TABLE {table_q} ENABLE ALWAYS TRIGGER {name_q}",
                lit(&ty),
                lit(&col),
                lit(vcol.as_deref().unwrap_or("")),
                name_q = mapped::q(&name),
                table_q = mapped::qt(&table, Some("public")),
            );
            tx.batch_execute(&sql).await.map_err(wire::map_err)?;
            done.push(format!("{}: trigger {name} (entity type {ty}, column {col})", qualified(&table)));
        }
        tx.commit().await.map_err(wire::map_err)?;
        Ok(done)
    }
}

/// The guard function's definition (the last migration that defines it): `mapping
/// install` runs it again, and `mapping check` compares the installed body with it.
const GUARD_SQL: &str = include_str!("../../../migrations/postgres/0012_guard_owner.sql");

/// The body of `GUARD_SQL`'s function, as PostgreSQL keeps it (`pg_proc.prosrc`).
fn guard_body() -> &'static str {
    GUARD_SQL.split("$$").nth(1).unwrap_or_default()
}

/// `pg_trigger.tgtype` of a guard: FOR EACH ROW (1), BEFORE (2), INSERT (4), DELETE (8),
/// UPDATE (16); not TRUNCATE or INSTEAD OF.
const GUARD_TRIGGER_TYPE: i32 = 1 | 2 | 4 | 8 | 16;

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
        // Not `character` (char(n)): it pads with spaces and compares without them, so one row
        // would answer to `x` and to `x   `, under two entity locks.
        IdType::Text => matches!(data_type, "text" | "character varying" | "USER-DEFINED"),
        IdType::Integer => matches!(data_type, "smallint" | "integer" | "bigint"),
        IdType::Uuid => data_type == "uuid",
    }
}

/// A column of a mapped table, as the catalog has it.
struct CatalogColumn {
    data_type: String,
    udt_name: String,
    /// Why the column cannot hold an id that entity locks are keyed by (None: it can).
    not_a_key: Option<String>,
}

/// The columns of a table by name; None when there is no such table.
async fn catalog_columns(
    conn: &Client,
    t: &crate::mapping::TableName,
) -> StoreResult<Option<HashMap<String, CatalogColumn>>> {
    let schema = t.schema.as_deref().unwrap_or("public");
    // A key column must hold one spelling per row, known when the guard runs (BEFORE the
    // row is written): not a generated column (computed after BEFORE triggers: the guard
    // would lock nothing), not a nondeterministic collation or a base type of an extension
    // (citext: `X` and `x` one row, two locks). Enums compare exactly.
    let rows = conn
        .query(
            "SELECT c.column_name::text, c.data_type::text, c.udt_name::text,
                    CASE WHEN a.attgenerated <> '' THEN 'a generated column (computed after the guard runs, which \
                         would lock nothing)'
                         WHEN co.oid IS NOT NULL AND NOT co.collisdeterministic THEN 'under a nondeterministic \
                         collation (two spellings of one id would match one row under two entity locks)'
                         WHEN c.data_type = 'USER-DEFINED' AND ty.typtype <> 'e' THEN 'of a user-defined type other \
                         than an enum (its equality may match two spellings of one id under two entity locks)'
                    END
             FROM information_schema.columns c
             JOIN pg_attribute a ON a.attrelid = to_regclass(quote_ident(c.table_schema) || '.' || quote_ident(c.table_name))
                                AND a.attname = c.column_name
             JOIN pg_type ty ON ty.oid = a.atttypid
             LEFT JOIN pg_collation co ON co.oid = a.attcollation
             WHERE c.table_schema = $1 AND c.table_name = $2",
            &[&schema, &t.name],
        )
        .await
        .map_err(wire::map_err)?;
    if rows.is_empty() {
        return Ok(None);
    }
    rows.iter()
        .map(|r| {
            Ok((
                wire::at::<String>(r, 0)?,
                CatalogColumn { data_type: wire::at(r, 1)?, udt_name: wire::at(r, 2)?, not_a_key: wire::at(r, 3)? },
            ))
        })
        .collect::<StoreResult<HashMap<_, _>>>()
        .map(Some)
}

/// Checks one mapped type against the live catalog; problems name type, table and column.
async fn check_type_catalog(
    conn: &Client,
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
        Some(c) if !fits(&c.data_type, &c.udt_name) => {
            Some(format!("entity type {et}: {what}: column {table}.{col} is {}, which cannot hold {want}", c.data_type))
        }
        Some(_) => None,
    };
    problems.extend(key_column(&cols, &table, &tm.id_column, tm.id_type).map(|p| format!("entity type {et}: id: {p}")));
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
                problems.extend(
                    key_column(&cols, &table, c, parent_id(pty))
                        .map(|p| format!("entity type {et}: parent {pty}: {p}")),
                );
            }
            ParentSource::Join { table: jt, child, parent } => {
                let Some(jcols) = catalog_columns(conn, jt).await? else {
                    problems
                        .push(format!("entity type {et}: parent {pty}: join table {} does not exist", qualified(jt)));
                    continue;
                };
                for (c, idt) in [(child, tm.id_type), (parent, parent_id(pty))] {
                    problems.extend(
                        key_column(&jcols, &qualified(jt), c, idt)
                            .map(|p| format!("entity type {et}: parent {pty}: {p}")),
                    );
                }
            }
        }
    }
    Ok(())
}

/// What keeps column `col` of `table` from holding ids of `idt` that entity locks are keyed
/// by (an id, a parent reference, a join table's child or parent), if anything: it is
/// missing, of a type that cannot hold such ids, or cannot serve as a key (`not_a_key`).
fn key_column(cols: &HashMap<String, CatalogColumn>, table: &str, col: &str, idt: IdType) -> Option<String> {
    let Some(c) = cols.get(col) else { return Some(format!("column {table}.{col} does not exist")) };
    if !id_fits(idt, &c.data_type) {
        return Some(format!("column {table}.{col} is {}, which cannot hold {} ids", c.data_type, idt.name()));
    }
    c.not_a_key.as_deref().map(|why| format!("column {table}.{col} cannot hold ids: it is {why}"))
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

/// Creates `SCHEMA` and moves the tables of a release that kept them in `public` into it
/// (recognised by `public.policy_links_meta` beside `public._sqlx_migrations`), in one
/// transaction under an advisory lock, so that instances starting together do it once.
async fn prepare_schema(conn: &mut PgConnection) -> Result<(), sqlx::Error> {
    let mut tx = conn.begin().await?;
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
