//! Speculative writes (the protocol is in the module doc of `postgres`, "One round trip"):
//! what this instance last saw committed — keys, subjects' revocation, the policy state,
//! own-store entities — so that a lone update can be decided before anything is read, and
//! sent as one round trip that writes only if all it was decided on is still as seen.

use super::super::EntityRow;
use crate::model::{EntityRecord, KeyRecord, Uid};
use std::collections::{HashMap, HashSet};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// Most entities one speculation is decided on (resource, principal, ancestors).
const MAX_CLOSURE: usize = 64;
/// Most entries kept of each kind; past it, that kind starts over.
const MAX_ENTRIES: usize = 100_000;
/// Most bytes of entity text kept (each entity counted twice: as stored and decoded, about
/// as large); past it, the entities start over. A caller who can write large entities
/// cannot grow the instance's memory beyond it.
const MAX_ENTITY_BYTES: usize = 64 << 20;
/// An entity whose text is larger is not remembered (its writes read in full).
const MAX_SEEN_BYTES: usize = 16 << 10;
/// How long a resource whose speculation was given up or stale is read in full.
const COLD: Duration = Duration::from_secs(1);
/// A speculation needs a lower bound of its audit seq (`floor`) seen this recently: the
/// bound of the scan that settles an interrupted one.
const FLOOR_AGE: Duration = Duration::from_secs(30);

/// An own-store entity as read: decoded, and its row as stored (compared as text).
pub(super) struct Seen {
    pub record: EntityRecord,
    pub row: EntityRow,
}

impl Seen {
    /// What remembering it costs, about: its text, as stored and decoded.
    fn bytes(&self) -> usize {
        2 * (self.row.attributes.len() + self.row.parents.len() + self.row.tags.len() + self.row.eid.len())
    }
}

/// A pooled connection's backend: its pid and start time (text), which name it in
/// `pg_stat_activity` (a pid alone may be reused by a later backend).
#[derive(Clone, Debug)]
pub(super) struct Backend {
    pub pid: i32,
    pub start: String,
}

#[derive(Default)]
struct State {
    /// kid → the key, and `hashtextextended(k::text, 0)` of its row.
    keys: HashMap<String, (KeyRecord, i64)>,
    /// subject → `revoked_at_secs`.
    subjects: HashMap<Uid, Option<i64>>,
    /// `max(version)` of `policies` and the links generation, as read.
    policy: Option<(Option<i64>, i64)>,
    /// uid → the entity, or None when it did not exist (`remember`, `forget`).
    entities: HashMap<Uid, Option<std::sync::Arc<Seen>>>,
    /// `Seen::bytes` of the entities kept.
    entity_bytes: usize,
    /// Resources read in full until then.
    cold: HashMap<Uid, Instant>,
    /// Pool object id → its backend.
    backends: HashMap<deadpool_postgres::ObjectId, Backend>,
}

/// What a speculative write assumes: checked, under its locks, by the statement that writes.
pub(super) struct Speculation {
    pub kid: String,
    pub key_hash: i64,
    pub subject: Uid,
    pub revoked_at: Option<i64>,
    pub token_id: String,
    pub policy: (Option<i64>, i64),
    /// Each entity decided on, as seen (None: it did not exist): the resource, the
    /// principal, then their ancestors (`ancestors`).
    pub entities: Vec<(Uid, Option<std::sync::Arc<Seen>>)>,
    pub resource: Uid,
    pub backend: Backend,
    /// An audit seq drawn before this write began: its own is greater.
    pub floor: u64,
    /// Written into its audit row: how it is found when its answer is lost.
    pub nonce: i64,
}

impl Speculation {
    /// The ancestors of the resource and the principal it was decided with.
    pub fn ancestors(&self) -> impl Iterator<Item = &Uid> {
        self.entities.iter().skip(2).map(|(u, _)| u)
    }
}

/// What a speculation hands the engine besides what it assumes: the key, the resource and
/// the entities it is decided with.
pub(super) struct Answer {
    pub key: KeyRecord,
    pub current: Option<EntityRecord>,
    pub loaded: Vec<EntityRecord>,
}

/// The instance's view of what it last saw committed.
#[derive(Default)]
pub(super) struct Recall {
    state: Mutex<State>,
    floor: AtomicU64,
    floor_at: Mutex<Option<Instant>>,
}

fn lock(m: &Mutex<State>) -> std::sync::MutexGuard<'_, State> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn bounded<K: std::hash::Hash + Eq, V>(m: &mut HashMap<K, V>) -> &mut HashMap<K, V> {
    if m.len() >= MAX_ENTRIES {
        m.clear();
    }
    m
}

impl State {
    /// Remembers `uid` as `now` (None: it did not exist), within `MAX_ENTRIES` and
    /// `MAX_ENTITY_BYTES`; an entity larger than `MAX_SEEN_BYTES` is forgotten instead.
    fn remember(&mut self, uid: Uid, now: Option<Seen>) {
        let now = match now {
            Some(e) if e.bytes() > MAX_SEEN_BYTES => return self.forget(&uid),
            other => other.map(std::sync::Arc::new),
        };
        let added = now.as_ref().map_or(0, |e| e.bytes());
        if self.entities.len() >= MAX_ENTRIES || self.entity_bytes + added > MAX_ENTITY_BYTES {
            self.entities.clear();
            self.entity_bytes = 0;
        }
        if let Some(Some(old)) = self.entities.insert(uid, now) {
            self.entity_bytes -= old.bytes();
        }
        self.entity_bytes += added;
    }

    fn forget(&mut self, uid: &Uid) {
        if let Some(Some(old)) = self.entities.remove(uid) {
            self.entity_bytes -= old.bytes();
        }
    }
}

impl Recall {
    /// A speculation of a write by `subject` (token `token_id`, key `kid`) of `resource`,
    /// decided with the resource's and the principal's ancestors, on `object`'s connection;
    /// None when something it needs was not seen (the write then reads in full).
    pub fn speculate(
        &self,
        kid: &str,
        subject: &Uid,
        token_id: &str,
        resource: &Uid,
        object: deadpool_postgres::ObjectId,
    ) -> Option<(Speculation, Answer)> {
        let floor = self.floor.load(Ordering::Acquire);
        let fresh = self.floor_at.lock().ok().and_then(|t| *t).is_some_and(|t| t.elapsed() < FLOOR_AGE);
        if floor == 0 || !fresh || resource == subject {
            return None;
        }
        let mut s = lock(&self.state);
        if let Some(until) = s.cold.get(resource) {
            if Instant::now() < *until {
                return None;
            }
            s.cold.remove(resource);
        }
        let backend = s.backends.get(&object)?.clone();
        let (key, key_hash) = s.keys.get(kid)?.clone();
        if key.revoked || key.retired {
            return None;
        }
        let revoked_at = *s.subjects.get(subject)?;
        let policy = s.policy?;
        let res = s.entities.get(resource)?.clone();
        let principal = s.entities.get(subject)?.clone();
        let mut entities = vec![(resource.clone(), res.clone()), (subject.clone(), principal.clone())];
        let mut seen: HashSet<Uid> = [resource.clone(), subject.clone()].into();
        let mut frontier: Vec<Uid> = Vec::new();
        for e in [&principal, &res].into_iter().flatten() {
            frontier.extend(e.record.parents.iter().cloned());
        }
        let mut loaded: Vec<EntityRecord> = principal.iter().map(|p| p.record.clone()).collect();
        while !frontier.is_empty() {
            let mut next = Vec::new();
            for u in frontier {
                if u == *resource {
                    // A cycle through the resource: read in full.
                    return None;
                }
                if !seen.insert(u.clone()) {
                    continue;
                }
                let e = s.entities.get(&u)?.clone();
                if let Some(e) = &e {
                    next.extend(e.record.parents.iter().cloned());
                    loaded.push(e.record.clone());
                }
                entities.push((u, e));
                if entities.len() > MAX_CLOSURE {
                    return None;
                }
            }
            frontier = next;
        }
        drop(s);
        let answer = Answer { key, current: res.map(|r| r.record.clone()), loaded };
        let spec = Speculation {
            kid: kid.to_owned(),
            key_hash,
            subject: subject.clone(),
            revoked_at,
            token_id: token_id.to_owned(),
            policy,
            entities,
            resource: resource.clone(),
            backend,
            floor,
            nonce: rand::random::<i64>(),
        };
        Some((spec, answer))
    }

    /// What a full read of a write found: the key, the subject's revocation, the policy
    /// state, and each entity read (`found`) or named as a parent and not found (`absent`).
    pub fn saw(
        &self,
        key: Option<(KeyRecord, i64)>,
        subject: (&Uid, Option<i64>),
        policy: (Option<i64>, i64),
        found: Vec<Seen>,
        absent: Vec<Uid>,
    ) {
        let mut s = lock(&self.state);
        if let Some((k, h)) = key {
            bounded(&mut s.keys).insert(k.kid.clone(), (k, h));
        }
        bounded(&mut s.subjects).insert(subject.0.clone(), subject.1);
        s.policy = Some(policy);
        for e in found {
            let uid = e.record.uid.clone();
            // An older row read late does not replace a newer one.
            if let Some(Some(old)) = s.entities.get(&uid)
                && old.row.version > e.row.version
            {
                continue;
            }
            s.remember(uid, Some(e));
        }
        for u in absent {
            s.remember(u, None);
        }
    }

    /// An entity this instance committed (`Some`), or one whose state it no longer knows.
    pub fn wrote(&self, uid: &Uid, now: Option<Seen>) {
        let mut s = lock(&self.state);
        match now {
            Some(e) => s.remember(uid.clone(), Some(e)),
            None => s.forget(uid),
        }
    }

    /// A speculation on `resource` was given up or found stale: read it in full for a while.
    pub fn cool(&self, resource: &Uid) {
        let mut s = lock(&self.state);
        bounded(&mut s.cold).insert(resource.clone(), Instant::now() + COLD);
        s.forget(resource);
    }

    /// An audit seq seen drawn (by a transaction that committed or may still): a later
    /// speculative write's own is greater.
    pub fn committed_seq(&self, seq: u64) {
        self.floor.fetch_max(seq, Ordering::AcqRel);
        if let Ok(mut t) = self.floor_at.lock() {
            *t = Some(Instant::now());
        }
    }

    pub fn backend_known(&self, object: deadpool_postgres::ObjectId) -> bool {
        lock(&self.state).backends.contains_key(&object)
    }

    pub fn backend(&self, object: deadpool_postgres::ObjectId, b: Backend) {
        bounded(&mut lock(&self.state).backends).insert(object, b);
    }
}
