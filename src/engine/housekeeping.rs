//! Housekeeping: expired revocations and idempotency records are purged.

use super::*;

impl Engine {
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
}
