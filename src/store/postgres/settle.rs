//! Settling an interrupted COMMIT (the protocol is in the module doc of `postgres`): asks
//! the database, on connections of its own (not the pool's, which may all be dead), what
//! became of a transaction.

use super::super::{StoreError, StoreResult, to_i64, to_u64};
use std::time::Duration;
use tokio::time::Instant;
use tokio_postgres::{Client, Config, NoTls};

/// A transaction about to commit, as the database knows it.
#[derive(Debug, Clone)]
pub(crate) struct Pending {
    /// `pg_current_xact_id()` as text (an `xid8`: never wraps around).
    pub xid: String,
    /// `pg_backend_pid()` of the backend running it.
    pub pid: i32,
    /// The audit event it appended: the fallback proof of its commit.
    pub audit_seq: Option<u64>,
}

/// What became of a transaction, as far as the database can tell.
enum XactStatus {
    Committed,
    Aborted,
    InProgress,
    /// Older than the commit log kept, and no audit event to look up.
    Forgotten,
}

/// A connection of its own (its driver task ends when the client is dropped).
pub(crate) async fn connect(config: &Config) -> Result<Client, tokio_postgres::Error> {
    let (client, connection) = config.connect(NoTls).await?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(client)
}

/// Asks once, on `conn` (opened first if needed), what became of `p`. A transaction still
/// in progress has its old backend ended (only while that backend still holds its xid; an
/// error there, e.g. a missing privilege, leaves it to finish by itself).
async fn ask(conn: &mut Option<Client>, config: &Config, p: &Pending) -> Result<XactStatus, tokio_postgres::Error> {
    if conn.is_none() {
        *conn = Some(connect(config).await?);
    }
    let c = conn.as_ref().expect("connected above");
    let status: Option<String> =
        c.query_one("SELECT pg_xact_status($1::text::xid8)::text", &[&p.xid]).await?.try_get(0)?;
    Ok(match status.as_deref() {
        Some("committed") => XactStatus::Committed,
        Some("aborted") => XactStatus::Aborted,
        Some(_) => {
            let ended = c
                .query_one(
                    "SELECT bool_or(pg_terminate_backend(pid)) FROM pg_stat_activity
                     WHERE pid = $2 AND backend_xid = $1::text::xid8::xid",
                    &[&p.xid, &p.pid],
                )
                .await;
            if let Err(e) = ended {
                tracing::debug!(pid = p.pid, error = %e, "cannot end the backend of an interrupted COMMIT");
            }
            XactStatus::InProgress
        }
        // Older than the commit log: nothing of it is in progress, so its audit event
        // (if it wrote one) tells.
        None => match p.audit_seq {
            None => XactStatus::Forgotten,
            Some(seq) => {
                let found = c.query_opt("SELECT 1 FROM audit WHERE seq = $1", &[&to_i64(seq)]).await?;
                if found.is_some() { XactStatus::Committed } else { XactStatus::Aborted }
            }
        },
    })
}

/// Settles an interrupted COMMIT of `p` by `until`. `cause`: why COMMIT failed, for the
/// answer.
pub(crate) async fn settle(config: &Config, p: &Pending, until: Instant, cause: &str) -> StoreResult<()> {
    let t0 = Instant::now();
    let mut conn: Option<Client> = None;
    let mut backoff = Duration::from_millis(10);
    let mut last = "no answer in time".to_owned();
    let mut asked = 0u32;
    let mut told_to_end = false;
    let committed = loop {
        asked += 1;
        let Ok(status) = tokio::time::timeout_at(until, ask(&mut conn, config, p)).await else { break None };
        match status {
            Ok(XactStatus::Committed) => break Some(true),
            Ok(XactStatus::Aborted) => break Some(false),
            Ok(XactStatus::InProgress) => {
                if !told_to_end {
                    // Its old backend was just told to end: ask again soon.
                    told_to_end = true;
                    backoff = Duration::from_millis(10);
                }
            }
            Ok(XactStatus::Forgotten) => {
                last = "its xid is older than the commit log and it wrote no audit event".into();
                break None;
            }
            Err(e) => {
                last = e.to_string();
                conn = None;
            }
        }
        let pause = backoff.min(until.saturating_duration_since(Instant::now()));
        if pause.is_zero() {
            break None;
        }
        tokio::time::sleep(pause).await;
        backoff = (backoff * 2).min(Duration::from_millis(250));
    };
    let elapsed = t0.elapsed();
    match committed {
        Some(true) => {
            tracing::warn!(xid = %p.xid, asked, ?elapsed, "COMMIT was interrupted; it committed");
            Ok(())
        }
        Some(false) => {
            tracing::warn!(xid = %p.xid, asked, ?elapsed, "COMMIT was interrupted; it did not commit");
            Err(StoreError::Unavailable(format!(
                "the connection failed during COMMIT ({cause}) and the transaction did not commit; nothing was \
                 committed, retry"
            )))
        }
        None => {
            tracing::error!(xid = %p.xid, asked, ?elapsed, error = %last, "COMMIT was interrupted; outcome unknown");
            let seq = p.audit_seq.map_or_else(|| "no audit event".to_owned(), |s| format!("audit seq {s}"));
            Err(StoreError::Unknown(format!(
                "the connection failed during COMMIT ({cause}) and the database could not tell in time whether it \
                 committed ({last}): transaction {} ({seq}) committed if `SELECT pg_xact_status('{}')` says so",
                p.xid, p.xid
            )))
        }
    }
}

/// The audit seq of committed transaction `p` whose insert's answer was lost with its
/// connection (the insert went with COMMIT): its row is the newest one it wrote
/// (`xmin`; audit rows are never updated), found from the newest row backwards. Asked
/// again, with backoff, until `until`.
pub(crate) async fn recover_seq(config: &Config, p: &Pending, until: Instant) -> StoreResult<u64> {
    let mut backoff = Duration::from_millis(10);
    loop {
        let asked = tokio::time::timeout_at(until, async {
            let c = connect(config).await.map_err(|e| e.to_string())?;
            let row = c
                .query_opt(
                    "SELECT seq FROM audit WHERE xmin = $1::text::xid8::xid ORDER BY seq DESC LIMIT 1",
                    &[&p.xid],
                )
                .await
                .map_err(|e| e.to_string())?;
            let row = row.ok_or_else(|| "no audit row of it".to_owned())?;
            row.try_get::<_, i64>(0).map_err(|e| e.to_string())
        })
        .await
        .unwrap_or_else(|_| Err("no answer in time".into()));
        let last = match asked {
            Ok(seq) => return Ok(to_u64(seq)),
            Err(e) => e,
        };
        let pause = backoff.min(until.saturating_duration_since(Instant::now()));
        if pause.is_zero() {
            return Err(StoreError::Unknown(format!(
                "transaction {} committed but its audit seq could not be read ({last}): `SELECT seq FROM \
                 lockstep.audit WHERE xmin = '{}'::xid8::xid` tells",
                p.xid, p.xid
            )));
        }
        tokio::time::sleep(pause).await;
        backoff = (backoff * 2).min(Duration::from_millis(250));
    }
}

/// Settles a speculative write whose every answer was lost with its connection (its
/// transaction id unknown): its old backend (`pid` and start time, as `pg_stat_activity`
/// names it) is ended if it still runs, and once it is gone — nothing of it can commit any
/// more — its audit row is looked for by `nonce` among the rows after `floor`. Some(seq):
/// it committed; None: it did not. Asked again, with backoff, until `until`.
pub(crate) async fn settle_unseen(
    config: &Config,
    pid: i32,
    start: &str,
    nonce: i64,
    floor: u64,
    until: Instant,
    cause: &str,
) -> StoreResult<Option<u64>> {
    let t0 = Instant::now();
    let mut backoff = Duration::from_millis(10);
    let mut conn: Option<Client> = None;
    let mut last = "no answer in time".to_owned();
    loop {
        let asked = tokio::time::timeout_at(until, async {
            if conn.is_none() {
                conn = Some(connect(config).await?);
            }
            let c = conn.as_ref().expect("connected above");
            let alive: bool = c
                .query_one(
                    "SELECT count(pg_terminate_backend(pid)) > 0 FROM pg_stat_activity
                     WHERE pid = $1 AND backend_start::text = $2",
                    &[&pid, &start],
                )
                .await?
                .try_get(0)?;
            if alive {
                return Ok::<_, tokio_postgres::Error>(None);
            }
            let row =
                c.query_opt("SELECT seq FROM audit WHERE seq > $1 AND nonce = $2", &[&to_i64(floor), &nonce]).await?;
            Ok(Some(row.map(|r| r.try_get::<_, i64>(0)).transpose()?))
        })
        .await;
        match asked {
            Ok(Ok(Some(found))) => {
                let elapsed = t0.elapsed();
                tracing::warn!(
                    nonce,
                    committed = found.is_some(),
                    ?elapsed,
                    "a one-round-trip write lost its answers; settled"
                );
                return Ok(found.map(to_u64));
            }
            // Its backend was just told to end: ask again soon.
            Ok(Ok(None)) => last = "its backend was still running".into(),
            Ok(Err(e)) => {
                last = e.to_string();
                conn = None;
            }
            Err(_) => {}
        }
        let pause = backoff.min(until.saturating_duration_since(Instant::now()));
        if pause.is_zero() {
            tracing::error!(nonce, error = %last, "a one-round-trip write lost its answers; outcome unknown");
            return Err(StoreError::Unknown(format!(
                "the connection failed during COMMIT ({cause}) and the database could not tell in time whether it \
                 committed ({last}): it committed if `SELECT seq FROM lockstep.audit WHERE seq > {floor} AND nonce = \
                 {nonce}` finds its audit event"
            )));
        }
        tokio::time::sleep(pause).await;
        backoff = (backoff * 2).min(Duration::from_millis(250));
    }
}
