//! Decisions without a write: Authorize, GetEntity (an authorized read), ListAuditEvents.

use super::*;
use std::sync::atomic::{AtomicU32, Ordering};

impl Engine {
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
        self.require_sound_mapping()?;
        telemetry::note(|f| {
            f.action = Some(action.to_string());
            f.resource = Some(resource.to_string());
        });
        let parsed = token::parse(raw, &self.settings)?;
        let attempts = AtomicU32::new(0);
        let decision = self
            .run(opts, || async {
                let first = attempts.fetch_add(1, Ordering::Relaxed) == 0;
                let (txn, token, policies, loaded) = self.read_around(&parsed, resource, first).await?;
                let ctx = build_context(&policies, &action, context, &token, None, &policy::SERVER_CONTEXT)?;
                let decision = policies
                    .evaluate(&token.principal, &action, resource, ctx, &loaded.iter().collect::<Vec<_>>())
                    .map_err(Error::Internal);
                Ok((txn, decision))
            })
            .await?;
        note_decision(decision.allowed, "authorize");
        Ok(decision)
    }

    /// An authorized read of one entity; denied and missing are the same answer.
    pub async fn get_entity(&self, raw: &str, uid: &Uid, action: &str, opts: CallOptions) -> Result<EntityRecord> {
        let action = policy::action_uid(action).map_err(Error::InvalidArgument)?;
        self.check_uid(uid).map_err(|e| Error::InvalidArgument(format!("uid: {e}")))?;
        self.require_sound_mapping()?;
        telemetry::note(|f| {
            f.action = Some(action.to_string());
            f.resource = Some(uid.to_string());
        });
        let parsed = token::parse(raw, &self.settings)?;
        let attempts = AtomicU32::new(0);
        self.run(opts, || async {
            let first = attempts.fetch_add(1, Ordering::Relaxed) == 0;
            let (txn, token, policies, loaded) = self.read_around(&parsed, uid, first).await?;
            let denied = || Error::Denied(format!("reading {uid} is not permitted, or it does not exist"));
            let Some(entity) = loaded.iter().find(|e| e.uid == *uid).cloned() else { return Ok((txn, Err(denied()))) };
            let ctx = build_context(&policies, &action, &Map::new(), &token, None, &policy::SERVER_CONTEXT)?;
            let decision = policies
                .evaluate(&token.principal, &action, uid, ctx, &loaded.iter().collect::<Vec<_>>())
                .map_err(Error::Internal)?;
            note_decision(decision.allowed, "get");
            let answer = if decision.allowed { Ok(entity) } else { Err(denied()) };
            Ok((txn, answer))
        })
        .await
    }

    /// What a read-only decision about `resource` reads, in one snapshot: the token
    /// verified against its key and the call state, the policy set, and the principal and
    /// the resource with their ancestors. A token verified before names its principal, so
    /// on a call's first attempt the store may read all of it in the statement that reads
    /// the key — on PostgreSQL that statement alone, without BEGIN (`read_single`); any
    /// later attempt (a decision that needed a second read, a key fetched on demand) reads
    /// in a transaction.
    async fn read_around(
        &self,
        parsed: &token::ParsedToken,
        resource: &Uid,
        first: bool,
    ) -> Result<(Box<dyn Txn>, Arc<VerifiedToken>, Arc<CompiledPolicies>, Vec<EntityRecord>)> {
        let hint = self.verified.hint(parsed);
        let mut txn = if first && hint.is_some() { self.store.read_single().await? } else { self.store.read().await? };
        if let Some((principal, _)) = &hint {
            txn.prefetch_ancestors(&[principal.clone(), resource.clone()]);
        }
        let (token, state) = self.authenticate_hinted(&mut *txn, parsed, now_micros(), hint).await?;
        let policies = self.policies_at(&mut *txn, state).await?;
        let loaded = txn.entities_with_ancestors(&[token.principal.clone(), resource.clone()]).await?;
        Ok((txn, token, policies, loaded))
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
}
