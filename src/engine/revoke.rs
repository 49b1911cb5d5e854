//! Revocation: RevokeToken (logout, or another token by jti) and RevokeSubject.

use super::*;

impl Engine {
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
        .inspect(|seq| security_event(*seq, "token", "token revoked"))
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
        .inspect(|seq| security_event(*seq, "subject", "every token of a subject revoked"))
    }
}
