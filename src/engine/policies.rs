//! The policy set: put (validated, bounded, authorized before it is parsed), history,
//! rollback, get, and template links.

use super::*;

impl Engine {
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

    pub(super) async fn put_policies_noted(
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
        let clash = policy::mapping_problems(schema, &self.store.mapping());
        if !clash.is_empty() {
            return Err(Error::InvalidArgument(format!(
                "the schema disagrees with the mapping of entity types onto tables; the active set is unchanged:\n{}",
                clash.join("\n")
            )));
        }
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
        .inspect(|(version, seq)| {
            metrics::gauge!(telemetry::POLICY_VERSION).set(*version as f64);
            tracing::info!(target: "lockstep::security", audit_seq = seq, version, "policy set activated");
        })
    }

    /// Links a template (per-resource sharing: "bob may view this document"), authorized
    /// as Lockstep::Action::"LinkTemplate" on the link's resource (on the service when
    /// the template has no resource slot). Takes effect atomically: every transaction
    /// that commits after this returns decides with the link.
    pub async fn link_template(&self, caller: Caller<'_>, link: TemplateLink, opts: CallOptions) -> Result<u64> {
        refuse_nul("link_id and template_id", &[&link.link_id, &link.template_id])?;
        bounded_id("link_id", &link.link_id)?;
        bounded_id("template_id", &link.template_id)?;
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
        bounded_id("link_id", link_id)?;
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
}
