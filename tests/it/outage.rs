//! Fail closed: when the database cannot be had, calls answer UNAVAILABLE (or, past the
//! caller's deadline, DEADLINE_EXCEEDED) and nothing is committed; service resumes.

use crate::common::*;
use lockstep::config::StoreOptions;
use lockstep::grpc::pb;
use serde_json::json;
use sqlx::Connection;
use std::time::{Duration, Instant};
use tonic::Code;

/// Another process holds SQLite's write lock: writes answer UNAVAILABLE after the busy
/// timeout (never "database is locked"), a call with a short deadline answers
/// DEADLINE_EXCEEDED, decisions keep working (WAL readers), nothing lands, and writes
/// succeed again once the lock is gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn locked_database_fails_closed_and_recovers() {
    let s = start_with(
        Backend::Sqlite,
        StoreOptions { busy_timeout: Duration::from_millis(300), ..StoreOptions::default() },
    )
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
            pb::AuthorizeRequest { action: "UpdateItem".into(), resource: uid("Item", "doc"), context: None },
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
