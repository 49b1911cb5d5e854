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

crate::on_all_backends!(if_version_loses_no_update, idempotency_key_applies_once_under_concurrency);

/// Short deadlines under load never make a committed write look failed: 16 clients send
/// if_version increments with 10–20 ms deadlines and unique idempotency keys, over a bare
/// HTTP/2 client that does not enforce the deadline itself (so every answer is the
/// server's). Every call the server answered with a failure code (its own
/// DEADLINE_EXCEEDED, or CANCELLED "Timeout expired", which tonic's transport sent when it
/// dropped the handler at the deadline, COMMIT in flight or not) must be absent from the
/// audit log and the counters, and every OK must be present.
async fn short_deadlines_never_fail_a_committed_write(b: Backend) {
    let Some(s) = start(b).await else { return };
    let clients = 16;
    let per_client = 25;
    let mut handles = Vec::new();
    for w in 0..clients {
        let addr = s.addr;
        handles.push(tokio::spawn(async move {
            let mut c = raw_client(addr);
            let tok = token("k2", "root");
            let item = if w % 2 == 0 { "doc" } else { "shared" };
            let mut answers = Vec::new();
            for i in 0..per_client {
                let e = c
                    .get_entity(authed(
                        &tok,
                        pb::GetEntityRequest { uid: uid("Item", item), action: "ReadItem".into() },
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
                let call = format!("c{w}-{i}");
                let m = update("UpdateItem", "Item", item, json!({ "n": n + 1, "call": call }), Some(e.version));
                let mut req = authed(
                    &tok,
                    pb::AuthorizeAndCommitRequest { mutations: vec![m], context: None, idempotency_key: call.clone() },
                );
                req.set_timeout(std::time::Duration::from_millis(10 + (i as u64 * 7 + w as u64) % 11));
                let answer = c.authorize_and_commit(req).await.map(|_| ());
                answers.push((call, answer));
            }
            answers
        }));
    }
    let mut answers = Vec::new();
    for h in handles {
        answers.extend(h.await.unwrap());
    }
    let committed: std::collections::HashSet<String> = audit(s.addr)
        .await
        .iter()
        .filter(|e| e.kind == pb::audit_event::Kind::Commit as i32)
        .flat_map(|e| e.entities.iter())
        .filter_map(|e| match &e.attributes.as_ref()?.fields.get("call")?.kind {
            Some(prost_types::value::Kind::StringValue(c)) => Some(c.clone()),
            _ => None,
        })
        .collect();
    let mut by_code = std::collections::BTreeMap::<String, usize>::new();
    let (mut failed_but_committed, mut ok_but_missing) = (Vec::new(), Vec::new());
    for (call, answer) in &answers {
        match answer {
            Ok(()) => {
                *by_code.entry("Ok".into()).or_default() += 1;
                if !committed.contains(call) {
                    ok_but_missing.push(call.clone());
                }
            }
            Err(st) => {
                *by_code.entry(format!("{:?}", st.code())).or_default() += 1;
                // ABORTED (if_version) and the server's DEADLINE_EXCEEDED promise that nothing
                // was committed; CANCELLED and UNKNOWN make no promise but must not hide a
                // commit either (the server knows the outcome: it waits for it).
                assert!(
                    matches!(st.code(), Code::Aborted | Code::DeadlineExceeded | Code::Cancelled),
                    "unexpected answer for {call}: {st:?}"
                );
                if committed.contains(call) {
                    failed_but_committed.push(format!("{call}: {:?} {}", st.code(), st.message()));
                }
            }
        }
    }
    eprintln!(
        "short-deadlines: calls={} answers={by_code:?} committed={} committed_but_answered_failure={}",
        answers.len(),
        committed.len(),
        failed_but_committed.len()
    );
    assert!(ok_but_missing.is_empty(), "answered OK but not committed: {ok_but_missing:?}");
    assert!(failed_but_committed.is_empty(), "committed but answered failure: {failed_but_committed:#?}");
    // The server never gives up on a handler: CANCELLED from it meant a dropped handler,
    // whose COMMIT may have been in flight (this client never cancels by itself).
    assert_eq!(by_code.get("Cancelled"), None, "the server answered CANCELLED: {by_code:?}");
    // The counters agree with the audit log: each commit added exactly one.
    let mut sum = 0.0;
    for id in ["doc", "shared"] {
        if let Some(prost_types::value::Kind::NumberValue(n)) =
            read(s.addr, "Item", id).await.unwrap().attributes.unwrap().fields["n"].kind
        {
            sum += n;
        }
    }
    assert_eq!(sum as usize, committed.len(), "counters and audit log disagree");
}

crate::on_all_backends!(short_deadlines_never_fail_a_committed_write);

/// A `grpc-timeout` the server cannot read (malformed, or more than 8 digits) changes
/// nothing of the answer: the call gets its outcome — OK with its response, or its
/// denial — and an OK has committed. (The head goes at once for such a call: it used to
/// be the whole answer, without message or status, while the write landed.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreadable_grpc_timeout_still_gets_the_call_s_outcome() {
    let Some(s) = start(Backend::Sqlite).await else { return };
    let alice = token("k1", "alice");
    let mut c = raw_client(s.addr);
    let before = audit(s.addr).await.len();
    let odd = ["1x", "-1S", "", "1", "m", "1.5S", "1 S", "100000000H", "123456789S"];
    for (i, t) in odd.iter().enumerate() {
        let m = update("UpdateItem", "Item", "doc", json!({ "n": i }), None);
        let mut req = authed(&alice, commit_req(vec![m]));
        req.metadata_mut().insert("grpc-timeout", t.parse().unwrap());
        let answer = c.authorize_and_commit(req).await.unwrap_or_else(|e| panic!("grpc-timeout {t:?}: {e:?}"));
        let r = answer.into_inner();
        assert!(r.audit_seq > 0 && r.entities.len() == 1, "grpc-timeout {t:?}: {r:?}");
        let mut denied =
            authed(&alice, commit_req(vec![update("UpdateItem", "Item", "shared", json!({ "n": i }), None)]));
        denied.metadata_mut().insert("grpc-timeout", t.parse().unwrap());
        let e = c.authorize_and_commit(denied).await.unwrap_err();
        assert_eq!(e.code(), Code::PermissionDenied, "grpc-timeout {t:?}: {e:?}");
    }
    // One commit and one denial event per value.
    assert_eq!(audit(s.addr).await.len() - before, 2 * odd.len());
    assert_eq!(read(s.addr, "Item", "doc").await.unwrap().version, 1 + odd.len() as u64);
}
