//! The use cases. Each one opens ONE transaction, reads every piece of authorization
//! state it relies on through it (key, token and subject revocation, policies,
//! entities), decides, writes, audits and commits — or commits nothing.

use crate::config::Settings;
use crate::error::{Error, Result};
use crate::jwks::{self, JwksSource};
use crate::model::{
    Attributes, AuditEvent, AuditKind, Change, CommitRequest, CommitResult, Decision, EntityRecord, KeyRecord,
    Mutation, NewAuditEvent, PolicyRecord, PolicyState, TemplateLink, Uid, now_micros,
};
use crate::policy::{self, CompiledPolicies, WriteKind};
use crate::store::{Store, StoreError, Txn};
use crate::token::{self, VerifiedToken};
use serde_json::{Map, Value, json};
use sha2::{Digest, Sha256};
use std::future::Future;
use std::sync::{Arc, Mutex};
use tokio::time::Instant;

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

    // ---------------------------------------------------------------------------------
    // AuthorizeAndCommit
    // ---------------------------------------------------------------------------------

    /// Verifies the token, then in one write transaction: re-checks key, token and
    /// subject revocation, replays a committed idempotency key, and evaluates and applies
    /// each mutation in order against the state the previous ones left; then audits and
    /// commits. A denial rolls back every mutation and commits only its audit event.
    pub async fn authorize_and_commit(
        &self,
        raw: &str,
        req: &CommitRequest,
        opts: CallOptions,
    ) -> Result<CommitResult> {
        self.check_commit_request(req)?;
        let parsed = token::parse(raw, &self.settings)?;
        // Only a request with an idempotency key needs its hash (kept to tell a repeat from
        // a different request under the same key).
        let hash = if req.idempotency_key.is_empty() {
            Vec::new()
        } else {
            Sha256::digest(serde_json::to_vec(req).map_err(|e| Error::Internal(e.to_string()))?).to_vec()
        };
        self.run(opts, || self.authorize_and_commit_once(&parsed, req, &hash)).await
    }

    async fn authorize_and_commit_once(
        &self,
        parsed: &token::ParsedToken,
        req: &CommitRequest,
        request_hash: &[u8],
    ) -> Result<Prepared<CommitResult>> {
        let mut txn = self.store.write().await?;
        let now = now_micros();
        let (token, policy_state) = self.authenticate(&mut *txn, parsed, now).await?;

        // Everything after this point is undone by a denial, except the denial's audit event.
        txn.savepoint().await?;
        let key = req.idempotency_key.as_str();
        if !key.is_empty() {
            // Claiming the key waits for a concurrent holder of the same key to finish.
            if let Some((hash, response)) = txn.claim_idempotency_key(&token.principal, key, request_hash, now).await? {
                if hash != request_hash {
                    return Err(Error::InvalidArgument(
                        "idempotency key already used for a different request by this subject".into(),
                    ));
                }
                let first =
                    serde_json::from_str(&response).map_err(|e| Error::Internal(format!("stored response: {e}")))?;
                return Ok((txn, Ok(first)));
            }
        }

        let policies = self.policies_at(&mut *txn, policy_state).await?;
        let mut entities = Vec::with_capacity(req.mutations.len());
        let mut determining: Vec<String> = Vec::new();
        for (i, m) in req.mutations.iter().enumerate() {
            match self.apply(&mut *txn, &policies, &token, &req.context, m).await? {
                Step::Applied { entity, decision } => {
                    for p in decision.determining_policies {
                        if !determining.contains(&p) {
                            determining.push(p);
                        }
                    }
                    entities.push(entity);
                }
                Step::Denied { decision, reason, explain } => {
                    txn.rollback_to_savepoint().await?;
                    let what = format!(
                        "mutation {i} ({} `{}` on {})",
                        m.change.kind(),
                        short(&m.action),
                        short(&m.resource.to_string())
                    );
                    let errors = if decision.errors.is_empty() {
                        String::new()
                    } else {
                        format!("; errors: {}", cut(&decision.errors.join("; "), 1024))
                    };
                    let detail = format!(
                        "{what} denied: {reason}; determining policies: [{}]{errors}",
                        decision.determining_policies.join(", ")
                    );
                    let deny = event(AuditKind::Deny, Some(&token), detail).mutations(req.mutations.clone());
                    txn.append_audit(&deny, now).await?;
                    let message = match explain {
                        Some(why) => format!("{what} is not permitted: {why}; nothing was committed"),
                        None => format!("{what} is not permitted, or its entity does not exist; nothing was committed"),
                    };
                    let answer = if self.settings.reveal_determining_policies {
                        Error::DeniedExplained { message, mutation: i, policies: decision.determining_policies }
                    } else {
                        Error::Denied(message)
                    };
                    return Ok((txn, Err(answer)));
                }
            }
        }
        let event = event(AuditKind::Commit, Some(&token), String::new())
            .mutations(req.mutations.clone())
            .entities(entities.clone());
        let audit_seq = txn.append_audit(&event, now).await?;
        let result = CommitResult { entities, audit_seq, determining_policies: determining };
        if !key.is_empty() {
            let response = serde_json::to_string(&result).map_err(|e| Error::Internal(e.to_string()))?;
            txn.complete_idempotency_key(&token.principal, key, &response).await?;
        }
        Ok((txn, Ok(result)))
    }

    /// Evaluates one mutation against the current state (in `txn`) and applies it when
    /// allowed. Errors (ABORTED, ALREADY_EXISTS, INVALID_ARGUMENT) abandon the request.
    async fn apply(
        &self,
        txn: &mut dyn Txn,
        policies: &CompiledPolicies,
        token: &VerifiedToken,
        caller_context: &Attributes,
        m: &Mutation,
    ) -> Result<Step> {
        let action = policy::action_uid(&m.action).map_err(Error::InvalidArgument)?;
        let kind = match &m.change {
            Change::Create { .. } => WriteKind::Create,
            Change::Update { .. } => WriteKind::Update,
            Change::Delete => WriteKind::Delete,
        };
        let nothing = || Decision { allowed: false, determining_policies: Vec::new(), errors: Vec::new() };
        if !policies.may_write(&action, kind) {
            let why = format!(
                "action `{}` is not declared to {} entities: the schema must place it in {}",
                short(&m.action),
                m.change.kind(),
                kind.group_name()
            );
            return Ok(Step::Denied { decision: nothing(), reason: why.clone(), explain: Some(why) });
        }
        let current = txn.entity(&m.resource).await?;
        let missing = || Step::Denied { decision: nothing(), reason: "entity does not exist".into(), explain: None };

        // The Cedar resource (proposed for create, current otherwise), the entity as it
        // will be after the change, and the server-set `change` context.
        let (resource, after, change) = match &m.change {
            Change::Create { attributes, parents, tags } => {
                let proposed = EntityRecord {
                    uid: m.resource.clone(),
                    attributes: attributes.clone(),
                    parents: dedup(parents.clone()),
                    version: 1,
                    tags: tags.clone(),
                };
                let change =
                    change_context("create", attributes.keys().cloned().collect(), attributes, &proposed.parents, &[]);
                (proposed.clone(), proposed, change)
            }
            Change::Update { merge_patch, add_parents, remove_parents, tags_merge_patch } => {
                let Some(cur) = current.clone() else { return Ok(missing()) };
                let mut attributes = cur.attributes.clone();
                apply_merge_patch(&mut attributes, merge_patch);
                let mut tags = cur.tags.clone();
                apply_merge_patch(&mut tags, tags_merge_patch);
                let removed: Vec<Uid> =
                    dedup(remove_parents.iter().filter(|p| cur.parents.contains(p)).cloned().collect());
                let mut parents: Vec<Uid> =
                    cur.parents.iter().filter(|p| !remove_parents.contains(p)).cloned().collect();
                let added: Vec<Uid> = dedup(add_parents.iter().filter(|p| !parents.contains(p)).cloned().collect());
                parents.extend(added.iter().cloned());
                let mut changed: Vec<String> = attributes
                    .iter()
                    .filter(|(k, v)| cur.attributes.get(*k) != Some(*v))
                    .map(|(k, _)| k.clone())
                    .chain(cur.attributes.keys().filter(|k| !attributes.contains_key(*k)).cloned())
                    .collect();
                changed.sort();
                let after = EntityRecord { uid: cur.uid.clone(), attributes, parents, version: cur.version + 1, tags };
                let change = change_context("update", changed, &after.attributes, &added, &removed);
                (cur, after, change)
            }
            Change::Delete => {
                let Some(cur) = current.clone() else { return Ok(missing()) };
                let change =
                    change_context("delete", cur.attributes.keys().cloned().collect(), &Map::new(), &[], &cur.parents);
                let after = EntityRecord { version: cur.version + 1, ..cur.clone() };
                (cur, after, change)
            }
        };
        if !matches!(m.change, Change::Delete) {
            self.check_attributes(&after)?;
            policies.check_entity(&after).map_err(Error::InvalidArgument)?;
        }

        let mut wanted = vec![token.principal.clone()];
        wanted.extend(resource.parents.iter().cloned());
        let loaded = txn.entities_with_ancestors(&wanted).await?;
        if matches!(m.change, Change::Create { .. }) && !resource.parents.is_empty() {
            // The proposed entity takes part in the evaluation: a cycle must be refused first.
            let ancestors = txn.entities_with_ancestors(&resource.parents).await?;
            refuse_cycle(&resource.uid, &resource.parents, &ancestors.iter().collect::<Vec<_>>())?;
        }
        let mut all: Vec<&EntityRecord> = loaded.iter().collect();
        all.push(&resource);
        let ctx = build_context(policies, &action, caller_context, token, Some(change), &policy::SERVER_CONTEXT)?;
        let decision = policies.evaluate(&token.principal, &action, &m.resource, ctx, &all).map_err(Error::Internal)?;
        if !decision.allowed {
            let reason = "no policy permits it, or a policy forbids it".into();
            return Ok(Step::Denied { decision, reason, explain: None });
        }

        let exists = || Error::AlreadyExists(format!("entity {} already exists; nothing was committed", m.resource));
        match (&m.change, &current) {
            (Change::Create { .. }, Some(_)) => return Err(exists()),
            (Change::Create { .. }, None) => {
                if let Some(v) = m.if_version.filter(|v| *v != 0) {
                    return Err(Error::Aborted(format!(
                        "if_version {v} failed: {} does not exist yet (version 0); nothing was committed",
                        m.resource
                    )));
                }
                match txn.insert_entity(&after).await {
                    // A concurrent create of the same entity committed first.
                    Err(StoreError::Conflict(_)) => return Err(exists()),
                    other => other?,
                }
            }
            (_, Some(cur)) => {
                if let Some(v) = m.if_version.filter(|v| *v != cur.version) {
                    return Err(Error::Aborted(format!(
                        "if_version {v} failed: {} is at version {}; nothing was committed",
                        m.resource, cur.version
                    )));
                }
                if matches!(m.change, Change::Delete) {
                    txn.delete_entity(&m.resource).await?;
                } else {
                    let added: Vec<Uid> = after.parents.iter().filter(|p| !cur.parents.contains(p)).cloned().collect();
                    if !added.is_empty() {
                        let ancestors = txn.entities_with_ancestors(&added).await?;
                        refuse_cycle(&after.uid, &added, &ancestors.iter().collect::<Vec<_>>())?;
                    }
                    txn.update_entity(&after).await?;
                }
            }
            (_, None) => return Ok(missing()),
        }
        Ok(Step::Applied { entity: after, decision })
    }

    // ---------------------------------------------------------------------------------
    // Decisions and reads
    // ---------------------------------------------------------------------------------

    /// A decision only, against one read snapshot of the latest committed state.
    pub async fn authorize(
        &self,
        raw: &str,
        action: &str,
        resource: &Uid,
        context: &Attributes,
        opts: CallOptions,
    ) -> Result<Decision> {
        let action = policy::action_uid(action).map_err(Error::InvalidArgument)?;
        self.check_uid(resource).map_err(|e| Error::InvalidArgument(format!("resource: {e}")))?;
        self.check_value_sizes(context, "context")?;
        let parsed = token::parse(raw, &self.settings)?;
        self.run(opts, || async {
            let mut txn = self.store.read().await?;
            let (token, state) = self.authenticate(&mut *txn, &parsed, now_micros()).await?;
            let policies = self.policies_at(&mut *txn, state).await?;
            let loaded = txn.entities_with_ancestors(&[token.principal.clone(), resource.clone()]).await?;
            let ctx = build_context(&policies, &action, context, &token, None, &policy::SERVER_CONTEXT)?;
            let decision = policies
                .evaluate(&token.principal, &action, resource, ctx, &loaded.iter().collect::<Vec<_>>())
                .map_err(Error::Internal);
            Ok((txn, decision))
        })
        .await
    }

    /// An authorized read of one entity; denied and missing are the same answer.
    pub async fn get_entity(&self, raw: &str, uid: &Uid, action: &str, opts: CallOptions) -> Result<EntityRecord> {
        let action = policy::action_uid(action).map_err(Error::InvalidArgument)?;
        self.check_uid(uid).map_err(|e| Error::InvalidArgument(format!("uid: {e}")))?;
        let parsed = token::parse(raw, &self.settings)?;
        self.run(opts, || async {
            let mut txn = self.store.read().await?;
            let (token, state) = self.authenticate(&mut *txn, &parsed, now_micros()).await?;
            let policies = self.policies_at(&mut *txn, state).await?;
            let denied = || Error::Denied(format!("reading {uid} is not permitted, or it does not exist"));
            let Some(entity) = txn.entity(uid).await? else { return Err(denied()) };
            let mut wanted = vec![token.principal.clone()];
            wanted.extend(entity.parents.iter().cloned());
            let loaded = txn.entities_with_ancestors(&wanted).await?;
            let mut all: Vec<&EntityRecord> = loaded.iter().collect();
            all.push(&entity);
            let ctx = build_context(&policies, &action, &Map::new(), &token, None, &policy::SERVER_CONTEXT)?;
            let decision = policies.evaluate(&token.principal, &action, uid, ctx, &all).map_err(Error::Internal)?;
            let answer = if decision.allowed { Ok(entity) } else { Err(denied()) };
            Ok((txn, answer))
        })
        .await
    }

    /// A page of the audit log (Lockstep::Action::"ReadAudit").
    pub async fn list_audit(
        &self,
        caller: Caller<'_>,
        after_seq: u64,
        limit: u32,
        opts: CallOptions,
    ) -> Result<Vec<AuditEvent>> {
        let limit = match limit {
            0 => self.settings.default_audit_page,
            n => n.min(self.settings.max_audit_page),
        };
        self.run(opts, || async {
            let mut txn = self.store.read().await?;
            self.admit(&mut *txn, caller, "ReadAudit", &service_uid()).await?;
            let events = txn.audit_events(after_seq, limit).await?;
            Ok((txn, Ok(events)))
        })
        .await
    }

    /// A decision at the edge (Envoy ext_authz): the token verified and revocation-checked
    /// like any call, the Cedar request from the route map, the decision audited
    /// (KIND_EDGE_DECISION) in the same transaction that read the state. A bad token is
    /// `Err(Unauthenticated)`; a denial is `Ok` with `allowed: false`, and so is a request
    /// the route map refused or did not match (`target` is `Err(reason)`) or whose
    /// resource is not a valid entity uid. The audit detail holds bounded excerpts only.
    pub async fn edge_check(
        &self,
        raw: &str,
        method: &str,
        path: &str,
        target: std::result::Result<&crate::edge::EdgeRequest, &str>,
        opts: CallOptions,
    ) -> Result<(Decision, Uid)> {
        use crate::edge::excerpt;
        let parsed = token::parse(raw, &self.settings)?;
        let where_ = format!("{} {}", excerpt(method, 32), excerpt(path, 256));
        let refusal = match target {
            Ok(t) => self.check_uid(&t.resource).err().map(|e| format!("resource: {}", excerpt(&e, 128))),
            Err(reason) => Some(excerpt(reason, 128)),
        };
        self.run(opts, || async {
            let mut txn = self.store.write().await?;
            let now = now_micros();
            let (token, state) = self.authenticate(&mut *txn, &parsed, now).await?;
            let decision = match (target, &refusal) {
                (Ok(t), None) => {
                    let action = policy::action_uid(&t.action).map_err(Error::Internal)?;
                    let policies = self.policies_at(&mut *txn, state).await?;
                    let loaded = txn.entities_with_ancestors(&[token.principal.clone(), t.resource.clone()]).await?;
                    let http = json!({ "method": method, "path": path });
                    let caller = Map::from_iter([("http".to_string(), http)]);
                    let ctx = build_context(&policies, &action, &caller, &token, None, &["token", "http"])?;
                    policies
                        .evaluate(&token.principal, &action, &t.resource, ctx, &loaded.iter().collect::<Vec<_>>())
                        .map_err(Error::Internal)?
                }
                (_, r) => Decision {
                    allowed: false,
                    determining_policies: Vec::new(),
                    errors: vec![r.clone().unwrap_or_default()],
                },
            };
            let detail = format!(
                "{} {where_}{}{}; determining policies: [{}]",
                if decision.allowed { "allow" } else { "deny" },
                target
                    .ok()
                    .map(|t| format!(" as `{}` on {}", excerpt(&t.action, 128), excerpt(&t.resource.to_string(), 256)))
                    .unwrap_or_default(),
                refusal.as_ref().map(|r| format!(" ({r})")).unwrap_or_default(),
                decision.determining_policies.join(", ")
            );
            txn.append_audit(&event(AuditKind::EdgeDecision, Some(&token), detail), now).await?;
            Ok((txn, Ok((decision, token.principal.clone()))))
        })
        .await
    }

    // ---------------------------------------------------------------------------------
    // Revocation
    // ---------------------------------------------------------------------------------

    /// Revokes one token: the caller's own (logout, always allowed) when `jti` is empty
    /// or names it, else any token, as Lockstep::Action::"RevokeToken".
    pub async fn revoke_token(
        &self,
        raw: &str,
        jti: &str,
        expires_at_secs: Option<i64>,
        opts: CallOptions,
    ) -> Result<u64> {
        refuse_nul("jti", &[jti])?;
        if jti.len() > 256 {
            return Err(Error::InvalidArgument("jti longer than 256 bytes".into()));
        }
        let parsed = token::parse(raw, &self.settings)?;
        self.run(opts, || async {
            let mut txn = self.store.write().await?;
            let now = now_micros();
            let (token, state) = self.authenticate(&mut *txn, &parsed, now).await?;
            let leeway = i64::try_from(self.settings.leeway_secs).unwrap_or(0);
            if jti.is_empty() || jti == token.token_id {
                let keep_until = token.exp.saturating_add(leeway);
                txn.revoke_token(&token.token_id, Some(&token.principal), keep_until, now).await?;
            } else {
                let policies = self.policies_at(&mut *txn, state).await?;
                self.require(&mut *txn, &policies, &token, "RevokeToken", &service_uid()).await?;
                // Every token this jti can name expires within the maximum lifetime (longer
                // ones are refused), so the revocation is kept at least that long: an
                // `expires_at` can lengthen it, never end it before its token.
                let max = i64::try_from(self.settings.max_token_lifetime_secs).unwrap_or(i64::MAX);
                let outlives_every_token = (now / 1_000_000).saturating_add(max);
                let keep_until = expires_at_secs.unwrap_or(0).max(outlives_every_token).saturating_add(leeway);
                txn.revoke_token(jti, None, keep_until, now).await?;
            }
            let target = if jti.is_empty() { token.token_id.as_str() } else { jti };
            let event = event(AuditKind::RevokeToken, Some(&token), format!("revoked token `{target}`"));
            let seq = txn.append_audit(&event, now).await?;
            Ok((txn, Ok(seq)))
        })
        .await
    }

    /// Revokes every token of a subject issued at or before now: the caller itself when
    /// `subject` is None (always allowed), else Lockstep::Action::"RevokeSubject" on it.
    pub async fn revoke_subject(&self, raw: &str, subject: Option<&Uid>, opts: CallOptions) -> Result<u64> {
        if let Some(s) = subject {
            self.check_uid(s).map_err(|e| Error::InvalidArgument(format!("subject: {e}")))?;
        }
        let parsed = token::parse(raw, &self.settings)?;
        self.run(opts, || async {
            let mut txn = self.store.write().await?;
            let now = now_micros();
            let (token, state) = self.authenticate(&mut *txn, &parsed, now).await?;
            let target = subject.cloned().unwrap_or_else(|| token.principal.clone());
            if target != token.principal {
                let policies = self.policies_at(&mut *txn, state).await?;
                self.require(&mut *txn, &policies, &token, "RevokeSubject", &target).await?;
            }
            // A token is accepted with `iat` up to the leeway ahead of this server's clock,
            // and another instance's clock may itself be up to the leeway ahead: the cutoff
            // covers both, so no token accepted anywhere at this moment survives. (Tokens
            // issued in that window after the call are refused too: fail closed.)
            let leeway = i64::try_from(self.settings.leeway_secs).unwrap_or(60);
            let cutoff = (now / 1_000_000).saturating_add(2 * leeway);
            txn.revoke_subject(&target, cutoff).await?;
            let detail = format!("revoked every token of {target} issued until {cutoff} (now + 2 × leeway)");
            let seq = txn.append_audit(&event(AuditKind::RevokeSubject, Some(&token), detail), now).await?;
            Ok((txn, Ok(seq)))
        })
        .await
    }

    // ---------------------------------------------------------------------------------
    // Control plane (RPC callers with a token, or the operator's CLI)
    // ---------------------------------------------------------------------------------

    /// Validates and activates a new policy set (Lockstep::Action::"PutPolicies"). A set
    /// that would deny the calling bearer its own PutPolicies (an empty set, say) is
    /// refused unless `allow_lockout`: only the operator's CLI could undo it.
    pub async fn put_policies(
        &self,
        caller: Caller<'_>,
        policies: &str,
        schema: &str,
        allow_lockout: bool,
        opts: CallOptions,
    ) -> Result<(u64, u64)> {
        self.put_policies_noted(caller, policies, schema, allow_lockout, opts, "").await
    }

    async fn put_policies_noted(
        &self,
        caller: Caller<'_>,
        policies: &str,
        schema: &str,
        allow_lockout: bool,
        opts: CallOptions,
        note: &str,
    ) -> Result<(u64, u64)> {
        if policies.len() + schema.len() > self.settings.max_request_bytes {
            return Err(Error::InvalidArgument(format!(
                "policies and schema exceed {} bytes",
                self.settings.max_request_bytes
            )));
        }
        refuse_nul("policies and schema", &[policies, schema])?;
        // Untrusted text is parsed only once its sender is authenticated and allowed to put
        // policies (a read transaction; the write transaction below checks again, at the
        // moment it commits), and `compile` bounds it before Cedar's parser sees it. It is
        // compiled outside the write transaction, so the writer is not held meanwhile.
        if let Caller::Bearer(_) = caller {
            self.run(opts, || async {
                let mut txn = self.store.read().await?;
                self.admit(&mut *txn, caller, "PutPolicies", &service_uid()).await?;
                Ok((txn, Ok(())))
            })
            .await?;
        }
        let (p, s) = (policies.to_owned(), schema.to_owned());
        let compiled = tokio::task::spawn_blocking(move || policy::compile(0, &p, &s))
            .await
            .map_err(|e| Error::Internal(format!("the policy compiler failed: {e}")))?
            .map_err(|e| Error::InvalidArgument(format!("policies are invalid; the active set is unchanged:\n{e}")))?;
        let compiled = &compiled;
        self.run(opts, || async {
            let mut txn = self.store.write().await?;
            let now = now_micros();
            let token = self.admit(&mut *txn, caller, "PutPolicies", &service_uid()).await?;
            let links = txn.policy_links().await?;
            let linked = compiled.with_links(&links, 0).map_err(|e| {
                Error::InvalidArgument(format!(
                    "the new policy set does not fit the template links in use ({e}); unlink first; the active set is unchanged"
                ))
            })?;
            if let Some(t) = token.as_deref().filter(|_| !allow_lockout) {
                match self.require(&mut *txn, &linked, t, "PutPolicies", &service_uid()).await {
                    Err(Error::Denied(_)) => {
                        return Err(Error::InvalidArgument(format!(
                            "the new policy set would deny {} Lockstep::Action::\"PutPolicies\", locking you out \
                             (only `lockstep policies rollback` on the database could undo it); the active set is \
                             unchanged; send `allow_lockout: true` if you mean it",
                            t.principal
                        )));
                    }
                    other => other?,
                }
            }
            let version = txn.insert_policies(policies, schema, now).await?;
            let detail = operator_note(caller, format!("policy version {version}{note}"));
            let seq = txn.append_audit(&event(AuditKind::PutPolicies, token.as_deref(), detail), now).await?;
            Ok((txn, Ok((version, seq))))
        })
        .await
    }

    /// Links a template (per-resource sharing: "bob may view this document"), authorized
    /// as Lockstep::Action::"LinkTemplate" on the link's resource (on the service when
    /// the template has no resource slot). Takes effect atomically: every transaction
    /// that commits after this returns decides with the link.
    pub async fn link_template(&self, caller: Caller<'_>, link: TemplateLink, opts: CallOptions) -> Result<u64> {
        refuse_nul("link_id and template_id", &[&link.link_id, &link.template_id])?;
        if link.link_id.is_empty() || link.link_id.len() > 256 || link.template_id.len() > 256 {
            return Err(Error::InvalidArgument("link_id and template_id must be 1 to 256 bytes".into()));
        }
        for u in link.principal.iter().chain(link.resource.iter()) {
            self.check_uid(u).map_err(Error::InvalidArgument)?;
        }
        let link = &link;
        self.run(opts, || async {
            let mut txn = self.store.write().await?;
            let now = now_micros();
            let guarded = link.resource.clone().unwrap_or_else(service_uid);
            let token = self.admit(&mut *txn, caller, "LinkTemplate", &guarded).await?;
            if txn.policy_links().await?.iter().any(|l| l.link_id == link.link_id) {
                return Err(Error::AlreadyExists(format!("a link `{}` exists already", link.link_id)));
            }
            let current = self.policies_in(&mut *txn).await?;
            current.with_links(std::slice::from_ref(link), current.links).map_err(Error::InvalidArgument)?;
            match txn.insert_link(link, now).await {
                Err(StoreError::Conflict(_)) => {
                    return Err(Error::AlreadyExists(format!("a link `{}` exists already", link.link_id)));
                }
                other => other?,
            }
            let detail = operator_note(
                caller,
                format!("linked template `{}` as `{}`{}", link.template_id, link.link_id, describe_link(link)),
            );
            let seq = txn.append_audit(&event(AuditKind::PutPolicies, token.as_deref(), detail), now).await?;
            Ok((txn, Ok(seq)))
        })
        .await
    }

    /// Removes a template link (Lockstep::Action::"LinkTemplate" on its resource).
    pub async fn unlink_template(&self, caller: Caller<'_>, link_id: &str, opts: CallOptions) -> Result<u64> {
        if link_id.is_empty() || link_id.len() > 256 {
            return Err(Error::InvalidArgument("link_id must be 1 to 256 bytes".into()));
        }
        self.run(opts, || async {
            let mut txn = self.store.write().await?;
            let now = now_micros();
            let link = txn
                .policy_links()
                .await?
                .into_iter()
                .find(|l| l.link_id == link_id)
                .ok_or_else(|| Error::NotFound(format!("no template link `{link_id}`")))?;
            let guarded = link.resource.clone().unwrap_or_else(service_uid);
            let token = self.admit(&mut *txn, caller, "LinkTemplate", &guarded).await?;
            txn.delete_link(link_id).await?;
            let detail = operator_note(
                caller,
                format!("unlinked `{link_id}` (template `{}`{})", link.template_id, describe_link(&link)),
            );
            let seq = txn.append_audit(&event(AuditKind::PutPolicies, token.as_deref(), detail), now).await?;
            Ok((txn, Ok(seq)))
        })
        .await
    }

    /// Every template link (Lockstep::Action::"PutPolicies").
    pub async fn list_links(&self, caller: Caller<'_>, opts: CallOptions) -> Result<Vec<TemplateLink>> {
        self.run(opts, || async {
            let mut txn = self.store.read().await?;
            self.admit(&mut *txn, caller, "PutPolicies", &service_uid()).await?;
            let links = txn.policy_links().await?;
            Ok((txn, Ok(links)))
        })
        .await
    }

    /// Every policy version, oldest first (operator; an RPC caller needs PutPolicies).
    pub async fn policy_history(&self, caller: Caller<'_>) -> Result<Vec<PolicyRecord>> {
        self.run(CallOptions::default(), || async {
            let mut txn = self.store.read().await?;
            self.admit(&mut *txn, caller, "PutPolicies", &service_uid()).await?;
            let history = txn.policy_history().await?;
            Ok((txn, Ok(history)))
        })
        .await
    }

    /// Makes an earlier version active again, as a new version (audited like a put).
    pub async fn rollback_policies(&self, caller: Caller<'_>, to: u64) -> Result<(u64, u64)> {
        let old = self
            .run(CallOptions::default(), || async {
                let mut txn = self.store.read().await?;
                self.admit(&mut *txn, caller, "PutPolicies", &service_uid()).await?;
                let record =
                    txn.policies(to).await?.ok_or_else(|| Error::NotFound(format!("no policy version {to}")))?;
                Ok((txn, Ok(record)))
            })
            .await?;
        self.put_policies_noted(
            caller,
            &old.policies,
            &old.schema,
            false,
            CallOptions::default(),
            &format!(" (rollback to version {to})"),
        )
        .await
    }

    /// The active policy set (authorized as Lockstep::Action::"PutPolicies": whoever may
    /// change the policies may read them).
    pub async fn get_policies(&self, caller: Caller<'_>, opts: CallOptions) -> Result<Option<PolicyRecord>> {
        self.run(opts, || async {
            let mut txn = self.store.read().await?;
            self.admit(&mut *txn, caller, "PutPolicies", &service_uid()).await?;
            let record = match txn.policy_state().await?.version {
                Some(v) => txn.policies(v).await?,
                None => None,
            };
            Ok((txn, Ok(record)))
        })
        .await
    }

    /// Adds a verification key (Lockstep::Action::"ManageKeys").
    pub async fn add_key(&self, caller: Caller<'_>, mut key: KeyRecord, opts: CallOptions) -> Result<u64> {
        self.check_key(&mut key)?;
        let key = &key;
        self.run(opts, || async {
            let mut txn = self.store.write().await?;
            let now = now_micros();
            let token = self.admit(&mut *txn, caller, "ManageKeys", &service_uid()).await?;
            let record = KeyRecord { added_at: now, revoked: false, ..key.clone() };
            match txn.insert_key(&record).await {
                Err(StoreError::Conflict(_)) => {
                    return Err(Error::AlreadyExists(format!(
                        "a key with kid `{}` exists already (kids are never reused)",
                        key.kid
                    )));
                }
                other => other?,
            }
            let detail = operator_note(caller, format!("added key `{}` ({})", key.kid, key.algorithm));
            let seq = txn.append_audit(&event(AuditKind::AddKey, token.as_deref(), detail), now).await?;
            Ok((txn, Ok(seq)))
        })
        .await
    }

    /// Revokes a key: once this returns, no token signed with it is accepted.
    pub async fn revoke_key(&self, caller: Caller<'_>, kid: &str, opts: CallOptions) -> Result<u64> {
        if kid.is_empty() || kid.len() > 256 {
            return Err(Error::InvalidArgument("kid must be 1 to 256 bytes".into()));
        }
        self.run(opts, || async {
            let mut txn = self.store.write().await?;
            let now = now_micros();
            let token = self.admit(&mut *txn, caller, "ManageKeys", &service_uid()).await?;
            if !txn.revoke_key(kid, now).await? {
                return Err(Error::NotFound(format!("no key with kid `{kid}`")));
            }
            let detail = operator_note(caller, format!("revoked key `{kid}`"));
            let seq = txn.append_audit(&event(AuditKind::RevokeKey, token.as_deref(), detail), now).await?;
            Ok((txn, Ok(seq)))
        })
        .await
    }

    pub async fn list_keys(&self, caller: Caller<'_>, opts: CallOptions) -> Result<Vec<KeyRecord>> {
        self.run(opts, || async {
            let mut txn = self.store.read().await?;
            self.admit(&mut *txn, caller, "ManageKeys", &service_uid()).await?;
            let keys = txn.list_keys().await?;
            Ok((txn, Ok(keys)))
        })
        .await
    }

    /// The key record itself, secret included: for the operator's `token issue` only.
    pub async fn operator_key(&self, kid: &str) -> Result<KeyRecord> {
        self.run(CallOptions::default(), || async {
            let mut txn = self.store.read().await?;
            let key = txn.key(kid).await?.ok_or_else(|| Error::NotFound(format!("no key with kid `{kid}`")))?;
            if key.revoked {
                return Err(Error::InvalidArgument(format!("key `{kid}` is revoked")));
            }
            Ok((txn, Ok(key)))
        })
        .await
    }

    /// Writes entities directly (operator bootstrap: `entities import`, the demo),
    /// creating or replacing each, validated and audited as one commit.
    pub async fn import_entities(&self, entities: Vec<EntityRecord>) -> Result<u64> {
        // The same checks as a create over RPC: this is a way in too.
        if entities.is_empty() {
            return Err(Error::InvalidArgument("no entities to import: the file holds an empty list".into()));
        }
        let mut seen = std::collections::HashSet::new();
        for (i, e) in entities.iter().enumerate() {
            let at = |m: String| Error::InvalidArgument(format!("entity {i} ({}): {m}", short(&e.uid.to_string())));
            self.check_uid(&e.uid).map_err(at)?;
            if !seen.insert(e.uid.clone()) {
                return Err(at("listed twice".into()));
            }
            e.parents.iter().try_for_each(|p| self.check_uid(p)).map_err(at)?;
            check_values(&e.attributes, self.settings.max_value_depth).map_err(at)?;
            self.check_attributes(e)?;
        }
        let entities = &entities;
        self.run(CallOptions::default(), || async {
            let mut txn = self.store.write().await?;
            let now = now_micros();
            let policies = self.policies_in(&mut *txn).await?;
            for e in entities {
                policies.check_entity(e).map_err(Error::InvalidArgument)?;
            }
            let mut written = Vec::new();
            for e in entities {
                let mut e = e.clone();
                match txn.entity(&e.uid).await? {
                    Some(cur) => {
                        e.version = cur.version + 1;
                        txn.update_entity(&e).await?;
                    }
                    None => {
                        e.version = 1;
                        txn.insert_entity(&e).await?;
                    }
                }
                written.push(e);
            }
            for e in &written {
                let ancestors = txn.entities_with_ancestors(&e.parents).await?;
                refuse_cycle(&e.uid, &e.parents, &ancestors.iter().collect::<Vec<_>>())?;
            }
            let detail = format!("imported {} entities (cli)", written.len());
            let seq = txn.append_audit(&event(AuditKind::Commit, None, detail).entities(written), now).await?;
            Ok((txn, Ok(seq)))
        })
        .await
    }

    /// Stores the keys of one JWKS (`tag`: its URL, or `jwks-file`): new kids are added,
    /// changed JWKs updated, kids no longer listed retired (they stop verifying), retired
    /// ones listed again restored. A revoked key stays revoked: revocation wins over any
    /// later refresh. Audited as one ADD_KEY event when anything changed.
    pub async fn sync_jwks(&self, tag: &str, keys: Vec<KeyRecord>) -> Result<JwksSync> {
        // Not through `run`: an unknown kid inside `run` leads here, and a future may not
        // contain itself. A transient conflict is retried once.
        match self.sync_jwks_once(tag, &keys).await {
            Err(Error::Retry(_)) => {}
            Err(e) => return Err(e),
            Ok((txn, answer)) => match txn.commit().await {
                Ok(()) => return answer,
                Err(StoreError::Retry(_)) => {}
                Err(e) => return Err(e.into()),
            },
        }
        let (txn, answer) = self.sync_jwks_once(tag, &keys).await?;
        txn.commit().await?;
        answer
    }

    async fn sync_jwks_once(&self, tag: &str, keys: &[KeyRecord]) -> Result<Prepared<JwksSync>> {
        {
            let mut txn = self.store.write().await?;
            let now = now_micros();
            let existing = txn.list_keys().await?;
            let mut sync = JwksSync::default();
            for k in keys {
                match existing.iter().find(|e| e.kid == k.kid) {
                    None => {
                        txn.insert_key(&KeyRecord { added_at: now, ..k.clone() }).await?;
                        sync.added.push(k.kid.clone());
                    }
                    Some(e) if e.revoked || e.source != tag => sync.kept_out.push(k.kid.clone()),
                    Some(e) if e.jwk != k.jwk || e.retired => {
                        txn.update_key(&KeyRecord { jwk: k.jwk.clone(), retired: false, ..e.clone() }).await?;
                        sync.updated.push(k.kid.clone());
                    }
                    Some(_) => {}
                }
            }
            for e in existing.iter().filter(|e| e.source == tag && !e.retired && !e.revoked) {
                if !keys.iter().any(|k| k.kid == e.kid) {
                    txn.update_key(&KeyRecord { retired: true, ..e.clone() }).await?;
                    sync.retired.push(e.kid.clone());
                }
            }
            if sync.added.is_empty() && sync.updated.is_empty() && sync.retired.is_empty() {
                return Ok((txn, Ok(sync)));
            }
            let detail = format!(
                "jwks {tag}: added [{}], updated [{}], retired [{}]",
                sync.added.join(", "),
                sync.updated.join(", "),
                sync.retired.join(", ")
            );
            txn.append_audit(&event(AuditKind::AddKey, None, detail), now).await?;
            Ok((txn, Ok(sync)))
        }
    }

    /// Fetches every followed JWKS and syncs it; failures are logged and leave the keys
    /// as they were (so an unreachable identity provider retires nothing).
    pub async fn refresh_jwks(&self) -> bool {
        let mut any = false;
        for src in &self.jwks {
            let fetched = jwks::fetch(&src.url).await.and_then(|text| jwks::keys_from_jwks(&text, src, &src.url));
            match fetched {
                Ok((keys, skipped)) => {
                    for s in skipped {
                        tracing::warn!(url = %src.url, key = %s, "jwks key skipped");
                    }
                    match self.sync_jwks(&src.url, keys).await {
                        Ok(sync) => {
                            any = true;
                            if sync != JwksSync::default() {
                                tracing::info!(url = %src.url, ?sync, "jwks synced");
                            }
                        }
                        Err(e) => tracing::warn!(url = %src.url, error = %e, "jwks sync failed"),
                    }
                }
                Err(e) => tracing::warn!(url = %src.url, error = %e, "jwks fetch failed"),
            }
        }
        any
    }

    /// On an unknown `kid`: refresh the JWKS sources, at most once per interval.
    async fn refresh_jwks_on_demand(&self) -> bool {
        if self.jwks.is_empty() {
            return false;
        }
        let mut last = self.jwks_on_demand.lock().await;
        if last.is_some_and(|t| t.elapsed() < JWKS_ON_DEMAND_INTERVAL) {
            return false;
        }
        *last = Some(Instant::now());
        self.refresh_jwks().await
    }

    /// Makes a new first-party signing key and moves the current one to verify-only:
    /// tokens it signed keep working until they expire or it is revoked.
    pub async fn rotate(&self, template: KeyRecord) -> Result<(u64, Vec<String>)> {
        let mut key = token::generate_first_party(template).map_err(Error::InvalidArgument)?;
        self.check_key(&mut key)?;
        let key = &key;
        self.run(CallOptions::default(), || async {
            let mut txn = self.store.write().await?;
            let now = now_micros();
            let previous: Vec<KeyRecord> = txn.list_keys().await?.into_iter().filter(|k| k.signing).collect();
            match txn.insert_key(&KeyRecord { added_at: now, signing: true, ..key.clone() }).await {
                Err(StoreError::Conflict(_)) => {
                    return Err(Error::AlreadyExists(format!("a key with kid `{}` exists already", key.kid)));
                }
                other => other?,
            }
            for p in &previous {
                txn.update_key(&KeyRecord { signing: false, ..p.clone() }).await?;
            }
            let old: Vec<String> = previous.iter().map(|p| p.kid.clone()).collect();
            let detail =
                format!("rotated (cli): `{}` ({}) signs; verify-only: [{}]", key.kid, key.algorithm, old.join(", "));
            let seq = txn.append_audit(&event(AuditKind::AddKey, None, detail), now).await?;
            Ok((txn, Ok((seq, old))))
        })
        .await
    }

    /// The current first-party signing key, secret included (operator only).
    pub async fn signing_key(&self) -> Result<KeyRecord> {
        self.run(CallOptions::default(), || async {
            let mut txn = self.store.read().await?;
            let key =
                txn.list_keys().await?.into_iter().find(|k| k.signing && !k.revoked).ok_or_else(|| {
                    Error::NotFound("no signing key: run `lockstep keys rotate` or give --kid".into())
                })?;
            Ok((txn, Ok(key)))
        })
        .await
    }

    /// Deletes expired revocations and idempotency records past their retention.
    pub async fn purge(&self) -> Result<(u64, u64)> {
        self.run(CallOptions::default(), || async {
            let mut txn = self.store.write().await?;
            let now = now_micros();
            let leeway = i64::try_from(self.settings.leeway_secs).unwrap_or(0);
            let retention = i64::try_from(self.settings.idempotency_retention.as_micros()).unwrap_or(i64::MAX);
            let purged = txn.purge(now / 1_000_000 - leeway, now.saturating_sub(retention)).await?;
            Ok((txn, Ok(purged)))
        })
        .await
    }

    // ---------------------------------------------------------------------------------
    // Pieces shared by the use cases
    // ---------------------------------------------------------------------------------

    /// Runs one attempt of a use case after another until it yields a transaction to
    /// commit, then commits it and gives the use case's answer. Attempts that hit a
    /// transient conflict (serialization failure, deadlock) are retried a bounded number
    /// of times. Nothing is committed after the caller's deadline: an attempt still
    /// running then is dropped (its transaction rolls back) and the commit itself is
    /// only started before the deadline. Once started, the commit runs in a task of its
    /// own and its outcome is the answer: dropping this future (a client gone, a
    /// transport timer) cannot cut a COMMIT in half or turn it into a failure answer.
    async fn run<T, F, Fut>(&self, opts: CallOptions, attempt: F) -> Result<T>
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

    async fn run_attempts<T, F, Fut>(&self, opts: CallOptions, mut attempt: F) -> Result<T>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<Prepared<T>>>,
    {
        let mut tries = 0u32;
        let mut refreshed = false;
        loop {
            tries += 1;
            forget_compiled_in_call();
            let prepared = match opts.deadline {
                Some(d) => tokio::time::timeout_at(d, attempt()).await.unwrap_or(Err(Error::DeadlineExceeded)),
                None => attempt().await,
            };
            let outcome = match prepared {
                Ok((txn, answer)) => {
                    if opts.deadline.is_some_and(|d| Instant::now() >= d) {
                        return Err(Error::DeadlineExceeded);
                    }
                    let deadline = opts.deadline;
                    match tokio::spawn(async move { txn.commit_before(deadline).await }).await {
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
            match outcome {
                Ok(answer) => return answer,
                Err(StoreError::Retry(m)) if tries < MAX_ATTEMPTS => {
                    tracing::debug!(attempt = tries, reason = %m, "transient conflict; retrying");
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
    async fn authenticate(
        &self,
        txn: &mut dyn Txn,
        parsed: &token::ParsedToken,
        now: i64,
    ) -> Result<(Arc<VerifiedToken>, PolicyState)> {
        let now_secs = now / 1_000_000;
        let key = txn
            .key(&parsed.kid)
            .await?
            .ok_or_else(|| Error::UnknownKey("token names an unknown key (`kid`)".into()))?;
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
        let state = txn.revocations_and_policy(&token.principal, &token.token_id).await?;
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
        Ok((token, state.policy))
    }

    /// Why the active policy set cannot be used (it does not compile, or its links do not
    /// fit), if so: the health watcher reports it. None when it compiles or the database
    /// cannot be asked (the watcher checks the database itself).
    ///
    /// Asks the database only while a call has met such a problem (`policy_broken`), so a
    /// healthy server's watcher costs nothing; once the set compiles again the flag clears.
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
    async fn policies_in(&self, txn: &mut dyn Txn) -> Result<Arc<CompiledPolicies>> {
        let state = txn.policy_state().await?;
        self.policies_at(txn, state).await
    }

    /// The policy set selected by `state` (read in `txn`), compiled once per state.
    async fn policies_at(&self, txn: &mut dyn Txn, state: PolicyState) -> Result<Arc<CompiledPolicies>> {
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
    fn remember(&self, set: Arc<CompiledPolicies>, digest: [u8; 32], confirmed: bool) {
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
    async fn admit(
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
    async fn require(
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

    fn check_commit_request(&self, req: &CommitRequest) -> Result<()> {
        let s = &self.settings;
        if req.mutations.is_empty() {
            return Err(Error::InvalidArgument("no mutations: send at least one".into()));
        }
        if req.mutations.len() > s.max_mutations {
            return Err(Error::InvalidArgument(format!(
                "{} mutations; at most {} per request",
                req.mutations.len(),
                s.max_mutations
            )));
        }
        refuse_nul("idempotency_key", &[&req.idempotency_key])?;
        if req.idempotency_key.len() > s.max_idempotency_key_bytes {
            return Err(Error::InvalidArgument(format!(
                "idempotency_key longer than {} bytes",
                s.max_idempotency_key_bytes
            )));
        }
        self.check_value_sizes(&req.context, "context")?;
        for (i, m) in req.mutations.iter().enumerate() {
            self.check_uid(&m.resource).map_err(|e| Error::InvalidArgument(format!("mutation {i}: {e}")))?;
            policy::action_uid(&m.action).map_err(|e| Error::InvalidArgument(format!("mutation {i}: {e}")))?;
            match &m.change {
                Change::Create { attributes, parents, tags } => {
                    self.check_value_sizes(attributes, "attributes")?;
                    self.check_value_sizes(tags, "tags")?;
                    parents.iter().try_for_each(|p| self.check_uid(p)).map_err(Error::InvalidArgument)?;
                }
                Change::Update { merge_patch, add_parents, remove_parents, tags_merge_patch } => {
                    self.check_value_sizes(merge_patch, "merge_patch")?;
                    self.check_value_sizes(tags_merge_patch, "tags_merge_patch")?;
                    add_parents
                        .iter()
                        .chain(remove_parents)
                        .try_for_each(|p| self.check_uid(p))
                        .map_err(Error::InvalidArgument)?;
                }
                Change::Delete => {}
            }
        }
        Ok(())
    }

    fn check_uid(&self, uid: &Uid) -> std::result::Result<(), String> {
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

    fn check_value_sizes(&self, m: &Attributes, what: &str) -> Result<()> {
        let len = serde_json::to_vec(m).map(|v| v.len()).unwrap_or(usize::MAX);
        if len > self.settings.max_attributes_bytes {
            return Err(Error::InvalidArgument(format!(
                "{what} is {len} bytes as JSON; at most {}",
                self.settings.max_attributes_bytes
            )));
        }
        Ok(())
    }

    fn check_attributes(&self, e: &EntityRecord) -> Result<()> {
        self.check_value_sizes(&e.attributes, "the entity's attributes")?;
        self.check_value_sizes(&e.tags, "the entity's tags")?;
        if e.parents.len() > 1000 {
            return Err(Error::InvalidArgument("an entity may have at most 1000 parents".into()));
        }
        Ok(())
    }

    fn check_key(&self, key: &mut KeyRecord) -> Result<()> {
        let bad = |m: String| Err(Error::InvalidArgument(m));
        if key.kid.is_empty() || key.kid.len() > 256 || key.kid.chars().any(char::is_control) {
            return bad("kid must be 1 to 256 bytes without control characters".into());
        }
        let texts =
            [&key.algorithm, &key.public_key_pem, &key.issuer, &key.audience, &key.principal_type, &key.required_typ];
        refuse_nul("key fields", &texts.map(String::as_str))?;
        if key.principal_type.is_empty() {
            key.principal_type = "User".into();
        }
        policy::entity_uid(&Uid::new(key.principal_type.clone(), "x")).map_err(Error::InvalidArgument)?;
        if key.required_typ.len() > 64 || key.max_lifetime_secs < 0 {
            return bad("required_typ must be at most 64 bytes and max lifetime not negative".into());
        }
        token::check_algorithm(&key.algorithm).map_err(Error::InvalidArgument)?;
        if key.issuer.len() > 1024 || key.audience.len() > 1024 || key.principal_type.len() > 256 {
            return bad("issuer and audience must be at most 1024 bytes, principal_type at most 256".into());
        }
        if key.public_key_pem.len() > 16 * 1024 || key.secret.len() > 1024 || key.jwk.len() > 16 * 1024 {
            return bad("public_key_pem and jwk must be at most 16 KiB, secret at most 1 KiB".into());
        }
        let hmac = key.algorithm.starts_with("HS");
        if hmac && !key.public_key_pem.is_empty() {
            return bad(format!("{} keys take `secret`, not `public_key_pem`", key.algorithm));
        }
        if !hmac && !key.secret.is_empty() {
            return bad(format!("{} keys take `public_key_pem`, not `secret`", key.algorithm));
        }
        token::decoding_key(key).map(|_| ()).or_else(bad)
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
}
