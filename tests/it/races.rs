//! The guarantee: once a revoking call (logout, RevokeSubject, RevokeKey, an ownership
//! transfer, a group removal, a policy change) has returned, no write it forbids lands.
//!
//! Each test runs many writers in parallel (their own OS threads via a multi-threaded
//! runtime, against a server on its own threads) and fires the revoking call mid-stream.
//! It then checks, by audit seq and entity version, that no commit the new state forbids
//! was serialized after the revocation, that every call started after the revocation
//! returned was refused, and that the race really overlapped.

use crate::common::*;
use lockstep::grpc::pb;
use serde_json::json;
use sqlx::Connection;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};
use tonic::Code;

pub(crate) const WRITERS: usize = 16;
const MAX_CALLS_PER_WRITER: usize = 400;

pub(crate) struct Outcome {
    writer: usize,
    start: Instant,
    end: Instant,
    result: Result<(u64, u64), Code>,
}

pub struct Report {
    outcomes: Vec<Outcome>,
    revoke_start: Instant,
    revoke_end: Instant,
    revoke_seq: u64,
}

/// Runs `WRITERS` parallel writers (each request from `make(writer, i)`), waits until
/// commits are flowing, runs `revoke`, lets every writer make a few more calls, stops.
pub(crate) async fn race<F, R>(addr: SocketAddr, make: F, revoke: R) -> Report
where
    F: Fn(usize, usize) -> (String, pb::AuthorizeAndCommitRequest) + Send + Sync + 'static,
    R: std::future::Future<Output = u64>,
{
    let make = Arc::new(make);
    let stop = Arc::new(AtomicBool::new(false));
    let oks = Arc::new(AtomicUsize::new(0));
    let revoked_at: Arc<std::sync::Mutex<Option<Instant>>> = Arc::new(std::sync::Mutex::new(None));
    let mut handles = Vec::new();
    for w in 0..WRITERS {
        let (make, stop, oks, revoked_at) = (make.clone(), stop.clone(), oks.clone(), revoked_at.clone());
        handles.push(tokio::spawn(async move {
            let mut c = client(addr).await;
            let mut out = Vec::new();
            let mut after = 0;
            for i in 0..MAX_CALLS_PER_WRITER {
                if stop.load(Ordering::SeqCst) || after >= 3 {
                    break;
                }
                let (tok, req) = make(w, i);
                let start = Instant::now();
                let r = c.authorize_and_commit(authed(&tok, req)).await;
                let end = Instant::now();
                let result = match r {
                    Ok(resp) => {
                        oks.fetch_add(1, Ordering::SeqCst);
                        let resp = resp.into_inner();
                        Ok((resp.audit_seq, resp.entities[0].version))
                    }
                    Err(s) => Err(s.code()),
                };
                if revoked_at.lock().unwrap().is_some_and(|t| start > t) {
                    after += 1;
                }
                out.push(Outcome { writer: w, start, end, result });
            }
            out
        }));
    }
    let t0 = Instant::now();
    while oks.load(Ordering::SeqCst) < 2 * WRITERS && t0.elapsed() < Duration::from_secs(20) {
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let revoke_start = Instant::now();
    let revoke_seq = revoke.await;
    let revoke_end = Instant::now();
    *revoked_at.lock().unwrap() = Some(revoke_end);
    let mut outcomes = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    for h in handles {
        let rest = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(rest, h).await {
            Ok(r) => outcomes.extend(r.unwrap()),
            Err(_) => {
                stop.store(true, Ordering::SeqCst);
            }
        }
    }
    stop.store(true, Ordering::SeqCst);
    Report { outcomes, revoke_start, revoke_end, revoke_seq }
}

impl Report {
    /// Asserts the guarantee and that the race was real; prints the figures.
    pub(crate) fn check(&self, name: &str, refused: &[Code]) -> (usize, usize) {
        let allowed = self.outcomes.iter().filter(|o| o.result.is_ok()).count();
        let denied = self.outcomes.iter().filter(|o| o.result.as_ref().is_err_and(|c| refused.contains(c))).count();
        let other: Vec<_> =
            self.outcomes.iter().filter_map(|o| o.result.as_ref().err().filter(|c| !refused.contains(c))).collect();
        assert!(other.is_empty(), "{name}: unexpected status codes {other:?}");
        let overlapping: Vec<&Outcome> =
            self.outcomes.iter().filter(|o| o.start < self.revoke_end && o.end > self.revoke_start).collect();
        let overlap_allowed = overlapping.iter().filter(|o| o.result.is_ok()).count();
        let overlap_denied = overlapping.len() - overlap_allowed;
        // Violation 1: a commit serialized after the revocation.
        let late_commits: Vec<_> = self
            .outcomes
            .iter()
            .filter_map(|o| o.result.as_ref().ok().filter(|(seq, _)| *seq > self.revoke_seq))
            .collect();
        // Violation 2: a call that started after the revocation returned, and was allowed.
        let late_starts = self.outcomes.iter().filter(|o| o.start > self.revoke_end && o.result.is_ok()).count();
        let after = self.outcomes.iter().filter(|o| o.start > self.revoke_end).count();
        let writers_after =
            (0..WRITERS).filter(|w| self.outcomes.iter().any(|o| o.writer == *w && o.start > self.revoke_end)).count();
        eprintln!(
            "race {name}: calls={} allowed={allowed} denied={denied} overlapping_revoke={} (allowed {overlap_allowed}, denied {overlap_denied}) started_after_revoke={after} violations={}",
            self.outcomes.len(),
            overlapping.len(),
            late_commits.len() + late_starts
        );
        assert!(
            late_commits.is_empty(),
            "{name}: commits serialized after the revocation (seq > {}): {late_commits:?}",
            self.revoke_seq
        );
        assert_eq!(late_starts, 0, "{name}: calls started after the revocation returned were allowed");
        assert!(allowed > 0, "{name}: no write was allowed before the revocation: the race did not run");
        assert!(denied > 0, "{name}: no write was refused after the revocation");
        assert!(writers_after > 0, "{name}: no call started after the revocation returned");
        assert!(!overlapping.is_empty(), "{name}: no call overlapped the revoking call: the race did not race");
        (allowed, denied)
    }
}

/// The audit log agrees: no COMMIT by `principal` was serialized after `revoke_seq`,
/// and the entity's version grew by exactly the number of allowed writes.
pub(crate) async fn check_audit_and_version(
    addr: SocketAddr,
    name: &str,
    principal: &str,
    report: &Report,
    entity: (&str, &str),
    base_version: u64,
    extra_changes: u64,
) {
    let events = audit(addr).await;
    let late: Vec<u64> = events
        .iter()
        .filter(|e| e.kind == pb::audit_event::Kind::Commit as i32)
        .filter(|e| e.principal.as_ref().is_some_and(|p| p.id == principal))
        .map(|e| e.seq)
        .filter(|s| *s > report.revoke_seq)
        .collect();
    assert!(late.is_empty(), "{name}: audit shows commits by {principal} after the revocation: {late:?}");
    let allowed = report.outcomes.iter().filter(|o| o.result.is_ok()).count() as u64;
    let max_version_allowed =
        report.outcomes.iter().filter_map(|o| o.result.as_ref().ok().map(|(_, v)| *v)).max().unwrap_or(0);
    if let Some(e) = read(addr, entity.0, entity.1).await {
        assert_eq!(
            e.version,
            base_version + allowed + extra_changes,
            "{name}: version does not count the allowed writes"
        );
        assert!(max_version_allowed <= e.version);
    }
}

pub(crate) fn write(tok: &str, ty: &str, id: &str, w: usize, i: usize) -> (String, pb::AuthorizeAndCommitRequest) {
    (tok.to_owned(), commit_req(vec![update("UpdateItem", ty, id, json!({ "n": (w * 10_000 + i) as i64 }), None)]))
}

/// Logout: the token's own RevokeToken call.
async fn logout_races_writes(b: Backend) {
    let Some(s) = start(b).await else { return };
    let tok = token("k1", "alice");
    let t = tok.clone();
    let report = race(s.addr, move |w, i| write(&t, "Item", "doc", w, i), async {
        let mut c = client(s.addr).await;
        c.revoke_token(authed(&tok, pb::RevokeTokenRequest::default())).await.unwrap().into_inner().audit_seq
    })
    .await;
    report.check("logout", &[tonic::Code::Unauthenticated]);
    check_audit_and_version(s.addr, "logout", "alice", &report, ("Item", "doc"), 1, 0).await;
}

/// RevokeSubject by an admin: every token of alice (many jtis) stops at once.
async fn revoke_subject_races_writes(b: Backend) {
    let Some(s) = start(b).await else { return };
    let tokens: Vec<String> = (0..WRITERS).map(|_| token("k1", "alice")).collect();
    let report = race(s.addr, move |w, i| write(&tokens[w], "Item", "doc", w, i), async {
        let mut c = client(s.addr).await;
        let req = pb::RevokeSubjectRequest { subject: uid("User", "alice") };
        c.revoke_subject(authed(&token("k2", "root"), req)).await.unwrap().into_inner().audit_seq
    })
    .await;
    report.check("revoke-subject", &[tonic::Code::Unauthenticated]);
    check_audit_and_version(s.addr, "revoke-subject", "alice", &report, ("Item", "doc"), 1, 0).await;
}

/// RevokeKey: alice's tokens are signed with k1; root (on k2) revokes k1.
async fn revoke_key_races_writes(b: Backend) {
    let Some(s) = start(b).await else { return };
    let tokens: Vec<String> = (0..WRITERS).map(|_| token("k1", "alice")).collect();
    let report = race(s.addr, move |w, i| write(&tokens[w], "Item", "doc", w, i), async {
        let mut a = admin(s.addr).await;
        a.revoke_key(authed(&token("k2", "root"), pb::RevokeKeyRequest { kid: "k1".into() }))
            .await
            .unwrap()
            .into_inner()
            .audit_seq
    })
    .await;
    report.check("revoke-key", &[tonic::Code::Unauthenticated]);
    check_audit_and_version(s.addr, "revoke-key", "alice", &report, ("Item", "doc"), 1, 0).await;
}

/// Ownership transfer: root moves Item::"doc" from alice to mallory.
async fn ownership_transfer_races_writes(b: Backend) {
    transfer_race(b, json!({ "owner": { "__entity": { "type": "User", "id": "mallory" } } })).await;
}

/// The same transfer written with the short uid form (`{"type", "id"}`) the docs allow:
/// it replaces the stored `{"__entity": …}` whole (a field-by-field merge kept alice).
async fn ownership_transfer_in_short_form_races_writes(b: Backend) {
    transfer_race(b, json!({ "owner": { "type": "User", "id": "mallory" } })).await;
}

async fn transfer_race(b: Backend, patch: serde_json::Value) {
    let Some(s) = start(b).await else { return };
    let tokens: Vec<String> = (0..WRITERS).map(|_| token("k1", "alice")).collect();
    let report = race(s.addr, move |w, i| write(&tokens[w], "Item", "doc", w, i), async {
        let mut c = client(s.addr).await;
        let m = update("UpdateItem", "Item", "doc", patch, None);
        c.authorize_and_commit(authed(&token("k2", "root"), commit_req(vec![m]))).await.unwrap().into_inner().audit_seq
    })
    .await;
    report.check("transfer", &[tonic::Code::PermissionDenied]);
    check_audit_and_version(s.addr, "transfer", "alice", &report, ("Item", "doc"), 1, 1).await;
}

/// Group removal: bob may write Item::"shared" as a member of Group::"writers"; root
/// removes him from the group.
async fn group_removal_races_writes(b: Backend) {
    let Some(s) = start(b).await else { return };
    let tokens: Vec<String> = (0..WRITERS).map(|_| token("k1", "bob")).collect();
    let report = race(s.addr, move |w, i| write(&tokens[w], "Item", "shared", w, i), async {
        let mut c = client(s.addr).await;
        let m = bob_leaves_writers();
        c.authorize_and_commit(authed(&token("k2", "root"), commit_req(vec![m]))).await.unwrap().into_inner().audit_seq
    })
    .await;
    report.check("group-removal", &[tonic::Code::PermissionDenied]);
    check_audit_and_version(s.addr, "group-removal", "bob", &report, ("Item", "shared"), 1, 0).await;
}

/// PutPolicies that drops the policy permitting alice's writes.
async fn policy_change_races_writes(b: Backend) {
    let Some(s) = start(b).await else { return };
    let tokens: Vec<String> = (0..WRITERS).map(|_| token("k1", "alice")).collect();
    let report = race(s.addr, move |w, i| write(&tokens[w], "Item", "doc", w, i), async {
        let mut a = admin(s.addr).await;
        let without_owner: String =
            POLICIES.split(";\n").filter(|p| !p.contains("owner-manages")).collect::<Vec<_>>().join(";\n");
        let req = pb::PutPoliciesRequest { policies: without_owner, schema: SCHEMA.into(), ..Default::default() };
        a.put_policies(authed(&token("k2", "root"), req)).await.unwrap().into_inner().audit_seq
    })
    .await;
    report.check("put-policies", &[tonic::Code::PermissionDenied]);
    check_audit_and_version(s.addr, "put-policies", "alice", &report, ("Item", "doc"), 1, 0).await;
}

crate::on_all_backends!(
    logout_races_writes,
    revoke_subject_races_writes,
    revoke_key_races_writes,
    ownership_transfer_races_writes,
    ownership_transfer_in_short_form_races_writes,
    group_removal_races_writes,
    policy_change_races_writes
);

/// Two instances on one database: the writes go to one, the revoking calls to the other
/// (logout, RevokeKey and PutPolicies in turn, each on a fresh database).
async fn cross_instance_revocations(b: Backend) {
    // Logout on instance B while instance A takes the writes.
    let Some(a) = start(b).await else { return };
    let b_inst = serve(a.db.clone().unwrap(), Default::default()).await;
    let tok = token("k1", "alice");
    let t = tok.clone();
    let report = race(a.addr, move |w, i| write(&t, "Item", "doc", w, i), async {
        let mut c = client(b_inst.addr).await;
        c.revoke_token(authed(&tok, pb::RevokeTokenRequest::default())).await.unwrap().into_inner().audit_seq
    })
    .await;
    report.check("cross-instance logout", &[tonic::Code::Unauthenticated]);
    check_audit_and_version(a.addr, "cross-instance logout", "alice", &report, ("Item", "doc"), 1, 0).await;

    // RevokeKey on B.
    let Some(a) = start(b).await else { return };
    let b_inst = serve(a.db.clone().unwrap(), Default::default()).await;
    let tokens: Vec<String> = (0..WRITERS).map(|_| token("k1", "alice")).collect();
    let report = race(a.addr, move |w, i| write(&tokens[w], "Item", "doc", w, i), async {
        let mut adm = admin(b_inst.addr).await;
        adm.revoke_key(authed(&token("k2", "root"), pb::RevokeKeyRequest { kid: "k1".into() }))
            .await
            .unwrap()
            .into_inner()
            .audit_seq
    })
    .await;
    report.check("cross-instance revoke-key", &[tonic::Code::Unauthenticated]);

    // PutPolicies on B: A must not decide with its cached (old) policy set.
    let Some(a) = start(b).await else { return };
    let b_inst = serve(a.db.clone().unwrap(), Default::default()).await;
    let tokens: Vec<String> = (0..WRITERS).map(|_| token("k1", "alice")).collect();
    let report = race(a.addr, move |w, i| write(&tokens[w], "Item", "doc", w, i), async {
        let mut adm = admin(b_inst.addr).await;
        let without_owner: String =
            POLICIES.split(";\n").filter(|p| !p.contains("owner-manages")).collect::<Vec<_>>().join(";\n");
        let req = pb::PutPoliciesRequest { policies: without_owner, schema: SCHEMA.into(), ..Default::default() };
        adm.put_policies(authed(&token("k2", "root"), req)).await.unwrap().into_inner().audit_seq
    })
    .await;
    report.check("cross-instance put-policies", &[tonic::Code::PermissionDenied]);
    check_audit_and_version(a.addr, "cross-instance put-policies", "alice", &report, ("Item", "doc"), 1, 0).await;
}

/// Unsharing: mallory may update Item::"doc" only through a template link; the owner
/// unlinks it mid-stream, and no write of hers lands after the unlink returned.
async fn unlink_races_writes(b: Backend) {
    let Some(s) = start(b).await else { return };
    let root = token("k2", "root");
    let policies = format!(
        "{POLICIES}\n@id(\"share-write\") permit (principal == ?principal, action == Action::\"UpdateItem\", resource == ?resource);"
    );
    let mut a = admin(s.addr).await;
    a.put_policies(authed(&root, pb::PutPoliciesRequest { policies, schema: SCHEMA.into(), ..Default::default() }))
        .await
        .unwrap();
    let link = pb::TemplateLink {
        link_id: "mallory-doc".into(),
        template_id: "share-write".into(),
        principal: uid("User", "mallory"),
        resource: uid("Item", "doc"),
    };
    a.link_template(authed(&root, pb::LinkTemplateRequest { link: Some(link) })).await.unwrap();
    let tokens: Vec<String> = (0..WRITERS).map(|_| token("k1", "mallory")).collect();
    let report = race(s.addr, move |w, i| write(&tokens[w], "Item", "doc", w, i), async {
        a.unlink_template(authed(&token("k2", "root"), pb::UnlinkTemplateRequest { link_id: "mallory-doc".into() }))
            .await
            .unwrap()
            .into_inner()
            .audit_seq
    })
    .await;
    report.check("unlink", &[tonic::Code::PermissionDenied]);
    check_audit_and_version(s.addr, "unlink", "mallory", &report, ("Item", "doc"), 1, 0).await;
}

/// Two instances on one database, one change at a time: instance A has served a user's
/// writes (on PostgreSQL its next ones are speculative: decided on what A last saw, checked
/// under the locks as they are sent, see the protocol in `store::postgres`), then B commits a
/// change that forbids them — an ownership transfer, a group removal, a logout, a policy
/// change. A's next write must be refused and change nothing, however warm A is.
async fn another_instance_s_change_reaches_a_warm_instance(b: Backend) {
    // The smallest pool (two connections): each speculates after its first full write.
    let small = lockstep::config::StoreOptions { max_connections: 1, ..Default::default() };
    let Some(a) = start_with(b, small).await else { return };
    let b_inst = serve(a.db.clone().unwrap(), Default::default()).await;
    let mut ca = client(a.addr).await;
    let mut cb = client(b_inst.addr).await;
    let root = token("k2", "root");
    let set = |ty: &str, id: &str, n: i64| commit_req(vec![update("UpdateItem", ty, id, json!({ "n": n }), None)]);
    let warm_client = ca.clone();
    let warm = |tok: String, ty: &'static str, id: &'static str| {
        let mut c = warm_client.clone();
        async move {
            for n in 1..=8 {
                let req = commit_req(vec![update("UpdateItem", ty, id, json!({ "n": n }), None)]);
                c.authorize_and_commit(authed(&tok, req)).await.unwrap();
            }
        }
    };
    // The resource changes: doc goes to mallory.
    let alice = token("k1", "alice");
    warm(alice.clone(), "Item", "doc").await;
    if b == Backend::Postgres {
        let mut direct = sqlx::PgConnection::connect(&a.url).await.unwrap();
        let speculated: i64 = sqlx::query_scalar("SELECT count(*) FROM lockstep.audit WHERE nonce IS NOT NULL")
            .fetch_one(&mut direct)
            .await
            .unwrap();
        assert!(speculated > 0, "no write was speculative: this test does not test it");
    }
    let transfer = update("UpdateItem", "Item", "doc", json!({ "owner": { "type": "User", "id": "mallory" } }), None);
    cb.authorize_and_commit(authed(&root, commit_req(vec![transfer]))).await.unwrap();
    let before = read(a.addr, "Item", "doc").await.unwrap().version;
    let e = ca.authorize_and_commit(authed(&alice, set("Item", "doc", 99))).await.unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "after a transfer on another instance: {e:?}");
    assert_eq!(read(a.addr, "Item", "doc").await.unwrap().version, before, "the refused write changed doc");

    // The principal's ancestors change: bob leaves the writers of `shared`.
    let bob = token("k1", "bob");
    warm(bob.clone(), "Item", "shared").await;
    cb.authorize_and_commit(authed(&root, commit_req(vec![bob_leaves_writers()]))).await.unwrap();
    let before = read(a.addr, "Item", "shared").await.unwrap().version;
    let e = ca.authorize_and_commit(authed(&bob, set("Item", "shared", 99))).await.unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "after a group removal on another instance: {e:?}");
    assert_eq!(read(a.addr, "Item", "shared").await.unwrap().version, before);

    // The token is revoked: mallory logs out on B.
    let mallory = token("k1", "mallory");
    warm(mallory.clone(), "Item", "doc").await;
    cb.revoke_token(authed(&mallory, pb::RevokeTokenRequest::default())).await.unwrap();
    let e = ca.authorize_and_commit(authed(&mallory, set("Item", "doc", 99))).await.unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated, "after a logout on another instance: {e:?}");

    // The policies change: owners may no longer update their items.
    let mallory = token("k1", "mallory");
    warm(mallory.clone(), "Item", "doc").await;
    let mut adm = admin(b_inst.addr).await;
    let without_owner: String =
        POLICIES.split(";\n").filter(|p| !p.contains("owner-manages")).collect::<Vec<_>>().join(";\n");
    let req = pb::PutPoliciesRequest { policies: without_owner, schema: SCHEMA.into(), ..Default::default() };
    adm.put_policies(authed(&root, req)).await.unwrap();
    let before = read(a.addr, "Item", "doc").await.unwrap().version;
    let e = ca.authorize_and_commit(authed(&mallory, set("Item", "doc", 99))).await.unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "after a policy change on another instance: {e:?}");
    assert_eq!(read(a.addr, "Item", "doc").await.unwrap().version, before);
    // The audit log of A's refusals: each a DENY (or nothing, for the logout), no COMMIT
    // with n = 99.
    let late = audit(a.addr).await.into_iter().filter(|e| e.kind == pb::audit_event::Kind::Commit as i32);
    for e in late {
        assert!(!format!("{:?}", e.mutations).contains("99"), "a refused write was committed: {e:?}");
    }
}

crate::on_both_backends!(
    cross_instance_revocations,
    unlink_races_writes,
    another_instance_s_change_reaches_a_warm_instance
);

/// Decisions race revocations too: callers ask Authorize over and over (each token verified
/// once, so the decision is read in the statement that reads the key — on PostgreSQL that
/// statement alone, without BEGIN) while a revocation commits. No call that starts after the
/// revocation returned may be allowed. Returns (allowed before, denied after).
async fn authorize_race<R>(
    addr: SocketAddr,
    subject: &'static str,
    action: &'static str,
    resource: (&'static str, &'static str),
    revoke: R,
) -> (usize, usize)
where
    R: std::future::Future<Output = ()>,
{
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    // Set once the revocation has returned; calls that start after it count themselves.
    let returned_flag = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let started_after = Arc::new(AtomicUsize::new(0));
    let workers: Vec<_> = (0..WRITERS)
        .map(|_| {
            let (stop, tok) = (stop.clone(), token("k1", subject));
            let (returned_flag, started_after) = (returned_flag.clone(), started_after.clone());
            tokio::spawn(async move {
                let mut c = client(addr).await;
                let mut seen = Vec::new();
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let req = pb::AuthorizeRequest {
                        action: action.into(),
                        resource: uid(resource.0, resource.1),
                        context: None,
                    };
                    let started = std::time::Instant::now();
                    if returned_flag.load(Ordering::SeqCst) {
                        started_after.fetch_add(1, Ordering::SeqCst);
                    }
                    let allowed = match c.authorize(authed(&tok, req)).await {
                        Ok(r) => r.into_inner().decision == pb::Decision::Allow as i32,
                        Err(st) if st.code() == tonic::Code::Unauthenticated => false,
                        Err(st) => panic!("authorize: {st:?}"),
                    };
                    seen.push((started, allowed));
                }
                seen
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(300)).await;
    revoke.await;
    let returned = std::time::Instant::now();
    returned_flag.store(true, Ordering::SeqCst);
    // Until enough calls started after the return (however slow the machine), 20 s at most.
    let t0 = std::time::Instant::now();
    while (started_after.load(Ordering::SeqCst) < 2 * WRITERS || t0.elapsed() < Duration::from_millis(300))
        && t0.elapsed() < Duration::from_secs(20)
    {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (mut before, mut after, mut violations) = (0, 0, 0);
    for w in workers {
        for (started, allowed) in w.await.unwrap() {
            match (started > returned, allowed) {
                (false, true) => before += 1,
                (true, true) => violations += 1,
                (true, false) => after += 1,
                _ => {}
            }
        }
    }
    println!(
        "authorize race ({subject} {action}): {before} allowed before, {after} denied after, {violations} violations"
    );
    assert_eq!(violations, 0, "Authorize allowed after the revocation returned");
    assert!(before > 0 && after > 0, "the race did not happen: {before} before, {after} after");
    (before, after)
}

async fn authorize_races_revocations(b: Backend) {
    // Logout of the subject.
    let Some(s) = start(b).await else { return };
    authorize_race(s.addr, "alice", "ReadItem", ("Item", "doc"), async {
        let mut c = client(s.addr).await;
        let req = pb::RevokeSubjectRequest { subject: uid("User", "alice") };
        c.revoke_subject(authed(&token("k2", "root"), req)).await.unwrap();
    })
    .await;
    // Removal from the group that grants (the principal's ancestors).
    let Some(s) = start(b).await else { return };
    authorize_race(s.addr, "bob", "UpdateItem", ("Item", "shared"), async {
        let mut c = client(s.addr).await;
        let m = bob_leaves_writers();
        c.authorize_and_commit(authed(&token("k2", "root"), commit_req(vec![m]))).await.unwrap();
    })
    .await;
    // A policy change (the decision's first read finds a policy version not compiled yet, and
    // the call is read again in a transaction).
    let Some(s) = start(b).await else { return };
    authorize_race(s.addr, "alice", "ReadItem", ("Item", "doc"), async {
        let mut a = admin(s.addr).await;
        let without_owner: String =
            POLICIES.split(";\n").filter(|p| !p.contains("owner-manages")).collect::<Vec<_>>().join(";\n");
        let req = pb::PutPoliciesRequest { policies: without_owner, schema: SCHEMA.into(), ..Default::default() };
        a.put_policies(authed(&token("k2", "root"), req)).await.unwrap();
    })
    .await;
}

crate::on_all_backends!(authorize_races_revocations);

/// Root's mutation removing bob from `Group::"writers"`.
fn bob_leaves_writers() -> pb::Mutation {
    pb::Mutation {
        action: "UpdateUser".into(),
        resource: uid("User", "bob"),
        change: Some(pb::mutation::Change::Update(pb::UpdateEntity {
            merge_patch: None,
            add_parents: vec![],
            remove_parents: vec![pb::EntityRef { r#type: "Group".into(), id: "writers".into() }],
            tags_merge_patch: None,
        })),
        if_version: None,
    }
}

/// Writers of their own principal entity, all at once: each takes that entity's lock as
/// the resource (exclusive) and as the principal (shared). Taken shared then exclusive,
/// two such writers deadlocked each other (answered INTERNAL, or retried until they gave
/// up); every write must commit, once. Lockstep's own store only: a principal kept in the
/// application's tables takes the longer path (row lock, then the entity lock), where such
/// writers still meet as deadlocks that are retried (docs/mapping.md).
async fn writes_to_the_principal_itself(b: Backend) {
    let Some(s) = start(b).await else { return };
    const CALLERS: usize = 8;
    const EACH: usize = 15;
    let before = read(s.addr, "User", "root").await.map_or(0, |e| e.version);
    let mut tasks = Vec::new();
    for _ in 0..CALLERS {
        let addr = s.addr;
        tasks.push(tokio::spawn(async move {
            let mut c = client(addr).await;
            let tok = token("k2", "root");
            let mut failed = Vec::new();
            for _ in 0..EACH {
                let req = commit_req(vec![update("UpdateUser", "User", "root", json!({}), None)]);
                if let Err(e) = c.authorize_and_commit(authed(&tok, req)).await {
                    failed.push(format!("{:?}: {}", e.code(), e.message()));
                }
            }
            failed
        }));
    }
    let mut failed = Vec::new();
    for t in tasks {
        failed.extend(t.await.unwrap());
    }
    assert!(
        failed.is_empty(),
        "{} of {} self-writes failed: {:?}",
        failed.len(),
        CALLERS * EACH,
        &failed[..failed.len().min(3)]
    );
    let after = read(s.addr, "User", "root").await.expect("root exists").version;
    assert_eq!(after, before + (CALLERS * EACH) as u64, "every self-write counted once");
}

crate::on_both_backends!(writes_to_the_principal_itself);
