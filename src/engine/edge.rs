//! A decision at the edge (Envoy ext_authz), audited in the transaction that read the state.

use super::*;

impl Engine {
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
        self.require_sound_mapping()?;
        let parsed = token::parse(raw, &self.settings)?;
        // The query string stays out of the audit log: URLs carry secrets there (and the
        // decision never reads it).
        let where_ = format!("{} {}", excerpt(method, 32), excerpt(path.split('?').next().unwrap_or_default(), 256));
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
}
