//! The stores' entity graph read, directly: ancestors are followed transitively, cycles
//! end, and the answer is the same for a few start uids (bound values on SQLite) and for
//! many (a JSON array); and on PostgreSQL every call reads its rows by key, whatever
//! plan the server's prepared statements settle on.

use crate::common::*;
use lockstep::grpc::pb;
use lockstep::model::{EntityRecord, Uid};
use serde_json::json;
use std::collections::BTreeSet;
use std::time::Duration;

async fn ancestors_few_and_many(b: Backend) {
    let Some(db) = TestDb::new(b).await else { return };
    let store = lockstep::store::open(&db.url, &Default::default()).await.unwrap();
    let g = |i: usize| Uid::new("Group", format!("g{i}"));
    let entity = |uid: Uid, parents: Vec<Uid>| EntityRecord {
        uid,
        attributes: Default::default(),
        parents,
        version: 1,
        tags: Default::default(),
    };
    let mut txn = store.write().await.unwrap();
    // g0 -> g1 -> g2 -> g0 (a cycle), g3 alone; u0..u11 each in g(i % 4).
    for (i, parents) in [vec![g(1)], vec![g(2)], vec![g(0)], vec![]].into_iter().enumerate() {
        txn.insert_entity(&entity(g(i), parents)).await.unwrap();
    }
    let users: Vec<Uid> = (0..12).map(|i| Uid::new("User", format!("u{i}"))).collect();
    for (i, u) in users.iter().enumerate() {
        txn.insert_entity(&entity(u.clone(), vec![g(i % 4)])).await.unwrap();
    }
    txn.commit().await.unwrap();

    let mut txn = store.read().await.unwrap();
    let ids = |v: Vec<EntityRecord>| v.into_iter().map(|e| e.uid.to_string()).collect::<BTreeSet<_>>();
    let few = ids(txn.entities_with_ancestors(&[users[0].clone(), Uid::new("Item", "missing")]).await.unwrap());
    let want: BTreeSet<String> = [users[0].clone(), g(0), g(1), g(2)].iter().map(ToString::to_string).collect();
    assert_eq!(few, want);
    let many = ids(txn.entities_with_ancestors(&users).await.unwrap());
    assert_eq!(many.len(), 12 + 4, "{many:?}");
    let lone = ids(txn.entities_with_ancestors(&[users[3].clone()]).await.unwrap());
    assert_eq!(lone, [users[3].to_string(), g(3).to_string()].into_iter().collect());
}

crate::on_all_backends!(ancestors_few_and_many);

/// Every call a token makes reads its rows by key on PostgreSQL, whatever plan the server
/// settles on for its prepared statements: with 1,500 entities (analyzed), a
/// generic plan once joined the list of entities to read to a scan of the whole table,
/// one per Authorize. Counted by PostgreSQL's own statistics (`seq_scan`), before and after
/// 60 calls of each kind by one token.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_reads_by_key_whatever_the_plan() {
    let Some(s) = start(Backend::Postgres).await else { return };
    let store = lockstep::store::open(&s.url, &opts_for(&s.url, Default::default())).await.unwrap();
    let op = lockstep::engine::Engine::new(store, Default::default());
    let filler: Vec<EntityRecord> = (0..1500)
        .map(|i| EntityRecord {
            uid: Uid::new("Item", format!("filler{i}")),
            attributes: Default::default(),
            parents: vec![],
            version: 1,
            tags: Default::default(),
        })
        .collect();
    for chunk in filler.chunks(500) {
        op.import_entities(chunk.to_vec()).await.unwrap();
    }
    app_sql(&s.url, "ANALYZE lockstep.entities; ANALYZE lockstep.audit;").await;
    let scans = || async {
        use sqlx::Connection;
        let mut c = sqlx::PgConnection::connect(&s.url).await.unwrap();
        let rows: Vec<(String, i64, i64)> = sqlx::query_as(
            "SELECT relname::text, coalesce(seq_scan, 0), coalesce(idx_scan, 0) FROM pg_stat_user_tables
             WHERE schemaname = 'lockstep' AND relname IN ('entities', 'audit') ORDER BY 1",
        )
        .fetch_all(&mut c)
        .await
        .unwrap();
        rows
    };
    // Statistics reach the views when a backend is idle for a second or so: wait until
    // the figures stand still.
    let settled = || async {
        let mut last = scans().await;
        loop {
            tokio::time::sleep(Duration::from_millis(1500)).await;
            let now = scans().await;
            if now == last {
                return now;
            }
            last = now;
        }
    };
    let before = settled().await;
    let mut c = client(s.addr).await;
    let alice = token("k1", "alice");
    for i in 0..60 {
        let req = pb::AuthorizeRequest { action: "UpdateItem".into(), resource: uid("Item", "doc"), context: None };
        let d = c.authorize(authed(&alice, req)).await.unwrap().into_inner();
        assert_eq!(d.decision, pb::Decision::Allow as i32);
        let req = pb::GetEntityRequest { uid: uid("Item", "doc"), action: "ReadItem".into() };
        c.get_entity(authed(&alice, req)).await.unwrap();
        let m = update("UpdateItem", "Item", "doc", json!({ "n": i }), None);
        c.authorize_and_commit(authed(&alice, commit_req(vec![m]))).await.unwrap();
    }
    let after = settled().await;
    for ((table, seq0, idx0), (_, seq1, idx1)) in before.iter().zip(&after) {
        eprintln!("{table}: {} sequential scans, {} index scans during 180 calls", seq1 - seq0, idx1 - idx0);
        assert!(seq1 - seq0 < 5, "{table} was scanned whole {} times by 180 calls", seq1 - seq0);
    }
    assert!(after[1].2 - before[1].2 >= 120, "the entities' index was hardly used: {before:?} {after:?}");
}
