//! The use cases. Each one opens ONE transaction, reads every piece of authorization
//! state it relies on through it (key, token and subject revocation, policies,
//! entities), decides, writes, audits and commits — or commits nothing.
//!
//! # Layout
//!
//! One file per use case, each an `impl Engine` block that reads top to bottom; this file
//! holds the engine's state and the steps they share: `run` (attempts, deadlines, the
//! commit), `authenticate`, `policies_at` (the policy cache), `admit`/`require`, the
//! request checks and the helpers that build Cedar contexts.
//!
//! - `commit`: AuthorizeAndCommit.
//! - `decide`: Authorize, GetEntity, ListAuditEvents.
//! - `edge`: the Envoy ext_authz decision.
//! - `revoke`: RevokeToken, RevokeSubject.
//! - `policies`: PutPolicies, history, rollback, GetPolicies, template links.
//! - `keys`: AddKey, RevokeKey, ListKeys, rotation, JWKS sync.
//! - `import`: `lockstep entities import`.
//! - `housekeeping`: purging expired rows.

mod commit;
mod decide;
mod edge;
mod housekeeping;
mod import;
mod keys;
mod policies;
mod retention;
mod revoke;

pub use retention::{AuditRetention, RetentionRun};

use crate::config::Settings;
use crate::error::{Error, Result};
use crate::jwks::{self, JwksSource};
use crate::model::{
    Attributes, AuditEvent, AuditKind, Change, CommitRequest, CommitResult, Decision, EntityRecord, KeyRecord,
    Mutation, NewAuditEvent, PolicyRecord, PolicyState, TemplateLink, Uid, now_micros,
};
use crate::policy::{self, CompiledPolicies, WriteKind};
use crate::store::{AuditSeq, Store, StoreError, Txn};
use crate::telemetry;
use crate::token::{self, VerifiedToken};
use serde_json::{Map, Value, json};
use sha2::{Digest, Sha256};
use std::future::Future;
use std::sync::{Arc, Mutex};
use tokio::time::Instant;
use tracing::Instrument as _;

/// The resource of Lockstep's own actions.
pub fn service_uid() -> Uid {
    Uid::new("Lockstep::Service", "lockstep")
}

/// `Lockstep::Action::"<name>"`.
fn lockstep_action(name: &str) -> String {
    format!("Lockstep::Action::\"{name}\"")
}

/// Who makes a call: the bearer of a token (every RPC), or the operator working on the
/// database directly through the CLI (bootstrap and recovery: no token, no policy check,
/// still validated and audited).
#[derive(Clone, Copy)]
pub enum Caller<'a> {
    Bearer(&'a str),
    Operator,
}

/// Per-call limits that come from the transport.
#[derive(Clone, Copy, Default)]
pub struct CallOptions {
    /// Nothing is committed after this instant; the call answers DEADLINE_EXCEEDED.
    pub deadline: Option<Instant>,
}

/// How many times a use case is attempted when the database reports a transient
/// conflict (serialization failure or deadlock).
const MAX_ATTEMPTS: u32 = 8;

/// What one attempt of a use case yields: the transaction to commit, and the answer to
/// give once it has committed (a denial commits its audit event and still answers
/// PERMISSION_DENIED).
type Prepared<T> = (Box<dyn Txn>, Result<T>);

/// An audit event of `kind` by the bearer of `token` (None: the operator's CLI).
fn event(kind: AuditKind, token: Option<&VerifiedToken>, detail: String) -> NewAuditEvent {
    // The call's W3C trace id, so that the audit event and the traces meet. First, before
    // any text a caller chose (an entity id may read `trace_id ...`): the first
    // `trace_id` of a detail is the server's.
    let detail = match telemetry::trace_id() {
        Some(t) if detail.is_empty() => format!("trace_id {t}"),
        Some(t) => format!("trace_id {t}; {detail}"),
        None => detail,
    };
    NewAuditEvent {
        kind,
        principal: token.map(|t| t.principal.clone()),
        token_id: token.map(|t| t.token_id.clone()).unwrap_or_default(),
        mutations: Vec::new(),
        entities: Vec::new(),
        detail,
    }
}

/// The result of evaluating and applying one mutation: a denial is a value.
enum Step {
    Applied {
        entity: EntityRecord,
        decision: Decision,
    },
    /// `reason` is audited; `explain`, when set, is also told to the caller (it depends on
    /// nothing but the request and the policy set, so it reveals no entity's existence).
    Denied {
        decision: Decision,
        reason: String,
        explain: Option<String>,
    },
}

/// How many parents an entity may have (and a mutation may name).
pub const MAX_PARENTS: usize = 1000;

pub struct Engine {
    store: Arc<dyn Store>,
    settings: Settings,
    /// The last compiled policy set, keyed by its version. Only a version number read
    /// inside the deciding transaction selects it, so a new set is used by every
    /// transaction that starts after the new set committed.
    cache: Mutex<CachedPolicies>,
    /// JWKS sources followed by this server (fetched at start, periodically, and on an
    /// unknown `kid`, at most once per `JWKS_ON_DEMAND_INTERVAL`).
    jwks: Vec<JwksSource>,
    /// When an unknown `kid` last triggered a JWKS fetch.
    jwks_on_demand: tokio::sync::Mutex<Option<Instant>>,
    /// The Envoy ext_authz route map (empty: every edge check is denied).
    edge_routes: Arc<crate::edge::RouteMap>,
    /// Set at start and when a call finds the active policy set unusable (it does not
    /// compile): the health watcher then asks `policy_problem`, NOT_SERVING until mended.
    policy_broken: std::sync::atomic::AtomicBool,
    /// Tokens already verified under a key's exact material (times and revocation are
    /// still checked on every call).
    verified: token::VerifyCache,
    /// Why the mapping cannot be served safely right now (a guard trigger dropped or
    /// disabled after start, a mapped column gone), as the server's watcher last found it:
    /// data-plane calls answer UNAVAILABLE meanwhile rather than decide unguarded.
    mapping_problem: Mutex<Option<String>>,
}

/// The policy set the current attempt of a call compiled or used (with the digest of what
/// it was compiled from), and whether the attempt's transaction committed (see `Engine::run`).
#[derive(Default)]
struct CompiledInCall {
    set: Option<(Arc<CompiledPolicies>, [u8; 32])>,
    committed: bool,
}

/// The policy cache's one entry. A set compiled inside a transaction may be one that
/// transaction alone sees (SQLite group commit: a PutPolicies earlier in the same group);
/// if that group's COMMIT fails, another set can later commit under the same version
/// number. So an entry is *confirmed* only once a call that used it has committed; an
/// unconfirmed one is used only after its digest is checked against what the transaction
/// reads, and gives way to any other set.
struct CachedPolicies {
    set: Arc<CompiledPolicies>,
    /// SHA-256 of the policy text, the schema and the template links it was compiled from.
    digest: [u8; 32],
    confirmed: bool,
}

/// What a compiled set was made from (see `CachedPolicies`).
fn policy_digest(record: &PolicyRecord, links: &[TemplateLink]) -> [u8; 32] {
    let mut h = Sha256::new();
    for part in [record.policies.as_bytes(), record.schema.as_bytes()] {
        h.update((part.len() as u64).to_le_bytes());
        h.update(part);
    }
    h.update(serde_json::to_vec(links).unwrap_or_default());
    h.finalize().into()
}

tokio::task_local! {
    static COMPILED_IN_CALL: Arc<Mutex<CompiledInCall>>;
}

fn with_compiled_in_call(f: impl FnOnce(&mut CompiledInCall)) {
    let _ = COMPILED_IN_CALL.try_with(|slot| {
        if let Ok(mut c) = slot.lock() {
            f(&mut c);
        }
    });
}

/// Each attempt of a call starts with nothing compiled.
fn forget_compiled_in_call() {
    with_compiled_in_call(|c| *c = CompiledInCall::default());
}

/// How many verified tokens are remembered.
const VERIFY_CACHE_ENTRIES: usize = 65_536;

/// Unknown `kid`s trigger at most one JWKS fetch per this interval, so they cannot be
/// used to hammer the identity provider.
const JWKS_ON_DEMAND_INTERVAL: std::time::Duration = std::time::Duration::from_secs(30);

/// What a JWKS sync changed.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct JwksSync {
    pub added: Vec<String>,
    pub updated: Vec<String>,
    pub retired: Vec<String>,
    /// Kids present in the JWKS but not taken: revoked here (revocation wins), or added
    /// from another source.
    pub kept_out: Vec<String>,
}

impl Engine {
    pub fn new(store: Arc<dyn Store>, settings: Settings) -> Self {
        Self {
            store,
            settings,
            cache: Mutex::new(CachedPolicies {
                set: Arc::new(CompiledPolicies::empty()),
                digest: [0; 32],
                confirmed: false,
            }),
            jwks: Vec::new(),
            jwks_on_demand: tokio::sync::Mutex::new(None),
            edge_routes: Arc::default(),
            verified: token::VerifyCache::new(VERIFY_CACHE_ENTRIES),
            // Unknown until checked: the watcher's first look compiles the active set.
            policy_broken: std::sync::atomic::AtomicBool::new(true),
            mapping_problem: Mutex::new(None),
        }
    }

    /// Uses this route map for Envoy ext_authz checks.
    pub fn with_edge_routes(mut self, routes: crate::edge::RouteMap) -> Self {
        self.edge_routes = Arc::new(routes);
        self
    }

    pub fn edge_routes(&self) -> Arc<crate::edge::RouteMap> {
        self.edge_routes.clone()
    }

    /// Follows these JWKS sources.
    pub fn with_jwks(mut self, sources: Vec<JwksSource>) -> Self {
        self.jwks = sources;
        self
    }

    pub fn jwks_sources(&self) -> &[JwksSource] {
        &self.jwks
    }

    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }

    /// Runs one attempt of a use case after another until it yields a transaction to
    /// commit, then commits it and gives the use case's answer. Attempts that hit a
    /// transient conflict (serialization failure, deadlock) are retried a bounded number
    /// of times. Nothing is committed after the caller's deadline: an attempt still
    /// running then is dropped (its transaction rolls back) and the commit itself is
    /// only started before the deadline. Once started, the commit runs in a task of its
    /// own and its outcome is the answer: dropping this future (a client gone, a
    /// transport timer) cannot cut a COMMIT in half or turn it into a failure answer.
    pub(super) async fn run<T, F, Fut>(&self, opts: CallOptions, attempt: F) -> Result<T>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<Prepared<T>>>,
    {
        // The policy set a call used is confirmed in the cache once its transaction has
        // committed (see `CachedPolicies`).
        let compiled = Arc::new(Mutex::new(CompiledInCall::default()));
        let answer = COMPILED_IN_CALL.scope(compiled.clone(), self.run_attempts(opts, attempt)).await;
        if let Some((set, digest)) =
            compiled.lock().ok().and_then(|mut c| if c.committed { c.set.take() } else { None })
        {
            self.remember(set, digest, true);
        }
        answer
    }

    pub(super) async fn run_attempts<T, F, Fut>(&self, opts: CallOptions, mut attempt: F) -> Result<T>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<Prepared<T>>>,
    {
        let mut tries = 0u32;
        let mut refreshed = false;
        loop {
            tries += 1;
            forget_compiled_in_call();
            // One span per attempt (exported over OTLP when asked): reading, deciding,
            // writing and the COMMIT; its outcome is recorded when known.
            let span = if telemetry::in_traced_call() {
                tracing::info_span!(
                    target: telemetry::SPANS,
                    "transaction",
                    attempt = tries,
                    outcome = tracing::field::Empty,
                )
            } else {
                tracing::Span::none()
            };
            let prepared = match opts.deadline {
                Some(d) => tokio::time::timeout_at(d, attempt().instrument(span.clone()))
                    .await
                    .unwrap_or(Err(Error::DeadlineExceeded)),
                None => attempt().instrument(span.clone()).await,
            };
            // An attempt that yields no transaction says why (its outcome is recorded once).
            let why = match &prepared {
                Ok(_) | Err(Error::Retry(_)) => None,
                Err(Error::DeadlineExceeded) => Some("deadline"),
                Err(Error::Denied(_) | Error::DeniedExplained { .. }) => Some("denied"),
                Err(Error::UnknownKey(_)) => Some("unknown key"),
                Err(_) => Some("error"),
            };
            if let Some(why) = why {
                span.record("outcome", why);
            }
            let outcome = match prepared {
                Ok((txn, answer)) => {
                    if opts.deadline.is_some_and(|d| Instant::now() >= d) {
                        span.record("outcome", "deadline");
                        return Err(Error::DeadlineExceeded);
                    }
                    let deadline = opts.deadline;
                    let committing = span.clone();
                    match tokio::spawn(async move { txn.commit_before(deadline).await }.instrument(committing)).await {
                        Ok(committed) => committed.map(|()| {
                            with_compiled_in_call(|c| c.committed = true);
                            answer
                        }),
                        Err(e) => Err(StoreError::Unknown(format!("the commit's task failed: {e}"))),
                    }
                }
                Err(Error::Retry(m)) => Err(StoreError::Retry(m)),
                Err(Error::UnknownKey(m)) => {
                    if !refreshed && self.refresh_jwks_on_demand().await {
                        refreshed = true;
                        continue;
                    }
                    return Err(Error::UnknownKey(m));
                }
                Err(e) => return Err(e),
            };
            span.record(
                "outcome",
                match &outcome {
                    Ok(_) => "committed",
                    Err(StoreError::Retry(_)) => "conflict",
                    Err(_) => "commit failed",
                },
            );
            match outcome {
                Ok(answer) => return answer,
                // A single-statement read asking to be read in a transaction: at once.
                Err(StoreError::Retry(m)) if m == crate::store::RESTART_IN_SNAPSHOT && tries < MAX_ATTEMPTS => {
                    metrics::counter!(telemetry::RETRIES, "cause" => "read_in_transaction").increment(1);
                }
                // A speculative write given up or found stale: read in full, at once.
                Err(StoreError::Retry(m))
                    if (m == crate::store::SPECULATION_ABANDONED || m == crate::store::SPECULATION_STALE)
                        && tries < MAX_ATTEMPTS =>
                {
                    metrics::counter!(telemetry::RETRIES, "cause" => "speculation").increment(1);
                }
                Err(StoreError::Retry(m)) if tries < MAX_ATTEMPTS => {
                    tracing::debug!(attempt = tries, reason = %m, "transient conflict; retrying");
                    metrics::counter!(telemetry::RETRIES, "cause" => retry_cause(&m)).increment(1);
                    let jitter = u64::from(rand::random::<u8>() % 8);
                    tokio::time::sleep(std::time::Duration::from_millis(u64::from(tries) * 2 + jitter)).await;
                }
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// Authenticates a bearer inside `txn`: the key (not revoked, not retired), the
    /// signature and claims, the subject's and the token's revocation. Also returns the
    /// policy state, read in the same statement as the revocations.
    pub(super) async fn authenticate(
        &self,
        txn: &mut dyn Txn,
        parsed: &token::ParsedToken,
        now: i64,
    ) -> Result<(Arc<VerifiedToken>, PolicyState)> {
        self.authenticate_hinted(txn, parsed, now, self.verified.hint(parsed)).await
    }

    /// `authenticate` with the verification cache's hint (`VerifyCache::hint`) already
    /// looked up by the caller, which used it to announce a prefetch.
    pub(super) async fn authenticate_hinted(
        &self,
        txn: &mut dyn Txn,
        parsed: &token::ParsedToken,
        now: i64,
        hint: Option<(Uid, String)>,
    ) -> Result<(Arc<VerifiedToken>, PolicyState)> {
        let now_secs = now / 1_000_000;
        let unknown = || Error::UnknownKey("token names an unknown key (`kid`)".into());
        // A token verified before names its subject already: its key and the call state in
        // one round trip (the hint is checked by the verification below).
        let (key, early) = match &hint {
            Some((principal, token_id)) => {
                let (key, state) =
                    txn.key_and_call_state(&parsed.kid, principal, token_id).await?.ok_or_else(unknown)?;
                (key, Some(state))
            }
            None => (txn.key(&parsed.kid).await?.ok_or_else(unknown)?, None),
        };
        if key.revoked {
            return Err(Error::Unauthenticated(format!("the token's signing key `{}` has been revoked", key.kid)));
        }
        if key.retired {
            return Err(Error::Unauthenticated(format!(
                "the token's key `{}` is no longer published by its JWKS",
                key.kid
            )));
        }
        let token = token::verify(parsed, &key, now_secs, &self.settings, &self.verified)?;
        // One read after the key: on PostgreSQL it first share-locks the subject, which a
        // logout or RevokeSubject locks exclusively, so the revocations are read after any
        // such revocation that got there first has committed.
        let state = match (early, hint) {
            (Some(state), Some((principal, token_id)))
                if principal == token.principal && token_id == token.token_id =>
            {
                state
            }
            _ => txn.revocations_and_policy(&token.principal, &token.token_id).await?,
        };
        if let Some(at) = state.subject_revoked_at {
            // A token without `iat` cannot prove it was issued after the revocation.
            if token.iat.is_none_or(|iat| iat <= at) {
                return Err(Error::Unauthenticated(format!(
                    "every token of {} issued at or before {at} (unix seconds) has been revoked",
                    token.principal
                )));
            }
        }
        if state.token_revoked {
            return Err(Error::Unauthenticated("token has been revoked".into()));
        }
        telemetry::note(|f| f.principal = Some(token.principal.to_string()));
        Ok((token, state.policy))
    }

    /// What keeps the store's mapping of entity types onto the application's tables from
    /// being served: the store's findings (tables, columns, triggers) and the active
    /// schema's disagreements with it. Empty: all is well (or nothing is mapped).
    pub async fn mapping_problems(&self) -> Result<Vec<String>> {
        let mapping = self.store.mapping();
        if mapping.is_empty() {
            return Ok(Vec::new());
        }
        let mut problems = self.store.mapping_problems().await?;
        if let Some(active) = self.get_policies(Caller::Operator, CallOptions::default()).await? {
            problems.extend(policy::mapping_problems(&active.schema, &mapping));
        }
        Ok(problems)
    }

    /// Whether the watcher last found the mapping unsound.
    pub fn mapping_problem_now(&self) -> bool {
        self.mapping_problem.lock().map(|p| p.is_some()).unwrap_or(false)
    }

    /// Records what the watcher found about the mapping (None: sound).
    pub fn set_mapping_problem(&self, problem: Option<String>) {
        if let Ok(mut p) = self.mapping_problem.lock() {
            *p = problem;
        }
    }

    /// Fails closed while the mapping is known to be unsound (see `mapping_problem`).
    pub(super) fn require_sound_mapping(&self) -> Result<()> {
        match self.mapping_problem.lock().ok().and_then(|p| p.clone()) {
            None => Ok(()),
            Some(why) => Err(Error::Unavailable(format!(
                "the mapping of entity types onto the application's tables cannot be served safely ({why}); \
                 nothing was committed"
            ))),
        }
    }

    /// Why the active policy set cannot be used (it does not compile, or its links do not
    /// fit), if so: the health watcher reports it. None when it compiles or the database
    /// cannot be asked (the watcher checks the database itself).
    ///
    /// Asks the database only while a call has met such a problem (`policy_broken`), so a
    /// healthy server's watcher costs nothing; once the set compiles again the flag clears.
    /// The active policy version, as the database says now (for the metric).
    pub async fn active_policy_version(&self) -> Result<Option<u64>> {
        self.run(CallOptions::default(), || async {
            let mut txn = self.store.read().await?;
            let state = txn.policy_state().await?;
            Ok((txn, Ok(state.version)))
        })
        .await
    }

    pub async fn policy_problem(&self) -> Option<String> {
        if !self.policy_broken.load(std::sync::atomic::Ordering::Relaxed) {
            return None;
        }
        let checked = self
            .run(CallOptions::default(), || async {
                let mut txn = self.store.read().await?;
                let compiled = self.policies_in(&mut *txn).await.map(|_| ());
                Ok((txn, compiled))
            })
            .await;
        match checked {
            Err(Error::Internal(m)) => Some(m),
            Ok(()) => {
                self.policy_broken.store(false, std::sync::atomic::Ordering::Relaxed);
                None
            }
            Err(_) => None,
        }
    }

    /// The active policy set with its template links, selected by the policy version and
    /// links generation read in `txn`; compiled once per (version, generation).
    pub(super) async fn policies_in(&self, txn: &mut dyn Txn) -> Result<Arc<CompiledPolicies>> {
        let state = txn.policy_state().await?;
        self.policies_at(txn, state).await
    }

    /// The policy set selected by `state` (read in `txn`), compiled once per state.
    pub(super) async fn policies_at(&self, txn: &mut dyn Txn, state: PolicyState) -> Result<Arc<CompiledPolicies>> {
        let Some(version) = state.version else {
            return Ok(Arc::new(CompiledPolicies::empty()));
        };
        let hit = {
            let cached = self.cache.lock().map_err(|_| Error::Internal("policy cache poisoned".into()))?;
            (cached.set.version == version && cached.set.links == state.links)
                .then(|| (cached.set.clone(), cached.digest, cached.confirmed))
        };
        if let Some((set, _, true)) = hit {
            return Ok(set);
        }
        let record = txn
            .policies(version)
            .await?
            .ok_or_else(|| Error::Internal(format!("policy version {version} vanished")))?;
        let links = txn.policy_links().await?;
        let digest = policy_digest(&record, &links);
        if let Some((set, d, false)) = hit
            && d == digest
        {
            with_compiled_in_call(|c| c.set = Some((set.clone(), digest)));
            return Ok(set);
        }
        let broken = |m: String| {
            self.policy_broken.store(true, std::sync::atomic::Ordering::Relaxed);
            Error::Internal(m)
        };
        let base = policy::compile(version, &record.policies, &record.schema)
            .map_err(|e| broken(format!("stored policy version {version} does not compile: {e}")))?;
        let compiled = Arc::new(
            base.with_links(&links, state.links)
                .map_err(|e| broken(format!("stored template links do not fit version {version}: {e}")))?,
        );
        // Cached unconfirmed now (later members of the same group reuse it after checking
        // its digest), confirmed by `run` once this call's transaction has committed.
        self.remember(compiled.clone(), digest, false);
        with_compiled_in_call(|c| c.set = Some((compiled.clone(), digest)));
        Ok(compiled)
    }

    /// Puts a set in the cache: an unconfirmed entry gives way to any set; a confirmed one
    /// to a newer (version, links), or to its own confirmation.
    pub(super) fn remember(&self, set: Arc<CompiledPolicies>, digest: [u8; 32], confirmed: bool) {
        if let Ok(mut cached) = self.cache.lock() {
            let key = (set.version, set.links);
            let cached_key = (cached.set.version, cached.set.links);
            let same = key == cached_key && cached.digest == digest;
            if !cached.confirmed || key > cached_key || same {
                let confirmed = confirmed || (same && cached.confirmed);
                *cached = CachedPolicies { set, digest, confirmed };
            }
        }
    }

    /// Authenticates a bearer and requires `Lockstep::Action::"<action>"` on `resource`;
    /// the operator passes. Returns the bearer's token.
    pub(super) async fn admit(
        &self,
        txn: &mut dyn Txn,
        caller: Caller<'_>,
        action: &str,
        resource: &Uid,
    ) -> Result<Option<Arc<VerifiedToken>>> {
        let Caller::Bearer(raw) = caller else { return Ok(None) };
        let parsed = token::parse(raw, &self.settings)?;
        let (token, state) = self.authenticate(txn, &parsed, now_micros()).await?;
        let policies = self.policies_at(txn, state).await?;
        self.require(txn, &policies, &token, action, resource).await?;
        Ok(Some(token))
    }

    /// Evaluates `Lockstep::Action::"<action>"` on `resource`; a denial becomes PERMISSION_DENIED.
    pub(super) async fn require(
        &self,
        txn: &mut dyn Txn,
        policies: &CompiledPolicies,
        token: &VerifiedToken,
        action: &str,
        resource: &Uid,
    ) -> Result<()> {
        let action_uid = policy::action_uid(&lockstep_action(action)).map_err(Error::Internal)?;
        let loaded = txn.entities_with_ancestors(&[token.principal.clone(), resource.clone()]).await?;
        let ctx = build_context(policies, &action_uid, &Map::new(), token, None, &policy::SERVER_CONTEXT)?;
        let decision = policies
            .evaluate(&token.principal, &action_uid, resource, ctx, &loaded.iter().collect::<Vec<_>>())
            .map_err(Error::Internal)?;
        if decision.allowed {
            Ok(())
        } else {
            Err(Error::Denied(format!(
                "{} may not perform Lockstep::Action::\"{action}\" on {resource}",
                token.principal
            )))
        }
    }

    pub(super) fn check_uid(&self, uid: &Uid) -> std::result::Result<(), String> {
        if uid.ty.is_empty() || uid.id.is_empty() {
            return Err("entity type and id must not be empty".into());
        }
        if uid.ty.contains('\0') || uid.id.contains('\0') {
            return Err("entity type and id must not contain NUL".into());
        }
        if uid.ty.len() > 256 || uid.id.len() > self.settings.max_id_bytes {
            return Err(format!(
                "entity type longer than 256 bytes or id longer than {} bytes",
                self.settings.max_id_bytes
            ));
        }
        if uid.ty == "Action" || uid.ty.ends_with("::Action") {
            return Err(format!("{uid} is an action: action entities come from the schema, not from entity data"));
        }
        policy::entity_uid(uid).map(|_| ())
    }

    pub(super) fn check_value_sizes(&self, m: &Attributes, what: &str) -> Result<()> {
        let len = serde_json::to_vec(m).map(|v| v.len()).unwrap_or(usize::MAX);
        if len > self.settings.max_attributes_bytes {
            return Err(Error::InvalidArgument(format!(
                "{what} is {len} bytes as JSON; at most {}",
                self.settings.max_attributes_bytes
            )));
        }
        Ok(())
    }

    pub(super) fn check_attributes(&self, e: &EntityRecord) -> Result<()> {
        self.check_value_sizes(&e.attributes, "the entity's attributes")?;
        self.check_value_sizes(&e.tags, "the entity's tags")?;
        if e.parents.len() > MAX_PARENTS {
            return Err(Error::InvalidArgument(format!("an entity may have at most {MAX_PARENTS} parents")));
        }
        for (what, map) in [("attributes", &e.attributes), ("tags", &e.tags)] {
            if let Some(at) = map.iter().find_map(|(k, v)| mixed_escape(v, k, 0)) {
                return Err(Error::InvalidArgument(format!(
                    "{what}: `{at}` mixes `__entity` or `__extn` with other keys; an entity reference is \
                     {{\"__entity\": {{\"type\": …, \"id\": …}}}} (or {{\"type\", \"id\"}}) alone"
                )));
            }
        }
        Ok(())
    }
}

/// Text the databases cannot all store (PostgreSQL refuses NUL) is refused up front, the
/// same on every backend.
fn refuse_nul(what: &str, values: &[&str]) -> Result<()> {
    if values.iter().any(|v| v.contains('\0')) {
        return Err(Error::InvalidArgument(format!("{what} must not contain NUL")));
    }
    Ok(())
}

/// Attribute values as an RPC would carry them (see `grpc::convert`): nested at most
/// `max_depth` deep, no `null`, numbers integers within ±2^53. Without recursion.
fn check_values(attributes: &Attributes, max_depth: usize) -> std::result::Result<(), String> {
    const MAX_SAFE_INTEGER: i64 = 9_007_199_254_740_991;
    let mut stack: Vec<(&str, &Value, usize)> = attributes.iter().map(|(k, v)| (k.as_str(), v, 1)).collect();
    while let Some((name, v, depth)) = stack.pop() {
        if depth > max_depth {
            return Err(format!("attribute `{}` nests deeper than {max_depth} levels", short(name)));
        }
        match v {
            Value::Null => return Err(format!("attribute `{}` is null; Cedar has no null", short(name))),
            Value::Number(n) if n.as_i64().is_none_or(|n| n.abs() > MAX_SAFE_INTEGER) => {
                return Err(format!("attribute `{}` is {n}: numbers must be integers within ±2^53", short(name)));
            }
            Value::Array(a) => stack.extend(a.iter().map(|x| (name, x, depth + 1))),
            Value::Object(o) => stack.extend(o.values().map(|x| (name, x, depth + 1))),
            _ => {}
        }
    }
    Ok(())
}

/// Refuses parents that would make `uid` its own ancestor: `ancestors` are the parents'
/// stored entities and all their ancestors (an entity that lists `uid` as a parent, even
/// before `uid` exists, closes the cycle too).
fn refuse_cycle(uid: &Uid, parents: &[Uid], ancestors: &[&EntityRecord]) -> Result<()> {
    if parents.contains(uid) || ancestors.iter().any(|a| a.uid == *uid || a.parents.contains(uid)) {
        return Err(Error::InvalidArgument(format!(
            "these parents would make {uid} its own ancestor (a parent cycle); nothing was committed"
        )));
    }
    Ok(())
}

/// Caller text quoted in messages and audit details, cut to a short prefix (the full
/// request is in the event's mutations already; a detail never repeats it at length).
fn short(s: &str) -> String {
    cut(s, 128)
}

/// `s` cut to at most `max` characters (marked with `…` when cut).
fn cut(s: &str, max: usize) -> String {
    match s.char_indices().nth(max) {
        None => s.to_owned(),
        Some((i, _)) => format!("{}…", &s[..i]),
    }
}

/// An identifier a caller names (kid, link id): 1 to 256 bytes.
fn bounded_id(what: &str, v: &str) -> Result<()> {
    if v.is_empty() || v.len() > 256 {
        return Err(Error::InvalidArgument(format!("{what} must be 1 to 256 bytes")));
    }
    Ok(())
}

/// `(CLI)` marks what the operator did on the database directly.
fn operator_note(caller: Caller<'_>, detail: String) -> String {
    match caller {
        Caller::Operator => format!("{detail} (cli)"),
        Caller::Bearer(_) => detail,
    }
}

fn describe_link(l: &TemplateLink) -> String {
    let p = l.principal.as_ref().map(|u| format!(" principal {u}")).unwrap_or_default();
    let r = l.resource.as_ref().map(|u| format!(" resource {u}")).unwrap_or_default();
    format!("{p}{r}")
}

/// A revocation's metric and its line in the log (INFO, target `lockstep::security`).
fn security_event(audit_seq: u64, kind: &'static str, what: &'static str) {
    metrics::counter!(telemetry::REVOCATIONS, "kind" => kind).increment(1);
    tracing::info!(target: "lockstep::security", audit_seq, kind, "{what}");
}

/// A decision's metric and its place in the call's log line.
fn note_decision(allowed: bool, call: &'static str) {
    let decision = if allowed { "allow" } else { "deny" };
    metrics::counter!(telemetry::DECISIONS, "decision" => decision, "call" => call).increment(1);
    telemetry::note(|f| f.decision = Some(decision));
}

/// The cause label of a retried transaction, from the store's message.
fn retry_cause(message: &str) -> &'static str {
    let m = message.to_ascii_lowercase();
    if m.contains("deadlock") {
        "deadlock"
    } else if m.contains("serializ") {
        "serialization"
    } else if m.contains("busy") || m.contains("locked") {
        "busy"
    } else {
        "other"
    }
}

fn dedup(v: Vec<Uid>) -> Vec<Uid> {
    let mut out: Vec<Uid> = Vec::with_capacity(v.len());
    for u in v {
        if !out.contains(&u) {
            out.push(u);
        }
    }
    out
}

/// RFC 7386 JSON merge patch: objects merge key by key, `null` removes, anything else
/// replaces.
pub fn apply_merge_patch(target: &mut Attributes, patch: &Attributes) {
    for (k, v) in patch {
        match v {
            Value::Null => {
                target.remove(k);
            }
            // An entity reference or an extension value (`{"__entity": …}`, `{"__extn": …}`,
            // or `{"type", "id"}` in place of one) is one value: replaced whole, never merged
            // field by field (which would leave the old reference beside the new one).
            Value::Object(p) if is_escape(p) || target.get(k).and_then(Value::as_object).is_some_and(is_escape) => {
                let was_entity = target.get(k).and_then(Value::as_object).is_some_and(|o| o.contains_key("__entity"));
                let short_uid = p.len() == 2
                    && p.get("type").is_some_and(Value::is_string)
                    && p.get("id").is_some_and(Value::is_string);
                // `{"type", "id"}` in place of an entity reference is that reference.
                let value = if was_entity && short_uid { json!({ "__entity": v }) } else { v.clone() };
                target.insert(k.clone(), value);
            }
            Value::Object(p) => {
                let entry = target.entry(k.clone()).or_insert_with(|| Value::Object(Map::new()));
                if !entry.is_object() {
                    *entry = Value::Object(Map::new());
                }
                if let Value::Object(t) = entry {
                    apply_merge_patch(t, p);
                }
            }
            other => {
                target.insert(k.clone(), other.clone());
            }
        }
    }
}

/// Whether an object is a Cedar JSON escape (`__entity`, `__extn`).
fn is_escape(o: &Map<String, Value>) -> bool {
    o.contains_key("__entity") || o.contains_key("__extn")
}

/// The path of the first object under `path` that mixes a Cedar JSON escape with other
/// keys (Cedar would read the escape and drop the rest, so the value would not say what it
/// shows).
fn mixed_escape(v: &Value, path: &str, depth: usize) -> Option<String> {
    mixed_below(v, depth).map(|p| format!("{path}{p}"))
}

/// `mixed_escape`'s search; the path is built only for what is found.
fn mixed_below(v: &Value, depth: usize) -> Option<String> {
    match v {
        Value::Object(o) if is_escape(o) && o.len() > 1 => Some(String::new()),
        Value::Object(o) if depth < 64 => {
            o.iter().find_map(|(k, x)| mixed_below(x, depth + 1).map(|p| format!(".{k}{p}")))
        }
        Value::Array(a) if depth < 64 => {
            a.iter().enumerate().find_map(|(i, x)| mixed_below(x, depth + 1).map(|p| format!("[{i}]{p}")))
        }
        _ => None,
    }
}

/// The server-set `change` record.
fn change_context(kind: &str, changed: Vec<String>, proposed: &Attributes, added: &[Uid], removed: &[Uid]) -> Value {
    json!({
        "kind": kind,
        "changed_attributes": changed,
        "proposed": proposed,
        "added_parents": added.iter().map(Uid::to_entity_ref_json).collect::<Vec<_>>(),
        "removed_parents": removed.iter().map(Uid::to_entity_ref_json).collect::<Vec<_>>(),
    })
}

/// The caller's context plus the server-set `token` (and `change`): the server's values
/// replace any the caller sent under those names. With a schema it is read through the
/// action's context type (`server`: the keys Lockstep sets, see `CompiledPolicies::context`).
fn build_context(
    policies: &CompiledPolicies,
    action: &cedar_policy::EntityUid,
    caller: &Attributes,
    token: &VerifiedToken,
    change: Option<Value>,
    server: &[&str],
) -> Result<cedar_policy::Context> {
    let mut ctx = caller.clone();
    ctx.insert(
        "token".into(),
        json!({
            "sub": token.sub,
            "iss": token.iss,
            "aud": token.aud,
            "jti": token.token_id,
            "iat": token.iat.unwrap_or(0),
            "exp": token.exp,
            "scopes": token.scopes,
            "claims": token.claims,
        }),
    );
    match change {
        Some(c) => {
            ctx.insert("change".into(), c);
        }
        None => {
            ctx.remove("change");
        }
    }
    policies.context(action, ctx, server).map_err(Error::InvalidArgument)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merge_patch_follows_rfc7386() {
        let mut t: Attributes = serde_json::from_value(json!({"a": "b", "c": {"d": "e", "f": "g"}})).unwrap();
        let p: Attributes = serde_json::from_value(json!({"a": "z", "c": {"f": null}, "n": [1]})).unwrap();
        apply_merge_patch(&mut t, &p);
        assert_eq!(Value::Object(t), json!({"a": "z", "c": {"d": "e"}, "n": [1]}));
    }

    #[test]
    fn an_entity_reference_is_replaced_whole() {
        let mut t: Attributes =
            serde_json::from_value(json!({"owner": {"__entity": {"type": "User", "id": "alice"}}})).unwrap();
        let p: Attributes = serde_json::from_value(json!({"owner": {"type": "User", "id": "bob"}})).unwrap();
        apply_merge_patch(&mut t, &p);
        assert_eq!(Value::Object(t.clone()), json!({"owner": {"__entity": {"type": "User", "id": "bob"}}}));
        let p: Attributes =
            serde_json::from_value(json!({"owner": {"__entity": {"type": "User", "id": "carol"}}})).unwrap();
        apply_merge_patch(&mut t, &p);
        assert_eq!(Value::Object(t), json!({"owner": {"__entity": {"type": "User", "id": "carol"}}}));
        let mixed = json!({"a": [{"x": {"__entity": {"type": "User", "id": "a"}, "id": "b"}}]});
        assert_eq!(mixed_escape(&mixed, "attrs", 0).as_deref(), Some("attrs.a[0].x"));
        assert_eq!(mixed_escape(&json!({"__entity": {"type": "User", "id": "a"}}), "o", 0), None);
    }
}
