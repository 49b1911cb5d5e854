//! Audit retention: the oldest events beyond the age or count limit are exported to files
//! (`audit_export`) and then dropped from the database, a batch at a time, each drop its
//! own short transaction (commits wait for at most one batch), and each run audited. On
//! SQLite the pages freed go back to the file system by incremental vacuum, a bounded
//! number per transaction.

use super::*;
use crate::audit_export::AuditExport;

/// Events per export file at most; the drop of one file's events is split in batches of
/// `DROP_BATCH`, one transaction each.
const FILE_EVENTS: u64 = 20_000;
const DROP_BATCH: usize = 2_000;
/// Events read (and held in memory) at a time while a file is written.
const PAGE_EVENTS: u32 = 200;
/// Free pages given back per transaction (8 MB of 4 KB pages), and transactions per run.
const RECLAIM_PAGES: u32 = 2_048;
const RECLAIM_ROUNDS: u32 = 64;

/// What retention keeps.
#[derive(Clone, Debug)]
pub struct AuditRetention {
    /// Events older than this go (None: no age limit).
    pub max_age: Option<std::time::Duration>,
    /// About this many events are kept, the newest, up to a tenth more between two runs
    /// (None: no count limit).
    pub max_events: Option<u64>,
    /// Never drop events younger than this, whatever the limits: an interrupted COMMIT is
    /// settled by looking its audit event up (PostgreSQL, seconds), and a reader paging
    /// through the log should not see it vanish under it.
    pub keep_at_least: std::time::Duration,
    /// Where the events go before they are dropped.
    pub export_dir: std::path::PathBuf,
    /// How often retention runs.
    pub every: std::time::Duration,
}

/// What one run did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RetentionRun {
    pub exported: u64,
    pub dropped: u64,
    pub files: Vec<String>,
    /// Free pages given back to the file system (SQLite).
    pub pages_reclaimed: u64,
}

impl Engine {
    /// One retention run: exports every event past the limits to files, then drops exactly
    /// the events written. One instance at a time per database (`Store::retention_lock`).
    pub async fn retain_audit(&self, r: &AuditRetention, export: &AuditExport) -> Result<RetentionRun> {
        let mut run = RetentionRun::default();
        let Some(_running) = self.store.retention_lock().await? else { return Ok(run) };
        let now = now_micros();
        export.remove_interrupted().map_err(|e| export_failed(export, &e))?;
        let outcome = self.export_and_drop(r, export, &mut run, now).await;
        // The space the drops freed goes back to the file system (SQLite), a bounded
        // number of pages per transaction so that commits keep their turn at the writer.
        for _ in 0..RECLAIM_ROUNDS {
            let freed = self.store.reclaim_pages(RECLAIM_PAGES).await?;
            run.pages_reclaimed += freed;
            if freed < u64::from(RECLAIM_PAGES) {
                break;
            }
        }
        outcome.map(|()| run)
    }

    async fn export_and_drop(
        &self,
        r: &AuditRetention,
        export: &AuditExport,
        run: &mut RetentionRun,
        now: i64,
    ) -> Result<()> {
        let opts = CallOptions::default();
        let mut recovered = std::collections::HashSet::new();
        loop {
            // What may go now: the newest seq past a limit, and never one younger than
            // `keep_at_least`. Reading starts at the oldest event present: on PostgreSQL a
            // transaction that drew a smaller seq may commit after a larger one was
            // exported, and its event is exported by a later run.
            let (oldest, target) = self
                .run(opts, || async {
                    let mut txn = self.store.read().await?;
                    let target = retention_target(&mut *txn, r, now).await?;
                    Ok((txn, Ok(target)))
                })
                .await?;
            let (Some(oldest), Some(target)) = (oldest, target) else { break };
            if target < oldest {
                break;
            }
            // A file holding the oldest event: an earlier run wrote it and was cut off while
            // dropping its events. Those of them still here, unchanged, go without a second
            // copy (once per file and run).
            if let Some(name) = export.covering(oldest).map_err(|e| export_failed(export, &e))?
                && recovered.insert(name.clone())
                && let Some(digests) = export.digests(&name).map_err(|e| export_failed(export, &e))?
                && self.drop_already_exported(&name, &digests, oldest, target, run).await? > 0
            {
                continue;
            }
            let mut cursor = oldest - 1;
            let mut file = None;
            let mut seqs: Vec<u64> = Vec::new();
            while (seqs.len() as u64) < FILE_EVENTS && cursor < target {
                let page = self.audit_page(cursor).await?;
                let page: Vec<AuditEvent> = page.into_iter().filter(|e| e.seq <= target).collect();
                let Some(last) = page.last().map(|e| e.seq) else { break };
                let f = match &mut file {
                    Some(f) => f,
                    None => file.insert(export.begin(page[0].seq).map_err(|e| export_failed(export, &e))?),
                };
                f.append(&page).map_err(|e| export_failed(export, &e))?;
                seqs.extend(page.iter().map(|e| e.seq));
                cursor = last;
            }
            let Some(file) = file else { break };
            let path = file.finish().map_err(|e| export_failed(export, &e))?;
            run.exported += seqs.len() as u64;
            let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
            recovered.insert(name.clone());
            let detail = format!(
                "retention exported {} events (seq {}..={}) to {name} and dropped them from the database",
                seqs.len(),
                seqs[0],
                seqs[seqs.len() - 1]
            );
            self.drop_exported(&seqs, detail, run).await?;
            tracing::info!(target: "lockstep::security", file = %name, events = seqs.len(), "audit events exported and dropped");
            run.files.push(name);
        }
        Ok(())
    }

    /// The next `PAGE_EVENTS` events after seq `after`.
    async fn audit_page(&self, after: u64) -> Result<Vec<AuditEvent>> {
        self.run(CallOptions::default(), || async {
            let mut txn = self.store.read().await?;
            let events = txn.audit_events(after, PAGE_EVENTS).await?;
            Ok((txn, Ok(events)))
        })
        .await
    }

    /// Drops exactly `seqs` (each in a durable file), a batch per transaction; the last
    /// batch's transaction also writes the run's audit event (`detail`), so a file is named
    /// by an AUDIT_EXPORTED event once all of its events are gone.
    async fn drop_exported(&self, seqs: &[u64], detail: String, run: &mut RetentionRun) -> Result<()> {
        let chunks: Vec<&[u64]> = seqs.chunks(DROP_BATCH).collect();
        for (i, chunk) in chunks.iter().enumerate() {
            let last = i + 1 == chunks.len();
            let dropped = self
                .run(CallOptions::default(), || async {
                    let mut txn = self.store.write().await?;
                    let n = txn.trim_audit(chunk).await?;
                    if last {
                        txn.append_audit(&event(AuditKind::AuditExported, None, detail.clone()), now_micros()).await?;
                    }
                    Ok((txn, Ok(n)))
                })
                .await?;
            run.dropped += dropped;
        }
        Ok(())
    }

    /// Drops the events from `oldest` to `target` that the finished file `name` holds as
    /// they are (`digests`: by seq), finishing the drop of a run that was cut off; returns
    /// how many went. An event the file does not hold, or holds otherwise, stays.
    async fn drop_already_exported(
        &self,
        name: &str,
        digests: &crate::audit_export::Digests,
        oldest: u64,
        target: u64,
        run: &mut RetentionRun,
    ) -> Result<u64> {
        let last = digests.keys().max().copied().unwrap_or(0).min(target);
        let mut cursor = oldest - 1;
        let mut seqs = Vec::new();
        while cursor < last {
            let page = self.audit_page(cursor).await?;
            let Some(end) = page.last().map(|e| e.seq) else { break };
            seqs.extend(
                page.iter()
                    .filter(|e| e.seq <= last && digests.get(&e.seq) == Some(&crate::audit_export::digest(e)))
                    .map(|e| e.seq),
            );
            cursor = end;
        }
        let Some((&first, &end)) = seqs.first().zip(seqs.last()) else { return Ok(0) };
        let detail = format!(
            "retention found {} events (seq {first}..={end}) already exported to {name} by a run that was cut \
             off, and dropped them from the database",
            seqs.len()
        );
        self.drop_exported(&seqs, detail, run).await?;
        tracing::warn!(target: "lockstep::security", file = %name, events = seqs.len(), "audit events of an interrupted run dropped");
        Ok(seqs.len() as u64)
    }
}

fn export_failed(export: &AuditExport, e: &std::io::Error) -> Error {
    Error::Unavailable(format!("audit export to {} failed: {e}; nothing was dropped", export.dir.display()))
}

/// The newest seq that retention may drop now, if any.
async fn retention_target(txn: &mut dyn Txn, r: &AuditRetention, now: i64) -> Result<(Option<u64>, Option<u64>)> {
    let (_mark, oldest, newest) = txn.audit_extent().await?;
    let (Some(oldest), Some(newest)) = (oldest, newest) else { return Ok((None, None)) };
    let micros = |d: std::time::Duration| i64::try_from(d.as_micros()).unwrap_or(i64::MAX);
    // The newest event older than `before` (seq and time grow together, up to the few
    // milliseconds between a transaction's start and its audit insert): a binary search.
    async fn newest_before(txn: &mut dyn Txn, oldest: u64, newest: u64, before: i64) -> Result<Option<u64>> {
        let (mut lo, mut hi) = (oldest, newest);
        let mut found = None;
        while lo <= hi {
            let mid = lo + (hi - lo) / 2;
            match txn.audit_time_at(mid).await? {
                Some((seq, time)) if time < before => {
                    found = Some(seq);
                    lo = seq + 1;
                }
                _ => {
                    if mid == 0 {
                        break;
                    }
                    hi = mid - 1;
                }
            }
        }
        Ok(found)
    }
    let floor = newest_before(txn, oldest, newest, now.saturating_sub(micros(r.keep_at_least))).await?;
    let by_age = match r.max_age {
        Some(age) => newest_before(txn, oldest, newest, now.saturating_sub(micros(age))).await?,
        None => None,
    };
    // Over the count by a tenth of it at least, so that each run's own audit event does not
    // start another run for one event: the log holds between the count and 1.1 times it.
    let by_count = r
        .max_events
        .and_then(|n| newest.checked_sub(n).filter(|s| *s >= oldest && *s - oldest + 1 >= (n / 10).max(10)));
    let wanted = by_age.max(by_count);
    Ok((Some(oldest), wanted.zip(floor).map(|(w, f)| w.min(f))))
}
