//! The SQLite store: the embedded default. One writer connection shared by group
//! commit (below), and a small pool of readers that never block (WAL).
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

use super::{
    AuditRow, EntityRow, GroupCommitStats, KeyRow, LinkRow, PolicyRow, Store, StoreError, StoreResult, Txn, json_err,
    to_i64, to_u64,
};
use crate::config::StoreOptions;
use crate::model::{
    AuditEvent, CallState, EntityRecord, KeyRecord, NewAuditEvent, PolicyRecord, PolicyState, TemplateLink, Uid,
};
use async_trait::async_trait;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{ConnectOptions, Row, Sqlite, SqliteConnection, SqlitePool, Transaction};
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;
use tokio::sync::{Mutex, Notify, OwnedMutexGuard, oneshot};

pub struct SqliteStore {
    /// The one writer connection: the queue for it is the writers' queue, so no writer
    /// ever sees "database is locked" from another writer of this process.
    writer: Arc<Mutex<Writer>>,
    /// Wakes the committer task.
    committer: Arc<Notify>,
    /// Read-only snapshots for decision-only calls; WAL lets them run beside the writer.
    reader: SqlitePool,
    acquire_timeout: Duration,
    stats: Arc<Counters>,
}

/// The writer connection and what is known about its transaction.
struct Writer {
    conn: SqliteConnection,
    state: TxState,
    /// A member's savepoint may still be open though the member is gone (it failed or
    /// was cancelled): undone before anyone else uses the connection.
    member_left: bool,
    /// Members that released their savepoint into the open transaction and wait for
    /// its COMMIT.
    waiters: Vec<oneshot::Sender<StoreResult<()>>>,
    /// Off: each member commits its own transaction (one fsync per call).
    group_commit: bool,
    /// The writers' turnstile file (see `turnstile`).
    turnstile: std::path::PathBuf,
    /// How long to wait for the turnstile (the busy timeout).
    busy_timeout: Duration,
    stats: Arc<Counters>,
}

/// Group commit counters (read without waiting for the writer).
#[derive(Default)]
struct Counters {
    transactions: AtomicU64,
    calls: AtomicU64,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum TxState {
    Idle,
    Open,
    /// A `BEGIN` was abandoned in flight: it may or may not have run.
    Unknown,
}

const SAVEPOINT: &str = "SAVEPOINT lockstep_member";

impl Writer {
    async fn exec(&mut self, sql: &'static str) -> Result<(), sqlx::Error> {
        sqlx::query(sql).execute(&mut self.conn).await.map(|_| ())
    }

    /// Brings the connection to a known state after a member or a settle was abandoned:
    /// an orphaned member savepoint is rolled back (only it), and an abandoned `BEGIN`
    /// (which can only have been the first of a group, so no member waits on it) is
    /// rolled back whether or not it ran.
    async fn settle(&mut self) -> StoreResult<()> {
        if self.member_left {
            match self.exec("ROLLBACK TO SAVEPOINT lockstep_member").await {
                Ok(()) => {
                    if let Err(e) = self.exec("RELEASE SAVEPOINT lockstep_member").await {
                        return Err(self.fail_group(map_err(e)).await);
                    }
                }
                // The member went before its savepoint was made: nothing to undo.
                Err(e) if e.to_string().contains("no such savepoint") => {}
                Err(e) => return Err(self.fail_group(map_err(e)).await),
            }
            self.member_left = false;
        }
        if self.state == TxState::Unknown {
            match self.exec("ROLLBACK").await {
                Ok(()) => {}
                Err(e) if e.to_string().contains("no transaction is active") => {}
                Err(e) => return Err(map_err(e)),
            }
            self.state = TxState::Idle;
        }
        Ok(())
    }

    /// Rolls the whole group back and tells every waiting member why.
    async fn fail_group(&mut self, e: StoreError) -> StoreError {
        self.state = match self.exec("ROLLBACK").await {
            Ok(()) => TxState::Idle,
            Err(_) => TxState::Unknown,
        };
        for w in self.waiters.drain(..) {
            let _ = w.send(Err(e.clone()));
        }
        e
    }

    /// Commits the open transaction (if any) and answers every waiting member; with no
    /// member waiting (all left without committing) rolls it back instead.
    async fn commit_group(&mut self, any_member: bool) -> StoreResult<()> {
        if self.state != TxState::Open {
            return Ok(());
        }
        if self.waiters.is_empty() && !any_member {
            return match self.exec("ROLLBACK").await {
                Ok(()) => {
                    self.state = TxState::Idle;
                    Ok(())
                }
                Err(e) => Err(self.fail_group(map_err(e)).await),
            };
        }
        match self.exec("COMMIT").await {
            Ok(()) => {
                self.state = TxState::Idle;
                self.stats.transactions.fetch_add(1, Ordering::Relaxed);
                self.stats.calls.fetch_add(self.waiters.len().max(1) as u64, Ordering::Relaxed);
                for w in self.waiters.drain(..) {
                    let _ = w.send(Ok(()));
                }
                Ok(())
            }
            Err(e) => Err(self.fail_group(map_err(e)).await),
        }
    }

    /// Opens the group's transaction when none is open, then the member's savepoint.
    async fn join(&mut self) -> StoreResult<()> {
        self.settle().await?;
        if self.state == TxState::Idle {
            let turn = turnstile(&self.turnstile, self.busy_timeout).await?;
            self.state = TxState::Unknown;
            let begun = self.exec("BEGIN IMMEDIATE").await;
            drop(turn);
            match begun {
                Ok(()) => self.state = TxState::Open,
                Err(e) => {
                    self.state = TxState::Idle;
                    return Err(map_err(e));
                }
            }
        }
        self.member_left = true;
        self.exec(SAVEPOINT).await.map_err(map_err)
    }
}

/// Takes the writers' turnstile: an exclusive `flock` on a file beside the database that
/// every Lockstep process holds while it waits for SQLite's write lock and lets go once it
/// has it. SQLite's busy handler only polls, so without it a busy server, beginning its
/// next group the moment the last one committed, could keep another process (the CLI
/// revoking a key, a second server) out past its busy timeout; with it, the server cannot
/// take the write lock again while another process is waiting for it.
async fn turnstile(path: &std::path::Path, wait: Duration) -> StoreResult<std::fs::File> {
    let unavailable =
        |e: std::io::Error| StoreError::Unavailable(format!("writers' turnstile {}: {e}", path.display()));
    let open = |p: &std::path::Path| std::fs::OpenOptions::new().create(true).truncate(false).write(true).open(p);
    let f = open(path).map_err(unavailable)?;
    match f.try_lock() {
        Ok(()) => return Ok(f),
        Err(std::fs::TryLockError::WouldBlock) => {}
        Err(std::fs::TryLockError::Error(e)) => return Err(unavailable(e)),
    }
    drop(f);
    // Wait in a blocking thread on a file of its own: if this wait is abandoned, the lock
    // it may still get is released when that thread's file is dropped.
    let p = path.to_owned();
    let waiting = tokio::task::spawn_blocking(move || {
        let f = open(&p)?;
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

/// Runs a group's COMMIT once the members queued before it have had their turn.
async fn committer(writer: Weak<Mutex<Writer>>, wake: Arc<Notify>) {
    loop {
        wake.notified().await;
        let Some(writer) = writer.upgrade() else { return };
        let mut w = writer.lock().await;
        let settled = w.settle().await;
        if settled.is_ok()
            && let Err(e) = w.commit_group(false).await
        {
            tracing::warn!(error = %e, "SQLite group commit failed; its members were told, nothing of it committed");
        }
    }
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
            .journal_mode(SqliteJournalMode::Wal)
            // FULL: a commit that returned survives a power cut, not only a crash.
            .synchronous(SqliteSynchronous::Full)
            .busy_timeout(opts.busy_timeout)
            .foreign_keys(false)
            // Statements are not logged (and never carry a token).
            .log_statements(log::LevelFilter::Off);
        let turnstile = turnstile_path(&base);
        let mut conn = base
            .clone()
            .create_if_missing(true)
            .connect()
            .await
            .map_err(|e| anyhow::anyhow!("cannot open SQLite database `{url}`: {e}"))?;
        sqlx::migrate!("migrations/sqlite")
            .run(&mut conn)
            .await
            .map_err(|e| anyhow::anyhow!("migrating `{url}` failed: {e}"))?;
        let reader = SqlitePoolOptions::new()
            .max_connections(opts.read_connections.max(1))
            .acquire_timeout(opts.acquire_timeout)
            .connect_with(base.clone().read_only(true))
            .await
            .map_err(|e| anyhow::anyhow!("cannot open SQLite database `{url}` for reading: {e}"))?;
        let stats = Arc::new(Counters::default());
        let writer = Arc::new(Mutex::new(Writer {
            conn,
            state: TxState::Idle,
            member_left: false,
            waiters: Vec::new(),
            group_commit: opts.group_commit,
            turnstile,
            busy_timeout: opts.busy_timeout,
            stats: stats.clone(),
        }));
        let wake = Arc::new(Notify::new());
        tokio::spawn(committer(Arc::downgrade(&writer), wake.clone()));
        Ok(Self { writer, committer: wake, reader, acquire_timeout: opts.acquire_timeout, stats })
    }
}

/// `<database file>.writers`, beside the database (like its `-wal` and `-shm` files).
fn turnstile_path(opts: &SqliteConnectOptions) -> std::path::PathBuf {
    let mut name = opts.get_filename().as_os_str().to_owned();
    name.push(".writers");
    std::path::PathBuf::from(name)
}

impl Drop for SqliteStore {
    fn drop(&mut self) {
        // The committer sees the writer gone and ends.
        self.committer.notify_one();
    }
}

#[async_trait]
impl Store for SqliteStore {
    async fn write(&self) -> StoreResult<Box<dyn Txn>> {
        let guard =
            tokio::time::timeout(self.acquire_timeout, self.writer.clone().lock_owned()).await.map_err(|_| {
                StoreError::Unavailable("timed out waiting for the database; nothing was committed, retry".into())
            })?;
        let member = Member { guard: Some(guard), wake: self.committer.clone() };
        // Wrapped first: a member that fails (or is cancelled) while joining still has
        // the committer settle what it left.
        let mut txn = SqliteTxn::Write(member);
        if let SqliteTxn::Write(Member { guard: Some(g), .. }) = &mut txn {
            g.join().await?;
        }
        Ok(Box::new(txn))
    }

    async fn read(&self) -> StoreResult<Box<dyn Txn>> {
        let tx = self.reader.begin().await.map_err(map_err)?;
        Ok(Box::new(SqliteTxn::Read(tx)))
    }

    async fn ping(&self) -> StoreResult<()> {
        // Touch the file, not just the connection: a read of a real table.
        sqlx::query("SELECT max(version) FROM policies").execute(&self.reader).await.map_err(map_err)?;
        Ok(())
    }

    fn group_commit_stats(&self) -> Option<GroupCommitStats> {
        Some(GroupCommitStats {
            transactions: self.stats.transactions.load(Ordering::Relaxed),
            calls: self.stats.calls.load(Ordering::Relaxed),
        })
    }
}

/// One write transaction: a savepoint inside the group's transaction, holding the
/// writer connection until it commits or goes.
struct Member {
    guard: Option<OwnedMutexGuard<Writer>>,
    wake: Arc<Notify>,
}

impl Drop for Member {
    fn drop(&mut self) {
        if let Some(g) = &self.guard
            && (g.member_left || g.state != TxState::Idle)
        {
            // Left without committing (or holding an open group): the committer settles
            // the connection and commits or rolls back the group, so it never stays open.
            self.wake.notify_one();
        }
    }
}

enum SqliteTxn {
    Read(Transaction<'static, Sqlite>),
    Write(Member),
}

impl SqliteTxn {
    fn conn(&mut self) -> &mut SqliteConnection {
        match self {
            Self::Read(tx) => &mut *tx,
            Self::Write(m) => &mut m.guard.as_mut().expect("a member holds the writer until it ends").conn,
        }
    }

    /// A link changed: the next transaction recompiles the policy set with the links.
    async fn bump_links_generation(&mut self) -> StoreResult<()> {
        sqlx::query("UPDATE policy_links_meta SET generation = generation + 1 WHERE id = 1")
            .execute(self.conn())
            .await
            .map_err(map_err)?;
        Ok(())
    }
}

/// Maps a driver error to what the use cases need to know: can the caller retry later
/// (UNAVAILABLE), did a uniqueness constraint refuse the write, or is it a bug.
fn map_err(e: sqlx::Error) -> StoreError {
    match &e {
        sqlx::Error::PoolTimedOut => {
            StoreError::Unavailable("timed out waiting for the database; nothing was committed, retry".into())
        }
        sqlx::Error::PoolClosed | sqlx::Error::WorkerCrashed | sqlx::Error::Io(_) => {
            StoreError::Unavailable(e.to_string())
        }
        sqlx::Error::Database(db) => {
            if db.is_unique_violation() {
                return StoreError::Conflict(db.message().to_owned());
            }
            // Primary result codes: BUSY 5, LOCKED 6, NOMEM 7, READONLY 8, IOERR 10,
            // CORRUPT 11, FULL 13, CANTOPEN 14, PROTOCOL 15, NOTADB 26.
            let primary = db.code().and_then(|c| c.parse::<i64>().ok()).map(|c| c & 0xff);
            match primary {
                Some(5 | 6) => StoreError::Unavailable(
                    "another writer held the database past the busy timeout; nothing was committed, retry".into(),
                ),
                Some(7 | 8 | 10 | 13 | 14 | 15) => StoreError::Unavailable(db.message().to_owned()),
                _ => StoreError::Internal(e.to_string()),
            }
        }
        _ => StoreError::Internal(e.to_string()),
    }
}

#[async_trait]
impl Txn for SqliteTxn {
    async fn key(&mut self, kid: &str) -> StoreResult<Option<KeyRecord>> {
        let row = sqlx::query_as::<_, KeyRow>("SELECT * FROM keys WHERE kid = ?1")
            .bind(kid)
            .fetch_optional(self.conn())
            .await
            .map_err(map_err)?;
        Ok(row.map(KeyRecord::from))
    }

    async fn list_keys(&mut self) -> StoreResult<Vec<KeyRecord>> {
        let rows = sqlx::query_as::<_, KeyRow>("SELECT * FROM keys ORDER BY added_at, kid")
            .fetch_all(self.conn())
            .await
            .map_err(map_err)?;
        Ok(rows.into_iter().map(KeyRecord::from).collect())
    }

    async fn insert_key(&mut self, k: &KeyRecord) -> StoreResult<()> {
        sqlx::query(
            "INSERT INTO keys (kid, algorithm, secret, public_key_pem, issuer, audience, principal_type, revoked, added_at,
                               jwk, source, retired, required_typ, max_lifetime_secs, signing, private_key)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16)",
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
        .execute(self.conn())
        .await
        .map_err(map_err)?;
        Ok(())
    }

    async fn update_key(&mut self, k: &KeyRecord) -> StoreResult<()> {
        sqlx::query("UPDATE keys SET jwk = ?2, retired = ?3, signing = ?4 WHERE kid = ?1")
            .bind(&k.kid)
            .bind(&k.jwk)
            .bind(k.retired)
            .bind(k.signing)
            .execute(self.conn())
            .await
            .map_err(map_err)?;
        Ok(())
    }

    async fn revoke_key(&mut self, kid: &str, now: i64) -> StoreResult<bool> {
        let done = sqlx::query("UPDATE keys SET revoked = 1, revoked_at = coalesce(revoked_at, ?2) WHERE kid = ?1")
            .bind(kid)
            .bind(now)
            .execute(self.conn())
            .await
            .map_err(map_err)?;
        Ok(done.rows_affected() > 0)
    }

    async fn revoke_token(
        &mut self,
        token_id: &str,
        _subject: Option<&Uid>,
        expires_at: i64,
        now: i64,
    ) -> StoreResult<()> {
        sqlx::query(
            "INSERT INTO revoked_tokens (token_id, expires_at_secs, revoked_at) VALUES (?1, ?2, ?3)
             ON CONFLICT (token_id) DO UPDATE SET expires_at_secs = max(expires_at_secs, excluded.expires_at_secs)",
        )
        .bind(token_id)
        .bind(expires_at)
        .bind(now)
        .execute(self.conn())
        .await
        .map_err(map_err)?;
        Ok(())
    }

    async fn revocations_and_policy(&mut self, subject: &Uid, token_id: &str) -> StoreResult<CallState> {
        let (subject_revoked_at, token_revoked, version, links): (Option<i64>, bool, Option<i64>, i64) =
            sqlx::query_as(
                "SELECT (SELECT revoked_at_secs FROM revoked_subjects WHERE etype = ?1 AND eid = ?2),
                        EXISTS (SELECT 1 FROM revoked_tokens WHERE token_id = ?3),
                        (SELECT max(version) FROM policies),
                        (SELECT generation FROM policy_links_meta WHERE id = 1)",
            )
            .bind(&subject.ty)
            .bind(&subject.id)
            .bind(token_id)
            .fetch_one(self.conn())
            .await
            .map_err(map_err)?;
        Ok(CallState {
            subject_revoked_at,
            token_revoked,
            policy: PolicyState { version: version.map(to_u64), links: to_u64(links) },
        })
    }

    async fn revoke_subject(&mut self, subject: &Uid, at_secs: i64) -> StoreResult<()> {
        sqlx::query(
            "INSERT INTO revoked_subjects (etype, eid, revoked_at_secs) VALUES (?1, ?2, ?3)
             ON CONFLICT (etype, eid) DO UPDATE SET revoked_at_secs = max(revoked_at_secs, excluded.revoked_at_secs)",
        )
        .bind(&subject.ty)
        .bind(&subject.id)
        .bind(at_secs)
        .execute(self.conn())
        .await
        .map_err(map_err)?;
        Ok(())
    }

    async fn policy_state(&mut self) -> StoreResult<PolicyState> {
        let (version, links): (Option<i64>, i64) = sqlx::query_as(
            "SELECT (SELECT max(version) FROM policies), (SELECT generation FROM policy_links_meta WHERE id = 1)",
        )
        .fetch_one(self.conn())
        .await
        .map_err(map_err)?;
        Ok(PolicyState { version: version.map(to_u64), links: to_u64(links) })
    }

    async fn policy_links(&mut self) -> StoreResult<Vec<TemplateLink>> {
        let rows = sqlx::query_as::<_, LinkRow>("SELECT * FROM policy_links ORDER BY link_id")
            .fetch_all(self.conn())
            .await
            .map_err(map_err)?;
        Ok(rows.into_iter().map(TemplateLink::from).collect())
    }

    async fn insert_link(&mut self, l: &TemplateLink, now: i64) -> StoreResult<()> {
        sqlx::query(
            "INSERT INTO policy_links (link_id, template_id, principal_type, principal_id, resource_type, resource_id, created_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
        )
        .bind(&l.link_id)
        .bind(&l.template_id)
        .bind(l.principal.as_ref().map(|u| u.ty.as_str()))
        .bind(l.principal.as_ref().map(|u| u.id.as_str()))
        .bind(l.resource.as_ref().map(|u| u.ty.as_str()))
        .bind(l.resource.as_ref().map(|u| u.id.as_str()))
        .bind(now)
        .execute(self.conn())
        .await
        .map_err(map_err)?;
        self.bump_links_generation().await?;
        Ok(())
    }

    async fn delete_link(&mut self, link_id: &str) -> StoreResult<Option<TemplateLink>> {
        let row = sqlx::query_as::<_, LinkRow>("DELETE FROM policy_links WHERE link_id = ?1 RETURNING *")
            .bind(link_id)
            .fetch_optional(self.conn())
            .await
            .map_err(map_err)?;
        if row.is_some() {
            self.bump_links_generation().await?;
        }
        Ok(row.map(TemplateLink::from))
    }

    async fn policies(&mut self, version: u64) -> StoreResult<Option<PolicyRecord>> {
        let row = sqlx::query_as::<_, PolicyRow>(
            "SELECT version, policies, schema, created_at FROM policies WHERE version = ?1",
        )
        .bind(to_i64(version))
        .fetch_optional(self.conn())
        .await
        .map_err(map_err)?;
        Ok(row.map(PolicyRecord::from))
    }

    async fn insert_policies(&mut self, policies: &str, schema: &str, now: i64) -> StoreResult<u64> {
        let v: i64 = sqlx::query_scalar(
            "INSERT INTO policies (version, policies, schema, created_at)
             VALUES ((SELECT coalesce(max(version), 0) + 1 FROM policies), ?1, ?2, ?3) RETURNING version",
        )
        .bind(policies)
        .bind(schema)
        .bind(now)
        .fetch_one(self.conn())
        .await
        .map_err(map_err)?;
        Ok(to_u64(v))
    }

    async fn policy_history(&mut self) -> StoreResult<Vec<PolicyRecord>> {
        let rows = sqlx::query_as::<_, PolicyRow>(
            "SELECT version, policies, schema, created_at FROM policies ORDER BY version",
        )
        .fetch_all(self.conn())
        .await
        .map_err(map_err)?;
        Ok(rows.into_iter().map(PolicyRecord::from).collect())
    }

    async fn entity(&mut self, uid: &Uid) -> StoreResult<Option<EntityRecord>> {
        let row = sqlx::query_as::<_, EntityRow>(
            "SELECT etype, eid, attributes, parents, version FROM entities WHERE etype = ?1 AND eid = ?2",
        )
        .bind(&uid.ty)
        .bind(&uid.id)
        .fetch_optional(self.conn())
        .await
        .map_err(map_err)?;
        row.map(EntityRecord::try_from).transpose()
    }

    async fn entities_with_ancestors(&mut self, uids: &[Uid]) -> StoreResult<Vec<EntityRecord>> {
        if uids.is_empty() {
            return Ok(Vec::new());
        }
        let start = serde_json::to_string(uids).map_err(json_err)?;
        // UNION (not UNION ALL) visits each entity once, so parent cycles terminate.
        let rows = sqlx::query_as::<_, EntityRow>(
            "WITH RECURSIVE anc(etype, eid) AS (
                 SELECT s.value ->> '$.type', s.value ->> '$.id' FROM json_each(?1) AS s
                 UNION
                 SELECT p.value ->> '$.type', p.value ->> '$.id'
                 FROM anc JOIN entities e ON e.etype = anc.etype AND e.eid = anc.eid, json_each(e.parents) AS p
             )
             SELECT e.etype, e.eid, e.attributes, e.parents, e.version
             FROM anc JOIN entities e ON e.etype = anc.etype AND e.eid = anc.eid",
        )
        .bind(start)
        .fetch_all(self.conn())
        .await
        .map_err(map_err)?;
        rows.into_iter().map(EntityRecord::try_from).collect()
    }

    async fn insert_entity(&mut self, e: &EntityRecord) -> StoreResult<()> {
        sqlx::query("INSERT INTO entities (etype, eid, attributes, parents, version) VALUES (?1, ?2, ?3, ?4, ?5)")
            .bind(&e.uid.ty)
            .bind(&e.uid.id)
            .bind(serde_json::to_string(&e.attributes).map_err(json_err)?)
            .bind(serde_json::to_string(&e.parents).map_err(json_err)?)
            .bind(to_i64(e.version))
            .execute(self.conn())
            .await
            .map_err(map_err)?;
        Ok(())
    }

    async fn update_entity(&mut self, e: &EntityRecord) -> StoreResult<()> {
        let done = sqlx::query(
            "UPDATE entities SET attributes = ?3, parents = ?4, version = ?5 WHERE etype = ?1 AND eid = ?2",
        )
        .bind(&e.uid.ty)
        .bind(&e.uid.id)
        .bind(serde_json::to_string(&e.attributes).map_err(json_err)?)
        .bind(serde_json::to_string(&e.parents).map_err(json_err)?)
        .bind(to_i64(e.version))
        .execute(self.conn())
        .await
        .map_err(map_err)?;
        if done.rows_affected() != 1 {
            return Err(StoreError::Internal(format!("update of missing entity {}", e.uid)));
        }
        Ok(())
    }

    async fn delete_entity(&mut self, uid: &Uid) -> StoreResult<()> {
        sqlx::query("DELETE FROM entities WHERE etype = ?1 AND eid = ?2")
            .bind(&uid.ty)
            .bind(&uid.id)
            .execute(self.conn())
            .await
            .map_err(map_err)?;
        Ok(())
    }

    async fn savepoint(&mut self) -> StoreResult<()> {
        sqlx::query("SAVEPOINT lockstep_mutations").execute(self.conn()).await.map_err(map_err)?;
        Ok(())
    }

    async fn rollback_to_savepoint(&mut self) -> StoreResult<()> {
        sqlx::query("ROLLBACK TO SAVEPOINT lockstep_mutations").execute(self.conn()).await.map_err(map_err)?;
        Ok(())
    }

    async fn claim_idempotency_key(
        &mut self,
        subject: &Uid,
        key: &str,
        request_hash: &[u8],
        now: i64,
    ) -> StoreResult<Option<(Vec<u8>, String)>> {
        // Writers are serialized, so a row seen here was committed by an earlier writer.
        let row =
            sqlx::query("SELECT request_hash, response FROM idempotency WHERE etype = ?1 AND eid = ?2 AND key = ?3")
                .bind(&subject.ty)
                .bind(&subject.id)
                .bind(key)
                .fetch_optional(self.conn())
                .await
                .map_err(map_err)?;
        if let Some(r) = row {
            return Ok(Some((r.try_get(0).map_err(map_err)?, r.try_get(1).map_err(map_err)?)));
        }
        sqlx::query(
            "INSERT INTO idempotency (etype, eid, key, request_hash, response, created_at) VALUES (?1, ?2, ?3, ?4, '', ?5)",
        )
        .bind(&subject.ty)
        .bind(&subject.id)
        .bind(key)
        .bind(request_hash)
        .bind(now)
        .execute(self.conn())
        .await
        .map_err(map_err)?;
        Ok(None)
    }

    async fn complete_idempotency_key(&mut self, subject: &Uid, key: &str, response: &str) -> StoreResult<()> {
        sqlx::query("UPDATE idempotency SET response = ?4 WHERE etype = ?1 AND eid = ?2 AND key = ?3")
            .bind(&subject.ty)
            .bind(&subject.id)
            .bind(key)
            .bind(response)
            .execute(self.conn())
            .await
            .map_err(map_err)?;
        Ok(())
    }

    async fn append_audit(&mut self, ev: &NewAuditEvent, now: i64) -> StoreResult<u64> {
        let seq: i64 = sqlx::query_scalar(
            "INSERT INTO audit (time, kind, principal_type, principal_id, token_id, mutations, entities, detail)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8) RETURNING seq",
        )
        .bind(now)
        .bind(ev.kind as i64)
        .bind(ev.principal.as_ref().map(|p| p.ty.as_str()))
        .bind(ev.principal.as_ref().map(|p| p.id.as_str()))
        .bind(&ev.token_id)
        .bind(serde_json::to_string(&ev.mutations).map_err(json_err)?)
        .bind(serde_json::to_string(&ev.entities).map_err(json_err)?)
        .bind(&ev.detail)
        .fetch_one(self.conn())
        .await
        .map_err(map_err)?;
        Ok(to_u64(seq))
    }

    async fn audit_events(&mut self, after_seq: u64, limit: u32) -> StoreResult<Vec<AuditEvent>> {
        let rows = sqlx::query_as::<_, AuditRow>("SELECT * FROM audit WHERE seq > ?1 ORDER BY seq LIMIT ?2")
            .bind(to_i64(after_seq))
            .bind(i64::from(limit))
            .fetch_all(self.conn())
            .await
            .map_err(map_err)?;
        rows.into_iter().map(AuditEvent::try_from).collect()
    }

    async fn purge(&mut self, now_secs: i64, idempotency_before: i64) -> StoreResult<(u64, u64)> {
        let tokens = sqlx::query("DELETE FROM revoked_tokens WHERE expires_at_secs < ?1")
            .bind(now_secs)
            .execute(self.conn())
            .await
            .map_err(map_err)?;
        let keys = sqlx::query("DELETE FROM idempotency WHERE created_at < ?1")
            .bind(idempotency_before)
            .execute(self.conn())
            .await
            .map_err(map_err)?;
        Ok((tokens.rows_affected(), keys.rows_affected()))
    }

    async fn commit(self: Box<Self>) -> StoreResult<()> {
        let mut member = match *self {
            // A read-only snapshot has nothing to make durable: it ends without waiting
            // (its rollback is queued on the connection).
            Self::Read(tx) => {
                drop(tx);
                return Ok(());
            }
            Self::Write(m) => m,
        };
        let w = member.guard.as_mut().expect("a member holds the writer until it ends");
        w.exec("RELEASE SAVEPOINT lockstep_member").await.map_err(map_err)?;
        w.member_left = false;
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
