//! The SQLite store: the embedded default. One writer connection shared by group
//! commit (below), and a small pool of readers that never block (WAL).
//!
//! Statements run through rusqlite in the calling task, not on a driver thread: a call is
//! about nine short statements, and handing each to another thread and back cost more CPU
//! than the statements themselves (perf: ~30 % in futex and scheduler). Only what can
//! wait on the disk or on another process leaves the task: `COMMIT` (its fsync) runs on
//! a blocking thread, and `BEGIN IMMEDIATE` is retried asynchronously until the busy
//! timeout. Migrations run through sqlx when the store opens.
//!
//! # Group commit
//!
//! Write transactions take turns on the one writer connection (a FIFO queue). The first
//! of a group opens `BEGIN IMMEDIATE`; each member then works inside its own
//! `SAVEPOINT lockstep_member`, so it sees everything the members before it wrote, and a
//! member that fails or is abandoned rolls back only its own savepoint. A member that
//! commits releases its savepoint and waits; a committer task queues for the connection
//! behind the members already waiting and then runs one `COMMIT` (one fsync) for the
//! whole group, and only then answers every member. If that `COMMIT` fails, every member
//! of the group gets the error and nothing of the group is committed. Members run one at
//! a time, so the serial order of the locking protocol (see `Txn`) is unchanged: a
//! revocation that committed is seen by every later member, and one in the same group
//! is seen by the members after it, which commit (or fail) together with it.

use super::mapped::{self, ColumnValue};
use super::{
    AuditRow, CallStateRow, EntityRow, GroupCommitStats, KeyRow, LinkRow, PolicyRow, Store, StoreError, StoreResult,
    Txn, audit_entities_json, audit_mutations_json, call_state, json_err, policy_state_of, to_i64, to_u64,
};
use crate::config::StoreOptions;
use crate::mapping::{ColumnType, IdType, Mapping, ParentSource, TypeMap};
use crate::model::{
    AuditEvent, CallState, EntityRecord, KeyRecord, NewAuditEvent, PolicyRecord, PolicyState, TemplateLink, Uid,
};
use async_trait::async_trait;
use rusqlite::{Connection, ErrorCode, OpenFlags, OptionalExtension, params};
use serde_json::{Map, Value};
use sqlx::ConnectOptions;
use sqlx::sqlite::{SqliteAutoVacuum, SqliteConnectOptions, SqliteJournalMode, SqliteSynchronous};
use std::collections::HashMap;
use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;
use tokio::sync::{Mutex, Notify, OwnedMutexGuard, OwnedSemaphorePermit, Semaphore, oneshot};

pub struct SqliteStore {
    /// The one writer connection: the queue for it is the writers' queue, so no writer
    /// ever sees "database is locked" from another writer of this process.
    writer: Arc<Mutex<Writer>>,
    /// Wakes the committer task.
    committer: Arc<Notify>,
    /// Read-only snapshots for decision-only calls; WAL lets them run beside the writer.
    readers: Arc<Readers>,
    acquire_timeout: Duration,
    stats: Arc<Counters>,
    /// Entity types kept in the application's tables (same file; see `mapped_*`).
    mapping: Arc<Mapping>,
}

/// The writer connection and what is known about its transaction.
struct Writer {
    /// Shared (and locked only for a statement) so that `COMMIT` can run on a blocking
    /// thread; only the holder of the `Writer` uses it.
    conn: Arc<std::sync::Mutex<Connection>>,
    /// Whether the group's transaction is open.
    open: bool,
    /// Members that released their savepoint into the open transaction and wait for
    /// its COMMIT.
    waiters: Vec<oneshot::Sender<StoreResult<()>>>,
    /// Off: each member commits its own transaction (one fsync per call).
    group_commit: bool,
    /// The writers' turnstile file (see `turnstile`).
    turnstile: PathBuf,
    /// How long to wait for another process's write lock.
    busy_timeout: Duration,
    stats: Arc<Counters>,
    /// Set by `checkpointer` when the WAL has grown past the threshold: the committer
    /// finishes the checkpoint between two groups, so that the next group starts the WAL
    /// over.
    checkpoint_due: Arc<std::sync::atomic::AtomicBool>,
}

/// Group commit counters (read without waiting for the writer).
#[derive(Default)]
struct Counters {
    transactions: AtomicU64,
    calls: AtomicU64,
}

/// Idle read-only connections; the semaphore bounds how many are in use.
struct Readers {
    path: PathBuf,
    idle: std::sync::Mutex<Vec<Connection>>,
    permits: Arc<Semaphore>,
}

/// Runs one statement without arguments, prepared once per connection.
fn exec(c: &Connection, sql: &str) -> rusqlite::Result<()> {
    c.prepare_cached(sql)?.execute([]).map(|_| ())
}

fn lock(conn: &std::sync::Mutex<Connection>) -> std::sync::MutexGuard<'_, Connection> {
    // A panic while a statement ran leaves nothing half-done in the connection.
    conn.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Writer {
    fn exec(&self, sql: &str) -> rusqlite::Result<()> {
        exec(&lock(&self.conn), sql)
    }

    /// Rolls the whole group back and tells every waiting member why.
    fn fail_group(&mut self, e: StoreError) -> StoreError {
        if self.open {
            let _ = self.exec("ROLLBACK");
            self.open = false;
        }
        for w in self.waiters.drain(..) {
            let _ = w.send(Err(e.clone()));
        }
        e
    }

    /// Commits the open transaction (its fsync on a blocking thread) and answers every
    /// waiting member; with no member waiting (all left without committing) rolls it
    /// back instead.
    async fn commit_group(&mut self, any_member: bool) -> StoreResult<()> {
        if !self.open {
            return Ok(());
        }
        if self.waiters.is_empty() && !any_member {
            let rolled_back = self.exec("ROLLBACK");
            self.open = false;
            return rolled_back.map_err(map_err);
        }
        let conn = self.conn.clone();
        let started = std::time::Instant::now();
        let committed = tokio::task::spawn_blocking(move || exec(&lock(&conn), "COMMIT"))
            .await
            .map_err(|e| StoreError::Unknown(format!("the commit's thread failed: {e}")))?;
        metrics::histogram!(crate::telemetry::FSYNC_SECONDS).record(started.elapsed().as_secs_f64());
        match committed {
            Ok(()) => {
                metrics::histogram!(crate::telemetry::GROUP_SIZE).record(self.waiters.len().max(1) as f64);
                self.open = false;
                self.stats.transactions.fetch_add(1, Ordering::Relaxed);
                self.stats.calls.fetch_add(self.waiters.len().max(1) as u64, Ordering::Relaxed);
                for w in self.waiters.drain(..) {
                    let _ = w.send(Ok(()));
                }
                if self.checkpoint_due.swap(false, Ordering::Relaxed) {
                    // Between two groups (the next waits): copy the last frames of the WAL
                    // so that the next transaction starts it over (see `checkpointer`).
                    let conn = self.conn.clone();
                    let copied =
                        tokio::task::spawn_blocking(move || exec(&lock(&conn), "PRAGMA wal_checkpoint(PASSIVE)")).await;
                    if let Ok(Err(e)) = copied {
                        tracing::debug!(error = %e, "WAL checkpoint between groups failed; the next one retries");
                    }
                }
                Ok(())
            }
            Err(e) => Err(self.fail_group(map_err(e))),
        }
    }

    /// Opens the group's transaction when none is open, then the member's savepoint.
    async fn join(&mut self) -> StoreResult<()> {
        if !self.open {
            let turn = turnstile(&self.turnstile, self.busy_timeout).await?;
            // Another process may hold the write lock: retry without blocking the thread
            // (the writer's own busy timeout is zero) until the busy timeout.
            let until = tokio::time::Instant::now() + self.busy_timeout;
            loop {
                match self.exec("BEGIN IMMEDIATE") {
                    Ok(()) => break,
                    Err(e) if is_busy(&e) && tokio::time::Instant::now() < until => {
                        tokio::time::sleep(Duration::from_millis(2)).await;
                    }
                    Err(e) => return Err(map_err(e)),
                }
            }
            drop(turn);
            self.open = true;
        }
        self.exec("SAVEPOINT lockstep_member").map_err(|e| self.fail_group(map_err(e)))
    }
}

/// Takes the writers' turnstile: an exclusive `flock` on a file beside the database that
/// every Lockstep process holds while it waits for SQLite's write lock and lets go once it
/// has it. SQLite's busy handling only polls, so without it a busy server, beginning its
/// next group the moment the last one committed, could keep another process (the CLI
/// revoking a key, a second server) out past its busy timeout; with it, the server cannot
/// take the write lock again while another process is waiting for it.
async fn turnstile(path: &Path, wait: Duration) -> StoreResult<std::fs::File> {
    let unavailable =
        |e: std::io::Error| StoreError::Unavailable(format!("writers' turnstile {}: {e}", path.display()));
    if let Some(f) = try_lock_file(path).map_err(unavailable)? {
        return Ok(f);
    }
    // Wait in a blocking thread on a file of its own: if this wait is abandoned, the lock
    // it may still get is released when that thread's file is dropped.
    let p = path.to_owned();
    let waiting = tokio::task::spawn_blocking(move || {
        let f = lock_file(&p)?;
        f.lock()?;
        Ok::<_, std::io::Error>(f)
    });
    match tokio::time::timeout(wait, waiting).await {
        Ok(Ok(Ok(f))) => Ok(f),
        Ok(Ok(Err(e))) => Err(unavailable(e)),
        Ok(Err(e)) => Err(StoreError::Internal(format!("turnstile wait: {e}"))),
        Err(_) => Err(StoreError::Unavailable(
            "another process held the database past the busy timeout; nothing was committed, retry".into(),
        )),
    }
}

/// Opens (creating it) a file that is only ever locked.
fn lock_file(path: &Path) -> std::io::Result<std::fs::File> {
    std::fs::OpenOptions::new().create(true).truncate(false).write(true).open(path)
}

/// An exclusive `flock` on `path` if nobody holds one (None when somebody does); released
/// when the file is dropped, or by the kernel if the process dies.
fn try_lock_file(path: &Path) -> std::io::Result<Option<std::fs::File>> {
    let f = lock_file(path)?;
    match f.try_lock() {
        Ok(()) => Ok(Some(f)),
        Err(std::fs::TryLockError::WouldBlock) => Ok(None),
        Err(std::fs::TryLockError::Error(e)) => Err(e),
    }
}

/// Runs a group's COMMIT once the members queued before it have had their turn.
async fn committer(writer: Weak<Mutex<Writer>>, wake: Arc<Notify>) {
    loop {
        wake.notified().await;
        let Some(writer) = writer.upgrade() else { return };
        let mut w = writer.lock().await;
        if let Err(e) = w.commit_group(false).await {
            tracing::warn!(error = %e, "SQLite group commit failed; its members were told, nothing of it committed");
        }
    }
}

/// Keeps the WAL short without making a group wait for it: every 100 ms a `PASSIVE`
/// checkpoint on a connection of its own copies the WAL back into the database file beside
/// the writer. While the writer keeps appending, the WAL never starts over by itself, so
/// once it holds `threshold` pages the committer is asked to copy the last few frames
/// between two groups (a short pause instead of SQLite's own checkpoint of the whole WAL
/// inside a commit). Ends with the store.
async fn checkpointer(
    writer: Weak<Mutex<Writer>>,
    conn: Connection,
    threshold: u32,
    due: Arc<std::sync::atomic::AtomicBool>,
) {
    let conn = Arc::new(std::sync::Mutex::new(conn));
    loop {
        tokio::time::sleep(Duration::from_millis(100)).await;
        if writer.strong_count() == 0 {
            return;
        }
        let c = conn.clone();
        let result = tokio::task::spawn_blocking(move || {
            lock(&c).query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |r| Ok((r.get::<_, i64>(1)?, r.get::<_, i64>(2)?)))
        })
        .await;
        match result {
            Ok(Ok((wal_pages, _copied))) if wal_pages >= i64::from(threshold) => due.store(true, Ordering::Relaxed),
            Ok(Ok(_)) => {}
            Ok(Err(e)) => tracing::debug!(error = %e, "WAL checkpoint failed; the next one retries"),
            Err(_) => return,
        }
    }
}

/// Opens a connection to the database file with the store's settings.
fn connect(path: &Path, read_only: bool, busy: Duration) -> rusqlite::Result<Connection> {
    let mode = if read_only { OpenFlags::SQLITE_OPEN_READ_ONLY } else { OpenFlags::SQLITE_OPEN_READ_WRITE };
    let c = Connection::open_with_flags(path, mode | OpenFlags::SQLITE_OPEN_NO_MUTEX)?;
    c.busy_timeout(busy)?;
    // FULL: a commit that returned survives a power cut, not only a crash.
    c.pragma_update(None, "synchronous", "FULL")?;
    // The application's tables (mapped entity types) may declare foreign keys: enforced.
    c.pragma_update(None, "foreign_keys", true)?;
    c.set_prepared_statement_cache_capacity(128);
    Ok(c)
}

impl SqliteStore {
    /// Opens (creating when missing) the database file, switches it to WAL and runs the
    /// migrations.
    pub async fn open(url: &str, opts: &StoreOptions) -> anyhow::Result<Self> {
        if url.contains(":memory:") || url.contains("mode=memory") {
            anyhow::bail!("in-memory SQLite databases are not supported: name a file, e.g. sqlite://lockstep.db");
        }
        let base = SqliteConnectOptions::from_str(url)
            .map_err(|e| anyhow::anyhow!("invalid SQLite URL `{url}`: {e}"))?
            // A new file frees the pages audit retention empties page by page
            // (`reclaim_pages`); a file made without it keeps its size (VACUUM once, offline).
            .auto_vacuum(SqliteAutoVacuum::Incremental)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Full)
            .busy_timeout(opts.busy_timeout)
            .log_statements(log::LevelFilter::Off);
        let path = base.get_filename().to_owned();
        let mut migrations = base
            .create_if_missing(true)
            .connect()
            .await
            .map_err(|e| anyhow::anyhow!("cannot open SQLite database `{url}`: {e}"))?;
        sqlx::migrate!("migrations/sqlite")
            .run(&mut migrations)
            .await
            .map_err(|e| anyhow::anyhow!("migrating `{url}` failed: {e}"))?;
        sqlx::Connection::close(migrations).await?;
        // Opened with the busy timeout (another connection closing — the last one of a
        // process checkpoints the WAL as it goes — may hold the file for a moment), then
        // set to zero: the writer waits for the lock itself (`BEGIN IMMEDIATE` retried).
        let conn = connect(&path, false, opts.busy_timeout)
            .and_then(|c| {
                // Checkpoints are run by `checkpointer`, not by the commit that fills the WAL.
                c.pragma_update(None, "wal_autocheckpoint", 0)?;
                // Once checkpointed, a WAL that grew past 4 MB (a burst, a retention
                // run's drops and vacuum) is cut back to it when the writer rewinds it.
                c.pragma_update(None, "journal_size_limit", 4 * 1024 * 1024)?;
                c.busy_timeout(Duration::ZERO)?;
                Ok(c)
            })
            .map_err(|e| anyhow::anyhow!("cannot open SQLite database `{url}` for writing: {e}"))?;
        // A deferred constraint of the application's tables is checked at COMMIT: in a group
        // one member's violation would fail every member. Such a database commits each call
        // alone (one fsync per call), so a deferred violation fails only its own call.
        let deferred = deferred_constraints(&conn, &opts.mapping)
            .map_err(|e| anyhow::anyhow!("cannot read the schema of `{url}`: {e}"))?;
        if let Some(table) = &deferred
            && opts.group_commit
        {
            tracing::warn!(
                table = %table,
                "a mapped table declares a deferred constraint: group commit is off (each call commits alone)"
            );
        }
        let background = connect(&path, false, READER_BUSY_TIMEOUT)
            .map_err(|e| anyhow::anyhow!("cannot open SQLite database `{url}` for checkpoints: {e}"))?;
        let readers = Readers {
            idle: std::sync::Mutex::new(Vec::new()),
            permits: Arc::new(Semaphore::new(opts.read_connections.max(1) as usize)),
            path: path.clone(),
        };
        // One reader now, so a database that cannot be read fails here, not at the first call.
        let first = connect(&path, true, READER_BUSY_TIMEOUT)
            .map_err(|e| anyhow::anyhow!("cannot open SQLite database `{url}` for reading: {e}"))?;
        readers.idle.lock().unwrap_or_else(std::sync::PoisonError::into_inner).push(first);
        let mut turnstile = path.into_os_string();
        turnstile.push(".writers");
        let stats = Arc::new(Counters::default());
        let due = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let writer = Arc::new(Mutex::new(Writer {
            conn: Arc::new(std::sync::Mutex::new(conn)),
            open: false,
            waiters: Vec::new(),
            group_commit: opts.group_commit && deferred.is_none(),
            turnstile: turnstile.into(),
            busy_timeout: opts.busy_timeout,
            stats: stats.clone(),
            checkpoint_due: due.clone(),
        }));
        let wake = Arc::new(Notify::new());
        tokio::spawn(committer(Arc::downgrade(&writer), wake.clone()));
        tokio::spawn(checkpointer(Arc::downgrade(&writer), background, opts.wal_autocheckpoint, due));
        Ok(Self {
            writer,
            committer: wake,
            readers: Arc::new(readers),
            acquire_timeout: opts.acquire_timeout,
            stats,
            mapping: opts.mapping.clone(),
        })
    }
}

/// Readers wait this long on a lock (in WAL mode only recovery takes one), in the task.
const READER_BUSY_TIMEOUT: Duration = Duration::from_millis(50);

impl Drop for SqliteStore {
    fn drop(&mut self) {
        // The committer sees the writer gone and ends.
        self.committer.notify_one();
    }
}

fn timed_out() -> StoreError {
    StoreError::Unavailable("timed out waiting for the database; nothing was committed, retry".into())
}

#[async_trait]
impl Store for SqliteStore {
    async fn write(&self) -> StoreResult<Box<dyn Txn>> {
        Ok(Box::new(self.write_txn().await?))
    }

    async fn read(&self) -> StoreResult<Box<dyn Txn>> {
        Ok(Box::new(self.read_txn().await?))
    }

    async fn retention_lock(&self) -> StoreResult<Option<Box<dyn std::any::Any + Send>>> {
        // An exclusive `flock` on a file beside the database, held for the run: one run at a
        // time among every process that opens this file (released by the kernel if the
        // process dies).
        let mut p = self.readers.path.clone().into_os_string();
        p.push(".retention");
        let path = PathBuf::from(p);
        match try_lock_file(&path) {
            Ok(f) => Ok(f.map(|f| Box::new(f) as Box<dyn std::any::Any + Send>)),
            Err(e) => Err(StoreError::Unavailable(format!("retention lock {}: {e}", path.display()))),
        }
    }

    async fn reclaim_pages(&self, max_pages: u32) -> StoreResult<u64> {
        // In a write transaction of its own (the writer's turn, as any commit).
        let mut txn = self.write_txn().await?;
        let freed = txn.with(|c| {
            let incremental: i64 = c.query_row("PRAGMA auto_vacuum", [], |r| r.get(0))?;
            let free: i64 = c.query_row("PRAGMA freelist_count", [], |r| r.get(0))?;
            if incremental != 2 || free == 0 {
                return Ok(0);
            }
            // The pragma frees a page per step: step it to the end.
            let mut vacuum = c.prepare(&format!("PRAGMA incremental_vacuum({max_pages})"))?;
            let mut rows = vacuum.query([])?;
            while rows.next()?.is_some() {}
            drop(rows);
            let left: i64 = c.query_row("PRAGMA freelist_count", [], |r| r.get(0))?;
            Ok(u64::try_from(free - left).unwrap_or(0))
        })?;
        Box::new(txn).commit().await?;
        Ok(freed)
    }

    async fn ping(&self) -> StoreResult<()> {
        // Touch the file, not just the connection: a read of a real table.
        self.read().await?.policy_state().await.map(|_| ())
    }

    fn mapping(&self) -> Arc<Mapping> {
        self.mapping.clone()
    }

    async fn mapping_problems(&self) -> StoreResult<Vec<String>> {
        let mut txn = self.read_txn().await?;
        let mut problems = Vec::new();
        let mapping = self.mapping.clone();
        for tm in mapping.types() {
            problems.extend(txn.with(|c| check_type_catalog(c, &mapping, tm))?);
        }
        if problems.is_empty() {
            for tm in mapping.types() {
                let Some(v) = &tm.version_column else { continue };
                let name = version_trigger_name(tm, v);
                let found: bool = txn.with(|c| {
                    c.query_row(
                        "SELECT EXISTS (SELECT 1 FROM sqlite_master WHERE type = 'trigger' AND name = ?1)",
                        [&name],
                        |r| r.get(0),
                    )
                })?;
                if !found {
                    problems.push(format!(
                        "entity type {}: table {}: trigger {name} (bumps {v} on direct updates) is not installed; run \
                         `lockstep mapping install`",
                        tm.entity_type, tm.table
                    ));
                }
            }
        }
        Ok(problems)
    }

    async fn install_mapping(&self) -> StoreResult<Vec<String>> {
        let mut t = self.write_txn().await?;
        let mut done = Vec::new();
        {
            for tm in self.mapping.types() {
                let Some(v) = &tm.version_column else { continue };
                let name = version_trigger_name(tm, v);
                let table = mapped::qt(&tm.table, None);
                let (v, id) = (mapped::q(v), mapped::q(&tm.id_column));
                let sql = format!(
                    "CREATE TRIGGER IF NOT EXISTS {} AFTER UPDATE ON {table} FOR EACH ROW WHEN NEW.{v} IS OLD.{v}
                     BEGIN UPDATE {table} SET {v} = OLD.{v} + 1 WHERE {id} = NEW.{id}; END",
                    mapped::q(&name)
                );
                t.with(|c| c.execute_batch(&sql))?;
                done.push(format!("{}: trigger {name} (bumps the version on direct updates)", tm.table));
            }
        }
        Box::new(t).commit().await?;
        Ok(done)
    }

    fn group_commit_stats(&self) -> Option<GroupCommitStats> {
        Some(GroupCommitStats {
            transactions: self.stats.transactions.load(Ordering::Relaxed),
            calls: self.stats.calls.load(Ordering::Relaxed),
        })
    }
}

/// One read snapshot; its connection goes back to the pool when it ends.
struct Reader {
    conn: Option<Connection>,
    readers: Arc<Readers>,
    _permit: OwnedSemaphorePermit,
}

impl Drop for Reader {
    fn drop(&mut self) {
        if let Some(c) = self.conn.take() {
            // A connection that cannot end its snapshot is not reused.
            if exec(&c, "ROLLBACK").is_ok() && c.is_autocommit() {
                self.readers.idle.lock().unwrap_or_else(std::sync::PoisonError::into_inner).push(c);
            }
        }
    }
}

/// One write transaction: a savepoint inside the group's transaction, holding the
/// writer connection until it commits or goes.
struct Member {
    guard: Option<OwnedMutexGuard<Writer>>,
    /// Its savepoint is open (undone by drop unless released by commit).
    joined: bool,
    wake: Arc<Notify>,
}

impl Member {
    fn writer(&mut self) -> &mut Writer {
        self.guard.as_mut().expect("a member holds the writer until it ends")
    }
}

impl Drop for Member {
    fn drop(&mut self) {
        let Some(w) = self.guard.as_mut() else { return };
        if self.joined {
            // Left without committing: undo its own writes only.
            let undone = w
                .exec("ROLLBACK TO SAVEPOINT lockstep_member")
                .and_then(|()| w.exec("RELEASE SAVEPOINT lockstep_member"));
            if let Err(e) = undone {
                w.fail_group(map_err(e));
            }
        }
        if w.open {
            // The committer commits what the group has (or rolls back an empty group), so
            // the write lock is never left held.
            self.wake.notify_one();
        }
    }
}

enum Conn {
    Read(Reader),
    Write(Member),
}

struct SqliteTxn {
    conn: Conn,
    mapping: Arc<Mapping>,
    /// Mapped entities as this transaction last read them: an update writes only the
    /// columns it changes, and the join-table edges it adds or removes.
    read: HashMap<Uid, EntityRecord>,
}

impl SqliteStore {
    async fn write_txn(&self) -> StoreResult<SqliteTxn> {
        let guard = tokio::time::timeout(self.acquire_timeout, self.writer.clone().lock_owned())
            .await
            .map_err(|_| timed_out())?;
        // Wrapped first: a member that fails (or is cancelled) while joining is settled
        // by its drop.
        let mut member = Member { guard: Some(guard), joined: false, wake: self.committer.clone() };
        member.writer().join().await?;
        member.joined = true;
        Ok(self.txn(Conn::Write(member)))
    }

    async fn read_txn(&self) -> StoreResult<SqliteTxn> {
        let permit = tokio::time::timeout(self.acquire_timeout, self.readers.permits.clone().acquire_owned())
            .await
            .map_err(|_| timed_out())?
            .map_err(|_| StoreError::Unavailable("the store is closing".into()))?;
        let idle = self.readers.idle.lock().unwrap_or_else(std::sync::PoisonError::into_inner).pop();
        let conn = match idle {
            Some(c) => c,
            None => connect(&self.readers.path, true, READER_BUSY_TIMEOUT).map_err(map_err)?,
        };
        // Deferred: the snapshot is taken by the first read and kept to the end.
        exec(&conn, "BEGIN").map_err(map_err)?;
        Ok(self.txn(Conn::Read(Reader { conn: Some(conn), readers: self.readers.clone(), _permit: permit })))
    }

    fn txn(&self, conn: Conn) -> SqliteTxn {
        SqliteTxn { conn, mapping: self.mapping.clone(), read: HashMap::new() }
    }
}

impl SqliteTxn {
    /// Runs `f` on the transaction's connection (synchronously: no statement of a call
    /// waits on anything but the file).
    fn with<T>(&mut self, f: impl FnOnce(&Connection) -> rusqlite::Result<T>) -> StoreResult<T> {
        match &mut self.conn {
            Conn::Read(r) => f(r.conn.as_ref().expect("a reader holds its connection until it ends")),
            Conn::Write(m) => f(&lock(&m.writer().conn)),
        }
        .map_err(map_err)
    }

    /// A link changed: the next transaction recompiles the policy set with the links.
    fn bump_links_generation(&mut self) -> StoreResult<()> {
        self.with(|c| c.execute("UPDATE policy_links_meta SET generation = generation + 1 WHERE id = 1", []))?;
        Ok(())
    }

    fn entity_rows(&mut self, sql: &str, args: &[&str]) -> StoreResult<Vec<EntityRecord>> {
        let rows = self.with(|c| {
            c.prepare_cached(sql)?
                .query_map(rusqlite::params_from_iter(args), |r| {
                    Ok(EntityRow {
                        etype: r.get(0)?,
                        eid: r.get(1)?,
                        attributes: r.get(2)?,
                        parents: r.get(3)?,
                        version: r.get(4)?,
                        tags: r.get(5)?,
                    })
                })?
                .collect::<rusqlite::Result<Vec<_>>>()
        })?;
        rows.into_iter().map(EntityRecord::try_from).collect()
    }
}

/// The first mapped or join table whose definition declares a deferred constraint.
fn deferred_constraints(c: &Connection, mapping: &Mapping) -> rusqlite::Result<Option<String>> {
    for (table, ..) in mapping.guarded_tables() {
        let sql: Option<String> = c
            .query_row("SELECT sql FROM sqlite_master WHERE type = 'table' AND name = ?1", [&table.name], |r| r.get(0))
            .optional()?;
        if sql.is_some_and(|s| {
            s.to_ascii_uppercase().split_whitespace().collect::<Vec<_>>().join(" ").contains("INITIALLY DEFERRED")
        }) {
            return Ok(Some(table.to_string()));
        }
    }
    Ok(None)
}

/// The trigger that bumps a mapped type's version column on direct updates.
fn version_trigger_name(tm: &TypeMap, column: &str) -> String {
    use sha2::Digest;
    let d = sha2::Sha256::digest(format!("{}\u{1f}{}\u{1f}{column}", tm.entity_type, tm.table));
    format!("lockstep_version_{}", hex::encode(&d[..6]))
}

/// Declared column types of a table (upper case); None when there is no such table.
fn table_columns(c: &Connection, t: &crate::mapping::TableName) -> rusqlite::Result<Option<HashMap<String, String>>> {
    let schema = t.schema.as_deref().unwrap_or("main");
    let mut stmt = c.prepare("SELECT name, upper(type) FROM pragma_table_info(?1, ?2)")?;
    let cols = stmt
        .query_map([t.name.as_str(), schema], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)))?
        .collect::<rusqlite::Result<HashMap<_, _>>>()?;
    Ok(if cols.is_empty() { None } else { Some(cols) })
}

/// Whether a declared type (SQLite affinity rules) suits a mapped column.
fn sqlite_fits(ty: Option<ColumnType>, id: Option<IdType>, declared: &str) -> bool {
    let int = declared.contains("INT");
    match (ty, id) {
        (_, Some(IdType::Integer)) | (Some(ColumnType::Integer | ColumnType::IntegerSet), None)
            if ty != Some(ColumnType::IntegerSet) =>
        {
            int
        }
        (Some(ColumnType::Boolean), _) => int || declared.contains("BOOL"),
        _ => true,
    }
}

/// Checks one mapped type against the file's tables; problems name type, table and column.
fn check_type_catalog(c: &Connection, mapping: &Mapping, tm: &TypeMap) -> rusqlite::Result<Vec<String>> {
    let et = &tm.entity_type;
    let mut problems = Vec::new();
    let Some(cols) = table_columns(c, &tm.table)? else {
        problems.push(format!("entity type {et}: table {} does not exist", tm.table));
        return Ok(problems);
    };
    let mut need = |cols: &HashMap<String, String>, table: &str, col: &str, what: &str, ty, id| match cols.get(col) {
        None => problems.push(format!("entity type {et}: {what}: column {table}.{col} does not exist")),
        Some(d) if !sqlite_fits(ty, id, d) => problems
            .push(format!("entity type {et}: {what}: column {table}.{col} is declared {d}, not an integer type")),
        Some(_) => {}
    };
    let table = tm.table.to_string();
    need(&cols, &table, &tm.id_column, "id", None, Some(tm.id_type));
    if let Some(v) = &tm.version_column {
        need(&cols, &table, v, "version", Some(ColumnType::Integer), None);
    }
    for (a, m) in &tm.attributes {
        let id = m.entity_type.as_deref().and_then(|t| mapping.get(t)).map(|t| t.id_type);
        let ty = if m.ty == ColumnType::Entity { None } else { Some(m.ty) };
        need(&cols, &table, &m.column, &format!("attribute `{a}`"), ty, id.or(Some(IdType::Text)));
    }
    for (pty, source) in &tm.parents {
        let pid = mapping.get(pty).map_or(IdType::Text, |t| t.id_type);
        match source {
            ParentSource::Column(col) => need(&cols, &table, col, &format!("parent {pty}"), None, Some(pid)),
            ParentSource::Join { table: jt, child, parent } => match table_columns(c, jt)? {
                None => need(
                    &HashMap::new(),
                    &format!("{jt} (join table missing)"),
                    child,
                    &format!("parent {pty}"),
                    None,
                    Some(tm.id_type),
                ),
                Some(jcols) => {
                    let jt = jt.to_string();
                    need(&jcols, &jt, child, &format!("parent {pty}"), None, Some(tm.id_type));
                    need(&jcols, &jt, parent, &format!("parent {pty}"), None, Some(pid));
                }
            },
        }
    }
    Ok(problems)
}

/// The columns a mapped type's rows are read from, in the order `mapped_row` reads them:
/// id (as text), the attributes, the parent sources, the version.
fn mapped_select(tm: &TypeMap) -> String {
    let q = mapped::q;
    let mut cols = vec![format!("CAST(t.{} AS TEXT)", q(&tm.id_column))];
    for (_, m) in &tm.attributes {
        let c = q(&m.column);
        cols.push(match m.ty {
            // Normalized to UTC milliseconds; text SQLite cannot read as a time: an empty blob.
            ColumnType::Datetime | ColumnType::TimestampText => format!(
                "CASE WHEN t.{c} IS NULL THEN NULL ELSE coalesce(strftime('%Y-%m-%dT%H:%M:%fZ', t.{c}), X'') END"
            ),
            ColumnType::Entity => format!("CAST(t.{c} AS TEXT)"),
            _ => format!("t.{c}"),
        });
    }
    for (_, source) in &tm.parents {
        cols.push(match source {
            ParentSource::Column(c) => format!("CAST(t.{} AS TEXT)", q(c)),
            ParentSource::Join { table, child, parent } => format!(
                "(SELECT json_group_array(CAST(j.{p} AS TEXT)) FROM (SELECT {p} FROM {jt} WHERE {c} = t.{id} ORDER BY 1) AS j)",
                p = q(parent),
                c = q(child),
                id = q(&tm.id_column),
                jt = mapped::qt(table, None)
            ),
        });
    }
    if let Some(v) = &tm.version_column {
        cols.push(format!("t.{}", q(v)));
    }
    format!("SELECT {} FROM {} AS t", cols.join(", "), mapped::qt(&tm.table, None))
}

/// A cell as JSON (a blob, which no mapped column holds, becomes `{}`: unreadable).
fn cell(v: rusqlite::types::Value) -> Value {
    use rusqlite::types::Value as V;
    match v {
        V::Null => Value::Null,
        V::Integer(n) => Value::from(n),
        V::Real(f) => serde_json::Number::from_f64(f).map_or(Value::Null, Value::Number),
        V::Text(s) => Value::String(s),
        V::Blob(_) => Value::Object(Map::new()),
    }
}

/// One row of `mapped_select` as `mapped::record_from_row` reads it.
fn mapped_row(tm: &TypeMap, r: &rusqlite::Row<'_>) -> rusqlite::Result<(String, Map<String, Value>)> {
    let id: String = r.get(0)?;
    let mut row = Map::new();
    let mut i = 1;
    for a in 0..tm.attributes.len() {
        row.insert(mapped::attr_key(a), cell(r.get(i)?));
        i += 1;
    }
    for p in 0..tm.parents.len() {
        row.insert(mapped::parent_key(p), cell(r.get(i)?));
        i += 1;
    }
    if tm.version_column.is_some() {
        row.insert(mapped::VERSION_KEY.into(), cell(r.get(i)?));
    }
    Ok((id, row))
}

/// A column value as SQLite stores it: JSON kinds as JSON text, booleans as 0/1, ids of
/// integer-typed entities as integers (times arrive normalized to UTC, see `mapped`).
fn sql_value(v: &ColumnValue) -> rusqlite::types::Value {
    use rusqlite::types::Value as V;
    match (&v.value, v.ty) {
        (Value::Null, _) => V::Null,
        (x, ColumnType::Json | ColumnType::TextSet | ColumnType::IntegerSet) => V::Text(x.to_string()),
        (Value::Bool(b), _) => V::Integer(i64::from(*b)),
        (Value::Number(n), _) => n.as_i64().map_or_else(|| V::Real(n.as_f64().unwrap_or(0.0)), V::Integer),
        (Value::String(s), _) if v.integer_id => s.parse::<i64>().map_or_else(|_| V::Text(s.clone()), V::Integer),
        (Value::String(s), _) => V::Text(s.clone()),
        (x, _) => V::Text(x.to_string()),
    }
}

impl SqliteTxn {
    fn mapped_rows(&mut self, tm: &TypeMap, ids: &[String]) -> StoreResult<Vec<EntityRecord>> {
        let ids: Vec<rusqlite::types::Value> = ids
            .iter()
            .filter(|id| tm.id_type.canonical(id).is_some())
            .map(|id| match tm.id_type {
                IdType::Integer => rusqlite::types::Value::Integer(id.parse().unwrap_or_default()),
                _ => rusqlite::types::Value::Text(id.clone()),
            })
            .collect();
        let mut out = Vec::new();
        for chunk in ids.chunks(64) {
            let marks = (1..=chunk.len()).map(|i| format!("?{i}")).collect::<Vec<_>>().join(", ");
            let sql = format!("{} WHERE t.{} IN ({marks})", mapped_select(tm), mapped::q(&tm.id_column));
            let rows = self.with(|c| {
                c.prepare_cached(&sql)?
                    .query_map(rusqlite::params_from_iter(chunk), |r| mapped_row(tm, r))?
                    .collect::<rusqlite::Result<Vec<_>>>()
            })?;
            for (id, row) in rows {
                out.push(mapped::record_from_row(tm, id, row)?);
            }
        }
        Ok(out)
    }

    fn mapped_entity(&mut self, tm: &TypeMap, uid: &Uid) -> StoreResult<Option<EntityRecord>> {
        let found = self.mapped_rows(tm, std::slice::from_ref(&uid.id))?.pop();
        match &found {
            Some(e) => self.read.insert(uid.clone(), e.clone()),
            None => self.read.remove(uid),
        };
        Ok(found)
    }

    fn exec_values(&mut self, sql: &str, values: Vec<rusqlite::types::Value>) -> StoreResult<usize> {
        self.with(|c| c.prepare_cached(sql)?.execute(rusqlite::params_from_iter(values)))
    }

    fn id_value(tm: &TypeMap, id: &str) -> rusqlite::types::Value {
        match tm.id_type {
            IdType::Integer => id.parse().map_or_else(|_| id.to_owned().into(), rusqlite::types::Value::Integer),
            _ => rusqlite::types::Value::Text(id.to_owned()),
        }
    }

    fn mapped_insert(&mut self, tm: &TypeMap, e: &EntityRecord) -> StoreResult<()> {
        let values = mapped::columns_of(&self.mapping, tm, e)?;
        let present: Vec<&ColumnValue> = values.iter().filter(|v| !v.value.is_null()).collect();
        let cols = present.iter().map(|v| mapped::q(&v.column)).collect::<Vec<_>>().join(", ");
        let marks = (1..=present.len()).map(|i| format!("?{i}")).collect::<Vec<_>>().join(", ");
        let sql = format!("INSERT INTO {} ({cols}) VALUES ({marks})", mapped::qt(&tm.table, None));
        self.exec_values(&sql, present.iter().map(|v| sql_value(v)).collect())?;
        let edges = mapped::join_edges(&self.mapping, tm, &e.parents)?;
        self.edges(tm, &e.uid.id, &edges, true)?;
        self.read.insert(e.uid.clone(), e.clone());
        Ok(())
    }

    fn mapped_update(&mut self, tm: &TypeMap, e: &EntityRecord) -> StoreResult<()> {
        let before = match self.read.get(&e.uid).cloned() {
            Some(b) => b,
            None => self
                .mapped_rows(tm, std::slice::from_ref(&e.uid.id))?
                .pop()
                .ok_or_else(|| StoreError::Internal(format!("update of missing entity {}", e.uid)))?,
        };
        let changed = mapped::changed_columns(&self.mapping, tm, &before, e)?;
        let changed: Vec<&ColumnValue> = changed.iter().collect();
        if !changed.is_empty() {
            let sets = changed
                .iter()
                .enumerate()
                .map(|(i, v)| format!("{} = ?{}", mapped::q(&v.column), i + 2))
                .collect::<Vec<_>>();
            let sql = format!(
                "UPDATE {} SET {} WHERE {} = ?1",
                mapped::qt(&tm.table, None),
                sets.join(", "),
                mapped::q(&tm.id_column)
            );
            let mut values = vec![Self::id_value(tm, &e.uid.id)];
            values.extend(changed.iter().map(|v| sql_value(v)));
            if self.exec_values(&sql, values)? != 1 {
                return Err(StoreError::Internal(format!("update of missing entity {}", e.uid)));
            }
        }
        let (added, removed) = mapped::edge_changes(&self.mapping, tm, &before.parents, &e.parents)?;
        self.edges(tm, &e.uid.id, &removed, false)?;
        self.edges(tm, &e.uid.id, &added, true)?;
        self.read.insert(e.uid.clone(), e.clone());
        Ok(())
    }

    fn mapped_delete(&mut self, tm: &TypeMap, uid: &Uid) -> StoreResult<()> {
        for (_, source) in tm.parents.clone() {
            if let ParentSource::Join { table, child, .. } = source {
                let sql = format!("DELETE FROM {} WHERE {} = ?1", mapped::qt(&table, None), mapped::q(&child));
                self.exec_values(&sql, vec![Self::id_value(tm, &uid.id)])?;
            }
        }
        let sql = format!("DELETE FROM {} WHERE {} = ?1", mapped::qt(&tm.table, None), mapped::q(&tm.id_column));
        self.exec_values(&sql, vec![Self::id_value(tm, &uid.id)])?;
        self.read.remove(uid);
        Ok(())
    }

    /// Inserts (`add`) or deletes the join-table rows of `edges` of child `id`.
    fn edges(&mut self, tm: &TypeMap, id: &str, edges: &[(usize, String)], add: bool) -> StoreResult<()> {
        for (i, pid) in edges {
            let (pty, source) = &tm.parents[*i];
            let ParentSource::Join { table, child, parent } = source else { continue };
            let t = mapped::qt(table, None);
            let (c, p) = (mapped::q(child), mapped::q(parent));
            let sql = if add {
                format!("INSERT INTO {t} ({c}, {p}) VALUES (?1, ?2)")
            } else {
                format!("DELETE FROM {t} WHERE {c} = ?1 AND {p} = ?2")
            };
            let parent_value = match self.mapping.get(pty) {
                Some(pt) => Self::id_value(pt, pid),
                None => rusqlite::types::Value::Text(pid.clone()),
            };
            self.exec_values(&sql, vec![Self::id_value(tm, id), parent_value])?;
        }
        Ok(())
    }
}

fn is_busy(e: &rusqlite::Error) -> bool {
    matches!(e.sqlite_error_code(), Some(ErrorCode::DatabaseBusy | ErrorCode::DatabaseLocked))
}

/// Maps a driver error to what the use cases need to know: can the caller retry later
/// (UNAVAILABLE), did a uniqueness constraint refuse the write, or is it a bug.
fn map_err(e: rusqlite::Error) -> StoreError {
    const UNIQUE: i32 = 2067;
    const PRIMARY_KEY: i32 = 1555;
    match &e {
        rusqlite::Error::SqliteFailure(f, msg) => match f.code {
            ErrorCode::ConstraintViolation if [UNIQUE, PRIMARY_KEY].contains(&f.extended_code) => {
                StoreError::Conflict(format!(
                    "the database refused a duplicate: {}; nothing was committed",
                    msg.clone().unwrap_or_else(|| e.to_string())
                ))
            }
            // NOT NULL, CHECK, FOREIGN KEY, a trigger's RAISE (the application's tables):
            // SQLite's message names the column or constraint.
            ErrorCode::ConstraintViolation | ErrorCode::TypeMismatch => StoreError::Invalid(format!(
                "the database refused the write: {}; nothing was committed",
                msg.clone().unwrap_or_else(|| e.to_string())
            )),
            ErrorCode::DatabaseBusy | ErrorCode::DatabaseLocked => StoreError::Unavailable(
                "another writer held the database past the busy timeout; nothing was committed, retry".into(),
            ),
            ErrorCode::OutOfMemory
            | ErrorCode::ReadOnly
            | ErrorCode::SystemIoFailure
            | ErrorCode::DiskFull
            | ErrorCode::CannotOpen
            | ErrorCode::FileLockingProtocolFailed => StoreError::Unavailable(e.to_string()),
            _ => StoreError::Internal(e.to_string()),
        },
        _ => StoreError::Internal(e.to_string()),
    }
}

/// The columns `key_row` reads, in its order (read by index: a name lookup per column
/// cost more than the query).
macro_rules! select_keys {
    () => {
        "SELECT kid, algorithm, secret, public_key_pem, issuer, audience, principal_type, revoked, added_at,
                jwk, source, retired, required_typ, max_lifetime_secs, signing, private_key FROM keys"
    };
}

fn key_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<KeyRow> {
    Ok(KeyRow {
        kid: r.get(0)?,
        algorithm: r.get(1)?,
        secret: r.get(2)?,
        public_key_pem: r.get(3)?,
        issuer: r.get(4)?,
        audience: r.get(5)?,
        principal_type: r.get(6)?,
        revoked: r.get(7)?,
        added_at: r.get(8)?,
        jwk: r.get(9)?,
        source: r.get(10)?,
        retired: r.get(11)?,
        required_typ: r.get(12)?,
        max_lifetime_secs: r.get(13)?,
        signing: r.get(14)?,
        private_key: r.get(15)?,
    })
}

fn link_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<LinkRow> {
    Ok(LinkRow {
        link_id: r.get("link_id")?,
        template_id: r.get("template_id")?,
        principal_type: r.get("principal_type")?,
        principal_id: r.get("principal_id")?,
        resource_type: r.get("resource_type")?,
        resource_id: r.get("resource_id")?,
    })
}

fn policy_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<PolicyRow> {
    Ok(PolicyRow { version: r.get(0)?, policies: r.get(1)?, schema: r.get(2)?, created_at: r.get(3)? })
}

macro_rules! select_entities {
    () => {
        "SELECT etype, eid, attributes, parents, version, tags FROM entities"
    };
}

#[async_trait]
impl Txn for SqliteTxn {
    async fn key(&mut self, kid: &str) -> StoreResult<Option<KeyRecord>> {
        let row = self.with(|c| {
            c.prepare_cached(concat!(select_keys!(), " WHERE kid = ?1"))?.query_row([kid], key_row).optional()
        })?;
        Ok(row.map(KeyRecord::from))
    }

    async fn list_keys(&mut self) -> StoreResult<Vec<KeyRecord>> {
        let rows = self.with(|c| {
            c.prepare_cached(concat!(select_keys!(), " ORDER BY added_at, kid"))?
                .query_map([], key_row)?
                .collect::<rusqlite::Result<Vec<_>>>()
        })?;
        Ok(rows.into_iter().map(KeyRecord::from).collect())
    }

    async fn insert_key(&mut self, k: &KeyRecord) -> StoreResult<()> {
        self.with(|c| {
            c.prepare_cached(
                "INSERT INTO keys (kid, algorithm, secret, public_key_pem, issuer, audience, principal_type, revoked, added_at,
                                   jwk, source, retired, required_typ, max_lifetime_secs, signing, private_key)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16)",
            )?
            .execute(params![
                k.kid,
                k.algorithm,
                k.secret,
                k.public_key_pem,
                k.issuer,
                k.audience,
                k.principal_type,
                k.revoked,
                k.added_at,
                k.jwk,
                k.source,
                k.retired,
                k.required_typ,
                k.max_lifetime_secs,
                k.signing,
                k.private_key
            ])
        })?;
        Ok(())
    }

    async fn update_key(&mut self, k: &KeyRecord) -> StoreResult<()> {
        self.with(|c| {
            c.prepare_cached("UPDATE keys SET jwk = ?2, retired = ?3, signing = ?4 WHERE kid = ?1")?
                .execute(params![k.kid, k.jwk, k.retired, k.signing])
        })?;
        Ok(())
    }

    async fn revoke_key(&mut self, kid: &str, now: i64) -> StoreResult<bool> {
        let n = self.with(|c| {
            c.prepare_cached("UPDATE keys SET revoked = 1, revoked_at = coalesce(revoked_at, ?2) WHERE kid = ?1")?
                .execute(params![kid, now])
        })?;
        Ok(n > 0)
    }

    async fn revoke_token(
        &mut self,
        token_id: &str,
        _subject: Option<&Uid>,
        expires_at: i64,
        now: i64,
    ) -> StoreResult<()> {
        self.with(|c| {
            c.prepare_cached(
                "INSERT INTO revoked_tokens (token_id, expires_at_secs, revoked_at) VALUES (?1, ?2, ?3)
                 ON CONFLICT (token_id) DO UPDATE SET expires_at_secs = max(expires_at_secs, excluded.expires_at_secs)",
            )?
            .execute(params![token_id, expires_at, now])
        })?;
        Ok(())
    }

    async fn revocations_and_policy(&mut self, subject: &Uid, token_id: &str) -> StoreResult<CallState> {
        let row: CallStateRow = self.with(|c| {
            c.prepare_cached(
                "SELECT (SELECT revoked_at_secs FROM revoked_subjects WHERE etype = ?1 AND eid = ?2),
                        EXISTS (SELECT 1 FROM revoked_tokens WHERE token_id = ?3),
                        (SELECT max(version) FROM policies),
                        (SELECT generation FROM policy_links_meta WHERE id = 1)",
            )?
            .query_row(params![subject.ty, subject.id, token_id], |r| {
                Ok((
                    r.get::<_, Option<i64>>(0)?,
                    r.get::<_, bool>(1)?,
                    r.get::<_, Option<i64>>(2)?,
                    r.get::<_, i64>(3)?,
                ))
            })
        })?;
        Ok(call_state(row))
    }

    async fn revoke_subject(&mut self, subject: &Uid, at_secs: i64) -> StoreResult<()> {
        self.with(|c| {
            c.prepare_cached(
                "INSERT INTO revoked_subjects (etype, eid, revoked_at_secs) VALUES (?1, ?2, ?3)
                 ON CONFLICT (etype, eid) DO UPDATE SET revoked_at_secs = max(revoked_at_secs, excluded.revoked_at_secs)",
            )?
            .execute(params![subject.ty, subject.id, at_secs])
        })?;
        Ok(())
    }

    async fn policy_state(&mut self) -> StoreResult<PolicyState> {
        let (version, links) = self.with(|c| {
            c.prepare_cached(
                "SELECT (SELECT max(version) FROM policies), (SELECT generation FROM policy_links_meta WHERE id = 1)",
            )?
            .query_row([], |r| Ok((r.get::<_, Option<i64>>(0)?, r.get::<_, i64>(1)?)))
        })?;
        Ok(policy_state_of(version, links))
    }

    async fn policy_links(&mut self) -> StoreResult<Vec<TemplateLink>> {
        let rows = self.with(|c| {
            c.prepare_cached("SELECT * FROM policy_links ORDER BY link_id")?
                .query_map([], link_row)?
                .collect::<rusqlite::Result<Vec<_>>>()
        })?;
        Ok(rows.into_iter().map(TemplateLink::from).collect())
    }

    async fn insert_link(&mut self, l: &TemplateLink, now: i64) -> StoreResult<()> {
        self.with(|c| {
            c.prepare_cached(
                "INSERT INTO policy_links (link_id, template_id, principal_type, principal_id, resource_type, resource_id, created_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            )?
            .execute(params![
                l.link_id,
                l.template_id,
                l.principal.as_ref().map(|u| u.ty.as_str()),
                l.principal.as_ref().map(|u| u.id.as_str()),
                l.resource.as_ref().map(|u| u.ty.as_str()),
                l.resource.as_ref().map(|u| u.id.as_str()),
                now
            ])
        })?;
        self.bump_links_generation()
    }

    async fn delete_link(&mut self, link_id: &str) -> StoreResult<Option<TemplateLink>> {
        let row = self.with(|c| {
            c.prepare_cached("DELETE FROM policy_links WHERE link_id = ?1 RETURNING *")?
                .query_row([link_id], link_row)
                .optional()
        })?;
        if row.is_some() {
            self.bump_links_generation()?;
        }
        Ok(row.map(TemplateLink::from))
    }

    async fn policies(&mut self, version: u64) -> StoreResult<Option<PolicyRecord>> {
        let row = self.with(|c| {
            c.prepare_cached("SELECT version, policies, schema, created_at FROM policies WHERE version = ?1")?
                .query_row([to_i64(version)], policy_row)
                .optional()
        })?;
        Ok(row.map(PolicyRecord::from))
    }

    async fn insert_policies(&mut self, policies: &str, schema: &str, now: i64) -> StoreResult<u64> {
        let v: i64 = self.with(|c| {
            c.prepare_cached(
                "INSERT INTO policies (version, policies, schema, created_at)
                 VALUES ((SELECT coalesce(max(version), 0) + 1 FROM policies), ?1, ?2, ?3) RETURNING version",
            )?
            .query_row(params![policies, schema, now], |r| r.get(0))
        })?;
        Ok(to_u64(v))
    }

    async fn policy_history(&mut self) -> StoreResult<Vec<PolicyRecord>> {
        let rows = self.with(|c| {
            c.prepare_cached("SELECT version, policies, schema, created_at FROM policies ORDER BY version")?
                .query_map([], policy_row)?
                .collect::<rusqlite::Result<Vec<_>>>()
        })?;
        Ok(rows.into_iter().map(PolicyRecord::from).collect())
    }

    async fn entity(&mut self, uid: &Uid) -> StoreResult<Option<EntityRecord>> {
        let mapping = self.mapping.clone();
        if let Some(tm) = mapping.get(&uid.ty) {
            return self.mapped_entity(tm, uid);
        }
        let sql = concat!(select_entities!(), " WHERE etype = ?1 AND eid = ?2");
        Ok(self.entity_rows(sql, &[&uid.ty, &uid.id])?.pop())
    }

    async fn entities_with_ancestors(&mut self, uids: &[Uid]) -> StoreResult<Vec<EntityRecord>> {
        // Level by level: one indexed lookup per level (writers are serialized and a read
        // is one snapshot, so the levels are consistent); each entity once, so parent
        // cycles end.
        let mut seen: HashSet<Uid> = uids.iter().cloned().collect();
        let mut level: Vec<Uid> = seen.iter().cloned().collect();
        let mut out = Vec::new();
        while !level.is_empty() {
            let mut next = Vec::new();
            let (own, in_tables): (Vec<Uid>, Vec<Uid>) =
                level.into_iter().partition(|u| self.mapping.get(&u.ty).is_none());
            let mut by_type: HashMap<String, Vec<String>> = HashMap::new();
            for u in in_tables {
                by_type.entry(u.ty).or_default().push(u.id);
            }
            for (ty, ids) in by_type {
                let mapping = self.mapping.clone();
                let tm = mapping.get(&ty).expect("partitioned by the mapping above");
                for e in self.mapped_rows(tm, &ids)? {
                    next.extend(e.parents.iter().filter(|p| seen.insert((*p).clone())).cloned());
                    out.push(e);
                }
            }
            for chunk in own.chunks(16) {
                let values = (0..chunk.len()).map(|i| format!("(?{}, ?{})", 2 * i + 1, 2 * i + 2)).collect::<Vec<_>>();
                let sql = format!("{} WHERE (etype, eid) IN (VALUES {})", select_entities!(), values.join(", "));
                let args: Vec<&str> = chunk.iter().flat_map(|u| [u.ty.as_str(), u.id.as_str()]).collect();
                for e in self.entity_rows(&sql, &args)? {
                    next.extend(e.parents.iter().filter(|p| seen.insert((*p).clone())).cloned());
                    out.push(e);
                }
            }
            level = next;
        }
        Ok(out)
    }

    async fn insert_entity(&mut self, e: &EntityRecord) -> StoreResult<()> {
        let mapping = self.mapping.clone();
        if let Some(tm) = mapping.get(&e.uid.ty) {
            return self.mapped_insert(tm, e);
        }
        let attributes = serde_json::to_string(&e.attributes).map_err(json_err)?;
        let parents = serde_json::to_string(&e.parents).map_err(json_err)?;
        let tags = serde_json::to_string(&e.tags).map_err(json_err)?;
        self.with(|c| {
            c.prepare_cached(
                "INSERT INTO entities (etype, eid, attributes, parents, version, tags) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            )?
            .execute(params![e.uid.ty, e.uid.id, attributes, parents, to_i64(e.version), tags])
        })?;
        Ok(())
    }

    async fn update_entity(&mut self, e: &EntityRecord) -> StoreResult<()> {
        let mapping = self.mapping.clone();
        if let Some(tm) = mapping.get(&e.uid.ty) {
            return self.mapped_update(tm, e);
        }
        let attributes = serde_json::to_string(&e.attributes).map_err(json_err)?;
        let parents = serde_json::to_string(&e.parents).map_err(json_err)?;
        let tags = serde_json::to_string(&e.tags).map_err(json_err)?;
        let n = self.with(|c| {
            c.prepare_cached(
                "UPDATE entities SET attributes = ?3, parents = ?4, version = ?5, tags = ?6 WHERE etype = ?1 AND eid = ?2",
            )?
            .execute(params![e.uid.ty, e.uid.id, attributes, parents, to_i64(e.version), tags])
        })?;
        if n != 1 {
            return Err(StoreError::Internal(format!("update of missing entity {}", e.uid)));
        }
        Ok(())
    }

    async fn delete_entity(&mut self, uid: &Uid) -> StoreResult<()> {
        let mapping = self.mapping.clone();
        if let Some(tm) = mapping.get(&uid.ty) {
            return self.mapped_delete(tm, uid);
        }
        self.with(|c| {
            c.prepare_cached("DELETE FROM entities WHERE etype = ?1 AND eid = ?2")?.execute(params![uid.ty, uid.id])
        })?;
        Ok(())
    }

    async fn savepoint(&mut self) -> StoreResult<()> {
        self.with(|c| exec(c, "SAVEPOINT lockstep_mutations"))
    }

    async fn rollback_to_savepoint(&mut self) -> StoreResult<()> {
        self.with(|c| exec(c, "ROLLBACK TO SAVEPOINT lockstep_mutations"))
    }

    async fn claim_idempotency_key(
        &mut self,
        subject: &Uid,
        key: &str,
        request_hash: &[u8],
        now: i64,
    ) -> StoreResult<Option<(Vec<u8>, String)>> {
        self.with(|c| {
            // Writers are serialized, so a row seen here was written by an earlier writer.
            let stored = c
                .prepare_cached(
                    "SELECT request_hash, response FROM idempotency WHERE etype = ?1 AND eid = ?2 AND key = ?3",
                )?
                .query_row(params![subject.ty, subject.id, key], |r| Ok((r.get(0)?, r.get(1)?)))
                .optional()?;
            if stored.is_some() {
                return Ok(stored);
            }
            c.prepare_cached(
                "INSERT INTO idempotency (etype, eid, key, request_hash, response, created_at) VALUES (?1, ?2, ?3, ?4, '', ?5)",
            )?
            .execute(params![subject.ty, subject.id, key, request_hash, now])?;
            Ok(None)
        })
    }

    async fn complete_idempotency_key(&mut self, subject: &Uid, key: &str, response: &str) -> StoreResult<()> {
        self.with(|c| {
            c.prepare_cached("UPDATE idempotency SET response = ?4 WHERE etype = ?1 AND eid = ?2 AND key = ?3")?
                .execute(params![subject.ty, subject.id, key, response])
        })?;
        Ok(())
    }

    async fn append_audit(&mut self, ev: &NewAuditEvent, now: i64) -> StoreResult<u64> {
        let mutations = audit_mutations_json(&ev.mutations)?;
        let entities = audit_entities_json(&ev.entities)?;
        let seq: i64 = self.with(|c| {
            c.prepare_cached(
                "INSERT INTO audit (time, kind, principal_type, principal_id, token_id, mutations, entities, detail)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8) RETURNING seq",
            )?
            .query_row(
                params![
                    now,
                    ev.kind as i64,
                    ev.principal.as_ref().map(|p| p.ty.as_str()),
                    ev.principal.as_ref().map(|p| p.id.as_str()),
                    ev.token_id,
                    mutations,
                    entities,
                    ev.detail
                ],
                |r| r.get(0),
            )
        })?;
        Ok(to_u64(seq))
    }

    async fn audit_events(&mut self, after_seq: u64, limit: u32) -> StoreResult<Vec<AuditEvent>> {
        let rows = self.with(|c| {
            c.prepare_cached("SELECT * FROM audit WHERE seq > ?1 ORDER BY seq LIMIT ?2")?
                .query_map(params![to_i64(after_seq), i64::from(limit)], |r| {
                    Ok(AuditRow {
                        seq: r.get("seq")?,
                        time: r.get("time")?,
                        kind: r.get("kind")?,
                        principal_type: r.get("principal_type")?,
                        principal_id: r.get("principal_id")?,
                        token_id: r.get("token_id")?,
                        mutations: r.get("mutations")?,
                        entities: r.get("entities")?,
                        detail: r.get("detail")?,
                    })
                })?
                .collect::<rusqlite::Result<Vec<_>>>()
        })?;
        rows.into_iter().map(AuditEvent::try_from).collect()
    }

    async fn audit_extent(&mut self) -> StoreResult<(u64, Option<u64>, Option<u64>)> {
        self.with(|c| {
            c.prepare_cached(
                "SELECT (SELECT through_seq FROM audit_trim WHERE id = 1), (SELECT min(seq) FROM audit),
                        (SELECT max(seq) FROM audit)",
            )?
            .query_row([], |r| {
                Ok((
                    to_u64(r.get::<_, i64>(0)?),
                    r.get::<_, Option<i64>>(1)?.map(to_u64),
                    r.get::<_, Option<i64>>(2)?.map(to_u64),
                ))
            })
        })
    }

    async fn audit_time_at(&mut self, seq: u64) -> StoreResult<Option<(u64, i64)>> {
        self.with(|c| {
            c.prepare_cached("SELECT seq, time FROM audit WHERE seq >= ?1 ORDER BY seq LIMIT 1")?
                .query_row([to_i64(seq)], |r| Ok((to_u64(r.get::<_, i64>(0)?), r.get::<_, i64>(1)?)))
                .optional()
        })
    }

    async fn trim_audit(&mut self, seqs: &[u64]) -> StoreResult<u64> {
        let Some(&last) = seqs.last() else { return Ok(0) };
        self.with(|c| {
            c.prepare_cached("UPDATE audit_trim SET through_seq = max(through_seq, ?1) WHERE id = 1")?
                .execute([to_i64(last)])?;
            let mut delete = c.prepare_cached("DELETE FROM audit WHERE seq = ?1")?;
            let mut n = 0u64;
            for s in seqs {
                n += delete.execute([to_i64(*s)])? as u64;
            }
            Ok(n)
        })
    }

    async fn purge(&mut self, now_secs: i64, idempotency_before: i64) -> StoreResult<(u64, u64)> {
        self.with(|c| {
            let tokens =
                c.prepare_cached("DELETE FROM revoked_tokens WHERE expires_at_secs < ?1")?.execute([now_secs])?;
            let keys =
                c.prepare_cached("DELETE FROM idempotency WHERE created_at < ?1")?.execute([idempotency_before])?;
            Ok((tokens as u64, keys as u64))
        })
    }

    async fn commit(self: Box<Self>) -> StoreResult<()> {
        let mut member = match self.conn {
            // A read-only snapshot has nothing to make durable.
            Conn::Read(r) => {
                drop(r);
                return Ok(());
            }
            Conn::Write(m) => m,
        };
        let w = member.writer();
        w.exec("RELEASE SAVEPOINT lockstep_member").map_err(map_err)?;
        member.joined = false;
        let w = member.writer();
        if !w.group_commit {
            return w.commit_group(true).await;
        }
        let (tx, rx) = oneshot::channel();
        w.waiters.push(tx);
        // Hands the connection to the next member (or the committer) and wakes the
        // committer, which queues behind the members already waiting.
        drop(member);
        rx.await.unwrap_or_else(|_| {
            Err(StoreError::Unknown(
                "the server stopped while this call's group commit was in flight; its outcome is unknown".into(),
            ))
        })
    }
}
