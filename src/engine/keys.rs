//! Keys: add, revoke, list, rotate first-party keys, and follow JWKS sources.

use super::*;

impl Engine {
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
        .inspect(|seq| tracing::info!(target: "lockstep::security", audit_seq = seq, kid = %key.kid, "key added"))
    }

    /// Revokes a key: once this returns, no token signed with it is accepted.
    pub async fn revoke_key(&self, caller: Caller<'_>, kid: &str, opts: CallOptions) -> Result<u64> {
        bounded_id("kid", kid)?;
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
        .inspect(|seq| {
            metrics::counter!(telemetry::REVOCATIONS, "kind" => "key").increment(1);
            tracing::info!(target: "lockstep::security", audit_seq = seq, %kid, "key revoked");
        })
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
                    metrics::counter!(telemetry::JWKS_FETCHES, "outcome" => "ok").increment(1);
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
                Err(e) => {
                    metrics::counter!(telemetry::JWKS_FETCHES, "outcome" => "error").increment(1);
                    tracing::warn!(url = %src.url, error = %e, "jwks fetch failed");
                }
            }
        }
        any
    }

    /// On an unknown `kid`: refresh the JWKS sources, at most once per interval.
    pub(super) async fn refresh_jwks_on_demand(&self) -> bool {
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

    pub(super) fn check_key(&self, key: &mut KeyRecord) -> Result<()> {
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
