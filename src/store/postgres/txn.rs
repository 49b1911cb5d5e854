//! One transaction of the PostgreSQL store (`PgTxn`): its statements, and the round trips
//! they share. BEGIN goes with the first statement; a write of a token verified before
//! sends its locks and its whole read in that same round trip; the last write goes with
//! COMMIT (tokio-postgres pipelines what is awaited together).

use super::super::mapped::{self, ColumnValue};
use super::super::{
    AuditSeq, EntityRow, KeyRow, LinkRow, PolicyRow, SPECULATION_ABANDONED, SPECULATION_STALE, StoreError, StoreResult,
    Txn, audit_entities_json, audit_mutations_json, call_state, json_err, policy_state_of, to_i64, to_u64,
};
use super::settle::{Pending, recover_seq, settle, settle_unseen};
use super::speculate::{Backend, Recall, Seen, Speculation};
use super::wire::{FromPgRow, Q, at, decode, get, map_err, q};
use super::{SETTLE_WINDOW, id_cast, mapped_select};
use crate::mapping::{Mapping, ParentSource, TypeMap};
use crate::model::{
    AuditEvent, CallState, EntityRecord, KeyRecord, NewAuditEvent, PolicyRecord, PolicyState, TemplateLink, Uid,
};
use async_trait::async_trait;
use deadpool_postgres::Object;
use serde_json::{Map, Value};
use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use tokio::time::Instant;
use tokio_postgres::Row;

/// How long a dropped transaction's ROLLBACK may take (behind the statement it was
/// running) before its connection is closed instead of reused.
const ROLLBACK_LIMIT: std::time::Duration = std::time::Duration::from_secs(10);

/// At least this long to read back the audit seq of a commit settled as committed.
const MIN_RECOVER: std::time::Duration = std::time::Duration::from_secs(2);

/// BEGIN of a write transaction, and of a read-only one.
pub(super) const BEGIN_WRITE: &str = "BEGIN";
pub(super) const BEGIN_READ: &str = "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY";

/// Lockstep's tables a read-only transaction may read.
const READ_TABLES: &str = "keys, revoked_tokens, subjects, policies, policy_links, policy_links_meta, entities, audit";

/// `BEGIN_READ`, then every table the transaction may read locked `ACCESS SHARE`, before
/// its first statement takes the snapshot (`LOCK` takes none). A table rewritten by an
/// `ALTER TABLE` (a column's type changed) looks empty to a snapshot taken before the
/// rewrite committed, as PostgreSQL documents; a transaction whose snapshot came first and
/// then waited for the rewrite to read a join table saw no memberships, and a forbid
/// reading them was skipped. The lock waits for such a rewrite to finish (and holds the
/// next one back until the read is done), so the snapshot comes after it. Statements of
/// write transactions (READ COMMITTED) each take their snapshot after their locks.
/// Interned: one text per mapping for the life of the process.
pub(super) fn begin_read(mapping: &Mapping) -> &'static str {
    static TEXTS: std::sync::OnceLock<std::sync::Mutex<HashMap<String, &'static str>>> = std::sync::OnceLock::new();
    let mut tables: Vec<String> = Vec::new();
    for t in mapping.types() {
        tables.push(mapped::qt(&t.table, Some("public")));
        for (_, source) in &t.parents {
            if let ParentSource::Join { table, .. } = source {
                tables.push(mapped::qt(table, Some("public")));
            }
        }
    }
    tables.sort();
    tables.dedup();
    let mut text = format!("{BEGIN_READ}; LOCK TABLE {READ_TABLES}");
    for t in &tables {
        text.push_str(", ");
        text.push_str(t);
    }
    text.push_str(" IN ACCESS SHARE MODE");
    let mut texts = TEXTS.get_or_init(Default::default).lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    texts.entry(text.clone()).or_insert_with(|| Box::leak(text.into_boxed_str()))
}

/// Where a transaction's statements go.
pub(super) enum Db {
    /// BEGIN not sent yet: it goes with the first statement, in the same round trip.
    Begin(Object, &'static str),
    /// A lazy read (`Store::read_single`) before its first statement: when it is the
    /// announced `key_and_read_context`, it runs alone, without BEGIN (one statement: one
    /// snapshot); any other statement begins the transaction first.
    Lazy(Object),
    /// A lazy read whose one statement ran: a second one would see another snapshot, so the
    /// call is read again in a transaction (`RESTART_IN_SNAPSHOT`).
    Spent(Object),
    /// BEGIN sent: a drop before COMMIT rolls back before the connection is reused.
    Open(Object),
    /// Committed, or handed back.
    Done,
}

/// One transaction of the PostgreSQL store.
pub(super) struct PgTxn {
    pub db: Db,
    /// Write transactions take the locks of the protocol; read-only ones take none.
    pub write: bool,
    /// How to reach the database for settling a commit whose acknowledgement was lost
    /// (see `commit`).
    pub connect: Arc<tokio_postgres::Config>,
    /// How long one round trip may take before its connection is given up (`unless_silent`).
    pub limit: std::time::Duration,
    /// Who this transaction is, for settling its COMMIT: set by the first read of a
    /// write (`key_and_write_context`) or by the audit insert.
    pub pending: Option<Pending>,
    pub mapping: Arc<Mapping>,
    /// This store's `begin_read`.
    pub begin_read: &'static str,
    /// Mapped entities as this transaction last read them (`entity`): an update writes
    /// only the columns it changes, and the join-table edges it adds or removes.
    pub read: HashMap<Uid, EntityRecord>,
    /// Advisory lock keys this transaction holds shared (see `lock_shared`).
    pub shared_held: HashSet<String>,
    /// An update of an own-store entity not sent yet: it goes with the next statement
    /// (the audit insert, as one statement: one round trip less), or alone before any
    /// other (`flush`), so every read still sees it.
    pub deferred: Option<EntityRow>,
    /// The last audit event (`append_audit_last`), not sent yet: it goes with COMMIT.
    pub last_audit: Option<(AuditArgs, AuditSeq)>,
    /// The `entity_for_write` announced (`prefetch_for_write`), and what reading it found.
    pub prefetch: Option<WriteArgs>,
    pub prefetched: Option<(WriteArgs, Option<EntityRecord>, Vec<EntityRecord>)>,
    /// The same for a read-only transaction's `entities_with_ancestors`.
    pub prefetch_read: Option<Vec<Uid>>,
    pub prefetched_read: Option<(Vec<Uid>, Vec<EntityRecord>)>,
    /// What this instance last saw committed (`speculate`).
    pub recall: Arc<Recall>,
    /// A write answered from `recall` so far: what it assumes, checked when it commits.
    pub speculation: Option<Speculation>,
    /// Own-store entities this transaction updated, as written: remembered by `recall`
    /// once committed (cleared by a rollback to the savepoint).
    pub wrote: Vec<Seen>,
    /// Entities created or deleted: forgotten by `recall` once committed.
    pub touched: Vec<Uid>,
}

/// The arguments of an `entity_for_write`.
#[derive(PartialEq, Eq)]
pub(super) struct WriteArgs {
    resource: Uid,
    also: Vec<Uid>,
    with_parents: bool,
}

/// An audit insert's arguments, owned (it may be sent later, with COMMIT).
pub(super) struct AuditArgs {
    now: i64,
    kind: i64,
    principal_type: Option<String>,
    principal_id: Option<String>,
    token_id: String,
    mutations: String,
    entities: String,
    detail: String,
}

impl AuditArgs {
    fn of(ev: &NewAuditEvent, now: i64) -> StoreResult<Self> {
        Ok(AuditArgs {
            now,
            kind: ev.kind as i64,
            principal_type: ev.principal.as_ref().map(|p| p.ty.clone()),
            principal_id: ev.principal.as_ref().map(|p| p.id.clone()),
            token_id: ev.token_id.clone(),
            mutations: audit_mutations_json(&ev.mutations)?,
            entities: audit_entities_json(&ev.entities)?,
            detail: ev.detail.clone(),
        })
    }
}

/// `q` with an audit event's eight values bound next (time, kind, principal type and id,
/// token id, mutations, entities, detail).
fn with_audit<'a>(q: Q<'a>, a: &'a AuditArgs) -> Q<'a> {
    q.bind(a.now)
        .bind(a.kind)
        .bind(a.principal_type.as_deref())
        .bind(a.principal_id.as_deref())
        .bind(a.token_id.as_str())
        .bind(a.mutations.as_str())
        .bind(a.entities.as_str())
        .bind(a.detail.as_str())
}

/// `q` with an entity row's six values bound next (type, id, attributes, parents, version,
/// tags).
fn with_row<'a>(q: Q<'a>, d: &'a EntityRow) -> Q<'a> {
    q.bind(d.etype.as_str())
        .bind(d.eid.as_str())
        .bind(d.attributes.as_str())
        .bind(d.parents.as_str())
        .bind(d.version)
        .bind(d.tags.as_str())
}

/// The audit insert (with a deferred entity update in the same statement when there is
/// one): returns seq, the transaction id and the backend. An update that finds no row
/// fails the statement (a division by zero): nothing of it commits, even when
/// COMMIT was sent with it.
fn audit_statement<'a>(a: &'a AuditArgs, d: Option<&'a EntityRow>) -> Q<'a> {
    let sql = if d.is_some() {
        "WITH u AS (UPDATE entities SET attributes = $11, parents = $12, version = $13, tags = $14
                    WHERE etype = $9 AND eid = $10 RETURNING 1)
         INSERT INTO audit (time, kind, principal_type, principal_id, token_id, mutations, entities, detail)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8)
         RETURNING seq, pg_current_xact_id()::text, pg_backend_pid(), 1 / (SELECT count(*) FROM u) AS one"
    } else {
        "INSERT INTO audit (time, kind, principal_type, principal_id, token_id, mutations, entities, detail)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8) RETURNING seq, pg_current_xact_id()::text, pg_backend_pid()"
    };
    let mut s = with_audit(q(sql), a);
    if let Some(d) = d {
        s = with_row(s, d);
    }
    s
}

/// What a speculative write checks, under its locks, in the statement that writes (a
/// snapshot taken after them): the key's row, the subject's revocation, that the token is
/// not revoked, the policy state (parameters `$10` to `$17`), then each entity as seen
/// (`entities_as_seen`).
const SPECULATION_HOLDS: &str =
    "WITH ok AS (SELECT (SELECT hashtextextended(k::text, 0) FROM keys k WHERE k.kid = $10) IS NOT DISTINCT FROM $11
         AND (SELECT revoked_at_secs FROM subjects WHERE etype = $12 AND eid = $13) IS NOT DISTINCT FROM $14
         AND NOT EXISTS (SELECT 1 FROM revoked_tokens WHERE token_id = $15)
         AND (SELECT max(version) FROM policies) IS NOT DISTINCT FROM $16
         AND (SELECT generation FROM policy_links_meta WHERE id = 1) IS NOT DISTINCT FROM $17";

/// The rest of `SPECULATION_HOLDS`: each of `n` entities as seen, six parameters each from
/// `$18` (type, id, then attributes, parents, version and tags, or a NULL attributes where
/// it did not exist). One parameter per value, no arrays: the plan's cost does not depend
/// on them, so the prepared statement's generic plan is kept (an array's unknown length made
/// PostgreSQL plan every execution anew, and cost a third of the throughput).
fn entities_as_seen(n: usize) -> String {
    let mut sql = String::new();
    for i in 0..n {
        let [t, id, a, p, v, g] = std::array::from_fn(|k| 18 + 6 * i + k);
        // One index lookup each: a row found must be the one seen (never when it was seen
        // absent); none found, it must have been seen absent.
        sql.push_str(&format!(
            "
         AND coalesce((SELECT ${a}::text IS NOT NULL AND e.attributes = ${a} AND e.parents = ${p} AND e.version = ${v}
                              AND e.tags = ${g}
                       FROM entities e WHERE e.etype = ${t} AND e.eid = ${id}), ${a}::text IS NULL)"
        ));
    }
    sql
}

/// A speculative write's statement: when `SPECULATION_HOLDS`, the deferred update (if
/// any) and the audit insert (with the write's nonce), returning seq, the transaction and
/// the backend; otherwise nothing, and no row.
fn speculative_statement<'a>(a: &'a AuditArgs, s: &'a Speculation, d: Option<&'a EntityRow>) -> Q<'a> {
    let mut q = with_audit(q(speculative_text(s.entities.len(), d.is_some())), a)
        .bind(s.nonce)
        .bind(s.kid.as_str())
        .bind(s.key_hash)
        .bind(s.subject.ty.as_str())
        .bind(s.subject.id.as_str())
        .bind(s.revoked_at)
        .bind(s.token_id.as_str())
        .bind(s.policy.0)
        .bind(s.policy.1);
    for (uid, seen) in &s.entities {
        let row = seen.as_ref().map(|e| &e.row);
        q = q
            .bind(uid.ty.as_str())
            .bind(uid.id.as_str())
            .bind(row.map(|r| r.attributes.as_str()))
            .bind(row.map(|r| r.parents.as_str()))
            .bind(row.map(|r| r.version))
            .bind(row.map(|r| r.tags.as_str()));
    }
    if let Some(d) = d {
        q = with_row(q, d);
    }
    q
}

/// The text of `speculative_statement` for `n` entities, with or without an update:
/// interned, built once per shape for the life of the process (`n` is at most
/// `speculate::MAX_CLOSURE`).
fn speculative_text(n: usize, update: bool) -> &'static str {
    static TEXTS: std::sync::OnceLock<std::sync::Mutex<HashMap<(usize, bool), &'static str>>> =
        std::sync::OnceLock::new();
    let mut texts = TEXTS.get_or_init(Default::default).lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    texts.entry((n, update)).or_insert_with(|| Box::leak(speculative_sql(n, update).into_boxed_str()))
}

/// Builds the text of `speculative_text`.
fn speculative_sql(n: usize, update: bool) -> String {
    let holds = format!("{SPECULATION_HOLDS}{} AS ok)", entities_as_seen(n));
    let insert =
        "INSERT INTO audit (time, kind, principal_type, principal_id, token_id, mutations, entities, detail, nonce)
         SELECT $1::bigint, $2::bigint, $3::text, $4::text, $5::text, $6::text, $7::text, $8::text, $9::bigint
         WHERE (SELECT ok FROM ok)";
    if update {
        let [t, id, at, p, v, g] = std::array::from_fn(|k| 18 + 6 * n + k);
        format!(
            "{holds},
                  u AS (UPDATE entities SET attributes = ${at}, parents = ${p}, version = ${v}, tags = ${g}
                        WHERE etype = ${t} AND eid = ${id} AND (SELECT ok FROM ok) RETURNING 1)
             {insert}
             RETURNING seq, pg_current_xact_id()::text, pg_backend_pid(), 1 / (SELECT count(*) FROM u) AS one"
        )
    } else {
        format!(
            "{holds}
             {insert}
             RETURNING seq, pg_current_xact_id()::text, pg_backend_pid()"
        )
    }
}

/// A speculative write's locks, as a full read takes them: `WRITE_LOCKS`, then its
/// ancestors' entity locks shared (sorted).
fn speculative_locks(s: &Speculation) -> Q<'_> {
    let ancestors: Vec<String> = s.ancestors().map(entity_lock_key).collect();
    let sql = if ancestors.is_empty() {
        WRITE_LOCKS
    } else {
        "SELECT pg_advisory_xact_lock_shared(hashtextextended($1, 0)),
                    pg_advisory_xact_lock_shared(hashtextextended($2, 0)),
                    pg_advisory_xact_lock(hashtextextended($3, 0)),
                    (SELECT count(pg_advisory_xact_lock_shared(hashtextextended(k, 0)))
                     FROM (SELECT k FROM unnest($4::text[]) AS k ORDER BY k) AS s)"
    };
    let q =
        q(sql).bind(entity_lock_key(&s.subject)).bind(subject_lock_key(&s.subject)).bind(entity_lock_key(&s.resource));
    if ancestors.is_empty() { q } else { q.bind(ancestors) }
}

/// The error of a refused audit insert: an update that found no row is a bug (the entity's
/// exclusive lock is held), not the caller's input.
fn refused(e: tokio_postgres::Error, d: Option<&EntityRow>) -> StoreError {
    if d.is_some() && e.code() == Some(&tokio_postgres::error::SqlState::DIVISION_BY_ZERO) {
        return StoreError::Internal(format!("update of missing entity {}", entity_name(d)));
    }
    map_err(e)
}

fn entity_name(d: Option<&EntityRow>) -> String {
    d.map(|d| format!("{}::{:?}", d.etype, d.eid)).unwrap_or_default()
}

/// How a COMMIT (with the last write before it) ended.
enum Ended {
    /// Committed; the last audit insert's row when it went with the COMMIT.
    Committed(Option<Row>),
    /// The database refused the last write: the COMMIT behind it rolled back.
    Refused(StoreError),
    /// No answer, or a failed COMMIT: perhaps committed. The audit insert's row when it
    /// came back.
    Failed(Option<Row>, StoreError),
}

/// Advisory-lock key of a subject (its tokens' revocation state).
pub(super) fn subject_lock_key(u: &Uid) -> String {
    format!("lockstep\u{1f}subject\u{1f}{}\u{1f}{}", u.ty, u.id)
}

/// Advisory-lock key of an entity.
pub(super) fn entity_lock_key(u: &Uid) -> String {
    format!("lockstep\u{1f}entity\u{1f}{}\u{1f}{}", u.ty, u.id)
}

/// The key of an entity as `read_ancestors` takes it (`type`, unit separator, `id`).
fn ancestor_key(u: &Uid) -> String {
    format!("{}\u{1f}{}", u.ty, u.id)
}

fn split(uids: &[Uid]) -> (Vec<String>, Vec<String>) {
    uids.iter().map(|u| (u.ty.clone(), u.id.clone())).unzip()
}

fn entity_of(r: &Row) -> StoreResult<EntityRecord> {
    EntityRecord::try_from(EntityRow::from_row(r)?)
}

/// The entity of a context row (`r_*` columns; None in a row of the call state alone), and
/// whether it is the resource itself.
fn context_entity(r: &Row) -> StoreResult<Option<(bool, EntityRecord)>> {
    let Some((resource, row)) = context_row(r)? else { return Ok(None) };
    Ok(Some((resource, EntityRecord::try_from(row)?)))
}

/// The same, as stored.
fn context_row(r: &Row) -> StoreResult<Option<(bool, EntityRow)>> {
    let Some(etype) = get::<Option<String>>(r, "r_etype")? else { return Ok(None) };
    let row = EntityRow {
        etype,
        eid: get::<Option<String>>(r, "r_eid")?.unwrap_or_default(),
        attributes: get::<Option<String>>(r, "r_attributes")?.unwrap_or_default(),
        parents: get::<Option<String>>(r, "r_parents")?.unwrap_or_default(),
        version: get::<Option<i64>>(r, "r_version")?.unwrap_or_default(),
        tags: get::<Option<String>>(r, "r_tags")?.unwrap_or_default(),
    };
    Ok(Some((get::<Option<bool>>(r, "r_resource")? == Some(true), row)))
}

/// The call state of a row with columns `revoked_at_secs`, `token_revoked`, `version`,
/// `generation`.
fn call_state_of(r: &Row) -> StoreResult<CallState> {
    Ok(call_state((get(r, "revoked_at_secs")?, get(r, "token_revoked")?, get(r, "version")?, get(r, "generation")?)))
}

/// Keeps the first row of each entity.
fn first_of_each(rows: Vec<EntityRecord>) -> Vec<EntityRecord> {
    let mut seen = HashSet::new();
    rows.into_iter().filter(|e| seen.insert(e.uid.clone())).collect()
}

/// The columns of a key (`KeyRow`), named: a column added to the table later (a newer
/// release's migration) does not change the statements' result type.
macro_rules! key_columns {
    () => {
        "k.kid, k.algorithm, k.secret, k.public_key_pem, k.issuer, k.audience, k.principal_type, k.revoked,
         k.added_at, k.jwk, k.source, k.retired, k.required_typ, k.max_lifetime_secs, k.signing, k.private_key"
    };
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

/// The locks a write of a token verified before takes first, in the order every taker
/// takes them: its principal's entity lock and its subject lock, shared (the entity key
/// sorts first), then the resource's entity lock, exclusive.
const WRITE_LOCKS: &str = "SELECT pg_advisory_xact_lock_shared(hashtextextended($1, 0)),
        pg_advisory_xact_lock_shared(hashtextextended($2, 0)),
        pg_advisory_xact_lock(hashtextextended($3, 0))";

/// `WRITE_LOCKS` of a write whose resource is its principal: that entity's lock exclusive
/// only (asking for it shared, then exclusive, would deadlock two such writers), then the
/// subject lock shared.
const WRITE_LOCKS_SELF: &str = "SELECT pg_advisory_xact_lock(hashtextextended($1, 0)),
        pg_advisory_xact_lock_shared(hashtextextended($2, 0))";

/// What that write is decided on, read by the statement after `WRITE_LOCKS` (at READ
/// COMMITTED a new statement: a snapshot taken after the locks): the key, the call state,
/// the transaction's id and backend (for settling its COMMIT), the resource (r_resource
/// true) and the principal; then, only when one of them has parents (the resource's
/// when $7) or the write names more entities ($8: a create's proposed parents), those with
/// their ancestors by `read_ancestors`, which share-locks each level before reading it.
const WRITE_CONTEXT: &str = concat!(
    "WITH r AS (SELECT * FROM entities WHERE etype = $5 AND eid = $6),
          p AS (SELECT * FROM entities WHERE etype = $2 AND eid = $3),
          more AS (SELECT $8::text[] || ARRAY(
                     SELECT (j ->> 'type') || chr(31) || (j ->> 'id')
                     FROM (SELECT parents FROM p WHERE parents <> '[]'
                           UNION ALL SELECT parents FROM r WHERE $7 AND parents <> '[]') s,
                          jsonb_array_elements(s.parents::jsonb) AS j) AS ks)
     SELECT ",
    key_columns!(),
    ", ",
    read_call_state!(),
    ", pg_current_xact_id()::text AS xid, pg_backend_pid() AS pid, hashtextextended(k::text, 0) AS key_hash,
            e.r_resource, e.r_etype, e.r_eid, e.r_attributes, e.r_parents, e.r_version, e.r_tags
     FROM keys k LEFT JOIN LATERAL (
         SELECT true AS r_resource, r.etype AS r_etype, r.eid AS r_eid, r.attributes AS r_attributes,
                r.parents AS r_parents, r.version AS r_version, r.tags AS r_tags FROM r
         UNION ALL SELECT false, p.etype, p.eid, p.attributes, p.parents, p.version, p.tags FROM p
         UNION ALL SELECT false, a.etype, a.eid, a.attributes, a.parents, a.version, a.tags
                   FROM more, LATERAL read_ancestors(more.ks, true) AS a WHERE cardinality(more.ks) > 0
     ) AS e ON true
     WHERE k.kid = $1"
);

/// What a read-only decision reads, in one statement (one snapshot, with or without
/// BEGIN): the key, the call state, the entities `$5`/`$6` (types, ids) by primary key
/// (each looked up by its index: `OFFSET 0` keeps the planner from joining the list to a
/// scan of the whole table, which a generic plan chose for tables of a few thousand rows),
/// and, only when they have parents, those with their ancestors by the STABLE
/// `read_ancestors_at` (migration 0010), which reads with the statement's snapshot.
const READ_CONTEXT: &str = concat!(
    "WITH st AS (SELECT ",
    read_call_state!(),
    "),
          f AS (SELECT e.* FROM unnest($5::text[], $6::text[]) AS x(t, i),
                LATERAL (SELECT * FROM entities WHERE etype = x.t AND eid = x.i OFFSET 0) AS e),
          more AS (SELECT ARRAY(SELECT DISTINCT (j ->> 'type') || chr(31) || (j ->> 'id')
                                FROM f, jsonb_array_elements(f.parents::jsonb) AS j WHERE f.parents <> '[]') AS ks)
     SELECT ",
    key_columns!(),
    ", st.*, NULL::boolean AS r_resource, a.etype AS r_etype, a.eid AS r_eid,
            a.attributes AS r_attributes, a.parents AS r_parents, a.version AS r_version, a.tags AS r_tags
     FROM keys k CROSS JOIN st LEFT JOIN LATERAL (
         SELECT * FROM f
         UNION ALL SELECT r.* FROM more, LATERAL read_ancestors_at(more.ks) AS r WHERE cardinality(more.ks) > 0
     ) AS a ON true
     WHERE k.kid = $1"
);

/// A statement's error. A prepared plan whose result type changed under it (a table
/// altered while the server runs) fails the statement: the connection's prepared
/// statements are forgotten and the call tried again, prepared anew.
fn failed(c: &Object, e: tokio_postgres::Error) -> StoreError {
    if e.code() == Some(&tokio_postgres::error::SqlState::FEATURE_NOT_SUPPORTED)
        && e.as_db_error().is_some_and(|d| d.message().contains("cached plan"))
    {
        c.statement_cache.clear();
        return StoreError::Retry("a table changed under a prepared statement: prepared again".into());
    }
    map_err(e)
}

/// BEGIN, when it has not been sent: awaited together with the transaction's first
/// statement, so both go in one round trip (tokio-postgres sends requests in the order
/// they are first polled, and `try_join!` polls in order).
async fn begun(c: &Object, begin: Option<&'static str>) -> Result<(), tokio_postgres::Error> {
    match begin {
        Some(b) => c.batch_execute(b).await,
        None => Ok(()),
    }
}

impl PgTxn {
    /// The connection for a statement of the transaction, and the BEGIN to send with it
    /// when not sent yet.
    fn conn(&mut self) -> StoreResult<(&Object, Option<&'static str>)> {
        if self.speculation.is_some() {
            // A statement a speculative write did not expect: read in full instead.
            self.abandon();
            return Err(StoreError::Retry(SPECULATION_ABANDONED.into()));
        }
        let begin = match std::mem::replace(&mut self.db, Db::Done) {
            Db::Begin(o, b) => {
                self.db = Db::Open(o);
                Some(b)
            }
            Db::Open(o) => {
                self.db = Db::Open(o);
                None
            }
            other => {
                self.db = other;
                return Err(StoreError::Internal("a statement outside the transaction".into()));
            }
        };
        let Db::Open(o) = &self.db else { unreachable!("set above") };
        Ok((o, begin))
    }

    /// Runs one statement (with BEGIN, when not sent yet, in the same round trip).
    async fn rows(&mut self, s: Q<'_>) -> StoreResult<Vec<Row>> {
        let limit = self.limit;
        let (c, begin) = self.conn()?;
        let out = tokio::time::timeout(limit, async {
            let st = c.prepare_cached(&s.sql).await.map_err(map_err)?;
            let params = s.params();
            let (b, rows) = tokio::join!(begun(c, begin), c.query(&st, &params));
            b.map_err(map_err)?;
            rows.map_err(|e| failed(c, e))
        })
        .await;
        self.unless_silent(out)
    }

    /// Runs one statement; the number of rows it changed.
    async fn exec(&mut self, s: Q<'_>) -> StoreResult<u64> {
        let limit = self.limit;
        let (c, begin) = self.conn()?;
        let out = tokio::time::timeout(limit, async {
            let st = c.prepare_cached(&s.sql).await.map_err(map_err)?;
            let params = s.params();
            let (b, n) = tokio::join!(begun(c, begin), c.execute(&st, &params));
            b.map_err(map_err)?;
            n.map_err(|e| failed(c, e))
        })
        .await;
        self.unless_silent(out)
    }

    /// The outcome of a round trip bounded by `limit`. A connection silent for longer (its
    /// peer gone without a reset: a failover, a dropped NAT entry) is closed, not reused,
    /// and the call answers UNAVAILABLE.
    fn unless_silent<T>(&mut self, out: Result<StoreResult<T>, tokio::time::error::Elapsed>) -> StoreResult<T> {
        match out {
            Ok(r) => r,
            Err(_) => {
                if let Db::Begin(c, _) | Db::Lazy(c) | Db::Spent(c) | Db::Open(c) =
                    std::mem::replace(&mut self.db, Db::Done)
                {
                    drop(Object::take(c));
                }
                Err(StoreError::Unavailable(format!(
                    "the database did not answer within {} ms; nothing was committed",
                    self.limit.as_millis()
                )))
            }
        }
    }

    async fn opt(&mut self, s: Q<'_>) -> StoreResult<Option<Row>> {
        Ok(self.rows(s).await?.into_iter().next())
    }

    async fn one(&mut self, s: Q<'_>) -> StoreResult<Row> {
        self.opt(s).await?.ok_or_else(|| StoreError::Internal("a statement returned no row".into()))
    }

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
                "WITH r AS (SELECT 1 FROM {} WHERE {} = $1::text::{} FOR NO KEY UPDATE)
                 SELECT pg_advisory_xact_lock(hashtextextended($2, 0)) FROM (SELECT count(*) FROM r) AS x",
                mapped::qt(&tm.table, Some("public")),
                mapped::q(&tm.id_column),
                id_cast(tm.id_type)
            );
            self.exec(q(sql).bind(uid.id.as_str()).bind(entity_lock_key(uid))).await?;
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
        let rows = self.rows(q(mapped_select(tm)).bind(ids)).await?;
        rows.iter()
            .map(|r| {
                let (id, row): (String, String) = (at(r, 0)?, at(r, 1)?);
                let row: Map<String, Value> = serde_json::from_str(&row).map_err(json_err)?;
                mapped::record_from_row(tm, id, row)
            })
            .collect()
    }

    /// Runs `sql` with one JSON argument, `$1` (`jsonb_populate_record(set)` converts each
    /// value to its column's type, and a value it cannot convert is INVALID_ARGUMENT), and
    /// the id as `$2` when given.
    async fn with_json(&mut self, sql: String, arg: Value, id: Option<&str>) -> StoreResult<u64> {
        let mut s = q(sql).bind(arg.to_string());
        if let Some(id) = id {
            s = s.bind(id.to_owned());
        }
        self.exec(s).await
    }

    async fn mapped_insert(&mut self, tm: &TypeMap, e: &EntityRecord) -> StoreResult<()> {
        let values = mapped::columns_of(&self.mapping, tm, e)?;
        let present: Vec<&ColumnValue> = values.iter().filter(|v| !v.value.is_null()).collect();
        let t = mapped::qt(&tm.table, Some("public"));
        let cols = present.iter().map(|v| mapped::q(&v.column)).collect::<Vec<_>>().join(", ");
        let obj: Map<String, Value> = present.iter().map(|v| (v.column.clone(), v.value.clone())).collect();
        let sql =
            format!("INSERT INTO {t} ({cols}) SELECT {cols} FROM jsonb_populate_record(NULL::{t}, $1::text::jsonb)");
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
                "UPDATE {t} AS t SET {} FROM jsonb_populate_record(NULL::{t}, $1::text::jsonb) AS r WHERE t.{} = $2::text::{}",
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
                    "DELETE FROM {} WHERE {} = $1::text::{id_cast}",
                    mapped::qt(table, Some("public")),
                    mapped::q(child)
                );
                self.exec(q(sql).bind(uid.id.as_str())).await?;
            }
        }
        let sql = format!(
            "DELETE FROM {} WHERE {} = $1::text::{id_cast}",
            mapped::qt(&tm.table, Some("public")),
            mapped::q(&tm.id_column)
        );
        self.exec(q(sql).bind(uid.id.as_str())).await?;
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
            let sql = format!(
                "INSERT INTO {t} ({c}, {p}) SELECT {c}, {p} FROM jsonb_populate_record(NULL::{t}, $1::text::jsonb)"
            );
            self.with_json(sql, row, None).await?;
        }
        Ok(())
    }

    async fn remove_edges(&mut self, tm: &TypeMap, id: &str, edges: &[(usize, String)]) -> StoreResult<()> {
        for (t, c, p, row) in Self::edge_rows(tm, id, edges) {
            let sql = format!(
                "DELETE FROM {t} AS j USING jsonb_populate_record(NULL::{t}, $1::text::jsonb) AS r WHERE j.{c} = r.{c} AND j.{p} = r.{p}"
            );
            self.with_json(sql, row, None).await?;
        }
        Ok(())
    }

    /// A link changed: the next transaction recompiles the policy set with the links.
    async fn bump_links_generation(&mut self) -> StoreResult<()> {
        self.exec(q("UPDATE policy_links_meta SET generation = generation + 1 WHERE id = 1")).await?;
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
        self.exec(
            q("SELECT count(pg_advisory_xact_lock_shared(hashtextextended(k, 0)))
               FROM (SELECT k FROM unnest($1::text[]) AS k ORDER BY k) AS s")
            .bind(keys),
        )
        .await?;
        Ok(())
    }

    /// Committed: what it wrote is what `recall` knows of those entities now.
    fn remember(&mut self) {
        for e in self.wrote.drain(..) {
            let uid = e.record.uid.clone();
            self.recall.wrote(&uid, Some(e));
        }
        for uid in self.touched.drain(..) {
            self.recall.wrote(&uid, None);
        }
    }

    /// Commits a speculative write in one round trip: BEGIN, its locks, the statement that
    /// writes only if what it was decided on still holds (`speculative_statement`), COMMIT.
    /// Found changed: nothing was written, `Retry(SPECULATION_STALE)`. Every answer lost
    /// with the connection: settled by its nonce (`settle_unseen`).
    async fn commit_speculated(mut self: Box<Self>, deadline: Option<Instant>) -> StoreResult<()> {
        let spec = self.speculation.take().expect("checked by the caller");
        let (Some((audit, cell)), Db::Begin(c, begin)) =
            (self.last_audit.take(), std::mem::replace(&mut self.db, Db::Done))
        else {
            return Err(StoreError::Internal("a speculative write without its audit event".into()));
        };
        let deferred = self.deferred.take();
        let locks = speculative_locks(&spec);
        let write = speculative_statement(&audit, &spec, deferred.as_ref());
        let ended = tokio::time::timeout(self.limit, async {
            // A statement not prepared on this connection yet is prepared first (nothing of
            // the write is sent before).
            let lock_st = c.prepare_cached(&locks.sql).await.map_err(map_err)?;
            let st = c.prepare_cached(&write.sql).await.map_err(map_err)?;
            let (lp, wp) = (locks.params(), write.params());
            let (_, l, w, done) = tokio::join!(
                c.batch_execute(begin),
                c.execute(&lock_st, &lp),
                c.query(&st, &wp),
                c.batch_execute("COMMIT")
            );
            Ok::<_, StoreError>((l, w, done))
        })
        .await;
        // What the writing statement answered tells what became of the write.
        let lost = match ended {
            Ok(Err(e)) => return Err(e),
            Err(_) => "the database did not answer the COMMIT in time".to_owned(),
            Ok(Ok((l, w, done))) => match w {
                Ok(rows) => {
                    let done = done.map_err(map_err);
                    return self.speculation_answered(c, &spec, &rows, done, &cell, deadline).await;
                }
                // Refused (a lock not granted in time, a deadlock, …): nothing of it was
                // written; after a refused lock, the write only reports an aborted
                // transaction, so the lock's error says why.
                Err(e) if e.as_db_error().is_some() => {
                    if done.as_ref().is_err_and(|d| d.as_db_error().is_none()) {
                        drop(Object::take(c));
                    }
                    let cause = match l {
                        Err(le) if le.as_db_error().is_some() => le,
                        _ => e,
                    };
                    return Err(map_err(cause));
                }
                Err(e) => e.to_string(),
            },
        };
        // No answer of the writing statement: did it commit?
        drop(Object::take(c));
        let until = deadline.unwrap_or_else(|| Instant::now() + SETTLE_WINDOW);
        let b = &spec.backend;
        match settle_unseen(&self.connect, b.pid, &b.start, spec.nonce, spec.floor, until, &lost).await? {
            Some(seq) => {
                cell.set(seq);
                self.remember();
                Ok(())
            }
            None => {
                self.recall.cool(&spec.resource);
                Err(StoreError::Unavailable(format!(
                    "the connection failed during COMMIT ({lost}) and the write did not commit; nothing was \
                     committed, retry"
                )))
            }
        }
    }

    /// The rest of `commit_speculated` once its writing statement answered `rows`: none,
    /// it found what it was decided on changed; one, it wrote, and `done` tells whether the
    /// COMMIT behind it did.
    async fn speculation_answered(
        &mut self,
        c: Object,
        spec: &Speculation,
        rows: &[Row],
        done: StoreResult<()>,
        cell: &AuditSeq,
        deadline: Option<Instant>,
    ) -> StoreResult<()> {
        let Some(row) = rows.first() else {
            // What it was decided on had changed: it wrote nothing.
            if done.is_err() {
                drop(Object::take(c));
            }
            self.recall.cool(&spec.resource);
            return Err(StoreError::Retry(SPECULATION_STALE.into()));
        };
        let seq = self.audited(row)?;
        match done {
            Ok(()) => {
                drop(c);
                cell.set(seq);
                self.remember();
                Ok(())
            }
            Err(StoreError::Unavailable(m)) => {
                drop(Object::take(c));
                let p = self.pending.take().ok_or_else(|| StoreError::Internal("no pending transaction".into()))?;
                let until = deadline.unwrap_or_else(|| Instant::now() + SETTLE_WINDOW);
                settle(&self.connect, &p, until, &m).await?;
                cell.set(seq);
                self.remember();
                Ok(())
            }
            Err(e) => {
                drop(Object::take(c));
                Err(e)
            }
        }
    }

    /// `key_and_call_state` of a write answered from `recall` (nothing sent): only a lone
    /// update or delete of an own-store entity by a token verified before (announced
    /// `entity_for_write` of its resource, decided with the principal and the resource's
    /// parents), when all it is decided on was seen. Its COMMIT's round trip checks it.
    fn speculate(&mut self, kid: &str, subject: &Uid, token_id: &str) -> Option<(KeyRecord, CallState)> {
        let Db::Begin(o, _) = &self.db else { return None };
        let args = self.prefetch.as_ref()?;
        if !self.write || !args.with_parents || args.also.as_slice() != std::slice::from_ref(subject) {
            return None;
        }
        let (spec, answer) = self.recall.speculate(kid, subject, token_id, &args.resource, Object::id(o))?;
        let args = self.prefetch.take()?;
        self.prefetched = Some((args, answer.current, first_of_each(answer.loaded)));
        let state = call_state((spec.revoked_at, false, spec.policy.0, spec.policy.1));
        self.speculation = Some(spec);
        Some((answer.key, state))
    }

    /// Gives up a speculative write (nothing was sent): its resource is read in full for a
    /// while.
    fn abandon(&mut self) {
        if let Some(s) = self.speculation.take() {
            self.recall.cool(&s.resource);
        }
    }

    /// `key_and_call_state` with the announced `entity_for_write`, in one round trip:
    /// BEGIN (when not sent), `WRITE_LOCKS`, then `WRITE_CONTEXT`.
    async fn key_and_write_context(
        &mut self,
        kid: &str,
        subject: &Uid,
        token_id: &str,
        args: WriteArgs,
    ) -> StoreResult<Option<(KeyRecord, CallState)>> {
        self.shared_held.extend([subject_lock_key(subject), entity_lock_key(subject)]);
        // The principal (the subject's entity) is read with the resource; the rest of what
        // the write names is read with the ancestors (their locks first).
        let more: Vec<String> = args.also.iter().filter(|u| *u != subject).map(ancestor_key).collect();
        let limit = self.limit;
        let out = {
            let locks = if args.resource == *subject {
                q(WRITE_LOCKS_SELF).bind(entity_lock_key(subject)).bind(subject_lock_key(subject))
            } else {
                q(WRITE_LOCKS)
                    .bind(entity_lock_key(subject))
                    .bind(subject_lock_key(subject))
                    .bind(entity_lock_key(&args.resource))
            };
            let read = q(WRITE_CONTEXT)
                .bind(kid)
                .bind(subject.ty.as_str())
                .bind(subject.id.as_str())
                .bind(token_id)
                .bind(args.resource.ty.as_str())
                .bind(args.resource.id.as_str())
                .bind(args.with_parents)
                .bind(more);
            let recall = self.recall.clone();
            let (c, begin) = self.conn()?;
            let object = Object::id(c);
            // A connection's backend is asked once, outside the transaction (for settling
            // a speculative write on it: see `settle_unseen`).
            let ask = begin.is_some() && !recall.backend_known(object);
            tokio::time::timeout(limit, async {
                let lock_st = c.prepare_cached(&locks.sql).await.map_err(map_err)?;
                let read_st = c.prepare_cached(&read.sql).await.map_err(map_err)?;
                let (lp, rp) = (locks.params(), read.params());
                let backend = async {
                    if !ask {
                        return None;
                    }
                    let asked = c
                        .simple_query(
                            "SELECT pg_backend_pid(), backend_start::text FROM pg_stat_activity WHERE pid = pg_backend_pid()",
                        )
                        .await;
                    asked.ok()?.into_iter().find_map(|m| match m {
                        tokio_postgres::SimpleQueryMessage::Row(r) => Some(Backend {
                            pid: r.get(0)?.parse().ok()?,
                            start: r.get(1)?.to_owned(),
                        }),
                        _ => None,
                    })
                };
                let begun = begun(c, begin);
                // All complete (the server runs them in order): the first one that failed
                // says why (after a failed lock, the read only reports an aborted transaction).
                let (backend, b, locked, rows) =
                    tokio::join!(backend, begun, c.execute(&lock_st, &lp), c.query(&read_st, &rp));
                if let Some(backend) = backend {
                    recall.backend(object, backend);
                }
                b.map_err(map_err)?;
                locked.map_err(|e| failed(c, e))?;
                rows.map_err(|e| failed(c, e))
            })
            .await
        };
        let rows = self.unless_silent(out)?;
        let Some(first) = rows.first() else { return Ok(None) };
        let state = call_state_of(first)?;
        let key = KeyRecord::from(KeyRow::from_row(first)?);
        self.pending = Some(Pending { xid: get(first, "xid")?, pid: get(first, "pid")?, audit_seq: None });
        // What a lone update or delete reads is remembered, for speculating the next one.
        let remember = args.with_parents && args.also.as_slice() == std::slice::from_ref(subject);
        let (mut current, mut loaded, mut found) = (None, Vec::new(), Vec::new());
        for r in &rows {
            let Some((is_resource, row)) = context_row(r)? else { continue };
            let e = if remember {
                let e = EntityRecord::try_from(row.clone())?;
                found.push(Seen { record: e.clone(), row });
                e
            } else {
                EntityRecord::try_from(row)?
            };
            if is_resource { current = Some(e) } else { loaded.push(e) }
        }
        if remember {
            let have: HashSet<&Uid> = found.iter().map(|s| &s.record.uid).collect();
            let mut absent: Vec<Uid> =
                [&args.resource, subject].into_iter().filter(|u| !have.contains(u)).cloned().collect();
            for s in &found {
                absent.extend(s.record.parents.iter().filter(|p| !have.contains(p)).cloned());
            }
            absent.sort();
            absent.dedup();
            let raw = (get::<Option<i64>>(first, "version")?, get::<i64>(first, "generation")?);
            self.recall.saw(
                Some((key.clone(), get(first, "key_hash")?)),
                (subject, state.subject_revoked_at),
                raw,
                found,
                absent,
            );
        }
        self.prefetched = Some((args, current, first_of_each(loaded)));
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
        let (types, ids) = split(&uids);
        let s = q(READ_CONTEXT)
            .bind(kid)
            .bind(subject.ty.as_str())
            .bind(subject.id.as_str())
            .bind(token_id)
            .bind(types)
            .bind(ids);
        // In a transaction (REPEATABLE READ) or alone (a lazy read, autocommit): either way
        // one snapshot — the subqueries and the STABLE `read_ancestors_at` share the
        // statement's.
        let rows = match std::mem::replace(&mut self.db, Db::Done) {
            Db::Lazy(c) => {
                self.db = Db::Spent(c);
                let Db::Spent(c) = &self.db else { unreachable!("set above") };
                let out = tokio::time::timeout(self.limit, async {
                    let st = c.prepare_cached(&s.sql).await.map_err(map_err)?;
                    c.query(&st, &s.params()).await.map_err(|e| failed(c, e))
                })
                .await;
                self.unless_silent(out)?
            }
            other => {
                self.db = other;
                self.flush().await?;
                self.rows(s).await?
            }
        };
        let Some(first) = rows.first() else { return Ok(None) };
        let state = call_state_of(first)?;
        let key = KeyRecord::from(KeyRow::from_row(first)?);
        let mut loaded = Vec::new();
        for r in &rows {
            if let Some((_, e)) = context_entity(r)? {
                loaded.push(e);
            }
        }
        self.prefetched_read = Some((uids, first_of_each(loaded)));
        Ok(Some((key, state)))
    }

    /// Before a statement: a lazy read begins its transaction (or, after its one statement,
    /// asks for the call to be read again in one); a deferred update, or a last audit
    /// event, is sent first.
    async fn flush(&mut self) -> StoreResult<()> {
        match std::mem::replace(&mut self.db, Db::Done) {
            Db::Lazy(c) => self.db = Db::Begin(c, self.begin_read),
            Db::Spent(c) => {
                self.db = Db::Spent(c);
                return Err(StoreError::Retry(super::super::RESTART_IN_SNAPSHOT.into()));
            }
            other => self.db = other,
        }
        if self.last_audit.is_some() {
            return self.send_last_audit().await;
        }
        let Some(d) = self.deferred.take() else { return Ok(()) };
        let done = self
            .exec(
                q("UPDATE entities SET attributes = $3, parents = $4, version = $5, tags = $6
                   WHERE etype = $1 AND eid = $2")
                .bind(d.etype.as_str())
                .bind(d.eid.as_str())
                .bind(d.attributes.as_str())
                .bind(d.parents.as_str())
                .bind(d.version)
                .bind(d.tags.as_str()),
            )
            .await?;
        if done != 1 {
            return Err(StoreError::Internal(format!("update of missing entity {}::{:?}", d.etype, d.eid)));
        }
        Ok(())
    }

    /// Sends the last audit event (with a deferred update) on its own; notes its seq.
    async fn send_last_audit(&mut self) -> StoreResult<()> {
        let Some((a, seq)) = self.last_audit.take() else { return Ok(()) };
        seq.set(self.insert_audit(&a).await?);
        Ok(())
    }

    /// The audit insert, with the deferred update when there is one (one statement).
    async fn insert_audit(&mut self, a: &AuditArgs) -> StoreResult<u64> {
        let d = self.deferred.take();
        let row = match self.one(audit_statement(a, d.as_ref())).await {
            Err(StoreError::Invalid(m)) if d.is_some() && m.contains("division by zero") => {
                return Err(StoreError::Internal(format!("update of missing entity {}", entity_name(d.as_ref()))));
            }
            other => other?,
        };
        self.audited(&row)
    }

    /// What an audit insert returned: its seq, and who this transaction is. (A deferred
    /// update that found no row failed the statement: see `audit_statement`.)
    fn audited(&mut self, row: &Row) -> StoreResult<u64> {
        let (seq, xid, pid): (i64, String, i32) = (at(row, 0)?, at(row, 1)?, at(row, 2)?);
        self.recall.committed_seq(to_u64(seq));
        self.pending = Some(Pending { xid, pid, audit_seq: Some(to_u64(seq)) });
        Ok(to_u64(seq))
    }

    async fn lock_exclusive(&mut self, key: &str) -> StoreResult<()> {
        self.exec(q("SELECT pg_advisory_xact_lock(hashtextextended($1, 0))").bind(key)).await?;
        Ok(())
    }
}

impl Drop for PgTxn {
    /// A transaction dropped before COMMIT (an error, a deadline) is rolled back before
    /// its connection goes back to the pool: ROLLBACK is queued behind whatever statement
    /// is still running on it; a connection that cannot roll back is closed instead.
    fn drop(&mut self) {
        let Db::Open(c) = std::mem::replace(&mut self.db, Db::Done) else { return };
        match tokio::runtime::Handle::try_current() {
            Ok(rt) => {
                rt.spawn(async move {
                    let rolled_back = tokio::time::timeout(ROLLBACK_LIMIT, c.batch_execute("ROLLBACK")).await;
                    if !matches!(rolled_back, Ok(Ok(()))) {
                        drop(Object::take(c));
                    }
                });
            }
            Err(_) => drop(Object::take(c)),
        }
    }
}

#[async_trait]
impl Txn for PgTxn {
    fn speculating(&self) -> bool {
        self.speculation.is_some()
    }

    fn abandon_speculation(&mut self) {
        self.abandon();
    }

    async fn key(&mut self, kid: &str) -> StoreResult<Option<KeyRecord>> {
        self.flush().await?;
        let row = self.opt(q(concat!("SELECT ", key_columns!(), " FROM keys k WHERE k.kid = $1")).bind(kid)).await?;
        Ok(row.as_ref().map(KeyRow::from_row).transpose()?.map(KeyRecord::from))
    }

    async fn list_keys(&mut self) -> StoreResult<Vec<KeyRecord>> {
        self.flush().await?;
        let rows = self.rows(q(concat!("SELECT ", key_columns!(), " FROM keys k ORDER BY k.added_at, k.kid"))).await?;
        Ok(decode::<KeyRow>(&rows)?.into_iter().map(KeyRecord::from).collect())
    }

    async fn insert_key(&mut self, k: &KeyRecord) -> StoreResult<()> {
        self.flush().await?;
        self.exec(
            q("INSERT INTO keys (kid, algorithm, secret, public_key_pem, issuer, audience, principal_type, revoked,
                                 added_at, jwk, source, retired, required_typ, max_lifetime_secs, signing, private_key)
               VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16)")
            .bind(k.kid.as_str())
            .bind(k.algorithm.as_str())
            .bind(k.secret.as_slice())
            .bind(k.public_key_pem.as_str())
            .bind(k.issuer.as_str())
            .bind(k.audience.as_str())
            .bind(k.principal_type.as_str())
            .bind(k.revoked)
            .bind(k.added_at)
            .bind(k.jwk.as_str())
            .bind(k.source.as_str())
            .bind(k.retired)
            .bind(k.required_typ.as_str())
            .bind(k.max_lifetime_secs)
            .bind(k.signing)
            .bind(k.private_key.as_slice()),
        )
        .await?;
        Ok(())
    }

    async fn update_key(&mut self, k: &KeyRecord) -> StoreResult<()> {
        self.flush().await?;
        self.exec(q("LOCK TABLE keys IN ACCESS EXCLUSIVE MODE")).await?;
        self.exec(
            q("UPDATE keys SET jwk = $2, retired = $3, signing = $4 WHERE kid = $1")
                .bind(k.kid.as_str())
                .bind(k.jwk.as_str())
                .bind(k.retired)
                .bind(k.signing),
        )
        .await?;
        Ok(())
    }

    async fn revoke_key(&mut self, kid: &str, now: i64) -> StoreResult<bool> {
        self.flush().await?;
        self.exec(q("LOCK TABLE keys IN ACCESS EXCLUSIVE MODE")).await?;
        let done = self
            .exec(
                q("UPDATE keys SET revoked = TRUE, revoked_at = coalesce(revoked_at, $2) WHERE kid = $1")
                    .bind(kid)
                    .bind(now),
            )
            .await?;
        Ok(done > 0)
    }

    async fn revoke_token(
        &mut self,
        token_id: &str,
        subject: Option<&Uid>,
        expires_at: i64,
        now: i64,
    ) -> StoreResult<()> {
        self.flush().await?;
        match subject {
            Some(s) => self.lock_exclusive(&subject_lock_key(s)).await?,
            None => {
                self.exec(q("LOCK TABLE revoked_tokens IN ACCESS EXCLUSIVE MODE")).await?;
            }
        }
        self.exec(
            q("INSERT INTO revoked_tokens (token_id, expires_at_secs, revoked_at) VALUES ($1, $2, $3)
               ON CONFLICT (token_id) DO UPDATE
               SET expires_at_secs = GREATEST(revoked_tokens.expires_at_secs, EXCLUDED.expires_at_secs)")
            .bind(token_id)
            .bind(expires_at)
            .bind(now),
        )
        .await?;
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
            "SELECT (SELECT revoked_at_secs FROM subjects WHERE etype = $1 AND eid = $2) AS revoked_at_secs,
                    EXISTS (SELECT 1 FROM revoked_tokens WHERE token_id = $3) AS token_revoked,
                    (SELECT max(version) FROM policies) AS version,
                    (SELECT generation FROM policy_links_meta WHERE id = 1) AS generation"
        };
        let row = self.one(q(sql).bind(subject.ty.as_str()).bind(subject.id.as_str()).bind(token_id)).await?;
        call_state_of(&row)
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
        if let Some(answer) = self.speculate(kid, subject, token_id) {
            return Ok(Some(answer));
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
            concat!(
                "SELECT ",
                key_columns!(),
                ", s.revoked_at_secs, s.token_revoked, s.version, s.generation
                 FROM keys k CROSS JOIN LATERAL call_state_locked($2, $3, $4) AS s WHERE k.kid = $1"
            )
        } else {
            concat!("SELECT ", key_columns!(), ", ", read_call_state!(), " FROM keys k WHERE k.kid = $1")
        };
        let row = self.opt(q(sql).bind(kid).bind(subject.ty.as_str()).bind(subject.id.as_str()).bind(token_id)).await?;
        row.map(|r| Ok((KeyRecord::from(KeyRow::from_row(&r)?), call_state_of(&r)?))).transpose()
    }

    async fn revoke_subject(&mut self, subject: &Uid, at_secs: i64) -> StoreResult<()> {
        self.flush().await?;
        self.lock_exclusive(&subject_lock_key(subject)).await?;
        self.exec(
            q("INSERT INTO subjects (etype, eid, revoked_at_secs) VALUES ($1, $2, $3)
               ON CONFLICT (etype, eid) DO UPDATE
               SET revoked_at_secs = GREATEST(coalesce(subjects.revoked_at_secs, 0), EXCLUDED.revoked_at_secs)")
            .bind(subject.ty.as_str())
            .bind(subject.id.as_str())
            .bind(at_secs),
        )
        .await?;
        Ok(())
    }

    async fn policy_state(&mut self) -> StoreResult<PolicyState> {
        self.flush().await?;
        let row = self
            .one(q(
                "SELECT (SELECT max(version) FROM policies), (SELECT generation FROM policy_links_meta WHERE id = 1)",
            ))
            .await?;
        Ok(policy_state_of(at(&row, 0)?, at(&row, 1)?))
    }

    async fn policy_links(&mut self) -> StoreResult<Vec<TemplateLink>> {
        self.flush().await?;
        let rows = self.rows(q("SELECT link_id, template_id, principal_type, principal_id, resource_type, resource_id FROM policy_links ORDER BY link_id")).await?;
        Ok(decode::<LinkRow>(&rows)?.into_iter().map(TemplateLink::from).collect())
    }

    async fn insert_link(&mut self, l: &TemplateLink, now: i64) -> StoreResult<()> {
        self.flush().await?;
        self.exec(q("LOCK TABLE policies IN ACCESS EXCLUSIVE MODE")).await?;
        self.exec(
            q("INSERT INTO policy_links (link_id, template_id, principal_type, principal_id, resource_type,
                                         resource_id, created_at)
               VALUES ($1, $2, $3, $4, $5, $6, $7)")
            .bind(l.link_id.as_str())
            .bind(l.template_id.as_str())
            .bind(l.principal.as_ref().map(|u| u.ty.as_str()))
            .bind(l.principal.as_ref().map(|u| u.id.as_str()))
            .bind(l.resource.as_ref().map(|u| u.ty.as_str()))
            .bind(l.resource.as_ref().map(|u| u.id.as_str()))
            .bind(now),
        )
        .await?;
        self.bump_links_generation().await?;
        Ok(())
    }

    async fn delete_link(&mut self, link_id: &str) -> StoreResult<Option<TemplateLink>> {
        self.flush().await?;
        self.exec(q("LOCK TABLE policies IN ACCESS EXCLUSIVE MODE")).await?;
        let row = self.opt(q("DELETE FROM policy_links WHERE link_id = $1 RETURNING link_id, template_id, principal_type, principal_id, resource_type, resource_id").bind(link_id)).await?;
        if row.is_some() {
            self.bump_links_generation().await?;
        }
        Ok(row.as_ref().map(LinkRow::from_row).transpose()?.map(TemplateLink::from))
    }

    async fn policies(&mut self, version: u64) -> StoreResult<Option<PolicyRecord>> {
        self.flush().await?;
        let row = self
            .opt(
                q("SELECT version, policies, schema, created_at FROM policies WHERE version = $1")
                    .bind(to_i64(version)),
            )
            .await?;
        Ok(row.as_ref().map(PolicyRow::from_row).transpose()?.map(PolicyRecord::from))
    }

    async fn insert_policies(&mut self, policies: &str, schema: &str, now: i64) -> StoreResult<u64> {
        self.flush().await?;
        self.exec(q("LOCK TABLE policies IN ACCESS EXCLUSIVE MODE")).await?;
        let row = self
            .one(
                q("INSERT INTO policies (version, policies, schema, created_at)
                   SELECT coalesce(max(version), 0) + 1, $1, $2, $3 FROM policies RETURNING version")
                .bind(policies)
                .bind(schema)
                .bind(now),
            )
            .await?;
        Ok(to_u64(at(&row, 0)?))
    }

    async fn policy_history(&mut self) -> StoreResult<Vec<PolicyRecord>> {
        self.flush().await?;
        let rows = self.rows(q("SELECT version, policies, schema, created_at FROM policies ORDER BY version")).await?;
        Ok(decode::<PolicyRow>(&rows)?.into_iter().map(PolicyRecord::from).collect())
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
        let row = self.opt(q(sql).bind(uid.ty.as_str()).bind(uid.id.as_str())).await?;
        row.as_ref().map(entity_of).transpose()
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
            let keys: Vec<String> = uids.iter().map(ancestor_key).collect();
            let rows = self
                .rows(
                    q("SELECT etype, eid, attributes, parents, version, tags FROM read_ancestors($1, $2)")
                        .bind(keys)
                        .bind(self.write),
                )
                .await?;
            return rows.iter().map(entity_of).collect();
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
                let rows = self
                    .rows(
                        // Each by its key (`OFFSET 0`: never a scan of the whole table; see
                        // READ_CONTEXT).
                        q("SELECT e.etype, e.eid, e.attributes, e.parents, e.version, e.tags
                           FROM (SELECT DISTINCT * FROM UNNEST($1::text[], $2::text[])) AS x(t, i),
                                LATERAL (SELECT * FROM entities WHERE etype = x.t AND eid = x.i OFFSET 0) AS e")
                        .bind(types)
                        .bind(ids),
                    )
                    .await?;
                for r in &rows {
                    level.push(entity_of(r)?);
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
            return super::super::entity_for_write_in_steps(self, resource, also, with_parents).await;
        }
        // One round trip (`read_for_write`, migration 0008): the resource's lock exclusive
        // and its row, then the rest with their ancestors, each level's locks shared first.
        let keys: Vec<String> = also.iter().map(ancestor_key).collect();
        let rows = self
            .rows(
                q("SELECT r_resource, r_etype, r_eid, r_attributes, r_parents, r_version, r_tags
                   FROM read_for_write($1, $2, $3, $4)")
                .bind(resource.ty.as_str())
                .bind(resource.id.as_str())
                .bind(keys)
                .bind(with_parents),
            )
            .await?;
        let mut current = None;
        let mut loaded = Vec::with_capacity(rows.len());
        for r in &rows {
            match context_entity(r)? {
                Some((true, e)) => current = Some(e),
                Some((false, e)) => loaded.push(e),
                None => {}
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
        self.touched.push(e.uid.clone());
        let mapping = self.mapping.clone();
        if let Some(tm) = mapping.get(&e.uid.ty) {
            return self.mapped_insert(tm, e).await;
        }
        self.exec(
            q("INSERT INTO entities (etype, eid, attributes, parents, version, tags) VALUES ($1, $2, $3, $4, $5, $6)")
                .bind(e.uid.ty.as_str())
                .bind(e.uid.id.as_str())
                .bind(serde_json::to_string(&e.attributes).map_err(json_err)?)
                .bind(serde_json::to_string(&e.parents).map_err(json_err)?)
                .bind(to_i64(e.version))
                .bind(serde_json::to_string(&e.tags).map_err(json_err)?),
        )
        .await?;
        Ok(())
    }

    async fn update_entity(&mut self, e: &EntityRecord) -> StoreResult<()> {
        let mapping = self.mapping.clone();
        if let Some(tm) = mapping.get(&e.uid.ty) {
            self.flush().await?;
            return self.mapped_update(tm, e).await;
        }
        self.flush().await?;
        // Sent with the next statement (see `deferred`); the entity's exclusive lock is
        // held already (`entity`), so nothing can come between.
        let row = EntityRow {
            etype: e.uid.ty.clone(),
            eid: e.uid.id.clone(),
            attributes: serde_json::to_string(&e.attributes).map_err(json_err)?,
            parents: serde_json::to_string(&e.parents).map_err(json_err)?,
            version: to_i64(e.version),
            tags: serde_json::to_string(&e.tags).map_err(json_err)?,
        };
        self.wrote.push(Seen { record: e.clone(), row: row.clone() });
        self.deferred = Some(row);
        Ok(())
    }

    async fn delete_entity(&mut self, uid: &Uid) -> StoreResult<()> {
        self.flush().await?;
        self.touched.push(uid.clone());
        let mapping = self.mapping.clone();
        if let Some(tm) = mapping.get(&uid.ty) {
            return self.mapped_delete(tm, uid).await;
        }
        self.exec(q("DELETE FROM entities WHERE etype = $1 AND eid = $2").bind(uid.ty.as_str()).bind(uid.id.as_str()))
            .await?;
        Ok(())
    }

    async fn savepoint(&mut self) -> StoreResult<()> {
        self.flush().await?;
        self.exec(q("SAVEPOINT lockstep_mutations")).await?;
        Ok(())
    }

    async fn rollback_to_savepoint(&mut self) -> StoreResult<()> {
        // A deferred update was made after the savepoint: undone by not sending it.
        self.deferred = None;
        self.wrote.clear();
        self.exec(q("ROLLBACK TO SAVEPOINT lockstep_mutations")).await?;
        Ok(())
    }

    async fn claim_idempotency_key(
        &mut self,
        subject: &Uid,
        key: &str,
        request_hash: &[u8],
        now: i64,
    ) -> StoreResult<Option<(Vec<u8>, String)>> {
        self.flush().await?;
        // A concurrent holder of the key makes this INSERT wait until it commits (then
        // nothing is inserted and its row is read below) or rolls back (then we insert).
        let claimed = self
            .exec(
                q("INSERT INTO idempotency (etype, eid, key, request_hash, response, created_at)
                   VALUES ($1, $2, $3, $4, '', $5) ON CONFLICT DO NOTHING")
                .bind(subject.ty.as_str())
                .bind(subject.id.as_str())
                .bind(key)
                .bind(request_hash)
                .bind(now),
            )
            .await?;
        if claimed == 1 {
            return Ok(None);
        }
        let row = self
            .opt(
                q("SELECT request_hash, response FROM idempotency WHERE etype = $1 AND eid = $2 AND key = $3")
                    .bind(subject.ty.as_str())
                    .bind(subject.id.as_str())
                    .bind(key),
            )
            .await?;
        match row {
            Some(r) => Ok(Some((at(&r, 0)?, at(&r, 1)?))),
            // Purged between the two statements: claim it again on the next attempt.
            None => Err(StoreError::Retry("idempotency record vanished".into())),
        }
    }

    async fn complete_idempotency_key(&mut self, subject: &Uid, key: &str, response: &str) -> StoreResult<()> {
        self.flush().await?;
        self.exec(
            q("UPDATE idempotency SET response = $4 WHERE etype = $1 AND eid = $2 AND key = $3")
                .bind(subject.ty.as_str())
                .bind(subject.id.as_str())
                .bind(key)
                .bind(response),
        )
        .await?;
        Ok(())
    }

    async fn append_audit(&mut self, ev: &NewAuditEvent, now: i64) -> StoreResult<u64> {
        self.send_last_audit().await?;
        // Also returns who this transaction is, for settling an interrupted COMMIT: no
        // extra round trip (see the module doc). A deferred update goes in the same
        // statement: the audit row and the write, one round trip (the update's row count
        // comes back beside the seq).
        self.insert_audit(&AuditArgs::of(ev, now)?).await
    }

    async fn append_audit_last(&mut self, ev: &NewAuditEvent, now: i64, seq: &AuditSeq) -> StoreResult<()> {
        self.send_last_audit().await?;
        self.last_audit = Some((AuditArgs::of(ev, now)?, seq.clone()));
        Ok(())
    }

    async fn audit_events(&mut self, after_seq: u64, limit: u32) -> StoreResult<Vec<AuditEvent>> {
        self.flush().await?;
        let rows = self
            .rows(
                q("SELECT seq, time, kind, principal_type, principal_id, token_id, mutations, entities, detail
                   FROM audit WHERE seq > $1 ORDER BY seq LIMIT $2")
                .bind(to_i64(after_seq))
                .bind(i64::from(limit)),
            )
            .await?;
        decode::<super::super::AuditRow>(&rows)?.into_iter().map(AuditEvent::try_from).collect()
    }

    async fn audit_extent(&mut self) -> StoreResult<(u64, Option<u64>, Option<u64>)> {
        self.flush().await?;
        let row = self
            .one(q("SELECT (SELECT through_seq FROM audit_trim WHERE id = 1), (SELECT min(seq) FROM audit),
                           (SELECT max(seq) FROM audit)"))
            .await?;
        let (through, oldest, newest): (i64, Option<i64>, Option<i64>) = (at(&row, 0)?, at(&row, 1)?, at(&row, 2)?);
        Ok((to_u64(through), oldest.map(to_u64), newest.map(to_u64)))
    }

    async fn audit_time_at(&mut self, seq: u64) -> StoreResult<Option<(u64, i64)>> {
        self.flush().await?;
        let row =
            self.opt(q("SELECT seq, time FROM audit WHERE seq >= $1 ORDER BY seq LIMIT 1").bind(to_i64(seq))).await?;
        row.map(|r| Ok((to_u64(at(&r, 0)?), at(&r, 1)?))).transpose()
    }

    async fn trim_audit(&mut self, seqs: &[u64]) -> StoreResult<u64> {
        self.flush().await?;
        let Some(&last) = seqs.last() else { return Ok(0) };
        self.exec(q("UPDATE audit_trim SET through_seq = greatest(through_seq, $1) WHERE id = 1").bind(to_i64(last)))
            .await?;
        let seqs: Vec<i64> = seqs.iter().map(|s| to_i64(*s)).collect();
        self.exec(q("DELETE FROM audit WHERE seq = ANY($1)").bind(seqs)).await
    }

    async fn purge(&mut self, now_secs: i64, idempotency_before: i64) -> StoreResult<(u64, u64)> {
        self.flush().await?;
        let tokens = self.exec(q("DELETE FROM revoked_tokens WHERE expires_at_secs < $1").bind(now_secs)).await?;
        let keys = self.exec(q("DELETE FROM idempotency WHERE created_at < $1").bind(idempotency_before)).await?;
        Ok((tokens, keys))
    }

    /// Commits; an interrupted COMMIT is settled for `SETTLE_WINDOW`.
    async fn commit(self: Box<Self>) -> StoreResult<()> {
        self.commit_before(None).await
    }

    /// Commits. When the connection fails during COMMIT the outcome is unknown to us: it
    /// is then settled by asking the database about this transaction id until `deadline`
    /// (see the module doc), so that a committed call is never answered UNAVAILABLE and an
    /// uncommitted one is not answered UNKNOWN when the database is back in time. The last
    /// audit event goes with COMMIT when the transaction's id is known already.
    async fn commit_before(self: Box<Self>, deadline: Option<Instant>) -> StoreResult<()> {
        let mut this = self;
        if this.speculation.is_some() {
            return this.commit_speculated(deadline).await;
        }
        let open = matches!(this.db, Db::Open(_));
        if !open && this.last_audit.is_none() && this.deferred.is_none() {
            // A lazy read that ran its one statement (or none), or a transaction that sent
            // nothing: nothing to commit; the connection goes back to the pool outside any
            // transaction.
            return Ok(());
        }
        if !open || this.pending.is_none() || this.last_audit.is_none() {
            this.flush().await?;
        }
        if this.write && this.pending.is_none() {
            // Rare (housekeeping, a repeated idempotent request): one statement.
            let row = this.one(q("SELECT pg_current_xact_id_if_assigned()::text, pg_backend_pid()")).await?;
            let xid: Option<String> = at(&row, 0)?;
            this.pending = xid.map(|xid| Pending { xid, pid: at(&row, 1).unwrap_or_default(), audit_seq: None });
        }
        let last = this.last_audit.take();
        let deferred = this.deferred.take();
        let Db::Open(c) = std::mem::replace(&mut this.db, Db::Done) else { return Ok(()) };
        // The last write and COMMIT in one round trip. Should the insert fail, COMMIT ends
        // the failed transaction (PostgreSQL answers ROLLBACK): nothing committed.
        let ended = tokio::time::timeout(this.limit, async {
            let Some((a, _)) = &last else {
                return match c.batch_execute("COMMIT").await {
                    Ok(()) => Ended::Committed(None),
                    Err(e) => Ended::Failed(None, map_err(e)),
                };
            };
            let s = audit_statement(a, deferred.as_ref());
            let st = match c.prepare_cached(&s.sql).await {
                Ok(st) => st,
                Err(e) => return Ended::Failed(None, map_err(e)),
            };
            let params = s.params();
            let (row, done) = tokio::join!(c.query_one(&st, &params), c.batch_execute("COMMIT"));
            match (row, done) {
                (Err(e), _) if e.as_db_error().is_some() => Ended::Refused(refused(e, deferred.as_ref())),
                (Err(e), _) => Ended::Failed(None, map_err(e)),
                (Ok(row), Ok(())) => Ended::Committed(Some(row)),
                (Ok(row), Err(e)) => Ended::Failed(Some(row), map_err(e)),
            }
        })
        .await
        .unwrap_or_else(|_| {
            Ended::Failed(None, StoreError::Unavailable("the database did not answer the COMMIT in time".into()))
        });
        let outcome = match ended {
            Ended::Committed(row) => {
                if let (Some(row), Some((_, cell))) = (row, &last) {
                    cell.set(this.audited(&row)?);
                }
                // Committed: the connection goes back to the pool as it is.
                drop(c);
                this.remember();
                return Ok(());
            }
            Ended::Refused(e) => {
                // Rolled back by the COMMIT behind it: the connection is sound.
                drop(c);
                return Err(e);
            }
            Ended::Failed(row, e) => {
                if let Some(row) = row {
                    this.audited(&row)?;
                }
                e
            }
        };
        // Not known to have committed: a connection in an unknown state is not reused.
        drop(Object::take(c));
        match outcome {
            StoreError::Unavailable(m) => match this.pending.take() {
                // Wrote nothing: whatever happened, nothing was committed.
                None => Err(StoreError::Unavailable(m)),
                Some(p) => {
                    let until = deadline.unwrap_or_else(|| Instant::now() + SETTLE_WINDOW);
                    settle(&this.connect, &p, until, &m).await?;
                    this.remember();
                    if let Some((_, cell)) = &last {
                        // Committed, its insert's answer perhaps lost with the connection.
                        match p.audit_seq {
                            Some(s) => cell.set(s),
                            None => {
                                cell.set(recover_seq(&this.connect, &p, until.max(Instant::now() + MIN_RECOVER)).await?)
                            }
                        }
                    }
                    Ok(())
                }
            },
            other => Err(other),
        }
    }
}
