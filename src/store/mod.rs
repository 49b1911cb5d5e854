//! Storage: the `Store` and `Txn` traits, one implementation per database.
//!
//! Everything that decides a call is read through a `Txn`, and a write call's decision
//! and its writes share one `Txn`. SQL lives only below this module.

pub(crate) mod mapped;
pub mod postgres;
pub mod sqlite;

use crate::model::{
    AuditEvent, AuditKind, CallState, EntityRecord, KeyRecord, NewAuditEvent, PolicyRecord, PolicyState, TemplateLink,
    Uid,
};
use async_trait::async_trait;
use std::sync::Arc;

/// The message of the `StoreError::Retry` with which a `read_single` transaction asks to
/// be read again in a transaction (no conflict: retried at once, not counted).
pub const RESTART_IN_SNAPSHOT: &str = "a decision needed a second read: read again in one snapshot";

/// The `StoreError::Retry` of a speculative write (`Txn::speculating`) given up before it
/// sent anything: the call needed a statement, or ended in an error decided on what the
/// store last saw. Read again in full, at once.
pub const SPECULATION_ABANDONED: &str = "a speculative write needed more than was seen: read again in full";
/// The `StoreError::Retry` of a speculative write that found what it was decided on
/// changed (it wrote nothing). Read again in full, at once.
pub const SPECULATION_STALE: &str = "what a speculative write was decided on had changed: read again in full";

/// Where `Txn::append_audit_last` puts the seq of its event (the last attempt's: a retry
/// writes it again).
#[derive(Clone, Debug, Default)]
pub struct AuditSeq(Arc<std::sync::atomic::AtomicU64>);

impl AuditSeq {
    pub fn set(&self, seq: u64) {
        self.0.store(seq, std::sync::atomic::Ordering::Release);
    }

    pub fn get(&self) -> u64 {
        self.0.load(std::sync::atomic::Ordering::Acquire)
    }
}

/// Why a store operation failed, in the terms the use cases need.
#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    /// The database cannot be reached or did not answer in time (includes SQLite's
    /// busy timeout running out): the caller gets UNAVAILABLE and nothing is committed.
    #[error("{0}")]
    Unavailable(String),
    /// A uniqueness constraint refused a write (e.g. a key or entity that exists).
    #[error("{0}")]
    Conflict(String),
    /// The database refused a value of the request (e.g. text it cannot store).
    #[error("{0}")]
    Invalid(String),
    /// A commit whose outcome cannot be known (the connection failed during COMMIT and
    /// the database could not be asked before the deadline or settle window ran out).
    #[error("{0}")]
    Unknown(String),
    /// A serialization failure or deadlock: the whole transaction may be retried.
    #[error("{0}")]
    Retry(String),
    /// Anything else: a bug or corrupt data.
    #[error("{0}")]
    Internal(String),
}

pub type StoreResult<T> = Result<T, StoreError>;

/// A database that hands out transactions.
#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// Starts a write transaction. Write transactions are serialized with every other
    /// write transaction that touches the same rows (on SQLite: with every writer), so
    /// a transaction that starts after another has committed sees all it wrote.
    async fn write(&self) -> StoreResult<Box<dyn Txn>>;
    /// Starts a read-only transaction: one consistent snapshot of the latest committed
    /// state. Readers never block writers or each other.
    async fn read(&self) -> StoreResult<Box<dyn Txn>>;
    /// A read-only transaction for a decision that announces what it reads
    /// (`Txn::prefetch_ancestors`): where the store can, that first statement runs alone,
    /// without BEGIN (PostgreSQL: one statement, one snapshot). Should the decision need a
    /// second statement, it fails with `StoreError::Retry(RESTART_IN_SNAPSHOT)` and the
    /// call is read again with `read`.
    async fn read_single(&self) -> StoreResult<Box<dyn Txn>> {
        self.read().await
    }
    /// Checks that the database answers (for health reporting).
    async fn ping(&self) -> StoreResult<()>;
    /// Entity types kept in the application's tables (empty: none).
    fn mapping(&self) -> Arc<crate::mapping::Mapping> {
        Arc::default()
    }
    /// What keeps the mapping (`StoreOptions::mapping`) from being served safely: tables or
    /// columns missing or of a type that cannot convert, and (PostgreSQL) the triggers of
    /// `install_mapping` missing. Empty: all is well.
    async fn mapping_problems(&self) -> StoreResult<Vec<String>> {
        Ok(Vec::new())
    }
    /// Installs what the mapping needs in the application's tables (idempotent): the
    /// triggers that order direct writes with Lockstep's decisions. Returns what it did.
    async fn install_mapping(&self) -> StoreResult<Vec<String>> {
        Ok(Vec::new())
    }
    /// Audit retention runs one at a time per database: Some(guard) while this caller may
    /// run (dropping the guard ends it), None when another instance is running it now.
    async fn retention_lock(&self) -> StoreResult<Option<Box<dyn std::any::Any + Send>>> {
        Ok(Some(Box::new(())))
    }
    /// Gives up to `max_pages` free pages back to the file system (SQLite's incremental
    /// vacuum, in a write transaction of its own); returns how many went. PostgreSQL's
    /// autovacuum does this itself: nothing to do there.
    async fn reclaim_pages(&self, _max_pages: u32) -> StoreResult<u64> {
        Ok(0)
    }
    /// Connections in the pool and how many of them are idle (PostgreSQL).
    fn pool_connections(&self) -> Option<(u32, u32)> {
        None
    }
    /// Group commit counters, where the store groups commits (SQLite).
    fn group_commit_stats(&self) -> Option<GroupCommitStats> {
        None
    }
}

/// `Txn::entity_for_write` as two calls: `entity`, then `entities_with_ancestors`.
pub(crate) async fn entity_for_write_in_steps<T: Txn + ?Sized>(
    txn: &mut T,
    resource: &Uid,
    also: &[Uid],
    with_parents: bool,
) -> StoreResult<(Option<EntityRecord>, Vec<EntityRecord>)> {
    let current = txn.entity(resource).await?;
    let mut wanted = also.to_vec();
    if with_parents && let Some(c) = &current {
        wanted.extend(c.parents.iter().cloned());
    }
    let loaded = txn.entities_with_ancestors(&wanted).await?;
    Ok((current, loaded))
}

/// How many database transactions committed how many write calls.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GroupCommitStats {
    pub transactions: u64,
    pub calls: u64,
}

/// One database transaction.
///
/// Contract: every read and write made through one `Txn` is consistent with every other
/// (one serializable snapshot that includes its own writes). `commit` makes the writes
/// durable and visible at once; dropping the `Txn` without `commit` rolls everything back.
///
/// # Locking protocol
///
/// The promise: once a revoking change (logout, RevokeSubject, RevokeKey, an ownership
/// transfer, a membership change, PutPolicies) has committed, every write transaction
/// that could be forbidden by it either committed before it (smaller audit `seq`) or
/// sees it. Each implementation gets there its own way:
///
/// - **SQLite**: write transactions run one at a time on the single writer connection,
///   inside `BEGIN IMMEDIATE` (which serializes them with other processes too), in the
///   order they got the connection. With group commit several of them share one database
///   transaction, each in its own savepoint, and are answered only after its `COMMIT`:
///   each sees every change before it (committed, or earlier in its group — and then it
///   commits or fails with it). The audit `seq` (assigned inside the transaction) follows
///   that order. Details in `sqlite.rs`.
/// - **PostgreSQL** (READ COMMITTED): a commit and every change that could forbid it
///   lock something in common, so one waits for the other, and a statement run after the
///   wait sees what the other committed. A commit reads `keys` and `policies` plainly
///   (ACCESS SHARE; RevokeKey and PutPolicies take ACCESS EXCLUSIVE), takes its subject's
///   advisory lock shared *before* reading the token and subject revocations (logout and
///   RevokeSubject take it exclusive; RevokeToken of a token whose subject is unknown
///   locks `revoked_tokens` ACCESS EXCLUSIVE), takes the advisory locks of its principal
///   and all ancestors shared, level by level, before reading them, and its resource's
///   exclusive before reading it (every entity writer does). The audit `seq` is drawn by
///   the last statement, after all locks. Details in `postgres.rs`.
///
/// **Entities in the application's tables** (`StoreOptions::mapping`, docs/mapping.md)
/// take part in the same protocol, and so do the application's own direct writes to
/// them: on PostgreSQL the triggers of `Store::install_mapping` take, for every row a
/// direct INSERT, UPDATE or DELETE touches, the same entity lock exclusive (a mapped
/// table's row: its entity; a join table's row: the child, whose parents it holds), and
/// `entity` locks a mapped resource's row (`FOR NO KEY UPDATE`) before its entity lock, in
/// the order a direct UPDATE takes them. On SQLite the file's single write lock orders a
/// direct writer with every write transaction.
///
/// The calls below that read authorization state (`key`, `revocations_and_policy`,
/// `policy_state`, `entity`, `entities_with_ancestors`) take these
/// locks themselves in a write transaction; the engine's part is the order: `entity`
/// before any write of that entity.
#[async_trait]
pub trait Txn: Send {
    // --- credentials -------------------------------------------------------------------
    async fn key(&mut self, kid: &str) -> StoreResult<Option<KeyRecord>>;
    async fn list_keys(&mut self) -> StoreResult<Vec<KeyRecord>>;
    /// Inserts a key; `Conflict` if the kid exists (revoked or not).
    async fn insert_key(&mut self, key: &KeyRecord) -> StoreResult<()>;
    /// Updates what may change of a key that is not revoked: its JWK, whether it is
    /// retired, and whether it is the signing key. Takes the same lock as `revoke_key`.
    async fn update_key(&mut self, key: &KeyRecord) -> StoreResult<()>;
    /// Marks a key revoked; false if there is no such key.
    async fn revoke_key(&mut self, kid: &str, now: i64) -> StoreResult<bool>;
    /// Records a revoked token id until `expires_at` (unix seconds). `subject` is the
    /// token's subject when known (logout): the revocation then locks that subject, which
    /// every in-flight commit of the subject holds; otherwise it locks out every commit.
    async fn revoke_token(
        &mut self,
        token_id: &str,
        subject: Option<&Uid>,
        expires_at: i64,
        now: i64,
    ) -> StoreResult<()>;
    /// The subject's revocation (unix seconds: its tokens issued at or before it are
    /// revoked), whether the token is revoked, and the policy state — read together, after
    /// the subject's lock where the store has one.
    async fn revocations_and_policy(&mut self, subject: &Uid, token_id: &str) -> StoreResult<CallState>;
    /// `key` and then `revocations_and_policy`, for a subject and token id known before
    /// the token is verified (a hint of the verification cache): in one round trip where
    /// the store can (PostgreSQL). None: no such key (and no call state read).
    async fn key_and_call_state(
        &mut self,
        kid: &str,
        subject: &Uid,
        token_id: &str,
    ) -> StoreResult<Option<(KeyRecord, CallState)>> {
        let Some(key) = self.key(kid).await? else { return Ok(None) };
        let state = self.revocations_and_policy(subject, token_id).await?;
        Ok(Some((key, state)))
    }
    async fn revoke_subject(&mut self, subject: &Uid, at_secs: i64) -> StoreResult<()>;

    // --- policies ------------------------------------------------------------------------
    /// The active (newest) policy version, if any policy set was ever put, and the
    /// generation of the template links (one statement).
    async fn policy_state(&mut self) -> StoreResult<PolicyState>;
    /// Every template link.
    async fn policy_links(&mut self) -> StoreResult<Vec<TemplateLink>>;
    /// Adds a link and bumps the generation (`Conflict` if the link id exists). Takes the
    /// same lock as `insert_policies`.
    async fn insert_link(&mut self, link: &TemplateLink, now: i64) -> StoreResult<()>;
    /// Removes a link and bumps the generation; the removed link, if it existed.
    async fn delete_link(&mut self, link_id: &str) -> StoreResult<Option<TemplateLink>>;
    async fn policies(&mut self, version: u64) -> StoreResult<Option<PolicyRecord>>;
    /// Stores a new policy set version and makes it the active one; returns its version.
    async fn insert_policies(&mut self, policies: &str, schema: &str, now: i64) -> StoreResult<u64>;
    /// Every version, oldest first.
    async fn policy_history(&mut self) -> StoreResult<Vec<PolicyRecord>>;

    // --- entities ------------------------------------------------------------------------
    async fn entity(&mut self, uid: &Uid) -> StoreResult<Option<EntityRecord>>;
    /// The given entities that exist, and all their ancestors (transitively), each once.
    async fn entities_with_ancestors(&mut self, uids: &[Uid]) -> StoreResult<Vec<EntityRecord>>;
    /// Announces the `entity_for_write` call this transaction will make first, so that the
    /// store may read it in an earlier round trip (PostgreSQL: with `key_and_call_state`).
    /// Only a hint: a later `entity_for_write` with other arguments reads as usual.
    fn prefetch_for_write(&mut self, _resource: &Uid, _also: &[Uid], _with_parents: bool) {}
    /// Whether this write was answered so far from what the store last saw committed, not
    /// read (PostgreSQL: a speculative write, checked by its COMMIT's round trip). An error
    /// decided on such answers may be stale: `abandon_speculation`, and the call is read
    /// again in full (`Retry(ABANDONED)`).
    fn speculating(&self) -> bool {
        false
    }
    /// Gives up a speculative write before it sent anything: the retry reads in full.
    fn abandon_speculation(&mut self) {}
    /// Announces the `entities_with_ancestors(uids)` a read-only transaction will make
    /// first, likewise (PostgreSQL: read with `key_and_call_state`, in the same snapshot).
    fn prefetch_ancestors(&mut self, _uids: &[Uid]) {}
    /// What a mutation of `resource` is decided on: `entity(resource)`, then
    /// `entities_with_ancestors` of `also` and, when `with_parents`, of the entity's current
    /// parents. In one round trip where the store can (PostgreSQL, own store).
    async fn entity_for_write(
        &mut self,
        resource: &Uid,
        also: &[Uid],
        with_parents: bool,
    ) -> StoreResult<(Option<EntityRecord>, Vec<EntityRecord>)> {
        entity_for_write_in_steps(self, resource, also, with_parents).await
    }
    /// `Conflict` if it exists.
    async fn insert_entity(&mut self, e: &EntityRecord) -> StoreResult<()>;
    /// Replaces attributes, parents and version of an existing entity.
    async fn update_entity(&mut self, e: &EntityRecord) -> StoreResult<()>;
    async fn delete_entity(&mut self, uid: &Uid) -> StoreResult<()>;

    // --- partial rollback ----------------------------------------------------------------
    /// Marks a point that `rollback_to_savepoint` returns to (one level is enough).
    async fn savepoint(&mut self) -> StoreResult<()>;
    async fn rollback_to_savepoint(&mut self) -> StoreResult<()>;

    // --- idempotency ---------------------------------------------------------------------
    /// Claims this subject's idempotency key for this transaction, waiting for a
    /// concurrent transaction that holds it to finish. Returns the stored (request hash,
    /// response) when the key was already committed; else the key is claimed (undone by
    /// a rollback, including `rollback_to_savepoint`) and None is returned.
    async fn claim_idempotency_key(
        &mut self,
        subject: &Uid,
        key: &str,
        request_hash: &[u8],
        now: i64,
    ) -> StoreResult<Option<(Vec<u8>, String)>>;
    /// Stores the response for a key claimed by this transaction.
    async fn complete_idempotency_key(&mut self, subject: &Uid, key: &str, response: &str) -> StoreResult<()>;

    // --- audit ---------------------------------------------------------------------------
    /// Appends an event; returns its `seq`, which is larger than that of every event
    /// committed before this transaction.
    async fn append_audit(&mut self, event: &NewAuditEvent, now: i64) -> StoreResult<u64>;
    /// Appends the transaction's last write, an event after which only the commit comes:
    /// a store may send it with COMMIT (PostgreSQL: one round trip for both), so its `seq`
    /// is in `seq` once the commit has returned (at the latest).
    async fn append_audit_last(&mut self, event: &NewAuditEvent, now: i64, seq: &AuditSeq) -> StoreResult<()> {
        seq.set(self.append_audit(event, now).await?);
        Ok(())
    }
    async fn audit_events(&mut self, after_seq: u64, limit: u32) -> StoreResult<Vec<AuditEvent>>;
    /// The audit log's extent: (how far events were dropped by retention, the oldest and
    /// the newest seq present).
    async fn audit_extent(&mut self) -> StoreResult<(u64, Option<u64>, Option<u64>)>;
    /// The first event at or after `seq`: its seq and time (unix microseconds).
    async fn audit_time_at(&mut self, seq: u64) -> StoreResult<Option<(u64, i64)>>;
    /// Drops exactly these events (exported by retention; ascending): raises the mark the
    /// append-only trigger allows deletes under to the last of them, then deletes them.
    /// Returns how many went.
    async fn trim_audit(&mut self, seqs: &[u64]) -> StoreResult<u64>;

    // --- housekeeping --------------------------------------------------------------------
    /// Deletes revoked-token rows whose token has expired and idempotency records older
    /// than `idempotency_before` (unix micros); returns how many rows of each went.
    async fn purge(&mut self, now_secs: i64, idempotency_before: i64) -> StoreResult<(u64, u64)>;

    /// Makes every write of this transaction durable and visible, atomically.
    async fn commit(self: Box<Self>) -> StoreResult<()>;

    /// `commit` for a call with a deadline: a store that must find out whether an
    /// interrupted COMMIT landed (PostgreSQL) asks until `deadline` before it answers
    /// `Unknown`; `None` leaves it its own bounded settle window.
    async fn commit_before(self: Box<Self>, deadline: Option<tokio::time::Instant>) -> StoreResult<()> {
        let _ = deadline;
        self.commit().await
    }
}

/// Row shapes shared by both backends (sqlx decodes them from either), and their
/// conversion to domain records: the JSON columns are parsed in one place.
#[derive(sqlx::FromRow, Clone)]
pub(crate) struct EntityRow {
    etype: String,
    eid: String,
    attributes: String,
    parents: String,
    version: i64,
    tags: String,
}

impl TryFrom<EntityRow> for EntityRecord {
    type Error = StoreError;
    fn try_from(r: EntityRow) -> StoreResult<Self> {
        Ok(EntityRecord {
            uid: Uid::new(r.etype, r.eid),
            attributes: serde_json::from_str(&r.attributes).map_err(json_err)?,
            parents: serde_json::from_str(&r.parents).map_err(json_err)?,
            version: to_u64(r.version),
            tags: serde_json::from_str(&r.tags).map_err(json_err)?,
        })
    }
}

#[derive(sqlx::FromRow, Clone)]
pub(crate) struct KeyRow {
    kid: String,
    algorithm: String,
    secret: Vec<u8>,
    public_key_pem: String,
    issuer: String,
    audience: String,
    principal_type: String,
    revoked: bool,
    added_at: i64,
    jwk: String,
    source: String,
    retired: bool,
    required_typ: String,
    max_lifetime_secs: i64,
    signing: bool,
    private_key: Vec<u8>,
}

impl From<KeyRow> for KeyRecord {
    fn from(r: KeyRow) -> Self {
        KeyRecord {
            kid: r.kid,
            algorithm: r.algorithm,
            secret: r.secret,
            public_key_pem: r.public_key_pem,
            issuer: r.issuer,
            audience: r.audience,
            principal_type: r.principal_type,
            revoked: r.revoked,
            added_at: r.added_at,
            jwk: r.jwk,
            source: r.source,
            retired: r.retired,
            required_typ: r.required_typ,
            max_lifetime_secs: r.max_lifetime_secs,
            signing: r.signing,
            private_key: r.private_key,
        }
    }
}

#[derive(sqlx::FromRow)]
pub(crate) struct PolicyRow {
    version: i64,
    policies: String,
    schema: String,
    created_at: i64,
}

impl From<PolicyRow> for PolicyRecord {
    fn from(r: PolicyRow) -> Self {
        PolicyRecord { version: to_u64(r.version), policies: r.policies, schema: r.schema, created_at: r.created_at }
    }
}

#[derive(sqlx::FromRow)]
pub(crate) struct AuditRow {
    seq: i64,
    time: i64,
    kind: i64,
    principal_type: Option<String>,
    principal_id: Option<String>,
    token_id: String,
    mutations: String,
    entities: String,
    detail: String,
}

impl TryFrom<AuditRow> for AuditEvent {
    type Error = StoreError;
    fn try_from(r: AuditRow) -> StoreResult<Self> {
        Ok(AuditEvent {
            seq: to_u64(r.seq),
            time: r.time,
            event: NewAuditEvent {
                kind: AuditKind::from_i64(r.kind)
                    .ok_or_else(|| StoreError::Internal(format!("unknown audit kind {}", r.kind)))?,
                principal: r.principal_type.zip(r.principal_id).map(|(t, i)| Uid::new(t, i)),
                token_id: r.token_id,
                mutations: serde_json::from_str(&r.mutations).map_err(json_err)?,
                entities: serde_json::from_str(&r.entities).map_err(json_err)?,
                detail: r.detail,
            },
        })
    }
}

#[derive(sqlx::FromRow)]
pub(crate) struct LinkRow {
    link_id: String,
    template_id: String,
    principal_type: Option<String>,
    principal_id: Option<String>,
    resource_type: Option<String>,
    resource_id: Option<String>,
}

impl From<LinkRow> for TemplateLink {
    fn from(r: LinkRow) -> Self {
        TemplateLink {
            link_id: r.link_id,
            template_id: r.template_id,
            principal: r.principal_type.zip(r.principal_id).map(|(t, i)| Uid::new(t, i)),
            resource: r.resource_type.zip(r.resource_id).map(|(t, i)| Uid::new(t, i)),
        }
    }
}

/// The policy state as both stores read it: `max(version)` (NULL before any policy set)
/// and the template-links generation.
pub(crate) fn policy_state_of(version: Option<i64>, links: i64) -> PolicyState {
    PolicyState { version: version.map(to_u64), links: to_u64(links) }
}

/// The columns of `revocations_and_policy`, in both stores' order.
pub(crate) type CallStateRow = (Option<i64>, bool, Option<i64>, i64);

pub(crate) fn call_state((subject_revoked_at, token_revoked, version, links): CallStateRow) -> CallState {
    CallState { subject_revoked_at, token_revoked, policy: policy_state_of(version, links) }
}

/// An audit event's mutations as stored: their JSON without the fields that say nothing
/// (an empty `add_parents`, `remove_parents` or create's `parents`, a null `if_version`),
/// which read back as their defaults. Attribute values are never touched.
pub(crate) fn audit_mutations_json(mutations: &[crate::model::Mutation]) -> StoreResult<String> {
    let mut v = serde_json::to_value(mutations).map_err(json_err)?;
    for m in v.as_array_mut().into_iter().flatten() {
        let Some(m) = m.as_object_mut() else { continue };
        if m.get("if_version").is_some_and(serde_json::Value::is_null) {
            m.remove("if_version");
        }
        if let Some(change) = m.get_mut("change").and_then(serde_json::Value::as_object_mut) {
            for key in ["add_parents", "remove_parents", "parents"] {
                if change.get(key).and_then(serde_json::Value::as_array).is_some_and(Vec::is_empty) {
                    change.remove(key);
                }
            }
        }
    }
    serde_json::to_string(&v).map_err(json_err)
}

/// An audit event's entities as stored: without an empty `parents` (read back as empty).
pub(crate) fn audit_entities_json(entities: &[EntityRecord]) -> StoreResult<String> {
    let mut v = serde_json::to_value(entities).map_err(json_err)?;
    for e in v.as_array_mut().into_iter().flatten() {
        if let Some(e) = e.as_object_mut()
            && e.get("parents").and_then(serde_json::Value::as_array).is_some_and(Vec::is_empty)
        {
            e.remove("parents");
        }
    }
    serde_json::to_string(&v).map_err(json_err)
}

pub(crate) fn json_err(e: serde_json::Error) -> StoreError {
    StoreError::Internal(format!("corrupt JSON in the database: {e}"))
}

pub(crate) fn to_u64(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

pub(crate) fn to_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// Runs an application's own statements (several, plain SQL) on a database: for
/// `lockstep bench --mapped`, which plays an application that keeps its tables beside
/// Lockstep's. Not a path of any call.
pub async fn run_app_sql(url: &str, sqlite: &str, postgres: &str) -> anyhow::Result<()> {
    use sqlx::Connection;
    if url.starts_with("sqlite:") {
        let opts = <sqlx::sqlite::SqliteConnectOptions as std::str::FromStr>::from_str(url)?.create_if_missing(true);
        let mut c = sqlx::SqliteConnection::connect_with(&opts).await?;
        sqlx::raw_sql(sqlx::AssertSqlSafe(sqlite.to_owned())).execute(&mut c).await?;
    } else {
        let mut c = sqlx::PgConnection::connect(url).await?;
        sqlx::raw_sql(sqlx::AssertSqlSafe(postgres.to_owned())).execute(&mut c).await?;
    }
    Ok(())
}

/// Opens the store named by a database URL (`sqlite://…` or `postgres://…`).
pub async fn open(url: &str, opts: &crate::config::StoreOptions) -> anyhow::Result<Arc<dyn Store>> {
    if url.starts_with("sqlite:") {
        Ok(Arc::new(sqlite::SqliteStore::open(url, opts).await?))
    } else if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        Ok(Arc::new(postgres::PgStore::open(url, opts).await?))
    } else {
        anyhow::bail!(
            "unsupported database URL `{}`: use sqlite:///abs/path.db, sqlite://relative.db or postgres://user@host/db",
            crate::config_file::redact_url(url)
        )
    }
}
