//! Fail closed: when the database cannot be had, calls answer UNAVAILABLE (or, past the
//! caller's deadline, DEADLINE_EXCEEDED) and nothing is committed; service resumes. A
//! connection cut during COMMIT itself is settled: the answer is the real outcome.

use crate::common::*;
use lockstep::config::StoreOptions;
use lockstep::grpc::pb;
use serde_json::json;
use sqlx::Connection;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tonic::Code;

/// Another process holds SQLite's write lock: writes answer UNAVAILABLE after the busy
/// timeout (never "database is locked"), a call with a short deadline answers
/// DEADLINE_EXCEEDED, decisions keep working (WAL readers), nothing lands, and writes
/// succeed again once the lock is gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn locked_database_fails_closed_and_recovers() {
    locked_database(Backend::Sqlite).await
}

/// The same with the entities in the application's tables.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn locked_database_fails_closed_and_recovers_mapped() {
    locked_database(Backend::SqliteMapped).await
}

async fn locked_database(b: Backend) {
    let s = start_with(b, StoreOptions { busy_timeout: Duration::from_millis(300), ..StoreOptions::default() })
        .await
        .unwrap();
    let tok = token("k1", "alice");
    let mut c = client(s.addr).await;
    let m = || commit_req(vec![update("UpdateItem", "Item", "doc", json!({ "n": 1 }), None)]);

    let mut other = sqlx::SqliteConnection::connect(&s.url).await.unwrap();
    sqlx::query("BEGIN EXCLUSIVE").execute(&mut other).await.unwrap();

    let t0 = Instant::now();
    let e = c.authorize_and_commit(authed(&tok, m())).await.unwrap_err();
    assert_eq!(e.code(), Code::Unavailable, "{e:?}");
    assert!(!e.message().contains("locked"), "{}", e.message());
    assert!(t0.elapsed() < Duration::from_secs(5));
    let e = c.revoke_token(authed(&tok, pb::RevokeTokenRequest::default())).await.unwrap_err();
    assert_eq!(e.code(), Code::Unavailable);

    let mut short = authed(&tok, m());
    short.set_timeout(Duration::from_millis(150));
    let e = c.authorize_and_commit(short).await.unwrap_err();
    assert_eq!(e.code(), Code::DeadlineExceeded, "{e:?}");

    let d = c
        .authorize(authed(
            &tok,
            pb::AuthorizeRequest { action: "ReadItem".into(), resource: uid("Item", "doc"), context: None },
        ))
        .await
        .unwrap();
    assert_eq!(d.into_inner().decision, pb::Decision::Allow as i32);

    sqlx::query("ROLLBACK").execute(&mut other).await.unwrap();
    drop(other);
    let r = c.authorize_and_commit(authed(&tok, m())).await.unwrap().into_inner();
    assert_eq!(r.entities[0].version, 2, "none of the refused calls committed");
    let commits = audit(s.addr)
        .await
        .iter()
        .filter(|e| e.kind == pb::audit_event::Kind::Commit as i32 && e.principal.is_some())
        .count();
    assert_eq!(commits, 1);
}

/// A TCP proxy in front of PostgreSQL that the test can cut and restore.
struct Proxy {
    addr: std::net::SocketAddr,
    cut: Arc<AtomicBool>,
    conns: Arc<Mutex<Vec<tokio::task::AbortHandle>>>,
}

impl Proxy {
    async fn start(upstream: std::net::SocketAddr) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let cut = Arc::new(AtomicBool::new(false));
        let conns: Arc<Mutex<Vec<tokio::task::AbortHandle>>> = Arc::default();
        let (c, cs) = (cut.clone(), conns.clone());
        tokio::spawn(async move {
            loop {
                let Ok((mut inbound, _)) = listener.accept().await else { return };
                if c.load(Ordering::SeqCst) {
                    continue; // dropped: connection refused in effect
                }
                let task = tokio::spawn(async move {
                    if let Ok(mut out) = tokio::net::TcpStream::connect(upstream).await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut out).await;
                    }
                });
                cs.lock().unwrap().push(task.abort_handle());
            }
        });
        Self { addr, cut, conns }
    }

    fn cut(&self) {
        self.cut.store(true, Ordering::SeqCst);
        for c in self.conns.lock().unwrap().drain(..) {
            c.abort();
        }
    }

    fn restore(&self) {
        self.cut.store(false, Ordering::SeqCst);
    }
}

async fn health(addr: std::net::SocketAddr, service: &str) -> Option<i32> {
    let ch = tonic::transport::Channel::from_shared(format!("http://{addr}")).ok()?.connect().await.ok()?;
    let mut h = tonic_health::pb::health_client::HealthClient::new(ch);
    let r = h.check(tonic_health::pb::HealthCheckRequest { service: service.into() }).await.ok()?;
    Some(r.into_inner().status)
}

async fn wait_health(
    addr: std::net::SocketAddr,
    want: tonic_health::pb::health_check_response::ServingStatus,
) -> Duration {
    let t0 = Instant::now();
    loop {
        let a = health(addr, "").await;
        let b = health(addr, "lockstep.v1.Lockstep").await;
        if a == Some(want as i32) && b == Some(want as i32) {
            return t0.elapsed();
        }
        assert!(t0.elapsed() < Duration::from_secs(15), "health did not become {want:?}: {a:?} {b:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// PostgreSQL cut off (a proxy drops every connection and refuses new ones), then its
/// connections killed with pg_terminate_backend under load: every call answers
/// UNAVAILABLE within the acquire timeout, never hangs, never allows; Authorize answers
/// UNAVAILABLE, not DENY; health says NOT_SERVING for "" and "lockstep.v1.Lockstep";
/// nothing answered UNAVAILABLE was committed; service comes back by itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_outage_fails_closed_and_recovers() {
    postgres_outage(Backend::Postgres).await
}

/// The same with the entities in the application's tables.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_outage_fails_closed_and_recovers_mapped() {
    postgres_outage(Backend::PostgresMapped).await
}

async fn postgres_outage(b: Backend) {
    use tonic_health::pb::health_check_response::ServingStatus;
    let Some(db) = TestDb::new(b).await else { return };
    let db = Arc::new(db);
    bootstrap_db(&db.url).await;
    let proxy = Proxy::start("127.0.0.1:5432".parse().unwrap()).await;
    let name = db.url.rsplit('/').next().unwrap().to_owned();
    let url = format!("postgres://postgres@{}/{name}", proxy.addr);
    let opts = StoreOptions {
        mapping: mapping_for(&db.url),
        acquire_timeout: Duration::from_millis(1000),
        statement_timeout: Duration::from_millis(2000),
        ..StoreOptions::default()
    };
    let s = serve_url(&url, opts, Some(db.clone())).await;
    wait_health(s.addr, ServingStatus::Serving).await;

    // Writers: each call sets a unique `n`, so the audit log tells which ones committed.
    let stop = Arc::new(AtomicBool::new(false));
    let mut writers = Vec::new();
    for w in 0..4i64 {
        let (addr, stop) = (s.addr, stop.clone());
        writers.push(tokio::spawn(async move {
            let mut c = client(addr).await;
            let tok = token("k1", "alice");
            let mut out = Vec::new();
            let mut i = 0i64;
            while !stop.load(Ordering::SeqCst) {
                let n = w * 1_000_000 + i;
                i += 1;
                let t0 = Instant::now();
                let r = c
                    .authorize_and_commit(authed(
                        &tok,
                        commit_req(vec![update("UpdateItem", "Item", "doc", json!({ "n": n }), None)]),
                    ))
                    .await;
                out.push((n, r.map(|r| r.into_inner().audit_seq).map_err(|e| e.code()), t0.elapsed()));
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            out
        }));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;

    // 1. Cut the network.
    proxy.cut();
    let to_not_serving = wait_health(s.addr, ServingStatus::NotServing).await;
    let mut c = client(s.addr).await;
    let t0 = Instant::now();
    let e = c
        .authorize(authed(
            &token("k1", "alice"),
            pb::AuthorizeRequest { action: "ReadItem".into(), resource: uid("Item", "doc"), context: None },
        ))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unavailable, "Authorize must not answer DENY or OK: {e:?}");
    assert!(t0.elapsed() < Duration::from_secs(3), "took {:?}", t0.elapsed());
    tokio::time::sleep(Duration::from_millis(1500)).await;

    // 2. Restore: service resumes by itself.
    proxy.restore();
    let to_serving = wait_health(s.addr, ServingStatus::Serving).await;
    let t0 = Instant::now();
    loop {
        let r = c
            .authorize_and_commit(authed(
                &token("k1", "alice"),
                commit_req(vec![update("UpdateItem", "Item", "doc", json!({ "probe": 1 }), None)]),
            ))
            .await;
        if r.is_ok() {
            break;
        }
        assert!(t0.elapsed() < Duration::from_secs(10), "no recovery: {r:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let recovery = t0.elapsed();

    // 3. Kill the server's connections mid-load.
    tokio::time::sleep(Duration::from_millis(300)).await;
    {
        use sqlx::Connection;
        let mut admin_conn = sqlx::PgConnection::connect(&pg_admin_url()).await.unwrap();
        let killed: i64 = sqlx::query_scalar(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE datname = $1 AND application_name = 'lockstep'",
        )
        .bind(&name)
        .fetch_one(&mut admin_conn)
        .await
        .unwrap();
        eprintln!("outage: pg_terminate_backend killed {killed} connections");
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    stop.store(true, Ordering::SeqCst);
    let mut calls = Vec::new();
    for w in writers {
        calls.extend(w.await.unwrap());
    }

    // Every answer was OK or UNAVAILABLE (UNKNOWN only for a lost COMMIT acknowledgement
    // that could not be settled in time), none took longer than the timeouts allow.
    let slowest = calls.iter().map(|c| c.2).max().unwrap();
    assert!(slowest < Duration::from_secs(6), "a call hung for {slowest:?}");
    let bad: Vec<_> = calls
        .iter()
        .filter(|c| matches!(c.1, Err(code) if code != Code::Unavailable && code != Code::Unknown))
        .collect();
    assert!(bad.is_empty(), "unexpected answers: {bad:?}");
    let unavailable: std::collections::HashSet<i64> =
        calls.iter().filter(|c| c.1 == Err(Code::Unavailable)).map(|c| c.0).collect();
    let ok_seqs: Vec<u64> = calls.iter().filter_map(|c| c.1.ok()).collect();
    assert!(!unavailable.is_empty(), "the outage was not seen by the writers");
    // The audit log: no UNAVAILABLE call committed; every OK one did.
    let events = audit(s.addr).await;
    let committed_ns: std::collections::HashSet<i64> = events
        .iter()
        .filter(|e| e.kind == pb::audit_event::Kind::Commit as i32 && e.principal.is_some())
        .filter_map(|e| match e.mutations[0].change.as_ref()? {
            pb::mutation::Change::Update(u) => match u.merge_patch.as_ref()?.fields.get("n")?.kind {
                Some(prost_types::value::Kind::NumberValue(n)) => Some(n as i64),
                _ => None,
            },
            _ => None,
        })
        .collect();
    let lying: Vec<_> = unavailable.intersection(&committed_ns).collect();
    assert!(lying.is_empty(), "calls answered UNAVAILABLE were committed: {lying:?}");
    let seqs: std::collections::HashSet<u64> = events.iter().map(|e| e.seq).collect();
    assert!(ok_seqs.iter().all(|s| seqs.contains(s)), "an OK call is missing from the audit log");
    eprintln!(
        "outage: calls={} ok={} unavailable={} not_serving_after={to_not_serving:?} serving_again_after={to_serving:?} first_write_after_restore={recovery:?} slowest_call={slowest:?}",
        calls.len(),
        ok_seqs.len(),
        unavailable.len()
    );
}

/// A call whose deadline passes while its transaction waits (here: on a policy-table lock
/// held by another session) answers DEADLINE_EXCEEDED, and nothing it did remains: its
/// transaction is rolled back, the entity is unchanged, and no audit event was written.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_deadline_mid_transaction_rolls_back() {
    postgres_deadline_mid_transaction(Backend::Postgres).await
}

/// The same with the entities in the application's tables.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_deadline_mid_transaction_rolls_back_mapped() {
    postgres_deadline_mid_transaction(Backend::PostgresMapped).await
}

async fn postgres_deadline_mid_transaction(b: Backend) {
    use sqlx::Connection;
    let Some(s) = start(b).await else { return };
    let tok = token("k1", "alice");
    let mut c = client(s.addr).await;
    let before = audit(s.addr).await.len();
    let mut blocker = sqlx::PgConnection::connect(&s.url).await.unwrap();
    sqlx::query("BEGIN").execute(&mut blocker).await.unwrap();
    sqlx::query("LOCK TABLE lockstep.policies IN ACCESS EXCLUSIVE MODE").execute(&mut blocker).await.unwrap();

    let mut req = authed(&tok, commit_req(vec![update("UpdateItem", "Item", "doc", json!({ "n": 99 }), None)]));
    req.set_timeout(Duration::from_millis(400));
    let t0 = Instant::now();
    let e = c.authorize_and_commit(req).await.unwrap_err();
    assert_eq!(e.code(), Code::DeadlineExceeded, "{e:?}");
    assert!(t0.elapsed() < Duration::from_secs(2));

    sqlx::query("ROLLBACK").execute(&mut blocker).await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let doc = read(s.addr, "Item", "doc").await.unwrap();
    assert_eq!(doc.version, 1, "the timed-out write remained");
    assert_eq!(audit(s.addr).await.len(), before, "the timed-out call left an audit event");
    // And the server is fine afterwards.
    c.authorize_and_commit(authed(
        &tok,
        commit_req(vec![update("UpdateItem", "Item", "doc", json!({ "n": 1 }), None)]),
    ))
    .await
    .unwrap();
}

/// A caller that gives up on a write (its client resets the stream while the transaction
/// waits, here on a policy-table lock) does not cancel it: the server runs the call to its
/// outcome, which the audit log records, as the README says ("the answer of a write is its
/// outcome"; a reset only loses the answer). Several calls at once, each on its own item.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_a_write_whose_caller_went_away_still_runs_to_its_outcome() {
    let Some(s) = start(Backend::Postgres).await else { return };
    let tok = token("k2", "root");
    let before = audit(s.addr).await.len();
    let mut blocker = sqlx::PgConnection::connect(&s.url).await.unwrap();
    sqlx::query("BEGIN").execute(&mut blocker).await.unwrap();
    sqlx::query("LOCK TABLE lockstep.policies IN ACCESS EXCLUSIVE MODE").execute(&mut blocker).await.unwrap();

    let mut gave_up = Vec::new();
    for i in 0..8 {
        let addr = s.addr;
        let tok = tok.clone();
        gave_up.push(tokio::spawn(async move {
            let mut c = raw_client(addr);
            let item = if i % 2 == 0 { "doc" } else { "shared" };
            let req = authed(&tok, commit_req(vec![update("UpdateItem", "Item", item, json!({ "n": i }), None)]));
            // No deadline: the caller drops the call itself (an RST_STREAM).
            tokio::time::timeout(Duration::from_millis(300), c.authorize_and_commit(req)).await.is_err()
        }));
    }
    for g in gave_up {
        assert!(g.await.unwrap(), "a call returned while its transaction was blocked");
    }
    sqlx::query("ROLLBACK").execute(&mut blocker).await.unwrap();
    let t0 = Instant::now();
    let mut events = audit(s.addr).await.len() - before;
    while events < 8 && t0.elapsed() < Duration::from_secs(10) {
        tokio::time::sleep(Duration::from_millis(50)).await;
        events = audit(s.addr).await.len() - before;
    }
    assert_eq!(events, 8, "calls whose callers went away were cancelled by the server");
    let versions =
        read(s.addr, "Item", "doc").await.unwrap().version + read(s.addr, "Item", "shared").await.unwrap().version;
    let base = 2; // each item starts at version 1
    assert_eq!(versions - base, 8, "every write that was audited must have landed");
}

/// Where `CommitCutter` cuts the connection that sends COMMIT.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Cut {
    /// COMMIT reaches PostgreSQL; its answer never reaches the client.
    AfterCommitSent,
    /// COMMIT never reaches PostgreSQL.
    BeforeCommitSent,
}

/// A TCP proxy in front of PostgreSQL that, once armed, cuts the first connection on which
/// the client sends COMMIT (the simple-query message sqlx sends for it) and every other
/// connection through it, then refuses new connections for `outage`: the database is
/// "back" after that.
struct CommitCutter {
    addr: std::net::SocketAddr,
    armed: Arc<Mutex<Option<Cut>>>,
    outage: Duration,
    refuse_until: Arc<Mutex<Option<Instant>>>,
    cuts: Arc<std::sync::atomic::AtomicUsize>,
}

/// `Q`, length 11, "COMMIT\0".
const COMMIT_MSG: &[u8] = b"Q\0\0\0\x0bCOMMIT\0";

impl CommitCutter {
    /// Cuts at the first COMMIT, after arming, of a connection that has carried `marker`
    /// (the call under test's patch): the server's own transactions (housekeeping at start,
    /// checks) pass untouched whenever they run.
    async fn start(upstream: std::net::SocketAddr, outage: Duration, marker: &str) -> Self {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let armed: Arc<Mutex<Option<Cut>>> = Arc::default();
        let refuse_until: Arc<Mutex<Option<Instant>>> = Arc::default();
        let cuts: Arc<std::sync::atomic::AtomicUsize> = Arc::default();
        let conns: Arc<Mutex<Vec<tokio::task::AbortHandle>>> = Arc::default();
        let (a, r, n) = (armed.clone(), refuse_until.clone(), cuts.clone());
        let marker: Arc<Vec<u8>> = Arc::new(marker.as_bytes().to_vec());
        tokio::spawn(async move {
            loop {
                let Ok((inbound, _)) = listener.accept().await else { return };
                if r.lock().unwrap().is_some_and(|t| Instant::now() < t) {
                    continue; // dropped: the database is away
                }
                let Ok(out) = tokio::net::TcpStream::connect(upstream).await else { continue };
                let (mut ci, mut co) = inbound.into_split();
                let (mut ui, mut uo) = out.into_split();
                let s2c = tokio::spawn(async move {
                    let _ = tokio::io::copy(&mut ui, &mut co).await;
                });
                let s2c_handle = s2c.abort_handle();
                let (a, r, n, all, marker) = (a.clone(), r.clone(), n.clone(), conns.clone(), marker.clone());
                let c2s = tokio::spawn(async move {
                    let mut buf = vec![0u8; 64 * 1024];
                    let mut marked = false;
                    while let Ok(len @ 1..) = ci.read(&mut buf).await {
                        let chunk = &buf[..len];
                        marked |= chunk.windows(marker.len()).any(|w| w == marker.as_slice());
                        let cut = if marked && chunk.windows(COMMIT_MSG.len()).any(|w| w == COMMIT_MSG) {
                            a.lock().unwrap().take()
                        } else {
                            None
                        };
                        if cut.is_some() {
                            // First stop relaying answers: the reply to this COMMIT must
                            // never reach the client (PostgreSQL can answer within
                            // microseconds of receiving it).
                            s2c.abort();
                        }
                        if cut == Some(Cut::AfterCommitSent) && uo.write_all(chunk).await.is_err() {
                            break;
                        }
                        if let Some(cut) = cut {
                            *r.lock().unwrap() = Some(Instant::now() + outage);
                            n.fetch_add(1, Ordering::SeqCst);
                            // Every other connection goes; this one's client side goes
                            // now, its server side stays open a while, so that PostgreSQL
                            // surely reads the COMMIT it was sent.
                            let me = tokio::task::id();
                            for h in all.lock().unwrap().drain(..).filter(|h| h.id() != me) {
                                h.abort();
                            }
                            s2c.abort();
                            drop(ci);
                            if cut == Cut::AfterCommitSent {
                                tokio::time::sleep(Duration::from_secs(3)).await;
                            }
                            return;
                        }
                        if uo.write_all(chunk).await.is_err() {
                            break;
                        }
                    }
                    s2c.abort();
                });
                conns.lock().unwrap().extend([c2s.abort_handle(), s2c_handle]);
            }
        });
        Self { addr, armed, outage, refuse_until, cuts }
    }

    fn arm(&self, cut: Cut) {
        *self.armed.lock().unwrap() = Some(cut);
    }
}

/// What a commit cut during COMMIT answered, and what the database holds afterwards.
struct CutOutcome {
    answer: Result<u64, tonic::Status>,
    took: Duration,
    /// The entity's version before the cut call.
    base: i64,
    /// Audit events and entity versions carrying the call's marker, read directly.
    events: i64,
    version: i64,
}

/// A server behind a `CommitCutter`; one warm-up commit, then one commit (patch `marker`,
/// deadline 5 s) whose COMMIT is cut as `cut` says (`slow`: see `cut_during`).
async fn cut_during_commit(cut: Cut, marker: &str, slow: bool) -> Option<CutOutcome> {
    cut_during(cut, marker, false, slow).await
}

/// `cut_during_commit`; `speculative`: on the smallest pool (two connections), warmed up until its
/// writes are speculative (one round trip: BEGIN, locks, the write and COMMIT sent together,
/// so that the cut loses every answer, the write's included).
/// `slow`: COMMIT of the call under test takes 1.5 s (a deferred constraint trigger sleeps
/// for writes carrying `marker`, on this test database only).
async fn cut_during(cut: Cut, marker: &str, speculative: bool, slow: bool) -> Option<CutOutcome> {
    let db = Arc::new(TestDb::new(Backend::Postgres).await?);
    bootstrap_db(&db.url).await;
    let mut direct = sqlx::PgConnection::connect(&db.url).await.unwrap();
    if slow {
        let trigger = format!(
            "CREATE FUNCTION slow_commit() RETURNS trigger LANGUAGE plpgsql AS $$
             BEGIN PERFORM pg_sleep(1.5); RETURN NULL; END $$;
             CREATE CONSTRAINT TRIGGER slow_commit AFTER INSERT ON lockstep.audit DEFERRABLE INITIALLY DEFERRED
             FOR EACH ROW WHEN (NEW.mutations LIKE '%{marker}%') EXECUTE FUNCTION slow_commit()"
        );
        sqlx::raw_sql(sqlx::AssertSqlSafe(trigger)).execute(&mut direct).await.unwrap();
    }
    let proxy = CommitCutter::start("127.0.0.1:5432".parse().unwrap(), Duration::from_millis(400), marker).await;
    let name = db.url.rsplit('/').next().unwrap().to_owned();
    // Plaintext, so that the proxy can see the COMMIT message.
    let url = format!("postgres://postgres@{}/{name}?sslmode=disable", proxy.addr);
    let opts =
        if speculative { StoreOptions { max_connections: 1, ..StoreOptions::default() } } else { Default::default() };
    let s = serve_url(&url, opts, Some(db.clone())).await;
    let tok = token("k1", "alice");
    let mut c = client(s.addr).await;
    // A pool's connection speculates once it has made a full write (which asks its
    // backend), and a token's first write reads in full anyway: speculative writes warm up
    // until three in a row were speculative (their audit rows carry a nonce), so that every
    // connection of the pool (two) has made its full write, whatever the order it is lent in.
    let (mut warm_ups, mut in_a_row) = (0i64, 0);
    while warm_ups < 1 || (speculative && in_a_row < 3) {
        assert!(warm_ups < 30, "no three speculative writes in a row after {warm_ups} writes");
        c.authorize_and_commit(authed(
            &tok,
            commit_req(vec![update("UpdateItem", "Item", "doc", json!({ "w": warm_ups }), None)]),
        ))
        .await
        .unwrap();
        warm_ups += 1;
        if speculative {
            let last: Option<i64> = sqlx::query_scalar("SELECT nonce FROM lockstep.audit ORDER BY seq DESC LIMIT 1")
                .fetch_one(&mut direct)
                .await
                .unwrap();
            in_a_row = if last.is_some() { in_a_row + 1 } else { 0 };
        }
    }
    let base = 1 + warm_ups;

    proxy.arm(cut);
    let mut req = authed(&tok, commit_req(vec![update("UpdateItem", "Item", "doc", json!({ "title": marker }), None)]));
    req.set_timeout(Duration::from_secs(5));
    let t0 = Instant::now();
    let answer = c.authorize_and_commit(req).await.map(|r| r.into_inner().audit_seq);
    let took = t0.elapsed();
    assert_eq!(proxy.cuts.load(Ordering::SeqCst), 1, "the proxy never saw the COMMIT: {answer:?}");
    assert!(took >= proxy.outage / 2, "answered before the database was back ({took:?}): {answer:?}");
    assert!(proxy.refuse_until.lock().unwrap().is_some());
    // Long enough for anything still running on the old backend to have finished.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let like = format!("%{marker}%");
    let events: i64 = sqlx::query_scalar("SELECT count(*) FROM lockstep.audit WHERE mutations LIKE $1")
        .bind(&like)
        .fetch_one(&mut direct)
        .await
        .unwrap();
    let version: i64 = sqlx::query_scalar("SELECT version FROM lockstep.entities WHERE etype = 'Item' AND eid = 'doc'")
        .fetch_one(&mut direct)
        .await
        .unwrap();
    eprintln!("commit cut {cut:?}: answer={answer:?} took={took:?} events={events} version={version}");
    Some(CutOutcome { answer, took, base, events, version })
}

/// The answer of a commit whose COMMIT was cut is its real outcome: OK with the write
/// there, or UNAVAILABLE with nothing of it there; never UNKNOWN when the database is back
/// before the deadline.
fn assert_real_outcome(o: &CutOutcome) {
    match &o.answer {
        Ok(_) => {
            assert_eq!((o.events, o.version), (1, o.base + 1), "answered OK but the write is not there");
        }
        Err(e) => {
            assert_eq!(e.code(), Code::Unavailable, "not the real outcome: {e:?}");
            assert!(e.message().contains("did not commit"), "{}", e.message());
            assert_eq!((o.events, o.version), (0, o.base), "answered UNAVAILABLE but the write landed");
        }
    }
    assert!(o.took < Duration::from_millis(4500), "settling outlived the deadline: {:?}", o.took);
}

/// The connection dies right after COMMIT went out (PostgreSQL commits, the client never
/// hears it) and the database is unreachable for 400 ms: the call settles as OK, not
/// UNKNOWN, and the write is there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_commit_cut_after_commit_sent_settles_ok() {
    let Some(o) = cut_during_commit(Cut::AfterCommitSent, "cut_after", false).await else { return };
    assert_real_outcome(&o);
    assert!(o.answer.is_ok(), "{:?}", o.answer);
}

/// The connection dies as COMMIT is sent, before PostgreSQL gets it: the call settles as
/// UNAVAILABLE ("did not commit"), not UNKNOWN, and nothing of it is there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_commit_cut_before_commit_sent_settles_unavailable() {
    let Some(o) = cut_during_commit(Cut::BeforeCommitSent, "cut_before", false).await else { return };
    assert_real_outcome(&o);
    assert!(o.answer.is_err(), "{:?}", o.answer);
}

/// COMMIT takes 1.5 s (a deferred constraint trigger sleeps, on this test database only)
/// and the connection dies right after it went out: when the database is back the old
/// backend is still committing. An audit-row lookup would find nothing yet and answer
/// UNAVAILABLE for a write that lands a second later; settling by transaction id gives the
/// real outcome.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_commit_still_running_when_the_database_is_back() {
    let Some(o) = cut_during_commit(Cut::AfterCommitSent, "slow_commit", true).await else { return };
    assert_real_outcome(&o);
}

/// A speculative write (one round trip) whose connection dies right after it went out:
/// every answer is lost, its transaction id included. It is settled by its audit row's
/// nonce once its old backend is gone: OK, and the write is there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_speculative_write_cut_after_it_was_sent_settles_ok() {
    let Some(o) = cut_during(Cut::AfterCommitSent, "spec_cut_after", true, false).await else { return };
    assert_real_outcome(&o);
    assert!(o.answer.is_ok(), "{:?}", o.answer);
}

/// The same write cut before PostgreSQL got it: UNAVAILABLE ("did not commit"), nothing there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_speculative_write_cut_before_it_was_sent_settles_unavailable() {
    let Some(o) = cut_during(Cut::BeforeCommitSent, "spec_cut_before", true, false).await else { return };
    assert_real_outcome(&o);
    assert!(o.answer.is_err(), "{:?}", o.answer);
}

/// The speculative write's COMMIT takes 1.5 s (a deferred trigger sleeps) and its
/// connection dies right after it went out: when the database is back its old backend is
/// still committing; it is ended first (or finishes), and the answer is what became of it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_speculative_write_still_running_when_the_database_is_back() {
    let Some(o) = cut_during(Cut::AfterCommitSent, "spec_slow", true, true).await else { return };
    assert_real_outcome(&o);
}

/// Begins a transaction on `c` that has written a row; its xid and backend pid.
async fn begin_scratch(c: &mut sqlx::PgConnection) -> (String, i32) {
    sqlx::query("BEGIN").execute(&mut *c).await.unwrap();
    sqlx::query_as("INSERT INTO scratch VALUES (1) RETURNING pg_current_xact_id()::text, pg_backend_pid()")
        .fetch_one(&mut *c)
        .await
        .unwrap()
}

/// `PgStore::settle` on transactions held by a connection of the test: committed is OK,
/// rolled back is UNAVAILABLE, one still in progress has its backend ended and is then
/// UNAVAILABLE (aborted), and with the database unreachable the answer is UNKNOWN once
/// the time is up, not before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_settle_by_transaction_id() {
    use lockstep::store::StoreError;
    use lockstep::store::postgres::PgStore;
    let Some(db) = TestDb::new(Backend::Postgres).await else { return };
    let proxy = Proxy::start("127.0.0.1:5432".parse().unwrap()).await;
    let name = db.url.rsplit('/').next().unwrap().to_owned();
    let store =
        PgStore::open(&format!("postgres://postgres@{}/{name}", proxy.addr), &StoreOptions::default()).await.unwrap();
    let mut holder = sqlx::PgConnection::connect(&db.url).await.unwrap();
    sqlx::query("CREATE TABLE scratch (x int)").execute(&mut holder).await.unwrap();
    let soon = || tokio::time::Instant::now() + Duration::from_secs(3);

    let (xid, pid) = begin_scratch(&mut holder).await;
    sqlx::query("COMMIT").execute(&mut holder).await.unwrap();
    assert!(store.settle(&xid, pid, None, soon()).await.is_ok(), "committed");

    let (xid, pid) = begin_scratch(&mut holder).await;
    sqlx::query("ROLLBACK").execute(&mut holder).await.unwrap();
    assert!(matches!(store.settle(&xid, pid, None, soon()).await, Err(StoreError::Unavailable(_))), "rolled back");

    // In progress: the holder keeps its transaction open (as a backend whose client is
    // gone would); settling ends that backend and reports what that made of it.
    let (xid, pid) = begin_scratch(&mut holder).await;
    let r = store.settle(&xid, pid, None, soon()).await;
    assert!(matches!(r, Err(StoreError::Unavailable(_))), "in progress, then ended: {r:?}");
    assert!(sqlx::query("SELECT 1").execute(&mut holder).await.is_err(), "the holder's backend still runs");
    let mut check = sqlx::PgConnection::connect(&db.url).await.unwrap();
    let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM scratch").fetch_one(&mut check).await.unwrap();
    assert_eq!(rows, 1, "only the committed row is there");
    let gone: bool = sqlx::query_scalar("SELECT NOT EXISTS (SELECT 1 FROM pg_stat_activity WHERE pid = $1)")
        .bind(pid)
        .fetch_one(&mut check)
        .await
        .unwrap();
    assert!(gone);

    // Unreachable: UNKNOWN when the time is up.
    proxy.cut();
    let t0 = Instant::now();
    let until = tokio::time::Instant::now() + Duration::from_millis(500);
    let r = store.settle(&xid, pid, Some(7), until).await;
    assert!(matches!(&r, Err(StoreError::Unknown(m)) if m.contains(&xid) && m.contains("audit seq 7")), "{r:?}");
    assert!(t0.elapsed() >= Duration::from_millis(450) && t0.elapsed() < Duration::from_secs(2), "{:?}", t0.elapsed());
}
