//! The stores' entity graph read, directly: ancestors are followed transitively, cycles
//! end, and the answer is the same for a few start uids (bound values on SQLite) and for
//! many (a JSON array).

use crate::common::*;
use lockstep::model::{EntityRecord, Uid};
use std::collections::BTreeSet;

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
