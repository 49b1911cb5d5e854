//! AuthorizeAndCommit, top to bottom: authenticate, replay an idempotent repeat, decide
//! and apply each mutation against the state the previous ones left, audit, answer.

use super::*;

impl Engine {
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
        self.require_sound_mapping()?;
        let parsed = token::parse(raw, &self.settings)?;
        // Only a request with an idempotency key needs its hash (kept to tell a repeat from
        // a different request under the same key).
        let hash = if req.idempotency_key.is_empty() {
            Vec::new()
        } else {
            Sha256::digest(serde_json::to_vec(req).map_err(|e| Error::Internal(e.to_string()))?).to_vec()
        };
        telemetry::note(|f| {
            let m = &req.mutations[0];
            f.action = Some(m.action.clone());
            f.resource = Some(if req.mutations.len() > 1 {
                format!("{} (+{} more)", m.resource, req.mutations.len() - 1)
            } else {
                m.resource.to_string()
            });
        });
        // Where the store puts the audit seq when it learns it with the COMMIT.
        let seq = AuditSeq::default();
        let result = self.run(opts, || self.authorize_and_commit_once(&parsed, req, &hash, &seq)).await;
        let result = result.map(|mut r| {
            if req.idempotency_key.is_empty() {
                r.audit_seq = seq.get();
            }
            r
        });
        match &result {
            Ok(r) => {
                note_decision(true, "commit");
                metrics::counter!(telemetry::COMMITS).increment(1);
                telemetry::note(|f| f.audit_seq = Some(r.audit_seq));
            }
            Err(Error::Denied(_) | Error::DeniedExplained { .. }) => note_decision(false, "commit"),
            Err(_) => {}
        }
        result
    }

    async fn authorize_and_commit_once(
        &self,
        parsed: &token::ParsedToken,
        req: &CommitRequest,
        request_hash: &[u8],
        seq: &AuditSeq,
    ) -> Result<Prepared<CommitResult>> {
        let mut txn = self.store.write().await?;
        match self.decide_and_apply(&mut *txn, parsed, req, request_hash, seq).await {
            Ok(answer) => Ok((txn, answer)),
            // An error decided on what the store last saw, not on what it read, may be
            // stale: the call is read again in full (a denial is checked by its COMMIT).
            Err(e) if txn.speculating() && !matches!(e, Error::Retry(_)) => {
                txn.abandon_speculation();
                Err(Error::Retry(crate::store::SPECULATION_ABANDONED.into()))
            }
            Err(e) => Err(e),
        }
    }

    /// One attempt in `txn`: the answer to commit (a denial commits its audit event only).
    async fn decide_and_apply(
        &self,
        txn: &mut dyn Txn,
        parsed: &token::ParsedToken,
        req: &CommitRequest,
        request_hash: &[u8],
        seq: &AuditSeq,
    ) -> Result<Result<CommitResult>> {
        let now = now_micros();
        // A lone mutation of a token verified before: the store may read what it is decided
        // on in the same round trip as the key and the call state (after their locks).
        let hint = self.verified.hint(parsed);
        if let [m] = req.mutations.as_slice()
            && req.idempotency_key.is_empty()
            && let Some((principal, _)) = &hint
        {
            let (also, with_parents) = write_context_of(principal, m);
            txn.prefetch_for_write(&m.resource, &also, with_parents);
        }
        let (token, policy_state) = self.authenticate_hinted(txn, parsed, now, hint).await?;

        // Everything after this point is undone by a denial, except the denial's audit event.
        // One mutation without an idempotency key writes nothing before it is decided, so
        // its denial has nothing to undo: no savepoint (a round trip on PostgreSQL).
        let key = req.idempotency_key.as_str();
        let undoable = req.mutations.len() > 1 || !key.is_empty();
        if undoable {
            txn.savepoint().await?;
        }
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
                return Ok(Ok(first));
            }
        }

        let policies = self.policies_at(txn, policy_state).await?;
        let mut entities = Vec::with_capacity(req.mutations.len());
        let mut determining: Vec<String> = Vec::new();
        for (i, m) in req.mutations.iter().enumerate() {
            match self.apply(txn, &policies, &token, &req.context, m).await? {
                Step::Applied { entity, decision } => {
                    for p in decision.determining_policies {
                        if !determining.contains(&p) {
                            determining.push(p);
                        }
                    }
                    entities.push(entity);
                }
                Step::Denied { decision, reason, explain } => {
                    if undoable {
                        txn.rollback_to_savepoint().await?;
                    }
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
                    txn.append_audit_last(&deny, now, &AuditSeq::default()).await?;
                    let message = match explain {
                        Some(why) => format!("{what} is not permitted: {why}; nothing was committed"),
                        None => format!("{what} is not permitted, or its entity does not exist; nothing was committed"),
                    };
                    let answer = if self.settings.reveal_determining_policies {
                        Error::DeniedExplained { message, mutation: i, policies: decision.determining_policies }
                    } else {
                        Error::Denied(message)
                    };
                    return Ok(Err(answer));
                }
            }
        }
        let event = event(AuditKind::Commit, Some(&token), String::new())
            .mutations(req.mutations.clone())
            .entities(entities.clone());
        if key.is_empty() {
            // The last write: its seq is known once committed (filled in by the caller).
            txn.append_audit_last(&event, now, seq).await?;
            return Ok(Ok(CommitResult { entities, audit_seq: 0, determining_policies: determining }));
        }
        let audit_seq = txn.append_audit(&event, now).await?;
        let result = CommitResult { entities, audit_seq, determining_policies: determining };
        let response = serde_json::to_string(&result).map_err(|e| Error::Internal(e.to_string()))?;
        txn.complete_idempotency_key(&token.principal, key, &response).await?;
        Ok(Ok(result))
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
        if m.if_version.is_some_and(|v| v != 0)
            && self.store.mapping().get(&m.resource.ty).is_some_and(|t| t.version_column.is_none())
        {
            return Err(Error::InvalidArgument(format!(
                "if_version: entity type {} lives in the application's table without a version column (see the \
                 mapping); nothing was committed",
                short(&m.resource.ty)
            )));
        }
        // The resource (its lock exclusive, then its row), then the principal and the
        // parents the decision reads, with their ancestors (locks shared): one round trip
        // where the store can. A create is decided with its proposed parents.
        let (also, with_parents) = write_context_of(&token.principal, m);
        let (current, loaded) = txn.entity_for_write(&m.resource, &also, with_parents).await?;
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

    pub(super) fn check_commit_request(&self, req: &CommitRequest) -> Result<()> {
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
        // Parents are bounded before anything is read or locked (each named parent is
        // share-locked while the request is decided): per mutation, and over the request.
        let mut named = 0usize;
        for (i, m) in req.mutations.iter().enumerate() {
            let n = match &m.change {
                Change::Create { parents, .. } => parents.len(),
                Change::Update { add_parents, remove_parents, .. } => add_parents.len() + remove_parents.len(),
                Change::Delete => 0,
            };
            if n > MAX_PARENTS {
                return Err(Error::InvalidArgument(format!(
                    "mutation {i}: {n} parents named; an entity may have at most {MAX_PARENTS} parents"
                )));
            }
            named += n;
        }
        if named > 4 * MAX_PARENTS {
            return Err(Error::InvalidArgument(format!(
                "{named} parents named in one request; at most {} in all",
                4 * MAX_PARENTS
            )));
        }
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
}

/// The arguments of `Txn::entity_for_write` for mutation `m` by `principal`: the principal,
/// and a create's proposed parents; an update or delete is decided with the resource's
/// current parents.
fn write_context_of(principal: &Uid, m: &Mutation) -> (Vec<Uid>, bool) {
    let mut also = vec![principal.clone()];
    if let Change::Create { parents, .. } = &m.change {
        also.extend(dedup(parents.clone()));
        return (also, false);
    }
    (also, true)
}
