//! `lockstep entities import`: entities written directly by the operator, through the
//! same checks as a create over RPC.

use super::*;

impl Engine {
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
            check_values(&e.tags, self.settings.max_value_depth).map_err(at)?;
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
}
