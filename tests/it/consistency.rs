//! Lost updates and idempotency under real parallelism.

use crate::common::*;
use lockstep::grpc::pb;
use serde_json::json;
use tonic::Code;

/// Concurrent read-modify-write with `if_version` loses nothing: 8 writers × 15
/// increments of one counter end at exactly 120, version 121.
async fn if_version_loses_no_update(b: Backend) {
    let Some(s) = start(b).await else { return };
    let writers = 8;
    let per_writer = 15;
    let mut handles = Vec::new();
    for _ in 0..writers {
        let addr = s.addr;
        handles.push(tokio::spawn(async move {
            let mut c = client(addr).await;
            let tok = token("k1", "alice");
            let mut aborted = 0u32;
            for _ in 0..per_writer {
                loop {
                    let e = c
                        .get_entity(authed(
                            &tok,
                            pb::GetEntityRequest { uid: uid("Item", "doc"), action: "ReadItem".into() },
                        ))
                        .await
                        .unwrap()
                        .into_inner()
                        .entity
                        .unwrap();
                    let n = match e.attributes.unwrap().fields["n"].kind {
                        Some(prost_types::value::Kind::NumberValue(n)) => n as i64,
                        ref k => panic!("n is {k:?}"),
                    };
                    let m = update("UpdateItem", "Item", "doc", json!({ "n": n + 1 }), Some(e.version));
                    match c.authorize_and_commit(authed(&tok, commit_req(vec![m]))).await {
                        Ok(_) => break,
                        Err(st) if st.code() == Code::Aborted => aborted += 1,
                        Err(st) => panic!("unexpected {st:?}"),
                    }
                }
            }
            aborted
        }));
    }
    let mut aborted = 0;
    for h in handles {
        aborted += h.await.unwrap();
    }
    let e = read(s.addr, "Item", "doc").await.unwrap();
    let n = e.attributes.unwrap().fields["n"].clone();
    eprintln!(
        "lost-update: writers={writers} increments={} aborted_retries={aborted} final_version={}",
        writers * per_writer,
        e.version
    );
    assert_eq!(n.kind, Some(prost_types::value::Kind::NumberValue((writers * per_writer) as f64)));
    assert_eq!(e.version, 1 + (writers * per_writer) as u64);
    assert!(aborted > 0, "no if_version conflict happened: the writers did not overlap");
}

/// Sixteen concurrent copies of one request with one idempotency key apply once and all
/// return the first response; a later repeat too; another request under the key is
/// INVALID_ARGUMENT; another subject's same key is independent.
async fn idempotency_key_applies_once_under_concurrency(b: Backend) {
    let Some(s) = start(b).await else { return };
    let tok = token("k1", "alice");
    let req = pb::AuthorizeAndCommitRequest {
        mutations: vec![update("UpdateItem", "Item", "doc", json!({ "n": 42 }), None)],
        context: None,
        idempotency_key: "order-7".into(),
    };
    let mut handles = Vec::new();
    for _ in 0..16 {
        let (addr, tok, req) = (s.addr, tok.clone(), req.clone());
        handles.push(tokio::spawn(async move {
            client(addr).await.authorize_and_commit(authed(&tok, req)).await.map(|r| r.into_inner())
        }));
    }
    let mut responses = Vec::new();
    for h in handles {
        responses.push(h.await.unwrap().expect("every duplicate gets the first response"));
    }
    assert!(responses.windows(2).all(|w| w[0] == w[1]), "duplicates returned different responses");
    assert_eq!(read(s.addr, "Item", "doc").await.unwrap().version, 2, "applied more than once");
    let commits = audit(s.addr)
        .await
        .iter()
        .filter(|e| e.kind == pb::audit_event::Kind::Commit as i32 && e.principal.is_some())
        .count();
    assert_eq!(commits, 1);

    // A repeat later, with a fresh token of the same subject: the same response.
    let again = client(s.addr)
        .await
        .authorize_and_commit(authed(&token("k1", "alice"), req.clone()))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(again, responses[0]);

    // The same key with a different request.
    let mut other = req.clone();
    other.mutations = vec![update("UpdateItem", "Item", "doc", json!({ "n": 43 }), None)];
    let err = client(s.addr).await.authorize_and_commit(authed(&tok, other)).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");

    // The key is scoped to the subject: root's "order-7" is its own.
    let root = client(s.addr).await.authorize_and_commit(authed(&token("k2", "root"), req)).await.unwrap().into_inner();
    assert_ne!(root.audit_seq, responses[0].audit_seq);
    assert_eq!(read(s.addr, "Item", "doc").await.unwrap().version, 3);
    eprintln!("idempotency: concurrent_duplicates=16 applied=1 (version 1 -> 2)");
}

crate::on_both_backends!(if_version_loses_no_update, idempotency_key_applies_once_under_concurrency);
