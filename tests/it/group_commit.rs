//! SQLite group commit: concurrent write calls share one transaction and one fsync, each
//! in its own savepoint. A denial or an error undoes only its own call, and no call is
//! answered before its group is durable (checked by killing the server mid-stream).

use crate::common::*;
use lockstep::grpc::pb;
use serde_json::json;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;
use tonic::Code;

const WRITERS: usize = 48;
const CALLS: usize = 15;

fn item(w: usize) -> String {
    format!("gc{w}")
}

fn owner(w: usize) -> serde_json::Value {
    json!({ "__entity": { "type": "User", "id": format!("gc{w}") } })
}

/// 48 writers in parallel, in three kinds that share groups: one commits updates of its
/// own item; one sends an allowed update followed by a forbidden one (denied); one sends an
/// allowed update followed by a stale `if_version` (ABORTED). Every commit must land, and
/// nothing of a denied or aborted call — though its allowed first mutation ran in the
/// same database transaction as commits that landed.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn group_members_fail_alone() {
    let s = start(Backend::Sqlite).await.unwrap();
    for w in 0..WRITERS {
        let tok = token("k1", &item(w));
        let mut c = client(s.addr).await;
        c.authorize_and_commit(authed(
            &tok,
            commit_req(vec![create("CreateItem", "Item", &item(w), json!({ "owner": owner(w), "n": 0 }))]),
        ))
        .await
        .unwrap();
    }
    let before = s.store.group_commit_stats().unwrap();

    let mut handles = Vec::new();
    for w in 0..WRITERS {
        let addr = s.addr;
        handles.push(tokio::spawn(async move {
            let tok = token("k1", &item(w));
            let mut c = client(addr).await;
            let mut codes = Vec::new();
            for i in 0..CALLS {
                let own = update("UpdateItem", "Item", &item(w), json!({ "n": i + 1 }), None);
                let req = match w % 3 {
                    0 => commit_req(vec![own]),
                    // Someone else's item: the owner policy does not permit it.
                    1 => commit_req(vec![
                        own,
                        update("UpdateItem", "Item", &item((w + 1) % WRITERS), json!({ "x": 1 }), None),
                    ]),
                    _ => commit_req(vec![own, update("UpdateItem", "Item", &item(w), json!({ "m": 1 }), Some(999))]),
                };
                codes.push(c.authorize_and_commit(authed(&tok, req)).await.map(|r| r.into_inner().audit_seq));
            }
            (w, codes)
        }));
    }
    let mut seqs = Vec::new();
    for h in handles {
        let (w, codes) = h.await.unwrap();
        for r in codes {
            match w % 3 {
                0 => seqs.push(r.unwrap_or_else(|e| panic!("writer {w}: {e:?}"))),
                1 => assert_eq!(r.unwrap_err().code(), Code::PermissionDenied, "writer {w}"),
                _ => assert_eq!(r.unwrap_err().code(), Code::Aborted, "writer {w}"),
            }
        }
    }
    let after = s.store.group_commit_stats().unwrap();

    for w in 0..WRITERS {
        let e = read(s.addr, "Item", &item(w)).await.unwrap();
        let attrs = e.attributes.unwrap().fields;
        let n = attrs["n"].kind.clone();
        if w % 3 == 0 {
            assert_eq!(e.version, 1 + CALLS as u64, "item of writer {w}");
            assert_eq!(n, Some(prost_types::value::Kind::NumberValue(CALLS as f64)));
        } else {
            assert_eq!(e.version, 1, "a failed call of writer {w} left a write behind");
            assert_eq!(n, Some(prost_types::value::Kind::NumberValue(0.0)));
            assert!(!attrs.contains_key("m") && !attrs.contains_key("x"));
        }
    }
    let events = audit(s.addr).await;
    let by = |kind: pb::audit_event::Kind| {
        events
            .iter()
            .filter(|e| e.kind == kind as i32 && e.principal.as_ref().is_some_and(|p| p.id.starts_with("gc")))
            .count()
    };
    assert_eq!(by(pb::audit_event::Kind::Commit), WRITERS + WRITERS / 3 * CALLS);
    assert_eq!(by(pb::audit_event::Kind::Deny), WRITERS / 3 * CALLS);
    // Every acknowledged commit is in the log under the seq it was answered with.
    for seq in seqs {
        assert!(events.iter().any(|e| e.seq == seq && e.kind == pb::audit_event::Kind::Commit as i32));
    }
    let (txns, calls) = (after.transactions - before.transactions, after.calls - before.calls);
    eprintln!("group commit: {calls} write calls in {txns} SQLite transactions");
    assert!(calls > txns, "no group formed ({calls} calls, {txns} transactions): the test did not exercise grouping");
}

/// Writers commit as fast as they can against a `lockstep serve` process, which is then
/// killed (SIGKILL) mid-stream: every answered commit must be in the database when it is
/// opened again, and nothing beyond the one call each writer had in flight.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn answered_commits_survive_a_kill() {
    const KILL_WRITERS: usize = 24;
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("kill.db").display());
    bootstrap_db(&url).await;
    let (mut server, addr, ch) = serve_process(&url).await;
    let mut c = pb::lockstep_client::LockstepClient::new(ch);
    for w in 0..KILL_WRITERS {
        c.authorize_and_commit(authed(
            &token("k1", &item(w)),
            commit_req(vec![create("CreateItem", "Item", &item(w), json!({ "owner": owner(w) }))]),
        ))
        .await
        .unwrap();
    }

    let killed = Arc::new(AtomicBool::new(false));
    let mut handles = Vec::new();
    for w in 0..KILL_WRITERS {
        let killed = killed.clone();
        handles.push(tokio::spawn(async move {
            let ch = tonic::transport::Channel::from_shared(format!("http://{addr}")).unwrap().connect().await.unwrap();
            let mut c = pb::lockstep_client::LockstepClient::new(ch);
            let tok = token("k1", &item(w));
            let mut acked = 1u64;
            loop {
                let req = commit_req(vec![update("UpdateItem", "Item", &item(w), json!({ "n": acked }), Some(acked))]);
                match c.authorize_and_commit(authed(&tok, req)).await {
                    Ok(r) => acked = r.into_inner().entities[0].version,
                    Err(e) => {
                        assert!(killed.load(Ordering::SeqCst), "writer {w} failed before the kill: {e:?}");
                        return acked;
                    }
                }
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    killed.store(true, Ordering::SeqCst);
    server.kill().unwrap();
    server.wait().unwrap();
    let mut acked = Vec::new();
    for h in handles {
        acked.push(h.await.unwrap());
    }

    let store = lockstep::store::open(&url, &Default::default()).await.unwrap();
    let mut txn = store.read().await.unwrap();
    let mut total = 0;
    for (w, acked) in acked.iter().enumerate() {
        let uid = lockstep::model::Uid::new("Item", item(w));
        let version = txn.entity(&uid).await.unwrap().unwrap().version;
        assert!(
            version == *acked || version == acked + 1,
            "writer {w}: answered version {acked}, database has {version} after the kill"
        );
        total += acked - 1;
    }
    eprintln!("kill: {total} answered commits from {KILL_WRITERS} writers, all in the database after SIGKILL");
    assert!(total > KILL_WRITERS as u64, "too few commits before the kill to mean anything");
}

/// Under a steady stream of commits the writer never leaves a transaction for long, so the
/// WAL cannot start over by itself: the background checkpoint and the short one between
/// two groups must keep it near `wal_autocheckpoint` pages (here 64) instead of growing
/// with every page written.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn wal_stays_bounded_under_load() {
    let opts = lockstep::config::StoreOptions { wal_autocheckpoint: 64, ..Default::default() };
    let s = start_with(Backend::Sqlite, opts).await.unwrap();
    let wal = format!("{}-wal", s.url.trim_start_matches("sqlite://"));
    const W: usize = 16;
    for w in 0..W {
        client(s.addr)
            .await
            .authorize_and_commit(authed(
                &token("k1", &item(w)),
                commit_req(vec![create("CreateItem", "Item", &item(w), json!({ "owner": owner(w), "n": 0 }))]),
            ))
            .await
            .unwrap();
    }
    let mut handles = Vec::new();
    for w in 0..W {
        let addr = s.addr;
        handles.push(tokio::spawn(async move {
            let mut c = client(addr).await;
            let tok = token("k1", &item(w));
            let pad = "x".repeat(2000); // each commit writes a few pages
            for i in 0..150 {
                let req = commit_req(vec![update("UpdateItem", "Item", &item(w), json!({ "n": i, "pad": pad }), None)]);
                c.authorize_and_commit(authed(&tok, req)).await.unwrap();
            }
        }));
    }
    let mut largest = 0;
    while !handles.iter().all(|h| h.is_finished()) {
        largest = largest.max(std::fs::metadata(&wal).map(|m| m.len()).unwrap_or(0));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for h in handles {
        h.await.unwrap();
    }
    let db = std::fs::metadata(s.url.trim_start_matches("sqlite://")).unwrap().len();
    eprintln!("wal: largest {largest} bytes during 2,400 commits (database {db} bytes)");
    assert!(largest < 4 * 1024 * 1024, "the WAL grew to {largest} bytes with a 64-page checkpoint threshold");
}
